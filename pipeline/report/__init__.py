"""The report of every head and fine-tune on one dataset and backbone: a self-contained HTML page and its Markdown twin."""

# gather reads what the stages left, pipeline.plots draws, render writes the page, build ties them together and
# reuses the page while its inputs are unchanged; browser checks it in headless Chromium. Every choice is made on val.

from __future__ import annotations

from ..config import PROJECTIONS, ReportConfig
from .browser import RenderCheck, RenderError, check_render, find_chromium
from .build import ReportResult, build_report

__all__ = ["build_report", "ReportResult", "ReportConfig", "PROJECTIONS", "check_render", "find_chromium", "RenderCheck", "RenderError"]
