"""Hidden states and LM head of a Hugging Face causal LM (plain or PEFT-wrapped), for losses that never build logits.

Plain-PyTorch equivalent of `completion_hidden` + `fastpmd.linear_logprobs`:
    logits = lm(input_ids, attention_mask).logits[:, -K - 1:-1] / temperature
    logp = logits.log_softmax(-1).gather(-1, input_ids[:, -K:, None])[..., 0]
"""
from __future__ import annotations

import torch

# Config fields that change the logits beyond `hidden @ W.T + b` (fastpmd's head computes exactly that).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                     "logits_scaling")
_VISION_INPUTS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes",
                  "image_position_ids", "token_type_ids", "mm_token_type_ids")


def causal_lm(model):
    """The transformers causal LM inside a (possibly PEFT-wrapped) model; LoRA layers stay injected in it."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_supported(lm, inputs: dict) -> None:
    """ValueError for what the fused head does not compute: logit transforms, vision inputs, an adapted LM head."""
    text_cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for name in _LOGIT_TRANSFORMS:
        value = getattr(text_cfg, name, None)
        if value is not None and value != 1.0:
            raise ValueError(f"fastpmd's fused LM head does not support {name}={value!r} (model type "
                             f"{text_cfg.model_type!r}); use TRL's GRPOTrainer for this model")
    given = [k for k in _VISION_INPUTS if inputs.get(k) is not None]
    if given:
        raise ValueError(f"fastpmd's TRL integration is text-only; got vision/multimodal inputs {given}")
    head = lm.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or hasattr(head, "base_layer"):
        raise ValueError(f"the LM head must be a plain nn.Linear (not an adapter-wrapped {type(head).__name__}); "
                         "leave lm_head out of the PEFT target modules")


def completion_hidden(lm, input_ids, attention_mask, logits_to_keep: int, *, aux_loss: bool = False,
                      dtype: torch.dtype | None = None):
    """Final hidden states predicting the last K tokens, the LM head (weight, bias) and the MoE aux loss.

    input_ids, attention_mask [B, S]; returns hidden [B, K, H], weight [V, H], bias [V] or None, aux 0-d or None,
    cast to `dtype` (default: head_dtype(weight), what stock `lm_head(hidden)` computes in).
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
    if aux_loss:
        kwargs["output_router_logits"] = True
    out = lm.base_model(**kwargs)  # the backbone: no logits
    hidden = out.last_hidden_state[:, -logits_to_keep - 1:-1]  # hidden at t predicts token t+1
    head = lm.get_output_embeddings()
    weight, bias = head.weight, head.bias
    hidden = hidden.to(weight.device)
    dtype = dtype or head_dtype(weight)
    if hidden.dtype != dtype or weight.dtype != dtype:  # casts keep autograd to the parameters
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    aux = moe_aux_loss(lm, out, attention_mask) if aux_loss else None
    return hidden, weight, bias, aux


def head_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype stock `lm_head(hidden)` computes in: the autocast dtype while autocast is on for the weight's
    device (a bf16 autocast over an fp32 head runs the head in bf16, on tensor cores), else the head's own dtype
    (e.g. an fp32 head with its input cast up, as TRL's cast_lm_head_to_fp32 does)."""
    dev = weight.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def moe_aux_loss(lm, backbone_out, attention_mask) -> torch.Tensor:
    """The load-balancing loss the causal LM's own forward adds (Mixtral's formula, shared by HF MoE models)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    cfg = lm.config.get_text_config()
    num_experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts")
    return load_balancing_loss_func(backbone_out.router_logits, num_experts, cfg.num_experts_per_tok, attention_mask)
