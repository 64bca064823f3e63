"""The built-in corpora: stdlib (unchanged), installed packages split by package, and both."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanformer.config import ConfigError, DataConfig
from leanformer.data import builtin
from leanformer.data.corpus import DataError, resolve_source


def _fake_site(tmp_path: Path, monkeypatch) -> Path:
    folder = tmp_path / "site-packages"
    files = {
        "alpha/__init__.py": 3, "alpha/core/ops.py": 4, "alpha/core/__pycache__/ops.cpython.py": 1,
        "beta.py": 2, "gamma/a.py": 5, "gamma/sub/b.py": 2, "delta/x.py": 2, "epsilon/y.py": 3,
    }
    for rel, lines in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        package = rel.split("/")[0].removesuffix(".py")
        path.write_text("".join(f"# {package} {rel} line {i}\n" for i in range(lines)))
    monkeypatch.setattr(builtin, "site_folders", lambda: [folder])
    return folder


def test_site_corpus_splits_by_package(tmp_path, monkeypatch):
    folder = _fake_site(tmp_path, monkeypatch)
    src = resolve_source(None, builtin="site", val_fraction=0.4)
    names = [p.relative_to(folder).as_posix() for p in src.files]
    assert "alpha/core/__pycache__/ops.cpython.py" not in names and len(names) == 7
    assert src.split_keys == [f"site-packages/{n.split('/')[0].removesuffix('.py')}" for n in names]
    train, val = src.read()
    assert train and val
    side = {}
    for docs, name in ((train, "train"), (val, "val")):
        for doc in docs:
            package = doc.split()[1]
            assert side.setdefault(package, name) == name, f"package {package} on both sides"
    assert "installed packages (7 .py files in 5 top-level packages" in src.description


def test_all_is_stdlib_then_packages(tmp_path, monkeypatch):
    folder = _fake_site(tmp_path, monkeypatch)
    root, std = builtin.stdlib_files()
    src = builtin.builtin_source("all", 0.05)
    assert src.files[:len(std)] == std and len(src.files) == len(std) + 7
    assert all(f.is_relative_to(folder) for f in src.files[len(std):])
    assert src.split_keys[0] == std[0].relative_to(root).as_posix()  # stdlib: split by file, as before
    assert "standard library" in src.description and "installed packages" in src.description


def test_stdlib_source_is_unchanged():
    """The default corpus keeps its files, split and cache identity (the compare numbers depend on them)."""
    src = resolve_source(None, max_files=5)
    root, std = builtin.stdlib_files()
    assert src.kind == "stdlib" and src.files == std[:5]
    assert src.split_keys == [f.relative_to(root).as_posix() for f in std[:5]]
    assert set(src.identity) == {"kind", "root", "files", "python"}


def test_bad_builtin_names_the_choices(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="data.builtin"):
        DataConfig(builtin="pypi").validate()
    with pytest.raises(DataError, match="stdlib, site, all"):
        builtin.builtin_source("pypi", 0.05)
    monkeypatch.setattr(builtin, "site_folders", lambda: [tmp_path / "empty"])
    with pytest.raises(DataError, match="no .py files"):
        builtin.builtin_source("site", 0.05)
