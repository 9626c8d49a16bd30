"""Bottleneck analyzer: compute-, memory-, scheduling-, cache- or front-end-bound, from a profiled run."""

from __future__ import annotations

from .analysis import console_report, diagnose, write_analysis
from .rules import KINDS, THRESHOLDS
from .signals import DiagnoseError, RunView, load_run

__all__ = ["KINDS", "THRESHOLDS", "DiagnoseError", "RunView", "console_report", "diagnose", "load_run",
           "write_analysis"]
