"""`fedrouter serve RUN_DIR`: the process around the application -- its flags checked before any work, the
run loaded, the socket bound, uvicorn run until SIGTERM or Ctrl-C. A stop stops accepting connections, lets
every request in flight finish (streams included; at most --shutdown-timeout-s), then exits 0; a second
Ctrl-C stops at once.

What it serves (GET /v1/models): each adapter the run saved, by its name, and a routed model named after
the run directory that sends each prompt to the adapter `fedrouter predict` would pick. A run without a
router serves its `global` adapter under both names. The API itself: `endpoints`; bad input is a 4xx for
that request alone (`schemas`, `guard`), and the server goes on.
"""

from __future__ import annotations

import socket
from pathlib import Path

from fedrouter.errors import FedrouterError
from fedrouter.serving.app import create_app
from fedrouter.serving.batcher import Service
from fedrouter.serving.guard import LOOPBACK, is_loopback
from fedrouter.serving.schemas import BODY_TIMEOUT_S, MAX_BODY_BYTES

SHUTDOWN_TIMEOUT_S = 30  # the most a SIGTERM waits for the requests in flight


def bind(host: str, port: int) -> socket.socket:
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
    try:  # the serve extra: one line saying what to install, before any work, when it is missing
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
    sock = bind(host, port)
    bound = sock.getsockname()[1]

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # uvicorn re-raises the signal after shutting down; exit 0 instead
            if self.should_exit:
                self.force_exit = True  # a second signal: stop now
            self.should_exit = True

    # On loopback the server answers only to loopback names (a web page that rebinds its own name to
    # 127.0.0.1 cannot reach it); bound to another address it cannot know the names its clients use.
    hosts = (*LOOPBACK, host.lower()) if is_loopback(host) else None
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
