import pytest
import torch

from fedrouter.core.aggregate import weighted_average


def test_weights_one_and_three_on_2x2():
    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.0, 4.0])}
    b = {"w": torch.tensor([[5.0, 6.0], [7.0, 8.0]]), "b": torch.tensor([8.0, 0.0])}
    out = weighted_average([a, b], [1, 3])
    # (1*a + 3*b) / 4, by hand
    assert torch.equal(out["w"], torch.tensor([[4.0, 5.0], [6.0, 7.0]]))
    assert torch.equal(out["b"], torch.tensor([6.0, 1.0]))
    assert set(out) == {"w", "b"}


def test_three_states_unnormalised_weights_float64():
    states = [{"x": torch.tensor([3.0], dtype=torch.float64)},
              {"x": torch.tensor([6.0], dtype=torch.float64)},
              {"x": torch.tensor([9.0], dtype=torch.float64)}]
    out = weighted_average(states, [2, 2, 2])
    assert out["x"].dtype == torch.float64
    assert out["x"].item() == pytest.approx(6.0, abs=1e-12)
    out = weighted_average(states, [1, 0, 2])  # (3 + 18) / 3 = 7
    assert out["x"].item() == pytest.approx(7.0, abs=1e-12)


def test_keeps_dtype_and_does_not_modify_inputs():
    a = {"w": torch.ones(2, 2)}
    b = {"w": torch.zeros(2, 2)}
    out = weighted_average([a, b], [1, 1])
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], torch.full((2, 2), 0.5))
    assert torch.equal(a["w"], torch.ones(2, 2)) and torch.equal(b["w"], torch.zeros(2, 2))


def test_single_state_returns_itself():
    s = {"w": torch.tensor([[0.1, -0.2], [0.3, 1e-7]]), "v": torch.arange(3, dtype=torch.float32)}
    out = weighted_average([s], [5.0])
    assert set(out) == set(s)
    for k in s:
        assert torch.equal(out[k], s[k])


def test_mismatched_keys_raise():
    with pytest.raises(ValueError):
        weighted_average([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}], [1, 1])
    with pytest.raises(ValueError):
        weighted_average([{"a": torch.zeros(2)}, {"a": torch.zeros(2), "b": torch.zeros(2)}], [1, 1])


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        weighted_average([{"a": torch.zeros(2, 2)}, {"a": torch.zeros(4)}], [1, 1])


def test_empty_and_count_mismatch_raise():
    with pytest.raises(ValueError):
        weighted_average([], [])
    with pytest.raises(ValueError):
        weighted_average([{"a": torch.zeros(1)}], [1, 2])


def test_zero_or_negative_total_weight_raises():
    states = [{"a": torch.zeros(1)}, {"a": torch.ones(1)}]
    with pytest.raises(ValueError):
        weighted_average(states, [0, 0])
    with pytest.raises(ValueError):
        weighted_average(states, [1, -2])
