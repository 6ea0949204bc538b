"""Block-sparse flash attention: the flash kernels (kernels/flash_fwd.py, kernels/flash_bwd.py)
visiting only listed blocks, FlexAttention's BlockMask shape of the problem.

Blocks, block masks and their lists (kv_num/kv_idx for the forward and dq, the transposed
q_num/q_idx for dk/dv) are kernels/block_mask.py's; the lists ride on the FlashProblem
(sparse_block > 0), so the autograd Function and the launches are the dense kernel's.

Inside a listed block the flash options still hold (causal, windows, padding, ALiBi, RoPE): a
listed block past the diagonal costs nothing; a block not listed is never loaded; a row that
sees no key gets zeros. Block sizes must be multiples of flash_launch.SPARSE_TILE (64 on a GPU,
32 under the interpreter), so that each kernel tile lies inside one block.
"""

from __future__ import annotations

import torch

from attnbench.kernels.block_mask import BlockLists, blocks
from attnbench.kernels.flash import attend, check_inputs
from attnbench.kernels.flash_launch import SPARSE_TILE


def _check_lists(lists: BlockLists, b: int, hq: int, t: int, s: int) -> None:
    if lists.block <= 0 or lists.block % SPARSE_TILE:
        raise ValueError(f"the block size must be a positive multiple of {SPARSE_TILE}, got {lists.block}")
    nq, nk = blocks(t, lists.block), blocks(s, lists.block)
    shapes = {"kv_num": (nq,), "kv_idx": (nq, nk), "q_num": (nk,), "q_idx": (nk, nq)}
    for name, tail in shapes.items():
        shape = tuple(getattr(lists, name).shape)
        if len(shape) != 2 + len(tail) or shape[0] not in (1, b) or shape[1] not in (1, hq) or shape[2:] != tail:
            raise ValueError(f"{name} must have shape [B or 1, Hq or 1, {', '.join(map(str, tail))}] for T={t}, S={s}, "
                             f"block {lists.block}; got {shape}")


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lists: BlockLists,
    *,
    causal: bool = False,
    seq_lens: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    slopes: torch.Tensor | None = None,
    theta: float | None = None,
    offset: int = 0,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention over the listed blocks only, differentiable in q, k and v: o [B, T, Hq, D].

    q [B, T, Hq, D], k/v [B, S, Hkv, D], fp16/bf16/fp32, any strides, GQA as flash_attention;
    lists: block_lists of a block mask [B or 1, Hq or 1, cdiv(T, block), cdiv(S, block)];
    every other option is flash_attention's and applies inside the listed blocks (causal:
    query i at position i + S - T sees keys j <= it).
    """
    check_inputs(q, k, v, seq_lens, window, slopes, theta, scale)
    (b, t, hq, _), s = q.shape, k.shape[1]
    _check_lists(lists, b, hq, t, s)
    options = {"causal": causal, "seq_lens": seq_lens, "window": window, "slopes": slopes, "theta": theta, "offset": offset, "scale": scale}
    return attend(q, k, v, options, lists=lists.expanded(b, hq), block=lists.block)
