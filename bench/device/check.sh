#!/usr/bin/env bash
# The GPU checks of issue 21 (item 6) in one call of a lent GPU machine. Not yet run on one: its
# steps' timeouts add up to 8.5 minutes (the last one's stream is timed for SECONDS_STREAM, 90 s).
#
# A session is lent 15 minutes of device time, the machine's start included, so this is one
# prepared command with room to run it twice. Here, first:
#     .venv/bin/python bench/device/kit.py          # the wheels the machine's image lacks -> .whl/
# then the device tool's run with carry [".whl"], timeout_s 540, and the command
#     bash bench/device/check.sh
# What it writes under $OUT comes back: paste the figures into bench/RESULTS.md, with the device.
#
# 1. the compiled Triton kernels against float64 references (tests/test_kernels.py, CUDA tests);
# 2. bench/sae_kernels.py's GPU section (Triton vs torch vs dense decode at paper width; and
#    ReLU-like codes through their non-zeros vs the dense matmul: whether ReLU and Gated should
#    decode sparsely on a GPU too, ActiveDecodeMixin.sparse_on_cuda in saelib/sae/sparse.py);
# 3. the streaming trainer on CUDA at the tiny size (the whole path, seconds);
# 4. bench/gpu_scale.py: Gemma-2-2B's shape with random weights, 30 SAEs at width 16,384, the
#    plan's rate measured (a profiler table over 4 steps, then a timed stream of ~90 s).
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
SECONDS_STREAM=${SECONDS_STREAM:-90}
cd "$(dirname "$0")/../.."
step() { echo; echo "== $* ($(date +%T))"; }

step "install the kit"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 \
  WANDB_MODE=disabled
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  | tee "$OUT/nvidia-smi.txt"

step "preflight: imports"
python3 - <<'EOF' || exit 1
import torch, triton, transformers, transformer_lens, sae_lens
import saelib.stages.streaming, saelib.plan, saelib.kernels
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(),
      "| triton", triton.__version__, "| transformers", transformers.__version__,
      "| sae-lens", sae_lens.__version__)
EOF

step "1. compiled Triton kernels on CUDA"
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py -k cuda 2>&1 \
  | tee "$OUT/test_kernels_cuda.txt" | tail -15

step "2. bench/sae_kernels.py"
timeout 120 python3 bench/sae_kernels.py --repeats 5 2>&1 | tee "$OUT/sae_kernels.txt"

step "3. the streaming trainer on CUDA, tiny size"
timeout 60 python3 bench/gpu_scale.py --tiny --device cuda --seconds 5 --warmup-steps 2 \
  --out "$OUT/gpu_scale_tiny.json" 2>&1 | grep -v Deprecat | tail -8

step "4. bench/gpu_scale.py (Gemma-2-2B shape, 30 SAEs, width 16,384)"
timeout 240 python3 bench/gpu_scale.py --seconds "$SECONDS_STREAM" --torch-profile 4 \
  --out "$OUT/gpu_scale.json" 2>&1 | grep -v Deprecat | tee "$OUT/gpu_scale.txt"
step "done"
