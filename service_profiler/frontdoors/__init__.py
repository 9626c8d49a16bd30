"""The front doors' offline side: the scheduler-profiling JSONL and scheduler-logging CSVs rebuilt from a
raw run (`offline`, used by `analyze`), and `service-profiler scheduler-report` (`report`).

The live side (the tap in the engine process and the row builders both sides share) is
`service_profiler/runtime/frontdoors/`.
"""
