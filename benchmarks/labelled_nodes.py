"""Why one BatchNorm breaks DFA on Cora: do the labelled nodes' block outputs run away from the other nodes'?

``python -m benchmarks.labelled_nodes [--rules bp dfa orthogonal] [--cells 2:none 2:layer 2:batch 8:none 8:batch]
[--seeds 0 1 2] [--split public | full | dna_kfold] --root logs/labelled_nodes
--out benchmarks/results/labelled_nodes_cora.md``

Why: on full-batch Cora the error ``e`` is zero outside the 140 labelled (training) nodes, so ``B_i e`` pushes only
those nodes' block outputs, and its radial component pushes them outwards. Without a norm, the cheapest way for a
block to grow some nodes' outputs is to grow every node's (scale its weights). BatchNorm divides that scale out, per
feature over all nodes, so what is left is to grow the labelled nodes *relative to the rest*: to single them out. The
reading this script tests: under plain DFA with BatchNorm the labelled nodes' outputs grow far larger than the
others' and the network fits them without generalising, and removing the radial component (``feedback_norm:
orthogonal``, the rescue) shrinks that gap. A prediction follows: with more labelled nodes (``--split dna_kfold``:
20 % of the nodes, 542; ``--split full``: 1,208, scored on the public test nodes; against the public split's 140)
there is less to single out, and BatchNorm should cost DFA less.

It trains the failure map's GCN stack (``recipes/gcn_stack_{bp,dfa}.yaml``) per rule, cell and seed and measures, at
the final weights in eval mode (one full-graph forward):

- the block outputs' RMS on the labelled nodes over their RMS on all other nodes (mean over the blocks);
- train accuracy and loss (on the labelled nodes), test loss and accuracy; with BatchNorm, the test accuracy again
  with the full graph's own statistics in place of the running ones (are those what fails?), and how far the running
  statistics are from the graph's (mean gap in standard deviations, variance ratio) and how far the pre-norm batch
  mean moves per training step late in training (:class:`PreNormDrift`: what the running averages must follow),
  how much of that is the bias just before the norm, and that bias's gradient (zero but for rounding: BatchNorm
  cancels the bias, yet Adam steps on it); ``dfa_frozen_bias`` holds those biases still and changes nothing else;

beside the test accuracy at the best validation accuracy (the failure map's metric). A run writes
``<root>/<split>/<rule>/d<depth>_<norm>_s<seed>.json`` and is reused while it describes the same run.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from dfa_lightning.cli import run
from dfa_lightning.studies import QUIET, add_cora_cell_arguments, cell_table, mean_std, reusable, write_outputs

__all__ = ["RULES", "NEEDS_NORM", "labelled_rms", "batch_statistics_accuracy", "running_statistics_gap",
           "preceding_bias", "PreNormDrift", "node_split", "train", "main"]

#: rule -> (recipe, extra CLI arguments). ``dfa_frozen_norm``: plain DFA with the norms' own parameters (BatchNorm's
#: scale and shift) held at their initial values (learning rate 0; the first matching group wins), to tell their
#: training by feedback apart from the signal's way through the norm's backward. ``dfa_frozen_bias``: plain DFA with
#: the convs' biases (just before each BatchNorm, which cancels them) held at 0: the training forward, and so every
#: other parameter's update, is plain DFA's, and only the running means differ. Both need a norm: cells without one
#: are skipped.
RULES: dict[str, tuple[str, list[str]]] = {
    "bp": ("recipes/gcn_stack_bp.yaml", []),
    "dfa": ("recipes/gcn_stack_dfa.yaml", []),
    "orthogonal": ("recipes/gcn_stack_dfa.yaml", ["--trainer.callbacks.init_args.feedback_norm", "orthogonal"]),
    "dfa_frozen_norm": ("recipes/gcn_stack_dfa.yaml", [
        "--model.param_groups",
        '[{"params": "blocks.*.norm.**", "lr": 0.0}, {"params": "blocks.0.**", "weight_decay": 1.0e-4}]']),
    "dfa_frozen_bias": ("recipes/gcn_stack_dfa.yaml", [
        "--model.param_groups",
        '[{"params": "blocks.*.conv.bias", "lr": 0.0}, {"params": "blocks.0.**", "weight_decay": 1.0e-4}]']),
}
NEEDS_NORM = {"dfa_frozen_norm", "dfa_frozen_bias"}
MEASURES = 5  # the version of what a run records: a cached run with other measures is trained again


def labelled_rms(output: Tensor, labelled: Tensor) -> dict[str, float]:
    """RMS of ``output``'s rows on the ``labelled`` nodes and on the rest, and their ratio."""
    output = output.detach().float()
    inside, outside = output[labelled].pow(2).mean().sqrt(), output[~labelled].pow(2).mean().sqrt()
    return {"labelled": float(inside), "other": float(outside), "ratio": float(inside / outside)}


@torch.no_grad()
def batch_statistics_accuracy(model: nn.Module, task: Any, batch: Any, stage: str = "test") -> float | None:
    """``stage`` accuracy of a copy of ``model`` whose BatchNorms normalise by the full graph's own statistics in eval
    mode, not their running ones: tells whether a gap between training and evaluation comes from those. None without
    a BatchNorm."""
    model = copy.deepcopy(model).eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return None
    for norm in norms:
        norm.track_running_stats, norm.running_mean, norm.running_var = False, None, None
    step = task.step(model, batch, stage)
    return float((step.output[task.mask(batch, stage)].argmax(-1) == step.target).float().mean())


def running_statistics_gap(norm: nn.modules.batchnorm._BatchNorm, x: Tensor) -> dict[str, float]:
    """How far a BatchNorm's running statistics are from the full graph's own, on its input ``x`` [nodes, features]:
    the mean over features of |batch mean − running mean| in batch standard deviations, and of batch var / running
    var (1 and 0 where they agree)."""
    x = x.detach().float()
    mean, var = x.mean(0), x.var(0, unbiased=False)
    return {"mean_gap_sd": float(((mean - norm.running_mean).abs() / (var + norm.eps).sqrt()).mean()),
            "var_ratio": float(((var + norm.eps) / (norm.running_var + norm.eps)).mean())}


def preceding_bias(model: nn.Module, norm: nn.Module) -> nn.Parameter | None:
    """The bias of the module registered just before ``norm`` in the same parent (a GCN block's conv, a Sequential's
    Linear): the one parameter a BatchNorm cancels outright, so the loss is blind to it in training."""
    for parent in model.modules():
        children = list(parent.children())
        for before, child in zip(children, children[1:]):
            if child is norm:
                bias = getattr(before, "bias", None)
                return bias if isinstance(bias, nn.Parameter) else None
    return None


class PreNormDrift(pl.Callback):
    """In every training forward, how far each BatchNorm's batch mean moved since the last step, in that step's batch
    standard deviations, and that standard deviation: a running average with momentum 0.1 trails a mean that moves
    ``d`` per step by about ``9 d``. Beside it, the part that is the bias just before the norm (:func:`preceding_bias`):
    how far that bias moved per step (same units) and the size of its gradient (mean |grad|), which the loss cannot
    ask for (BatchNorm subtracts any shift of its input's mean, so the exact gradient is zero) but which Adam turns
    into steps of about its learning rate all the same. Summary: over the last ``window`` steps (the gradient also
    over the first), averaged over norms and features."""

    def __init__(self, window: int = 50) -> None:
        self.window, self.steps, self.handles = window, [], []
        self.grads: list[list[float]] = []
        self._last: dict[int, tuple[Tensor, Tensor | None]] = {}
        self._biases: list[nn.Parameter | None] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        norms = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._biases = [preceding_bias(pl_module, m) for m in norms]
        self.handles = [m.register_forward_hook(self._record(i)) for i, m in enumerate(norms)]

    def _record(self, index: int):
        def hook(module, args, _out):
            if not module.training:
                return
            x = args[0].detach().float()
            mean, sd = x.mean(0), x.std(0, unbiased=False)
            bias = self._biases[index]
            bias = None if bias is None else bias.detach().float().clone()
            if index in self._last:
                last_mean, last_bias = self._last[index]
                bias_step = (float(((bias - last_bias).abs() / (sd + 1e-12)).mean()) if bias is not None
                             else float("nan"))
                self.steps.append((float(((mean - last_mean).abs() / (sd + 1e-12)).mean()), float(sd.mean()),
                                   bias_step))
            self._last[index] = (mean, bias)
        return hook

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        grads = [float(b.grad.abs().mean()) for b in self._biases if b is not None and b.grad is not None]
        if grads:
            self.grads.append(grads)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self.handles:
            handle.remove()

    def summary(self) -> dict[str, float] | None:
        if not self.steps:
            return None
        late = self.steps[-self.window * max(1, len(self.handles)):]
        summary = {"late_mean_step_sd": statistics.fmean(s for s, _, _ in late),
                   "late_sd": statistics.fmean(sd for _, sd, _ in late),
                   "early_sd": statistics.fmean(sd for _, sd, _ in self.steps[: max(1, len(self.handles))]),
                   "late_bias_step_sd": statistics.fmean(b for _, _, b in late)}
        if self.grads:
            summary["early_bias_grad"] = statistics.fmean(g for step in self.grads[: self.window] for g in step)
            summary["late_bias_grad"] = statistics.fmean(g for step in self.grads[-self.window:] for g in step)
        return summary


@torch.no_grad()
def node_split(model: nn.Module, task: Any, batch: Any) -> dict[str, Any]:
    """One eval-mode forward of the full graph: each block output's labelled/other RMS, accuracy and loss per split."""
    outputs: list[Tensor] = []
    handles = [block.register_forward_hook(lambda _m, _a, out: outputs.append(out)) for block in model.blocks]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    gaps: list[dict[str, float]] = []
    handles += [m.register_forward_hook(lambda m, args, _out: gaps.append(running_statistics_gap(m, args[0])))
                for m in norms]
    was_training = model.training
    model.eval()
    try:
        steps = {stage: task.step(model, batch, stage) for stage in ("train", "val", "test")}
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    labelled = task.mask(batch, "train")
    if labelled.dtype != torch.bool:
        labelled = torch.zeros(batch.num_nodes, dtype=torch.bool, device=labelled.device).index_fill_(0, labelled, True)
    blocks = outputs[: len(model.blocks)]  # the train forward's; the val and test forwards are the same graph
    return {"points": [labelled_rms(out, labelled) for out in blocks],
            **{f"{stage}_loss": float(step.loss) for stage, step in steps.items()},
            **{f"{stage}_acc": float((step.output[task.mask(batch, stage)].argmax(-1) == step.target).float().mean())
               for stage, step in steps.items()},
            "test_acc_batch_stats": batch_statistics_accuracy(model, task, batch),
            "running_statistics_gap": gaps[: len(norms)]}


def train(rule: str, depth: int, norm: str, seed: int, root: Path, split: str = "public") -> dict:
    """One run (or its cached result): test accuracy at the best validation accuracy, and the final weights' split."""
    recipe, extra = RULES[rule]
    key = {"rule": rule, "depth": depth, "norm": norm, "seed": seed, "split": split, "recipe": recipe, "extra": extra,
           "measures": MEASURES}
    out = root / split / rule / f"d{depth}_{norm}_s{seed}.json"
    if out.is_file():
        cached = json.loads(out.read_text())
        if reusable(cached, key):
            return cached
    run_dir = out.with_suffix("")
    args = ["--config", recipe, *QUIET, "--seed_everything", str(seed), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.init_args.save_dir", str(run_dir), "--model.model.init_args.num_layers", str(depth),
            "--model.model.init_args.norm", norm, "--data.init_args.split", split, *extra]
    start = time.perf_counter()
    cli = run(args, run=False)
    drift = PreNormDrift()
    cli.trainer.callbacks.append(drift)
    cli.trainer.fit(cli.model, cli.datamodule)
    batch = next(iter(cli.datamodule.train_dataloader())).to(cli.model.device)
    final = node_split(cli.model.model, cli.model.task, batch)
    (metrics,) = cli.trainer.test(cli.model, cli.datamodule, ckpt_path="best", verbose=False)
    result = {**key, "test": {k: float(v) for k, v in metrics.items()}, "final": final, "drift": drift.summary(),
              "seconds": round(time.perf_counter() - start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def _gap(runs: list[dict], field: str) -> float:
    """``field`` of the running-statistics gap, averaged over the BatchNorms and the runs."""
    return statistics.fmean(statistics.fmean(g[field] for g in r["final"]["running_statistics_gap"]) for r in runs)


def _drift(runs: list[dict], field: str) -> float:
    """``field`` of the pre-norm drift summary, averaged over the runs."""
    return statistics.fmean(r["drift"][field] for r in runs)


def render(results: list[dict], rules: list[str], cells: list[tuple[int, str]], split: str, command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"Cora ({split} split), the failure map's GCN stack (`recipes/gcn_stack_{{bp,dfa}}.yaml`, no skips). "
             "Per rule and cell, mean over the seeds: test accuracy (%, at the best validation accuracy; ± std); "
             "at the final weights (eval mode, full graph): train accuracy (%) and loss on the labelled nodes, test "
             "loss, test accuracy (%; with BatchNorm, also with the full graph's own statistics in place of the "
             "running ones, how far the running mean and variance are from the graph's, averaged over the norms "
             "and features, and how far the pre-norm batch mean moves per training step over the last 50 steps, in "
             "batch standard deviations; beside it, how far the conv's bias just before the norm moves per step in "
             "the same units, and that bias's mean |gradient| over the first and last 50 steps: the loss is blind to "
             "it, BatchNorm cancels it), and **the block outputs' RMS on the labelled nodes over their RMS on the "
             "other nodes** (mean over the blocks). `dfa_frozen_norm`: plain DFA with the norms' scale and shift held "
             "at 1 and 0; `dfa_frozen_bias`: plain DFA with the convs' biases before the norms held at 0.", ""]

    def describe(runs: list[dict]) -> str:
        def mean(field: str) -> float:
            return statistics.fmean(r["final"][field] for r in runs)

        ratio = statistics.fmean(statistics.fmean(p["ratio"] for p in r["final"]["points"]) for r in runs)
        norm_stats = (f" ({100 * mean('test_acc_batch_stats'):.1f} with batch statistics; running mean off by "
                      f"{_gap(runs, 'mean_gap_sd'):.2f} sd, variance ratio {_gap(runs, 'var_ratio'):.2f}; "
                      f"pre-norm mean moves {_drift(runs, 'late_mean_step_sd'):.3f} sd per step late, the bias before "
                      f"the norm {_drift(runs, 'late_bias_step_sd'):.3f} sd, its gradient "
                      f"{_drift(runs, 'early_bias_grad'):.1e} early, {_drift(runs, 'late_bias_grad'):.1e} late)"
                      if runs[0]["final"]["test_acc_batch_stats"] is not None else "")
        return (f"{mean_std([100 * r['test']['test/acc'] for r in runs], digits=1)}<br>"
                f"train {100 * mean('train_acc'):.1f}, loss {mean('train_loss'):.3f} (test {mean('test_loss'):.2f})"
                f"<br>final test {100 * mean('test_acc'):.1f}{norm_stats}<br>**labelled/other RMS {ratio:.2f}×**")

    lines += cell_table(results, "rule", rules, cells, describe)
    lines += ["", f"Wall time of the runs (fit + test): {sum(r['seconds'] for r in results):.0f} s over "
              f"{len(results)} runs.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.labelled_nodes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--split", default="public", choices=["public", "full", "dna_kfold"],
                        help="public: 140 labelled nodes; full: 1,208 (the public validation and test nodes kept); "
                             "dna_kfold: 20 %% of the nodes (542)")
    add_cora_cell_arguments(parser, ["2:none", "2:layer", "2:batch", "8:none", "8:batch"], root="logs/labelled_nodes",
                            out="benchmarks/results/labelled_nodes_cora.md")
    args = parser.parse_args(argv)
    cells = args.cells
    results = []
    for rule in args.rules:
        for depth, norm in cells:
            if rule in NEEDS_NORM and norm == "none":
                continue
            for seed in args.seeds:
                result = train(rule, depth, norm, seed, Path(args.root), args.split)
                print(f"{rule} depth={depth} norm={norm} seed={seed}: test/acc={result['test']['test/acc']:.4f} "
                      f"train/loss={result['final']['train_loss']:.4f}", flush=True)
                results.append(result)
    command = " ".join(["python -m benchmarks.labelled_nodes", *argv])
    write_outputs(args.out, render(results, args.rules, cells, args.split, command),
                  {"command": command, "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
