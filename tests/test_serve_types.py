"""gptcourse.serve's typed boundaries: SamplingParams, PreparedRequest, the
Sequence's state declared in one place, positive_int, the request rules in
the pydantic models; and every old import path of the server and the engine.
"""
import json
import subprocess
import sys
import threading

import pytest
import torch
from pydantic import ValidationError

from gptcourse.chat import format_chat
from gptcourse.llama import Llama, LlamaConfig
from gptcourse.sampling import is_greedy
from gptcourse.serve import (ChatCompletionRequest, Engine, PreparedRequest, SamplingParams, Sequence, TURN_STOPS,
                             parse_request, positive_int, prepare)
from gptcourse.tokenizers import CharTokenizer


def test_positive_int_names_the_bad_value():
    assert positive_int("max_batch", 3) == 3 and positive_int("prefix", 0, least=0) == 0
    for bad in (0, -1, True, 2.0, "3", None):
        with pytest.raises(ValueError, match=r"^max_batch must be a positive integer, got "):
            positive_int("max_batch", bad)
    with pytest.raises(ValueError, match=r"prefix must be an integer >= 0, got -1"):
        positive_int("prefix", -1, least=0)


def test_sampling_params_use_the_one_greedy_rule_and_check_their_values():
    for t in (0, 1e-6, 1e-5, 0.7, 2):
        for p in (0, 0.5, 1):
            assert SamplingParams(temperature=t, top_p=p).greedy == is_greedy(t, p)
    params = SamplingParams(stop=["a"], stop_ids={3, 4}, top_p=0.5, logit_bias=None)
    assert params.stop == ("a",) and params.stop_ids == frozenset({3, 4}) and params.logit_bias == {}
    assert params.nucleus == 0.5 and SamplingParams().nucleus is None
    assert not SamplingParams().reshapes_scores and SamplingParams(presence_penalty=0.5).reshapes_scores
    for bad in (-1, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="temperature"):
            SamplingParams(temperature=bad)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)


def test_a_sequence_declares_all_its_state_and_takes_params_or_keywords():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=1, n_embd=16, ffn_hidden=24,
                              block_size=64)).eval()

    class Ids:
        def decode(self, ids):
            return "".join(f"<{i}>" for i in ids)

    done = threading.Event()
    seq = Sequence([1, 2, 3], 4, lambda kind, data: kind != "text" and done.set(), temperature=0.8, seed=1,
                   logprobs=True, top_logprobs=2, presence_penalty=0.5)
    declared = set(vars(seq))
    engine = Engine(model, Ids(), max_batch=2)
    try:
        engine.submit(seq)
        assert done.wait(60)
    finally:
        engine.stop()
    assert set(vars(seq)) == declared and len(seq.tokens) == 4 and seq.output.text
    assert seq.params == SamplingParams(temperature=0.8, seed=1, logprobs=True, top_logprobs=2,
                                        presence_penalty=0.5)
    assert Sequence([1], 2, None, params=seq.params).params is seq.params
    with pytest.raises(ValueError, match="not both"):
        Sequence([1], 2, None, params=seq.params, temperature=0)
    with pytest.raises(ValueError, match="max_tokens must be a positive integer"):
        Sequence([1], 0, None)
    with pytest.raises(TypeError):
        Sequence([1], 2, None, 0.5)                 # the sampling settings are keywords


def test_the_request_rules_are_in_the_model():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    ChatCompletionRequest.model_validate({**base, "logprobs": True, "top_logprobs": 2})
    ChatCompletionRequest.model_validate({**base, "stream": True, "stream_options": {"include_usage": True}})
    for extra, field in (({"top_logprobs": 2}, "top_logprobs"),
                         ({"logprobs": False, "top_logprobs": 1}, "top_logprobs"),
                         ({"stream_options": {"include_usage": True}}, "stream_options"),
                         ({"stream": False, "stream_options": {}}, "stream_options")):
        with pytest.raises(ValidationError) as e:
            ChatCompletionRequest.model_validate({**base, **extra})
        assert e.value.errors()[0]["loc"] == (field,)


def test_a_prepared_request_is_a_dataclass_that_chapter_17_reads_as_a_dict():
    tok = CharTokenizer(format_chat([{"role": r, "content": "hi there"} for r in ("system", "user")]) + " ")
    raw = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7,
                      "temperature": 0, "stop": "th", "seed": -1, "logprobs": True})
    job = prepare(parse_request(raw), tok, chatml=False, default_system=None, max_tokens_cap=1024,
                  default_max_tokens=256, max_context=2048)
    assert isinstance(job, PreparedRequest)
    assert tok.decode(job.prompt_ids) == format_chat([{"role": "user", "content": "hi"}])
    assert job.max_tokens == 7 and job.sampling.greedy and job.sampling.seed == 2 ** 64 - 1
    assert job.sampling.stop == TURN_STOPS + ("th",) and job.logprobs
    assert job["prefill"] == job.prefill == "" and job["prompt_ids"] is job.prompt_ids


def test_the_old_import_paths_still_work():
    from gptcourse import batching, sampling, serve
    from gptcourse.batching import Engine as E, LlamaBatch, Sequence as S, StopMatcher, TextDecoder
    assert (E, S, LlamaBatch) == (serve.Engine, serve.Sequence, serve.LlamaBatch)
    assert (StopMatcher, TextDecoder) == (sampling.StopMatcher, sampling.TextDecoder)
    assert serve.StopMatcher is sampling.StopMatcher
    with pytest.raises(AttributeError):
        batching.no_such_name


def test_the_ragged_steps_import_without_the_serve_extra():
    """gptcourse.batching (and tools.greedy_batch, chat's batches on it) needs torch only;
    its Engine, which moved to gptcourse.serve, says what to install."""
    code = ("import sys; sys.modules.update(fastapi=None, uvicorn=None)\n"
            "from gptcourse.batching import RaggedKVCache, llama_step, PrefixCache\n"
            "import gptcourse.tools\n"
            "try:\n    from gptcourse.batching import Engine\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'gptcourse[serve]'" in out.stdout
