"""Where weight transport still happens, recipe by recipe: a table and a diagram of each model, from one real step.

``python -m dfa_lightning.transport_map --recipes recipes/gcn_bp.yaml recipes/gcn_dfa.yaml recipes/gcn_shallow.yaml
--out benchmarks/results/weight_transport_graphs.md [-- extra CLI args for every recipe]``

Why: the paper's reviewer 3 asked to "say clearly wherever weight transport still happens under DFA (e.g. inside
attention)" and for simple diagrams of each architecture. Both are measured here rather than drawn: each recipe runs
one training step (its own data, model and rule) with a :class:`~dfa_lightning.callbacks.WeightTransportAudit`,
which records which modules' weight transposes carried error in that step's backward, and which parameters each
feedback point's ``B_i e`` trained. The output lists, per recipe, how many weight-matrix parameters were transported
(BP: all but the first layer's), then a diagram of each model: every module with parameters, the feedback points
between them, what trains it, and whether its ``W^T`` was used.
"""
from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from dfa_lightning import studies
from dfa_lightning.callbacks import WeightTransportAudit
from dfa_lightning.cli import split_passthrough
from dfa_lightning.errors import UserError
from dfa_lightning.studies import run

__all__ = ["audit", "pattern", "diagram", "render", "main"]

AUDIT = "dfa_lightning.callbacks.WeightTransportAudit"


def audit(recipe: str, extra: list[str] = ()) -> dict[str, Any]:
    """One training step of ``recipe`` with the audit: its :meth:`~WeightTransportAudit.as_dict`.

    No validation, logger or checkpoint: the recipe's ``EarlyStopping`` and ``ModelCheckpoint`` are dropped, since
    one step has no validation metric for them to read."""
    with tempfile.TemporaryDirectory() as root:
        args = ["--config", recipe, *studies.QUIET, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
                "--trainer.num_sanity_val_steps", "0", "--trainer.logger", "false",
                "--trainer.default_root_dir", root, *extra, f"--trainer.callbacks+={AUDIT}"]
        cli = run(args, run=False)
        trainer = cli.trainer
        trainer.callbacks = [cb for cb in trainer.callbacks if not isinstance(cb, (EarlyStopping, ModelCheckpoint))]
        with studies.user_errors(args):  # as `fit` would: the CLI's checks first, then Lightning's refusals
            cli.before_fit()
            trainer.fit(cli.model, datamodule=cli.datamodule)
    found = [cb for cb in trainer.callbacks if isinstance(cb, WeightTransportAudit)]
    if not found or not found[0].modules:
        raise UserError(f"{recipe}: the weight-transport audit saw no training step (does the recipe train?)")
    return {"recipe": recipe, "model": type(cli.model.model).__name__, **found[0].as_dict()}


def pattern(name: str) -> tuple[str, str]:
    """``blocks.3.attn.qkv`` -> (``blocks.*.attn.qkv``, ``3``): the first numeric component (the repeated block's
    index) folds, so repeated layers share one row; deeper indices (``mlp.*.0``, ``mlp.*.1``) stay apart."""
    match = re.search(r"(?:^|\.)(\d+)(?=\.|$)", name)
    if match is None:
        return name, ""
    start, stop = match.span(1)
    return name[:start] + "*" + name[stop:], match.group(1)


def _ranges(indices: list[str]) -> str:
    """``["0", "1", "2", "5"]`` -> ``0-2, 5``."""
    if not indices or any(not i.isdigit() for i in indices):
        return ", ".join(indices)
    nums, out = sorted(int(i) for i in indices), []
    start = prev = nums[0]
    for n in nums[1:] + [None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(out)


def _trained_by(module: dict[str, Any], rules: list[str]) -> str:
    segment, trained = module["segment"], module["trained"]
    if segment == "__output__":
        return "backprop from the output (no point on its path)" if trained else "no gradient"
    if segment is not None:
        return f"B e at {pattern(segment)[0]}" if trained else "frozen (shallow: no feedback)"
    if not trained:
        return "no gradient"
    return "backprop" if not rules or set(rules) == {"bp"} else "backprop from the loss (after the rule's output)"


def _transport(module: dict[str, Any]) -> str:
    if not module["transported"]:
        return "—"
    used = (["Wᵀ"] if module["matrix_params"] else []) + (["γ"] if module["elementwise_params"] else [])
    return ", ".join(used) or "—"


def diagram(result: dict[str, Any]) -> list[str]:
    """The model as rows of repeated-layer patterns (module, type, parameters per instance, instances, transport,
    what trains it), in forward-registration order; each feedback point after the last row its feedback trains."""
    points = {name: width for name, width in result["points"]}
    point_rows: dict[str, list[str]] = {}
    for name in points:
        point_rows.setdefault(pattern(name)[0], []).append(name)
    groups: dict[tuple, dict[str, Any]] = {}
    first_of_pattern: dict[str, int] = {}
    for i, m in enumerate(result["modules"]):
        pat, idx = pattern(m["name"])
        first_of_pattern.setdefault(pat, i)
        size = m["matrix_params"] + m["elementwise_params"] + m["other_params"]
        key = (pat, m["type"], size, _transport(m), _trained_by(m, result["rules"]))
        groups.setdefault(key, {"indices": [], "first": i})["indices"].append(idx)
    order = sorted(groups, key=lambda k: (first_of_pattern[k[0]], groups[k]["first"]))
    last_row_of = {ppat: max((n for n, k in enumerate(order) if k[4] == f"B e at {ppat}"), default=None)
                   for ppat in point_rows}
    lines = ["| module | type | params each | instances | Wᵀ used in backward | trained by |", "|---|---|---|---|---|---|"]

    def point_line(ppat: str, note: str) -> str:
        names = point_rows[ppat]
        widths = sorted({points[n] for n in names}, key=lambda w: (w is None, w or 0))
        return (f"| ◆ `{ppat}` | feedback point | width {', '.join(str(w) for w in widths)} | "
                f"{_ranges([pattern(n)[1] for n in names]) or '1'} | | {note} |")

    for n, key in enumerate(order):
        pat, kind, size, transport, trained = key
        lines.append(f"| `{pat or '<model>'}` | {kind} | {size:,} | {_ranges(groups[key]['indices']) or '1'} | "
                     f"{transport} | {trained} |")
        lines += [point_line(p, "receives B_i e; nothing from above crosses it")
                  for p, last in last_row_of.items() if last == n]
    lines += [point_line(p, "trains nothing (no feedback, or no parameters below it)")
              for p, last in last_row_of.items() if last is None]
    return lines


def render(results: list[dict[str, Any]], command: str) -> str:
    lines = [
        f"Command: `{command}`", "",
        "One training step of each recipe (its data, model and rule) with `WeightTransportAudit`: a module's weights "
        "count as transported when that step's backward computed the gradient with respect to the module's input "
        "(for a linear map, convolution or attention projection: the product with Wᵀ). Matrix parameters: those "
        "with two or more dimensions (biases and norm scales excluded; norm scales used are counted apart, γ).", "",
        "| recipe | model | rule | matrix params | Wᵀ used in backward | trained | modules with Wᵀ used | "
        "elementwise γ used |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        t = r["totals"]
        share = t["transported_matrix_params"] / max(t["matrix_params"], 1)
        trained = t["trained_matrix_params"] / max(t["matrix_params"], 1)
        lines.append(f"| {Path(r['recipe']).stem} | {r['model']} | {'+'.join(r['rules']) or 'bp'} | "
                     f"{t['matrix_params']:,} | {t['transported_matrix_params']:,} ({100 * share:.1f}%) | "
                     f"{100 * trained:.0f}% | {t['transported_modules']} of {t['modules_with_matrices']} | "
                     f"{t['transported_elementwise_params']:,} |")
    for r in results:
        lines += ["", f"### {Path(r['recipe']).stem} ({'+'.join(r['rules']) or 'bp'})", "", *diagram(r)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python -m dfa_lightning.transport_map", *argv])
    own, extra = split_passthrough(argv)
    parser = argparse.ArgumentParser(prog="python -m dfa_lightning.transport_map", description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", required=True, help="recipes to audit (one step each)")
    parser.add_argument("--out", required=True, help="markdown file (a .json beside it)")
    opts = parser.parse_args(own)
    try:
        studies.check_writable(opts.out, "--out")
        results = [audit(recipe, extra) for recipe in opts.recipes]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    studies.write_outputs(opts.out, render(results, command), {"command": command, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
