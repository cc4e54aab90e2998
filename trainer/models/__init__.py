"""Model classes of our own for families transformers does not implement, registered with its Auto classes.

Importing this package registers them: ``AutoConfig``/``AutoModelForCausalLM.from_pretrained`` then load a
directory whose config.json says ``model_type: baichuan_alibi`` (Baichuan-13B, Baichuan2-13B) or
``chatglm_v1`` (ChatGLM-6B), with ``trust_remote_code`` off. trainer.model, trainer.inference and
trainer.convert import it; a plain script does ``import trainer.models`` first. docs/models.md describes them.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from trainer.models.baichuan_alibi import BaichuanAlibiConfig, BaichuanAlibiForCausalLM, BaichuanAlibiModel
from trainer.models.glm_v1 import ChatGLMv1Config, ChatGLMv1ForCausalLM, ChatGLMv1Model

OWN_MODEL_TYPES = (BaichuanAlibiConfig.model_type, ChatGLMv1Config.model_type)


def register() -> None:
    """Add our classes to transformers' Auto mappings (idempotent: a second import is a no-op)."""
    for config, base, causal_lm in (
        (BaichuanAlibiConfig, BaichuanAlibiModel, BaichuanAlibiForCausalLM),
        (ChatGLMv1Config, ChatGLMv1Model, ChatGLMv1ForCausalLM),
    ):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModel.register(config, base, exist_ok=True)
        AutoModelForCausalLM.register(config, causal_lm, exist_ok=True)


register()
