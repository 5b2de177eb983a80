#!/usr/bin/env bash
# Executor vs PyTorch + transformers on the CPU: random-weight OPT-125m and OPT-1.3B in bf16,
# prompt 128, 32 new tokens (greedy, EOS ignored), batch 1 and 16, the two engines taking turns
# for several runs; plus this machine's DRAM read bandwidth, measured right before and after
# each batch-1 executor run, against that run's decode bandwidth. See docs/benchmarks.md for
# what the figures mean.
#
# Usage: scripts/bench-cpu-vs-pytorch.sh
# Environment:
#   STRATA_VENV        Python virtual environment to create or reuse (default: .venv)
#   STRATA_BENCH_REPS  runs per configuration, medians reported (default: 3)
#   STRATA_BENCH_MODELS, STRATA_BENCH_BATCHES  (default: "opt-125m opt-1.3b", "1 16")
#   STRATA_BENCH_DTYPE bf16 (default) or f32
#   STRATA_BENCH_OUT   results directory (default: target/bench-cpu-vs-pytorch)
#   PIP_INDEX_URL etc. are honoured by pip as usual.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${STRATA_VENV:-.venv}"
reps="${STRATA_BENCH_REPS:-3}"
models="${STRATA_BENCH_MODELS:-opt-125m opt-1.3b}"
batches="${STRATA_BENCH_BATCHES:-1 16}"
dtype="${STRATA_BENCH_DTYPE:-bf16}"
out="${STRATA_BENCH_OUT:-target/bench-cpu-vs-pytorch}"
prompt_len=128
new_tokens=32
helper="$root/scripts/bench_pytorch_opt.py"

log() { printf '\n== %s\n' "$*" >&2; }

log "Python environment: $venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import torch, transformers' 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet torch transformers
fi
"$venv/bin/python" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__, "threads", torch.get_num_threads())'

log "Building the executor (release)"
cargo build --release -p executor --bin executor
cargo build --release -p primitives --example dram_bandwidth
target_dir="$(cargo metadata --format-version 1 --no-deps | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
executor="$target_dir/release/executor"
dram_bw="$target_dir/release/examples/dram_bandwidth"

rm -rf "$out"
mkdir -p "$out"
log "Machine"
{ lscpu | grep -E 'Model name|^CPU\(s\)|Thread|L3'; grep MemTotal /proc/meminfo; uptime; } | tee "$out/machine.txt"


# The two engines take turns, one run each per repetition, so that both see the host in the same
# state: this VM's DRAM rate moves between ~35 and ~64 GB/s within minutes, and a block of
# executor runs followed by a block of PyTorch runs paired different states. The report gives
# the median of each repetition's own ratio next to the ratio of medians.
for model in $models; do
    for batch in $batches; do
        key="$model-b$batch"
        prompts="$out/$key.prompts"
        "$venv/bin/python" "$helper" prompts --batch "$batch" --prompt-len "$prompt_len" --seed 1 >"$prompts"
        prompt_args=()
        while IFS= read -r ids; do prompt_args+=(--prompt-ids "$ids"); done <"$prompts"

        for rep in $(seq 1 "$reps"); do
            log "$key: run $rep of $reps (executor, then PyTorch)"
            if [ "$batch" = 1 ]; then
                # Right before and right after each executor run: the report pairs the run with
                # their mean and says how many runs saw the two differ by more than 15% (the
                # state changed around the run).
                "$dram_bw" 1024 9 | grep '^dram_read_gb_s' | tee -a "$out/$key.dram-before.txt"
            fi
            "$executor" --random-weights --model-name "$model" --dtype "$dtype" --seed 1 \
                "${prompt_args[@]}" --max-new-tokens "$new_tokens" --ignore-eos --quiet \
                --report "$out/$key.executor.$rep.json" >"$out/$key.executor.$rep.log" 2>&1 \
                || { echo "executor failed, see $out/$key.executor.$rep.log" >&2; tail -5 "$out/$key.executor.$rep.log" >&2; break; }
            if [ "$batch" = 1 ]; then
                "$dram_bw" 1024 9 | grep '^dram_read_gb_s' | tee -a "$out/$key.dram-after.txt"
            fi
            "$venv/bin/python" "$helper" torch --model "$model" --dtype "$dtype" --prompts "$prompts" \
                --new-tokens "$new_tokens" --reps 1 --out "$out/$key.torch.$rep.json"
        done
    done
done


log "Results ($reps runs each, taking turns; gen tok/s = batch x $new_tokens / (prefill + decode))"
"$venv/bin/python" "$helper" report --results "$out" --out "$out/results.md"
echo
echo "Raw JSON and logs: $out"
