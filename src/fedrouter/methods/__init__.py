"""Federated methods, each one module with a `Server` (server part) and a `Client` (client part)."""

from __future__ import annotations

import importlib

# name -> module under fedrouter.methods
METHODS = {
    "fedit": "fedit",
    "local": "local",
}


def load_method(name: str):
    """(ServerClass, ClientClass) of the method registered as `name`."""
    module = importlib.import_module(f"fedrouter.methods.{METHODS[name]}")
    return module.Server, module.Client
