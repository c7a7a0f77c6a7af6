#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, in two device calls (≤ 10 min each):
#   run(command="bash scripts/gpu_session.sh 1", timeout_s=600)   # GPU tests, attention, decode
#   run(command="bash scripts/gpu_session.sh 2", timeout_s=600)   # prefill, host overhead, start-up
# Then, here: python scripts/plot_mbu.py <files_at>/decode_tp4.json <files_at>/decode_tp8.json --out docs/mbu.png
# The GPU machine has jax (CUDA plugin), flax, orbax, grpcio, safetensors, transformers; we add
# the few small packages it may lack and install qwenjax itself without touching jax.
# Results land in $OUT (or ./gpu-out): logs, JSON, and a summary to paste into BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
unset XLA_FLAGS
# Set but empty: tests/conftest.py keeps it (it only defaults JAX_PLATFORMS to cpu) and jax picks the GPU.
export JAX_PLATFORMS=

step() {  # name, timeout seconds, command...
  local name="$1" limit="$2"; shift 2
  echo "== $name ($(date +%T))" | tee -a "$OUT/summary.txt"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   exit $? after $SECONDS s total" | tee -a "$OUT/summary.txt"
  tail -n 25 "$OUT/$name.log" >> "$OUT/summary.txt"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || rocm-smi; } > "$OUT/device.txt" 2>&1
$PY -m pip install --quiet --no-deps -e . >"$OUT/install.log" 2>&1
$PY -m pip install --quiet tokenizers gguf tqdm pyyaml jinja2 ml_dtypes pytest prometheus-client \
    grpcio-health-checking grpcio-reflection >>"$OUT/install.log" 2>&1
$PY -c "import jax; print(jax.__version__, jax.devices())" > "$OUT/jax.txt" 2>&1

PART="${1:-1}"
if [ "$PART" = 1 ]; then
# 1. Correctness on the GPU first: the compiled Triton kernel and the model's kernel path.
step gpu_tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
# 2. Kernel speed vs jax's bundled paged attention and the XLA reference (DESIGN.md cases).
step bench_attention 150 $PY scripts/bench_attention.py --json "$OUT/attention.json"
# 3. Decode step of one device's shard: 72B at TP4 (36 GB of weights) and TP8.
step bench_decode_tp4 150 $PY scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 4 \
    --batch 1,8,32,64 --ctx 2048 --json "$OUT/decode_tp4.json"
step bench_decode_tp8 120 $PY scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 8 \
    --batch 1,32 --ctx 2048 --json "$OUT/decode_tp8.json"
else
# 4. Prefill (TTFT, MFU) of the 72B TP4 shard, 2k-token chunks.
step bench_prefill 240 $PY scripts/bench_prefill.py --preset qwen2.5-72b --shard-of-tp 4 \
    --prompt 512,2048,8192,32768 --chunk 2048 --json "$OUT/prefill_tp4.json"
# 5. Host overhead of the engine loop at batch 64 (7B, random weights, one GPU).
step bench_host 180 $PY scripts/bench_host.py --model qwen2.5-7b --batch 8,64 --json "$OUT/host.json"
# 6. Cold and warm start of the 7B engine (persistent compile cache).
step bench_startup 170 $PY scripts/bench_engine.py --only startup --model qwen2.5-7b \
    --max-model-len 4096 --json "$OUT/startup.json"
fi
echo "done in $SECONDS s; results in $OUT" | tee -a "$OUT/summary.txt"
