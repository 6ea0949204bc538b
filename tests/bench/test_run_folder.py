"""The run-folder lifecycle every command shares: a new run, and what --resume refuses."""

from dataclasses import asdict, dataclass, field

import pytest

from attnbench import run_folder, store
from attnbench.errors import InputError


@dataclass
class Spec:
    teacher: str = "t"
    students: list[str] = field(default_factory=lambda: ["linear"])
    steps: int = 4


def started(tmp_path, kind="distill", spec=None):
    """A run of ``kind`` as its command leaves it: meta.json written, its CSV begun."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    meta, _ = run_folder.begin(kind, run_dir, spec or Spec(), False, run_folder.agreeing())
    store.write_meta(run_dir, meta)
    (run_dir / run_folder.CSV[kind]).write_text("header\n")
    return run_dir


def test_a_new_run_gets_its_meta_and_creates_nothing(tmp_path):
    run_dir, meta, spec = run_folder.open_run("train", Spec(), tmp_path / "new", False, run_folder.agreeing())
    assert run_dir == tmp_path / "new" and not run_dir.exists() and spec == Spec()
    assert meta["kind"] == "train" and meta["spec"] == asdict(Spec()) and meta["finished"] is None
    assert meta["schema_version"] == store.SCHEMA_VERSION and meta["command"].startswith("attnbench") and meta["started"]


@pytest.mark.parametrize("kind", ["speed", "train", "distill"])
def test_a_started_run_is_not_started_again_without_resume(tmp_path, kind):
    run_dir = started(tmp_path, kind)
    with pytest.raises(InputError, match=f"{kind}.csv exists; pass --resume to continue it or choose another --out"):
        run_folder.open_run(kind, Spec(), run_dir, False, run_folder.agreeing())


def test_resume_marks_the_meta_resumed_and_keeps_its_start(tmp_path):
    run_dir = started(tmp_path)
    before = store.read_meta(run_dir)
    _, meta, spec = run_folder.open_run("distill", Spec(steps=6), run_dir, True, run_folder.agreeing("teacher", "students"))
    assert spec == Spec(steps=6), "fields outside the rule's may change"
    assert meta["spec"]["steps"] == 6 and meta["started"] == before["started"]
    assert len(meta["resumed"]) == 1 and meta["finished"] is None


def test_resuming_a_run_of_another_kind_names_the_command_that_continues_it(tmp_path):
    run_dir = started(tmp_path, "train")
    (run_dir / "config.toml").write_text('attn = ["rope"]\n')
    with pytest.raises(InputError) as raised:
        run_folder.open_run("distill", Spec(), run_dir, True, run_folder.agreeing())
    assert str(raised.value) == (f"{run_dir} is a train run, not a distill run: continue it with "
                                 f"`attnbench train --resume --out {run_dir} --config {run_dir / 'config.toml'}`")


def test_resuming_with_a_differing_spec_names_the_differing_fields(tmp_path):
    run_dir = started(tmp_path)
    given = Spec(teacher="other", steps=9)
    with pytest.raises(InputError, match=r"these options differ: teacher, steps \("):
        run_folder.open_run("distill", given, run_dir, True, run_folder.agreeing())
    with pytest.raises(InputError, match=r"these options differ: teacher \("):
        run_folder.open_run("distill", given, run_dir, True, run_folder.agreeing("teacher", "students"))
    _, _, spec = run_folder.open_run("distill", given, run_dir, True, run_folder.as_recorded)
    assert spec == Spec(), "as_recorded runs the recorded spec"


def test_an_unreadable_recorded_spec_is_an_input_error(tmp_path):
    run_dir = started(tmp_path)
    store.write_meta(run_dir, {**store.read_meta(run_dir), "spec": {"no_such_field": 1}})
    with pytest.raises(InputError, match="records no distill spec this version can read"):
        run_folder.open_run("distill", Spec(), run_dir, True, run_folder.agreeing())


def test_resume_of_nothing_creates_nothing(tmp_path):
    with pytest.raises(InputError, match="nothing to resume at"):
        run_folder.open_run("train", Spec(), tmp_path / "never-ran", True, run_folder.agreeing())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="has no meta.json.*without --resume"):
        run_folder.open_run("train", Spec(), tmp_path / "empty", True, run_folder.agreeing())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
