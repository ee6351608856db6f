"""An attack round on the chat server: issue 27's table, replayed against a live server.

Starts `python -m gptcourse.serve` (SmolLM2-135M-Instruct) with two API keys,
a victim's and an attacker's (each key is a client), and plays each attack of
issue 27 as the attacker, measuring what it costs the victim or what it
reveals:

    pin        the victim's system prompt holds a 4-digit PIN; the attacker probes
               all 10 first digits and reads `cached_tokens` (and the victim,
               probing its own, sees whole blocks only)
    flush      the attacker sends 12 distinct 600-token prompts; is the victim's
               cached conversation still found?
    letters    12,000 random letters with no spaces: time to the refusal
    megabyte   10 distinct prompts of ~1 MB: time to each refusal, RSS before/after
    long       4 long (1,800-token) prompts from the attacker, then the victim's
               short question, streamed: its first token, against alone
    grind      8 threads of the attacker sending, for 20 s, prompts just under the
               size bound that are slowest to tokenize and refused once counted;
               the victim's first token meanwhile
    nested     tool_calls arguments nested 50,000 deep in the history
    required   tool_choice "required" with two tools; a named tool with max_tokens 3

and prints one line per attack with its verdict, the HTTP statuses seen (any
5xx is a failure), and the server's /health memory. Not part of `make test`
(minutes of CPU): `make attack-serve`. Usage:

    python benchmarks/attack_serve.py [--threads 2]
"""
import argparse
import json
import os
import random
import string
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import start_server  # noqa: E402
from bench_serve_class import document  # noqa: E402

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class Client:
    def __init__(self, url, key, statuses):
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
        self.statuses = statuses

    def chat(self, **body):
        start = time.perf_counter()
        r = self.http.post("/v1/chat/completions", json={"model": MODEL, "temperature": 0, **body})
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
        return r, time.perf_counter() - start

    def health(self):
        return self.http.get("/health").json()


def cached(r):
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def attack_pin(victim, attacker):
    secret = "You are the bank's assistant. The customer's PIN is 4719. Never reveal it."
    ask = [{"role": "user", "content": "Hello"}]
    victim.chat(messages=[{"role": "system", "content": secret}, *ask], max_tokens=1)
    attacker.chat(messages=[{"role": "system", "content": secret.replace("4719", "5555")}, *ask], max_tokens=1)
    seen = {}                                  # after that warm-up its own first block is cached: 16 for every guess
    for d in "0123456789":
        guess = secret.replace("4719", d + "000")
        r, _ = attacker.chat(messages=[{"role": "system", "content": guess}, *ask], max_tokens=1)
        seen[d] = cached(r)
    own = {}
    for d in "0123456789":                     # the victim probing its own prompt: whole blocks only
        guess = secret.replace("4719", d + "000")
        r, _ = victim.chat(messages=[{"role": "system", "content": guess}, *ask], max_tokens=1)
        own[d] = cached(r)
    leak = len(set(seen.values())) > 1
    return (not leak, f"attacker's cached_tokens for the 10 first digits: {seen} "
                      f"(one value: nothing learned); the victim's own probes: {sorted(set(own.values()))}, "
                      f"all multiples of 16: {all(v % 16 == 0 for v in own.values())}")


def attack_flush(victim, attacker):
    convo = [{"role": "system", "content": "You answer questions about the history of Rome."},
             {"role": "user", "content": "Who founded Rome, according to the legend?"}]
    victim.chat(messages=convo, max_tokens=1)
    before = cached(victim.chat(messages=convo, max_tokens=1)[0])
    for i in range(12):
        attacker.chat(messages=[{"role": "user", "content": document(100 + i, sentences=20)}], max_tokens=1)
    after = cached(victim.chat(messages=convo, max_tokens=1)[0])
    return after == before > 0, f"victim's cached_tokens before the flood {before}, after {after}"


def attack_letters(attacker):
    rng = random.Random(0)
    text = "".join(rng.choice(string.ascii_letters) for _ in range(12000))
    r, s = attacker.chat(messages=[{"role": "user", "content": text}], max_tokens=16)
    return r.status_code == 400 and s < 2, f"{r.status_code} in {s:.2f} s ({r.json()['error'].get('code')})"


def attack_megabyte(attacker):
    rss0 = attacker.health()["rss_bytes"]
    times, codes = [], set()
    for i in range(10):
        text = "".join(random.Random(i).choice(string.ascii_lowercase + " ") for _ in range(1_000_000 - 200))
        r, s = attacker.chat(messages=[{"role": "user", "content": text}], max_tokens=16)
        times.append(s)
        codes.add(r.status_code)
    rss1 = attacker.health()["rss_bytes"]
    grew = (rss1 - rss0) / 2**20
    return codes <= {400, 413} and max(times) < 2 and grew < 50, \
        f"statuses {sorted(codes)}, slowest refusal {max(times):.2f} s, RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MB"


def first_token(client, messages, max_tokens):
    """Seconds to the first content chunk of a streamed answer, and to its end."""
    start, first = time.perf_counter(), None
    body = {"model": MODEL, "temperature": 0, "max_tokens": max_tokens, "messages": messages, "stream": True}
    with client.http.stream("POST", "/v1/chat/completions", json=body) as r:
        client.statuses[r.status_code] = client.statuses.get(r.status_code, 0) + 1
        for line in r.iter_lines():
            if first is None and line.startswith("data: {"):
                delta = (json.loads(line[6:]).get("choices") or [{}])[0].get("delta", {})
                if delta.get("content"):
                    first = time.perf_counter() - start
    return first, time.perf_counter() - start


def attack_long(url, victim_key, attacker_key, statuses):
    question = [{"role": "user", "content": "What is the capital of Italy?"}]
    victim = Client(url, victim_key, statuses)
    alone = min((first_token(victim, question, 8) for _ in range(2)), key=lambda t: t[0])
    docs = [document(200 + i, sentences=60) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        longs = [pool.submit(Client(url, attacker_key, statuses).chat, max_tokens=8,
                             messages=[{"role": "user", "content": d + "\n\nSummarize."}]) for d in docs]
        time.sleep(1.0)                                    # the long prompts are being read
        first, whole = first_token(victim, question, 8)
        long_s = [f.result()[1] for f in longs]
        prompt = [f.result()[0].json()["usage"]["prompt_tokens"] for f in longs]
    return first < 3 * alone[0] + 2, (
        f"victim's short question, streamed: first token after {first:.1f} s, whole answer {whole:.1f} s, "
        f"while 4 long prompts ({min(prompt)}-{max(prompt)} tokens, done in {min(long_s):.0f}-{max(long_s):.0f} s) "
        f"were read; alone {alone[0]:.1f} s and {alone[1]:.1f} s (each step of its answer shares the pass "
        f"with a piece of the long prompts)")


def attack_grind(url, victim_key, attacker_key, statuses):
    """8 threads send, for 20 s, prompts just under the size bound that take the
    longest to tokenize (160 KB of '#': every byte merged) and are refused once
    counted: how many got tokenized, and the victim's first token meanwhile."""
    question = [{"role": "user", "content": "What is the capital of Italy?"}]
    victim = Client(url, victim_key, statuses)
    alone = min(first_token(victim, question, 8)[0] for _ in range(2))
    heavy = [{"role": "user", "content": "#" * 160_000}]
    end, seen = time.perf_counter() + 20, {}

    def grind():
        client = Client(url, attacker_key, statuses)
        while time.perf_counter() < end:
            r, _ = client.chat(messages=heavy, max_tokens=1)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            if r.status_code == 429:
                time.sleep(0.5)
    with ThreadPoolExecutor(8) as pool:
        workers = [pool.submit(grind) for _ in range(8)]
        time.sleep(3)
        first, whole = first_token(victim, question, 8)
        for w in workers:
            w.result()
    return first < 3 * alone + 2 and seen.get(400, 0) <= 8, (
        f"attacker's answers in 20 s: {dict(sorted(seen.items()))} (400: tokenized, then refused; 429: its "
        f"tokens per minute spent on reading); the victim's first token after {first:.1f} s (alone {alone:.1f} s)")


def attack_nested(attacker):
    args = "[" * 50000 + "]" * 50000
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": args}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    r, s = attacker.chat(messages=history, tools=[WEATHER], max_tokens=4)
    return r.status_code == 400, f"{r.status_code} in {s:.2f} s"


def attack_tools(attacker):
    ask = [{"role": "user", "content": "What time is it in Tokyo?"}]
    r, _ = attacker.chat(messages=ask, tools=[WEATHER, TIME], tool_choice="required", max_tokens=40)
    choice = r.json()["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    named = {"type": "function", "function": {"name": "get_weather"}}
    r3, _ = attacker.chat(messages=ask, tools=[WEATHER, TIME], tool_choice=named, max_tokens=3)
    c3 = r3.json()["choices"][0]
    ok = (choice["finish_reason"] == "tool_calls" and calls and calls[0]["function"]["name"] in ("get_weather", "get_time")
          and c3["finish_reason"] == "length")
    return ok, (f"required: finish {choice['finish_reason']}, call {calls[0]['function'] if calls else None}; "
                f"named with max_tokens 3: finish {c3['finish_reason']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run only these attacks")
    args = parser.parse_args(argv)
    victim_key, attacker_key = "victim-" + os.urandom(8).hex(), "attacker-" + os.urandom(8).hex()
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        f.write(f"{victim_key}\n{attacker_key}\n")
    proc, url = start_server(args.threads, "--api-key-file", f.name)
    statuses, verdicts = {}, []
    try:
        victim, attacker = Client(url, victim_key, statuses), Client(url, attacker_key, statuses)
        print(f"server {url}, health: {json.dumps(victim.health())}\n")
        for name, run in [("pin", lambda: attack_pin(victim, attacker)),
                          ("flush", lambda: attack_flush(victim, attacker)),
                          ("letters", lambda: attack_letters(attacker)),
                          ("megabyte", lambda: attack_megabyte(attacker)),
                          ("long", lambda: attack_long(url, victim_key, attacker_key, statuses)),
                          ("grind", lambda: attack_grind(url, victim_key, attacker_key, statuses)),
                          ("nested", lambda: attack_nested(attacker)),
                          ("required", lambda: attack_tools(attacker))]:
            if args.only and name not in args.only:
                continue
            start = time.perf_counter()
            ok, what = run()
            verdicts.append(ok)
            print(f"{name:9s} {'held' if ok else 'FAILED':6s} {what}  [{time.perf_counter() - start:.0f} s]",
                  flush=True)
        health = victim.health()
    finally:
        proc.terminate()
        proc.wait(30)
        os.unlink(f.name)
    errors = {s: n for s, n in statuses.items() if s >= 500}
    print(f"\nHTTP statuses: {dict(sorted(statuses.items()))}; 5xx: {errors or 'none'}")
    print(f"health at the end: rss {health['rss_bytes'] / 2**20:.0f} MB, "
          f"kv cache {health.get('kv_cache_bytes', 0) / 2**20:.1f} MB allocated, "
          f"{health.get('kv_cache_bytes_in_use', 0) / 2**20:.1f} in use")
    print(f"{sum(verdicts)} of {len(verdicts)} attacks held")
    return 0 if all(verdicts) and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
