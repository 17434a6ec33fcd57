#!/usr/bin/env bash
# The GPU checks of one short device session (about 9 minutes on one H200), each under its own time limit, written
# to $OUT (default runs/gpu) in 8 files (the most a device call brings back):
#   gpu_timing.json/.md  a Qwen2.5-VL-7B-shaped target and its draft, random weights, bf16 (benchmarks/gpu_timing.py)
#   lossless.json        the embedded target's greedy output on CUDA against transformers' generate, float32 and
#                        bfloat16, sparrow / eagle / ar (benchmarks/gpu_lossless.py)
#   overhead.json        where a generation's time goes on the GPU (benchmarks/gpu_overhead.py), and
#   overhead_profile.txt torch's profiler tables of a first and a second run on a new clip
#   train.log            train-target's step time on CUDA with 12 processes drawing the batches: stage 1a (from
#                        random weights, the 8-head shape) and a stage of the longer mix (from the shipped target)
#   bench.tgz            `sparrow bench` on CUDA with the embedded target and drafts
#   session.log          everything printed
# Run from the repository root with the package importable (PYTHONPATH=src where it is not installed).
set -uo pipefail
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1
step() { echo "== $1 ($(date +%T))"; }

step "machine"
nvidia-smi -L
$PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
torch.cuda.get_device_name())"

step "7B-shaped timing"
timeout 150 $PY benchmarks/gpu_timing.py --repeats 10 --out "$OUT/gpu_timing"

step "losslessness on CUDA"
timeout 150 $PY benchmarks/gpu_lossless.py --device cuda --clips 3 --visual-tokens 512,3072,8192 \
  --max-new-tokens 96 --out "$OUT/lossless"

step "where the time goes"
timeout 150 $PY benchmarks/gpu_overhead.py --device cuda --visual-tokens 3072 --repeats 4 --out "$OUT/overhead"

step "train-target step time on CUDA"
T=$(mktemp -d)
timeout 55 $PY -m sparrow.cli train-target --out "$T/t1a" --steps 3600 --heads 8 --kv-heads 4 --device cuda \
  --workers 12 2>&1 | tr '\r' '\n' | grep -E "it/s|s/it|train-target:|Error|error" | tail -4 | tee -a "$OUT/train.log"
timeout 55 $PY -m sparrow.cli train-target --out "$T/t2dc" --init src/sparrow/assets/target --seed 35 --steps 600 \
  --lr 3e-4 --warmup 30 --grounded-weight 4 --mix longer --aux-weight 0 --device cuda --workers 12 2>&1 \
  | tr '\r' '\n' | grep -E "it/s|s/it|train-target:|Error|error" | tail -4 | tee -a "$OUT/train.log"

step "bench on CUDA"
timeout 180 $PY -m sparrow.cli bench --device cuda --visual-tokens 512,3072,25088 --synthetic 2 --warmup 1 \
  --methods ar,sparrow,eagle --out "$T/bench"
tar -czf "$OUT/bench.tgz" -C "$T" bench
step "done"
