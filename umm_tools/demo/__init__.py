"""``umm demo``: the built-in benchmark. A synthetic world with a known gold reward and a planted spurious
feature (:mod:`umm_tools.demo.world`), and the whole pipeline run on it (:mod:`umm_tools.demo.run`)."""

from umm_tools.demo.run import DemoOptions, run_demo

__all__ = ["DemoOptions", "run_demo"]
