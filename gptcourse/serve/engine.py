"""The scheduler: continuous batching in a background thread (`Engine`), and
a request inside it (`Sequence`).

Every step is one forward pass over a ragged batch (gptcourse.serve.runner):
decoding rows bring their newest token, prompts being read bring their next
pieces, within a budget of max_step_tokens new tokens. Between two steps a
finished sequence leaves and a waiting one joins. gptcourse.batching explains
the idea and holds the forward steps; chapter 17 builds it by hand.

The greedy tokens are those of one-at-a-time decoding (tests/test_batching.py
checks it).
"""
import collections
import math
import os
import threading
import time

import torch

from ..sampling import sample_next
from .output import TextOutput, logprob_entry
from .params import SamplingParams, positive_int
from .runner import make_batch


class Sequence:
    """A request being decoded: its prompt, its SamplingParams and its output.

    Sequence(prompt_ids, max_tokens, on_event, params) or, as chapter 17
    writes it, with the SamplingParams' fields as keywords:
    Sequence(prompt, 16, on_event, temperature=0, stop_ids={END}).
    cache_salt: prefix-cache entries are shared only with the same salt.

    on_event(kind, data) is called from the engine's thread:
      ("text", (piece, logprob_entries))  text that can be sent (may be "")
      ("end", (finish_reason, completion_tokens))
      ("error", message)
    finish_reason: "stop" (end-of-turn token or stop string), "length".
    An error with .expired set means the sequence waited longer than the
    engine's max_queue_seconds and was never read (.retry_after: seconds to
    suggest); the server answers it as an overload, not as a failure.
    """

    def __init__(self, prompt_ids, max_tokens, on_event, *, params=None, cache_salt=None, **sampling):
        if not prompt_ids:
            raise ValueError("the prompt must have at least one token")
        if params is not None and sampling:
            raise ValueError(f"give params or sampling keywords, not both (got {sorted(sampling)})")
        self.prompt_ids, self.on_event = list(prompt_ids), on_event
        self.max_tokens = positive_int("max_tokens", max_tokens)
        self.params = params if params is not None else SamplingParams(**sampling)
        self.cache_salt = cache_salt
        # set from another thread
        self.cancelled = False          # the client left
        # the engine's bookkeeping
        self.queued_at = None           # time.monotonic() when submitted
        self.expired = False            # waited past max_queue_seconds, never admitted
        self.retry_after = None         # seconds to suggest when expired
        self.done = False
        self.failed = False
        self.admitted = None            # its place in the order of admission
        self.todo = []                  # prompt tokens not read yet
        self.cached_tokens = 0          # prompt tokens found in the prefix cache
        self.generator = None           # its random numbers (None: greedy)
        self.output = None              # a TextOutput: the text, stops, logprob entries
        # what it generated
        self.tokens = []                # every generated id
        self.last = None                # the newest one: the next step's input
        self.counts = None              # (V,) how often each token was generated, for the penalties

    def cancel(self):
        self.cancelled = True


class EngineBusy(Exception):
    """submit() with max_waiting sequences already queued; retry_after: seconds to suggest."""

    def __init__(self, message, retry_after):
        super().__init__(message)
        self.retry_after = retry_after


class Engine:
    """Continuous batching in a background thread.

    submit(seq) queues a Sequence, or raises EngineBusy when max_waiting are
    already queued (the server answers 429 with Retry-After: a full queue
    turns a burst into refusals a client can retry, not minutes of waiting).
    A sequence still queued after max_queue_seconds gets an error with
    seq.expired set instead of waiting on (None: no limit).

    Every step first lets waiting sequences join, in order of arrival, while
    fewer than max_batch are active (however long the prompts already being
    read: a short request does not wait for them). Then it is planned within
    a budget of max_step_tokens new tokens: each decoding sequence brings its
    newest token, and the prompts being read share what is left, shortest
    remaining first, none taking more than an equal share of what the
    shorter ones left (`share_budget`): a short prompt is read in one step
    beside long ones, and long ones share the rest evenly, so none starves.
    The step is one forward pass; a prompt read to its end, and every
    decoding sequence, gets its next token. A sequence leaves at its end, on
    cancel() (checked every step), or on an error, which reaches only the
    sequences it concerns. max_batch=1 decodes one request at a time, in
    arrival order.

    A smaller budget keeps each step short (the tokens of the sequences
    already answering keep coming while a long prompt is read); a larger
    one reads more prompts per pass over the weights.

    stats: steps; batch_tokens (tokens sampled by the steps: more than one
    per step means sequences shared the passes); max_batch_seen (the most
    sequences in one step); prefills (sequences admitted); prompt_tokens
    (prompt tokens computed); reused_tokens (prompt tokens found in the
    prefix cache instead); expired (sequences that waited too long).
    """

    def __init__(self, model, tokenizer, max_batch=16, max_length=2048, max_step_tokens=256,
                 prefix_tokens=4096, max_waiting=64, max_queue_seconds=None):
        self.max_batch = positive_int("max_batch", max_batch)
        self.max_waiting = positive_int("max_waiting", max_waiting)
        if max_queue_seconds is not None and (isinstance(max_queue_seconds, bool)
                                              or not isinstance(max_queue_seconds, (int, float))
                                              or not 0 < max_queue_seconds < math.inf):
            raise ValueError(f"max_queue_seconds must be a positive number of seconds or None, "
                             f"got {max_queue_seconds!r}")
        self.max_queue_seconds = max_queue_seconds
        self.max_step_tokens = positive_int("max_step_tokens", max_step_tokens)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch = make_batch(model, max_batch, max_length, prefix_tokens)
        self.device = next(model.parameters()).device
        self.active = []                # row r of the batch is active[r]
        self.waiting = collections.deque()
        self.cond = threading.Condition()
        self.stats = dict(steps=0, batch_tokens=0, max_batch_seen=0, prefills=0, prompt_tokens=0,
                          reused_tokens=0, expired=0)
        self._stopping = False
        self._threads = torch.get_num_threads()      # a new thread starts with the default
        self._thread = threading.Thread(target=self._run, name="gptcourse.serve.Engine", daemon=True)
        self._thread.start()

    def submit(self, seq):
        with self.cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            if len(self.waiting) >= self.max_waiting:
                raise EngineBusy(f"{len(self.waiting)} requests are waiting for the model "
                                 f"and {len(self.active)} are being answered",
                                 retry_after=self._retry_after())
            seq.queued_at = time.monotonic()
            self.waiting.append(seq)
            self.cond.notify()
        return seq

    def stop(self):
        with self.cond:
            self._stopping = True
            self.cond.notify()
        self._thread.join(timeout=30)
        for seq in list(self.waiting) + self.active:
            self._fail(seq, "the server is shutting down")

    def _retry_after(self):
        """Seconds to suggest to a client refused for load: one per batch queued ahead."""
        return 1 + len(self.waiting) // self.max_batch

    @property
    def load(self):
        """(active, waiting): sequences being decoded and queued."""
        return len(self.active), len(self.waiting)

    def state(self):
        """What /health reports: sequences running and queued, the KV cache's memory
        (allocated and in use), the prefix cache's tokens, the process's resident memory."""
        with self.cond:
            running, waiting = len(self.active), len(self.waiting)
            memory = self.batch.memory(running)
        return {"running": running, "waiting": waiting, **memory, "rss_bytes": resident_bytes()}

    # ---- the loop, in the engine's thread ----------------------------------
    def _run(self):
        torch.set_num_threads(self._threads)
        with torch.inference_mode():
            while True:
                with self.cond:
                    while not self._stopping and not self.waiting and not self.active:
                        self.cond.wait()
                    if self._stopping:
                        return
                self._drop_finished()
                self._expire_waiting()
                chunks = self._plan()
                if any(chunks):
                    self._step(chunks)

    def _expire_waiting(self):
        """Drop queued sequences whose client left; fail those queued longer than
        max_queue_seconds (seq.expired: the server answers them as an overload)."""
        now = time.monotonic()
        with self.cond:
            gone = [seq for seq in self.waiting if seq.cancelled or (
                self.max_queue_seconds is not None and now - seq.queued_at > self.max_queue_seconds)]
            for seq in gone:
                self.waiting.remove(seq)
            retry_after = self._retry_after()
        for seq in gone:
            if seq.cancelled:
                seq.done = True
                continue
            seq.expired, seq.retry_after = True, retry_after
            self.stats["expired"] += 1
            self._fail(seq, f"the request waited {now - seq.queued_at:.0f} s for the model, longer than "
                            f"the limit of {self.max_queue_seconds:g} s: the server is overloaded")

    def _plan(self):
        """This step's new tokens, one list per active row (admitting waiting sequences)."""
        while len(self.active) < self.max_batch:               # join first, whatever is being read
            with self.cond:
                if not self.waiting:
                    break
                seq = self.waiting.popleft()
            self._admit(seq)
        chunks = [[] if seq.todo else [seq.last] for seq in self.active]
        budget = self.max_step_tokens - sum(map(len, chunks))
        reading = [r for r, seq in enumerate(self.active) if seq.todo]
        takes = share_budget([len(self.active[r].todo) for r in reading], budget)
        if reading and not any(takes):                         # no budget left: the oldest still moves
            takes[min(range(len(reading)), key=lambda i: self.active[reading[i]].admitted)] = 1
        for r, take in zip(reading, takes):
            chunks[r] = self.active[r].todo[:take]
        return chunks

    def _admit(self, seq):
        """Give seq the next free row; its todo: the prompt tokens to read."""
        if seq.cancelled:
            seq.done = True
            return False
        try:
            row = len(self.active)
            seq.todo, seq.cached_tokens = self.batch.start(row, seq.prompt_ids, seq.cache_salt)
            seq.admitted = self.stats["prefills"]
            self.stats["prefills"] += 1
            self.stats["reused_tokens"] += seq.cached_tokens
            self.stats["prompt_tokens"] += len(seq.prompt_ids) - seq.cached_tokens
            if not seq.params.greedy:
                seed = seq.params.seed
                seed = seed if seed is not None else int(torch.randint(0, 2 ** 62, ()).item())
                seq.generator = torch.Generator(device=self.device).manual_seed(seed)
            seq.output = TextOutput(self.tokenizer, seq.params.stop, seq.on_event)
        except Exception as e:                        # noqa: BLE001 -- one request's failure
            try:
                self.batch.move(row, row)             # the row gives back what start() gave it
            except Exception:                         # noqa: BLE001 -- the request fails either way
                pass
            self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
            return False
        self.active.append(seq)
        return True

    def _step(self, chunks):
        try:
            logits = self.batch.step(chunks)                                       # (n, V)
        except Exception as e:                        # noqa: BLE001 -- fails this batch only
            for seq in self.active:
                self._fail(seq, f"generation failed: {type(e).__name__}: {e}")
            return
        self.stats["steps"] += 1
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], sum(1 for c in chunks if c))
        for row, (seq, chunk) in enumerate(zip(self.active, chunks)):
            if not chunk:
                continue
            try:
                if seq.todo:                                   # a piece of the prompt was read
                    seq.todo = seq.todo[len(chunk):]
                    if seq.todo:
                        continue
                    self.batch.remember(row, seq.prompt_ids, seq.cache_salt)   # the whole prompt is in the row
                self.stats["batch_tokens"] += 1
                self._take(seq, logits[row])
            except Exception as e:                    # noqa: BLE001
                self._fail(seq, f"generation failed: {type(e).__name__}: {e}")

    def _drop_finished(self):
        """Remove finished and cancelled rows (their conversations go to the prefix
        cache), moving the last row into each gap."""
        r = 0
        while r < len(self.active):
            seq = self.active[r]
            if seq.done or seq.cancelled:
                if not seq.failed and not seq.todo:
                    ids = (seq.prompt_ids + seq.tokens)[:-1]
                    try:
                        self.batch.remember(r, ids, seq.cache_salt)   # the prompt and the answer but its last token
                    except Exception:                   # noqa: BLE001 -- a cache miss later, no more
                        pass
                seq.done = True
                last = len(self.active) - 1
                self.batch.move(last, r)
                self.active[r] = self.active[last]
                self.active.pop()
            else:
                r += 1

    def _fail(self, seq, message):
        seq.failed = True
        if not seq.done:
            seq.done = True
            seq.on_event("error", message)

    # ---- one token for one sequence ----------------------------------------
    def _scores(self, seq, logits):
        """logits (V,) -> the scores sampled from: the request's logit_bias added, its
        presence and frequency penalties subtracted."""
        p = seq.params
        if not p.reshapes_scores:
            return logits
        scores = logits.clone()
        for token, bias in p.logit_bias.items():
            scores[token] += bias
        if seq.tokens and (p.presence_penalty or p.frequency_penalty):
            if seq.counts is None or len(seq.counts) != scores.shape[0]:
                seq.counts = torch.bincount(torch.tensor(seq.tokens), minlength=scores.shape[0])
            counts = seq.counts.to(scores.device, scores.dtype)
            scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return scores

    def _pick(self, seq, logits):
        """logits (V,) float32 -> the next token id, with the request's settings."""
        scores = self._scores(seq, logits)
        if not torch.isfinite(scores).any() or torch.isnan(scores).any():
            raise FloatingPointError("the model's scores are not finite numbers")
        if seq.params.greedy:
            return int(scores.argmax())
        return int(sample_next(scores[None], seq.params.temperature, None, seq.params.nucleus, seq.generator))

    def _take(self, seq, logits):
        token = self._pick(seq, logits)
        seq.tokens.append(token)
        seq.last = token
        if seq.counts is not None:
            seq.counts[token] += 1
        p = seq.params
        if token in p.stop_ids:                                      # the model ended its turn
            seq.output.end()
            return self._end(seq, "stop")
        entry = logprob_entry(self.tokenizer, logits, token, p.top_logprobs) if p.logprobs else None
        reason = seq.output.add(token, entry, last=len(seq.tokens) >= seq.max_tokens)
        if reason is not None:
            self._end(seq, reason)

    def _end(self, seq, reason):
        seq.done = True
        seq.on_event("end", (reason, len(seq.tokens)))


def share_budget(lengths, budget):
    """How many tokens each prompt being read gets this step: the prompts' remaining
    lengths and the step's budget -> a list of takes, in the same order.

    Shortest first, each takes all it has left or an equal share of the
    budget still unassigned, whichever is less ("water-filling"): a short
    prompt finishes in one step, long ones split the rest evenly, the takes
    never add up to more than the budget, and none is left out while the
    budget is at least the number of prompts.

    >>> share_budget([1800, 30, 1800, 1800, 1800], 256)
    [57, 30, 57, 56, 56]
    >>> share_budget([5, 3], 100), share_budget([4, 4], 0)
    ([5, 3], [0, 0])
    """
    takes = [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    left = max(0, budget)
    for n, i in enumerate(order):
        takes[i] = min(lengths[i], -(-left // (len(order) - n)))     # ceil(left / prompts left)
        left -= takes[i]
    return takes


def resident_bytes():
    """The process's resident memory now (Linux: /proc/self/statm), else its peak (getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
