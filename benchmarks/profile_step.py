"""Profile one DFA step (and the BP step beside it) per model: where the backward's matmuls go.

``python -m benchmarks.profile_step [--preset tiny|cpu|gpu]`` writes ``benchmarks/results/profile_<preset>.md`` and
``.json``. For each case's default DFA variant (see :mod:`benchmarks.models`) it runs one forward + backward under
``torch.profiler`` and reads, from the autograd engine's events (``autograd::engine::evaluate_function: <Node>``):

* **projection**: the matmul-like ops run inside ``_InjectFeedbackBackward`` (must be exactly one ``_Inject``
  node per step; ``dense``: one ``aten::mm``; ``lowrank``: ``(e U) V``, two thin ones in the same call;
  ``sparse``: one sparse-dense product);
* **input-gradient matmuls** of linear layers: every ``AddmmBackward0`` / ``MmBackward0`` / ``LinearBackward0``
  computes its weight gradient with one matmul and, only when its input requires a gradient, one more for the
  input. Counted: ``matmuls - nodes``. Expected: the number of ``nn.Linear`` calls whose input requires grad,
  recorded by forward pre-hooks in the same forward. Under DFA every layer directly above a feedback point reads a
  detached tensor, so it computes no input gradient: no kernel computes a gradient that DFA would throw away.
  The BP profile of the same model shows how many input-gradient matmuls DFA saved.
* **per point**: the matmuls inside each ``_ReceiveFeedbackBackward`` (tokens) or inside each matmul receiver's
  ``MmBackward0`` node (told apart by sequence number, see :func:`watch_receivers`): one slice each; and the
  receivers' thin forward matmuls (``dfa::receive``), one per point, whose values are discarded;
* backward matmul FLOPs (profiler ``with_flops``) of DFA and BP.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from benchmarks.models import BUILDERS, cases
from benchmarks.run import RESULTS, Runner, device_arg, machine, out_folder

RECEIVE_RANGE = "dfa::receive"  # the profiler range around each matmul receiver's forward (see `watch_receivers`)
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_sparse_mm", "aten::_sparse_csr_mm",
           "aten::addmm_", "aten::_sparse_addmm", "aten::sparse_sampled_addmm")
LINEAR_NODES = ("AddmmBackward0", "MmBackward0", "LinearBackward0")
NODE = "autograd::engine::evaluate_function: "


def _matmuls_below(event) -> list[str]:
    """Names of the matmul ops reached from ``event`` (not descending into a matmul: addmm may call mm)."""
    found, stack = [], list(event.cpu_children)
    while stack:
        e = stack.pop()
        if e.name in MATMULS:
            found.append(e.name)
            continue
        stack.extend(e.cpu_children)
    return found


def watch_receivers(engine) -> set[int]:
    """Matmul receivers (per point, ``receiver: matmul``) are autograd's own matmuls, not the engine's Functions:
    wrap the engine's receiver so that a profile tells them apart. Each forward receiver runs inside a
    ``dfa::receive`` range, and the returned set collects the sequence numbers of their backward nodes (the
    profiler's events carry them). For profiles only: the range costs host time."""
    seqs: set[int] = set()
    original = engine._receive

    def receive(index, out):
        with torch.profiler.record_function(RECEIVE_RANGE):
            z = original(index, out)
        seqs.add(z.grad_fn._sequence_nr())
        return z

    engine._receive = receive
    return seqs


def profile_variant(runner: Runner) -> dict:
    """One forward + backward of ``runner`` under the profiler; counts per autograd node."""
    linears_needing_input_grad = []

    def pre_hook(module, args):
        x = args[0] if args else None
        linears_needing_input_grad.append(bool(isinstance(x, torch.Tensor) and x.requires_grad))

    handles = [m.register_forward_pre_hook(pre_hook) for m in runner.model.modules() if isinstance(m, nn.Linear)]
    receivers = watch_receivers(runner.engine)
    runner.optimizer.zero_grad(set_to_none=True)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True,
                                    record_shapes=True) as prof:
            runner.forward_backward()
    finally:
        for h in handles:
            h.remove()
        runner.optimizer.zero_grad(set_to_none=True)
    nodes: Counter = Counter()
    node_matmuls: Counter = Counter()
    projection: list[str] = []
    per_point: list[str] = []
    inject_nodes = receive_nodes = 0
    backward_flops = 0
    receiver_forward: list[str] = []
    for e in prof.events():
        if e.name == RECEIVE_RANGE:
            receiver_forward += _matmuls_below(e)
        if not e.name.startswith(NODE):
            continue
        node = e.name[len(NODE):]
        mms = _matmuls_below(e)
        backward_flops += sum(c.flops or 0 for c in _walk(e) if c.name in MATMULS)
        if node == "_InjectFeedbackBackward":
            inject_nodes += 1
            projection += mms
        elif node == "_ReceiveFeedbackBackward" or (node == "MmBackward0" and e.sequence_nr in receivers):
            receive_nodes += 1
            per_point += mms
        elif node in LINEAR_NODES:
            nodes[node] += 1
            node_matmuls[node] += len(mms)
    linear_nodes = sum(nodes.values())
    return dict(inject_nodes=inject_nodes, projection_matmuls=projection, receive_nodes=receive_nodes,
                per_point_matmuls=per_point, receiver_forward_matmuls=receiver_forward,
                linear_backward_nodes=linear_nodes,
                input_grad_matmuls=sum(node_matmuls.values()) - linear_nodes,
                expected_input_grad_matmuls=sum(linears_needing_input_grad),
                linear_calls=len(linears_needing_input_grad), backward_matmul_flops=backward_flops)


def _walk(event):
    stack = list(event.cpu_children)
    while stack:
        e = stack.pop()
        yield e
        if e.name not in MATMULS:
            stack.extend(e.cpu_children)


def run(preset: str, only: list[str] | None = None, device: str = "cpu") -> dict:
    """Profile every case of ``preset`` on ``device``. The op structure is the same on CUDA (the profiler's CPU
    events are the dispatched aten ops, whichever device runs them); a GPU profile also checks what
    ``projection: auto`` chooses there."""
    device = torch.device(device)
    report = dict(preset=preset, machine=machine(device), models=[])
    for case in cases(preset, only):
        torch.manual_seed(0)
        base = case.build()
        batch = case.batch(device, torch.Generator().manual_seed(0))
        bp = Runner(case, case.variants[0], base, device, batch)
        bp_prof = profile_variant(bp)
        for variant in case.variants:
            if not (variant.default or (variant.method == "dfa" and "projection" in variant.engine)):
                continue  # the default (auto) variants, and the explicitly fused / per-point ones
            dfa = Runner(case, variant, base, device, batch)
            prof = profile_variant(dfa)
            kind, mode = dfa.engine.operator_kind, dfa.engine.mode
            receiver = dfa.engine.receiver if mode == "per_point" else None
            prof.update(case=case.name, variant=variant.name, label=dfa.label, operator=kind, points=len(dfa.engine.points),
                        projection_mode=mode, receiver=receiver, bp_input_grad_matmuls=bp_prof["input_grad_matmuls"],
                        bp_backward_matmul_flops=bp_prof["backward_matmul_flops"])
            if mode == "fused":  # one operator call: e @ B (lowrank: (e U) V)
                prof["ok_one_projection"] = (prof["inject_nodes"] == 1 and prof["receive_nodes"] == 0
                                             and len(prof["projection_matmuls"]) == (2 if kind == "lowrank" else 1))
            elif dfa.engine.shared_slices and receiver == "token":  # per point, shared columns: the one product
                # e B at the output (as fused), which every point slices
                prof["ok_one_projection"] = (prof["inject_nodes"] == 1 and prof["per_point_matmuls"] == []
                                             and len(prof["projection_matmuls"]) == (2 if kind == "lowrank" else 1))
            else:  # per point: e prepared once at the output (lowrank: e U), then one slice matmul per point call
                # (a matmul receiver: also one thin forward matmul per point, whose value is discarded)
                prof["ok_one_projection"] = (
                    prof["inject_nodes"] == 1 and len(prof["projection_matmuls"]) == (1 if kind == "lowrank" else 0)
                    and len(prof["per_point_matmuls"]) == prof["receive_nodes"] > 0
                    and len(prof["receiver_forward_matmuls"]) == (prof["receive_nodes"] if receiver == "matmul" else 0))
            prof["ok_no_discarded_gradients"] = prof["input_grad_matmuls"] == prof["expected_input_grad_matmuls"]
            report["models"].append(prof)
            print(f"{case.name:<10} {dfa.label:<40} projection {prof['projection_matmuls']} "
                  f"per point {len(prof['per_point_matmuls'])} "
                  f"input-grad matmuls DFA {prof['input_grad_matmuls']} (expected "
                  f"{prof['expected_input_grad_matmuls']}) vs BP {prof['bp_input_grad_matmuls']}", file=sys.stderr)
    return report


def markdown(report: dict) -> str:
    lines = [f"# One DFA step under torch.profiler, preset `{report['preset']}`", "",
             f"Command: `{report.get('command') or 'python -m benchmarks.profile_step --preset ' + report['preset']}`; "
             f"{report['machine']['gpu'] or report['machine']['cpu']}, torch {report['machine']['torch']}.", "",
             "Per default DFA variant (`projection: auto`): matmuls inside `_InjectFeedbackBackward` (fused: the whole "
             "projection, lowrank is (eU)V, two thin matmuls in one operator call; per point: only lowrank's e U, or the "
             "shared product) and "
             "inside the per-point nodes (tokens' `_ReceiveFeedbackBackward`, or matmul receivers' `MmBackward0`: one "
             "slice matmul each, when autograd reaches the point; tokens with shared slices: none, the one product e B "
             "is made at the output and every point slices it; matmul receivers also run one thin forward matmul per "
             "point, in the `receiver fwd` column), "
             "input-gradient matmuls of linear layers in the backward (DFA measured / expected from the layers "
             "whose input requires grad / BP), backward matmul GFLOPs.", "",
             "| model | variant | points | inject nodes | projection ops at the output | per-point matmuls | "
             "receiver fwd | "
             "input-grad matmuls DFA (expected) | input-grad matmuls BP | bwd GFLOP DFA / BP | one projection | "
             "nothing discarded |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in report["models"]:
        lines.append(
            f"| {m['case']} | {m.get('label', m['variant'])} | {m['points']} | {m['inject_nodes']} | "
            f"{', '.join(m['projection_matmuls']) or '-'} | {len(m.get('per_point_matmuls', []))} | "
            f"{len(m.get('receiver_forward_matmuls', []))} | "
            f"{m['input_grad_matmuls']} ({m['expected_input_grad_matmuls']}) | "
            f"{m['bp_input_grad_matmuls']} | {m['backward_matmul_flops'] / 1e9:.3f} / "
            f"{m['bp_backward_matmul_flops'] / 1e9:.3f} | {'yes' if m['ok_one_projection'] else '**NO**'} | "
            f"{'yes' if m['ok_no_discarded_gradients'] else '**NO**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["tiny", "cpu", "gpu"], default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(BUILDERS))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--device", default=None, help="default: cuda for the gpu preset, else cpu")
    args = parser.parse_args(argv)
    device = device_arg(parser, args.device, args.preset)
    out_folder(parser, args.out)
    report = run(args.preset, args.models, str(device))
    report["command"] = " ".join(["python -m benchmarks.profile_step", *(sys.argv[1:] if argv is None else argv)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{args.preset}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"profile_{args.preset}.md").write_text(markdown(report))
    ok = bool(report["models"]) and all(m["ok_one_projection"] and m["ok_no_discarded_gradients"]
                                        for m in report["models"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
