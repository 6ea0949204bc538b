"""The flash kernels as torch.library custom ops (attnbench::flash_fwd, attnbench::flash_bwd in
kernels/flash.py): torch.library.opcheck (schema, fake kernel against the real one, autograd
registration, AOT dispatch with dynamic shapes) at tiny sizes, and torch.compile(fullgraph=True)
of the public functions, whose output and gradients must equal eager mode's bit for bit (the
same kernels on the same inputs). On CPU the kernels run under TRITON_INTERPRET=1 and the
compile backend is aot_eager (Dynamo and AOTAutograd, no codegen); on a GPU it is inductor."""

from __future__ import annotations

import pytest
import torch

from attnbench.kernels import reference
from attnbench.kernels.block_mask import block_lists
from attnbench.kernels.block_sparse import block_sparse_attention
from attnbench.kernels.flash import flash_attention, flash_attention_packed
from attnbench.kernels.flash_launch import SPARSE_TILE

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "inductor" if DEVICE == "cuda" else "aot_eager"


def _randn(generator, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=generator).to(DEVICE, dtype)


def _op_arguments(q, k, v, seq_lens=None, slopes=None, causal=False, window=None, theta=None, offset=0, scale=None):
    """flash_fwd's arguments after q, k, v (dense: no block lists)."""
    return (seq_lens, slopes, None, None, None, None, causal, window, theta, offset, scale, 0)


OPCHECK_CASES = {
    "causal-fp32": dict(dtype=torch.float32, heads=2, kv_heads=2, options={"causal": True}),
    "gqa-rope-alibi-padding-window-bf16": dict(
        dtype=torch.bfloat16, heads=4, kv_heads=2,
        options={"causal": True, "window": [9, 0], "theta": 1e4, "offset": 2, "scale": 0.2,
                 "seq_lens": torch.tensor([19, 11], device=DEVICE), "slopes": reference.alibi_slopes(4).to(DEVICE)},
    ),
}


@pytest.mark.parametrize("name", list(OPCHECK_CASES))
def test_custom_ops_pass_opcheck(name):
    case = OPCHECK_CASES[name]
    generator = torch.Generator().manual_seed(0)
    q = _randn(generator, 2, 19, case["heads"], 16, dtype=case["dtype"])
    k, v = (_randn(generator, 2, 23, case["kv_heads"], 16, dtype=case["dtype"]) for _ in range(2))
    options = _op_arguments(q, k, v, **case["options"])
    leaves = tuple(x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.attnbench.flash_fwd.default, (*leaves, *options))
    with torch.no_grad():
        o, lse, q_rotated, k_rotated = torch.ops.attnbench.flash_fwd(q, k, v, *options)
    rope = case["options"].get("theta") is not None
    assert (q_rotated.shape, k_rotated.shape) == ((q.shape, k.shape) if rope else ((0,), (0,))), "rotated q, k only with RoPE"
    saved = (q_rotated, k_rotated) if rope else (q.detach(), k.detach())
    do = _randn(generator, *o.shape, dtype=o.dtype)
    torch.library.opcheck(torch.ops.attnbench.flash_bwd.default, (*saved, v.detach(), o, lse, do, *options))


def _grads_of(fn, inputs, do):
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = fn(*inputs)
    return (out, *torch.autograd.grad(out, inputs, do))


def _dense(q, k, v):
    return flash_attention(q, k, v, causal=True, window=(13, 0), theta=1e4)


def _packed(qkv):
    return flash_attention_packed(qkv, 4, causal=True, theta=1e4)


def _sparse(q, k, v):
    mask = torch.tensor([[True, False, True], [False, True, True], [True, True, True]], device=DEVICE)
    return block_sparse_attention(q, k, v, block_lists(mask[None, None], SPARSE_TILE), causal=True)


COMPILE_CASES = {"dense-gqa-rope-window": (_dense, "split"), "packed-rope": (_packed, "packed"), "block-sparse": (_sparse, "split")}


@pytest.mark.parametrize("name", list(COMPILE_CASES))
def test_compiled_fullgraph_equals_eager(name):
    fn, layout = COMPILE_CASES[name]
    generator = torch.Generator().manual_seed(1)
    t = 3 * SPARSE_TILE - 5
    qkv = _randn(generator, 2, t, 8, 32, dtype=torch.bfloat16)
    inputs = [qkv] if layout == "packed" else list(qkv.split((4, 2, 2), dim=2))
    do = _randn(generator, 2, t, 4, 32, dtype=torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend=BACKEND)  # fullgraph: a graph break raises
    for mine, eager, label in zip(_grads_of(compiled, inputs, do), _grads_of(fn, inputs, do), ("o", "grad 1", "grad 2", "grad 3")):
        assert torch.equal(mine, eager), f"{label}: compiled and eager differ"
