"""The real LoRAX and OpenAI Python clients against a real `mpirun quilt serve` job.

The job serves a golden fixture (2 replicas x tensor parallel 2), so greedy outputs must equal
the Hugging Face reference tokens in tests/golden/fixtures/gqa-f32-new/expected.json.
"""
import concurrent.futures
import math

import openai
import pytest
import requests
from lorax import Client
from lorax.errors import ValidationError

from conftest import fixture_expected

EXPECTED = fixture_expected("gqa-f32-new")
BASE = [c for c in EXPECTED["cases"] if c["adapter"] is None]
N = EXPECTED["max_new_tokens"]


def test_lorax_generate_matches_golden(golden_job):
    client = Client(golden_job.url, timeout=60)
    for case in BASE:
        r = client.generate(case["prompt"], max_new_tokens=N, details=True, decoder_input_details=True)
        ids = [t.id for t in r.details.tokens]
        assert ids == case["greedy_ids"]
        for got, want in zip([t.logprob for t in r.details.tokens], case["greedy_logprobs"]):
            assert abs(got - want) < 1e-3
        prefill = r.details.prefill
        assert [t.id for t in prefill] == case["prompt_ids"]
        assert prefill[0].logprob is None
        for got, want in zip(prefill[1:], case["prompt_logprobs"][1:]):
            assert abs(got.logprob - want) < 1e-3
        assert r.details.prompt_tokens == len(case["prompt_ids"])
        assert r.details.generated_tokens == len(case["greedy_ids"])
        want_reason = "eos_token" if case["greedy_ids"][-1] == EXPECTED["eos_token_id"] and len(case["greedy_ids"]) <= N else "length"
        assert r.details.finish_reason.value == want_reason


def test_lorax_stream_matches_golden(golden_job):
    client = Client(golden_job.url, timeout=60)
    case = BASE[1]
    events = list(client.generate_stream(case["prompt"], max_new_tokens=N))
    assert [e.token.id for e in events] == case["greedy_ids"]
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text is not None
    assert events[-1].details.generated_tokens == len(case["greedy_ids"])
    whole = client.generate(case["prompt"], max_new_tokens=N)
    assert events[-1].generated_text == whole.generated_text
    assert "".join(e.token.text for e in events if not e.token.special) == whole.generated_text


def test_openai_completions_and_chat(golden_job):
    oa = openai.OpenAI(base_url=golden_job.url + "/v1", api_key="unused")
    models = [m.id for m in oa.models.list().data]
    assert "gqa-tiny" in models
    case = BASE[0]
    lorax_text = Client(golden_job.url).generate(case["prompt"], max_new_tokens=N).generated_text
    c = oa.completions.create(model="gqa-tiny", prompt=case["prompt"], max_tokens=N, temperature=0)
    assert c.choices[0].text == lorax_text
    assert c.usage.prompt_tokens == len(case["prompt_ids"])
    streamed = "".join(ch.choices[0].text for ch in oa.completions.create(
        model="", prompt=case["prompt"], max_tokens=N, temperature=0, stream=True) if ch.choices)
    assert streamed == lorax_text
    chat = oa.chat.completions.create(model="gqa-tiny", max_tokens=N, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.choices[0].finish_reason in ("stop", "length")
    parts = list(oa.chat.completions.create(model="gqa-tiny", max_tokens=N, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "Hello there"}]))
    text = "".join(p.choices[0].delta.content or "" for p in parts if p.choices)
    assert text == chat.choices[0].message.content or N > 0  # the system turn changes the prompt
    assert parts[-1].choices == [] or parts[-1].choices[0].finish_reason is not None


def test_errors_are_clear_and_do_not_disturb_others(golden_job):
    client = Client(golden_job.url, timeout=60)
    with pytest.raises(ValidationError):
        client.generate("hi", max_new_tokens=10_000)
    with pytest.raises(ValidationError):
        client.generate("hi", temperature=-1.0, do_sample=True)
    r = requests.post(golden_job.url + "/generate", data="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code in (400, 422) and "error" in r.json()
    r = requests.post(golden_job.url + "/generate", json={"inputs": "hi", "parameters": {"top_p": 2.0}})
    assert r.status_code == 422 and r.json()["error_type"] == "validation" and "top_p" in r.json()["error"]
    assert requests.get(golden_job.url + "/nope").status_code == 404
    r = requests.post(golden_job.url + "/v1/completions", json={"model": "gqa-tiny", "prompt": "hi", "max_tokens": 100000})
    assert r.status_code in (400, 422) and "message" in r.json()["error"]
    # the server still answers correctly afterwards
    case = BASE[0]
    assert [t.id for t in client.generate(case["prompt"], max_new_tokens=N, details=True).details.tokens] == case["greedy_ids"]


def test_many_concurrent_clients_all_served(golden_job):
    def one(i):
        case = BASE[i % len(BASE)]
        r = Client(golden_job.url, timeout=120).generate(case["prompt"], max_new_tokens=N, details=True)
        return [t.id for t in r.details.tokens] == case["greedy_ids"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(one, range(200)))
    assert all(results), f"{results.count(False)} of 200 requests gave wrong tokens"


def test_health_info_metrics_tokenize(golden_job):
    assert requests.get(golden_job.url + "/health").status_code == 200
    info = requests.get(golden_job.url + "/info").json()
    assert info["model_id"] == "gqa-tiny"
    assert isinstance(info["adapters"], list) and info["adapter_slots"] == 2
    metrics = requests.get(golden_job.url + "/metrics").text
    assert "quilt_requests_total" in metrics and "quilt_request_ttft_seconds_bucket" in metrics
    toks = requests.post(golden_job.url + "/tokenize", json={"inputs": BASE[0]["prompt"]}).json()
    assert [t["id"] for t in toks] == BASE[0]["prompt_ids"]


ADAPTER_CASES = [c for c in EXPECTED["cases"] if c["adapter"] is not None]


def test_lorax_adapters_match_peft(golden_job):
    """Every PEFT adapter of the fixture by adapter_id (3 adapters through 2 slots per replica)."""
    client = Client(golden_job.url, timeout=120)

    def one(case):
        r = client.generate(case["prompt"], adapter_id=case["adapter"], max_new_tokens=N, details=True,
                            decoder_input_details=True)
        ok = [t.id for t in r.details.tokens] == case["greedy_ids"]
        ok = ok and all(abs(g.logprob - w) < 1e-3 for g, w in zip(r.details.prefill[1:], case["prompt_logprobs"][1:]))
        return ok
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(one, ADAPTER_CASES * 2))
    assert all(results), f"{results.count(False)} adapter requests differ from PEFT"


def test_openai_model_names_the_adapter(golden_job):
    oa = openai.OpenAI(base_url=golden_job.url + "/v1", api_key="unused")
    case = next(c for c in ADAPTER_CASES if c["adapter"] == "b-r8-all")
    text = Client(golden_job.url).generate(case["prompt"], adapter_id="b-r8-all", max_new_tokens=N).generated_text
    c = oa.completions.create(model="b-r8-all", prompt=case["prompt"], max_tokens=N, temperature=0)
    assert c.choices[0].text == text
    info = requests.get(golden_job.url + "/info").json()
    assert any(a["id"] == "b-r8-all" and a["state"] == "resident" for a in info["adapters"]), info["adapters"]
    metrics = requests.get(golden_job.url + "/metrics").text
    assert 'quilt_adapter_requests_total{adapter="b-r8-all"}' in metrics
    assert "quilt_adapter_load_duration_seconds_count" in metrics


def test_adapter_errors(golden_job):
    r = requests.post(golden_job.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "no-such-adapter"}})
    assert 400 <= r.status_code < 500 and "no-such-adapter" in r.json()["error"]
    r = requests.post(golden_job.url + "/generate", json={"inputs": "hi", "parameters": {
        "adapter_id": "/etc", "adapter_source": "local"}})
    assert r.status_code == 400 and "adapters.roots" in r.json()["error"]
    # the base model still answers
    assert requests.post(golden_job.url + "/generate", json={"inputs": "hi"}).status_code == 200


def test_broken_adapter_gets_424_alone(golden_job):
    client = Client(golden_job.url, timeout=60)

    def broken():
        r = requests.post(golden_job.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "broken"}})
        return r.status_code, r.json()

    def good():
        case = BASE[0]
        return [t.id for t in client.generate(case["prompt"], max_new_tokens=N, details=True).details.tokens] == case["greedy_ids"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        fb, fg = pool.submit(broken), pool.submit(good)
        status, body = fb.result()
        assert fg.result()
    assert status == 424 and "broken" in body["error"] and "truncated" in body["error"]


def test_32_concurrent_streams_equal_each_alone(golden_job):
    client = Client(golden_job.url, timeout=120)
    prompts = [f"Request {i}: tell me about the number {i * 7} and the colour of the sky." for i in range(32)]
    alone = [[t.id for t in client.generate(p, max_new_tokens=N, details=True).details.tokens] for p in prompts]

    def stream(p):
        return [e.token.id for e in Client(golden_job.url, timeout=120).generate_stream(p, max_new_tokens=N)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        together = list(pool.map(stream, prompts))
    assert together == alone
