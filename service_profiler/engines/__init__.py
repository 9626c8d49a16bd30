"""Engine knowledge, one package per engine family (`vllm/`: vLLM and vLLM-Ascend).

An engine package holds the handlers (what to read from the engine's objects, through
`service_profiler.record`) and the symbol YAMLs that name what to patch and for which versions;
`engines.json` says which YAML is the default for which installed distribution. A new engine is a new
package here plus an entry in `engines.json`; the engine side (`service_profiler/runtime/`) does not change.
"""
