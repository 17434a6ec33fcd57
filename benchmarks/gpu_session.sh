#!/usr/bin/env bash
# The GPU checks of one short device session (about 9 minutes on one H200), each under its own time limit, written
# to $OUT (default runs/gpu) in 8 files (the most a device call brings back; the session of 2026-12-04 timed
# train-target on CUDA where the second run of gpu_overhead.py is now: benchmarks/results/gpu_h200/train.log):
#   gpu_timing.json/.md  a Qwen2.5-VL-7B-shaped target and its draft, random weights, bf16 (benchmarks/gpu_timing.py),
#                        the draft also with its tree levels compiled as CUDA graphs (SparrowDraft.compile_tree)
#   lossless.json        the embedded target's greedy output on CUDA against transformers' generate, float32 and
#                        bfloat16, sparrow / eagle / ar (benchmarks/gpu_lossless.py)
#   overhead.json        where a generation's time goes on the GPU (benchmarks/gpu_overhead.py), and
#   overhead_profile.txt torch's profiler tables of a first and a second run on a new clip
#   overhead_warm.json   the same after `sparrow.warm_up` (what `sparrow generate` does on CUDA): repeat 0 against
#                        the later repeats is the first run's cost that is left
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
timeout 200 $PY benchmarks/gpu_timing.py --repeats 10 --compile-draft reduce-overhead --out "$OUT/gpu_timing"

step "losslessness on CUDA"
timeout 150 $PY benchmarks/gpu_lossless.py --device cuda --clips 3 --visual-tokens 512,3072,8192 \
  --max-new-tokens 96 --out "$OUT/lossless"

step "where the time goes"
timeout 150 $PY benchmarks/gpu_overhead.py --device cuda --visual-tokens 3072 --repeats 4 --out "$OUT/overhead"

step "where the time goes, after sparrow.warm_up"
timeout 150 $PY benchmarks/gpu_overhead.py --device cuda --visual-tokens 3072 --repeats 4 --warm-up \
  --no-profile --out "$OUT/overhead_warm"

T=$(mktemp -d)
step "bench on CUDA"
timeout 180 $PY -m sparrow.cli bench --device cuda --visual-tokens 512,3072,25088 --synthetic 2 --warmup 1 \
  --methods ar,sparrow,eagle --out "$T/bench"
tar -czf "$OUT/bench.tgz" -C "$T" bench
step "done"
