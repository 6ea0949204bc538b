"""The registry's decode forms (models/softmax_decode.py, linear's and deltanet's DECODE): every
impl's step, built from the same seed, gives the torch definition's output (SDPA through its
mask: windows on a rolling cache, ALiBi, several new queries, GQA); the cost model's bytes and
memory per sequence."""

from __future__ import annotations

import pytest
import torch

from attnbench.models import registry
from attnbench.models.registry import LayerConfig
from attnbench.tolerance import relative_bound

CPU = torch.device("cpu")
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: under TRITON_INTERPRET (tests/conftest.py)
FP32_TOLERANCE = 1e-5  # float32 steps summing the same terms in another order


def _step_output(mechanism: str, impl: str, cfg: LayerConfig, batch: int, context: int, queries: int, device=CPU) -> torch.Tensor:
    torch.manual_seed(1)  # every impl draws the same inputs, in the same order
    return registry.get(mechanism).decode.impls[impl].build(cfg, batch, context, queries, device, torch.float32)().cpu()


def _assert_close(got: torch.Tensor, exact: torch.Tensor, label: str) -> None:
    error = (got - exact).abs().max().item()
    bound = relative_bound(FP32_TOLERANCE, exact.abs().max().item())
    assert error <= bound, f"{label}: max error {error:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("mechanism,window,queries", [
    ("standard", None, 1), ("standard", None, 3), ("alibi", None, 2), ("rope", None, 2),
    ("window", 5, 1), ("window", 5, 3), ("alibi", 4, 2),  # context 37 > window + N: a rolling cache
])
def test_sdpa_step_equals_the_definition(mechanism, window, queries):
    cfg = LayerConfig(dim=64, heads=4, kv_heads=2, head_dim=16, causal=True, window=window)
    exact = _step_output(mechanism, "torch", cfg, 2, 37, queries)
    got = _step_output(mechanism, "sdpa", cfg, 2, 37, queries)
    assert got.shape == (2, queries, 4, 16)
    _assert_close(got, exact, f"{mechanism} W={window} N={queries}")


def test_triton_step_equals_the_definition():
    """Our split-KV kernel through its DecodeImpl (contiguous cache; the paged one draws its own pages)."""
    cfg = LayerConfig(dim=64, heads=4, kv_heads=2, head_dim=16, causal=True, window=5)
    exact = _step_output("window", "torch", cfg, 2, 37, 2, KERNEL_DEVICE)
    got = _step_output("window", "triton", cfg, 2, 37, 2, KERNEL_DEVICE)
    _assert_close(got, exact, "window triton")


@pytest.mark.parametrize("mechanism", ["linear", "deltanet"])
def test_fused_state_step_equals_the_definition(mechanism):
    cfg = LayerConfig(dim=64, heads=4, kv_heads=2, head_dim=16, causal=True)
    exact = _step_output(mechanism, "torch", cfg, 2, 0, 1, KERNEL_DEVICE)
    got = _step_output(mechanism, "triton", cfg, 2, 0, 1, KERNEL_DEVICE)
    assert got.shape == (2, 4, 16)
    _assert_close(got, exact, mechanism)


def test_state_steps_refuse_more_than_one_token():
    cfg = LayerConfig(dim=64, heads=4, head_dim=16, causal=True)
    assert "one token at a time" in registry.get("deltanet").decode.impls["torch"].why_not(cfg, 2, CPU, torch.float32)
    assert registry.get("deltanet").decode.impls["torch"].why_not(cfg, 1, CPU, torch.float32) is None
    assert "needs a CUDA device" in registry.get("linear").decode.impls["triton"].why_not(cfg, 1, CPU, torch.float32)


def test_cost_model_by_hand():
    """B = 2, Hq = 8, Hkv = 2, D = 64, N = 1, fp16 (2 bytes), L = 1000."""
    cfg = LayerConfig(dim=512, heads=8, kv_heads=2, head_dim=64, causal=True)
    kv_per_seq = 2 * 1000 * 2 * 64 * 2  # K and V, 1000 rows, 2 kv heads, 64 dims, 2 bytes = 512000
    q_and_o = 2 * 8 * 64 * 2  # q read, o written: 8 heads x 64 dims x 2 bytes each = 2048
    standard = registry.get("standard").decode
    assert standard.memory(cfg, 1000, 1, 2) == 512_000 == kv_per_seq
    assert standard.bytes(cfg, 2, 1000, 1, 2) == 2 * (kv_per_seq + q_and_o) == 1_028_096
    windowed = LayerConfig(dim=512, heads=8, kv_heads=2, head_dim=64, causal=True, window=99)
    assert registry.get("window").decode.bytes(windowed, 2, 1000, 1, 2) == 2 * (2 * 100 * 2 * 64 * 2 + q_and_o)  # W + N = 100 keys
    state = 2 * 64 * 64 * 4  # S [Hkv, D, D] float32 = 32768
    token = (8 * 64 + 2 * 64 + 2 * 64 + 2 + 8 * 64) * 2  # q, k, v, beta read, o written, fp16 = 2564
    deltanet = registry.get("deltanet").decode
    assert deltanet.memory(cfg, 1000, 1, 2) == state
    assert deltanet.bytes(cfg, 2, 1000, 1, 2) == 2 * (2 * state + token) == 136_200
    linear_state = 2 * (64 * 64 + 64) * 4  # kv and k_sum, float32
    assert registry.get("linear").decode.memory(cfg, 1000, 1, 2) == linear_state == 33_280


@pytest.mark.parametrize("window,alibi,theta,queries", [
    (None, False, None, 1), (None, False, None, 3), (None, True, None, 2), (None, False, 10000.0, 2),
    (5, False, None, 1), (4, True, None, 3),  # a rolling cache: 37 tokens in window + N rows
])
def test_flex_step_equals_the_definition(window, alibi, theta, queries):
    """FlexAttention's step, uncompiled here (its masks and score_mod are what is tested; the GPU
    compiles the same functions), against softmax_step; ragged lengths, GQA."""
    import warnings

    from attnbench.kernels.reference import alibi_slopes
    from attnbench.models.decode import softmax_step
    from attnbench.models.softmax_decode import flex_decode

    generator = torch.Generator().manual_seed(4)
    lengths = torch.tensor([37, 9], dtype=torch.int32)
    rows = 37 if window is None else window + queries
    q = torch.randn(2, queries, 4, 16, generator=generator)
    k, v = (torch.randn(2, rows, 2, 16, generator=generator) for _ in range(2))
    options = {"window": window, "slopes": alibi_slopes(4) if alibi else None, "theta": theta}
    exact = softmax_step(q, k, v, lengths, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex warns when called without torch.compile
        got = flex_decode(lengths, queries, rows, compiled=False, **options)(q, k, v)
    _assert_close(got, exact, f"flex W={window} alibi={alibi} theta={theta} N={queries}")


def test_sparse_cost_models_by_hand():
    """B = 2, Hq = 8, Hkv = 2, D = 64, N = 1, fp16 (2 bytes), L = 1000."""
    cfg = LayerConfig(dim=512, heads=8, kv_heads=2, head_dim=64, causal=True, window=99, options={"block": 64, "topn": 4})
    nsa = registry.get("nsa").decode
    # 16 blocks, the last holding 40 tokens: 15 block means, 3 whole selected blocks + the query's own 40, W + N = 100
    rows = 15 + (3 * 64 + 40) + 100
    per_query = 8 * (64 + 3 + 64) * 2  # q and the three gates read, o written
    assert nsa.bytes(cfg, 2, 1000, 1, 2) == 2 * (2 * rows * 2 * 64 * 2 + per_query) == 359_520
    assert nsa.memory(cfg, 1000, 1, 2) == 2 * (1000 + 15) * 2 * 64 * 2 == 519_680  # every K, V and the 15 block means
    cfg = LayerConfig(dim=512, heads=8, kv_heads=2, head_dim=64, causal=True, options={"chunk": 128})
    bsbr = registry.get("bsbr").decode
    held, finished = 104, 7  # 1000 = 7 * 128 + 104
    summaries = finished * 2 * (64 * 64 + 64)  # a state [Hkv, D*D] and a meta key [Hkv, D] per finished chunk
    current = 2 * held * 2 * 64 + 8 * 64 + 8 * 64 * 64  # K, V of the chunk so far, its queries' sum, the retrieved state
    assert bsbr.memory(cfg, 1000, 1, 2) == (current + summaries) * 2 == 236_288
    within = 2 * held * 2 * 64 + 8 * 64 * 64 + 4 * 8 * 64  # K, V, R read; query sum read and written, q read, o written
    assert bsbr.bytes(cfg, 2, 1000, 1, 2) == 2 * within * 2 == 245_760
    # token 1025 starts chunk 8: chunk 7's K, V read, 8 summaries (7 read, 1 written), the new R written, W_r and W_h read once
    starting = 2 * 1 * 2 * 64 + 8 * 64 * 64 + 4 * 8 * 64 + 2 * 128 * 2 * 64 + 8 * 2 * (64 * 64 + 64) + 8 * 64 * 64
    assert bsbr.bytes(cfg, 2, 1025, 1, 2) == (2 * starting + 2 * 64 * 64) * 2 == 685_056


@pytest.mark.parametrize("context", [1, 8, 9, 30])
def test_bsbr_memory_is_what_its_layer_cache_holds(context):
    """The cost model's bytes per sequence equal the tensors of a BSBRCache after a prompt of L tokens
    (chunks of 8: one token, a whole chunk, one past it, mid-chunk), compression 4, GQA."""
    from attnbench.models.attention.bsbr import BSBRCache

    cfg = LayerConfig(dim=64, heads=4, kv_heads=2, head_dim=16, causal=True, options={"chunk": 8, "compression": 4})
    cache = BSBRCache(registry.build_layer("bsbr", cfg), context)
    cache.prefill(torch.randn(1, context, 64))
    held = sum(t.numel() * t.element_size() for t in cache.state)
    assert held == registry.get("bsbr").decode.memory(cfg, context, 1, 4)


@pytest.mark.parametrize("mechanism,context,queries", [
    ("bsbr", 1, 1), ("bsbr", 37, 1), ("bsbr", 33, 1), ("nsa", 37, 1), ("nsa", 37, 3), ("nsa", 5, 2),
])
def test_sparse_kernel_level_steps_run(mechanism, context, queries):
    """The torch steps speed times (a random cache or state of L tokens, the step's new ones among them;
    chunks and blocks of 8: bsbr's L = 33 starts a chunk); ALiBi and GQA."""
    cfg = LayerConfig(dim=64, heads=4, kv_heads=2, head_dim=16, causal=True, positions="alibi",
                      options={"chunk": 8} if mechanism == "bsbr" else {"block": 8, "topn": 2, "window": 5})
    o = _step_output(mechanism, "torch", cfg, 2, context, queries)
    assert o.shape == ((2, 4, 16) if mechanism == "bsbr" else (2, queries, 4, 16)) and bool(o.isfinite().all())


def test_sparse_steps_say_what_they_cannot_take():
    cfg = LayerConfig(dim=64, heads=4, head_dim=16, causal=True)
    bsbr, nsa = (registry.get(name).decode.impls["torch"] for name in ("bsbr", "nsa"))
    assert "one token at a time" in bsbr.why_not(cfg, 2, CPU, torch.float32)
    assert bsbr.why_not(cfg, 1, CPU, torch.float32) is None and nsa.why_not(cfg, 3, CPU, torch.float32) is None
    rope = LayerConfig(dim=64, heads=4, head_dim=16, causal=True, positions="rope")
    assert all("takes no RoPE" in impl.why_not(rope, 1, CPU, torch.float32) for impl in (bsbr, nsa))
