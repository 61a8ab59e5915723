#!/usr/bin/env python3
"""Generate tiny random Gemma golden fixtures for Quilt.

Usage:
    python tests/golden/make_fixtures.py --out tests/golden/fixtures [--seed N] [--only NAME]

Every fixture folder holds a tiny random GemmaForCausalLM checkpoint (as written
by transformers, with the config.json possibly rewritten into another layout),
a small SentencePiece tokenizer, three PEFT LoRA adapters and expected.json with
the reference outputs computed on CPU in float32 by transformers + PEFT.

See tests/golden/README.md for the file format. CPU only, deterministic for a
given seed (and library versions).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import sys
import warnings

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import peft  # noqa: E402
import transformers  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GemmaConfig, GemmaForCausalLM  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
warnings.filterwarnings("ignore")

DEFAULT_SEED = 1234
MAX_NEW_TOKENS = 10
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
MARGIN_WARN = 1e-3

# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

TRAIN_TEXT = """\
The old lighthouse stood at the edge of the harbour, and every night its keeper climbed the spiral stairs to light the lamp.
Ships that passed in the dark could see the beam sweeping across the water, and they knew that the rocks were near.
In the morning the keeper wrote the weather in a small book: wind from the west, light rain, visibility four miles.
He had kept that book for thirty-one years, and the pages were full of numbers, dates and short notes about the sea.
Sometimes children from the village came to visit him. They asked how the lamp worked, why the glass was so thick,
and whether he was ever lonely. He told them that the sea was good company, and that the gulls talked more than people.
A model of language reads text as a sequence of tokens. Each token is a small piece of a word, a whole word, or a single byte.
The model looks at the tokens it has seen so far and predicts the next one, again and again, until it decides to stop.
To make this fast, a server keeps the keys and values of the attention layers in a cache, split into blocks of sixteen tokens.
When many users send requests at the same time, the server batches them together so that the processor stays busy.
Small adapters can change the behaviour of a large model without touching its weights: they add a low rank update to a few layers.
Testing such a system needs exact reference numbers, computed slowly and carefully, so that every fast path can be compared.
The recipe for the soup was simple: two onions, three carrots, a potato, salt, pepper and a litre of water.
Cook everything for forty minutes, then blend it until it is smooth, and serve it with fresh bread and butter.
On Monday the train left at 08:15 and arrived at 11:42; on Tuesday it was late by 7 minutes because of the snow.
Prices went up by 3.5 percent in 2023, while wages rose by only 2 percent, so many families had less money to spend.
Questions? Answers! Lists: one, two, three. Brackets (like these) and [these] and {these}. Quotes "like this" and 'this'.
Some words come from other languages: café, naïve, façade, jalapeño, über, smörgåsbord, and the Japanese 日本語.
A friendly face in a message looks like this 🙂 and a heart looks like this ❤ but most text is plain.
<start_of_turn>user
Tell me a short story about the sea.<end_of_turn>
<start_of_turn>model
Once upon a time a small boat sailed out of the harbour at dawn, looking for the island that nobody had ever found.<end_of_turn>
"""

SP_VOCAB_SIZE = 512


def train_tokenizer() -> bytes:
    """Train a small SentencePiece BPE model with Gemma-like settings; return the serialized proto."""
    lines = [ln for ln in TRAIN_TEXT.splitlines() if ln.strip()]
    # Repeat the corpus so that the trainer has enough pair statistics; order is fixed => deterministic.
    corpus = lines * 3
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        model_type="bpe",
        vocab_size=SP_VOCAB_SIZE,
        hard_vocab_limit=False,
        byte_fallback=True,
        character_coverage=0.995,  # rare characters (e.g. CJK, emoji) fall back to bytes
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        bos_id=BOS_ID,
        unk_id=UNK_ID,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        # Gemma's tokenizer.model: identity normalizer, no dummy prefix, whitespace kept as is,
        # digits split, whitespace-only pieces allowed.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "tokenizer_class": "GemmaTokenizer",
}
SPECIAL_TOKENS_MAP = {
    "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
    "bos_token": "<bos>",
    "eos_token": "<eos>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
}
GENERATION_CONFIG = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}

PROMPTS = [
    # short (~5 tokens)
    "The keeper wrote",
    # medium, chat template, non-ASCII (CJK + emoji -> byte fallback), newline (byte fallback)
    "<start_of_turn>user\nCafé naïve 日本語 🙂 — ¿qué tal?<end_of_turn>\n<start_of_turn>model\n",
    # long (> 40 tokens, crosses several 16-token KV blocks)
    "When the storm came in from the west, the keeper climbed the stairs again and again, "
    "checking the lamp, the glass and the small book of numbers. The ships in the harbour pulled "
    "at their ropes, and the children in the village listened to the wind until 03:30 in the morning.",
]

# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------

FIXTURES = {
    "mqa-bf16-orig": dict(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
        intermediate_size=128, rope_theta=10000.0, dtype=torch.bfloat16, layout="orig", shard=None,
    ),
    "mha-f16-new-sharded": dict(
        hidden_size=48, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
        intermediate_size=96, rope_theta=500.0, dtype=torch.float16, layout="new-hidden_activation",
        shard="40KB",
    ),
    "gqa-f32-new": dict(
        hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
        intermediate_size=160, rope_theta=10000.0, dtype=torch.float32, layout="new", shard=None,
    ),
}

ADAPTERS = {
    "a-r4-qv": dict(
        cfg=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        dtype=torch.float32,
    ),
    "b-r8-all": dict(
        cfg=dict(
            r=8, lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
        dtype=torch.bfloat16,
    ),
    "c-r2-rslora": dict(
        cfg=dict(
            r=2, lora_alpha=4, use_rslora=True, target_modules=["o_proj", "down_proj", "gate_proj"],
            rank_pattern={"down_proj": 6}, alpha_pattern={"down_proj": 3},
        ),
        dtype=torch.float16,
    ),
}

# Random re-init scales (transformers' std=0.02 default gives near-uniform logits).
# The embedding is small relative to the attention/MLP outputs so that the residual stream is
# not dominated by the current token (otherwise the model just predicts the last token again);
# with tied embeddings this also keeps the logits peaked but not one-hot.
EMBED_STD = float(os.environ.get("GOLDEN_EMBED_STD", 0.35))
LINEAR_STD = float(os.environ.get("GOLDEN_LINEAR_STD", 0.25))  # q, k, v, gate, up
OUT_STD = float(os.environ.get("GOLDEN_OUT_STD", 0.25))  # o_proj, down_proj
NORM_STD = 0.1
LORA_A_STD = 0.2
LORA_B_STD = 0.2

DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def dir_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def reinit_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Deterministically re-initialise all parameters with larger random values."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("embed_tokens.weight"):
                std = EMBED_STD
            elif "norm" in name:
                std = NORM_STD
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                std = OUT_STD
            else:
                std = LINEAR_STD
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def build_config(spec: dict, vocab_size: int) -> GemmaConfig:
    return GemmaConfig(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=2,
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        head_dim=spec["head_dim"],
        hidden_act="gelu_pytorch_tanh",
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        bos_token_id=BOS_ID,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": spec["rope_theta"]},
    )


def rewrite_config(path: str, spec: dict) -> None:
    cfg = json.load(open(path, encoding="utf-8"))
    layout = spec["layout"]
    if layout == "orig":
        # Layout of the original google/gemma-2b / gemma-7b release (transformers 4.38).
        new = {
            "architectures": ["GemmaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "head_dim": cfg["head_dim"],
            "hidden_act": "gelu",
            "hidden_size": cfg["hidden_size"],
            "initializer_range": cfg["initializer_range"],
            "intermediate_size": cfg["intermediate_size"],
            "max_position_embeddings": cfg["max_position_embeddings"],
            "model_type": "gemma",
            "num_attention_heads": cfg["num_attention_heads"],
            "num_hidden_layers": cfg["num_hidden_layers"],
            "num_key_value_heads": cfg["num_key_value_heads"],
            "pad_token_id": PAD_ID,
            "rms_norm_eps": cfg["rms_norm_eps"],
            "rope_scaling": None,
            "rope_theta": float(spec["rope_theta"]),
            "torch_dtype": DTYPE_NAMES[spec["dtype"]],
            "transformers_version": "4.38.0.dev0",
            "use_cache": True,
            "vocab_size": cfg["vocab_size"],
        }
    elif layout == "new-hidden_activation":
        # transformers 5.x layout, but with the activation given as `hidden_activation`
        # (key used by Gemma 1.1 / Gemma 2 configs) instead of `hidden_act`.
        new = dict(cfg)
        new.pop("hidden_act")
        new["hidden_activation"] = "gelu_pytorch_tanh"
        new = dict(sorted(new.items()))
    elif layout == "new":
        new = cfg  # exactly what transformers 5 writes
    else:
        raise ValueError(layout)
    # Sanity: the stored layout keys are what we promise in the README.
    if layout != "orig":
        assert new["rope_parameters"] == {"rope_theta": float(spec["rope_theta"]), "rope_type": "default"}, new
        assert new["dtype"] == DTYPE_NAMES[spec["dtype"]], new
        assert "rope_theta" not in new and "torch_dtype" not in new
    write_json(path, new)


def load_base(model_dir: str) -> GemmaForCausalLM:
    m = GemmaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    m = m.float().eval()
    check_model(m)
    return m


def check_model(m: GemmaForCausalLM) -> None:
    """STOP if the MLP activation is not the tanh-approximate GELU, or anything is not fp32/eager."""
    x = torch.linspace(-6, 6, 1001, dtype=torch.float32)
    ref_tanh = torch.nn.functional.gelu(x, approximate="tanh")
    ref_erf = torch.nn.functional.gelu(x)
    assert (ref_tanh - ref_erf).abs().max() > 1e-4
    for i, layer in enumerate(m.model.layers):
        act = layer.mlp.act_fn
        y = act(x)
        if not torch.equal(y, ref_tanh):
            sys.exit(
                f"FATAL: layer {i} MLP activation {act!r} (config hidden_act={m.config.hidden_act!r}) is NOT "
                f"the tanh-approximate GELU (max diff vs tanh {float((y - ref_tanh).abs().max())}). Stopping."
            )
    assert m.config._attn_implementation == "eager", m.config._attn_implementation
    for n, p in m.named_parameters():
        assert p.dtype == torch.float32, (n, p.dtype)
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr(), "lm_head must be tied"


@torch.no_grad()
def logits_for(model, ids: list[int]) -> torch.Tensor:
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    logits = out.logits[0]
    assert logits.dtype == torch.float32, logits.dtype
    assert torch.isfinite(logits).all()
    return logits


def compute_case(model, adapter: str | None, prompt: str, prompt_ids: list[int]) -> dict:
    logits = logits_for(model, prompt_ids)
    lp = torch.log_softmax(logits.double(), dim=-1)
    prompt_logprobs = [None] + [float(lp[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]
    last_logits = [float(f"{v:.6g}") for v in logits[-1].tolist()]

    seq = list(prompt_ids)
    greedy_ids, greedy_logprobs, greedy_margins = [], [], []
    step_logits = logits[-1]
    for step in range(MAX_NEW_TOKENS):
        if step > 0:
            step_logits = logits_for(model, seq)[-1]
        top2 = torch.topk(step_logits, 2)
        tok = int(torch.argmax(step_logits))
        assert tok == int(top2.indices[0])
        greedy_ids.append(tok)
        greedy_logprobs.append(float(torch.log_softmax(step_logits.double(), dim=-1)[tok]))
        greedy_margins.append(float(top2.values[0] - top2.values[1]))
        seq.append(tok)
        if tok == EOS_ID:
            break
    return {
        "adapter": adapter,
        "prompt": prompt,
        "prompt_ids": prompt_ids,
        "prompt_logprobs": prompt_logprobs,
        "greedy_ids": greedy_ids,
        "greedy_logprobs": greedy_logprobs,
        "greedy_margins": greedy_margins,
        "last_logits": last_logits,
    }


def make_adapter(model_dir: str, out_dir: str, name: str, spec: dict, gen: torch.Generator, fixture: str) -> None:
    base = load_base(model_dir)
    cfg = LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, bias="none", init_lora_weights=True, **spec["cfg"])
    pm = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_A." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_A_STD)
            elif ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * LORA_B_STD)
        for n, p in pm.named_parameters():
            if ".lora_" in n:
                p.data = p.data.to(spec["dtype"])
    pm.save_pretrained(out_dir)
    # Drop the auto-generated model card and make the config location-independent.
    readme = os.path.join(out_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    acfg_path = os.path.join(out_dir, "adapter_config.json")
    acfg = json.load(open(acfg_path, encoding="utf-8"))
    acfg["base_model_name_or_path"] = fixture
    # PEFT stores target_modules from a set (order depends on PYTHONHASHSEED): sort for determinism.
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])
    write_json(acfg_path, dict(sorted(acfg.items())))
    # Verify the saved tensors: dtype, names, rank per module.
    sd = load_file(os.path.join(out_dir, "adapter_model.safetensors"))
    targets = set(spec["cfg"]["target_modules"])
    rank_pattern = spec["cfg"].get("rank_pattern", {})
    n_layers = base.config.num_hidden_layers
    assert len(sd) == 2 * len(targets) * n_layers, sorted(sd)
    for k, v in sd.items():
        assert v.dtype == spec["dtype"], (k, v.dtype)
        mod = k.split(".")[-3]
        assert mod in targets, k
        r = rank_pattern.get(mod, spec["cfg"]["r"])
        if ".lora_A." in k:
            assert v.shape[0] == r, (k, v.shape)
        else:
            assert v.shape[1] == r, (k, v.shape)


def load_adapter_model(model_dir: str, adapter_dir: str, spec: dict):
    base = load_base(model_dir)
    pm = PeftModel.from_pretrained(base, adapter_dir)
    pm = pm.float().eval()
    # The reference must use exactly the stored (bf16/fp16/fp32) values, upcast to fp32.
    sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    params = dict(pm.named_parameters())
    n_checked = 0
    for k, v in sd.items():
        pk = k.replace(".weight", ".default.weight")
        p = params[pk]
        assert p.dtype == torch.float32
        assert torch.equal(p.detach(), v.float()), k
        n_checked += 1
    assert n_checked == len(sd)
    # Check PEFT's scaling against the documented formula.
    c = spec["cfg"]
    for n, m in pm.named_modules():
        if hasattr(m, "scaling") and isinstance(getattr(m, "scaling"), dict) and "default" in m.scaling:
            short = n.split(".")[-1]
            r = c.get("rank_pattern", {}).get(short, c["r"])
            alpha = c.get("alpha_pattern", {}).get(short, c["lora_alpha"])
            want = alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r
            assert m.r["default"] == r and abs(m.scaling["default"] - want) < 1e-12, (n, m.r, m.scaling, want)
    return pm


# --------------------------------------------------------------------------------------
# Independent float64 NumPy re-implementation, straight from the files on disk. It checks
# that the semantics documented in README.md (which the C++ engine follows) reproduce the
# transformers/PEFT reference.
# --------------------------------------------------------------------------------------


def _load_tensors(fdir: str) -> dict:
    idx = os.path.join(fdir, "model.safetensors.index.json")
    if os.path.exists(idx):
        files = sorted(set(json.load(open(idx, encoding="utf-8"))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out = {}
    for f in files:
        for k, v in load_file(os.path.join(fdir, f)).items():
            assert k not in out, k
            out[k] = v.float().numpy().astype(np.float64)
    return out


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def numpy_reference_logits(fdir: str, adapter_dir: str | None, ids: list[int]) -> np.ndarray:
    cfg = json.load(open(os.path.join(fdir, "config.json"), encoding="utf-8"))
    act = cfg.get("hidden_activation") or cfg.get("hidden_act")
    assert act in ("gelu", "gelu_pytorch_tanh"), act  # Gemma: both mean tanh-approximate GELU
    theta = cfg["rope_parameters"]["rope_theta"] if "rope_parameters" in cfg else cfg["rope_theta"]
    H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps = cfg["rms_norm_eps"]
    W = _load_tensors(fdir)

    lora = {}
    if adapter_dir is not None:
        acfg = json.load(open(os.path.join(adapter_dir, "adapter_config.json"), encoding="utf-8"))
        sd = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
        prefix = "base_model.model."
        for k, v in sd.items():
            assert k.startswith(prefix) and k.endswith((".lora_A.weight", ".lora_B.weight")), k
            mod, ab = k[len(prefix):].rsplit(".", 2)[0], k.rsplit(".", 2)[1]
            lora.setdefault(mod, {})[ab] = v.float().numpy().astype(np.float64)
        for mod, d in lora.items():
            short = mod.split(".")[-1]
            r = acfg["rank_pattern"].get(short, acfg["r"])
            alpha = acfg["alpha_pattern"].get(short, acfg["lora_alpha"])
            assert d["lora_A"].shape[0] == r and d["lora_B"].shape[1] == r
            d["scale"] = alpha / math.sqrt(r) if acfg["use_rslora"] else alpha / r

    def linear(name, x):
        y = x @ W[name + ".weight"].T
        if name in lora:
            d = lora[name]
            y = y + d["scale"] * ((x @ d["lora_A"].T) @ d["lora_B"].T)
        return y

    def rmsnorm(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + w)

    T = len(ids)
    emb = W["model.embed_tokens.weight"]
    x = emb[ids] * np.float64(np.float32(math.sqrt(H)))  # HF: fp32 scalar sqrt(hidden_size)
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, hd/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # v: [T, n, hd]; rotate_half convention (pairs i, i + hd/2)
        a, b = v[..., : hd // 2], v[..., hd // 2 :]
        c, s = cos[:, None, :], sin[:, None, :]
        return np.concatenate([a * c - b * s, b * c + a * s], axis=-1)

    mask = np.triu(np.full((T, T), -np.inf), k=1)
    for L in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{L}."
        h = rmsnorm(x, W[p + "input_layernorm.weight"])
        q = rope(linear(p + "self_attn.q_proj", h).reshape(T, nh, hd))
        k = rope(linear(p + "self_attn.k_proj", h).reshape(T, nkv, hd))
        v = linear(p + "self_attn.v_proj", h).reshape(T, nkv, hd)
        out = np.zeros((T, nh, hd))
        for hh in range(nh):
            kv = hh // (nh // nkv)  # query head hh uses kv head hh // group
            sc = q[:, hh, :] @ k[:, kv, :].T * hd**-0.5 + mask
            sc = np.exp(sc - sc.max(axis=-1, keepdims=True))
            out[:, hh, :] = (sc / sc.sum(axis=-1, keepdims=True)) @ v[:, kv, :]
        x = x + linear(p + "self_attn.o_proj", out.reshape(T, nh * hd))
        h = rmsnorm(x, W[p + "post_attention_layernorm.weight"])
        g = _gelu_tanh(linear(p + "mlp.gate_proj", h)) * linear(p + "mlp.up_proj", h)
        x = x + linear(p + "mlp.down_proj", g)
    x = rmsnorm(x, W["model.norm.weight"])
    return x @ emb.T  # tied lm_head


def check_numpy(fdir: str, adapter: str | None, case: dict) -> float:
    adir = os.path.join(fdir, "adapters", adapter) if adapter else None
    ids = case["prompt_ids"] + case["greedy_ids"]
    ref = numpy_reference_logits(fdir, adir, ids)
    lp = ref - ref.max(axis=-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(axis=-1, keepdims=True))
    n = len(case["prompt_ids"])
    err = float(np.abs(ref[n - 1] - np.array(case["last_logits"])).max())
    for i in range(1, n):
        err = max(err, abs(lp[i - 1, ids[i]] - case["prompt_logprobs"][i]))
    for j, tok in enumerate(case["greedy_ids"]):
        row = ref[n - 1 + j]
        assert int(np.argmax(row)) == tok, (adapter, case["prompt"][:20], j)
        err = max(err, abs(lp[n - 1 + j, tok] - case["greedy_logprobs"][j]))
    assert err < 2e-3, (adapter, case["prompt"][:20], err)
    return err


def make_fixture(name: str, spec: dict, out_root: str, seed: int, sp_proto: bytes) -> None:
    fdir = os.path.join(out_root, name)
    if os.path.exists(fdir):
        shutil.rmtree(fdir)
    os.makedirs(fdir)

    # Tokenizer files.
    with open(os.path.join(fdir, "tokenizer.model"), "wb") as f:
        f.write(sp_proto)
    write_json(os.path.join(fdir, "tokenizer_config.json"), TOKENIZER_CONFIG)
    write_json(os.path.join(fdir, "special_tokens_map.json"), SPECIAL_TOKENS_MAP)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(fdir, "tokenizer.model"))
    vocab = sp.get_piece_size()

    # Per-fixture deterministic generator.
    fseed = seed * 1000 + sorted(FIXTURES).index(name)
    torch.manual_seed(fseed)
    gen = torch.Generator().manual_seed(fseed)

    cfg = build_config(spec, vocab)
    model = GemmaForCausalLM(cfg).float()
    reinit_(model, gen)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model = model.to(spec["dtype"])
    kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    model.save_pretrained(fdir, **kwargs)
    write_json(os.path.join(fdir, "generation_config.json"), GENERATION_CONFIG)

    files = sorted(os.listdir(fdir))
    if spec["shard"]:
        shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
        assert len(shards) >= 2 and "model.safetensors.index.json" in files, files
        assert "model.safetensors" not in files
    else:
        assert "model.safetensors" in files and "model.safetensors.index.json" not in files, files

    # Reference from the config exactly as transformers wrote it, then rewrite the layout
    # and verify the rewritten config gives bit-identical outputs.
    ref_model = load_base(fdir)
    probe = [BOS_ID] + sp.encode(PROMPTS[2])
    probe_logits = logits_for(ref_model, probe)
    del ref_model
    rewrite_config(os.path.join(fdir, "config.json"), spec)
    base = load_base(fdir)
    assert base.config.vocab_size == vocab
    assert base.config.rope_parameters["rope_theta"] == spec["rope_theta"], base.config.rope_parameters
    assert base.config.hidden_act == "gelu_pytorch_tanh", base.config.hidden_act
    assert torch.equal(logits_for(base, probe), probe_logits), "rewritten config changes outputs"
    # Stored weights are the upcast of the saved dtype.
    emb = base.model.embed_tokens.weight
    assert torch.equal(emb, emb.to(spec["dtype"]).float())

    # Prompts.
    prompt_ids = []
    for text in PROMPTS:
        ids = [BOS_ID] + sp.encode(text)
        # Round trip through a fresh processor loaded from the file we ship.
        sp2 = spm.SentencePieceProcessor()
        sp2.load(os.path.join(fdir, "tokenizer.model"))
        assert [BOS_ID] + sp2.encode(text) == ids
        assert sp.decode(ids[1:]) == text, (sp.decode(ids[1:]), text)
        prompt_ids.append(ids)
    assert len(prompt_ids[0]) <= 8, len(prompt_ids[0])
    assert len(prompt_ids[2]) > 40, len(prompt_ids[2])
    byte_ids = [i for i in prompt_ids[1] if sp.is_byte(i)]
    assert byte_ids, "non-ASCII prompt must exercise byte fallback"
    assert sp.piece_to_id("<start_of_turn>") in prompt_ids[1]

    cases = []
    for text, ids in zip(PROMPTS, prompt_ids):
        cases.append(compute_case(base, None, text, ids))
    del base

    adir_root = os.path.join(fdir, "adapters")
    for aname, aspec in ADAPTERS.items():
        adir = os.path.join(adir_root, aname)
        make_adapter(fdir, adir, aname, aspec, gen, name)
        pm = load_adapter_model(fdir, adir, aspec)
        for text, ids in zip(PROMPTS, prompt_ids):
            cases.append(compute_case(pm, aname, text, ids))
        del pm

    # Adapters must visibly change the outputs.
    base_last = {c["prompt"]: c["last_logits"] for c in cases if c["adapter"] is None}
    for c in cases:
        if c["adapter"] is not None:
            diff = max(abs(a - b) for a, b in zip(c["last_logits"], base_last[c["prompt"]]))
            assert diff > 0.1, (c["adapter"], diff)

    # Independent NumPy float64 re-implementation from the files on disk.
    np_err = max(check_numpy(fdir, c["adapter"], c) for c in cases)

    # transformers' own GemmaTokenizer (converted from tokenizer.model) must agree with sentencepiece.
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(fdir)
    for text, ids in zip(PROMPTS, prompt_ids):
        assert hf_tok(text)["input_ids"] == ids, (text, hf_tok(text)["input_ids"], ids)

    min_margin = min(m for c in cases for m in c["greedy_margins"])
    for c in cases:
        for i, m in enumerate(c["greedy_margins"]):
            if m < MARGIN_WARN:
                print(f"WARNING: {name} adapter={c['adapter']} prompt#{PROMPTS.index(c['prompt'])} step {i}: "
                      f"greedy margin {m:.3g} < {MARGIN_WARN} (unstable tie)", file=sys.stderr)

    expected = {
        "fixture": name,
        "generator": {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": peft.__version__,
            "sentencepiece": spm.__version__,
            "seed": seed,
            "init_std": {"embed": EMBED_STD, "qkv_gate_up": LINEAR_STD, "o_down": OUT_STD, "norm": NORM_STD,
                         "lora_A": LORA_A_STD, "lora_B": LORA_B_STD},
        },
        "max_new_tokens": MAX_NEW_TOKENS,
        "eos_token_id": EOS_ID,
        "bos_token_id": BOS_ID,
        "vocab_size": vocab,
        "cases": cases,
    }
    with open(os.path.join(fdir, "expected.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False)
        f.write("\n")

    n_gen = sum(len(c["greedy_ids"]) for c in cases)
    print(f"{name}: vocab={vocab} dtype={DTYPE_NAMES[spec['dtype']]} layout={spec['layout']} "
          f"cases={len(cases)} prompt_lens={[len(p) for p in prompt_ids]} generated={n_gen} "
          f"min_margin={min_margin:.3f} numpy_max_err={np_err:.1e} size={dir_size(fdir) / 1024:.1f} KiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (fixtures are written to OUT/<name>/)")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--only", choices=sorted(FIXTURES), help="build only this fixture")
    args = ap.parse_args()

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    np.random.seed(args.seed)

    sp_proto = train_tokenizer()
    assert sp_proto == train_tokenizer(), "sentencepiece training is not deterministic"

    os.makedirs(args.out, exist_ok=True)
    names = [args.only] if args.only else list(FIXTURES)
    for name in names:
        make_fixture(name, FIXTURES[name], args.out, args.seed, sp_proto)
    print(f"total: {dir_size(args.out) / 1024:.1f} KiB in {args.out}")


if __name__ == "__main__":
    main()
