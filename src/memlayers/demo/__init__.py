"""`memlayers demo`: the paper's Figure 1 in miniature (factual QA against memory size)."""

from memlayers.demo.runner import demo_config, run_demo
from memlayers.demo.suite import DemoConfig, DemoRun, build_runs

__all__ = ["DemoConfig", "DemoRun", "build_runs", "demo_config", "run_demo"]
