"""The Hugging Face model API for :class:`~agentattn.lm.AgentLM`, as fla registers its models.

``AgentLMHFConfig`` is a ``PretrainedConfig`` holding :class:`~agentattn.lm.AgentLMConfig`'s fields;
``AgentLMForCausalLM`` is a ``PreTrainedModel`` with ``GenerationMixin`` around an ``AgentLM`` (``.model``).
Importing this module registers both with ``AutoConfig`` / ``AutoModelForCausalLM`` (model type
``"agentattn_lm"``), so that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads a directory written by
``save_pretrained`` (safetensors). Offline only: nothing here downloads.

``generate()`` decodes through the model's own state: the recurrent state of the agent, linear and retention
mixers (a fixed size) or the softmax KV cache, exactly as :meth:`AgentLM.generate` does, so that greedy decoding
(``do_sample=False``) gives the same tokens as ``AgentLM.generate(..., temperature=0.0)``. Tokens are bytes
(``vocab_size`` 256): encode text with ``list(text.encode())``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

try:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        GenerationMixin,
        PretrainedConfig,
        PreTrainedModel,
    )
    from transformers.utils import ModelOutput
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("agentattn.lm.hf needs transformers: pip install 'agentattn[diffusion]'") from e

from .config import SAVED_BEFORE_DEFAULTS
from .model import AgentLM, AgentLMConfig

__all__ = ["AgentLMCausalLMOutput", "AgentLMForCausalLM", "AgentLMHFConfig"]

MODEL_TYPE = "agentattn_lm"
_LM_FIELDS = tuple(f.name for f in fields(AgentLMConfig))
_LM_OLD_NAMES = ("num_agents",)  # saved config.json files may carry agent_num under its old name


class AgentLMHFConfig(PretrainedConfig):
    """``PretrainedConfig`` with the fields of :class:`~agentattn.lm.AgentLMConfig` (validated by it)."""

    model_type = MODEL_TYPE

    def __init__(self, attn_type: str = "agent", **kwargs: Any) -> None:
        lm_kwargs = {name: kwargs.pop(name) for name in (*_LM_FIELDS, *_LM_OLD_NAMES) if name in kwargs}
        lm = AgentLMConfig(attn_type=attn_type, **lm_kwargs)  # ValueError naming a bad field
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        for name, value in asdict(lm).items():
            setattr(self, name, value)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """A saved ``config.json``: one written before a field's default changed reads as it was trained."""
        return super().from_dict({**SAVED_BEFORE_DEFAULTS, **config_dict}, **kwargs)

    def to_lm_config(self) -> AgentLMConfig:
        """The :class:`~agentattn.lm.AgentLMConfig` this config describes."""
        return AgentLMConfig(**{name: getattr(self, name) for name in _LM_FIELDS})

    @classmethod
    def from_lm_config(cls, config: AgentLMConfig, **kwargs: Any) -> AgentLMHFConfig:
        return cls(**asdict(config), **kwargs)


@dataclass
class AgentLMCausalLMOutput(ModelOutput):
    """``loss`` (with ``labels``), ``logits`` (B, T, vocab) and ``cache``: the per-layer decoding state."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Any = None


class AgentLMForCausalLM(PreTrainedModel, GenerationMixin):
    """``AgentLM`` behind the transformers causal-LM API.

    Shape:
        ``forward(input_ids (B, T))`` → logits (B, T, vocab); with ``use_cache=True`` also the decoding state in
        ``cache``, after which ``forward`` takes the sequence so far and reads only its last token.
    """

    config_class = AgentLMHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _supports_cache_class = False  # the state is the model's own, not a transformers Cache

    def __init__(self, config: AgentLMHFConfig) -> None:
        super().__init__(config)
        self.model = AgentLM(config.to_lm_config())
        self.post_init()

    @classmethod
    def from_lm(cls, model: AgentLM) -> AgentLMForCausalLM:
        """Wrap a trained :class:`AgentLM` (e.g. ``AgentLM.load("runs/lm/agent/model.safetensors")``), sharing its
        weights; ``save_pretrained(DIR)`` then writes a directory ``AutoModelForCausalLM`` loads."""
        wrapped = cls(AgentLMHFConfig.from_lm_config(model.config))
        wrapped.model.load_state_dict(model.state_dict(), strict=True)
        return wrapped.to(next(model.parameters()).device)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:  # generate() must not make a DynamicCache for us
        return False

    def _init_weights(self, module: torch.nn.Module) -> None:
        """AgentLM initialises itself (GPT-2 init, shared across twins); nothing to add."""

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.tok_emb

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.model.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        cache: list[Any] | None = None,
        use_cache: bool | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,  # attention_mask, position_ids, ...: a byte LM without padding takes none of them
    ) -> AgentLMCausalLMOutput | tuple:
        """Training / scoring (no ``cache``): logits of every position, and the shifted cross-entropy with
        ``labels`` (-100 ignored). Decoding (``use_cache``): the first call reads the prompt and returns the
        state; later calls, given the state, feed the last token of ``input_ids``."""
        attention_mask = kwargs.get("attention_mask")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError(
                "attention_mask with padding is not supported: AgentLM reads unpadded byte sequences"
            )
        model, max_len = self.model, self.config.max_seq_len
        if cache is None and not use_cache:
            logits = model(input_ids)
        elif cache is None:
            last, cache = model.prefill(input_ids[:, -max_len:])
            logits = last[:, None]
        elif self.config.attn_type == "softmax" and cache[0].attn.t >= max_len:
            last, cache = model.prefill(
                input_ids[:, -max_len:], max_len
            )  # as AgentLM.generate: crop and re-read
            logits = last[:, None]
        else:
            logits = model.step(input_ids[:, -1], cache)[:, None]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        output = AgentLMCausalLMOutput(loss=loss, logits=logits, cache=cache if use_cache else None)
        return output if return_dict is not False else output.to_tuple()

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, cache: list[Any] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        """The whole sequence so far and the state: ``forward`` reads what it needs."""
        return {"input_ids": input_ids, "cache": cache, "use_cache": True}


AutoConfig.register(MODEL_TYPE, AgentLMHFConfig, exist_ok=True)
AutoModelForCausalLM.register(AgentLMHFConfig, AgentLMForCausalLM, exist_ok=True)
