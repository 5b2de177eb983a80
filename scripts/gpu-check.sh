#!/usr/bin/env bash
# GPU checks for the CUDA backend, for a machine with an NVIDIA GPU:
#   1. the GPU conformance tests (executor/tests/gpu_conformance.rs: the CPU kernels' cases run
#      through the CUDA backend and compared with the CPU backend; the Device operations on
#      CudaDevice compared with the sim device; the block schedule's GPU tiers on the GPU and
#      `executor --device cuda` giving the CPU run's tokens); a skipped test fails here, because
#      on a GPU machine a skip means the GPU could not be opened;
#   2. a throughput comparison: the executor end to end with an all-CPU policy vs GPU policies
#      (all weights and KV cache resident; the HeteGen split with half the weights resident) on
#      `--device cuda`, and per-operation CPU vs CUDA times; printed as tables.
#
#   scripts/gpu-check.sh [--model-name opt-125m] [--batch-size 8] [--prompt-len 64] [--gen 32]
#
# NVRTC and cuBLAS come from the machine's CUDA install when the loader finds them, else from
# PyPI through scripts/nvrtc-env.sh (venv .venv-nvrtc), with the NVRTC release matched to the
# driver's CUDA version. Exits 2 with a message on a machine without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

model=opt-125m batch=8 prompt=64 gen=32
while [ $# -gt 0 ]; do
  case "$1" in
    --model-name) model="$2"; shift 2 ;;
    --batch-size) batch="$2"; shift 2 ;;
    --prompt-len) prompt="$2"; shift 2 ;;
    --gen) gen="$2"; shift 2 ;;
    *) echo "gpu-check: unknown argument $1" >&2; exit 64 ;;
  esac
done

loadable() { # is a shared library findable by the dynamic loader?
  ldconfig -p 2>/dev/null | grep -q "$1" && return 0
  local d
  local path="${LD_LIBRARY_PATH:-}"
  for d in ${path//:/ }; do [ -e "$d/$1" ] && return 0; done
  return 1
}

if ! loadable libcuda.so.1; then
  echo "gpu-check: no NVIDIA GPU driver on this machine (libcuda.so.1 is not loadable): nothing to check."
  echo "gpu-check: run this script on a machine with an NVIDIA GPU; here the CUDA backend refuses GPU policies and its tests print SKIPPED."
  exit 2
fi
if command -v nvidia-smi >/dev/null 2>&1; then
  if ! nvidia-smi -L >/dev/null 2>&1 || [ -z "$(nvidia-smi -L 2>/dev/null)" ]; then
    echo "gpu-check: the NVIDIA driver is installed but nvidia-smi lists no GPU: nothing to check."
    exit 2
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.free --format=csv
  driver_cuda="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\.[0-9]*\).*/\1/p' | head -n1)"
else
  driver_cuda=""
fi

if ! loadable libnvrtc.so.12 || ! loadable libcublas.so.12; then
  if [ -n "$driver_cuda" ] && [ -z "${STRATA_NVRTC_VERSION:-}" ]; then
    # NVRTC must not be newer than the driver, or the driver rejects the PTX.
    case "$driver_cuda" in
      12.[0-8]) export STRATA_NVRTC_VERSION="$driver_cuda.*" ;;
    esac
  fi
  extra=""
  loadable libcublas.so.12 || extra="--with-cublas"
  eval "$(bash scripts/nvrtc-env.sh .venv-nvrtc $extra)"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
echo "== CUDA unit tests (PTX compile, CPU emulation of the kernels, probe, refusal)"
set +o pipefail
cargo test --release -p executor --lib cuda:: -- --nocapture 2>&1 |
  grep -E "^(test |probe|compiled|ptxas|all emulated|SKIPPED|FAIL)"
unit=${PIPESTATUS[0]}
set -o pipefail
[ "$unit" -eq 0 ] || { echo "gpu-check: CUDA unit tests FAILED"; exit 1; }

echo "== GPU conformance tests"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +o pipefail
cargo test --release -p executor --test gpu_conformance -- --nocapture 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -o pipefail
if [ "$status" -ne 0 ]; then
  echo "gpu-check: GPU conformance tests FAILED"
  exit 1
fi
if grep -q "SKIPPED (no GPU)" "$log"; then
  echo "gpu-check: conformance tests were skipped on a machine with a GPU driver:"
  grep "SKIPPED (no GPU)" "$log" | head -n 3
  exit 1
fi

echo
echo "== Throughput: per operation, CPU backend vs CUDA backend (OPT-1.3B shapes)"
cargo test --release -p executor --test gpu_conformance -- --ignored --nocapture throughput_table 2>&1 |
  grep '^|' || echo "(no table: see the output above)"

echo
echo "== Throughput: executor end to end, $model, batch $batch, prompt $prompt, generate $gen"
cargo build --release -p executor --bin executor >/dev/null
exe="$CARGO_TARGET_DIR/release/executor"
out="$(mktemp -d)"
common=(--random-weights --model-name "$model" --batch-size "$batch" --prompt-len "$prompt"
        --max-new-tokens "$gen" --ignore-eos --quiet)
# Hand-written policies (no prediction section): NAME WEIGHTS_GPU KV_GPU ACT_GPU ALPHA.
policy() {
  python3 - "$out/$1.toml" "$model" "$prompt" "$gen" "$batch" "${@:2}" <<'PY'
import sys
path, model, prompt, gen, batch, wg, kg, ag, alpha = sys.argv[1:]
head = open("policies/opt-13b-a10-hetegen-latency.toml").read().split("[model]")[0]
wg, kg, ag = float(wg), float(kg), float(ag)
row = lambda name, g: f"[placement.{name}]\ngpu = {g}\ncpu = {1 - g}\ndisk = 0.0\n"
open(path, "w").write(head + f"""[model]
name = "{model}"
[workload]
prompt_len = {prompt}
gen_len = {gen}
[batch]
gpu_batch_size = {batch}
num_gpu_batches = 1
{row("weights", wg)}{row("kv_cache", kg)}{row("activations", ag)}[compute]
cpu_attention = false
[compute.split]
qkv = {alpha}
out_proj = {alpha}
fc1 = {alpha}
fc2 = {alpha}
""")
PY
}
policy cpu 0.0 0.0 0.0 1.0
policy gpu-resident 1.0 1.0 1.0 1.0
policy gpu-split 0.5 1.0 1.0 0.3
"$exe" "${common[@]}" --policy "$out/cpu.toml" --report "$out/cpu.json" >/dev/null
for p in gpu-resident gpu-split; do
  "$exe" "${common[@]}" --policy "$out/$p.toml" --device cuda --report "$out/$p.json" >/dev/null ||
    echo "gpu-check: the $p policy FAILED on --device cuda"
done
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
print("| policy | device | prefill s | decode s | prefill tok/s | decode tok/s | total tok/s |")
print("|---|---|---|---|---|---|---|")
for name, device in (("cpu", "-"), ("gpu-resident", "cuda"), ("gpu-split", "cuda")):
    p = os.path.join(out, name + ".json")
    if not os.path.exists(p):
        print(f"| {name} | {device} | failed | | | | |")
        continue
    r = json.load(open(p))
    cells = [r.get(k) for k in ("prefill_s", "decode_s", "prefill_tokens_per_s",
                                 "decode_tokens_per_s", "total_tokens_per_s")]
    print(f"| {name} | {device} | " + " | ".join(
        f"{c:.3f}" if isinstance(c, (int, float)) else str(c) for c in cells) + " |")
PY
rm -rf "$out"
