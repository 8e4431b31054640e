"""Where does `orthogonal` at post-LN micro's LayerNorm outputs act: on the signal below the norm, or on the norm's
own scale and shift?

``python -m benchmarks.ln_affine [--root logs/failure_map] [--seeds 0 1] --out benchmarks/results/lm_micro_ln_affine.md``

Under post-LN, micro DFA's attention and block outputs are LayerNorm outputs ``y = γ ⊙ x̂ + β``. B e reaches them and
flows locally through the norm's backward, which already centres it and removes its component along x̂, before the
sub-layer below sees it. `orthogonal` does the same to B e once more, against the centred *output* y, so it can
change that signal only as far as γ and β make y differ from x̂. What it changes fully is the gradient of γ and β
themselves, which the norm's backward does not project: their gradients are B e's own per-feature sums.

Two measurements, on the runs of ``make failure-map-lm`` (the frozen-LN recipes' command is in the README):

1. At the final weights of plain micro DFA (one training batch, its checkpoint's B): every parameter's DFA
   gradient with ``feedback_norm`` none and with `orthogonal` at the LayerNorm outputs, compared (cosine and norm
   ratio), for the norms' γ and β and for the sub-layers below them.
2. In each run's checkpoint: how far the norms' γ and β moved from 1 and 0 (root mean square over the features).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dfa_lightning.cli import run
from dfa_lightning.feedback.engine import FeedbackEngine
from dfa_lightning.feedback.points import glob_match
from dfa_lightning.studies import QUIET, write_outputs

__all__ = ["checkpoint", "affine_drift", "gradient_routes", "render", "main"]

LN_POINTS = {"blocks.*.attn_out": "orthogonal", "blocks.*.out": "orthogonal"}
#: parameter globs, in the order of the table: the norms, and what lies below each LayerNorm-output point
GROUPS = {"LayerNorm γ (ln_1, ln_2)": "blocks.*.ln_?.weight", "LayerNorm β (ln_1, ln_2)": "blocks.*.ln_?.bias",
          "attention below ln_1 (qkv, proj)": "blocks.*.attn.**", "FFN proj below ln_2": "blocks.*.ffn.proj.*",
          "FFN fc (below the FFN point)": "blocks.*.ffn.fc.*"}
RECIPES = ("lm_bp", "lm_dfa_macro", "lm_dfa_micro", "lm_dfa_micro_ffn_orthogonal", "lm_dfa_micro_residual_orthogonal",
           "lm_dfa_micro_feedback_orthogonal", "lm_dfa_micro_frozen_ln", "lm_dfa_micro_residual_orthogonal_frozen_ln",
           "lm_dfa_macro_frozen_ln", "lm_dfa_macro_feedback_orthogonal")
SAMPLE = "recipes/sample/lm_wikitext2_cpu.yaml"


def checkpoint(root: Path, recipe: str, seed: int) -> Path:
    found = sorted((root / recipe / "heads=4" / f"seed{seed}").rglob("*.ckpt"))
    if not found:
        raise FileNotFoundError(f"no checkpoint of {recipe} seed {seed} under {root} (run the failure map first)")
    return found[-1]


def affine_drift(state: dict[str, torch.Tensor]) -> dict[str, float]:
    """RMS of γ − 1 and of β over every post-LN norm's features."""
    gammas = [v - 1 for k, v in state.items() if glob_match(k, "model.blocks.*.ln_?.weight")]
    betas = [v for k, v in state.items() if glob_match(k, "model.blocks.*.ln_?.bias")]
    rms = lambda ts: float(torch.cat([t.flatten() for t in ts]).pow(2).mean().sqrt())  # noqa: E731
    return {"gamma_rms": rms(gammas), "beta_rms": rms(betas),
            "gamma_mean": float(torch.cat([t.flatten() for t in gammas]).mean()) + 1}


def gradient_routes(ckpt: Path, data_args: list[str]) -> dict[str, tuple[float, float]]:
    """Per group: (cosine, norm ratio orthogonal / none) of the DFA gradient at ``ckpt``'s weights, one batch."""
    cli = run(["--config", "recipes/lm_dfa_micro.yaml", "--config", SAMPLE, "--model.model.init_args.n_heads", "4",
               *QUIET, *data_args], run=False)
    saved = torch.load(ckpt, map_location="cpu")
    module = cli.model
    module.load_state_dict(saved["state_dict"])
    (rule,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FeedbackAlignmentStrategy"]
    cfg = rule.config
    engine = FeedbackEngine(module.model, cfg["feedback_points"], output=cfg["output"], batch_dims=cfg["batch_dims"],
                            scale=cfg["scale"], shared_slices=cfg["shared_slices"], seed=cfg["seed"] or 0)
    engine.load_feedback_state(saved["callbacks"]["FeedbackAlignmentStrategy"]["feedback"])  # the run's B
    cli.datamodule.setup("fit")
    batch = next(iter(cli.datamodule.train_dataloader()))
    module.model.train()
    grads = {}
    for mode in ("none", "orthogonal"):
        engine.point_norms = {p.name: (mode if any(glob_match(p.name, g) for g in LN_POINTS) else "none")
                              for p in engine.points}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same dropout masks in both passes
            module.model.zero_grad(set_to_none=True)
            engine.reset()
            module.task.step(module.model, batch, "train").loss.backward()
        grads[mode] = {n: p.grad.detach().clone() for n, p in module.model.named_parameters() if p.grad is not None}
    out = {}
    for label, glob in GROUPS.items():
        names = [n for n in grads["none"] if glob_match(n, glob)]
        a = torch.cat([grads["none"][n].flatten() for n in names])
        b = torch.cat([grads["orthogonal"][n].flatten() for n in names])
        out[label] = (float(torch.nn.functional.cosine_similarity(a, b, dim=0)), float(b.norm() / a.norm()))
    return out


def render(routes: dict[str, tuple[float, float]], drift: dict[tuple[str, int], dict[str, float]],
           metrics: dict[tuple[str, int], float], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             "CPU proxy of the LM failure map (`recipes/sample/lm_wikitext2_cpu.yaml`, 4 heads, 2 × 128, 1,000 "
             "steps). **Routes**: plain micro DFA's final weights (seed 0, one training batch, its own B): each "
             "parameter group's DFA gradient with `feedback_norm: none` against `orthogonal` at the LayerNorm "
             "outputs (attention and block outputs; the FFN activation stays `none`).", "",
             "| parameters | cosine | norm, orthogonal / none |", "|---|---|---|"]
    lines += [f"| {label} | {cos:.3f} | {ratio:.3f} |" for label, (cos, ratio) in routes.items()]
    lines += ["", "**Drift and perplexity**: each run's best checkpoint; γ and β of every post-LN norm, root mean "
              "square of γ − 1 and of β over the features, mean γ; test perplexity from the failure map.", "",
              "| run | seed | test ppl | RMS(γ − 1) | RMS(β) | mean γ |", "|---|---|---|---|---|---|"]
    for (recipe, seed), d in drift.items():
        ppl = metrics.get((recipe, seed))
        lines.append(f"| {recipe} | {seed} | {'' if ppl is None else f'{ppl:.1f}'} | {d['gamma_rms']:.3f} | "
                     f"{d['beta_rms']:.3f} | {d['gamma_mean']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("logs/failure_map"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--map", type=Path, default=Path("benchmarks/results/failure_map_lm_micro_ln_affine.json"),
                        help="the failure map's JSON, for the test perplexities")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lm_micro_ln_affine.md"))
    parser.add_argument("data_args", nargs="*", help="extra CLI arguments for the data (after --)")
    args = parser.parse_args(argv)
    metrics = {}
    if args.map.is_file():
        for r in json.loads(args.map.read_text())["results"]:
            metrics[(Path(r["recipe"]).stem, r["seed"])] = r["metrics"].get("test/ppl")
    drift = {}
    for recipe in RECIPES:
        for seed in args.seeds:
            try:
                state = torch.load(checkpoint(args.root, recipe, seed), map_location="cpu")["state_dict"]
            except FileNotFoundError as err:
                print(f"skipped: {err}", file=sys.stderr)
                continue
            drift[(recipe, seed)] = affine_drift(state)
    routes = gradient_routes(checkpoint(args.root, "lm_dfa_micro", args.seeds[0]), args.data_args)
    command = "python -m benchmarks.ln_affine " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"command": command, "routes": routes,
               "runs": [{"recipe": r, "seed": s, "test_ppl": metrics.get((r, s)), **d} for (r, s), d in drift.items()]}
    write_outputs(args.out, render(routes, drift, metrics, command), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
