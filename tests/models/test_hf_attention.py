"""Our cores inside transformers models (models/hf_attention.py): logits of small random-config
GPT-2, Llama-like (GQA, HF's own RoPE) and BERT models built locally, against the same
weights under HF's eager attention.

Tolerance (FlashAttention rule, fp32 against a float64 reference): the error of the model
running our core must be at most 2x the error of HF's own eager attention in fp32, both
measured against the float64 eager model.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from attnbench.models import hf_attention  # noqa: E402  (after the importorskip)
from attnbench.tolerance import error_bound

VOCAB = 97


def gpt2(**overrides):
    settings = dict(vocab_size=VOCAB, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    config = transformers.GPT2Config(**{**settings, **overrides})
    return transformers.GPT2LMHeadModel(config)


def llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64,
    )
    return transformers.BertForMaskedLM(config)


def logits(model, implementation, dtype, ids, mask):
    model = copy.deepcopy(model).to(dtype).eval()
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.double()


def right_padded_mask(lengths, t):
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()


def assert_matches_eager(model, implementation, mask_lengths=None, t=24):
    ids = torch.randint(0, VOCAB, (3, t))
    mask = None if mask_lengths is None else right_padded_mask(mask_lengths, t)
    exact = logits(model, "eager", torch.float64, ids, mask)
    ours = logits(model, implementation, torch.float32, ids, mask)
    eager = logits(model, "eager", torch.float32, ids, mask)
    valid = torch.ones(3, t, dtype=torch.bool) if mask is None else mask.bool()  # padded positions are don't-care
    our_err = (ours - exact)[valid].abs().max().item()
    eager_err = (eager - exact)[valid].abs().max().item()
    assert our_err <= error_bound(eager_err, exact[valid].abs().max().item(), torch.float32), f"{implementation}: max error {our_err:.3g} vs HF eager fp32 {eager_err:.3g}"


@pytest.mark.parametrize("impl", ["torch", "sdpa"])
def test_gpt2_causal_matches_eager(impl):
    torch.manual_seed(0)
    assert_matches_eager(gpt2(), hf_attention.register("standard", impl))


def test_gpt2_right_padding_and_layer_scaling_match_eager():
    torch.manual_seed(1)
    # scale_attn_by_inverse_layer_idx: HF scales scores by D^-0.5 / (layer + 1), folded into q here
    model = gpt2(scale_attn_by_inverse_layer_idx=True)
    assert_matches_eager(model, hf_attention.register("standard"), mask_lengths=[24, 17, 5])


def test_llama_gqa_with_hf_rope_matches_eager():
    torch.manual_seed(2)
    assert_matches_eager(llama(), hf_attention.register("standard"), mask_lengths=[24, 11, 20])


def test_bert_bidirectional_padding_matches_eager():
    torch.manual_seed(3)
    assert_matches_eager(bert(), hf_attention.register("standard"), mask_lengths=[24, 9, 16])


def test_generation_with_cache_matches_eager():
    """Decoding runs T=1 queries against S cached keys (our causal convention aligns the last query
    with the last key, as HF does); greedy continuations must be the same tokens."""
    torch.manual_seed(4)
    model = gpt2().eval()
    prompt = torch.randint(0, VOCAB, (1, 8))
    outputs = {}
    for implementation in ("eager", hf_attention.register("standard")):
        model.set_attn_implementation(implementation)
        outputs[implementation] = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    eager, ours = outputs.values()
    assert torch.equal(ours, eager)


def test_core_parameters_attach_to_each_attention_module():
    torch.manual_seed(5)
    model = gpt2().eval()
    model.set_attn_implementation(hf_attention.register("alibi"))
    model(input_ids=torch.randint(0, VOCAB, (1, 8)))
    cores = [m for name, m in model.named_modules() if name.endswith(hf_attention.CORE_ATTRIBUTE)]
    assert len(cores) == 2, "one core per layer"
    assert all(core.qkv is None and core.out is None for core in cores), "the core carries no projections of its own"


def test_left_padding_is_refused_not_approximated():
    torch.manual_seed(6)
    model = gpt2().eval()
    model.set_attn_implementation(hf_attention.register("standard"))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="right padding"):
        model(input_ids=torch.randint(0, VOCAB, (2, 10)), attention_mask=mask)


def test_dropout_in_training_mode_is_refused():
    model = gpt2().train()
    model.set_attn_implementation(hf_attention.register("standard"))
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=torch.randint(0, VOCAB, (1, 8)))


@pytest.mark.cuda
def test_triton_core_in_gpt2_bf16_matches_eager():
    """Our Triton kernel in bf16 against HF eager in bf16, both measured against float64 eager."""
    torch.manual_seed(7)
    model = gpt2(n_positions=128).cuda()  # 128 tokens need 128 positions (more: a device-side assert)
    ids = torch.randint(0, VOCAB, (3, 128), device="cuda")
    mask = right_padded_mask([128, 77, 30], 128).cuda()
    exact = logits(model, "eager", torch.float64, ids, mask)
    ours = logits(model, hf_attention.register("standard", "triton"), torch.bfloat16, ids, mask)
    eager = logits(model, "eager", torch.bfloat16, ids, mask)
    valid = mask.bool()
    our_err = (ours - exact)[valid].abs().max().item()
    eager_err = (eager - exact)[valid].abs().max().item()
    assert our_err <= error_bound(eager_err, exact[valid].abs().max().item(), torch.bfloat16), f"triton: max error {our_err:.3g} vs HF eager bf16 {eager_err:.3g}"
