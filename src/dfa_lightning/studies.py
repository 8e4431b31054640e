"""What the study tools share (``placements``, ``failure_map``): one cached, probed training run, and the summaries.

A study trains many variants of a recipe in this process. Each run is a normal ``fit`` (then ``test`` at the recipe's
best checkpoint) with a :class:`~dfa_lightning.callbacks.FinalAlignment` appended to the callbacks, so that every DFA
run reports the alignment of its final weights, measured the same way. A run writes ``<run_dir>/result.json`` and is
not trained again while that file describes the same run (same key: recipe and the sha256 of its text, overrides,
extra arguments), so an interrupted study resumes and a study with other arguments or an edited recipe never reuses
a stale result.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from dfa_lightning import cli as _cli
from dfa_lightning.callbacks import FinalAlignment
from dfa_lightning.cli import DFALightningCLI
from dfa_lightning.errors import ConfigError, UserError

__all__ = ["QUIET", "PROBE", "recipe_digest", "reusable", "run_cached", "mean_std", "rules_of", "rules_in",
           "study_arguments", "report", "write_outputs", "depth_norm_cell", "add_cora_cell_arguments", "cell_table",
           "run", "user_errors", "require_metrics", "check_writable", "SEEDS"]

QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
PROBE = "dfa_lightning.callbacks.FinalAlignment"


@contextmanager
def user_errors(args: list[str]) -> Iterator[None]:
    """Errors of a run worded as ``python -m dfa_lightning`` words them: a :class:`UserError` (also one that
    jsonargparse wrapped while instantiating a class) or Lightning's refusal of a setting is raised as a
    :class:`UserError`, which the tools print as one ``error:`` line with exit code 2 instead of a traceback."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        cause = _cli.as_user_error(err, args)
        if cause is None:
            raise
        raise cause from None


def run(args: list[str], run: bool = True) -> DFALightningCLI:
    """:func:`dfa_lightning.cli.run` for a study, with :func:`user_errors`. The tool's own command line is hidden
    from LightningCLI meanwhile: it would warn, on every run, that ``args`` and command-line arguments were both
    given, which here is no mistake."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        with user_errors(args):
            return _cli.run(args, run=run)
    finally:
        sys.argv = saved


def require_metrics(metrics: dict[str, Any], wanted: list[str], what: str = "the first run") -> None:
    """Refuse a misspelt ``--metric`` as soon as one run has finished, naming the metrics it produced; without this
    a whole study ends as a table of n/a (or a KeyError)."""
    missing = [m for m in wanted if m not in metrics]
    if missing:
        found = ", ".join(sorted(metrics)) or "none"
        raise ConfigError(f"--metric {', '.join(missing)}: not among the test metrics of {what} ({found})")


def check_writable(path: str | Path, option: str, folder: bool = False) -> None:
    """Refuse, before any training, an ``--out`` (a file) or ``--root`` (a folder) that cannot be written: a
    folder given as ``--out``, a file given as ``--root``, or a path under a file; an ``--out`` ending in ``.json``,
    whose JSON beside it would overwrite the table. Creates nothing."""
    path = Path(path)
    if not folder and path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    if option == "--out" and path.suffix == ".json":
        raise ConfigError(f"{option} {path}: the table's JSON is written beside it as {path.stem}.json, over the "
                          "table itself; give a .md name")
    if folder and path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path}: is a file, not a folder")
    probe = path if folder else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{option} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: {probe} is not writable")


def _seed(text: str) -> int:
    """A seed as ``--seed_everything`` takes it: an integer 0..2^32-1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer seed") from None
    if not 0 <= value < 2 ** 32:
        raise argparse.ArgumentTypeError(f"seed {value} is outside 0..{2 ** 32 - 1}")
    return value


class _Unique(argparse.Action):
    """Keep each value once, in order: ``--seeds 0 0`` is one run, not a mean over two copies of it."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, list(dict.fromkeys(values)))


#: ``add_argument`` options of every tool's ``--seeds``: integers in seed range, repeats dropped.
SEEDS: dict[str, Any] = {"nargs": "+", "type": _seed, "action": _Unique}


def refuse_seed_override(parser: argparse.ArgumentParser, extra: list[str]) -> None:
    """A usage error for ``--seed_everything`` among the run arguments: the tool sets each run's seed from ``--seeds``
    before them, so the later one won and every "seed" was the same run (a table of identical values and std 0)."""
    if any(a == "--seed_everything" or a.startswith("--seed_everything=") for a in extra):
        parser.error("--seed_everything after --: every run would have that one seed; give the seeds with --seeds")


def recipe_digest(recipe: str | Path, extra: list[str] = ()) -> str:
    """sha256 of the texts a run is made of: the recipe, the YAML files it names (``../callbacks/dfa.yaml``), and
    every YAML file among ``extra`` (a ``--config`` overlay, a ``--trainer.callbacks+=`` fragment; spaced or with
    ``=``). An edited file is another run: a cache keyed on the path alone gave the old run's numbers for an edited
    recipe."""
    digest = hashlib.sha256()
    values = [part for a in extra for part in (a.split("=", 1)[1:] if a.startswith("--") else [a])]
    files = [Path(recipe)] + [Path(v) for v in values if re.search(r"\.ya?ml$", v)]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_bytes()
        digest.update(text)
        for named in re.findall(rb"[\w./-]+\.ya?ml", text):  # fragments the file includes by relative path
            fragment = path.parent / named.decode()
            if fragment.is_file():
                digest.update(fragment.read_bytes())
    return digest.hexdigest()


def read_result(path: Path) -> dict | None:
    """A run's cached ``result.json``, or None where there is none, or where it cannot be read (a sweep killed while
    writing it before writes were atomic): that run is made again, with a warning, not the whole study stopped."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        print(f"warning: {path}: unreadable ({err}); the run is made again", file=sys.stderr)
        return None
    return result if isinstance(result, dict) else None


def write_result(path: Path, result: dict) -> None:
    """``result`` as ``path``, whole or not at all (written beside it, then renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(result, indent=2))
    os.replace(partial, path)


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
    cached = None if rerun else read_result(out)
    if cached is not None and reusable(cached, key):
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
    write_result(out, result)
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
    parser.add_argument("--seeds", default=[0, 1, 2], **SEEDS)
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
    return rules_in(run(["--config", recipe, *extra], run=False).config)


def rules_in(config) -> list:
    """The FeedbackAlignmentStrategy entries of a parsed config."""
    callbacks = config.get("trainer", {}).get("callbacks") or []
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
    parser.add_argument("--seeds", default=seeds, **SEEDS)
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
