"""Choose a profiling script's variants by label (``--variants "label one;label two"``).

The scripts in ``benchmarks/`` (decode_profile.py, prefill_profile.py) keep a list of variants, each a tuple
whose first item is its label; labels hold commas, so the choice separates them with semicolons.
"""

from __future__ import annotations

import argparse


def chosen_variants(parser: argparse.ArgumentParser, text: str, variants: list[tuple]) -> list[tuple]:
    """The variants named in ``text`` (semicolon-separated labels), in the list's order; all of them for an
    empty ``text``. An unknown label stops the script through ``parser.error``, naming it and the known ones."""
    asked = [x.strip() for x in text.split(";") if x.strip()]
    unknown = sorted(set(asked) - {v[0] for v in variants})
    if unknown:
        parser.error(f"--variants: unknown labels {unknown} (separate labels with ';'); "
                     f"known: {[v[0] for v in variants]}")
    return [v for v in variants if not asked or v[0] in asked]
