"""Shipped configuration files (JSON config defaults, symbol YAMLs). Installed as `service_profiler.shipped_config`."""
