"""Self-contained modeling file for heterogeneous Flextron sub-networks (per-layer widths).

Copied next to an exported checkpoint and loaded by ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)``, so it imports only ``torch`` and ``transformers`` (never ``flextron``).

:class:`FlextronConfig` is the base family's config, flattened (``base_model_type`` names the
family: llama, qwen2, qwen3, mistral ...), plus per-layer ``intermediate_sizes`` and
``num_attention_heads_per_layer`` (query heads, a multiple of ``num_key_value_heads``; ``head_dim``
is explicit). The global ``intermediate_size`` / ``num_attention_heads`` are the per-layer maxima.

:class:`FlextronForCausalLM` builds the family's own decoder (``LlamaModel``, ``Qwen2Model`` ...)
from that config, then swaps each layer's ``q_proj``/``o_proj``/``gate_proj``/``up_proj``/
``down_proj`` for correctly sized ``nn.Linear`` and sets the attention module's
``num_key_value_groups`` (query heads per KV group), which transformers' attention code uses for
``repeat_kv`` / SDPA GQA; it infers the head count from the projection shapes. State-dict keys are
the family's own (``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING

_OWN_KEYS = ("base_model_type", "intermediate_sizes", "num_attention_heads_per_layer")
_DROP_FROM_BASE = ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path")


class FlextronConfig(PretrainedConfig):
    """The base family's config (flattened) plus per-layer MLP widths and query-head counts."""

    model_type = "flextron_elastic"

    def __init__(self, base_model_type=None, intermediate_sizes=None, num_attention_heads_per_layer=None, **kwargs):
        self.base_model_type = base_model_type
        self.intermediate_sizes = None if intermediate_sizes is None else [int(x) for x in intermediate_sizes]
        self.num_attention_heads_per_layer = (
            None if num_attention_heads_per_layer is None else [int(x) for x in num_attention_heads_per_layer]
        )
        super().__init__(**kwargs)

    @classmethod
    def from_base(cls, base_config, intermediate_sizes, num_attention_heads_per_layer) -> "FlextronConfig":
        """Flatten ``base_config`` (a family config) and attach the per-layer sizes."""
        d = base_config.to_dict()
        for k in _DROP_FROM_BASE + _OWN_KEYS:
            d.pop(k, None)
        n_layers = int(d["num_hidden_layers"])
        if len(intermediate_sizes) != n_layers or len(num_attention_heads_per_layer) != n_layers:
            raise ValueError(f"per-layer sizes need {n_layers} entries")
        kv = int(d.get("num_key_value_heads") or d["num_attention_heads"])
        if any(int(h) % kv for h in num_attention_heads_per_layer):
            raise ValueError(f"query heads per layer must be multiples of num_key_value_heads={kv}")
        d["head_dim"] = int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"])
        d["intermediate_size"] = max(int(x) for x in intermediate_sizes)
        d["num_attention_heads"] = max(int(x) for x in num_attention_heads_per_layer)
        return cls(
            base_model_type=base_config.model_type,
            intermediate_sizes=intermediate_sizes,
            num_attention_heads_per_layer=num_attention_heads_per_layer,
            **d,
        )


class FlextronPreTrainedModel(PreTrainedModel):
    config_class = FlextronConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class FlextronForCausalLM(FlextronPreTrainedModel, GenerationMixin):
    """A causal LM of the base family whose layers have their own MLP width and query-head count."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FlextronConfig):
        super().__init__(config)
        if config.base_model_type not in CONFIG_MAPPING:
            raise ValueError(f"unknown base_model_type {config.base_model_type!r} in the Flextron config")
        model_cls = MODEL_MAPPING[CONFIG_MAPPING[config.base_model_type]]
        self.model = model_cls(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._resize_layers()
        self.post_init()

    def _resize_layers(self) -> None:
        """Rebuild every layer whose sizes differ from the maxima with the family's own decoder-layer
        class and a per-layer copy of the config (``num_attention_heads``, ``intermediate_size``),
        so fused projections (Phi-3's ``qkv_proj``/``gate_up_proj``), head counts and the attention
        code's own reads of the config all agree with the layer's sizes."""
        c = self.config
        for i, layer in enumerate(self.model.layers):
            nq, m = c.num_attention_heads_per_layer[i], c.intermediate_sizes[i]
            if nq == c.num_attention_heads and m == c.intermediate_size:
                continue
            layer_config = copy.copy(c)
            layer_config.num_attention_heads, layer_config.intermediate_size = nq, m
            self.model.layers[i] = type(layer)(layer_config, i)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        return_dict = kwargs.pop("return_dict", None)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state  # (B, T, d)
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, slice_indices, :])  # (B, T', V)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma 2 style final softcapping
            logits = torch.tanh(logits / cap) * cap
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        out = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        return out.to_tuple() if return_dict is False else out
