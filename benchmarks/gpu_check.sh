#!/usr/bin/env bash
# Everything a GPU session checks, in one command (`make gpu-check`): the CUDA tests, the GPU benchmark (issue #5),
# the profile of one DFA step per model on the GPU (one projection, nothing discarded), the host-bound models under
# torch.compile with CUDA graphs (mode reduce-overhead, as a recipe's `compile:` runs them), what the Lightning loop
# adds per step (its table goes to the log), and the GCN recipes on Cora through Lightning on the GPU. The kernel
# profile (`make kernels`, measured on the H200) is not a stage: a device lease brings back 8 files.
#
# Results go to $OUT (default benchmarks/results): bench_gpu.{json,md}, profile_gpu.{json,md},
# bench_gpu_compiled.{json,md}, cora_gcn_gpu.md and the whole log, gpu_check.log: 8 files. Every stage has its own
# time limit and a failing stage does not stop the next (a short device lease must still bring back what did run);
# the exit status is 0 only when every stage passed.
# The default stage limits add up to 585 s, under a device command's 600 s; each can be set (TESTS_S, BENCH_S, ...).
# The benchmarks write their files after every case, so a stage cut short keeps the cases it finished.
# The Cora stage needs the Planetoid files under $DFA_DATA_DIR/planetoid/Cora/raw and is skipped without them.
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONPATH=src:.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

stage() {  # stage NAME SECONDS COMMAND...: run it under a time limit, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%T), limit ${limit} s): $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc $rc ($(date -u +%T))" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

stage machine 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
$PYTHON -c 'import torch, pytorch_lightning, torch_geometric; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(), pytorch_lightning.__version__, torch_geometric.__version__)'"
stage tests "${TESTS_S:-80}" "$PYTHON" -m pytest -q -m gpu -rs -p no:cacheprovider tests
stage bench "${BENCH_S:-190}" "$PYTHON" -m benchmarks.run --preset gpu --out "$OUT"
stage profile "${PROFILE_S:-40}" "$PYTHON" -m benchmarks.profile_step --preset gpu --out "$OUT"
# compilation dominates this stage (about 10-20 s per variant): the host-bound models first, 0.5 s timed per variant
stage compiled "${COMPILED_S:-130}" "$PYTHON" -m benchmarks.run --preset gpu --compile reduce-overhead \
    --models deepfm nerf lm --min-seconds 0.5 --out "$OUT"
stage loop "${LOOP_S:-60}" "$PYTHON" -m benchmarks.loop_overhead --preset gpu  # table in the log: no extra file
if [ -d "${DFA_DATA_DIR:-/nonexistent}/planetoid/Cora/raw" ]; then
    stage cora "${CORA_S:-55}" "$PYTHON" -m dfa_lightning.sweep --recipes recipes/gcn_bp.yaml recipes/gcn_dfa.yaml \
        recipes/gcn_shallow.yaml --seeds 0 --metric test/acc --out "${TMPDIR:-/tmp}/gpu_runs/cora_gcn_gpu.md" \
        --root "${TMPDIR:-/tmp}/gpu_runs" --reference '{"gcn_bp": 0.801, "gcn_dfa": 0.799, "gcn_shallow": 0.370}' \
        -- --trainer.accelerator gpu --trainer.devices 1
    cp "${TMPDIR:-/tmp}/gpu_runs/cora_gcn_gpu.md" "$OUT/" 2>/dev/null  # the table, with each run's wall time (the JSON
    # stays behind: a device lease brings back at most 8 files)
else
    echo "=== cora: skipped (no \$DFA_DATA_DIR/planetoid/Cora/raw)" | tee -a "$LOG"
fi
echo "=== gpu-check: $([ $status -eq 0 ] && echo 'all stages passed' || echo 'a stage FAILED')" | tee -a "$LOG"
exit $status
