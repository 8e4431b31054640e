"""The benchmark harness (issue #5) runs end to end, and a DFA step's profile has one projection and no discarded
gradients. Correctness only: no timing is asserted here (the targets are checked by `make bench`)."""
from __future__ import annotations

import json

import pytest

import torch

from benchmarks import profile_step, run
from benchmarks.models import cases


def test_harness_writes_well_formed_json_and_markdown(tmp_path):
    assert run.main(["--preset", "tiny", "--models", "mlp", "gcn", "lm", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    md = (tmp_path / "bench_tiny.md").read_text()
    assert report["machine"]["cpu"] and report["machine"]["torch"] == torch.__version__
    assert [r["case"] for r in report["results"]] == ["mlp_fp32", "gcn_fp32", "lm_fp32"]
    for res in report["results"]:
        rows = res["rows"]
        assert rows[0]["variant"] == "bp" and rows[0]["time_ratio"] == 1.0
        assert {r["method"] for r in rows} == {"bp", "dfa", "shallow"}
        for r in rows:
            assert r["median_ms"] > 0 and r["peak_mem_bytes"] > 0 and r["flops"] > 0 and r["steps"] == 2
            # exactly one operator call on e per DFA step (fused: project(e); per point: prepare(e))
            assert r["projection_calls"] == (1 if r["method"] == "dfa" else 0)
        assert f"## {res['case']}" in md
    dfa_mlp = next(r for r in report["results"][0]["rows"] if r["variant"] == "dfa")
    assert dfa_mlp["flop_ratio"] < 1.0  # DFA skips the input gradients: fewer FLOPs than BP
    lm = {r["variant"]: r for r in report["results"][2]["rows"]}
    # the sparse operator is priced at its non-zeros (the FLOP counter alone would price it as the dense one)
    sparse, dense = lm["dfa macro, e after vocab, sparse nnz16"], lm["dfa macro, e after vocab, dense"]
    assert sparse["flops"] < dense["flops"]
    assert report["targets"] and all({"case", "what", "ok"} <= set(c) for c in report["targets"])
    assert "| bp |" in md and "Targets" in md


def test_a_run_cut_short_keeps_the_cases_it_finished(tmp_path, monkeypatch):
    """A device lease can end mid-run: the report on disk holds every finished case and names the pending ones."""
    real, calls = run.run_case, []

    def run_case(case, *args, **kwargs):
        calls.append(case.name)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a kill at the time limit looks like from inside: not an Exception
        return real(case, *args, **kwargs)

    monkeypatch.setattr(run, "run_case", run_case)
    try:
        run.main(["--preset", "tiny", "--models", "mlp", "gcn", "lm", "--out", str(tmp_path)])
    except KeyboardInterrupt:
        pass
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert [r["case"] for r in report["results"]] == ["mlp_fp32"]
    assert report["pending"] == ["gcn_fp32", "lm_fp32"]
    assert "`gcn_fp32`, `lm_fp32`" in (tmp_path / "bench_tiny.md").read_text()


def test_a_failing_variant_is_reported_and_the_others_are_still_timed():
    from benchmarks.models import Variant

    case = cases("tiny", ["mlp"])[0]
    case.variants.append(Variant("dfa broken", "dfa", dict(feedback_points=["no_such_layer.*"]), default=True))
    res = run.run_case(case, torch.device("cpu"), warmup=1, rounds=2, steps=1, min_seconds=0, log=lambda m: None)
    assert [r["variant"] for r in res["rows"]] == [v.name for v in case.variants[:-1]]
    assert res["failed_variants"][0]["variant"] == "dfa broken" and "no_such_layer" in res["failed_variants"][0]["error"]
    runs = [c for c in run.check_targets([res]) if c["what"] == "runs"]
    assert len(runs) == 1 and runs[0]["ok"] is False
    assert "FAILED" in run.markdown(dict(preset="tiny", command="", date="", machine=run.machine(torch.device("cpu")),
                                         load_before=None, load_after=None, wall_s=0.0, results=[res],
                                         timing=run.PRESETS["tiny"], targets=run.check_targets([res])))


def test_a_failure_of_several_lines_sits_on_one_line_of_the_report(monkeypatch):
    """CUDA's errors run over several lines of advice: in a table cell they broke the markdown tables (seen in the
    H200 report of a failed CUDA-graph capture)."""
    class Capture(run.Runner):
        def __init__(self, case, variant, *args):
            if variant.method == "dfa":
                raise RuntimeError("CUDA error: capture invalidated\nSearch for `cudaErrorStreamCaptureInvalidated'"
                                   "\nFor debugging consider passing CUDA_LAUNCH_BLOCKING=1")
            super().__init__(case, variant, *args)

    monkeypatch.setattr(run, "Runner", Capture)
    res = run.run_case(cases("tiny", ["mlp"])[0], torch.device("cpu"), warmup=1, rounds=1, steps=1, min_seconds=0,
                       log=lambda m: None)
    text = run.markdown(dict(preset="tiny", command="", date="", machine=run.machine(torch.device("cpu")),
                             load_before=None, load_after=None, wall_s=0.0, results=[res],
                             timing=run.PRESETS["tiny"], targets=run.check_targets([res])))
    assert "RuntimeError: CUDA error: capture invalidated" in text and "CUDA_LAUNCH_BLOCKING" not in text


def test_bf16_autocast_path_of_the_gpu_preset_runs_on_cpu(tmp_path):
    """The GPU preset's bf16 cases (autocast forward, fp32 projection, calibration under autocast) on CPU sizes."""
    assert run.main(["--preset", "tiny", "--models", "mlp", "lm", "--amp", "bf16", "fp32", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert [r["case"] for r in report["results"]] == ["mlp_bf16", "lm_bf16", "mlp_fp32"]
    assert "failures" not in report
    for res in report["results"]:
        for r in res["rows"]:
            assert r["projection_calls"] == (1 if r["method"] == "dfa" else 0) and r["median_ms"] > 0


def test_dfa_step_profile_has_one_projection_and_no_input_gradient_above_a_cut():
    report = profile_step.run("tiny", ["mlp", "lm"])
    by_case = {(m["case"], m["variant"]): m for m in report["models"]}
    fused, per_point = by_case[("mlp_fp32", "dfa fused")], by_case[("mlp_fp32", "dfa per-point")]
    assert fused["inject_nodes"] == 1 and fused["projection_matmuls"] == ["aten::mm"]  # one matmul: e @ M
    assert fused["per_point_matmuls"] == []
    # per point: nothing computed at the output (dense B), then one slice matmul as autograd reaches each point
    assert per_point["projection_matmuls"] == [] and len(per_point["per_point_matmuls"]) == per_point["points"] == 2
    for m in (fused, per_point, by_case[("mlp_fp32", "dfa")]):  # every layer above a cut: weight grad only
        assert m["input_grad_matmuls"] == 0 < m["bp_input_grad_matmuls"]
    for m in report["models"]:
        assert m["ok_one_projection"] and m["ok_no_discarded_gradients"], m
        assert m["input_grad_matmuls"] < m["bp_input_grad_matmuls"]


def test_every_preset_builds_its_cases():
    for preset in ("tiny", "cpu", "gpu"):
        names = [c.name for c in cases(preset)]
        assert {"mlp", "gcn", "deepfm", "nerf", "lm"} <= {n.split("_")[0] for n in names}
        for c in cases(preset):
            assert c.variants[0].method == "bp" and any(v.default for v in c.variants)


def _row(name, ms, ci=(0.0, 0.0), default=False, method="dfa"):
    return dict(variant=name, label=name, method=method, default=default, median_ms=ms, time_ratio=ms / 10.0,
                time_ratio_ci95=list(ci), flop_ratio=1.0, mem_ratio=1.0,
                projection_calls=1 if method == "dfa" else 0)


def test_time_target_is_met_only_when_the_whole_ratio_interval_is_within_the_limit():
    bp = _row("bp", 10.0, method="bp")
    results = [dict(case="a", mlp_target=False, rows=[bp, _row("dfa", 9.5, (0.93, 0.97), default=True)]),
               dict(case="b", mlp_target=False, rows=[bp, _row("dfa", 10.1, (0.99, 1.03), default=True)]),
               dict(case="c", mlp_target=False, rows=[bp, _row("dfa", 9.9, (0.94, 1.03), default=True)]),
               dict(case="d", mlp_target=False, rows=[bp, _row("dfa", 11.0, (1.05, 1.15), default=True)]),
               dict(case="e", mlp_target=True, rows=[bp, _row("dfa", 8.2, (0.81, 0.83), default=True)])]
    time = {c["case"]: c["ok"] for c in run.check_targets(results) if c["what"].startswith("time")}
    # c: the median is under the limit, but the interval straddles it: a tie, not met
    assert time == {"a": True, "b": "tie", "c": "tie", "d": False, "e": False}


def test_ratio_interval_brackets_the_ratio_and_separates_a_real_difference_from_noise():
    import random
    rng = random.Random(1)

    def rounds(mean, drift=0.0):  # 10 rounds of 20 steps; `drift`: a load change that moves whole rounds
        return [[mean * (1 + drift * r) + rng.gauss(0, 0.5) for _ in range(20)] for r in range(10)]

    bp = rounds(10)
    lo, hi = run.ratio_ci(rounds(10), bp)
    assert lo < 1.0 < hi and hi - lo < 0.05
    steady = hi - lo
    lo, hi = run.ratio_ci(rounds(9), bp)
    assert 0.85 < lo < 0.9 < hi < 0.95
    # the same cost, but this variant's rounds drift with the load (0 to +18 %): the interval must widen
    lo, hi = run.ratio_ci(rounds(10, drift=0.02), bp)
    assert hi - lo > 2 * steady, (hi - lo, steady)


def test_fast_models_get_more_steps_per_round_until_the_time_budget():
    assert run.steps_per_round(0.010, rounds=10, steps=2, min_seconds=2.0) == 20  # 10 ms: 200 steps in all
    assert run.steps_per_round(0.150, rounds=10, steps=2, min_seconds=2.0) == 2   # 150 ms: 20 steps are 3 s
    assert run.steps_per_round(0.010, rounds=10, steps=2, min_seconds=0.0) == 2


def test_kernel_profile_reports_every_variant_and_counts_no_annotation_as_a_kernel(tmp_path):
    """``benchmarks.profile_kernels`` on CPU: no device kernels, so only wall time; the report lists every variant
    asked for and a failing one by its error."""
    from benchmarks import profile_kernels

    assert profile_kernels.main(["--preset", "tiny", "--models", "nerf", "--amp", "bf16", "--variants", "bp",
                                 "dfa fused", "dfa per-point, bf16 projection", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "kernels_tiny.json").read_text())
    rows = report["cases"][0]["rows"]
    # the label says which receiver per point chose (`receiver: auto`; matmul at this size)
    assert [r["variant"] for r in rows] == ["bp", "dfa fused", "dfa per-point, bf16 projection [matmul receivers]"]
    assert all(r["wall_ms"] > 0 and r["kernel_ms"] == 0 and r["top"] == [] for r in rows)
    # the host time inside the engine's Functions (and matmul receivers): none for BP; per point costs more than
    # fused (per point: a forward matmul and its backward node; the profile's range around each adds to it)
    assert rows[0]["dfa_host_ms"] == 0 < rows[1]["dfa_host_ms"] < rows[2]["dfa_host_ms"]
    assert "| dfa fused |" in (tmp_path / "kernels_tiny.md").read_text()


def test_loop_overhead_times_the_bare_and_the_lightning_step_for_bp_and_dfa(tmp_path):
    from benchmarks import loop_overhead

    assert loop_overhead.main(["--preset", "tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "loop_overhead_tiny.json").read_text())
    assert [r["method"] for r in result["rows"]] == ["bp", "dfa"]
    for row in result["rows"]:
        assert row["bare_ms"] > 0 and row["lightning_ms"] > 0
        assert row["added_ms"] == pytest.approx(row["lightning_ms"] - row["bare_ms"], abs=2e-3)
    assert result["dfa_projection"]["bare"] == result["dfa_projection"]["lightning"]  # like for like
    table = (tmp_path / "loop_overhead_tiny.md").read_text()
    assert "| bp |" in table and "| dfa |" in table and "torch" in table


@pytest.mark.slow  # 16 s of Inductor on the CPU; the compiled case of benchmarks.run stays in the fast suite
def test_loop_overhead_compiled_runs_both_loops_through_the_compiled_model(tmp_path, monkeypatch):
    """``--compile``: the bare loop and Trainer.fit both call the compiled model (aot_eager stands in for
    Inductor), and the results go to their own files."""
    from benchmarks import loop_overhead

    real_compile, compiled = torch.compile, []

    def fake_compile(fn, mode=None):
        compiled.append(mode)
        return real_compile(fn, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert loop_overhead.main(["--preset", "tiny", "--compile", "default", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "loop_overhead_tiny_compiled.json").read_text())
    assert result["compile"] == "default" and [r["method"] for r in result["rows"]] == ["bp", "dfa"]
    assert compiled == ["default"] * 4  # bp and dfa, bare and Trainer.fit
    assert "torch.compile (mode default)" in (tmp_path / "loop_overhead_tiny_compiled.md").read_text()
    assert not (tmp_path / "loop_overhead_tiny.json").exists()


def test_cuda_graph_cases_follow_the_eager_ones_and_keep_bp_the_defaults_and_both_modes():
    todo = cases("gpu", cuda_graphs=True)
    names = [c.name for c in todo]
    graph = [c for c in todo if c.cuda_graph]
    assert [c.name for c in graph] == ["mlp_bf16_graph", "deepfm_bf16_graph", "nerf_bf16_graph", "lm_bf16_graph"]
    assert names.index("mlp_bf16_graph") > names.index("mlp_fp32")  # after every eager case
    for c in graph:
        kept = {v.name for v in c.variants}
        assert c.variants[0].method == "bp" and any(v.default for v in c.variants)
        if c.name != "lm_bf16_graph":
            assert {"dfa", "dfa fused", "dfa per-point", "shallow"} <= kept
        # the MLP's bf16 target is also timed with the projection in bf16; no other case pays for that
        bf16_projection = {"dfa fused, bf16 projection", "dfa per-point, bf16 projection"}
        assert kept & bf16_projection == (bf16_projection if c.name == "mlp_bf16_graph" else set())
    assert not any(c.cuda_graph for c in cases("gpu"))


def test_a_cuda_graph_case_without_cuda_is_reported_as_failed_and_renders_without_memory(tmp_path):
    from benchmarks.models import graphed

    case = graphed(cases("tiny", ["mlp"])[0])
    with pytest.raises(RuntimeError, match="CUDA"):  # BP cannot be captured on a CPU: the case fails, loudly
        run.run_case(case, torch.device("cpu"), warmup=1, rounds=1, steps=1, min_seconds=0, log=lambda m: None)
    row = dict(variant="dfa", label="dfa", method="dfa", default=True, note="", median_ms=1.0, q1_ms=1.0, q3_ms=1.0,
               time_ratio=0.9, time_ratio_ci95=[0.8, 0.95], flop_ratio=0.7, peak_mem_bytes=None, mem_ratio=None,
               projection_calls=1, steps=4)
    bp = {**row, "variant": "bp", "label": "bp", "method": "bp", "default": False, "time_ratio": 1.0}
    results = [dict(case=case.name, description=case.description, mlp_target=True, rows=[bp, row])]
    targets = run.check_targets(results)
    assert [t["what"] for t in targets] == ["time <= 0.8 x BP", "one projection per step"]  # no memory check
    report = dict(preset="gpu", command="x", date="d", machine=run.machine(torch.device("cpu")), load_before=None,
                  load_after=None, wall_s=1.0, timing=run.PRESETS["gpu"], results=results, targets=targets)
    assert "| – | – |" in run.markdown(report)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["bp", "dfa fused", "dfa per-point"])
def test_a_step_replayed_from_a_cuda_graph_trains_as_the_eager_step(variant):
    from benchmarks.models import graphed

    case = graphed(cases("tiny", ["nerf"])[0])
    device = torch.device("cuda")
    torch.manual_seed(0)
    base = case.build()
    batch = case.batch(device, torch.Generator().manual_seed(0))
    v = next(v for v in case.variants if v.name == variant)
    eager, replayed = run.Runner(case, v, base, device, batch), run.Runner(case, v, base, device, batch)
    replayed.capture(warmup=3)  # 3 eager steps on a side stream; capturing runs nothing
    for _ in range(3 + 4):
        eager.step()
    for _ in range(4):
        replayed.step()
    torch.cuda.synchronize()
    for (name, a), b in zip(eager.model.named_parameters(), replayed.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    assert replayed.graph is not None and eager.graph is None


def test_compiled_cases_replace_the_eager_ones_and_keep_bp_the_defaults_and_both_modes():
    todo = cases("gpu", compile_mode="reduce-overhead")
    assert [c.name for c in todo] == ["mlp_bf16_compiled", "deepfm_bf16_compiled", "nerf_bf16_compiled",
                                      "lm_bf16_compiled"]
    for c in todo:
        assert c.compile == "reduce-overhead" and not c.cuda_graph
        assert c.variants[0].method == "bp" and any(v.default for v in c.variants)
        if c.name != "lm_bf16_compiled":
            assert {"dfa", "dfa fused", "dfa per-point", "shallow"} <= {v.name for v in c.variants}
    assert not any(c.compile for c in cases("gpu"))


def test_a_compiled_case_trains_as_its_eager_twin_and_reports_no_projection_count(tmp_path, monkeypatch):
    """aot_eager stands in for Inductor (no C compiler needed); the compiled runner's steps give the eager weights."""
    from benchmarks.models import compiled

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: real_compile(model, backend="aot_eager"))
    eager_case = cases("tiny", ["nerf"])[0]
    case = compiled(eager_case, "default")
    torch.manual_seed(0)
    base = case.build()
    batch = case.batch(torch.device("cpu"), torch.Generator().manual_seed(0))
    for name in ("bp", "dfa per-point", "dfa fused"):
        v = next(v for v in case.variants if v.name == name)
        torch._dynamo.reset()
        eager, traced = run.Runner(eager_case, v, base, torch.device("cpu"), batch), \
            run.Runner(case, v, base, torch.device("cpu"), batch)
        assert traced.run is not traced.model and eager.run is eager.model
        for _ in range(3):
            eager.step()
            traced.step()
        for (n, a), b in zip(eager.model.named_parameters(), traced.model.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=f"{name}: {n}")
    torch._dynamo.reset()
    result = run.run_case(case, torch.device("cpu"), warmup=1, rounds=1, steps=1, min_seconds=0, log=lambda m: None)
    assert result["compile"] == "default"
    dfa_rows = [r for r in result["rows"] if r["method"] == "dfa"]
    assert dfa_rows and all(r["projection_calls"] is None for r in dfa_rows)
    targets = run.check_targets([result])
    assert targets and not any(t["what"] == "one projection per step" for t in targets)
    report = dict(preset="tiny", command="x", date="d", machine=run.machine(torch.device("cpu")), load_before=None,
                  load_after=None, wall_s=1.0, timing=run.PRESETS["tiny"], results=[result], targets=targets)
    assert "| – |" in run.markdown(report)


FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for python in benchmarks/gpu_check.sh: `-m MODULE ARGS`; a sweep of a recipe named in $SLOW never ends
[ "$1" = "-m" ] || exit 0
module=$2; shift 2
echo "$module $*" >>"$CALLS"
[ "$module" = dfa_lightning.sweep ] || exit "${BENCH_RC:-0}"
recipes=(); out=; root=
while [ $# -gt 0 ]; do
    case "$1" in
        --recipes) shift; while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do recipes+=("$1"); shift; done; continue ;;
        --out) out=$2; shift ;;
        --root) root=$2; shift ;;
        --) break ;;
    esac
    shift
done
for r in "${recipes[@]}"; do
    stem=$(basename "$r" .yaml)
    case " $SLOW " in *" $stem "*) sleep 60 ;; esac
    mkdir -p "$root/$stem/seed0" && echo '{}' >"$root/$stem/seed0/result.json"
done
mkdir -p "$(dirname "$out")" && echo "table of ${recipes[*]}" >"$out"
"""


def _gpu_check(tmp_path, **env):
    import os
    import subprocess
    import time
    from pathlib import Path

    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    data = tmp_path / "data"
    for folder in ("planetoid/Cora/raw", "nerf/nerf_synthetic_100px/lego", "nerf/nerf_llff_data/fern"):
        (data / folder).mkdir(parents=True)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": str(fake), "OUT": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs"),
           "DFA_DATA_DIR": str(data), "CALLS": str(tmp_path / "calls"), **env}
    t0 = time.monotonic()
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu_check.sh")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    return done, time.monotonic() - t0, (tmp_path / "calls").read_text().splitlines()


def test_gpu_check_times_alone_then_runs_the_rest_at_once_and_tables_each_sweep(tmp_path):
    """The timed stages one after another, then the untimed ones in the background (one sweep per recipe), then a
    table per sweep from its runs (a sweep that reuses the runs' results: no training in the table stage)."""
    done, _, calls = _gpu_check(tmp_path, SKIP="tests")
    assert done.returncode == 0, done.stdout[-2000:]
    modules = [c.split()[0] for c in calls]
    assert modules[:5] == ["benchmarks.run", "benchmarks.profile_step", "benchmarks.run", "benchmarks.loop_overhead",
                           "benchmarks.run"]
    # the compiled models in two stages, each into its own report: the LM's compilations alone outlast a stage
    assert "--models deepfm nerf " in calls[2] and "--name" not in calls[2]
    assert "--models lm " in calls[4] and "--name bench_gpu_compiled_lm " in calls[4]
    per_recipe = [c for c in calls[5:-4] if c.startswith("dfa_lightning.sweep")]
    assert len(per_recipe) == 3 + 3 + 2 + 2 and all(len(c.split("--recipes ")[1].split(" --")[0].split()) == 1
                                                     for c in per_recipe)
    out = tmp_path / "out"
    assert (out / "nerf_lego_100px_gpu.md").read_text().startswith(
        "table of recipes/nerf_bp.yaml recipes/nerf_dfa.yaml recipes/nerf_shallow.yaml")
    assert {f.name for f in out.iterdir()} >= {"gpu_check.log", "cora_gcn_gpu.md", "nerf_llff_fern_gpu.md",
                                                 "nerf_lego_100px_2000_gpu.md"}
    assert "=== tests: skipped (SKIP)" in done.stdout


def test_gpu_check_ends_by_its_deadline_and_tables_only_the_runs_that_finished(tmp_path):
    """A device command has 600 s: DEADLINE cuts every stage's limit (a run that would not end is stopped), the
    tables still come from the runs that did finish, and the exit status says a stage failed."""
    done, seconds, calls = _gpu_check(tmp_path, SKIP="tests", SLOW="nerf_dfa", DEADLINE="10", TABLE_RESERVE="4")
    assert done.returncode == 1 and seconds < 30, (seconds, done.stdout[-2000:])
    # the LM's compiled stage would eat the untimed stages' time: skipped, and said so
    assert "=== compiled_lm: skipped" in done.stdout and not any("--models lm" in c for c in calls)
    table = (tmp_path / "out" / "nerf_lego_100px_gpu.md").read_text()
    assert "nerf_bp" in table and "nerf_shallow" in table and "nerf_dfa" not in table
    assert "a stage FAILED" in done.stdout


def test_point_scale_reports_each_points_output_rms_and_leaves_the_model_as_it_was():
    from benchmarks.point_scale import point_rms
    from dfa_lightning.models.mlp import MLP

    model = MLP(4, 2, hidden=[3, 3]).train()
    with torch.no_grad():
        for block, w in zip(model.blocks, (1.0, 10.0)):
            block[0].weight.fill_(w)
            block[0].bias.zero_()
    x = torch.ones(5, 4)
    rms = point_rms(model, lambda m: m(x), ["blocks.*"])
    # blocks.0: relu(4 * 1) = 4 everywhere; blocks.1: relu(3 * 4 * 10) = 120 everywhere
    assert rms == pytest.approx({"blocks.0": 4.0, "blocks.1": 120.0})
    assert model.training and not model.blocks[0]._forward_hooks


@pytest.mark.parametrize("part", ["center", "scale", "center_scale", "orthogonal", "layer"])
def test_each_feedback_norm_part_hands_b_e_to_the_point_through_that_part_alone(part):
    """benchmarks/feedback_norm_parts.py splits LayerNorm's backward (1/σ)(g − mean g − y·mean(g·y)) into its parts;
    each swapped-in function must pass g through its part and nothing else (the engine's own options for the rest)."""
    from benchmarks.feedback_norm_parts import PARTS
    from dfa_lightning.feedback.engine import FeedbackEngine
    from dfa_lightning.models.mlp import MLP

    torch.manual_seed(0)
    out, g = (3 * torch.randn(4, 8, dtype=torch.float64)).requires_grad_(), torch.randn(4, 8, dtype=torch.float64)
    feedback_norm, swap = PARTS[part]
    if swap is None:
        swap = FeedbackEngine(MLP(2, 2, hidden=[8]), ["blocks.*"], feedback_norm=feedback_norm).normalise
    (got,) = torch.autograd.grad(swap(out), out, g)
    sigma = torch.sqrt(out.detach().var(dim=1, unbiased=False, keepdim=True) + 1e-5)
    centred = g - g.mean(dim=1, keepdim=True)
    y = (out.detach() - out.detach().mean(dim=1, keepdim=True)) / sigma
    orthogonal = centred - y * (g * y).mean(dim=1, keepdim=True)
    expected = {"center": centred, "scale": g / sigma, "center_scale": centred / sigma, "orthogonal": orthogonal,
                "layer": orthogonal / sigma}[part]
    torch.testing.assert_close(got, expected)


def test_feedback_norm_parts_puts_the_engine_back_after_a_failed_run(tmp_path, monkeypatch):
    import benchmarks.feedback_norm_parts as parts
    from dfa_lightning.feedback.engine import FeedbackEngine

    original = FeedbackEngine.normalise

    def failing(args, run=False):
        assert FeedbackEngine.normalise is not original  # the part is swapped in while the run builds and trains
        raise RuntimeError("boom")

    monkeypatch.setattr(parts, "run", failing)
    with pytest.raises(RuntimeError, match="boom"):
        parts.train("center", 2, "none", 0, tmp_path)
    assert FeedbackEngine.normalise is original and not list(tmp_path.rglob("*.json"))


def test_labelled_nodes_splits_each_block_output_by_the_train_mask_in_eval_mode():
    """benchmarks/labelled_nodes.py: the RMS on the labelled nodes and on the rest come from each block's eval-mode
    output (no dropout), and the accuracy and loss per split are the task's own on that forward."""
    from torch_geometric.data import Data

    from benchmarks.labelled_nodes import labelled_rms, node_split
    from dfa_lightning.models.graph import GCNStack
    from dfa_lightning.tasks.graph import NodeClassification

    out, mask = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([True, False, False])
    assert labelled_rms(out, mask) == pytest.approx({"labelled": 12.5 ** 0.5, "other": 0.5 ** 0.5, "ratio": 5.0})

    torch.manual_seed(0)
    n = 12
    masks = torch.arange(n) % 3
    batch = Data(x=torch.randn(n, 5), edge_index=torch.randint(0, n, (2, 30)), y=torch.randint(0, 3, (n,)),
                 train_mask=masks == 0, val_mask=masks == 1, test_mask=masks == 2)
    model, task = GCNStack(5, 3, hidden=4, num_layers=3, dropout=0.9, norm="batch").train(), NodeClassification(3)
    split = node_split(model, task, batch)
    assert model.training  # the mode is put back
    with torch.no_grad():
        model.eval()
        h = model.blocks[0](batch.x, batch.edge_index, None)
        logits = model(batch.x, batch.edge_index)
    assert len(split["points"]) == 2
    assert split["points"][0] == pytest.approx(labelled_rms(h, batch.train_mask))
    for stage in ("train", "val", "test"):
        m = getattr(batch, f"{stage}_mask")
        assert split[f"{stage}_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits[m], batch.y[m])))
        assert split[f"{stage}_acc"] == pytest.approx(float((logits[m].argmax(-1) == batch.y[m]).float().mean()))


@pytest.mark.parametrize("rule", ["bp", "dfa", "orthogonal", "dfa_frozen_norm", "dfa_frozen_bias"])
def test_labelled_nodes_rules_build_the_runs_they_name(rule):
    """Each rule of benchmarks/labelled_nodes.py instantiates on the BatchNorm stack; the frozen-norm rule puts the
    norms' scale and shift, the frozen-bias rule the convs' biases before them, and nothing else, at learning rate 0,
    and both keep the paper's weight decay on the first conv's weight."""
    from benchmarks.labelled_nodes import RULES
    from dfa_lightning.cli import run

    recipe, extra = RULES[rule]
    cli = run(["--config", recipe, "--model.model.init_args.num_layers", "3", "--model.model.init_args.norm", "batch",
               *extra], run=False)
    (strategy,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "FeedbackAlignmentStrategy"]
    assert strategy.method == ("bp" if rule == "bp" else "dfa")
    assert strategy.config.get("feedback_norm", "none") == ("orthogonal" if rule == "orthogonal" else "none")
    names = {id(p): n for n, p in cli.model.model.named_parameters()}
    for group in cli.model.parameter_groups():
        for p in group["params"]:
            name = names[id(p)]
            frozen = ((rule == "dfa_frozen_norm" and ".norm." in name)
                      or (rule == "dfa_frozen_bias" and name.startswith("blocks.") and name.endswith(".conv.bias")))
            assert (group.get("lr") == 0.0) == frozen, name
            if name.startswith("blocks.0.conv") and not frozen:  # the paper's weight decay on the first layer stays
                assert group["weight_decay"] == (5.0e-4 if rule == "bp" else 1.0e-4)


def test_batch_statistics_accuracy_normalises_by_the_graph_and_leaves_the_model_alone():
    """The check that BatchNorm's running statistics are not what fails: the copy normalises by the full graph's own
    statistics (so it scores like the training-mode forward without dropout), and the model keeps its running ones."""
    import copy

    from torch_geometric.data import Data

    from benchmarks.labelled_nodes import batch_statistics_accuracy
    from dfa_lightning.models.graph import GCNStack
    from dfa_lightning.tasks.graph import NodeClassification

    torch.manual_seed(0)
    n = 40
    masks = torch.arange(n) % 2 == 0
    batch = Data(x=torch.randn(n, 5), edge_index=torch.randint(0, n, (2, 80)), y=torch.randint(0, 3, (n,)),
                 train_mask=masks, val_mask=~masks, test_mask=~masks)
    task = NodeClassification(3)
    model = GCNStack(5, 3, hidden=4, num_layers=3, dropout=0.0, norm="batch")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):  # running statistics far from the graph's
            m.running_mean.fill_(5.0)
            m.running_var.fill_(0.01)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # dropout 0: the batch statistics are the training forward's only difference
        train_mode = copy.deepcopy(model).train()(batch.x, batch.edge_index)
        eval_mode = model(batch.x, batch.edge_index)
    expected = float((train_mode[~masks].argmax(-1) == batch.y[~masks]).float().mean())
    assert expected != float((eval_mode[~masks].argmax(-1) == batch.y[~masks]).float().mean())  # the check can tell
    assert batch_statistics_accuracy(model, task, batch) == pytest.approx(expected)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert batch_statistics_accuracy(GCNStack(5, 3, hidden=4, norm="none"), task, batch) is None


def test_running_statistics_gap_is_zero_where_they_agree_and_counts_in_batch_standard_deviations():
    from benchmarks.labelled_nodes import running_statistics_gap

    torch.manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(500, 4)
    norm = torch.nn.BatchNorm1d(4, eps=0.0)
    norm.running_mean.copy_(x.mean(0))
    norm.running_var.copy_(x.var(0, unbiased=False))
    assert running_statistics_gap(norm, x) == pytest.approx({"mean_gap_sd": 0.0, "var_ratio": 1.0}, abs=1e-6)
    norm.running_mean.add_(0.5 * x.std(0, unbiased=False))  # half a standard deviation off
    norm.running_var.mul_(4.0)
    assert running_statistics_gap(norm, x) == pytest.approx({"mean_gap_sd": 0.5, "var_ratio": 0.25}, abs=1e-6)


@pytest.mark.parametrize("module", ["labelled_nodes", "feedback_norm_parts"])
def test_the_cora_studies_name_a_malformed_cell_before_training(module, capsys):
    import importlib

    main = importlib.import_module(f"benchmarks.{module}").main
    with pytest.raises(SystemExit):
        main(["--cells", "2:none", "2:bogus", "--root", "/nonexistent"])
    assert "argument --cells: '2:bogus' is not depth:norm" in capsys.readouterr().err


def test_pre_norm_drift_measures_the_batch_mean_step_in_batch_standard_deviations_in_training_only():
    from benchmarks.labelled_nodes import PreNormDrift

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    model[0].weight.data = torch.eye(4, 3)
    model[0].bias.data.zero_()
    drift = PreNormDrift(window=2)
    drift.on_train_start(None, model)
    x = torch.randn(64, 3)
    sd = x.std(0, unbiased=False)[0]
    shifted = x + torch.tensor([0.5, 0.0, 0.0]) * sd  # the first feature's mean moves half a standard deviation
    with torch.no_grad():
        model.train()(x)
        model.eval()(x + 100.0)  # an evaluation forward is not a step
        model.train()(shifted)
    drift.on_train_end(None, model)
    summary = drift.summary()
    # features: 0.5 sd, 0, 0, and the fourth (no input: constant 0, sd 0) 0
    assert summary["late_mean_step_sd"] == pytest.approx(0.5 / 4, rel=1e-4)
    assert summary["late_bias_step_sd"] == 0.0  # the shift came from the input, not the bias
    assert len(drift.steps) == 1 and not model[1]._forward_hooks


def test_pre_norm_drift_tells_the_bias_before_the_norm_and_its_gradient():
    """The bias just before a BatchNorm moves the batch mean one for one; its step is counted in the same batch
    standard deviations, and its gradient, which BatchNorm makes zero up to rounding, is recorded after backward."""
    from benchmarks.labelled_nodes import PreNormDrift, preceding_bias

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    assert preceding_bias(model, model[1]) is model[0].bias
    assert preceding_bias(torch.nn.Sequential(torch.nn.BatchNorm1d(4)), torch.nn.Sequential()) is None
    drift = PreNormDrift(window=1)
    drift.on_train_start(None, model)
    x = torch.randn(256, 3)
    model.train()(x).pow(2).sum().backward()
    drift.on_after_backward(None, model)
    assert 0 <= drift.grads[0][0] < 1e-4 * float(model[0].weight.grad.abs().mean())  # cancelled by the norm
    with torch.no_grad():
        sd = model[0](x).std(0, unbiased=False)
        model[0].bias.add_(0.25 * sd)  # a quarter of a standard deviation on every feature
        model(x)
    drift.on_train_end(None, model)
    summary = drift.summary()
    assert summary["late_bias_step_sd"] == pytest.approx(0.25, rel=1e-4)
    assert summary["late_mean_step_sd"] == pytest.approx(0.25, rel=1e-4)
    assert summary["early_bias_grad"] == summary["late_bias_grad"] == drift.grads[0][0]


def test_cell_table_puts_each_row_and_cells_runs_in_its_entry_and_n_a_where_none_ran():
    from dfa_lightning.studies import cell_table

    results = [{"rule": "dfa", "depth": 2, "norm": "batch", "acc": a} for a in (1, 2)]
    results.append({"rule": "bp", "depth": 8, "norm": "none", "acc": 5})
    lines = cell_table(results, "rule", ["dfa", "bp"], [(2, "batch"), (8, "none")],
                       lambda runs: str(sum(r["acc"] for r in runs)))
    assert lines == ["| rule | depth 2, norm batch | depth 8, norm none |", "|---|---|---|",
                     "| `dfa` | 3 | n/a |", "| `bp` | n/a | 5 |"]


def test_ctr_bias_walk_renders_one_row_per_model_and_rule_over_its_seeds():
    from benchmarks.ctr_bias_walk import render

    run = {"model": "deepfm", "rule": "dfa", "steps": 255, "late_mean_step_sd": 0.04, "late_bias_step_sd": 0.001,
           "late_sd": 1.0, "early_bias_grad": 2e-8, "late_bias_grad": 1e-9}
    runs = [dict(run, seed=0), dict(run, seed=1, late_bias_step_sd=0.003), dict(run, rule="bp", seed=0)]
    rows = [line for line in render(runs, "cmd").splitlines() if line.startswith("| deepfm")]
    assert [row.split(" | ")[1] for row in rows] == ["dfa", "bp"]
    assert "0.00200 ± 0.00141" in rows[0] and "2.0e-08 / 1.0e-09" in rows[0]


def test_ln_affine_drift_reads_how_far_every_post_ln_norm_moved_from_1_and_0():
    from benchmarks import ln_affine

    state = {"model.blocks.0.ln_1.weight": torch.tensor([1.0, 3.0]), "model.blocks.0.ln_1.bias": torch.tensor([0.0, 2.0]),
             "model.blocks.1.ln_2.weight": torch.tensor([1.0, 1.0]), "model.blocks.1.ln_2.bias": torch.zeros(2),
             "model.blocks.0.attn.proj.weight": torch.full((2, 2), 9.0)}  # not a norm: left out
    drift = ln_affine.affine_drift(state)
    assert drift["gamma_rms"] == pytest.approx(1.0)  # sqrt((0 + 4 + 0 + 0) / 4)
    assert drift["beta_rms"] == pytest.approx(1.0) and drift["gamma_mean"] == pytest.approx(1.5)
    text = ln_affine.render({"LayerNorm γ (ln_1, ln_2)": (0.5, 0.9)}, {("lm_dfa_micro", 0): drift},
                            {("lm_dfa_micro", 0): 416.1}, "cmd")
    assert "| LayerNorm γ (ln_1, ln_2) | 0.500 | 0.900 |" in text and "| lm_dfa_micro | 0 | 416.1 | 1.000 |" in text


@pytest.mark.parametrize(("argv", "why"), [
    (["--models", "nosuch"], "invalid choice: 'nosuch'"), (["--rounds", "0"], "0 is below 1"),
    (["--steps", "0"], "0 is below 1"), (["--warmup", "-1"], "-1 is below 0"),
    (["--min-seconds", "-1"], "-1.0 is below 0"), (["--threads", "0"], "0 is below 1"),
    (["--compile", "bogus"], "invalid choice: 'bogus'"), (["--device", "foo"], "--device 'foo': not a torch device"),
    (["--models"], "expected at least one argument"),
    (["--compile", "default", "--models", "gcn"], "nothing to run: --compile runs mlp, deepfm, nerf, lm only"),
    (["--name", "sub/x"], "--name sub/x: a file name without folder"), (["--name", "x.md"], "--name x.md: a file"),
])
def test_bench_refuses_a_bad_argument_before_writing_any_report(argv, why, tmp_path, capsys):
    """0 rounds or an unknown model made every case fail (or a KeyError) and still wrote, with exit 0, a report over
    the committed one."""
    from benchmarks import run as bench

    with pytest.raises(SystemExit) as stop:
        bench.main(["--preset", "tiny", "--out", str(tmp_path / "out"), *argv])
    assert stop.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_bench_names_the_device_flag_when_cuda_is_missing(tmp_path, capsys):
    from benchmarks import run as bench

    with pytest.raises(SystemExit):
        bench.main(["--preset", "tiny", "--device", "cuda", "--out", str(tmp_path / "out")])
    assert "--device cuda needs CUDA" in capsys.readouterr().err


def test_a_named_report_leaves_the_presets_report_alone(tmp_path, monkeypatch):
    """`gpu-check` compiles the LM in a stage of its own: its report must not overwrite the other compiled cases'."""
    from benchmarks import run as bench

    monkeypatch.setattr(bench, "run_case", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("not measured")))
    (tmp_path / "bench_tiny_compiled.md").write_text("the first stage's cases")
    bench.main(["--preset", "tiny", "--compile", "default", "--models", "lm", "--name", "bench_tiny_compiled_lm",
                "--out", str(tmp_path)])
    assert (tmp_path / "bench_tiny_compiled.md").read_text() == "the first stage's cases"
    report = json.loads((tmp_path / "bench_tiny_compiled_lm.json").read_text())
    assert report["failures"][0]["case"] == "lm_fp32_compiled" and (tmp_path / "bench_tiny_compiled_lm.md").exists()


def test_bench_exits_non_zero_when_no_case_was_measured(tmp_path, monkeypatch):
    from benchmarks import run as bench

    def fail(*args, **kwargs):
        raise RuntimeError("broken")

    monkeypatch.setattr(bench, "run_case", fail)
    assert bench.main(["--preset", "tiny", "--models", "mlp", "--out", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "bench_tiny.json").read_text())["failures"][0]["error"] == "RuntimeError: broken"


def test_every_bench_tool_refuses_a_file_as_its_out_folder_before_measuring(tmp_path, capsys):
    """A file as ``--out`` was a FileExistsError once the cases had run (on a GPU lease: its minutes lost)."""
    from benchmarks import loop_overhead, profile_kernels, profile_step
    from benchmarks import run as bench

    afile = tmp_path / "afile"
    afile.write_text("x")
    for main in (bench.main, profile_step.main, profile_kernels.main, loop_overhead.main):
        with pytest.raises(SystemExit) as stop:
            main(["--preset", "tiny", "--out", str(afile)])
        assert stop.value.code == 2 and f"--out {afile}: {afile} is a file, not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("tool, argv, why", [
    ("profile_step", ["--models", "mpl"], "invalid choice: 'mpl'"),
    ("profile_kernels", ["--models", "mlp", "--variants", "nope"], "--variants nope: not a variant of these cases"),
    ("profile_step", ["--device", "foo"], "--device 'foo': not a torch device"),
    ("loop_overhead", ["--compile", "foo"], "invalid choice: 'foo'"),
    ("loop_overhead", ["--threads", "0"], "0 is below 1"),
])
def test_the_profilers_refuse_a_misspelt_name_rather_than_writing_an_empty_report(tool, argv, why, tmp_path, capsys):
    """A misspelt model or variant profiled nothing, wrote an empty table over the results, and exited 0."""
    import importlib

    main = importlib.import_module(f"benchmarks.{tool}").main
    with pytest.raises(SystemExit) as stop:
        main(["--preset", "tiny", "--out", str(tmp_path / "out"), *argv])
    assert stop.value.code == 2 and why in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failed_case_fails_the_bench_command_though_others_were_measured(tmp_path, monkeypatch):
    """``make gpu-check`` judges each stage by its exit code: a failed case (a CUDA-graph capture) said "passed"."""
    from benchmarks import run as bench

    real = bench.run_case

    def gcn_fails(case, *args, **kwargs):
        if case.name.startswith("gcn"):
            raise RuntimeError("broken")
        return real(case, *args, **kwargs)

    monkeypatch.setattr(bench, "run_case", gcn_fails)
    assert bench.main(["--preset", "tiny", "--models", "mlp", "gcn", "--rounds", "1", "--min-seconds", "0",
                       "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "bench_tiny.json").read_text())
    assert [r["case"] for r in report["results"]] == ["mlp_fp32"] and report["failures"][0]["case"] == "gcn_fp32"


def test_a_kernel_profile_on_cuda_survives_a_variant_that_cannot_be_built(monkeypatch):
    """``del runner`` after a Runner that raised (CUDA out of memory) was an UnboundLocalError: every result lost."""
    from benchmarks import profile_kernels as pk

    real = cases("tiny", ["mlp"])[0]
    build_batch = real.batch
    real.batch = lambda device, g: build_batch(torch.device("cpu"), g)
    monkeypatch.setattr(pk, "cases", lambda *a, **k: [real])
    monkeypatch.setattr(pk, "machine", lambda d: {})
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)

    class OutOfMemory:
        def __init__(self, case, variant, *args):
            raise RuntimeError(f"CUDA out of memory in {variant.name}")

    monkeypatch.setattr(pk, "Runner", OutOfMemory)
    report = pk.run("tiny", ["mlp"], None, "cuda", None)
    rows = report["cases"][0]["rows"]
    assert rows and all(r["error"].startswith("RuntimeError: CUDA out of memory") for r in rows)


def test_every_benchmark_target_writes_where_out_says(tmp_path):
    """``make bench OUT=...`` (and bench-gpu, bench-compiled, profile, kernels) wrote over the committed results."""
    import subprocess

    from conftest import REPO

    for target in ("bench", "bench-gpu", "bench-compiled", "profile", "kernels", "loop-overhead"):
        shown = subprocess.run(["make", "-n", target, f"OUT={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout
        assert f"--out {tmp_path}" in shown, (target, shown)
