"""The benchmark harness (issue #5) runs end to end, and a DFA step's profile has one projection and no discarded
gradients. Correctness only: no timing is asserted here (the targets are checked by `make bench`)."""
from __future__ import annotations

import json

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
    assert report["targets"] and all({"case", "what", "ok"} <= set(c) for c in report["targets"])
    assert "| bp |" in md and "Targets" in md


def test_dfa_step_profile_has_one_projection_and_no_input_gradient_above_a_cut():
    report = profile_step.run("tiny", ["mlp", "lm"])
    by_case = {(m["case"], m["variant"]): m for m in report["models"]}
    mlp = by_case[("mlp_fp32", "dfa")]
    assert mlp["inject_nodes"] == 1 and mlp["projection_matmuls"] == ["aten::mm"]  # one matmul: e @ M
    assert mlp["input_grad_matmuls"] == 0 < mlp["bp_input_grad_matmuls"]  # every layer above a cut: weight grad only
    for m in report["models"]:
        assert m["ok_one_projection"] and m["ok_no_discarded_gradients"], m
        assert m["input_grad_matmuls"] < m["bp_input_grad_matmuls"]


def test_every_preset_builds_its_cases():
    for preset in ("tiny", "cpu", "gpu"):
        names = [c.name for c in cases(preset)]
        assert {"mlp", "gcn", "deepfm", "nerf", "lm"} <= {n.split("_")[0] for n in names}
        for c in cases(preset):
            assert c.variants[0].method == "bp" and any(v.default for v in c.variants)
