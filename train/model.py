"""The policy: a Hugging Face causal LM whose final hidden states go straight into a fused LM-head loss.

`Policy` wraps the HF model so that one FSDP root (`Policy`) sees the whole step: embeddings, decoder blocks
(each its own FSDP unit), final norm and the LM head. `Policy.forward` runs the base model (`hf.model`) on a packed
`[1, N]` row of tokens with per-sequence position ids (no padding; sdpa and flash-attn varlen both read sequence
boundaries from the position ids) and returns the final hidden states of the tokens `select` marks as packed
`[n, H]` rows (the trainer selects the loss mask's tokens; no padded `[B, L, H]` grid) with `hf.lm_head.weight`;
the trainer feeds both to a fastpmd loss or `linear_logprobs`, which take packed rows, and never asks for logits. (The
FSDP root keeps its parameters, the LM head included, unsharded from its forward through its backward, so the
returned weight is the gathered one.)
"""
from __future__ import annotations

import importlib.util
import torch
from torch import nn

from .config import ModelConfig
from .packing import pack_layout

TINY_DEFAULTS = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                     rope_theta=10000.0)
MOE_DEFAULTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1,
                    mlp_only_layers=[], norm_topk_prob=True)


def attn_implementation(requested: str, device: torch.device) -> str:
    """flash_attention_2 on CUDA when flash-attn is installed, else sdpa (the packed row needs no padding mask)."""
    if requested != "auto":
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def tiny_config(arch: str, vocab_size: int, pad_id: int, bos_id: int, eos_id: int, **overrides):
    """A small random-init config of the given family (Qwen2, Qwen3 or Qwen3-MoE)."""
    import transformers

    kw = dict(TINY_DEFAULTS, vocab_size=vocab_size, pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id)
    if arch == "tiny-qwen2":
        return transformers.Qwen2Config(**{**kw, **overrides})
    if arch == "tiny-qwen3":
        return transformers.Qwen3Config(**{**kw, "head_dim": kw["hidden_size"] // kw["num_attention_heads"],
                                           **overrides})
    if arch == "tiny-qwen3-moe":
        return transformers.Qwen3MoeConfig(**{**kw, **MOE_DEFAULTS,
                                              "head_dim": kw["hidden_size"] // kw["num_attention_heads"],
                                              **overrides})
    raise ValueError(f"model.arch: unknown tiny architecture {arch!r}")


def build_hf_model(cfg: ModelConfig, device: torch.device, *, tokenizer=None, meta: bool = False) -> nn.Module:
    """The HF causal LM in float32 (FSDP's MixedPrecisionPolicy casts for compute).

    meta=True builds it on the meta device (weights come later from `load_full_state` / a checkpoint);
    otherwise random tiny archs are initialised from `cfg.seed` and checkpoints are read from disk.
    """
    import transformers

    attn = attn_implementation(cfg.attn_implementation, device)
    if cfg.arch:
        hf_cfg = tiny_config(cfg.arch, tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
                             **cfg.arch_kwargs)
    else:
        hf_cfg = transformers.AutoConfig.from_pretrained(cfg.name_or_path)
    hf_cfg._attn_implementation = attn
    if meta:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    if cfg.arch:
        torch.manual_seed(cfg.seed)
        return transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(cfg.name_or_path, config=hf_cfg,
                                                             dtype=torch.float32)


def decoder_blocks(hf: nn.Module) -> nn.ModuleList:
    """The repeated decoder blocks (`hf.model.layers` in every Qwen/Llama-family model)."""
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"model: {type(hf).__name__} has no model.layers ModuleList of decoder blocks")
    return layers


def reset_rotary(hf: nn.Module, device: torch.device) -> None:
    """Recreate non-persistent rotary buffers (inv_freq) after materialising a meta-device model."""
    rot = getattr(hf.model, "rotary_emb", None)
    if rot is not None:
        with torch.device(device):
            hf.model.rotary_emb = type(rot)(config=hf.config)


class Policy(nn.Module):
    """FSDP root around an HF causal LM. forward(input_ids, position_ids, valid, select=None) -> (hidden, lm_head
    weight [V, H]): hidden [n, H], the rows of select's True entries in row-major order (select within valid), or
    with select None the [B, L, H] grid (zeros off valid).

    row_tokens None packs the whole batch into one [1, N] row (flash-attn varlen: attention costs sum L_i^2);
    an int packs it into rows of at most max(row_tokens, longest) tokens, which bounds sdpa's dense
    block-diagonal mask and attention to N * C instead of N^2 (10-token sequences: 256 per token, not 2,560).
    """

    def __init__(self, hf: nn.Module, row_tokens: int | None = None):
        super().__init__()
        self.hf = hf
        self.row_tokens = row_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
                select: torch.Tensor | None = None):
        """input_ids, position_ids, valid, select: [B, L] (valid = real prompt/response token, a prefix of each row;
        select: the tokens whose hidden states are returned as packed rows, e.g. the loss mask)."""
        B, L = input_ids.shape
        dest, used, C = pack_layout(valid, self.row_tokens)  # [N], [R]
        R = used.numel()
        # free slots at a row's end hold a dummy sequence (token 0, positions 0, 1, ...): its own attention block
        free_pos = (torch.arange(C, device=used.device) - used[:, None]).clamp(min=0).reshape(-1)  # [R * C]
        packed_pos = free_pos.index_put((dest,), position_ids[valid]).view(R, C)
        packed_ids = torch.zeros(R * C, dtype=input_ids.dtype, device=input_ids.device).index_put(
            (dest,), input_ids[valid]).view(R, C)
        out = self.hf.model(input_ids=packed_ids, position_ids=packed_pos, use_cache=False)
        if select is not None:  # plain PyTorch: grid[select] of the grid below, without building the grid
            return out.last_hidden_state.reshape(R * C, -1)[dest[select[valid]]], self.hf.lm_head.weight  # [n, H]
        h = out.last_hidden_state.reshape(R * C, -1)[dest]  # [N, H]
        hidden = h.new_zeros(B, L, h.shape[-1]).index_put((valid.nonzero(as_tuple=True)), h)  # [B, L, H]
        return hidden, self.hf.lm_head.weight


def hf_state_key(name: str) -> str:
    """Policy parameter name -> the HF model's own name ('hf.model.layers.0...' -> 'model.layers.0...')."""
    return name[3:] if name.startswith("hf.") else name
