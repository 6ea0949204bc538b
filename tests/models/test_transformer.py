"""The transformer models against transformers' BertModel and GPT2Model with copied weights
(the external oracle), plus positions, padding and parameter counts."""

import pytest
import torch

from attnbench.models import registry
from attnbench.models.presets import Preset
from attnbench.models.transformer import IGNORE, LanguageModel, ModelConfig, build_model, lm_loss, param_counts, seq_lens_from_attention_mask

transformers = pytest.importorskip("transformers")

VOCAB, DIM, LAYERS, HEADS, MLP_DIM, MAX_SEQ = 97, 32, 2, 4, 64, 24


def _randomize(model: torch.nn.Module) -> None:
    """Weights far from the 0.02 init, so that every term (GELU form, norms, biases) shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    assert dst.shape == src.shape, (dst.shape, src.shape)
    dst.copy_(src)


def _tiny_config(**overrides) -> ModelConfig:
    shape = dict(vocab_size=VOCAB, dim=DIM, layers=LAYERS, heads=HEADS, mlp_dim=MLP_DIM, max_seq=MAX_SEQ)
    return ModelConfig(**{**shape, **overrides})


def _bert_pair():
    hf_cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=MLP_DIM, max_position_embeddings=MAX_SEQ, hidden_act="gelu",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, attn_implementation="eager",
    )
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=False).eval()
    _randomize(hf)
    ours = LanguageModel(_tiny_config(mechanism="standard", causal=False, norm="post", gelu="none", norm_eps=1e-12)).eval()
    emb, mine = hf.embeddings, ours.trunk.embeddings
    with torch.no_grad():
        _copy(mine.tokens.weight, emb.word_embeddings.weight)
        # our encoder has no segments: BERT's constant token-type-0 row folds into the positions
        _copy(mine.positions.weight, emb.position_embeddings.weight + emb.token_type_embeddings.weight[0])
        _copy(mine.norm.weight, emb.LayerNorm.weight)
        _copy(mine.norm.bias, emb.LayerNorm.bias)
        for layer, block in zip(hf.encoder.layer, ours.trunk.blocks):
            att = layer.attention
            qkv = [att.self.query, att.self.key, att.self.value]
            _copy(block.attention.qkv.weight, torch.cat([m.weight for m in qkv]))
            _copy(block.attention.qkv.bias, torch.cat([m.bias for m in qkv]))
            _copy(block.attention.out.weight, att.output.dense.weight)
            _copy(block.attention.out.bias, att.output.dense.bias)
            _copy(block.norm1.weight, att.output.LayerNorm.weight)
            _copy(block.norm1.bias, att.output.LayerNorm.bias)
            _copy(block.mlp.up.weight, layer.intermediate.dense.weight)
            _copy(block.mlp.up.bias, layer.intermediate.dense.bias)
            _copy(block.mlp.down.weight, layer.output.dense.weight)
            _copy(block.mlp.down.bias, layer.output.dense.bias)
            _copy(block.norm2.weight, layer.output.LayerNorm.weight)
            _copy(block.norm2.bias, layer.output.LayerNorm.bias)
    return hf, ours


def _gpt2_pair():
    hf_cfg = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=DIM, n_layer=LAYERS, n_head=HEADS, n_inner=MLP_DIM, n_positions=MAX_SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
    )
    hf = transformers.GPT2Model(hf_cfg).eval()
    _randomize(hf)
    ours = LanguageModel(_tiny_config(mechanism="standard", causal=True, norm="pre", gelu="tanh", norm_eps=1e-5)).eval()
    mine = ours.trunk
    with torch.no_grad():
        _copy(mine.embeddings.tokens.weight, hf.wte.weight)
        _copy(mine.embeddings.positions.weight, hf.wpe.weight)
        for layer, block in zip(hf.h, mine.blocks):
            # GPT-2's Conv1D stores weights as [in, out]; nn.Linear as [out, in]
            _copy(block.norm1.weight, layer.ln_1.weight)
            _copy(block.norm1.bias, layer.ln_1.bias)
            _copy(block.attention.qkv.weight, layer.attn.c_attn.weight.T)
            _copy(block.attention.qkv.bias, layer.attn.c_attn.bias)
            _copy(block.attention.out.weight, layer.attn.c_proj.weight.T)
            _copy(block.attention.out.bias, layer.attn.c_proj.bias)
            _copy(block.norm2.weight, layer.ln_2.weight)
            _copy(block.norm2.bias, layer.ln_2.bias)
            _copy(block.mlp.up.weight, layer.mlp.c_fc.weight.T)
            _copy(block.mlp.up.bias, layer.mlp.c_fc.bias)
            _copy(block.mlp.down.weight, layer.mlp.c_proj.weight.T)
            _copy(block.mlp.down.bias, layer.mlp.c_proj.bias)
        _copy(mine.final_norm.weight, hf.ln_f.weight)
        _copy(mine.final_norm.bias, hf.ln_f.bias)
    return hf, ours


def test_encoder_matches_bert_hidden_states_with_padding():
    hf, ours = _bert_pair()
    ids = torch.randint(0, VOCAB, (3, 20))
    seq_lens = torch.tensor([20, 13, 7])
    attention_mask = (torch.arange(20)[None, :] < seq_lens[:, None]).long()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        got = ours.trunk(ids, seq_lens_from_attention_mask(attention_mask))
    valid = attention_mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_decoder_matches_gpt2_hidden_states():
    hf, ours = _gpt2_pair()
    ids = torch.randint(0, VOCAB, (2, MAX_SEQ))
    with torch.no_grad():
        expected = hf(input_ids=ids).last_hidden_state
        got = ours.trunk(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _mechanisms_with(causal: bool) -> list[str]:
    return [name for name, m in registry.mechanisms().items() if (m.causal if causal else m.bidirectional)]


def _small(mechanism: str, causal: bool, **overrides) -> LanguageModel:
    torch.manual_seed(0)
    conventions = dict(norm="pre", gelu="tanh") if causal else {}
    return LanguageModel(_tiny_config(mechanism=mechanism, causal=causal, **conventions, **overrides)).eval()


@pytest.mark.parametrize("mechanism", _mechanisms_with(causal=True))
def test_decoder_is_causal_for_every_mechanism(mechanism):
    model = _small(mechanism, causal=True)
    ids = torch.randint(0, VOCAB, (2, 16))
    changed = ids.clone()
    changed[:, 10:] = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(after[:, :10], before[:, :10], rtol=1e-5, atol=1e-5)
    assert (after[:, 10:] - before[:, 10:]).abs().max() > 1e-4, "later tokens must change later logits"


@pytest.mark.parametrize("mechanism", [n for n in _mechanisms_with(causal=False) if registry.get(n).padding])
def test_encoder_padding_equals_the_unpadded_sequence(mechanism):
    """A right-padded row with seq_lens gives, on its valid tokens, what the short row alone gives."""
    model = _small(mechanism, causal=False)
    ids = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        padded = model(ids, torch.tensor([16, 9]))
        alone = model(ids[1:, :9])
    torch.testing.assert_close(padded[1, :9], alone[0], rtol=1e-5, atol=1e-5)


def test_positions_follow_the_mechanism():
    assert _small("standard", causal=False).trunk.embeddings.positions.weight.shape == (MAX_SEQ, DIM)
    assert _small("rope", causal=False).trunk.embeddings.positions is None
    sinusoidal = _small("standard", causal=False, positions="sinusoidal")
    assert sinusoidal.trunk.embeddings.positions is None and sinusoidal.cfg.max_length is None
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():  # sinusoidal positions make the output order-dependent, as learned ones do
        out = sinusoidal(ids)
        flipped = sinusoidal(ids.flip(1)).flip(1)
    assert (out - flipped).abs().max() > 1e-3


def test_learned_positions_refuse_longer_inputs():
    model = _small("standard", causal=True)
    assert model.cfg.max_length == MAX_SEQ
    with pytest.raises(ValueError, match="learned positions"):
        model(torch.zeros(1, MAX_SEQ + 1, dtype=torch.long))


@pytest.mark.parametrize("task", ["mlm", "clm"])
def test_param_counts_add_up_and_tie_the_head(task):
    model = build_model("tiny", "standard", task=task, vocab_size=500)
    counts = param_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    preset = Preset.from_name("tiny")
    c = preset.dim
    assert counts["attention"] == preset.layers * (4 * c * c + 4 * c)  # q, k, v, out with biases
    assert counts["mlp"] == preset.layers * (2 * c * preset.mlp_dim + preset.mlp_dim + c)
    expected_head = 0 if task == "clm" else c * c + c + 2 * c + 500  # dense, LayerNorm, output bias
    assert counts["head"] == expected_head


def test_small_preset_is_about_30m_parameters():
    with torch.device("meta"):
        model = build_model("small", "rope", task="mlm")
    assert 25e6 < param_counts(model)["total"] < 35e6


def test_lm_loss_counts_only_labelled_positions():
    model = _small("rope", causal=False)
    ids = torch.randint(0, VOCAB, (2, 12))
    labels = torch.full_like(ids, -100)
    labels[0, 3], labels[1, 7] = 5, 11
    parts = lm_loss(model, ids, labels)
    logits = model(ids)
    expected = torch.nn.functional.cross_entropy(logits[[0, 1], [3, 7]], torch.tensor([5, 11]), reduction="sum")
    assert parts.count.item() == 2
    torch.testing.assert_close(parts.loss_sum, expected)


@pytest.mark.cuda
def test_loss_captured_in_a_cuda_graph_equals_the_eager_loss():
    """Under capture the head runs on every position (no data-dependent shape): the same loss parts."""
    model = build_model("tiny", "standard", "torch", "mlm", 64).cuda()
    ids = torch.randint(0, model.cfg.vocab_size, (2, 64), device="cuda")
    labels = torch.where(torch.rand(2, 64, device="cuda") < 0.3, ids, torch.full_like(ids, IGNORE))
    with torch.no_grad():
        eager = lm_loss(model, ids, labels)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            lm_loss(model, ids, labels)  # warm-up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = lm_loss(model, ids, labels)
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured.loss_sum, eager.loss_sum, rtol=1e-5, atol=1e-4)
    assert captured.count.item() == eager.count.item() and captured.correct.item() == eager.correct.item()


def test_same_seed_gives_identical_shared_weights_across_mechanisms():
    standard = build_model("tiny", "standard", task="clm", vocab_size=300, seed=5)
    rope = build_model("tiny", "rope", task="clm", vocab_size=300, seed=5)
    shared = dict(rope.named_parameters())
    for name, p in standard.named_parameters():
        if name in shared:
            assert torch.equal(p, shared[name]), name
    other_seed = build_model("tiny", "rope", task="clm", vocab_size=300, seed=6)
    assert not torch.equal(other_seed.trunk.blocks[0].mlp.up.weight, rope.trunk.blocks[0].mlp.up.weight)


def test_attention_mask_must_be_right_padding():
    assert seq_lens_from_attention_mask(torch.tensor([[1, 1, 0], [1, 1, 1]])).tolist() == [2, 3]
    with pytest.raises(ValueError, match="right padding"):
        seq_lens_from_attention_mask(torch.tensor([[0, 1, 1]]))
