"""One frozen base model with one LoRA slot, shared by every client that lives in this process.

Clients differ only in the adapter weights loaded into the slot and in their data, so 8 or 64 simulated
clients cost one base model of memory. `ClientWorkbench` is a client's view -- the `Workbench` a method
sees (`fedrouter.methods.base`): its data, its own seeded batch stream, and train / evaluate / embed calls
that take adapter weights in and give adapter weights back; the peft model stays behind it. Nothing here
knows about federation.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from fedrouter.core.data import ClientData
from fedrouter.core.embed import BaseModelEmbedder, embed_cached, resolve_embedder
from fedrouter.core.gated_mix import GatedMix
from fedrouter.core.generate import generate
from fedrouter.core.metrics import score_predictions
from fedrouter.core.model import (LoraSettings, adapter_parameters, add_update, attach_lora, base_fingerprint,
                                   default_cache_dir, get_adapter_state, lora_base_weight, set_adapter_state)
from fedrouter.core.train import TrainStats, batch_stream, collate, encode_examples, round_lr, train_steps

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
    grad_accum_steps: int = 1


class SharedModel:
    """The base model wrapped by peft with a single adapter slot, plus what every client needs of it."""

    def __init__(self, base_model, tokenizer, lora: LoraSettings, train_settings: TrainSettings, seed: int = 0,
                 cache_dir=None):
        # taken before anything touches the base (FLoRA and FedDPA add to its weights later): what a run
        # records so that `predict` and `serve` can tell the base they load is the one its adapters fit
        self.base_fingerprint = base_fingerprint(base_model, tokenizer)
        torch.manual_seed(seed)  # LoRA A's initialisation: the run's initial adapter
        self.model = attach_lora(base_model, lora)
        self.tokenizer = tokenizer
        self.train_settings = train_settings
        self.lora = lora
        self.seed = seed
        self.cache_dir = cache_dir  # where embeddings are cached (None: the default cache)
        self._embedders: dict[str, object] = {}  # by spec: loaded once per process
        self.initial_adapter: Adapter = get_adapter_state(self.model)
        self._initial_by_slot: dict[str, Adapter] = {"default": self.initial_adapter}
        # A frozen dense update added to the base weights (FLoRA's merged rounds, FedDPA's partner adapter):
        # the original weights of the modules it touches, and a digest of the update now applied.
        self._base_originals: dict[str, torch.Tensor] = {}
        self._base_delta_key = "none"
        self._base_delta_obj = None  # the dict last applied: the same object again needs no hashing
        # Greedy decoding is deterministic: the same prompts under the same adapter (e.g. every client on
        # the shared all-task set, routed to the same cluster adapters) are generated once.
        self._memo: dict[tuple[str, str, str], list[str]] = {}

    def encode(self, examples: list[dict]):
        train = self.train_settings
        return encode_examples(self.tokenizer, examples, train.prompt_template, train.max_seq_len)

    def load(self, adapter: Adapter, slot: str = "default") -> None:
        set_adapter_state(self.model, adapter, adapter_name=slot)

    def live_parameters(self, slot: str = "default") -> dict[str, torch.nn.Parameter]:
        """The trainable LoRA parameters of a slot, keyed like adapter state dicts."""
        return adapter_parameters(self.model, slot)

    def slot_for_rank(self, r: int) -> str:
        """The adapter slot of LoRA rank `r` ("default" for the configured rank; others made on first use,
        with the configured alpha and a seeded initialisation, available from `initial_adapter_of`)."""
        if r == self.lora.r:
            return "default"
        slot = f"rank{r}"
        if slot not in self.model.peft_config:
            config = self.model.peft_config["default"]
            with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the run's generator alone
                torch.manual_seed(self.seed * 1_000 + r)
                self.model.add_adapter(slot, type(config)(**{**config.to_dict(), "r": r, "peft_type": config.peft_type}))
            self.model.set_adapter("default")  # training stays on the default slot unless asked
            self._initial_by_slot[slot] = get_adapter_state(self.model, slot)
        return slot

    def initial_adapter_of(self, slot: str) -> Adapter:
        return self._initial_by_slot[slot]

    def scaling(self, r: int) -> float:
        """LoRA's alpha / r for a slot of rank r."""
        return self.lora.alpha / r

    def slot_of(self, adapter: Adapter) -> str:
        """The slot an adapter's rank belongs in (its A matrices' rows)."""
        rank = next((t.shape[0] for name, t in adapter.items() if ".lora_A." in name), self.lora.r)
        return self.slot_for_rank(int(rank))

    def embedder(self, spec: str):
        """The embedder `spec` names ("base", "minilm", an encoder id or path), loaded once."""
        if spec not in self._embedders:
            self._embedders[spec] = resolve_embedder(spec, self.model, self.tokenizer)
        return self._embedders[spec]

    def embed(self, texts: list[str], spec: str = "base", adapter: Adapter | None = None):
        """Embeddings of `texts` (n, d): frozen and cached on disk by `spec`; or, with `adapter`, the base
        model's mean-pooled last hidden state with that adapter active (not cached: it depends on it)."""
        if adapter is None:
            return embed_cached(self.embedder(spec), texts, self.cache_dir or default_cache_dir())
        self.use_base_delta(None)
        self.load(adapter)
        return BaseModelEmbedder(self.model, self.tokenizer, with_adapter=True).embed(texts)

    def use_base_delta(self, delta: dict[str, torch.Tensor] | None) -> None:
        """Make the base weights original + delta[module] (None: the original base). Cheap when unchanged.

        Callers build a new dict for a new update (never edit one in place after passing it): the same
        object passed again is recognised without hashing its dense matrices."""
        if delta is not None and delta is self._base_delta_obj:
            return
        key = "none" if not delta else adapter_fingerprint(delta)
        if key == self._base_delta_key:
            self._base_delta_obj = delta
            return
        with torch.no_grad():
            for name, original in self._base_originals.items():
                lora_base_weight(self.model, name).copy_(original)
            for name, update in (delta or {}).items():
                weight = lora_base_weight(self.model, name)
                if name not in self._base_originals:
                    self._base_originals[name] = weight.detach().clone()
                if update.shape != weight.shape:
                    raise ValueError(f"base update for {name}: shape {tuple(update.shape)} != {tuple(weight.shape)}")
                add_update(weight, self._base_originals[name], update)  # from the kept original, not the last sum
        self._base_delta_key, self._base_delta_obj = key, delta

    def predict_mixed(self, encoded: list, adapters: dict[str, Adapter], assignment: list[str]) -> list[str]:
        """Greedy answers where row i uses adapters[assignment[i]], all rows in the same generate calls.

        The adapters are copied into extra peft adapter slots ("mix0", "mix1", ...; created once, never
        trained) and peft's `adapter_names` picks one per row.
        """
        slots = {}
        for i, (name, adapter) in enumerate(sorted(adapters.items())):
            slot = f"mix{i}"
            if slot not in self.model.peft_config:
                self._add_serving_slot(slot)
            set_adapter_state(self.model, adapter, adapter_name=slot)
            slots[name] = slot
        train = self.train_settings
        prompts = [e.prompt_ids for e in encoded]
        return generate(self.model, self.tokenizer, prompts, train.max_new_tokens, train.eval_batch_size,
                        adapter_names=[slots[name] for name in assignment])

    def predict_weighted(self, encoded: list, adapters: list[Adapter], weights: torch.Tensor) -> list[str]:
        """Greedy answers where row i's model is base + sum_j weights[i, j] * (adapter j's update).

        Each adapter sits in an extra slot ("w0", "w1", ...), all slots are active at once, and a forward
        hook on every lora_B scales each row's contribution by that row's weight, so the weighting is
        really applied per input, in every decoding step.
        """
        if weights.shape != (len(encoded), len(adapters)):
            raise ValueError(f"weights must be (examples, adapters) = ({len(encoded)}, {len(adapters)})")
        slots = []
        for j, adapter in enumerate(adapters):
            slot = f"w{j}"
            if slot not in self.model.peft_config:
                self._add_serving_slot(slot)
            set_adapter_state(self.model, adapter, adapter_name=slot)
            slots.append(slot)
        current: dict[str, torch.Tensor] = {}
        device = next(self.model.parameters()).device

        def on_batch(rows: list[int]) -> None:
            current["w"] = weights[rows].to(device, torch.float32)

        def scaler(j: int):
            return lambda module, inputs, output: output * current["w"][:, j].view(-1, *([1] * (output.dim() - 1)))

        hooks = [module.lora_B[slot].register_forward_hook(scaler(j))
                 for _, module in self.model.named_modules() if hasattr(module, "lora_B")
                 for j, slot in enumerate(slots) if slot in module.lora_B]
        try:
            self.model.base_model.set_adapter(slots)
            train = self.train_settings
            return generate(self.model, self.tokenizer, [e.prompt_ids for e in encoded], train.max_new_tokens,
                            train.eval_batch_size, on_batch=on_batch)
        finally:
            for hook in hooks:
                hook.remove()
            self.model.set_adapter("default")

    def _add_serving_slot(self, slot: str) -> None:
        """An extra slot that only ever holds copied weights: its random init must not draw from the run's
        generator (that would shift every later dropout mask, and a resumed run would differ)."""
        with torch.random.fork_rng(devices=[]):
            self.model.add_adapter(slot, self.model.peft_config["default"])
        self.model.set_adapter("default")  # keep training on the default slot

    def adapter(self, slot: str = "default") -> Adapter:
        return get_adapter_state(self.model, slot)

    def predict(self, encoded: list, adapter: Adapter | None, mixer: GatedMix | None = None) -> list[str]:
        """Greedy answers for encoded examples under `adapter`; None means the base (plus any base delta).
        With `mixer`, the adapter mixed with its frozen partner by its gate (`core.gated_mix`)."""
        prompts = [e.prompt_ids for e in encoded]
        key = (prompts_fingerprint(prompts), adapter_fingerprint(adapter), self._base_delta_key,
               adapter_fingerprint(mixer.state()) if mixer else "")
        if key not in self._memo:
            if len(self._memo) > 256:
                self._memo.clear()
            train = self.train_settings
            if adapter is None:
                with self.model.disable_adapter():
                    out = generate(self.model, self.tokenizer, prompts, train.max_new_tokens, train.eval_batch_size)
            else:
                self.load(adapter)
                with mixer.attached(self.model) if mixer else nullcontext():
                    out = generate(self.model, self.tokenizer, prompts, train.max_new_tokens, train.eval_batch_size)
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
        self._stream = batch_stream(self.train_examples, shared.train_settings.batch_size, shared.tokenizer.pad_token_id, self._generator)
        self._subset_streams: dict = {}  # name -> batch stream over a subset (e.g. one local cluster)
        self.seed = seed
        # Training calls so far: with the client and the seed it seeds each call's LoRA dropout, so the
        # masks depend on this client alone -- not on which clients trained before it in the process
        # (in-process), nor on which process the client lands in (Flower).
        self._train_calls = 0

    @property
    def n_train(self) -> int:
        return len(self.train_examples)

    def examples(self, split: str) -> list[dict]:
        """The client's examples of a split: "train", "test" (its own tasks) or "general" (every task)."""
        return self.train_data if split == "train" else self.splits[split][0]

    def initial_adapter(self, rank: int | None = None) -> Adapter:
        """The run's shared initial adapter (every client derives the same), or that of another LoRA rank."""
        if rank is None or rank == self.shared.lora.r:
            return self.shared.initial_adapter
        return self.shared.initial_adapter_of(self.shared.slot_for_rank(rank))

    def lora_rank(self) -> int:
        return self.shared.lora.r

    def lora_scaling(self, rank: int | None = None) -> float:
        return self.shared.scaling(rank or self.shared.lora.r)

    def embed(self, texts: list[str], embedder: str = "base", *, adapter: Adapter | None = None):
        return self.shared.embed(texts, embedder, adapter)

    def train(self, adapter: Adapter, round_idx: int, steps: int | None = None, *, penalty=None,
              subset: tuple[str, list[int]] | None = None, trainable: str | None = None,
              base_update: dict | None = None, mixer: GatedMix | None = None) -> tuple[Adapter, TrainStats]:
        """Start from `adapter`, run the round's local steps at the round's learning rate, return the result.

        `subset` = (name, example indices) trains on those examples only, from a stream of their own that
        continues across rounds (FedRouter trains one local cluster at a time); a subset of every training
        example is the client's own stream, so one local cluster draws exactly the batches Local would. `trainable` = "lora_A" or
        "lora_B" updates only those matrices (FFA-LoRA freezes A); the others stay exactly as given.
        `penalty(live)` gets the live adapter parameters by name and returns a loss term (FedProx).
        `base_update` ({module: dense update}) is added to the frozen base first (FLoRA's merged rounds,
        FedDPA's frozen partner adapter). An adapter of another LoRA rank trains in a slot of that rank.
        `mixer` mixes the adapter with a frozen partner adapter token by token (`core.gated_mix`), its
        gate trained alongside unless it is held (`mixer.gate` is then the trained one afterwards).
        """
        train = self.shared.train_settings
        slot = self.shared.slot_of(adapter)
        self.shared.use_base_delta(base_update)
        self.shared.load(adapter, slot)
        lr = round_lr(train.lr, round_idx, train.total_rounds, train.min_lr_ratio)
        whole = subset is None or sorted(subset[1]) == list(range(self.n_train))
        stream = self._stream if whole else self._subset_stream(*subset)
        live = self.shared.live_parameters(slot)
        params = [p for k, p in live.items() if trainable is None or f".{trainable}." in k]
        self.shared.model.set_adapter(slot)
        self._train_calls += 1
        mixing = mixer.attached(self.shared.model, slot) if mixer else nullcontext([])
        try:
            with torch.random.fork_rng(devices=[]), mixing as gate:
                torch.manual_seed(self.seed * 1_000_003 + self.client_id * 10_007 + self._train_calls)
                stats = train_steps(
                    self.shared.model, params + gate, stream, steps or train.local_steps, lr, train.weight_decay,
                    regularizer=(lambda: penalty(live)) if penalty else None, grad_accum_steps=train.grad_accum_steps,
                )
        finally:
            self.shared.model.set_adapter("default")
        for p in live.values():  # frozen-by-choice matrices collected gradients the optimizer never cleared
            p.grad = None
        return self.shared.adapter(slot), stats

    @torch.no_grad()
    def loss(self, adapter: Adapter, n_examples: int = 32) -> float:
        """Mean per-token training loss of `adapter` on this client's first n training examples (IFCA's
        cluster choice): the same examples every call, so losses of different adapters compare."""
        self.shared.use_base_delta(None)
        self.shared.load(adapter)
        model, examples = self.shared.model, self.train_examples[:n_examples]
        model.eval()
        total, tokens = 0.0, 0
        device = next(model.parameters()).device
        for start in range(0, len(examples), self.shared.train_settings.batch_size):
            batch = collate(examples[start : start + self.shared.train_settings.batch_size], self.shared.tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())  # tokens the causal LM loss averages over
            total += float(model(**batch).loss) * n
            tokens += n
        return total / max(1, tokens)

    def _subset_stream(self, name: str, indices: list[int]):
        if name not in self._subset_streams:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.client_id * 1_009 + len(self._subset_streams) + 1)
            examples = [self.train_examples[i] for i in indices]
            stream = batch_stream(examples, self.shared.train_settings.batch_size, self.shared.tokenizer.pad_token_id, generator)
            stream.indices = list(indices)
            self._subset_streams[name] = stream
        return self._subset_streams[name]

    def stream_state(self) -> dict:
        """Where this client's batch streams (and dropout seeds) stand, as plain data, so a client rebuilt
        in another process (Flower) or a resumed run draws exactly the batches and masks it would have."""
        return {"main": self._stream.state_dict(), "train_calls": self._train_calls,
                "subsets": [[name, st.indices, st.state_dict()] for name, st in self._subset_streams.items()]}

    def load_stream_state(self, state: dict) -> None:
        self._stream.load_state_dict(state["main"])
        self._train_calls = int(state["train_calls"])
        self._subset_streams = {}
        for name, indices, st in state["subsets"]:  # recreated in creation order: their seeds depend on it
            self._subset_stream(name, indices).load_state_dict(st)

    def evaluate(self, adapter: Adapter | None, split: str = "test", *, base_update: dict | None = None,
                 mixer: GatedMix | None = None) -> dict:
        """Per-task ROUGE/exact-match report on `split` ("test": own tasks; "general": every task).

        `base_update` evaluates on base + that dense update (FLoRA's merged model, with adapter None);
        `mixer`, with the adapter mixed with its frozen partner as in training (`core.gated_mix`)."""
        examples, encoded = self.splits[split]
        self.shared.use_base_delta(base_update)
        return _score(examples, self.shared.predict(encoded, adapter, mixer))

    def evaluate_weighted(self, adapters: list[Adapter], weights: torch.Tensor, split: str = "test") -> dict:
        """Like `evaluate`, with example i answered under sum_j weights[i, j] * adapter j (FedDPA)."""
        examples, encoded = self.splits[split]
        self.shared.use_base_delta(None)
        return _score(examples, self.shared.predict_weighted(encoded, adapters, weights))

    def predict_routed(self, adapters: dict[str, Adapter], assignment: list[str], split: str = "test",
                       mixed: bool = False) -> list[str]:
        """Example i of `split` answered by adapters[assignment[i]] (a router's choice).

        Grouped (default): the examples routed to one adapter are generated together, adapter by adapter.
        Mixed: every example in the same generate calls, one adapter per row (peft's adapter_names).
        """
        _, encoded = self.splits[split]
        if len(assignment) != len(encoded):
            raise ValueError("the assignment must name one adapter per example")
        self.shared.use_base_delta(None)
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
