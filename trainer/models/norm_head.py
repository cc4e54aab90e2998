"""Baichuan2's NormHead, the one copy used by the converted 7B (Llama) models and our ALiBi class.

Baichuan2 divides every ``lm_head`` row by its L2 norm in each forward. Inference needs none of it once the rows
are stored normalized (the converter does that, export does it again), but full-parameter training keeps the
normalization in the forward so gradients pass through it as in the original (``trainer.model.use_norm_head``).
"""

from __future__ import annotations

import torch
from torch import nn


class NormHead(nn.Linear):
    """A Linear whose weight rows are L2-normalized in every forward (inside the module, so ZeRO-3 has gathered
    the weight when it is read)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(hidden_states, nn.functional.normalize(self.weight, dim=-1), self.bias)


def normalized_lm_head(weight: torch.Tensor) -> torch.Tensor:
    """The rows a plain Linear needs to compute what NormHead computes (used by export and the converters)."""
    return nn.functional.normalize(weight.float(), dim=-1).to(weight.dtype)
