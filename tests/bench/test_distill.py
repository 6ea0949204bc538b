"""`attnbench distill` (bench/distill.py): a tiny causal teacher trained here for a few dozen
steps, its attention swapped, and the student distilled back towards it."""

from __future__ import annotations

import json

import pytest
import torch

from attnbench import data, distill, distill_eval, distill_teachers, store
from attnbench.models.transformer import build_model, training_step

SEQ, BATCH = 64, 8


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny-preset GPT (standard attention) on 300 kB of the stdlib corpus, bytes tokenizer,
    trained 60 steps: far enough from uniform that a swapped attention is visibly off."""
    mp = pytest.MonkeyPatch()
    mp.setenv("ATTNBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        tokenizer = data.bytes_tokenizer()
        streams = data.token_streams(data.stdlib_corpus(cap_bytes=300_000), tokenizer)
    finally:
        mp.undo()
    torch.manual_seed(0)
    model = build_model("tiny", "standard", task="clm", seq=SEQ, vocab_size=tokenizer.vocab_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train = data.Batches(streams["train"], "clm", SEQ, BATCH, seed=0, tokenizer=tokenizer)
    for step in range(60):
        training_step(model, optimizer, train.at(step))
    return distill_teachers.RunTeacher(model.eval(), tokenizer, streams, batch=BATCH, seq=SEQ, label="tiny-test")


def valid_rows(run_dir, student):
    rows = store.read_rows(run_dir / distill.DISTILL_CSV, distill.DISTILL_COLUMNS)
    return [r for r in rows if r["student"] == student and r["split"] == "valid"]


def test_distilling_lowers_held_out_kl(teacher, tmp_path):
    spec = distill.DistillSpec(teacher="tiny-test", students=["linear"], steps=20, lr=5e-3, eval_every=10, eval_batches=2, new_tokens=8)
    run_dir = distill.run_distill(spec, out=tmp_path / "run", source=teacher)

    rows = valid_rows(run_dir, "linear")
    assert [r["step"] for r in rows] == ["0", "10", "20"], "zero-shot row, then every eval_every steps"
    kls = [float(r["kl"]) for r in rows]
    zero_shot, final = kls[0], kls[-1]
    assert final < 0.5 * zero_shot, f"held-out KL {zero_shot:.4f} -> {final:.4f}"
    assert kls == sorted(kls, reverse=True), f"held-out KL must fall at every evaluation: {kls}"
    # top-1 agreement with a 60-step teacher is decided by near-ties of its flat distributions
    # (it moved 0.92 -> 0.40 -> 0.83 while KL fell 0.089 -> 0.024 -> 0.012): a valid fraction, no trend
    assert all(0.0 <= float(r["agreement"]) <= 1.0 for r in rows)

    summary = store.read_rows(run_dir / distill.SUMMARY_CSV, distill.SUMMARY_COLUMNS)
    assert [r["model"] for r in summary] == ["teacher", "student"]
    assert float(summary[1]["kl_zero_shot"]) == pytest.approx(zero_shot, rel=1e-5)
    # tiny preset: 2 layers, 4 heads, D = 32; softmax counts T(T+1)/2 causal pairs per head
    assert float(summary[0]["attn_flops"]) == pytest.approx(2 * 4.0 * 4 * 32 * (SEQ * (SEQ + 1) // 2) * BATCH, rel=1e-5)

    generations = json.loads((run_dir / "generations.json").read_text())
    assert {g["model"] for g in generations} == {"teacher (standard)", "linear"}
    assert {g["mode"] for g in generations} == {"greedy", "sampled"}
    assert "```" in (run_dir / "generations.md").read_text()

    from attnbench.distill_report import render_distill_report

    report, *plots = render_distill_report([run_dir], tmp_path / "report")
    text = report.read_text()
    assert "| student | linear | chunked | 20 |" in text and "### Generations" in text
    assert all(p.stat().st_size > 0 for p in plots)
    (run_dir / distill.SUMMARY_CSV).unlink()  # as a run killed before its end leaves it
    report, *_ = render_distill_report([run_dir], tmp_path / "report-unfinished")
    assert "Unfinished run" in report.read_text() and (tmp_path / "report-unfinished" / "plots" / "distill_kl.png").exists()


def test_only_attention_trains_by_default(teacher):
    student = teacher.student("linear", "torch")
    names = {n for n, _ in teacher.model.named_parameters()}
    distill.freeze_teacher_parameters(student, names, teacher.attention_names(student), train_all=False)
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".attention." in n for n in trainable)
    for name, param in student.named_parameters():  # every tensor of the teacher's came across (same layout)
        torch.testing.assert_close(param, dict(teacher.model.named_parameters())[name], rtol=0, atol=0)


def test_student_options_reach_only_the_mechanisms_that_declare_them(teacher):
    teacher.options = {"window": 16, "topn": 2}
    try:
        window, nsa = teacher.student("window", "torch"), teacher.student("nsa", "torch")
        assert window.cfg.window == 16 and window.cfg.attention == {}
        assert nsa.cfg.window == 16 and nsa.cfg.attention == {"topn": 2}
        assert teacher.layer_config("standard").window is None
        narrow = teacher.attention_flops("window", BATCH, SEQ)
    finally:
        teacher.options = {}
    assert narrow < teacher.attention_flops("window", BATCH, SEQ), "a 16-token window costs less than the default (1024 > T)"


def test_resume_continues_from_the_checkpoint(teacher, tmp_path):
    spec = distill.DistillSpec(teacher="tiny-test", students=["linear"], steps=4, eval_every=2, eval_batches=1, new_tokens=2)
    run_dir = distill.run_distill(spec, out=tmp_path / "run", source=teacher)
    spec.steps = 6
    distill.run_distill(spec, out=run_dir, resume=True, source=teacher)
    assert [r["step"] for r in valid_rows(run_dir, "linear")] == ["0", "2", "4", "6"], "no step is logged twice"


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(5, 11, dtype=torch.float64)
    torch.testing.assert_close(distill_eval.kl_per_token(logits, logits), torch.zeros(5), atol=1e-6, rtol=0)
    other = torch.randn(5, 11, dtype=torch.float64)
    p, q = logits.softmax(-1), other.softmax(-1)
    torch.testing.assert_close(distill_eval.kl_per_token(logits, other), (p * (p / q).log()).sum(-1).float(), rtol=1e-5, atol=1e-6)


def test_bad_options_are_input_errors():
    with pytest.raises(distill.InputError, match="steps"):
        distill.DistillSpec(teacher="x", students=["linear"], steps=0).validate()
    with pytest.raises(distill.registry.UnknownNameError, match="valid"):
        distill.DistillSpec(teacher="x", students=["nope"]).validate()
    with pytest.raises(distill.registry.UnknownNameError, match="option 'topn' is not a parameter of linear"):
        distill.DistillSpec(teacher="x", students=["linear"], options={"topn": 4}).validate()
    for size in ("seq", "batch"):  # None means the teacher's; 0 is an error, not a default
        with pytest.raises(distill.InputError, match=f"--{size} must be positive"):
            distill.DistillSpec(teacher="x", students=["linear"], **{size: 0}).validate()
