"""The seed's edge cases, as held-out evaluations of a student against its teacher (KL and
top-1 agreement, bench/distill/evaluate.py), each on batches of the run's shape [B, T]:

    one_token   every sequence all padding but its first token (seq_lens = 1): the one labelled
                position is that token's prediction (clm: of the next token; mlm: the token
                itself, masked), so the models must agree on a context of one
    repeated    sequences of one token repeated T times (the held-out split's most frequent
                non-special token), labelled as the task labels any batch (clm: every next
                token; mlm: BERT's masking), where attention has nothing to tell apart
"""

from __future__ import annotations

import torch

from attnbench.train import data
from attnbench.train.data import IGNORE


def one_token(batch: dict[str, torch.Tensor], task: str, tokenizer: data.Tokenizer) -> dict[str, torch.Tensor]:
    """``batch`` cut to its first token: the rest padding (pad id where the tokenizer has one), seq_lens 1."""
    ids, labels = batch["input_ids"].clone(), torch.full_like(batch["labels"], IGNORE)
    if task == "clm":
        labels[:, 0] = batch["labels"][:, 0]
    else:
        labels[:, 0] = ids[:, 0]
        ids[:, 0] = tokenizer.mask_id
    if tokenizer.pad_id is not None:
        ids[:, 1:] = tokenizer.pad_id
    return {"input_ids": ids, "labels": labels, "seq_lens": torch.ones(ids.shape[0], dtype=torch.long)}


def repeated(stream: torch.Tensor, task: str, seq: int, batch: int, tokenizer: data.Tokenizer, seed: int) -> dict[str, torch.Tensor]:
    """One batch of ``stream``'s most frequent non-special token repeated ``seq`` times per sequence."""
    counts = torch.bincount(stream, minlength=tokenizer.vocab_size)
    counts[tokenizer.special_ids] = 0
    token = int(counts.argmax())
    return data.eval_batches(torch.full((batch * (seq + 1),), token), task, seq, batch, 1, tokenizer, seed)[0]


def edge_batches(source, valid: list[dict[str, torch.Tensor]], seed: int) -> dict[str, list[dict[str, torch.Tensor]]]:
    """The batches of each edge case for ``source``'s task and shape (one batch each)."""
    return {
        "one_token": [one_token(valid[0], source.task, source.tokenizer)],
        "repeated": [repeated(source.streams["valid"], source.task, source.seq, source.batch, source.tokenizer, seed)],
    }
