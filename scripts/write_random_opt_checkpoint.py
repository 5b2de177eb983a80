#!/usr/bin/env python3
"""Write a random-weight OPT checkpoint in Hugging Face layout, once.

    write_random_opt_checkpoint.py --model opt-6.7b --out DIR [--shard-gib 2] [--seed 0]
    write_random_opt_checkpoint.py --model opt-6.7b --out DIR --check     (exit 0 iff DIR is valid)

The layout is what `OPTForCausalLM.save_pretrained` writes for bf16: config.json (model_type opt,
torch_dtype/dtype bfloat16), model.safetensors.index.json and model-0000k-of-0000n.safetensors
shards. Tensor names and shapes are taken from transformers' own OPTForCausalLM built on the meta
device (so nothing is allocated), minus the tied lm_head.weight, which save_pretrained leaves out.

Values: linear and embedding weights ~ N(0, 0.02^2) (OPT's init std, which keeps activations
finite through 32 layers), biases 0, LayerNorm weight 1 / bias 0. Generated one tensor at a time,
so peak memory is about one shard. A checkpoint is "valid" when the index exists, every shard it
names exists with the size recorded in `strata_random_checkpoint.json`, and the config matches.
"""

import argparse
import json
import os
import sys
import time

OPT_SHAPES = {
    "opt-125m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, ffn_dim=3072),
    "opt-1.3b": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=32, ffn_dim=8192),
    "opt-2.7b": dict(num_hidden_layers=32, hidden_size=2560, num_attention_heads=32, ffn_dim=10240),
    "opt-6.7b": dict(num_hidden_layers=32, hidden_size=4096, num_attention_heads=32, ffn_dim=16384),
    "opt-13b": dict(num_hidden_layers=40, hidden_size=5120, num_attention_heads=40, ffn_dim=20480),
}
MARKER = "strata_random_checkpoint.json"
INDEX = "model.safetensors.index.json"


def make_config(name):
    from transformers import OPTConfig

    s = OPT_SHAPES[name]
    cfg = OPTConfig(
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=s["hidden_size"],
        do_layer_norm_before=True,
        activation_function="relu",
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=2,
        pad_token_id=1,
        **s,
    )
    cfg.architectures = ["OPTForCausalLM"]
    cfg.dtype = "bfloat16"
    return cfg


def tensor_specs(cfg):
    """(name, shape) in transformers' state_dict order, without the tied lm_head."""
    import torch
    from transformers import OPTForCausalLM

    with torch.device("meta"):
        model = OPTForCausalLM(cfg)
    specs = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        specs.append((name, tuple(t.shape)))
    return specs


def check(out, cfg_dict):
    try:
        with open(os.path.join(out, MARKER)) as f:
            marker = json.load(f)
        with open(os.path.join(out, "config.json")) as f:
            cfg = json.load(f)
        with open(os.path.join(out, INDEX)) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        return f"missing or unreadable: {e}"
    for k in ("num_hidden_layers", "hidden_size", "ffn_dim", "num_attention_heads", "vocab_size"):
        if cfg.get(k) != cfg_dict[k]:
            return f"config.json {k} = {cfg.get(k)}, want {cfg_dict[k]}"
    shards = sorted(set(index["weight_map"].values()))
    for shard in shards:
        p = os.path.join(out, shard)
        want = marker["shard_bytes"].get(shard)
        if not os.path.exists(p) or os.path.getsize(p) != want:
            return f"shard {shard} missing or of the wrong size"
    return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="opt-6.7b", choices=sorted(OPT_SHAPES))
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-gib", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--check", action="store_true", help="only check; exit 1 if not valid")
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    cfg = make_config(args.model)
    cfg_dict = cfg.to_dict()
    why = check(args.out, cfg_dict)
    if why is None:
        print(f"checkpoint {args.out}: valid, reusing it")
        return 0
    if args.check:
        print(f"checkpoint {args.out}: not valid ({why})")
        return 1
    print(f"checkpoint {args.out}: writing ({why})", flush=True)

    os.makedirs(args.out, exist_ok=True)
    # Remove the marker first, so an interrupted write is never taken for a valid checkpoint.
    try:
        os.remove(os.path.join(args.out, MARKER))
    except FileNotFoundError:
        pass
    specs = tensor_specs(cfg)
    limit = int(args.shard_gib * (1 << 30))
    groups, cur, cur_bytes = [], [], 0
    for name, shape in specs:
        n = 2
        for d in shape:
            n *= d
        if cur and cur_bytes + n > limit:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += n
    groups.append(cur)

    torch.set_num_threads(1)  # a shared machine; this is mostly I/O anyway
    gen = torch.Generator().manual_seed(args.seed)
    weight_map, shard_bytes, total = {}, {}, 0
    t0 = time.perf_counter()
    for k, group in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if "layer_norm" in name:
                t = torch.ones(shape) if name.endswith(".weight") else torch.zeros(shape)
            elif name.endswith(".bias"):
                t = torch.zeros(shape)
            else:
                t = torch.empty(shape, dtype=torch.float32).normal_(0.0, args.std, generator=gen)
            tensors[name] = t.to(torch.bfloat16).contiguous()
            weight_map[name] = shard
            total += tensors[name].numel() * 2
        path = os.path.join(args.out, shard)
        save_file(tensors, path, metadata={"format": "pt"})
        del tensors
        shard_bytes[shard] = os.path.getsize(path)
        print(f"  {shard}: {shard_bytes[shard] / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)", flush=True)

    cfg.save_pretrained(args.out)  # config.json
    # transformers 5 writes "dtype"; older readers look for "torch_dtype": write both.
    with open(os.path.join(args.out, "config.json")) as f:
        cfg_json = json.load(f)
    cfg_json["torch_dtype"] = "bfloat16"
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2, sort_keys=True)
    with open(os.path.join(args.out, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.sync()
    with open(os.path.join(args.out, MARKER), "w") as f:
        json.dump({"model": args.model, "seed": args.seed, "std": args.std, "shard_bytes": shard_bytes}, f, indent=2)
    print(f"checkpoint {args.out}: {total / 1e9:.2f} GB of tensors in {len(groups)} shards, "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
