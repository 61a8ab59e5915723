"""The HTTP API at tensor parallel 1 and 4 (test_clients.py covers 2): every case of the golden
fixture, base and PEFT adapters, gives the reference prompt logprobs (1e-3) and greedy tokens."""
import concurrent.futures

from lorax import Client

from conftest import fixture_expected

EXPECTED = fixture_expected("gqa-f32-new")
N = EXPECTED["max_new_tokens"]


def test_every_case_matches_reference(tp_job):
    def one(case):
        kw = {"adapter_id": case["adapter"]} if case["adapter"] else {}
        r = Client(tp_job.url, timeout=120).generate(case["prompt"], max_new_tokens=N, details=True,
                                                      decoder_input_details=True, **kw)
        ok = [t.id for t in r.details.tokens] == case["greedy_ids"]
        return ok and all(abs(g.logprob - w) < 1e-3 for g, w in zip(r.details.prefill[1:], case["prompt_logprobs"][1:]))
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, EXPECTED["cases"]))
    assert all(results), [c["adapter"] for c, ok in zip(EXPECTED["cases"], results) if not ok]
