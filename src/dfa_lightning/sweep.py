"""Run recipes over several seeds and write a markdown table of mean ± std next to reference numbers.

``python -m dfa_lightning.sweep --recipes recipes/gcn_bp.yaml recipes/gcn_dfa.yaml --seeds 0 1 2 3 4
--metric test/acc --out results.md [-- extra CLI args]``; ``--metrics test/auroc test/logloss`` records several
metrics (one table each, the first is the main one). Each run is a normal ``fit`` (then test at the best
checkpoint) in this process; per-seed values and the summary go to ``--out`` (markdown) and a JSON beside it.

Each finished run leaves ``<root>/<recipe stem>/seed<k>/result.json`` (every test metric and the wall time). A later
sweep reuses it when the recipe's text (and any ``--config`` overlay's), the seed and the arguments after ``--`` are
the same (``--rerun`` trains again): an interrupted ``make reproduce-lm`` goes on where it stopped, and a misspelt
``--metric`` costs no run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dfa_lightning import studies
from dfa_lightning.cli import split_passthrough
from dfa_lightning.errors import ConfigError, UserError
from dfa_lightning.studies import run


def _args(recipe: str, seed: int, extra: list[str], root: str) -> list[str]:
    name = Path(recipe).stem
    return ["--config", recipe, "--seed_everything", str(seed),
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.default_root_dir", f"{root}/{name}/seed{seed}",
            "--trainer.logger.init_args.save_dir", f"{root}/{name}/seed{seed}", *extra]


def run_seed(recipe: str, seed: int, extra: list[str], root: str, rerun: bool = False) -> dict[str, Any]:
    """One run's ``{"recipe", "recipe_sha256", "seed", "overrides", "metrics": {test/...}, "seconds"}``, trained or
    read back from its ``result.json`` (made with the same recipe and overlay texts, seed and overrides)."""
    key = {"recipe": Path(recipe).stem, "recipe_sha256": studies.recipe_digest(recipe, extra), "seed": seed,
           "overrides": list(extra)}
    out = Path(root) / key["recipe"] / f"seed{seed}" / "result.json"
    cached = None if rerun else studies.read_result(out)
    if cached is not None and studies.reusable(cached, key):
        return {**cached, "cached": True}
    start = time.perf_counter()
    cli = run(["fit", *_args(recipe, seed, extra, root)])
    result = {**key, "metrics": {k: float(v) for k, v in cli.test_results.items()},
              "seconds": round(time.perf_counter() - start, 1)}
    studies.write_result(out, result)
    return result


def check(recipes: list[str], seeds: list[int], extra: list[str], out: str, root: str) -> None:
    """Refuse, before any training, what would stop the sweep later or merge its rows: an unwritable ``--out`` or
    ``--root``, two recipes with one name (stem: they share a row and a run folder), and a recipe or argument the
    CLI refuses (every recipe is parsed: a missing second recipe is not found after the first has trained)."""
    studies.check_writable(out, "--out")
    studies.check_writable(root, "--root", folder=True)
    stems = [Path(r).stem for r in recipes]
    if len(set(stems)) < len(stems):
        raise ConfigError(f"--recipes: recipe names must differ (they name the rows and run folders): {stems}")
    for recipe in recipes:
        run(_args(recipe, seeds[0], extra, root), run=False)


def _check_reference(parser: argparse.ArgumentParser, reference: Any, stems: list[str], metrics: list[str]) -> None:
    """``--reference`` as {stem: number} or {metric: {stem: number}}: a misspelt stem or a non-number left the paper
    column empty with no word."""
    if not isinstance(reference, dict):
        parser.error(f"--reference: expected a JSON object, got {reference!r}")
    tables = reference if any(k in metrics for k in reference) else {metrics[0]: reference}
    for metric, table in tables.items():
        if metric not in metrics or not isinstance(table, dict):
            parser.error(f"--reference: {metric!r} is neither a recipe ({', '.join(stems)}) nor a metric with a "
                         f"{{recipe: value}} object ({', '.join(metrics)})")
        for stem, value in table.items():
            if stem not in stems:
                parser.error(f"--reference: {stem!r} is not a recipe of this sweep ({', '.join(stems)})")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                parser.error(f"--reference: {stem}: expected a number, got {value!r}")


def summarize(values: list[float]) -> str:
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, extra = split_passthrough(argv)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipes", nargs="+", required=True)
    parser.add_argument("--seeds", default=[0, 1, 2, 3, 4], **studies.SEEDS)
    parser.add_argument("--metric", default="test/acc")
    parser.add_argument("--metrics", nargs="+", default=None,
                        help="several metrics, one table each (overrides --metric; the first is the main one)")
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--root", default="logs/sweeps", help="where each run writes logs, checkpoints, result.json")
    parser.add_argument("--rerun", action="store_true", help="train again runs whose result.json exists")
    parser.add_argument("--reference", type=json.loads, default={},
                        help='JSON {recipe stem: paper value} printed next to the measured mean (main metric), '
                             'or {metric: {recipe stem: paper value}}')
    opts = parser.parse_args(argv)
    studies.refuse_seed_override(parser, extra)
    metrics = opts.metrics or [opts.metric]
    _check_reference(parser, opts.reference, [Path(r).stem for r in opts.recipes], metrics)
    tables: dict[str, dict[str, dict[int, float]]] = {m: {} for m in metrics}
    wall: dict[str, dict[int, float]] = {}  # seconds per run (fit + test): what a run costs on this machine
    try:
        check(opts.recipes, opts.seeds, extra, opts.out, opts.root)
        for recipe in opts.recipes:
            stem = Path(recipe).stem
            for seed in opts.seeds:
                run_result = run_seed(recipe, seed, extra, opts.root, opts.rerun)
                results = run_result["metrics"]
                try:
                    studies.require_metrics(results, metrics, f"{stem} seed {seed}")
                except ConfigError as err:
                    raise ConfigError(f"{err}; the run is kept: with the right --metric it is read back, not "
                                      "trained again") from None
                wall.setdefault(stem, {})[seed] = run_result["seconds"]
                for metric in metrics:
                    tables[metric].setdefault(stem, {})[seed] = results[metric]
                print(f"SWEEP {stem} seed={seed}{' (cached)' if run_result.get('cached') else ''} "
                      + " ".join(f"{m}={results[m]:.4f}" for m in metrics), flush=True)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sections = []
    for metric in metrics:
        lines = [f"| recipe | {' | '.join(f'seed {s}' for s in opts.seeds)} | mean ± std | paper |",
                 f"|---|{'---|' * len(opts.seeds)}---|---|"]
        if any(key in metrics for key in opts.reference):  # {metric: {stem: value}}
            reference = opts.reference.get(metric, {})
        else:  # {stem: value}: the main metric's reference
            reference = opts.reference if metric == metrics[0] else {}
        for stem, per_seed in tables[metric].items():
            cells = " | ".join(f"{per_seed[s]:.4f}" for s in opts.seeds)
            ref = reference.get(stem, "")
            lines.append(f"| {stem} | {cells} | {summarize(list(per_seed.values()))} | {ref} |")
        sections.append(lines if len(metrics) == 1 else [f"### `{metric}`", "", *lines])
    lines = [line for i, sec in enumerate(sections) for line in ([""] if i else []) + sec]
    lines += ["", "Wall time per run (fit, then test), seconds: "
              + "; ".join(f"{stem} {', '.join(f'{t:.0f}' for t in per_seed.values())}" for stem, per_seed in wall.items())]
    heading = f"Metric: `{metrics[0]}`" if len(metrics) == 1 else f"Metrics: {', '.join(f'`{m}`' for m in metrics)}"
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{heading}. Command: `python -m dfa_lightning.sweep {' '.join(sys.argv[1:])}`\n\n"
                   + "\n".join(lines) + "\n")
    summary = {"metric": metrics[0], "results": tables[metrics[0]], "metrics": tables, "wall_s": wall,
               "extra_args": extra}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
