"""Loss at initialisation of the GPU comparison's models, tied and untied embeddings (issue #16's diverged
``sas_p_nonorm``): SAS-P's attention is the identity at init (W_Q = 0, α = β = γ = 1) and it has no value or
output projection, so with tied embeddings each position's logits peak at its own input token.

    python benchmarks/sas_p_init_loss.py        # CPU, ~1 min: GPT-2 small shapes of `compare --preset gpu`
"""

from __future__ import annotations

import math

import torch

from leanformer.arms import arm_config
from leanformer.compare.presets import get_preset
from leanformer.compare.runs import base_config
from leanformer.model import TransformerLM


def main() -> None:
    base = base_config(get_preset("gpu"))
    print("| arm | embeddings | init loss | ln V | argmax = input token | logit std |\n|---|---|---:|---:|---:|---:|")
    for arm in ("preln", "sas_p", "sas_p_nonorm"):
        for tie in (True, False):
            cfg = arm_config(base, arm)
            cfg.model.tie_embeddings = tie
            torch.manual_seed(0)
            model = TransformerLM(cfg.model)
            g = torch.Generator().manual_seed(1)
            x, y = (torch.randint(0, cfg.model.vocab_size, (2, 128), generator=g) for _ in range(2))
            with torch.no_grad():
                logits, loss = model(x, y)
            same = logits.argmax(-1).eq(x).float().mean().item()
            print(f"| {arm} | {'tied' if tie else 'untied'} | {loss.item():.2f} | {math.log(cfg.model.vocab_size):.2f} "
                  f"| {same:.2f} | {logits.std().item():.2f} |")


if __name__ == "__main__":
    main()
