"""Decode steps (models/decode.py, models/state_decode.py) against the full-sequence forward:
the last N rows of a mechanism's causal forward over T tokens equal one decode step on the
cache (or state) of its first T - N tokens with the N new ones appended. Contiguous and paged
caches (ragged lengths, shuffled page tables), GQA, awkward lengths, every softmax option."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from attnbench.kernels import reference
from attnbench.kernels.reference import alibi_slopes
from attnbench.models import decode, registry, state_decode
from attnbench.models.attention import bsbr, deltanet, exposb, gau, hopfield, linear, nsa, performer, stickbreaking, topk
from attnbench.tolerance import error_bound, relative_bound

FP64_TOLERANCE = 1e-12  # the step and the forward sum the same terms in another order


def assert_close(got: torch.Tensor, exact: torch.Tensor, label: str, plain: torch.Tensor | None = None) -> None:
    """float64 results: to rounding; low precision (``plain``: torch's own low-precision result,
    the full forward in that dtype): at most 2x its error against ``exact`` (attnbench.tolerance)."""
    assert got.shape == exact.shape, f"{label}: shape {tuple(got.shape)} != {tuple(exact.shape)}"
    error = (got.double() - exact.double()).abs().max().item()
    magnitude = exact.double().abs().max().item()
    if plain is None:
        bound = relative_bound(FP64_TOLERANCE, magnitude, got.dtype)
    else:
        bound = error_bound((plain.double() - exact.double()).abs().max().item(), magnitude, got.dtype)
    assert error <= bound, f"{label}: max error {error:.3g} > bound {bound:.3g}"


@dataclass
class SoftmaxCase:
    """Sequences of ``lengths`` tokens (the N new ones included), q [B, T, Hq, D], k/v [B, T, Hkv, D]."""

    lengths: tuple[int, ...] = (7, 33)
    new: int = 1  # N
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    mechanism: str = "standard"
    options: dict = field(default_factory=dict)
    page: int | None = None  # None: a contiguous cache
    dtype: torch.dtype = torch.float64

    def inputs(self, generator: torch.Generator):
        t = max(self.lengths)

        def randn(heads):
            return torch.randn(len(self.lengths), t, heads, self.head_dim, generator=generator, dtype=torch.float64).to(self.dtype)

        return randn(self.heads), randn(self.kv_heads), randn(self.kv_heads)

    def step_options(self) -> dict:
        """window W (keys before the query), theta, and the ALiBi slopes of the mechanism."""
        return {"slopes": alibi_slopes(self.heads), **self.options} if self.mechanism == "alibi" else dict(self.options)

    def forward_options(self) -> dict:
        """The same options as the causal layer passes them to the full-sequence core: window (W, 0)."""
        options = self.step_options()
        if "window" in options:
            options["window"] = (options["window"], 0)
        return options


def last_rows(x: torch.Tensor, lengths: torch.Tensor, n: int) -> torch.Tensor:
    """x [B, T, ...] -> [B, N, ...]: rows lengths[b] - N .. lengths[b] - 1 of each sequence."""
    rows = lengths[:, None] - n + torch.arange(n)  # (B, N)
    return x[torch.arange(x.shape[0])[:, None], rows]


def prefix_cache(x: torch.Tensor, lengths: torch.Tensor, n: int, page: int | None, generator: torch.Generator, theta=None):
    """The cache of each sequence's first lengths[b] - N tokens of x [B, T, Hkv, D], then its N new
    tokens appended by decode.append: (cache, page_table or None). Paged: pages allocated for the
    final lengths at shuffled places in the pool, with spare pages between them. theta: keys are
    cached rotated, the prefix at positions 0.., the new ones by decode.rope_at at theirs."""
    cache = torch.zeros_like(x)
    prefix = x if theta is None else reference.rope(x, theta)
    for b, length in enumerate(lengths.tolist()):
        cache[b, : length - n] = prefix[b, : length - n]
    table = None
    if page is not None:
        cache, table = decode.paginate(cache, lengths, page, generator, spare=3)
    new = last_rows(x, lengths, n)
    if theta is not None:
        new = decode.rope_at(new, decode.positions_of_new(lengths, n), theta)
    decode.append(cache, new, lengths - n, table)
    return cache, table


def step_and_forward(case: SoftmaxCase, seed: int = 0):
    """(the decode step's output [B, N, Hq, D], the full forward's last N rows, both in case.dtype)."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = case.inputs(generator)
    lengths = torch.tensor(case.lengths)
    run = registry.get(case.mechanism).impl("torch").run
    full = run(q, k, v, causal=True, seq_lens=lengths, **case.forward_options())
    theta = case.options.get("theta")
    k_cache, table = prefix_cache(k, lengths, case.new, case.page, torch.Generator().manual_seed(seed), theta)
    v_cache, _ = prefix_cache(v, lengths, case.new, case.page, torch.Generator().manual_seed(seed))  # the same table
    o = decode.softmax_step(last_rows(q, lengths, case.new), k_cache, v_cache, lengths, page_table=table, **case.step_options())
    return o, last_rows(full, lengths, case.new)


SOFTMAX_CASES = {
    "one-token": SoftmaxCase(lengths=(1, 1), heads=2, kv_heads=2),
    "ragged-gqa": SoftmaxCase(lengths=(7, 33, 1)),
    "mqa-4-new": SoftmaxCase(lengths=(33, 7), new=4, heads=3, kv_heads=1),
    "new-equals-length": SoftmaxCase(lengths=(7, 5), new=5),
    "window": SoftmaxCase(lengths=(33, 20), new=3, mechanism="window", options={"window": 5}),
    "window-wider-than-sequence": SoftmaxCase(lengths=(7, 33), mechanism="window", options={"window": 40}),
    "alibi": SoftmaxCase(lengths=(33, 12), new=2, heads=8, kv_heads=2, mechanism="alibi"),
    "alibi-window": SoftmaxCase(lengths=(33, 9), new=2, mechanism="alibi", options={"window": 6}),
    "paged-16": SoftmaxCase(lengths=(7, 33, 16, 1), new=1, page=16),
    "paged-4-ragged-window": SoftmaxCase(lengths=(33, 18, 3), new=3, page=4, mechanism="window", options={"window": 9}),
    "paged-5-alibi-gqa": SoftmaxCase(lengths=(23, 7), new=2, heads=6, kv_heads=2, page=5, mechanism="alibi"),
    "rope": SoftmaxCase(lengths=(33, 7, 1), new=1, mechanism="rope", options={"theta": 10000.0}),
    "rope-paged-ragged-3-new": SoftmaxCase(lengths=(30, 9), new=3, page=4, mechanism="rope", options={"theta": 500.0}),
}


@pytest.mark.parametrize("name", list(SOFTMAX_CASES))
def test_softmax_step_equals_last_rows_of_the_causal_forward(name):
    o, expected = step_and_forward(SOFTMAX_CASES[name])
    assert_close(o, expected, name)


@pytest.mark.parametrize("mechanism, positions", [
    ("standard", None), ("window", None), ("alibi", None), ("rope", None),
    ("window", "rope"), ("window", "alibi"), ("standard", "rope"),
])
def test_a_causal_layers_own_options_give_its_core_s_last_rows(mechanism, positions):
    """The options a causal GQA layer passes its core (registry, LayerConfig, with a position
    scheme of its own or one asked for), through decode.step_options, make the step equal the
    layer's attend on the whole sequences."""
    window = 6 if mechanism == "window" else None
    cfg = registry.LayerConfig(dim=64, heads=4, kv_heads=2, causal=True, window=window, positions=positions)
    layer = registry.build_layer(mechanism, cfg).double()
    case = SoftmaxCase(lengths=(29, 29), new=2, heads=4, kv_heads=2, head_dim=16)
    q, k, v = case.inputs(torch.Generator().manual_seed(3))
    lengths = torch.tensor(case.lengths)
    options = decode.step_options(layer.core_options())
    theta = options.get("theta")
    k_cache, _ = prefix_cache(k, lengths, 2, None, None, theta)
    v_cache, _ = prefix_cache(v, lengths, 2, None, None)
    o = decode.softmax_step(last_rows(q, lengths, 2), k_cache, v_cache, lengths, **options)
    assert_close(o, layer.attend(q, k, v)[:, -2:], mechanism)


def test_step_options_refuse_what_has_no_decode_form():
    assert decode.step_options({"window": (5, 0), "theta": 1e4, "offset": 0}) == {"window": 5, "theta": 1e4}
    with pytest.raises(ValueError, match="right"):
        decode.step_options({"window": (5, 5)})
    with pytest.raises(ValueError, match="offset"):
        decode.step_options({"theta": 1e4, "offset": 3})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_softmax_step_in_low_precision(dtype):
    """bf16/fp16: within 2x the full forward's own low-precision error against float64."""
    case = SoftmaxCase(lengths=(33, 7), new=2, page=16, dtype=dtype)
    o, full = step_and_forward(case)
    exact, _ = step_and_forward(SoftmaxCase(lengths=(33, 7), new=2, page=16))
    assert o.dtype == dtype
    assert_close(o, exact, str(dtype), plain=full)


@pytest.mark.parametrize("page", [None, 4])
def test_window_on_a_rolling_cache(page):
    """A window of 6 and N = 2 on a cache of 8 rows (contiguous, or two pages of 4) that has
    taken 33 and 19 tokens, appended a few at a time: the oldest rows were overwritten, and the
    step still equals the window's full forward."""
    case = SoftmaxCase(lengths=(33, 19), new=2, mechanism="window", options={"window": 6})
    q, k, v = case.inputs(torch.Generator().manual_seed(0))
    lengths = torch.tensor(case.lengths)
    full = registry.get("window").impl("torch").run(q, k, v, causal=True, seq_lens=lengths, window=(6, 0))
    caches = [torch.zeros(2, 8, 2, 16, dtype=torch.float64) for _ in range(2)]
    table = None
    if page is not None:
        caches = [torch.zeros(5, 4, 2, 16, dtype=torch.float64) for _ in range(2)]
        table = torch.tensor([[3, 0], [4, 1]])
    filled = torch.zeros(2, dtype=torch.long)
    while bool((filled < lengths).any()):
        chunk = torch.minimum(lengths - filled, torch.tensor(3))
        for b in range(2):  # sequences take chunks of up to 3 tokens, each on its own
            rows = slice(int(filled[b]), int(filled[b] + chunk[b]))
            for cache, x in zip(caches, (k, v)):
                decode.append(cache[b : b + 1] if table is None else cache, x[b : b + 1, rows], filled[b : b + 1], None if table is None else table[b : b + 1])
        filled += chunk
    o = decode.softmax_step(last_rows(q, lengths, 2), *caches, lengths, page_table=table, window=6)
    assert_close(o, last_rows(full, lengths, 2), f"rolling, page {page}")


def test_a_cache_too_small_for_the_window_is_refused():
    q, k = torch.randn(1, 2, 2, 8), torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="rolling"):
        decode.softmax_step(q, k, k, torch.tensor([9]), window=7)
    with pytest.raises(ValueError, match="rolling"):
        decode.softmax_step(q, k, k, torch.tensor([9]))


def test_paged_cache_reads_as_the_contiguous_one():
    k = torch.randn(3, 20, 2, 8, dtype=torch.float64)
    lengths = torch.tensor([20, 1, 9])
    pages, table = decode.paginate(k, lengths, 4, torch.Generator().manual_seed(1), spare=2)
    assert pages.shape == (5 + 1 + 3 + 2, 4, 2, 8) and table.shape == (3, 5)
    assert table[table >= 0].unique().numel() == 9, "every page is owned once"
    gathered = decode.gather_pages(pages, table)
    for b, length in enumerate(lengths.tolist()):
        assert torch.equal(gathered[b, :length], k[b, :length])


def test_step_refuses_lengths_without_the_new_tokens():
    q = torch.randn(1, 3, 2, 8)
    k = torch.randn(1, 8, 2, 8)
    with pytest.raises(ValueError, match="new tokens"):
        decode.softmax_step(q, k, k, torch.tensor([2]))


def test_a_wrong_position_would_be_caught():
    """The test's comparison can fail: the step one position off (lengths one larger, so every new
    query sees one more key) disagrees with the forward."""
    case = SoftmaxCase(lengths=(20, 9), new=2)
    generator = torch.Generator().manual_seed(0)
    q, k, v = case.inputs(generator)
    lengths = torch.tensor(case.lengths)
    k_cache = torch.cat([k, torch.randn_like(k[:, :1])], dim=1)
    v_cache = torch.cat([v, torch.randn_like(v[:, :1])], dim=1)
    full = registry.get("standard").impl("torch").run(q, k, v, causal=True, seq_lens=lengths)
    o = decode.softmax_step(last_rows(q, lengths, 2), k_cache, v_cache, lengths + 1)
    with pytest.raises(AssertionError):
        assert_close(o, last_rows(full, lengths, 2), "shifted")


# --- recurrent states ---------------------------------------------------------------------


def random_tokens(b=2, t=7, hq=4, hkv=2, d=16, dv=8, dtype=torch.float64):
    """q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv], beta [B, T, Hkv] in (0, 1)."""
    return (
        torch.randn(b, t, hq, d, dtype=dtype),
        torch.randn(b, t, hkv, d, dtype=dtype),
        torch.randn(b, t, hkv, dv, dtype=dtype),
        torch.rand(b, t, hkv, dtype=dtype),
    )


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (3, 1)])
@pytest.mark.parametrize("form", ["torch", "chunked"])
def test_linear_step_equals_the_last_row_of_the_causal_forward(t, heads, form):
    q, k, v, _ = random_tokens(t=t, hq=heads[0], hkv=heads[1])
    full = linear.IMPLS[form].run(q, k, v, causal=True, chunk=8)
    state = state_decode.linear_state(k[:, :-1], v[:, :-1], dtype=torch.float64)
    o, _ = state_decode.linear_step(q[:, -1], k[:, -1], v[:, -1], state)
    assert_close(o, full[:, -1], f"linear T={t}")


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (3, 1)])
@pytest.mark.parametrize("form", ["torch", "chunked"])
def test_deltanet_step_equals_the_last_row_of_the_causal_forward(t, heads, form):
    q, k, v, beta = random_tokens(t=t, hq=heads[0], hkv=heads[1])
    full = deltanet.IMPLS[form].run(q, k, v, causal=True, beta=beta, chunk=8)
    state = state_decode.deltanet_state(k[:, :-1], v[:, :-1], beta[:, :-1], dtype=torch.float64)
    o, _ = state_decode.deltanet_step(q[:, -1], k[:, -1], v[:, -1], state, beta[:, -1])
    assert_close(o, full[:, -1], f"deltanet T={t}")


@pytest.mark.parametrize("t", [1, 7, 33])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (3, 1)])
@pytest.mark.parametrize("form", ["torch", "chunked"])
def test_performer_step_equals_the_last_row_of_the_causal_forward(t, heads, form):
    q, k, v, _ = random_tokens(t=t, hq=heads[0], hkv=heads[1])
    projection = performer.orthogonal_features(24, q.shape[-1], torch.Generator().manual_seed(t)).double()
    full = performer.IMPLS[form].run(q, k, v, causal=True, projection=projection, chunk=8)
    state = performer.performer_state(k[:, :-1], v[:, :-1], projection, dtype=torch.float64)
    o, _ = performer.performer_step(q[:, -1], k[:, -1], v[:, -1], state, projection)
    assert_close(o, full[:, -1], f"performer T={t}")


def test_performer_steps_from_the_empty_state_keep_the_stabiliser_running():
    """Every row from the empty state: row i's forward stabilises by the largest exponent of keys
    <= i only, so the running stabiliser must match each prefix's forward; the keys are scaled so
    that later keys carry larger exponents (the state is rescaled on the way)."""
    q, k, v, _ = random_tokens(t=12)
    k = k * torch.linspace(0.5, 3.0, 12, dtype=k.dtype)[None, :, None, None]
    projection = performer.orthogonal_features(24, q.shape[-1], torch.Generator().manual_seed(0)).double()
    state = performer.performer_state(k[:, :0], v[:, :0], projection, torch.float64)
    for i in range(q.shape[1]):
        prefix = performer.torch_reference(q[:, : i + 1], k[:, : i + 1], v[:, : i + 1], causal=True, projection=projection)
        o, new = performer.performer_step(q[:, i], k[:, i], v[:, i], state, projection)
        assert_close(o, prefix[:, -1], f"row {i}")
        assert bool((new.largest >= state.largest).all()), "the stabiliser only grows"
        state = new
    final = performer.performer_state(k, v, projection, torch.float64)
    for name in ("kv", "k_sum", "largest"):
        assert_close(getattr(state, name), getattr(final, name), name)


@pytest.mark.parametrize("attend_current", [False, True])
@pytest.mark.parametrize("heads", [(4, 2), (3, 1)])
def test_stickbreaking_step_equals_the_last_rows_of_each_sequences_causal_forward(attend_current, heads):
    """Ragged lengths (one sequence of a single token), N = 1 and 3 new queries, a cache longer than any."""
    torch.manual_seed(7)
    lengths = torch.tensor([9, 3, 1])
    q, k, v, _ = random_tokens(b=3, t=12, hq=heads[0], hkv=heads[1], dv=16)
    for n in (1, 3):
        live = lengths.clamp(min=n)
        newest = torch.stack([q[b, live[b] - n : live[b]] for b in range(3)])  # (B, N, Hq, D)
        o = stickbreaking.stickbreaking_step(newest, k, v, live, attend_current=attend_current)
        for b in range(3):
            t = int(live[b])
            full = stickbreaking.torch_reference(q[b : b + 1, :t], k[b : b + 1, :t], v[b : b + 1, :t], attend_current=attend_current)
            assert_close(o[b], full[0, t - n :], f"sequence {b}, N={n}")


@pytest.mark.parametrize("alibi", [False, True])
def test_topk_step_equals_the_last_rows_of_each_sequences_causal_forward(alibi):
    """k = 3 of up to 11 keys (a sequence of 2 keeps all it sees), ALiBi deciding the selection too."""
    torch.manual_seed(9)
    lengths = torch.tensor([11, 2])
    q, k, v, _ = random_tokens(b=2, t=12, hq=4, hkv=2, dv=16)  # topk's definition takes Dv = D
    slopes = alibi_slopes(4).double() if alibi else None
    for n in (1, 2):
        newest = torch.stack([q[b, lengths[b] - n : lengths[b]] for b in range(2)])
        o = topk.topk_step(newest, k, v, lengths, topk=3, slopes=slopes)
        for b in range(2):
            t = int(lengths[b])
            full = topk.torch_reference(q[b : b + 1, :t], k[b : b + 1, :t], v[b : b + 1, :t], causal=True, topk=3, slopes=slopes)
            assert_close(o[b], full[0, t - n :], f"sequence {b}, N={n}")


@pytest.mark.parametrize("n_steps,alibi", [(1, False), (3, False), (2, True)])
def test_hopfield_step_equals_the_last_rows_of_each_sequences_causal_forward(n_steps, alibi):
    torch.manual_seed(10)
    lengths = torch.tensor([11, 3])
    q, k, v, _ = random_tokens(b=2, t=12, hq=4, hkv=2, dv=16)  # a retrieval from the keys needs Dv = D
    beta = torch.rand(4, dtype=torch.float64) + 0.1
    slopes = alibi_slopes(4).double() if alibi else None
    for n in (1, 2):
        newest = torch.stack([q[b, lengths[b] - n : lengths[b]] for b in range(2)])
        o = hopfield.hopfield_step(newest, k, v, lengths, beta=beta, n_steps=n_steps, slopes=slopes)
        for b in range(2):
            t = int(lengths[b])
            full = hopfield.torch_reference(q[b : b + 1, :t], k[b : b + 1, :t], v[b : b + 1, :t], causal=True, beta=beta,
                                            n_steps=n_steps, slopes=slopes)
            assert_close(o[b], full[0, t - n :], f"sequence {b}, N={n}")


def test_exposb_step_equals_the_last_rows_of_each_sequences_causal_forward():
    torch.manual_seed(8)
    lengths = torch.tensor([11, 4])
    q, k, v, _ = random_tokens(b=2, t=12, hq=4, hkv=2)
    params = {"lam": torch.rand(4) + 0.1, "alpha": torch.randn(4), "beta": torch.rand(4) + 0.5, "gamma": torch.randn(4),
              "mu": torch.rand(4) * 16, "sigma": torch.rand(4) * 4 + 1, "delta": torch.rand(4) * 0.2}
    params = {name: value.double() for name, value in params.items()}
    for n in (1, 3):
        newest = torch.stack([q[b, lengths[b] - n : lengths[b]] for b in range(2)])
        o = exposb.exposb_step(newest, k, v, lengths, **params)
        for b in range(2):
            t = int(lengths[b])
            full = exposb.reference.exposb_attention(q[b : b + 1, :t], k[b : b + 1, :t], v[b : b + 1, :t], causal=True, **params)
            assert_close(o[b], full[0, t - n :], f"sequence {b}, N={n}")


@pytest.mark.parametrize("prompt", [1, 4, 5, 9])
def test_gau_steps_equal_the_chunked_forward_rows_across_chunk_boundaries(prompt):
    """Chunks of 4: prompts ending mid-chunk and on a boundary, steps that start and fold chunks."""
    g = torch.Generator().manual_seed(prompt)
    b, t, s, e = 2, 14, 6, 5
    q_quad, k_quad, q_lin, k_lin = (torch.randn(b, t, s, generator=g, dtype=torch.float64) for _ in range(4))
    v = torch.randn(b, t, e, generator=g, dtype=torch.float64)
    full = gau.mixed_chunk(q_quad, k_quad, q_lin, k_lin, v, causal=True, chunk=4)
    state = gau.gau_state(k_quad[:, :prompt], k_lin[:, :prompt], v[:, :prompt], 4)
    for i in range(prompt, t):
        o, state = gau.gau_step(q_quad[:, i], k_quad[:, i], q_lin[:, i], k_lin[:, i], v[:, i], state, 4)
        assert_close(o, full[:, i], f"row {i}")


def bsbr_maps(d: int, compression: int, generator: torch.Generator) -> dict:
    """Random (not identity) meta maps, and compression matrices when compression > 1."""
    maps = {name: torch.randn(d, d, generator=generator, dtype=torch.float64) / d**0.5 for name in ("meta_query", "meta_key")}
    if compression > 1:
        size = d * d // compression
        maps["compress"] = torch.randn(d * d, size, generator=generator, dtype=torch.float64) / d
        maps["decompress"] = torch.randn(size, d * d, generator=generator, dtype=torch.float64) / size**0.5
    return maps


@pytest.mark.parametrize("prompt", [1, 4, 5, 9])
@pytest.mark.parametrize("heads,compression,alibi", [((4, 2), 1, False), ((3, 1), 4, False), ((4, 4), 1, True), ((4, 2), 4, True)])
def test_bsbr_steps_equal_the_causal_forward_rows_across_chunk_boundaries(prompt, heads, compression, alibi):
    """Chunks of 4, 18 tokens: prompts ending mid-chunk and on a boundary, steps that fold chunks and
    retrieve over one to four finished ones; GQA and MQA, state compression, ALiBi within chunks."""
    g = torch.Generator().manual_seed(prompt)
    q, k, v = (torch.randn(2, 18, h, 8, generator=g, dtype=torch.float64) for h in (heads[0], heads[1], heads[1]))
    maps = bsbr_maps(8, compression, g)
    slopes = alibi_slopes(heads[0]).double() if alibi else None
    full = bsbr.torch_reference(q, k, v, causal=True, chunk=4, slopes=slopes, **maps)
    local = registry.get("block").impl("torch").run(q, k, v, causal=True, block=4, slopes=slopes)
    assert (full - local)[:, 4:].abs().max() > 0.1, "the retrieval term is there to be checked"
    state = bsbr.bsbr_state(q[:, :prompt], k[:, :prompt], v[:, :prompt], 4, **maps)
    for i in range(prompt, 18):
        o, state = bsbr.bsbr_step(q[:, i], k[:, i], v[:, i], state, 4, slopes=slopes, **maps)
        assert_close(o, full[:, i], f"row {i}")
    assert state.states.shape[1] == 4 and state.keys.shape[1] == 2  # 16 tokens folded, 2 held


def test_bsbr_state_of_a_prompt_is_the_state_its_steps_reach():
    """bsbr_state over 13 tokens (prefill) equals stepping them one by one from the first."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 13, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    maps = bsbr_maps(8, 4, g)
    stepped = bsbr.bsbr_state(q[:, :1], k[:, :1], v[:, :1], 4, **maps)
    for i in range(1, 13):
        _, stepped = bsbr.bsbr_step(q[:, i], k[:, i], v[:, i], stepped, 4, **maps)
    for name, a, b in zip(bsbr.BSBRState._fields, stepped, bsbr.bsbr_state(q, k, v, 4, **maps)):
        assert_close(a, b, name)


@pytest.mark.parametrize("alibi", [False, True])
@pytest.mark.parametrize("heads", [(4, 2), (3, 1), (2, 2)])
@pytest.mark.parametrize("topn", [1, 3])
def test_nsa_step_equals_the_last_rows_of_each_sequences_causal_forward(alibi, heads, topn):
    """Ragged lengths (23: six blocks of 4, the last part-filled; 8: on a boundary; 1), N = 1 and 3 new
    queries (blocks completed by the new tokens among them), gates per token, a window of 5 keys; topn 1:
    the forced blocks compete (the query's own block wins), 3: a free slot in six blocks."""
    g = torch.Generator().manual_seed(11)
    lengths = torch.tensor([23, 8, 1])
    q, k, v = (torch.randn(3, 24, h, 8, generator=g, dtype=torch.float64) for h in (heads[0], heads[1], heads[1]))
    gates = torch.rand(3, 24, heads[0], 3, generator=g, dtype=torch.float64)
    options = {"block": 4, "topn": topn, "window": 5, "slopes": alibi_slopes(heads[0]).double() if alibi else None}
    k_cmp, v_cmp = nsa.compress(k, 4), nsa.compress(v, 4)
    for n in (1, 3):
        live = lengths.clamp(min=n)
        newest, new_gates = (torch.stack([x[b, live[b] - n : live[b]] for b in range(3)]) for x in (q, gates))
        o = nsa.nsa_step(newest, k, v, live, k_cmp, v_cmp, gates=new_gates, **options)
        for b in range(3):
            t = int(live[b])
            full = nsa.torch_reference(q[b : b + 1, :t], k[b : b + 1, :t], v[b : b + 1, :t], gates=gates[b : b + 1, :t], **options)
            assert_close(o[b], full[0, t - n :], f"sequence {b}, N={n}")


def test_nsa_rows_do_not_depend_on_the_tokens_after_them():
    """topn 2 of six blocks: the three forced blocks compete for two slots at every query; the rows of a
    forward over 24 tokens equal those over their first 13 (the selection's ties are broken by rank and
    position, not by topk's order over a longer row), so a step can be exact."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 24, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    options = {"block": 4, "topn": 2, "window": 3}
    for run in (nsa.torch_reference, nsa.chunked):
        assert_close(run(q, k, v, **options)[:, :13], run(q[:, :13], k[:, :13], v[:, :13], **options), run.__name__)


def test_deltanet_default_beta_is_the_forward_default():
    q, k, v, _ = random_tokens(t=5)
    full = deltanet.torch_reference(q, k, v)
    o, _ = state_decode.deltanet_step(q[:, -1], k[:, -1], v[:, -1], state_decode.deltanet_state(k[:, :-1], v[:, :-1], dtype=torch.float64))
    assert_close(o, full[:, -1], "beta None")


def test_linear_steps_from_the_empty_state_give_every_row_and_the_closed_form_state():
    q, k, v, _ = random_tokens(t=12)
    full = linear.torch_reference(q, k, v, causal=True)
    state = state_decode.linear_state(k[:, :0], v[:, :0], torch.float64)
    for i in range(q.shape[1]):
        o, state = state_decode.linear_step(q[:, i], k[:, i], v[:, i], state)
        assert_close(o, full[:, i], f"row {i}")
    final = state_decode.linear_state(k, v, torch.float64)
    assert_close(state.kv, final.kv, "kv")
    assert_close(state.k_sum, final.k_sum, "k_sum")


def test_deltanet_steps_from_the_empty_state_give_every_row_and_the_folded_state():
    q, k, v, beta = random_tokens(t=12)
    full = deltanet.torch_reference(q, k, v, beta=beta)
    state = state_decode.deltanet_state(k[:, :0], v[:, :0], dtype=torch.float64)
    for i in range(q.shape[1]):
        o, new = state_decode.deltanet_step(q[:, i], k[:, i], v[:, i], state, beta[:, i])
        assert_close(o, full[:, i], f"row {i}")
        assert not torch.equal(new, state), "the step writes a new state and keeps the old one"
        state = new
    assert_close(state, state_decode.deltanet_state(k, v, beta, torch.float64), "state")


@pytest.mark.parametrize("mechanism", ["linear", "deltanet"])
def test_low_precision_tokens_with_a_float32_state(mechanism):
    """bf16 tokens, float32 state: within 2x the bf16 full forward's error against float64."""
    q, k, v, beta = random_tokens(t=33)
    q, k, v, beta = (x.to(torch.bfloat16) for x in (q, k, v, beta))
    if mechanism == "linear":
        full = linear.torch_reference(q, k, v, causal=True)
        exact = linear.torch_reference(*(x.double() for x in (q, k, v)), causal=True)
        o, _ = state_decode.linear_step(q[:, -1], k[:, -1], v[:, -1], state_decode.linear_state(k[:, :-1], v[:, :-1]))
    else:
        full = deltanet.torch_reference(q, k, v, beta=beta, upcast=False)
        exact = deltanet.torch_reference(*(x.double() for x in (q, k, v)), beta=beta.double())
        state = state_decode.deltanet_state(k[:, :-1], v[:, :-1], beta[:, :-1])
        o, new = state_decode.deltanet_step(q[:, -1], k[:, -1], v[:, -1], state, beta[:, -1])
        assert state.dtype == new.dtype == torch.float32
    assert o.dtype == torch.bfloat16
    assert_close(o, exact[:, -1], mechanism, plain=full[:, -1])


STATE_CACHES = {"linear": state_decode.LinearCache, "deltanet": state_decode.DeltaNetCache}
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the fused steps under TRITON_INTERPRET (tests/conftest.py)
FUSED_RELATIVE = 1e-5  # float32: the fused step, the torch step and the forward sum the same terms in other orders


def _state_layer(mechanism: str, kv_heads: int, dtype: torch.dtype) -> torch.nn.Module:
    """A causal layer C 64, 4 query heads of D 16, its q/k projections scaled up (peaked readouts)."""
    layer = registry.build_layer(mechanism, registry.LayerConfig(dim=64, heads=4, kv_heads=kv_heads, head_dim=16, causal=True))
    with torch.no_grad():
        layer.qkv.weight[: (4 + kv_heads) * 16] *= 8.0
    return layer.to(KERNEL_DEVICE, dtype).eval()


def _tensors(state) -> tuple[torch.Tensor, ...]:
    """A state's tensors: LinearState's kv and k_sum, or deltanet's S."""
    return tuple(state) if isinstance(state, state_decode.LinearState) else (state,)


def _steps(cache, x: torch.Tensor, prompt: int) -> torch.Tensor:
    """cache.prefill of x [B, T, C]'s first ``prompt`` tokens, then a step per token -> the steps' rows [B, T - prompt, C]."""
    cache.prefill(x[:, :prompt])
    return torch.cat([cache.step(x[:, t : t + 1]) for t in range(prompt, x.shape[1])], dim=1)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("mechanism", list(STATE_CACHES))
@torch.no_grad()
def test_a_state_cache_stepped_by_the_fused_kernel_steps_as_the_torch_one_and_the_forward(mechanism, kv_heads):
    """state_step=fused_step (speed --impl triton at the layer and model decode levels): after a
    prompt of 5, six steps give the torch-stepping cache's rows and the layer forward's, GQA
    included; the float32 state is written in place and ends where the torch steps' does."""
    cache = STATE_CACHES[mechanism]
    layer = _state_layer(mechanism, kv_heads, torch.float32)
    x = torch.randn(2, 11, 64, device=KERNEL_DEVICE)
    full = layer(x)[:, 5:]
    plain, fused = cache(layer, 11), cache(layer, 11, state_step=cache.fused_step)
    assert plain.state_step is cache.torch_step  # what generate's Decoder builds by default
    want = _steps(plain, x, 5)
    fused.prefill(x[:, :5])
    start = fused.state
    got = torch.cat([fused.step(x[:, t : t + 1]) for t in range(5, 11)], dim=1)
    assert fused.state is start and all(s.dtype == torch.float32 for s in _tensors(start)), "written in place, in float32"
    for label, exact in (("the torch cache", want), ("the forward", full)):
        error = (got - exact).abs().max().item()
        bound = relative_bound(FUSED_RELATIVE, exact.abs().max().item())
        assert error <= bound, f"{mechanism} against {label}: max error {error:.3g} > bound {bound:.3g}"
    for a, b in zip(_tensors(fused.state), _tensors(plain.state)):
        assert (a - b).abs().max().item() <= relative_bound(FUSED_RELATIVE, b.abs().max().item()), f"{mechanism}: the final state"


@pytest.mark.parametrize("mechanism", list(STATE_CACHES))
@torch.no_grad()
def test_a_bf16_layer_s_fused_steps_are_as_close_to_float64_as_its_torch_steps(mechanism):
    """A bf16 layer (what speed's layer level runs), GQA 4:2, float32 states: the fused steps' rows
    at most 2x the torch steps' error against the float64 layer's forward (attnbench.tolerance)."""
    import copy

    cache = STATE_CACHES[mechanism]
    layer = _state_layer(mechanism, 2, torch.float32)
    exact = copy.deepcopy(layer).double()
    layer = layer.to(torch.bfloat16)
    x = torch.randn(2, 11, 64, device=KERNEL_DEVICE)
    full = exact(x.double())[:, 5:]
    plain = _steps(cache(layer, 11), x.to(torch.bfloat16), 5)
    got = _steps(cache(layer, 11, state_step=cache.fused_step), x.to(torch.bfloat16), 5)
    assert got.dtype == torch.bfloat16
    assert_close(got.cpu(), full.cpu(), mechanism, plain=plain.cpu())
