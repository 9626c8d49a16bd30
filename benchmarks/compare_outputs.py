"""Compare two `service-profiler analyze` output directories, file by file.

    python benchmarks/compare_outputs.py BEFORE_DIR AFTER_DIR

CSV and text files byte for byte; profiler.db by its schema (every table, index and view as SQLite
stores its SQL) and every table's rows in storage order; JSON files (the trace, the latency model) parsed
(a trace's events in any order);
PNG files by their decoded pixels (the encoder's settings may differ). Exit status 1 when anything
differs, with what differs listed.
"""

from __future__ import annotations

import json
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


def compare(before: Path, after: Path) -> list[str]:
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
                found.append(f"{name}: pixels differ")
        elif x.read_bytes() != y.read_bytes():
            found.append(f"{name}: bytes differ")
    return found


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    found = compare(Path(sys.argv[1]), Path(sys.argv[2]))
    for line in found:
        print(line)
    print("identical" if not found else f"{len(found)} difference(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
