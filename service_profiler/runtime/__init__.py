"""The engine side: everything that runs inside an engine process.

Start-up (`bootstrap`, the `.pth` line, the vLLM plugin entry point, `sitecustomize_dir`), configuration
(`settings`, `envvars`, `shipped`), the symbols YAML (`symbols`, `expressions`), lazy patching
(`patching`, `probes`, the C switch in `speedups`/`_speedups.c`), recording (`recorder`, `rawwriter`,
`signalsafe`, `threads`), samplers (`sampling`), the front doors' live tap (`frontdoors/`), and the
`Runtime` that ties them together (`core`).

These modules import only the standard library, PyYAML and the small C switch, never the offline side
(raw reader, tables, exporters, model, twin, planner) nor anything heavy: a test holds every module of
this package to that. Importing this package itself imports nothing.
"""
