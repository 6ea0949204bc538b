"""`attnbench train` on CPU at toy sizes: the loss falls, runs are reproducible, resume is exact,
divergence stops cleanly, DDP matches one process, extrapolation and the report are written."""

import math
import shlex

import pytest
import torch
from typer.testing import CliRunner

from attnbench import store
from attnbench import checkpoint
from attnbench.train import impl_choice as mechanism_choice
from attnbench.train import run as train
from attnbench.train import spec as train_spec
from attnbench.train.spec import Cell
from attnbench.train import evaluate as train_eval
from attnbench.cli import app
from attnbench.errors import InputError
from attnbench.models.transformer import build_model, param_counts
from attnbench.train.report import render_train_report

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNBENCH_CACHE", str(tmp_path / "cache"))


MEASURED_STEP_SECONDS = train.step_seconds


@pytest.fixture(autouse=True)
def no_throwaway_steps(monkeypatch):
    """step_seconds' two throwaway steps would shift tests that count training calls; the tests
    that want the measured estimate put it back (MEASURED_STEP_SECONDS)."""
    monkeypatch.setattr(train, "step_seconds", lambda run, mechanism: 0.01)


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    words = "the cat sat on a mat while dogs ran in parks and birds sang songs of old".split()
    for i in range(60):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words[(i * j) % len(words)] for j in range(300)))
    return str(folder)


def _spec(corpus, **overrides):
    base = dict(
        attn=["rope"], task="clm", preset="tiny", steps=8, seq=32, batch=4, lr=3e-3, warmup=2,
        data=corpus, tokenizer="bytes", device="cpu", eval_every=4, eval_batches=1, seed=0,
    )
    return train.TrainSpec(**{**base, **overrides})


def _losses(run_dir, split="train"):
    rows = store.read_rows(run_dir / store.TRAIN_CSV, train.TRAIN_COLUMNS)
    return [(r["attn"], r["step"], r["loss"]) for r in rows if r["split"] == split]


def test_loss_falls_same_seed_same_losses_and_everything_is_written(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "step_seconds", MEASURED_STEP_SECONDS)  # its throwaway steps change nothing
    spec = _spec(corpus, attn=["rope", "standard"], steps=12)
    first = train.run_train(spec, tmp_path / "a")
    second = train.run_train(_spec(corpus, attn=["rope"], steps=12), tmp_path / "b")
    rope_first = [row for row in _losses(first) if row[0] == "rope"]
    assert _losses(second) == rope_first, "same seed, same data: identical losses, whatever else the run trains"
    for attn in ("rope", "standard"):
        losses = [float(loss) for a, _, loss in _losses(first) if a == attn]
        assert len(losses) == 12 and losses[-1] < losses[0] - 1.0, losses
    assert [step for a, step, _ in _losses(first, "valid") if a == "rope"] == ["4", "8", "12"]
    extrapolation = store.read_rows(first / train.EXTRAPOLATION_CSV, train.EXTRAPOLATION_COLUMNS)
    status = {(r["attn"], r["factor"], r["method"]): r["status"] for r in extrapolation}
    assert all(status[("rope", f, m)] == "ok" for f in "124" for m in ("blocks", "sliding"))
    assert status[("standard", "1", "blocks")] == "ok" and status[("standard", "4", "sliding")] == "unsupported"
    entropy = store.read_rows(first / train.ENTROPY_CSV, train.ENTROPY_COLUMNS)
    assert {r["status"] for r in entropy} == {"ok"}
    assert all(0 < float(r["entropy"]) < math.log(32) for r in entropy)  # causal rows see <= 32 keys
    meta = store.read_meta(first)
    assert meta["corpus"]["sha256"] and meta["tokenizer"]["name"] == "bytes" and meta["finished"]
    assert meta["epochs"] == pytest.approx(12 * 4 * 32 / meta["corpus"]["tokens"]["train"])
    assert meta["models"]["rope"]["params"]["total"] == param_counts(build_model("tiny", "rope", task="clm", seq=32, vocab_size=259))["total"]
    assert (first / "plots" / "train_curves.png").stat().st_size > 0 and (first / "plots" / "extrapolation.png").exists()
    assert "| rope |" in (first / "train_report.md").read_text() and " @ 12 |" in (first / "train_report.md").read_text()
    assert checkpoint.latest(first / "checkpoints" / "standard").name == "step-000012"
    render_train_report([first, second], tmp_path / "both")  # rope in both runs: named by run; standard alone
    table = (tmp_path / "both" / "train_report.md").read_text()
    assert all(f"| {line} |" in table for line in ("a/rope", "b/rope", "standard")) and "a/standard" not in table


class Killed(Exception):
    pass


def test_resume_after_a_kill_continues_exactly(corpus, tmp_path, monkeypatch):
    spec = _spec(corpus, task="mlm", steps=6, eval_every=3)
    whole = train.run_train(spec, tmp_path / "whole")
    at = train.data.Batches.at

    def killed_before_step_6(self, step):  # after the step-3 checkpoint, with rows 4 and 5 logged
        if step == 5:
            raise Killed
        return at(self, step)

    monkeypatch.setattr(train.data.Batches, "at", killed_before_step_6)
    with pytest.raises(Killed):
        train.run_train(spec, tmp_path / "resumed")
    assert [s for _, s, _ in _losses(tmp_path / "resumed")] == ["1", "2", "3", "4", "5"]
    monkeypatch.setattr(train.data.Batches, "at", at)
    resumed = train.run_train(spec, tmp_path / "resumed", resume=True)
    assert _losses(resumed) == _losses(whole)
    assert _losses(resumed, "valid") == _losses(whole, "valid")
    with pytest.raises(InputError, match="differ: steps"):
        train.run_train(_spec(corpus, task="mlm", steps=7, eval_every=3), tmp_path / "resumed", resume=True)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    real = train.lm_loss
    calls = []

    def poisoned(model, input_ids, labels, seq_lens=None):
        parts = real(model, input_ids, labels, seq_lens)
        calls.append(1)
        return parts._replace(loss_sum=parts.loss_sum * float("nan")) if len(calls) == 5 else parts

    monkeypatch.setattr(train, "lm_loss", poisoned)  # the training steps' loss (evaluation has its own)
    with pytest.raises(train.TrainingDiverged, match=r"rope: loss is nan at step 5; .*step-000004"):
        train.run_train(_spec(corpus, attn=["rope", "alibi"]), tmp_path / "run")
    assert checkpoint.read_state(checkpoint.latest(tmp_path / "run" / "checkpoints" / "rope"))["step"] == 4
    rows = store.read_rows(tmp_path / "run" / store.TRAIN_CSV, train.TRAIN_COLUMNS)
    rope = [r for r in rows if r["attn"] == "rope"]
    assert rope[-1]["status"] == "error" and rope[-1]["step"] == "5"
    # the other mechanism still trained to the end, and the report was written
    assert max(int(r["step"]) for r in rows if r["attn"] == "alibi") == 8
    assert (tmp_path / "run" / "train_report.md").exists()


def test_an_infinite_gradient_norm_stops_the_run_instead_of_freezing_it(corpus, tmp_path, monkeypatch):
    """The loss stays finite, but its gradient is 1e38x: the norm overflows to inf, and clipping
    would scale every step to zero (GPT small's linear run went on like that for 1300 steps)."""
    real = train.lm_loss
    calls = []

    def exploding(model, input_ids, labels, seq_lens=None):
        parts = real(model, input_ids, labels, seq_lens)
        calls.append(1)
        if len(calls) != 3:
            return parts
        return parts._replace(loss_sum=parts.loss_sum + (parts.loss_sum - parts.loss_sum.detach()) * 1e38)

    monkeypatch.setattr(train, "lm_loss", exploding)
    with pytest.raises(train.TrainingDiverged, match=r"the gradient norm is (inf|nan) \(loss [0-9.]+\) at step 3; training stopped, no checkpoint"):
        train.run_train(_spec(corpus), tmp_path / "run")
    last = store.read_rows(tmp_path / "run" / store.TRAIN_CSV, train.TRAIN_COLUMNS)[-1]
    assert last["status"] == "error" and last["step"] == "3" and last["loss"] != "inf"


def test_ddp_two_processes_give_the_single_process_curve(corpus, tmp_path):
    spec = _spec(corpus, task="mlm", steps=4, eval_every=4)
    single = train.run_train(spec, tmp_path / "one")
    double = train.run_train(_spec(corpus, task="mlm", steps=4, eval_every=4, gpus=2), tmp_path / "two")
    one, two = _losses(single), _losses(double)
    assert [s for _, s, _ in one] == [s for _, s, _ in two]
    # the same global batch and loss; only the order of the gradient sums differs
    torch.testing.assert_close(torch.tensor([float(x) for *_, x in two]), torch.tensor([float(x) for *_, x in one]), rtol=1e-5, atol=0)


def test_lr_warms_up_then_decays_to_a_tenth():
    spec = train.TrainSpec(attn=["rope"], preset="tiny", steps=100, warmup=10, lr=1.0).resolved(CPU)
    assert train.lr_at(0, spec) == pytest.approx(0.1) and train.lr_at(9, spec) == pytest.approx(1.0)
    assert train.lr_at(55, spec) == pytest.approx(0.55) and train.lr_at(100, spec) == pytest.approx(0.1)


def test_train_flops_per_token_counts_matmuls_and_the_core():
    model = build_model("tiny", "standard", task="clm", seq=64, vocab_size=259)
    c, layers, mlp = 128, 2, 512
    matmul = layers * (4 * c * c + 2 * c * mlp) + 259 * c
    core_fwd = 4 * c * (64 * 65 / 2) / 64  # 4 * Hq * D per visible causal pair, per token
    assert train.train_flops_per_token(model, 64) == pytest.approx(6 * matmul + layers * 3.5 * core_fwd)


@pytest.mark.parametrize("args, message", [
    (["--attn", "nope"], "unknown mechanism"),
    (["--attn", "rope", "--steps", "0"], "--steps must be positive"),
    (["--attn", "rope", "--task", "xyz"], "valid: mlm, clm"),
    (["--attn", "rope", "--seq", "0"], "--seq must be positive"),  # 0 is not "the preset's default"
    (["--attn", "rope", "--batch", "0"], "--batch must be positive"),
    (["--attn", "window", "--window", "-3"], "--window must be a positive integer"),
])
def test_cli_bad_input_is_one_line_and_exit_2(args, message, tmp_path):
    result = CliRunner().invoke(app, ["train", *args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert message in result.output


def test_param_table_covers_presets_and_mechanisms():
    rows = train.param_table(["tiny", "small"], ["standard", "rope"])
    by_key = {(r["preset"], r["mechanism"]): r for r in rows}
    assert by_key[("tiny", "standard")]["embeddings"] - by_key[("tiny", "rope")]["embeddings"] == 128 * 128  # learned positions
    assert by_key[("small", "rope")]["attention"] == 8 * (4 * 512 * 512 + 4 * 512)


def test_window_option_reaches_only_window_mechanisms():
    spec = train.TrainSpec(attn=["standard", "window"], preset="tiny", extra={"window": 16}).resolved(CPU)
    assert train.model_config(spec, Cell("standard"), 300, torch.device("cpu")).window is None
    assert train.model_config(spec, Cell("window"), 300, torch.device("cpu")).window == 16


@pytest.mark.parametrize("mechanism, expected", [("standard", "sdpa"), ("gau", "chunked"), ("linear", "chunked"), ("deltanet", "chunked")])
def test_auto_impl_takes_the_first_preferred_impl_that_runs_here(mechanism, expected):
    model = build_model("tiny", mechanism, task="clm")  # gau's impls are layer-only: they train too
    assert mechanism_choice.choose_impl(mechanism, "auto", model.cfg.layer_config(), torch.device("cpu")) == expected


@pytest.mark.parametrize("text, expected", [
    ("auto", {"linear": "auto", "nsa": "auto"}),
    ("torch", {"linear": "torch", "nsa": "torch"}),
    ("nsa=torch", {"linear": "auto", "nsa": "torch"}),
    ("chunked, nsa=torch", {"linear": "chunked", "nsa": "torch"}),
])
def test_impl_entries_set_one_mechanism_and_the_rest_take_the_default(text, expected):
    assert mechanism_choice.impl_per_mechanism(text, ["linear", "nsa"]) == expected


def test_an_impl_entry_reaches_its_mechanism_model_only():
    spec = train.TrainSpec(attn=["linear", "nsa"], task="clm", preset="tiny", impl="auto,nsa=torch").resolved(CPU)
    assert train.model_config(spec, Cell("nsa"), 300, torch.device("cpu")).impl == "torch"
    assert train.model_config(spec, Cell("linear"), 300, torch.device("cpu")).impl == "chunked"


def test_learned_exposb_parameters_are_written_per_head(tmp_path):
    model = build_model("tiny", "exposb", task="clm")
    path = train.write_learned_parameters(model, "exposb", tmp_path)
    rows = store.read_rows(path, train.LEARNED_COLUMNS)
    layers, heads = model.cfg.layers, model.cfg.heads
    assert len(rows) == layers * 7 * heads
    lam = [float(r["value"]) for r in rows if r["param"] == "lam"]
    assert lam == pytest.approx([-math.log(0.98)] * layers * heads, rel=1e-5)  # the documented initial decay
    assert train.write_learned_parameters(build_model("tiny", "rope", task="clm"), "rope", tmp_path) is None


@pytest.mark.parametrize("mechanism", ["nsa", "deltanet"])
def test_entropy_of_token_conditioned_layers_uses_their_per_token_inputs(mechanism):
    model = build_model("tiny", mechanism, task="clm", seq=64)
    results = train_eval.attention_entropy(model, torch.randint(0, model.cfg.vocab_size, (2, 64)))
    assert len(results) == model.cfg.layers
    for value, message in results:
        assert value is not None or message, "each layer gives an entropy or the reason it has none"


def test_measuring_entropy_is_not_a_training_forward():
    """Entropy is read in eval mode: a performer's redraw counter (a training forward each) does
    not move, so its features are not redrawn off schedule (GPT small's performer was redrawn at
    steps ~992 and ~1992, just before its final evaluation), and the model is back in training mode after."""
    model = build_model("tiny", "performer", task="clm", seq=64).train()
    counters = lambda: [block.attention.steps_since_redraw for block in model.trunk.blocks]  # noqa: E731
    before = counters()
    train_eval.attention_entropy(model, torch.randint(0, model.cfg.vocab_size, (2, 64)))
    assert counters() == before and model.training


@pytest.mark.parametrize("name", ["bsbr", "topk", "nsa"])
def test_entropy_reads_cores_whose_values_must_be_head_dim_wide(name):
    """bsbr and topk take values of width D only, nsa mixes gated branches: the probe reads
    their weights D keys at a time (nsa's normalised per query), each layer a finite entropy
    between 0 and the causal uniform's."""
    model = build_model("tiny", name, task="clm", seq=96)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 96))
    results = train_eval.attention_entropy(model, ids)
    uniform = sum(math.log(t) for t in range(1, 97)) / 96  # mean over causal rows of log(keys seen)
    assert len(results) == model.cfg.layers
    assert all(value is not None and 0 < value <= uniform + 1e-4 for value, _ in results), results


def test_topk_weights_read_by_the_probe_keep_at_most_topk_keys_and_sum_to_one():
    layer_model = build_model("tiny", "topk", task="clm", seq=80, attention={"topk": 5})
    layer = layer_model.trunk.blocks[0].attention
    q, k = torch.randn(1, 80, 4, 32), torch.randn(1, 80, 4, 32)
    probs = train_eval.attention_probabilities(layer, "topk", q, k, None)  # (B, Hq, T, S), S = 80 > D = 32: three probes
    assert probs.shape == (1, 4, 80, 80)
    assert ((probs > 1e-6).sum(-1) <= 5).all() and torch.allclose(probs.sum(-1), torch.ones(1, 4, 80), atol=1e-5)


def test_cli_attn_all_trains_every_registered_mechanism(monkeypatch, tmp_path):
    from attnbench.models.registry import mechanisms

    seen = {}
    monkeypatch.setattr(train, "run_train", lambda spec, out, resume, options: seen.setdefault("spec", spec) and tmp_path)
    result = CliRunner().invoke(app, ["train", "--attn", "all", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert seen["spec"].attn == list(mechanisms())


# ---- defaults that fit the device, input checked before any work, Ctrl-C


STDLIB_TRAIN_TOKENS = {"tiny": 3_709_061, "small": 2_500_000}  # the embedded corpus at each preset's BPE vocabulary


@pytest.mark.parametrize("device, preset, steps, batch", [("cpu", "tiny", 2500, 8), ("cuda", "small", 1220, 8)])
def test_default_run_fits_the_device_and_stays_under_two_epochs(device, preset, steps, batch):
    spec = train.TrainSpec(attn=["rope"]).resolved(torch.device(device), STDLIB_TRAIN_TOKENS[preset])
    assert (spec.preset, spec.steps, spec.batch) == (preset, steps, batch)
    assert train.epochs(spec, STDLIB_TRAIN_TOKENS[preset]) <= train_spec.DEFAULT_EPOCHS < train.MANY_EPOCHS
    assert spec.warmup <= spec.steps // 10  # a default-sized run is not mostly warmup


def test_given_sizes_are_kept_and_only_the_missing_ones_are_sized():
    small = train.TrainSpec(attn=["rope"], preset="small", steps=2000).resolved(torch.device("cuda"), 2_500_000)
    assert (small.batch, small.warmup) == (32, 500)  # --steps given: the preset's batch and warmup, as asked
    sized = train.TrainSpec(attn=["rope"], preset="small", batch=4).resolved(torch.device("cuda"), 2_500_000)
    assert sized.batch == 4 and sized.steps == 2000  # 2 epochs would be 2441 steps: capped at the maximum
    tiny_corpus = train.TrainSpec(attn=["rope"], preset="tiny").resolved(CPU, 10_000)
    assert tiny_corpus.steps * tiny_corpus.batch * tiny_corpus.seq <= 2 * 10_000 and tiny_corpus.steps >= 1


@pytest.mark.parametrize("args, message", [
    (["--attn", "exposb", "--option", "decay_factor=2"], "decay_factor must be in (0, 1)"),
    (["--attn", "exposb", "--option", "decay_factor=abc"], "--attn exposb"),
    (["--attn", "rope", "--data", "no/such/corpus"], "not a corpus name"),
    (["--attn", "rope", "--kv-heads", "3"], "heads (4) must be a multiple of kv_heads (3)"),
])
def test_bad_values_are_refused_before_any_folder_exists(args, message, tmp_path):
    result = CliRunner().invoke(app, ["train", *args, "--device", "cpu", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_folder_of_another_command(corpus, tmp_path):
    store.ensure_writable(tmp_path / "speedrun")
    store.write_meta(tmp_path / "speedrun", {"kind": "speed", "spec": {"mechanisms": ["standard"]}})
    with pytest.raises(InputError, match="is a speed run, not a train run"):
        train.run_train(_spec(corpus), tmp_path / "speedrun", resume=True)


def test_the_command_line_of_a_spec_asks_for_that_spec(monkeypatch, tmp_path):
    spec = train.TrainSpec(attn=["exposb", "window"], task="clm", preset="tiny", steps=7, lr=1e-3, download=True,
                           impl="auto,window=torch", extra={"window": 16, "decay_factor": 0.9})
    seen = {}
    monkeypatch.setattr(train, "run_train", lambda spec, out, resume, options: seen.update(spec=spec, resume=resume) or out)
    result = CliRunner().invoke(app, train.resume_command(spec, tmp_path).split()[1:])
    assert result.exit_code == 0, result.output
    assert seen == {"spec": spec, "resume": True}


def test_ctrl_c_keeps_the_checkpoint_and_prints_the_command_that_resumes_exactly(corpus, tmp_path, monkeypatch):
    args = ["train", "--attn", "rope", "--task", "clm", "--preset", "tiny", "--steps", "6", "--seq", "32", "--batch", "4",
            "--data", corpus, "--tokenizer", "bytes", "--device", "cpu", "--eval-every", "3", "--eval-batches", "1"]
    monkeypatch.setattr(train, "step_seconds", MEASURED_STEP_SECONDS)
    whole = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert whole.exit_code == 0, whole.output
    at = train.data.Batches.at

    def ctrl_c_before_step_5(self, step):  # step_seconds' throwaway steps read batches 0 and 1 only
        if step == 4:
            raise KeyboardInterrupt
        return at(self, step)

    monkeypatch.setattr(train.data.Batches, "at", ctrl_c_before_step_5)
    stopped = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "stopped")])
    assert stopped.exit_code == 130, stopped.output
    assert "run folder: " in stopped.output and "preset tiny, 6 steps x 4 x 32 tokens" in stopped.output
    assert "a step measured here takes rope" in stopped.output
    resume_line = stopped.output.strip().splitlines()[-1].strip()
    assert resume_line.startswith("attnbench train ") and resume_line.endswith("--resume"), stopped.output
    assert checkpoint.latest(tmp_path / "stopped" / "checkpoints" / "rope").name == "step-000003"
    assert "steps = 6" in (tmp_path / "stopped" / "config.toml").read_text()  # kept from the start: `--config` repeats it
    monkeypatch.setattr(train.data.Batches, "at", at)
    resumed = CliRunner().invoke(app, shlex.split(resume_line)[1:])
    assert resumed.exit_code == 0, resumed.output
    assert _losses(tmp_path / "stopped") == _losses(tmp_path / "whole")


def test_the_eta_shows_from_the_first_step_at_the_bars_own_pace():
    from rich.progress import Progress

    from attnbench.console import PaceColumn

    now = [0.0]
    progress = Progress(get_time=lambda: now[0])
    task = progress.add_task("rope", total=100, completed=40, first=40, estimate=30.0)
    assert str(PaceColumn().render(progress.tasks[0])) == "eta ~0:00:30"  # before a step: the measured estimate
    now[0] = 120.0  # one step of a resumed run took two minutes
    progress.update(task, completed=41)
    assert str(PaceColumn().render(progress.tasks[0])) == "eta 1:58:00"


def test_a_mechanism_with_its_own_positions_is_not_recorded_with_learned_ones():
    assert build_model("tiny", "rope", task="clm").cfg.positions == "rope"
    assert build_model("tiny", "standard", task="clm").cfg.positions == "learned"


def test_kv_heads_reach_every_layer_of_the_model():
    spec = train.TrainSpec(attn=["rope"], preset="tiny", kv_heads=1).resolved(CPU)
    model = train.LanguageModel(train.model_config(spec, Cell("rope"), 300, CPU), 0)
    projections = [m.qkv for m in model.modules() if hasattr(m, "qkv")]
    assert len(projections) == 2 and all(p.out_features == (4 + 2 * 1) * 32 for p in projections)  # MQA: one k and one v head
