#!/usr/bin/env bash
# Everything a GPU session checks, in one command (`make gpu-check`).
#
# First, alone on the machine (they time steps, so nothing else may run beside them): the GPU benchmark (issue #5),
# the profile of one DFA step per model on the GPU (one projection, nothing discarded), the host-bound models under
# torch.compile with CUDA graphs (mode reduce-overhead, as a recipe's `compile:` runs them) and what the Lightning
# loop adds per step. Then, all at once (they time nothing): the CUDA tests, the GCN recipes on Cora and the NeRF
# sample runs (BP / DFA / shallow on the 100-pixel lego for 1,000 steps, BP / DFA for 2,000 steps, BP / DFA on LLFF
# fern), one process per run, each sweep's table written from its runs once they are done.
#
# Results go to $OUT (default benchmarks/results): bench_gpu, profile_gpu, bench_gpu_compiled (DeepFM, NeRF),
# loop_overhead_gpu, bench_gpu_compiled_lm (the LM compiled, when time is left for it), cora_gcn_gpu,
# nerf_lego_100px_gpu, nerf_lego_100px_2000_gpu, nerf_llff_fern_gpu (.md and .json each) and the whole log,
# gpu_check.log. Each run's folder (logs, checkpoints, result.json) stays under $RUNS.
# Every stage has its own time limit and a failing stage does not stop the next; the exit status is 0 only when every
# stage passed. DEADLINE (seconds from the start; 0 = none) cuts every limit so that the whole script ends by then:
# a device command has 600 s. The benchmarks write their files after every case, so a stage cut short keeps the cases
# it finished. A stage whose data is missing under $DFA_DATA_DIR is skipped; SKIP="name ..." skips stages by name.
# On a CPU, a smoke run of every stage: PRESET=tiny ACCEL=cpu RUN_ARGS="--trainer.max_steps 2" NERF_ARGS=
# "--trainer.val_check_interval 1 --data.init_args.val_views 1 --data.init_args.test_views 1" (minutes); the tests run
# the script with a stand-in python (tests/test_benchmarks.py).
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-python3}
PRESET=${PRESET:-gpu}        # the benchmarks' preset
ACCEL=${ACCEL:-gpu}          # the Lightning runs' accelerator
RUN_ARGS=${RUN_ARGS:-}       # appended to every Lightning run's arguments (word-split)
NERF_ARGS=${NERF_ARGS:-}     # appended to the NeRF runs' arguments, before RUN_ARGS
RUNS=${RUNS:-${TMPDIR:-/tmp}/gpu_runs}
DEADLINE=${DEADLINE:-0}
SKIP=" ${SKIP:-} "
DATA=${DFA_DATA_DIR:-/nonexistent}
mkdir -p "$OUT" "$RUNS"
LOG=$OUT/gpu_check.log
: >"$LOG"
export PYTHONPATH=src:.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
SECONDS=0

capped() {  # capped SECONDS [RESERVE]: the limit, cut to what is left before DEADLINE - RESERVE (at least 1 s)
    local limit=$1 left=$((DEADLINE - SECONDS - ${2:-0}))
    if [ "$DEADLINE" -gt 0 ] && [ "$left" -lt "$limit" ]; then limit=$left; fi
    [ "$limit" -ge 1 ] || limit=1
    echo "$limit"
}

wanted() {  # wanted NAME: false (and says so) when SKIP names the stage
    case "$SKIP" in *" $1 "*) echo "=== $1: skipped (SKIP)" | tee -a "$LOG"; return 1 ;; esac
}

stage() {  # stage NAME SECONDS COMMAND...: run it alone under a time limit, log it, remember a failure
    local name=$1 limit
    limit=$(capped "$2")
    shift 2
    wanted "$name" || return 0
    echo "=== $name ($(date -u +%T), limit ${limit} s): $*" | tee -a "$LOG"
    timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc $rc ($(date -u +%T))" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || status=1
}

stage_if_time() {  # stage_if_time NAME SECONDS RESERVE COMMAND...: stage, its limit cut to leave RESERVE s before
    # DEADLINE; skipped (and said so) when that leaves it under MIN_STAGE_S
    local name=$1 limit
    limit=$(capped "$2" "$3")
    if [ "$DEADLINE" -gt 0 ] && [ "$limit" -lt "${MIN_STAGE_S:-60}" ]; then
        wanted "$name" && echo "=== $name: skipped (${limit} s left before the untimed stages' $3 s)" | tee -a "$LOG"
        return 0
    fi
    shift 3
    stage "$name" "$limit" "$@"
}

pids=()
names=()
reserve=${TABLE_RESERVE:-45}  # seconds kept after the runs for the tables written from them (made at once)
trap 'for p in "${pids[@]}"; do pkill -TERM -P "$p"; done' EXIT  # stopped early: no run left holding the GPU
beside() {  # beside NAME SECONDS COMMAND...: start it in the background, logging to $RUNS/NAME.log
    local name=$1 limit
    limit=$(capped "$2" "$reserve")
    shift 2
    echo "=== $name: started ($(date -u +%T), limit ${limit} s): $*" | tee -a "$LOG"
    (
        echo "=== $name ($(date -u +%T), limit ${limit} s): $*"
        OMP_NUM_THREADS=2 timeout --signal=INT --kill-after=10 "$limit" "$@"
        rc=$?
        echo "=== $name: rc $rc ($(date -u +%T))"
        exit "$rc"
    ) >"$RUNS/$name.log" 2>&1 &
    pids+=($!)
    names+=("$name")
}

wait_beside() {  # wait for every background stage; append its log, in the order they were started
    local i
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || status=1
        tail -n 40 "$RUNS/${names[$i]}.log" | tee -a "$LOG"
    done
    pids=()
    names=()
}

SWEEPS=()  # "name|metric|reference|recipes|args" of every sweep started by sweep_each, tabled by table_each
sweep_each() {  # sweep_each NAME SECONDS METRIC REFERENCE "RECIPES" ARGS...: one process per recipe, started beside
    local name=$1 limit=$2 metric=$3 reference=$4 recipes=$5 recipe  # the others; REFERENCE: sweep's --reference
    shift 5
    wanted "$name" || return 0
    rm -rf "${RUNS:?}/$name"  # a sweep reuses a finished run's result: an earlier check's must not pass for this one
    for recipe in $recipes; do
        # shellcheck disable=SC2086  # RUN_ARGS is word-split on purpose
        beside "$name.$(basename "$recipe" .yaml)" "$limit" "$PYTHON" -m dfa_lightning.sweep --recipes "$recipe" \
            --seeds 0 --metric "$metric" --out "$RUNS/$name/$(basename "$recipe" .yaml).md" --root "$RUNS/$name" \
            -- "$@" --trainer.accelerator "$ACCEL" --trainer.devices 1 $RUN_ARGS
    done
    SWEEPS+=("$name|$metric|$reference|$recipes|$*")
}

table_each() {  # one table per sweep from its finished runs (a sweep reuses a run's result.json: no training here),
    # all at once
    reserve=0
    local entry name metric reference recipes args recipe done
    for entry in "${SWEEPS[@]}"; do
        IFS='|' read -r name metric reference recipes args <<<"$entry"
        done=""
        for recipe in $recipes; do
            [ -f "$RUNS/$name/$(basename "$recipe" .yaml)/seed0/result.json" ] && done="$done $recipe"
        done
        if [ -z "$done" ]; then echo "=== $name: no run finished, no table" | tee -a "$LOG"; status=1; continue; fi
        [ "$(echo $done)" = "$(echo $recipes)" ] || reference='{}'  # the sweep refuses a reference to a missing run
        # shellcheck disable=SC2086
        beside "$name" 60 "$PYTHON" -m dfa_lightning.sweep --recipes $done --seeds 0 --metric "$metric" \
            --out "$OUT/$name.md" --root "$RUNS/$name" --reference "$reference" \
            -- $args --trainer.accelerator "$ACCEL" --trainer.devices 1 $RUN_ARGS
    done
    wait_beside
}

# --- alone: the timed stages ---------------------------------------------------------------------------------------
stage machine 30 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv; \
$PYTHON -c 'import torch, pytorch_lightning, torch_geometric; print(torch.__version__, torch.version.cuda, \
torch.cuda.is_available() and torch.cuda.get_device_name(), pytorch_lightning.__version__, torch_geometric.__version__)'"
stage bench "${BENCH_S:-180}" "$PYTHON" -m benchmarks.run --preset "$PRESET" --out "$OUT"
stage profile "${PROFILE_S:-40}" "$PYTHON" -m benchmarks.profile_step --preset "$PRESET" --out "$OUT"
# compilation dominates this stage (about 10-20 s per variant): the host-bound models first, 0.5 s timed per variant
stage compiled "${COMPILED_S:-130}" "$PYTHON" -m benchmarks.run --preset "$PRESET" --compile reduce-overhead \
    --models deepfm nerf --min-seconds 0.5 --out "$OUT"
stage loop "${LOOP_S:-60}" "$PYTHON" -m benchmarks.loop_overhead --preset "$PRESET" --out "$OUT"
# the LM's six compilations outlasted the compiled stage's limit in the second GPU session: a stage of its own, last
# of the timed ones, run only when it can have MIN_STAGE_S while BESIDE_RESERVE s stay for the untimed stages
stage_if_time compiled_lm "${COMPILED_LM_S:-150}" "${BESIDE_RESERVE:-150}" "$PYTHON" -m benchmarks.run \
    --preset "$PRESET" --compile reduce-overhead --models lm --min-seconds 0.5 --name "bench_${PRESET}_compiled_lm" \
    --out "$OUT"

# --- beside each other: nothing timed ------------------------------------------------------------------------------
if wanted tests; then beside tests "${TESTS_S:-80}" "$PYTHON" -m pytest -q -m gpu -rs -p no:cacheprovider tests; fi
if [ -d "$DATA/planetoid/Cora/raw" ]; then
    sweep_each cora_gcn_gpu "${CORA_S:-90}" test/acc '{"gcn_bp": 0.801, "gcn_dfa": 0.799, "gcn_shallow": 0.370}' \
        "recipes/gcn_bp.yaml recipes/gcn_dfa.yaml recipes/gcn_shallow.yaml"
else
    echo "=== cora_gcn_gpu: skipped (no \$DFA_DATA_DIR/planetoid/Cora/raw)" | tee -a "$LOG"
fi
NERF_RECIPES="recipes/nerf_bp.yaml recipes/nerf_dfa.yaml recipes/nerf_shallow.yaml"
if [ -d "$DATA/nerf/nerf_synthetic_100px/lego" ]; then
    sweep_each nerf_lego_100px_gpu "${NERF_S:-300}" test/psnr '{}' "$NERF_RECIPES" \
        --config recipes/sample/nerf_lego_100px.yaml $NERF_ARGS
    # the 2,000-step pair of the README: the learning rate still decayed x0.1 over the run
    sweep_each nerf_lego_100px_2000_gpu "${NERF_S:-300}" test/psnr '{}' "recipes/nerf_bp.yaml recipes/nerf_dfa.yaml" \
        --config recipes/sample/nerf_lego_100px.yaml --trainer.max_steps 2000 \
        --model.lr_scheduler.init_args.gamma 0.998849 $NERF_ARGS
else
    echo "=== nerf_lego: skipped (no \$DFA_DATA_DIR/nerf/nerf_synthetic_100px/lego)" | tee -a "$LOG"
fi
if [ -d "$DATA/nerf/nerf_llff_data/fern" ]; then
    sweep_each nerf_llff_fern_gpu "${NERF_S:-300}" test/psnr '{}' "recipes/nerf_bp.yaml recipes/nerf_dfa.yaml" \
        --config recipes/sample/nerf_llff_fern.yaml --config recipes/sample/nerf_llff_fern_cpu.yaml $NERF_ARGS
else
    echo "=== nerf_fern: skipped (no \$DFA_DATA_DIR/nerf/nerf_llff_data/fern)" | tee -a "$LOG"
fi
wait_beside
if [ ${#SWEEPS[@]} -gt 0 ]; then table_each; fi
echo "=== gpu-check: $([ $status -eq 0 ] && echo 'all stages passed' || echo 'a stage FAILED') (${SECONDS} s)" \
    | tee -a "$LOG"
exit $status
