"""Every method's messages survive Flower's wire (float32 ArrayRecord + JSON config) unchanged: a run whose
every message, both ways, goes through the codec equals the plain in-process run exactly."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedrouter.config import load_config  # noqa: E402
from fedrouter.engines.wire import config_json, roundtrip, state_from_record, state_to_record  # noqa: E402
from fedrouter.experiment import InProcessClients, build_world, run_with, write_run  # noqa: E402
from fedrouter.methods import METHODS  # noqa: E402
from fedrouter.methods.base import Message  # noqa: E402


class WireTransport:
    """The in-process transport, with every message and reply sent through the Flower codec."""

    def __init__(self, inner):
        self.inner = inner

    def _carry(self, call, messages):
        replies = call({cid: roundtrip(m) for cid, m in messages.items()})
        return {cid: roundtrip(r) for cid, r in replies.items()}

    def setup(self, messages):
        return self._carry(self.inner.setup, messages)

    def fit(self, messages):
        return self._carry(self.inner.fit, messages)

    def evaluate(self, messages):
        return self._carry(self.inner.evaluate, messages)


def _run(cfg, out, wire: bool) -> dict:
    torch.manual_seed(cfg.seed)
    data, shared, contexts, server, client = build_world(cfg, progress=False)
    clients = InProcessClients(cfg, client, contexts, progress=False)
    if wire:
        clients.transport = WireTransport(clients.transport)
    return write_run(out, lambda: run_with(cfg, out, data.tasks, shared, server, clients, progress=False))


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_survives_the_wire(method, tmp_path, tiny_overrides, tiny_model_dir):
    options = {"flora": {"method_options": {"ranks": [2, 4]}}, "fedlease": {"method_options": {"warmup_rounds": 1}},
               "fedcluster": {"method_options": {"cluster_round": 1}}}.get(method, {})
    cfg = load_config(None, {**tiny_overrides, "method": method, "scenario": "dual", **options})
    plain = _run(cfg, tmp_path / "plain", wire=False)
    wired = _run(cfg, tmp_path / "wired", wire=True)
    assert wired["rouge1"] == plain["rouge1"]
    assert wired["per_client"] == plain["per_client"]
    assert wired["bytes_up"] == plain["bytes_up"] and wired["bytes_down"] == plain["bytes_down"]
    for name in plain["adapters"]:
        from safetensors.torch import load_file

        a = load_file(tmp_path / "plain" / "adapters" / name / "adapter_model.safetensors")
        b = load_file(tmp_path / "wired" / "adapters" / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_codec_keeps_names_values_and_config_and_casts_to_float32():
    msg = Message({"a/b.lora_A.weight": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "c": torch.ones(0)},
                  {"round": 3, "jobs": [[0, 1]], "nested": {"k": [1.5, None]}, "flag": True})
    got = roundtrip(msg)
    assert list(got.arrays) == list(msg.arrays)
    assert got.arrays["a/b.lora_A.weight"].dtype == torch.float32
    assert torch.equal(got.arrays["a/b.lora_A.weight"], msg.arrays["a/b.lora_A.weight"].float())
    assert got.config == msg.config


def test_numpy_values_become_plain_numbers_and_unsendable_ones_are_named():
    import numpy as np

    assert roundtrip(Message(config={"x": np.float32(0.5), "v": np.arange(3)})).config == {"x": 0.5, "v": [0, 1, 2]}
    with pytest.raises(TypeError, match="'bad'"):
        config_json({"ok": 1, "bad": object()})


def test_private_state_roundtrips_through_a_context_record():
    import numpy as np

    state = {"adapter": {"w": torch.randn(2, 2)}, "centroids": np.eye(2), "global_of": {0: 1}}
    back = state_from_record(state_to_record(state))
    assert torch.equal(back["adapter"]["w"], state["adapter"]["w"])
    assert np.array_equal(back["centroids"], state["centroids"]) and back["global_of"] == {0: 1}
