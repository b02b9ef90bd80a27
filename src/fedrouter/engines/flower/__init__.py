"""The Flower engine: the same method parts, carried by Flower's Message API.

- `server`: the server side (a `Transport` over Flower's Grid, node discovery, the run on a Grid);
- `app`: the ServerApp `flwr run` starts, the app folder it runs, and Flower's simulation runtime;
- `client_app`: the thin ClientApp (no torch at import); `node`: what runs on a node for one message,
  and the long-lived worker; `node_store`: a node's checkpoints of its client; `wire`: messages as
  Flower records; `keys`: the keys of a secure deployment.

`fedrouter.engines.flower:server_app` stays importable (apps written by earlier versions name it); it is
loaded only when asked for, so that importing the ClientApp does not import the server side.
"""


def __getattr__(name: str):
    if name == "server_app":
        from fedrouter.engines.flower.app import server_app

        return server_app
    raise AttributeError(name)
