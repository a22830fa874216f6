"""Attention alone, on the GPU benchmark's own packed micro-batches: which SDPA backend PyTorch picks for them and
what each way of computing them costs (issue 13: "measure which SDPA backend PyTorch picks for packed batches and
why it is slow here"). gpu.py runs it as the variant `attention-kernels`, in seconds, so a lent GPU answers this even
when the trained variants run out of time.

The micro-batches are the ones padding-free training sees: the benchmark's chat rows, tokenized with its tokenizer
and packed best-fit-decreasing by TRL (`pack_dataset`, as SFTTrainer packs them), `micro_batch` packed rows end to
end with their conversation boundaries. Each is computed, forward and backward, at the attention shape of the model
(heads, key/value heads, head_dim; bf16 on a GPU) by
- `sdpa-block-mask`: transformers' sdpa with the boolean mask that keeps packed conversations apart (what
  `attn_implementation: sdpa` runs for packed batches), and the backend PyTorch picks for it;
- `sdpa-causal-no-mask`: sdpa causal over the whole micro-batch, conversations not kept apart (wrong for training;
  the same kernel's time over the same pairs without a mask), and its backend;
- `torch_varlen`: sftkit's `model.attn_implementation: torch_varlen` (sftkit/varlen.py), each conversation only with
  itself; on a CPU its fallback, sdpa one conversation at a time;
and the share of the micro-batch's causal token pairs that belong to one conversation (what a variable-length
kernel computes; a kernel given a mask computes every pair, causal or not). torch_varlen's outputs are checked against the block mask's.
"""

import json
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MICRO_BATCHES = 4  # different micro-batches, each timed `repeats` times after one warm-up pass


def packed_micro_batches(data_file: Path, tokenizer, seq_len: int, micro_batch: int, count: int,
                         rows: int = 600) -> list[list[int]]:
    """The conversation lengths of `count` packed micro-batches of the data, as TRL packs it and the Trainer's
    shuffled sampler draws them (best-fit-decreasing puts the longest rows first)."""
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    lines = data_file.read_text().splitlines()[:rows]
    ids = [tokenizer(tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False),
                     add_special_tokens=False)["input_ids"][:seq_len] for line in lines]
    packed = pack_dataset(Dataset.from_dict({"input_ids": ids}), seq_len, strategy="bfd")["seq_lengths"]
    packed = random.Random(0).sample(list(packed), len(packed))
    return [[length for row in packed[start:start + micro_batch] for length in row]
            for start in range(0, micro_batch * count, micro_batch)]


def measure(shape: dict, seq_len: int, micro_batch: int, data_file: Path, repeats: int = 5) -> dict:
    import torch
    from torch.nn.attention import SDPBackend
    from transformers import AutoConfig, AutoTokenizer
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
    from transformers.models.llama.modeling_llama import LlamaAttention

    from sftkit import varlen

    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-chat-llama")
    batches = packed_micro_batches(data_file, tokenizer, seq_len, micro_batch, MICRO_BATCHES)
    config = AutoConfig.for_model(**{**shape, "model_type": "llama"})
    module = LlamaAttention(config, layer_idx=0).to(device)  # its heads, scaling and is_causal; weights unused
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads

    def ways(lengths):
        tokens = sum(lengths)
        cu = torch.tensor([0, *lengths], device=device).cumsum(0).to(torch.int32)
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                          torch.tensor(lengths, device=device))
        position = torch.arange(tokens, device=device)
        block_mask = ((segment[:, None] == segment[None, :]) & (position[:, None] >= position[None, :]))[None, None]
        return {
            "sdpa-block-mask": lambda q, k, v: sdpa_attention_forward(module, q, k, v, block_mask,
                                                                      scaling=module.scaling)[0],
            "sdpa-causal-no-mask": lambda q, k, v: sdpa_attention_forward(module, q, k, v, None, is_causal=True,
                                                                          scaling=module.scaling)[0],
            "torch_varlen": lambda q, k, v: varlen.attention(module, q, k, v, None, scaling=module.scaling,
                                                             cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                                             max_length_q=max(lengths), max_length_k=max(lengths))[0],
        }, block_mask

    def inputs(tokens):
        generator = torch.Generator(device=device).manual_seed(tokens)
        return [torch.randn(1, n, tokens, head_dim, device=device, dtype=dtype, generator=generator,
                            requires_grad=True) for n in (heads, kv_heads, kv_heads)]

    def forward_backward(way, q, k, v):
        out = way(q, k, v)
        out.backward(torch.ones_like(out))
        return out

    def synchronize():
        if gpu:
            torch.cuda.synchronize()

    seconds, backends, errors, difference = {}, {}, {}, None
    for lengths in batches:
        table, block_mask = ways(lengths)
        q, k, v = inputs(sum(lengths))
        kv = [repeat_kv(t, heads // kv_heads) for t in (k, v)]  # as transformers passes them with a mask
        backends["sdpa-block-mask"] = SDPBackend(torch._fused_sdp_choice(q, *kv, attn_mask=block_mask,
                                                                         scale=module.scaling)).name
        backends["sdpa-causal-no-mask"] = SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True,
                                                                             scale=module.scaling)).name
        outputs = {}
        for name, way in table.items():
            if name in errors:
                continue
            try:  # one way failing (a kernel this torch lacks) leaves the others' answers
                outputs[name] = forward_backward(way, q, k, v).detach()  # warm-up
            except Exception as error:  # noqa: BLE001 - recorded in the results, as the variant's answer
                errors[name] = f"{type(error).__name__}: {error}"[:300]
                continue
            synchronize()
            start = time.perf_counter()
            for _ in range(repeats):
                forward_backward(way, q, k, v)
            synchronize()
            seconds.setdefault(name, []).append((time.perf_counter() - start) / repeats)
        if {"torch_varlen", "sdpa-block-mask"} <= set(outputs):
            difference = max(difference or 0.0, (outputs["torch_varlen"].float() - outputs["sdpa-block-mask"].float())
                             .abs().max().item())
    pairs = [(sum(n * (n + 1) // 2 for n in lengths), sum(lengths) * (sum(lengths) + 1) // 2) for lengths in batches]
    milliseconds = {name: 1000 * sum(values) / len(values) for name, values in seconds.items()}
    return {
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "heads": heads, "key_value_heads": kv_heads, "head_dim": head_dim,
        "tokens_per_micro_batch": sum(sum(lengths) for lengths in batches) / len(batches),
        "conversations_per_micro_batch": sum(len(lengths) for lengths in batches) / len(batches),
        "own_conversation_pair_share": sum(own for own, _ in pairs) / sum(every for _, every in pairs),
        # a kernel given a mask computes every (query, key) pair, causal or not; a varlen kernel its own causal ones
        "masked_pairs_per_varlen_pair": sum(sum(lengths) ** 2 for lengths in batches) / sum(own for own, _ in pairs),
        "forward_backward_ms": milliseconds,
        "sdpa_backend": backends,
        "torch_varlen_max_abs_difference": difference,
        "errors": errors,
    }


def describe(result: dict) -> str:
    """One paragraph for the benchmark's table."""
    ms, backend = result["forward_backward_ms"], result["sdpa_backend"]
    timed = "; ".join(f"{name} {ms[name]:.2f} ms" + (f" ({backend[name]})" if name in backend else "")
                      if name in ms else f"{name} failed: {result['errors'][name]}"
                      for name in ("sdpa-block-mask", "sdpa-causal-no-mask", "torch_varlen"))
    compared = ""
    if {"sdpa-block-mask", "torch_varlen"} <= set(ms):
        compared = (f" torch_varlen is {ms['sdpa-block-mask'] / ms['torch_varlen']:.2f} times as fast as the block "
                    f"mask, its outputs within {result['torch_varlen_max_abs_difference']:.1e} of the mask's.")
    return (f"Attention alone (one layer, forward and backward, {result['heads']} heads, {result['key_value_heads']} "
            f"key/value heads, head_dim {result['head_dim']}, {result['dtype']}) on packed micro-batches of "
            f"{result['tokens_per_micro_batch']:,.0f} tokens and {result['conversations_per_micro_batch']:.1f} "
            f"conversations, of whose causal token pairs {result['own_conversation_pair_share']:.1%} lie within one "
            f"conversation (a kernel given the mask computes {result['masked_pairs_per_varlen_pair']:.1f} times the "
            f"pairs a variable-length one does): {timed}.{compared}")
