"""The registry: discovery, lookups with helpful errors, availability reasons."""

import pytest
import torch
from subquadratic_checks import one_autotune_config

from attnbench.models import registry
from attnbench.models.registry import LayerConfig, UnknownNameError

EXACT = ["standard", "rope", "alibi", "window"]


def test_exact_family_is_registered_with_every_peer():
    found = registry.mechanisms()
    for name in EXACT:
        assert name in found, f"{name} missing from the registry"
        assert {"triton", "torch", "sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex"} <= set(
            found[name].impls
        )


def test_unknown_mechanism_lists_valid_names():
    with pytest.raises(UnknownNameError, match="valid: .*standard"):
        registry.get("nope")


def test_unknown_impl_lists_valid_impls():
    with pytest.raises(UnknownNameError, match="valid: .*sdpa-cudnn"):
        registry.get("standard").impl("cutlass")


def test_heads_must_divide():
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        LayerConfig(dim=64, heads=4, kv_heads=3)


def test_cuda_impls_say_why_not_on_cpu():
    cfg = LayerConfig(dim=64, heads=4)
    standard = registry.get("standard")
    assert standard.impl("torch").why_not(cfg, "cpu", torch.float32) is None
    assert "CUDA" in standard.impl("sdpa-cudnn").why_not(cfg, "cpu", torch.float32)
    assert "CUDA" in standard.impl("triton").why_not(cfg, "cpu", torch.float32)


def test_flash_backend_refuses_masks_and_fp32():
    if not torch.cuda.is_available():
        pytest.skip("the dtype/mask reasons come after the CUDA check")
    cfg = LayerConfig(dim=64, heads=4)
    assert "fp16 or bf16" in registry.get("standard").impl("sdpa-flash").why_not(cfg, "cuda", torch.float32)
    assert "mask" in registry.get("alibi").impl("sdpa-flash").why_not(cfg, "cuda", torch.bfloat16)


@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("causal", [False, True])
def test_layer_runs_and_every_parameter_gets_a_gradient(name, causal):
    layer = registry.build_layer(name, LayerConfig(dim=32, heads=4, kv_heads=2, causal=causal, window=3))
    x = torch.randn(2, 7, 32)
    y = layer(x, seq_lens=torch.tensor([7, 5]))
    assert y.shape == x.shape
    y.square().sum().backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {pname}"


def _cpu_impls(causal: bool):
    """(mechanism, impl, kv_heads) for every impl that runs a small layer on this CPU (GQA where supported)."""
    for name, mechanism in registry.mechanisms().items():
        configs = [LayerConfig(dim=32, heads=4, kv_heads=kv_heads, causal=causal) for kv_heads in (2, 4)]
        cfg = next((c for c in configs if mechanism.why_not(c) is None), None)
        for impl_name, impl in mechanism.impls.items():
            if cfg is not None and impl.why_not(cfg, "cpu", torch.float32) is None:
                yield name, impl_name, cfg.kv_heads


@pytest.mark.parametrize("causal", [False, True])
def test_every_cpu_impl_trains_under_bf16_autocast(causal):
    """`train` and `distill` run under bf16 autocast on the GPU: every impl must take bf16
    matmul outputs (deltanet's triangular solve once failed there at step 0)."""
    for name, impl, kv_heads in _cpu_impls(causal):
        layer = registry.build_layer(name, LayerConfig(dim=32, heads=4, kv_heads=kv_heads, causal=causal, impl=impl))
        x = torch.randn(2, 19, 32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x, seq_lens=torch.tensor([19, 13]))
        y.float().square().sum().backward()
        assert torch.isfinite(y).all(), f"{name}/{impl}"
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None), f"{name}/{impl}"


@pytest.mark.cuda
def test_fla_sliding_window_matches_our_reference(monkeypatch):
    pytest.importorskip("fla")
    one_autotune_config(monkeypatch)
    from attnbench.kernels import reference

    window = registry.get("window")
    q = torch.randn(2, 300, 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 300, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    got = window.impl("fla").run(q, k, v, causal=True, window=(40, 0))
    exact = reference.attention(q.double(), k.double(), v.double(), causal=True, window=(40, 0))
    torch_lowp = reference.attention(q, k, v, causal=True, window=(40, 0))
    from attnbench.tolerance import error_bound

    bound = error_bound((torch_lowp.double() - exact).abs().max().item(), exact.abs().max().item(), torch.bfloat16)
    assert (got.double() - exact).abs().max().item() <= bound


def test_one_autotune_config_keeps_the_first_config_its_pruning_keeps(monkeypatch):
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(X, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), 1.0)

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    drop_16 = {"early_config_prune": lambda configs, nargs, **kw: configs[1:]}
    tuners = triton.autotune(configs, key=[])(kernel), triton.autotune(configs, key=[], prune_configs_by=drop_16)(kernel)
    for tuner in tuners:
        tuner.nargs = {}
    assert [len(tuner.prune_configs({})) for tuner in tuners] == [3, 2]
    one_autotune_config(monkeypatch)
    assert [tuner.prune_configs({})[0].kwargs["BLOCK"] for tuner in tuners] == [16, 32]
    assert all(len(tuner.prune_configs({})) == 1 for tuner in tuners)


@pytest.mark.parametrize("name", ["rope", "alibi"])
def test_triton_layer_hands_the_whole_projection_to_its_kernel(name):
    """Its backward writes the projection's gradient in one piece: the same numbers, bit for
    bit, as the split views (which autograd concatenates); an overridden attend keeps the split."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU (tests/conftest.py)
    cfg = LayerConfig(dim=64, heads=4, kv_heads=2, causal=True, impl="triton")
    packed = registry.build_layer(name, cfg).to(device, torch.bfloat16)
    split = registry.build_layer(name, cfg).to(device, torch.bfloat16)
    split.load_state_dict(packed.state_dict())
    split.run_packed = None
    assert packed.run_packed is not None
    x = torch.randn(2, 40, 64, device=device, dtype=torch.bfloat16)
    outputs = []
    for layer in (packed, split):
        y = layer(x)
        y.float().square().sum().backward()
        outputs.append((y, layer.qkv.weight.grad))
    assert torch.equal(outputs[0][0], outputs[1][0]) and torch.equal(outputs[0][1], outputs[1][1])

    class Wrapped(type(packed)):
        def attend(self, q, k, v, seq_lens=None):
            return super().attend(q, k, v, seq_lens)

    assert Wrapped(cfg, registry.get(name).impls, lambda c: {}).run_packed is None
