#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run for a session lent one (the device tool).
# Run from the repository root, on a machine whose python3 holds a CUDA PyTorch and pytest
# (the lent machine's image does; nothing is installed). The reports (*_cuda.md) and one log
# go to $OUT (the device tool's; it returns at most 8 files), else ./gpu_results; copy the
# reports under benchmarks/results/ and commit them. Every step runs; the exit status is 1 if
# any failed (the log's last line names them), or at once if DEVICE=cuda finds no CUDA device.
# Peers for fisher_speed (BackPACK, nngeometry) are used where PYTHONPATH already reaches them.
#   bash scripts/gpu_checks.sh                  # everything, most wanted first
#   bash scripts/gpu_checks.sh quick            # the tests and the short benchmarks only
#   bash scripts/gpu_checks.sh tests penalty_speed   # the steps named (names as below)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
dev=${DEVICE:-cuda}  # (DEVICE=cpu: a dry run of the script itself on a machine without one)
log="$out/log"
wanted=" $* "  # (the steps named; none: all; quick: all but fisher_speed*)
wants() {
    case "$wanted" in
        "  ") true ;;
        " quick ") [[ $1 != fisher_speed* ]] ;;
        *) [[ $1 == gpu || $wanted == *" $1 "* ]] ;;
    esac
}
failed=()  # (the steps that exited non-zero: the script's own exit is 1 if any did)
step() {  # step NAME COMMAND...: if wanted, run it, its output to the screen and to the log
    local name=$1 start=$SECONDS status
    shift
    wants "$name" || return 0
    echo "== $name: $*" | tee -a "$log"
    "$@" 2>&1 | tee -a "$log"
    status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s" | tee -a "$log"
    [[ $status == 0 ]] || failed+=("$name")
}
: >"$log"
if [[ $dev == cuda* ]] && ! "$py" -c "import torch; assert torch.cuda.is_available()" 2>>"$log"; then
    # (without one, tests/test_cuda.py would skip and "pass", and the benchmarks fail)
    echo "== no CUDA device for $py (torch.cuda.is_available() is False); DEVICE=cpu for a dry run" \
        | tee -a "$log"
    exit 1
fi
step gpu nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step tests "$py" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_compiled.py
step host_overhead "$py" -m benchmarks.host_overhead --device "$dev" --repeats 20 \
    --out "$out/host_overhead_cuda.md"
step host_overhead_cpu_ways "$py" -m benchmarks.host_overhead --device "$dev" --repeats 20 \
    --ways cpu --out "$out/host_overhead_cpu_ways_cuda.md"
step penalty_speed "$py" -m benchmarks.penalty_speed --device "$dev" --threads 1 \
    --out "$out/penalty_speed_cuda.md"
step memory_budget "$py" -m benchmarks.memory_budget --device "$dev" \
    --budgets-mib 256 1024 4096 16384 --out "$out/memory_budget_cuda.md"
step memory_budget_looped "$py" -m benchmarks.memory_budget --device "$dev" --pull-back looped \
    --budgets-mib 256 1024 4096 16384 --out "$out/memory_budget_looped_cuda.md"
step fisher_speed "$py" -m benchmarks.fisher_speed --device "$dev" \
    --out "$out/fisher_speed_cuda.md"
step fisher_speed_extra "$py" -m benchmarks.fisher_speed --device "$dev" --repeats 3 \
    --models lstm,lstm_proj,lstm_cell,shared_mlp,transformer_shared,upsampling,conv3d \
    --out "$out/fisher_speed_extra_cuda.md"
if ((${#failed[@]})); then
    echo "== failed: ${failed[*]}" | tee -a "$log"
    exit 1
fi
