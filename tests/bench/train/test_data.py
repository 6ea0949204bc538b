"""Corpora, tokenizers and the token stream: deterministic splits, caching, BERT masking."""

import pytest
import torch

from attnbench.train import data
from attnbench.errors import InputError
from attnbench.models.transformer import IGNORE


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))


def _folder(tmp_path, count=60):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(count):
        (folder / f"doc{i:03d}.txt").write_text(f"document {i}: " + " ".join(f"word{(i * j) % 97}" for j in range(200)))
    return folder


def test_split_by_name_hash_is_deterministic_and_roughly_90_5_5():
    names = [f"file{i}.py" for i in range(4000)]
    splits = [data.split_of(n) for n in names]
    assert splits == [data.split_of(n) for n in names]
    assert 0.87 < splits.count("train") / 4000 < 0.93
    assert 0.035 < splits.count("valid") / 4000 < 0.065


def test_folder_corpus_splits_by_file_and_hashes_content(tmp_path):
    folder = _folder(tmp_path)
    corpus = data.load_corpus(str(folder))
    assert sum(len(docs) for docs in corpus.splits.values()) == 60
    for split, docs in corpus.splits.items():
        for doc in docs:
            index = int(doc.split(":")[0].split()[1])
            assert data.split_of(f"doc{index:03d}.txt") == split
    before = corpus.digest
    (folder / "doc000.txt").write_text("changed")
    assert data.load_corpus(str(folder)).digest != before


def test_folder_with_named_splits_uses_them(tmp_path):
    for split in ("train", "valid", "test"):
        (tmp_path / f"wiki.{split}.raw").write_text(f" = {split} = \n text of {split}\n")
    corpus = data.load_corpus(str(tmp_path))
    assert {s: docs[0].split()[1] for s, docs in corpus.splits.items()} == {"train": "train", "valid": "valid", "test": "test"}


def test_single_file_splits_by_position(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(100)))
    corpus = data.load_corpus(str(path))
    assert corpus.splits["train"][0].startswith("line 0\n") and corpus.splits["train"][0].endswith("line 89\n")
    assert corpus.splits["valid"][0] == "".join(f"line {i}\n" for i in range(90, 95))


def test_bad_specs_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="not a corpus name"):
        data.load_corpus(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="bpe"):
        data.load_tokenizer("nonsense", None, 300)
    with pytest.raises(InputError, match="vocabulary size"):
        data.load_tokenizer("bpe:12", None, 300)


def test_stdlib_corpus_is_real_text_with_all_splits():
    corpus = data.stdlib_corpus(cap_bytes=300_000)
    assert all(corpus.splits[s] for s in data.SPLITS)
    assert 300_000 <= sum(len(d) for docs in corpus.splits.values() for d in docs) < 2_000_000
    assert any("def " in doc for doc in corpus.splits["train"])


def test_bpe_is_trained_on_train_split_cached_and_lossless(tmp_path):
    corpus = data.load_corpus(str(_folder(tmp_path)))
    tokenizer = data.load_tokenizer("bpe:400", corpus, default_vocab=4096)
    assert tokenizer.vocab_size <= 400 and tokenizer.mask_id is not None and tokenizer.eos_id is not None
    cached = list((data.cache_dir() / "tokenizers").glob("*.json"))
    assert len(cached) == 1
    again = data.load_tokenizer("bpe:400", corpus, default_vocab=4096)
    assert again.digest == tokenizer.digest
    text = "déjà vu: def f(x):\n    return x  # ünïcode"
    assert tokenizer.backend.decode(tokenizer.encode_batch([text])[0]) == text


def test_token_streams_separate_documents_and_are_cached(tmp_path):
    corpus = data.Corpus("two", {"train": ["ab", "c"], "valid": ["d"], "test": ["e"]})
    tokenizer = data.bytes_tokenizer()
    streams = data.token_streams(corpus, tokenizer)
    assert streams["train"].tolist() == [97, 98, tokenizer.eos_id, 99, tokenizer.eos_id]
    assert data.token_streams(corpus, tokenizer)["valid"].tolist() == [100, tokenizer.eos_id]


def test_mask_tokens_follows_bert_80_10_10():
    tokenizer = data.bytes_tokenizer()
    ids = torch.randint(0, 256, (200, 1000))
    ids[:, ::50] = tokenizer.eos_id
    batch = data.mask_tokens(ids, tokenizer, torch.Generator().manual_seed(1))
    chosen = batch["labels"] != IGNORE
    assert not chosen[ids == tokenizer.eos_id].any(), "special tokens are never masked"
    assert torch.equal(batch["labels"][chosen], ids[chosen])
    assert torch.equal(batch["input_ids"][~chosen], ids[~chosen])
    rate = chosen.sum() / (ids != tokenizer.eos_id).sum()
    masked = (batch["input_ids"][chosen] == tokenizer.mask_id).float().mean()
    kept = (batch["input_ids"][chosen] == ids[chosen]).float().mean()
    assert abs(rate - 0.15) < 0.005 and abs(masked - 0.8) < 0.01
    assert 0.1 < kept < 0.11  # 10% kept + the random draws that hit the same token (1/259 of 10%)


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_batches_are_a_pure_function_of_seed_and_step(task):
    tokenizer = data.bytes_tokenizer()
    stream = torch.randint(0, 256, (10_000,))
    make = lambda seed: data.Batches(stream, task, seq=32, batch=4, seed=seed, tokenizer=tokenizer)  # noqa: E731
    a, b = make(0), make(0)
    for step in (7, 0, 3, 200):  # any order, any instance
        assert all(torch.equal(a.at(step)[k], b.at(step)[k]) for k in ("input_ids", "labels"))
    assert not torch.equal(a.at(0)["input_ids"], make(1).at(0)["input_ids"])
    if task == "clm":
        first = a.at(0)
        assert torch.equal(first["input_ids"][:, 1:], first["labels"][:, :-1])


def test_one_epoch_visits_every_row_once():
    tokenizer = data.bytes_tokenizer()
    stream = torch.arange(33 * 40) % 250
    batches = data.Batches(stream, "clm", seq=32, batch=4, seed=3, tokenizer=tokenizer)
    starts = torch.cat([batches.at(step)["input_ids"][:, 0] for step in range(10)])
    assert sorted(starts.tolist()) == sorted(data.blocks(stream, 33)[:, 0].tolist())
