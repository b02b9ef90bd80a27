"""The Flower engine: the same method parts, carried by Flower's Message API.

- `server`: the server side (a `Transport` over Flower's Grid, node discovery, the run on a Grid);
- `app`: the ServerApp `flwr run` starts, the app folder it runs, and Flower's simulation runtime;
- `client_app`: the thin ClientApp (no torch at import); `node`: what runs on a node for one message,
  and the long-lived worker; `worker_wire`: what the ClientApp and the worker exchange (torch-free);
  `node_store`: a node's checkpoints of its client; `wire`: messages as Flower records; `keys`: the keys
  of a secure deployment;
- `patches`: every change fedrouter makes to Flower's internals (pinned flwr only), applied per process
  with `patches.apply(kind)` by `supernode` (`fedrouter flower supernode`), `superexec` (the SuperExec
  that command starts) and the ServerApp.

`fedrouter.engines.flower:server_app` stays importable (apps written by earlier versions name it); it is
loaded only when asked for, so that importing the ClientApp does not import the server side.
"""


def __getattr__(name: str):
    if name == "server_app":
        from fedrouter.engines.flower.app import server_app  # the torch-free ClientApp imports this package

        return server_app
    raise AttributeError(name)
