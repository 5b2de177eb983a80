#!/usr/bin/env python3
"""PyTorch + transformers side of scripts/bench-cpu-vs-pytorch.sh, and the report it prints.

Subcommands:
  prompts  --batch B --prompt-len L --seed S      one line of comma-separated token ids per prompt
  torch    --model NAME --dtype D --prompts FILE --new-tokens N --reps R --out FILE.json
  report   --results DIR --out FILE.md               the comparison table (stdout and markdown), from
                                                     DIR/<key>.executor.N.json, <key>.torch.N.json
                                                     and <key>.dram-{before,after}.txt
  linear   --model NAME --dtype D --tokens 1,16,2048  PyTorch's F.linear over an OPT layer stack at
                                                     the shapes of primitives/examples/kernel_bench.rs

The torch run builds a random-weight OPT with transformers' own initialisation (the speed of a
dense model does not depend on the values), generates greedily with exactly N new tokens
(min_new_tokens = max_new_tokens, so EOS cannot end a sequence early), and times prefill (a
generate of one token) and the whole generate separately, reporting medians of R runs.
"""

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time

# Built-in OPT shapes (design notes, section 7), so no download is needed.
OPT_SHAPES = {
    "opt-125m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, ffn_dim=3072),
    "opt-350m": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, ffn_dim=4096),
    "opt-1.3b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, ffn_dim=8192),
    "opt-2.7b": dict(num_hidden_layers=32, hidden_size=2560, num_attention_heads=32, ffn_dim=10240),
}


def cmd_prompts(args):
    rng = random.Random(args.seed)
    for _ in range(args.batch):
        # Token 2 is OPT's BOS, which its tokenizer puts first; the rest avoid special ids.
        ids = [2] + [rng.randrange(4, 50000) for _ in range(args.prompt_len - 1)]
        print(",".join(map(str, ids)))


def cmd_torch(args):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.set_num_threads(args.threads or os.cpu_count())
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    shape = OPT_SHAPES[args.model]
    config = OPTConfig(
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=shape["hidden_size"],
        do_layer_norm_before=True,
        **shape,
    )
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    model = OPTForCausalLM._from_config(config, dtype=dtype).eval()
    load_s = time.perf_counter() - t
    with open(args.prompts) as f:
        prompts = [[int(v) for v in line.split(",")] for line in f if line.strip()]
    input_ids = torch.tensor(prompts, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    def generate(n):
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                num_beams=1,
                pad_token_id=1,
            )
        elapsed = time.perf_counter() - start
        assert out.shape[1] == input_ids.shape[1] + n, "generate stopped early"
        return elapsed

    generate(2)  # warm-up: first-call allocations and oneDNN kernel selection
    prefill, total = [], []
    for _ in range(args.reps):
        prefill.append(generate(1))
        total.append(generate(args.new_tokens))
    batch, new = input_ids.shape[0], args.new_tokens
    prefill_s = statistics.median(prefill)
    total_s = statistics.median(total)
    decode_s = max(total_s - prefill_s, 1e-9)
    result = dict(
        engine="pytorch",
        torch=torch.__version__,
        model=args.model,
        dtype=args.dtype,
        threads=torch.get_num_threads(),
        batch_size=batch,
        prompt_len=input_ids.shape[1],
        new_tokens=new,
        load_s=load_s,
        prefill_s=prefill_s,
        decode_s=decode_s,
        decode_tokens_per_s=batch * (new - 1) / decode_s,
        total_tokens_per_s=batch * new / total_s,
        runs_total_s=total,
        runs_prefill_s=prefill,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def cmd_linear(args):
    """torch.nn.functional.linear over the same products as the executor's kernel_bench."""
    import torch

    torch.set_num_threads(args.threads or os.cpu_count())
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[args.dtype]
    shape = OPT_SHAPES[args.model]
    h, ffn, vocab = shape["hidden_size"], shape["ffn_dim"], 50272
    layers = args.layers or shape["num_hidden_layers"]
    shapes = [(h, h)] * 4 + [(ffn, h), (h, ffn)]
    stack = [[torch.randn(o, i, dtype=dtype) * 0.02 for (o, i) in shapes] for _ in range(layers)]
    head = torch.randn(vocab, h, dtype=dtype) * 0.02 if args.head else None
    bias = torch.full((max(ffn, vocab),), 0.01, dtype=dtype)
    print(f"{args.model} {args.dtype}, {layers} layers{' + LM head' if args.head else ''}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("tokens  median_ms  weight_GB/s  GFLOP/s")
    for t in [int(v) for v in args.tokens.split(",")]:
        x = torch.full((t, ffn), 0.1, dtype=dtype)
        head_tokens = 0 if head is None else (16 if t > 64 else t)
        times = []
        with torch.inference_mode():
            for _ in range(args.reps + 1):
                start = time.perf_counter()
                for layer in stack:
                    for w in layer:
                        torch.nn.functional.linear(x[:, : w.shape[1]], w, bias[: w.shape[0]])
                if head is not None:
                    torch.nn.functional.linear(x[:head_tokens, :h], head)
                times.append(time.perf_counter() - start)
        med = statistics.median(times[1:])  # the first run is a warm-up
        elems = sum(w.numel() for layer in stack for w in layer)
        head_elems = 0 if head is None else head.numel()
        nbytes = (elems + head_elems) * stack[0][0].element_size()
        flops = 2 * (elems * t + head_elems * head_tokens)
        print(f"{t:6}  {med * 1e3:9.2f}  {nbytes / med / 1e9:11.2f}  {flops / med / 1e9:7.1f}")


def median_report(paths):
    """Medians over several executor --report files of one configuration."""
    runs = [json.load(open(p)) for p in paths]
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    first = runs[0]
    return dict(
        model=first.get("model"),
        batch_size=first["batch_size"],
        prefill_s=med("prefill_s"),
        decode_s=med("decode_s"),
        decode_tokens_per_s=med("decode_tokens_per_s"),
        total_tokens_per_s=med("total_tokens_per_s"),
        weight_bytes_per_step=first.get("weight_bytes_per_step", first.get("weight_bytes")),
        decode_weight_bw=med("decode_weight_bandwidth_bytes_per_s")
        if "decode_weight_bandwidth_bytes_per_s" in first
        else None,
        decode_steps=first.get("decode_steps"),
        peak_rss_bytes=max((r.get("peak_rss_bytes") or 0) for r in runs),
        runs_total_s=[r["prefill_s"] + r["decode_s"] for r in runs],
    )


def torch_median_report(paths):
    """Medians over several `torch --reps 1` result files of one configuration."""
    runs = [json.load(open(p)) for p in paths]
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    first = dict(runs[0])
    first.update(
        prefill_s=med("prefill_s"),
        decode_s=med("decode_s"),
        decode_tokens_per_s=med("decode_tokens_per_s"),
        total_tokens_per_s=med("total_tokens_per_s"),
    )
    return first


def cmd_report(args):
    def dram_figures(key, when):
        """The DRAM read figures measured `when` ("before" or "after") each executor run, in run order."""
        path = os.path.join(args.results, f"{key}.dram-{when}.txt")
        if not os.path.exists(path):
            return []
        return [float(line.split()[-1]) for line in open(path) if line.startswith("dram_read_gb_s")]

    def run_number(path):
        return int(path.rsplit(".", 2)[-2])

    def runs_of(key, engine):
        """{run number: path} of one engine's result files for `key`."""
        prefix = f"{key}.{engine}."
        return {
            run_number(f): os.path.join(args.results, f)
            for f in os.listdir(args.results)
            if f.startswith(prefix) and f.endswith(".json") and f[len(prefix) : -5].isdigit()
        }

    rows = []
    keys = sorted({f.split(".torch.")[0] for f in os.listdir(args.results) if ".torch." in f})
    for key in keys:
        torch_runs = runs_of(key, "torch")
        exe_runs = runs_of(key, "executor")
        t = torch_median_report([torch_runs[n] for n in sorted(torch_runs)])
        e = median_report([exe_runs[n] for n in sorted(exe_runs)]) if exe_runs else None
        # The ratio of each run pair (same repetition, minutes apart at most).
        paired = []
        for n in sorted(set(torch_runs) & set(exe_runs)):
            te = json.load(open(torch_runs[n]))["total_tokens_per_s"]
            ee = json.load(open(exe_runs[n]))["total_tokens_per_s"]
            paired.append(ee / te)
        rows.append((key, t, e, paired, exe_runs))
    order = lambda r: (list(OPT_SHAPES).index(r[1]["model"]), r[1]["batch_size"])  # noqa: E731
    rows.sort(key=order)

    lines = []
    out = lines.append
    out(
        "| model | batch | runs | PyTorch gen tok/s | executor gen tok/s | ratio of medians "
        "| median of paired ratios (range) "
        "| PyTorch decode tok/s | executor decode tok/s | ratio "
        "| PyTorch prefill s | executor prefill s |"
    )
    out("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for key, t, e, paired, _ in rows:
        if e is None:
            out(
                f"| {t['model']} | {t['batch_size']} | 0 | {t['total_tokens_per_s']:.2f} | missing | - | - "
                f"| {t['decode_tokens_per_s']:.2f} | missing | - | {t['prefill_s']:.2f} | missing |"
            )
            continue
        pair_text = (
            f"**{statistics.median(paired):.2f}x** ({min(paired):.2f}-{max(paired):.2f})" if paired else "-"
        )
        out(
            f"| {t['model']} | {t['batch_size']} | {len(paired)} | {t['total_tokens_per_s']:.2f} "
            f"| {e['total_tokens_per_s']:.2f} | {e['total_tokens_per_s'] / t['total_tokens_per_s']:.2f}x "
            f"| {pair_text} "
            f"| {t['decode_tokens_per_s']:.2f} | {e['decode_tokens_per_s']:.2f} "
            f"| {e['decode_tokens_per_s'] / t['decode_tokens_per_s']:.2f}x "
            f"| {t['prefill_s']:.2f} | {e['prefill_s']:.2f} |"
        )
    out("")
    out(
        "Executor batch-1 decode: weight bytes read per token / time per token, against the DRAM "
        "read bandwidth measured right before and right after the same run (each a median of 9 "
        "passes over 1 GiB; the run is set against their mean). 'steady' counts the runs whose "
        "before and after figures agree within 15%; the share is the median over those runs of each "
        "run's own ratio (over all runs when none is steady), and the last column divides the "
        "median decode bandwidth by the highest DRAM figure of the whole series (the most "
        "conservative pairing, which mixes minutes):"
    )
    out("")
    out(
        "| model | weight bytes per step | time per token ms | decode bandwidth GB/s "
        "| DRAM read GB/s (median, highest) | steady runs | % of DRAM, same run | % of highest DRAM |"
    )
    out("|---|---|---|---|---|---|---|---|")
    for key, t, e, _, exe_runs in rows:
        if e is None or e["batch_size"] != 1:
            continue
        steps = e["decode_steps"] or (t["new_tokens"] - 1)
        per_token = e["decode_s"] / steps
        bw = e["weight_bytes_per_step"] / per_token / 1e9
        before, after = dram_figures(key, "before"), dram_figures(key, "after")
        steady, every = [], []
        for n in sorted(exe_runs):
            run = json.load(open(exe_runs[n]))
            i = n - 1
            if i < min(len(before), len(after)) and run.get("decode_s"):
                run_bw = e["weight_bytes_per_step"] * (run["decode_steps"] or steps) / run["decode_s"]
                ratio = run_bw / 1e9 / ((before[i] + after[i]) / 2)
                every.append(ratio)
                if max(before[i], after[i]) <= 1.15 * min(before[i], after[i]):
                    steady.append(ratio)
        drams = before + after
        chosen = steady or every
        same_run = f"**{100 * statistics.median(chosen):.0f}%**" if chosen else "-"
        highest = f"{100 * bw / max(drams):.0f}%" if drams else "-"
        dram_text = f"{statistics.median(drams):.2f}, {max(drams):.2f}" if drams else "-"
        out(
            f"| {t['model']} | {e['weight_bytes_per_step'] / 1e6:.1f} MB | {per_token * 1e3:.2f} "
            f"| {bw:.2f} | {dram_text} | {len(steady)} of {len(every)} | {same_run} | {highest} |"
        )
    text = "\n".join(lines)
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("prompts")
    a.add_argument("--batch", type=int, required=True)
    a.add_argument("--prompt-len", type=int, required=True)
    a.add_argument("--seed", type=int, default=1)
    a = sub.add_parser("torch")
    a.add_argument("--model", required=True, choices=sorted(OPT_SHAPES))
    a.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    a.add_argument("--prompts", required=True)
    a.add_argument("--new-tokens", type=int, default=32)
    a.add_argument("--reps", type=int, default=3)
    a.add_argument("--seed", type=int, default=1)
    a.add_argument("--threads", type=int, default=0)
    a.add_argument("--out", required=True)
    a = sub.add_parser("report")
    a.add_argument("--results", required=True)
    a.add_argument("--out", required=True)
    a = sub.add_parser("linear")
    a.add_argument("--model", default="opt-1.3b", choices=sorted(OPT_SHAPES))
    a.add_argument("--dtype", default="bf16", choices=["bf16", "f16", "f32"])
    a.add_argument("--tokens", default="1,16")
    a.add_argument("--layers", type=int, default=0)
    a.add_argument("--reps", type=int, default=5)
    a.add_argument("--threads", type=int, default=0)
    a.add_argument("--no-head", dest="head", action="store_false")
    args = p.parse_args()
    commands = {"prompts": cmd_prompts, "torch": cmd_torch, "report": cmd_report, "linear": cmd_linear}
    commands[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
