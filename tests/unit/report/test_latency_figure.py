"""Figure 4's error bars: the spread across seeds (as Table 5), none for one seed.

serving.json is written here by hand: per seed, the latencies (seconds) of two kinds whose
per-seed means are 10, 20 and 30 ms (sd across seeds 10.0 ms) and 50 ms.
"""

from __future__ import annotations

from matplotlib.container import ErrorbarContainer

from loralens.core.run_dir import RunDir
from loralens.report.run_data import RunData
from loralens.report.serving_figures import fig_latency, latency_caption, latency_error

SEED_LATENCIES_S = {"42": [0.008, 0.012], "1337": [0.020], "2024": [0.025, 0.035]}


def serving(seeds: list[str], with_sd: bool) -> dict:
    runs = {s: {"batch": {"1": {"kinds": {
        "lora": {"method": "lora", "latency_s": SEED_LATENCIES_S[s]},
        "full": {"method": "full", "latency_s": [0.05, 0.05]}}}}} for s in seeds}
    rows = []
    for kind, mean in (("full", 50.0), ("lora", 20.0 if len(seeds) == 3 else 10.0)):
        row = {"task": "sst2", "batch_size": 1, "kind": kind, "method": kind,
               "seeds": len(seeds), "mean_ms": mean, "p95_ms": mean + 5}
        if with_sd:
            row["seed_means_sd_ms"] = (10.0 if kind == "lora" else 0.0) if len(seeds) > 1 \
                else None
        rows.append(row)
    return {"tasks": {"sst2": {"seeds": runs}}, "comparison": rows}


def run_data(tmp_path, s: dict, bench_seeds: list[int]) -> RunData:
    return RunData(run=RunDir(tmp_path), serving=s,
                   config={"tasks": ["sst2"], "methods": ["lora", "full"],
                           "bench": {"seeds": bench_seeds}})


def test_three_seeds_give_the_sd_across_seeds():
    s = serving(["42", "1337", "2024"], with_sd=True)
    lora = s["comparison"][1]
    assert latency_error(s, lora) == 10.0                      # Table 5's seed_means_sd_ms
    del lora["seed_means_sd_ms"]                               # a row that predates it:
    assert abs(latency_error(s, lora) - 10.0) < 1e-9           # sd of 10, 20, 30 ms
    assert latency_error(s, s["comparison"][0]) == 0.0


def test_one_seed_has_no_error_bar_and_the_caption_says_why(tmp_path):
    s = serving(["42"], with_sd=True)
    assert [latency_error(s, r) for r in s["comparison"]] == [None, None]
    d = run_data(tmp_path, s, [42])
    assert latency_caption(d).endswith(
        "No error bar for sst2: the benchmark covers one seed (bench.seeds [42]), so there is "
        "no spread across seeds to show (the spread of one seed's requests is not that).")
    fig = fig_latency(d)
    ax = fig.axes[0]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]


def test_three_seeds_draw_the_bars_and_the_caption_names_the_sd(tmp_path):
    d = run_data(tmp_path, serving(["42", "1337", "2024"], with_sd=True), [])
    caption = latency_caption(d)
    assert "sd across seeds of the seeds' mean latencies as error bars (as Table 5)" in caption
    assert "No error bar" not in caption
    ax = fig_latency(d).axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1
    # LoRA (first): 20 ms ± 10 ms, a segment from 10 to 30; full: sd 0
    segments = sorted(tuple(map(tuple, seg)) for seg in bars[0].lines[2][0].get_segments())
    assert [(lo[1], hi[1]) for lo, hi in segments] == [(10.0, 30.0), (50.0, 50.0)]  # lora, full
