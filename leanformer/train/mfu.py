"""Peak dense bf16 FLOP/s of known accelerators, for model FLOPs utilisation (MFU; PaLM, Chowdhery et al.
2022, appendix B). Figures are the vendors' dense (no sparsity) bf16 tensor-core peaks."""

from __future__ import annotations

import torch

PEAK_BF16_FLOPS = {  # substring of torch.cuda.get_device_name() -> FLOP/s
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


def peak_flops_for(device: torch.device) -> float | None:
    """Peak FLOP/s of ``device`` if known; ``None`` on CPU or an unknown GPU (give ``train.peak_flops``)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in name:
            return flops
    return None
