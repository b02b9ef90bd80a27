"""The serving API is declared once, in `serving.endpoints.ENDPOINTS`: a row added there is served, guarded
and counted under its path with nothing else to change."""

from __future__ import annotations

import types

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'fedrouter[serve]')")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from fedrouter.serving import app as app_module  # noqa: E402
from fedrouter.serving import endpoints  # noqa: E402
from fedrouter.serving.metrics import Metrics  # noqa: E402


def _service():
    """What the app and its guard touch of a service, without a model."""
    return types.SimpleNamespace(metrics=Metrics(), queue=types.SimpleNamespace(qsize=lambda: 0),
                                 model_ids=lambda: ["run", "global"],
                                 model_card=lambda m: {"id": m, "object": "model"})


def test_a_new_endpoint_is_one_row_and_one_handler(monkeypatch):
    async def echo(call):
        return {"echo": call.path_params["word"], "authorized": call.authorized}

    row = endpoints.Endpoint("echo", "GET", "/v1/echo/{word:path}", echo)
    table = (*endpoints.ENDPOINTS, row)
    monkeypatch.setattr(endpoints, "ENDPOINTS", table)
    monkeypatch.setattr(app_module, "ENDPOINTS", table)
    service = _service()
    client = TestClient(app_module.create_app(service, api_key="k"))
    assert client.get("/v1/echo/hello", headers={"Authorization": "Bearer k"}).json() == {"echo": "hello", "authorized": True}
    assert client.get("/v1/echo/hello").status_code == 401  # guarded like every other row
    assert service.metrics.responses[("/v1/echo", 200)] == 1 and service.metrics.responses[("/v1/echo", 401)] == 1


def test_every_row_is_served_and_counted_under_its_own_path():
    service = _service()
    client = TestClient(app_module.create_app(service))
    assert client.get("/health").json() == {"status": "ok", "models": ["run", "global"], "queued": 0}
    assert client.get("/v1/models/global").json() == {"id": "global", "object": "model"}
    assert client.get("/v1/models/nope").status_code == 404
    assert client.get("/nowhere").status_code == 404
    assert client.post("/v1/completions", json={"model": "run", "prompt": "x", "n": 2}).json()["error"]["param"] == "n"
    counted = {path for path, _ in service.metrics.responses}
    assert counted == {"/health", "/v1/models", "other", "/v1/completions"}
    assert {ep.label for ep in endpoints.ENDPOINTS} == {"/health", "/metrics", "/v1/models", "/v1/completions",
                                                         "/v1/chat/completions"}
