"""`attnbench distill` (bench/distill/run.py): a tiny causal teacher trained here for a few dozen
steps, its attention swapped, and the student distilled back towards it."""

from __future__ import annotations

import json

import pytest
import torch

from attnbench import store
from attnbench.train import data
from attnbench.distill import columns as distill_columns
from attnbench.distill import run as distill
from attnbench.distill import evaluate as distill_eval
from attnbench.distill import teachers as distill_teachers
from attnbench.models.registry import UnknownNameError
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
    spec = distill.DistillSpec(teacher="tiny-test", students=["linear"], steps=20, lr=5e-3, eval_every=10, eval_batches=2, new_tokens=8,
                               scale_seq=[64])
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
    for metric in distill_columns.EDGE_METRICS + distill_columns.GENERATION_METRICS:  # every one measured, for the student
        assert summary[1][metric] != "", metric
    assert 0.0 <= float(summary[1]["agreement_one_token"]) <= 1.0 and float(summary[1]["kl_repeated"]) >= 0.0
    scale = store.read_rows(run_dir / distill_columns.SCALE_CSV, distill_columns.SCALE_COLUMNS)
    assert {(r["model"], r["impl"], r["seq"], r["status"]) for r in scale} == {("teacher", "torch", "64", "ok"), ("linear", "chunked", "64", "ok")}
    assert {r["batch"] for r in scale} == {"16"} and {r["input"] for r in scale} == {"held-out text"}, "1024 tokens per call on CPU"
    assert float(summary[1]["kl_zero_shot"]) == pytest.approx(zero_shot, rel=1e-5)
    # tiny preset: 2 layers, 4 heads, D = 32; softmax counts T(T+1)/2 causal pairs per head
    assert float(summary[0]["attn_flops"]) == pytest.approx(2 * 4.0 * 4 * 32 * (SEQ * (SEQ + 1) // 2) * BATCH, rel=1e-5)

    generations = json.loads((run_dir / "generations.json").read_text())
    assert {g["model"] for g in generations} == {"teacher (standard)", "linear"}
    assert {g["mode"] for g in generations} == {"greedy", "sampled"}
    assert "```" in (run_dir / "generations.md").read_text()

    from attnbench.distill.report import render_distill_report

    report, *plots = render_distill_report([run_dir], tmp_path / "report")
    text = report.read_text()
    assert "| student | linear | linear |  |  | chunked | 20 |" in text and "### Generations" in text
    assert "Edge cases" in text and "| model | impl | T = 64 |" in text and "| linear | chunked | " in text
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
    with pytest.raises(UnknownNameError, match="valid"):
        distill.DistillSpec(teacher="x", students=["nope"]).validate()
    with pytest.raises(UnknownNameError, match="option 'topn' is not a parameter of linear"):
        distill.DistillSpec(teacher="x", students=["linear"], options={"topn": 4}).validate()
    for size in ("seq", "batch"):  # None means the teacher's; 0 is an error, not a default
        with pytest.raises(distill.InputError, match=f"--{size} must be positive"):
            distill.DistillSpec(teacher="x", students=["linear"], **{size: 0}).validate()


# ---- a diverged student: an error row, the real last good checkpoint, exit 1; the others finish


def nan_loss_for(monkeypatch, mechanism, from_call):
    """Make ``mechanism``'s training loss NaN from its ``from_call``-th step on (1-based)."""
    real, calls = distill.distill_loss, []

    def loss(source, student, batch, spec, teacher_out, student_out, mask_l1=0.0):
        parts = real(source, student, batch, spec, teacher_out, student_out, mask_l1)
        if student.cfg.mechanism == mechanism:
            calls.append(1)
            if len(calls) >= from_call:
                parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(distill, "distill_loss", loss)


def test_a_diverged_student_is_an_error_row_and_the_others_finish(teacher, tmp_path, monkeypatch):
    nan_loss_for(monkeypatch, "window", from_call=3)
    spec = distill.DistillSpec(teacher="tiny-test", students=["window", "linear"], steps=4, eval_every=2, eval_batches=1, new_tokens=2)
    with pytest.raises(distill.StudentDiverged) as raised:
        distill.run_distill(spec, out=tmp_path / "run", source=teacher)
    run_dir = tmp_path / "run"
    message = str(raised.value)
    checkpoint = run_dir / "students" / "window" / "step-000002"
    assert "\n" not in message and "window" in message and f"{checkpoint} (step 2)" in message and checkpoint.is_dir()
    assert not isinstance(raised.value, distill.InputError), "a diverged student is no input error (exit 1, not 2)"

    rows = store.read_rows(run_dir / distill.DISTILL_CSV, distill.DISTILL_COLUMNS)
    errors = [r for r in rows if r["status"] == "error"]
    assert [(r["student"], r["step"]) for r in errors] == [("window", "3")]
    assert f"{checkpoint} (step 2)" in errors[0]["message"]
    assert {r["status"] for r in rows if r not in errors} == {"ok"}
    assert [r["step"] for r in valid_rows(run_dir, "linear")] == ["0", "2", "4"], "the student after it still trains"

    summary = {r["mechanism"]: r for r in store.read_rows(run_dir / distill.SUMMARY_CSV, distill.SUMMARY_COLUMNS) if r["model"] == "student"}
    assert summary["window"]["status"] == "error" and f"{checkpoint} (step 2)" in summary["window"]["message"]
    assert summary["window"]["steps"] == "2", "the step of its last good checkpoint"
    assert summary["linear"]["status"] == "ok" and summary["linear"]["steps"] == "4"
    generations = json.loads((run_dir / "generations.json").read_text())
    assert {g["model"] for g in generations} == {"teacher (standard)", "linear"}

    from attnbench.distill.report import render_distill_report

    report, *_ = render_distill_report([run_dir], tmp_path / "report")
    assert f"{checkpoint} (step 2)" in report.read_text()


def test_cli_every_student_diverged_exits_1_with_one_line(teacher, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from attnbench.cli import app

    monkeypatch.setattr(distill, "load_teacher", lambda spec: teacher)
    run_dir = tmp_path / "run"
    args = ["distill", "--teacher", "tiny-test", "--student", "window", "--lr", "1e6", "--steps", "4",
            "--eval-every", "10", "--eval-batches", "1", "--device", "cpu", "--out", str(run_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "distilled" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "window" in lines[0] and "no checkpoint" in lines[0], result.stderr
    assert not (run_dir / "students" / "window").exists()
    rows = store.read_rows(run_dir / distill.DISTILL_CSV, distill.DISTILL_COLUMNS)
    assert [r["student"] for r in rows if r["status"] == "error"] == ["window"], "lr 1e6: NaN at step 3 (seeded)"
    summary = store.read_rows(run_dir / distill.SUMMARY_CSV, distill.SUMMARY_COLUMNS)
    assert [(r["mechanism"], r["status"]) for r in summary] == [("standard", "ok"), ("window", "error")]
    assert "no checkpoint" in summary[1]["message"]


def test_ctrl_c_prints_the_command_that_resumes_the_run(teacher, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from attnbench.cli import app

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill, "load_teacher", lambda spec: teacher)
    monkeypatch.setattr(distill, "distill_student", ctrl_c)
    args = ["distill", "--teacher", "tiny-test", "--student", "window", "--steps", "4", "--device", "cpu", "--out", str(tmp_path / "run")]
    monkeypatch.setattr("sys.argv", ["attnbench", *args])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines()[-1].split() == ["attnbench", *args, "--out", str(tmp_path / "run"), "--resume"]
    assert not (tmp_path / "run" / store.LOCK_FILE).exists()  # the lock went with the run


# ---- KL


def test_kl_is_never_negative():
    """KL of two distributions is >= 0; fp32 rounding of nearly equal ones gives tiny negatives."""
    torch.manual_seed(0)
    teacher_logits = torch.randn(256, 50) * 4
    student_logits = teacher_logits + 1e-4 * torch.randn(256, 50)  # nearly the teacher: KL ~ 1e-9
    log_p, log_q = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
    unclamped = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert unclamped.min() < 0, "the example must round below 0 (else this test cannot fail)"
    kl = distill_eval.kl_per_token(teacher_logits, student_logits)
    assert kl.min() >= 0
    torch.testing.assert_close(kl, unclamped.clamp_min(0), rtol=0, atol=0)


# ---- no network unless --download


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connect and DNS lookup is recorded and refused; HF's offline switches start off
    (and are restored after the test, whatever the code under test sets)."""
    import socket

    from huggingface_hub import constants

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network attempted in a test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return attempts


def test_an_uncached_transformers_teacher_is_one_line_without_network(no_network, tmp_path):
    from typer.testing import CliRunner

    from attnbench.cli import app

    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["distill", "--teacher", "attnbench-test/not-cached", "--student", "linear", "--out", str(run_dir)])
    assert result.exit_code == 2, result.output
    assert no_network == [], f"network attempted without --download: {no_network[:2]}"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--download" in lines[0], result.stderr
    assert not run_dir.exists()


def test_download_lets_transformers_reach_the_hub(no_network, monkeypatch):
    import os

    import transformers
    from huggingface_hub import constants

    asked = []

    def from_pretrained(path, **kwargs):  # stands in for the Hub (which retries for ~25 s when refused)
        asked.append(kwargs.get("local_files_only"))
        raise OSError("stopped by the test")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    spec = distill.DistillSpec(teacher="attnbench-test/not-cached", students=["linear"], download=True)
    with pytest.raises(distill.InputError, match=r"attnbench-test/not-cached: .*\(stopped by the test\)"):
        distill.load_teacher(spec)
    assert asked == [False], "--download lets transformers look beyond its cache"
    assert not constants.HF_HUB_OFFLINE and "HF_HUB_OFFLINE" not in os.environ


def test_a_train_run_teacher_fetches_its_corpus_only_with_distills_download(teacher, tmp_path, monkeypatch, no_network):
    """The train run recorded --download (it fetched WikiText); distill without --download must not."""
    from dataclasses import asdict

    from attnbench import checkpoint
    from attnbench.train.run import TrainSpec

    run = tmp_path / "train-run"
    checkpoint.save(run / "checkpoints" / "standard", teacher.model, torch.optim.AdamW(teacher.model.parameters()), {"step": 1})
    spec = TrainSpec(attn=["standard"], task="clm", preset="tiny", data="wikitext-2", tokenizer="bytes", download=True)
    store.write_meta(run, {"kind": "train", "spec": asdict(spec), "models": {"standard": {"config": asdict(teacher.model.cfg)}}})
    asked = []

    def load_corpus(name, download=False):
        asked.append(download)
        raise distill.InputError("stopped by the test")

    monkeypatch.setattr(data, "load_corpus", load_corpus)
    for download in (False, True):
        with pytest.raises(distill.InputError, match="stopped by the test"):
            distill.load_teacher(distill.DistillSpec(teacher=str(run), students=["linear"], download=download))
    assert asked == [False, True] and no_network == []


# ---- bad input leaves nothing behind


def test_a_student_that_cannot_run_leaves_no_folder(teacher, tmp_path):
    spec = distill.DistillSpec(teacher="tiny-test", students=["linear", "window"], impl="auto,window=triton", steps=2, new_tokens=2)
    with pytest.raises(distill.InputError, match="window/triton"):
        distill.run_distill(spec, out=tmp_path / "run", source=teacher)
    assert not (tmp_path / "run").exists()


def test_a_finished_run_is_not_overwritten_without_resume(teacher, tmp_path):
    spec = distill.DistillSpec(teacher="tiny-test", students=["linear"], steps=2, eval_every=2, eval_batches=1, new_tokens=2)
    run_dir = distill.run_distill(spec, out=tmp_path / "run", source=teacher)
    meta = (run_dir / store.META_JSON).read_text()
    with pytest.raises(distill.InputError, match="--resume"):
        distill.run_distill(distill.DistillSpec(teacher="tiny-test", students=["window"]), out=run_dir, source=teacher)
    assert (run_dir / store.META_JSON).read_text() == meta, "meta.json of the finished run is untouched"


def test_a_student_named_twice_is_an_input_error():
    with pytest.raises(distill.InputError, match="each mechanism once"):
        distill.DistillSpec(teacher="x", students=["linear", "linear"]).validate()


def test_a_transformers_teacher_refuses_a_student_without_a_core_before_any_folder(tmp_path, monkeypatch, no_network):
    import transformers
    from tokenizers import Tokenizer, models

    model_dir = tmp_path / "gpt2-tiny"
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=300, n_positions=SEQ)
    transformers.GPT2LMHeadModel(config).save_pretrained(model_dir)
    Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")).save(str(model_dir / "tokenizer.json"))
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "load_corpus", lambda name, download=False: data.stdlib_corpus(cap_bytes=50_000))
    spec = distill.DistillSpec(teacher=str(model_dir), students=["gau"])
    with pytest.raises(UnknownNameError, match="gau has no kernel-level core"):
        distill.run_distill(spec, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_mask_l1_weighs_the_learned_students_gate_penalty(teacher):
    """--mask-l1 adds mask_l1 x the student's sparsity_penalty() (learned: the mean probability of
    its learnable key-block gates) to the KL, so the scorer gets a gradient from it."""
    teacher.options = {"block": 8}  # SEQ 64: eight key blocks, so there are gates to learn
    try:
        student = teacher.student("learned", "torch")
    finally:
        teacher.options = {}
    batch = data.Batches(teacher.streams["train"], "clm", SEQ, BATCH, seed=0, tokenizer=teacher.tokenizer).at(0)
    losses = {}
    for weight in (0.0, 5.0):
        spec = distill.DistillSpec(teacher="tiny-test", students=["learned"], mask_l1=[weight])
        parts = distill.distill_loss(teacher, student, batch, spec, None, None, mask_l1=weight)
        losses[weight] = parts["loss"] - parts["kl"]
    penalty = distill.sparsity_penalty(student)
    layers = sum(1 for m in student.modules() if hasattr(m, "density"))  # each layer's mean gate probability is <= 1
    assert layers == 2 and 0 < penalty.item() <= layers and losses[0.0].item() == 0.0
    torch.testing.assert_close(losses[5.0], 5.0 * penalty)
    losses[5.0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in student.named_parameters() if "scorer" in n)


def test_mask_l1_without_a_student_that_has_a_penalty_is_refused_in_one_line():
    """Accepted and ignored would be a stub: window and linear have no sparsity penalty to weigh."""
    from attnbench.errors import InputError

    with pytest.raises(InputError, match="--mask-l1 weighs a student's sparsity penalty, and window, linear define none .*learned"):
        distill.DistillSpec(teacher="t", students=["window", "linear"], mask_l1=[0.5]).validate()
    distill.DistillSpec(teacher="t", students=["window", "learned"], mask_l1=[0.5]).validate()  # learned takes it


def test_students_take_their_own_position_scheme_and_kv_heads(teacher):
    """--positions and --kv-heads reach the students: a rope linear student has no learned table, a
    GQA student starts from the teacher's k/v heads mean-pooled per group (q rows and the rest copied)."""
    source = distill_teachers.RunTeacher(teacher.model, teacher.tokenizer, teacher.streams, batch=BATCH, seq=SEQ, label="t",
                                         overrides={"kv_heads": 2}).with_positions("rope")
    student = source.student("standard", "torch")
    assert student.cfg.positions == "rope" and student.cfg.kv_heads == 2 and student.trunk.embeddings.positions is None
    fused_t = teacher.model.trunk.blocks[0].attention.qkv.weight.detach()
    fused_s = student.trunk.blocks[0].attention.qkv.weight.detach()
    heads, d = teacher.model.cfg.heads, teacher.model.cfg.dim // teacher.model.cfg.heads
    assert fused_s.shape[0] == (heads + 2 * 2) * d
    assert torch.equal(fused_s[: heads * d], fused_t[: heads * d])
    k_teacher = fused_t[heads * d : 2 * heads * d].reshape(2, heads // 2, d, -1)
    assert torch.allclose(fused_s[heads * d : heads * d + 2 * d], k_teacher.mean(1).reshape(2 * d, -1))
    with torch.no_grad():
        assert torch.isfinite(student(torch.zeros(1, 8, dtype=torch.long))).all()


def test_a_scheme_a_student_cannot_take_is_one_line(teacher):
    from attnbench.errors import InputError

    source = teacher.with_positions("alibi")
    with pytest.raises(InputError, match="--student linear: .*no score matrix"):
        source.layer_config("linear")


def test_distill_data_streams_another_corpus_through_the_teachers_tokenizer(tmp_path):
    """--data: the teacher run's tokenizer (rebuilt from its corpus, hash-checked) encodes the
    corpus given; without it the run's own corpus is used."""
    from typer.testing import CliRunner

    from attnbench.cli import app

    run = tmp_path / "teacher"
    args = ["train", "--attn", "standard", "--task", "clm", "--preset", "tiny", "--seq", "32", "--batch", "2", "--steps", "2",
            "--tokenizer", "bytes", "--device", "cpu", "--out", str(run)]
    assert CliRunner().invoke(app, args).exit_code == 0
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40 for i in range(60)))
    own = distill_teachers.RunTeacher.from_run(run, mechanism=None, batch=None, seq=None, device="cpu")
    other = distill_teachers.RunTeacher.from_run(run, mechanism=None, batch=None, seq=None, device="cpu", corpus_name=str(text))
    assert own.tokenizer.digest == other.tokenizer.digest
    assert other.streams["train"].numel() < own.streams["train"].numel()
    from_text = set(other.tokenizer.encode_batch([text.read_text()])[0]) | set(other.tokenizer.special_ids)
    assert set(other.streams["train"].tolist()) <= from_text < set(own.streams["train"].tolist()) | from_text


def test_a_penalty_sweep_trains_one_learned_student_per_strength_and_a_strong_one_is_sparse(teacher, tmp_path):
    """--mask-l1 0,10: without a penalty the learned mask keeps every block (the student is the
    teacher: zero-shot KL ~ 0); with a strong one it keeps under half of them on held-out text
    and its held-out KL falls at every evaluation once the mask has closed."""
    teacher.options = {"block": 8}  # SEQ 64: eight key blocks, 28 learnable of 36 causal
    try:
        spec = distill.DistillSpec(teacher="tiny-test", students=["learned", "window"], mask_l1=[0.0, 10.0], mask_lr=0.1, steps=40,
                                   lr=5e-3, eval_every=10, eval_batches=2, new_tokens=4, scale_seq=[64], options={"block": 8})
        run_dir = distill.run_distill(spec, out=tmp_path / "run", source=teacher)
    finally:
        teacher.options = {}
    assert [cell.name for cell in spec.cells()] == ["learned@l1=0", "learned@l1=10", "window"], "window has no penalty: trained once"
    open_kls = [float(r["kl"]) for r in valid_rows(run_dir, "learned@l1=0")]
    assert open_kls[0] < 1e-6, f"the learned student starts as its teacher: zero-shot KL {open_kls[0]}"
    sparse_kls = [float(r["kl"]) for r in valid_rows(run_dir, "learned@l1=10")]
    closed = sparse_kls.index(max(sparse_kls))
    assert closed < len(sparse_kls) - 2 and sparse_kls[closed:] == sorted(sparse_kls[closed:], reverse=True), sparse_kls

    density = store.read_rows(run_dir / distill_columns.DENSITY_CSV, distill_columns.DENSITY_COLUMNS)
    per_student = {}
    for row in density:
        per_student.setdefault(row["student"], []).append(float(row["density"]))
    assert set(per_student) == {"learned@l1=0", "learned@l1=10"} and all(len(v) == 2 * 4 for v in per_student.values())
    assert all(d == 1.0 for d in per_student["learned@l1=0"]), per_student["learned@l1=0"]
    assert sum(per_student["learned@l1=10"]) / 8 < 0.5, per_student["learned@l1=10"]
    assert min(per_student["learned@l1=10"]) >= round(8 / 36, 6), "the diagonal block is always kept (the CSV holds 6 digits)"
    summary = {r["student"]: r for r in store.read_rows(run_dir / distill.SUMMARY_CSV, distill.SUMMARY_COLUMNS)}
    assert float(summary["learned@l1=10"]["density"]) == pytest.approx(sum(per_student["learned@l1=10"]) / 8, rel=1e-4)
    assert summary["learned@l1=10"]["mask_l1"] == "10" and summary["window"]["density"] == ""
    scale = {r["model"]: r for r in store.read_rows(run_dir / distill_columns.SCALE_CSV, distill_columns.SCALE_COLUMNS)}
    assert float(scale["learned@l1=10"]["density"]) < 0.5, "on held-out text the layer keeps the blocks it learned to keep"
    teacher_flops = float(summary[""]["attn_flops"])  # the teacher's row has no student name
    assert float(summary["learned@l1=0"]["attn_flops"]) == pytest.approx(teacher_flops, rel=1e-5), "every block kept: the dense count"
    assert float(summary["learned@l1=10"]["attn_flops"]) < 0.6 * teacher_flops, "the kept blocks' count"

    from attnbench.distill.report import render_distill_report

    report, *plots = render_distill_report([run_dir], tmp_path / "report")
    assert {p.name for p in plots} >= {"distill_pareto.png", "distill_density.png"}
    assert "| student | learned@l1=10 | learned |  | 10 |" in report.read_text()


def test_position_schemes_cross_the_students_and_a_cell_without_meaning_is_an_unsupported_row(teacher, tmp_path):
    spec = distill.DistillSpec(teacher="tiny-test", students=["linear", "window"], positions=["rope", "alibi"], steps=2, eval_every=2,
                               eval_batches=1, new_tokens=2, scale_seq=[32])
    run_dir = distill.run_distill(spec, out=tmp_path / "run", source=teacher)
    summary = {r["student"]: r for r in store.read_rows(run_dir / distill.SUMMARY_CSV, distill.SUMMARY_COLUMNS) if r["model"] == "student"}
    assert set(summary) == {"linear+rope", "linear+alibi", "window+rope", "window+alibi"}
    assert summary["linear+alibi"]["status"] == "unsupported" and "no score matrix" in summary["linear+alibi"]["message"]
    assert all(summary[name]["status"] == "ok" and summary[name]["positions"] == name.split("+")[1]
               for name in ("linear+rope", "window+rope", "window+alibi"))
    rows = store.read_rows(run_dir / distill.DISTILL_CSV, distill.DISTILL_COLUMNS)
    assert [(r["step"], r["status"]) for r in rows if r["student"] == "linear+alibi"] == [("0", "unsupported")]
    from attnbench.errors import InputError

    with pytest.raises(InputError, match="no student can be trained: linear\\+alibi: .*no score matrix"):
        distill.DistillSpec(teacher="t", students=["linear"], positions=["alibi"]).validate()


def test_prompts_file_holds_prompts_separated_by_dashes(tmp_path):
    from attnbench.distill import generate
    from attnbench.errors import InputError

    path = tmp_path / "prompts.txt"
    path.write_text("def f(x):\n    return\n---\nOnce upon a time\n---\n\n")
    assert generate.read_prompts(str(path)) == ["def f(x):\n    return", "Once upon a time"]
    assert generate.read_prompts(None) == generate.PROMPTS
    (tmp_path / "empty.txt").write_text("---\n  \n")
    for bad in (tmp_path / "empty.txt", tmp_path / "missing.txt"):
        with pytest.raises(InputError, match="--prompts"):
            generate.read_prompts(str(bad))


def test_cli_prompts_reach_the_generations_and_a_missing_file_is_one_line(teacher, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from attnbench.cli import app

    run = tmp_path / "teacher"
    args = ["train", "--attn", "standard", "--task", "clm", "--preset", "tiny", "--seq", "32", "--batch", "2", "--steps", "2",
            "--tokenizer", "bytes", "--device", "cpu", "--out", str(run)]
    assert CliRunner().invoke(app, args).exit_code == 0
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("SELECT name FROM\n---\nDear Sir,")
    base = ["distill", "--teacher", str(run), "--student", "linear", "--steps", "2", "--eval-every", "2", "--eval-batches", "1",
            "--device", "cpu", "--scale-seq", "32"]
    result = CliRunner().invoke(app, [*base, "--prompts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "--prompts" in result.output and not (tmp_path / "bad").exists()
    result = CliRunner().invoke(app, [*base, "--prompts", str(prompts), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    texts = json.loads((tmp_path / "run" / "generations.json").read_text())
    assert {t["prompt"] for t in texts} == {"SELECT name FROM", "Dear Sir,"}


def test_generation_metrics_count_ngrams_and_fluency_is_the_teachers_perplexity(teacher):
    from attnbench.distill import generate

    assert generate.distinct([1, 2, 1, 2, 3], 1) == 3 / 5 and generate.distinct([1, 2, 1, 2, 3], 2) == 3 / 4
    assert generate.distinct([7], 2) is None
    m = generate.metrics(teacher, [10, 11], [5, 6, 5, 6, 5, 6], "cpu")
    assert m["rep_4"] == pytest.approx(1 - 2 / 3), "4-grams 5656, 6565, 5656: two unique of three"
    ids = torch.tensor([[10, 11, 5, 6, 5, 6, 5]])
    with torch.no_grad():
        logits = teacher.model(ids)[0, -6:]
    expected = torch.nn.functional.cross_entropy(logits, torch.tensor([5, 6, 5, 6, 5, 6])).exp().item()
    assert m["fluency_ppl"] == pytest.approx(expected, rel=1e-5)


def test_generations_keep_the_cache_and_pick_the_tokens_of_recomputation(teacher):
    """The teacher (standard, learned positions up to SEQ) and a linear student generate from their
    caches, past SEQ by recomputation (models/generate.py): the tokens of the recompute-only path."""
    from attnbench.distill import generate
    from attnbench.models import generate as decoding

    prompt = teacher.tokenizer.encode_batch(["def read_config(path):\n"])[0]
    for model in (teacher.model, teacher.student("linear", "chunked").eval()):
        assert decoding.why_no_cache(model) is None
        forward = lambda ids, model=model: teacher.sequence_logits(model, ids)  # noqa: E731
        for generator in (None, 3):
            def draw(seed=generator):
                return None if seed is None else torch.Generator().manual_seed(seed)

            got = generate.generate(teacher, model, prompt, SEQ, "cpu", draw())
            recomputed = decoding.recompute(forward, teacher.max_length, prompt, SEQ, "cpu", generator=draw(), eos_id=teacher.tokenizer.eos_id)
            assert got == recomputed.ids and len(got) > SEQ - len(prompt), "past SEQ tokens of context"


def test_edge_batches_keep_one_token_or_repeat_one(teacher):
    from attnbench.distill import edges

    valid = data.eval_batches(teacher.streams["valid"], "clm", SEQ, BATCH, 1, teacher.tokenizer)
    one = edges.one_token(valid[0], "clm", teacher.tokenizer)
    assert one["seq_lens"].tolist() == [1] * BATCH and (one["labels"][:, 1:] == data.IGNORE).all()
    assert torch.equal(one["labels"][:, 0], valid[0]["labels"][:, 0]) and (one["input_ids"][:, 1:] == teacher.tokenizer.pad_id).all()
    masked = edges.one_token(valid[0], "mlm", teacher.tokenizer)
    assert (masked["input_ids"][:, 0] == teacher.tokenizer.mask_id).all() and torch.equal(masked["labels"][:, 0], valid[0]["input_ids"][:, 0])
    same = edges.repeated(teacher.streams["valid"], "clm", SEQ, BATCH, teacher.tokenizer, 0)
    assert same["input_ids"].shape == (BATCH, SEQ) and same["input_ids"].unique().numel() == 1
    assert int(same["input_ids"][0, 0]) not in teacher.tokenizer.special_ids


def test_learned_masks_stop_learning_at_mask_freeze_while_the_rest_trains(teacher, tmp_path, monkeypatch):
    """--mask-freeze 0.5 of 4 steps: the scorers change over steps 1-2 and not after; q/k/v keep training."""
    snapshots = {}
    real_save = distill.checkpoint.save

    def save(folder, model, optimizer, state, *args, **kwargs):
        snapshots[state["step"]] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return real_save(folder, model, optimizer, state, *args, **kwargs)

    monkeypatch.setattr(distill.checkpoint, "save", save)
    teacher.options = {"block": 8}
    try:
        spec = distill.DistillSpec(teacher="tiny-test", students=["learned"], mask_l1=[1.0], mask_lr=0.1, mask_freeze=0.5, steps=4,
                                   lr=5e-3, eval_every=2, eval_batches=1, new_tokens=2, scale_seq=[64], options={"block": 8})
        distill.run_distill(spec, out=tmp_path / "run", source=teacher)
    finally:
        teacher.options = {}
    student = teacher.student("learned", "torch")
    start = {n: p.detach() for n, p in student.named_parameters()}
    scorer = [n for n in snapshots[2] if ".scorer." in n]
    assert scorer and all(not torch.equal(snapshots[2][n], start[n]) for n in scorer), "the masks learn before the freeze"
    assert all(torch.equal(snapshots[4][n], snapshots[2][n]) for n in scorer), "and not after it"
    assert not torch.equal(snapshots[4]["trunk.blocks.0.attention.qkv.weight"], snapshots[2]["trunk.blocks.0.attention.qkv.weight"])


def test_mask_options_without_a_learned_mask_are_refused_in_one_line():
    """Accepted and ignored would be a flag that does nothing: linear has no mask to train."""
    from attnbench.errors import InputError

    for given in ({"mask_lr": 0.05}, {"mask_freeze": 0.8}):
        with pytest.raises(InputError, match="--mask-lr and --mask-freeze train a student's learned mask, and linear have none"):
            distill.DistillSpec(teacher="t", students=["linear"], **given).validate()
    distill.DistillSpec(teacher="t", students=["linear", "learned"], mask_lr=0.05).validate()
