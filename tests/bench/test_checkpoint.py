"""Checkpoints: safetensors + JSON, loaded without pickle; a resumed run continues exactly."""

import copy
import pickle

import pytest
import torch
from torch import nn

from attnbench import checkpoint
from attnbench.errors import InputError
from attnbench.models.transformer import build_model


class Tied(nn.Module):
    """An embedding tied to its output head, a norm and a buffer: what a checkpoint must keep."""

    def __init__(self, vocab: int = 11, dim: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("features", torch.randn(dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids [B, T] -> logits [B, T, vocab]
        return self.head(self.norm(self.embed(ids)) * self.features)


def trainer(seed: int):
    torch.manual_seed(seed)
    model = Tied()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (s + 1))
    return model, optimizer, scheduler


def step(model, optimizer, scheduler) -> None:
    """One step on a batch drawn from the global RNG (a restored RNG state draws the same batch)."""
    ids = torch.randint(0, 11, (3, 5))
    loss = nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1, 1).flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def test_a_loaded_checkpoint_continues_exactly_as_the_uninterrupted_run(tmp_path):
    model, optimizer, scheduler = trainer(0)
    for _ in range(3):
        step(model, optimizer, scheduler)
    checkpoint.save(tmp_path, model, optimizer, {"step": 3, "tokens": 45}, scheduler)
    saved_tensors = {k: v.clone() for k, v in model.state_dict().items()}
    saved_optimizer = copy.deepcopy(optimizer.state_dict())  # state_dict holds the live tensors: step 4 would change them
    saved_scheduler = copy.deepcopy(scheduler.state_dict())
    step(model, optimizer, scheduler)  # the uninterrupted run's step 4

    fresh, fresh_optimizer, fresh_scheduler = trainer(1)
    state = checkpoint.load(checkpoint.latest(tmp_path), fresh, fresh_optimizer, fresh_scheduler)
    assert state == {"step": 3, "tokens": 45}
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, saved_tensors[name]), name
    assert fresh.head.weight is fresh.embed.weight, "the tie survives the load"
    loaded = fresh_optimizer.state_dict()
    assert loaded["param_groups"] == [{**g, "betas": list(g["betas"])} for g in saved_optimizer["param_groups"]]
    assert loaded["state"].keys() == saved_optimizer["state"].keys()
    for index, entries in saved_optimizer["state"].items():
        for key, value in entries.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    assert fresh_scheduler.state_dict() == saved_scheduler

    step(fresh, fresh_optimizer, fresh_scheduler)  # the resumed run's step 4
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_loading_unpickles_nothing(tmp_path, monkeypatch):
    model, optimizer, scheduler = trainer(0)
    step(model, optimizer, scheduler)
    checkpoint.save(tmp_path, model, optimizer, {"step": 1}, scheduler)

    def refuse(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    fresh, fresh_optimizer, fresh_scheduler = trainer(1)
    checkpoint.load(checkpoint.latest(tmp_path), fresh, fresh_optimizer, fresh_scheduler)
    assert torch.equal(fresh.embed.weight, model.embed.weight)
    assert sorted(p.name for p in checkpoint.latest(tmp_path).iterdir()) == [
        "model.safetensors", "optimizer.json", "optimizer.safetensors", "state.json"]


def test_trainable_only_keeps_the_trainable_tensors_and_buffers_and_leaves_the_frozen_ones(tmp_path):
    model, optimizer, scheduler = trainer(0)
    model.embed.requires_grad_(False)  # frozen: loaded from elsewhere (distill: the teacher)
    step(model, optimizer, scheduler)
    checkpoint.save(tmp_path, model, optimizer, {"step": 1}, scheduler, trainable_only=True)

    fresh, fresh_optimizer, fresh_scheduler = trainer(1)
    fresh.embed.requires_grad_(False)
    frozen = fresh.embed.weight.clone()
    checkpoint.load(checkpoint.latest(tmp_path), fresh, fresh_optimizer, fresh_scheduler, trainable_only=True)
    assert torch.equal(fresh.embed.weight, frozen), "a frozen tensor is not in the checkpoint"
    assert not torch.equal(frozen, model.embed.weight), "else the check above cannot fail"
    assert torch.equal(fresh.norm.weight, model.norm.weight) and torch.equal(fresh.features, model.features)

    other = nn.Linear(3, 3)
    with pytest.raises(InputError, match="does not fit this model") as raised:
        checkpoint.load(checkpoint.latest(tmp_path), other, trainable_only=True)
    assert "\n" not in str(raised.value)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    rope = build_model("tiny", "rope", task="clm", vocab_size=259)
    checkpoint.save(tmp_path, rope, torch.optim.AdamW(rope.parameters()), {"step": 1})
    standard = build_model("tiny", "standard", task="clm", vocab_size=259)
    with pytest.raises(InputError, match="does not fit this model") as raised:
        checkpoint.load(checkpoint.latest(tmp_path), standard)
    assert "\n" not in str(raised.value)
    again = build_model("tiny", "rope", task="clm", vocab_size=259, seed=1)
    checkpoint.load(checkpoint.latest(tmp_path), again)
    assert all(torch.equal(a, b) for a, b in zip(rope.state_dict().values(), again.state_dict().values()))
