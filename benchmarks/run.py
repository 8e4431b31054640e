"""Step time, peak memory and FLOPs of BP, DFA and shallow training on every task model (issue #5).

``make bench`` (= ``python -m benchmarks.run --preset cpu``) and ``make bench-gpu`` (``--preset gpu``) write
``benchmarks/results/bench_<preset>.json`` and ``.md`` naming the machine (CPU model, cores, threads, load average,
torch version; the GPU's name).

What is measured, per case (a model at one size, see :mod:`benchmarks.models`) and per variant (bp, dfa, ...):

* **step time**: one full training step, ``zero_grad(set_to_none=True)``, forward (under bf16 autocast for the
  ``bf16`` cases), loss, backward, ``Adam.step()`` (fused, see :func:`make_adam`); CUDA-synchronised before and
  after. After ``--warmup`` steps, the variants of a case are timed in interleaved rounds (round r: ``--steps``
  steps of each variant, in a shuffled order; more steps per round for a fast model, until each variant is timed
  for ``--min-seconds``), so that a load change on a shared machine hits every variant alike; the median of all
  timed steps is reported with the inter-quartile range, and the ratio to BP with a 95 % bootstrap interval over
  rounds.
* **peak memory**: persistent bytes (parameters, buffers, optimizer state, the batch, the feedback operator's cached
  device copy; distinct storages counted once) plus the peak, over one step, of the memory allocated during that
  step. CUDA: ``max_memory_allocated() - memory_allocated()`` before the step. CPU (torch has no allocator
  statistics there): ``torch.profiler`` with ``profile_memory=True``; every allocation and free is attributed to
  the innermost op that made it (``self_cpu_memory_usage``, frees outside ops are ``[memory]`` events); sorted by
  time, the running sum's maximum is the step's peak. Scratch memory that an op allocates and frees inside itself
  is not seen on CPU (the same for every variant).
* **FLOPs**: ``torch.utils.flop_counter.FlopCounterMode`` over one forward + backward (matmul-like ops, the ones
  that dominate; the counter prices a sparse product as the dense one, so the sparse operator's projection is
  replaced by its real ``2·N·K·nnz``).
  ``flop_ratio`` = variant / bp is the lower bound of the time ratio when the step is matmul-bound: for DFA with
  feedback on every layer, (forward + weight gradients + projection) / (forward + weight gradients + input
  gradients) ~ 2/3.
* **CUDA graph cases** (``_graph``, GPU preset, ``--no-cuda-graphs`` to skip): after warm-up, one step
  (forward, backward, Adam with ``capturable=True``) is captured in a ``torch.cuda.CUDAGraph`` and every timed step
  is one replay: no Python, hooks or launches on the host, for BP and DFA alike. Their ratios are the device-time
  ratios; their memory is not reported (the graph keeps its own pool; see the eager case).
* **compiled cases** (``--compile MODE``, into ``bench_<preset>_compiled``): the same models (not the GCN) with
  the model run through ``torch.compile(mode=MODE)``, as a recipe's ``compile:`` does; warm-up includes the
  compilation. The hooks and the engine's Functions trace into the graph, so DFA's host work per point goes with
  BP's. Their projection calls are not counted (a counter in a traced backward is a side effect it cannot hold).
* **projection calls**: how many times the feedback operator was called on ``e`` in the counted step (must be 1
  for DFA: ``project(e)`` when fused, ``prepare(e)`` when per point, whose column slices follow point by point;
  per point with shared columns, the one ``project(e)`` that every point slices).

CPU runs set ``torch.set_flush_denormal(True)``: without it Adam's tiny second moments become denormal floats and
its ``div`` runs 10-50x slower, a CPU artefact that would drown the comparison. ``--threads 1`` avoids OpenMP
spin-wait stalls on an oversubscribed machine (2 threads on 2 busy cores were 1000x slower on tiny models).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.models import BUILDERS, GRAPHED, Case, Variant, cases
from dfa_lightning.compile import compile_model
from dfa_lightning.feedback.engine import FeedbackEngine, optimizer_state_bytes

RESULTS = Path(__file__).resolve().parent / "results"
PRESETS = {  # warm-up steps, timed rounds, steps per round (at least), timed seconds per variant (at least)
    "tiny": dict(warmup=1, rounds=2, steps=1, min_seconds=0.0),
    "cpu": dict(warmup=2, rounds=10, steps=2, min_seconds=4.0),
    "gpu": dict(warmup=5, rounds=5, steps=4, min_seconds=1.0),
}
BOOTSTRAP = 2000  # resamples for the step-time ratio's confidence interval


# ---------------------------------------------------------------------------------------------- machine
def machine(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "host": platform.node(),
            "device": str(device), "gpu": None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# ---------------------------------------------------------------------------------------------- one variant
class Runner:
    """A model copy with its engine, optimizer and batch; ``step()`` is one full training step."""

    def __init__(self, case: Case, variant: Variant, base: torch.nn.Module, device: torch.device, batch):
        self.case, self.variant, self.device = case, variant, device
        self.model = copy.deepcopy(base).to(device)
        self.engine = FeedbackEngine(self.model, method=variant.method, **variant.engine)
        self.optimizer = make_adam(self.model.parameters(), case.lr, capturable=case.cuda_graph)
        self.inputs, self.target = batch
        self.projections = 0
        self.graph = None  # case.cuda_graph: the captured step (see `capture`)
        self.run = self.model  # case.compile: the compiled model, made after the eager set-up below
        if variant.method == "dfa":  # choose fused / per point (projection="auto"), draw B, count operator calls
            self.engine.calibrate(self.forward, optimizer_state_bytes([self.optimizer]))
            self.forward_backward()
            if not case.compile:  # the counting wrapper is a side effect that a traced backward cannot hold
                self._wrap_operator()
            self.model.zero_grad(set_to_none=True)
        if case.compile:
            self.run = compile_model(self.model, mode=case.compile)

    def _wrap_operator(self) -> None:
        op = self.engine.operator
        for name in ("project", "prepare"):  # fused: one project(e); per point: one prepare(e) (or, shared columns,
            # project(e)), then slices
            original = getattr(op, name)

            def counted(e, original=original):
                self.projections += 1
                self.last_rows = e.shape[0]
                return original(e)

            setattr(op, name, counted)

    def forward(self) -> torch.Tensor:
        self.engine.reset()
        # a graph cannot capture autocast's cache of cast weights (torch.cuda.graph's documented restriction)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.case.amp == "bf16",
                            cache_enabled=not self.case.cuda_graph):
            out = self.run(*self.inputs)
            return self.case.loss(out.float() if self.case.amp == "bf16" else out, self.target)

    def forward_backward(self) -> torch.Tensor:
        loss = self.forward()
        loss.backward()
        return loss

    @property
    def label(self) -> str:
        """The variant's name, with what ``projection="auto"`` chose."""
        engine = self.engine
        if self.variant.method != "dfa":
            return self.variant.name
        # per point in an eager step: which receiver `auto` chose (a compiled step always uses tokens)
        receiver = (f", {engine.receiver} receivers" if engine.mode == "per_point" and not self.case.compile
                    and engine.receiver_choice == "auto" else "")
        if engine.projection == "auto":
            return f"{self.variant.name} [auto: {engine.mode}{receiver}]"
        return f"{self.variant.name} [{receiver[2:]}]" if receiver else self.variant.name

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.forward_backward()
        self.optimizer.step()

    def capture(self, warmup: int = 3) -> None:
        """Capture one whole step in a CUDA graph (PyTorch's whole-network recipe: warm-up on a side stream, then
        the gradients are allocated by the captured backward and rewritten in place by every replay)."""
        if self.device.type != "cuda":
            raise RuntimeError("a CUDA graph needs a CUDA device")
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.forward_backward()
            self.optimizer.step()
        self.graph = graph

    def persistent_bytes(self) -> int:
        tensors = list(self.model.parameters()) + list(self.model.buffers()) + list(self.inputs) + [self.target]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        if self.engine.operator is not None:
            for cache in self.engine.operator._cache.values():
                tensors += [v for v in cache.values() if isinstance(v, torch.Tensor)]
        seen, total = set(), 0
        for t in tensors:
            if not isinstance(t, torch.Tensor) or t.device != self.device:
                continue
            if t.layout != torch.strided:
                parts = [t.values(), t.crow_indices(), t.col_indices()] if t.layout == torch.sparse_csr else []
            else:
                parts = [t]
            for p in parts:
                storage = p.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
        return total

    def peak_bytes(self) -> int | None:
        """Persistent bytes + the peak of what one step allocates on top of them (see the module docstring); None
        for a captured step, whose memory sits in the graph's own pool."""
        if self.graph is not None:
            return None
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            self.step()
            sync(self.device)
            step_peak = torch.cuda.max_memory_allocated(self.device) - before
        else:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
                self.step()
            events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events()
                            if e.self_cpu_memory_usage)
            running = step_peak = 0
            for _, nbytes in events:
                running += nbytes
                step_peak = max(step_peak, running)
        return self.persistent_bytes() + step_peak

    def flops(self) -> tuple[int, int | None]:
        """(matmul FLOPs of one forward + backward, projection calls in it: None when compiled, not counted)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.projections = 0
        run, self.run = self.run, self.model  # counted on the eager model: the same matmuls
        try:
            with FlopCounterMode(display=False) as counter:
                self.forward_backward()
        finally:
            self.run = run
        total, calls = counter.get_total_flops(), (None if self.case.compile else self.projections)
        op = self.engine.operator
        if op is not None and op.kind == "sparse" and calls:
            # FlopCounterMode counts a sparse CSR product as the dense one it stands for (torch 2.13; older versions
            # counted nothing): measure what it counts for this step's projection, and put the real 2·N·nnz·K instead
            e = torch.zeros(self.last_rows, self.engine.d_out, device=self.device)
            with FlopCounterMode(display=False) as probe:
                op.project(e)
            total += op.flops(self.last_rows) - probe.get_total_flops()
            self.projections = calls  # the probe went through the counting wrapper: not a step's call
        self.optimizer.zero_grad(set_to_none=True)
        return total, calls


def make_adam(params, lr: float, capturable: bool = False) -> torch.optim.Optimizer:
    """Adam, fused (one kernel over all parameters) where torch supports it, else multi-tensor (``foreach``).

    The optimizer costs the same for every variant; the default single-tensor Adam on CPU allocates fresh
    temporaries for each parameter (``sqrt``, ``div``; page faults included: 10-15 ms of a 75-90 ms BP step for a
    4 x 1024 MLP, measured in paired runs) and so dilutes every ratio towards 1. Fused (or foreach) Adam is what a
    tuned training run would use. ``capturable``: its step counter lives on the device, as a CUDA graph needs.
    """
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True, capturable=capturable)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr, foreach=True, capturable=capturable)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------- one case
def ratio_ci(rounds: list[list[float]], bp_rounds: list[list[float]], level: float = 0.95,
             seed: int = 0) -> tuple[float, float]:
    """Bootstrap confidence interval of ``median(times) / median(bp_times)``, resampling whole rounds (paired: the
    same rounds for both), so that a load drift between rounds widens the interval as it should.

    What decides a close call: a DFA step that does the same matmuls as BP's (a narrow feedback point, nothing to
    skip) reads 0.98 one run and 1.03 the next; the interval says whether a difference is resolved at all.
    """
    rng = random.Random(seed)
    n = len(rounds)
    ratios = []
    for _ in range(BOOTSTRAP):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(statistics.median(t for i in picks for t in rounds[i])
                      / statistics.median(t for i in picks for t in bp_rounds[i]))
    ratios.sort()
    tail = (1 - level) / 2
    return ratios[int(tail * BOOTSTRAP)], ratios[min(int((1 - tail) * BOOTSTRAP), BOOTSTRAP - 1)]


def steps_per_round(bp_step_s: float, rounds: int, steps: int, min_seconds: float) -> int:
    """At least ``steps``, and enough that each variant is timed for ``min_seconds`` at BP's step time (CPU preset,
    4 s in 10 rounds: a 10 ms step gets 400 timed steps, a 150 ms one 30), so that a fast model's ratio does not
    rest on 20 noisy samples."""
    if min_seconds <= 0 or bp_step_s <= 0:
        return steps
    return max(steps, math.ceil(min_seconds / (rounds * bp_step_s)))


def error_line(exc: BaseException) -> str:
    """A failure as the report's tables hold it: one line (CUDA's errors run on over five, with advice, and broke the
    markdown tables they sat in; the log keeps the whole text)."""
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}"


def run_case(case: Case, device: torch.device, warmup: int, rounds: int, steps: int, min_seconds: float,
             log) -> dict:
    torch.manual_seed(0)
    base = case.build()
    batch = case.batch(device, torch.Generator().manual_seed(0))
    runners, failed = [], []
    for v in case.variants:  # a variant that fails to build or to step is reported; the others are still timed
        try:
            r = Runner(case, v, base, device, batch)
            for _ in range(warmup):
                r.step()
            if case.cuda_graph:
                r.capture()
            runners.append(r)
        except Exception as exc:  # noqa: BLE001
            if v.method == "bp":
                raise  # every ratio is taken against BP
            log(f"  {v.name}: FAILED: {type(exc).__name__}: {exc}")
            failed.append(dict(variant=v.name, default=v.default, error=error_line(exc)))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    del base
    sync(device)
    t0 = time.perf_counter()
    runners[0].step()  # one more BP step, timed: it sizes the rounds
    sync(device)
    steps = steps_per_round(time.perf_counter() - t0, rounds, steps, min_seconds)
    by_round: dict[str, list[list[float]]] = {r.variant.name: [] for r in runners}
    order = random.Random(0)
    for _ in range(rounds):  # each round in a fresh order: no variant always runs right after another
        for r in order.sample(runners, len(runners)):
            by_round[r.variant.name].append([])
            for _ in range(steps):
                sync(device)
                t0 = time.perf_counter()
                r.step()
                sync(device)
                by_round[r.variant.name][-1].append(time.perf_counter() - t0)
    times = {name: [t for chunk in chunks for t in chunk] for name, chunks in by_round.items()}
    rows = []
    for r in runners:
        flops, calls = r.flops()
        ts = sorted(times[r.variant.name])
        q = statistics.quantiles(ts, n=4) if len(ts) > 1 else [ts[0]] * 3
        rows.append(dict(variant=r.variant.name, label=r.label, method=r.variant.method, default=r.variant.default,
                         projection=r.engine.mode if r.variant.method == "dfa" else None,
                         note=r.variant.note, engine={k: v for k, v in r.variant.engine.items()},
                         median_ms=1e3 * statistics.median(ts), q1_ms=1e3 * q[0], q3_ms=1e3 * q[2], steps=len(ts),
                         peak_mem_bytes=r.peak_bytes(), flops=flops, projection_calls=calls))
        mem = rows[-1]["peak_mem_bytes"]
        log(f"  {r.label:<54} {rows[-1]['median_ms']:9.2f} ms  "
            + (f"{mem / 2**20:9.1f} MiB" if mem is not None else "(memory: the graph's pool)"))
    bp = rows[0]
    for row in rows:
        row["time_ratio"] = row["median_ms"] / bp["median_ms"]
        row["time_ratio_ci95"] = list(ratio_ci(by_round[row["variant"]], by_round[bp["variant"]]))
        row["mem_ratio"] = (row["peak_mem_bytes"] / bp["peak_mem_bytes"]
                            if row["peak_mem_bytes"] is not None and bp["peak_mem_bytes"] else None)
        row["flop_ratio"] = row["flops"] / bp["flops"] if bp["flops"] else math.nan
    del runners
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return dict(case=case.name, description=case.description, amp=case.amp, mlp_target=case.mlp_target,
                cuda_graph=case.cuda_graph, compile=case.compile, timed_steps=rounds * steps, rows=rows,
                failed_variants=failed)


def check_targets(results: list[dict]) -> list[dict]:
    """Issue #5's targets, on every default DFA variant (what a recipe gets without choosing).

    A time target is met when the whole 95 % bootstrap interval of the ratio lies within the limit, missed when the
    whole interval lies above it, and a ``tie`` when the interval straddles it, whichever side the median fell on:
    the difference is below what this run can resolve (it happens where DFA saves no FLOPs, e.g. one narrow feedback
    point). A tie is not counted as met.
    """
    checks = []
    for res in results:
        for f in res.get("failed_variants", []):
            if f["default"]:
                checks.append(dict(case=res["case"], variant=f["variant"], what="runs", value=f["error"], ok=False))
        for row in res["rows"]:
            if not row["default"]:
                continue
            limit = 0.8 if res["mlp_target"] else 1.0
            low, high = row["time_ratio_ci95"]
            ok: bool | str = high <= limit or ("tie" if low <= limit else False)
            checks.append(dict(case=res["case"], variant=row["label"], what=f"time <= {limit} x BP",
                               value=row["time_ratio"], ci95=row["time_ratio_ci95"], flop_ratio=row["flop_ratio"],
                               ok=ok))
            if row["mem_ratio"] is not None:  # a CUDA graph case: its eager twin carries the memory target
                checks.append(dict(case=res["case"], variant=row["label"], what="peak memory <= 1.1 x BP",
                                   value=row["mem_ratio"], ok=row["mem_ratio"] <= 1.1))
            if row["projection_calls"] is not None:  # a compiled case: its eager twin carries this check
                checks.append(dict(case=res["case"], variant=row["label"], what="one projection per step",
                                   value=row["projection_calls"], ok=row["projection_calls"] == 1))
    return checks


# ---------------------------------------------------------------------------------------------- output
def _calls(row: dict) -> str:
    if row["method"] != "dfa":
        return "-"
    return "–" if row["projection_calls"] is None else str(row["projection_calls"])  # None: compiled, not counted


def markdown(report: dict) -> str:
    m = report["machine"]
    where = f"{m['gpu']} (CUDA {m.get('cuda')})" if m["gpu"] else f"{m['cpu']}, {m['cores']} cores"
    lines = [
        f"# DFA vs BP step cost, preset `{report['preset']}`",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {where}; torch {m['torch']}, {m['torch_threads']} threads; host `{m['host']}`  ",
        f"Date: {report['date']}; load average (1, 5, 15 min) before {report['load_before']}, "
        f"after {report['load_after']}; wall time {report['wall_s']:.0f} s  ",
        f"Timing: median of at least {report['timing']['rounds'] * report['timing']['steps']} full steps (forward, "
        f"backward, fused Adam step; more for fast models, enough for {report['timing'].get('min_seconds', 0):g} s "
        f"per variant) after {report['timing']['warmup']} warm-up steps, variants interleaved in "
        f"{report['timing']['rounds']} rounds, each in a shuffled order; IQR in brackets; the ratio's 95% interval "
        "is a bootstrap over rounds. "
        "Memory: persistent (params, Adam state, batch, B) + peak allocated during one step. FLOPs: matmul FLOPs of "
        "forward + backward (torch FlopCounterMode); the FLOP ratio is the lower bound of the time ratio. "
        "`*` marks the default DFA variant (the targets are checked on it).",
        "",
    ]
    for res in report["results"]:
        lines += [f"## {res['case']}: {res['description']}", "",
                  f"{res.get('timed_steps', '?')} timed steps per variant.", "",
                  "| variant | step ms [IQR] | × BP [95% CI] | FLOP bound × BP | peak MiB | mem × BP | proj. calls |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            name = r.get("label", r["variant"]) + (" *" if r["default"] else "") + (f" ({r['note']})" if r["note"] else "")
            ci = r.get("time_ratio_ci95")
            ratio = f"{r['time_ratio']:.2f}" + (f" [{ci[0]:.2f}–{ci[1]:.2f}]" if ci and r is not res["rows"][0] else "")
            mem = "– | –" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f} | {r['mem_ratio']:.2f}"
            lines.append(f"| {name} | {r['median_ms']:.2f} [{r['q1_ms']:.2f}–{r['q3_ms']:.2f}] | "
                         f"{ratio} | {r['flop_ratio']:.2f} | {mem} | "
                         f"{_calls(r)} |")
        for f in res.get("failed_variants", []):
            lines.append(f"| {f['variant']} | FAILED: `{f['error']}` | | | | | |")
        lines.append("")
    for f in report.get("failures", []):
        lines += [f"## {f['case']}: FAILED", "", f"`{f['error']}`", ""]
    if report.get("pending"):
        lines += ["## Not run (the run was cut short before these cases)", "",
                  ", ".join(f"`{name}`" for name in report["pending"]), ""]
    lines += ["## Targets (issue #5, on the default DFA variants: `projection: auto`)", "", "| case | variant | target | value | ok |",
              "|---|---|---|---|---|"]
    for c in report["targets"]:
        value = f"{c['value']:.2f}" if isinstance(c["value"], float) else str(c["value"])
        verdict = "yes" if c["ok"] is True else "**NO**"
        if c["ok"] == "tie":
            verdict = "tie (the 95% interval straddles the limit)"
            if c.get("flop_ratio", 0) >= 0.995:
                verdict += f"; FLOP bound {c['flop_ratio']:.2f}: DFA does BP's matmuls, nothing to skip"
        if "ci95" in c:
            value += f" [{c['ci95'][0]:.2f}–{c['ci95'][1]:.2f}]"
        lines.append(f"| {c['case']} | {c['variant']} | {c['what']} | {value} | {verdict} |")
    return "\n".join(lines) + "\n"


def _at_least(low: float, kind: type = int):
    """An argparse type: a number of ``kind`` no smaller than ``low`` (0 rounds or steps made every case fail)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not value >= low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}")
        return value
    return parse


COMPILE_MODES = ["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]  # torch.compile's


def out_folder(parser: argparse.ArgumentParser, out: str | Path) -> Path:
    """``--out`` as a folder to write into, refused before anything is measured: a file there was a FileExistsError
    once the cases had run (a GPU lease's minutes lost)."""
    path = probe = Path(out)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        parser.error(f"--out {out}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        parser.error(f"--out {out}: {probe} is not writable")
    return path


def device_arg(parser: argparse.ArgumentParser, given: str | None, preset: str) -> torch.device:
    """``--device`` (default: cuda for the gpu preset, else cpu), refused when it is not a device or has no CUDA."""
    try:
        device = torch.device(given or ("cuda" if preset == "gpu" else "cpu"))
    except RuntimeError:
        parser.error(f"--device {given!r}: not a torch device (cpu, cuda, cuda:1)")
    if device.type == "cuda" and not torch.cuda.is_available():
        what = f"--device {given}" if given else "the gpu preset"
        parser.error(f"{what} needs CUDA (torch.cuda.is_available() is False)")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--models", nargs="+", choices=list(BUILDERS), help="subset of: mlp gcn deepfm nerf lm")
    parser.add_argument("--device", default=None, help="default: cuda for the gpu preset, else cpu")
    parser.add_argument("--amp", nargs="+", choices=["fp32", "bf16"],
                        help="precisions to run instead of the preset's (the MLP alone gets the second one)")
    parser.add_argument("--out", default=str(RESULTS), help="folder for bench_<preset>.json/.md")
    parser.add_argument("--warmup", type=_at_least(0))
    parser.add_argument("--rounds", type=_at_least(1))
    parser.add_argument("--steps", type=_at_least(1), help="steps per round, at least")
    parser.add_argument("--min-seconds", type=_at_least(0, float), help="timed seconds per variant, at least (more steps per round "
                        "for fast models)")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="on a GPU, skip the cases replayed from a CUDA "
                        "graph (by default they follow the eager cases)")
    parser.add_argument("--compile", metavar="MODE", choices=COMPILE_MODES, help="run the host-bound models (and the MLP) under "
                        "torch.compile with this mode (default, reduce-overhead, max-autotune-no-cudagraphs) instead "
                        "of eagerly: into bench_<preset>_compiled.json/.md")
    parser.add_argument("--name", help="file name of the report, without .json/.md (default: bench_<preset>, "
                        "bench_<preset>_compiled with --compile): a second run of a subset keeps the first's files")
    parser.add_argument("--threads", type=_at_least(1), help="torch CPU threads (default: torch's, 1 for tiny). On an "
                        "oversubscribed machine 1 thread avoids OpenMP spin-wait stalls of 100x")
    args = parser.parse_args(argv)
    if args.threads or args.preset == "tiny":
        torch.set_num_threads(args.threads or 1)
    torch.set_flush_denormal(True)  # CPU: Adam's tiny second moments turn denormal and slow `div` down 10-50x
    device = device_arg(parser, args.device, args.preset)
    out_folder(parser, args.out)
    if args.name is not None and (not args.name or Path(args.name).name != args.name or args.name.endswith(
            (".json", ".md"))):
        parser.error(f"--name {args.name}: a file name without folder or extension (it becomes NAME.json and NAME.md)")
    timing = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PRESETS[args.preset].items()}
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    report = dict(preset=args.preset, command="python -m benchmarks.run " + " ".join(
                      sys.argv[1:] if argv is None else argv),
                  date=datetime.datetime.now().isoformat(timespec="seconds"), machine=machine(device),
                  load_before=load_average(), timing=timing, results=[])
    t0 = time.perf_counter()
    out = Path(args.out)
    todo = cases(args.preset, args.models, args.amp, cuda_graphs=device.type == "cuda" and not args.no_cuda_graphs,
                 compile_mode=args.compile)
    if not todo:  # --compile keeps the models it compiles: `--models gcn` left nothing (a KeyError at the end)
        parser.error(f"nothing to run: --compile runs {', '.join(GRAPHED)} only" if args.compile else "nothing to run")
    report["name"] = args.name or f"bench_{args.preset}" + ("_compiled" if args.compile else "")
    for i, case in enumerate(todo):
        log(f"{case.name}: {case.description}")
        try:
            report["results"].append(run_case(case, device, **timing, log=log))
        except Exception as exc:  # noqa: BLE001 - one failing case must not cost the other results
            log(f"  FAILED: {type(exc).__name__}: {exc}")
            report.setdefault("failures", []).append(dict(case=case.name, error=error_line(exc)))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # written after every case: a run cut short (a device lease's time limit) keeps the cases it finished
        write_report(report, out, t0, pending=[c.name for c in todo[i + 1:]])
    log(f"wrote {out / (report['name'] + '.md')} ({report['wall_s']:.0f} s)")
    if report.get("failures"):  # a failed case fails the command: `make gpu-check` said "all stages passed"
        log(f"error: {len(report['failures'])} case(s) failed (listed in the report): "
            f"{', '.join(f['case'] for f in report['failures'])}")
        return 1
    return 0


def write_report(report: dict, out: Path, t0: float, pending: list[str]) -> None:
    """``bench_<preset>.json`` and ``.md`` with the cases run so far; ``pending`` names the ones still to run."""
    report["wall_s"] = time.perf_counter() - t0
    report["load_after"] = load_average()
    report["targets"] = check_targets(report["results"])
    if pending:
        report["pending"] = pending
    else:
        report.pop("pending", None)
    out.mkdir(parents=True, exist_ok=True)
    name = report.get("name", f"bench_{report['preset']}")
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(markdown(report))


if __name__ == "__main__":
    raise SystemExit(main())
