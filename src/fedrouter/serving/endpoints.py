"""The API, declared once: one `Endpoint` row per path, and its handler.

A row says the HTTP method and path, the model its JSON body is parsed into (None: no body), the handler
that answers it, and -- for an endpoint that generates -- the `Format` its answer is written in. The
application (`app.create_app`) registers every row; the guard counts responses by the rows' paths. So a new
endpoint is one row here and one handler; an OpenAI-style generating endpoint reuses `generate` with a
request model (`schemas`) and a `Format` (`formats`) of its own.

A handler gets the `Call` (the service, the parsed body, whether the caller showed the key, the path's
parameters) and returns a dict (a JSON body), a `PlainText`, or -- for a generating endpoint -- the `Job`
the batcher will answer.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable

from fedrouter.serving.batcher import Job, Service
from fedrouter.serving.formats import ChatFormat, Format
from fedrouter.serving.schemas import ApiError, ChatRequest, CompletionRequest, GenerationRequest


@dataclass(frozen=True)
class Call:
    """What a handler is given."""

    service: Service
    endpoint: Endpoint
    body: GenerationRequest | None  # the parsed request body (None for an endpoint without one)
    authorized: bool  # the caller showed the API key, or none is needed
    path_params: dict
    loop: asyncio.AbstractEventLoop


@dataclass(frozen=True)
class PlainText:
    text: str
    media_type: str


@dataclass(frozen=True)
class Endpoint:
    name: str  # the endpoint's name; a generating endpoint's jobs carry it as their `kind`
    method: str  # "GET" or "POST"
    path: str  # as FastAPI writes it ({name:path} for a parameter)
    handler: Callable[[Call], Awaitable[dict | PlainText | Job]]
    request: type[GenerationRequest] | None = None  # the JSON body's model
    format: Format | None = None  # how a generated answer is written

    @property
    def label(self) -> str:
        """The path responses are counted under (/metrics): the path up to its first parameter."""
        return self.path.split("/{", 1)[0]

    def matches(self, path: str) -> bool:
        return path == self.path if "{" not in self.path else path.startswith(self.label + "/")


async def health(call: Call) -> dict:
    if not call.authorized:  # without the key: alive, and nothing the key keeps
        return {"status": "ok"}
    return {"status": "ok", "models": call.service.model_ids(), "queued": call.service.queue.qsize()}


async def metrics(call: Call) -> PlainText:
    return PlainText(call.service.metrics.text(call.service.queue.qsize()), "text/plain; version=0.0.4")


async def models(call: Call) -> dict:
    return {"object": "list", "data": [call.service.model_card(m) for m in call.service.model_ids()]}


async def model(call: Call) -> dict:
    model_id = call.path_params["model_id"]
    if model_id not in call.service.model_ids():
        raise ApiError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
    return call.service.model_card(model_id)


async def generate(call: Call) -> Job:
    """A generating endpoint: the request's instruction as a job for the batcher."""
    return await call.service.new_job(call.body, call.endpoint.name, call.body.instruction(), call.loop)


ENDPOINTS = (
    Endpoint("health", "GET", "/health", health),
    Endpoint("metrics", "GET", "/metrics", metrics),
    Endpoint("models", "GET", "/v1/models", models),
    Endpoint("model", "GET", "/v1/models/{model_id:path}", model),
    Endpoint("completions", "POST", "/v1/completions", generate, CompletionRequest, Format()),
    Endpoint("chat", "POST", "/v1/chat/completions", generate, ChatRequest, ChatFormat()),
)


def label_of(path: str) -> str:
    """The label a request's response is counted under: its endpoint's, or "other"."""
    return next((ep.label for ep in ENDPOINTS if ep.matches(path)), "other")
