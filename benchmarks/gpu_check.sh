#!/usr/bin/env bash
# Every test and figure that needs a GPU, in one prepared run (about 7-8 minutes on an H100/H200 once
# the machine is up; each step has its own time limit, and a failing step does not stop the others).
#
#   benchmarks/gpu_check.sh [DEST]          results in DEST (default reports/bench/gpu)
#
# Writes 6 files to DEST: gpu_check.log, kernels.json (kernels vs reference + end-to-end), memory_*.json
# (python -m m2f.bench; AMP as the trainer on CUDA), speed_*.json (fp32 and bf16 autocast) and README.md.
# Needs torch with CUDA, triton, timm, scipy, transformers and pytest; fvcore is optional (FLOPs do
# not depend on the device and are counted on CPU).  Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-reports/bench/gpu}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec > >(tee "$DEST/gpu_check.log") 2>&1
fail=0
step() {
    local limit=$1; shift
    echo "=== $(date -u +%H:%M:%S) $* (limit ${limit}s)"
    timeout "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then echo "=== FAILED (rc $rc): $*"; fail=1; fi
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
# 1. correctness on the GPU: Triton kernels vs reference (fp32/bf16/fp16, forward + gradients, odd shapes),
#    sdpa masked attention under each fused backend, activation checkpointing
step 180 $PY -m pytest -q -rs -p no:cacheprovider tests/test_kernels.py tests/test_checkpointing.py
# 2. kernels vs reference at Mask2Former's shapes (batch 2, 1024 px, strides 8-32) + the R50 pixel decoder
#    and training step with each backend
step 150 $PY -m m2f.bench kernels --end-to-end --iters 20 --out "$DEST/kernels.json"
# 3. training memory per image, the four Table 5 variants, 1024 px (paper: 18 GB full-mask vs 6 GB point)
step 120 $PY -m m2f.bench memory --device cuda --sizes 1024 --out "$DEST" --set pixel_decoder.deform_attn_backend=auto
# 4. m2f vs HF transformers, same weights: inference (batch 1, post-processing included) and training step
step 150 $PY -m m2f.bench speed --device cuda --preset r50_coco_panoptic --size 1024 --iters 10 --no-flops \
    --out "$DEST" --set pixel_decoder.deform_attn_backend=auto
step 120 $PY -m m2f.bench speed --device cuda --preset r50_coco_panoptic --size 1024 --iters 10 --no-flops --amp \
    --out "$DEST" --set pixel_decoder.deform_attn_backend=auto
echo "=== $(date -u +%H:%M:%S) done, failures: $fail"
exit $fail
