"""Compare two `service-profiler analyze` output directories, file by file.

    python benchmarks/compare_outputs.py BEFORE_DIR AFTER_DIR

CSV and text files byte for byte; profiler.db by its schema (every table, index and view as SQLite
stores its SQL) and every table's rows in storage order; JSON files (the trace, the latency model) parsed
(a trace's events in any order);
PNG files by their decoded pixels (the encoder's settings may differ). Exit status 1 when anything
differs, with what differs listed.

Two differences are only noted, not counted, because they differ between two runs of the same version:
CSV cells that are the same number to 12 significant digits (an average summed by several DuckDB threads
adds in whatever order they finish), and the scatter plot (a reservoir sample of a parallel scan).
"""

from __future__ import annotations

import csv
import json
import math
import sqlite3
import sys
from pathlib import Path


def _db_differences(before: Path, after: Path) -> list[str]:
    found: list[str] = []
    a, b = sqlite3.connect(f"file:{before}?mode=ro", uri=True), sqlite3.connect(f"file:{after}?mode=ro", uri=True)
    schema_query = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    schema_a, schema_b = a.execute(schema_query).fetchall(), b.execute(schema_query).fetchall()
    if schema_a != schema_b:
        found.append(f"profiler.db schema: {sorted(set(schema_a) ^ set(schema_b))}")
    for (name,) in a.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"):
        rows_a = a.execute(f'SELECT * FROM "{name}"').fetchall()
        try:
            rows_b = b.execute(f'SELECT * FROM "{name}"').fetchall()
        except sqlite3.Error as exc:
            found.append(f"profiler.db {name}: {exc}")
            continue
        if rows_a != rows_b:
            pairs = enumerate(zip(rows_a, rows_b, strict=False))
            first = next((i for i, (x, y) in pairs if x != y), min(len(rows_a), len(rows_b)))
            found.append(f"profiler.db {name}: {len(rows_a)} vs {len(rows_b)} rows, first difference at row {first}: "
                         f"{rows_a[first] if first < len(rows_a) else None} vs "
                         f"{rows_b[first] if first < len(rows_b) else None}")
    return found


# outputs that differ between two runs of the same version: a sample drawn from a parallel scan
UNSTABLE = {Path("plots/schedule_vs_model_scatter.png")}


def _close_numbers(x: str, y: str) -> bool:
    try:
        a, b = float(x), float(y)
    except ValueError:
        return False
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)


def _csv_rounding_only(before: Path, after: Path) -> bool:
    """Whether two CSV files differ only in the last digits of some numbers."""
    with before.open(newline="") as x, after.open(newline="") as y:
        rows_a, rows_b = list(csv.reader(x)), list(csv.reader(y))
    if len(rows_a) != len(rows_b) or any(len(a) != len(b) for a, b in zip(rows_a, rows_b, strict=True)):
        return False
    return all(p == q or _close_numbers(p, q)
               for a, b in zip(rows_a, rows_b, strict=True) for p, q in zip(a, b, strict=True))


def _png_differs(before: Path, after: Path) -> bool:
    from PIL import Image

    with Image.open(before) as x, Image.open(after) as y:
        return x.size != y.size or x.convert("RGBA").tobytes() != y.convert("RGBA").tobytes()


def _comparable(document: object) -> object:
    """A trace's events as a sorted list: their order in the file is not part of a trace (viewers order
    them by time) and DuckDB's parallel scan does not fix it."""
    if isinstance(document, dict) and isinstance(document.get("traceEvents"), list):
        return {**document, "traceEvents": sorted(json.dumps(e, sort_keys=True) for e in document["traceEvents"])}
    return document


def compare(before: Path, after: Path, notes: list[str] | None = None) -> list[str]:
    names_a = {p.relative_to(before) for p in before.rglob("*") if p.is_file()}
    names_b = {p.relative_to(after) for p in after.rglob("*") if p.is_file()}
    found = [f"only in {before}: {n}" for n in sorted(names_a - names_b)]
    found += [f"only in {after}: {n}" for n in sorted(names_b - names_a)]
    for name in sorted(names_a & names_b):
        x, y = before / name, after / name
        if name.suffix == ".db":
            found += _db_differences(x, y)
        elif name.suffix == ".json":
            if _comparable(json.loads(x.read_bytes())) != _comparable(json.loads(y.read_bytes())):
                found.append(f"{name}: parsed JSON differs")
        elif name.suffix == ".png":
            if _png_differs(x, y):
                (notes if notes is not None and name in UNSTABLE else found).append(f"{name}: pixels differ")
        elif x.read_bytes() != y.read_bytes():
            if name.suffix == ".csv" and notes is not None and _csv_rounding_only(x, y):
                notes.append(f"{name}: numbers differ in their last digits only")
            else:
                found.append(f"{name}: bytes differ")
    return found


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    notes: list[str] = []
    found = compare(Path(sys.argv[1]), Path(sys.argv[2]), notes)
    for line in notes:
        print(f"note: {line}")
    for line in found:
        print(line)
    print("identical" if not found else f"{len(found)} difference(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
