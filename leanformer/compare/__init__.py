"""``leanformer compare``: every method side by side, with a report.

Modules: arms, presets, runner, decode, report, cli.
"""

from leanformer.compare.arms import ARMS, arm_config, parse_arms
from leanformer.compare.presets import PRESETS, Preset, get_preset
from leanformer.compare.runner import execute, plan

__all__ = ["ARMS", "PRESETS", "Preset", "arm_config", "execute", "get_preset", "parse_arms", "plan"]
