"""The digital twin: replay a workload through vLLM's real v1 scheduler on a virtual clock and predict
TTFT, TPOT, e2e latency, throughput and preemptions for another engine configuration.

    from service_profiler.twin import Twin
    twin = Twin.from_run("out")                       # the output dir of `service-profiler analyze`
    pred = twin.run(["--max-num-seqs", "64"])         # or twin.run({"max_num_seqs": 64})
    pred.metrics["ttft_ms_p50"]; pred.write("what-if")

`Twin.run(engine_args, step_times="model"|"measured")` -> `Prediction` with
- `metrics`: ttft_ms_p50/p90/p99, tpot_ms_p50/p90/p99, e2e_ms_p50/p90/p99, output_throughput_tok_s,
  preemptions, completed_requests, duration_s;
- `requests`, `batches`: rows in the schema of analyze's request.csv / batch.csv;
- `settings`, `step_times` (which step-time source: measured, v2 or tbs), `notes`, `captured_metrics`;
- `write(dir)`: request.csv, batch.csv, prediction.json.
`engine_args`: a list (or one string) of `vllm serve` arguments, or a dict of EngineArgs fields; they
apply on top of the captured run's settings. Invalid ones raise `EngineArgsError` with vLLM's reason.

Traces: `read_trace` / `write_trace` (JSONL, see trace.py), `TraceRequest`; importers and the
`vllm bench serve` exporter in `formats`. `Twin.with_requests(trace)` replays another workload with the
same engine knowledge.
"""

from __future__ import annotations

from .capture import CaptureError
from .engine_config import EngineArgsError
from .prediction import Prediction
from .trace import TraceError, TraceRequest, read_trace, write_trace
from .twin import StepTimeModel, Twin

__all__ = ["CaptureError", "EngineArgsError", "Prediction", "StepTimeModel", "TraceError", "TraceRequest", "Twin",
           "read_trace", "write_trace"]
