"""`fedrouter serve` on loopback, called with the official `openai` client: models, completions, chat,
streaming; answers and adapters equal `fedrouter predict`'s; 32 concurrent clients batched into mixed
batches; every bad input its 4xx and the server goes on; SIGTERM drains the requests in flight, exit 0."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
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

from conftest import exit_code, one_error_line  # noqa: E402
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
    logs = tmp_path_factory.mktemp("serve-log")
    key_file = logs / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    srv = Server(runs["fedrouter"], logs / "server.log", "--api-key-file", str(key_file), "--max-body-bytes", str(MAX_BODY),
                 "--body-timeout-s", "2")
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
    from fedrouter.serving.finished_run import encode_prompts, load_run
    from fedrouter.serving.predict import predict

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
    assert httpx.get(server.root + "/health").json() == {"status": "ok"}  # no key needed, and it tells nothing more
    health = httpx.get(server.root + "/health", headers={"Authorization": f"Bearer {KEY}"}).json()
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


def _post(server, path: str, body, key: str | None = KEY, raw: bytes | None = None, headers: dict | None = None):
    sent = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        sent["Authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.root + path, content=content, headers=sent, timeout=60)


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
    chat = {"model": server.name, "messages": [{"role": "user", "content": "x"}]}
    good_raw = json.dumps(good)
    cases += [  # issue 32: each of these failed its request with a 500 (or a whole batch), or was served
        ("seed 10^30", "/v1/completions", {**good, "temperature": 1, "seed": 10**30}, None, KEY, 400, None),
        ("temperature 1e-300", "/v1/completions", {**good, "temperature": 1e-300}, None, KEY, 400, None),
        ("top_p 1e-300", "/v1/completions", {**good, "temperature": 1, "top_p": 1e-300}, None, KEY, 400, None),
        ("temperature NaN", "/v1/completions", None, good_raw.replace('"temperature": 0', '"temperature": NaN').encode(),
         KEY, 400, "invalid_json"),
        ("max_tokens Infinity", "/v1/completions", None, good_raw.replace('"max_tokens": 2', '"max_tokens": Infinity').encode(),
         KEY, 400, "invalid_json"),
        ("lone surrogate in a prompt", "/v1/completions", None,
         good_raw.replace(json.dumps(PROMPTS[0]), '"caf\\ud800"').encode(), KEY, 400, "invalid_json"),
        ("lone surrogate in a chat", "/v1/chat/completions", None,
         json.dumps(chat).replace('"x"', '"\\udfff"').encode(), KEY, 400, "invalid_json"),
        ("JSON nested 20000 deep", "/v1/completions", None, b"[" * 20000 + b"]" * 20000, KEY, 400, "invalid_json"),
        ("a prompt no tokenization could fit", "/v1/completions", {**good, "prompt": "x" * (MAX_BODY - 200)}, None, KEY, 400,
         "context_length_exceeded"),
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
    # a web page (an Origin header), another body type, another Host name: refused, and no CORS headers
    for what, headers, status, code in [
        ("a web page's request", {"Origin": "https://evil.example"}, 403, "origin_not_allowed"),
        ("a form's text/plain body", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        ("a rebound DNS name", {"Host": f"evil.example:{server.port}"}, 421, "invalid_host"),
    ]:
        response = _post(server, "/v1/completions", good, headers=headers)
        assert response.status_code == status and response.json()["error"]["code"] == code, (what, response.text)
        assert not any(h.startswith("access-control-") for h in response.headers), what
    assert "characters" in _post(server, "/v1/completions", {**good, "prompt": "x" * (MAX_BODY - 200)}).json()["error"]["message"]
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


def test_a_64_request_mixed_batch_with_poisoned_rows_answers_every_valid_request(runs, expected, tmp_path):
    # issue 32: requests that failed in generation (seed 10^30, top_p / temperature 1e-300) failed the whole
    # batch they landed in -- 37 of 40 valid requests got a 500. A long batching wait puts the 64 together.
    srv = Server(runs["fedrouter"], tmp_path / "batch.log", "--max-wait-ms", "1500")
    try:
        rows = expected["rows"]
        prompts = list(rows)
        poisons = [{"temperature": 1, "seed": 10**30}, {"temperature": 1e-300}, {"temperature": 1, "top_p": 1e-300},
                   {"temperature": 1, "seed": -(2**70)}, {"top_p": 0}, {"temperature": -0.0001}]
        requests = []
        for k in range(64):
            prompt = prompts[k % len(prompts)]
            if k % 4 == 1:
                requests.append(("poisoned", {"model": srv.name, "prompt": prompt, **poisons[k % len(poisons)]}))
            elif k % 4 == 2:  # another adapter than the router's: a mixed batch
                other = next(a for a in expected["adapters"] if a != rows[prompt]["adapter"])
                requests.append(("adapter", {"model": other, "prompt": prompt, "temperature": 0}))
            elif k % 4 == 3:
                requests.append(("sampled", {"model": srv.name, "prompt": prompt, "temperature": 1.3, "seed": k}))
            else:
                requests.append(("greedy", {"model": srv.name, "prompt": prompt, "temperature": 0}))
        results = [None] * len(requests)

        def send(k: int) -> None:
            results[k] = httpx.post(srv.root + "/v1/completions", json=requests[k][1], timeout=300)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        for (kind, body), response in zip(requests, results):
            if kind == "poisoned":
                assert response.status_code == 400, (body, response.text)
                continue
            assert response.status_code == 200, (kind, body, response.text)
            text = response.json()["choices"][0]["text"]
            if kind == "greedy":
                assert text == rows[body["prompt"]]["answer"]
            elif kind == "adapter":
                assert text == expected["alone"][body["model"]][body["prompt"]]
    finally:
        srv.close()


def test_a_batch_that_fails_as_a_whole_is_answered_row_by_row(monkeypatch):
    # The serving boundary behind the per-row isolation: whatever still fails a whole batch, each request
    # is generated again alone, so only the one that cannot be generated is a 500.
    import asyncio

    from fedrouter.core import generate as core
    from fedrouter.serving import batcher as srv

    def fake_rows(model, tokenizer, rows, batch_size=64, **kwargs):
        if any(r.seed == 13 for r in rows):
            raise RuntimeError("a row no batch survives")
        done = [core.Completion(f"answer {r.prompt_ids[0]}", "stop", 1) for r in rows]
        for r, c in zip(rows, done):
            r.on_done(c)
        return done

    monkeypatch.setattr(core, "generate_rows", fake_rows)
    service = srv.Service.__new__(srv.Service)  # no model: only the batcher's bookkeeping runs
    service.router, service.embedder, service.model, service.tokenizer = None, None, None, None
    service.metrics = srv.Metrics()
    loop = asyncio.new_event_loop()
    try:
        jobs = [srv.Job("completions", "global", "x", [k], 4, 1.0, 1.0, 13 if k == 2 else k, (), False, False, loop,
                        adapter="global") for k in range(5)]
        service._run_batch(jobs)
        loop.run_until_complete(asyncio.sleep(0))  # the worker's answers, delivered on the loop
        for k, job in enumerate(jobs):
            if k == 2:
                assert job.done.exception().status == 500
            else:
                assert job.done.result().text == f"answer {k}"
    finally:
        loop.close()


def test_a_prompt_is_measured_in_characters_then_tokenized_once_off_the_event_loop():
    import asyncio
    import types

    from fedrouter.serving import batcher as srv

    calls = []

    class Tokenizer:
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            calls.append((text, threading.current_thread().name))
            return {"input_ids": [5] * len(text.split())}

    service = srv.Service.__new__(srv.Service)
    service.request_tokenizer, service.longest_token, service.prompt_limit = Tokenizer(), 4, 10
    service.tokenizing = srv.ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrouter-tokenize")
    service.cfg = types.SimpleNamespace(prompt_template="Q: {instruction}", max_seq_len=16, max_new_tokens=3)
    service.context_length, service.routed_name, service.adapters = 64, "run", ["global"]
    req = srv.CompletionRequest.model_validate({"model": "run", "prompt": "x"})
    loop = asyncio.new_event_loop()
    try:
        job = loop.run_until_complete(service.new_job(req, "completions", "a b c", loop))
        assert job.prompt_ids == [1, 5, 5, 5, 5] and calls == [("Q: a b c", calls[0][1])]
        assert calls[0][1].startswith("fedrouter-tokenize")  # once, in the tokenizing thread
        with pytest.raises(srv.ApiError, match="characters"):  # 10 tokens x 4 characters: refused untokenized
            loop.run_until_complete(service.new_job(req, "completions", "y" * 40, loop))
        assert len(calls) == 1
    finally:
        service.tokenizing.shutdown()
        loop.close()


def _trickle(srv, body_sent: bytes = b'{"model": ') -> socket.socket:
    """A connection that sends its headers and the start of its body, then nothing more."""
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=120)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n" + body_sent)
    return sock


def test_fedit_run_serves_its_global_adapter_and_sigterm_drains(runs, tmp_path):
    srv = Server(runs["fedit"], tmp_path / "fedit.log", "--max-wait-ms", "5", "--allow-origin", "https://ok.example",
                 "--body-timeout-s", "2", "--shutdown-timeout-s", "20")
    try:
        c = openai.OpenAI(base_url=srv.url, api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list()] == [srv.name, "global"]
        raw = c.completions.with_raw_response.create(model=srv.name, prompt=PROMPTS[1], temperature=0)
        assert raw.parse().fedrouter == {"adapter": "global", "distance": None, "routed": True}
        assert raw.headers["x-fedrouter-adapter"] == "global" and raw.headers["x-fedrouter-distance"] == "none"

        # --allow-origin opens the API to that page, with CORS headers (a preflight too); any other is refused
        body = {"model": srv.name, "prompt": PROMPTS[1], "temperature": 0}
        allowed = httpx.post(srv.root + "/v1/completions", json=body, headers={"Origin": "https://ok.example"})
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://ok.example"
        preflight = httpx.options(srv.root + "/v1/completions", headers={
            "Origin": "https://ok.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 200 and "POST" in preflight.headers["access-control-allow-methods"]
        assert httpx.post(srv.root + "/v1/completions", json=body, headers={"Origin": "https://evil.example"}).status_code == 403

        # a body that does not arrive in --body-timeout-s: 408, and the connection is the server's again
        with _trickle(srv) as sock:
            assert sock.recv(4096).split(b"\r\n", 1)[0].endswith(b"408 Request Timeout")
        late = _trickle(srv)  # one more, still trickling when SIGTERM comes: it must not hold the server up

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
        late.close()
        assert all(not isinstance(r, Exception) for r in results), results
        assert all(r[0][-1].finish_reason in ("stop", "length") for r in results)
        assert any(t > signalled for r in results for t in r[1]), "nothing was still in flight at SIGTERM"
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.root + "/health")
    finally:
        srv.close()


SERVE_FLAG_CASES = {
    "max-wait-ms nan": (["--max-wait-ms", "nan"], "argument --max-wait-ms: not a finite number: 'nan'"),
    "max-wait-ms inf": (["--max-wait-ms", "inf"], "not a finite number: 'inf'"),
    "max-wait-ms huge": (["--max-wait-ms", "1e9"], "--max-wait-ms must be from 0 to 10000"),
    "body timeout 0": (["--body-timeout-s", "0"], "--body-timeout-s must be in (0, 3600]"),
    "shutdown timeout negative": (["--shutdown-timeout-s", "-1"], "--shutdown-timeout-s must be from 0 to 3600"),
    "origin with a path": (["--allow-origin", "https://x.example/page"], "give an origin such as https://example.org"),
    "key file missing": (["--api-key-file", "/nonexistent/key"], "--api-key-file /nonexistent/key: cannot read it"),
    "key file a folder": (["--api-key-file", "/tmp"], "is a folder, not a regular file"),
    "two keys": (["--api-key-file", "k", "--api-key", "k"], "not allowed with argument"),
}


@pytest.mark.parametrize("case", sorted(SERVE_FLAG_CASES))
def test_serve_refuses_bad_flags_in_one_line(case, runs, capsys):
    flags, needle = SERVE_FLAG_CASES[case]
    assert exit_code(lambda: main(["serve", str(runs["fedit"]), "--port", "0", *flags])) == 2
    assert needle in one_error_line(capsys.readouterr().err)


def test_the_key_from_the_command_line_is_warned_about_and_an_empty_key_file_refused(runs, tmp_path, capsys):
    assert main(["serve", str(runs["fedit"]), "--api-key", "k", "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "--api-key puts the key in the command line, which every user of this machine can read" in err
    (tmp_path / "empty").write_text("\n")
    assert main(["serve", str(runs["fedit"]), "--api-key-file", str(tmp_path / "empty")]) == 2
    assert "is empty" in capsys.readouterr().err


def test_serve_refuses_bad_arguments_in_one_line(runs, tmp_path, capsys):
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


@pytest.mark.parametrize("header, name", [("127.0.0.1:8000", "127.0.0.1"), ("[::1]:8000", "::1"), ("LOCALHOST", "localhost"),
                                          ("evil.example:80", "evil.example"), ("::1", "::1"), ("", "")])
def test_the_host_check_reads_ipv6_hosts_and_ports(header, name):
    from fedrouter.serving.guard import host_name as _host_name, is_loopback as _is_loopback

    assert _host_name(header) == name
    assert [_is_loopback(h) for h in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "0.0.0.0", "example.org")] == \
        [True, True, True, True, False, False]
