"""The embedding task: InfoNCE and metrics against hand/float64 references, the task on a tiny random BERT."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.train import embedding as emb
from lorakit.train.codesearch import build_code_search_task
from lorakit.train.task import Task

transformers = pytest.importorskip("transformers")


# -- the math ---------------------------------------------------------------------------------


def _reference_info_nce(q, p, n, tau):
    """−mean_i log(exp(q_i·p_i/τ) / Σ_c exp(q_i·c/τ)), term by term in float64."""
    cands = [c for c in p] + ([c for c in n] if n is not None else [])
    total = 0.0
    for i, qi in enumerate(q):
        logits = [float((qi.double() * c.double()).sum()) / tau for c in cands]
        total += -(logits[i] - math.log(sum(math.exp(x) for x in logits)))
    return total / len(q)


@pytest.mark.parametrize("with_negatives", [False, True])
def test_info_nce_matches_float64_reference(with_negatives: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 7, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(5, 7, generator=g), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(3, 7, generator=g), dim=-1) if with_negatives else None
    got = emb.info_nce(q, p, n, temperature=0.1)
    assert got.item() == pytest.approx(_reference_info_nce(q, p, n, 0.1), rel=1e-5)


def test_info_nce_by_hand() -> None:
    # q = p = identity rows in 2-d: logits [[1, 0], [0, 1]] / τ with τ = 0.5 → [[2, 0], [0, 2]]
    eye = torch.eye(2)
    expected = -math.log(math.exp(2) / (math.exp(2) + 1))
    assert emb.info_nce(eye, eye, temperature=0.5).item() == pytest.approx(expected, rel=1e-6)


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[3.0, 4.0], [100.0, 100.0]], [[1.0, 0.0], [1.0, 2.0]]])  # (2, 2, 2)
    mask = torch.tensor([[1, 0], [1, 1]])
    got = emb.mean_pool(hidden, mask)
    # row 0: mean (3, 4) → (0.6, 0.8); row 1: mean (1, 1) → (1, 1)/√2
    torch.testing.assert_close(got, torch.tensor([[0.6, 0.8], [2**-0.5, 2**-0.5]]))


def test_retrieval_metrics_by_hand() -> None:
    corpus = torch.eye(3)  # documents e0, e1, e2
    queries = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # answer 0 ranks 1
            [0.8, 0.5, 0.1],  # answer 1 ranks 2 (e0 scores higher)
            [0.5, 0.4, 0.1],  # answer 2 ranks 3
            [0.5, 0.5, 0.0],  # answer 0 ties with e1: the tie counts against it, rank 2
        ]
    )
    got = emb.retrieval_metrics(queries, corpus, torch.tensor([0, 1, 2, 0]))
    assert got["recall@1"] == pytest.approx(1 / 4)
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    assert got["recall@5"] == pytest.approx(1.0)
    collapsed = emb.retrieval_metrics(torch.ones(3, 2), torch.ones(3, 2), torch.arange(3))
    assert collapsed["recall@1"] == 0.0


# -- the task on a tiny random BERT -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised 2-layer BERT saved with the real MiniLM tokenizer (no download)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = transformers.AutoTokenizer.from_pretrained(emb.default_model_dir())
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PAIRS = [
    emb.EmbeddingPair("open a file for reading", "io.open(file, mode)"),
    emb.EmbeddingPair("join path components", "os.path.join(a, *p)", "os.path.split(p)"),
    emb.EmbeddingPair("sort a list in place with a key", "list.sort(*, key, reverse)"),
    emb.EmbeddingPair("parse a JSON document from a string", "json.loads(s, *, cls, **kw)"),
    emb.EmbeddingPair("compute a SHA-256 digest", "hashlib.sha256(data)"),
    emb.EmbeddingPair("sleep for a number of seconds", "time.sleep(secs)"),
]


@pytest.fixture()
def task(tiny_dir: Path) -> emb.EmbeddingTask:
    model, tokenizer = emb.load_encoder(tiny_dir)
    return emb.EmbeddingTask(model, tokenizer, PAIRS, PAIRS[:4], max_length=12, chunk_tokens=24)


def test_task_follows_protocol(task: emb.EmbeddingTask) -> None:
    assert isinstance(task, Task)
    assert len(task.train_examples) == len(PAIRS)
    assert len(task.fingerprint()) == 16
    assert all(len(e.query) <= 12 for e in task.train_examples)


def test_collate_packs_without_padding(task: emb.EmbeddingTask) -> None:
    examples = task.train_examples[:3]
    batch = task.collate(examples)
    assert batch["query_lengths"].tolist() == [len(e.query) for e in examples]
    assert batch["query_ids"].tolist() == [t for e in examples for t in e.query]
    assert batch["negative_lengths"].tolist() == [len(examples[1].negative)]
    assert "negative_ids" not in task.collate([examples[0], examples[2]])


def test_chunked_encoding_equals_padded_batch(task: emb.EmbeddingTask) -> None:
    texts = [p.query for p in PAIRS] + [p.positive for p in PAIRS]
    model = task.model.eval()
    padded = task.tokenizer(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    with torch.no_grad():
        want = emb.mean_pool(model(**padded).last_hidden_state, padded["attention_mask"])
        ids = [tuple(t for t, m in zip(row, mask) if m) for row, mask in zip(padded["input_ids"].tolist(), padded["attention_mask"].tolist())]
        got = task.encode(model, *emb.pack(ids))  # chunk_tokens=24: several chunks of 2-4 texts
        one_call = emb.encode_packed(model, *emb.pack(ids), chunk_tokens=None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one_call, want, atol=1e-5, rtol=1e-5)


def test_loss_matches_reference_and_trains(task: emb.EmbeddingTask) -> None:
    model = task.model.train()
    task.chunk_tokens = 1024  # one encoder call per side (the chunked path is tested above)
    for module in model.modules():  # no dropout: the reference must see the same network
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    batch = task.collate(task.train_examples)
    loss = task.loss(model, batch)
    with torch.no_grad():
        q = task.encode(model, batch["query_ids"], batch["query_lengths"])
        p = task.encode(model, batch["positive_ids"], batch["positive_lengths"])
        n = task.encode(model, batch["negative_ids"], batch["negative_lengths"])
    assert loss.item() == pytest.approx(_reference_info_nce(q, p, n, task.temperature), rel=1e-4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = loss.item()
    for _ in range(10):
        opt.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        opt.step()
    assert task.loss(model, batch).item() < 0.5 * first


def test_evaluate(task: emb.EmbeddingTask) -> None:
    task.model.train()
    metrics = task.evaluate(task.model)
    assert list(metrics)[0] == "recall@1"
    assert 0.0 <= metrics["recall@1"] <= metrics["recall@5"] <= 1.0
    assert 0.25 <= metrics["mrr"] <= 1.0  # 4 documents: the worst rank is 4
    assert task.model.training  # restored
    # an identity "model" that embeds each text by its tokens ranks perfectly iff texts are distinct
    assert task.evaluate(task.model) == metrics  # no randomness in evaluation


def test_jsonl_task(tiny_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "pairs.jsonl"
    lines = [{"query": p.query, "positive": p.positive} | ({"negative": p.negative} if p.negative else {}) for p in PAIRS]
    data.write_text("\n".join(json.dumps(x) for x in lines * 3) + "\n")
    task = emb.build_embedding_task(tiny_dir, data, eval_fraction=0.2, max_length=16)
    assert len(task.train_examples) + len(task.eval_pairs) == 18 and len(task.eval_pairs) >= 1
    assert task.evaluate(task.model)["recall@1"] >= 0.0
    assert task.fingerprint() != emb.build_embedding_task(tiny_dir, data, eval_fraction=0.5).fingerprint()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "positive": "p"}\n{"query": "only a query"}\n')
    with pytest.raises(LorakitError, match=r"bad.jsonl:2: missing field 'positive'"):
        emb.build_embedding_task(tiny_dir, bad)


def test_code_search_task_on_tiny_model(tiny_dir: Path) -> None:
    task = build_code_search_task(None, max_length=16, seed=0, model_dir=tiny_dir, eval_pairs=50)
    assert task.name == "code-search" and len(task.eval_pairs) == 50 and len(task.train_examples) > 2000
    assert task.default_targets == emb.encoder_targets(task.model, 2 / 3)  # 2 layers: the top one
    assert max(len(e.positive) for e in task.train_examples) <= 16
    assert task.loss(task.model, task.collate(task.train_examples[:8])).isfinite()


@pytest.mark.parametrize(("layers", "top", "adapted"), [(6, 2 / 3, [2, 3, 4, 5]), (6, 1.0, list(range(6))), (2, 2 / 3, [1]), (3, 0.01, [2])])
def test_encoder_targets_pick_the_top_layers(layers: int, top: float, adapted: list[int]) -> None:
    import lorakit

    config = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=16)
    targets = emb.encoder_targets(transformers.BertModel(config), top)
    model = lorakit.inject(transformers.BertModel(config), lorakit.LoraConfig(target_modules=targets))
    names = {name for name, _ in lorakit.lora_layers(model)}
    linears = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
               "intermediate.dense", "output.dense")
    assert names == {f"encoder.layer.{i}.{m}" for i in adapted for m in linears}  # never pooler.dense
    assert emb.encoder_targets(torch.nn.Sequential(torch.nn.Linear(2, 2))) == "all-linear"


def test_model_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(LorakitError, match="not a local model directory"):
        emb.load_encoder("sentence-transformers/all-MiniLM-L6-v2")
    with pytest.raises(LorakitError, match="temperature"):
        emb.EmbeddingTask(torch.nn.Linear(1, 1), None, [], temperature=0.0)


def test_default_demo_path_runs_end_to_end(tmp_path: Path) -> None:
    """The default run (real all-MiniLM-L6-v2, stdlib pairs) through the training loop with a tiny budget."""
    import io

    import lorakit
    from lorakit.train.codesearch import CODE_SEARCH_DEFAULTS as D
    from lorakit.train.config import TrainConfig
    from lorakit.train.trainer import Trainer

    task = build_code_search_task(None, D.max_length, D.seed, eval_pairs=24)
    lora = lorakit.LoraConfig(r=D.r, alpha=D.alpha, dropout=D.dropout, target_modules=D.targets or task.default_targets)
    config = TrainConfig(lr=D.lr, max_steps=2, batch_size=8, warmup=1, schedule="linear", seed=D.seed)
    result = Trainer(task, lora, config, tmp_path, log=io.StringIO()).fit()
    assert result.steps == 2 and set(result.after) >= {"recall@1", "mrr"}
    assert result.before["recall@1"] > 0.2  # the pretrained encoder already finds many
    adapter = lorakit.io.read_adapter(tmp_path / "adapter")
    layers = {key.split(".layer.")[1].split(".")[0] for key in adapter.tensors}
    assert layers == {"2", "3", "4", "5"} and len(adapter.tensors) == 2 * 4 * 6
    assert (tmp_path / "metrics.json").is_file()
