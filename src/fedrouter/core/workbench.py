"""One frozen base model with one LoRA slot, shared by every client that lives in this process.

Clients differ only in the adapter weights loaded into the slot and in their data, so 8 or 64 simulated
clients cost one base model of memory. `ClientWorkbench` is a client's view: its encoded data, its own
seeded batch stream, and train/evaluate calls that take adapter weights in and give adapter weights back.
Nothing here knows about federation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from fedrouter.core.data import ClientData
from fedrouter.core.generate import generate
from fedrouter.core.metrics import score_predictions
from fedrouter.core.model import LoraSettings, adapter_parameters, attach_lora, get_adapter_state, set_adapter_state
from fedrouter.core.train import TrainStats, batch_stream, encode_examples, round_lr, train_steps

Adapter = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TrainSettings:
    local_steps: int = 10
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    total_rounds: int = 25
    max_seq_len: int = 128
    max_new_tokens: int = 24
    eval_batch_size: int = 64
    prompt_template: str = "{instruction}\nanswer :"


class SharedModel:
    """The base model wrapped by peft with a single adapter slot, plus what every client needs of it."""

    def __init__(self, base_model, tokenizer, lora: LoraSettings, settings: TrainSettings, seed: int = 0):
        torch.manual_seed(seed)  # LoRA A's initialisation: the run's initial adapter
        self.model = attach_lora(base_model, lora)
        self.tokenizer = tokenizer
        self.settings = settings
        self.initial_adapter: Adapter = get_adapter_state(self.model)
        # Greedy decoding is deterministic: the same prompts under the same adapter (e.g. every client on
        # the shared all-task set, routed to the same cluster adapters) are generated once.
        self._memo: dict[tuple[str, str], list[str]] = {}

    def encode(self, examples: list[dict]):
        s = self.settings
        return encode_examples(self.tokenizer, examples, s.prompt_template, s.max_seq_len)

    def load(self, adapter: Adapter) -> None:
        set_adapter_state(self.model, adapter)

    def live_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trainable LoRA parameters of the default slot, keyed like adapter state dicts."""
        return adapter_parameters(self.model)

    def predict_mixed(self, encoded: list, adapters: dict[str, Adapter], assignment: list[str]) -> list[str]:
        """Greedy answers where row i uses adapters[assignment[i]], all rows in the same generate calls.

        The adapters are copied into extra peft adapter slots ("mix0", "mix1", ...; created once, never
        trained) and peft's `adapter_names` picks one per row.
        """
        slots = {}
        for i, (name, adapter) in enumerate(sorted(adapters.items())):
            slot = f"mix{i}"
            if slot not in self.model.peft_config:
                self.model.add_adapter(slot, self.model.peft_config["default"])
                self.model.set_adapter("default")  # keep training on the default slot
            set_adapter_state(self.model, adapter, adapter_name=slot)
            slots[name] = slot
        s = self.settings
        prompts = [e.prompt_ids for e in encoded]
        return generate(self.model, self.tokenizer, prompts, s.max_new_tokens, s.eval_batch_size,
                        adapter_names=[slots[name] for name in assignment])

    def adapter(self) -> Adapter:
        return get_adapter_state(self.model)

    def predict(self, encoded: list, adapter: Adapter | None) -> list[str]:
        """Greedy answers for encoded examples under `adapter`; None means the untrained base."""
        prompts = [e.prompt_ids for e in encoded]
        key = (prompts_fingerprint(prompts), adapter_fingerprint(adapter))
        if key not in self._memo:
            if len(self._memo) > 256:
                self._memo.clear()
            s = self.settings
            if adapter is None:
                with self.model.disable_adapter():
                    out = generate(self.model, self.tokenizer, prompts, s.max_new_tokens, s.eval_batch_size)
            else:
                self.load(adapter)
                out = generate(self.model, self.tokenizer, prompts, s.max_new_tokens, s.eval_batch_size)
            self._memo[key] = out
        return list(self._memo[key])


def prompts_fingerprint(prompts: list[list[int]]) -> str:
    """A digest of a list of token-id prompts (order included)."""
    digest = hashlib.sha1()
    for ids in prompts:
        digest.update(len(ids).to_bytes(4, "little"))
        digest.update(torch.tensor(ids, dtype=torch.int32).numpy().tobytes())
    return digest.hexdigest()


def adapter_fingerprint(adapter: Adapter | None) -> str:
    """A digest of an adapter's exact weights ("base" for no adapter)."""
    if adapter is None:
        return "base"
    digest = hashlib.sha1()
    for name in sorted(adapter):
        digest.update(name.encode())
        digest.update(adapter[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class ClientWorkbench:
    """A client's data (encoded once) and its train/evaluate calls on the shared model."""

    def __init__(self, shared: SharedModel, data: ClientData, general_test: list[dict], seed: int, general_encoded=None):
        self.shared = shared
        self.client_id = data.client_id
        self.tasks = data.tasks
        self.train_data = data.train
        self.train_examples = shared.encode(data.train)
        self.splits = {"test": (data.test, shared.encode(data.test))}
        self.splits["general"] = (general_test, general_encoded if general_encoded is not None else shared.encode(general_test))
        # The client's own batch order: seeded per client, continued across rounds (epochs, not restarts).
        self._generator = torch.Generator().manual_seed(seed * 100_003 + data.client_id)
        self._stream = batch_stream(self.train_examples, shared.settings.batch_size, shared.tokenizer.pad_token_id, self._generator)
        self._subset_streams: dict = {}  # name -> batch stream over a subset (e.g. one local cluster)
        self.seed = seed

    @property
    def n_train(self) -> int:
        return len(self.train_examples)

    def train(self, adapter: Adapter, round_idx: int, steps: int | None = None, regularizer=None,
              subset: tuple[str, list[int]] | None = None, trainable: str | None = None) -> tuple[Adapter, TrainStats]:
        """Start from `adapter`, run the round's local steps at the round's learning rate, return the result.

        `subset` = (name, example indices) trains on those examples only, from a stream of their own that
        continues across rounds (FedRouter trains one local cluster at a time). `trainable` = "lora_A" or
        "lora_B" updates only those matrices (FFA-LoRA freezes A); the others stay exactly as given.
        `regularizer(live)` gets the live adapter parameters by name and returns a loss term (FedProx).
        """
        s = self.shared.settings
        self.shared.load(adapter)
        lr = round_lr(s.lr, round_idx, s.total_rounds, s.min_lr_ratio)
        stream = self._stream if subset is None else self._subset_stream(*subset)
        live = self.shared.live_parameters()
        params = [p for k, p in live.items() if trainable is None or f".{trainable}." in k]
        stats = train_steps(
            self.shared.model, params, stream, steps or s.local_steps, lr, s.weight_decay,
            regularizer=(lambda: regularizer(live)) if regularizer else None,
        )
        for p in live.values():  # frozen-by-choice matrices collected gradients the optimizer never cleared
            p.grad = None
        return self.shared.adapter(), stats

    def _subset_stream(self, name: str, indices: list[int]):
        if name not in self._subset_streams:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.client_id * 1_009 + len(self._subset_streams) + 1)
            examples = [self.train_examples[i] for i in indices]
            self._subset_streams[name] = batch_stream(examples, self.shared.settings.batch_size, self.shared.tokenizer.pad_token_id, generator)
        return self._subset_streams[name]

    def evaluate(self, adapter: Adapter | None, split: str = "test") -> dict:
        """Per-task ROUGE/exact-match report on `split` ("test": own tasks; "general": every task)."""
        examples, encoded = self.splits[split]
        return _score(examples, self.shared.predict(encoded, adapter))

    def predict_routed(self, adapters: dict[str, Adapter], assignment: list[str], split: str = "test",
                       mixed: bool = False) -> list[str]:
        """Example i of `split` answered by adapters[assignment[i]] (a router's choice).

        Grouped (default): the examples routed to one adapter are generated together, adapter by adapter.
        Mixed: every example in the same generate calls, one adapter per row (peft's adapter_names).
        """
        _, encoded = self.splits[split]
        if len(assignment) != len(encoded):
            raise ValueError("the assignment must name one adapter per example")
        if mixed:
            return self.shared.predict_mixed(encoded, adapters, assignment)
        predictions = [""] * len(encoded)
        for name in sorted(set(assignment)):
            rows = [i for i, a in enumerate(assignment) if a == name]
            for i, text in zip(rows, self.shared.predict([encoded[i] for i in rows], adapters[name])):
                predictions[i] = text
        return predictions

    def evaluate_routed(self, adapters: dict[str, Adapter], assignment: list[str], split: str = "test",
                        mixed: bool = False) -> dict:
        """Like `evaluate`, with each example answered by the adapter the router assigned it."""
        examples, _ = self.splits[split]
        return _score(examples, self.predict_routed(adapters, assignment, split, mixed))


def _score(examples: list[dict], predictions: list[str]) -> dict:
    return score_predictions(predictions, [e["output"] for e in examples], [e["task"] for e in examples])
