"""Analysis plots: all nine written as real PNGs; missing data skips points or plots, never fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service_profiler.analyze import plots
from service_profiler.analyze.plots import PLOT_NAMES, write_plots

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALL = {
    "schedule_model_trend.png",
    "prefill_decode_counts.png",
    "tokens_per_batch.png",
    "schedule_time_hist.png",
    "model_run_time_hist.png",
    "schedule_vs_model_scatter.png",
    "ttft_distribution.png",
    "batch_size_over_time.png",
    "kv_cache_utilization.png",
}


def batch_columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prefill = rng.integers(0, 4, n).astype(float)
    decode = rng.integers(0, 64, n).astype(float)
    return {
        "batch_id": np.arange(n, dtype=float),
        "start_ns": np.cumsum(rng.integers(1_000_000, 30_000_000, n)).astype(float),
        "schedule_ms": rng.gamma(2.0, 0.5, n),
        "model_run_ms": rng.gamma(5.0, 4.0, n),
        "num_prefill_reqs": prefill,
        "num_decode_reqs": decode,
        "total_scheduled_tokens": decode + prefill * rng.integers(16, 2048, n),
        "batch_size": prefill + decode,
        "kv_usage": np.clip(np.linspace(0.05, 0.9, n) + rng.normal(0, 0.03, n), 0, 1),
    }


def request_columns(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"ttft_ms": np.random.default_rng(seed).lognormal(4.0, 1.0, n)}


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE), path
    assert len(data) > 10_000, (path, len(data))


@pytest.mark.parametrize("n", [3000, 12_000])  # below and above the line-decimation threshold
def test_all_nine_plots_are_written(tmp_path: Path, n: int) -> None:
    written = write_plots(batch_columns(n), request_columns(n // 4), tmp_path / "plots")
    assert {p.name for p in written} == ALL
    assert {p.name for p in (tmp_path / "plots").iterdir()} == ALL
    for path in written:
        assert path.parent == tmp_path / "plots"
        assert_png(path)


def test_the_plots_read_only_the_columns_they_declare(tmp_path: Path) -> None:
    # analyze sends the plotting process plots.BATCH_COLUMNS / REQUEST_COLUMNS alone: every plot is
    # drawn from them, and no other column is asked for
    class Recording(dict):  # type: ignore[type-arg]
        def __init__(self, cols: dict[str, np.ndarray]) -> None:
            super().__init__(cols)
            self.asked: set[str] = set()

        def get(self, key: str, default: object = None) -> object:
            self.asked.add(key)
            return super().get(key, default)

    b, r = Recording(batch_columns(500)), Recording(request_columns(100))
    assert set(b) == set(plots.BATCH_COLUMNS) and set(r) == set(plots.REQUEST_COLUMNS)
    assert {p.name for p in write_plots(b, r, tmp_path)} == ALL
    assert b.asked <= set(plots.BATCH_COLUMNS) and r.asked <= set(plots.REQUEST_COLUMNS)


def test_missing_model_run_skips_only_the_plots_that_need_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cols = batch_columns(2000)
    cols["model_run_ms"] = np.full(2000, np.nan)  # e.g. model execution was not probed
    written = {p.name for p in write_plots(cols, {}, tmp_path)}
    skipped = {"model_run_time_hist.png", "schedule_vs_model_scatter.png", "ttft_distribution.png"}
    assert written == ALL - skipped
    assert {p.name for p in tmp_path.iterdir()} == written
    err = capsys.readouterr().err
    for name in skipped:
        assert f"skipped {name}" in err
    assert "skipped schedule_model_trend.png" not in err  # schedule_ms alone still makes that plot


def test_absent_and_partly_missing_columns(tmp_path: Path) -> None:
    cols = batch_columns(2000)
    del cols["kv_usage"], cols["start_ns"]
    cols["model_run_ms"][::3] = np.nan  # points without a model run are dropped, not fatal
    cols["batch_size"][:100] = np.nan
    written = {p.name for p in write_plots(cols, request_columns(300), tmp_path)}
    # batch_size over time falls back to the batch index when start_ns is absent
    assert written == ALL - {"kv_cache_utilization.png"}
    for name in written:
        assert_png(tmp_path / name)


def test_nothing_at_all_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert write_plots({}, {}, tmp_path / "p") == []
    assert capsys.readouterr().err.count("plots: skipped") == 9


def test_decimated_lines_keep_spikes() -> None:
    from matplotlib.figure import Figure

    n = plots.MAX_LINE_POINTS * 10
    y = np.ones(n)
    y[n // 2 + 3] = 500.0  # one slow step among many: it must still reach the top of the plot
    x = np.arange(n, dtype=float)
    ax = Figure().subplots()
    assert plots._draw_series(ax, x, y)
    drawn = sum(np.size(line.get_xdata()) for line in ax.get_lines())
    assert drawn <= plots.LINE_BUCKETS
    assert ax.dataLim.ymax == 500.0 and ax.dataLim.ymin == 1.0


def test_interleaved_batch_ids_are_sorted() -> None:
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    x = np.array([0.0, 2.0, 4.0, 1.0, 3.0, 5.0])  # two engine processes
    assert plots._draw_series(ax, x, x * 10)
    xs = np.asarray(ax.get_lines()[0].get_xdata())
    assert np.all(np.diff(xs) > 0)


def test_import_does_not_load_matplotlib() -> None:
    code = (
        "import sys, service_profiler.analyze.plots, service_profiler.model.latency, "
        "service_profiler.model.command; "
        "bad = [m for m in ('matplotlib', 'scipy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert r.returncode == 0, r.stderr


def test_a_part_of_the_plots_is_written_alone(tmp_path: Path) -> None:
    # analyze draws the plots in two processes, each given its part of PLOT_NAMES
    assert set(PLOT_NAMES) == ALL
    part = PLOT_NAMES[5:]
    written = write_plots(batch_columns(500), request_columns(100), tmp_path, part)
    assert [p.name for p in written] == list(part)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(part)
