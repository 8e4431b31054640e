"""What the study tools share (``placements``, ``failure_map``): one cached, probed training run, and the summaries.

A study trains many variants of a recipe in this process. Each run is a normal ``fit`` (then ``test`` at the recipe's
best checkpoint) with a :class:`~dfa_lightning.callbacks.FinalAlignment` appended to the callbacks, so that every DFA
run reports the alignment of its final weights, measured the same way. A run writes ``<run_dir>/result.json`` and is
not trained again while that file describes the same run (same key: recipe, overrides, extra arguments), so an
interrupted study resumes and a study with other arguments never reuses a stale result.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

from dfa_lightning.callbacks import FinalAlignment
from dfa_lightning.cli import DFALightningCLI, run

__all__ = ["QUIET", "PROBE", "reusable", "run_cached", "mean_std", "rules_of", "study_arguments", "report",
           "write_outputs", "depth_norm_cell", "add_cora_cell_arguments", "cell_table"]

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
PROBE = "dfa_lightning.callbacks.FinalAlignment"


def reusable(cached: dict, key: dict) -> bool:
    """A cached result stands for a run only if every field of the run's key is the same."""
    return all(cached.get(name) == value for name, value in key.items())


def run_cached(run_dir: str | Path, key: dict[str, Any], recipe: str, overrides: list[str],
               check: Callable[[DFALightningCLI], None] | None = None, rerun: bool = False) -> dict[str, Any]:
    """``python -m dfa_lightning fit --config <recipe> <overrides>`` with the alignment probe, logging into
    ``run_dir``, or its cached result.

    ``key`` (JSON values) identifies the run and is stored in the result; ``check(cli)`` may refuse a finished run
    (e.g. an override that did not reach the callback it meant). Returns ``{**key, "metrics": {test/...},
    "alignment": {align/...}, "order": [points in forward order], "seconds"}``.
    """
    out = Path(run_dir) / "result.json"
    if out.is_file() and not rerun:
        cached = json.loads(out.read_text())
        if reusable(cached, key):
            return cached
    args = ["fit", "--config", recipe, *QUIET, "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger.init_args.save_dir", str(run_dir), *overrides, f"--trainer.callbacks+={PROBE}"]
    start = time.perf_counter()
    cli = run(args)
    if check is not None:
        check(cli)
    final = [cb for cb in cli.trainer.callbacks if isinstance(cb, FinalAlignment)]
    result = {**key, "metrics": {k: float(v) for k, v in cli.test_results.items()},
              "alignment": final[0].alignment if final else {}, "order": final[0].points if final else [],
              "seconds": round(time.perf_counter() - start, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


def depth_norm_cell(spec: str) -> tuple[int, str]:
    """One ``depth:norm`` cell of the GCN stack (``8:none``, ``2:batch``; norm none | batch | layer), as the Cora
    studies under ``benchmarks/`` take them; a malformed one is an argparse error that names it."""
    depth, _, norm = spec.partition(":")
    if not depth.isdigit() or norm not in ("none", "batch", "layer"):
        raise argparse.ArgumentTypeError(f"{spec!r} is not depth:norm, e.g. 8:none or 2:batch")
    return int(depth), norm


def add_cora_cell_arguments(parser: argparse.ArgumentParser, cells: list[str], root: str, out: str) -> None:
    """The arguments every Cora study under ``benchmarks/`` takes: ``--cells``, ``--seeds``, ``--root``, ``--out``."""
    parser.add_argument("--cells", nargs="+", type=depth_norm_cell, default=[depth_norm_cell(c) for c in cells],
                        help="depth:norm (norm: none | batch | layer)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--root", default=root)
    parser.add_argument("--out", default=out)


def cell_table(results: list[dict], row_field: str, rows: list[str], cells: list[tuple[int, str]],
               describe: Callable[[list[dict]], str]) -> list[str]:
    """A markdown table of a Cora study: one row per value of ``row_field``, one column per ``depth:norm`` cell, each
    entry ``describe`` of that row's and cell's runs (``n/a`` where there are none)."""
    lines = [f"| {row_field} | " + " | ".join(f"depth {d}, norm {n}" for d, n in cells) + " |",
             "|---|" + "---|" * len(cells)]
    for row in rows:
        entries = []
        for depth, norm in cells:
            runs = [r for r in results if (r[row_field], r["depth"], r["norm"]) == (row, depth, norm)]
            entries.append(describe(runs) if runs else "n/a")
        lines.append(f"| `{row}` | " + " | ".join(entries) + " |")
    return lines


def mean_std(values: list[float], digits: int = 4) -> str:
    """``mean ± std`` (sample std; 0 for one value), or ``n/a``."""
    if not values:
        return "n/a"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.{digits}f} ± {std:.{digits}f}"


def rules_of(recipe: str, extra: list[str] = ()) -> list:
    """The recipe's FeedbackAlignmentStrategy entries (``class_path``/``init_args`` namespaces), parsed, not built."""
    cli = run(["--config", recipe, *extra], run=False)
    callbacks = cli.config.get("trainer", {}).get("callbacks") or []
    return [c for c in callbacks if str(getattr(c, "class_path", "")).endswith("FeedbackAlignmentStrategy")]


def study_arguments(tool: str, doc: str, argv: list[str] | None, seeds: list[int], root: str
                    ) -> tuple[argparse.ArgumentParser, str, list[str], list[str]]:
    """A study's parser with the options every study shares (``--seeds``, ``--metric``, ``--root``, ``--rerun``),
    the command line as typed (for the table), the study's own arguments and the run arguments after ``--``."""
    from dfa_lightning.cli import split_passthrough

    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join([f"python -m dfa_lightning.{tool}", *argv])
    own, extra = split_passthrough(argv)
    parser = argparse.ArgumentParser(prog=f"python -m dfa_lightning.{tool}", description=doc.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=seeds)
    parser.add_argument("--metric", default="test/acc")
    parser.add_argument("--root", default=root, help="where each run writes logs and result.json")
    parser.add_argument("--rerun", action="store_true", help="train again runs whose result.json exists")
    return parser, command, own, extra


def report(tag: str, what: str, result: dict[str, Any], metric: str) -> None:
    """One progress line per finished (or cached) run: ``TAG what seed=k (s): metric=value``."""
    print(f"{tag} {what} seed={result['seed']} ({result['seconds']} s): {metric}="
          f"{result['metrics'].get(metric, float('nan')):.4f}", flush=True)


def write_outputs(out: str | Path, text: str, payload: dict[str, Any]) -> None:
    """The markdown table at ``out``, the JSON beside it, and the table on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2))
    print(text)
