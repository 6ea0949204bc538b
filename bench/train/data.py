"""Training text, tokenizers and the deterministic token stream.

Corpora (``--data``):
    stdlib          (default) the Python standard library's sources and pydoc documentation
                    topics, real text on every machine; capped at CORPUS_CAP_BYTES
    wikitext-2|-103 through HF datasets, from its cache only unless download=True
    PATH            a text file (split 90/5/5 by position) or a folder: files named *train* /
                    *valid* (or *val*, *dev*) / *test* (e.g. WikiText's raw wiki.train.raw) give
                    the splits; otherwise each file goes to a split by the hash of its name
Tokenizers (``--tokenizer``):
    bpe[:N]         byte-level BPE with N merges' vocabulary (default: the preset's), trained with
                    HF `tokenizers` on the train split, cached by corpus hash under the cache folder
    bytes           raw UTF-8 bytes plus [PAD], [MASK], [EOS]
    PATH            a tokenizer.json, or an HF folder holding one

Everything is a pure function of its inputs: the split of a document depends on its name
only, the batch of a step on (seed, step) only, so `--resume` and comparisons of mechanisms
see identical token streams.
"""

from __future__ import annotations

import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from attnbench import store
from attnbench.errors import InputError
from attnbench.models.transformer import IGNORE

SPLITS = ("train", "valid", "test")
CORPUS_CAP_BYTES = 16_000_000  # the whole stdlib (~12 MB, ~3M BPE tokens); BPE training takes seconds
SPECIALS = ("[PAD]", "[MASK]", "[EOS]")


def cache_dir() -> Path:
    """Where tokenizers and token streams are cached: $ATTNBENCH_CACHE or ~/.cache/attnbench."""
    return Path(os.environ.get("ATTNBENCH_CACHE", Path.home() / ".cache" / "attnbench"))


# ---- corpora


@dataclass
class Corpus:
    """Documents per split (train/valid/test) and a hash of the whole, recorded with every run."""

    name: str
    splits: dict[str, list[str]]

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for split in SPLITS:
            for doc in self.splits[split]:
                h.update(split.encode() + b"\0" + doc.encode("utf-8", errors="replace") + b"\0")
        return h.hexdigest()


def split_of(name: str) -> str:
    """A document's split from the hash of its name: 90% train, 5% valid, 5% test."""
    bucket = int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


def _by_name_hash(named_docs: list[tuple[str, str]], name: str) -> Corpus:
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    for doc_name, text in sorted(named_docs):
        splits[split_of(doc_name)].append(text)
    corpus = Corpus(name, splits)
    for split in SPLITS:
        if not splits[split]:
            raise InputError(f"corpus {name} has no {split} documents; give it more files (or one file, split by position)")
    return corpus


def stdlib_corpus(cap_bytes: int = CORPUS_CAP_BYTES) -> Corpus:
    """The standard library's .py sources (tests and site-packages left out) and pydoc's topic
    texts. Documents are taken in name-hash order while their split holds less than its share
    (90/5/5) of ``cap_bytes``, so the cut is deterministic and every split gets text."""
    from pydoc_data.topics import topics

    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    sources = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    named = [(f"topics/{key}", text) for key, text in topics.items()]
    named += [(p.relative_to(root).as_posix(), p) for p in sources]
    named.sort(key=lambda item: hashlib.sha256(item[0].encode()).hexdigest())
    budget = {"train": 0.90 * cap_bytes, "valid": 0.05 * cap_bytes, "test": 0.05 * cap_bytes}
    docs = []
    for doc_name, content in named:
        split = split_of(doc_name)
        if budget[split] <= 0:
            continue
        text = content if isinstance(content, str) else content.read_text(encoding="utf-8", errors="replace")
        docs.append((doc_name, text))
        budget[split] -= len(text)
    return _by_name_hash(docs, "stdlib")


_SPLIT_PATTERNS = {"train": r"train", "valid": r"valid|val\b|\.val\.|dev", "test": r"test"}


def folder_corpus(folder: Path) -> Corpus:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    texts = {p.relative_to(folder).as_posix(): _read_text(p) for p in files}
    texts = {name: text for name, text in texts.items() if text is not None}
    if not texts:
        raise InputError(f"no text files in {folder}")
    named_splits = {s: [n for n in texts if re.search(pattern, Path(n).name)] for s, pattern in _SPLIT_PATTERNS.items()}
    if all(named_splits.values()):  # e.g. wiki.train.raw, wiki.valid.raw, wiki.test.raw
        return Corpus(folder.name, {s: [texts[n] for n in names] for s, names in named_splits.items()})
    return _by_name_hash(list(texts.items()), folder.name)


def file_corpus(path: Path) -> Corpus:
    """One file cut at line boundaries: the first 90% of lines train, then 5% valid, 5% test."""
    text = _read_text(path)
    if text is None:
        raise InputError(f"{path} is not UTF-8 text")
    lines = text.splitlines(keepends=True)
    if len(lines) < 20:
        raise InputError(f"{path} has {len(lines)} lines; need at least 20 to split into train/valid/test")
    a, b = int(len(lines) * 0.90), int(len(lines) * 0.95)
    return Corpus(path.name, {"train": ["".join(lines[:a])], "valid": ["".join(lines[a:b])], "test": ["".join(lines[b:])]})


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def wikitext_corpus(name: str, download: bool = False) -> Corpus:
    """WikiText-2/-103 (raw) from the HF datasets cache; the network only with ``download``."""
    config = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}[name]
    try:
        import datasets
    except ImportError:
        raise InputError(
            f"{name} needs HF datasets (pip install 'attnbench[hf]'), or pass a folder holding wiki.train.raw, wiki.valid.raw, wiki.test.raw"
        ) from None
    if not download:
        os.environ["HF_DATASETS_OFFLINE"] = "1"
    try:
        data = datasets.load_dataset("wikitext", config)
    except Exception as err:  # datasets raises many types for "not in the cache"
        hint = "" if download else " (not in the HF cache; pass --download to fetch it)"
        raise InputError(f"cannot load {name}{hint}: {str(err).splitlines()[0]}") from None
    hf_split = {"train": "train", "valid": "validation", "test": "test"}
    return Corpus(name, {s: ["".join(data[hf_split[s]]["text"])] for s in SPLITS})


def load_corpus(spec: str = "stdlib", download: bool = False) -> Corpus:
    """The corpus named or pointed to by ``spec`` (module docstring)."""
    if spec == "stdlib":
        return stdlib_corpus()
    if spec in ("wikitext-2", "wikitext-103"):
        return wikitext_corpus(spec, download)
    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_corpus(path)
    if path.is_file():
        return file_corpus(path)
    raise InputError(f"--data {spec}: not a corpus name (stdlib, wikitext-2, wikitext-103), file or folder")


# ---- tokenizers


@dataclass
class Tokenizer:
    """Text -> ids. ``backend`` is an HF tokenizers.Tokenizer, or None for raw bytes.

    pad_id / mask_id / eos_id: the special tokens, None where the tokenizer has none
    (MLM needs a mask token; eos separates documents in the stream).
    """

    name: str
    backend: object | None
    vocab_size: int
    pad_id: int | None
    mask_id: int | None
    eos_id: int | None

    @property
    def digest(self) -> str:
        text = "bytes" if self.backend is None else self.backend.to_str()
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def special_ids(self) -> list[int]:
        return [i for i in (self.pad_id, self.mask_id, self.eos_id) if i is not None]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self.backend is None:
            return [list(t.encode("utf-8")) for t in texts]
        return [e.ids for e in self.backend.encode_batch(texts)]


def bytes_tokenizer() -> Tokenizer:
    return Tokenizer("bytes", None, 256 + len(SPECIALS), pad_id=256, mask_id=257, eos_id=258)


def _wrap(name: str, backend) -> Tokenizer:
    def first(*tokens: str) -> int | None:
        return next((backend.token_to_id(t) for t in tokens if backend.token_to_id(t) is not None), None)

    return Tokenizer(
        name, backend, backend.get_vocab_size(),
        pad_id=first("[PAD]", "<pad>"),
        mask_id=first("[MASK]", "<mask>"),
        eos_id=first("[EOS]", "[SEP]", "</s>", "<|endoftext|>", "<eos>"),
    )


def train_bpe(corpus: Corpus, vocab_size: int) -> Tokenizer:
    """Byte-level BPE trained on ``corpus``'s train split, cached by corpus hash and vocab size."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    path = cache_dir() / "tokenizers" / f"bpe{vocab_size}-{corpus.name}-{corpus.digest[:16]}.json"
    name = f"bpe:{vocab_size}"
    if path.exists():
        return _wrap(name, HFTokenizer.from_file(str(path)))
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # lossless on code and prose
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(corpus.splits["train"], trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    with store.replacing(path) as tmp:
        backend.save(str(tmp))
    return _wrap(name, backend)


def load_tokenizer(spec: str, corpus: Corpus, default_vocab: int) -> Tokenizer:
    """The tokenizer named by ``spec`` (module docstring); BPE is trained on ``corpus`` if not cached."""
    if spec == "bytes":
        return bytes_tokenizer()
    if spec == "bpe" or spec.startswith("bpe:"):
        size = spec.partition(":")[2] or str(default_vocab)
        if not size.isdigit() or int(size) < 300:
            raise InputError(f"--tokenizer {spec}: the BPE vocabulary size must be an integer >= 300")
        return train_bpe(corpus, int(size))
    path = Path(spec).expanduser()
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"--tokenizer {spec}: not bpe[:N], bytes, a tokenizer.json or a folder holding one")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        return _wrap(str(path), HFTokenizer.from_file(str(file)))
    except Exception as err:  # tokenizers raises a bare Exception on a bad file
        raise InputError(f"cannot read tokenizer {file}: {str(err).splitlines()[0]}") from None


# ---- token streams


def token_streams(corpus: Corpus, tokenizer: Tokenizer) -> dict[str, torch.Tensor]:
    """Each split as one int64 stream [N]: documents in order, each followed by eos (if any).
    Cached by (corpus hash, tokenizer hash); encoding a few MB takes seconds."""
    from safetensors.torch import load_file, save_file

    path = cache_dir() / "tokens" / f"{corpus.digest[:16]}-{tokenizer.digest[:16]}.safetensors"
    if path.exists():
        return {s: t.long() for s, t in load_file(str(path)).items()}
    streams = {}
    for split in SPLITS:
        ids: list[int] = []
        for doc in tokenizer.encode_batch(corpus.splits[split]):
            ids.extend(doc)
            if tokenizer.eos_id is not None:
                ids.append(tokenizer.eos_id)
        streams[split] = torch.tensor(ids, dtype=torch.int32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with store.replacing(path) as tmp:
        save_file(streams, str(tmp))
    return {s: t.long() for s, t in streams.items()}


def _generator(*seeds: int) -> torch.Generator:
    key = hashlib.sha256(repr(seeds).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))


def blocks(stream: torch.Tensor, length: int) -> torch.Tensor:
    """The stream [N] cut into non-overlapping rows [N // length, length] (the tail dropped)."""
    n = stream.numel() // length
    return stream[: n * length].view(n, length)


def mask_tokens(ids: torch.Tensor, tokenizer: Tokenizer, generator: torch.Generator, rate: float = 0.15) -> dict[str, torch.Tensor]:
    """BERT's masking of ids [B, T]: ``rate`` of the non-special tokens are chosen; of those 80%
    become [MASK], 10% a random token, 10% stay. labels [B, T] hold the originals there, IGNORE elsewhere."""
    if tokenizer.mask_id is None:
        raise InputError(f"tokenizer {tokenizer.name} has no mask token ([MASK] or <mask>); MLM needs one")
    special = torch.isin(ids, torch.tensor(tokenizer.special_ids, dtype=ids.dtype))
    draw = torch.rand(ids.shape, generator=generator)
    chosen = (draw < rate) & ~special
    action = torch.rand(ids.shape, generator=generator)
    random_ids = torch.randint(0, tokenizer.vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (action < 0.8), tokenizer.mask_id, ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    labels = torch.where(chosen, ids, IGNORE)
    return {"input_ids": inputs, "labels": labels}


def causal_pair(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rows [B, T + 1] -> next-token inputs [B, T] and labels [B, T]."""
    return {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}


@dataclass
class Batches:
    """Training batches as a pure function of (seed, step): the stream is cut into rows of seq
    (+1 for clm) tokens, shuffled once per epoch by (seed, epoch); step s takes the next ``batch``
    rows of that order, and MLM masks are drawn from (seed, step)."""

    stream: torch.Tensor
    task: str
    seq: int
    batch: int
    seed: int
    tokenizer: Tokenizer

    def __post_init__(self) -> None:
        self.rows = blocks(self.stream, self.seq + (self.task == "clm"))
        if len(self.rows) < self.batch:
            raise InputError(f"the train split has {len(self.rows)} rows of {self.seq} tokens; need at least --batch {self.batch}")
        self._orders: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.rows), generator=_generator(self.seed, epoch))}
        return self._orders[epoch]

    def at(self, step: int) -> dict[str, torch.Tensor]:
        per_epoch = len(self.rows) // self.batch
        epoch, index = divmod(step, per_epoch)
        picked = self.rows[self._order(epoch)[index * self.batch : (index + 1) * self.batch]]
        if self.task == "clm":
            return causal_pair(picked)
        return mask_tokens(picked, self.tokenizer, _generator(self.seed, -1, step))


def eval_batches(stream: torch.Tensor, task: str, seq: int, batch: int, count: int, tokenizer: Tokenizer, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The first ``count`` batches of a held-out stream, in order, with fixed MLM masks."""
    rows = blocks(stream, seq + (task == "clm"))[: count * batch]
    if len(rows) == 0:
        raise InputError(f"the held-out split has fewer than {seq + 1} tokens")
    out = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        out.append(causal_pair(chunk) if task == "clm" else mask_tokens(chunk, tokenizer, _generator(seed, -2, i)))
    return out
