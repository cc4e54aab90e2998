"""Model classes of our own for families transformers does not implement, registered with its Auto classes.

Each class's module registers it when imported (``causal_lm.register_auto_classes``), and the family's record in
``trainer.families`` names the class (``Family.own_model``): ``AutoConfig``/``AutoModelForCausalLM.from_pretrained``
then load a directory whose config.json says ``model_type: baichuan_alibi`` (Baichuan-13B, Baichuan2-13B) or
``chatglm_v1`` (ChatGLM-6B), with ``trust_remote_code`` off. Importing this package (or ``trainer.families``)
registers ours; a plain script does ``import trainer.models`` first. docs/models.md describes them.
"""

from __future__ import annotations

from trainer.models.baichuan_alibi import BaichuanAlibiConfig, BaichuanAlibiForCausalLM, BaichuanAlibiModel
from trainer.models.glm_v1 import ChatGLMv1Config, ChatGLMv1ForCausalLM, ChatGLMv1Model

__all__ = [
    "BaichuanAlibiConfig",
    "BaichuanAlibiForCausalLM",
    "BaichuanAlibiModel",
    "ChatGLMv1Config",
    "ChatGLMv1ForCausalLM",
    "ChatGLMv1Model",
]
