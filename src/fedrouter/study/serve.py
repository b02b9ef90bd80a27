"""`fedrouter serve RUN_DIR`: a finished run's router and adapters as an OpenAI-compatible HTTP service.

Models (GET /v1/models): each adapter the run saved, by its name, and a routed model named after the run
directory that sends each prompt to the adapter of its nearest router centroid (global mode, the run's
embedder) -- `fedrouter predict`'s choice. A FedIT-style run (no router) serves its `global` adapter under
both names. POST /v1/completions and /v1/chat/completions answer with the run's prompt template around the
prompt (a chat's messages, their contents joined by newlines, are one instruction: the adapters were
trained on single instructions), greedy at temperature 0, exactly as `predict` answers; `stream: true`
sends server-sent events. Every answer says which adapter served it and at what routing distance: the
`fedrouter` field of the body (and of each streamed chunk) and the X-Fedrouter-Adapter /
X-Fedrouter-Distance headers. GET /health (never behind the key) and GET /metrics (Prometheus text).

One frozen base holds every adapter. A single worker thread owns the model: requests that arrive while it
is busy, or within --max-wait-ms of the first one of an idle spell, become ONE batch (up to --max-batch
rows) -- routed together (one embedding call) and generated together, a row per request with its own
adapter, budget, temperature and stop strings (fedrouter.core.generate.generate_rows, adapters stacked
per fedrouter.core.mixed_lora). A streamed row's text leaves as it is generated; a row that finishes
early is answered at once, before the rest of its batch.

Bad input is an HTTP 4xx with an OpenAI-style error body ({"error": {"message", "type", "param",
"code"}}) for that request alone, and the server goes on: malformed JSON (nested too deep, NaN, a lone
surrogate) or a missing or wrong field 400 -- sampling parameters included: a seed torch cannot take,
a temperature or top_p below their minimums --, an unknown model 404, a prompt longer than the run's
max_seq_len (or prompt + max_tokens over the model's positions) 400, n > 1 400, a wrong or missing key
401 (with a key set), a request from a web page (an Origin header) 403 unless --allow-origin lets it in,
a Host header that is not the loopback address the server listens on 421, a body that is not
application/json 415, over --max-body-bytes 413, or not all there within --body-timeout-s 408. A row
that fails while it is generated (what its request asked for could not be done) answers its own request
with 500; the rest of its batch completes. Prompts are measured in characters first (a prompt too long
for any tokenization is refused untokenized) and tokenized once, off the event loop. SIGTERM or Ctrl-C
stops accepting connections, lets every request in flight finish (streams included; at most
--shutdown-timeout-s), then exits 0; a second Ctrl-C stops at once.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations (Request) at run time.

import asyncio
import copy
import hmac
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedrouter.errors import FedrouterError

log = logging.getLogger("fedrouter.serve")

MAX_BODY_BYTES = 1 << 20
BODY_TIMEOUT_S = 30.0  # a client that trickles its body keeps a connection, not the server's shutdown
SHUTDOWN_TIMEOUT_S = 30  # the most a SIGTERM waits for the requests in flight
MAX_WAIT_MS = 10_000.0  # a batching wait longer than this is no batching policy anyone means
# Sampling parameters the row sampler computes in float32 without loss: below these a temperature divides
# logits into infinities and a top_p rounds to zero. 0 stays greedy; a smaller top_p is the top token alone.
MIN_TEMPERATURE, MIN_TOP_P = 0.01, 0.001
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes
LOOPBACK = ("127.0.0.1", "localhost", "::1")
FIELD = "fedrouter"  # the response field that says which adapter served and at what distance
HEADER_ADAPTER, HEADER_DISTANCE = "X-Fedrouter-Adapter", "X-Fedrouter-Distance"


# --------------------------------------------------------------------------------------------- errors

class ApiError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _internal(exc: BaseException) -> ApiError:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return ApiError(500, f"the server failed to answer: {type(exc).__name__}: {first}", kind="server_error", code="internal_error")


# ------------------------------------------------------------------------------------------- requests

class _Request(BaseModel):
    """Fields both endpoints share. Unknown fields are ignored (clients send extras); fields this server
    cannot honour are refused rather than ignored (see `_refuse_unsupported`)."""

    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)  # None: 1.0, the OpenAI default; else 0 or >= MIN_TEMPERATURE
    top_p: float | None = Field(None, ge=MIN_TOP_P, le=1)
    n: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: dict | None = None
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)

    @field_validator("temperature")
    @classmethod
    def _greedy_or_sampled(cls, v: float | None) -> float | None:
        if v is not None and 0 < v < MIN_TEMPERATURE:
            raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
        return v
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    user: str | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool | None = None
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class _TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list | None = None
    functions: list | None = None
    response_format: dict | None = None


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "_TextPart", "Message"}


def _parse(cls, data: dict):
    try:
        req = cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        # pydantic names the union member it tried ("str", "list[str]"): not a part of the field's path
        where = ".".join(str(p) for p in err["loc"] if isinstance(p, int) or ("[" not in p and p not in _TYPE_TAGS)) or "body"
        message = "Field required" if err["type"] == "missing" else err["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"{where}: {message}", param=str(err["loc"][0]) if err["loc"] else None) from None
    _refuse_unsupported(req)
    return req


def _refuse_unsupported(req: _Request) -> None:
    def refuse(param: str, why: str):
        raise ApiError(400, f"{param}: {why}", param=param, code="unsupported_parameter")

    if req.n not in (None, 1):
        refuse("n", f"only n=1 is supported (one completion per request), got {req.n}")
    if req.presence_penalty or req.frequency_penalty:
        refuse("presence_penalty" if req.presence_penalty else "frequency_penalty", "penalties are not supported")
    if req.logit_bias:
        refuse("logit_bias", "not supported")
    if isinstance(req.stop, list) and len(req.stop) > 4:
        refuse("stop", f"at most 4 stop sequences, got {len(req.stop)}")
    if isinstance(req, CompletionRequest):
        if req.echo:
            refuse("echo", "not supported")
        if req.logprobs is not None:
            refuse("logprobs", "not supported")
        if req.best_of not in (None, 1):
            refuse("best_of", "only best_of=1 is supported")
        if req.suffix:
            refuse("suffix", "not supported")
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            refuse("prompt", f"give one prompt per request (a string), got a list of {len(req.prompt)}")
    else:
        if req.logprobs:
            refuse("logprobs", "not supported")
        if req.tools or req.functions:
            refuse("tools" if req.tools else "functions", "tool calls are not supported")
        if req.response_format and req.response_format.get("type", "text") != "text":
            refuse("response_format", "only text responses are supported")
    if req.stream_options is not None and not req.stream:
        refuse("stream_options", "only allowed with stream: true")


def chat_instruction(messages: list[Message]) -> str:
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


# ---------------------------------------------------------------------------------------------- jobs

@dataclass
class Job:
    """One request on its way through the batcher; the futures belong to the server's event loop."""

    kind: str  # "completions" | "chat"
    model: str  # the model the request named
    instruction: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    loop: asyncio.AbstractEventLoop
    via_router: bool = False  # the request named the routed model (else an adapter)
    adapter: str | None = None  # the request's adapter, or the router's choice (set by the batcher)
    distance: float | None = None
    routed: asyncio.Future = None
    done: asyncio.Future = None
    pieces: asyncio.Queue | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))
    arrived: float = field(default_factory=time.monotonic)
    # the worker's own record (its thread only): has text left for the client, has the answer been given
    streamed: bool = False
    answered: bool = False

    def __post_init__(self):
        self.routed, self.done = self.loop.create_future(), self.loop.create_future()
        self.pieces = asyncio.Queue() if self.stream else None

    # called from the worker thread
    def _call(self, fn, *args) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def set_routed(self) -> None:
        self._call(_resolve, self.routed, (self.adapter, self.distance))

    def text(self, piece: str) -> None:
        self.streamed = True
        self._call(self.pieces.put_nowait, ("text", piece))

    def finished(self, completion) -> None:
        if completion.finish_reason == "error":  # this row alone could not be generated
            log.warning("request %s failed while it was generated: %s", self.id, completion.error)
            self.failed(ApiError(500, f"this request could not be generated: {completion.error}", kind="server_error",
                                 code="generation_failed"))
            return
        self.answered = True
        if self.pieces is not None:
            self._call(self.pieces.put_nowait, ("done", completion))
        self._call(_resolve, self.done, completion)

    def failed(self, error: ApiError) -> None:
        self.answered = True
        self._call(_reject, self.routed, error)
        self._call(_reject, self.done, error)
        if self.pieces is not None:
            self._call(self.pieces.put_nowait, ("error", error))


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _reject(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
        future.exception()  # retrieved: no "exception never retrieved" warning when nobody awaits it


_STOP = object()


# ------------------------------------------------------------------------------------------- metrics

class Metrics:
    """Counters for /metrics (Prometheus text format); updated from both threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.responses: dict[tuple[str, int], int] = {}
        self.batches = self.rows = self.mixed_batches = self.routed_rows = 0
        self.max_rows = self.max_adapters = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.generate_seconds = 0.0
        self.adapter_rows: dict[str, int] = {}

    def response(self, path: str, status: int) -> None:
        with self.lock:
            self.responses[(path, status)] = self.responses.get((path, status), 0) + 1

    def batch(self, jobs: list[Job], seconds: float, completion_tokens: int) -> None:
        adapters = {j.adapter for j in jobs}
        with self.lock:
            self.batches += 1
            self.rows += len(jobs)
            self.mixed_batches += len(adapters) > 1
            self.max_rows = max(self.max_rows, len(jobs))
            self.max_adapters = max(self.max_adapters, len(adapters))
            self.routed_rows += sum(j.via_router for j in jobs)
            self.prompt_tokens += sum(len(j.prompt_ids) for j in jobs)
            self.completion_tokens += completion_tokens
            self.generate_seconds += seconds
            for j in jobs:
                self.adapter_rows[j.adapter] = self.adapter_rows.get(j.adapter, 0) + 1

    def text(self, queued: int) -> str:
        def esc(value: str) -> str:
            return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

        with self.lock:
            lines = [
                "# TYPE fedrouter_batches_total counter", f"fedrouter_batches_total {self.batches}",
                "# TYPE fedrouter_batch_rows_total counter", f"fedrouter_batch_rows_total {self.rows}",
                "# HELP fedrouter_mixed_batches_total batches whose rows used two or more adapters",
                "# TYPE fedrouter_mixed_batches_total counter", f"fedrouter_mixed_batches_total {self.mixed_batches}",
                "# TYPE fedrouter_batch_rows_max gauge", f"fedrouter_batch_rows_max {self.max_rows}",
                "# TYPE fedrouter_batch_adapters_max gauge", f"fedrouter_batch_adapters_max {self.max_adapters}",
                "# TYPE fedrouter_routed_rows_total counter", f"fedrouter_routed_rows_total {self.routed_rows}",
                "# TYPE fedrouter_prompt_tokens_total counter", f"fedrouter_prompt_tokens_total {self.prompt_tokens}",
                "# TYPE fedrouter_completion_tokens_total counter", f"fedrouter_completion_tokens_total {self.completion_tokens}",
                "# TYPE fedrouter_generate_seconds_total counter", f"fedrouter_generate_seconds_total {self.generate_seconds:.6f}",
                "# TYPE fedrouter_queued_requests gauge", f"fedrouter_queued_requests {queued}",
                "# TYPE fedrouter_adapter_rows_total counter",
                *(f'fedrouter_adapter_rows_total{{adapter="{esc(a)}"}} {n}' for a, n in sorted(self.adapter_rows.items())),
                "# TYPE fedrouter_http_responses_total counter",
                *(f'fedrouter_http_responses_total{{path="{esc(p)}",status="{s}"}} {n}'
                  for (p, s), n in sorted(self.responses.items())),
            ]
        return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- service

class Service:
    """The run's model, router and batcher; everything that touches the model runs in one worker thread."""

    def __init__(self, run_dir: Path, max_batch: int = 64, max_wait_ms: float = 20.0, model: str | None = None,
                 cache_dir: Path | None = None):
        from fedrouter.core.embed import resolve_embedder
        from fedrouter.core.train import encode_examples
        from fedrouter.study.predict import load_run

        if max_batch < 1:
            raise FedrouterError(f"--max-batch must be at least 1, got {max_batch}")
        if not 0 <= max_wait_ms <= MAX_WAIT_MS:  # (NaN fails this too: it would wait forever)
            raise FedrouterError(f"--max-wait-ms must be from 0 to {MAX_WAIT_MS:g}, got {max_wait_ms}")
        run_dir = Path(run_dir)
        self.cfg, self.model, self.tokenizer, self.router = load_run(run_dir, model, cache_dir)
        self.embedder = resolve_embedder(self.router["embedder"], self.model, self.tokenizer) if self.router else None
        self.adapters = list(dict.fromkeys(self.router["adapters"])) if self.router else ["global"]
        name = run_dir.resolve().name
        self.routed_name = name if name not in self.adapters else f"{name}-routed"
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        # Requests are tokenized off the event loop, one at a time, in a thread of their own with their own copy
        # of the tokenizer (a fast tokenizer is not to be used by two threads at once).
        self.request_tokenizer = copy.deepcopy(self.tokenizer)
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrouter-tokenize")
        # No token stands for more characters than its vocabulary entry holds (a byte-level entry holds one
        # character per byte): a prompt over `prompt_limit * longest_token` characters is refused untokenized.
        self.longest_token = max((len(t) for t in self.tokenizer.get_vocab()), default=1) or 1
        answer_room = len(encode_examples(self.tokenizer, [{"instruction": "", "output": "", "task": ""}],
                                          self.cfg.prompt_template, self.cfg.max_seq_len)[0].answer_ids)
        self.prompt_limit = self.cfg.max_seq_len - answer_room  # longer prompts would lose their start in `predict`
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.created = int((run_dir / "results.json").stat().st_mtime) if (run_dir / "results.json").exists() else int(time.time())
        self.metrics = Metrics()
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    # -- models
    def model_ids(self) -> list[str]:
        return [self.routed_name, *self.adapters]

    def model_card(self, model_id: str) -> dict:
        routed = model_id == self.routed_name
        return {"id": model_id, "object": "model", "created": self.created, "owned_by": "fedrouter",
                FIELD: {"kind": "routed" if routed else "adapter",
                        "adapters": self.adapters if routed else [model_id],
                        "max_prompt_tokens": self.prompt_limit, "context_length": self.context_length}}

    # -- requests (server thread)
    def _encode(self, text: str) -> list[int]:
        """The prompt's token ids as `predict` builds them (BOS + the templated prompt; within the limit,
        nothing is cut). Runs in the tokenizing thread."""
        tok = self.request_tokenizer
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return bos + tok(text, add_special_tokens=False)["input_ids"]

    async def new_job(self, req: _Request, kind: str, instruction: str, loop) -> Job:
        if req.model not in self.model_ids():
            raise ApiError(404, f"The model `{req.model}` does not exist; this server serves: {', '.join(self.model_ids())}",
                           param="model", code="model_not_found")
        param = "prompt" if kind == "completions" else "messages"
        text = self.cfg.prompt_template.format(instruction=instruction)
        if len(text) > self.prompt_limit * self.longest_token:
            raise ApiError(400, f"{param}: the prompt is {len(text)} characters with the run's prompt template, more than "
                                f"this run's limit of {self.prompt_limit} tokens (max_seq_len {self.cfg.max_seq_len}) can "
                                f"hold at {self.longest_token} characters per token at most",
                           param=param, code="context_length_exceeded")
        prompt_ids = await loop.run_in_executor(self.tokenizing, self._encode, text)
        full = len(prompt_ids)
        if full > self.prompt_limit:
            raise ApiError(400, f"{param}: the prompt is {full} tokens with the run's prompt template, over this run's "
                                f"limit of {self.prompt_limit} (max_seq_len {self.cfg.max_seq_len})",
                           param=param, code="context_length_exceeded")
        asked = req.max_tokens if kind == "completions" else (req.max_completion_tokens or req.max_tokens)
        room = self.context_length - len(prompt_ids) if self.context_length else None
        if room is not None and (asked or 1) > room:
            raise ApiError(400, f"max_tokens: the prompt's {len(prompt_ids)} tokens + max_tokens {asked or 1} exceed the "
                                f"model's context length of {self.context_length} tokens",
                           param="max_tokens", code="context_length_exceeded")
        max_tokens = asked if asked is not None else min(self.cfg.max_new_tokens, room or self.cfg.max_new_tokens)
        stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        routed = req.model == self.routed_name
        return Job(kind, req.model, instruction, prompt_ids, max_tokens,
                   1.0 if req.temperature is None else req.temperature, 1.0 if req.top_p is None else req.top_p,
                   req.seed, tuple(s for s in stop if s), bool(req.stream),
                   bool(req.stream_options and req.stream_options.get("include_usage")), loop,
                   via_router=routed, adapter=None if routed else req.model)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    # -- the worker
    def start(self) -> None:
        self.thread = threading.Thread(target=self._work, name="fedrouter-batcher", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread is not None:
            self.queue.put(_STOP)
            self.thread.join()
            self.thread = None
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    def _work(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                first = self.queue.get()
                if first is _STOP:
                    return
                batch, stopping = [first], False
                deadline = first.arrived + self.max_wait
                while len(batch) < self.max_batch:
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            item = self.queue.get(timeout=remaining)
                        except queue.Empty:
                            break
                    if item is _STOP:
                        stopping = True
                        break
                    batch.append(item)
                self._run_batch(batch)
                if stopping:
                    return

    def _run_batch(self, jobs: list[Job]) -> None:
        jobs = [j for j in jobs if not j.cancel.is_set()]  # their clients left before the batch began
        if not jobs:
            return
        try:
            self._generate(jobs)
        except Exception as exc:  # a serving boundary: one request's trouble must not answer the others
            if len(jobs) == 1:
                log.exception("request %s failed", jobs[0].id)
                jobs[0].failed(_internal(exc))
                return
            log.warning("a batch of %d request(s) failed (%s: %s); its unanswered requests are generated one by one",
                        len(jobs), type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            for j in jobs:
                if j.answered:
                    continue
                if j.streamed:  # part of its answer has left: it cannot start again
                    j.failed(_internal(exc))
                else:
                    self._run_batch([j])

    def _generate(self, jobs: list[Job]) -> None:
        """Route the batch's routed requests (one embedding call) and generate every row together; a row
        that fails while generated fails its own request (`Job.finished`)."""
        from fedrouter.core.generate import Row, generate_rows
        from fedrouter.study.predict import route_prompts

        routed = [j for j in jobs if j.via_router]
        if routed:
            adapters, distances = route_prompts(self.router, self.embedder, [j.instruction for j in routed])
            for j, a, d in zip(routed, adapters, distances):
                j.adapter, j.distance = a, (None if d is None else float(d))
        for j in jobs:
            j.set_routed()
        rows = [Row(j.prompt_ids, j.max_tokens, j.adapter, j.temperature, j.top_p, j.seed, j.stop,
                    on_text=j.text if j.stream else None, on_done=j.finished, cancel=j.cancel) for j in jobs]
        start = time.perf_counter()
        done = generate_rows(self.model, self.tokenizer, rows, batch_size=len(rows))
        self.metrics.batch(jobs, time.perf_counter() - start, sum(c.completion_tokens for c in done))


# ------------------------------------------------------------------------------------------ responses

def _usage(job: Job, completion) -> dict:
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion.completion_tokens,
            "total_tokens": len(job.prompt_ids) + completion.completion_tokens}


def _served(job: Job) -> dict:
    return {"adapter": job.adapter, "distance": job.distance, "routed": job.via_router}


def _headers(job: Job) -> dict:
    return {HEADER_ADAPTER: job.adapter, HEADER_DISTANCE: "none" if job.distance is None else f"{job.distance:.6g}"}


def _finish_reason(completion) -> str:
    return "stop" if completion.finish_reason == "stop" else "length"


def response_body(job: Job, completion) -> dict:
    if job.kind == "completions":
        choice = {"index": 0, "text": completion.text, "finish_reason": _finish_reason(completion), "logprobs": None}
        head = {"id": f"cmpl-{job.id}", "object": "text_completion"}
    else:
        choice = {"index": 0, "message": {"role": "assistant", "content": completion.text},
                  "finish_reason": _finish_reason(completion), "logprobs": None}
        head = {"id": f"chatcmpl-{job.id}", "object": "chat.completion"}
    return {**head, "created": job.created, "model": job.model, "choices": [choice], "usage": _usage(job, completion),
            FIELD: _served(job)}


def _chunk(job: Job, text: str | None = None, finish=None, first: bool = False, usage: dict | None = None) -> str:
    if job.kind == "completions":
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
        head = {"id": f"cmpl-{job.id}", "object": "text_completion"}
    else:
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
        head = {"id": f"chatcmpl-{job.id}", "object": "chat.completion.chunk"}
    body = {**head, "created": job.created, "model": job.model, "choices": [] if usage else choices, FIELD: _served(job)}
    if usage:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n"


async def _events(job: Job):
    """The server-sent events of a streamed answer; a client that goes away cancels its row."""
    try:
        if job.kind == "chat":
            yield _chunk(job, first=True)
        while True:
            kind, value = await job.pieces.get()
            if kind == "text":
                yield _chunk(job, text=value)
            elif kind == "done":
                yield _chunk(job, finish=_finish_reason(value))
                if job.include_usage:
                    yield _chunk(job, usage=_usage(job, value))
                break
            else:
                yield f"data: {json.dumps(value.body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()


# ------------------------------------------------------------------------------------------- the app

async def _read_json(request, limit: int, timeout_s: float = BODY_TIMEOUT_S) -> dict:
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


AUTHORIZED = "fedrouter.authorized"  # the ASGI scope key _Guard sets: the request carries the key (or none is needed)


def _host_name(host: str) -> str:
    """The name in a Host header without its port ('[::1]:8000' -> '::1'), lower case. (Starlette's
    TrustedHostMiddleware cuts at the first colon, which an IPv6 address holds.)"""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class _Guard:
    """ASGI middleware, in front of everything: the Host check (a server on loopback answers only to a
    loopback name: a DNS-rebinding page cannot reach it), the Origin check (a request from a web page is
    refused unless --allow-origin names its origin), the API key (every path but /health, which says less
    without it), and the response counters."""

    PATHS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")

    def __init__(self, app, service: Service, api_key: str | None, allow_origins: tuple[str, ...] = (),
                 hosts: tuple[str, ...] | None = None):
        self.app, self.service = app, service
        self.key = api_key.encode() if api_key else None
        self.origins = set(allow_origins)
        self.hosts = set(hosts) if hosts is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        label = next((p for p in self.PATHS if path == p or (p == "/v1/models" and path.startswith(p + "/"))), "other")

        async def counted(message):
            if message["type"] == "http.response.start":
                self.service.metrics.response(label, message["status"])
            await send(message)

        headers = dict(scope["headers"])
        if self.hosts is not None:
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.hosts:
                err = ApiError(421, f"this server answers on {', '.join(sorted(self.hosts))} only, not Host {host or '(none)'}",
                               code="invalid_host")
                return await _send_json(counted, 421, err.body())
        origin = headers.get(b"origin")
        if origin is not None and "*" not in self.origins and origin.decode("latin-1") not in self.origins:
            err = ApiError(403, f"requests from web pages (Origin {origin.decode('latin-1')}) are refused; start the "
                                "server with --allow-origin ORIGIN to let that page call it", code="origin_not_allowed")
            return await _send_json(counted, 403, err.body())
        if origin is not None and scope["method"] == "OPTIONS":  # an allowed origin's preflight: CORS answers it, keyless
            return await self.app(scope, receive, counted)
        authorized = True
        if self.key is not None:
            header = headers.get(b"authorization", b"")
            given = header[7:].strip() if header[:7].lower() == b"bearer " else None
            authorized = given is not None and hmac.compare_digest(given, self.key)
            if not authorized and path != "/health":
                message = ("Incorrect API key provided." if given is not None else
                           "You didn't provide an API key: send it as 'Authorization: Bearer KEY'.")
                err = ApiError(401, message, code="invalid_api_key")
                return await _send_json(counted, 401, err.body(), {"www-authenticate": "Bearer"})
        scope[AUTHORIZED] = authorized
        return await self.app(scope, receive, counted)


async def _send_json(send, status: int, body: dict, headers: dict | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def create_app(service: Service, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               allow_origins: tuple[str, ...] = (), hosts: tuple[str, ...] | None = None,
               body_timeout_s: float = BODY_TIMEOUT_S):
    """The ASGI application (FastAPI) for `service`: CORS headers only for `allow_origins` (Starlette's
    CORSMiddleware; none by default), `hosts` the Host names it answers to (None: any)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="fedrouter serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(ApiError(exc.status_code, message, code=code).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request, exc: Exception):
        log.exception("request %s %s failed", request.method, request.url.path)
        err = _internal(exc)
        return JSONResponse(err.body(), status_code=500)

    @app.get("/health")
    async def health(request: Request):
        if not request.scope.get(AUTHORIZED):  # without the key: alive, and nothing the key keeps
            return {"status": "ok"}
        return {"status": "ok", "models": service.model_ids(), "queued": service.queue.qsize()}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.text(service.queue.qsize()), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.model_card(m) for m in service.model_ids()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in service.model_ids():
            raise ApiError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return service.model_card(model_id)

    async def answer(job: Job):
        service.submit(job)
        try:
            await job.routed
            if job.stream:
                return StreamingResponse(_events(job), media_type="text/event-stream",
                                         headers={**_headers(job), "Cache-Control": "no-cache"})
            completion = await job.done
        except BaseException:
            job.cancel.set()
            raise
        return JSONResponse(response_body(job, completion), headers=_headers(job))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = _parse(CompletionRequest, await _read_json(request, max_body_bytes, body_timeout_s))
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        return await answer(await service.new_job(req, "completions", prompt, asyncio.get_running_loop()))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = _parse(ChatRequest, await _read_json(request, max_body_bytes, body_timeout_s))
        return await answer(await service.new_job(req, "chat", chat_instruction(req.messages), asyncio.get_running_loop()))

    inner = app
    if allow_origins:
        from starlette.middleware.cors import CORSMiddleware

        inner = CORSMiddleware(app, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type"], expose_headers=[HEADER_ADAPTER, HEADER_DISTANCE])
    return _Guard(inner, service, api_key, allow_origins, hosts)


# ------------------------------------------------------------------------------------------- serving

def _is_loopback(host: str) -> bool:
    """Whether `host` (as given to --host) is this machine only: localhost, 127.0.0.0/8, ::1."""
    try:
        return host.lower() == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise FedrouterError(f"--port must be 0..65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise FedrouterError(f"--host {host}: {exc.strerror}") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as exc:
        sock.close()
        raise FedrouterError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(run_dir: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 64,
          max_wait_ms: float = 20.0, max_body_bytes: int = MAX_BODY_BYTES, access_log: bool = True, model: str | None = None,
          cache_dir: Path | None = None, allow_origins: tuple[str, ...] = (), body_timeout_s: float = BODY_TIMEOUT_S,
          shutdown_timeout_s: int = SHUTDOWN_TIMEOUT_S) -> int:
    """Serve `run_dir` until SIGTERM or Ctrl-C; requests in flight are finished first (for at most
    `shutdown_timeout_s`). Returns 0."""
    try:
        import fastapi  # noqa: F401 - create_app needs it
        import uvicorn
    except ImportError:
        raise FedrouterError("fedrouter serve needs the serve extra: pip install 'fedrouter[serve]'") from None
    if max_body_bytes < 1:
        raise FedrouterError(f"--max-body-bytes must be positive, got {max_body_bytes}")
    if not 0 < body_timeout_s <= 3600:
        raise FedrouterError(f"--body-timeout-s must be in (0, 3600] seconds, got {body_timeout_s}")
    if not 0 <= shutdown_timeout_s <= 3600:
        raise FedrouterError(f"--shutdown-timeout-s must be from 0 to 3600 seconds, got {shutdown_timeout_s}")
    for origin in allow_origins:
        if origin != "*" and not (origin.startswith(("http://", "https://")) and "/" not in origin.split("://", 1)[1]):
            raise FedrouterError(f"--allow-origin {origin!r}: give an origin such as https://example.org (scheme and host, "
                                 "no path), or * for any")
    service = Service(Path(run_dir), max_batch, max_wait_ms, model, cache_dir)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn re-raises the signal after shutting down; exit 0 instead
            if self.should_exit:
                self.force_exit = True  # a second signal: stop now
            self.should_exit = True

    # On loopback the server answers only to loopback names (a web page that rebinds its own name to
    # 127.0.0.1 cannot reach it); bound to another address it cannot know the names its clients use.
    hosts = (*LOOPBACK, host.lower()) if _is_loopback(host) else None
    app = create_app(service, api_key, max_body_bytes, tuple(allow_origins), hosts, body_timeout_s)
    config = uvicorn.Config(app, log_level="info", access_log=access_log, lifespan="off", timeout_keep_alive=5,
                            timeout_graceful_shutdown=shutdown_timeout_s)
    server = _Server(config)
    service.start()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}/v1"
    print(f"serving {service.routed_name} at {url} (models: {', '.join(service.model_ids())}; "
          f"batches of up to {max_batch}, {max_wait_ms:g} ms wait{'; API key required' if api_key else ''})", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        service.stop()  # after the server drained: every accepted request has had its answer
        sock.close()
    print("fedrouter serve: stopped", flush=True)
    return 0
