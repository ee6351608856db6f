"""From a checked request to what the engine decodes: a `PreparedRequest`.

The messages are written in the model's template (ChatML for SmolLM2, the
"User: ... / Assistant:" transcript of gptcourse.chat.format_chat for the
course's GPT), the tools offered in the system message as ChatML models
(Qwen, Hermes) expect them, and the request's knobs become SamplingParams.
What depends on the served model (its vocabulary, its context, the
server's cap on max_tokens) is checked here; what does not is checked by
the pydantic models (gptcourse.serve.protocol). A prompt too long for the
context is refused before it is tokenized (check_fits), and tool_choice
"required" ends in a call to an offered tool (prepare, choose_tool).
"""
import json
from dataclasses import dataclass, field
from typing import FrozenSet, List, Optional

import torch

from ..chat import ROLE_NAMES, SMOLLM2_SYSTEM, encode_chatml, format_chat
from ..sampling import end_of_turn_ids
from .params import SamplingParams
from .protocol import APIError, NamedToolChoice

# The course GPT's transcript: a new turn starts with a newline and a role name.
TURN_STOPS = tuple(f"\n{name}:" for name in ROLE_NAMES.values())

TOOLS_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n"
    "</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


@dataclass
class PreparedRequest:
    """A request, ready for the engine and for writing the answer.

    prompt_ids: the prompt's tokens; max_tokens: the most tokens of the
    answer; sampling: the SamplingParams; cache_salt: the request's prefix-
    cache salt; prefill: the start of a tool call the server wrote for the
    model (tool_choice "required" or named), "" otherwise; tool_names: the
    tools offered; named: the tool the call goes to (a named tool_choice, or the
    one "required" chose), else None;
    include_usage: a last streamed chunk with the usage.

    Chapter 19 reads it as the dict it used to be: job["prefill"] is job.prefill.
    """
    prompt_ids: List[int]
    max_tokens: int
    sampling: SamplingParams
    cache_salt: Optional[str] = None
    prefill: str = ""
    tool_names: FrozenSet[str] = field(default_factory=frozenset)
    named: Optional[str] = None
    include_usage: bool = False

    @property
    def logprobs(self):
        return self.sampling.logprobs

    def __getitem__(self, name):
        return getattr(self, name)


def _text(content):
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content)


def _with_calls(content, tool_calls):
    """An assistant turn's calls written out as <tool_call>{json}</tool_call> after its content."""
    calls = []
    for call in tool_calls:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = call.function.arguments
        except RecursionError:                            # '[[[[...' thousands deep: the parser's stack
            raise APIError(400, f"The arguments of tool call {call.id!r} are nested too deeply to read",
                           param="messages", code="invalid_value") from None
        calls.append("<tool_call>\n" + json.dumps({"name": call.function.name, "arguments": arguments},
                                                  ensure_ascii=False) + "\n</tool_call>")
    return "\n".join(([content] if content else []) + calls)


def chat_messages(req, default_system=SMOLLM2_SYSTEM):
    """The request's messages as plain {"role", "content"} dicts in system/user/assistant,
    the tool conventions of ChatML models (Qwen, Hermes) written out as text:
    the tool list in the system message, calls as <tool_call>{json}</tool_call>,
    results as a user turn <tool_response>...</tool_response>."""
    out = []
    for m in req.messages:
        role, content = m.role, _text(m.content)
        if role == "developer":                           # OpenAI's newer name for system
            role = "system"
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        elif role == "assistant" and m.tool_calls:
            content = _with_calls(content, m.tool_calls)
        out.append({"role": role, "content": content})
    tools = offered_tools(req)
    if tools:
        listing = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False)
                            for t in tools)
        if out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + TOOLS_PROMPT.format(tools=listing)}
        else:
            out.insert(0, {"role": "system",
                           "content": (default_system or "") + TOOLS_PROMPT.format(tools=listing)})
    return out


def offered_tools(req):
    """The tools the model may call: none with tool_choice "none", the named one if named."""
    if not req.tools or req.tool_choice == "none":
        return []
    if isinstance(req.tool_choice, NamedToolChoice):
        chosen = [t for t in req.tools if t.function.name == req.tool_choice.function.name]
        if not chosen:
            raise APIError(400, f"tool_choice names {req.tool_choice.function.name!r}, which is not "
                                f"in tools", param="tool_choice")
        return chosen
    return req.tools


def named_prefill(name, keyed=False):
    """The opening of a call to tool `name`, through the name: the model writes its arguments.

    It ends at '"arguments":', without the space JSON puts after it: the
    tokenizer reads ' {"' as one token, so a prefill ending in a space ends
    in a token the model never saw there (SmolLM2, so prompted after chapter
    18's two worked calls, wrote the bare expression, '"arguments":
    396*5971}', for each of the 5 questions tried). keyed: the tool's
    parameters have properties, so its arguments are an object with keys:
    the prefill goes on through that token, ' {"', and the model writes the
    first key on (for the same 5 questions: 'expression": ...' each time, so
    '{"expression": "396*5971"}' for the first).
    """
    return '<tool_call>\n{"name": ' + json.dumps(name) + ', "arguments":' + (' {"' if keyed else '')


def _keyed(tool):
    """Whether the tool's parameters declare properties (its arguments are an object with keys)."""
    properties = (tool.function.parameters or {}).get("properties")
    return isinstance(properties, dict) and bool(properties)


def _called(req, tools):
    """The tool a call must go to, known without the model: the named one (the
    only one offered_tools keeps), or the only one offered under "required"; else None."""
    if tools and (isinstance(req.tool_choice, NamedToolChoice) or req.tool_choice == "required" and len(tools) == 1):
        return tools[0]
    return None


def tool_prefill(req):
    """What the assistant's answer is made to start with when a call is required:
    the opening of the call through the tool's name when the tool is known (a
    named tool_choice, or "required" with one tool offered), else "<tool_call>\n"
    ("required" with several tools, when no scorer picks one: see prepare)."""
    tools = offered_tools(req)
    tool = _called(req, tools)
    if tool is not None:
        return named_prefill(tool.function.name, _keyed(tool))
    return "<tool_call>\n" if tools and req.tool_choice == "required" else ""


def choose_tool(names, prompts, scorer):
    """The tool the model itself would most likely call, by its own scores.

    names: the tools offered; prompts: for each, the prompt's token ids ending
    with named_prefill(name); scorer(prompts, continuations) -> the total
    log-probability of each continuation after its prompt (model_scorer).
    The tokens all the prompts share (the conversation and
    '<tool_call>\n{"name": "') are the prompt, the rest of each (the name and
    the '", "arguments":' that ends it) is scored, all in one call. Returns
    (the name with the highest log-probability, the first on a tie; the scores).
    """
    if not names or len(prompts) != len(names):
        raise ValueError(f"choose_tool needs at least one tool name and one prompt per name, got "
                         f"{len(names)} names and {len(prompts)} prompts")
    prompts = [list(p) for p in prompts]
    shared = 0
    while shared < min(map(len, prompts)) - 1 and all(p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    scores = [float(s) for s in scorer([p[:shared] for p in prompts], [p[shared:] for p in prompts])]
    if len(scores) != len(names):
        raise ValueError(f"the scorer returned {len(scores)} scores for {len(names)} tools")
    best = max(range(len(names)), key=lambda i: scores[i])
    return names[best], scores


def model_scorer(model):
    """A scorer for prepare and choose_tool: (prompts, continuations) -> the sum of
    log P(continuation's tokens | prompt) under `model` (a GPT or a Llama).

    Equal prompts (choose_tool's all are: the conversation up to the tool's
    name) are read once, into one KVCache per block; each continuation is read
    on top of it, one after another, the caches cut back to the prompt after
    each. So n tools cost one reading of the prompt and n short continuations,
    in the memory of one sequence: not n prompts (128 tools, OpenAI's limit,
    times a 2,048-token prompt would be minutes of arithmetic), nor n copies of
    the prompt's keys and values. The model may be the one an engine decodes
    with in another thread: scoring only reads it."""
    from ..attention import KVCache

    @torch.no_grad()
    def score(prompts, continuations):
        if len(prompts) != len(continuations) or not all(prompts) or not all(continuations):
            raise ValueError("need one non-empty continuation per non-empty prompt")
        device = next(model.parameters()).device
        features = getattr(model, "features", None)

        def next_logp(ids, caches, last_only=False):  # log P(next token) after each of ids: (len(ids) or 1, V)
            if features is None:
                logits = model(ids, caches=caches)[0][0]
                return torch.log_softmax(logits[-1:].float() if last_only else logits.float(), -1)
            h = features(ids, caches)[0]              # the output layer only where it is needed
            return torch.log_softmax(model.lm_head(h[-1:] if last_only else h).float(), -1)

        out = [0.0] * len(prompts)
        groups = {}
        for i, p in enumerate(prompts):
            groups.setdefault(tuple(p), []).append(i)
        for prompt, rows in groups.items():
            caches = [KVCache() for _ in model.blocks]
            first = next_logp(torch.tensor([prompt], device=device), caches, last_only=True)   # (1, V)
            for i in rows:
                for cache in caches:
                    cache.length = len(prompt)        # back to the prompt: the last continuation forgotten
                cont = continuations[i]
                rest = next_logp(torch.tensor([cont[:-1]], device=device), caches) if len(cont) > 1 else first[:0]
                logp = torch.cat([first, rest])                                             # (len(cont), V)
                out[i] = float(logp.gather(1, torch.tensor(cont, device=device)[:, None]).sum())
        return out
    return score


def _transcript_ids(messages, tokenizer, prefill):
    """The course GPT's prompt: one line per message (a newline inside a message
    would start a new line, "\\nUser:" a forged turn; a space keeps every length,
    1 character = 1 token); characters outside its vocabulary are refused."""
    flat = [{"role": m["role"], "content": m["content"].replace("\n", " ").replace("\r", " ")}
            for m in messages]
    for i, m in enumerate(flat):
        try:
            tokenizer.encode(m["content"])
        except ValueError as e:
            raise APIError(400, f"messages[{i}].content: {e}; this model reads only the characters "
                                f"it was trained on", param=f"messages[{i}].content",
                           code="unsupported_character") from None
    return tokenizer.encode(format_chat(flat) + (" " + prefill if prefill else ""))


def completion_budget(req, n_prompt, cap, default, max_context=None):
    """The most tokens of the answer: the request's max_completion_tokens or
    max_tokens (at most `cap`), else `default`; with a max_context (the real
    model) the prompt and the answer must fit it."""
    name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_tokens is not None and max_tokens > cap:
        raise APIError(400, f"{name} must be at most {cap} on this server, got {max_tokens}",
                       param=name, code="invalid_value")
    if max_context is not None:
        room = max_context - n_prompt
        if room < 1 or (max_tokens is not None and max_tokens > room):
            raise APIError(400, f"This model's maximum context length is {max_context} tokens. "
                                f"However, you requested {n_prompt + (max_tokens or 1)} tokens "
                                f"({n_prompt} in the messages, {max_tokens or 1} in the completion).",
                           param="messages", code="context_length_exceeded")
        max_tokens = max_tokens or min(default, room)
    return max_tokens or default


def token_bias(logit_bias, vocab_size):
    """The request's logit_bias as {token id: bias}, each id below vocab_size."""
    bias = {}
    for key, value in (logit_bias or {}).items():
        if int(key) >= vocab_size:
            raise APIError(400, f"logit_bias: token id {key} is not below the vocabulary size "
                                f"{vocab_size}", param="logit_bias", code="invalid_value")
        bias[int(key)] = float(value)
    return bias


def check_fits(req, messages, tokenizer, max_context):
    """Refuse (400, context_length_exceeded) messages that cannot fit max_context
    tokens with the completion, before tokenizing them: by the tokenizer's
    lower bound on their tokens (PretrainedBPE.min_tokens: their bytes over
    the longest token's, 81 for SmolLM2), plus the template's two special
    tokens per message and the assistant's start. One pass over the bytes:
    a 1 MB request is refused in milliseconds, not after seconds of merges.
    A tokenizer without min_tokens is not checked here."""
    min_tokens = getattr(tokenizer, "min_tokens", None)
    if min_tokens is None:
        return
    least = sum(min_tokens(f"{m['role']}\n{m['content']}") + 2 for m in messages) + 1
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if max_context - least < 1 or (max_tokens is not None and max_tokens > max_context - least):
        raise APIError(400, f"This model's maximum context length is {max_context} tokens. However, "
                            f"your messages are at least {least} tokens long (a token of this model holds "
                            f"at most {tokenizer.max_token_bytes} bytes of text), and the completion needs "
                            f"{max_tokens or 1}. Please reduce the length of the messages.",
                       param="messages", code="context_length_exceeded")


def prepare(req, tokenizer, chatml, default_system, max_tokens_cap, default_max_tokens, max_context,
            scorer=None, before_tokenizing=None):
    """A checked ChatCompletionRequest -> PreparedRequest, or APIError(400).

    chatml: the real model (its template, ended by its end-of-turn tokens,
    within max_context tokens: a prompt that cannot fit is refused before it
    is tokenized, check_fits); else the course GPT's transcript, ended where
    a new turn starts (TURN_STOPS), its window sliding over any length.

    tool_choice "required" guarantees a call to an offered tool: with one
    tool the answer starts with the call's opening through its name, as for a
    named tool_choice; with several, scorer (model_scorer(model)) picks the
    one the model finds most likely (choose_tool), then the same. Without a
    scorer the answer starts with "<tool_call>\n" only, and the model may
    name no offered tool.

    before_tokenizing(): called once the cheap checks have passed, just before
    the messages are tokenized (the server charges the client for the work
    there: gptcourse.serve.app.Slot.charge_reading); it may raise to refuse.
    """
    if scorer is not None and not callable(scorer):
        raise ValueError(f"scorer must be a function (prompts, continuations) -> scores, got {scorer!r:.80}")
    messages = chat_messages(req, default_system if chatml else None)
    tools = offered_tools(req)
    if chatml:
        completion_budget(req, 0, max_tokens_cap, default_max_tokens)      # max_tokens within the cap, then
        check_fits(req, messages, tokenizer, max_context)                 # the length, before any tokenizing
        if before_tokenizing is not None:
            before_tokenizing()
        base = encode_chatml(messages, tokenizer, default_system=default_system)

        def prompt_for(prefill):
            return base + (tokenizer.encode(prefill, allow_special=False) if prefill else [])
        stop_ids, stops = end_of_turn_ids(tokenizer), ()                # <|im_end|>, <|endoftext|>, ...
    else:
        if before_tokenizing is not None:
            before_tokenizing()

        def prompt_for(prefill):
            return _transcript_ids(messages, tokenizer, prefill)
        stop_ids, stops = (), TURN_STOPS
    called = _called(req, tools)
    if called is None and req.tool_choice == "required" and len(tools) > 1 and scorer is not None:
        names = [t.function.name for t in tools]
        candidates = [prompt_for(named_prefill(name)) for name in names]       # scored by the name alone
        if chatml:                                        # every candidate must fit before the model reads them
            completion_budget(req, max(map(len, candidates)) + 1, max_tokens_cap, default_max_tokens, max_context)
        name, _ = choose_tool(names, candidates, scorer)
        called = tools[names.index(name)]
    named = called.function.name if called is not None else None
    prefill = named_prefill(named, _keyed(called)) if called is not None else tool_prefill(req)
    prompt_ids = prompt_for(prefill)
    max_tokens = completion_budget(req, len(prompt_ids), max_tokens_cap, default_max_tokens,
                                   max_context if chatml else None)
    sampling = _sampling(req, tokenizer, stops, stop_ids, prefill)
    return PreparedRequest(prompt_ids=prompt_ids, max_tokens=max_tokens, sampling=sampling,
                           cache_salt=req.cache_salt, prefill=prefill,
                           tool_names=frozenset(t.function.name for t in tools), named=named,
                           include_usage=bool(req.stream_options and req.stream_options.include_usage))


def _sampling(req, tokenizer, stops, stop_ids, prefill):
    """The request's SamplingParams: its own stop strings after the format's `stops`, and
    "</tool_call>" when the server began a call (prefill)."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        stop=tuple(stops) + tuple(stop) + (("</tool_call>",) if prefill else ()), stop_ids=stop_ids,
        seed=None if req.seed is None else req.seed % 2 ** 64,
        logprobs=bool(req.logprobs), top_logprobs=req.top_logprobs or 0,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=token_bias(req.logit_bias, tokenizer.vocab_size))
