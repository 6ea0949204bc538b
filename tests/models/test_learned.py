"""learned (models/attention/learned.py): open gates give standard attention with the same
weights, every parameter learns, a strong penalty makes the mask sparse, density counts causal
blocks only, and the triton impl (the block-sparse kernel, under the interpreter on CPU) equals
the torch form with the same hard gates."""

from __future__ import annotations

import pytest
import torch
from one_cpu_thread import one_cpu_thread  # noqa: F401

from attnbench.kernels.flash_launch import SPARSE_TILE
from attnbench.models import registry
from attnbench.models.attention import learned
from attnbench.models.registry import LayerConfig
from attnbench.tolerance import error_bound, relative_bound

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
FP32_TOLERANCE = 2e-5


def _layer(block=8, sinks=0, heads=4, kv_heads=2, dim=32, **kwargs):
    cfg = LayerConfig(dim=dim, heads=heads, kv_heads=kv_heads, causal=True, options={"block": block, "sinks": sinks}, **kwargs)
    return registry.build_layer("learned", cfg)


def _set_bias(layer, value: float) -> None:
    with torch.no_grad():
        layer.scorer.bias.fill_(value)


@pytest.mark.parametrize("t", [37, 5])
def test_open_gates_give_standard_attention_with_the_same_weights(t):
    layer = _layer()
    standard = registry.build_layer("standard", LayerConfig(dim=32, heads=4, kv_heads=2, causal=True))
    missing, unexpected = layer.load_state_dict(standard.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("scorer.") for name in missing), "q/k/v/out copy by name"
    _set_bias(layer, 100.0)
    x, lens = torch.randn(2, t, 32), torch.tensor([t, t - 3])
    expected = standard(x, seq_lens=lens)
    got = layer(x, seq_lens=lens)
    assert (layer.density() == 1).all()
    error = (got - expected).abs().max().item()
    assert error <= relative_bound(FP32_TOLERANCE, expected.abs().max().item()), error
    if t > 8:  # the check can fail: closed gates give another answer (one block: the diagonal only)
        _set_bias(layer, -100.0)
        assert (layer(x, seq_lens=lens) - expected).abs().max().item() > 1e-3


def test_a_new_layer_keeps_every_block():
    """The scorer starts open, so a student copied from its teacher starts as the teacher."""
    layer = _layer()
    layer(torch.randn(2, 64, 32))
    assert (layer.density() == 1).all()


def test_every_parameter_gets_a_gradient_from_output_loss_and_penalty():
    layer = _layer()
    y = layer(torch.randn(2, 37, 32), seq_lens=torch.tensor([37, 30]))
    (y.square().mean() + layer.sparsity_penalty()).backward()
    for name, p in layer.named_parameters():
        assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"


def test_the_output_loss_alone_reaches_the_scorer_through_the_gates():
    """Straight-through: the output's gradient reaches the scorer (not only the penalty's)."""
    layer = _layer()
    layer(torch.randn(2, 37, 32)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.scorer.parameters())


def test_a_strong_penalty_makes_the_mask_sparse():
    torch.manual_seed(0)
    teacher = registry.build_layer("standard", LayerConfig(dim=16, heads=2, causal=True))
    student = _layer(block=4, heads=2, kv_heads=2, dim=16)
    student.load_state_dict(teacher.state_dict(), strict=False)
    optimizer = torch.optim.Adam(student.parameters(), lr=0.03)
    data = torch.randn(8, 4, 32, 16)
    for step in range(200):
        x = data[step % len(data)]
        with torch.no_grad():
            target = teacher(x)
        loss = (student(x) - target).square().mean() + 5.0 * student.sparsity_penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        student(data[0])
    density = student.density()
    assert density.max() < 0.5, density
    assert (density >= 8 / 36).all(), "the diagonal blocks stay"


@pytest.mark.parametrize("sinks", [0, 1, 2])
def test_density_counts_causal_blocks_only(sinks):
    layer = _layer(block=8, sinks=sinks)
    x = torch.randn(2, 45, 32)  # 6 blocks, the last partial: 21 causal block pairs
    _set_bias(layer, -100.0)
    layer(x)
    forced = 6 + sum(min(sinks, i) for i in range(6))  # the diagonal, and the sinks before it
    assert torch.allclose(layer.density(), torch.full((4,), forced / 21))
    assert layer.sparsity_penalty().item() == 0.0
    _set_bias(layer, 100.0)
    layer(x)
    assert (layer.density() == 1).all(), "blocks past the diagonal never count"
    assert layer.visited_flops() == 4 * 4 * 8 * 2 * (45 * 46 // 2)


@pytest.mark.parametrize("t", [64, 70, 5])
def test_block_means_are_each_blocks_mean_on_strided_input(t):
    """Full blocks and a partial last one, on a q-like view of a packed qkv tensor (strided along H)."""
    x = torch.randn(2, t, 9, 8, generator=torch.Generator().manual_seed(3))[:, :, ::3]
    expected = torch.stack([x[:, start : start + 32].mean(1) for start in range(0, t, 32)], 1)
    assert torch.allclose(learned.block_means(x, 32), expected, atol=1e-6)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="block must be positive"):
        _layer(block=0)
    with pytest.raises(ValueError, match="sinks >= 0"):
        _layer(sinks=-1)
    with pytest.raises(ValueError, match="causal only"):
        registry.build_layer("learned", LayerConfig(dim=32, heads=4, causal=False))
    with pytest.raises(RuntimeError, match="after a forward"):
        _layer().density()


def test_triton_impl_runs_the_block_sparse_kernel_on_hard_gates():
    """The kernel (the interpreter on CPU) with hard gates against the torch form, bf16, GQA,
    an awkward T; and while the gates need a gradient it is the torch form itself."""
    generator = torch.Generator().manual_seed(0)
    block, t = SPARSE_TILE, 2 * SPARSE_TILE + 19
    q = torch.randn(2, t, 4, 32, generator=generator).bfloat16()
    k, v = (torch.randn(2, t, 2, 32, generator=generator).bfloat16() for _ in range(2))
    n = -(-t // block)
    gates = (torch.rand(2, 4, n, n, generator=generator) < 0.5).float()
    gates[:, :, torch.arange(n), torch.arange(n)] = 1.0
    lens = torch.tensor([t, t - 40])
    with torch.no_grad():
        got = learned.triton_block_sparse(q, k, v, gates=gates, block=block, seq_lens=lens)
        exact = learned.gated_reference(q.double(), k.double(), v.double(), gates=gates, block=block, seq_lens=lens)
        plain = learned.gated_reference(q, k, v, gates=gates, block=block, seq_lens=lens)
    bound = error_bound((plain.double() - exact).abs().max().item(), exact.abs().max().item(), torch.bfloat16)
    assert (got.double() - exact).abs().max().item() <= bound
    soft = gates.clone().requires_grad_()
    out = learned.triton_block_sparse(q.float(), k.float(), v.float(), gates=soft, block=block)
    out.sum().backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0


@pytest.mark.cuda
def test_triton_layer_at_evaluation_equals_the_torch_layer():
    """Heads open and closed by their bias (gates that no precision flips): the bf16 triton layer
    against the float64 torch layer, within 2x the bf16 torch layer's error."""
    torch.manual_seed(0)
    cfg = dict(dim=256, heads=4, kv_heads=2, causal=True, options={"block": 64})
    ours = registry.build_layer("learned", LayerConfig(**cfg, impl="triton")).cuda().bfloat16().eval()
    plain = registry.build_layer("learned", LayerConfig(**cfg, impl="torch")).cuda().eval()
    with torch.no_grad():
        ours.scorer.bias.copy_(torch.tensor([100.0, -100.0, 100.0, -100.0]))
    plain.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1000, 256, device="cuda")
    with torch.no_grad():
        got = ours(x.bfloat16())
        exact = plain.double()(x.double())
        low = plain.bfloat16()(x.bfloat16())
    n = -(-1000 // 64)
    assert torch.allclose(ours.density().cpu(), torch.tensor([1.0, 2 / (n + 1), 1.0, 2 / (n + 1)]))
    bound = error_bound((low.double() - exact).abs().max().item(), exact.abs().max().item(), torch.bfloat16)
    assert (got.double() - exact).abs().max().item() <= bound
