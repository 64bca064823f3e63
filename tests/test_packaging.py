"""Packaging and start-up: the wheel ships the YAML configs, an installed (non-editable) copy finds them
outside the repository, ``import leanformer`` and the CLI's parser do not import transformers, and the
installed transformers has every name leanformer.hf uses (the minimum stated in pyproject.toml)."""

from __future__ import annotations

import os
import re
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "leanformer" / "configs").glob("*.yaml"))


def _clean_env() -> dict[str, str]:
    """The environment without PYTHONPATH, so a subprocess imports leanformer from where it is installed."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def _build_wheel(out: Path) -> Path:
    """Build the wheel from a copy of the sources (nothing is written into the repository)."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools in this environment")
    src = out / "src"
    src.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "leanformer", src / "leanformer", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out / "dist"), str(src)], check=True, env=_clean_env(), cwd=out)
    (wheel,) = (out / "dist").glob("leanformer-*.whl")
    return wheel


def test_the_configs_are_in_the_package():
    assert {"tiny.yaml", "sas_p.yaml", "gpt2_small.yaml"} <= set(CONFIGS)
    from leanformer.cli import CONFIG_DIR, resolve_config_path

    assert CONFIG_DIR == ROOT / "leanformer" / "configs"
    assert resolve_config_path("tiny") == CONFIG_DIR / "tiny.yaml"
    assert resolve_config_path("tiny.yaml") == CONFIG_DIR / "tiny.yaml"


def test_wheel_contains_every_config(tmp_path):
    names = set(zipfile.ZipFile(_build_wheel(tmp_path)).namelist())
    missing = [c for c in CONFIGS if f"leanformer/configs/{c}" not in names]
    assert not missing, f"the wheel lacks {missing}"


def test_import_and_cli_parser_do_not_import_transformers():
    code = ("import sys, leanformer, leanformer.cli, leanformer.hf; leanformer.cli.build_parser(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers')[:3])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "[]"


def test_leanformer_hf_registers_the_auto_classes_on_first_use():
    pytest.importorskip("transformers")
    code = ("import sys, leanformer.hf as hf; assert 'transformers' not in sys.modules; hf.register(); "
            "from transformers import AutoConfig; print(type(AutoConfig.for_model('leanformer')).__name__)")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert out.strip() == "LeanformerConfig"


@pytest.mark.slow
def test_installed_wheel_runs_outside_the_repository(tmp_path):
    """``pip install`` of the wheel into a fresh venv (its dependencies borrowed from this environment
    through a .pth file, so nothing is downloaded), then the CLI from a folder that is not the repo."""
    wheel = _build_wheel(tmp_path / "build")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    venv_site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                    check=True, capture_output=True, text=True).stdout.strip())
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (venv_site / "borrowed_dependencies.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, env=_clean_env())
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import leanformer; print(leanformer.__file__)"], check=True,
                           capture_output=True, text=True, cwd=work, env=_clean_env()).stdout.strip()
    assert Path(where).is_relative_to(venv_site), where
    printed = subprocess.run([str(venv / "bin" / "leanformer"), "train", "--config", "tiny", "--print-config"],
                             check=True, capture_output=True, text=True, cwd=work, env=_clean_env()).stdout
    assert re.search(r"^model:\n  vocab_size: ", printed, re.M)
    bad = subprocess.run([str(py), "-m", "leanformer", "train", "--config", "no_such_config", "--print-config"],
                         capture_output=True, text=True, cwd=work, env=_clean_env())
    assert bad.returncode == 2 and "config file no_such_config does not exist" in bad.stderr


def _minimum(requirement: str) -> tuple[int, ...]:
    spec = re.search(rf'"{requirement}>=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert spec, f"pyproject.toml states no minimum for {requirement}"
    return tuple(int(x) for x in spec.group(1).split("."))


def test_transformers_has_the_names_leanformer_hf_uses():
    transformers = pytest.importorskip("transformers")
    installed = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    assert installed >= _minimum("transformers")[:2]
    from transformers import (  # noqa: F401  (hf/modeling.py)
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PreTrainedConfig,
        PreTrainedModel,
    )
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast  # noqa: F401
    from transformers.models.gpt_neox import GPTNeoXConfig, GPTNeoXForCausalLM

    Cache(layers=[])  # how LeanformerCache builds its base
    # hf/exporter.py writes a GPT-NeoX head as `lm_head.weight` (transformers < 5.14 called it `embed_out`)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=16))
    assert "lm_head.weight" in neox.state_dict()
