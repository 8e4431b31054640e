"""One DFA recipe, several feedback placements: what moving the points does to the test metric and to alignment.

``python -m dfa_lightning.placements --recipe recipes/gcn_dfa.yaml --placements paper=hidden after_relu=hidden.0
before_relu=conv1 --seeds 0 1 2 3 4 --metric test/acc --out benchmarks/results/placements_cora_gcn.md
[-- extra CLI args for every run]``

Why: the paper's reviewers asked whether DFA needs the activation derivative f' at the points (R4: with ReLU it is a
0/1 gate, "perhaps the reason the method works at all") and where local backprop still happens (R3). Both are
questions of placement, and placement is configuration: a point after the activation sends ``B_i e`` through
``f'(a_i)`` (and through dropout's mask when the block ends with dropout) on its way to the weights; a point before
the activation sends ``B_i e`` to the pre-activation itself, with no f'. The model is not edited: each placement
overrides ``feedback_points`` of the recipe's FeedbackAlignmentStrategy (the last entry of ``trainer.callbacks``).

Each run is a normal ``fit`` (then test at the recipe's best checkpoint) in this process, with a
:class:`~dfa_lightning.callbacks.FinalAlignment` that measures, when ``fit`` ends, the cosine between ``B_i e`` and
the true gradient at every point and between the DFA and BP updates of every point's segment (graphs: over all
nodes, as the paper's ``alignment.py``). A run writes ``<root>/<label>/seed<k>/result.json`` and is not trained again
while that file exists (``--rerun`` forces it), so an interrupted study resumes. The table (``--out``, a JSON
beside it) gives, per placement, the metric's mean ± std over seeds and each point's alignment averaged over seeds.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

from dfa_lightning import studies
from dfa_lightning.callbacks import FeedbackAlignmentStrategy
from dfa_lightning.errors import ConfigError, UserError
from dfa_lightning.feedback.points import resolve_points
from dfa_lightning.studies import mean_std, run

__all__ = ["parse_placement", "check_recipe", "run_one", "render", "main"]


def parse_placement(spec: str) -> tuple[str, list[str]]:
    """``label=pattern[,pattern...]`` (or just the patterns, which then name it) -> (label, patterns)."""
    label, sep, patterns = spec.partition("=")
    if not sep:
        label, patterns = spec, spec
    points = [p.strip() for p in patterns.split(",") if p.strip()]
    if not label.strip() or not points or "/" in label:
        raise ConfigError(f"--placements {spec!r}: expected LABEL=PATTERN[,PATTERN...] (globs on named_modules() or "
                          "module types), with a label free of '/'")
    return label.strip(), points


def check_recipe(recipe: str, extra: list[str] = (), placements: list[tuple[str, list[str]]] = ()) -> None:
    """Refuse, before any training, a recipe whose last callback is not one DFA FeedbackAlignmentStrategy (the
    placement override ``--trainer.callbacks.feedback_points`` goes to the last callback), and a placement whose
    points the recipe's model does not have (found now, not after the placements before it have trained)."""
    cli = run(["--config", recipe, *extra], run=False)
    callbacks = cli.config.get("trainer", {}).get("callbacks") or []
    last = callbacks[-1] if callbacks else None
    rules = [c for c in callbacks if str(getattr(c, "class_path", "")).endswith("FeedbackAlignmentStrategy")]
    if last is None or not str(getattr(last, "class_path", "")).endswith("FeedbackAlignmentStrategy") or len(rules) != 1:
        raise ConfigError(f"{recipe}: trainer.callbacks must end with the recipe's one FeedbackAlignmentStrategy "
                          f"(found {len(rules)}, last {getattr(last, 'class_path', None)}): the placements replace "
                          "its feedback_points")
    method = getattr(last.init_args, "method", "dfa")
    if method != "dfa":
        raise ConfigError(f"{recipe}: its FeedbackAlignmentStrategy has method {method!r}; placements compare DFA "
                          "feedback points (use a *_dfa recipe)")
    for label, points in placements:
        try:
            resolve_points(cli.model.model, points)
        except ConfigError as err:
            raise ConfigError(f"--placements {label}: {err}") from None


def run_one(recipe: str, label: str, points: list[str], seed: int, root: str | Path, extra: list[str] = (),
            rerun: bool = False) -> dict[str, Any]:
    """Train ``recipe`` with ``points`` as its feedback points and ``seed``; returns (and caches) the result:
    ``{"label", "points", "seed", "metrics": {test/...}, "alignment": {align/...}, "order": [points], "seconds"}``."""

    def check(cli) -> None:  # the override must have reached the rule
        rules = [cb for cb in cli.trainer.callbacks if isinstance(cb, FeedbackAlignmentStrategy)]
        if len(rules) != 1 or rules[0].config["feedback_points"] != points:
            raise ConfigError(f"{recipe}: the run did not use the feedback points {points} (the rule has "
                              f"{[r.config['feedback_points'] for r in rules]})")

    key = {"recipe": os.path.normpath(recipe), "recipe_sha256": studies.recipe_digest(recipe, list(extra)),
           "label": label, "points": list(points), "seed": seed, "extra": list(extra)}  # ./r.yaml is r.yaml
    overrides = ["--seed_everything", str(seed), *extra, "--trainer.callbacks.feedback_points", json.dumps(points)]
    return studies.run_cached(Path(root) / label / f"seed{seed}", key, recipe, overrides, check, rerun)


def _per_point(results: list[dict], kind: str) -> str:
    """``point value`` for every point of the placement (forward order), averaged over the seeds' runs."""
    order = results[0]["order"] if results else []
    cells = []
    for point in order:
        values = [r["alignment"][f"align/{kind}/{point}"] for r in results if f"align/{kind}/{point}" in r["alignment"]]
        if values:
            cells.append(f"{point} {statistics.fmean(values):.2f}")
    return ", ".join(cells) or "n/a"


def render(results: list[dict], metric: str, command: str) -> str:
    """Markdown: one row per placement (in the order given), the metric over seeds and the alignment per point."""
    by_label: dict[str, list[dict]] = {}
    for r in results:
        by_label.setdefault(r["label"], []).append(r)
    lines = [f"Command: `{command}`", "",
             f"`{metric}` at the recipe's best checkpoint, mean ± std over the seeds (n). Alignment of the final "
             "weights at the end of fit (one training batch; graphs: every node), averaged over the seeds: `signal` "
             "is the cosine between B_i e and the true gradient at the point (per sample, then averaged), `update` "
             "the cosine between the DFA and the BP update of the parameters the point trains (its segment).", "",
             f"| placement | feedback points | {metric} | n | update cosine per point | signal cosine per point |",
             "|---|---|---|---|---|---|"]
    for label, runs in by_label.items():
        values = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
        lines.append(f"| {label} | {', '.join(f'`{p}`' for p in runs[0]['points'])} | {mean_std(values)} | "
                     f"{len(values)} | {_per_point(runs, 'update_cos')} | {_per_point(runs, 'signal_cos')} |")
    seconds = sum(r["seconds"] for r in results)
    lines += ["", f"Wall time of the runs (fit + test): {seconds:.0f} s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser, command, argv, extra = studies.study_arguments("placements", __doc__, argv, [0, 1, 2, 3, 4],
                                                           "logs/placements")
    parser.add_argument("--recipe", required=True, help="a DFA recipe (its last callback is the rule)")
    parser.add_argument("--placements", nargs="+", required=True, metavar="LABEL=PATTERN[,PATTERN]",
                        help="feedback points per placement, e.g. paper=hidden before_relu=conv1")
    parser.add_argument("--out", required=True, help="markdown table (a .json beside it)")
    opts = parser.parse_args(argv)
    studies.refuse_seed_override(parser, extra)
    if any(a.split("=", 1)[0].endswith("feedback_points") for a in extra):  # each placement sets them: it won
        parser.error("feedback_points after --: each placement sets the run's feedback points (give them with "
                     "--placements)")
    try:
        placements = [parse_placement(p) for p in opts.placements]
        labels = [label for label, _ in placements]
        if len(set(labels)) < len(labels):
            raise ConfigError(f"--placements: labels must differ (got {labels})")
        studies.check_writable(opts.out, "--out")
        studies.check_writable(opts.root, "--root", folder=True)
        check_recipe(opts.recipe, extra, placements)
        results = []
        root = Path(opts.root) / Path(opts.recipe).stem
        for label, points in placements:
            for seed in opts.seeds:
                results.append(run_one(opts.recipe, label, points, seed, root, extra, opts.rerun))
                studies.require_metrics(results[-1]["metrics"], [opts.metric], f"placement {label} seed {seed} "
                                        "(kept in its result.json)")
                studies.report("PLACEMENT", label, results[-1], opts.metric)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    studies.write_outputs(opts.out, render(results, opts.metric, command), {"command": command, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
