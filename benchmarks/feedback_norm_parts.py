"""Which part of LayerNorm's backward makes ``feedback_norm`` rescue DFA, and which part costs the deep plain stack?

``python -m benchmarks.feedback_norm_parts [--parts none layer orthogonal center scale center_scale]
[--cells 8:none 2:batch 8:batch 2:none] [--seeds 0 1 2] --root logs/feedback_norm_parts
--out benchmarks/results/feedback_norm_parts_cora.md``

Why: ``feedback_norm: layer`` hands ``B_i e`` to each point through a LayerNorm's backward,
``(1/σ)(g − mean(g) − y·mean(g·y))`` with ``g = B_i e`` and ``y`` the point's output normalised per sample. On the
GCN stack of the failure map it lifts DFA with BatchNorm from 46 to 76 % and drops the plain depth-8 stack from 74 to
54 % (README, "Where DFA fails"). That formula has three parts: centring, removing the component along ``y`` (the
direction that would grow or shrink the point's output) and dividing by the per-sample scale σ. Each part here is
trained alone or with another, on Cora's ``recipes/gcn_stack_dfa.yaml`` at the failure map's cells:

- ``none``: plain DFA; ``layer`` and ``orthogonal`` (all but the 1/σ): the engine's own options;
- ``center``: ``g − mean(g)``; ``scale``: ``g / σ``; ``center_scale``: ``(g − mean(g)) / σ`` (the radial component
  kept). These three are not engine options: this script swaps the function that builds the tensor ``B_i e`` is
  handed to (:meth:`FeedbackEngine.normalise`) for the run, so autograd carries ``B_i e`` through the part alone.

Each run also records, every 25 steps, each point's output RMS and the fraction of its entries that are zero (ReLU
and dropout) in the training forward: the table gives them at the last record (step 225 of 250), averaged over points
and seeds. A run writes ``<root>/<part>/d<depth>_<norm>_s<seed>.json`` and is reused while it describes the same run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import pytorch_lightning as pl
import torch

from dfa_lightning.cli import run
from dfa_lightning.feedback.engine import FeedbackEngine
from dfa_lightning.studies import QUIET, add_cora_cell_arguments, cell_table, mean_std, write_outputs

__all__ = ["PARTS", "PointStats", "train", "main"]

RECIPE = "recipes/gcn_stack_dfa.yaml"
EPS = 1e-5  # LayerNorm's


def _sigma(out: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(out.detach().var(dim=-1, keepdim=True, unbiased=False) + EPS)


# part -> (engine feedback_norm, replacement for FeedbackEngine.normalise or None). Only the backward of the returned
# tensor matters: B_i e is handed to it. sigma is held constant, so `out / sigma` passes g / sigma.
PARTS: dict[str, tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]] = {
    "none": ("none", None),
    "layer": ("layer", None),
    "orthogonal": ("orthogonal", None),
    "center": ("layer", lambda out: out - out.mean(dim=-1, keepdim=True)),
    "scale": ("layer", lambda out: out / _sigma(out)),
    "center_scale": ("layer", lambda out: (out - out.mean(dim=-1, keepdim=True)) / _sigma(out)),
}


class PointStats(pl.Callback):
    """Every ``every`` training steps: each block output's RMS and fraction of zero entries, in the training forward."""

    def __init__(self, every: int = 25) -> None:
        self.every, self.step, self.rows, self.handles = every, 0, [], []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for i, block in enumerate(pl_module.model.blocks):
            self.handles.append(block.register_forward_hook(self._record(f"blocks.{i}")))

    def _record(self, name: str):
        def hook(module, args, out):
            if module.training and self.step % self.every == 0:
                o = out.detach().float()
                self.rows.append({"step": self.step, "point": name, "rms": float(o.pow(2).mean().sqrt()),
                                  "zeros": float((o == 0).float().mean())})
        return hook

    def on_train_batch_end(self, *args) -> None:
        self.step += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for h in self.handles:
            h.remove()


def train(part: str, depth: int, norm: str, seed: int, root: Path) -> dict:
    """One run (or its cached result): test accuracy at the best validation accuracy, and the point statistics."""
    key = {"part": part, "depth": depth, "norm": norm, "seed": seed, "recipe": RECIPE}
    out = root / part / f"d{depth}_{norm}_s{seed}.json"
    if out.is_file():
        cached = json.loads(out.read_text())
        if all(cached.get(k) == v for k, v in key.items()):
            return cached
    feedback_norm, swap = PARTS[part]
    run_dir = root / part / f"d{depth}_{norm}_s{seed}"
    args = ["--config", RECIPE, *QUIET, "--seed_everything", str(seed), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.init_args.save_dir", str(run_dir), "--model.model.init_args.num_layers", str(depth),
            "--model.model.init_args.norm", norm, "--trainer.callbacks.init_args.feedback_norm", feedback_norm]
    original = FeedbackEngine.normalise
    if swap is not None:
        FeedbackEngine.normalise = lambda self, tensor, mode=None: swap(tensor)
    try:
        start = time.perf_counter()
        cli = run(args, run=False)
        stats = PointStats()
        cli.trainer.callbacks.append(stats)
        cli.trainer.fit(cli.model, cli.datamodule)
        (metrics,) = cli.trainer.test(cli.model, cli.datamodule, ckpt_path="best", verbose=False)
    finally:
        FeedbackEngine.normalise = original
    result = {**key, "test": {k: float(v) for k, v in metrics.items()}, "stats": stats.rows,
              "seconds": round(time.perf_counter() - start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result


def _last(stats: list[dict], field: str) -> float:
    last = max(r["step"] for r in stats)
    return statistics.fmean(r[field] for r in stats if r["step"] == last)


def render(results: list[dict], parts: list[str], cells: list[tuple[int, str]], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "Cora test accuracy (%, at the best validation accuracy; mean ± std over the seeds) of the GCN stack "
             f"(`{RECIPE}`) trained by DFA with `B_i e` handed to each block output through one part of LayerNorm's "
             "backward. Under each: the block outputs' RMS and fraction of zero entries (ReLU and dropout) at step "
             "225 of 250, averaged over the points and seeds.", ""]

    def describe(runs: list[dict]) -> str:
        acc = mean_std([100 * r["test"]["test/acc"] for r in runs], digits=1)
        rms = statistics.fmean(_last(r["stats"], "rms") for r in runs)
        zeros = statistics.fmean(_last(r["stats"], "zeros") for r in runs)
        return f"{acc}<br>RMS {rms:.3g}, zeros {zeros:.2f}"

    lines += cell_table(results, "part", parts, cells, describe)
    timed = [r["seconds"] for r in results if r.get("seconds") is not None]
    untimed = len(results) - len(timed)
    lines += ["", f"Wall time of the runs (fit + test): {sum(timed):.0f} s over {len(timed)} runs"
              + (f"; {untimed} runs untimed (trained by this script's first draft: the same runs, no clock)"
                 if untimed else "") + ".", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.feedback_norm_parts",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    add_cora_cell_arguments(parser, ["8:none", "2:batch", "8:batch", "2:none"], root="logs/feedback_norm_parts",
                            out="benchmarks/results/feedback_norm_parts_cora.md")
    args = parser.parse_args(argv)
    cells = args.cells
    results = []
    for part in args.parts:
        for depth, norm in cells:
            for seed in args.seeds:
                result = train(part, depth, norm, seed, Path(args.root))
                print(f"{part} depth={depth} norm={norm} seed={seed}: test/acc={result['test']['test/acc']:.4f}",
                      flush=True)
                results.append(result)
    command = " ".join(["python -m benchmarks.feedback_norm_parts", *argv])
    # the JSON keeps each run's statistics at initialisation and at the last record (what the table reads)
    kept = [{**r, "stats": [s for s in r["stats"] if s["step"] in (0, max(x["step"] for x in r["stats"]))]}
            for r in results]
    write_outputs(args.out, render(results, args.parts, cells, command), {"command": command, "runs": kept})
    return 0


if __name__ == "__main__":
    sys.exit(main())
