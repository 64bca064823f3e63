"""``--kernels`` of ``leanformer bench decode``: choose the decoding step's kernels by name for one run.

Each name sets module switches for the run and restores them after, so one command times a variant against
the defaults (docs/benchmarks.md records which were measured faster):

    --kernels products=cublas,step=single,argmax=two-pass

=========  ============================================================  ==============================
name       what it chooses                                              choices (default first)
=========  ============================================================  ==============================
products   few-row products: ``leanformer.ops.skinny_linear.ROUTE``     triton, cublas
tiles      their tiles for ≤ 16 rows: ``skinny_linear.TILES``           wide, narrow
split      long-K products in parts: ``skinny_linear.SPLIT_K``          auto, off
noble      NOBLE's one-kernel layer: ``leanformer.ops.noble_decode``    triton, eager
noble-k    its long-K layers in parts: ``noble_decode.SPLIT_K``         split, whole
norms      Pre-LN's norms and residuals in the products (norm_linear)  apart, in-products
step       DiJiang's step kernel: ``fused_decay_step.SINGLE_PASS``      two-pass, single
argmax     greedy choice: ``leanformer.decoding``'s argmax switches    two-pass, one-pass, in-head
pdl        programmatic dependent launch (Hopper, graph path only)      off, on
=========  ============================================================  ==============================
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager

from leanformer.config import ConfigError

_PDL = ("leanformer.ops.skinny_linear.PDL", "leanformer.ops.fused_decay_step.PDL")
KERNEL_CHOICES: dict[str, dict[str, dict[str, object]]] = {  # name -> choice -> {dotted switch: value}
    "products": {"triton": {"leanformer.ops.skinny_linear.ROUTE": "cuda"},
                 "cublas": {"leanformer.ops.skinny_linear.ROUTE": "never"}},
    "tiles": {"wide": {"leanformer.ops.skinny_linear.TILES": "wide"},
              "narrow": {"leanformer.ops.skinny_linear.TILES": "narrow"}},
    "split": {"auto": {"leanformer.ops.skinny_linear.SPLIT_K": "auto"},
              "off": {"leanformer.ops.skinny_linear.SPLIT_K": None}},
    "noble": {"triton": {"leanformer.ops.noble_decode.ROUTE": "cuda"},
              "eager": {"leanformer.ops.noble_decode.ROUTE": "never"}},
    "noble-k": {"split": {"leanformer.ops.noble_decode.SPLIT_K": True},
                "whole": {"leanformer.ops.noble_decode.SPLIT_K": False}},
    "norms": {"apart": {"leanformer.ops.norm_linear.ROUTE": "never"},
              "in-products": {"leanformer.ops.norm_linear.ROUTE": "cuda"}},
    "step": {"two-pass": {"leanformer.ops.fused_decay_step.SINGLE_PASS": False},
             "single": {"leanformer.ops.fused_decay_step.SINGLE_PASS": True}},
    "argmax": {"two-pass": {"leanformer.decoding.TWO_PASS_ARGMAX": True, "leanformer.decoding.ARGMAX_IN_HEAD": False},
               "one-pass": {"leanformer.decoding.TWO_PASS_ARGMAX": False, "leanformer.decoding.ARGMAX_IN_HEAD": False},
               "in-head": {"leanformer.decoding.TWO_PASS_ARGMAX": False, "leanformer.decoding.ARGMAX_IN_HEAD": True}},
    "pdl": {"off": dict.fromkeys(_PDL, False), "on": dict.fromkeys(_PDL, True)},
}


def parse_kernels(spec: str | None) -> dict[str, object]:
    """``"name=choice,..."`` → {dotted switch: value}; ConfigError naming the bad part and the choices."""
    switches: dict[str, object] = {}
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        name, sep, choice = (s.strip() for s in part.partition("="))
        if not sep or name not in KERNEL_CHOICES:
            raise ConfigError(f"--kernels: {part!r} is not name=choice with a name among "
                              f"{', '.join(KERNEL_CHOICES)}")
        choices = KERNEL_CHOICES[name]
        if choice not in choices:
            raise ConfigError(f"--kernels: {name}={choice!r} is not valid; choose {', '.join(choices)}")
        switches.update(choices[choice])
    return switches


def _target(dotted: str):
    module, attr = dotted.rsplit(".", 1)
    return importlib.import_module(module), attr


@contextmanager
def switches_set(switches: dict[str, object]):
    """Set module switches named by dotted path (``{"leanformer.ops.skinny_linear.ROUTE": "never"}``) for the
    body, restore them after."""
    old = {name: getattr(*_target(name)) for name in switches}
    try:
        for name, value in switches.items():
            setattr(*_target(name), value)
        yield switches
    finally:
        for name, value in old.items():
            setattr(*_target(name), value)


def kernel_switches(spec: str | None):
    """:func:`switches_set` for the switches of ``spec`` (:func:`parse_kernels`)."""
    return switches_set(parse_kernels(spec))
