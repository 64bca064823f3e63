"""Every Triton launch of ours names every constexpr parameter, defaults included.

Inductor's launcher for a user kernel inside a compiled graph (``torch.library.wrap_triton``) takes the
constexprs that were named at the call; one left to its default shifts the launcher's positional
arguments by one, and the compiled step fails with ``TypeError: launcher() missing 1 required positional
argument: '_grid_2'`` (torch 2.11, Triton 3.6, H100: ``norm_linear`` without ``PDL``, 2026-12-06). The
eager call and the interpreter accept it, so the suite checks the calls themselves: :func:`checked_wrap`
replaces each ops module's ``_wrap`` for the whole session (tests/conftest.py).
"""

from __future__ import annotations

import functools
import inspect


@functools.cache
def constexpr_names(kernel) -> frozenset[str]:
    """The names of ``kernel``'s ``tl.constexpr`` parameters (a JITFunction or the interpreter's)."""
    fn = getattr(kernel, "fn", kernel)
    return frozenset(name for name, p in inspect.signature(fn).parameters.items()
                     if "constexpr" in str(p.annotation))


def checked_wrap(wrap):
    """``wrap`` (an ops module's ``_wrap``) whose launches raise AssertionError naming the kernel's
    constexprs that the call leaves to their defaults."""
    def checked(kernel):
        launcher = wrap(kernel)

        class _Grid:
            def __getitem__(self, grid):
                launch = launcher[grid]

                def run(*args, **kwargs):
                    names = constexpr_names(kernel)
                    missing = sorted(names - kwargs.keys())
                    assert not missing, (f"{getattr(kernel, 'fn', kernel).__name__} launched without naming the "
                                         f"constexprs {missing}: a compiled graph's launcher would take too "
                                         f"few arguments")
                    return launch(*args, **kwargs)
                return run
        return _Grid()
    return checked
