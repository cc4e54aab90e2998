"""ChatGLM-6B (v1) as a class of our own: a GLM prefix language model.

transformers has no class for it. What follows the original (facts from tests/fixtures/real/seed_models/README.md,
checked against its reference outputs):

- Parameter names and layout are the original's (``transformer.layers.{i}.attention.query_key_value`` ...):
  the fused QKV is per head interleaved ([q | k | v] of head 0, then head 1 ...); LayerNorm with bias; MLP
  gelu (tanh approximation) between two biased linears; untied ``lm_head`` without bias.
- Residual on the normalised input: x^ = LN1(x); h = alpha x^ + Attn(x^); h^ = LN2(h); out = alpha h^ + MLP(h^),
  alpha = sqrt(2 * 28) whatever the layer count (the original builds its blocks with the default 28).
- 2-D positions: row 0 = position (0..context-1, then the mask position for every answer token), row 1 = block
  position (0 over the context, then 1, 2, ... from ``<sop>`` on). context = index of the first ``<sop>``;
  mask position = index of ``[gMASK]`` if present, else of ``[MASK]``.
- Rotary: each head's q and k split into halves; the first half rotates with row 0, the second with row 1,
  rotate-half form inside each half, frequencies 10000^(-2j/(head_dim/2)) rounded to float16 as the original.
- Prefix-LM mask: causal, except that every query sees the whole context (bidirectional prompt). The
  original's -10000 mask value and its per-layer score scaling are the same softmax in float32.

What is ours: positions and mask are built from ``input_ids`` in the forward, per packed sample. The trainer
passes 1-D ``position_ids`` that restart at 0 for each sample of a packed row; every sample then gets its own
context, mask position and block positions and sees no other sample (exact isolation, tested). A 2-D
``attention_mask`` marks padding (left or right): positions count from the first real token, padding keys
are masked. ``[batch, 2, seq]`` position ids (the original's form) are accepted as given. ``generate`` works
with transformers' ``DynamicCache``: ``prepare_inputs_for_generation`` gives each new token
[mask position, step] as the original does.
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
from transformers.models.llama.modeling_llama import eager_attention_forward
from transformers.utils.deprecation import deprecate_kwarg

from trainer.models.causal_lm import causal_lm_forward, register_auto_classes
from trainer.models.masks import additive_mask, segment_ids

MODEL_TYPE = "chatglm_v1"


@strict
class ChatGLMv1Config(PreTrainedConfig):
    """Shape and special ids of a ChatGLM-6B model (defaults: the real 6B, 130528-token revision)."""

    model_type = MODEL_TYPE

    vocab_size: int = 130528
    hidden_size: int = 4096
    intermediate_size: int = 16384
    """The original's ``inner_hidden_size``."""
    num_hidden_layers: int = 28
    num_attention_heads: int = 32
    layer_norm_eps: float = 1e-5
    max_position_embeddings: int = 2048
    """The original's ``max_sequence_length``."""
    residual_alpha_layers: int = 28
    """alpha = sqrt(2 * residual_alpha_layers) scales the residual branch; the original always uses 28."""
    initializer_range: float = 0.02
    mask_token_id: int = 130000
    """``[MASK]``."""
    gmask_token_id: int = 130001
    """``[gMASK]``."""
    use_cache: bool = True
    pad_token_id: int | None = 3
    bos_token_id: int | None = 130004
    """``<sop>``: starts the answer; everything before the first one is the bidirectional context."""
    eos_token_id: int | list[int] | None = 130005
    """``<eop>``."""
    tie_word_embeddings: bool = False

    def validate_architecture(self) -> None:
        if self.bos_token_id is None:
            raise ValueError("bos_token_id must be the id of <sop> (it ends the bidirectional context)")
        if self.hidden_size % self.num_attention_heads != 0 or (self.hidden_size // self.num_attention_heads) % 4:
            raise ValueError(
                f"hidden_size {self.hidden_size} / num_attention_heads {self.num_attention_heads} must be a head "
                "size divisible by 4 (two rotary halves of rotate-half pairs)"
            )


def glm_positions(
    input_ids: torch.Tensor,
    config: ChatGLMv1Config,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(2-D positions [batch, 2, seq], sample ids [batch, seq], per token the index of its sample's first
    ``<sop>`` [batch, seq]) of a whole row, sample by sample.

    Samples are cut where 1-D ``position_ids`` do not increase by 1 (packed rows); without them, a padded row
    counts its positions from the first real token. A sample with no ``<sop>`` is all context; a sample with a
    ``<sop>`` but no mask token takes ``<sop>``'s index as mask position (the original raises there).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    index = torch.arange(length, device=device).expand(batch, length)
    if position_ids is None:  # padding: positions count from the first real token
        position_ids = index if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    segment = segment_ids(position_ids)
    is_start = torch.ones_like(input_ids, dtype=torch.bool)
    is_start[:, 1:] = segment[:, 1:] != segment[:, :-1]
    start = torch.where(is_start, index, 0).cummax(-1).values

    def first_in_sample(token_id: int) -> torch.Tensor:
        """Per token: the index of the first ``token_id`` in its sample, or ``length`` if there is none."""
        candidates = torch.where(input_ids == token_id, index, length)
        per_segment = torch.full_like(input_ids, length).scatter_reduce(1, segment, candidates, reduce="amin")
        return per_segment.gather(1, segment)

    sop = first_in_sample(int(config.bos_token_id))  # type: ignore[arg-type]
    gmask, mask = first_in_sample(config.gmask_token_id), first_in_sample(config.mask_token_id)
    mask_position = torch.where(gmask < length, gmask, torch.where(mask < length, mask, sop))
    in_context = index < sop
    positions = torch.stack(
        [torch.where(in_context, index - start, mask_position - start), torch.where(in_context, 0, index - sop + 1)],
        dim=1,
    )
    return positions, segment, sop


def glm_layout(
    input_ids: torch.Tensor,
    config: ChatGLMv1Config,
    *,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2-D positions [batch, 2, seq], allowed [batch, 1, seq, seq]): ``glm_positions`` plus the prefix-LM mask,
    causal except that every query sees its whole sample's context, and no other sample."""
    positions, segment, sop = glm_positions(input_ids, config, position_ids=position_ids, attention_mask=attention_mask)
    index = torch.arange(input_ids.shape[1], device=input_ids.device)
    same_sample = segment[:, :, None] == segment[:, None, :]
    visible = (index[None, None, :] <= index[None, :, None]) | (index[None, None, :] < sop[:, :, None])
    allowed = same_sample & visible
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, :].bool()
    return positions, allowed[:, None]


def rotary_inv_freq(head_dim: int, device: torch.device) -> torch.Tensor:
    """Frequencies of one rotary half (size head_dim/2), rounded to float16 as the original stores them."""
    half = head_dim // 2
    inv_freq = 1.0 / (10000 ** (torch.arange(0, half, 2, device=device, dtype=torch.float32) / half))
    return inv_freq.half().float()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_2d_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, seq, heads, head_dim]; cos/sin [batch, 2, seq, head_dim/2] for the two halves."""
    halves = x.chunk(2, dim=-1)
    rotated = [
        h * cos[:, i, :, None, :].to(h.dtype) + rotate_half(h) * sin[:, i, :, None, :].to(h.dtype)
        for i, h in enumerate(halves)
    ]
    return torch.cat(rotated, dim=-1)


class ChatGLMv1Attention(nn.Module):
    def __init__(self, config: ChatGLMv1Config, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1  # read by transformers' attention functions
        self.scaling = self.head_dim**-0.5
        self.is_causal = True  # never used: we always pass a mask
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=True)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None = None,
    ) -> torch.Tensor:
        batch, length = hidden_states.shape[:2]
        fused = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = fused.split(self.head_dim, dim=-1)  # per head [q | k | v]
        cos, sin = rotary
        query = apply_2d_rotary(query, cos, sin).transpose(1, 2)
        key = apply_2d_rotary(key, cos, sin).transpose(1, 2)
        value = value.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attention: Callable[..., tuple[torch.Tensor, Any]] = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        output, _ = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling)
        return self.dense(output.reshape(batch, length, -1).contiguous())


class ChatGLMv1MLP(nn.Module):
    def __init__(self, config: ChatGLMv1Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class ChatGLMv1Block(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMv1Config, layer_idx: int) -> None:
        super().__init__()
        self.alpha = math.sqrt(2 * config.residual_alpha_layers)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ChatGLMv1Attention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ChatGLMv1MLP(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None = None,
    ) -> torch.Tensor:
        normed = self.input_layernorm(hidden_states)
        hidden_states = normed * self.alpha + self.attention(normed, attention_mask, rotary, cache)
        normed = self.post_attention_layernorm(hidden_states)
        return normed * self.alpha + self.mlp(normed)


class ChatGLMv1PreTrainedModel(PreTrainedModel):
    config: ChatGLMv1Config
    config_class = ChatGLMv1Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ChatGLMv1Block"]  # noqa: RUF012  (transformers declares it so)
    _supports_sdpa = True
    _supports_flash_attn = False  # the prefix-LM mask is not causal; flash-attention kernels cannot take it
    _supports_flex_attn = False
    _supports_attention_backend = False


class ChatGLMv1Model(ChatGLMv1PreTrainedModel):
    def __init__(self, config: ChatGLMv1Config) -> None:
        super().__init__(config)
        self.word_embeddings: nn.Module = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([ChatGLMv1Block(config, i) for i in range(config.num_hidden_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.word_embeddings = value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
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
        if input_ids is None:
            raise ValueError(f"{MODEL_TYPE}: input_ids are required (positions and mask are built from them)")
        hidden_states = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(
                f"{MODEL_TYPE}: attention_mask must be 2-D [batch, keys], got {tuple(attention_mask.shape)}"
            )
        past_length = cache.get_seq_length() if cache is not None else 0
        positions, allowed = self._positions_and_mask(input_ids, position_ids, attention_mask, past_length)
        mask = additive_mask(allowed, 0.0, hidden_states.dtype)
        angles = positions[..., None].float() * rotary_inv_freq(
            self.config.hidden_size // self.config.num_attention_heads, hidden_states.device
        )
        angles = torch.cat((angles, angles), dim=-1)  # [batch, 2, seq, head_dim/2]
        rotary = (angles.cos(), angles.sin())
        for layer in self.layers:
            hidden_states = layer(hidden_states, mask, rotary, cache if use_cache else None)
        return BaseModelOutputWithPast(
            last_hidden_state=self.final_layernorm(hidden_states), cache=cache if use_cache else None
        )

    def _positions_and_mask(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        past_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """2-D positions of the new tokens and allowed [batch, 1, q, past + q]."""
        given_2d = position_ids is not None and position_ids.dim() == 3
        if past_length == 0:
            positions, allowed = glm_layout(
                input_ids,
                self.config,
                position_ids=None if given_2d else position_ids,
                attention_mask=attention_mask,
            )
            return (position_ids if given_2d else positions), allowed  # type: ignore[return-value]
        if not given_2d:
            raise ValueError(
                f"{MODEL_TYPE}: with a KV cache pass position_ids [batch, 2, new tokens] (generate does this "
                "through prepare_inputs_for_generation)"
            )
        # New tokens come after the whole context: plain causal attention over cache + new tokens.
        length = input_ids.shape[1]
        query_index = torch.arange(past_length, past_length + length, device=input_ids.device)
        key_index = torch.arange(past_length + length, device=input_ids.device)
        allowed = (key_index[None, :] <= query_index[:, None])[None, None].expand(input_ids.shape[0], 1, -1, -1)
        if attention_mask is not None:
            allowed = allowed & attention_mask[:, None, None, -(past_length + length) :].bool()
        return position_ids, allowed  # type: ignore[return-value]


class ChatGLMv1ForCausalLM(ChatGLMv1PreTrainedModel, GenerationMixin):
    def __init__(self, config: ChatGLMv1Config) -> None:
        super().__init__(config)
        self.transformer = ChatGLMv1Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
        )

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """transformers' inputs, with 2-D positions of the new tokens computed from the whole sequence so far
        (generate's own 1-D position_ids are dropped)."""
        kwargs.pop("position_ids", None)
        inputs: dict[str, Any] = super().prepare_inputs_for_generation(
            input_ids, *args, attention_mask=attention_mask, **kwargs
        )
        is_context = torch.cumsum(input_ids.eq(int(self.config.bos_token_id)), dim=-1) == 0  # type: ignore[arg-type]
        if bool(is_context[:, -1].any()):
            raise ValueError(
                f"{MODEL_TYPE}: every prompt must contain <sop> (id {self.config.bos_token_id}); "
                "render prompts with the chatglm template, which ends them with [gMASK] <sop>"
            )
        positions, _, _ = glm_positions(input_ids, self.config, attention_mask=attention_mask)
        inputs["position_ids"] = positions[..., -inputs["input_ids"].shape[1] :]
        return inputs


register_auto_classes(ChatGLMv1Config, ChatGLMv1Model, ChatGLMv1ForCausalLM)
