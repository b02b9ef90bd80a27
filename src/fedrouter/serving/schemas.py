"""The OpenAI request bodies this server takes: how a body is read, what it must hold, what this server
refuses of it, and its error bodies.

A request body is a pydantic model, strict: a missing or wrong field is a 400 naming the field. Unknown
fields are ignored (clients send extras); fields this server cannot honour are refused rather than
ignored, each model declaring its own (`refusals`). A request model also says what its endpoint needs of
it: the instruction it carries, the field that carries it (`PROMPT_PARAM`, for error messages) and the
answer's token budget it asks for.
"""

from __future__ import annotations

import asyncio
import json
from typing import ClassVar, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# Sampling parameters the row sampler computes in float32 without loss: below these a temperature divides
# logits into infinities and a top_p rounds to zero. 0 stays greedy; a smaller top_p is the top token alone.
MIN_TEMPERATURE, MIN_TOP_P = 0.01, 0.001
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes
MAX_STOP = 4  # stop sequences per request, as OpenAI's
MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0  # a client that trickles its body keeps a connection, not the server's shutdown


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body ({"error": {"message", "type", "param", "code"}})."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def internal(exc: BaseException) -> ApiError:
    """The 500 for an exception nobody expected: its type and first line, no traceback."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return ApiError(500, f"the server failed to answer: {type(exc).__name__}: {first}", kind="server_error", code="internal_error")


class GenerationRequest(BaseModel):
    """Fields every generating endpoint shares."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)
    PROMPT_PARAM: ClassVar[str] = "prompt"  # the field that carries the instruction (named in errors about its length)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1.0, the OpenAI default; else 0 or >= MIN_TEMPERATURE
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampled(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return v

    def instruction(self) -> str:
        raise NotImplementedError

    def asked_tokens(self) -> int | None:
        """The answer's token budget the request asks for (None: the run's own)."""
        return self.max_tokens

    def refusals(self) -> Iterator[tuple[str, str]]:
        """(field, why) for each field set to what this server cannot honour, in the order they are checked."""
        if self.n not in (None, 1):
            yield "n", f"only n=1 is supported (one completion per request), got {self.n}"
        if self.presence_penalty or self.frequency_penalty:
            yield "presence_penalty" if self.presence_penalty else "frequency_penalty", "penalties are not supported"
        if self.logit_bias:
            yield "logit_bias", "not supported"
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            yield "stop", f"at most {MAX_STOP} stop sequences, got {len(self.stop)}"
        yield from self.endpoint_refusals()
        if self.stream_options is not None and not self.stream:
            yield "stream_options", "only allowed with stream: true"

    def endpoint_refusals(self) -> Iterator[tuple[str, str]]:
        """The refusals of one endpoint's own fields."""
        return iter(())


class CompletionRequest(GenerationRequest):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def instruction(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def endpoint_refusals(self):
        if self.echo:
            yield "echo", "not supported"
        if self.logprobs is not None:
            yield "logprobs", "not supported"
        if self.best_of not in (None, 1):
            yield "best_of", "only best_of=1 is supported"
        if self.suffix:
            yield "suffix", "not supported"
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            yield "prompt", f"give one prompt per request (a string), got a list of {len(self.prompt)}"


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatRequest(GenerationRequest):
    PROMPT_PARAM: ClassVar[str] = "messages"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None

    def instruction(self) -> str:
        return chat_instruction(self.messages)

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def endpoint_refusals(self):
        if self.logprobs:
            yield "logprobs", "not supported"
        if self.tools or self.functions:
            yield "tools" if self.tools else "functions", "tool calls are not supported"
        if self.response_format and self.response_format.get("type", "text") != "text":
            yield "response_format", "only text responses are supported"


def chat_instruction(messages: list[ChatMessage]) -> str:
    """A chat as one instruction: the messages' contents in order, joined by newlines."""
    texts = []
    for m in messages:
        if isinstance(m.content, str):
            texts.append(m.content)
        elif m.content:
            texts.append("".join(part.text for part in m.content))
    text = "\n".join(t for t in texts if t)
    if not text.strip():
        raise ApiError(400, "messages: no message has any text", param="messages")
    return text


# pydantic names the union member or model it tried ("str", "list[str]", "ChatMessage") in an error's
# location: not a part of the field's path
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", TextPart.__name__, ChatMessage.__name__}


def parse(model: type[GenerationRequest], data: dict) -> GenerationRequest:
    """The request body as `model`, or the 400 for its first problem: a bad field, then a refused one."""
    try:
        req = model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)) or "body"
        message = "Field required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{where}: {message}", param=str(err["loc"][0]) if err["loc"] else None) from None
    for param, why in req.refusals():
        raise ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")
    return req


async def read_json(request, limit: int = MAX_BODY_BYTES, timeout_s: float = BODY_TIMEOUT_S) -> dict:
    """The request's JSON object. Only an application/json body is read (a web page's form cannot send
    one without asking first); a body over `limit` bytes is read to its end (up to 16x the limit, so that
    the client can read the answer) and refused with 413; a body not all there within `timeout_s` 408.
    JSON that is no text (NaN, Infinity, a lone surrogate) or nested too deep for the parser is a 400."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise ApiError(415, f"the request body must be JSON sent as Content-Type: application/json, not {media or 'none'}",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    too_large = ApiError(413, f"the request body is larger than this server's limit of {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > 16 * limit:
        raise too_large

    async def read() -> tuple[bytes, int]:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > 16 * limit:
                break
            if size <= limit:
                chunks.append(chunk)
        return b"".join(chunks), size

    try:
        body, size = await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None
    if size > limit:
        raise too_large
    try:
        data = json.loads(body, parse_constant=_not_json)
    except RecursionError:
        raise ApiError(400, "We could not parse the JSON body of your request: it is nested too deeply",
                       code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    where = _lone_surrogate(data)
    if where is not None:
        raise ApiError(400, f"{where}: holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text",
                       param=where.split(".")[0], code="invalid_json")
    return data


def _not_json(constant: str):
    raise ValueError(f"{constant} is not a JSON value")  # Python's parser takes NaN and Infinity; JSON does not


def _lone_surrogate(data) -> str | None:
    """Where in parsed JSON a string (or key) holds a lone surrogate -- text no encoder or tokenizer
    takes -- as a dotted path, or None. Iterative: the parser already bounded the depth."""
    todo = [("", data)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return where or "body"
        elif isinstance(value, dict):
            for k, v in value.items():
                todo.append((f"{where}.{k}" if where else str(k), k))
                todo.append((f"{where}.{k}" if where else str(k), v))
        elif isinstance(value, list):
            todo.extend((f"{where}.{i}" if where else str(i), v) for i, v in enumerate(value))
    return None
