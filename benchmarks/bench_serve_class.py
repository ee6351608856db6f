"""The chat server for a whole class: 30 simulated students on one server.

Starts `python -m gptcourse.serve` (SmolLM2-135M-Instruct) with one API key
per student (each key is a client, with its own limits and prefix-cache
entries) and lets 30 students work at once, each sending a few requests
with a short pause between them:

    short     10 students: a short question, answered as one JSON response
    stream     8 students: a short question, streamed
    long       6 students: a question about their own document of 1,000+
               tokens, streamed (the same document each time: a follow-up)
    tools      3 students: a question with a function offered (JSON)
    leave      3 students: a streamed question, left after two chunks

and reports, per kind, the p50 / p99 time to first token (streamed: the
first chunk with content or a call; JSON: the whole answer, the first
moment a JSON client sees a token), the tokens per second each client got
(its completion tokens over the time its requests took), the worst
client's median wait over the median client's, the answers by HTTP status
(and error events inside streams), and the server's resident memory from
/health before, at its peak and after. Issue 27's goal: no client waits
more than a few times the median. Usage:

    python benchmarks/bench_serve_class.py [--requests 2] [--threads 2] [--save DIR]
"""
import argparse
import asyncio
import collections
import json
import os
import platform
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import start_server  # noqa: E402

MODEL = "smollm2-135m-instruct"
KINDS = [("short", 10), ("stream", 8), ("long", 6), ("tools", 3), ("leave", 3)]
QUESTIONS = ["What is a list in Python?", "Why is the sky blue?", "What is the capital of Italy?",
             "How do plants make food?", "What is a prime number?", "Name three planets.",
             "What does a CPU do?", "How many legs does a spider have?", "What is gravity?",
             "Who wrote Romeo and Juliet?", "What is an atom?", "Why do we sleep?"]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
NOUNS = ["river", "engine", "library", "garden", "market", "bridge", "school", "harbor", "forest", "station"]
ADJECTIVES = ["old", "quiet", "busy", "narrow", "famous", "broken", "bright", "hidden", "wooden", "modern"]


def document(seed, sentences=38):
    """A student's own document, about 1,100 SmolLM2 tokens of plain sentences."""
    rng = random.Random(seed)
    lines = [f"Notes of student {seed} on the town of {rng.choice(['Ardel', 'Brisk', 'Corwen', 'Dunmore'])}."]
    for i in range(sentences):
        lines.append(f"Fact {i + 1}: the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} near the "
                     f"{rng.choice(NOUNS)} was built in {rng.randint(1200, 2020)} and is "
                     f"{rng.randint(2, 900)} meters from the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}.")
    return " ".join(lines)


class Student:
    """One client: its kind, key and requests' results [(status, ttft, seconds, tokens, error)]."""

    def __init__(self, i, kind, key, rng):
        self.i, self.kind, self.key, self.rng = i, kind, key, rng
        self.doc = document(i) if kind == "long" else None
        self.results = []

    def body(self, j):
        q = QUESTIONS[(self.i + j) % len(QUESTIONS)]
        body = {"model": MODEL, "temperature": 0, "max_tokens": 16,
                "messages": [{"role": "user", "content": q}]}
        if self.kind == "long":
            body["messages"] = [{"role": "user", "content": f"{self.doc}\n\nIn one sentence: which fact "
                                                            f"mentions number {j + 1}?"}]
        elif self.kind == "tools":
            city = ["Paris", "Oslo", "Lima", "Cairo"][(self.i + j) % 4]
            body.update(messages=[{"role": "user", "content": f"What is the weather in {city}?"}], tools=WEATHER,
                        tool_choice="required" if j % 2 else "auto", max_tokens=24)
        elif self.kind in ("stream", "leave"):
            body["max_tokens"] = 16 if self.kind == "stream" else 32
        if self.kind in ("stream", "long", "leave"):
            body.update(stream=True, stream_options={"include_usage": True})
        return body

    async def request(self, client, url, j):
        body = self.body(j)
        headers = {"Authorization": f"Bearer {self.key}"}
        start = time.perf_counter()
        if not body.get("stream"):
            r = await client.post(url + "/v1/chat/completions", json=body, headers=headers)
            took = time.perf_counter() - start
            tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
            return r.status_code, took, took, tokens, None
        first, tokens, chunks, error = None, 0, 0, None
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return r.status_code, None, time.perf_counter() - start, 0, None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"].get("code") or chunk["error"]["type"]
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif chunk["choices"] and (chunk["choices"][0]["delta"].get("content")
                                           or chunk["choices"][0]["delta"].get("tool_calls")):
                    chunks += 1
                    tokens = max(tokens, chunks)               # until the usage chunk says
                    if first is None:
                        first = time.perf_counter() - start
                    if self.kind == "leave" and chunks == 2:
                        break                                  # closes the stream: the client leaves
        return 200, first, time.perf_counter() - start, tokens, error

    async def work(self, client, url, requests):
        await asyncio.sleep(self.rng.uniform(0, 2))            # students do not all start at once
        for j in range(requests if self.kind != "long" else max(1, requests - 1)):
            try:
                self.results.append(await self.request(client, url, j))
            except httpx.HTTPError as e:
                self.results.append((type(e).__name__, None, None, 0, None))
            await asyncio.sleep(self.rng.uniform(0.5, 1.5))    # reading the answer


async def watch_memory(client, url, peak, stop):
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], (await client.get(url + "/health")).json()["rss_bytes"])
        except httpx.HTTPError:
            pass
        await asyncio.sleep(1)


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))] if xs else float("nan")


async def class_load(url, keys, requests, seed):
    rng = random.Random(seed)
    kinds = [k for k, n in KINDS for _ in range(n)]
    students = [Student(i, kind, key, random.Random(rng.random())) for i, (kind, key) in enumerate(zip(kinds, keys))]
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        before = (await client.get(url + "/health")).json()
        peak, stop = [before["rss_bytes"]], asyncio.Event()
        watcher = asyncio.ensure_future(watch_memory(client, url, peak, stop))
        start = time.perf_counter()
        await asyncio.gather(*(s.work(client, url, requests) for s in students))
        wall = time.perf_counter() - start
        stop.set()
        await watcher
        await asyncio.sleep(2)
        after = (await client.get(url + "/health")).json()
    return students, wall, before, max(peak[0], after["rss_bytes"]), after


def summarize(students, wall, before, peak, after):
    """The tables: per kind, per client, and the answers by status."""
    rows = []
    for kind, _ in KINDS:
        done = [r for s in students if s.kind == kind for r in s.results]
        ttft = [r[1] for r in done if r[1] is not None]
        rows.append([kind, str(len(done)), f"{pct(ttft, 0.5):.2f} / {pct(ttft, 0.99):.2f}",
                     f"{statistics.mean(r[2] for r in done if r[2] is not None):.2f}"])
    per_kind = {"columns": ["kind", "requests", "time to first token p50 / p99 (s)", "mean request time (s)"],
                "rows": rows}
    waits = {s.i: statistics.median([r[1] for r in s.results if r[1] is not None] or [float("nan")])
             for s in students}
    speed = {s.i: sum(r[3] for r in s.results) / max(1e-9, sum(r[2] or 0 for r in s.results)) for s in students}
    median_wait = statistics.median(waits.values())
    worst = max(waits, key=waits.get)
    not_long = [w for i, w in waits.items() if students[i].kind != "long"]
    statuses = collections.Counter(str(r[0]) for s in students for r in s.results)
    errors = collections.Counter(r[4] for s in students for r in s.results if r[4])
    mb = 1 << 20
    summary = {"columns": ["measure", "value"], "rows": [
        ["students / requests / wall", f"{len(students)} / {sum(len(s.results) for s in students)} / {wall:.0f} s"],
        ["tokens/s per client, min / median / max",
         f"{min(speed.values()):.1f} / {statistics.median(speed.values()):.1f} / {max(speed.values()):.1f}"],
        ["median client's median wait", f"{median_wait:.2f} s"],
        ["worst client's median wait / the median", f"{waits[worst] / median_wait:.1f}x "
                                                    f"({students[worst].kind}, {waits[worst]:.2f} s)"],
        ["worst / median, without the long documents", f"{max(not_long) / statistics.median(not_long):.1f}x"],
        ["answers by HTTP status", ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))],
        ["4xx / 5xx", f"{sum(v for k, v in statuses.items() if k.startswith('4'))} / "
                      f"{sum(v for k, v in statuses.items() if k.startswith('5'))}"],
        ["error events in streams", ", ".join(f"{k}: {v}" for k, v in errors.items()) or "none"],
        ["server RSS before / peak / after (MB)", f"{before['rss_bytes'] / mb:.0f} / {peak / mb:.0f} / "
                                                  f"{after['rss_bytes'] / mb:.0f}"],
        ["after: running / waiting / in flight", f"{after['running']} / {after['waiting']} / "
                                                 f"{after.get('client_requests_in_flight', '?')}"],
    ]}
    return per_kind, summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2, help="requests per student (long: one fewer)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="save the run for the book's appendix in DIR")
    args = parser.parse_args()
    keys = [f"student-{i:02d}-{secrets.token_hex(8)}" for i in range(sum(n for _, n in KINDS))]
    with tempfile.NamedTemporaryFile("w", suffix=".keys", delete=False) as f:
        f.write("\n".join(keys) + "\n")
    proc, url = start_server(args.threads, "--api-key-file", f.name)
    try:
        students, wall, before, peak, after = asyncio.run(class_load(url, keys, args.requests, args.seed))
    finally:
        proc.terminate()
        proc.wait(30)
        os.unlink(f.name)
    tables = summarize(students, wall, before, peak, after)
    print(f"\nSmolLM2-135M-Instruct, greedy, {len(students)} students with one API key each, "
          f"{args.threads} torch thread(s), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}\n")
    for t in tables:
        for line in [t["columns"], ["---"] * len(t["columns"])] + t["rows"]:
            print("| " + " | ".join(line) + " |")
        print()
    if args.save:
        import write_appendix
        record = {"section": "serve", "date": time.strftime("%Y-%m-%d"), "host": write_appendix.host(),
                  "title": f"a class of {len(students)} students on one server",
                  "command": "`make bench-serve-class` (`benchmarks/bench_serve_class.py`)",
                  "source": "`benchmarks/bench_serve_class.py --save`, this run's tables",
                  "text": [f"SmolLM2 greedy, {len(students)} students with one API key each ("
                           + ", ".join(f"{n} {k}" for k, n in KINDS) + f"), {args.requests} requests each "
                           f"(long: {max(1, args.requests - 1)}), 0.5-1.5 s between them, {args.threads} torch "
                           f"thread(s), load average {os.getloadavg()[0]:.1f} at the end."],
                  "tables": list(tables)}
        write_appendix.check(record, "the measurement to save")
        path = args.save / f"{record['date']}-serve-class-{platform.node() or 'host'}.json"
        args.save.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"saved {path}")


if __name__ == "__main__":
    main()
