"""fedrouter Messages on Flower's wire (float32 ArrayRecord + JSON config): names, values and config come
back unchanged, what cannot travel is named. (That every method's whole run survives the wire is in
test_flower_grid: every method over the real ClientApp equals its in-process run.)"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed")

from fedrouter.engines.flower.wire import (config_json, join_parts, roundtrip, split_parts, state_bytes,  # noqa: E402
                                           state_from_bytes)
from fedrouter.methods.base import Message  # noqa: E402


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


def test_private_state_roundtrips_through_its_bytes():
    import numpy as np

    state = {"adapter": {"w": torch.randn(2, 2)}, "centroids": np.eye(2), "global_of": {0: 1}}
    back = state_from_bytes(state_bytes(state))
    assert state_bytes(back) == state_bytes(state)  # the same state, the same bytes: how a node sees nothing changed
    assert torch.equal(back["adapter"]["w"], state["adapter"]["w"])
    assert np.array_equal(back["centroids"], state["centroids"]) and back["global_of"] == {0: 1}


def test_several_messages_travel_as_one_and_come_apart_unchanged():
    parts = [Message({"g0/x": torch.ones(2), "a/b": torch.zeros(1, 3)}, {"split": "test", "base": False}),
             Message({}, {"split": "general"}), Message({"a/b": torch.full((1,), 2.0)}, {})]
    back = split_parts(roundtrip(join_parts(parts)))
    assert [m.config for m in back] == [m.config for m in parts]
    for got, sent in zip(back, parts):
        assert list(got.arrays) == list(sent.arrays) and all(torch.equal(got.arrays[k], sent.arrays[k]) for k in sent.arrays)


def test_tensors_travel_packed_in_one_array_and_the_old_form_is_still_read():
    # One Array for all of a message's tensors: on a deployment each Array is pulled and pushed as objects
    # of its own, one request each.
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    from fedrouter.engines.flower.wire import ARRAYS, CONFIG, LAYOUT, PACKED, from_records, to_records

    msg = Message({f"g{i}/lora_{ab}": torch.randn(4, 3) for i in range(8) for ab in "AB"} | {"empty": torch.ones(0, 2)},
                  {"round": 1})
    records = to_records(msg)
    assert list(records[ARRAYS]) == [PACKED] and LAYOUT in records
    got = from_records(records)
    assert list(got.arrays) == list(msg.arrays) and all(torch.equal(got.arrays[k], msg.arrays[k]) for k in msg.arrays)
    assert got.arrays["empty"].shape == (0, 2)
    got.arrays["g0/lora_A"].add_(1)  # each tensor is its own, as before
    assert torch.equal(got.arrays["g0/lora_B"], msg.arrays["g0/lora_B"])
    assert roundtrip(Message({"one": torch.ones(0)})).arrays["one"].shape == (0,)
    assert roundtrip(Message({}, {"x": 1})).arrays == {}
    # one Array per tensor (no layout): read as before
    old = RecordDict({ARRAYS: ArrayRecord({"a": torch.ones(2, 2)}), CONFIG: ConfigRecord({"json": "{}"})})
    assert torch.equal(from_records(old).arrays["a"], torch.ones(2, 2))


@pytest.mark.parametrize("layout", ['[["a", [3]]]', '[["a", [2]], ["a", [2]]]', '[["a", [-1]], ["b", [5]]]', '{"a": 1}', "[[1]]"])
def test_a_layout_that_does_not_fit_its_array_is_refused(layout):
    from flwr.app import ConfigRecord

    from fedrouter.engines.flower.wire import LAYOUT, from_records, to_records

    records = to_records(Message({"a": torch.ones(2), "b": torch.ones(2)}))
    records[LAYOUT] = ConfigRecord({"json": layout})
    with pytest.raises(ValueError, match="layout"):
        from_records(records)
