"""gptcourse.serve: an OpenAI-compatible chat-completions server on loopback.

A tiny untrained GPT keeps these fast. The references are independent of the
server: ``model.generate`` on the transcript ``format_chat`` writes (the
library's tested decoder), hand-written SSE parsing, and the HTTP status
codes of RFC 9110.
"""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from gptcourse.chat import format_chat
from gptcourse.gpt import GPT, GPTConfig
from gptcourse.serve import TURN_STOPS, load_checkpoint, save_checkpoint, serve
from gptcourse.tokenizers import CharTokenizer

NAME = "gptcourse-char"
TEXT = "System: User: Assistant:\nabcdefghijklmnopqrstuvwxyz ABC?.,'!"
HI = [{"role": "user", "content": "hi"}]
LONG = [{"role": "system", "content": "answer in one short line, please."},
        {"role": "user", "content": "what is a list? and what is a tuple?"}]   # > block_size


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(TEXT)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("course-tiny", vocab_size=tok.vocab_size)).eval()


@pytest.fixture(scope="module")
def server(model, tok):
    with serve(model, tok, max_body_bytes=20_000) as s:
        yield s


def request(server, method, path, body=None, headers=None, raw=None):
    """One HTTP exchange on a fresh connection: (status, headers, body bytes)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    if raw is None and body is not None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=raw, headers=headers or {})
    response = conn.getresponse()
    result = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return result


def chat(server, messages=HI, **fields):
    status, headers, data = request(server, "POST", "/v1/chat/completions",
                                    {"model": NAME, "messages": messages, **fields})
    assert status == 200, data
    return json.loads(data) if not fields.get("stream") else data.decode()


def reference(model, tok, messages, n, stop=TURN_STOPS, **how):
    """What the server must answer: model.generate on the transcript, cut at a stop string."""
    ids = tok.encode(format_chat(messages))
    out = model.generate(torch.tensor([ids]), n, **how)[0, len(ids):].tolist()
    text = tok.decode(out)
    ends = [text.find(s) for s in stop if s in text]
    return (text[:min(ends)], "stop") if ends else (text, "length")


def parse_sse(text):
    """Server-sent events, by hand: events end with a blank line; keep their data: fields."""
    assert text.endswith("\n\n"), text[-20:]
    events = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert all(line.startswith("data: ") for line in lines), block
        events.append("\n".join(line[len("data: "):] for line in lines))
    return events


# ---------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------

def test_response_has_the_chat_completion_shape(server, tok):
    before = int(time.time())
    status, headers, data = request(server, "POST", "/v1/chat/completions",
                                    {"model": NAME, "messages": HI, "max_tokens": 12,
                                     "temperature": 0})
    assert status == 200 and headers["Content-Type"] == "application/json"
    r = json.loads(data)
    assert set(r) == {"id", "object", "created", "model", "choices", "usage"}
    assert r["id"].startswith("chatcmpl-") and len(r["id"]) > len("chatcmpl-")
    assert r["object"] == "chat.completion" and r["model"] == NAME
    assert isinstance(r["created"], int) and before <= r["created"] <= time.time()
    [choice] = r["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    u = r["usage"]
    assert u["prompt_tokens"] == len(tok.encode("User: hi\nAssistant:")) == 19
    assert u["completion_tokens"] == 12            # no stop string: max_tokens were written
    assert u["total_tokens"] == 19 + 12


def test_models_endpoint(server):
    status, _, data = request(server, "GET", "/v1/models")
    r = json.loads(data)
    assert status == 200 and r["object"] == "list"
    assert [m["id"] for m in r["data"]] == [NAME] and r["data"][0]["object"] == "model"
    status, _, data = request(server, "GET", f"/v1/models/{NAME}")
    assert status == 200 and json.loads(data)["id"] == NAME


# ---------------------------------------------------------------------------
# the text: the model's own decoding, reproducible
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [HI, LONG], ids=["fits-the-context", "longer-than-context"])
def test_greedy_answer_equals_model_generate(server, model, tok, messages):
    assert len(tok.encode(format_chat(messages))) > model.config.block_size or messages is HI
    r1 = chat(server, messages, max_tokens=40, temperature=0)
    r2 = chat(server, messages, max_tokens=40, temperature=0)
    text, finish = reference(model, tok, messages, 40, temperature=0)
    assert r1["choices"][0]["message"]["content"] == text
    assert r1["choices"][0]["finish_reason"] == finish
    assert r2["choices"] == r1["choices"] and r2["id"] != r1["id"]
    assert r1["usage"]["prompt_tokens"] == len(tok.encode(format_chat(messages)))


def test_seeded_sampling_equals_model_generate_with_that_seed(server, model, tok):
    how = dict(temperature=0.9, top_p=0.9)
    r = chat(server, LONG, max_tokens=40, seed=123, **how)
    text, _ = reference(model, tok, LONG, 40, generator=torch.Generator().manual_seed(123), **how)
    assert r["choices"][0]["message"]["content"] == text
    assert chat(server, LONG, max_tokens=40, seed=123, **how)["choices"] == r["choices"]
    other = chat(server, LONG, max_tokens=40, seed=124, **how)
    assert other["choices"][0]["message"]["content"] != text


def test_stop_string_ends_the_answer_and_is_not_returned(server, model, tok):
    gen = lambda: torch.Generator().manual_seed(5)
    full, _ = reference(model, tok, HI, 40, temperature=1.0, generator=gen())
    stop = full[12:14]
    cut = full.find(stop)
    assert cut > 0, full
    r = chat(server, HI, max_tokens=40, temperature=1.0, seed=5, stop=stop)
    assert r["choices"][0]["message"]["content"] == full[:cut]
    assert r["choices"][0]["finish_reason"] == "stop"
    # the stop string was generated (and billed) but not returned
    assert r["usage"]["completion_tokens"] == cut + len(stop)
    # streamed, the held-back beginning of the stop string is never sent
    events = parse_sse(chat(server, HI, max_tokens=40, temperature=1.0, seed=5, stop=[stop],
                            stream=True))
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == full[:cut]


def test_max_tokens_cap(model, tok):
    with serve(model, tok, max_tokens_cap=16, default_max_tokens=100) as s:
        r = chat(s, HI, max_tokens=16, temperature=0)
        assert r["usage"]["completion_tokens"] == 16 and r["choices"][0]["finish_reason"] == "length"
        assert chat(s, HI, temperature=0)["usage"]["completion_tokens"] == 16  # default capped
        status, _, data = request(s, "POST", "/v1/chat/completions",
                                  {"model": NAME, "messages": HI, "max_tokens": 17})
        assert status == 400 and "1 to 16" in json.loads(data)["error"]["message"]


# ---------------------------------------------------------------------------
# streaming
# ---------------------------------------------------------------------------

def test_stream_is_well_formed_sse_ending_in_done(server):
    plain = chat(server, LONG, max_tokens=30, temperature=0)
    status, headers, data = request(server, "POST", "/v1/chat/completions",
                                    {"model": NAME, "messages": LONG, "max_tokens": 30,
                                     "temperature": 0, "stream": True,
                                     "stream_options": {"include_usage": True}})
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(data.decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == NAME for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    *deltas, last, usage_chunk = chunks
    assert deltas[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["choices"][0]["finish_reason"] is None for c in deltas)
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in deltas)
    assert text == plain["choices"][0]["message"]["content"]
    assert len(deltas) == 1 + 30            # one chunk per character token
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]


# ---------------------------------------------------------------------------
# bad requests: a 4xx and an OpenAI-style JSON error, never a crash
# ---------------------------------------------------------------------------

def body(**fields):
    return {"model": NAME, "messages": HI, **fields}


BAD = {
    "bad JSON": (400, "POST", "/v1/chat/completions", b'{"model": '),
    "not an object": (400, "POST", "/v1/chat/completions", b"[1, 2]"),
    "NaN": (400, "POST", "/v1/chat/completions", b'{"temperature": NaN}'),
    "bad UTF-8": (400, "POST", "/v1/chat/completions", b'{"model": "\xff"}'),
    "deep nesting": (400, "POST", "/v1/chat/completions", b"[" * 5000 + b"]" * 5000),
    "no model": (400, "POST", "/v1/chat/completions", {"messages": HI}),
    "unknown model": (404, "POST", "/v1/chat/completions", body(model="gpt-4")),
    "model not a str": (400, "POST", "/v1/chat/completions", body(model=5)),
    "no messages": (400, "POST", "/v1/chat/completions", {"model": NAME}),
    "empty messages": (400, "POST", "/v1/chat/completions", body(messages=[])),
    "messages not a list": (400, "POST", "/v1/chat/completions", body(messages="hi")),
    "bad role": (400, "POST", "/v1/chat/completions",
                 body(messages=[{"role": "robot", "content": "hi"}])),
    "content not a str": (400, "POST", "/v1/chat/completions",
                          body(messages=[{"role": "user", "content": 5}])),
    "unknown character": (400, "POST", "/v1/chat/completions",
                          body(messages=[{"role": "user", "content": "snow ☃"}])),
    "negative max_tokens": (400, "POST", "/v1/chat/completions", body(max_tokens=-1)),
    "zero max_tokens": (400, "POST", "/v1/chat/completions", body(max_tokens=0)),
    "huge max_tokens": (400, "POST", "/v1/chat/completions", body(max_tokens=10 ** 9)),
    "max_tokens over the cap": (400, "POST", "/v1/chat/completions", body(max_tokens=513)),
    "max_tokens a str": (400, "POST", "/v1/chat/completions", body(max_tokens="10")),
    "max_tokens a bool": (400, "POST", "/v1/chat/completions", body(max_tokens=True)),
    "max_tokens a float": (400, "POST", "/v1/chat/completions", body(max_tokens=1.5)),
    "temperature < 0": (400, "POST", "/v1/chat/completions", body(temperature=-0.1)),
    "temperature > 2": (400, "POST", "/v1/chat/completions", body(temperature=2.5)),
    "temperature a str": (400, "POST", "/v1/chat/completions", body(temperature="hot")),
    "top_p 0": (400, "POST", "/v1/chat/completions", body(top_p=0)),
    "n 2": (400, "POST", "/v1/chat/completions", body(n=2)),
    "stream a str": (400, "POST", "/v1/chat/completions", body(stream="yes")),
    "five stops": (400, "POST", "/v1/chat/completions", body(stop=list("abcde"))),
    "empty stop": (400, "POST", "/v1/chat/completions", body(stop="")),
    "negative seed": (400, "POST", "/v1/chat/completions", body(seed=-1)),
    "unknown field": (400, "POST", "/v1/chat/completions", body(tools=[])),
    "penalty": (400, "POST", "/v1/chat/completions", body(presence_penalty=1.0)),
    "stream_options without stream": (400, "POST", "/v1/chat/completions",
                                      body(stream_options={"include_usage": True})),
    "too large": (413, "POST", "/v1/chat/completions",
                  body(messages=[{"role": "user", "content": "a" * 30_000}])),
    "unknown path": (404, "GET", "/v2/everything", None),
    "unknown model card": (404, "GET", "/v1/models/gpt-4", None),
    "GET a POST endpoint": (405, "GET", "/v1/chat/completions", None),
    "POST a GET endpoint": (405, "POST", "/v1/models", body()),
    "DELETE": (405, "DELETE", "/v1/models", None),
    "made-up method": (405, "BREW", "/v1/chat/completions", None),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_request_gets_4xx_json_error(server, case):
    expected, method, path, payload = BAD[case]
    status, headers, data = request(server, method, path, payload)
    assert status == expected, data
    assert headers["Content-Type"] == "application/json"
    error = json.loads(data)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    if expected == 405:
        assert headers["Allow"] in ("GET", "POST")


def test_error_messages_name_the_problem(server):
    _, _, data = request(server, "POST", "/v1/chat/completions",
                         body(messages=[{"role": "user", "content": "snow ☃"}]))
    error = json.loads(data)["error"]
    assert "'☃'" in error["message"] and error["param"] == "messages[0].content"
    _, _, data = request(server, "POST", "/v1/chat/completions", body(max_tokens=-5))
    error = json.loads(data)["error"]
    assert error["param"] == "max_tokens" and "-5" in error["message"]


def test_wrong_content_type_and_missing_length(server):
    status, _, data = request(server, "POST", "/v1/chat/completions",
                              raw=json.dumps(body()).encode(),
                              headers={"Content-Type": "text/plain"})
    assert status == 415 and "application/json" in json.loads(data)["error"]["message"]
    # no Content-Length (http.client would add one, so write the request by hand)
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\n\r\n")
        reply = s.makefile("rb").read().decode()
    assert reply.startswith("HTTP/1.1 411 ") and '"error"' in reply


def test_garbled_request_line_gets_json_400(server):
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        s.sendall(b"NONSENSE\r\n\r\n")
        reply = s.makefile("rb").read().decode()
    head, _, payload = reply.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 400 ") and "application/json" in head
    assert "error" in json.loads(payload)


def test_api_key(model, tok):
    with serve(model, tok, api_key="s3cret") as s:
        assert request(s, "GET", "/v1/models")[0] == 401
        assert request(s, "GET", "/v1/models", headers={"Authorization": "Bearer nope"})[0] == 401
        status, _, data = request(s, "GET", "/v1/models",
                                  headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and json.loads(data)["data"][0]["id"] == NAME


# ---------------------------------------------------------------------------
# concurrency, binding, shutdown
# ---------------------------------------------------------------------------

def test_fifty_concurrent_requests_from_eight_threads(server):
    expected = chat(server, LONG, max_tokens=8, temperature=0)["choices"][0]["message"]

    def one(i):
        if i % 5 == 0:                    # some streams among them
            events = parse_sse(chat(server, LONG, max_tokens=8, temperature=0, stream=True))
            assert events[-1] == "[DONE]"
            return "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                           for e in events[:-1])
        return chat(server, LONG, max_tokens=8, temperature=0)["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(50)))
    assert answers == [expected["content"]] * 50
    assert server.running


def test_refuses_a_non_loopback_address_unless_told(model, tok):
    for host in ("0.0.0.0", "", "8.8.8.8"):
        with pytest.raises(ValueError, match="allow_remote"):
            serve(model, tok, host=host)
    with serve(model, tok, host="0.0.0.0", allow_remote=True) as s:
        assert s.port > 0
        # reachable through loopback too, since 0.0.0.0 is every interface
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("GET", "/v1/models")
        assert conn.getresponse().status == 200
        conn.close()
    with serve(model, tok, host="localhost") as s:
        assert s.url.startswith("http://127.0.0.1:") or s.url.startswith("http://[::1]:")


def test_bad_arguments_are_refused(model, tok):
    with pytest.raises(ValueError, match="port"):
        serve(model, tok, port=70000)
    with pytest.raises(ValueError, match="max_tokens_cap"):
        serve(model, tok, max_tokens_cap=0)
    with pytest.raises(ValueError, match="cannot encode"):
        serve(model, CharTokenizer("abc"))


def test_shutdown_closes_the_port(model, tok):
    s = serve(model, tok)
    assert request(s, "GET", "/v1/models")[0] == 200 and s.running
    s.shutdown()
    assert not s.running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((s.host, s.port), timeout=5)
    s.shutdown()                           # twice is fine


# ---------------------------------------------------------------------------
# checkpoint and command line
# ---------------------------------------------------------------------------

def test_checkpoint_round_trip(tmp_path, model, tok):
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, tok)
    loaded, loaded_tok = load_checkpoint(path, "cpu")
    assert loaded_tok.chars == tok.chars and loaded.config == model.config
    idx = torch.tensor([tok.encode("User: hi")])
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    torch.save({"not": "ours"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "gptcourse.serve", "--help"], capture_output=True,
                       text=True, timeout=60, env=_env())
    assert r.returncode == 0
    for flag in ("--host", "--port", "--steps", "--checkpoint", "--allow-remote"):
        assert flag in r.stdout


@pytest.mark.parametrize("stop_signal", ["SIGINT", "SIGTERM"])     # Ctrl-C, kill
def test_cli_serves_a_checkpoint_until_stopped(tmp_path, model, tok, stop_signal):
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, tok)
    cmd = [sys.executable, "-m", "gptcourse.serve", "--checkpoint", str(path), "--port", "0",
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    try:
        lines = [proc.stdout.readline() for _ in range(2)]
        assert lines[0].startswith("loaded "), lines
        assert lines[1].startswith(f"serving {NAME} at http://127.0.0.1:"), lines
        url = lines[1].split()[3]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == NAME
        conn.close()
        proc.send_signal(getattr(signal, stop_signal))
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    if stop_signal == "SIGTERM":
        return
    # a public address is refused from the command line too
    r = subprocess.run(cmd[:-2] + ["--host", "0.0.0.0"], capture_output=True, text=True,
                       timeout=60, env=_env())
    assert r.returncode == 2 and "--allow-remote" in r.stderr
