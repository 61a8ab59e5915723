#!/usr/bin/env python3
"""How far Hugging Face's own bf16 run is from its fp32 golden outputs (tests/golden/fixtures).

Context for the bf16 tolerance of tests/model/test_golden_cuda.cpp: the same tiny random
checkpoints, run by transformers in bfloat16 on the GPU, prompt logprobs and last-prompt logits
compared with expected.json (transformers fp32 on the CPU), and how many greedy ids of the
fp32 path the bf16 model reproduces (teacher-forced on the fp32 path).

    python3 launch/experiments/hf_bf16_error.py [tests/golden/fixtures]
"""
import json
import os
import sys
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import GemmaForCausalLM  # noqa: E402


@torch.no_grad()
def main() -> None:
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/golden/fixtures"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    worst_all = 0.0
    for name in sorted(os.listdir(root)):
        fdir = os.path.join(root, name)
        if not os.path.exists(os.path.join(fdir, "expected.json")):
            continue
        exp = json.load(open(os.path.join(fdir, "expected.json")))
        for attn in ("eager", "sdpa"):
            m = GemmaForCausalLM.from_pretrained(fdir, dtype=torch.bfloat16, attn_implementation=attn).to(dev).eval()
            worst_lp = worst_logit = 0.0
            agree = total = 0
            for c in exp["cases"]:
                if c["adapter"] is not None:
                    continue
                ids = c["prompt_ids"]
                seq = ids + c["greedy_ids"][:-1]  # teacher-forced on the fp32 greedy path
                logits = m(input_ids=torch.tensor([seq], device=dev)).logits[0].float()
                lp = torch.log_softmax(logits.double(), dim=-1)
                for i in range(1, len(ids)):
                    worst_lp = max(worst_lp, abs(float(lp[i - 1, ids[i]]) - c["prompt_logprobs"][i]))
                last = logits[len(ids) - 1].double().cpu()
                worst_logit = max(worst_logit, float((last - torch.tensor(c["last_logits"], dtype=torch.float64)).abs().max()))
                for j, tok in enumerate(c["greedy_ids"]):
                    total += 1
                    agree += int(int(torch.argmax(logits[len(ids) - 1 + j])) == tok)
            worst_all = max(worst_all, worst_lp)
            print(f"[hf-bf16] {name:22s} attn={attn:5s} max |prompt logprob - fp32| {worst_lp:.3g}; "
                  f"max |last logit - fp32| {worst_logit:.3g}; greedy argmax agrees {agree}/{total}")
    print(f"[hf-bf16] worst |prompt logprob - fp32| over all fixtures: {worst_all:.3g} (device {dev}, torch {torch.__version__})")


if __name__ == "__main__":
    main()
