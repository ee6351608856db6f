"""What a request asks of the decoder, as one typed value: `SamplingParams`.

The front end builds it from a checked request (gptcourse.serve.prompt); the
engine reads it for every token of the sequence (gptcourse.serve.engine).
Also the one check every positive count of the server goes through:
`positive_int`.

    >>> SamplingParams(temperature=0).greedy, SamplingParams(top_p=0.5).nucleus
    (True, 0.5)
    >>> positive_int("max_batch", 0)
    Traceback (most recent call last):
    ...
    ValueError: max_batch must be a positive integer, got 0
"""
import math
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Optional, Tuple

from ..sampling import is_greedy


def positive_int(name, value, least=1):
    """value, checked to be an int (not a bool) >= least; else ValueError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        rule = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    return value


@dataclass
class SamplingParams:
    """How one sequence picks its tokens and where it stops.

    temperature: >= 0 (greedy below 1e-5: sampling.is_greedy); top_p: the
    nucleus (0: greedy, 1: the whole distribution); stop: strings that end
    the answer (not returned); stop_ids: tokens that end it (a chat model's
    end of turn); seed: the sampling generator's seed (None: a random one);
    logprobs, top_logprobs: OpenAI's log-probability entries per token;
    presence_penalty, frequency_penalty: subtracted from the scores of tokens
    already generated (once, or per occurrence); logit_bias: {token id: added
    to its score}.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Tuple[str, ...] = ()
    stop_ids: FrozenSet[int] = frozenset()
    seed: Optional[int] = None
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Dict[int, float] = field(default_factory=dict)

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(self.top_p, bool) or not (isinstance(self.top_p, (int, float)) and 0 <= self.top_p <= 1):
            raise ValueError(f"top_p must be a number from 0 to 1, got {self.top_p!r}")
        self.temperature, self.top_p = float(t), float(self.top_p)
        self.stop, self.stop_ids = tuple(self.stop), frozenset(self.stop_ids)
        self.logprobs, self.top_logprobs = bool(self.logprobs), int(self.top_logprobs or 0)
        self.logit_bias = dict(self.logit_bias or {})

    @property
    def greedy(self):
        """Take the argmax, draw no random number (sampling.is_greedy: the one rule)."""
        return is_greedy(self.temperature, self.top_p)

    @property
    def nucleus(self):
        """top_p as sample_next takes it: None when it keeps the whole distribution."""
        return None if self.top_p >= 1 else self.top_p

    @property
    def reshapes_scores(self):
        """Whether the scores change before sampling (bias or penalties)."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty)
