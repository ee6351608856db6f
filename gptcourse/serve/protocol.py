"""The protocol: OpenAI's chat-completions request as pydantic models, with
its rules, and errors in OpenAI's shape.

A bad request gets a 4xx status and an error naming the field, never a
traceback: `parse_request` turns pydantic's first complaint into an
`APIError`, whose `error_body` is OpenAI's layout.

    >>> error_body(404, "no such model", param="model", code="model_not_found")
    {'error': {'message': 'no such model', 'type': 'not_found_error', 'param': 'model', 'code': 'model_not_found'}}
"""
import re
from typing import Annotated, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_STOP_STRINGS = 4          # OpenAI's limits on `stop`
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300
SWITCHED_BY = {"top_logprobs": "logprobs", "stream_options": "stream"}   # fields that need another's true

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable"}


# ----------------------------------------------------------------------------
# Errors, in OpenAI's shape
# ----------------------------------------------------------------------------

class APIError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error."""

    def __init__(self, status, message, param=None, code=None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def error_body(status, message, param=None, code=None):
    """The JSON body of an error response, in OpenAI's layout."""
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ----------------------------------------------------------------------------
# The request: pydantic models of OpenAI's chat-completions schema
# ----------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    """A part of a message's content; this server reads text parts only."""
    type: str
    text: Optional[str] = None
    model_config = ConfigDict(extra="allow", strict=True)      # image_url etc.: refused below

    @field_validator("type")
    @classmethod
    def _text_only(cls, value):
        if value != "text":
            raise ValueError(f"content parts of type {value!r} are not supported: "
                             f"this model reads text only")
        return value


Content = Union[str, List[TextPart]]


class FunctionCall(_Strict):
    name: str
    arguments: str


class AssistantToolCall(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(_Strict):
    role: Literal["system"]
    content: Content
    name: Optional[str] = None


class DeveloperMessage(_Strict):
    role: Literal["developer"]
    content: Content
    name: Optional[str] = None


class UserMessage(_Strict):
    role: Literal["user"]
    content: Content
    name: Optional[str] = None


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Optional[Content] = None
    tool_calls: Optional[List[AssistantToolCall]] = None
    name: Optional[str] = None
    refusal: Optional[str] = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[Union[SystemMessage, DeveloperMessage, UserMessage, AssistantMessage, ToolMessage],
                    Field(discriminator="role")]


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: Optional[str] = None
    parameters: Optional[Dict[str, object]] = None
    strict: Optional[bool] = None


class ToolDefinition(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]



class ChatCompletionRequest(_Strict):
    """The body of POST /v1/chat/completions. Unknown fields are refused, as OpenAI does,
    and so are values OpenAI refuses: each rule names its field."""
    model: str
    messages: List[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=1, description="one choice per request")
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, List[str]]] = None
    seed: Optional[int] = Field(None, ge=-2 ** 63, lt=2 ** 64)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[Dict[str, float]] = None
    tools: Optional[List[ToolDefinition]] = Field(None, max_length=128)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    user: Optional[str] = None
    cache_salt: Optional[str] = Field(None, min_length=1, max_length=256,
                                      description="vLLM's extension: the prefix cache is shared only "
                                                  "between requests with the same salt")

    @field_validator(*SWITCHED_BY)
    @classmethod
    def _needs_its_switch(cls, value, info: ValidationInfo):
        switch = SWITCHED_BY[info.field_name]
        if value and switch in info.data and not info.data[switch]:
            raise ValueError(f"{info.field_name} needs {switch}: true")
        return value

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None:
            if len(stops) > MAX_STOP_STRINGS:
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
            for s in stops:
                if not 1 <= len(s) <= MAX_STOP_CHARS:
                    raise ValueError(f"each stop string must have 1 to {MAX_STOP_CHARS} characters, "
                                     f"got {len(s)}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bounded_bias(cls, value):
        if value is not None:
            if len(value) > MAX_LOGIT_BIAS:
                raise ValueError(f"at most {MAX_LOGIT_BIAS} logit_bias entries, got {len(value)}")
            for key, bias in value.items():
                if not re.fullmatch(r"\d{1,9}", key):
                    raise ValueError(f"logit_bias keys are token ids, got {key!r}")
                if not -100 <= bias <= 100:
                    raise ValueError(f"logit_bias values must be from -100 to 100, got {bias!r}")
        return value


def _param(loc):
    """('messages', 0, 'user', 'content') -> 'messages[0].content'."""
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif i == 2 and loc[0] == "messages" and part in ("system", "developer", "user", "assistant", "tool"):
            continue                                      # the union's tag, not a field
        elif part == "str" or "[" in part:
            continue                                      # a union's branch: 'str', 'list[TextPart]'
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_request(raw):
    """JSON bytes -> ChatCompletionRequest, or APIError(400) naming the first bad field."""
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        # a union (content: str or parts) reports every branch: our own messages say most
        err = next((x for x in errors if x["type"] == "value_error"), errors[0])
        param = _param(err["loc"]) or None
        if err["type"] == "json_invalid":
            raise APIError(400, f"We could not parse the JSON body of your request ({err['msg']})",
                           code="invalid_json") from None
        if err["type"] == "extra_forbidden":
            raise APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                           code="unknown_parameter") from None
        if err["type"] == "missing":
            raise APIError(400, f"Missing required parameter: '{param}'", param=param,
                           code="missing_required_parameter") from None
        shown = repr(err.get("input"))
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise APIError(400, f"Invalid value for '{param}': {err['msg']} (got {shown})",
                       param=param, code="invalid_value") from None

