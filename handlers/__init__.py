"""Engine knowledge: what to read from an engine's objects. Installed as `service_profiler.handlers`."""
