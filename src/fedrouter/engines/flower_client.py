"""Where apps written by earlier versions find the ClientApp: `fedrouter.engines.flower_client:client_app`."""

from fedrouter.engines.flower.client_app import client_app  # noqa: F401
