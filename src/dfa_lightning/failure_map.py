"""Where DFA fails: BP, DFA and shallow over a grid of architecture changes, with the gap and the alignment per layer.

``python -m dfa_lightning.failure_map --recipes recipes/gcn_stack_bp.yaml recipes/gcn_stack_dfa.yaml
recipes/gcn_stack_shallow.yaml --axis depth=model.model.init_args.num_layers:2,4,8
--axis skip=model.model.init_args.residual:false,true --seeds 0 1 2 --metric test/acc
--out benchmarks/results/failure_map_cora_depth.md [-- extra CLI args for every run]``

Why: the paper's first reviewer asked which tasks DFA fails on, whether the task or the architecture decides, and
what minimal change breaks DFA where it works. This tool answers the architecture half on any recipe: each axis is a
recipe key (``LABEL=KEY:V1,V2,...``, values in YAML) and every cell of the axes' product trains every recipe over the
seeds. The recipes differ only in their learning rule (one ``bp``, one or more ``dfa``, optionally one ``shallow``:
the floor DFA must beat to have taught the layers anything), so the model code is not edited and the feedback points
(globs such as ``blocks.*``) follow the depth by themselves.

Each run is a normal ``fit`` then ``test`` at the recipe's best checkpoint, with
:class:`~dfa_lightning.callbacks.FinalAlignment` (alignment of the final weights with BP, per feedback point). A run
writes ``<root>/<recipe>/<cell>/seed<k>/result.json`` and is not trained again while it describes the same run, so a
study resumes, and two processes may share the work (split the values of one axis) before a last call writes the
table from the cache. Output: markdown (one row per cell, then each axis's marginal effect) and JSON beside it.
"""
from __future__ import annotations

import itertools
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from dfa_lightning import studies
from dfa_lightning.errors import ConfigError, UserError
from dfa_lightning.feedback.engine import METHODS
from dfa_lightning.studies import mean_std, run

__all__ = ["Axis", "parse_axis", "methods_of", "check_axes", "cells", "run_cell", "summarise", "default_mode",
           "render", "main"]



class Axis:
    """One architecture knob: a label, the recipe key it overrides and the values it takes (YAML strings)."""

    def __init__(self, label: str, key: str, values: list[str]) -> None:
        self.label, self.key, self.values = label, key, values

    def override(self, value: str) -> list[str]:
        return [f"--{self.key}", value]


def _split_values(text: str) -> list[str]:
    """``2,4,[64,64]`` -> ``["2", "4", "[64,64]"]``: commas inside brackets or braces belong to the value."""
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    return values


def parse_axis(spec: str) -> Axis:
    """``LABEL=KEY:V1,V2,...`` -> :class:`Axis`; every value must be valid YAML."""
    label, sep, rest = spec.partition("=")
    key, sep2, values_text = rest.partition(":")
    values = _split_values(values_text) if sep2 else []
    if (not sep or not sep2 or not re.fullmatch(r"[A-Za-z0-9_.\-]+", label.strip() or "?")
            or not re.fullmatch(r"[A-Za-z0-9_.\-]+", key.strip() or "?") or not values or "" in values):
        raise ConfigError(f"--axis {spec!r}: expected LABEL=KEY:V1,V2,... (e.g. depth=model.model.init_args."
                          "num_layers:2,4,8), a label and a dotted recipe key of letters, digits, '_', '.', '-'")
    for value in values:
        try:
            yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ConfigError(f"--axis {label}: value {value!r} is not valid YAML ({err})") from None
    if len(set(values)) < len(values):
        raise ConfigError(f"--axis {label}: repeated values {values}")
    return Axis(label.strip(), key.strip(), values)


def methods_of(recipes: list[str], extra: list[str] = ()) -> dict[str, str]:
    """``{recipe: method}``; refuses, before any training, recipes without exactly one learning rule, a set without
    exactly one ``bp`` recipe or with more than one ``shallow``, recipes whose names (stems) collide, and recipes of
    another model, task or data than the bp one."""
    methods, setups = {}, {}
    for recipe in recipes:
        config = run(["--config", recipe, *extra], run=False).config
        rules = studies.rules_in(config)
        setups[recipe] = _setup_of(config)
        if len(rules) != 1:
            raise ConfigError(f"{recipe}: expected one FeedbackAlignmentStrategy in trainer.callbacks (BP, DFA and "
                              f"shallow recipes differ only by it), found {len(rules)}")
        methods[recipe] = getattr(rules[0].init_args, "method", "dfa")
    count = {m: sum(1 for v in methods.values() if v == m) for m in METHODS}
    if count["bp"] != 1 or count["shallow"] > 1 or count["dfa"] < 1:
        raise ConfigError(f"--recipes: need one bp recipe (the baseline), at least one dfa and at most one shallow; "
                          f"got {methods}")
    stems = [Path(r).stem for r in recipes]
    if len(set(stems)) < len(stems):
        raise ConfigError(f"--recipes: recipe names must differ (they name the run folders): {stems}")
    baseline = next(r for r, m in methods.items() if m == "bp")
    for recipe, setup in setups.items():  # the gap to BP means something only on the same model, task and data
        differs = [part for part, value in setup.items() if value != setups[baseline][part]]
        if differs:
            part = differs[0]
            raise ConfigError(f"--recipes: {recipe} has another {part} than the bp recipe {baseline} "
                              f"({setup[part]} against {setups[baseline][part]}); a failure map compares learning "
                              "rules on the same model and data")
    return methods


def _setup_of(config) -> dict[str, str]:
    """What the recipes of one map must share: the model's, task's and data module's classes and the data's
    arguments (the learning rule, the optimizer and the model's sizes may differ)."""
    model, data = config.get("model"), config.get("data")
    init = getattr(data, "init_args", None)
    return {"model": str(getattr(getattr(model, "model", None), "class_path", None)),
            "task": str(getattr(getattr(model, "task", None), "class_path", None)),
            "data": f"{getattr(data, 'class_path', None)} {sorted(vars(init).items()) if init is not None else ''}"}


def check_axes(recipes: list[str], axes: list[Axis], extra: list[str] = ()) -> None:
    """Parse every recipe with every value of every axis (the others at their first value), before any training: a
    key no recipe has (a typo) or a value the model refuses (``abc``, a depth of 0) stops the study here, naming the
    recipe and the key, instead of after the cells before it have trained (hours, on the LM map)."""
    first = {axis.label: axis.values[0] for axis in axes}
    variants = [{**first, axis.label: value} for axis in axes for value in axis.values]
    variants = [v for i, v in enumerate(variants) if v not in variants[:i]]
    for recipe in recipes:
        for cell in variants:
            overrides = [arg for axis in axes for arg in axis.override(cell[axis.label])]
            run(["--config", recipe, *extra, *overrides], run=False)


def cells(axes: list[Axis]) -> list[dict[str, str]]:
    """Every combination of the axes' values, the first axis varying slowest: ``[{label: value}, ...]``."""
    return [dict(zip([a.label for a in axes], combo)) for combo in itertools.product(*[a.values for a in axes])]


def _cell_dir(cell: dict[str, str]) -> str:
    name = ",".join(f"{k}={v}" for k, v in cell.items()) or "base"
    return re.sub(r"[^A-Za-z0-9_.,=\-]", "_", name)


def run_cell(recipe: str, axes: list[Axis], cell: dict[str, str], seed: int, root: str | Path,
             extra: list[str] = (), rerun: bool = False) -> dict[str, Any]:
    """Train ``recipe`` at one cell and seed (or reuse its result): ``{recipe, cell, seed, extra, metrics,
    alignment, order, seconds}``. Refuses a run whose parsed config lacks a cell's value (an override that missed)."""
    overrides = [arg for axis in axes for arg in axis.override(cell[axis.label])]

    def check(cli) -> None:
        config = cli.config[cli.subcommand] if cli.subcommand else cli.config
        for axis in axes:
            got, want = config.get(axis.key), yaml.safe_load(cell[axis.label])
            if isinstance(want, dict):  # a class_path/init_args value is parsed into a namespace: not comparable
                continue
            if got != want and not _same_number(got, want):
                raise ConfigError(f"{recipe}: --{axis.key} {cell[axis.label]} did not reach the run's config "
                                  f"(it has {got!r})")

    key = {"recipe": os.path.normpath(recipe), "recipe_sha256": studies.recipe_digest(recipe, list(extra)),
           "cell": cell, "seed": seed, "extra": list(extra), "overrides": overrides}  # ./r.yaml is r.yaml
    run_dir = Path(root) / Path(recipe).stem / _cell_dir(cell) / f"seed{seed}"
    # extra arguments first (a second --config among them must not undo the cell's values), the cell last
    return studies.run_cached(run_dir, key, recipe, ["--seed_everything", str(seed), *extra, *overrides], check,
                              rerun)


def _metric(runs: list[dict], metric: str) -> list[float]:
    return [r["metrics"][metric] for r in runs if metric in r["metrics"]]


def _update_cos(runs: list[dict]) -> list[tuple[str, float]]:
    """Each point's update cosine (DFA vs BP update of its segment), averaged over the runs, in forward order."""
    order = runs[0]["order"] if runs else []
    out = []
    for point in order:
        values = [r["alignment"][f"align/update_cos/{point}"] for r in runs
                  if f"align/update_cos/{point}" in r["alignment"]]
        if values:
            out.append((point, statistics.fmean(values)))
    return out


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def summarise(results: list[dict], methods: dict[str, str], axes: list[Axis], metric: str) -> list[dict]:
    """One row per (cell, DFA recipe): means and stds of BP, DFA and shallow, the gaps, the alignment per point."""
    bp = next(r for r, m in methods.items() if m == "bp")
    shallow = next((r for r, m in methods.items() if m == "shallow"), None)
    rows = []
    for cell in cells(axes):
        at = {recipe: [r for r in results if r["recipe"] == recipe and r["cell"] == cell] for recipe in methods}
        for dfa in (r for r, m in methods.items() if m == "dfa"):
            b, d = _metric(at[bp], metric), _metric(at[dfa], metric)
            s = _metric(at[shallow], metric) if shallow else []
            cos = _update_cos(at[dfa])
            rows.append({"cell": cell, "dfa_recipe": Path(dfa).stem, "bp": b, "dfa": d, "shallow": s,
                         "gap_to_bp": _mean(d) - _mean(b), "above_shallow": _mean(d) - _mean(s) if s else None,
                         "update_cos": cos, "update_cos_mean": _mean([c for _, c in cos]) if cos else None,
                         "update_cos_min": min((c for _, c in cos), default=None)})
    return rows


def _same_number(got: Any, want: Any) -> bool:
    """``1e-2`` reaches the config as 0.01 but reads back from YAML 1.1 as the string '1e-2' (no dot)."""
    if isinstance(got, bool) or not isinstance(got, (int, float)) or not isinstance(want, str):
        return False
    try:
        return float(want) == got
    except ValueError:
        return False


def default_mode(metric: str) -> str:
    """``min`` for losses and perplexities, ``max`` for everything else (accuracy, AUC, PSNR)."""
    lower = ("loss", "logloss", "ppl", "perplexity", "bpc", "mse")
    return "min" if metric.rsplit("/", 1)[-1] in lower else "max"


def render(rows: list[dict], axes: list[Axis], metric: str, command: str, seconds: float,
           mode: str = "max") -> str:
    """Markdown: the grid (one row per cell and DFA recipe), then each axis's values averaged over the others.
    ``mode``: whether a higher (``max``) or lower (``min``) metric is better, for the ✗ marks."""
    better = 1.0 if mode == "max" else -1.0
    values = [abs(v) for r in rows for v in (*r["bp"], *r["dfa"], *r["shallow"])]
    digits = 4 if not values or max(values) < 10 else 1  # accuracies and AUCs to 4 places, perplexities to 1
    several = len({r["dfa_recipe"] for r in rows}) > 1
    head = [a.label for a in axes] + (["DFA recipe"] if several else [])
    lines = [f"Command: `{command}`", "",
             f"`{metric}` at each recipe's best checkpoint, mean ± std over the seeds. `DFA − BP` is the gap of the "
             "means; `DFA − shallow` what DFA's feedback taught the layers beyond training the head alone (no better "
             f"than shallow, i.e. {'≤' if mode == 'max' else '≥'} 0: DFA failed, marked ✗). `update cos`: cosine "
             "between the DFA and the BP update of each feedback point's "
             "segment for the final weights (one training batch; graphs: every node), averaged over the seeds, "
             "listed from the first point to the last.", "",
             "| " + " | ".join(head + ["BP", "DFA", "shallow", "DFA − BP", "DFA − shallow", "update cos per point"])
             + " |", "|" + "---|" * (len(head) + 6)]
    for r in rows:
        values = [r["cell"][a.label] for a in axes] + ([r["dfa_recipe"]] if several else [])
        above = r["above_shallow"]
        above_text = "n/a" if above is None else f"{above:+.{digits}f}{' ✗' if better * above <= 0 else ''}"
        cos = " ".join(f"{c:.2f}" for _, c in r["update_cos"]) or "n/a"
        lines.append("| " + " | ".join(values + [mean_std(r["bp"], digits), mean_std(r["dfa"], digits),
                                               mean_std(r["shallow"], digits), f"{r['gap_to_bp']:+.{digits}f}",
                                               above_text, cos]) + " |")
    if len(axes) > 1:
        lines += ["", "Each axis's values, averaged over the other axes' cells (means of the cell means):", "",
                  "| axis | value | BP | DFA | DFA − BP | mean update cos |", "|---|---|---|---|---|---|"]
        for axis in axes:
            for value in axis.values:
                sel = [r for r in rows if r["cell"][axis.label] == value]
                cos = [r["update_cos_mean"] for r in sel if r["update_cos_mean"] is not None]
                lines.append(f"| {axis.label} | {value} | {_mean([_mean(r['bp']) for r in sel]):.{digits}f} | "
                             f"{_mean([_mean(r['dfa']) for r in sel]):.{digits}f} | "
                             f"{_mean([r['gap_to_bp'] for r in sel]):+.{digits}f} | "
                             f"{(f'{_mean(cos):.2f}' if cos else 'n/a')} |")
    lines += ["", "Axes: " + "; ".join(f"`{a.label}` = `--{a.key}`" for a in axes) + ".",
              f"Wall time of the runs (fit + test): {seconds:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser, command, argv, extra = studies.study_arguments("failure_map", __doc__, argv, [0, 1, 2],
                                                           "logs/failure_map")
    parser.add_argument("--recipes", nargs="+", required=True,
                        help="one bp recipe, one or more dfa recipes, at most one shallow (same model and data)")
    parser.add_argument("--axis", action="append", required=True, metavar="LABEL=KEY:V1,V2",
                        help="an architecture knob: a recipe key and its values (repeat for a grid)")
    parser.add_argument("--mode", choices=["max", "min"], help="is a higher or a lower metric better "
                        "(default: min for */loss and */ppl, else max)")
    parser.add_argument("--out", help="markdown table (a .json beside it); without it, runs only (to share work)")
    opts = parser.parse_args(argv)
    studies.refuse_seed_override(parser, extra)
    try:
        if opts.out:
            studies.check_writable(opts.out, "--out")
        studies.check_writable(opts.root, "--root", folder=True)
        axes = [parse_axis(spec) for spec in opts.axis]
        labels = [a.label for a in axes]
        if len(set(labels)) < len(labels):
            raise ConfigError(f"--axis: labels must differ (got {labels})")
        methods = methods_of(opts.recipes, extra)
        check_axes(opts.recipes, axes, extra)
        results = []
        for cell in cells(axes):
            for recipe in opts.recipes:
                for seed in opts.seeds:
                    results.append(run_cell(recipe, axes, cell, seed, opts.root, extra, opts.rerun))
                    studies.require_metrics(results[-1]["metrics"], [opts.metric], f"{Path(recipe).stem} at "
                                            f"{_cell_dir(cell)} seed {seed} (kept in its result.json)")
                    studies.report("CELL", f"{_cell_dir(cell)} {Path(recipe).stem}", results[-1], opts.metric)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if opts.out:
        rows = summarise(results, methods, axes, opts.metric)
        text = render(rows, axes, opts.metric, command, sum(r["seconds"] for r in results),
                      opts.mode or default_mode(opts.metric))
        studies.write_outputs(opts.out, text, {"command": command, "methods": methods, "rows": rows,
                                               "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
