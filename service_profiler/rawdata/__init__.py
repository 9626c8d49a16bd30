"""The offline reader of the raw per-process files the engine side writes.

`rawfile.read_run` reads a run directory into spans, events, counters and per-process metadata (with
`rawentries` and its optional C loop `_records.c`, `rawcheck` for malformed lines, `losses` for records
counted as lost); `fastjson` is the JSON encoder the exporters share; `inspect_run` is
`service-profiler inspect`. Nothing on the engine side imports this package.
"""
