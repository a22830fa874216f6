"""Packed conversations through PyTorch's own variable-length attention: `model.attn_implementation: torch_varlen`.

Why by hand: transformers 5.24 reaches a variable-length kernel only through the flash-attn package or the Hub's
build of it (a download). Without them a padding-free micro-batch goes through sdpa with a block mask, which rules out
PyTorch's flash backend and computes every token pair of the micro-batch (sftkit/fastpath.py). PyTorch 2.10 and
later ship flash attention's variable-length kernel themselves (torch.nn.attention.varlen); this registers it with
transformers' AttentionInterface. Each conversation of the micro-batch then attends only to itself, from TRL's
sequence boundaries (cu_seq_lens_q/k, max_length_q/k). Calls without them (unpacked batches, generation) take
transformers' sdpa with its usual mask. Without CUDA the same boundaries go through sdpa one conversation at a time.
"""

import inspect
import math

NAME = "torch_varlen"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def register() -> None:
    """Make NAME a valid attn_implementation for transformers (models built or loaded after this call)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)  # the mask the sdpa fallback needs; packed calls ignore it


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **kwargs):
    """transformers' attention interface: query (1, heads, tokens, head_dim), key and value with their own number of
    heads (grouped-query attention); returns (1, tokens, heads, head_dim) and no weights."""
    if not _packed(query, cu_seq_lens_q, dropout, kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    # (1, heads, tokens, head_dim) -> (tokens, heads, head_dim), the varlen kernels' layout
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    if q.is_cuda:
        out = _flash_varlen(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling)
    else:
        out = _one_conversation_at_a_time(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None


def _packed(query, cu_seq_lens_q, dropout: float, kwargs: dict) -> bool:
    """A padding-free micro-batch with its sequence boundaries, and nothing the varlen path does not do: dropout in
    attention, sliding windows, logit soft-capping, attention sinks."""
    special = any(kwargs.get(name) is not None for name in ("sliding_window", "softcap", "s_aux"))
    return cu_seq_lens_q is not None and query.shape[0] == 1 and not dropout and not special


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling):
    """torch.nn.attention.varlen.varlen_attn, whose keywords changed between releases: torch 2.10 takes
    `is_causal`; later releases a causal `window_size` of (-1, 0), and `scale`; 2.12 adds `enable_gqa` (the flash
    kernel takes fewer key/value heads than query heads in all of them)."""
    from torch.nn.attention.varlen import varlen_attn

    accepts = inspect.signature(varlen_attn).parameters
    options = {"is_causal": True} if "is_causal" in accepts else {"window_size": (-1, 0)}
    if "enable_gqa" in accepts:
        options["enable_gqa"] = k.shape[1] != q.shape[1]
    if "scale" in accepts:
        options["scale"] = scaling
    elif scaling is not None and not math.isclose(scaling * math.sqrt(q.shape[-1]), 1.0):
        q = q * (scaling * math.sqrt(q.shape[-1]))  # the kernel's own scale is 1/sqrt(head_dim)
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)


def _one_conversation_at_a_time(q, k, v, cu_q, scaling):
    import torch
    import torch.nn.functional as F

    bounds = cu_q.tolist()
    pieces = [F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k[start:end].transpose(0, 1),
                                             v[start:end].transpose(0, 1), is_causal=True, scale=scaling,
                                             enable_gqa=True).transpose(0, 1)
              for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(pieces)
