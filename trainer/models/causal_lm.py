"""What our own causal-LM classes share: the head's forward (logits, the ``labels`` loss, an optional z-loss) and
their registration with transformers' Auto classes.

Each class keeps its own ``forward`` signature (transformers reads it for generation and for the deprecated
``past_key_values`` name) and hands the work to ``causal_lm_forward``. The body is found through
``base_model_prefix`` (``model`` for Baichuan, ``transformer`` for ChatGLM-6B) and the head through
``get_output_embeddings``, so a new class needs neither to be named here.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """mean(max_logit^2) over the positions that predict a next token (Baichuan2's auxiliary loss)."""
    return logits[:, :-1].float().amax(-1).pow(2).mean()


def causal_lm_forward(
    model: PreTrainedModel,
    *,
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    cache: Cache | None,
    inputs_embeds: torch.Tensor | None,
    labels: torch.LongTensor | None,
    use_cache: bool | None,
    logits_to_keep: int | torch.Tensor,
    z_loss_weight: float = 0.0,
) -> CausalLMOutputWithPast:
    """The body's last hidden states through the head; with ``labels``, transformers' causal-LM loss plus
    ``z_loss_weight`` x ``z_loss`` (nothing when the weight is 0). ``logits_to_keep`` as in transformers: an int
    keeps the last that many positions (0: all), a tensor indexes them."""
    outputs = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
    )
    hidden_states = outputs.last_hidden_state
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
        hidden_states = hidden_states[:, -logits_to_keep:]
    elif isinstance(logits_to_keep, torch.Tensor):
        hidden_states = hidden_states[:, logits_to_keep]
    logits = model.get_output_embeddings()(hidden_states)
    loss = None
    if labels is not None:
        loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)
        if z_loss_weight > 0:
            loss = loss + z_loss_weight * z_loss(logits)
    return CausalLMOutputWithPast(loss=loss, logits=logits, cache=outputs.cache)


def register_auto_classes(config: type[PreTrainedConfig], base: type[Any], causal_lm: type[Any]) -> None:
    """Add one class of ours to transformers' Auto mappings (idempotent: a second import is a no-op), so that
    ``from_pretrained`` loads a directory whose config.json names its ``model_type`` with remote code off."""
    AutoConfig.register(config.model_type, config, exist_ok=True)
    AutoModel.register(config, base, exist_ok=True)
    AutoModelForCausalLM.register(config, causal_lm, exist_ok=True)
