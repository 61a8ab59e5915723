#!/usr/bin/env python3
"""Writes a random-weight Gemma checkpoint with given shapes, for timing (not for correctness).

Needs only numpy. The tokenizer is copied from a golden fixture (512 pieces); the model's vocab
may be larger, as real Gemma's is. Example:
  python3 launch/experiments/make_random_gemma.py --out /tmp/gemma-small --preset small
  python3 launch/experiments/make_random_gemma.py --out /tmp/gemma-2b --preset gemma-2b --dtype bfloat16
"""
import argparse, json, os, shutil, struct
import numpy as np

PRESETS = {
    # name: hidden, layers, heads, kv_heads, head_dim, intermediate, vocab
    "small": (512, 8, 8, 1, 64, 4096, 32000),
    "gemma-2b": (2048, 18, 8, 1, 256, 16384, 256000),
    "gemma-7b": (3072, 28, 16, 16, 256, 24576, 256000),
}
HERE = os.path.dirname(os.path.abspath(__file__))
TOKENIZER_FROM = os.path.join(HERE, "..", "..", "tests", "golden", "fixtures", "gqa-f32-new")


def to_dtype(a, dtype):
    if dtype == "float32":
        return a.astype("<f4").tobytes(), "F32"
    if dtype == "float16":
        return a.astype("<f2").tobytes(), "F16"
    bits = a.astype("<f4").view("<u4")
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")  # round to nearest even
    return bits.tobytes(), "BF16"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    H, L, nh, nkv, D, inter, V = PRESETS[args.preset]
    rng = np.random.default_rng(args.seed)
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for l in range(L):
        p = f"model.layers.{l}."
        shapes.update({
            p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
            p + "self_attn.q_proj.weight": (nh * D, H), p + "self_attn.k_proj.weight": (nkv * D, H),
            p + "self_attn.v_proj.weight": (nkv * D, H), p + "self_attn.o_proj.weight": (H, nh * D),
            p + "mlp.gate_proj.weight": (inter, H), p + "mlp.up_proj.weight": (inter, H),
            p + "mlp.down_proj.weight": (H, inter)})
    os.makedirs(args.out, exist_ok=True)
    header, offset, names = {}, 0, sorted(shapes)
    for n in names:
        nbytes = int(np.prod(shapes[n])) * (4 if args.dtype == "float32" else 2)
        header[n] = {"dtype": {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[args.dtype],
                     "shape": list(shapes[n]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(os.path.join(args.out, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for n in names:
            shape = shapes[n]
            std = 0.1 if len(shape) == 1 else 1.0 / np.sqrt(shape[-1])
            for chunk in np.array_split(np.arange(shape[0]), max(1, shape[0] // 4096)):
                block = rng.standard_normal((len(chunk),) + tuple(shape[1:]), dtype=np.float32) * std
                f.write(to_dtype(block, args.dtype)[0])
    cfg = {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": V,
           "hidden_size": H, "intermediate_size": inter, "num_hidden_layers": L,
           "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": D,
           "rms_norm_eps": 1e-6, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
           "hidden_activation": "gelu_pytorch_tanh", "dtype": args.dtype,
           "max_position_embeddings": 8192, "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_FROM, name), args.out)
    print(f"wrote {args.preset} ({args.dtype}, {offset / 2**20:.0f} MiB) to {args.out}")


if __name__ == "__main__":
    main()
