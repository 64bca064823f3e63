"""The built-in corpora: Python source that every machine running leanformer already has, no download.

``data.builtin`` (used when ``data.path`` is null) picks one:

* ``stdlib`` (default) — every ``.py`` file of the running interpreter's standard library (its ``test/``
  package kept, ``site-packages`` and ``__pycache__`` left out). Train/validation is split by file.
* ``site`` — every ``.py`` file of the installed third-party packages (the interpreter's
  ``site-packages`` folders: torch, numpy, transformers, … wherever leanformer runs). Split **by
  top-level package**, so no package has files on both sides (a package's files are near-duplicates of
  each other far more often than files of different packages).
* ``all`` — both: the standard library split by file, the packages by package.

Each is a :class:`~leanformer.data.corpus.TextSource`; what it holds (files, bytes) is in its description,
and its identity (paths, sizes, modification times) keys the token cache.
"""

from __future__ import annotations

import site
import sys
import sysconfig
from pathlib import Path

from leanformer.data.corpus import DataError, TextSource, _text_source, unit_hash

BUILTINS = ("stdlib", "site", "all")
_SKIP_PARTS = {"__pycache__"}


def site_folders() -> list[Path]:
    """The interpreter's ``site-packages`` folders that exist, without duplicates, in a stable order."""
    found = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    try:
        found += site.getsitepackages()
    except AttributeError:  # some embedded interpreters have no getsitepackages
        pass
    out: list[Path] = []
    for folder in found:
        p = Path(folder).resolve()
        if p.is_dir() and p not in out:
            out.append(p)
    return out


def stdlib_files() -> tuple[Path, list[Path]]:
    """(root, its ``.py`` files sorted by relative path), third-party and byte-code folders excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (f for f in root.rglob("*.py")
         if not ({"site-packages", "dist-packages"} | _SKIP_PARTS) & set(f.relative_to(root).parts)),
        key=lambda f: f.relative_to(root).as_posix(),
    )
    return root, files


def package_files() -> list[tuple[str, Path]]:
    """``(top-level package, file)`` for every ``.py`` file under :func:`site_folders`, sorted by package
    then path. A top-level module ``six.py`` is its own package ``six``."""
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for folder in site_folders():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder)
            if _SKIP_PARTS & set(rel.parts) or f in seen:
                continue
            seen.add(f)
            package = rel.parts[0][:-3] if len(rel.parts) == 1 else rel.parts[0]
            out.append((package, f))
    out.sort(key=lambda pf: (pf[0], pf[1].as_posix()))
    return out


def builtin_source(kind: str, val_fraction: float, max_files: int | None = None,
                   max_chars: int | None = None) -> TextSource:
    """The built-in corpus ``kind`` (one of :data:`BUILTINS`) as a text source; ``max_files`` keeps the first
    N files in the listed order (tests); ``max_chars`` keeps whole files drawn in the order of a hash of
    their path until their sizes reach it (a sample of every package, not the alphabetically first ones;
    sizes in bytes stand for characters: the source is nearly all ASCII)."""
    if kind not in BUILTINS:
        raise DataError(f"data.builtin={kind!r} is not valid; choose one of {', '.join(BUILTINS)}")
    root, std = stdlib_files() if kind in ("stdlib", "all") else (Path(sys.prefix), [])
    packages = package_files() if kind in ("site", "all") else []
    files = std + [f for _, f in packages]
    # split keys: the relative path for standard-library files (as before), the package for the others
    keys = [f.relative_to(root).as_posix() for f in std] + [f"site-packages/{pkg}" for pkg, _ in packages]
    if max_files is not None:
        files, keys = files[:max_files], keys[:max_files]
    if max_chars is not None:
        files, keys = _sample_by_size(files, keys, max_chars)
    if not files:
        where = {"stdlib": f"the standard library folder {root}",
                 "site": f"the site-packages folders {', '.join(map(str, site_folders())) or '(none)'}",
                 "all": "the standard library or site-packages folders"}[kind]
        raise DataError(f"built-in corpus {kind!r}: no .py files under {where}")
    version = sys.version.split()[0]
    parts = []
    if std:
        parts.append(f"Python {version} standard library ({min(len(std), len(files))} .py files under {root})")
    n_site = len(files) - min(len(std), len(files))
    if n_site:
        n_pkg = len({k for k in keys if k.startswith("site-packages/")})
        parts.append(f"installed packages ({n_site} .py files in {n_pkg} top-level packages under "
                     f"{', '.join(map(str, site_folders()))}; split by package)")
    if max_chars is not None:
        parts.append(f"files sampled by path hash up to {max_chars:,} bytes")
    src = _text_source(kind, root, files, "text", val_fraction, " + ".join(parts))
    src.split_keys = keys
    src.identity["python"] = sys.version
    return src


def _sample_by_size(files: list[Path], keys: list[str], max_chars: int) -> tuple[list[Path], list[str]]:
    """The files (and their split keys) taken in the order of ``unit_hash(path)`` until their sizes sum to
    at least ``max_chars``, returned in their original order."""
    order = sorted(range(len(files)), key=lambda i: unit_hash(files[i].as_posix()))
    keep, total = [], 0
    for i in order:
        if total >= max_chars:
            break
        keep.append(i)
        total += files[i].stat().st_size
    keep.sort()
    return [files[i] for i in keep], [keys[i] for i in keep]
