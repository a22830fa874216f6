"""The fast path on a GPU: what a run turns on when its config leaves the setting out, and why.

Each choice is made once, from the config and the machine, while the config loads (before SFTConfig is built, and
for the adapter-input casts just after, since they follow its bf16); the run and the dry run print them on one line
(`speed`). A setting given in the config or the environment is always kept as given.

What was measured, and where (issue 13, one H200, a Llama-3.2-1B-shape model, sequence 2,048, micro-batch 4, bf16):
packing + Liger took LoRA from 7.7k to 19.5k tokens/s (Liger alone 18.2k -> 19.5k, and 3 GiB less at peak: with
TRL 1.16 that is its layer kernels, since TRL turns Liger's fused cross-entropy off for its own chunked loss), and
torch.compile halved LoRA's step time (0.59 s -> 0.30 s). With every choice below, on one H100 (2026-11-27, the same
shape and libraries, benchmarks/results/2026-11-27-h100.md): LoRA 27.6k tokens/s, 3.8 times plain TRL's defaults
and 1.7 times plain TRL given the same packing, Liger, compile and attention; full fine-tuning 30.3k, 3.5 times;
15% and 24% MFU. Not measured yet, so left off by default: compile under DeepSpeed or FSDP (on this CPU ZeRO-2
compiles and trains; ZeRO-3 fails and is refused, compat.py), and with 4-bit layers; the attention kernels side by
side.

Why packed batches are slow under sdpa (53% of the GPU time in the profile above): a padding-free micro-batch is one
row of every packed row end to end, and transformers 5.24 keeps its conversations apart with a boolean mask built
from the position ids (masking_utils.find_packed_sequence_indices). PyTorch's flash backend takes no mask, so SDPA
runs cuDNN's or the memory-efficient kernel over every token pair of the row. On the GPU benchmark's data (4 x 2,048
packed, 8,153 tokens and 9.5 conversations per micro-batch on average) that is 14.5 times the pairs a
variable-length kernel computes (each conversation's own, causal), counted on CPU from the collated batches.
flash_attention_2 (or the Hub's build of it) takes the sequence boundaries TRL's collator gives instead, and so does
torch_varlen, PyTorch's own build of that kernel (sftkit/varlen.py). PyTorch's flex_attention skips the masked-out
blocks too, but is compiled per shape and has no CPU backward to test here. Both are benchmark variants
(benchmarks/gpu.py), not defaults, until a GPU has measured them.
"""

import importlib.util
import os
from dataclasses import dataclass

from sftkit.engines import uses_deepspeed, uses_fsdp
from sftkit.errors import ConfigError

# Packed, padding-free batches are one sequence of a different length every step. TRL's collator pads it to a
# multiple of this (labels -100, so no token more trains; at most 63 padded tokens a step): few, aligned lengths.
# The compiled model takes them as dynamic sizes (mark_lengths_dynamic), so a new length is not a recompile.
PACKED_LENGTH_MULTIPLE = 64


@dataclass
class Choice:
    key: str  # the config key, e.g. "training.torch_compile"
    value: object
    why: str
    chosen: bool = True  # False: the user set it (see `given`)
    given: str = "set in the config"

    def describe(self) -> str:
        value = ("on" if self.value else "off") if isinstance(self.value, bool) else self.value
        return f"{self.key.split('.')[-1]} {value} ({self.why if self.chosen else self.given})"


ALLOCATOR_SETTING = "expandable_segments:True"


def use_expandable_segments() -> None:
    """PyTorch's CUDA allocator in expandable segments, unless PYTORCH_ALLOC_CONF (or its older name) is set: packed
    batches change length every step, and fixed-size cached blocks fragment (34.6 GiB reserved for 24.5 GiB allocated
    in issue 13's 8B QLoRA run, micro-batch 4). Unsloth and Axolotl set the same; torchtune measured 16.4 -> 10.8 GiB
    on an 8B QLoRA on one A100 80GB (torchtune#1185). Read once, when CUDA starts, so the command (sftkit.cli) sets
    it first."""
    if not _allocator_setting():
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = ALLOCATOR_SETTING
        os.environ["SFTKIT_SET_ALLOC_CONF"] = "1"  # so the plan can tell sftkit's choice from the user's


def _allocator_setting() -> str | None:
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF")


def _allocator() -> Choice:
    setting = _allocator_setting()
    if setting is None:  # train() called from Python, not through the command
        return Choice("cuda_allocator", "PyTorch's default", "sftkit's command sets expandable segments")
    if os.environ.get("SFTKIT_SET_ALLOC_CONF") == "1" and setting == ALLOCATOR_SETTING:
        return Choice("cuda_allocator", setting, "packed batches vary in length; cached blocks of fixed size "
                                                 "fragment (set PYTORCH_ALLOC_CONF to choose)")
    return Choice("cuda_allocator", setting, "", chosen=False, given="set in the environment")


def choose(training: dict, model, gpu: bool, installed=None) -> list[Choice]:
    """Fill in the fast-path settings the config leaves out: `training` (the config's training values, as given)
    gets torch_compile, use_liger_kernel and pad_to_multiple_of, `model` its attn_implementation; on a GPU the
    allocator setting (use_expandable_segments) is reported too. `installed`: the importable packages among
    flash_attn, kernels and liger_kernel (found here when None)."""
    if installed is None:
        installed = {name for name in ("flash_attn", "kernels", "liger_kernel") if importlib.util.find_spec(name)}
    packed = _padding_free(training)
    choices = [
        _set(training, "torch_compile", *_compile(training, model, gpu)),
        _set(training, "use_liger_kernel", *_liger(gpu, installed)),
        _attention(model, gpu, installed, packed, _sixteen_bit_weights(model, training, gpu)),
        *([_allocator()] if gpu else []),
    ]
    if training.get("torch_compile") and packed and "pad_to_multiple_of" not in training:
        training["pad_to_multiple_of"] = PACKED_LENGTH_MULTIPLE
        choices.append(Choice("training.pad_to_multiple_of", PACKED_LENGTH_MULTIPLE,
                              "packed batches rounded up to few, aligned lengths"))
    return choices


def choose_adapter_inputs(model, args, gpu: bool) -> list[Choice]:
    """model.cast_adapter_inputs, once SFTConfig is built (it decides bf16). PEFT 0.21 keeps the LoRA adapters of a
    16-bit model in float32 and copies every adapter input to float32 on each call; under mixed precision autocast
    casts it back to 16 bits for the matmul, so for plain LoRA the two copies of the activations change nothing (the
    same losses and gradients, tests/test_fastpath.py). Where autocast runs, training and evaluation skip them.
    Not for DoRA, whose weight norm PEFT computes in the input's dtype (outside autocast's matmuls), nor for QLoRA,
    whose adapters TRL 1.16 keeps in bf16 while PEFT's k-bit preparation makes the residual stream float32 (there the
    cast is a useful downcast before dropout); moot under DeepSpeed, which casts the whole model."""
    if not model.use_lora:
        return []
    autocast = (args.bf16 or (args.fp16 and gpu)) and not uses_deepspeed(args)
    if model.cast_adapter_inputs is False and not autocast:
        raise ConfigError("model.cast_adapter_inputs: false needs bf16 or fp16 mixed precision (training.bf16 or "
                          "training.fp16, not under DeepSpeed), where autocast computes the adapters in 16 bits; "
                          "remove the setting")
    if model.cast_adapter_inputs is not None:
        return [Choice("model.cast_adapter_inputs", model.cast_adapter_inputs, "", chosen=False)]
    keep = model.lora_config.use_dora or model.load_in_4bit
    if model.lora_config.use_dora:
        why = "DoRA computes its weight norm in the inputs' dtype"
    elif model.load_in_4bit:
        why = "QLoRA's adapters are bf16 already; the cast makes the float32 residual stream 16-bit before dropout"
    elif uses_deepspeed(args) and (args.bf16 or args.fp16):
        why = "DeepSpeed trains the whole model in 16 bits: nothing to copy"
    elif not autocast:
        why = "no mixed precision: the inputs take the adapters' dtype"
    else:
        why = "mixed precision: the adapters compute in 16 bits, PEFT's float32 copies of their inputs are skipped"
    model.cast_adapter_inputs = not autocast or keep
    return [Choice("model.cast_adapter_inputs", model.cast_adapter_inputs, why)]


def adapter_input_casts(model, enabled: bool):
    """PEFT's own switch for the casts above, around one training step (forward and backward: activation
    checkpointing runs the forward again) or evaluation step. Generation outside the Trainer has no autocast, so
    there the adapters still need inputs of their dtype."""
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(model, active=not enabled)


def lengths_vary(args) -> bool:
    """Whether the compiled model sees batches of more than one length: not when training.pad_to_multiple_of pads
    every micro-batch to its longest possible shape."""
    longest = args.max_length * (args.per_device_train_batch_size if _padding_free(vars(args)) else 1)
    return not (args.pad_to_multiple_of and args.pad_to_multiple_of >= longest)


def mark_lengths_dynamic(inputs: dict) -> None:
    """Under torch.compile, before the first step: the batch's lengths (the last dimension of each tensor: the
    sequence, and with padding-free batches the number of conversations in cu_seq_lens_*) are compiled as dynamic
    from the start. Otherwise torch compiles for the first batch's shapes and once more for each length it sees
    change: three compiles of the model in the first steps of a packed run, against one (TRL's loss tiles, past a
    graph break, still recompile once). A tiny packed bf16 LoRA run, 24 steps on this 2-core CPU with an empty compile
    cache: 100-105 s -> 72-80 s for the whole process."""
    import torch

    for value in inputs.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            torch._dynamo.maybe_mark_dynamic(value, value.dim() - 1)


def bound_max_lengths(inputs: dict, longest: int) -> None:
    """Under torch.compile, for padding-free batches: the length of the micro-batch's longest conversation
    (max_length_q/k, a Python int TRL 1.16's collator computes for each batch) raised to `longest`
    (training.max_length, which no packed conversation exceeds). The variable-length kernels (flash_attention_2,
    torch_varlen) use it only to size their grid of blocks, and the blocks past a conversation's end return at once;
    as an int that changes every step, it makes torch compile the whole model a second time, the first time it
    changes (then it is a symbol). tests/test_fastpath.py counts the compiles."""
    for key in ("max_length_q", "max_length_k"):
        if isinstance(inputs.get(key), int):
            inputs[key] = max(inputs[key], longest)


def describe(choices: list[Choice]) -> str:
    return ", ".join(choice.describe() for choice in choices)


def _set(training: dict, name: str, value, why: str) -> Choice:
    if name in training:
        return Choice(f"training.{name}", training[name], "", chosen=False)
    training[name] = value
    return Choice(f"training.{name}", value, why)


def _compile(training: dict, model, gpu: bool) -> tuple[bool, str]:
    if not gpu:
        return False, "a CPU run: compiling takes minutes"
    if model.load_in_4bit:
        return False, "not measured with 4-bit layers; set training.torch_compile: true to try"
    if uses_deepspeed(training) or uses_fsdp(training):
        return False, ("not measured under DeepSpeed or FSDP; set training.torch_compile: true to try (not under "
                       "ZeRO-3, where it fails)")
    return True, "CUDA: 2x faster LoRA steps measured on a 1B model"


def _liger(gpu: bool, installed: set[str]) -> tuple[bool, str]:
    if not gpu:
        return False, "GPU kernels"
    if "liger_kernel" not in installed:
        return False, "not installed: pip install -r requirements-gpu.txt"
    return True, "installed: fused norm, SwiGLU and RoPE kernels, less activation memory"


def _sixteen_bit_weights(model, training: dict, gpu: bool) -> bool:
    """Whether attention computes in 16 bits, as model.resolve_dtype will decide: model.dtype, or with `auto` bf16
    exactly when training.bf16 is on (by default where the GPU supports bf16; full fine-tuning then keeps float32
    weights, and autocast hands attention bf16 inputs); flash attention takes 16-bit inputs only."""
    if model.dtype not in (None, "auto"):
        return model.dtype != "float32"
    if "bf16" in training or training.get("fp16"):
        return bool(training.get("bf16"))
    return bf16_by_default(gpu)


def bf16_by_default(gpu: bool) -> bool:
    """training.bf16 where the config leaves out bf16 and fp16 (config._resolve_hardware_defaults sets it)."""
    import torch

    return gpu and torch.cuda.is_bf16_supported()


def _attention(model, gpu: bool, installed: set[str], packed: bool, sixteen_bit: bool) -> Choice:
    if model.attn_implementation is not None:
        return Choice("model.attn_implementation", model.attn_implementation, "", chosen=False)
    if gpu and sixteen_bit and "flash_attn" in installed:
        model.attn_implementation = "flash_attention_2"
        return Choice("model.attn_implementation", "flash_attention_2",
                      "flash-attn installed: variable-length kernels for packed batches")
    if gpu and sixteen_bit and model.allow_hub_kernels and "kernels" in installed:
        # without flash-attn, transformers 5.24 loads its build from the Hub (FLASH_ATTN_KERNEL_FALLBACK)
        model.attn_implementation = "flash_attention_2"
        return Choice("model.attn_implementation", "flash_attention_2",
                      "model.allow_hub_kernels: transformers loads it from the Hub's kernels-community; "
                      "variable-length kernels for packed batches")
    if not (gpu and packed):
        return Choice("model.attn_implementation", "sdpa", "transformers' default")
    way_out = "pip install kernels" if model.allow_hub_kernels else "set model.allow_hub_kernels: true"
    from sftkit.varlen import available as torch_varlen_available  # imports torch and transformers: only here

    if sixteen_bit and torch_varlen_available():
        way_out += ", or try model.attn_implementation: torch_varlen (PyTorch's own varlen kernel, not measured yet)"
    return Choice("model.attn_implementation", "sdpa",
                  "transformers' default; packed batches reach it with a mask, so no flash kernel and every token "
                  f"pair of the micro-batch is computed: pip install flash-attn, or {way_out}")


def _padding_free(training: dict) -> bool:
    """TRL 1.16's rule, on the config's values (bfd-requeue: TRL's deprecated name of bfd_split)."""
    return bool(training.get("padding_free") or (training.get("packing") and training.get("packing_strategy", "bfd")
                                                 in ("bfd", "bfd_split", "bfd-requeue")))
