"""``leanformer compare``: every method side by side, with a report.

Modules: presets (the baseline configs), runs (what a comparison trains, checked), runner (training),
decode (decoding latency and samples), report, assemble (one report from parts), cli. The arms themselves
are :mod:`leanformer.arms`.
"""

from leanformer.compare.presets import PRESETS, Preset, get_preset
from leanformer.compare.runner import execute
from leanformer.compare.runs import plan

__all__ = ["PRESETS", "Preset", "execute", "get_preset", "plan"]
