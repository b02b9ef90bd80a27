"""`fedrouter serve` on loopback, called with the official `openai` client: models, completions, chat,
streaming; answers and adapters equal `fedrouter predict`'s; 32 concurrent clients batched into mixed
batches; every bad input its 4xx and the server goes on; SIGTERM drains the requests in flight, exit 0."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'fedrouter[serve]')")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'fedrouter[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is a dev dependency")
httpx = pytest.importorskip("httpx")

from fedrouter.cli import main  # noqa: E402
from fedrouter.testing import stop  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "test-key-123"
MAX_BODY = 64 * 1024
PROMPTS = ["[ anna | job | baker ] [ anna | city | rome ]",
           "the bank of oslo said on monday that it will open the park in may .",
           "kate : can you fix the lamp on saturday ? carla : yes , i will do it . kate : perfect !"]


def _prompts() -> list[str]:
    from fedrouter.core import synthetic

    return PROMPTS + [e["instruction"] for t in synthetic.TASKS for e in synthetic.generate_examples(t, 2, seed="serve-test")]


def _run(root: Path, method: str) -> Path:
    from conftest import TINY_OVERRIDES

    sets = {**TINY_OVERRIDES, **({"method_options.n_global": 2, "method_options.n_local": 2} if method == "fedrouter" else {})}
    out = root / f"{method}-run"
    args = ["run", "--quiet", "--out", str(out), "--method", method]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve")
    return {"fedrouter": _run(root, "fedrouter"), "fedit": _run(root, "fedit")}


class Server:
    """`fedrouter serve` in its own process on a free loopback port; stopped by its pid."""

    def __init__(self, run_dir: Path, log: Path, *flags: str):
        cmd = [sys.executable, "-m", "fedrouter.cli", "serve", str(run_dir), "--port", "0", "--threads", "1", *flags]
        self.log = log
        self.out = log.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 180
        while True:
            found = re.search(r"serving (\S+) at (http://127\.0\.0\.1:(\d+)/v1)", log.read_text())
            if found:
                break
            assert self.proc.poll() is None, f"the server ended: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no server after 180 s: {log.read_text()[-3000:]}"
            time.sleep(0.1)
        self.name, self.url, self.port = found.group(1), found.group(2), int(found.group(3))
        self.root = self.url[: -len("/v1")]

    def close(self) -> None:
        stop(self.proc)
        self.out.close()


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    srv = Server(runs["fedrouter"], tmp_path_factory.mktemp("serve-log") / "server.log", "--api-key", KEY,
                 "--max-body-bytes", str(MAX_BODY))
    try:
        yield srv
        srv.proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, exit 0
        assert srv.proc.wait(timeout=60) == 0, srv.log.read_text()[-3000:]
    finally:
        srv.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def expected(runs):
    """`fedrouter predict`'s rows for the test prompts, and each adapter's own greedy answer per prompt."""
    from fedrouter.core.generate import generate
    from fedrouter.study.predict import encode_prompts, load_run, predict

    prompts = _prompts()
    rows = {r["prompt"]: r for r in predict(runs["fedrouter"], prompts)}
    cfg, model, tokenizer, router = load_run(runs["fedrouter"])
    ids = encode_prompts(cfg, tokenizer, prompts)
    alone = {}
    for name in router["adapters"]:
        model.set_adapter(name)
        alone[name] = dict(zip(prompts, generate(model, tokenizer, ids, cfg.max_new_tokens)))
    return {"rows": rows, "alone": alone, "adapters": router["adapters"], "max_new_tokens": cfg.max_new_tokens}


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.root + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


def test_models_lists_the_routed_model_and_every_adapter(server, client, expected, runs):
    assert server.name == runs["fedrouter"].name
    ids = [m.id for m in client.models.list()]
    assert ids == [server.name, *expected["adapters"]]
    assert client.models.retrieve(server.name).id == server.name
    health = httpx.get(server.root + "/health").json()  # no key needed
    assert health["status"] == "ok" and health["models"] == ids


def test_answers_and_adapters_equal_predict(server, client, expected):
    rows = expected["rows"]
    assert len({r["adapter"] for r in rows.values()}) == 2, "the test prompts should reach both adapters"
    for prompt, row in rows.items():
        raw = client.completions.with_raw_response.create(model=server.name, prompt=prompt, temperature=0)
        done = raw.parse()
        assert done.choices[0].text == row["answer"]
        assert done.fedrouter["adapter"] == row["adapter"] and done.fedrouter["routed"] is True
        assert done.fedrouter["distance"] == pytest.approx(row["distance"], rel=1e-4)
        assert raw.headers["x-fedrouter-adapter"] == row["adapter"]
        assert float(raw.headers["x-fedrouter-distance"]) == pytest.approx(row["distance"], rel=1e-4)
        assert done.usage.completion_tokens >= 1 and done.model == server.name

        chat = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": prompt}], temperature=0)
        assert chat.choices[0].message.content == row["answer"] and chat.choices[0].message.role == "assistant"
        assert chat.fedrouter["adapter"] == row["adapter"]


def test_naming_an_adapter_bypasses_the_router(server, client, expected):
    for prompt, row in list(expected["rows"].items())[:4]:
        other = next(a for a in expected["adapters"] if a != row["adapter"])
        done = client.completions.create(model=other, prompt=prompt, temperature=0)
        assert done.fedrouter == {"adapter": other, "distance": None, "routed": False}
        assert done.choices[0].text == expected["alone"][other][prompt]
        assert done.model == other


def test_streaming_adds_up_to_the_answer(server, client, expected):
    prompt, row = next(iter(expected["rows"].items()))
    raw = client.completions.with_raw_response.create(model=server.name, prompt=prompt, temperature=0, stream=True)
    assert raw.headers["x-fedrouter-adapter"] == row["adapter"]
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert "".join(c.choices[0].text for c in chunks) == row["answer"]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.fedrouter["adapter"] == row["adapter"] for c in chunks)
    assert len(chunks) >= 3  # pieces, not one block

    stream = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": prompt}],
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == row["answer"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_max_tokens_stop_and_temperature(server, client, expected):
    prompt, row = next((p, r) for p, r in expected["rows"].items() if len(r["answer"].split()) >= 3)
    short = client.completions.create(model=server.name, prompt=prompt, temperature=0, max_tokens=1)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 1
    assert row["answer"].startswith(short.choices[0].text)
    word = row["answer"].split()[1]
    cut = client.completions.create(model=server.name, prompt=prompt, temperature=0, stop=[" " + word])
    assert cut.choices[0].text == row["answer"][: row["answer"].index(" " + word)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=server.name, prompt=prompt, temperature=0, stop=" " + word, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text
    # sampling: the same seed, the same draw
    sampled = [client.completions.create(model=server.name, prompt=prompt, temperature=1.5, seed=7, max_tokens=12)
               for _ in range(2)]
    assert sampled[0].choices[0].text == sampled[1].choices[0].text


def test_32_concurrent_clients_get_predicts_answers_in_mixed_batches(server, client, expected):
    before = _metrics(server)
    prompts = list(expected["rows"])
    errors, wrong = [], []

    def one_client(k: int) -> None:
        try:
            for i in range(20):
                prompt = prompts[(k + i) % len(prompts)]
                if (k + i) % 2:
                    done = client.completions.create(model=server.name, prompt=prompt, temperature=0)
                    text = done.choices[0].text
                else:
                    done = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": prompt}],
                                                          temperature=0)
                    text = done.choices[0].message.content
                if text != expected["rows"][prompt]["answer"] or done.fedrouter["adapter"] != expected["rows"][prompt]["adapter"]:
                    wrong.append((prompt, text, done.fedrouter))
        except Exception as exc:  # collected and reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert not wrong, wrong[:3]
    after = _metrics(server)
    assert after["fedrouter_batch_rows_total"] - before["fedrouter_batch_rows_total"] == 640
    batches = after["fedrouter_batches_total"] - before["fedrouter_batches_total"]
    assert batches < 640 / 4, f"{batches} batches for 640 requests: requests were not batched"
    assert after["fedrouter_mixed_batches_total"] > before["fedrouter_mixed_batches_total"]
    assert after["fedrouter_batch_adapters_max"] == 2 and after["fedrouter_batch_rows_max"] >= 8
    assert after['fedrouter_http_responses_total{path="/v1/completions",status="200"}'] >= 320


def _post(server, path: str, body, key: str | None = KEY, raw: bytes | None = None):
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.root + path, content=content, headers=headers, timeout=60)


def test_bad_input_gets_its_status_and_the_server_goes_on(server, client):
    good = {"model": server.name, "prompt": PROMPTS[0], "temperature": 0, "max_tokens": 2}
    long_prompt = " ".join(["the bank of oslo said on monday"] * 40)
    cases = [
        ("malformed JSON", "/v1/completions", None, b'{"model": "x", "prompt": ', KEY, 400, "invalid_json"),
        ("not an object", "/v1/completions", [1, 2], None, KEY, 400, "invalid_json"),
        ("missing prompt", "/v1/completions", {"model": server.name}, None, KEY, 400, None),
        ("missing model", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, None, KEY, 400, None),
        ("no messages", "/v1/chat/completions", {"model": server.name, "messages": []}, None, KEY, 400, None),
        ("bad role", "/v1/chat/completions", {"model": server.name, "messages": [{"role": "robot", "content": "x"}]}, None, KEY, 400, None),
        ("prompt not a string", "/v1/completions", {**good, "prompt": 5}, None, KEY, 400, None),
        ("unknown model", "/v1/completions", {**good, "model": "gpt-4"}, None, KEY, 404, "model_not_found"),
        ("prompt over the context length", "/v1/completions", {**good, "prompt": long_prompt}, None, KEY, 400, "context_length_exceeded"),
        ("max_tokens over the context length", "/v1/completions", {**good, "max_tokens": 10_000}, None, KEY, 400, "context_length_exceeded"),
        ("n > 1", "/v1/completions", {**good, "n": 2}, None, KEY, 400, "unsupported_parameter"),
        ("n > 1 (chat)", "/v1/chat/completions", {"model": server.name, "messages": [{"role": "user", "content": "x"}], "n": 3},
         None, KEY, 400, "unsupported_parameter"),
        ("max_tokens 0", "/v1/completions", {**good, "max_tokens": 0}, None, KEY, 400, None),
        ("negative temperature", "/v1/completions", {**good, "temperature": -1}, None, KEY, 400, None),
        ("wrong key", "/v1/completions", good, None, "not-the-key", 401, "invalid_api_key"),
        ("missing key", "/v1/completions", good, None, None, 401, "invalid_api_key"),
        ("body over the limit", "/v1/completions", {**good, "prompt": "x " * MAX_BODY}, None, KEY, 413, "request_too_large"),
    ]
    for what, path, body, raw, key, status, code in cases:
        response = _post(server, path, body, key, raw)
        assert response.status_code == status, (what, response.text)
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"], what
        assert error["type"] and (code is None or error["code"] == code), (what, error)
        after = _post(server, "/v1/completions", good)  # the server still answers
        assert after.status_code == 200 and after.json()["choices"][0]["text"] is not None, what
    assert httpx.get(server.root + "/v1/models").status_code == 401
    assert httpx.get(server.root + "/nope", headers={"Authorization": f"Bearer {KEY}"}).status_code == 404
    assert httpx.get(server.root + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"}).status_code == 405
    # the same through the openai client: its typed errors carry the status
    with pytest.raises(openai.BadRequestError, match="n=1"):
        client.completions.create(model=server.name, prompt="x", n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    assert client.completions.create(**good).choices[0].finish_reason in ("stop", "length")


def test_fedit_run_serves_its_global_adapter_and_sigterm_drains(runs, tmp_path):
    srv = Server(runs["fedit"], tmp_path / "fedit.log", "--max-wait-ms", "5")
    try:
        c = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list()] == [srv.name, "global"]
        raw = c.completions.with_raw_response.create(model=srv.name, prompt=PROMPTS[1], temperature=0)
        assert raw.parse().fedrouter == {"adapter": "global", "distance": None, "routed": True}
        assert raw.headers["x-fedrouter-adapter"] == "global" and raw.headers["x-fedrouter-distance"] == "none"

        # four long streams in flight, then SIGTERM: each stream still ends normally, then the process exits 0
        started, results = [threading.Event() for _ in range(4)], [None] * 4

        def stream(k: int) -> None:
            pieces, times = [], []
            try:
                for chunk in c.completions.create(model="global", prompt=PROMPTS[k % 3], temperature=2.0, seed=k,
                                                  max_tokens=200, stream=True):
                    pieces.append(chunk.choices[0])
                    times.append(time.monotonic())
                    started[k].set()
                results[k] = (pieces, times)
            except Exception as exc:  # reported below
                results[k] = exc
            started[k].set()

        threads = [threading.Thread(target=stream, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for e in started:
            assert e.wait(120)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(timeout=120)
        assert srv.proc.wait(timeout=120) == 0, srv.log.read_text()[-3000:]
        assert all(not isinstance(r, Exception) for r in results), results
        assert all(r[0][-1].finish_reason in ("stop", "length") for r in results)
        assert any(t > signalled for r in results for t in r[1]), "nothing was still in flight at SIGTERM"
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.root + "/health")
    finally:
        srv.close()


def test_serve_refuses_bad_arguments_in_one_line(runs, tmp_path, capsys):
    import socket

    (tmp_path / "half").mkdir()
    assert main(["serve", str(tmp_path / "half")]) == 2
    assert "not a finished run directory" in capsys.readouterr().err
    assert main(["serve", str(runs["fedit"]), "--max-batch", "0"]) == 2
    assert "--max-batch" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        assert main(["serve", str(runs["fedit"]), "--port", str(taken.getsockname()[1])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fedrouter: error: cannot listen on 127.0.0.1:"), err
