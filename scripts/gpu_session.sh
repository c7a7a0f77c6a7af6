#!/usr/bin/env bash
# Everything a session with a lent GPU should measure, sized for the device budget: 15 minutes of
# device time per task, machine start included (a start takes a minute or two), one call ≤ 10 min,
# and no machine starts with under 4 minutes left. So: two calls of under 5 minutes each, back to
# back (the machine stays warm 30 s after a call), the issue's targets first:
#   run(command="bash scripts/gpu_session.sh 1", timeout_s=320)   # GPU tests, decode TP4 (profiled), TP8
#   run(command="bash scripts/gpu_session.sh 2", timeout_s=320)   # prefill, host overhead, start-up, sampler
#   run(command="bash scripts/gpu_session.sh 3", timeout_s=320)   # fp8/int4 decode, attention kernels, if time is left
# then give_back. Each call brings back two files: summary.txt (every step's exit and last lines)
# and gpu_partN.tgz (logs, JSON, the decode profile); the device tool returns at most 8 files.
# Every step packs what it wrote, so a call cut short still brings back what finished.
# Then, here: tar xzf gpu_part1.tgz && python scripts/plot_mbu.py decode_tp4.json decode_tp8.json --out docs/mbu.png
#
# The GPU machine can reach no package index: nothing is installed. It already has jax (CUDA
# plugin), flax, orbax, grpcio, safetensors, transformers, tokenizers, pyyaml, tqdm,
# prometheus-client and pytest; qwenjax runs from this checkout through PYTHONPATH.
#
#   bash scripts/gpu_session.sh 1 --smoke    # here, on CPU: every step with tiny shapes
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-1}"
SMOKE="${2:-}"
OUT="${OUT:-$PWD/gpu-out}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_NO_INDEX=1
if [ -z "$SMOKE" ]; then
  unset XLA_FLAGS
  # Set but empty: tests/conftest.py keeps it (it only defaults JAX_PLATFORMS to cpu) and jax picks the GPU.
  export JAX_PLATFORMS=
fi

pack() {  # after every step, so a call cut short still brings back what finished
  cp "$WORK/summary.txt" "$OUT/summary.txt"
  tar czf "$OUT/gpu_part$PART.tgz" -C "$WORK" .
}

step() {  # name, timeout seconds, command...
  local name="$1" limit="$2"; shift 2
  echo "== $name ($(date +%T))" | tee -a "$WORK/summary.txt"
  timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
  echo "   exit $? after $SECONDS s total" | tee -a "$WORK/summary.txt"
  tail -n 30 "$WORK/$name.log" >> "$WORK/summary.txt"
  pack
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || rocm-smi; } > "$WORK/device.txt" 2>&1
$PY -c "import jax, sys; print(sys.version.split()[0], jax.__version__, jax.devices())" > "$WORK/jax.txt" 2>&1
cat "$WORK/jax.txt" | tee -a "$WORK/summary.txt"

if [ -n "$SMOKE" ]; then
  if [ "$PART" = 1 ]; then
    step gpu_tests 300 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
    step bench_decode_tp4 300 $PY scripts/bench_decode.py --smoke --json "$WORK/decode_tp4.json" \
        --profile "$WORK/decode_tp4_profile"
    step bench_decode_tp8 300 $PY scripts/bench_decode.py --smoke --json "$WORK/decode_tp8.json" --verify 4
  elif [ "$PART" = 2 ]; then
    step bench_prefill 300 $PY scripts/bench_prefill.py --smoke --json "$WORK/prefill_tp4.json"
    step bench_host 300 $PY scripts/bench_host.py --smoke --json "$WORK/host.json"
    step bench_sampler 300 $PY scripts/bench_sampler.py --smoke --json "$WORK/sampler.json"
  else
    step bench_decode_fp8 300 $PY scripts/bench_decode.py --smoke --quantization fp8 \
        --json "$WORK/decode_tp4_fp8.json"
    step bench_decode_int4 300 $PY scripts/bench_decode.py --smoke --quantization int4 \
        --json "$WORK/decode_tp4_int4.json"
    step bench_decode_fp8_kv 300 $PY scripts/bench_decode.py --smoke --quantization fp8 \
        --kv-cache-dtype fp8 --json "$WORK/decode_tp4_fp8_kv.json"
    step bench_attention 300 $PY scripts/bench_attention.py --smoke --cases smoke_b2_ctx40 \
        --json "$WORK/attention.json"
  fi
elif [ "$PART" = 1 ]; then
  # 1. Correctness on the GPU first: the compiled Triton kernel and the model's kernel path.
  step gpu_tests 70 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
  # 2. Decode step (engine attention and sampler) of one device's shard: 72B at TP4 (36 GB of
  #    weights), profiled, the target sizes (batch 1, 32) first: rows are written as they finish,
  #    so a step cut short keeps them. Then TP8, with the step that
  #    checks 4 speculative drafts at batch 1 (what a step must yield for speculation to pay).
  step bench_decode_tp4 120 $PY scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 4 \
      --batch 1,32,8,64 --ctx 2048 --json "$WORK/decode_tp4.json" --profile "$WORK/decode_tp4_profile"
  step bench_decode_tp8 100 $PY scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 8 \
      --batch 1,32 --ctx 2048 --json "$WORK/decode_tp8.json" --verify 4 --verify-batch 1
elif [ "$PART" = 2 ]; then
  # 3. Prefill (TTFT, MFU) of the 72B TP4 shard, 2k-token chunks; the 2k target first.
  step bench_prefill 90 $PY scripts/bench_prefill.py --preset qwen2.5-72b --shard-of-tp 4 \
      --prompt 2048,512,8192 --chunk 2048 --json "$WORK/prefill_tp4.json"
  # 4. Host overhead of the engine loop at batch 64 (7B, random weights, one GPU), with async
  #    scheduling (the default) and without.
  step bench_host 70 $PY scripts/bench_host.py --model qwen2.5-7b --batch 64,8 --json "$WORK/host.json"
  # 5. Cold and warm start of the 7B engine (persistent compile cache; warm loads in parallel).
  step bench_startup 130 $PY scripts/bench_engine.py --only startup --model qwen2.5-7b \
      --max-model-len 4096 --json "$WORK/startup.json"
  # 6. The sampler at 64 and 256 rows × 152k vocab: top-k/top-p candidates, whole-vocabulary
  #    bisection (top_k off), and the sort bisection replaced.
  step bench_sampler 25 $PY scripts/bench_sampler.py --rows 64,256 --json "$WORK/sampler.json"
else
  # 7. Decode of the 72B TP4 shard with fp8 projection weights (half the weight bytes of step 2):
  #    whether XLA feeds the e4m3 → bf16 convert straight into the GEMV or writes a bf16 copy
  #    first shows here as ms/step against step 2's.
  step bench_decode_fp8 90 $PY scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 4 \
      --quantization fp8 --batch 1,32 --ctx 2048 --json "$WORK/decode_tp4_fp8.json" \
      --profile "$WORK/decode_tp4_fp8_profile"
  #    The same with int4 projections (AWQ/GPTQ's layout, a quarter of the bytes): whether XLA
  #    fuses the group dequantization into the GEMV, or materializes bf16 weights each step.
  step bench_decode_int4 60 $PY scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 4 \
      --quantization int4 --batch 1,32 --ctx 2048 --json "$WORK/decode_tp4_int4.json" \
      --profile "$WORK/decode_tp4_int4_profile"
  #    And with the fp8 KV cache too, at batch 32 × 2k where KV is a quarter of the bytes read.
  step bench_decode_fp8_kv 50 $PY scripts/bench_decode.py --preset qwen2.5-72b --shard-of-tp 4 \
      --quantization fp8 --kv-cache-dtype fp8 --batch 32 --ctx 2048 --json "$WORK/decode_tp4_fp8_kv.json"
  # 8. Kernel speed vs jax's bundled paged attention and the XLA reference (DESIGN.md cases).
  step bench_attention 100 $PY scripts/bench_attention.py --json "$WORK/attention.json"
fi
echo "done in $SECONDS s" | tee -a "$WORK/summary.txt"
pack
