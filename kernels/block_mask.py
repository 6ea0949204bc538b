"""Block masks of block-sparse attention, in plain torch (the kernels: kernels/block_sparse.py).

The sequence is cut into blocks of ``block`` tokens (the last ones may be partial): query block i
holds rows [i * block, (i + 1) * block), key block j keys [j * block, (j + 1) * block). A block
mask bool [B, H, Tq_blocks, S_blocks] (B and H may be 1) says which key blocks each query block
attends to; its lists, FlexAttention's BlockMask shape of the problem:

    kv_num [B, H, Tq_blocks], kv_idx [B, H, Tq_blocks, S_blocks]: the key blocks each query
        block visits (the first kv_num of each row, ascending), for the forward and dq;
    q_num [B, H, S_blocks], q_idx [B, H, S_blocks, Tq_blocks]: the query blocks that visit
        each key block (the transposed lists), for dk/dv.
"""

from __future__ import annotations

import dataclasses

import torch


def blocks(n: int, block: int) -> int:
    """ceil(n / block): the blocks of n tokens."""
    return -(-n // block)


@dataclasses.dataclass(frozen=True)
class BlockLists:
    """The block lists of one block mask (module docstring); int32 tensors, B and H may be 1."""

    block: int
    kv_num: torch.Tensor
    kv_idx: torch.Tensor
    q_num: torch.Tensor
    q_idx: torch.Tensor

    def expanded(self, batch: int, heads: int) -> dict[str, torch.Tensor]:
        """The four lists as FlashProblem's fields: [batch, heads, ...] contiguous int32."""
        lists = {}
        for name in ("kv_num", "kv_idx", "q_num", "q_idx"):
            x = getattr(self, name)
            lists[name] = x.expand(batch, heads, *x.shape[2:]).to(torch.int32).contiguous()
        return lists


def _ordered(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [..., R] and indices [..., R, C] of the True columns of mask [..., R, C], ascending,
    first in each row (the rest of the row is padding, never read)."""
    counts = mask.sum(-1, dtype=torch.int32)
    indices = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, indices


def block_lists(mask: torch.Tensor, block: int) -> BlockLists:
    """The lists of a block mask bool [B, H, Tq_blocks, S_blocks] of ``block``-token blocks."""
    if mask.dim() != 4 or mask.dtype != torch.bool:
        raise ValueError(f"expected a bool block mask [B, H, Tq_blocks, S_blocks], got {mask.dtype} {tuple(mask.shape)}")
    kv_num, kv_idx = _ordered(mask)
    q_num, q_idx = _ordered(mask.transpose(-1, -2))
    return BlockLists(block, kv_num, kv_idx, q_num, q_idx)


def expand_blocks(x: torch.Tensor, block: int, t: int, s: int) -> torch.Tensor:
    """A per-block tensor x [..., Tq_blocks, S_blocks] at token level: [..., T, S]."""
    return x.repeat_interleave(block, dim=-2)[..., :t, :].repeat_interleave(block, dim=-1)[..., :s]


def block_pairs(t: int, s: int, block: int, causal: bool) -> torch.Tensor:
    """Visible (query, key) pairs in each block pair: int64 [Tq_blocks, S_blocks], exact for partial
    blocks and the diagonal (causal: query i at position i + S - T sees keys j <= it)."""
    pos = torch.arange(t) + (s - t)
    starts = torch.arange(blocks(s, block)) * block
    ends = (starts + block).clamp(max=s)  # exclusive
    last = pos[:, None] + 1 if causal else torch.full((t, 1), s)  # each row's keys end before this
    per_row = (torch.minimum(ends[None, :], last) - starts[None, :]).clamp(min=0)  # (T, S_blocks)
    return torch.zeros(blocks(t, block), len(starts), dtype=torch.int64).index_add_(0, torch.arange(t) // block, per_row)


def block_sparse_flops(mask: torch.Tensor, t: int, s: int, heads: int, head_dim: int, block: int, causal: bool) -> float:
    """Forward FLOPs of the blocks a block mask bool [B, H, Tq_blocks, S_blocks] (H = heads or 1)
    visits: 4 * D per visible pair (2 for Q K^T, 2 for P V, FlashAttention-3 convention), pairs
    counted exactly per kept block, summed over batch and heads. With every block kept this is
    the dense kernel's count."""
    per_head = (mask.cpu().to(torch.int64) * block_pairs(t, s, block, causal)).sum()
    return 4.0 * head_dim * int(per_head) * (heads // mask.shape[1])
