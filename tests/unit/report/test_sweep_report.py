"""The intervention sweep's report section (Tables 7c, 7d, Figure 9: report/sweep_report.py);
its numbers are checked on the synthetic run in test_report.py."""

from loralens.core.files import atomic_write_json
from loralens.core.run_dir import RunDir
from loralens.report.sweep_report import fig_intruder_sweep, sweep_data, table7c, table7d


def test_a_sweep_file_before_the_control_arm_is_named_not_shown(tmp_path):
    class Data:  # the RunData attributes the sweep tables read
        def __init__(self, run):
            self.run, self.cache, self.problems, self.tasks = run, {}, [], ["rte"]

    run = RunDir(tmp_path)
    atomic_write_json(run.weightspace_sweep_json, {"rows": [
        {"task": "rte", "seed": 42, "lambda": 1.0, "score": 0.6}]})  # the old layout
    d = Data(run)
    assert sweep_data(d) is None and table7c(d) is None and table7d(d) is None
    assert isinstance(fig_intruder_sweep(d), str)  # the figure's "needs ..." line
    assert len(d.problems) == 1 and "predates the control arm" in d.problems[0]
