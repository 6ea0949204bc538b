"""Generation with the layers' caches (models/generate.py): every incremental step's logits
equal the full-sequence forward's last-position logits, and generating with the cache picks
the same tokens as recomputing the context, greedy and sampled; the learned positions' max_length
hands over to recomputation."""

from __future__ import annotations

import pytest
import torch

from attnbench.models import generate
from attnbench.models.transformer import build_model
from attnbench.tolerance import relative_bound

VOCAB, MAX_SEQ = 97, 24
# a step and the forward sum the same terms in another order (softmax over a masked cache, a state
# built token by token against chunked or quadratic forms): float32 noise, relative to the logits
STEP_RELATIVE = 1e-5
QK_GAIN = 8.0  # q/k projections scaled up from init's N(0, 0.02): peaked attention, so windows, biases and positions show

CACHED = {
    "standard": dict(mechanism="standard"),
    "rope": dict(mechanism="rope"),
    "alibi": dict(mechanism="alibi"),
    "window": dict(mechanism="window", window=3),
    "linear": dict(mechanism="linear"),
    "deltanet": dict(mechanism="deltanet"),
    # performer's forward divides all keys by exp of the largest exponent over the whole sequence:
    # at QK_GAIN's peaked scores earlier keys' features underflow against later ones, so that
    # forward is not causal in float32; at init's scale it is, and the running stabiliser matches it
    "performer": dict(mechanism="performer", qk_gain=1.0),
    "stickbreaking": dict(mechanism="stickbreaking"),
    "topk": dict(mechanism="topk", attention={"topk": 3}),
    "topk-rope-gqa": dict(mechanism="topk", positions="rope", kv_heads=2, attention={"topk": 3}),
    "topk-alibi": dict(mechanism="topk", positions="alibi", attention={"topk": 3}),
    # three chained retrievals at QK_GAIN's peaked scores amplify float32's reordering noise past
    # STEP_RELATIVE (1.5e-5 measured): this case runs in float64, where any wrong term still shows
    "hopfield-3-steps": dict(mechanism="hopfield", attention={"n_steps": 3}, float64=True),
    "hopfield-rope-gqa": dict(mechanism="hopfield", positions="rope", kv_heads=2),
    "exposb": dict(mechanism="exposb", attention={"delta": 0.05, "alpha": 0.5}),
    "exposb-gqa": dict(mechanism="exposb", kv_heads=2, attention={"delta": 0.05}),
    "gau": dict(mechanism="gau", attention={"chunk": 5}),  # chunks of 5: steps cross and fold chunks
    "gau-rope": dict(mechanism="gau", positions="rope", attention={"chunk": 5}),
    "bsbr": dict(mechanism="bsbr", attention={"chunk": 5}),  # chunks of 5: steps fold chunks and retrieve over 1-3 of them
    "bsbr-rope-gqa-compressed": dict(mechanism="bsbr", positions="rope", kv_heads=2, attention={"chunk": 4, "compression": 4}),
    "bsbr-alibi": dict(mechanism="bsbr", positions="alibi", attention={"chunk": 5}),
    # blocks of 4 (3, 2): steps complete blocks; topn 2 < the 3 forced blocks, 3 of up to 5 blocks: the selection decides
    # blocks of 5 (4): steps cross blocks, the rolling cache of a block's rows wraps
    "block": dict(mechanism="block", attention={"block": 5}),
    "block-rope-gqa": dict(mechanism="block", positions="rope", kv_heads=2, attention={"block": 4}),
    "block-alibi": dict(mechanism="block", positions="alibi", attention={"block": 5}),
    "nsa": dict(mechanism="nsa", window=5, attention={"block": 4, "topn": 3}),
    "nsa-rope-gqa": dict(mechanism="nsa", positions="rope", kv_heads=2, window=5, attention={"block": 3, "topn": 3}),
    "nsa-alibi-top-2": dict(mechanism="nsa", positions="alibi", window=4, attention={"block": 2, "topn": 2}),
    "stickbreaking-current-gqa": dict(mechanism="stickbreaking", kv_heads=2, attention={"attend_current": True}),
    "standard-gqa": dict(mechanism="standard", kv_heads=2),
    "rope-mqa": dict(mechanism="rope", kv_heads=1),
    "alibi-gqa": dict(mechanism="alibi", kv_heads=2),
    "window-gqa": dict(mechanism="window", window=3, kv_heads=2),
    "linear-gqa": dict(mechanism="linear", kv_heads=2),
    "deltanet-gqa": dict(mechanism="deltanet", kv_heads=2),
    "performer-gqa": dict(mechanism="performer", kv_heads=2, qk_gain=1.0),
    "standard-sinusoidal": dict(mechanism="standard", positions="sinusoidal"),
    "standard-rope-window": dict(mechanism="standard", positions="rope", window=4),
    "linear-rope": dict(mechanism="linear", positions="rope"),
}


def model_of(mechanism: str, seed: int = 3, qk_gain: float = QK_GAIN, float64: bool = False, **overrides):
    """A tiny GPT (2 blocks, 4 heads, D 32) in eval mode, its q/k projections scaled by ``qk_gain``."""
    model = build_model("tiny", mechanism, task="clm", seq=MAX_SEQ, vocab_size=VOCAB, seed=seed, **overrides).eval()
    if float64:
        model = model.double()
    d = model.cfg.dim // model.cfg.heads
    with torch.no_grad():
        for block in model.trunk.blocks:
            if hasattr(block.attention, "qkv"):  # gau's one-head z projection is left as it is
                qk = (model.cfg.heads + (model.cfg.kv_heads or model.cfg.heads)) * d
                block.attention.qkv.weight[:qk] *= qk_gain
    return model


def assert_close(got: torch.Tensor, full: torch.Tensor, label: str) -> None:
    error = (got - full).abs().max().item()
    bound = relative_bound(STEP_RELATIVE, full.abs().max().item())
    assert error <= bound, f"{label}: max error {error:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("case", CACHED, ids=list(CACHED))
@torch.no_grad()
def test_every_step_equals_the_full_forward(case):
    model = model_of(**CACHED[case])
    assert generate.why_no_cache(model) is None
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids)  # (B, T, V)
    decoder = generate.Decoder(model, capacity=20)
    assert_close(decoder.prefill(ids[:, :7]), full[:, 6], f"{case}: prefill")
    for t in range(7, 20):
        assert_close(decoder.step(ids[:, t]), full[:, t], f"{case}: step at position {t}")
    with pytest.raises(ValueError, match="full"):
        decoder.step(ids[:, 0])


@torch.no_grad()
def test_the_window_case_can_fail():
    """The window of 3 changes the logits far beyond the bound: a step that ignored it would fail."""
    windowed, full = model_of("standard", window=3), model_of("standard")
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(1))
    a, b = windowed(ids)[0, -1], full(ids)[0, -1]
    assert (a - b).abs().max().item() > 100 * relative_bound(STEP_RELATIVE, b.abs().max().item())


@pytest.mark.parametrize("case", ["standard", "rope", "window", "linear", "deltanet", "performer", "stickbreaking", "gau", "alibi-gqa",
                                  "bsbr", "nsa-alibi-top-2", "block-alibi"])
@torch.no_grad()
def test_cached_generation_picks_the_tokens_of_recomputation(case):
    model = model_of(**CACHED[case])
    prompt = torch.randint(0, VOCAB, (6,), generator=torch.Generator().manual_seed(2)).tolist()
    cached = generate.generate(model, prompt, 12)
    assert (cached.cached, cached.recomputed, cached.reason) == (12, 0, None)
    assert cached.ids == generate.generate(model, prompt, 12, cache=False).ids
    sampled = [generate.generate(model, prompt, 12, generator=torch.Generator().manual_seed(7), cache=c) for c in (True, False)]
    assert sampled[0].ids == sampled[1].ids and sampled[0].cached == 12 and sampled[1].recomputed == 12
    assert sampled[0].ids != cached.ids, "sampling draws other tokens than greedy (else the sampled check is the greedy one)"


@torch.no_grad()
def test_generation_stops_after_eos():
    model = model_of("standard")
    prompt = [5, 9, 11]
    first_three = generate.generate(model, prompt, 3).ids
    stopped = generate.generate(model, prompt, 10, eos_id=first_three[1])
    assert stopped.ids == first_three[: first_three.index(first_three[1]) + 1]


@torch.no_grad()
def test_a_learned_model_steps_as_its_forward():
    """Every layer, blocks of 4, the scorer's bias at 0 (gates that depend on the block means, some
    closed): each step's logits are the full forward's at that position (its gates are causal), and
    cached generation picks the tokens of recomputation."""
    model = model_of("learned", attention={"block": 4})
    with torch.no_grad():
        for block in model.trunk.blocks:
            block.attention.scorer.bias.zero_()
    assert generate.why_no_cache(model) is None
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    full = model(ids)
    kept = torch.stack([block.attention.density() for block in model.trunk.blocks])
    assert bool((kept < 1).any()), "some gates closed (else the scorer's summaries are not tested)"
    decoder = generate.Decoder(model, capacity=20)
    assert_close(decoder.prefill(ids[:, :7]), full[:, 6], "prefill")
    for t in range(7, 20):
        assert_close(decoder.step(ids[:, t]), full[:, t], f"step at position {t}")
    prompt = ids[0, :6].tolist()
    cached = generate.generate(model, prompt, 12)
    assert cached.cached == 12 and cached.ids == generate.generate(model, prompt, 12, cache=False).ids


def test_a_bidirectional_model_has_no_cache():
    model = build_model("tiny", "standard", task="mlm", seq=MAX_SEQ, vocab_size=VOCAB)
    assert "bidirectional" in generate.why_no_cache(model)


@pytest.mark.parametrize("prompt_length", [5, MAX_SEQ, MAX_SEQ + 6])
@torch.no_grad()
def test_past_max_length_the_cache_hands_over_to_recomputation(prompt_length):
    """Learned positions: the cached path runs while the context fits the MAX_SEQ positions, then
    recomputes over the last MAX_SEQ tokens (positions from 0 again), as recomputation alone does."""
    model = model_of("standard")
    assert model.cfg.max_length == MAX_SEQ
    prompt = torch.randint(0, VOCAB, (prompt_length,), generator=torch.Generator().manual_seed(4)).tolist()
    new = 30
    result = generate.generate(model, prompt, new)
    fits = max(MAX_SEQ - prompt_length, 0) + 1  # tokens chosen from contexts of at most MAX_SEQ tokens
    assert (result.cached, result.recomputed) == (fits, new - fits)
    assert "positions" in result.reason
    assert result.ids == generate.generate(model, prompt, new, cache=False).ids
    with pytest.raises(ValueError, match="positions"):
        generate.Decoder(model, MAX_SEQ + 1)


@torch.no_grad()
def test_schemes_without_a_limit_keep_the_cache_past_max_seq():
    """rope has no max_length: a context longer than the preset's seq stays cached (a window's rolls)."""
    for case in ("rope", "standard-rope-window"):
        model = model_of(**CACHED[case])
        assert model.cfg.max_length is None
        result = generate.generate(model, list(range(MAX_SEQ)), 10)
        assert (result.cached, result.reason) == (10, None)
        assert result.ids == generate.generate(model, list(range(MAX_SEQ)), 10, cache=False).ids


@pytest.mark.parametrize("case", ["standard", "window", "linear", "deltanet", "performer", "stickbreaking", "gau", "bsbr", "nsa", "block"])
@torch.no_grad()
def test_a_restored_decoder_steps_from_the_same_context_again(case):
    """fill (random caches as if 12 tokens were read) then step, restore, step: the same logits, and
    a step that is not undone moves on (speed --level model --mode decode times steps this way)."""
    torch.manual_seed(0)
    model = model_of(**CACHED[case])
    decoder = generate.Decoder(model, capacity=16)
    decoder.fill(2, 12)
    start = decoder.snapshot()
    tokens = torch.tensor([5, 7])
    first = decoder.step(tokens)
    assert decoder.length == 13
    decoder.restore(start)
    assert decoder.length == 12
    assert torch.equal(decoder.step(tokens), first)
    assert not torch.equal(decoder.step(tokens), first)  # from 13 tokens now


@pytest.mark.parametrize("case", ["standard-rope-window", "alibi-gqa"])
@torch.no_grad()
def test_a_kv_cache_read_by_our_decode_kernel_steps_as_the_definition(case):
    """KVCache(attend=decode_attention), what speed's layer and model decode levels run as triton
    (under TRITON_INTERPRET on a CPU), against the definition's steps."""
    import functools

    from attnbench.kernels.decode import decode_attention
    from attnbench.models.softmax_decode import KVCache

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel runs on a GPU where there is one
    model = model_of(**CACHED[case]).to(device)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2)).to(device)
    plain = generate.Decoder(model, capacity=12)
    ours = generate.Decoder(model, capacity=12, layer_cache=functools.partial(KVCache, attend=decode_attention))
    assert_close(ours.prefill(ids[:, :8]), plain.prefill(ids[:, :8]), f"{case}: prefill")
    for t in range(8, 12):
        assert_close(ours.step(ids[:, t]), plain.step(ids[:, t]), f"{case}: step at {t}")
