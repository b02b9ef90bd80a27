"""Steps several methods share, written once: the usual training reply and round metrics, packing several
adapters into one message, a client's rank, sending the run's initial adapter once, numbered base updates every
client merges once (FLoRA, FedEx-LoRA), and the client of the methods that send only part of the adapter
(FedSA-LoRA, FFA-LoRA), and checks of what a client's reply carries."""

from __future__ import annotations

import numpy as np
import torch

from fedrouter.core import lowrank
from fedrouter.errors import FedrouterError
from fedrouter.methods.base import Adapter, ClientContext, ClientPart, Message, MethodSetup


def lora_matrices(adapter: Adapter, kind: str, exclude: bool = False) -> Adapter:
    """The adapter's `kind` ("lora_A" or "lora_B") matrices, or with exclude=True all the others."""
    marker = f".{kind}."
    return {k: v for k, v in adapter.items() if (marker in k) != exclude}


def client_rank(setup: MethodSetup, client_id: int) -> int | None:
    """The rank `lora.client_ranks` gives this client (cycled over the client ids); None: the run's `lora.r`."""
    ranks = setup.client_ranks
    return None if not ranks else ranks[client_id % len(ranks)]


def fit_reply(adapter: Adapter | None, stats, n_examples: int) -> Message:
    """The usual reply of a training client: its adapter (if uploaded) and how it trained."""
    return Message(
        arrays=adapter or {},
        config={"n_examples": n_examples, "loss": stats.loss, "tokens": stats.tokens, "train_s": stats.seconds},
    )


def mean_fit_metrics(replies: dict[int, Message]) -> dict[str, float]:
    """Example-weighted training loss and summed tokens over a round's replies."""
    n = sum(r.config["n_examples"] for r in replies.values())
    return {
        "train_loss": sum(r.config["loss"] * r.config["n_examples"] for r in replies.values()) / max(1, n),
        "tokens": sum(r.config["tokens"] for r in replies.values()),
        "clients": len(replies),
    }


def require(ok: bool, method: str, problem: str) -> None:
    """One clear error for an option value the method cannot use."""
    if not ok:
        raise FedrouterError(f"{method}: {problem}")


def pack_under(prefix: str, adapter: Adapter) -> dict[str, torch.Tensor]:
    """An adapter's tensors under "<prefix>/<name>", so several can share one message."""
    return {f"{prefix}/{name}": t for name, t in adapter.items()}


def unpack_under(arrays: dict[str, torch.Tensor], prefix: str) -> Adapter:
    """The adapter `pack_under(prefix, ...)` put into `arrays`."""
    cut = len(prefix) + 1
    return {key[cut:]: t for key, t in arrays.items() if key.startswith(prefix + "/")}


def pack(adapters: dict[int, Adapter]) -> dict[str, torch.Tensor]:
    """Several numbered adapters in one message's arrays: adapter k under prefix "k"."""
    return {key: t for k, a in adapters.items() for key, t in pack_under(str(k), a).items()}


def unpack(arrays: dict[str, torch.Tensor]) -> dict[int, Adapter]:
    """The inverse of `pack`."""
    numbers = sorted({int(key.split("/", 1)[0]) for key in arrays})
    return {k: unpack_under(arrays, str(k)) for k in numbers}


class InitialOnce:
    """The server side of "every client starts from the run's initial adapter, sent once": the arrays for
    a client's message are the initial adapter the first time it is selected, nothing afterwards (Local,
    FedLEASE's warm-up). Its client side is `own_adapter`."""

    def __init__(self, initial_adapter: Adapter):
        self.initial_adapter = initial_adapter
        self.started: set[int] = set()

    def arrays_for(self, client_id: int) -> dict:
        arrays = {} if client_id in self.started else dict(self.initial_adapter)
        self.started.add(client_id)
        return arrays

    def state_dict(self) -> dict:
        return {"started": set(self.started)}

    def load_state_dict(self, state: dict) -> None:
        self.started = set(state["started"])


def own_adapter(ctx: ClientContext, key: str, msg: Message) -> Adapter:
    """The adapter a client continues from: its own (in state[key]), else the initial one the server sent
    once -- or, for a client that failed the round it came in, the same initialisation it holds anyway."""
    return ctx.state.get(key) or msg.arrays or ctx.workbench.initial_adapter()


def merge_into(update: dict[str, torch.Tensor], items: dict[int, Adapter]) -> dict[str, torch.Tensor]:
    """A new dense update: `update` plus each item's B @ A (its scaling already folded into A), in number
    order -- one order everywhere, so a client's merged base and the server's sum agree bit for bit."""
    return lowrank.add_updates(update, *(lowrank.dense_update(item, 1.0) for _, item in sorted(items.items())))


class CatchUp:
    """The server side of "every client adds every numbered item (FLoRA's stacked modules, FedEx-LoRA's
    residuals) to its frozen base, each exactly once", with clients sampled and failing.

    A client's message carries every item it has not been sent yet (all of them for a client new to the
    run). What went out in a training message that did not come back accepted (the client failed or timed
    out, its update was rejected, its round skipped) may never have been merged, so it is sent again: marked
    sent only when the message is built, it would otherwise never come again and that client's base would
    drift from the others' for the rest of the run. Items are numbered, so a client that did merge them
    skips them (`merge_new`). Evaluation messages need no confirmation: an engine stops the run when one
    fails. Plain data (`state_dict`): a checkpoint holds it."""

    def __init__(self):
        self.items: dict[int, Adapter] = {}  # number (0, 1, ...) -> item
        self.sent: dict[int, int] = {}       # client -> items sent to it (the numbers below this)
        self.pending: dict[int, int] = {}    # client -> its `sent` before the current training message

    def add(self, item: Adapter) -> None:
        self.items[len(self.items)] = item

    def for_training(self, client_ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        """Each selected client's unsent items (packed); each stays unconfirmed until `confirm`."""
        self._resend_unconfirmed()
        self.pending = {cid: self.sent.get(cid, 0) for cid in client_ids}
        return {cid: self._unsent(cid) for cid in client_ids}

    def confirm(self, client_ids) -> None:
        """These clients' training replies were accepted: they merged what they were sent."""
        for cid in client_ids:
            self.pending.pop(cid, None)

    def for_evaluation(self, client_ids: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        self._resend_unconfirmed()
        return {cid: self._unsent(cid) for cid in client_ids}

    def merged(self) -> dict[str, torch.Tensor]:
        """What every client's base has absorbed once it is caught up: all items, as one dense update."""
        return merge_into({}, self.items)

    def _unsent(self, cid: int) -> dict[str, torch.Tensor]:
        start = self.sent.get(cid, 0)
        self.sent[cid] = len(self.items)
        return pack({t: item for t, item in self.items.items() if t >= start})

    def _resend_unconfirmed(self) -> None:
        for cid, before in self.pending.items():
            self.sent[cid] = min(self.sent.get(cid, 0), before)
        self.pending = {}

    def state_dict(self) -> dict:
        return {"items": dict(self.items), "sent": dict(self.sent), "pending": dict(self.pending)}

    def load_state_dict(self, state: dict) -> None:
        self.items, self.sent, self.pending = dict(state["items"]), dict(state["sent"]), dict(state["pending"])


def merge_new(ctx: ClientContext, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The client side of `CatchUp`: this client's base update (ctx.state["merged"]) after adding the items
    in `arrays` it has not merged yet (a resent one it merged before is skipped); None while there is none."""
    have = ctx.state.get("merged_count", 0)
    new = {t: item for t, item in unpack(arrays).items() if t >= have}
    if new:  # a new dict, never one edited in place: the workbench recognises an unchanged update by identity
        ctx.state["merged"] = merge_into(ctx.state.get("merged", {}), new)
        ctx.state["merged_count"] = max(new) + 1
    return ctx.state.get("merged") or None


class PartialAdapterClient(ClientPart):
    """A client that exchanges only the `TRAVELS` matrices ("lora_A" or "lora_B") of its adapter.

    The rest is either the client's own, trained and kept private (`REST_IS_PRIVATE`, FedSA-LoRA's B), or
    the run's shared initialisation, frozen (FFA-LoRA's A): then only the travelling part is trained."""

    TRAVELS = "lora_A"
    REST_IS_PRIVATE = True

    @property
    def _private_key(self) -> str:
        return "B" if self.TRAVELS == "lora_A" else "A"  # what the client keeps: the other matrices

    def _adapter(self, travelling: Adapter, ctx: ClientContext) -> Adapter:
        rest = ctx.state.get(self._private_key) if self.REST_IS_PRIVATE else None
        rest = rest or lora_matrices(ctx.workbench.initial_adapter(), self.TRAVELS, exclude=True)
        return {**travelling, **rest} if self.REST_IS_PRIVATE else {**rest, **travelling}

    def fit(self, msg, ctx):
        trainable = None if self.REST_IS_PRIVATE else self.TRAVELS
        adapter, stats = ctx.workbench.train(self._adapter(msg.arrays, ctx), msg.config["round"], trainable=trainable)
        if self.REST_IS_PRIVATE:
            ctx.state[self._private_key] = lora_matrices(adapter, self.TRAVELS, exclude=True)
        return fit_reply(lora_matrices(adapter, self.TRAVELS), stats, ctx.workbench.n_train)

    def eval_adapter(self, msg, ctx):
        return self._adapter(msg.arrays, ctx)


def counts_from(reply: Message, key: str, n: int, cid: int) -> np.ndarray:
    """A client's `n` example counts under `key` in its reply, checked (non-negative integers, not all
    zero): a reply is input to check, not trust."""
    value = reply.config.get(key)
    if not (isinstance(value, list) and len(value) == n
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value) and sum(value) > 0):
        raise FedrouterError(f"client {cid} sent {key} {value!r}: not {n} example counts")
    return np.asarray(value, dtype=np.int64)


def finite_array(value, shape: tuple, what: str) -> np.ndarray:
    """A tensor from a peer as a float64 array of `shape` (None: any size there) with finite values, or one line."""
    ok = isinstance(value, torch.Tensor) and value.ndim == len(shape) and bool(torch.isfinite(value).all())
    if not ok or any(want is not None and got != want for got, want in zip(value.shape, shape)):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise FedrouterError(f"{what} is {got}, not a finite {tuple('n' if s is None else s for s in shape)} array")
    return value.double().numpy()
