"""The offline reader of the raw per-process files the engine side writes.

`rawfile.read_run` reads a run directory into spans, events, counters and per-process metadata in
memory (with `rawentries` for a line's records, `rawcheck` for malformed lines, `losses` for records
counted as lost); `inspect_run` is `service-profiler inspect`. The analysis tables read the same files
through DuckDB (service_profiler/columnar/raw.py), which shares the file discovery, header checks and
loss accounting here. Nothing on the engine side imports this package.
"""
