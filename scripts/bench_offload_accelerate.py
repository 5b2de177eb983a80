#!/usr/bin/env python3
"""Python side of scripts/bench-offload-vs-accelerate.sh: prompts, the executor's policy, the
Hugging Face Accelerate disk-offload run, the disk bound and the report.

Subcommands:
  prompts    --batch B --prompt-len L --seed S        one line of comma-separated token ids per prompt
  policy     --template T --batch B --prompt-len L --gen-len N --cpu-fraction F --out P.toml
             the executor's policy: T (any `planner solve` output, for its provenance) with weights
             F CPU / 1-F disk, KV cache and activations on CPU, CPU attention, alpha 1, no compression
  accelerate --model-dir D --cpu-fraction F --prompts FILE --new-tokens N --out FILE.json [--no-evict]
             OPTForCausalLM.from_pretrained with a device_map that keeps the embeddings and the first
             round(F x layers) decoder layers in CPU memory and puts the other layers on "disk",
             CPU execution, greedy, exactly N new tokens; per-token timestamps from a streamer
  disk-bytes --model-dir D --cpu-fraction F            bytes of the disk-resident layers (JSON)
  bandwidth  --model-dir D --cpu-fraction F --out disk.json [--threads 1,4]
             O_DIRECT read bandwidth over exactly those bytes, 1 MiB requests, k in flight
  report     --results DIR --out FILE.md               the table (stdout and markdown)

Page cache (see docs/benchmarks-offload.md): the shell script drops the caches before each run.
Within an Accelerate run, the disk-resident layers' byte ranges of the safetensors shards are
evicted from the page cache (posix_fadvise DONTNEED) right after each such layer has run (default;
--no-evict turns it off), so every forward pass reads them from the disk again, as it would for a
model larger than memory. Both systems' bytes read from the block device come from /usr/bin/time -v
("File system inputs", 512-byte units) and are checked against the expected disk bytes.
"""

import argparse
import glob
import json
import os
import random
import re
import statistics
import struct
import sys
import time


# ---------------------------------------------------------------------------------------------
# Checkpoint layout helpers


def load_index(model_dir):
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"]


def num_layers(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)["num_hidden_layers"]


def cpu_layer_count(layers, fraction):
    return int(round(fraction * layers))


def tensor_ranges(model_dir):
    """name -> (file, absolute byte offset, byte length) from the safetensors headers."""
    out = {}
    for path in sorted(glob.glob(os.path.join(model_dir, "*.safetensors"))):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            a, b = meta["data_offsets"]
            out[name] = (path, 8 + n + a, b - a)
    return out


def layer_of(name):
    m = re.match(r"model\.decoder\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def disk_layer_bytes(model_dir, fraction):
    layers = num_layers(model_dir)
    ncpu = cpu_layer_count(layers, fraction)
    ranges = tensor_ranges(model_dir)
    per_layer = [0] * layers
    for name, (_, _, length) in ranges.items():
        i = layer_of(name)
        if i is not None:
            per_layer[i] += length
    all_layers = sum(per_layer)
    total = sum(r[2] for r in ranges.values())
    return {
        "layers": layers,
        "cpu_layers": ncpu,
        "disk_layers": layers - ncpu,
        "decoder_layer_bytes": all_layers,
        "disk_bytes_per_pass": sum(per_layer[ncpu:]),
        "disk_bytes_at_fraction": (1.0 - fraction) * all_layers,
        "checkpoint_tensor_bytes": total,
    }


# ---------------------------------------------------------------------------------------------


def cmd_prompts(args):
    rng = random.Random(args.seed)
    for _ in range(args.batch):
        # Token 2 is OPT's BOS, which its tokenizer puts first; the rest avoid special ids.
        ids = [2] + [rng.randrange(4, 50000) for _ in range(args.prompt_len - 1)]
        print(",".join(map(str, ids)))


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)


def cmd_policy(args):
    import tomllib

    with open(args.template, "rb") as f:
        t = tomllib.load(f)
    prov = {k: v for k, v in t["provenance"].items() if k != "capacity_overrides"}
    prov["objective"] = "throughput"
    prov["allow_compression"] = False
    model = t["model"]
    disk = round(1.0 - args.cpu_fraction, 12)
    sections = [
        ("provenance", prov),
        ("model", model),
        ("workload", {"prompt_len": args.prompt_len, "gen_len": args.gen_len}),
        ("batch", {"gpu_batch_size": args.batch, "num_gpu_batches": 1}),
        ("placement.weights", {"gpu": 0.0, "cpu": args.cpu_fraction, "disk": disk}),
        ("placement.kv_cache", {"gpu": 0.0, "cpu": 1.0, "disk": 0.0}),
        ("placement.activations", {"gpu": 0.0, "cpu": 1.0, "disk": 0.0}),
        ("compute", {"cpu_attention": True}),
        ("compute.split", {"qkv": 1.0, "out_proj": 1.0, "fc1": 1.0, "fc2": 1.0}),
        ("compression", {"weights": False, "kv_cache": False}),
    ]
    lines = [
        "# Policy of scripts/bench-offload-vs-accelerate.sh (issue 4's disk benchmark), written by",
        "# scripts/bench_offload_accelerate.py policy: weights "
        f"{args.cpu_fraction:g} CPU / {disk:g} disk, KV cache and activations on CPU,",
        "# CPU attention, every linear layer computed on the CPU (alpha 1), no compression.",
        "# Provenance (profile and fingerprint) copied from a `planner solve` run on this machine's profile.",
    ]
    for name, d in sections:
        lines.append("")
        lines.append(f"[{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in d.items()]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


# ---------------------------------------------------------------------------------------------


def proc_io():
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def cmd_accelerate(args):
    import torch
    import accelerate
    import transformers
    from transformers import OPTForCausalLM

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads or os.cpu_count())
    layers = num_layers(args.model_dir)
    ncpu = cpu_layer_count(layers, args.cpu_fraction)
    device_map = {
        "model.decoder.embed_tokens": "cpu",
        "model.decoder.embed_positions": "cpu",
        "model.decoder.final_layer_norm": "cpu",
        "lm_head": "cpu",
    }
    for i in range(layers):
        device_map[f"model.decoder.layers.{i}"] = "cpu" if i < ncpu else "disk"
    os.makedirs(args.offload_folder, exist_ok=True)

    with open(args.prompts) as f:
        prompts = [[int(v) for v in line.split(",")] for line in f if line.strip()]
    input_ids = torch.tensor(prompts, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)

    io0 = proc_io()
    t = time.perf_counter()
    model = OPTForCausalLM.from_pretrained(
        args.model_dir,
        dtype=torch.bfloat16,
        device_map=device_map,
        offload_folder=args.offload_folder,
    ).eval()
    load_s = time.perf_counter() - t
    io_load = proc_io()
    offload_files = sum(len(fs) for _, _, fs in os.walk(args.offload_folder))
    offload_bytes = sum(
        os.path.getsize(os.path.join(d, x)) for d, _, fs in os.walk(args.offload_folder) for x in fs
    )

    # Evict each disk-resident layer's bytes from the page cache once the layer has run.
    ranges = tensor_ranges(args.model_dir)
    fds = {}
    evictions = [0]
    if args.evict:
        by_layer = {}
        for name, (path, off, length) in ranges.items():
            i = layer_of(name)
            if i is not None and i >= ncpu:
                if path not in fds:
                    fds[path] = os.open(path, os.O_RDONLY)
                by_layer.setdefault(i, []).append((fds[path], off, length))

        def make_hook(spans):
            def hook(module, inputs, output):
                for fd, off, length in spans:
                    os.posix_fadvise(fd, off, length, os.POSIX_FADV_DONTNEED)
                evictions[0] += 1

            return hook

        for i, spans in by_layer.items():
            model.model.decoder.layers[i].register_forward_hook(make_hook(spans))

    class Stamps:
        """A generate() streamer: put() gets the prompt first, then one tensor per new token."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    stamps = Stamps()
    io1 = proc_io()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=1,
            streamer=stamps,
        )
    total_s = time.perf_counter() - start
    io2 = proc_io()
    assert out.shape[1] == input_ids.shape[1] + args.new_tokens, "generate stopped early"
    # stamps.times[0] is the prompt (put before any forward pass); [1] the first new token.
    token_times = stamps.times[1:]
    assert len(token_times) == args.new_tokens, f"{len(token_times)} token stamps"
    prefill_s = token_times[0] - start
    decode_s = token_times[-1] - token_times[0]
    steps = args.new_tokens - 1
    batch = input_ids.shape[0]
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    result = {
        "system": "accelerate",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "threads": torch.get_num_threads(),
        "batch": batch,
        "prompt_len": input_ids.shape[1],
        "new_tokens": args.new_tokens,
        "cpu_layers": ncpu,
        "disk_layers": layers - ncpu,
        "evict": args.evict,
        "evictions": evictions[0],
        "load_s": load_s,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_s_per_token": decode_s / steps,
        "decode_step_s": gaps,
        "generate_s": total_s,
        "decode_tokens_per_s": batch * steps / decode_s,
        "total_tokens_per_s": batch * args.new_tokens / total_s,
        "offload_folder": args.offload_folder,
        "offload_folder_files": offload_files,
        "offload_folder_bytes": offload_bytes,
        "read_bytes_load": io_load.get("read_bytes", 0) - io0.get("read_bytes", 0),
        "read_bytes_generate": io2.get("read_bytes", 0) - io1.get("read_bytes", 0),
        "tokens_first_sequence": out[0, input_ids.shape[1]:].tolist(),
    }
    for fd in fds.values():
        os.close(fd)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(
        f"accelerate batch {batch}: load {load_s:.1f} s, prefill {prefill_s:.2f} s, decode "
        f"{decode_s / steps:.3f} s/token, {result['total_tokens_per_s']:.3f} tok/s; "
        f"disk reads during generate {result['read_bytes_generate'] / 1e9:.2f} GB; "
        f"offload folder: {offload_files} files, {offload_bytes / 1e9:.2f} GB"
    )


def cmd_bandwidth(args):
    """Direct-read (O_DIRECT) bandwidth over exactly the disk-resident layers' bytes of the
    checkpoint: aligned 1 MiB requests, `threads` requests in flight; GB/s = 10^9 bytes/s."""
    import mmap
    from concurrent.futures import ThreadPoolExecutor

    info = disk_layer_bytes(args.model_dir, args.cpu_fraction)
    ncpu = info["cpu_layers"]
    spans = {}  # file -> [lo, hi) covering its disk-resident tensors
    for name, (path, off, length) in tensor_ranges(args.model_dir).items():
        i = layer_of(name)
        if i is not None and i >= ncpu:
            lo, hi = spans.get(path, (off, off + length))
            spans[path] = (min(lo, off), max(hi, off + length))
    req = 1 << 20
    jobs = []
    for path, (lo, hi) in sorted(spans.items()):
        start = lo - lo % 4096
        for off in range(start, hi, req):
            jobs.append((path, off))
    results = []
    for threads in args.threads:
        fds = {p: os.open(p, os.O_RDONLY | os.O_DIRECT) for p in spans}
        local = {}

        def read(job):
            import threading

            buf = local.get(threading.get_ident())
            if buf is None:
                buf = local[threading.get_ident()] = mmap.mmap(-1, req)
            return os.preadv(fds[job[0]], [buf], job[1])

        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            n = sum(ex.map(read, jobs, chunksize=1))
        s = time.perf_counter() - t
        for fd in fds.values():
            os.close(fd)
        results.append({"threads": threads, "bytes": n, "seconds": s, "gbps": n / s / 1e9})
        print(f"direct read of the disk-resident layers, 1 MiB requests, {threads} in flight: "
              f"{n / 1e9:.2f} GB in {s:.1f} s = {n / s / 1e9:.3f} GB/s", flush=True)
    best = max(results, key=lambda r: r["gbps"])
    out = dict(info)
    out.update({
        "direct_read_gbps": best["gbps"],
        "method": f"O_DIRECT 1 MiB reads of the disk-resident layers' bytes, best of "
                  f"{', '.join(str(r['threads']) for r in results)} in flight",
        "passes": results,
    })
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


def cmd_disk_bytes(args):
    print(json.dumps(disk_layer_bytes(args.model_dir, args.cpu_fraction), indent=2))


# ---------------------------------------------------------------------------------------------
# Report


def parse_time_v(path):
    """Peak RSS (bytes), block-device inputs (bytes) and wall seconds from /usr/bin/time -v."""
    r = {}
    try:
        text = open(path).read()
    except OSError:
        return r
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        r["peak_rss_bytes"] = int(m.group(1)) * 1024
    m = re.search(r"File system inputs: (\d+)", text)
    if m:
        r["fs_input_bytes"] = int(m.group(1)) * 512
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if m:
        parts = [float(x) for x in m.group(1).split(":")]
        s = 0.0
        for p in parts:
            s = s * 60 + p
        r["wall_s"] = s
    m = re.search(r"Exit status: (\d+)", text)
    if m:
        r["exit"] = int(m.group(1))
    return r


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def cmd_report(args):
    d = args.results
    with open(os.path.join(d, "disk.json")) as f:
        disk = json.load(f)
    # Every invocation of the shell script measures the bandwidth once (disk-<time>.json); the
    # bound uses their median, and the spread is printed (this virtual disk varies run to run).
    bws = []
    for path in sorted(glob.glob(os.path.join(d, "disk-*.json"))):
        with open(path) as f:
            bws.append(json.load(f)["direct_read_gbps"])
    if not bws:
        bws = [disk["direct_read_gbps"]]
    bw = statistics.median(bws)  # 10^9 bytes/s
    disk_bytes = disk["disk_bytes_per_pass"]
    bound_step_s = disk_bytes / (bw * 1e9)
    runs = {}
    for path in sorted(glob.glob(os.path.join(d, "*.run*.json"))):
        m = re.match(r"(executor|accelerate)-b(\d+)\.run(\d+)\.json$", os.path.basename(path))
        if not m:
            continue
        system, batch = m.group(1), int(m.group(2))
        with open(path) as f:
            j = json.load(f)
        tv = parse_time_v(path[: -len(".json")] + ".time.txt")
        new_tokens = j.get("new_tokens", args.new_tokens)
        steps = new_tokens - 1
        prefill = j.get("prefill_s")
        decode = j.get("decode_s")
        if system == "executor":
            # The executor's report: decode_s is the whole decode phase (n - 1 steps).
            dspt = j.get("decode_s_per_token") or (decode / steps if decode is not None else None)
            tps = j.get("total_tokens_per_s")
            if tps is None and prefill is not None and decode is not None:
                tps = batch * new_tokens / (prefill + decode)
        else:
            dspt = j["decode_s_per_token"]
            tps = batch * new_tokens / (prefill + decode)
        passes = new_tokens  # prefill + (n - 1) decode steps each read every disk layer once
        runs.setdefault((system, batch), []).append(
            {
                "prefill_s": prefill,
                "decode_s_per_token": dspt,
                "tok_s": tps,
                "decode_tok_s": batch / dspt if dspt else None,
                "peak_rss": tv.get("peak_rss_bytes") or j.get("peak_rss_bytes"),
                "fs_in": tv.get("fs_input_bytes"),
                # Weight bytes read in the timed part: the executor's own count (disk_read_bytes),
                # Accelerate's /proc/self/io read_bytes over generate().
                "gen_read": j.get("disk_read_bytes", j.get("read_bytes_generate")),
                "fs_in_expected": disk_bytes * passes,
                "exit": tv.get("exit"),
                "json": j,
            }
        )

    rows = []
    header = (
        "| system | batch | runs | prefill s | decode s/token | throughput tok/s | decode tok/s | "
        "decode step / disk bound | peak RSS GiB | block-device reads GB: whole process; in generation "
        "(expected) |"
    )
    rows.append(header)
    rows.append("|" + "---|" * 10)
    summary = {}
    for (system, batch), rs in sorted(runs.items()):
        p = med([r["prefill_s"] for r in rs])
        dspt = med([r["decode_s_per_token"] for r in rs])
        tps = med([r["tok_s"] for r in rs])
        dtps = med([r["decode_tok_s"] for r in rs])
        rss = med([r["peak_rss"] for r in rs])
        fs_in = med([r["fs_in"] for r in rs])
        gen_read = med([r["gen_read"] for r in rs])
        summary[(system, batch)] = dict(prefill=p, dspt=dspt, tps=tps, dtps=dtps, rss=rss, n=len(rs))
        eff = bound_step_s / dspt if dspt else None
        rows.append(
            f"| {system} | {batch} | {len(rs)} | {fmt(p, '.2f')} | {fmt(dspt, '.3f')} | {fmt(tps, '.4f')} | "
            f"{fmt(dtps, '.4f')} | {fmt(eff, '.1%')} | {fmt(rss and rss / 2**30, '.2f')} | "
            f"{fmt(fs_in and fs_in / 1e9, '.1f')}; {fmt(gen_read and gen_read / 1e9, '.1f')} "
            f"({rs[0]['fs_in_expected'] / 1e9:.1f}) |"
        )
    lines = [
        f"Disk-resident bytes per forward pass: {disk_bytes / 1e9:.3f} GB "
        f"({disk.get('disk_layers')} of {disk.get('layers')} decoder layers); direct-read bandwidth "
        f"measured with the runs: median {bw:.3f} GB/s of {len(bws)} measurement(s) "
        f"{[round(b, 3) for b in bws]} ({disk.get('method', '')}); disk bound per decode step "
        f"{bound_step_s:.2f} s (batch B: at most B / {bound_step_s:.2f} decode tok/s).",
        "",
    ] + rows + [""]
    ratios = []
    for (system, batch), s in sorted(summary.items()):
        if system != "executor":
            continue
        if s["dspt"]:
            ratios.append(
                f"- batch {batch}: executor decode step vs disk bound: {bound_step_s / s['dspt']:.1%} "
                f"(goal >= 85%)"
            )
        js = [r["json"] for r in runs[(system, batch)]]
        rates = [j["disk_read_bytes"] / j["disk_read_busy_s"] / 1e9 for j in js
                 if j.get("disk_read_busy_s")]
        util = [j["disk_read_busy_s"] / (j["prefill_s"] + j["decode_s"]) for j in js
                if j.get("disk_read_busy_s")]
        if rates:
            ratios.append(
                f"- batch {batch}: executor's own disk channel: {med(rates):.2f} GB/s while busy, busy "
                f"{med(util):.0%} of prefill + decode (medians); decode step vs the bound at that rate: "
                f"{(disk_bytes / (med(rates) * 1e9)) / s['dspt']:.1%}"
            )
        # Per run: the device's rate while busy in that run's decode, and that run's decode step.
        dev = [(j["device_decode_read_bytes"] / j["device_decode_busy_s"] / 1e9,
                j["device_decode_busy_s"] / j["decode_s"], j["decode_s_per_token"], j["disk_device"])
               for j in js if j.get("device_decode_busy_s") and j.get("decode_s_per_token")]
        if dev:
            ratios.append(
                f"- batch {batch}: the disk device's own counters in decode ({dev[0][3]}, "
                f"{len(dev)} of {len(js)} runs): {med([d[0] for d in dev]):.2f} GB/s while busy, busy "
                f"{med([d[1] for d in dev]):.0%} of decode; decode step vs the bound at that run's "
                f"device rate: {med([disk_bytes / (d[0] * 1e9) / d[2] for d in dev]):.1%} "
                f"(medians; goal >= 85%)"
            )
        a = summary.get(("accelerate", batch))
        if a and a["tps"] and s["tps"]:
            ratios.append(
                f"- batch {batch}: executor / Accelerate throughput: {s['tps'] / a['tps']:.2f}x "
                f"(decode only {s['dtps'] / a['dtps']:.2f}x; goal >= 5x)"
            )
        budget = None
        try:
            with open(os.path.join(d, f"explain-b{batch}.json")) as f:
                budget = json.load(f)["prediction"]["memory"]["cpu"]["peak_gib"]
        except (OSError, KeyError, ValueError):
            pass
        if budget and s["rss"]:
            ratios.append(
                f"- batch {batch}: executor peak RSS {s['rss'] / 2**30:.2f} GiB vs policy CPU budget "
                f"{budget:.2f} GiB (+5% = {budget * 1.05:.2f}): "
                f"{'within' if s['rss'] <= budget * 1.05 * 2**30 else 'OVER'}"
            )
    for (system, batch), s in sorted(summary.items()):
        if system == "accelerate" and s["dspt"]:
            ratios.append(
                f"- batch {batch}: Accelerate decode step vs disk bound: {bound_step_s / s['dspt']:.1%}"
            )
    text = "\n".join(lines + ratios) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prompts")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.set_defaults(fn=cmd_prompts)
    p = sub.add_parser("policy")
    p.add_argument("--template", required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--cpu-fraction", type=float, default=0.25)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_policy)
    p = sub.add_parser("accelerate")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--cpu-fraction", type=float, default=0.25)
    p.add_argument("--prompts", required=True)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--offload-folder", required=True)
    p.add_argument("--no-evict", dest="evict", action="store_false")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_accelerate)
    p = sub.add_parser("disk-bytes")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--cpu-fraction", type=float, default=0.25)
    p.set_defaults(fn=cmd_disk_bytes)
    p = sub.add_parser("bandwidth")
    p.add_argument("--model-dir", required=True)
    p.add_argument("--cpu-fraction", type=float, default=0.25)
    p.add_argument("--threads", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4])
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_bandwidth)
    p = sub.add_parser("report")
    p.add_argument("--results", required=True)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_report)
    args = ap.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
