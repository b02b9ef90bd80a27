"""How a generated answer is written, per endpoint: whole (a JSON body) or streamed (server-sent events),
in OpenAI's shapes, with the `fedrouter` field (which adapter served, at what routing distance) in every
body and chunk and the X-Fedrouter-* headers on every answer.

An endpoint that generates names its `Format` in the endpoint table (`endpoints.ENDPOINTS`); a new
OpenAI-style endpoint writes its choices with a new `Format` subclass.
"""

from __future__ import annotations

import json

from fedrouter.serving.batcher import FIELD, Job

HEADER_ADAPTER, HEADER_DISTANCE = "X-Fedrouter-Adapter", "X-Fedrouter-Distance"


class Format:
    """One endpoint's answer shape: its ids, object names and choices; the rest is common to all."""

    id_prefix = "cmpl-"
    object = "text_completion"
    chunk_object = "text_completion"
    opens_stream_with_role = False  # a chat stream's first chunk names the assistant's role

    def choice(self, completion) -> dict:
        return {"index": 0, "text": completion.text, "finish_reason": finish_reason(completion), "logprobs": None}

    def chunk_choice(self, text: str | None, finish: str | None, first: bool) -> dict:
        return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}

    def body(self, job: Job, completion) -> dict:
        """The whole answer's JSON body."""
        return {"id": self.id_prefix + job.id, "object": self.object, "created": job.created, "model": job.model,
                "choices": [self.choice(completion)], "usage": usage(job, completion), FIELD: served(job)}

    def chunk(self, job: Job, text: str | None = None, finish=None, first: bool = False, usage: dict | None = None) -> str:
        """One server-sent event of a streamed answer (a usage chunk has no choices)."""
        body = {"id": self.id_prefix + job.id, "object": self.chunk_object, "created": job.created, "model": job.model,
                "choices": [] if usage else [self.chunk_choice(text, finish, first)], FIELD: served(job)}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    async def events(self, job: Job):
        """The server-sent events of a streamed answer; a client that goes away cancels its row."""
        try:
            if self.opens_stream_with_role:
                yield self.chunk(job, first=True)
            while True:
                kind, value = await job.pieces.get()
                if kind == "text":
                    yield self.chunk(job, text=value)
                elif kind == "done":
                    yield self.chunk(job, finish=finish_reason(value))
                    if job.include_usage:
                        yield self.chunk(job, usage=usage(job, value))
                    break
                else:
                    yield f"data: {json.dumps(value.body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()


class ChatFormat(Format):
    id_prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    opens_stream_with_role = True

    def choice(self, completion) -> dict:
        return {"index": 0, "message": {"role": "assistant", "content": completion.text},
                "finish_reason": finish_reason(completion), "logprobs": None}

    def chunk_choice(self, text, finish, first):
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}


def usage(job: Job, completion) -> dict:
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": completion.completion_tokens,
            "total_tokens": len(job.prompt_ids) + completion.completion_tokens}


def served(job: Job) -> dict:
    return {"adapter": job.adapter, "distance": job.distance, "routed": job.via_router}


def headers(job: Job) -> dict:
    return {HEADER_ADAPTER: job.adapter, HEADER_DISTANCE: "none" if job.distance is None else f"{job.distance:.6g}"}


def finish_reason(completion) -> str:
    return "stop" if completion.finish_reason == "stop" else "length"
