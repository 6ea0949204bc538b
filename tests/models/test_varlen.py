"""The packed variable-length cores (registry.Varlen; `speed --lengths`): each sequence of a pack
attends to itself alone at positions 0 .. L - 1. torch against the same sequences as a padded
batch with key padding; flex (uncompiled) and SDPA on jagged nested tensors against torch, where
torch runs them on CPU, and the refusals their reasons name are the ones torch makes. Forward and
every gradient, float32 against float64 within 2x plain torch's own float32 error (bench/tolerance.py).
The triton impl (kernels/flash.py flash_attention_varlen) is tested with its kernel."""

import functools
import os

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from attnbench.kernels import reference
from attnbench.models import peers, registry
from attnbench.models.registry import LayerConfig
from attnbench.models.softmax import torch_reference, torch_varlen
from attnbench.speed.lengths import cu_seqlens
from attnbench.tolerance import error_bound

LENGTHS = [5, 1, 12, 7]  # a sequence of one token, and none a multiple of another
OPTION_SETS = {
    "plain": {},
    "window": {"window": (3, 2)},
    "alibi": {"slopes": reference.alibi_slopes(4)},
    "rope": {"theta": 10000.0},
}


def inputs(kv_heads: int, seed: int = 0, d: int = 16):
    """q [total, 4, d], k/v [total, kv_heads, d] and an upstream gradient, float64."""
    g = torch.Generator().manual_seed(seed)
    total = sum(LENGTHS)
    q, do = (torch.randn(total, 4, d, generator=g, dtype=torch.float64) for _ in range(2))
    k, v = (torch.randn(total, kv_heads, d, generator=g, dtype=torch.float64) for _ in range(2))
    return (q, k, v), do


def padded(q, k, v, **options):
    """The pack as a padded batch [N, longest] with key padding through the definition; each
    sequence's rows back end to end: what the pack must equal."""
    spans = cu_seqlens(LENGTHS).tolist()
    pad = lambda x: pad_sequence([x[a:b] for a, b in zip(spans, spans[1:])], batch_first=True)  # noqa: E731
    o = torch_reference(pad(q), pad(k), pad(v), seq_lens=torch.tensor(LENGTHS), **options)
    return torch.cat([o[i, :length] for i, length in enumerate(LENGTHS)])


def bound_to_pack(bind, **options):
    """A Varlen bind -> a function of (q, k, v) over the pack of LENGTHS."""
    return bind(cu_seqlens(LENGTHS), max(LENGTHS), **options)


def outputs(run, tensors, do, dtype, device="cpu", backward=True):
    """o and (``backward``) the gradients of q, k, v of ``run`` on copies of ``tensors`` in ``dtype``."""
    leaves = [t.detach().to(device, dtype).requires_grad_(backward) for t in tensors]
    o = run(*leaves)
    if not backward:
        return [o.detach().cpu()]
    o.backward(do.to(device, dtype))
    return [o.detach().cpu(), *(t.grad.cpu() for t in leaves)]


def assert_close(name, got, exact, plain):
    """Each of o, dq, dk, dv of ``got`` (float32) within 2x ``plain`` torch's float32 error of ``exact``."""
    for label, g, e, p in zip(("o", "dq", "dk", "dv"), got, exact, plain):
        bound = error_bound((p.double() - e).abs().max().item(), e.abs().max().item(), torch.float32)
        err = (g.double() - e).abs().max().item()
        assert err <= bound, f"{name} {label}: error {err:.3g} over the bound {bound:.3g}"


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_torch_attends_each_packed_sequence_as_the_padded_batch_does(options, causal, kv_heads):
    tensors, do = inputs(kv_heads)
    kwargs = dict(causal=causal, **OPTION_SETS[options])
    exact = outputs(functools.partial(padded, **kwargs), tensors, do, torch.float64)
    plain = outputs(functools.partial(padded, **kwargs), tensors, do, torch.float32)
    got = outputs(bound_to_pack(torch_varlen, **kwargs), tensors, do, torch.float32)
    assert_close("torch", got, exact, plain)


def test_a_packed_sequence_sees_nothing_of_its_neighbours():
    (q, k, v), _ = inputs(4)
    run = bound_to_pack(torch_varlen, causal=False)
    before = run(q, k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:5], v2[:5] = 100.0, -100.0  # the first sequence's keys and values only
    after = run(q, k2, v2)
    assert not torch.allclose(after[:5], before[:5])
    assert torch.equal(after[5:], before[5:])


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flex_with_a_document_mask_is_the_definition(options, causal, kv_heads):
    """Forward only: FlexAttention has no backward on CPU (the CUDA test below checks the gradients)."""
    tensors, do = inputs(kv_heads, seed=1)
    kwargs = dict(causal=causal, **OPTION_SETS[options])
    exact, plain, got = (outputs(bound_to_pack(bind, **kwargs), tensors, do, dtype, backward=False) for bind, dtype in [
        (torch_varlen, torch.float64), (torch_varlen, torch.float32), (functools.partial(peers.flex_varlen, compiled=False), torch.float32)])
    assert_close("flex", got, exact, plain)


@pytest.mark.parametrize("options", OPTION_SETS)
@pytest.mark.parametrize("causal", [False, True])
def test_the_triton_impl_of_a_pack_is_the_definition_with_its_gradients(options, causal):
    """The speed sweep's triton bind (models/softmax.py) over the kernel, GQA 4:2, float32 under the
    interpreter on a CPU (the kernel's own tests: tests/kernels/test_flash_varlen.py)."""
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tensors, do = inputs(2, seed=4)
    kwargs = dict(causal=causal, **OPTION_SETS[options])
    exact, plain = (outputs(bound_to_pack(torch_varlen, **kwargs), tensors, do, dtype) for dtype in (torch.float64, torch.float32))
    bind = registry.get("standard").impl("triton").varlen.bind
    got = outputs(bind(cu_seqlens(LENGTHS, device), max(LENGTHS), **kwargs), tensors, do, torch.float32, device)
    assert_close("triton", [g.cpu() for g in got], exact, plain)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["triton", "flex", "sdpa", "sdpa-flash", "sdpa-efficient"])
@pytest.mark.parametrize("options", ["plain", "rope"])
@pytest.mark.parametrize("causal", [False, True])
def test_the_cuda_peers_of_a_pack_are_the_definition_with_their_gradients(impl, options, causal):
    """On CUDA: flex compiled and SDPA's fused backends on jagged nested tensors, in bf16 against
    float64 within 2x torch's own bf16 error (the fused SDPA backends compute in bf16 only)."""
    if impl.startswith("sdpa") and options == "rope" and impl != "sdpa":
        pytest.skip("one RoPE case per peer")
    tensors, do = inputs(4, seed=3, d=64)
    kwargs = dict(causal=causal, **OPTION_SETS[options])
    pack = cu_seqlens(LENGTHS, "cuda")
    impl_of = registry.get("standard").impl(impl)
    assert impl_of.why_not_varlen(LayerConfig(dim=256, heads=4, causal=causal), "cuda", torch.bfloat16) is None
    exact = outputs(bound_to_pack(torch_varlen, **kwargs), tensors, do, torch.float64)
    plain = outputs(torch_varlen(pack, max(LENGTHS), **kwargs), tensors, do, torch.bfloat16, "cuda")
    got = outputs(impl_of.varlen.bind(pack, max(LENGTHS), **kwargs), tensors, do, torch.bfloat16, "cuda")
    for label, g, e, p in zip(("o", "dq", "dk", "dv"), got, exact, plain):
        bound = error_bound((p.double() - e).abs().max().item(), e.abs().max().item(), torch.bfloat16)
        assert (g.double() - e).abs().max().item() <= bound, f"{impl} {label}"


def sdpa_pinned(backend: str | None):
    from torch.nn.attention import SDPBackend

    return functools.partial(peers.sdpa_varlen, backend=None if backend is None else getattr(SDPBackend, backend))


@pytest.mark.parametrize("options", ["plain", "rope"])
@pytest.mark.parametrize("backend", [None, "MATH"], ids=["sdpa", "sdpa-math"])
def test_sdpa_on_jagged_nested_tensors_is_the_definition_where_cpu_runs_it(options, backend):
    tensors, do = inputs(4, seed=2)
    kwargs = dict(causal=False, **OPTION_SETS[options])
    exact = outputs(bound_to_pack(torch_varlen, **kwargs), tensors, do, torch.float64)
    plain = outputs(bound_to_pack(torch_varlen, **kwargs), tensors, do, torch.float32)
    got = outputs(bound_to_pack(sdpa_pinned(backend), **kwargs), tensors, do, torch.float32)
    assert_close(f"sdpa backend {backend}", got, exact, plain)


@pytest.mark.parametrize("causal, kv_heads, reason", [
    (True, 4, "refuses is_causal on jagged nested tensors"),
    (False, 2, "takes no GQA"),
])
def test_what_sdpa_on_nested_tensors_is_said_to_refuse_torch_refuses(causal, kv_heads, reason):
    cfg = LayerConfig(dim=64, heads=4, kv_heads=kv_heads, causal=causal)
    impl = registry.get("standard").impl("sdpa")
    assert reason in impl.why_not_varlen(cfg, "cpu", torch.float32)
    (q, k, v), do = inputs(kv_heads)
    q, k, v = (t.float().requires_grad_() for t in (q, k, v))
    with pytest.raises(RuntimeError):
        bound_to_pack(peers.sdpa_varlen, causal=causal)(q, k, v).backward(do.float())


@pytest.mark.parametrize("options", ["window", "alibi"])
def test_sdpa_on_nested_tensors_takes_no_mask(options):
    with pytest.raises(ValueError, match="takes no mask"):
        bound_to_pack(peers.sdpa_varlen, causal=False, **OPTION_SETS[options])
    cfg = LayerConfig(dim=64, heads=4, causal=False, window=3 if options == "window" else None,
                      positions="alibi" if options == "alibi" else None)
    assert "takes no mask" in registry.get("standard").impl("sdpa").why_not_varlen(cfg, "cpu", torch.float32)


@pytest.mark.parametrize("mechanism", ["standard", "rope", "alibi", "window"])
def test_a_layer_over_a_pack_is_the_layer_over_each_sequence(mechanism):
    torch.manual_seed(0)
    cfg = LayerConfig(dim=32, heads=4, kv_heads=2, causal=True, window=3 if mechanism == "window" else None)
    layer = registry.build_layer(mechanism, cfg)
    x = torch.randn(sum(LENGTHS), 32, dtype=torch.float64)
    do = torch.randn_like(x)
    spans = cu_seqlens(LENGTHS).tolist()

    def each_sequence(x):
        return torch.cat([layer(x[None, a:b])[0] for a, b in zip(spans, spans[1:])])

    def packed(x):
        return layer.forward_varlen(x, layer.varlen_core(cu_seqlens(LENGTHS), max(LENGTHS)))

    results = {}
    for name, run, dtype in [("exact", each_sequence, torch.float64), ("plain", each_sequence, torch.float32),
                             ("packed", packed, torch.float32)]:
        layer.to(dtype).zero_grad()
        leaf = x.detach().to(dtype).requires_grad_()
        o = run(leaf)
        o.backward(do.to(dtype))
        results[name] = [o.detach(), leaf.grad, layer.qkv.weight.grad, layer.out.weight.grad]
    for label, g, e, p in zip(("o", "dx", "dW_qkv", "dW_out"), results["packed"], results["exact"], results["plain"]):
        bound = error_bound((p.double() - e).abs().max().item(), e.abs().max().item(), torch.float32)
        assert (g.double() - e).abs().max().item() <= bound, f"{mechanism} layer {label}"


def test_a_core_without_a_packed_form_is_refused_with_its_reason():
    cfg = LayerConfig(dim=32, heads=4, causal=True, impl="chunked")
    layer = registry.build_layer("linear", cfg)
    assert "no packed variable-length core" in registry.get("linear").impl("chunked").why_not_varlen(cfg, "cpu", torch.float32)
    with pytest.raises(ValueError, match="no packed variable-length core"):
        layer.varlen_core(cu_seqlens(LENGTHS), max(LENGTHS))
