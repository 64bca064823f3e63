"""Hugging Face interop: import GPT-2 / GPT-NeoX / Llama models, export ours as an Auto-registered model.

``from_hf(model_or_folder)`` → :class:`~leanformer.model.TransformerLM`; ``to_hf(model, out_dir)`` →
a folder that ``AutoModelForCausalLM.from_pretrained`` loads after ``import leanformer``.
"""

from leanformer.hf.exporter import to_hf
from leanformer.hf.importer import SUPPORTED, UnsupportedModelError, from_hf
from leanformer.hf.modeling import LeanformerCache, LeanformerConfig, LeanformerForCausalLM

__all__ = ["SUPPORTED", "LeanformerCache", "LeanformerConfig", "LeanformerForCausalLM", "UnsupportedModelError",
           "from_hf", "to_hf"]
