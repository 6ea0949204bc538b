"""block's and learned's decode steps (their registry DecodeForms): the last N rows of a causal
forward over a sequence equal one step of its N newest queries against the cache of every token
before them (blocks of 5: awkward lengths, N crossing a block boundary, ragged lengths, GQA and
MQA, ALiBi and RoPE; block's cache contiguous, rolling and paged); their layer caches step as the
layer's forward; the cost models by hand and against what the caches hold."""

from __future__ import annotations

import pytest
import torch

from attnbench.models import registry
from attnbench.models.attention.block import BlockCache, block_step
from attnbench.models.attention.learned import LearnedCache, learned_step
from attnbench.models.decode import paginate
from attnbench.models.registry import LayerConfig
from attnbench.tolerance import relative_bound

CPU = torch.device("cpu")
FP32_TOLERANCE = 1e-5  # float32 steps summing the same terms in another order (tests/models/test_decode_forms.py)
BLOCK = 5
LENGTHS = (23, 13)  # sequence 0: 4 whole blocks and 3 tokens; sequence 1: 2 and 3
QK_GAIN = 8.0  # peaked scores: a wrong key set or a wrong gate shows far above the bound


def _assert_close(got: torch.Tensor, exact: torch.Tensor, label: str) -> None:
    error = (got - exact).abs().max().item()
    bound = relative_bound(FP32_TOLERANCE, exact.abs().max().item())
    assert error <= bound, f"{label}: max error {error:.3g} > bound {bound:.3g}"


def _layer(mechanism: str, kv_heads: int, positions=None, **options):
    """A causal layer (C 64, Hq 4, D 16, blocks of 5) with peaked q/k; learned's scorer bias at 0, so
    that its gates depend on the block means (at OPEN_BIAS every gate is open whatever they are)."""
    torch.manual_seed(0)
    cfg = LayerConfig(dim=64, heads=4, kv_heads=kv_heads, head_dim=16, causal=True, positions=positions,
                      options={"block": BLOCK, **options})
    layer = registry.build_layer(mechanism, cfg).eval()
    with torch.no_grad():
        layer.qkv.weight[: (4 + kv_heads) * 16] *= QK_GAIN
        if mechanism == "learned":
            layer.scorer.bias.zero_()
    return layer


def _core_inputs(layer, x: torch.Tensor):
    """q, k (as the core sees them: rotated under the layer's RoPE), v of x [B, T, C]; and q unrotated."""
    q, k, v = layer.project(x)
    rotated_q, rotated_k = layer.positioned(q, k)
    return q, rotated_q, rotated_k, v


def _last_rows(layer, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """The last N rows of the causal core over each sequence's own LENGTHS[b] tokens: [N, Hq, D] each."""
    return [layer.attend(*layer.project(x[b : b + 1, :length]))[0, -n:] for b, length in enumerate(LENGTHS)]


def _rolling(cache: torch.Tensor, rows: int) -> torch.Tensor:
    """A contiguous cache [B, L, Hkv, D] holding LENGTHS[b] tokens as a rolling one of ``rows`` rows (token j in row j % rows)."""
    rolled = cache.new_zeros(cache.shape[0], rows, *cache.shape[2:])
    for b, length in enumerate(LENGTHS):
        kept = torch.arange(max(0, length - rows), length)
        rolled[b, kept % rows] = cache[b, kept]
    return rolled


@pytest.mark.parametrize("kv_heads,positions", [(2, None), (1, "alibi"), (2, "rope"), (4, None)])
@pytest.mark.parametrize("queries", [1, 3, 7])
@torch.no_grad()
def test_block_step_is_the_last_rows_of_the_causal_forward(kv_heads, positions, queries):
    """Contiguous, rolling (block - 1 + N rows) and paged caches; ragged lengths; N = 3 and 7 cross
    block boundaries. The cache holds rotated keys; block_step rotates q (theta)."""
    layer = _layer("block", kv_heads, positions)
    x = torch.randn(2, max(LENGTHS), 64)
    q, _, k, v = _core_inputs(layer, x)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32)
    new = torch.stack([q[b, length - queries : length] for b, length in enumerate(LENGTHS)])  # (B, N, Hq, D)
    options = {"block": BLOCK, "slopes": layer.core_options().get("slopes"), "theta": layer.theta}
    exact = torch.stack(_last_rows(layer, x, queries))
    rows = BLOCK - 1 + queries
    pages, table = paginate(k, lengths, page=4, generator=torch.Generator().manual_seed(3), spare=2)
    v_pages, _ = paginate(v, lengths, page=4, generator=torch.Generator().manual_seed(3), spare=2)  # the same shuffle
    caches = {
        "contiguous": (k, v, {}),
        "rolling": (_rolling(k, rows), _rolling(v, rows), {}),
        "paged": (pages, v_pages, {"page_table": table}),
    }
    for name, (keys, values, paging) in caches.items():
        got = block_step(new, keys, values, lengths, **options, **paging)
        _assert_close(got, exact, f"block {name} Hkv={kv_heads} {positions} N={queries}")


@torch.no_grad()
def test_the_block_step_test_can_fail():
    """A step over every earlier key (no block window) is far off the block forward's rows."""
    layer = _layer("block", 2)
    x = torch.randn(2, max(LENGTHS), 64)
    q, _, k, v = _core_inputs(layer, x)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32)
    new = torch.stack([q[b, length - 1 : length] for b, length in enumerate(LENGTHS)])
    exact = torch.stack(_last_rows(layer, x, 1))
    from attnbench.models.decode import softmax_step

    error = (softmax_step(new, k, v, lengths) - exact).abs().max().item()
    assert error > 100 * relative_bound(FP32_TOLERANCE, exact.abs().max().item())


@pytest.mark.parametrize("mechanism,kv_heads,positions", [
    ("block", 2, "rope"), ("block", 4, "alibi"), ("block", 1, None), ("learned", 2, "rope"), ("learned", 4, None),
])
@pytest.mark.parametrize("prompt", [1, 5, 7])
@torch.no_grad()
def test_a_layer_cache_steps_as_the_layer_forward(mechanism, kv_heads, positions, prompt):
    """Prefill a prompt of 1, 5 (one whole block) or 7 tokens, then step one token at a time to 19:
    every step is the last row of the layer's forward over the tokens so far (block's cache rolls
    over its 5 rows)."""
    layer = _layer(mechanism, kv_heads, positions)
    x = torch.randn(2, 19, 64)
    cache = (BlockCache if mechanism == "block" else LearnedCache)(layer, 19)
    _assert_close(cache.prefill(x[:, :prompt]), layer(x[:, :prompt]), f"{mechanism} prefill {prompt}")
    for t in range(prompt, 19):
        _assert_close(cache.step(x[:, t : t + 1])[:, 0], layer(x[:, : t + 1])[:, -1], f"{mechanism} step at {t}")
    if mechanism == "block":
        assert cache.k.shape[1] == BLOCK


@pytest.mark.parametrize("kv_heads,sinks,positions", [(2, 0, None), (1, 1, None), (4, 2, "rope")])
@pytest.mark.parametrize("queries", [1, 3, 7])
@torch.no_grad()
def test_learned_step_is_the_last_rows_of_the_causal_forward(kv_heads, sinks, positions, queries):
    """Ragged lengths, N crossing block boundaries, sinks; the summaries it returns are the next step's
    (the mean of the block before the one of position lengths[b], the sum of that block's queries so far)."""
    layer = _layer("learned", kv_heads, positions, sinks=sinks)
    x = torch.randn(2, max(LENGTHS), 64)
    _, q, k, v = _core_inputs(layer, x)
    lengths = torch.tensor(LENGTHS, dtype=torch.int32)
    new = torch.stack([q[b, length - queries : length] for b, length in enumerate(LENGTHS)])

    def block_sum(b: int, end: int) -> torch.Tensor:  # the queries before ``end`` in its block
        return q[b, end - end % BLOCK : end].float().sum(0)

    def previous_mean(b: int, end: int) -> torch.Tensor:  # the mean of the block before the one of position ``end``
        start = end - end % BLOCK
        return q[b, start - BLOCK : start].float().mean(0) if start else torch.zeros(4, 16)

    summaries = [torch.stack([f(b, length - queries) for b, length in enumerate(LENGTHS)]) for f in (previous_mean, block_sum)]
    got, previous_after, sum_after = learned_step(new, k, v, lengths, *summaries, scorer=layer.scorer, block=BLOCK, sinks=sinks)
    exact = _last_rows(layer, x, queries)
    learnable_gates = []
    for b, length in enumerate(LENGTHS):
        layer(x[b : b + 1, :length])  # the gates of the forward over this sequence
        last = layer._gates_seen()
        learnable_gates.append(last["kept"][last["learnable"].expand_as(last["kept"])])
        _assert_close(got[b], exact[b], f"learned Hkv={kv_heads} sinks={sinks} {positions} N={queries} sequence {b}")
        _assert_close(sum_after[b], block_sum(b, length), f"the query sum after sequence {b}")
        _assert_close(previous_after[b], previous_mean(b, length), f"the previous block's mean after sequence {b}")
    kept = torch.cat(learnable_gates).float().mean().item()
    assert 0 < kept < 1, f"some learnable gates open, some closed (else the gates are not tested): {kept}"


@pytest.mark.parametrize("mechanism", ["learned", "block"])
@torch.no_grad()
def test_a_row_of_the_forward_depends_on_no_later_token(mechanism):
    """Causal in the gates too: row t of the forward over 19 tokens equals the last row of the forward
    over its t + 1 tokens (learned once summarised a query block by all its queries, so that a block's
    later tokens moved its earlier rows' gates)."""
    x = torch.randn(1, 19, 64)
    layer = _layer(mechanism, 2)
    full = layer(x)
    for t in range(19):
        _assert_close(layer(x[:, : t + 1])[0, -1], full[0, t], f"{mechanism} row {t}")


@pytest.mark.parametrize("mechanism,context,queries,positions", [
    ("block", 37, 1, "rope"), ("block", 37, 3, "alibi"), ("block", 3, 3, None), ("learned", 37, 1, None), ("learned", 37, 7, None),
])
def test_kernel_level_steps_run(mechanism, context, queries, positions):
    """The torch steps speed times (random inputs of L tokens a sequence, the N new among them), GQA."""
    cfg = LayerConfig(dim=64, heads=4, kv_heads=2, head_dim=16, causal=True, positions=positions, options={"block": 8})
    impl = registry.get(mechanism).decode.impls["torch"]
    assert impl.why_not(cfg, queries, CPU, torch.float32) is None
    torch.manual_seed(1)
    o = impl.build(cfg, 2, context, queries, CPU, torch.float32)()
    assert o.shape == (2, queries, 4, 16) and bool(o.isfinite().all())


def test_what_the_steps_cannot_take():
    rope = LayerConfig(dim=64, heads=4, head_dim=16, causal=True, positions="rope")
    assert "takes no RoPE" in registry.get("learned").decode.impls["torch"].why_not(rope, 1, CPU, torch.float32)
    assert registry.get("block").decode.impls["torch"].why_not(rope, 1, CPU, torch.float32) is None


def test_cost_models_by_hand():
    """B = 2, Hq = 8, Hkv = 2, D = 64, fp16 (2 bytes), L = 1000, blocks of 256 (block) and 64 (learned)."""
    cfg = LayerConfig(dim=512, heads=8, kv_heads=2, head_dim=64, causal=True, options={"block": 256})
    q_and_o = 2 * 8 * 64 * 2  # q read, o written per new query
    block = registry.get("block").decode
    # 999 = 3 * 256 + 231: the query sees the 231 keys of its block before it and itself
    assert block.bytes(cfg, 2, 1000, 1, 2) == 2 * (2 * 232 * 2 * 64 * 2 + q_and_o) == 241_664
    # N = 3 from 997 = 3 * 256 + 229: 229 + 3 keys together; 3 queries and outputs
    assert block.bytes(cfg, 2, 1000, 3, 2) == 2 * (2 * 232 * 2 * 64 * 2 + 3 * q_and_o) == 249_856
    assert block.memory(cfg, 1000, 1, 2) == 2 * 256 * 2 * 64 * 2 == 131_072  # the rolling cache: block - 1 + N rows
    assert block.memory(cfg, 1000, 3, 2) == 2 * 258 * 2 * 64 * 2
    assert block.memory(cfg, 100, 1, 2) == 2 * 100 * 2 * 64 * 2  # fewer tokens than a block
    cfg = LayerConfig(dim=512, heads=8, kv_heads=2, head_dim=64, causal=True, options={"block": 64})
    learned = registry.get("learned").decode
    summaries = 2 * 8 * 64 * 4  # the previous block's query mean and the current block's sum: [Hq, D] float32 each
    assert learned.memory(cfg, 1000, 1, 2) == 2 * 1000 * 2 * 64 * 2 + summaries == 516_096
    assert learned.bytes(cfg, 2, 1000, 1, 2) == 2 * (2 * 1000 * 2 * 64 * 2 + q_and_o + 2 * summaries) == 1_044_480


@pytest.mark.parametrize("mechanism", ["block", "learned"])
@pytest.mark.parametrize("context", [1, 5, 6, 13])
def test_memory_is_what_the_layer_cache_holds(mechanism, context):
    """The cost model's bytes per sequence (float32) equal the tensors of the layer cache after a
    prompt of L tokens, capacity L (blocks of 5: one token, a whole block, one past it, mid-block)."""
    layer = _layer(mechanism, 2)
    cache = (BlockCache if mechanism == "block" else LearnedCache)(layer, context)
    cache.prefill(torch.randn(1, context, 64))
    held = [cache.k, cache.v] + ([cache.previous_mean, cache.query_sum] if mechanism == "learned" else [])
    cfg = LayerConfig(dim=64, heads=4, kv_heads=2, head_dim=16, causal=True, options={"block": BLOCK})
    assert sum(t.numel() * t.element_size() for t in held) == registry.get(mechanism).decode.memory(cfg, context, 1, 4)
