"""The ASGI application: every row of the endpoint table (`endpoints.ENDPOINTS`) as a FastAPI route, one
OpenAI-style error body for every error, CORS headers only for the origins let in, and the guard
(`guard.Guard`) in front of it all.

A generating endpoint's job goes to the batcher; the route waits until the job is routed (the adapter is
known before the first byte, for the X-Fedrouter-* headers), then streams its events or waits for the
whole answer. A client that goes away cancels its row.
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at run time.

import asyncio
import logging

from fedrouter.serving.batcher import Job, Service
from fedrouter.serving.endpoints import ENDPOINTS, Call, Endpoint, PlainText
from fedrouter.serving.formats import HEADER_ADAPTER, HEADER_DISTANCE, Format, headers
from fedrouter.serving.guard import AUTHORIZED, Guard
from fedrouter.serving.schemas import BODY_TIMEOUT_S, MAX_BODY_BYTES, ApiError, internal, parse, read_json

log = logging.getLogger("fedrouter.serve")


def create_app(service: Service, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               allow_origins: tuple[str, ...] = (), hosts: tuple[str, ...] | None = None,
               body_timeout_s: float = BODY_TIMEOUT_S):
    """The ASGI application for `service`: CORS headers only for `allow_origins` (Starlette's
    CORSMiddleware; none by default), `hosts` the Host names it answers to (None: any)."""
    # the serve extra (FastAPI, Starlette): `fedrouter serve` checks it is installed before it gets here
    from fastapi import FastAPI, Request  # optional extra: serve
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
        return JSONResponse(internal(exc).body(), status_code=500)

    async def answer(job: Job, fmt: Format):
        service.submit(job)
        try:
            await job.routed
            if job.stream:
                return StreamingResponse(fmt.events(job), media_type="text/event-stream",
                                         headers={**headers(job), "Cache-Control": "no-cache"})
            completion = await job.done
        except BaseException:
            job.cancel.set()
            raise
        return JSONResponse(fmt.body(job, completion), headers=headers(job))

    def route(endpoint: Endpoint):
        async def respond(request: Request):
            body = None
            if endpoint.request is not None:
                body = parse(endpoint.request, await read_json(request, max_body_bytes, body_timeout_s))
            call = Call(service, endpoint, body, bool(request.scope.get(AUTHORIZED)), dict(request.path_params),
                        asyncio.get_running_loop())
            result = await endpoint.handler(call)
            if isinstance(result, Job):
                return await answer(result, endpoint.format)
            if isinstance(result, PlainText):
                return PlainTextResponse(result.text, media_type=result.media_type)
            return result

        return respond

    for endpoint in ENDPOINTS:
        app.add_api_route(endpoint.path, route(endpoint), methods=[endpoint.method], name=endpoint.name)

    inner = app
    if allow_origins:
        from starlette.middleware.cors import CORSMiddleware  # (the serve extra, as above)

        inner = CORSMiddleware(app, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                               allow_headers=["Authorization", "Content-Type"], expose_headers=[HEADER_ADAPTER, HEADER_DISTANCE])
    return Guard(inner, service, api_key, allow_origins, hosts)
