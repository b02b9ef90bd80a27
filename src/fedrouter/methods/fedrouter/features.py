"""What a client clusters its training examples by: four unit-vector views of each, side by side,
[instruction | template | answer | form]. What tells tasks apart in real data is the ask and the layout
(the template) and the form of the answer more than what the text is about:
- instruction: the instruction's embedding -- also all the router sees of a new input;
- template: the embedding of the instruction with the words rare on this client (its content) masked:
  "_ . what is the topic of this conversation ?";
- answer: the answer's embedding;
- form: the answer's length, how much of it is copied from the instruction, how often it recurs (a label).
Only means of these leave a client (no text, word or n-gram list). `template_view`, the surface view the
client's template parts are cut by (local.py), never leaves it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer

from fedrouter.core.cluster import points
from fedrouter.errors import FedrouterError
from fedrouter.methods.fedrouter import thresholds

WORD = re.compile(r"\w+|[^\w\s]")  # a word or a punctuation mark: the template view keeps the layout
WORDS_ONLY = re.compile(r"\w+")  # the answer's form counts words
MASK = "_"
# the form's soft bins (an encoding, not a threshold): log2(1 + words) at 0..8, shares at 0, 1/4, ..., 1
LENGTH_BINS, LENGTH_WIDTH = np.arange(9.0), 0.75
SHARE_BINS, SHARE_WIDTH = np.linspace(0.0, 1.0, 5), 0.2


def template_texts(texts: list[str]) -> list[str]:
    """Each text with its words held by fewer than TEMPLATE_SHARE of `texts` masked (a run of them as one MASK)."""
    share = thresholds.TEMPLATE_SHARE
    tokens = [WORD.findall(t.lower()) for t in texts]
    held = Counter(w for ts in tokens for w in set(ts))
    keep = {w for w, n in held.items() if n >= share * len(texts)}
    out = []
    for ts in tokens:
        kept = [w if w in keep else MASK for w in ts]
        out.append(" ".join(w for i, w in enumerate(kept) if w != MASK or i == 0 or kept[i - 1] != MASK))
    return out


def edges(text: str) -> str:
    """The first and last EDGE_WORDS words of `text` (all of it when shorter): where a prompt puts its ask."""
    ws, n = text.split(), thresholds.EDGE_WORDS
    return text if len(ws) <= 2 * n else " ".join(ws[:n] + ["…"] + ws[-n:])


def template_view(texts: list[str], n_features: int = 1024) -> np.ndarray:
    """The instructions' `edges` as hashed word 1-3-grams held by at least TEMPLATE_SHARE of `texts` (template
    words, not content), L2-normalised (a text holding none: a zero row)."""
    hashed = HashingVectorizer(n_features=n_features, ngram_range=(1, 3), binary=True, norm=None, alternate_sign=False,
                               token_pattern=r"\S+").transform([edges(t) for t in texts]).toarray()
    hashed[:, (hashed > 0).mean(axis=0) < thresholds.TEMPLATE_SHARE] = 0
    return hashed / np.maximum(np.linalg.norm(hashed, axis=1, keepdims=True), 1e-12)


def soft_bins(values, centres: np.ndarray, width: float) -> np.ndarray:
    """(n, len(centres)) unit rows: a Gaussian kernel of each value against the bin centres."""
    w = np.exp(-0.5 * ((np.asarray(values, dtype=np.float64)[:, None] - centres[None, :]) / width) ** 2)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def answer_form(instructions: list[str], answers: list[str]) -> np.ndarray:
    """(n, 19) unit rows: the answers' length (log2 of 1 + words), the share of their words found in their
    instruction (a rewrite copies, a label does not), how often each recurs here (log count / log n)."""
    recur = Counter(a.strip().lower() for a in answers)
    length, copied, label = [], [], []
    for instruction, answer in zip(instructions, answers):
        said, source = WORDS_ONLY.findall(answer.lower()), set(WORDS_ONLY.findall(instruction.lower()))
        length.append(np.log2(1 + len(said)))
        copied.append(np.mean([w in source for w in said]) if said else 0.0)
        label.append(np.log(recur[answer.strip().lower()]) / np.log(max(len(answers), 2)))
    return np.hstack([soft_bins(length, LENGTH_BINS, LENGTH_WIDTH), soft_bins(copied, SHARE_BINS, SHARE_WIDTH),
                      soft_bins(label, SHARE_BINS, SHARE_WIDTH)]) / np.sqrt(3)


def _unit(x) -> np.ndarray:
    x = points(x, "embeddings").astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class Features:
    """A client's training examples as FedRouter sees them."""

    x: np.ndarray  # (n, 3d + 19): [instruction | template | answer | form]
    template: np.ndarray  # (n, 1024): `template_view` of the instructions (for the template parts)
    router_dims: int  # the leading dimensions the router compares an input with: the instruction (d)

    @property
    def split_dims(self) -> int:  # what a client's K-Means splits by: instruction and template
        return 2 * self.router_dims

    @property
    def instruction(self) -> np.ndarray:
        return self.x[:, : self.router_dims]

    @property
    def answer_views(self) -> list[np.ndarray]:  # meaning and form apart: what template parts are told apart by
        d = self.router_dims
        return [self.x[:, 2 * d: 3 * d].astype(np.float64), self.x[:, 3 * d:].astype(np.float64)]


def task_features(examples: list[dict], embed) -> Features:
    """`examples` ({instruction, output}) as `Features`; `embed` maps texts to an (n, d) array."""
    if not examples:
        raise FedrouterError("nothing to cluster: this client has no training examples")
    instructions, answers, n = [e["instruction"] for e in examples], [e["output"] for e in examples], len(examples)
    # one call: a text in two views (a template with no content word is its instruction) is embedded once
    units = _unit(embed(instructions + template_texts(instructions) + answers))
    if len(units) != 3 * n:
        raise FedrouterError(f"the embedder returned {len(units)} vectors for {3 * n} texts ({n} examples x 3 views)")
    views = [units[i * n: (i + 1) * n] for i in range(3)]
    x = np.hstack([*views, answer_form(instructions, answers)]).astype(np.float32)
    return Features(x, template_view(instructions), views[0].shape[1])
