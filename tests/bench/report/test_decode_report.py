"""The decode rows' crossover table (bench/report/decode.py), on rows whose lines are known."""

import pandas as pd

from attnbench.report.decode import crossover_table

KINDS = {"standard": "kv-cache", "linear": "state", "topk": None}.get


def rows(batch: int, series: dict[tuple[str, str], list[float]], contexts=(1024, 2048, 4096)) -> pd.DataFrame:
    """Decode rows of one batch: series maps (mechanism, impl) to its ms at each context."""
    return pd.DataFrame([
        {"mechanism": mechanism, "impl": impl, "batch": batch, "seq": L, "ms_median": ms}
        for (mechanism, impl), times in series.items() for L, ms in zip(contexts, times)
    ])


def test_the_fitted_crossing_of_a_flat_state_and_a_growing_cache():
    # cache: ms = 0.001 L (its fastest impl of two at each L); state: a flat 3 ms -> they cross at L = 3000
    data = rows(8, {("standard", "slow"): [2.0, 4.0, 8.0], ("standard", "fast"): [1.024, 2.048, 4.096],
                    ("linear", "torch"): [3.0, 3.0, 3.0], ("topk", "torch"): [9.0, 9.0, 9.0]})
    table = crossover_table(data, KINDS)
    assert len(table) == 1  # topk carries neither: not paired
    row = table.iloc[0]
    assert (row["state"], row["cache"], row["cache_impl"]) == ("linear", "standard", "fast")
    assert row["crossover_L"] == 3000
    assert row["first_L_state_faster"] == 4096
    assert (row["L_max"], row["state_ms"], row["cache_ms"]) == (4096, 3.0, 4.096)


def test_a_state_ahead_everywhere_and_one_that_never_catches_up():
    ahead = crossover_table(rows(1, {("standard", "a"): [2.0, 3.0, 5.0], ("linear", "b"): [0.5, 0.5, 0.5]}), KINDS)
    assert ahead.iloc[0]["crossover_L"] == "every L" and ahead.iloc[0]["first_L_state_faster"] == 1024
    behind = crossover_table(rows(1, {("standard", "a"): [1.0, 1.0, 1.0], ("linear", "b"): [2.0, 2.0, 2.0]}), KINDS)
    assert behind.iloc[0]["crossover_L"] == "" and behind.iloc[0]["first_L_state_faster"] == "none measured"
