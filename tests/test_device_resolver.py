"""The one device resolver (training, benchmarks, fine-tuning): names, CUDA indices, one-line errors."""

import pytest
import torch

from leanformer.config import ConfigError
from leanformer.device import resolve_device


def test_names_resolve_and_bad_ones_are_named():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("gpu", "cuda:x", "cuda:"):
        with pytest.raises(ConfigError, match=f"--device '{bad}' is not valid; choose auto, cpu, cuda or cuda:N"):
            resolve_device(bad, "--device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_a_gpu_is_an_error_naming_the_option():
    for name in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"--device={name} but no CUDA device is available"):
            resolve_device(name, "--device")
