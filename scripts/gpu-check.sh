#!/usr/bin/env bash
# GPU checks for the CUDA backend, for a machine with an NVIDIA GPU:
#   1. the GPU conformance tests (executor/tests/gpu_conformance.rs: the CPU kernels' cases run
#      through the CUDA backend and compared with the CPU backend); a skipped test fails here,
#      because on a GPU machine a skip means the backend could not start;
#   2. a throughput comparison: the executor end to end with a CPU policy vs the same model
#      through the CUDA backend (when the executor can select it), and per-operation CPU vs
#      CUDA times; printed as tables.
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
"$exe" "${common[@]}" --report "$out/cpu.json" >/dev/null
gpu_row="GPU run: not available"
help="$("$exe" --help)"
if [[ "$help" == *--backend* ]]; then
  "$exe" "${common[@]}" --backend cuda --report "$out/cuda.json" >/dev/null
  gpu_row=""
else
  echo "gpu-check: this executor cannot select the CUDA backend yet (no --backend option; the"
  echo "gpu-check: GPU path of the offloading engine, issue 4/6, is not wired in): end-to-end GPU"
  echo "gpu-check: throughput is not measured; the per-operation table above is the comparison."
fi
python3 - "$out" "$gpu_row" <<'PY'
import json, os, sys
out, gpu_row = sys.argv[1], sys.argv[2]
def load(name):
    p = os.path.join(out, name)
    return json.load(open(p)) if os.path.exists(p) else None
def pick(r, *keys):
    for k in keys:
        if isinstance(r, dict) and k in r:
            return r[k]
    return None
print("| backend | prefill s | decode s | prefill tok/s | decode tok/s | total tok/s |")
print("|---|---|---|---|---|---|")
for name, label in (("cpu.json", "cpu"), ("cuda.json", "cuda")):
    r = load(name)
    if r is None:
        print(f"| {label} | - | - | - | - | {gpu_row or 'failed'} |")
        continue
    cells = [r.get(k) for k in ("prefill_s", "decode_s", "prefill_tokens_per_s",
                                 "decode_tokens_per_s", "total_tokens_per_s")]
    print("| " + label + " | " + " | ".join(
        f"{c:.3f}" if isinstance(c, (int, float)) else str(c) for c in cells) + " |")
PY
rm -rf "$out"
