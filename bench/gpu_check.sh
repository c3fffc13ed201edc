#!/usr/bin/env bash
# Every GPU target of issue #14 in one run (under 12 minutes on one H200), figures printed as they come:
#   1. UNet fwd+bwd, full-size SD1.5, batch 1 fp16 (512 px): ours eager, ours compiled, diffusers eager
#   2. the same at batch 8 bf16: time, memory, TFLOP/s (target: >= 45% of the bf16 matmul rate)
#   3. channels-last on vs off (eager, batch 8 bf16): is "auto = on for CUDA" faster?
#   4. operators per step, ours vs diffusers (CPU profiler; structural, no GPU needed)
#   5. textual inversion SD1.5 512 px and SDXL 1024 px, bf16, ours compiled vs the diffusers recipe
#   6. CUDA graphs (compile cuda-graphs): UNet fwd+bwd at batch 1 fp16, ours eager vs ours with CUDA
#      graphs vs diffusers; every run prints its first step's loss, which must agree (same weights and
#      inputs), then the CUDA-graph correctness test of tests/test_fast_path.py (loss and gradients = eager)
#   7. (issue 11, not in the default STEPS) LoRA training, full-size SDXL at 1024 px, rank 16, with
#      gradient checkpointing, text-encoder outputs cached: ours vs diffusers + peft (peft must be
#      importable: carry it as a wheel like diffusers), and ours' peak memory (target: at most 8 GB)
# Each command has its own time limit, so one slow compile cannot take the rest with it.
#
#   bash bench/gpu_check.sh              # on a machine with a CUDA GPU
#   bash bench/gpu_check.sh --cpu-smoke  # tiny shapes on the CPU: checks that every command runs
#   STEPS="1 6" bash bench/gpu_check.sh  # only the numbered steps (when device time is short)
#   STEPS="7" bash bench/gpu_check.sh    # issue 11's LoRA memory and speed on SDXL
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/sdwt-inductor-cache}

if [ "${1:-}" = "--cpu-smoke" ]; then
  DEV=(--device cpu)
  UNET=(--width 32 --latent 8 --batch 1 --iters 1 --warmup 1)
  UNET8=("${UNET[@]}")
  HALF=fp32; BF=fp32
  COMPILE=(--compile --backend aot_eager)  # CPU code generation takes minutes on a small machine
  TI=(--tiny --steps 1 --warmup 1 --images 1 --threads 1)
  TI_COMPILE=()  # inductor on the CPU is too slow for a smoke test; the GPU run uses --compile
  LORA=(--tiny --arch sdxl --steps 1 --warmup 1 --threads 1)
  L=(600 600 600 600 600 600 600 600 600)
else
  DEV=(--device cuda)
  UNET=(--full --latent 64 --batch 1 --iters 6 --warmup 3)
  UNET8=(--full --latent 64 --batch 8 --iters 6 --warmup 3)
  HALF=fp16; BF=bf16
  COMPILE=(--compile)
  TI=(--full --steps 6 --warmup 3)
  TI_COMPILE=(--compile)
  LORA=(--full --arch sdxl --steps 5 --warmup 2)
  L=(100 100 45 30 90 105 110 90 300)  # seconds per command: 670 for steps 1-6, under 12 minutes with the checks above
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
  # The bf16 matmul rate of this GPU, for the TFLOP/s ratio (8192^3, 20 runs).
  "$PY" - <<'PYEOF'
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
for _ in range(3): a @ b
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(20): a @ b
torch.cuda.synchronize(); dt = (time.perf_counter() - t) / 20
print(f"bf16 matmul rate: {2 * 8192**3 / dt / 1e12:.1f} TFLOP/s (ours at batch 8 must reach 45% of this)")
PYEOF
fi

STEPS=${STEPS:-1 2 3 4 5 6}
run() {  # run STEP LIMIT COMMAND...: print the command, run it with a time limit, say so if it failed
  local step=$1 limit=$2; shift 2
  case " $STEPS " in *" $step "*) ;; *) return 0 ;; esac
  echo; echo "### $*"
  timeout "$limit" "$@" || echo "### FAILED or timed out (exit $?): $*"
}

run 1 "${L[0]}" "$PY" bench/engine.py "${DEV[@]}" --dtype "$HALF" "${UNET[@]}" "${COMPILE[@]}"
run 2 "${L[1]}" "$PY" bench/engine.py "${DEV[@]}" --dtype "$BF" "${UNET8[@]}" "${COMPILE[@]}"
run 3 "${L[2]}" "$PY" bench/engine.py "${DEV[@]}" --dtype "$BF" "${UNET8[@]}" --channels-last off
run 4 "${L[3]}" "$PY" bench/engine.py --count-ops --width 32 --latent 8 --batch 1
run 5 "${L[4]}" "$PY" bench/train_embedding.py "${DEV[@]}" --arch sd1 "${TI[@]}" "${TI_COMPILE[@]}"
run 5 "${L[5]}" "$PY" bench/train_embedding.py "${DEV[@]}" --arch sdxl "${TI[@]}" "${TI_COMPILE[@]}"
run 6 "${L[6]}" "$PY" bench/engine.py "${DEV[@]}" --dtype "$HALF" "${UNET[@]}" --cuda-graphs
if [ "${1:-}" = "--cpu-smoke" ]; then  # on the CPU: the option's fallback (eager, with the message)
  run 6 "${L[7]}" "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_path.py -k "cuda_graph"
else
  run 6 "${L[7]}" "$PY" -m pytest -q -p no:cacheprovider tests/test_fast_path.py -k "cuda_graph and on_cuda"
fi
run 7 "${L[8]}" "$PY" bench/train_lora.py "${DEV[@]}" "${LORA[@]}" --gradient-checkpointing --cache-text-outputs
echo; echo "### gpu_check done"
