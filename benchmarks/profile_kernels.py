"""Where a training step's device time goes, kernel by kernel, for BP and the DFA variants of each case.

``python -m benchmarks.profile_kernels --preset gpu --models mlp nerf [--variants bp "dfa fused"]`` writes
``kernels_<preset>.md`` and ``.json``: per variant, the wall time of a step, the summed kernel time (CUDA; on a CPU
run there are no kernels and only the wall time is reported), the share of the wall time the device was busy, and
the kernels that took most of it. What it answers: whether a DFA step that saves FLOPs but not time is waiting on
the host (busy share well under 100 %), or spends its saving on memory-bound kernels (casts, copies, the
projection's output), see README "Performance".
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType

from benchmarks.models import BUILDERS, cases
from benchmarks.profile_step import NODE, RECEIVE_RANGE, watch_receivers
from benchmarks.run import RESULTS, Runner, device_arg, machine, out_folder, sync

TOP = 10


def kernel_profile(runner: Runner, steps: int = 5, warmup: int = 3) -> dict:
    """``steps`` full training steps under the profiler (after ``warmup``): wall, kernel time and top kernels."""
    receivers = watch_receivers(runner.engine)
    for _ in range(warmup):
        runner.step()
    sync(runner.device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if runner.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        sync(runner.device)
        wall = (time.perf_counter() - t0) / steps
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    events = prof.key_averages()
    # record_function ranges (``Optimizer.step#Adam.step``) also appear on the device's timeline, spanning the
    # kernels they launched: counting them would count those kernels twice
    ranges = {e.key for e in events if getattr(e, "is_user_annotation", False)}
    for evt in events:
        if evt.key in ranges or _looks_like_range(evt.key):
            continue
        if evt.device_type == DeviceType.CUDA and evt.self_device_time_total > 0:
            per_kernel[evt.key][0] += evt.self_device_time_total / 1e3 / steps  # ms per step
            per_kernel[evt.key][1] += evt.count / steps
    kernel_ms = sum(ms for ms, _ in per_kernel.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:TOP]
    return dict(wall_ms=1e3 * wall, kernel_ms=kernel_ms, busy=kernel_ms / (1e3 * wall) if wall else 0.0,
                kernels_per_step=sum(n for _, n in per_kernel.values()),
                dfa_host_ms=dfa_host_ms(prof.events(), receivers, steps),
                top=[dict(kernel=k[:120], ms=ms, calls=n) for k, (ms, n) in top])


def dfa_host_ms(events, receivers: set[int], steps: int) -> float:
    """Host time per step inside the engine's autograd Functions: their forward calls (``_InjectFeedback``,
    ``_ReceiveFeedback``) and their backward nodes, with everything those launch (the projection included); with
    matmul receivers, their forward (the ``dfa::receive`` range) and their backward matmul nodes."""
    names = ("_InjectFeedback", "_ReceiveFeedback", RECEIVE_RANGE, f"{NODE}_InjectFeedbackBackward",
             f"{NODE}_ReceiveFeedbackBackward")
    total = sum(e.cpu_time_total for e in events
                if e.name in names or (e.name == f"{NODE}MmBackward0" and e.sequence_nr in receivers))
    return total / 1e3 / steps


def _looks_like_range(name: str) -> bool:
    """``Optimizer.step#Adam.step``: a record_function range (torch versions that do not flag it as an annotation
    on the device timeline); kernel names have ``#`` only inside ``(...)`` or ``<...>`` (``{lambda()#3}``)."""
    return "#" in name and "(" not in name and "<" not in name


def run(preset: str, only: list[str] | None, variants: list[str] | None, device: str, amps: list[str] | None) -> dict:
    device_t = torch.device(device)
    report = dict(preset=preset, machine=machine(device_t), cases=[])
    for case in cases(preset, only, amps):
        torch.manual_seed(0)
        base = case.build()
        batch = case.batch(device_t, torch.Generator().manual_seed(0))
        rows = []
        for v in case.variants:
            if variants and v.name not in variants:
                continue
            runner = None  # a variant whose Runner raised (CUDA out of memory) leaves none to free
            try:
                runner = Runner(case, v, base, device_t, batch)
                row = dict(variant=runner.label, **kernel_profile(runner))
            except Exception as exc:  # noqa: BLE001 - one variant's failure must not cost the others
                row = dict(variant=v.name, error=f"{type(exc).__name__}: {exc}")
            rows.append(row)
            print(f"{case.name:<12} {row['variant']:<48} " + (
                f"wall {row['wall_ms']:8.2f} ms  kernels {row['kernel_ms']:8.2f} ms  busy {100 * row['busy']:5.1f} %  "
                f"DFA host {row['dfa_host_ms']:6.3f} ms"
                if "error" not in row else f"FAILED {row['error']}"), file=sys.stderr, flush=True)
            if device_t.type == "cuda":
                runner = None
                torch.cuda.empty_cache()
        report["cases"].append(dict(case=case.name, description=case.description, rows=rows))
    return report


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Kernel time per training step, preset `{report['preset']}`", "",
             f"Machine: {m['gpu'] or m['cpu']}; torch {m['torch']}. Per variant: wall ms per step (mean of 5 profiled "
             "steps after 3 warm-up steps; the profiler adds host overhead), summed kernel ms per step, busy = kernel / "
             "wall, kernel launches per step, host ms per step inside the DFA engine's autograd Functions (forward "
             "calls and backward nodes, with what they launch), then the largest kernels (ms per step, calls per step).",
             ""]
    for case in report["cases"]:
        lines += [f"## {case['case']}: {case['description']}", "",
                  "| variant | wall ms | kernel ms | busy | launches | DFA host ms | largest kernels (ms, calls) |",
                  "|---|---|---|---|---|---|---|"]
        for r in case["rows"]:
            if "error" in r:
                lines.append(f"| {r['variant']} | FAILED: `{r['error']}` | | | | | |")
                continue
            top = "<br>".join(f"{k['ms']:.3f} ({k['calls']:g}) `{k['kernel'][:70]}`" for k in r["top"][:6])
            lines.append(f"| {r['variant']} | {r['wall_ms']:.2f} | {r['kernel_ms']:.2f} | {100 * r['busy']:.0f} % | "
                         f"{r['kernels_per_step']:.0f} | {_ms(r.get('dfa_host_ms'))} | {top} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=["tiny", "cpu", "gpu"], default="gpu")
    parser.add_argument("--models", nargs="+", choices=list(BUILDERS))
    parser.add_argument("--variants", nargs="+", help="variant names (default: all of each case)")
    parser.add_argument("--amp", nargs="+", choices=["fp32", "bf16"])
    parser.add_argument("--device", default=None, help="default: cuda for the gpu preset, else cpu")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    device = str(device_arg(parser, args.device, args.preset))
    out_folder(parser, args.out)
    if args.variants:  # a misspelt one profiled nothing and wrote an empty table over the results
        known = {v.name for c in cases(args.preset, args.models, args.amp) for v in c.variants}
        unknown = sorted(set(args.variants) - known)
        if unknown:
            parser.error(f"--variants {' '.join(unknown)}: not a variant of these cases ({', '.join(sorted(known))})")
    report = run(args.preset, args.models, args.variants, device, args.amp)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"kernels_{args.preset}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"kernels_{args.preset}.md").write_text(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
