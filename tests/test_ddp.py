"""DFA under DDP (2 CPU processes, gloo): same B on every rank, same parameters, equal to one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_processes_match_each_other_and_a_single_process_on_the_combined_batch(tmp_path):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29517", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    for mode in ("ddp", "single"):
        run = subprocess.run([sys.executable, str(WORKER), str(tmp_path), mode], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"ddp_rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single_rank0.pt")
    assert torch.equal(rank0["matrix"], rank1["matrix"]) and torch.equal(rank0["matrix"], single["matrix"])
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
        torch.testing.assert_close(value, single["params"][name], atol=1e-6, rtol=1e-5, msg=name)
    # epoch values are synchronised across ranks: every rank logs the global weighted means, as one process does
    assert rank0["val"] == rank1["val"] and set(rank0["val"]) == {"val/loss", "val/acc"}
    for key, value in single["val"].items():
        assert rank0["val"][key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow  # 30 s on 2 cores: compile + DDP; the eager DDP equivalence stays in the fast suite
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_compiled_model_under_ddp_trains_as_one_eager_process(tmp_path):
    """`compile:` under DDP: the compiled backward's gradients reach DDP's all-reduce like eager ones."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29518", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    for args in (["ddp", "compiled"], ["single"]):
        run = subprocess.run([sys.executable, str(WORKER), str(tmp_path), *args], env=env, capture_output=True,
                             text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"compiled_ddp_rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single_rank0.pt")
    assert torch.equal(rank0["matrix"], single["matrix"])
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
        torch.testing.assert_close(value, single["params"][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow  # 25 s on 2 cores; the receivers' gradients against BP's stay in the fast suite (test_engine)
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_per_point_matmul_receivers_under_ddp_train_as_one_process(tmp_path):
    """Per point with matmul receivers under DDP: the receivers' matmul backward hands DDP ordinary gradients."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29519", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1"}
    for mode in ("ddp", "single"):
        run = subprocess.run([sys.executable, str(WORKER), str(tmp_path), mode, "per_point"], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"per_point_ddp_rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "per_point_single_rank0.pt")
    assert rank0["receiver"] == rank1["receiver"] == single["receiver"] == "matmul"
    assert torch.equal(rank0["matrix"], rank1["matrix"]) and torch.equal(rank0["matrix"], single["matrix"])
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
        torch.testing.assert_close(value, single["params"][name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow  # 30 s on 2 cores; the fast suite checks each DataModule's shares (tests/helpers.py `shards`)
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_test_metrics_under_ddp_are_the_one_process_metrics(tmp_path):
    """Lightning's own evaluation sampler repeats batches to even the ranks' shares (the Criteo sample's test AUROC
    read 0.5147 with 2 processes against 0.5213 in one); the DataModules shard the batches themselves. Here 11 test
    batches: 6 on rank 0, 5 on rank 1, every row scored once, the metrics those of one process."""
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "criteo" / "train_10k.txt").is_file():
        pytest.skip("the shared Criteo sample is not available")
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29521", "PYTHONWARNINGS": "ignore",
           "OMP_NUM_THREADS": "1", "DFA_DATA_DIR": str(SHARED_DATA)}
    for mode in ("single", "ddp"):  # the single run builds the cache the two ranks then read
        run = subprocess.run([sys.executable, str(WORKER.with_name("ddp_eval_worker.py")), str(tmp_path), mode],
                             env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    single = torch.load(tmp_path / "single_rank0.pt")
    rank0, rank1 = (torch.load(tmp_path / f"ddp_rank{r}.pt") for r in (0, 1))
    assert len(single["scored"]) == 11 and (len(rank0["scored"]), len(rank1["scored"])) == (6, 5)
    assert sum(rank0["scored"]) + sum(rank1["scored"]) == sum(single["scored"]) == 1000
    assert rank0["metrics"] == rank1["metrics"] and set(single["metrics"]) >= {"test/auroc", "test/logloss"}
    for key, value in single["metrics"].items():
        assert rank0["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
