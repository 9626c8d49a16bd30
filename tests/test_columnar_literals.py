"""Small row sets reach DuckDB as SQL literals (columnar/literals.py): every value comes back as it was,
and no Python value is bound (binding one makes DuckDB's client import pandas)."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from service_profiler.columnar.literals import ROWS_PER_STATEMENT, insert_rows, literal

TEXTS = ["", "plain", "it's", "''", "a\x00b", "\x00", "naïve ✓ 中文", "back\\slash", "new\nline", "tab\t", '"q"',
         "--comment", "'; DROP TABLE t; --", "\ud800".encode("utf-8", "backslashreplace").decode()]


@pytest.mark.parametrize("text", TEXTS)
def test_text_comes_back_unchanged(text: str) -> None:
    con = duckdb.connect()
    assert con.execute(f"SELECT {literal(text)}").fetchone() == (text,)


@pytest.mark.parametrize("value", [0, -1, 2**62, -(2**63), 1.5, -0.0, 0.1 + 0.2, 1e300, 5e-324, None, True, False])
def test_numbers_and_null_come_back_unchanged(value: object) -> None:
    con = duckdb.connect()
    row = con.execute(f"SELECT {literal(value)}").fetchone()
    assert row is not None and row[0] == value and type(row[0]) is type(value)


def test_non_finite_floats() -> None:
    con = duckdb.connect()
    row = con.execute(f"SELECT {literal(math.inf)}, {literal(-math.inf)}, {literal(math.nan)}").fetchone()
    assert row is not None and row[0] == math.inf and row[1] == -math.inf and math.isnan(row[2])


def test_unsupported_type_is_refused() -> None:
    with pytest.raises(TypeError):
        literal(b"bytes")


def test_insert_rows_keeps_every_row_across_statements() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE t (i BIGINT, s VARCHAR, f DOUBLE)")
    rows = [(i, TEXTS[i % len(TEXTS)], i / 3 if i % 7 else None) for i in range(ROWS_PER_STATEMENT * 2 + 5)]
    insert_rows(con, "t", rows)
    insert_rows(con, "t", [])
    assert con.execute("SELECT i, s, f FROM t ORDER BY i").fetchall() == rows


def test_analysis_of_a_run_imports_no_pandas(tmp_path: Path) -> None:
    """The tables and the csv/db/json outputs of a run are made without pandas or numpy imported."""
    code = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from synthetic import SyntheticConfig, generate_run
from service_profiler.columnar.run import analyze_run
from service_profiler.columnar.pipeline import export_all
run_dir = Path(sys.argv[2]) / "run"
generate_run(str(run_dir), SyntheticConfig(requests=20, output_tokens=4, max_num_seqs=4, arrival_rate_per_s=50.0))
assert not {m for m in ("pandas", "numpy") if m in sys.modules}
run = analyze_run([run_dir])
outcomes = export_all(run, ["csv", "summary", "db", "json"], run_dir.parent / "out")
run.close()
assert not [o.error for o in outcomes if o.error], outcomes
print(sorted(m for m in ("pandas", "numpy") if m in sys.modules))
"""
    tests_dir = str(Path(__file__).resolve().parent)
    result = subprocess.run([sys.executable, "-c", code, tests_dir, str(tmp_path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
