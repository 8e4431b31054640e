"""Reproduce the paper's graph tables (Tables 3, 4, A.2, A.4): every model × method × dataset over N seeds.

``python -m dfa_lightning.graphs_reproduce --datasets Cora --models gcn cheb gat dna gae --seeds 0 1 2 3 4
--root logs/graphs --out benchmarks/results/graphs_cora.md [-- extra CLI args for every run]``

Each run is the recipe ``recipes/<model>_<method>.yaml`` trained by a normal ``fit`` in this process (then tested at
the best validation checkpoint), with the dataset switched by CLI overrides (``--data.init_args.name`` and the
feature / class counts of :data:`DATASETS`). Per run it writes ``<root>/<Dataset>/<recipe>/seed<k>/result.json``;
a run whose ``result.json`` exists and was made with the same arguments after ``--`` is not trained again (``--rerun``
to force), so an interrupted sweep resumes and extra seeds can be added later. A run that fails with a user error
(missing data file, SplineConv kernels not installed) is recorded as *not measured* with its one-line reason, and the
sweep goes on; an error the arguments after ``--`` cause stops the sweep before any training.

Alignment (paper Table A.2): at the end of training (``on_train_end``: the final weights after the last epoch, not
the best checkpoint), every DFA run measures ``AlignmentMonitor.measure`` once on the full graph with the loss over
**all** nodes (``train_mask`` set to every node, as the paper's ``alignment.py`` computed the NLL over all nodes),
in training mode with the same dropout masks for the DFA and BP passes. The table reports the per-node cosine of the
DFA signal ``B e`` and the BP gradient at the deepest feedback point (the paper's choice), averaged over nodes, then
mean ± std over seeds. The hidden representation (first feedback point, eval mode, all nodes) of every seed-0
node-classification run is saved as ``hidden.pt`` for :mod:`dfa_lightning.embedding` (paper Figure 2).

The markdown table puts measured mean ± std next to the paper's numbers (:mod:`dfa_lightning.reference.paper_graphs`)
and checks the issue's criteria: DFA within 2.5 points of the paper's DFA number (or above), shallow far below DFA.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from dfa_lightning import studies
from dfa_lightning.callbacks.final_alignment import FinalAlignment
from dfa_lightning.cli import split_passthrough
from dfa_lightning.errors import UserError
from dfa_lightning.probe import modes_kept
from dfa_lightning.reference.paper_graphs import PAPER_GRAPHS

__all__ = ["DATASETS", "MODELS", "METHODS", "GraphFinalAlignment", "dataset_args", "run_one", "collect", "render",
           "main"]

REPO = Path(__file__).resolve().parents[2]
#: (node features, classes) of each Planetoid graph: what the recipes' Cora sizes are replaced with.
DATASETS: dict[str, tuple[int, int]] = {"Cora": (1433, 7), "CiteSeer": (3703, 6), "PubMed": (500, 3)}
MODELS = ("gcn", "cheb", "spline", "gat", "dna", "gae")
METHODS = ("bp", "dfa", "shallow")
LINK_MODELS = ("gae",)
#: Paper settings that differ by dataset (paper §2.4: GAE on CiteSeer runs 200 epochs, and DFA there uses lr 0.02).
DATASET_OVERRIDES: dict[tuple[str, str], list[str]] = {
    ("gae_bp", "CiteSeer"): ["--trainer.max_epochs", "200"],
    ("gae_dfa", "CiteSeer"): ["--trainer.max_epochs", "200", "--model.optimizer.init_args.lr", "0.02"],
    ("gae_shallow", "CiteSeer"): ["--trainer.max_epochs", "200", "--model.optimizer.init_args.lr", "0.02"],
}
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


# ------------------------------------------------------------------------------------------------ end-of-training probe
class GraphFinalAlignment(FinalAlignment):
    """:class:`FinalAlignment` on the full graph (all nodes), and the hidden representation for the embedding plot.

    Args:
        hidden_point: module name whose output is saved as the hidden representation (None: not saved).
        hidden_path: where to ``torch.save`` ``{"hidden": [N, d], "y": [N], "point": name}`` (None: not saved).
        all_nodes: score every node in the alignment loss, as the paper (default: True); False keeps the train mask.
    """

    def __init__(self, hidden_point: str | None = None, hidden_path: str | None = None, all_nodes: bool = True):
        super().__init__(all_nodes=all_nodes)
        self.hidden_point, self.hidden_path = hidden_point, hidden_path

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.hidden_point and self.hidden_path:
            batch = self.first_batch(trainer, pl_module)
            if hasattr(batch, "y"):
                self._save_hidden(pl_module, batch)

    @torch.no_grad()
    def _save_hidden(self, pl_module: pl.LightningModule, batch: Any) -> None:
        module = dict(pl_module.model.named_modules())[self.hidden_point]
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().cpu()))
        try:
            with modes_kept(pl_module):
                pl_module.eval()
                edge_attr = getattr(batch, "edge_attr", None)
                args = (batch.x, batch.edge_index) if edge_attr is None else (batch.x, batch.edge_index, edge_attr)
                pl_module.model(*args)
        finally:
            handle.remove()
        Path(self.hidden_path).parent.mkdir(parents=True, exist_ok=True)
        torch.save({"hidden": seen[0], "y": batch.y.cpu(), "point": self.hidden_point}, self.hidden_path)


# ------------------------------------------------------------------------------------------------ one run
def dataset_args(model: str, dataset: str) -> list[str]:
    """CLI overrides that switch a Cora recipe to ``dataset``."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {dataset!r}; choose from {', '.join(DATASETS)}")
    features, classes = DATASETS[dataset]
    args = ["--data.init_args.name", dataset, "--model.model.init_args.in_channels", str(features)]
    if model not in LINK_MODELS:
        args += ["--model.model.init_args.out_channels", str(classes), "--model.task.init_args.num_classes",
                 str(classes)]
    return args


def _run_args(model: str, method: str, dataset: str, seed: int, run_dir: Path, extra: list[str], recipe: Path,
              save_hidden: bool) -> list[str]:
    """The ``fit`` arguments of one run, without the subcommand (the pre-run check parses the same ones)."""
    from dfa_lightning.models.graph import FEEDBACK_POINTS

    probe = "dfa_lightning.graphs_reproduce.GraphFinalAlignment"
    args = ["--config", str(recipe), "--seed_everything", str(seed), *QUIET,
            "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
            *dataset_args(model, dataset), *DATASET_OVERRIDES.get((recipe.stem, dataset), []),
            f"--trainer.callbacks+={probe}"]
    if save_hidden:
        point = FEEDBACK_POINTS[model][0]
        args += ["--trainer.callbacks.hidden_point", point,
                 "--trainer.callbacks.hidden_path", str(run_dir / "hidden.pt")]
    return args + list(extra)


def run_one(model: str, method: str, dataset: str, seed: int, root: str | Path, extra: list[str] = (),
            recipes: str | Path = REPO / "recipes", rerun: bool = False, save_hidden: bool | None = None) -> dict:
    """Train ``recipes/<model>_<method>.yaml`` on ``dataset`` with ``seed``; returns (and caches) its result.

    The result is ``{"model", "method", "dataset", "seed", "overrides", "metrics": {test/...}, "alignment": {...},
    "deepest": point, "seconds": s}``, or with ``"error": message`` when the run could not be made. A cached result
    is reused only if it was made with the same recipe text and ``extra`` arguments: a 1-epoch smoke test, or the
    run of a recipe since edited, must not stand for the full run.
    """
    recipe = Path(recipes) / f"{model}_{method}.yaml"
    run_dir = Path(root) / dataset / recipe.stem / f"seed{seed}"
    out = run_dir / "result.json"
    result: dict[str, Any] = {"model": model, "method": method, "dataset": dataset, "seed": seed,
                              "recipe_sha256": studies.recipe_digest(recipe, list(extra)), "overrides": list(extra)}
    cached = None if rerun else studies.read_result(out)
    # failed runs (missing file, missing kernels) are tried again: they are cheap
    if cached is not None and "error" not in cached and studies.reusable(cached, result):
        return cached
    if save_hidden is None:
        save_hidden = seed == 0 and model not in LINK_MODELS
    args = ["fit", *_run_args(model, method, dataset, seed, run_dir, extra, recipe, save_hidden)]
    start = time.perf_counter()
    try:
        cli = studies.run(args)
    except UserError as err:
        result["error"] = str(err).splitlines()[0]
    else:
        # by name: under `python -m` this file is __main__ and the CLI's callback comes from the importable module
        final = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == GraphFinalAlignment.__name__]
        result["metrics"] = {k: float(v) for k, v in cli.test_results.items()}
        result["alignment"] = final[0].alignment if final else {}
        result["deepest"] = final[0].deepest if final else None
    result["seconds"] = round(time.perf_counter() - start, 1)
    studies.write_result(out, result)
    return result


def cached_result(model: str, method: str, dataset: str, seed: int, root: str | Path, extra: list[str] = (),
                  recipes: str | Path = REPO / "recipes") -> dict:
    """``--table-only``: the run's ``result.json`` when it was made as :func:`run_one` would make it now (the same
    recipe text and arguments after ``--``); a 3-epoch smoke run, or the run of a recipe since edited, is "not run"
    here, not a result beside the paper's numbers."""
    recipe = Path(recipes) / f"{model}_{method}.yaml"
    key = {"model": model, "method": method, "dataset": dataset, "seed": seed}
    cached = studies.read_result(Path(root) / dataset / recipe.stem / f"seed{seed}" / "result.json")
    if cached is None:
        return {**key, "error": "not run (no result.json)"}
    made = {"recipe_sha256": studies.recipe_digest(recipe, list(extra)), "overrides": list(extra)}
    if not studies.reusable(cached, made):
        return {**key, "error": f"not run with these arguments (its result.json was made with the overrides "
                                f"{' '.join(cached.get('overrides', [])) or 'none'}, or another recipe text)"}
    return cached


def check_arguments(runs: list[tuple[str, str, str, list[str]]], root: str | Path, recipes: str | Path,
                    own: dict[str, list[str]]) -> None:
    """Parse each ``(model, method, dataset, extra)`` run's arguments before any training. An error that the
    arguments after ``--`` cause (it is gone without them) is a command-line error shared by the runs: raised here,
    not recorded per run as *not measured*. An error the recipe has by itself (SplineConv kernels not installed) is
    left to its runs. Every dataset is checked (about 0.3 s a run): each adds its own overrides
    (:data:`DATASET_OVERRIDES`), so the first dataset passing says nothing of the last."""
    for model, method, dataset, extra in runs:
        recipe = Path(recipes) / f"{model}_{method}.yaml"
        run_dir = Path(root) / dataset / recipe.stem / "seed0"
        try:
            studies.run(_run_args(model, method, dataset, 0, run_dir, extra, recipe, False), run=False)
        except UserError as err:
            try:
                studies.run(_run_args(model, method, dataset, 0, run_dir, own.get(model, []), recipe, False),
                            run=False)
            except UserError:
                continue
            raise err from None


# ------------------------------------------------------------------------------------------------ table
def _mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(results: list[dict]) -> dict:
    """``{dataset: {model: {method: {"values": {metric: [...]}, "seeds": [...], "align": [...], "error": str}}}}``."""
    table: dict = {}
    for r in results:
        cell = table.setdefault(r["dataset"], {}).setdefault(r["model"], {}).setdefault(
            r["method"], {"values": {}, "seeds": [], "align": [], "error": None, "overrides": set(), "failed": {}})
        if r["seed"] in cell["seeds"] or r["seed"] in cell["failed"]:  # one result per seed: never counted twice
            continue
        if "error" in r:
            if cell["error"] is None or cell["error"].startswith("not run"):  # a real reason beats "not run"
                cell["error"] = r["error"]
            cell["failed"][r["seed"]] = r["error"]
            continue
        cell["seeds"].append(r["seed"])
        cell["overrides"].add(" ".join(_model_overrides(r.get("overrides", []))))
        for k, v in r["metrics"].items():
            cell["values"].setdefault(k, []).append(v)
        deepest = r.get("deepest")
        if deepest and f"align/signal_cos/{deepest}" in r.get("alignment", {}):
            cell["align"].append(r["alignment"][f"align/signal_cos/{deepest}"])
            cell["align_point"] = deepest
    return table


def _model_overrides(extra: list[str]) -> list[str]:
    """The overrides of a run that change the model or the learning rule (data paths and epochs are not listed)."""
    keep, out = False, []
    for arg in extra:
        if arg.startswith("--"):
            keep = arg.startswith(("--model.", "--trainer.callbacks"))
        if keep:
            out.append(arg)
    return out


def _short(error: str | None) -> str:
    """The head of a one-line error, for a table cell (the full reasons are listed under the tables)."""
    if not error:
        return "no run"
    # cut at the first parenthesis that is not part of the location (``command line (recipes/x.yaml): ...``)
    cut = next((m.start() for m in re.finditer(r" \(", error)
                if not re.match(r" \([^()]*\):", error[m.start():])), len(error))
    head = error[:cut]
    return head if len(head) <= 100 else head[:99] + "…"


def _count(cell: dict) -> str:
    """``n=3``, or ``n=2 of 3`` where a seed of the cell failed or was not run."""
    n = len(cell["seeds"])
    return f"n={n} of {n + len(cell['failed'])}" if cell["failed"] else f"n={n}"


def _verdict(ok: bool, partial: bool) -> str:
    """✓ or ✗ MISSED; on a mean that misses some seeds, only a miss is certain enough to say."""
    if partial:
        return "✗ MISSED (seeds missing)" if not ok else "not judged (seeds missing)"
    return "✓" if ok else "✗ MISSED"


def _fmt(ms: tuple[float, float] | None, scale: float, digits: int) -> str:
    return "n/a" if ms is None else f"{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}"


def render(table: dict, command: str, shallow_margin: float = 20.0, dfa_tolerance: float = 2.5) -> str:
    """Markdown: one node-classification table and one link-prediction table per dataset, then the alignment."""
    lines = [f"Command: `{command}`", "",
             "Test metric at the best validation epoch; mean ± std over the seeds listed (n = number of seeds). "
             f"Criteria of the issue: DFA mean within {dfa_tolerance} points of the paper's DFA number or above it; "
             f"shallow at least {shallow_margin:g} points below DFA. *not measured* cells give the reason.", ""]
    for dataset, models in table.items():
        ref = PAPER_GRAPHS["node_classification"].get(dataset, {})
        node_models = [m for m in MODELS if m in models and m not in LINK_MODELS]
        if node_models:
            lines += [f"### {dataset}: node classification, test accuracy (%) (paper Table 3 and A.4)", "",
                      "| model | BP | DFA | shallow | paper BP / DFA / shallow | DFA vs paper | shallow ≪ DFA |",
                      "|---|---|---|---|---|---|---|"]
            for model in node_models:
                row, means = [model], {}
                for method in METHODS:
                    cell = models[model].get(method)
                    if cell is None:
                        row.append("not run")
                        continue
                    ms = _mean_std(cell["values"].get("test/acc", []))
                    if ms is None:
                        row.append(f"*not measured*: {_short(cell['error'])}")
                        continue
                    means[method] = ms[0] * 100
                    row.append(f"{_fmt(ms, 100, 1)} ({_count(cell)})")
                partial = {m for m in means if models[model][m]["failed"]}
                paper = ref.get(model, {})
                row.append(" / ".join(f"{paper.get(m, float('nan')):.1f}" for m in METHODS) if paper else "n/a")
                if "dfa" in means and "dfa" in paper:
                    gap = means["dfa"] - paper["dfa"]
                    ok = gap >= -dfa_tolerance
                    row.append(f"{_verdict(ok, 'dfa' in partial)} ({gap:+.1f})")
                else:
                    row.append("not measured")
                if "dfa" in means and "shallow" in means:
                    gap = means["dfa"] - means["shallow"]
                    paper_gap = f"; paper {paper['dfa'] - paper['shallow']:.1f}" if "shallow" in paper else ""
                    compared = bool(partial & {"dfa", "shallow"})  # a BP seed has no part in this comparison
                    row.append(f"{_verdict(gap >= shallow_margin, compared)} ({gap:.1f} below DFA{paper_gap})")
                else:
                    row.append("not measured")
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
        link_models = [m for m in LINK_MODELS if m in models]
        for model in link_models:
            paper = PAPER_GRAPHS["link_prediction"].get(dataset, {}).get(model, {})
            lines += [f"### {dataset}: link prediction with {model.upper()}, test AUC and AP (paper Table 4)", "",
                      "| method | AUC | AP | paper AUC / AP | DFA vs paper (AUC) |", "|---|---|---|---|---|"]
            for method in METHODS:
                cell = models[model].get(method)
                if cell is None:
                    continue
                auc, ap = _mean_std(cell["values"].get("test/auroc", [])), _mean_std(cell["values"].get("test/ap", []))
                if auc is None:
                    lines.append(f"| {method} | *not measured*: {_short(cell['error'])} | | | |")
                    continue
                p = paper.get(method)
                pref = f"{p['auroc']:.3f} / {p['ap']:.3f}" if p else "not in the paper"
                check = ""
                if method == "dfa" and p:
                    gap = (auc[0] - p["auroc"]) * 100
                    check = f"{_verdict(gap >= -dfa_tolerance, bool(cell['failed']))} ({gap:+.1f} points)"
                lines.append(f"| {method} ({_count(cell)}) | {_fmt(auc, 1, 3)} | {_fmt(ap, 1, 3)} | {pref} "
                             f"| {check} |")
            lines.append("")
    align_rows = []
    for dataset, models in table.items():
        for model in MODELS:
            cell = models.get(model, {}).get("dfa")
            if model in LINK_MODELS or cell is None:
                continue
            paper = PAPER_GRAPHS["alignment_cora"].get(model) if dataset == "Cora" else None
            pref = f"{paper['mean']:.2f} ({paper['std']:.2f})" if paper else "n/a"
            ms = _mean_std(cell["align"])
            if ms:
                measured = f"{ms[0]:.2f} ± {ms[1]:.2f} (n={len(cell['align'])})"
            elif cell["seeds"]:
                measured = "*not measured*: no alignment recorded by these runs"
            else:
                measured = f"*not measured*: {_short(cell['error'] or 'no DFA run')}"
            align_rows.append(f"| {dataset} | {model} | {cell.get('align_point', '-')} | {measured} | {pref} |")
    if align_rows:
        lines += ["### Alignment at the end of training (paper Table A.2)", "",
                  "Cosine between the DFA signal B·e and the BP gradient at the deepest feedback point, per node, "
                  "averaged over all nodes (loss over all nodes, final weights after the last epoch, training mode "
                  "with the same dropout masks in both passes); mean ± std over seeds. The paper's std (in "
                  "parentheses) is over nodes.", "",
                  "| dataset | model | point | measured | paper |", "|---|---|---|---|---|", *align_rows, ""]
    overridden = sorted({(dataset, model, method, o) for dataset, models in table.items()
                         for model, methods in models.items() for method, cell in methods.items()
                         for o in cell.get("overrides", ()) if o})
    if overridden:
        lines += ["Runs made with command-line overrides of their recipe:", "",
                  *(f"- {d} {m} {meth}: `{o}`" for d, m, meth, o in overridden), ""]
    reasons = sorted({cell["error"] for models in table.values() for methods in models.values()
                      for cell in methods.values() if cell["error"] and not cell["seeds"]})
    if reasons:
        lines += ["Why some cells are not measured (the runs' one-line errors):", "",
                  *(f"- {reason}" for reason in reasons), ""]
    missing = [f"- {dataset} {model} {method} seed {seed}: {error}" for dataset, models in table.items()
               for model, methods in models.items() for method, cell in methods.items() if cell["seeds"]
               for seed, error in sorted(cell["failed"].items())]
    if missing:
        lines += ["Seeds missing from measured cells (their means are over the other seeds; no ✓ is given on them):",
                  "", *missing, ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m dfa_lightning.graphs_reproduce", *argv])
    argv, extra = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    once = {"nargs": "+", "action": studies._Unique}  # `--models gcn gcn` is one row, not each seed counted twice
    parser.add_argument("--datasets", default=["Cora"], choices=list(DATASETS), **once)
    parser.add_argument("--models", default=[m for m in MODELS], choices=list(MODELS), **once)
    parser.add_argument("--methods", default=list(METHODS), choices=list(METHODS), **once)
    parser.add_argument("--seeds", default=[0, 1, 2, 3, 4], **studies.SEEDS)
    parser.add_argument("--seeds-for", nargs="*", default=[], metavar="MODEL=S1,S2",
                        help="fewer (or other) seeds for one model, e.g. dna=0 (DNA is slow on CPU)")
    parser.add_argument("--root", default="logs/graphs", help="where each run writes logs, checkpoints, result.json")
    parser.add_argument("--out", default="benchmarks/results/graphs.md", help="markdown table (a .json beside it)")
    parser.add_argument("--recipes", default=str(REPO / "recipes"), help="folder holding <model>_<method>.yaml")
    parser.add_argument("--rerun", action="store_true", help="train again runs whose result.json exists")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the table from result.json files")
    parser.add_argument("--spline-kernels", choices=["pyg", "torch"], default="pyg",
                        help="SplineConv of the spline runs: PyG's compiled kernels (pyg-lib) or the plain-PyTorch "
                             "layer (no install; slower) (default: pyg)")
    parser.add_argument("--dfa-tolerance", type=float, default=2.5,
                        help="points a DFA mean may lie below the paper's DFA number (default: 2.5, the issue's)")
    parser.add_argument("--shallow-margin", type=float, default=20.0,
                        help="points the shallow mean must lie below the DFA mean to count as far below (default: 20)")
    opts = parser.parse_args(argv)
    studies.refuse_seed_override(parser, extra)
    if any(a.split("=", 1)[0] in ("--data.init_args.name", "--data.name", "--data") for a in extra):
        parser.error("the dataset after --: each run's dataset comes from --datasets, and its results are filed and "
                     "compared under that name; give the datasets with --datasets")
    if not Path(opts.recipes).is_dir():
        parser.error(f"--recipes {opts.recipes}: no such folder (it holds <model>_<method>.yaml)")
    if opts.dfa_tolerance < 0 or opts.shallow_margin < 0:
        parser.error("--dfa-tolerance and --shallow-margin are points, >= 0")
    seeds_for = {}
    for spec in opts.seeds_for:
        model, _, seeds = spec.partition("=")
        if model not in MODELS or not seeds:
            parser.error(f"--seeds-for {spec!r}: expected MODEL=S1,S2 with MODEL in {', '.join(MODELS)}")
        if model not in opts.models:  # its seeds would be ignored without a word
            parser.error(f"--seeds-for {spec!r}: {model} is not among --models ({' '.join(opts.models)})")
        try:
            seeds_for[model] = list(dict.fromkeys(studies.SEEDS["type"](s) for s in seeds.split(",")))
        except argparse.ArgumentTypeError as err:
            parser.error(f"--seeds-for {spec!r}: {err}")
    torch.set_num_threads(min(torch.get_num_threads(), 1 if torch.get_num_threads() <= 2 else 4))
    own = {"spline": ["--model.model.init_args.kernels", "torch"]} if opts.spline_kernels == "torch" else {}
    try:
        studies.check_writable(opts.out, "--out")
        if not opts.table_only:
            studies.check_writable(opts.root, "--root", folder=True)
            check_arguments([(model, method, dataset, [*own.get(model, []), *extra]) for dataset in opts.datasets
                             for model in opts.models for method in opts.methods], opts.root, opts.recipes, own)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = []
    for dataset in opts.datasets:
        for model in opts.models:
            for method in opts.methods:
                for seed in seeds_for.get(model, opts.seeds):
                    if opts.table_only:
                        results.append(cached_result(model, method, dataset, seed, opts.root,
                                                     [*own.get(model, []), *extra], opts.recipes))
                        continue
                    r = run_one(model, method, dataset, seed, opts.root, [*own.get(model, []), *extra], opts.recipes,
                                opts.rerun)
                    results.append(r)
                    what = r.get("error") or ", ".join(f"{k}={v:.4f}" for k, v in sorted(r["metrics"].items()))
                    print(f"GRAPHS {dataset} {model}_{method} seed={seed} ({r['seconds']} s): {what}", flush=True)
    text = render(collect(results), command, opts.shallow_margin, opts.dfa_tolerance)
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"results": results}, indent=2))
    print(text)
    if not any("metrics" in r for r in results):  # a table of *not measured* only is no success
        print("error: no run was measured (the reasons are listed under the tables)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    # run from the importable module, not from __main__: the CLI instantiates the GraphFinalAlignment callback from
    # "dfa_lightning.graphs_reproduce", and run_one must recognise that very class
    from dfa_lightning.graphs_reproduce import main as _main

    sys.exit(_main())
