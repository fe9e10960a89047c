"""Policy (and reference) models: the embedded tiny Qwen2 built from a config, or any HF causal LM.

``attach_fused_head`` gives the model a forward that stops at the final hidden states and hands
them, with the LM head's weight and bias, to a callable (our fused log-prob / loss): the model's
lm_head never produces the [tokens, vocab] logits. It runs inside the model's own forward, so
FSDP2's hooks have gathered the parameters by then.
"""
from __future__ import annotations

import functools
import types

import torch

import r1kernels.integrations.transformers as r1k_hf


# Qwen2-shaped models built from a config (random init, no download): builtin-tiny takes its sizes from
# the model section; the others are Qwen2.5-0.5B / -1.5B's shapes with their 151,936-token vocabulary (the
# builtin tokenizer is padded to it), for measuring the trainer's tokens/s and MFU on a GPU offline
BUILTIN_MODELS = {
    "builtin-tiny": {},
    "builtin-0.5b": dict(hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864,
                         vocab_size=151936, max_positions=4096, tie=True),
    "builtin-1.5b": dict(hidden_size=1536, num_layers=28, num_heads=12, num_kv_heads=2, intermediate_size=8960,
                         vocab_size=151936, max_positions=4096, tie=True),
}


def builtin_config(cfg, tokenizer):
    """The transformers config of a built-in model (``cfg.name`` in BUILTIN_MODELS)."""
    import transformers

    shape = {**dict(hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                    num_kv_heads=cfg.num_kv_heads, intermediate_size=cfg.intermediate_size, max_positions=256,
                    tie=True), **BUILTIN_MODELS[cfg.name]}
    shape.pop("vocab_size", None)           # the tokenizer already has it
    return transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"],
        num_hidden_layers=shape["num_layers"], num_attention_heads=shape["num_heads"],
        num_key_value_heads=shape["num_kv_heads"], max_position_embeddings=shape["max_positions"],
        tie_word_embeddings=shape["tie"], pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def build_model(cfg, tokenizer, dtype: torch.dtype):
    import transformers

    if cfg.name in BUILTIN_MODELS:
        model = transformers.Qwen2ForCausalLM(builtin_config(cfg, tokenizer)).to(dtype)
    else:
        # Loaded on the CPU first, never on the meta device: transformers' rotary buffers are not in
        # the state dict, so a meta-initialised model would keep them uninitialised (silently wrong logits).
        model = transformers.AutoModelForCausalLM.from_pretrained(cfg.name, dtype=dtype)
    r1k_hf.register()
    model.set_attn_implementation(r1k_hf.NAME)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def attach_fused_head(model) -> None:
    """``model(..., head=fn)`` returns ``fn(hidden [B, T, H], lm_head.weight, lm_head.bias)``; without
    ``head`` the original forward runs (generation is unchanged)."""
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, head=None, **kwargs):
        if head is None:
            return original(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = getattr(self, self.base_model_prefix)(*args, **kwargs).last_hidden_state
        lm_head = self.get_output_embeddings()
        return head(hidden, lm_head.weight, lm_head.bias)

    model.forward = types.MethodType(forward, model)


def decoder_layers(model):
    return getattr(model, model.base_model_prefix).layers
