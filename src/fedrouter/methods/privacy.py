"""Client-level differential privacy around a method's parts, as Flower's DP strategies wrap a strategy.

`CentralPrivacy` wraps the server part (the server is trusted): it clips each accepted upload's change from
what its client was sent to L2 norm `clip`, and hands the method, for the duration of its `aggregate_fit`,
the DP-FedAvg mean in place of its example-weighted one (`core.privacy.DPAverage`: unweighted, Gaussian
noise of std `noise_multiplier * clip / n`, from a generator a checkpoint keeps). `LocalPrivacy` wraps the
client part (nobody is trusted): each client clips and noises its own update before it leaves.

Which methods may be wrapped is what they declare (`MethodFacts.folds_by_mean`; the config refuses the
others before any work). A method that declares it but folds its uploads some other way than
`ServerPart.average` would publish them unnoised: the wrapper stops the run at the first such round.
Everything else of the wrapped part is the part's own (attribute access goes through to it).
"""

from __future__ import annotations

from fedrouter.core.aggregate import change, update_norm
from fedrouter.core.privacy import DPAverage, client_generator, clip_upload, privatize_upload
from fedrouter.errors import FedrouterError
from fedrouter.methods.base import ClientContext, ClientPart, Message, ServerPart, folding

STATE_KEY = "dp_average"  # the DP mean's generator state in the server's checkpoint


class CentralPrivacy:
    """A server part whose uploads are clipped and whose means are DP-FedAvg's (see the module docstring)."""

    def __init__(self, inner: ServerPart, clip: float, noise_multiplier: float, seed: int):
        self.inner, self.clip = inner, clip
        self.mean = DPAverage(clip, noise_multiplier, seed)
        self._sent: dict[int, Message] = {}  # this round's messages: what each upload is a change of

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def configure_fit(self, round_idx: int, client_ids: list[int]) -> dict[int, Message]:
        self._sent = self.inner.configure_fit(round_idx, client_ids)
        return self._sent

    def aggregate_fit(self, round_idx: int, replies: dict[int, Message]) -> dict:
        clipped = 0
        for cid, reply in replies.items():
            reference = self.inner.upload_reference(cid, self._sent[cid])
            clipped += update_norm(change(reply.arrays, reference)) > self.clip
            reply.arrays = clip_upload(reply.arrays, reference, self.clip)
        calls = []

        def private_mean(states, weights=None):
            calls.append(len(states))
            return self.mean(states, weights)

        with folding(private_mean):
            metrics = self.inner.aggregate_fit(round_idx, replies)
        if not calls and any(reply.arrays for reply in replies.values()):
            raise FedrouterError(f"{type(self.inner).__module__}: its uploads were aggregated without ServerPart.average, "
                                 "so the DP mean never saw them; a method that declares folds_by_mean must fold with it")
        self._sent = {}
        return {**metrics, "clipped_updates": clipped}

    def state_dict(self) -> dict:
        return {**self.inner.state_dict(), STATE_KEY: self.mean.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.mean.load_state_dict(state.pop(STATE_KEY))
        self.inner.load_state_dict(state)


class LocalPrivacy:
    """A client part that clips its update to `clip` and adds N(0, (noise_multiplier * clip)^2) to every
    coordinate before the reply leaves it (the noise seeded by run, client and round: the same draws on
    every engine and after a resume)."""

    def __init__(self, inner: ClientPart, clip: float, noise_multiplier: float, seed: int):
        self.inner, self.clip, self.noise_multiplier, self.seed = inner, clip, noise_multiplier, seed

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def fit(self, msg: Message, ctx: ClientContext) -> Message:
        reply = self.inner.fit(msg, ctx)
        if not reply.arrays or "failed" in reply.config:
            return reply
        noisy = privatize_upload(reply.arrays, self.inner.upload_reference(msg), self.clip, self.noise_multiplier,
                                 client_generator(self.seed, ctx.client_id, msg.config.get("round", 0)))
        return Message(noisy, reply.config)


def private_parts(server: ServerPart | None, client: ClientPart | None, privacy, seed: int):
    """(server, client) wrapped as `privacy` (the config's [privacy] section) says: central DP wraps the
    server part, local DP the client part; either may be None (a process that holds one part only)."""
    if privacy.mode == "central" and server is not None:
        server = CentralPrivacy(server, privacy.clip, privacy.noise_multiplier, seed)
    if privacy.mode == "local" and client is not None:
        client = LocalPrivacy(client, privacy.clip, privacy.noise_multiplier, seed)
    return server, client
