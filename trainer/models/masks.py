"""Attention-mask pieces shared by our own model classes: packed segments and the additive float mask.

Both classes hand transformers' attention functions (eager or sdpa) one float mask [batch, heads or 1, q, k]:
0 (or the position bias) where a query may attend, ``finfo.min`` where it may not. A query row with no allowed
key (a padding query) then gets a uniform softmax instead of NaN, as transformers' own masks do.
"""

from __future__ import annotations

import torch


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, seq] ids of the packed samples: a new segment wherever position_ids do not increase by 1.

    The rule of transformers' ``find_packed_sequence_indices``, so a packed row (position_ids restarting at 0
    for every sample) splits into its samples, and a plain row 0..n-1 is one segment.
    """
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(-1) - 1


def additive_mask(allowed: torch.Tensor, bias: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """``bias`` where ``allowed``, the dtype's most negative value elsewhere, built in ``dtype`` (the mask can be
    heads x seq^2 large, so no float32 copy of its full [batch, heads, q, k] shape is made)."""
    bias_tensor = torch.as_tensor(bias, device=allowed.device).to(dtype)
    minimum = torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return torch.where(allowed, bias_tensor, minimum)
