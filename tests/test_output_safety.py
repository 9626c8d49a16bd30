"""Outputs of analyze and `model fit` are never written through something planted in the output
directory (a symlink at an output's or a scratch file's name), a crafted spool is never unpickled, and
an output path that cannot be used is a clear message with exit status 2, not a traceback."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from synthetic import SyntheticConfig, SyntheticRun, generate_run

from service_profiler.columnar import command
from service_profiler.outputs import OutputFile, OutputPathError, check_output_dir

# scratch names analyze used to write (or read back) at fixed names in the output directory
SCRATCH = ["profiler.db.spool.tmp", "profiler.db.raw.tmp", "profiler.db.tmp", "chrome_tracing.json.events.tmp"]


class _Payload:
    """Unpickling this creates a file: the proof that a planted spool was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> SyntheticRun:
    return generate_run(tmp_path_factory.mktemp("safe") / "run", SyntheticConfig(requests=30, output_tokens=8, seed=4))


@pytest.fixture(scope="module")
def reference(synth: SyntheticRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert command.main(["--input-path", str(synth.run_dir), "--output-path", str(out), "--quiet"]) == 0
    return out


def _outputs(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _spool_payload(path: Path, marker: Path) -> None:
    data = pickle.dumps(("table", _Payload(marker)))
    path.write_bytes(len(data).to_bytes(8, "little") + data)


def test_planted_links_are_replaced_never_written_through(synth: SyntheticRun, reference: Path,
                                                          tmp_path: Path) -> None:
    outputs = _outputs(reference)
    assert {"request.csv", "batch.csv", "profiler.db", "chrome_tracing.json", "model/latency_model.json",
            "plots/ttft_distribution.png"} <= set(outputs)
    victims, marker = tmp_path / "victims", tmp_path / "payload-ran"
    victims.mkdir()
    out = tmp_path / "out"
    (out / "plots").mkdir(parents=True)
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    (out / "model").symlink_to(victim_dir)  # a planted directory link: nothing may land in its target
    for i, name in enumerate([*outputs, *SCRATCH]):
        if name.startswith("model/"):
            continue
        target = victims / f"v{i}"
        if name.endswith("spool.tmp"):
            _spool_payload(target, marker)
        else:
            target.write_text("victim\n")
        (out / name).symlink_to(target)
    before = {p.name: p.read_bytes() for p in victims.iterdir()}
    assert command.main(["--input-path", str(synth.run_dir), "--output-path", str(out), "--quiet"]) == 0
    assert {p.name: p.read_bytes() for p in victims.iterdir()} == before
    assert not marker.exists() and list(victim_dir.iterdir()) == []
    for name in outputs:
        path = out / name
        assert not path.is_symlink() and path.is_file(), name
        if name.endswith(".csv") or (name.endswith(".json") and name != "chrome_tracing.json"):
            assert path.read_bytes() == (reference / name).read_bytes(), name
    # the scratch names are left alone (they are the planter's); nothing of analyze's own is left over
    left = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
    assert left == [], left


def test_fed_csv_that_fails_leaves_no_half_file_and_keeps_the_link_target(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep\n")
    (tmp_path / "x.csv").symlink_to(target)
    out = OutputFile(tmp_path / "x.csv", "w")
    out.fh.write("half")
    out.discard()
    assert target.read_text() == "keep\n" and (tmp_path / "x.csv").is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target", "x.csv"]
    with OutputFile(tmp_path / "x.csv", "w") as fh:
        fh.write("new\n")
    assert target.read_text() == "keep\n" and not (tmp_path / "x.csv").is_symlink()
    assert (tmp_path / "x.csv").read_text() == "new\n"


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "service-profiler"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "service_profiler.cli"]


def test_model_fit_never_writes_through_links(reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    out.mkdir()
    target = tmp_path / "victim"
    target.write_text("victim\n")
    for name in ("latency_model.json", "latency_residuals.png", "latency_contour.png"):
        (out / name).symlink_to(target)
    proc = subprocess.run([*_cli(), "model", "fit", "--input", str(reference / "batch.csv"), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert target.read_text() == "victim\n"
    for name in ("latency_model.json", "latency_residuals.png", "latency_contour.png"):
        assert not (out / name).is_symlink() and (out / name).stat().st_size > 0


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores mode bits: sysfs refuses)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    return Path("/sys/kernel")


@pytest.mark.parametrize("case", ["file", "under_file", "read_only", "under_read_only"])
def test_unusable_output_path_is_a_message_and_exit_2(synth: SyntheticRun, reference: Path, tmp_path: Path,
                                                      case: str) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    ro = _read_only_dir(tmp_path)
    out = {"file": blocker, "under_file": blocker / "out", "read_only": ro, "under_read_only": ro / "out"}[case]
    proc = subprocess.run([*_cli(), "analyze", "--input-path", str(synth.run_dir), "--output-path", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert str(out) in proc.stderr and ("--output-path" in proc.stderr or "directory path" in proc.stderr)
    assert not list(tmp_path.glob("**/profiler.db"))
    # model fit: the same
    proc = subprocess.run([*_cli(), "model", "fit", "--input", str(reference / "batch.csv"), "--output-dir", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(out) in proc.stderr, proc.stderr


def test_check_output_dir_names_path_cause_and_fix(tmp_path: Path) -> None:
    blocker = tmp_path / "f"
    blocker.write_text("")
    with pytest.raises(OutputPathError, match=r"f/sub: cannot be used \(.*Not a directory\); give a directory"):
        check_output_dir(blocker / "sub")
    check_output_dir(tmp_path / "new" / "deep")
    assert (tmp_path / "new" / "deep").is_dir() and list((tmp_path / "new" / "deep").iterdir()) == []

