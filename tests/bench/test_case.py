"""bench/case.py: the speed case is the one definition of speed.csv's case columns."""

from dataclasses import fields

import pytest

from attnbench import store
from attnbench.case import CASE_COLUMNS, Case


def test_the_case_columns_are_the_case_fields_and_head_speed_csv():
    assert CASE_COLUMNS == [f.name for f in fields(Case)]
    assert store.SPEED_COLUMNS[: len(CASE_COLUMNS)] == CASE_COLUMNS


@pytest.mark.parametrize("case", [
    Case("standard", "torch", "kernel", "fwd", "bf16", "cpu", 2, 64, 4, 2, 16, True, None),
    Case("window", "triton", "layer", "fwdbwd", "fp32", "cuda:1", 1, 4096, 8, 8, 128, False, 256),
    Case("rope", "sdpa", "model", "bwd", "fp16", "cuda", 3, 512, 12, 12, 64, True, None, "small"),
])
def test_a_case_written_to_speed_csv_reads_back_as_itself(case, tmp_path):
    log = store.RowLog(tmp_path / store.SPEED_CSV)
    log.append({**case.__dict__, "status": "ok"})
    log.close()
    (row,) = store.read_rows(tmp_path / store.SPEED_CSV)
    assert Case.from_row(row) == case
    assert store.case_key(row) == store.case_key(case.__dict__)


def test_a_row_of_an_older_schema_without_preset_reads_as_no_preset():
    case = Case("standard", "torch", "kernel", "fwd", "bf16", "cpu", 2, 64, 4, 2, 16, True, None)
    row = {name: store.format_value(value) for name, value in case.__dict__.items() if name != "preset"}
    assert Case.from_row(row) == case
