"""Attributes: strict parsing, curated coverage, and LLM querying against a real local HTTP endpoint."""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from biovlm import attributes as A
from biovlm.data import DATASETS

SECRET = "sk-test-SECRET-0123456789abcdef"
GOOD = [f"visual attribute number {i}" for i in range(10)]
FAST = dict(max_retries=2, backoff=0.001, timeout=5.0)


# ------------------------------------------------------------------------------------------ local endpoint


def answer(content: str, model: str = "served-model-1") -> tuple[int, dict]:
    return 200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                              "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def attrs_json(items: list[str]) -> str:
    return json.dumps({"attributes": items})


class Endpoint:
    """A scripted OpenAI-compatible server. Each script step is (status, body), ("raw", status, content type,
    bytes), ("drip", seconds, "headers" | "body", bytes): a 200 sending the headers, or only the body, one byte
    every `seconds`, or ("sleep", s, step); the last step repeats once the script is used up."""

    def __init__(self):
        self.steps: list = []
        self.requests: list[dict] = []
        self.stopped = threading.Event()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.json_body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                endpoint.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                          "body": body, "t": time.monotonic()})
                step = endpoint.steps[min(len(endpoint.requests), len(endpoint.steps)) - 1]
                if step[0] == "sleep":
                    time.sleep(step[1])
                    step = step[2]
                if step[0] == "drip":
                    return self.drip(*step[1:])
                if step[0] == "raw":
                    _, status, content_type, data = step
                else:
                    status, payload = step
                    if callable(payload):
                        payload = payload(self)
                    content_type, data = "application/json", json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (timeout test)
                    pass

            def drip(self, seconds: float, part: str, data: bytes):
                head = (f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                        f"Connection: close\r\n\r\n").encode()
                fast, slow = (head, data) if part == "body" else (b"", head + data)
                try:
                    self.wfile.write(fast)
                    for i in range(len(slow)):
                        if endpoint.stopped.wait(seconds):
                            return
                        self.wfile.write(slow[i:i + 1])
                except OSError:  # the client hung up
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.server.handle_error = lambda *a: None
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def script(self, *steps):
        self.steps = list(steps)
        self.requests.clear()


@pytest.fixture
def endpoint(monkeypatch):
    ep = Endpoint()
    monkeypatch.setenv("OPENAI_BASE_URL", ep.url)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    yield ep
    ep.stopped.set()
    ep.server.shutdown()
    ep.server.server_close()


def no_secret_anywhere(cache: Path, *texts: str) -> None:
    for f in cache.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text(), f
    for t in texts:
        assert SECRET not in t


# ------------------------------------------------------------------------------------------ endpoint behaviour


def test_valid_answer_is_parsed_sent_in_json_mode_and_cached(endpoint, tmp_path, caplog):
    endpoint.script(answer(attrs_json(GOOD)))
    got = A.query("breastmnist", "my-model", n=10, cache_dir=tmp_path, temperature=0.3, seed=7, **FAST)
    assert got == [GOOD, GOOD]
    assert len(endpoint.requests) == 2
    req = endpoint.requests[0]
    assert req["path"] == "/v1/chat/completions" and req["auth"] == f"Bearer {SECRET}"
    body = req["body"]
    assert body["model"] == "my-model" and body["temperature"] == 0.3 and body["seed"] == 7
    assert body["response_format"] == {"type": "json_object"}
    assert '"malignant"' in body["messages"][1]["content"] and "breast ultrasound" in body["messages"][1]["content"]
    entries = sorted(tmp_path.glob("*.json"))
    assert len(entries) == 2
    entry = json.loads(entries[0].read_text())
    assert {"request", "response", "content", "attributes", "model", "created"} <= set(entry)
    assert entry["attributes"] == GOOD and entry["model"] == "served-model-1"
    assert entries[0].stem == A.Request("", 0, "", 10, entry["request"]).key
    no_secret_anywhere(tmp_path, caplog.text)


def test_retinamnist_prompt_uses_prompt_names(endpoint, tmp_path):
    endpoint.script(answer(attrs_json(GOOD)))
    A.query("retinamnist", "m", cache_dir=tmp_path, **FAST)
    texts = [r["body"]["messages"][1]["content"] for r in endpoint.requests]
    assert len(texts) == 5
    assert all(f'"diabetic retinopathy grade {g}"' in t for g, t in enumerate(texts))


def test_malformed_json_is_retried_then_accepted(endpoint, tmp_path):
    endpoint.script(answer('{"attributes": ["unterminated'), answer(attrs_json(GOOD)))
    assert A.query("pneumoniamnist", "m", cache_dir=tmp_path, **FAST)[0] == GOOD
    assert len(endpoint.requests) == 3  # 2 for class 0, 1 for class 1


def test_malformed_json_every_time_names_what_came_back(endpoint, tmp_path):
    endpoint.script(answer("Sure! Here are some attributes: dark, round"))
    with pytest.raises(A.AttributeResponseError, match=r"not valid JSON.*Sure! Here are") as err:
        A.query("pneumoniamnist", "m", cache_dir=tmp_path, **FAST)
    assert "pneumoniamnist[0] 'normal'" in str(err.value) and "after 3 attempts" in str(err.value)
    assert len(endpoint.requests) == 3
    assert not list(tmp_path.glob("*.json"))  # nothing invalid is cached


def test_too_few_items_is_a_clear_error(endpoint, tmp_path):
    endpoint.script(answer(attrs_json(["dark lungs", "sharp borders", "clear angles"])))
    with pytest.raises(A.AttributeResponseError, match=r"expected 10 valid attributes, got 3") as err:
        A.query("pneumoniamnist", "m", cache_dir=tmp_path, **FAST)
    assert "sharp borders" in str(err.value)


def test_duplicates_are_dropped_case_insensitively_and_first_n_kept(endpoint, tmp_path):
    items = GOOD[:5] + [GOOD[0].upper(), "  " + GOOD[1] + ". "] + GOOD[5:] + ["extra one", "extra two"]
    endpoint.script(answer(attrs_json(items)))
    assert A.query("breastmnist", "m", cache_dir=tmp_path, **FAST) == [GOOD, GOOD]


def test_duplicates_leaving_too_few_fail(endpoint, tmp_path):
    endpoint.script(answer(attrs_json(GOOD[:9] + [GOOD[3].title()])))
    with pytest.raises(A.AttributeResponseError, match=r"got 9 .*duplicate"):
        A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)


def test_429_then_success(endpoint, tmp_path):
    endpoint.script((429, {"error": {"message": "rate limited", "type": "rate_limit"}}), answer(attrs_json(GOOD)))
    assert A.query("breastmnist", "m", cache_dir=tmp_path, **FAST) == [GOOD, GOOD]
    assert len(endpoint.requests) == 3


def test_500_every_time_fails_after_bounded_retries_without_leaking_the_key(endpoint, tmp_path, caplog):
    def echo_key(handler):  # a careless server that echoes the Authorization header
        return {"error": {"message": f"boom, you sent {handler.headers['Authorization']}"}}

    endpoint.script((500, echo_key))
    with pytest.raises(A.AttributeQueryError, match=r"gave up after 3 attempts.*HTTP 500") as err:
        A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)
    assert len(endpoint.requests) == 3  # client retries are off: exactly 1 + max_retries
    no_secret_anywhere(tmp_path, str(err.value), caplog.text)


def test_auth_error_is_not_retried_and_key_is_redacted(endpoint, tmp_path):
    endpoint.script((401, lambda h: {"error": {"message": f"bad key {h.headers['Authorization']}"}}))
    with pytest.raises(A.AttributeQueryError, match=r"HTTP 401") as err:
        A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)
    assert len(endpoint.requests) == 1
    assert "***" in str(err.value) and SECRET not in str(err.value)


def test_slow_answer_times_out_and_is_retried(endpoint, tmp_path):
    endpoint.script(("sleep", 1.0, answer(attrs_json(GOOD))), answer(attrs_json(GOOD)))
    got = A.query("pneumoniamnist", "m", cache_dir=tmp_path, max_retries=1, backoff=0.001, timeout=0.3)
    assert got == [GOOD, GOOD]


def test_slow_answer_every_time_fails(endpoint, tmp_path):
    endpoint.script(("sleep", 0.6, answer(attrs_json(GOOD))))
    t0 = time.perf_counter()
    with pytest.raises(A.AttributeQueryError, match=r"timed out after 0.2 s"):
        A.query("pneumoniamnist", "m", cache_dir=tmp_path, max_retries=1, backoff=0.001, timeout=0.2)
    assert time.perf_counter() - t0 < 3.0


# ------------------------------------------------------------------------------------------ bad answers

ENDPOINT_FIX = "check that OPENAI_BASE_URL is the server's OpenAI-compatible API root"
BAD_ANSWERS = {  # a 200 whose body is not N attributes: (step, what the message says, excerpt, fix)
    "html page": (("raw", 200, "text/html", f"<!DOCTYPE html>\n<html><h1>Sign in</h1><p>token {SECRET}</p>".encode()),
                  "answered an HTML page, not a chat completion", "<h1>Sign in</h1>", ENDPOINT_FIX),
    "invalid json": (("raw", 200, "application/json", b'{"choices": [{"message": {"content": "{\\"attr'),
                     "answered invalid JSON", '{"choices": [{"message"', ENDPOINT_FIX),
    "no choices": ((200, {"object": "list", "data": [{"id": "m"}]}), "no text at choices[0].message.content",
                   "{\"object\": \"list\"", ENDPOINT_FIX),
    "no content": ((200, {"choices": [{"message": {"role": "assistant", "refusal": "no"}}]}),
                   "no text at choices[0].message.content", '"refusal": "no"', ENDPOINT_FIX),
    "not attributes": (answer(json.dumps({"items": GOOD})), "expected a JSON object with key 'attributes'",
                       '{"items":', "raise llm.max_retries or try another llm.model"),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_bad_answer_is_retried_then_one_line_naming_class_endpoint_body_and_fix(case, endpoint, tmp_path, caplog):
    step, what, excerpt, fix = BAD_ANSWERS[case]
    endpoint.script(step)
    with pytest.raises(A.AttributeResponseError) as err:
        A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)
    msg = str(err.value)
    assert len(endpoint.requests) == 3  # 1 + max_retries, then the query stops at this class
    assert msg.startswith(f"breastmnist[0] 'malignant': no valid answer from {endpoint.url} after 3 attempts: ")
    assert what in msg and excerpt in msg and fix in msg, msg
    assert "\n" not in msg and len(msg) < 800
    assert_no_leak(msg, caplog.text)
    assert not list(tmp_path.iterdir())  # nothing is cached unless the answer parsed fully


def test_bad_answer_then_good_one_is_cached(endpoint, tmp_path):
    endpoint.script(BAD_ANSWERS["html page"][0], answer(attrs_json(GOOD)))
    assert A.query("breastmnist", "m", cache_dir=tmp_path, **FAST) == [GOOD, GOOD]
    assert len(endpoint.requests) == 3 and len(list(tmp_path.glob("*.json"))) == 2


def test_oversized_answer_is_refused_without_reading_it_all(endpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(A, "MAX_ANSWER_BYTES", 1000)
    endpoint.script(answer(attrs_json(GOOD) + " " * 100_000))
    with pytest.raises(A.AttributeResponseError, match=r"larger than 1,000 bytes.*" + ENDPOINT_FIX):
        A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)
    assert len(endpoint.requests) == 3 and not list(tmp_path.iterdir())


@pytest.mark.parametrize("part", ["body", "headers"])
def test_drip_feed_is_cut_at_the_total_deadline(part, endpoint, tmp_path):
    # one byte every 0.2 s never trips a 0.5 s read timeout: the answer alone would take over a minute
    endpoint.script(("drip", 0.2, part, json.dumps(answer(attrs_json(GOOD))[1]).encode()))
    t0 = time.monotonic()
    with pytest.raises(A.AttributeQueryError, match=r"gave up after 2 attempts .*timed out after 0.5 s"):
        A.query("breastmnist", "m", cache_dir=tmp_path, max_retries=1, backoff=0.001, timeout=0.5)
    elapsed = time.monotonic() - t0
    assert len(endpoint.requests) == 2
    assert endpoint.requests[1]["t"] - endpoint.requests[0]["t"] < 1.5  # the first attempt ended near 0.5 s
    assert elapsed < 3.0
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ credentials

URL_PASSWORD = "pw-SECRET-5f3a9c71"
URL_TOKEN = "tok-SECRET-8e21b4d0"
URL_FORMS = {  # OPENAI_BASE_URL as proxies and gateways want it; {} is the local endpoint's host:port
    "key only": "http://{}/v1",
    "user info": "http://alice:" + URL_PASSWORD + "@{}/v1",
    "query token": "http://{}/v1?api-key=" + URL_TOKEN,
}
LEAKS = (SECRET, URL_PASSWORD, URL_TOKEN, base64.b64encode(f"alice:{URL_PASSWORD}".encode()).decode())


def echo(handler) -> dict:
    """A valid answer that also echoes the request (path, headers, body), as debugging proxies do."""
    _, payload = answer(attrs_json(GOOD))
    payload["echo"] = {"path": handler.path, "headers": dict(handler.headers), "body": handler.json_body}
    payload["system_fingerprint"] = handler.headers.get("Authorization")
    payload["usage"]["request_headers"] = dict(handler.headers)
    return payload


def assert_no_leak(*texts: str, files: Path | None = None) -> None:
    texts += tuple(f.read_text() for f in files.rglob("*") if f.is_file()) if files else ()
    for text in texts:
        for secret in LEAKS:
            assert secret not in text


def test_redact_masks_every_credential_form():
    cases = {
        "POST http://alice:hunter2@gw.example/v1/chat": "POST http://***@gw.example/v1/chat",
        "https://gw.example/v1?api-key=abc123&x=1": "https://gw.example/v1?api-key=***&x=1",
        "url /v1?model=m&token=t0k": "url /v1?model=m&token=***",
        "{'Authorization': 'Bearer abc.def', 'accept': 'json'}": "{'Authorization': '***', 'accept': 'json'}",
        '"authorization": "Basic YWxpY2U6aHVudGVyMg=="': '"authorization": "***"',
        "api-key: 1234567890": "api-key: ***",
        "bad key sk-proj-ABCDEFGHIJKLMNOPqrstu": "bad key sk-***",
        "basic staining with key features, a token amount": "basic staining with key features, a token amount",
    }
    for text, expected in cases.items():
        assert A.redact(text, []) == expected
    assert A.redact("you sent hunter2", ["hunter2"]) == "you sent ***"


@pytest.mark.parametrize("form", list(URL_FORMS))
def test_echoing_endpoint_leaks_no_credential_to_cache_or_logs(form, endpoint, tmp_path, monkeypatch, caplog,
                                                               capsys):
    host = endpoint.url.split("//")[1].split("/")[0]
    monkeypatch.setenv("OPENAI_BASE_URL", URL_FORMS[form].format(host))
    caplog.set_level(logging.DEBUG)  # the HTTP client logs each request URL at INFO, the openai package more
    endpoint.script((200, echo))
    assert A.query("breastmnist", "m", cache_dir=tmp_path, **FAST) == [GOOD, GOOD]
    assert len(endpoint.requests) == 2
    out = capsys.readouterr()
    assert_no_leak(caplog.text, out.out, out.err, files=tmp_path)
    entry = json.loads(sorted(tmp_path.glob("*.json"))[0].read_text())
    assert set(entry["response"]) == {"id", "model", "created", "finish_reason", "usage"}
    assert entry["response"]["usage"] == {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    # what was written reads back offline, and so does an entry in the format written before (the full answer)
    old = A.plan("breastmnist", "m")[1]
    A.cache_path(tmp_path, old).write_text(json.dumps({
        "key": old.key, "request": old.body, "content": attrs_json(GOOD[::-1]), "attributes": GOOD[::-1],
        "response": {"id": "chatcmpl-old", "choices": [{"message": {"content": attrs_json(GOOD[::-1])}}]}}))
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    assert A.query("breastmnist", "m", cache_dir=tmp_path, **FAST) == [GOOD, GOOD[::-1]]
    assert len(endpoint.requests) == 2


def test_answer_repeating_the_key_is_retried_and_never_stored(endpoint, tmp_path, caplog):
    endpoint.script(answer(attrs_json(GOOD[:9] + [f"you sent {SECRET}"])))
    with pytest.raises(A.AttributeResponseError, match="repeats a credential") as err:
        A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)
    assert len(endpoint.requests) == 3
    assert not list(tmp_path.iterdir())
    assert_no_leak(str(err.value), caplog.text)


# ------------------------------------------------------------------------------------------ cache


def test_cache_hit_needs_no_key_and_no_network(endpoint, tmp_path, monkeypatch):
    endpoint.script(answer(attrs_json(GOOD)))
    first = A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")  # nothing listens there
    endpoint.requests.clear()
    assert A.query("breastmnist", "m", cache_dir=tmp_path, **FAST) == first
    assert endpoint.requests == []


def test_cache_key_covers_model_messages_and_sampling():
    base = A.plan("breastmnist", "m", 10, 0.0, 0)[0].key
    assert base == A.plan("breastmnist", "m", 10, 0.0, 0)[0].key
    assert len({base, A.plan("breastmnist", "m2", 10, 0.0, 0)[0].key, A.plan("breastmnist", "m", 8, 0.0, 0)[0].key,
                A.plan("breastmnist", "m", 10, 0.5, 0)[0].key, A.plan("breastmnist", "m", 10, 0.0, 1)[0].key,
                A.plan("breastmnist", "m", 10, 0.0, 0)[1].key}) == 6


def test_misses_without_key_list_every_missing_class_before_querying(endpoint, tmp_path, monkeypatch):
    endpoint.script(answer(attrs_json(GOOD)))
    A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)  # breastmnist is cached, the rest is not
    monkeypatch.delenv("OPENAI_API_KEY")
    endpoint.requests.clear()
    with pytest.raises(A.MissingAPIKeyError) as err:
        A.query_datasets(["breastmnist", "pneumoniamnist", "octmnist"], "m", cache_dir=tmp_path, **FAST)
    msg = str(err.value)
    assert "6 of 8" in msg and "OPENAI_API_KEY" in msg
    for name in ("pneumoniamnist[0] 'normal'", "pneumoniamnist[1] 'pneumonia'", "octmnist[0]", "octmnist[3]"):
        assert name in msg
    assert "breastmnist" not in msg
    assert endpoint.requests == []


def test_interrupted_write_leaves_no_entry(endpoint, tmp_path, monkeypatch):
    class Crash(BaseException):
        pass

    def crash(src, dst):
        assert Path(src).read_text().startswith("{")  # the temporary file was fully written
        raise Crash

    endpoint.script(answer(attrs_json(GOOD)))
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Crash):
        A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    # a hard kill leaves at most a stray temporary file, which is never read as an entry
    req = A.plan("breastmnist", "m")[0]
    (tmp_path / f".{req.key[:16]}.abc.tmp").write_text('{"request": ')
    assert A.read_cache(tmp_path, req) is None


def test_corrupt_entry_is_named(endpoint, tmp_path, monkeypatch):
    endpoint.script(answer(attrs_json(GOOD)))
    A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)
    path = A.cache_path(tmp_path, A.plan("breastmnist", "m")[1])
    path.write_text(path.read_text()[:50])
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(A.CacheEntryError, match="corrupt attribute cache entry") as err:
        A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)
    assert str(path) in str(err.value)
    entry = json.loads(A.cache_path(tmp_path, A.plan("breastmnist", "m")[0]).read_text())
    entry["request"]["model"] = "other"
    path.write_text(json.dumps(entry))
    with pytest.raises(A.CacheEntryError, match="does not hold the request of its key"):
        A.query("breastmnist", "m", cache_dir=tmp_path, **FAST)


# ------------------------------------------------------------------------------------------ parser


def test_parser_rules():
    assert A.parse_attributes('```json\n{"attributes": ["a b", "c d"]}\n```', "x", 2) == ["a b", "c d"]
    assert A.parse_attributes(attrs_json(["  dark   round  cells. ", "b"]), "x", 2) == ["dark round cells", "b"]
    with pytest.raises(A.AttributeResponseError, match="repeats the class name"):
        A.parse_attributes(attrs_json(["The Melanoma.", "b"]), "melanoma", 2)
    with pytest.raises(A.AttributeResponseError, match="longer than 120"):
        A.parse_attributes(attrs_json(["y" * 121, "b"]), "x", 2)
    with pytest.raises(A.AttributeResponseError, match="non-string int"):
        A.parse_attributes(attrs_json(["a", 3]), "x", 2)
    with pytest.raises(A.AttributeResponseError, match="key 'attributes'"):
        A.parse_attributes('["a", "b"]', "x", 2)
    with pytest.raises(A.AttributeResponseError, match="not valid JSON"):
        A.parse_attributes("1" * 5000, "x", 2)  # int conversion limit: a ValueError that is not JSONDecodeError


@settings(max_examples=120, deadline=None)
@given(text=st.text(max_size=300), name=st.text(max_size=30), n=st.integers(1, 12))
def test_parser_never_crashes_on_arbitrary_text(text, name, n):
    try:
        out = A.parse_attributes(text, name, n)
    except A.AttributeResponseError:
        return
    assert len(out) == n


scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
json_values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4)
                           | st.dictionaries(st.text(max_size=5), kids, max_size=3), max_leaves=10)


@settings(max_examples=120, deadline=None)
@given(items=st.lists(st.text(max_size=150) | json_values, max_size=15), name=st.text(max_size=20),
       n=st.integers(1, 8))
def test_parser_output_obeys_the_rules_or_raises(items, name, n):
    try:
        out = A.parse_attributes(json.dumps({"attributes": items}), name, n)
    except A.AttributeResponseError:
        return
    assert len(out) == n
    assert len({s.lower() for s in out}) == n
    for s in out:
        assert isinstance(s, str) and 0 < len(s) <= A.MAX_CHARS and s == s.strip()
        assert A._norm(s) != A._norm(name)


# ------------------------------------------------------------------------------------------ curated + records


def test_curated_covers_every_class_of_all_11_datasets_by_label_id():
    doc = json.loads((Path(A.__file__).parent / "resources" / A.CURATED_RESOURCE).read_text())
    assert doc["source"] == "curated" and "Not the output of any language model" in doc["note"]
    assert list(doc["datasets"]) == list(DATASETS) and len(DATASETS) == 11
    total = 0
    for name, info in DATASETS.items():
        got = A.curated(name)
        assert len(got) == info.n_classes
        classes = doc["datasets"][name]["classes"]
        assert sorted(classes, key=int) == [str(i) for i in range(info.n_classes)]
        for label, items in enumerate(got):
            assert classes[str(label)]["label"] == info.classes[label]
            assert items == classes[str(label)]["attributes"]  # nothing dropped or changed by the parser rules
            assert A.clean_attributes(items, info.prompt_names[label], 10) == items
            total += 1
    assert total == 78
    assert A.curated("breastmnist", n=3) == [a[:3] for a in A.curated("breastmnist")]
    with pytest.raises(ValueError, match="hold 10 per class"):
        A.curated("breastmnist", n=11)


def test_build_records_curated_default_and_llm(endpoint, tmp_path):
    recs = A.build_records(["retinamnist"], {"model": None, "n": 10})
    rec = recs["retinamnist"]
    assert rec["source"] == "curated" and rec["model"] is None
    assert rec["classes"][2] == "diabetic retinopathy grade 2" and rec["attributes"] == A.curated("retinamnist")
    endpoint.script(answer(attrs_json(GOOD[:4])))
    llm = {"model": "m", "n": 4, "cache_dir": str(tmp_path), "max_retries": 0, "timeout": 5, "backoff": 0.001}
    rec = A.build_records(["breastmnist"], llm)["breastmnist"]
    assert rec == {"dataset": "breastmnist", "source": "llm", "model": "m", "classes": ["malignant", "normal, benign"],
                   "attributes": [GOOD[:4], GOOD[:4]]}


# ------------------------------------------------------------------------------------------ stage


def run_stage(tmp_path: Path, llm: dict, env_key: str | None = None, class_names: str = "medmnist",
              base_url: str | None = None):
    import subprocess
    import sys

    import yaml
    from conftest import COMMITTED_PARAMS

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load(COMMITTED_PARAMS.read_text())
    params["llm"].update(llm)
    params["data"]["class_names"] = class_names
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    if env_key:
        env["OPENAI_API_KEY"] = env_key
    if base_url:
        env["OPENAI_BASE_URL"] = base_url
    return subprocess.run([sys.executable, "-m", "stages.attributes", "--params", str(tmp_path / "params.yaml"),
                           "--out", str(tmp_path / "out")], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)


def test_stage_writes_curated_records_offline(tmp_path):
    proc = run_stage(tmp_path, {"source": "curated", "model": None})
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.stem for p in (tmp_path / "out").glob("*.json"))
    assert files == sorted(DATASETS)
    rec = json.loads((tmp_path / "out" / "breastmnist.json").read_text())
    assert rec == {"dataset": "breastmnist", "source": "curated", "model": None,
                   "classes": ["malignant", "normal, benign"], "attributes": A.curated("breastmnist")}


def test_stage_without_key_fails_once_with_the_missing_list(tmp_path):
    proc = run_stage(tmp_path, {"source": "llm", "model": "some-model", "cache_dir": str(tmp_path / "cache")})
    assert proc.returncode != 0
    assert "attributes: error:" in proc.stderr and "78 of 78" in proc.stderr
    assert "organsmnist[10] 'spleen'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_stage_log_shows_no_credential_of_the_key_or_the_url(endpoint, tmp_path):
    host = endpoint.url.split("//")[1].split("/")[0]
    endpoint.script((200, echo))
    cache = tmp_path / "cache"
    proc = run_stage(tmp_path, {"source": "llm", "model": "m", "cache_dir": str(cache), "max_retries": 0,
                                "timeout": 30}, env_key=SECRET,
                     base_url=f"http://alice:{URL_PASSWORD}@{host}/v1?api-key={URL_TOKEN}")
    assert proc.returncode == 0, proc.stderr
    assert len(endpoint.requests) == sum(info.n_classes for info in DATASETS.values())
    assert "querying 78 of 78" in proc.stderr
    assert_no_leak(proc.stdout, proc.stderr, files=tmp_path)


def test_stage_bad_answer_is_a_one_line_error(endpoint, tmp_path):
    endpoint.script(BAD_ANSWERS["html page"][0])
    proc = run_stage(tmp_path, {"source": "llm", "model": "m", "cache_dir": str(tmp_path / "cache"),
                                "max_retries": 1, "backoff": 0.001, "timeout": 30}, env_key=SECRET,
                     base_url=endpoint.url)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(endpoint.requests) == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("attributes: error: pathmnist[0] ") and "an HTML page" in error and ENDPOINT_FIX in error
    assert_no_leak(proc.stdout, proc.stderr, files=tmp_path)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
