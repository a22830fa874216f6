"""Packed conversations through PyTorch's own variable-length attention: `model.attn_implementation: torch_varlen`.

Why by hand: transformers 5.24 reaches a variable-length kernel only through the flash-attn package or the Hub's
build of it (a download). Without them a padding-free micro-batch goes through sdpa with a block mask, which rules out
PyTorch's flash backend and computes every token pair of the micro-batch (sftkit/fastpath.py). PyTorch 2.11 and
later ship flash attention's variable-length kernel themselves (torch.nn.attention.varlen); this registers it with
transformers' AttentionInterface. Each conversation of the micro-batch then attends only to itself, from the sequence
boundaries TRL's padding-free collator gives (cu_seq_lens_q/k, max_length_q/k), and no tokens x tokens mask is built
for it. Every other call (unpacked or padded batches, generation with a cache, sliding-window layers) takes
transformers' sdpa with sdpa's own mask. Where the flash kernel cannot run (no CUDA, a GPU older than Ampere, float32
attention, attention dropout, bidirectional attention), the same boundaries go through sdpa one conversation at a
time.
"""

import functools
import logging

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.flash_attention import get_target_dtype
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

logger = logging.getLogger("sftkit")
NAME = "torch_varlen"


def _varlen_keywords() -> frozenset[str]:
    """The keywords this torch's varlen_attn takes, read once (not inside a compiled step). Its keywords changed
    between releases: torch 2.10's took `is_causal` and no `scale` (not supported); 2.11 takes a causal
    `window_size` of (-1, 0) and `scale`; 2.12 adds `enable_gqa` (the flash kernel takes fewer key/value heads than
    query heads in all of them)."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


VARLEN_KEYWORDS = _varlen_keywords()


def available() -> bool:
    return "window_size" in VARLEN_KEYWORDS


def register() -> None:
    """Make NAME a valid attn_implementation for transformers (models built or loaded after this call)."""
    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask)


def _mask(batch_size, q_length, kv_length, attention_mask=None, local_size=None, **kwargs):
    """sdpa's mask, except for rows of unpadded tokens with nothing cached (training and evaluation batches), where
    it would be a causal or, for packed rows, a block mask of tokens x tokens (64 MiB at 8,192 tokens) that the packed
    path does not read: None there, and the sdpa fallback is then plainly causal."""
    if attention_mask is None and local_size is None and q_length == kv_length:
        return None
    return sdpa_mask(batch_size, q_length, kv_length, attention_mask=attention_mask, local_size=local_size, **kwargs)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None,
              max_length_k=None, **kwargs):
    """transformers' attention interface: query (batch, heads, tokens, head_dim), key and value with their own
    number of heads (grouped-query attention); returns (batch, tokens, heads, head_dim) and no weights."""
    for unsupported in ("softcap", "s_aux"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"model.attn_implementation: {NAME} does not support {unsupported} "
                             f"({type(module).__name__}); use flash_attention_2 or eager")
    # Packed rows with their boundaries; a sliding window has its mask from _mask, so sdpa keeps it apart there
    bounded = (cu_seq_lens_q is not None and query.shape[0] == 1 and query.shape[2] == key.shape[2]
               and kwargs.get("sliding_window") is None)
    if not bounded:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # (1, heads, tokens, head_dim) -> (tokens, heads, head_dim), the varlen kernels' layout
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    if q.is_cuda:
        target = get_target_dtype(q, module)  # float32 activations (QLoRA's, or autocast's) to the 16-bit dtype
        if target is not None:
            q, k, v = q.to(target), k.to(target), v.to(target)
    if causal and not dropout and _flash_runs(q):
        out = _flash_varlen(q, k, v, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scaling)
    else:  # attention dropout, or bidirectional attention, within each conversation all the same
        out = _one_conversation_at_a_time(q, k, v, cu_seq_lens_q, scaling, dropout, causal)
    return out.unsqueeze(0), None


@functools.lru_cache(maxsize=8)
@torch.compiler.assume_constant_result  # asked while torch.compile traces the model: a constant, not a graph break
def _flash_capable(index: int) -> bool:
    """An Ampere or newer GPU (as torch.nn.attention.varlen asks its own device questions)."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def _flash_runs(q) -> bool:
    """PyTorch's flash kernel: CUDA, an Ampere or newer GPU, 16-bit inputs."""
    if not q.is_cuda:
        return False
    if _flash_capable(q.device.index or 0) and q.dtype in (torch.bfloat16, torch.float16):
        return True
    if not _warned:
        _warned.append(True)
        logger.warning(f"model.attn_implementation: {NAME}: PyTorch's flash kernel needs an Ampere or newer GPU and "
                       f"16-bit attention ({q.dtype} here); packed conversations go through sdpa one at a time "
                       "(slow): use sdpa, or train in bf16")
    return False


_warned = []


def _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scaling):
    from torch.nn.attention.varlen import varlen_attn  # torch 2.11 and later (checked when the config loads)

    options = {"window_size": (-1, 0), "scale": scaling}
    if "enable_gqa" in VARLEN_KEYWORDS:  # torch 2.12 and later; the device image has 2.11
        options["enable_gqa"] = k.shape[1] != q.shape[1]
    return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options)


def _one_conversation_at_a_time(q, k, v, cu_q, scaling, dropout: float = 0.0, causal: bool = True):
    bounds = cu_q.tolist()
    pieces = [F.scaled_dot_product_attention(q[start:end].transpose(0, 1), k[start:end].transpose(0, 1),
                                             v[start:end].transpose(0, 1), dropout_p=dropout, is_causal=causal,
                                             scale=scaling, enable_gqa=True).transpose(0, 1)
              for start, end in zip(bounds[:-1], bounds[1:])]
    return torch.cat(pieces)
