"""Self-contained modeling file for heterogeneous Flextron sub-networks (per-layer widths).

Copied next to an exported checkpoint and loaded by ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)``, so it imports only ``torch`` and ``transformers`` (never ``flextron``).

:class:`FlextronConfig` is the base family's config, flattened (``base_model_type`` names the
family: llama, qwen2, qwen3, mistral, gemma3_text, phi3 ...), plus per-layer ``intermediate_sizes``,
``num_attention_heads_per_layer`` and, when whole KV groups were dropped,
``num_key_value_heads_per_layer`` (``head_dim`` is explicit). The global sizes are the per-layer
maxima.

:class:`FlextronForCausalLM` builds the family's own decoder (``LlamaModel``, ``Phi3Model`` ...)
from that config, then rebuilds every smaller layer with the family's own decoder-layer class from
a per-layer copy of the config, so fused projections and the attention code's reads of the config
agree with the layer's sizes. State-dict keys are the family's own
(``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``). Attention implementation: the
per-layer configs are copied when the model is built, so choose it at load time
(``attn_implementation=...``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_MAPPING

_OWN_KEYS = ("base_model_type", "intermediate_sizes", "num_attention_heads_per_layer", "num_key_value_heads_per_layer")
_DROP_FROM_BASE = ("model_type", "transformers_version", "architectures", "auto_map", "_name_or_path")


class FlextronConfig(PretrainedConfig):
    """The base family's config (flattened) plus per-layer MLP widths, query-head counts and
    (when whole KV groups were dropped) KV-head counts."""

    model_type = "flextron_elastic"

    def __init__(
        self,
        base_model_type=None,
        intermediate_sizes=None,
        num_attention_heads_per_layer=None,
        num_key_value_heads_per_layer=None,
        **kwargs,
    ):
        def ints(xs):
            return None if xs is None else [int(x) for x in xs]

        self.base_model_type = base_model_type
        self.intermediate_sizes = ints(intermediate_sizes)
        self.num_attention_heads_per_layer = ints(num_attention_heads_per_layer)
        self.num_key_value_heads_per_layer = ints(num_key_value_heads_per_layer)
        super().__init__(**kwargs)

    @classmethod
    def from_base(
        cls, base_config, intermediate_sizes, num_attention_heads_per_layer, num_key_value_heads_per_layer=None
    ) -> "FlextronConfig":
        """Flatten ``base_config`` (a family config) and attach the per-layer sizes."""
        d = base_config.to_dict()
        for k in _DROP_FROM_BASE + _OWN_KEYS:
            d.pop(k, None)
        n_layers = int(d["num_hidden_layers"])
        kv = int(d.get("num_key_value_heads") or d["num_attention_heads"])
        kv_per_layer = list(num_key_value_heads_per_layer or [kv] * n_layers)
        sizes = (intermediate_sizes, num_attention_heads_per_layer, kv_per_layer)
        if any(len(x) != n_layers for x in sizes):
            raise ValueError(f"per-layer sizes need {n_layers} entries")
        if any(int(h) % int(g) for h, g in zip(num_attention_heads_per_layer, kv_per_layer)):
            raise ValueError("query heads per layer must be multiples of the layer's KV heads")
        d["head_dim"] = int(d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"])
        d["intermediate_size"] = max(int(x) for x in intermediate_sizes)
        d["num_attention_heads"] = max(int(x) for x in num_attention_heads_per_layer)
        d["num_key_value_heads"] = max(int(x) for x in kv_per_layer)
        return cls(
            base_model_type=base_config.model_type,
            intermediate_sizes=intermediate_sizes,
            num_attention_heads_per_layer=num_attention_heads_per_layer,
            num_key_value_heads_per_layer=None if num_key_value_heads_per_layer is None else kv_per_layer,
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
        kv_per_layer = c.num_key_value_heads_per_layer or [c.num_key_value_heads] * c.num_hidden_layers
        for i, layer in enumerate(self.model.layers):
            nq, m, kv = c.num_attention_heads_per_layer[i], c.intermediate_sizes[i], kv_per_layer[i]
            if nq == c.num_attention_heads and m == c.intermediate_size and kv == c.num_key_value_heads:
                continue
            layer_config = copy.copy(c)
            layer_config.num_attention_heads, layer_config.intermediate_size = nq, m
            layer_config.num_key_value_heads = kv
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
