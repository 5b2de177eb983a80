#!/usr/bin/env bash
# Issue 4's disk benchmark: OPT-6.7B with random bf16 weights (a safetensors checkpoint written once),
# weights 25% CPU / 75% disk, prompt 128, 32 new tokens (greedy, EOS ignored), the same batch for
# both systems:
#   - Strata's executor with a policy (weights cpu 0.25 / disk 0.75, KV cache and activations on
#     CPU, CPU attention, alpha 1, no compression), checked by `planner explain`;
#   - Hugging Face Accelerate's disk offload (transformers from_pretrained with a device_map that puts
#     75% of the decoder layers on "disk" and an offload_folder), CPU execution;
#   - the disk bound: disk-resident bytes per decode step / O_DIRECT read bandwidth measured here.
#     Also against the rate the disk device itself gave the executor's decode (the kernel's block
#     counters, in the executor's report), since this virtual disk's speed moves by the minute.
# Page cache: caches are dropped (and the drop checked) before every run of either system; the
# executor reads disk-resident weights with O_DIRECT; the Accelerate run evicts each disk layer's
# bytes after use (posix_fadvise DONTNEED). Every run's block-device reads ("File system inputs" of
# /usr/bin/time -v) are reported next to the bytes it had to read. See docs/benchmarks-offload.md.
#
# Usage: scripts/bench-offload-vs-accelerate.sh
# Environment:
#   STRATA_VENV          Python virtual environment to create or reuse (default: .venv)
#   STRATA_BENCH_DIR     where the checkpoint lives, outside the repo (default: /work/bench-data)
#   STRATA_BENCH_MODEL   opt-6.7b (default); opt-125m / opt-1.3b for a quick try of the script
#   STRATA_BENCH_BATCHES batch sizes, both systems run each (default: "8")
#   STRATA_BENCH_REPS    runs per system and batch, medians reported (default: 1; each run of
#                        OPT-6.7B takes about 8 minutes for the executor, more for Accelerate)
#   STRATA_BENCH_SYSTEMS which sides to run (default: "executor accelerate")
#   STRATA_BENCH_OUT     results directory (default: target/bench-offload-vs-accelerate)
#   STRATA_BENCH_KEEP=1  keep earlier runs in STRATA_BENCH_OUT and add to them (the report takes
#                        medians over all; the disk bandwidth is measured again and the latest used)
#   CARGO_TARGET_DIR     honoured as usual.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${STRATA_VENV:-.venv}"
data="${STRATA_BENCH_DIR:-/work/bench-data}"
model="${STRATA_BENCH_MODEL:-opt-6.7b}"
batches="${STRATA_BENCH_BATCHES:-8}"
reps="${STRATA_BENCH_REPS:-1}"
systems="${STRATA_BENCH_SYSTEMS:-executor accelerate}"
out="${STRATA_BENCH_OUT:-target/bench-offload-vs-accelerate}"
cpu_fraction=0.25
prompt_len=128
new_tokens=32
ckpt="$data/$model"
helper="$root/scripts/bench_offload_accelerate.py"

log() { printf '\n== %s\n' "$*" >&2; }

log "Python environment: $venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch, transformers, accelerate, safetensors' 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet torch transformers accelerate safetensors
fi
py="$venv/bin/python"
"$py" -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__)'

if [ "${STRATA_BENCH_KEEP:-0}" != 1 ]; then
    rm -rf "$out"
fi
mkdir -p "$out" "$data"
out="$(cd "$out" && pwd)"

log "Checkpoint: $ckpt"
if ! "$py" scripts/write_random_opt_checkpoint.py --model "$model" --out "$ckpt" --check; then
    need_gb=$("$py" -c "print({'opt-125m':1,'opt-1.3b':3,'opt-2.7b':6,'opt-6.7b':14,'opt-13b':27}['$model'])")
    avail_gb=$(df -BG --output=avail "$data" | tail -1 | tr -dc 0-9)
    df -h "$data"
    if [ "$avail_gb" -lt $((need_gb + 2)) ]; then
        echo "not enough space in $data: ${avail_gb}G free, the checkpoint needs about ${need_gb}G" >&2
        exit 1
    fi
    "$py" scripts/write_random_opt_checkpoint.py --model "$model" --out "$ckpt"
fi

log "Building planner and executor (release)"
if [[ " $systems " == *" executor "* ]]; then
    cargo build --release -p planner -p executor --bins
else
    cargo build --release -p planner
fi
target_dir="$(cargo metadata --format-version 1 --no-deps | "$py" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
planner="$target_dir/release/planner"
executor="$target_dir/release/executor"
executor_ok=1
if [[ " $systems " == *" executor "* ]] && ! "$executor" --help 2>/dev/null | grep -q -- '--policy'; then
    executor_ok=0
    echo "NOTE: this executor has no --policy option: the executor side is skipped" >&2
fi

log "Machine"
{
    lscpu | grep -E 'Model name|^CPU\(s\)|Thread|L3'
    grep MemTotal /proc/meminfo
    df -h "$data" | tail -1
    findmnt -no SOURCE,FSTYPE --target "$data" || true
    uptime
    git -C "$root" log -1 --format='commit %h %s'
} | tee "$out/machine.txt"

# Drops the page cache and checks that it worked (Cached in /proc/meminfo must fall below 1 GiB or
# to under half of what it was); records the outcome in $out/drop_caches.log.
drop_caches() {
    local before after
    before=$(awk '/^Cached:/ {print $2}' /proc/meminfo)
    sync
    if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
        after=$(awk '/^Cached:/ {print $2}' /proc/meminfo)
        if [ "$after" -lt 1048576 ] || [ "$after" -lt $((before / 2)) ]; then
            echo "$(date -u +%T) $1: caches dropped (Cached $((before / 1024)) -> $((after / 1024)) MiB)" | tee -a "$out/drop_caches.log" >&2
        else
            echo "$(date -u +%T) $1: drop_caches written but Cached only went $((before / 1024)) -> $((after / 1024)) MiB" | tee -a "$out/drop_caches.log" >&2
        fi
    else
        echo "$(date -u +%T) $1: COULD NOT drop caches (not root?): only O_DIRECT and the in-run eviction rule out the page cache" | tee -a "$out/drop_caches.log" >&2
    fi
}

log "Disk-resident bytes and direct-read bandwidth over them (this run)"
drop_caches bandwidth
"$py" "$helper" bandwidth --model-dir "$ckpt" --cpu-fraction "$cpu_fraction" --threads 1,4,8 --out "$out/disk.json"
cp "$out/disk.json" "$out/disk-$(date -u +%Y%m%dT%H%M%S).json"

# The first free run number for a system and batch (runs accumulate with STRATA_BENCH_KEEP=1).
next_run() {
    local n=1
    while [ -e "$out/$1.run$n.json" ] || [ -e "$out/$1.run$n.time.txt" ]; do n=$((n + 1)); done
    echo "$n"
}

# The profile the template is solved on and the executor predicts with: the embedded profile of
# this CPU class, the rule of planner::profile::embedded_cpu_profile (the executor's default).
profile=builtin:cpu-2core-24gib
if ! grep -qw avx512f /proc/cpuinfo; then
    profile=builtin:cpu-2core-24gib-avx2
elif grep -q '^vendor_id.*AuthenticAMD' /proc/cpuinfo &&
    [ "$(awk '/^cpu family/ {print $4; exit}' /proc/cpuinfo)" -ge 26 ]; then
    profile=builtin:cpu-2core-24gib-zen5
fi
log "Profile for the policies' prediction: $profile"
"$planner" solve --model "$model" --profile "$profile" --objective latency --batch 1 \
    --prompt-len "$prompt_len" --gen-len "$new_tokens" --no-compression -o "$out/solved-template.toml" >/dev/null
for batch in $batches; do
    key="b$batch"
    prompts="$out/prompts-$key.txt"
    "$py" "$helper" prompts --batch "$batch" --prompt-len "$prompt_len" --seed 1 >"$prompts"
    policy="$out/policy-$key.toml"
    "$py" "$helper" policy --template "$out/solved-template.toml" --batch "$batch" --prompt-len "$prompt_len" \
        --gen-len "$new_tokens" --cpu-fraction "$cpu_fraction" --out "$policy"
    log "$key: planner explain $policy"
    "$planner" explain "$policy" | tee "$out/explain-$key.txt"
    "$planner" explain "$policy" --json >"$out/explain-$key.json"

    for _ in $(seq 1 "$reps"); do
        if [[ " $systems " == *" executor "* ]] && [ "$executor_ok" = 1 ]; then
            rep=$(next_run "executor-$key")
            log "$key run $rep: executor"
            prompt_args=()
            while IFS= read -r ids; do prompt_args+=(--prompt-ids "$ids"); done <"$prompts"
            extra=()
            if "$executor" --help | grep -q -- '--profile'; then
                extra+=(--profile "$profile")
            fi
            if "$executor" --help | grep -q -- '--offload-dir'; then
                mkdir -p "$data/executor-offload"
                extra+=(--offload-dir "$data/executor-offload")
            fi
            drop_caches "executor-$key.run$rep"
            /usr/bin/time -v -o "$out/executor-$key.run$rep.time.txt" \
                "$executor" --model "$ckpt" --policy "$policy" "${prompt_args[@]}" \
                --max-new-tokens "$new_tokens" --ignore-eos --quiet "${extra[@]}" \
                --report "$out/executor-$key.run$rep.json" >"$out/executor-$key.run$rep.log" 2>&1 \
                || { echo "executor failed, see $out/executor-$key.run$rep.log" >&2; tail -5 "$out/executor-$key.run$rep.log" >&2; }
            tail -25 "$out/executor-$key.run$rep.log"
        fi
        if [[ " $systems " == *" accelerate "* ]]; then
            rep=$(next_run "accelerate-$key")
            log "$key run $rep: Accelerate disk offload"
            offload="$data/accelerate-offload-$model"
            rm -rf "$offload"
            drop_caches "accelerate-$key.run$rep"
            /usr/bin/time -v -o "$out/accelerate-$key.run$rep.time.txt" \
                "$py" "$helper" accelerate --model-dir "$ckpt" --cpu-fraction "$cpu_fraction" \
                --prompts "$prompts" --new-tokens "$new_tokens" --offload-folder "$offload" \
                --out "$out/accelerate-$key.run$rep.json" 2>&1 | grep -v '^Loading weights' \
                || { echo "Accelerate run failed" >&2; }
        fi
    done
done

log "Results (medians over the runs in $out; throughput = batch x $new_tokens / (prefill + decode))"
"$py" "$helper" report --results "$out" --new-tokens "$new_tokens" --out "$out/results.md"
echo
echo "Raw JSON, /usr/bin/time -v output and logs: $out"
