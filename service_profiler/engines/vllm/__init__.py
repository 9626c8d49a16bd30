"""vLLM and vLLM-Ascend: handlers (what to read from vLLM's objects) and the symbol YAMLs."""
