"""Baichuan-13B and Baichuan2-13B as a class of our own: the Llama block with ALiBi instead of rotary.

transformers has no class for them (only bloom, falcon and mpt use ALiBi, with LayerNorm and GELU). What follows
the original (facts from tests/fixtures/real/seed_models/README.md, checked against its reference outputs):

- RMSNorm (eps 1e-6), SiLU-gated MLP, no biases, untied head; q/k/v are the original fused ``W_pack`` split
  into ``q_proj``/``k_proj``/``v_proj`` by the converter (``trainer/convert/baichuan_13b.py``).
- ALiBi: score(h, i, j) = q.k / sqrt(head_dim) - slope_h * (i - j) for j <= i. The original adds slope_h * j,
  the same under softmax; we use the distance so that the bias stays small near the diagonal in bf16.
  Slopes: ``alibi_slopes`` (heads that are not a power of two included, like the real 40).
- Baichuan2 (``norm_head``): the head uses each row of ``lm_head.weight`` divided by its L2 norm, inside the
  forward, so training gets the original's gradient through the normalisation. ``z_loss_weight`` adds
  z_loss_weight * mean(max_logit^2) to the loss computed from ``labels`` (0 in the released configs; the
  trainer computes its own loss from the logits and does not add it).

What is ours: the mask. Padding comes from the 2-D ``attention_mask``; packed rows from ``position_ids``
(a new sample wherever they do not increase by 1, as transformers does for Llama), so a packed row gives each
sample exactly the logits it has alone (ALiBi depends only on i - j). The KV cache is transformers'
``DynamicCache``; attention runs through transformers' eager or sdpa functions with one float mask
[batch, heads, q, k] that carries bias and mask (flash-attention cannot take it and is refused).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRMSNorm, eager_attention_forward
from transformers.utils.deprecation import deprecate_kwarg

from trainer.models.causal_lm import causal_lm_forward, register_auto_classes
from trainer.models.masks import additive_mask, segment_ids
from trainer.models.norm_head import NormHead

MODEL_TYPE = "baichuan_alibi"


@strict
class BaichuanAlibiConfig(PreTrainedConfig):
    """Shape of a Baichuan-13B / Baichuan2-13B model (defaults: the real 13B)."""

    model_type = MODEL_TYPE

    vocab_size: int = 64000
    hidden_size: int = 5120
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 40
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    """The original's ``model_max_length``: the length it was trained for (ALiBi itself has no table limit)."""
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    norm_head: bool = False
    """Baichuan2: normalise every lm_head row to unit L2 norm in the forward."""
    z_loss_weight: float = 0.0
    """Baichuan2: weight of mean(max_logit^2) added to the ``labels`` loss."""
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False

    def validate_architecture(self) -> None:
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi slopes, float32 [num_heads].

    For n a power of two: 2^(-8(k+1)/n), k = 0..n-1. Otherwise, with c the largest power of two below n: the
    c slopes for c, then the slopes for 2c at even indices (0, 2, 4, ...), the first n - c of them. 5 heads:
    0.25, 0.0625, 0.015625, 0.00390625, 0.5; 40 heads: 2^(-0.25(k+1)) for k < 32, then 2^(-0.125), 2^(-0.375), ...
    """

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (k + 1) / n) for k in range(n)]

    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(closest)
    if closest != num_heads:
        slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_attention_mask(
    slopes: torch.Tensor,
    *,
    batch: int,
    query_length: int,
    past_length: int,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The float mask [batch, heads, q, k] carrying ALiBi bias and masking (see the module docstring).

    Keys are the cached ones then the new ones (absolute index j < past + q); query i sits at past + i.
    A 2-D ``attention_mask`` (1 = token, 0 = padding) removes padding keys. Without a cache, ``position_ids``
    cut the row into packed samples that do not see each other.
    """
    device = slopes.device
    key_length = past_length + query_length
    query_index = torch.arange(past_length, key_length, device=device)
    key_index = torch.arange(key_length, device=device)
    distance = query_index[:, None] - key_index[None, :]  # [q, k]
    allowed = (distance >= 0)[None, None].expand(batch, 1, query_length, key_length)
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(
                f"{MODEL_TYPE}: attention_mask must be 2-D [batch, keys], got {tuple(attention_mask.shape)}"
            )
        allowed = allowed & attention_mask[:, None, None, -key_length:].bool()
    if position_ids is not None and past_length == 0 and query_length > 1:
        segments = segment_ids(position_ids.view(-1, query_length))
        allowed = allowed & (segments[:, None, :, None] == segments[:, None, None, :])
    bias = -slopes[None, :, None, None] * distance[None, None].float()  # [1, heads, q, k], float32, cast once
    return additive_mask(allowed, bias, dtype)


class BaichuanAlibiMLP(nn.Module):
    def __init__(self, config: BaichuanAlibiConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        if config.hidden_act != "silu":
            raise ValueError(f"{MODEL_TYPE}: hidden_act {config.hidden_act!r}; Baichuan uses silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class BaichuanAlibiAttention(nn.Module):
    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1  # read by transformers' attention functions
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # never used: we always pass a mask
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, cache: Cache | None = None, **kwargs: Any
    ) -> torch.Tensor:
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention: Callable[..., tuple[torch.Tensor, Any]] = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs)
        return self.o_proj(output.reshape(*hidden_states.shape[:-1], -1).contiguous())


class BaichuanAlibiDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: BaichuanAlibiConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = BaichuanAlibiAttention(config, layer_idx)
        self.mlp = BaichuanAlibiMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, cache: Cache | None = None, **kwargs: Any
    ) -> torch.Tensor:
        hidden_states = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask, cache)
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanAlibiPreTrainedModel(PreTrainedModel):
    config: BaichuanAlibiConfig
    config_class = BaichuanAlibiConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BaichuanAlibiDecoderLayer"]  # noqa: RUF012  (transformers declares it so)
    _supports_sdpa = True
    _supports_flash_attn = False  # ALiBi lives in a float mask, which flash-attention kernels do not take
    _supports_flex_attn = False
    _supports_attention_backend = False


class BaichuanAlibiModel(BaichuanAlibiPreTrainedModel):
    def __init__(self, config: BaichuanAlibiConfig) -> None:
        super().__init__(config)
        self.embed_tokens: nn.Module = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([BaichuanAlibiDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        batch, query_length = hidden_states.shape[:2]
        mask = alibi_attention_mask(
            alibi_slopes(self.config.num_attention_heads).to(hidden_states.device),
            batch=batch,
            query_length=query_length,
            past_length=cache.get_seq_length() if cache is not None else 0,
            attention_mask=attention_mask,
            position_ids=position_ids,
            dtype=hidden_states.dtype,
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, cache=cache if use_cache else None)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)


class BaichuanAlibiForCausalLM(BaichuanAlibiPreTrainedModel, GenerationMixin):
    def __init__(self, config: BaichuanAlibiConfig) -> None:
        super().__init__(config)
        self.model = BaichuanAlibiModel(config)
        head = NormHead if config.norm_head else nn.Linear
        self.lm_head = head(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        return causal_lm_forward(
            self,
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            z_loss_weight=self.config.z_loss_weight,
        )


register_auto_classes(BaichuanAlibiConfig, BaichuanAlibiModel, BaichuanAlibiForCausalLM)
