"""Does the bias before a BatchNorm walk under DFA in the CTR models too, as it does on Cora?

``python -m benchmarks.ctr_bias_walk [--models deepfm] [--rules bp dfa] [--seeds 0 1 2]
[--path <criteo sample>] --out benchmarks/results/ctr_bias_walk.md``

On Cora with 542 labels, Adam walks the conv's bias just before BatchNorm (a parameter the loss cannot see) by about
0.2 of the pre-norm standard deviation per step under DFA, and BatchNorm's running means cannot follow
(``benchmarks/labelled_nodes.py``). The CTR models' MLP blocks are ``Linear → BatchNorm1d`` with a bias too. This
trains each model's BP and DFA recipe on the 10k-row Criteo sample (``recipes/sample/criteo_10k.yaml``) with
:class:`~benchmarks.labelled_nodes.PreNormDrift` attached and reports, over the last 50 steps, how far the pre-norm
batch mean and the bias move per step (in batch standard deviations), the spread itself, and the bias's gradient.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks.labelled_nodes import PreNormDrift
from dfa_lightning.cli import run
from dfa_lightning.errors import UserError
from dfa_lightning.studies import QUIET, check_writable, mean_std, write_outputs

__all__ = ["measure", "render", "main"]

FIELDS = ("late_mean_step_sd", "late_bias_step_sd", "late_sd", "early_bias_grad", "late_bias_grad")


def measure(model: str, rule: str, seed: int, path: str, root: Path) -> dict:
    """One run of ``recipes/<model>_<rule>.yaml`` on the sample with the drift probe: its summary and step count."""
    run_dir = root / f"{model}_{rule}_s{seed}"
    cli = run(["--config", f"recipes/{model}_{rule}.yaml", "--config", "recipes/sample/criteo_10k.yaml", *QUIET,
               "--seed_everything", str(seed), "--data.init_args.path", path,
               "--data.init_args.cache_dir", str(root / "cache"), "--trainer.default_root_dir", str(run_dir),
               "--trainer.logger.init_args.save_dir", str(run_dir)], run=False)
    drift = PreNormDrift(window=50)
    cli.trainer.callbacks.append(drift)
    cli.trainer.fit(cli.model, cli.datamodule)
    return {"model": model, "rule": rule, "seed": seed, "norms": len(drift.handles),
            "steps": len(drift.steps) // max(1, len(drift.handles)), **drift.summary()}


def render(runs: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "10k-row Criteo sample (`recipes/sample/criteo_10k.yaml`: batch 256, 8 epochs, Adam 1e-3), "
             "`PreNormDrift` on every BatchNorm of the MLP, over the last 50 steps, mean ± std over the seeds: how far "
             "the pre-norm batch mean moves per step and how far the Linear's bias just before the norm moves, in "
             "batch standard deviations; the pre-norm standard deviation; the bias's mean |gradient| over the first "
             "and the last 50 steps (the loss cannot see that bias: BatchNorm cancels it).", "",
             "| model | rule | steps | mean step (sd) | bias step (sd) | pre-norm sd | bias grad, early / late |",
             "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["rule"]), []).append(r)
    for (model, rule), rs in groups.items():
        def col(field: str, digits: int) -> str:
            return mean_std([r[field] for r in rs], digits=digits)
        grads = (f"{statistics.fmean(r['early_bias_grad'] for r in rs):.1e} / "
                 f"{statistics.fmean(r['late_bias_grad'] for r in rs):.1e}")
        lines.append(f"| {model} | {rule} | {rs[0]['steps']} | {col('late_mean_step_sd', 4)} | "
                     f"{col('late_bias_step_sd', 5)} | {col('late_sd', 3)} | {grads} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ctr_bias_walk", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["deepfm"])
    parser.add_argument("--rules", nargs="+", default=["bp", "dfa"], choices=["bp", "dfa"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--path", default=str(Path(os.environ.get("DFA_DATA_DIR", ".")) / "criteo" / "train_10k.txt"))
    parser.add_argument("--out", default="benchmarks/results/ctr_bias_walk.md")
    args = parser.parse_args(argv)
    missing = [f"recipes/{m}_{r}.yaml" for m in args.models for r in args.rules
               if not Path(f"recipes/{m}_{r}.yaml").is_file()]
    if missing:  # before any run (it was a traceback after the first model's runs)
        parser.error(f"--models: no recipe {', '.join(missing)} (from {Path.cwd()})")
    try:
        check_writable(args.out, "--out")
    except UserError as err:
        parser.error(str(err))
    with tempfile.TemporaryDirectory(prefix="ctr_bias_walk_") as tmp:
        runs = [measure(m, r, s, args.path, Path(tmp)) for m in args.models for r in args.rules for s in args.seeds]
    command = " ".join(["python -m benchmarks.ctr_bias_walk", *argv])
    write_outputs(args.out, render(runs, command), {"command": command, "runs": runs})
    return 0


if __name__ == "__main__":
    sys.exit(main())
