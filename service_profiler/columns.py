"""Column lists of the analysis tables that the tools reading `analyze`'s outputs share with it (kept here,
free of heavy imports, so that reading a column list never loads the analysis engine)."""

from __future__ import annotations

# the request's HTTP breakdown (docs/METRICS.md), at the end of request.csv: where the request came from,
# its milestones (epoch ns), then the parts that add up to e2e_ms (the first five to ttft_ms)
BREAKDOWN_COLUMNS = [
    "arrival_source", "stream", "http_status", "http_arrival_ns", "body_received_ns", "handoff_ns",
    "engine_first_token_ns", "first_token_sent_ns", "last_byte_sent_ns", "vllm_arrival_ns",
    "http_receive_ms", "preprocess_ms", "engine_queue_ms", "engine_prefill_ms", "first_token_delivery_ms",
    "decode_delivery_ms", "engine_ttft_ms", "engine_e2e_ms",
]
PART_COLUMNS = BREAKDOWN_COLUMNS[10:16]
