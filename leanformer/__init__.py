"""leanformer: efficient Transformer architectures for GPT-style language models."""

from leanformer.config import (
    ConfigError,
    DataConfig,
    DiJiangConfig,
    NobleConfig,
    RunConfig,
    ShapedConfig,
    TrainConfig,
    TransformerConfig,
)
from leanformer.model import DecodeCache, TransformerLM

__version__ = "0.1.0"


def __getattr__(name: str):
    """Method entry points, imported on first use."""
    if name in ("apply_noble", "remove_noble"):
        from leanformer import inject

        return getattr(inject, name)
    if name == "convert_to_dijiang":
        from leanformer.convert import convert_to_dijiang

        return convert_to_dijiang
    if name in ("from_hf", "to_hf"):  # transformers is imported here, not by ``import leanformer``
        from leanformer import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'leanformer' has no attribute {name!r}")


__all__ = [
    "ConfigError", "DataConfig", "DiJiangConfig", "NobleConfig", "RunConfig", "ShapedConfig",
    "TrainConfig", "TransformerConfig", "TransformerLM", "DecodeCache",
    "apply_noble", "remove_noble", "convert_to_dijiang", "from_hf", "to_hf",
]

