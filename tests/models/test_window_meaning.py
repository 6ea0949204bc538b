"""``--window W`` means one set of visible pairs everywhere (LayerConfig.window, models/registry.py):
query t sees keys t - W .. t (bidirectional: t - W .. t + W). Every impl of ``window`` that runs
on CPU (triton under TRITON_INTERPRET=1, flex uncompiled), its decode steps, nsa's sliding branch
and both FLOP counts are probed against that definition. Probe: k = 0 makes every visible score
equal and v[s] = e_s (one-hot, D >= T), so o[t]'s nonzero entries are exactly the keys t sees."""

import dataclasses
import functools

import pytest
import torch

from attnbench.kernels.decode import decode_attention
from attnbench.models import decode, peers, registry
from attnbench.models.attention import nsa, window
from attnbench.models.softmax import window_option

T, W, D = 13, 4, 16  # awkward: T no multiple of any tile, W + 1 no divisor of T
HQ, HKV = 2, 1


def definition(causal: bool) -> torch.Tensor:
    """bool [T, T]: key s visible to query t."""
    t, s = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (s >= t - W) & (s <= t + (0 if causal else W))


def probe(heads: int = HQ, dim: int = D, **like) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, T, heads, dim] random, k [1, T, Hkv, dim] zero, v [1, T, Hkv, dim] with v[s] = e_s
    (``like``: dtype, device)."""
    q = torch.randn(1, T, heads, dim).to(**like)
    k = torch.zeros(1, T, HKV, dim).to(**like)
    v = torch.eye(T, dim).view(1, T, 1, dim).expand(1, T, HKV, dim).contiguous().to(**like)
    return q, k, v


def seen(o: torch.Tensor) -> torch.Tensor:
    """o [1, T, Hq, D] of the probe -> bool [T, T], the keys each query saw (the same in every head)."""
    heads = (o[0, :, :, :T] != 0).cpu()  # (T, Hq, T)
    assert torch.equal(heads, heads[:, :1].expand_as(heads)), "heads saw different keys"
    return heads[:, 0]


def cfg(causal: bool) -> registry.LayerConfig:
    return registry.LayerConfig(dim=HQ * D, heads=HQ, kv_heads=HKV, causal=causal, window=W)


def window_impls() -> dict:
    """Every impl of ``window`` that runs here: those free on CPU, triton (the interpreter), flex uncompiled."""
    impls = registry.get("window").impls
    runs = {name: impl.run for name, impl in impls.items() if impl.why_not(cfg(True), "cpu", torch.float32) is None}
    runs["triton"] = impls["triton"].run
    runs["flex-eager"] = functools.partial(peers.flex, compiled=False)
    return runs


def test_the_definition_has_w_keys_before_the_query_and_the_query():
    assert int(definition(True)[-1].sum()) == W + 1
    assert int(definition(False)[T // 2].sum()) == 2 * W + 1


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("impl", sorted(window_impls()))
def test_window_impls_see_the_definitions_pairs(impl, causal):
    q, k, v = probe()
    o = window_impls()[impl](q, k, v, causal=causal, **window.sliding_options(cfg(causal)))
    assert torch.equal(seen(o), definition(causal))


@pytest.mark.cuda
@pytest.mark.parametrize("mechanism", ["window", "nsa"])
def test_fla_sees_the_definitions_pairs(mechanism):
    """fla's adapters translate W: window's into parallel_attn's window_size, nsa's (its sliding
    branch alone, gated 1) into our flash kernel's bounds; GQA 16:1 for parallel_nsa."""
    pytest.importorskip("fla.ops.nsa" if mechanism == "nsa" else "fla.ops.attn")
    q, k, v = probe(heads=16, dim=64, dtype=torch.bfloat16, device="cuda")
    layer = registry.LayerConfig(dim=16 * 64, heads=16, kv_heads=HKV, causal=True, window=W)
    if mechanism == "window":
        options = window.sliding_options(layer)
    else:
        gates = torch.zeros(1, T, 16, 3, dtype=torch.bfloat16, device="cuda")
        gates[..., 2] = 1
        options = {**nsa.nsa_options(dataclasses.replace(layer, options={"block": 16, "topn": 1})), "gates": gates}
    o = registry.get(mechanism).impl("fla").run(q, k, v, causal=True, **options)
    assert torch.equal(seen(o), definition(True))


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_decode_steps_see_the_definitions_pairs(kernel):
    """All T tokens as new queries of one decode step on a cache holding them, the window
    translated as a causal layer's is (decode.step_options)."""
    q, k, v = probe()
    step = decode.softmax_step if kernel == "torch" else decode_attention
    o = step(q, k, v, torch.tensor([T]), **decode.step_options(window_option(cfg(True))))
    assert torch.equal(seen(o), definition(True))


@pytest.mark.parametrize("impl", ["torch", "chunked"])
def test_nsa_sliding_branch_sees_the_definitions_pairs(impl):
    q, k, v = probe()
    sliding_only = torch.zeros(1, T, HQ, 3)
    sliding_only[..., 2] = 1
    options = {**nsa.nsa_options(dataclasses.replace(cfg(True), options={"block": 4, "topn": 2, "chunk": 5})), "gates": sliding_only}
    o = nsa.IMPLS[impl].run(q, k, v, causal=True, **options)
    assert torch.equal(seen(o), definition(True))


def test_flop_counts_take_the_definitions_pairs():
    pairs = {causal: int(definition(causal).sum()) for causal in (True, False)}
    per_pair = 4 * HQ * D
    for causal in (True, False):
        assert registry.get("window").flops(cfg(causal), 1, T) == per_pair * pairs[causal]
    # nsa with one block longer than T: no compressed pair, the selected branch all T (T + 1) / 2 causal pairs
    wide = dataclasses.replace(cfg(True), options={"block": T + 1, "topn": 1})
    assert nsa.MECHANISM.flops(wide, 1, T) == per_pair * (T * (T + 1) // 2 + pairs[True])
