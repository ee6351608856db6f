"""Output processing: from generated tokens to what the client reads.

* `TextOutput`: one sequence's tokens as text, piece by piece (a UTF-8
  character split across tokens comes out whole), stop strings cut off
  (the text that may be the start of one is held back), each piece handed
  on with the log-probabilities of its tokens;
* `logprob_entry`: OpenAI's ``{"token", "logprob", "bytes", "top_logprobs"}``;
* `parse_tool_calls`, `assistant_message`: the answer's
  ``<tool_call>{json}</tool_call>`` blocks as OpenAI's ``tool_calls``;
* `ContentBeforeCalls`: with tools offered, the content that can be
  streamed before the first call.
"""
import json
import re
import uuid

import torch

from ..sampling import StopMatcher, TextDecoder

_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


# ----------------------------------------------------------------------------
# Text as it is generated
# ----------------------------------------------------------------------------

class TextOutput:
    """One sequence's answer, token by token: add(token, entry, last) ->
    "stop" (a stop string), "length" (`last`: the sequence's last token) or
    None; end() ends it where it is (an end-of-turn token).

    on_event("text", (piece, entries)) hands on text that can be sent (may
    be "") and the logprob entries of its tokens; nothing is handed on twice,
    and a stop string and anything after it never is.
    """

    def __init__(self, tokenizer, stops, on_event):
        self.decoder, self.stops, self.on_event = TextDecoder(tokenizer), StopMatcher(stops), on_event
        self.text = ""                  # the answer so far
        self.sent = 0                   # characters handed on
        self.entries = []               # (the character its token's text starts at, logprob entry)
        self.entries_sent = 0

    def add(self, token, entry=None, last=False):
        if entry is not None:
            self.entries.append((len(self.text), entry))
        piece = self.decoder.piece(token)
        found = self.stops.feed(piece)
        if found is not None:                                        # a stop string: cut it off
            after, stop = found
            start = len(self.text) + after - len(stop)
            self.text += piece
            self.end(max(start, self.sent))
            return "stop"
        self.text += piece
        if last:
            self.end()
            return "length"
        self._send(len(self.text) - self.stops.held_back)
        return None

    def _send(self, upto):
        """Hand on the text up to character `upto` and the logprobs of its tokens."""
        if upto <= self.sent and self.entries_sent == len(self.entries):
            return
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        entries = [e for start, e in self.entries[self.entries_sent:] if start < max(upto, self.sent)]
        if not piece and not entries:
            return
        self.sent = max(self.sent, upto)
        self.entries_sent += len(entries)
        self.on_event("text", (piece, entries))

    def end(self, upto=None):
        """The answer is the text up to character `upto` (all of it: None); hand on the rest."""
        upto = len(self.text) if upto is None else upto
        self.text = self.text[:upto]
        if upto > self.sent or self.entries_sent < len(self.entries):
            piece = self.text[self.sent:upto]
            entries = [e for start, e in self.entries[self.entries_sent:] if start < upto]
            self.sent, self.entries_sent = upto, len(self.entries)
            if piece or entries:
                self.on_event("text", (piece, entries))


def _entry(tokenizer, token, logp, top):
    raw = tokenizer.token_bytes(token) if hasattr(tokenizer, "token_bytes") else tokenizer.decode([token]).encode()
    entry = {"token": raw.decode("utf-8", errors="replace"), "logprob": logp, "bytes": list(raw)}
    if top is not None:
        entry["top_logprobs"] = [_entry(tokenizer, t, lp, None) for t, lp in top]
    return entry


def logprob_entry(tokenizer, logits, token, top_logprobs=0):
    """OpenAI's log-probability entry of `token` under logits (V,): its text, its
    bytes, its logprob, and with top_logprobs > 0 the most likely tokens' entries."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = None
    if top_logprobs:
        values, ids = torch.topk(logp, top_logprobs)
        top = list(zip(ids.tolist(), values.tolist()))
    return _entry(tokenizer, token, float(logp[token]), top)


# ----------------------------------------------------------------------------
# Tool calls in the answer
# ----------------------------------------------------------------------------

def _call(name, arguments):
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def parse_tool_calls(text, tool_names):
    """Split generated text into (content or None, tool_calls): every
    <tool_call>{"name": ..., "arguments": ...}</tool_call> naming a known tool.

    >>> parse_tool_calls('<tool_call>\\n{"name": "f", "arguments": {"x": 1}}\\n</tool_call>', {"f"})[1][0]["function"]
    {'name': 'f', 'arguments': '{"x": 1}'}
    """
    calls, kept, last = [], [], 0
    for m in _TOOL_CALL.finditer(text):
        try:
            call = json.loads(m.group(1))
        except (ValueError, RecursionError):        # not JSON, or nested deeper than the parser's stack
            continue
        if not isinstance(call, dict) or call.get("name") not in tool_names:
            continue
        arguments = call.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append(_call(call["name"], arguments))
        kept.append(text[last:m.start()])
        last = m.end()
    kept.append(text[last:])
    content = "".join(kept).strip() if calls else text
    return (content or None) if calls else text, calls


def assistant_message(job, text, finish):
    """(the assistant message, finish_reason) of a finished completion, tool calls
    parsed out. job: the PreparedRequest (gptcourse.serve.prompt)."""
    if job.named:                     # the server wrote the call's start: the model wrote its arguments
        # (their start may be the prefill's: ' {"' after '"arguments":', see prompt.named_prefill)
        value = (job.prefill.partition('"arguments":')[2] + text).split("</tool_call>")[0].strip()
        try:
            arguments, _ = json.JSONDecoder().raw_decode(value)
            arguments = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            complete = True
        except (ValueError, RecursionError):     # as OpenAI warns: not always valid JSON
            arguments, complete = value, False
        call = _call(job.named, arguments)
        # cut by max_tokens inside the arguments: "length", as OpenAI reports it (they are partial)
        return ({"role": "assistant", "content": None, "refusal": None, "tool_calls": [call]},
                "length" if finish == "length" and not complete else "tool_calls")
    text = job.prefill + text
    if job.tool_names:                    # tools offered: the content is stripped, calls or not
        content, calls = parse_tool_calls(text, job.tool_names)
        if calls:
            return {"role": "assistant", "content": content, "refusal": None, "tool_calls": calls}, \
                "tool_calls"
        text = text.strip()
    return {"role": "assistant", "content": text, "refusal": None}, finish


class ContentBeforeCalls:
    """With tools offered, stream an answer's content as it comes, up to its first
    "<tool_call>": the calls themselves are parsed from the whole text at the end.

    feed(piece) -> the content that can be sent now; rest(content) -> what is
    left to send of the final message's content. Whitespace at either end is
    held back (the message's content is stripped), and so is a tail that may
    be the start of "<tool_call>", so the pieces sent are always the
    beginning of the final content.

    >>> c = ContentBeforeCalls()
    >>> [c.feed(p) for p in [" Let me", " check. <tool", "_call>{...}"]]
    ['Let me', ' check.', '']
    >>> c.rest("Let me check.")
    ''
    """
    OPEN = "<tool_call>"

    def __init__(self):
        self.text, self.sent, self.closed = "", "", False
        self._marker = StopMatcher([self.OPEN])        # the marker is watched for as a stop string is

    def feed(self, piece):
        before = len(self.text)
        self.text += piece
        if self.closed:
            return ""
        found = self._marker.feed(piece)
        if found is not None:
            self.closed, upto = True, before + found[0] - len(self.OPEN)
        else:
            upto = len(self.text) - self._marker.held_back
        ready = self.text[:upto].strip()
        new = ready[len(self.sent):]
        self.sent = ready if len(ready) > len(self.sent) else self.sent
        return new

    def rest(self, content):
        content = content or ""
        return content[len(self.sent):] if content.startswith(self.sent) else ""
