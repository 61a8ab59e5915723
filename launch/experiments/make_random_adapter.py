#!/usr/bin/env python3
"""Writes a random PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, f16) for a
checkpoint made by make_random_gemma.py, targeting all 7 projections. For timing only.
  python3 launch/experiments/make_random_adapter.py --model /tmp/gemma-small --out /tmp/lora-r16 --rank 16
"""
import argparse, json, os, struct
import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    c = json.load(open(os.path.join(a.model, "config.json")))
    H, I, D = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    dims = {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    rng = np.random.default_rng(a.seed)
    os.makedirs(a.out, exist_ok=True)
    json.dump({"peft_type": "LORA", "r": a.rank, "lora_alpha": 2 * a.rank, "target_modules": sorted(dims),
               "use_rslora": False, "bias": "none"}, open(os.path.join(a.out, "adapter_config.json"), "w"))
    header, blobs, off = {}, [], 0
    for l in range(c["num_hidden_layers"]):
        for t, (i, o) in dims.items():
            part = "self_attn" if t in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            for ab, shape in (("A", (a.rank, i)), ("B", (o, a.rank))):
                arr = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype("<f2").tobytes()
                header[f"base_model.model.model.layers.{l}.{part}.{t}.lora_{ab}.weight"] = {
                    "dtype": "F16", "shape": list(shape), "data_offsets": [off, off + len(arr)]}
                blobs.append(arr)
                off += len(arr)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(os.path.join(a.out, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        for b in blobs:
            f.write(b)
    print(f"wrote rank-{a.rank} adapter ({off / 2**20:.1f} MiB) to {a.out}")


if __name__ == "__main__":
    main()
