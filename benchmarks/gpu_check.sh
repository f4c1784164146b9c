#!/usr/bin/env bash
# The GPU checks of a session that is lent a device machine, in one call (about 7 minutes):
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)
#
# The device's image has torch, Triton and the other dependencies; nothing is installed.
# Each step has its own time limit, so that a hang in one still returns the others' files.
# Writes into $OUT (or ./gpu_out): env.txt, tests.log, train.log, bench.log, bench_cuda.json,
# stream.log, train_stream.json.
# Record the numbers in benchmarks/RESULTS.md with the date and the device.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() {  # step NAME LIMIT_S LOG COMMAND...: run with a time limit, log its status
    local name=$1 limit=$2 log=$3; shift 3
    local start=$SECONDS
    timeout -k 10 "$limit" "$@" >"$OUT/$log" 2>&1
    echo "$name: exit $? after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/env.txt"
}

{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1

# compiled Triton kernels against their PyTorch references, and the layer and model on the GPU;
# every test runs (no -x: each result is worth a device minute), none for more than 60 s
step tests 150 tests.log $PY -m pytest -q -rf -n 8 --timeout 60 -p no:cacheprovider tests/kernels tests/memory tests/model
# a short training run on the GPU through the CLI (loss must fall; tokens/s in the log)
step train 60 train.log $PY -m memlayers.cli train tiny train.device=cuda train.steps=60 train.log_every=10 \
    train.eval_qa=200 train.out_dir="$OUT/run" --overwrite
rm -rf "$OUT/run"
# the kernel, step, memory, bandwidth, search and LM benchmarks, ours vs torch side by side
# (inference is a CPU benchmark: generation in fresh processes)
step bench 200 bench.log $PY -m memlayers.cli bench bag step memory bandwidth search lm --device cuda --repeat 5 \
    --out "$OUT/bench_cuda.json"
# issue 14: the paper's 134M memory model (256² pool) trained in bf16 from token shards that
# `memlayers tokenize` writes, tokens/s, MFU and peak memory beside `memlayers plan`'s estimate
step stream 120 stream.log $PY benchmarks/gpu_train_stream.py --device cuda --out "$OUT/train_stream.json"
cat "$OUT/env.txt"
