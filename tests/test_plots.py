"""Analysis plots (`analyze --format plots`, columnar/plots_out.py): all nine written as real PNGs; missing
data skips only the plots that need it, never fails; long series are bucketed without losing a spike."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.columnar import plots_out
from service_profiler.columnar.run import AnalysisRun, analyze_run

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


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    """Two data-parallel engines (their batches interleave in time), a KV cache that fills up."""
    return generate_run(tmp_path_factory.mktemp("plots"), SyntheticConfig(
        requests=80, output_tokens=16, max_num_seqs=16, num_gpu_blocks=300, dp_size=2, seed=4))


@pytest.fixture
def analysis(synth: SyntheticRun) -> Iterator[AnalysisRun]:
    run = analyze_run([synth.run_dir])
    yield run
    run.close()


def _renamed(src: Path, dst: Path, old: str, new: str) -> Path:
    """A copy of the run with channel `old` declared as `new` (its records then mean nothing to analyze)."""
    dst.mkdir()
    for path in src.iterdir():
        text = path.read_text(encoding="utf-8")
        (dst / path.name).write_text(text.replace(f'"name":"{old}"}}', f'"name":"{new}"}}'), encoding="utf-8")
    return dst


def test_all_nine_plots_are_written(tmp_path: Path, analysis: AnalysisRun) -> None:
    assert {name for name, _, _ in plots_out.PLOTS} == ALL
    written = plots_out.PlotsExporter().export(analysis, tmp_path)
    assert {p.name for p in written} == ALL
    assert {p.name for p in (tmp_path / "plots").iterdir()} == ALL
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000, (path, len(data))


def test_missing_model_run_skips_only_the_plots_that_need_it(
    tmp_path: Path, synth: SyntheticRun, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = _renamed(synth.run_dir, tmp_path / "run", "modelExec", "notProbed")  # model execution not probed
    run = analyze_run([run_dir])
    try:
        assert run.count("batch WHERE model_run_ms IS NOT NULL") == 0 and run.count("batch") > 0
        written = {p.name for p in plots_out.PlotsExporter().export(run, tmp_path / "out")}
    finally:
        run.close()
    skipped = {"model_run_time_hist.png", "schedule_vs_model_scatter.png"}
    assert written == ALL - skipped
    assert {p.name for p in (tmp_path / "out" / "plots").iterdir()} == written
    err = capsys.readouterr().err
    for name in skipped:
        assert f"plots: skipped {name}" in err
    assert "skipped schedule_model_trend.png" not in err  # schedule_ms alone still makes that plot


def test_a_run_without_records_writes_no_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synth = generate_run(tmp_path / "run", SyntheticConfig(requests=3, output_tokens=2, seed=2))
    for path in synth.files:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        path.write_text("".join(ln for ln in lines if not ln.startswith('{"t":"rec"')), encoding="utf-8")
    run = analyze_run([synth.run_dir])
    try:
        assert plots_out.PlotsExporter().export(run, tmp_path / "out") == []
    finally:
        run.close()
    assert capsys.readouterr().err.count("plots: skipped") == 9


def test_bucketed_lines_keep_spikes_and_time_order(analysis: AnalysisRun, monkeypatch: pytest.MonkeyPatch) -> None:
    batches = analysis.count("batch")
    monkeypatch.setattr(plots_out, "LINE_BUCKETS", 10)
    assert batches > 10 * 10
    # one slow step among many: it must still reach the top of the plot
    analysis.con.execute(f"UPDATE batch SET model_run_ms = 500 WHERE batch_row = {batches // 2 + 3}")
    series = plots_out._series(analysis, "batch_row", "model_run_ms")
    assert series is not None and len(series.x) <= 10
    top = analysis.con.execute("SELECT max(model_run_ms), min(model_run_ms) FROM batch").fetchone()
    assert max(series.high) == pytest.approx(500.0) and min(series.low) == pytest.approx(top[1])
    # drawn, the band reaches the spike too
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    series.draw(ax)
    assert ax.dataLim.ymax == pytest.approx(500.0) and ax.dataLim.ymin == pytest.approx(top[1])
    # the two engines' batches interleave in time: the line goes forward in time all the same
    series = plots_out._series(analysis, plots_out._time(analysis), "batch_size")
    assert series is not None and np.all(np.diff(series.x) > 0)


def test_import_does_not_load_matplotlib() -> None:
    code = (
        "import sys, service_profiler.columnar.plots_out, service_profiler.columnar.command, "
        "service_profiler.model.latency, service_profiler.model.command; "
        "bad = [m for m in ('matplotlib', 'scipy') if m in sys.modules]; "
        "assert not bad, bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
