"""The seed-002 latency model: recovery, robustness, filtering, persistence and the CLI."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service_profiler.model.latency import (
    PARAM_NAMES,
    LatencyModel,
    TooFewSamplesError,
    fit_and_save,
    fit_latency_model,
)

REPO = Path(__file__).resolve().parents[1]
TRUE = {
    "P_max": 100.0,
    "k_B": 0.15,
    "k_S": 0.004,
    "w_0": 50.0,
    "w_1": 1.0,
    "tau_0": 5.0,
    "tau_B": 0.05,
    "tau_S": 0.002,
}


def seed_formula(p: dict[str, float], b: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The seed's T(B, S), written out independently of the implementation under test."""
    thr = p["P_max"] * (1 - np.exp(-p["k_B"] * b)) * (1 - np.exp(-p["k_S"] * s))
    return p["tau_0"] + (p["w_0"] + p["w_1"] * s) / thr + p["tau_B"] * b + p["tau_S"] * s


def workload(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode-only steps (S = B) mixed with chunked-prefill steps (S >> B)."""
    rng = np.random.default_rng(seed)
    b = rng.integers(1, 129, n).astype(float)
    prefill = rng.random(n) < 0.3
    s = np.where(prefill, b - 1 + rng.integers(16, 4096, n), b)
    return b, s


def noisy(
    n: int, seed: int = 1, noise: float = 0.02, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b, s = workload(n, seed)
    t = seed_formula(TRUE, b, s) * scale
    return b, s, t * (1 + noise * np.random.default_rng(seed + 100).standard_normal(n))


def test_fit_recovers_predictions_on_held_out_and_fresh_points() -> None:
    b, s, t = noisy(3000)
    model = fit_latency_model(b, s, t)
    test = model.metrics["test"]
    used = model.filtering["n_used"]
    assert used > 2900  # a few B=1 long prefills of the true surface exceed 300 ms
    assert model.n_test == round(0.2 * used) and model.n_train + model.n_test == used
    assert test["r2"] is not None and test["r2"] > 0.99
    assert test["mape_pct"] is not None and test["mape_pct"] < 3.0  # noise alone is ~1.6 %
    # Fresh noise-free points: the fitted surface must track the true one, not just the noise.
    fb, fs = workload(1000, seed=7)
    rel = np.abs(np.asarray(model.predict(fb, fs)) / seed_formula(TRUE, fb, fs) - 1)
    assert np.median(rel) < 0.01
    assert rel.max() < 0.05
    assert all(v > 0 for v in model.params.values())


def test_params_are_in_original_units() -> None:
    b, s, t = noisy(1000)
    model = fit_latency_model(b, s, t)
    assert model.scales["batch_size"] != 1.0 and model.scales["total_tokens"] != 1.0
    fb, fs = workload(200, seed=3)
    np.testing.assert_allclose(model.predict(fb, fs), seed_formula(model.params, fb, fs), rtol=1e-10)
    # τ_B and τ_S are identifiable, so they must come back near the truth in ms per request/token.
    assert model.params["tau_B"] == pytest.approx(TRUE["tau_B"], rel=0.2)
    assert model.params["tau_S"] == pytest.approx(TRUE["tau_S"], rel=0.3)


def test_huber_resists_injected_outliers() -> None:
    b, s, t = noisy(2000)
    rng = np.random.default_rng(5)
    bad = rng.choice(t.size, size=t.size // 10, replace=False)
    t = t.copy()
    t[bad] = np.minimum(t[bad] * 3.0 + 20.0, 299.0)  # stalls that stay inside the 300 ms window
    fb, fs = workload(1000, seed=7)
    truth = seed_formula(TRUE, fb, fs)

    def median_error(loss: str) -> float:
        model = fit_latency_model(b, s, t, loss=loss)
        assert model.loss == loss
        return float(np.median(np.abs(np.asarray(model.predict(fb, fs)) / truth - 1)))

    linear, huber = median_error("linear"), median_error("huber")
    assert huber < 0.03
    assert huber < linear / 2


def test_filtering_counts() -> None:
    b, s, t = noisy(200)
    natural_slow = int((t[17:] > 300).sum())  # the true surface exceeds 300 ms for B=1 long prefills
    b, s, t = b.copy(), s.copy(), t.copy()
    t[:5] = np.nan  # model run not captured
    b[5:8] = 0  # invalid
    s[8:10] = -1  # invalid
    t[10:14] = 0.5  # below 1 ms
    t[14:17] = 450.0  # above 300 ms
    model = fit_latency_model(b, s, t)
    f = model.filtering
    counts = (f["n_input"], f["n_invalid"], f["n_below_min"], f["n_above_max"])
    assert counts == (200, 10, 4, 3 + natural_slow)
    assert f["n_used"] == 183 - natural_slow == model.n_train + model.n_test
    # Thresholds are parameters: a 0.1 ms floor keeps the 0.5 ms steps, a 500 ms cap the slow ones.
    loose = fit_latency_model(b, s, t, min_ms=0.1, max_ms=500.0)
    assert loose.filtering["n_used"] == 190 - int((t[17:] > 500).sum())
    assert loose.data_ranges["model_run_ms"][0] == 0.5
    assert loose.data_ranges["model_run_ms"][1] >= 450.0


def test_too_few_samples_is_a_clear_error() -> None:
    b, s, t = noisy(30)
    t = t.copy()
    t[9:] = 0.2
    with pytest.raises(TooFewSamplesError, match=r"only 9 of 30 samples survived.*min_ms=0\.05"):
        fit_latency_model(b, s, t)
    assert issubclass(TooFewSamplesError, ValueError)


def test_split_is_deterministic_and_seeded() -> None:
    b, s, t = noisy(500)
    a1, a2 = fit_latency_model(b, s, t, seed=3), fit_latency_model(b, s, t, seed=3)
    assert a1.params == a2.params and a1.metrics == a2.metrics
    assert fit_latency_model(b, s, t, seed=4).metrics != a1.metrics


def test_predict_scalar_array_and_domain() -> None:
    model = fit_latency_model(*noisy(500))
    one = model.predict(16, 512)
    assert isinstance(one, float) and math.isfinite(one)
    many = model.predict(np.array([16, 32]), np.array([512, 32]))
    assert isinstance(many, np.ndarray) and many.shape == (2,)
    assert many[0] == one
    with pytest.raises(ValueError, match="must be > 0"):
        model.predict(0, 512)


def test_json_round_trip_gives_identical_predictions(tmp_path: Path) -> None:
    model = fit_latency_model(*noisy(800))
    path = tmp_path / "m.json"
    text = model.to_json(path)
    assert json.loads(text) == json.loads(path.read_text())
    back = LatencyModel.from_json(path)
    fb, fs = workload(300, seed=11)
    assert np.array_equal(back.predict(fb, fs), model.predict(fb, fs))
    assert back.params == model.params and back.metrics == model.metrics
    assert (back.n_train, back.n_test, back.loss) == (model.n_train, model.n_test, model.loss)


def test_from_json_names_missing_parameters(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"params": {"P_max": 1.0}}))
    with pytest.raises(ValueError, match=r"bad\.json: missing parameter\(s\) k_B"):
        LatencyModel.from_json(path)
    with pytest.raises(ValueError, match="no such latency model file"):
        LatencyModel.from_json(tmp_path / "absent.json")


def test_fit_and_save_writes_json_and_plots(tmp_path: Path) -> None:
    model = fit_and_save(*noisy(2000), tmp_path / "out")
    assert model is not None
    doc = json.loads((tmp_path / "out" / "latency_model.json").read_text())
    assert set(doc["params"]) == set(PARAM_NAMES)
    assert {"scales", "metrics", "bounds", "data_ranges", "filtering"} <= set(doc)
    assert doc["filtering"]["relaxed"] is False and doc["filtering"]["min_ms"] == 1.0
    assert doc["metrics"]["test"]["r2"] > 0.99
    for name in ("latency_residuals.png", "latency_contour.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_fit_and_save_relaxes_floor_for_sub_ms_steps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b, s, t = noisy(300, scale=1 / 100)  # a tiny CPU model: most steps well under 1 ms
    assert (t >= 1.0).sum() < 10
    model = fit_and_save(b, s, t, tmp_path)
    assert model is not None
    doc = json.loads((tmp_path / "latency_model.json").read_text())
    assert doc["filtering"]["relaxed"] is True and doc["filtering"]["min_ms"] == 0.05
    assert any("relaxed" in note for note in doc["notes"])
    assert "relaxed" in capsys.readouterr().err
    assert doc["metrics"]["test"]["r2"] > 0.98
    # An explicit floor is the caller's decision and is never relaxed.
    assert fit_and_save(b, s, t, tmp_path / "strict", min_ms=1.0) is None


def test_fit_and_save_with_too_few_samples_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    b, s, t = noisy(8)
    assert fit_and_save(b, s, t, tmp_path / "out") is None
    assert not (tmp_path / "out").exists()
    assert "only 8 of 8 samples survived" in capsys.readouterr().err


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "service_profiler.model.command", *args],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120,
    )  # fmt: skip


def _write_batch_csv(path: Path, b: np.ndarray, s: np.ndarray, t: np.ndarray) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["batch_id", "batch_size", "schedule_ms", "total_scheduled_tokens", "model_run_ms"])
        for i, (x, y, z) in enumerate(zip(b, s, t, strict=True)):
            w.writerow([i, int(x), 0.3, int(y), "" if i % 50 == 0 else repr(float(z))])


def test_cli_fit_then_predict(tmp_path: Path) -> None:
    b, s, t = noisy(1500)
    _write_batch_csv(tmp_path / "batch.csv", b, s, t)
    out = tmp_path / "model"
    fit = _cli("fit", "--input", str(tmp_path / "batch.csv"), "--output-dir", str(out), "--loss", "huber")
    assert fit.returncode == 0, fit.stderr
    assert "R²" in fit.stdout and "latency_model.json" in fit.stdout
    doc = json.loads((out / "latency_model.json").read_text())
    assert doc["loss"] == "huber" and doc["filtering"]["n_invalid"] == 30  # the empty cells

    pred = _cli("predict", "--model", str(out / "latency_model.json"),
                "--batch-size", "16", "32", "--tokens", "512", "--json")  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    rows = json.loads(pred.stdout)
    assert [(r["batch_size"], r["total_tokens"]) for r in rows] == [(16, 512), (32, 512)]
    expected = LatencyModel.from_json(out / "latency_model.json").predict([16, 32], [512, 512])
    np.testing.assert_allclose([r["model_run_ms"] for r in rows], expected, rtol=1e-12)
    truth = seed_formula(TRUE, np.array([16.0, 32.0]), np.array([512.0, 512.0]))
    np.testing.assert_allclose([r["model_run_ms"] for r in rows], truth, rtol=0.05)

    text = _cli("predict", "--model", str(out / "latency_model.json"), "--batch-size", "8", "--tokens", "8")
    assert text.returncode == 0, text.stderr
    assert text.stdout.startswith("B=8\tS=8\tT=") and text.stdout.strip().endswith("ms")


def test_cli_errors_name_the_file_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "batch.csv"
    bad.write_text("batch_id,batch_size,model_run_ms\n1,2,3.0\n")
    r = _cli("fit", "--input", str(bad), "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and str(bad) in r.stderr and "total_scheduled_tokens" in r.stderr

    r = _cli("fit", "--input", str(tmp_path / "nope.csv"), "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "nope.csv: no such file" in r.stderr

    bad.write_text("batch_size,total_scheduled_tokens,model_run_ms\n1,2,fast\n")
    r = _cli("fit", "--input", str(bad), "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{bad}:2: column model_run_ms: 'fast'" in r.stderr

    bad.write_bytes(bytes(range(256)) * 4)  # not text
    r = _cli("fit", "--input", str(bad), "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{bad}:1: not UTF-8 text" in r.stderr and "Traceback" not in r.stderr
    bad.write_text("batch_size,total_scheduled_tokens,model_run_ms\n1,2," + "9" * 200_000 + "\n")
    r = _cli("fit", "--input", str(bad), "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{bad}:2: field larger than field limit" in r.stderr and "Traceback" not in r.stderr

    few = tmp_path / "few.csv"
    _write_batch_csv(few, *noisy(5))
    r = _cli("fit", "--input", str(few), "--output-dir", str(tmp_path / "o"))
    assert r.returncode == 1 and "survived filtering" in r.stderr
    assert not (tmp_path / "o").exists()

    r = _cli("predict", "--model", str(tmp_path / "absent.json"), "--batch-size", "1", "--tokens", "1")
    assert r.returncode == 2 and "absent.json" in r.stderr


def test_large_inputs_are_fitted_on_a_deterministic_sample() -> None:
    b, s, t = noisy(3000)
    full = fit_latency_model(b, s, t)
    sampled = fit_latency_model(b, s, t, max_samples=1000)
    again = fit_latency_model(b, s, t, max_samples=1000)
    assert sampled.params == again.params  # seeded: the same sample every time
    assert sampled.filtering["n_used"] == full.filtering["n_used"]  # still counts every surviving step
    assert sampled.filtering["n_fit_sample"] == 1000 and "n_fit_sample" not in full.filtering
    assert sampled.n_train + sampled.n_test == 1000
    assert sampled.data_ranges == full.data_ranges
    assert any("sample of 1,000" in n for n in sampled.notes) and not full.notes
    assert sampled.metrics["test"]["r2"] is not None and sampled.metrics["test"]["r2"] > 0.99
    # under the limit nothing changes
    assert fit_latency_model(b, s, t, max_samples=10_000).params == full.params
