"""The report's wall-time table lists the stages in the stage table's order (the report
is below the study layer, so it keeps the order as a tuple; this test keeps them equal)."""

from loralens.report.run_data import STAGES, RunData
from loralens.report.timing_tables import table_timings
from loralens.study.stages import STAGE_NAMES


def test_report_stage_order_is_the_stage_tables():
    assert STAGES == STAGE_NAMES


def test_wall_time_table_lists_weights_between_drift_and_bench():
    # timings.json as `loralens run` writes it, keys in any order
    timings = {"report": 1.0, "bench": 2.0, "weights": 3.0, "drift": 4.0, "train": 5.0}
    d = RunData.__new__(RunData)
    d.timings, d.jobs = timings, {}
    rows = table_timings(d).rows
    assert [r[0] for r in rows] == ["train", "drift", "weights", "bench", "report",
                                    "total (stages)"]
