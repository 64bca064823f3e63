import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # the tests' shared helpers (dist_helpers)

# Without CUDA, Triton kernels (leanformer.ops.fused_decay_attention) run in Triton's CPU interpreter. Set
# before any test module imports leanformer: that module picks its op route when it is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _kernel_launches_name_every_constexpr():
    """Each ops module's Triton launches go through :func:`kernel_launch_check.checked_wrap`."""
    import importlib
    import pkgutil

    import leanformer.ops
    from kernel_launch_check import checked_wrap

    patch = pytest.MonkeyPatch()
    for info in pkgutil.iter_modules(leanformer.ops.__path__):
        module = importlib.import_module(f"leanformer.ops.{info.name}")
        if callable(getattr(module, "_wrap", None)):
            patch.setattr(module, "_wrap", checked_wrap(module._wrap))
    yield
    patch.undo()


@pytest.fixture(scope="session", autouse=True)
def _one_config_per_autotuned_kernel():
    """On CUDA each autotuned Triton kernel (fla's) runs the first of its configs that survive its own pruning,
    instead of compiling and timing every one: the tests check values, not speed. fla's backward kernels offer up
    to 192 configs each, and their first use in GPU tests ran past 100 s (H100, 2026-12-07 15:16,
    docs/gpu/misc_2026-12-07/callT). ``LEANFORMER_FULL_AUTOTUNE=1`` keeps Triton's own search."""
    if not torch.cuda.is_available() or os.environ.get("LEANFORMER_FULL_AUTOTUNE") == "1":
        yield
        return
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs
    patch = pytest.MonkeyPatch()
    patch.setattr(Autotuner, "prune_configs", lambda self, kwargs: prune(self, kwargs)[:1])
    yield
    patch.undo()


@pytest.fixture(scope="session")
def _session_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("leanformer_cache")


@pytest.fixture(autouse=True)
def _in_a_temporary_folder(tmp_path, monkeypatch, _session_cache):
    """Every test runs in its own temporary folder with a temporary token cache: nothing reads or writes
    the working directory (e.g. the ``runs/compare`` that the README's first command leaves) or ~/.cache."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LEANFORMER_CACHE", str(_session_cache))


def _devices() -> list[str]:
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=_devices())
def device(request):
    """Each test that takes ``device`` runs on the CPU and, where one is present, on CUDA."""
    import torch

    return torch.device(request.param)
