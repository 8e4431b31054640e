"""The scale (RMS) of every feedback point's output, for trained checkpoints of one recipe family: does DFA let a
point's activations run away where BP keeps them bounded?

``python -m benchmarks.point_scale --configs recipes/lm_dfa_macro.yaml recipes/sample/lm_wikitext2_cpu.yaml
--args --model.model.init_args.norm pre --points "blocks.*.out" --ckpt BP=path.ckpt DFA=path.ckpt``

Why: on the pre-LN LM the failure map found DFA's updates thousands of times larger than BP's and no alignment
(README, "Where DFA fails"). A point on an unnormalised residual stream receives ``B_i e`` at a fixed scale while the
true gradient there shrinks as the stream grows (the final LayerNorm divides by its scale), so nothing stops DFA from
growing it. This measures the stream: the RMS of each point's output on the first validation batch, in eval mode.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch import nn

from dfa_lightning.cli import run
from dfa_lightning.feedback.points import resolve_points

__all__ = ["point_rms", "main"]


@torch.no_grad()
def point_rms(model: nn.Module, call, patterns: list[str]) -> dict[str, float]:
    """RMS of the output of every module matching ``patterns`` during ``call(model)`` (eval mode, no grad)."""
    outputs: dict[str, float] = {}
    handles = [module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(
        name, float(out.float().pow(2).mean().sqrt()))) for name, module in resolve_points(model, patterns)]
    was_training = model.training
    model.eval()
    try:
        call(model)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", required=True, help="the recipe and its overrides, in order")
    parser.add_argument("--args", nargs=argparse.REMAINDER, default=[], help="more recipe arguments (last)")
    parser.add_argument("--points", nargs="+", required=True, help="globs of the points to measure")
    parser.add_argument("--ckpt", nargs="+", required=True, metavar="LABEL=PATH")
    opts, rest = parser.parse_known_args(argv)
    extra = [*opts.args, *rest]
    cli = run([arg for config in opts.configs for arg in ("--config", config)] + extra, run=False)
    model, task, data = cli.model.model, cli.model.task, cli.datamodule
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    print("| checkpoint | point | output RMS |\n|---|---|---|")
    for spec in opts.ckpt:
        label, _, path = spec.partition("=")
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        model.load_state_dict({k.split("model.", 1)[1]: v for k, v in state.items() if k.startswith("model.")})
        for name, rms in point_rms(model, lambda m: task.step(m, batch, "val"), opts.points).items():
            print(f"| {label} | `{name}` | {rms:.3g} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
