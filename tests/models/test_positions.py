"""Position schemes as an axis (models/positions.py): every mechanism x scheme cell either builds
and trains or says why not; natural schemes leave existing models as they were; RoPE and ALiBi
compute what their definitions say on every core that takes them."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from subquadratic_checks import assert_matches_reference, random_qkv

from attnbench.kernels import reference
from attnbench.models import positions, registry
from attnbench.models.attention import block, bsbr, hopfield, linear, nsa, topk
from attnbench.models.registry import LayerConfig, UnknownNameError
from attnbench.models.transformer import ModelConfig, build_model
from attnbench.tolerance import relative_bound

VOCAB, SEQ = 64, 16
# options small enough that every part of each mechanism is used at T = 16 (bsbr retrieves
# across chunks, nsa selects among blocks, gau mixes across chunks, topk drops keys)
TINY_OPTIONS = {
    "bsbr": {"chunk": 4},
    "nsa": {"block": 4, "topn": 2, "window": 8, "chunk": 8},
    "gau": {"chunk": 8},
    "topk": {"topk": 4, "chunk": 8},
    "block": {"block": 8},
    "learned": {"block": 4},  # T = 16: four key blocks, so the scorer has off-diagonal blocks to gate
    "performer": {"features": 32},
}
TINY_WINDOW = {"window": 4}
# every cell a mechanism refuses: a cell that starts or stops working shows here
UNSUPPORTED = {
    "alibi": {"learned", "sinusoidal", "rope", "none"},
    "rope": {"learned", "sinusoidal", "alibi", "none"},
    "exposb": {"learned", "sinusoidal", "rope", "alibi", "none"},
    "stickbreaking": {"learned", "sinusoidal", "rope", "alibi", "none"},
    "linear": {"alibi"},
    "performer": {"alibi"},
    "deltanet": {"alibi"},
    "gau": {"alibi"},
    "learned": {"alibi"},
}


def _tiny(name: str, task: str, **kwargs):
    """The tiny model at T = 16; the global generator is reset first, for the parameters that
    init_weights leaves to their module (gau's scales, bsbr's compression)."""
    torch.manual_seed(0)
    window = TINY_WINDOW if name == "window" else {}
    return build_model("tiny", name, task=task, seq=SEQ, vocab_size=VOCAB, attention=TINY_OPTIONS.get(name, {}), **window, **kwargs)


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def test_the_unsupported_cells_are_exactly_the_listed_ones():
    found = {
        name: {scheme for scheme in positions.SCHEMES if positions.why_not(mechanism, scheme)}
        for name, mechanism in registry.mechanisms().items()
    }
    assert {name: cells for name, cells in found.items() if cells} == UNSUPPORTED


@pytest.mark.parametrize("task", ["clm", "mlm"])
@pytest.mark.parametrize("scheme", positions.SCHEMES)
@pytest.mark.parametrize("name", list(registry.mechanisms()))
def test_every_cell_trains_or_says_why_not(name, scheme, task):
    mechanism = registry.get(name)
    reason = positions.why_not(mechanism, scheme)
    if reason is not None:
        assert scheme in UNSUPPORTED[name] and "\n" not in reason and len(reason) < 120
        with pytest.raises(ValueError, match=f"^{re.escape(reason)}$"):
            _tiny(name, task, positions=scheme)
        return
    if (task == "clm" and not mechanism.causal) or (task == "mlm" and not mechanism.bidirectional):
        pytest.skip(f"{name} has no {task} form")
    model = _tiny(name, task, positions=scheme)
    assert model.cfg.positions == scheme and asdict(model.cfg)["positions"] == scheme
    logits = model(_ids())
    assert logits.shape == (2, SEQ, VOCAB) and torch.isfinite(logits).all()
    (logits.float().square().mean()).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {pname}"


@pytest.mark.parametrize("task", ["clm", "mlm"])
@pytest.mark.parametrize("name", list(registry.mechanisms()))
def test_no_scheme_is_the_natural_scheme(name, task):
    mechanism = registry.get(name)
    if (task == "clm" and not mechanism.causal) or (task == "mlm" and not mechanism.bidirectional):
        pytest.skip(f"{name} has no {task} form")
    default, natural = _tiny(name, task), _tiny(name, task, positions=mechanism.position)
    assert default.cfg == natural.cfg and default.cfg.positions == mechanism.position
    assert default.state_dict().keys() == natural.state_dict().keys()
    for key, value in default.state_dict().items():
        assert torch.equal(value, natural.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(default(_ids()), natural(_ids()))


@pytest.mark.parametrize("task", ["clm", "mlm"])
@pytest.mark.parametrize("scheme", ["rope", "alibi"])
def test_the_rope_and_alibi_mechanisms_are_standard_with_that_scheme(scheme, task):
    named, standard = _tiny(scheme, task), _tiny("standard", task, positions=scheme)
    assert named.trunk.embeddings.positions is None and standard.trunk.embeddings.positions is None
    assert named.state_dict().keys() == standard.state_dict().keys()
    for key, value in named.state_dict().items():
        assert torch.equal(value, standard.state_dict()[key]), key
    with torch.no_grad():
        assert torch.equal(named(_ids()), standard(_ids()))
        assert not torch.allclose(standard(_ids()), _tiny("standard", task, positions="none")(_ids()))


def test_embedded_schemes_live_in_the_embeddings():
    learned, sinusoidal, none = (_tiny("linear", "mlm", positions=s) for s in ("learned", "sinusoidal", "none"))
    assert learned.trunk.embeddings.positions.weight.shape == (SEQ, 128) and learned.cfg.max_length == SEQ
    assert sinusoidal.trunk.embeddings.positions is None and sinusoidal.cfg.max_length is None
    # none: a bidirectional model without positions is equivariant to permuting its tokens (float64)
    ids, order = _ids(), torch.randperm(SEQ)

    def moved(model) -> float:
        model = model.double()
        return (model(ids[:, order]) - model(ids)[:, order]).abs().max().item()

    with torch.no_grad():
        assert moved(none) < 1e-12
        for model in (learned, sinusoidal, _tiny("linear", "mlm", positions="rope")):
            assert moved(model) > 1e-6


def test_sinusoidal_positions_are_on_the_token_embeddings_scale():
    """Added raw, Vaswani's table (rms 1/sqrt(2)) would outweigh N(0, 0.02) token embeddings 35 to 1."""
    from attnbench.models.transformer import INIT_STD, sinusoidal_positions

    table = sinusoidal_positions(512, 128, torch.device("cpu"))
    tokens = _tiny("standard", "clm", positions="sinusoidal").trunk.embeddings.tokens.weight
    assert table.pow(2).mean().sqrt().item() == pytest.approx(INIT_STD, rel=0.02)
    assert table.pow(2).mean().sqrt().item() == pytest.approx(tokens.pow(2).mean().sqrt().item(), rel=0.1)
    assert table[1, 0].item() == pytest.approx(INIT_STD * 2 ** 0.5 * math.sin(1.0), rel=1e-5)  # still sin(pos) on channel 0


def test_invalid_cells_and_names_are_refused():
    with pytest.raises(ValueError, match="no score matrix to bias"):
        build_model("tiny", "linear", positions="alibi")
    with pytest.raises(ValueError, match="exposb encodes positions itself"):
        build_model("tiny", "exposb", positions="learned")
    with pytest.raises(ValueError, match="use standard"):
        build_model("tiny", "rope", positions="alibi")
    with pytest.raises(UnknownNameError, match="valid: learned, sinusoidal, rope, alibi, none"):
        build_model("tiny", "standard", positions="xpos")
    with pytest.raises(ValueError, match="no score matrix"):
        registry.build_layer("performer", LayerConfig(dim=32, heads=4, positions="alibi"))
    with pytest.raises(ValueError, match="rope, alibi or none"):
        LayerConfig(dim=32, heads=4, positions="learned")


def test_runs_recorded_before_the_axis_load_as_they_were_trained():
    """Committed runs recorded ``learned`` for rope, alibi and exposb (the embedding they did not use)."""
    meta = json.loads((Path(__file__).parents[2] / "results/reference-h100/gpt-small/meta.json").read_text())
    for name, entry in meta["models"].items():
        cfg = ModelConfig(**entry["config"])
        assert cfg.positions == registry.get(name).position
    assert ModelConfig(**{**meta["models"]["rope"]["config"], "positions": "inside"}).layer_config().positions is None


def test_scheme_options_are_declared_for_the_scheme():
    _, options = registry.get("linear").split_options({"theta": 500.0, "chunk": 8, "topk": 3}, scheme="rope")
    assert options == {"theta": 500.0, "chunk": 8}
    assert registry.get("linear").split_options({"theta": 500.0})[1] == {}
    registry.check_options(["linear"], {"theta": 1.0}, schemes=("rope",))
    with pytest.raises(UnknownNameError):
        registry.check_options(["linear"], {"theta": 1.0})


def test_sdpa_flash_refuses_alibi_from_the_config():
    def why(name, **cfg):
        return registry.get(name).impl("sdpa-flash").unsupported(LayerConfig(dim=64, heads=2, **cfg), torch.device("cuda"), torch.bfloat16)

    assert "ALiBi" in why("standard", positions="alibi") and "ALiBi" in why("alibi")
    assert why("standard", positions="rope") is None and why("standard") is None and why("rope") is None
    assert "window" in why("window", positions="rope") and "window" in why("standard", window=8)


# --- RoPE: the layer rotates q and k before any core that does not rotate itself ---------------

def _layer_pair(name: str, causal: bool, scheme: str, **options):
    """The layer of ``name`` with ``scheme`` and the same layer without, identical weights (float64)."""
    kv_heads = 2 if registry.get(name).gqa else 4
    base = dict(dim=64, heads=4, kv_heads=kv_heads, causal=causal, options={**TINY_OPTIONS.get(name, {}), **options})
    with_scheme = registry.build_layer(name, LayerConfig(**base, positions=scheme)).double()
    plain = registry.build_layer(name, LayerConfig(**base)).double()
    plain.load_state_dict(with_scheme.state_dict())
    return with_scheme, plain


def test_rope_on_linear_is_linear_attention_on_q_and_k_rotated_by_hand():
    theta = 500.0
    cfg = LayerConfig(dim=32, heads=4, kv_heads=2, causal=True, positions="rope", options={"theta": theta})
    layer = registry.build_layer("linear", cfg).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    q, k, v = layer.qkv(x).view(2, 13, 8, 8).split([4, 2, 2], dim=2)
    cos, sin = reference.rope_angles(torch.arange(13), 8, theta)  # position t, pair i: t * theta^(-2i/8)
    half = 4

    def rotated(z):
        c, s = cos[None, :, None].double(), sin[None, :, None].double()
        return torch.cat([z[..., :half] * c - z[..., half:] * s, z[..., half:] * c + z[..., :half] * s], dim=-1)

    expected = layer.out(linear.torch_reference(rotated(q), rotated(k), v, causal=True).reshape(2, 13, 32))
    assert torch.allclose(layer(x), expected, rtol=1e-12, atol=1e-12)
    unrotated = layer.out(linear.torch_reference(q, k, v, causal=True).reshape(2, 13, 32))
    assert not torch.allclose(expected, unrotated, atol=1e-3), "the rotation changed nothing"


ROPE_CORES = [  # every q/k core whose natural scheme is an embedding and which takes RoPE
    name for name, m in registry.mechanisms().items()
    if m.has_core and m.position == "learned" and positions.why_not(m, "rope") is None
]


@pytest.mark.parametrize("name", ROPE_CORES)
def test_rope_is_the_core_on_rotated_q_and_k(name):
    causal = registry.get(name).causal
    with_rope, plain = _layer_pair(name, causal, "rope", theta=300.0)
    q, k, v = (x.detach() for x in random_qkv(t=19))
    rq, rk = reference.rope(q, 300.0), reference.rope(k, 300.0)
    assert torch.allclose(with_rope.attend(q, k, v), plain.attend(rq, rk, v), rtol=1e-10, atol=1e-12)
    assert not torch.allclose(with_rope.attend(q, k, v), plain.attend(q, k, v), atol=1e-4)


def test_rope_on_gau_rotates_its_four_projections():
    with_rope, plain = _layer_pair("gau", True, "rope")
    x = torch.randn(2, 19, 64, dtype=torch.float64)
    u, v = torch.nn.functional.silu(plain.uv(x)).chunk(2, dim=-1)
    z = torch.nn.functional.silu(plain.z(x))
    parts = [reference.rope(p[:, :, None], positions.DEFAULT_THETA)[:, :, 0] for p in (z[:, :, None] * plain.gamma + plain.beta).unbind(2)]
    expected = plain.out(u * plain.mix(*parts, v, causal=True, chunk=plain.chunk))
    assert torch.allclose(with_rope(x), expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(with_rope(x), plain(x), atol=1e-6)


# --- ALiBi: on every score matrix before a softmax ---------------------------------------------

@pytest.mark.parametrize("impl", ["torch", "sdpa", "sdpa-math"])
@pytest.mark.parametrize("causal", [True, False])
def test_alibi_on_window_is_the_softmax_reference_with_the_bias_and_the_band(causal, impl):
    cfg = LayerConfig(dim=32, heads=4, kv_heads=2, causal=causal, window=5, impl=impl, positions="alibi")
    layer = registry.build_layer("window", cfg).double()
    q, k, v = (x.detach() for x in random_qkv(t=23))
    expected = reference.attention(q, k, v, causal=causal, window=cfg.window_bounds, slopes=reference.alibi_slopes(4))
    assert torch.allclose(layer.attend(q, k, v), expected, rtol=1e-10, atol=1e-12)
    no_bias = reference.attention(q, k, v, causal=causal, window=cfg.window_bounds)
    assert not torch.allclose(expected, no_bias, atol=1e-3)


def _slopes():
    return reference.alibi_slopes(4).double()


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_on_topk_keeping_every_key_is_softmax_with_alibi(causal):
    q, k, v = (x.detach() for x in random_qkv(t=21))
    expected = reference.attention(q, k, v, causal=causal, slopes=_slopes())
    for run in (topk.torch_reference, topk.chunked):
        assert torch.allclose(run(q, k, v, causal=causal, topk=21, chunk=8, slopes=_slopes()), expected, rtol=1e-10, atol=1e-12)
    assert_matches_reference(topk.chunked, topk.torch_reference, random_qkv(t=21), causal=causal, topk=5, chunk=8, slopes=_slopes())


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_on_block_is_softmax_with_alibi_within_blocks(causal):
    q, k, v = (x.detach() for x in random_qkv(t=21))
    expected = reference.attention(q, k, v, causal=causal, slopes=_slopes())
    assert torch.allclose(block.torch_reference(q, k, v, causal=causal, block=32, slopes=_slopes()), expected, rtol=1e-10, atol=1e-12)
    seq_lens = torch.tensor([21, 13])
    assert_matches_reference(
        block.sdpa_blocks, block.torch_reference, random_qkv(t=21), causal=causal, block=8, slopes=_slopes(), seq_lens=seq_lens
    )


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_on_bsbr_biases_the_in_chunk_part_only(causal):
    layer, _ = _layer_pair("bsbr", causal, "alibi", chunk=8)
    options = {**layer.core_options(), "slopes": _slopes()}
    q, k, v = (x.detach() for x in random_qkv(t=21))
    without = {**options, "slopes": None}
    change = bsbr.torch_reference(q, k, v, causal=causal, **options) - bsbr.torch_reference(q, k, v, causal=causal, **without)
    kv = [x.repeat_interleave(2, dim=2) for x in (k, v)]
    local_change = (
        block.torch_reference(q, *kv, causal=causal, block=8, slopes=_slopes()) - block.torch_reference(q, *kv, causal=causal, block=8)
    )
    assert torch.allclose(change, local_change, rtol=1e-10, atol=1e-12) and change.abs().max() > 1e-3
    fixed = {name: x.detach() if isinstance(x, torch.Tensor) else x for name, x in options.items()}
    assert_matches_reference(bsbr.chunked, bsbr.torch_reference, random_qkv(t=21), causal=causal, **fixed)


@pytest.mark.parametrize("causal", [True, False])
def test_alibi_on_hopfield_biases_every_step(causal):
    q, k, v = (x.detach() for x in random_qkv(t=21))
    beta = torch.full((4,), 16**-0.5, dtype=torch.float64)
    one_step = hopfield.torch_reference(q, k, v, causal=causal, beta=beta, n_steps=1, slopes=_slopes())
    assert torch.allclose(one_step, reference.attention(q, k, v, causal=causal, slopes=_slopes()), rtol=1e-10, atol=1e-12)
    assert_matches_reference(
        hopfield.sdpa_steps, hopfield.torch_reference, random_qkv(t=21), causal=causal, beta=beta * 2, n_steps=2, slopes=_slopes()
    )


def test_alibi_on_nsa_biases_each_branch():
    q, k, v = (x.detach() for x in random_qkv(t=21))
    sliding_only = torch.zeros(2, 21, 4, 3, dtype=torch.float64)
    sliding_only[..., 2] = 1
    got = nsa.torch_reference(q, k, v, gates=sliding_only, block=4, topn=2, window=6, slopes=_slopes())
    assert torch.allclose(got, reference.attention(q, k, v, causal=True, window=(6, 0), slopes=_slopes()), rtol=1e-10, atol=1e-12)
    selected_only = sliding_only.roll(-1, dims=-1)  # every block selected when topn covers them all
    got = nsa.torch_reference(q, k, v, gates=selected_only, block=4, topn=6, window=6, slopes=_slopes())
    assert torch.allclose(got, reference.attention(q, k, v, causal=True, slopes=_slopes()), rtol=1e-10, atol=1e-12)
    for gates in (None, sliding_only.roll(-2, dims=-1)):  # all branches, and the compressed one alone
        options = dict(gates=gates, block=4, topn=2, window=6, chunk=8)
        biased = nsa.torch_reference(q, k, v, **options, slopes=_slopes())
        assert not torch.allclose(biased, nsa.torch_reference(q, k, v, **options), atol=1e-4)
        assert_matches_reference(nsa.chunked, nsa.torch_reference, random_qkv(t=21), **options, slopes=_slopes())


# --- the softmax family's fused kernels: windows x schemes x GQA -------------------------------

@pytest.mark.parametrize("scheme", ["rope", "alibi"])
@pytest.mark.parametrize("causal", [True, False])
def test_triton_window_layer_serves_every_scheme_with_gqa(scheme, causal):
    """The window layer on our Triton kernel (the interpreter on CPU) in float32 against the same
    weights on the torch impl in float64: output and the gradients of x and the projection
    (tests/kernels/test_flash.py checks the kernel alone in bf16)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfgs = [LayerConfig(dim=64, heads=4, kv_heads=2, causal=causal, window=6, impl=impl, positions=scheme) for impl in ("triton", "torch")]
    ours = registry.build_layer("window", cfgs[0]).to(device)
    exact = registry.build_layer("window", cfgs[1]).to(device, torch.float64)
    exact.load_state_dict(ours.state_dict())
    x = torch.randn(2, 37, 64, device=device)
    upstream = torch.randn(2, 37, 64, device=device)
    results = []
    for layer, dtype in ((ours, torch.float32), (exact, torch.float64)):
        inputs = x.to(dtype).requires_grad_()
        y = layer(inputs)
        results.append([y, *torch.autograd.grad(y, (inputs, layer.qkv.weight), upstream.to(dtype))])
    for label, got, expected in zip(("output", "dx", "dW_qkv"), *results):
        error = (got.double() - expected).abs().max().item()
        bound = relative_bound(2e-5, expected.abs().max().item())  # the fp32 bound of tests/kernels/test_flash.py
        assert error <= bound, f"{label}: error {error:.3g} > bound {bound:.3g}"
