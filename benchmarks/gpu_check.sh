#!/usr/bin/env bash
# The GPU measurements of the fused Triton kernels in one run of under 9 minutes: the kernels'
# tests on CUDA (their first-use check, tuning and fallback included), then the op benchmark
# (float32 and bfloat16; each row with the fused path's first call, which compiles and tunes, and
# its share of the DRAM bandwidth floor) and the r50 training step, each printing its table.
# Installs nothing: the machine's own torch and Triton run this checkout's sources (PYTHONPATH=src).
#
#   benchmarks/gpu_check.sh           on a GPU machine
#   benchmarks/gpu_check.sh --tiny    on the CPU, under Triton's interpreter at tiny sizes: checks
#                                     this script end to end without a GPU (the timings mean nothing)
#
# PYTHON chooses the interpreter (default python3). A step that fails or runs out of its time is
# reported and the next one runs; output is unbuffered, so a stopped step keeps the rows it printed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ "${1:-}" == "--tiny" ]]; then
    export TRITON_INTERPRET=1
    device=cpu
    op_options=(--tiny --repeats 1)
    step_options=(--tiny --repeats 1)
    limits=(400 500 400)  # seconds for the tests, the op benchmark, the training step
else
    device=cuda
    op_options=(--repeats 10)
    step_options=(--repeats 5)
    limits=(150 240 120)  # 8.5 minutes in all
fi

step() {  # step SECONDS TITLE COMMAND...: run COMMAND with a time limit, say how it ended
    local seconds=$1 title=$2 start=$SECONDS
    shift 2
    echo "== $title"
    timeout "$seconds" "$@"
    local status=$?
    if [[ $status -eq 124 ]]; then
        echo "== $title: stopped after its $seconds s"
    else
        echo "== $title: exit status $status, $((SECONDS - start)) s"
    fi
}

"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '|',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
step "${limits[0]}" "tests" "$PYTHON" -m pytest -q -p no:cacheprovider tests/ops_triton_checks.py tests/test_ops.py
step "${limits[1]}" "op benchmark" "$PYTHON" benchmarks/ms_deform_attn.py --device "$device" --dtype float32 --dtype bfloat16 "${op_options[@]}"
step "${limits[2]}" "training step" "$PYTHON" benchmarks/train_step.py --device "$device" "${step_options[@]}"
