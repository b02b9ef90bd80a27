"""The shared model's routed generation: grouped per adapter and one mixed batch give the same answers."""

from __future__ import annotations

import pytest
import torch

from fedrouter.core import synthetic
from fedrouter.core.data import ClientData
from fedrouter.core.model import LoraSettings, load_base
from fedrouter.core.workbench import ClientWorkbench, SharedModel, TrainSettings


@pytest.fixture(scope="module")
def workbench(tiny_model_dir):
    model, tokenizer = load_base(str(tiny_model_dir))
    shared = SharedModel(model, tokenizer, LoraSettings(), TrainSettings(max_new_tokens=8, eval_batch_size=4))
    tests = [e for t in synthetic.TASKS for e in synthetic.generate_examples(t, 3, seed="wb")]
    data = ClientData(0, list(synthetic.TASKS), train=tests[:4], test=tests)
    return ClientWorkbench(shared, data, general_test=tests[:2], seed=0)


def _random_adapter(shared, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in shared.initial_adapter.items()}


def test_mixed_batch_equals_grouped_and_adapters_really_differ(workbench):
    shared = workbench.shared
    adapters = {name: _random_adapter(shared, i) for i, name in enumerate(["a", "b", "c"])}
    n = len(workbench.splits["test"][1])
    assignment = [["a", "b", "c"][i % 3] for i in range(n)]
    grouped = workbench.predict_routed(adapters, assignment, "test", mixed=False)
    mixed = workbench.predict_routed(adapters, assignment, "test", mixed=True)
    assert mixed == grouped
    # the test can fail: the same prompts under one adapter read differently from the routed answers
    only_a = workbench.predict_routed(adapters, ["a"] * n, "test", mixed=False)
    assert only_a != grouped
    # mixed slots never become the adapter that training updates
    assert shared.model.active_adapter == "default"


def test_routed_assignment_length_is_checked(workbench):
    with pytest.raises(ValueError):
        workbench.predict_routed({"a": workbench.shared.initial_adapter}, ["a"], "test")


def test_stream_state_lets_a_rebuilt_client_continue_exactly(workbench):
    shared = workbench.shared
    tests = workbench.splits["test"][0]
    data = ClientData(1, list(synthetic.TASKS), train=tests, test=tests[:2])
    first = ClientWorkbench(shared, data, general_test=tests[:2], seed=4)
    first.train(shared.initial_adapter, 0, steps=2)
    first.train(shared.initial_adapter, 0, steps=1, subset=("local1", [0, 2, 4, 6, 8]))
    state = first.stream_state()
    torch.manual_seed(11)  # whatever the process's global generator holds must not matter
    expected_main, _ = first.train(shared.initial_adapter, 1, steps=3)
    expected_sub, _ = first.train(shared.initial_adapter, 1, steps=2, subset=("local1", [0, 2, 4, 6, 8]))
    after = torch.rand(1)
    rebuilt = ClientWorkbench(shared, data, general_test=tests[:2], seed=4)
    rebuilt.load_stream_state(state)
    torch.manual_seed(999)
    main, _ = rebuilt.train(shared.initial_adapter, 1, steps=3)
    sub, _ = rebuilt.train(shared.initial_adapter, 1, steps=2, subset=("local1", [0, 2, 4, 6, 8]))
    assert all(torch.equal(main[k], expected_main[k]) for k in main)
    assert all(torch.equal(sub[k], expected_sub[k]) for k in sub)
    # training leaves the global generator where it was (dropout draws from a forked, seeded one)
    torch.manual_seed(11)
    assert torch.equal(torch.rand(1), after)
    fresh = ClientWorkbench(shared, data, general_test=tests[:2], seed=4)  # without the state: other batches
    torch.manual_seed(11)
    other, _ = fresh.train(shared.initial_adapter, 1, steps=3)
    assert any(not torch.equal(other[k], expected_main[k]) for k in other)


def test_a_subset_of_every_example_draws_the_clients_own_batches(workbench):
    # Why: a client with one local cluster (FedRouter on a single-task client) should train on exactly the
    # batches a Local client draws, so that comparing the two measures the averaging, not batch-order luck.
    shared = workbench.shared
    tests = workbench.splits["test"][0]
    data = ClientData(2, list(synthetic.TASKS), train=tests, test=tests[:2])

    def fresh():
        return ClientWorkbench(shared, data, general_test=tests[:2], seed=3)

    everything = list(range(len(tests)))
    plain, _ = fresh().train(shared.initial_adapter, 0, steps=2)
    whole, _ = fresh().train(shared.initial_adapter, 0, steps=2, subset=("local0", everything[::-1]))
    part, _ = fresh().train(shared.initial_adapter, 0, steps=2, subset=("local0", everything[:-1]))
    assert all(torch.equal(whole[k], plain[k]) for k in plain)
    assert any(not torch.equal(part[k], plain[k]) for k in plain)
