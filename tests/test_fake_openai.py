"""Tests for support.fake_openai, driven through the real ``openai`` SDK (no mocks)."""

from __future__ import annotations

import json
import math
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from support.fake_openai import (
    FakeOpenAI,
    _Bucket,
    _encoding,
    _fmt_duration,
    count_tokens,
    fake_vector,
)

MODEL = "text-embedding-3-small"


def client_for(srv: FakeOpenAI, *, timeout: float = 5, api_key: str = "sk-test") -> openai.OpenAI:
    return openai.OpenAI(api_key=api_key, base_url=srv.base_url, max_retries=0, timeout=timeout)


@pytest.fixture
def srv():
    with FakeOpenAI(api_key="sk-test") as s:
        yield s


@pytest.fixture
def client(srv):
    c = client_for(srv)
    yield c
    c.close()


def http(method: str, url: str, body=None, headers=None):
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"null")


# --------------------------------------------------------------------------- vectors


def test_fake_vector_is_deterministic_normalised_float32():
    v = fake_vector("hello", 1536)
    assert len(v) == 1536 and v == fake_vector("hello", 1536)
    assert v != fake_vector("hello!", 1536)
    assert v != fake_vector("hello", 1536, model="text-embedding-3-large")
    assert abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-5
    import numpy as np

    assert np.array_equal(np.asarray(v, dtype=np.float32).astype(np.float64), np.asarray(v))
    # matryoshka-like: a shorter vector is the renormalised prefix of the longer one
    short = np.asarray(fake_vector("hello", 64))
    prefix = np.asarray(v[:64])
    assert np.allclose(short, prefix / np.linalg.norm(prefix), atol=1e-6)
    # lone surrogates must not crash
    assert len(fake_vector("\ud800x", 8)) == 8


def test_float_and_base64_return_exact_fake_vectors(client):
    texts = ["hello world", "ünïcödé ✓", "x" * 50]
    r_b64 = client.embeddings.create(model=MODEL, input=texts)  # SDK default: base64
    r_float = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    for r in (r_b64, r_float):
        assert r.object == "list" and r.model == MODEL
        assert [d.index for d in r.data] == [0, 1, 2]
        for d, t in zip(r.data, texts, strict=True):
            assert d.embedding == fake_vector(t, 1536, MODEL)
    # explicit base64 is left undecoded by the SDK: decode it ourselves
    import base64

    import numpy as np

    r_raw = client.embeddings.create(model=MODEL, input="hello world", encoding_format="base64")
    raw = r_raw.data[0].embedding
    assert isinstance(raw, str)
    assert np.frombuffer(base64.b64decode(raw), dtype="<f4").tolist() == fake_vector("hello world", 1536)


def test_single_string_and_token_inputs(client):
    enc = _encoding()
    r = client.embeddings.create(model=MODEL, input="just one", encoding_format="float")
    assert len(r.data) == 1 and r.data[0].embedding == fake_vector("just one", 1536)
    toks = enc.encode("token input")
    r = client.embeddings.create(model=MODEL, input=toks, encoding_format="float")
    assert len(r.data) == 1 and r.usage.prompt_tokens == len(toks)
    assert r.data[0].embedding == fake_vector("token input", 1536)
    r = client.embeddings.create(model=MODEL, input=[toks, enc.encode("abc")], encoding_format="float")
    assert len(r.data) == 2 and r.usage.prompt_tokens == len(toks) + len(enc.encode("abc"))


def test_model_dimensions_and_dimensions_param(client):
    r = client.embeddings.create(model="text-embedding-3-large", input="a", encoding_format="float")
    assert len(r.data[0].embedding) == 3072
    r = client.embeddings.create(model="text-embedding-ada-002", input="a")
    assert r.data[0].embedding == fake_vector("a", 1536, "text-embedding-ada-002")
    r = client.embeddings.create(model=MODEL, input=["a", "b"], dimensions=256)
    assert [d.embedding for d in r.data] == [fake_vector("a", 256), fake_vector("b", 256)]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="text-embedding-ada-002", input="a", dimensions=256)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="a", dimensions=1537)
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input="a", dimensions=0)


def test_dimensions_override(srv, client):
    srv.configure(dimensions_override=7)
    r = client.embeddings.create(model=MODEL, input="a")
    assert r.data[0].embedding == fake_vector("a", 7)


def test_usage_tokens_match_tiktoken(client):
    texts = ["The quick brown fox jumps over the lazy dog.", "<|endoftext|> is plain text here", "日本語のテキスト"]
    r = client.embeddings.create(model=MODEL, input=texts)
    expected = sum(len(_encoding().encode_ordinary(t)) for t in texts)
    assert r.usage.prompt_tokens == r.usage.total_tokens == expected == sum(map(count_tokens, texts))


def test_limits(srv, client):
    long_text = " a" * 8193
    assert count_tokens(long_text) == 8193
    with pytest.raises(openai.BadRequestError) as ei:
        client.embeddings.create(model=MODEL, input=["fine", long_text])
    assert "maximum context length is 8192 tokens" in ei.value.message
    client.embeddings.create(model=MODEL, input=" a" * 8192)  # exactly at the limit is fine
    with pytest.raises(openai.BadRequestError) as ei:
        client.embeddings.create(model=MODEL, input=["ok", ""])
    assert "'$.input' is invalid" in ei.value.message
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL, input=["x"] * 2049)
    r = client.embeddings.create(model=MODEL, input=["x"] * 2048)
    assert len(r.data) == 2048
    with pytest.raises(openai.BadRequestError) as ei:
        client.embeddings.create(model=MODEL, input=[" a" * 8000] * 38)  # 304,000 tokens
    assert "300000" in ei.value.message
    assert [e["status"] for e in srv.log] == [400, 200, 400, 400, 200, 400]


def test_malformed_json_and_unknown_paths(srv):
    auth = {"Authorization": "Bearer sk-test", "Content-Type": "application/json"}
    status, _, body = http("POST", srv.base_url + "/embeddings", b'{"input": [', auth)
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, _, body = http("POST", srv.base_url + "/embeddings", {"input": "a"}, auth)  # no model
    assert status == 400
    status, _, body = http("POST", srv.base_url + "/embeddings", {"model": MODEL, "input": 5}, auth)
    assert status == 400
    status, _, body = http("GET", srv.base_url + "/nope", None, auth)
    assert status == 404 and "error" in body


def test_auth(srv):
    with client_for(srv, api_key="sk-WRONG-secret-123") as bad:
        with pytest.raises(openai.AuthenticationError) as ei:
            bad.embeddings.create(model=MODEL, input="a")
    assert ei.value.status_code == 401
    assert ei.value.body == {
        "message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key",
    }
    assert "sk-WRONG" not in json.dumps(ei.value.body) and "secret" not in str(ei.value)
    status, _, body = http("POST", srv.base_url + "/embeddings", {"model": MODEL, "input": "a"})
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_any_bearer_key_accepted_without_api_key_setting():
    with FakeOpenAI() as s, client_for(s, api_key="whatever") as c:
        assert len(c.embeddings.create(model=MODEL, input="a").data) == 1


def test_fail_inputs_fail_only_their_request(srv, client):
    srv.configure(fail_inputs=["POISON"])
    with pytest.raises(openai.BadRequestError) as ei:
        client.embeddings.create(model=MODEL, input=["good one", "has POISON inside", "good two"])
    assert ei.value.body == {
        "message": "Invalid input: contains rejected text", "type": "invalid_request_error", "code": None,
    }
    r = client.embeddings.create(model=MODEL, input=["good one", "good two"])
    assert len(r.data) == 2
    assert srv.inputs_seen(200) == ["good one", "good two"]
    assert srv.inputs_seen(400) == ["good one", "has POISON inside", "good two"]
    assert len(srv.inputs_seen(None)) == 5


def test_rate_limit_requests(srv, client):
    srv.configure(rpm=2)
    raw = client.embeddings.with_raw_response.create(model=MODEL, input="a")
    assert raw.headers["x-ratelimit-limit-requests"] == "2"
    assert raw.headers["x-ratelimit-remaining-requests"] == "1"
    assert raw.headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))
    assert "x-ratelimit-limit-tokens" not in raw.headers
    assert raw.parse().data[0].embedding == fake_vector("a", 1536)
    client.embeddings.create(model=MODEL, input="b")
    with pytest.raises(openai.RateLimitError) as ei:
        client.embeddings.create(model=MODEL, input="c")
    h = ei.value.response.headers
    assert 1 <= int(h["retry-after"]) <= 30
    assert int(h["retry-after-ms"]) > 20_000  # 1 request every 30 s
    assert h["x-ratelimit-remaining-requests"] == "0"
    assert ei.value.body["type"] == "requests" and ei.value.body["code"] == "rate_limit_exceeded"
    assert ei.value.message.startswith("Error code: 429 - Rate limit reached for requests")
    st = srv.stats()
    assert st["rate_limited"] == 1 and st["by_status"] == {"200": 2, "429": 1}
    assert st["inputs_embedded"] == 2


def test_rate_limit_tokens(srv, client):
    srv.configure(tpm=100)
    raw = client.embeddings.with_raw_response.create(model=MODEL, input=" a" * 60)
    assert raw.headers["x-ratelimit-limit-tokens"] == "100"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) in (40, 41)
    assert "x-ratelimit-limit-requests" not in raw.headers
    with pytest.raises(openai.RateLimitError) as ei:
        client.embeddings.create(model=MODEL, input=" a" * 60)
    assert ei.value.body["type"] == "tokens"
    assert int(ei.value.response.headers["retry-after"]) >= 1
    # too large for the bucket ever: still a prompt 429, not a hang
    with pytest.raises(openai.RateLimitError) as ei:
        client.embeddings.create(model=MODEL, input=" a" * 150)
    assert ei.value.body["type"] == "tokens" and "too large" in ei.value.message
    # a small request still fits (429s consumed nothing)
    client.embeddings.create(model=MODEL, input=" a" * 30)


def test_bucket_refill_and_duration_format():
    b = _Bucket(60, now=0.0)  # 1 unit per second
    b.level = 0
    assert b.wait_for(1) == pytest.approx(1.0)
    b.refill(0.5)
    assert b.level == pytest.approx(0.5) and b.remaining == 0
    b.refill(1000.0)
    assert b.level == 60 and b.reset_in() == 0
    assert _fmt_duration(0) == "0s"
    assert _fmt_duration(0.12) == "120ms"
    assert _fmt_duration(1) == "1s"
    assert _fmt_duration(1.5) == "1.5s"
    assert _fmt_duration(360) == "6m0s"
    assert _fmt_duration(90.25) == "1m30.25s"


def test_latency(srv, client):
    srv.configure(latency_ms=150, latency_per_input_ms=10)
    t = time.monotonic()
    client.embeddings.create(model=MODEL, input=["a", "b", "c", "d", "e"])
    assert time.monotonic() - t >= 0.19


FAULT_EXPECTATIONS = {
    "500": openai.InternalServerError,
    "503": openai.InternalServerError,  # the SDK maps every status >= 500 to InternalServerError
    "429": openai.RateLimitError,
    "reset": openai.APIConnectionError,
    # truncated JSON with content-type application/json: the SDK lets json.JSONDecodeError escape
    # (not an openai.APIError subclass, and never retried)
    "not_json": json.JSONDecodeError,
}


@pytest.mark.parametrize("fmt", [None, "float"])
@pytest.mark.parametrize("kind", sorted(FAULT_EXPECTATIONS))
def test_error_faults(srv, client, kind, fmt):
    kw = {} if fmt is None else {"encoding_format": fmt}
    srv.push_faults(kind)
    with pytest.raises(FAULT_EXPECTATIONS[kind]) as ei:
        client.embeddings.create(model=MODEL, input=["a", "b"], **kw)
    if kind in ("500", "503", "429"):
        assert ei.value.status_code == int(kind)
    if kind == "429":
        assert ei.value.response.headers["retry-after"] == "1"
    # the fault was one-shot: the next request is fine, on the same client
    assert len(client.embeddings.create(model=MODEL, input=["a", "b"], **kw).data) == 2
    assert srv.log[0]["fault"] == kind and srv.log[1]["fault"] is None
    assert srv.log[0]["status"] == {"reset": 0, "not_json": 200}.get(kind, int(kind) if kind.isdigit() else 0)


@pytest.mark.parametrize("fmt", [None, "float"])
def test_payload_faults(srv, client, fmt):
    kw = {} if fmt is None else {"encoding_format": fmt}
    srv.push_faults("wrong_dims", "nan", "inf", "short")
    r = client.embeddings.create(model=MODEL, input=["a", "b"], dimensions=16, **kw)
    assert [len(d.embedding) for d in r.data] == [15, 15]
    assert r.data[0].embedding == fake_vector("a", 16)[:15]
    r = client.embeddings.create(model=MODEL, input=["a", "b"], **kw)
    assert math.isnan(r.data[0].embedding[0]) and not any(math.isnan(x) for x in r.data[1].embedding)
    r = client.embeddings.create(model=MODEL, input=["a", "b"], **kw)
    assert math.isinf(r.data[0].embedding[0])
    r = client.embeddings.create(model=MODEL, input=["a", "b"], **kw)
    assert len(r.data) == 1
    st = srv.stats()
    assert st["by_status"] == {"200": 4} and st["inputs_embedded"] == 0  # faulted 200s are not clean
    assert srv.inputs_seen(200) == [] and len(srv.inputs_seen(200, include_faulted=True)) == 8
    assert st["faults"] == {"wrong_dims": 1, "nan": 1, "inf": 1, "short": 1}


def test_hang_fault_times_out_and_stop_is_prompt():
    s = FakeOpenAI(hang_s=2).start()
    try:
        s.push_faults("hang")
        t = time.monotonic()
        with client_for(s, timeout=0.5) as c, pytest.raises(openai.APITimeoutError):
            c.embeddings.create(model=MODEL, input="a")
        assert time.monotonic() - t < 1.5
        # a hang in progress must not delay stop()
        s.configure(hang_s=30)
        s.push_faults("hang")
        errs: list[BaseException] = []

        def call():
            try:
                with client_for(s, timeout=10) as c2:
                    c2.embeddings.create(model=MODEL, input="b")
            except BaseException as e:  # noqa: BLE001
                errs.append(e)

        th = threading.Thread(target=call, daemon=True)
        th.start()
        for _ in range(100):
            if len(s.log) >= 2:
                break
            time.sleep(0.02)
        assert s.log[-1]["fault"] == "hang"
    finally:
        t = time.monotonic()
        s.stop()
        assert time.monotonic() - t < 2
    th.join(timeout=5)
    assert not th.is_alive() and isinstance(errs[0], openai.APIConnectionError)


def test_random_faults_are_seeded():
    def run(seed):
        with FakeOpenAI(fault_rate=0.5, fault_kinds=["500", "503"], seed=seed) as s, client_for(s) as c:
            for i in range(20):
                try:
                    c.embeddings.create(model=MODEL, input=f"t{i}")
                except openai.InternalServerError:
                    pass
            return [e["fault"] for e in s.log]

    a, b = run(7), run(7)
    assert a == b and {"500", "503"} <= set(a) and None in a
    assert run(8) != a


def test_concurrent_requests(srv):
    srv.configure(latency_ms=20, rpm=10_000)
    errors: list[BaseException] = []

    def worker(w):
        try:
            with client_for(srv) as c:
                for i in range(5):
                    r = c.embeddings.create(model=MODEL, input=[f"w{w}-{i}-a", f"w{w}-{i}-b"])
                    assert r.data[1].embedding == fake_vector(f"w{w}-{i}-b", 1536)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not errors
    st = srv.stats()
    assert st["requests"] == 40 and st["inputs_embedded"] == 80
    assert sorted(e["n"] for e in srv.log) == list(range(1, 41))
    assert len(set(srv.inputs_seen())) == 80
    srv.reset_log()
    assert srv.stats()["requests"] == 0


def test_models_endpoint(srv, client):
    ids = [m.id for m in client.models.list()]
    assert "text-embedding-3-small" in ids and "text-embedding-3-large" in ids


def test_configure_rejects_unknown_and_bad_values(srv):
    with pytest.raises(ValueError):
        srv.configure(bogus=1)
    with pytest.raises(ValueError):
        srv.configure(fault_kinds=["explode"])
    with pytest.raises(ValueError):
        srv.push_faults("explode")
