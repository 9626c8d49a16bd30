"""Small row sets into DuckDB as SQL literals.

Why not parameters (`execute(sql, params)`, `executemany`): DuckDB's Python client imports pandas and
numpy the first time it binds a Python value, which costs more than analyzing a short run's tables.
The few rows per process (processes, channels, loss gaps, collection switches) are written as literals
instead, so `analyze` imports neither unless an exporter needs them.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb

ROWS_PER_STATEMENT = 1_000


def literal(value: object) -> str:
    """`value` (None, bool, int, float, str) as a DuckDB SQL literal."""
    if value is None:
        return "NULL"
    if value is True or value is False:
        return "TRUE" if value else "FALSE"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        # from text: a bare 1.5 would be a DECIMAL, whose conversion need not round as Python wrote it
        return f"'{value!r}'::DOUBLE"
    if isinstance(value, str):
        # a quote is doubled; a NUL cannot appear inside a literal, so it is joined in as chr(0)
        return " || chr(0) || ".join("'" + part.replace("'", "''") + "'" for part in value.split("\x00"))
    raise TypeError(f"no SQL literal for {type(value).__name__}")


def insert_rows(con: duckdb.DuckDBPyConnection, table: str, rows: Sequence[Sequence[object]]) -> None:
    """`INSERT INTO table VALUES ...` with `rows`, a statement per ROWS_PER_STATEMENT rows."""
    for start in range(0, len(rows), ROWS_PER_STATEMENT):
        values = ", ".join("(" + ", ".join(map(literal, row)) + ")" for row in rows[start:start + ROWS_PER_STATEMENT])
        con.execute(f"INSERT INTO {table} VALUES {values}")
