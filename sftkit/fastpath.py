"""The fast path on a GPU: what a run turns on when its config leaves the setting out, and why.

Each choice is made once, from the config and the machine, before SFTConfig is built; the run and the dry run print
them on one line (`speed`). A setting given in the config is always kept as given.

What was measured, and where (issue 13, one H200, a Llama-3.2-1B-shape model, sequence 2,048, micro-batch 4, bf16):
packing + Liger took LoRA from 7.7k to 19.5k tokens/s (Liger alone 18.2k -> 19.5k, and 3 GiB less at peak), and
torch.compile halved LoRA's step time (0.59 s -> 0.30 s). Not measured yet, so left off by default: compile under
DeepSpeed or FSDP, and with 4-bit layers; the attention kernels side by side.
"""

import importlib.util
from dataclasses import dataclass

# Packed, padding-free batches are one sequence of a different length every step, and each new length is a new
# shape for torch.compile. TRL's collator pads that sequence to a multiple of this (labels -100, so no token more
# trains): fewer shapes, fewer recompiles, at most 63 padded tokens a step.
PACKED_LENGTH_MULTIPLE = 64


@dataclass
class Choice:
    key: str  # the config key, e.g. "training.torch_compile"
    value: object
    why: str
    chosen: bool = True  # False: the config set it

    def describe(self) -> str:
        value = ("on" if self.value else "off") if isinstance(self.value, bool) else self.value
        return f"{self.key.split('.')[-1]} {value} ({self.why if self.chosen else 'set in the config'})"


def choose(training: dict, model, gpu: bool, installed=None) -> list[Choice]:
    """Fill in the fast-path settings the config leaves out: `training` (the config's training values, as given)
    gets torch_compile, use_liger_kernel and pad_to_multiple_of, `model` its attn_implementation. `installed`: the
    importable packages among flash_attn and liger_kernel (found here when None)."""
    if installed is None:
        installed = {name for name in ("flash_attn", "liger_kernel") if importlib.util.find_spec(name)}
    choices = [
        _set(training, "torch_compile", *_compile(training, model, gpu)),
        _set(training, "use_liger_kernel", *_liger(gpu, installed)),
        _attention(model, gpu, installed),
    ]
    packed = training.get("padding_free") or (training.get("packing") and training.get("packing_strategy", "bfd")
                                              in ("bfd", "bfd_split"))
    if training.get("torch_compile") and packed and "pad_to_multiple_of" not in training:
        training["pad_to_multiple_of"] = PACKED_LENGTH_MULTIPLE
        choices.append(Choice("training.pad_to_multiple_of", PACKED_LENGTH_MULTIPLE,
                              "packed batches rounded up, so that compiled shapes repeat"))
    return choices


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
    if _deepspeed_or_fsdp(training):
        return False, "not measured under DeepSpeed or FSDP; set training.torch_compile: true to try"
    return True, "CUDA: 2x faster LoRA steps measured on a 1B model"


def _liger(gpu: bool, installed: set[str]) -> tuple[bool, str]:
    if not gpu:
        return False, "GPU kernels"
    if "liger_kernel" not in installed:
        return False, "not installed: pip install -r requirements-gpu.txt"
    return True, "installed: fused linear cross-entropy, no full-vocabulary logits in memory"


def _attention(model, gpu: bool, installed: set[str]) -> Choice:
    if model.attn_implementation is not None:
        return Choice("model.attn_implementation", model.attn_implementation, "", chosen=False)
    if gpu and "flash_attn" in installed and model.dtype not in ("float32",):
        model.attn_implementation = "flash_attention_2"
        return Choice("model.attn_implementation", "flash_attention_2",
                      "flash-attn installed: variable-length kernels for packed batches")
    hint = "; pip install flash-attn for packed batches" if gpu else ""
    return Choice("model.attn_implementation", "sdpa", f"transformers' default{hint}")


def _deepspeed_or_fsdp(training: dict) -> bool:
    """From training.deepspeed or training.fsdp, or from the Accelerate config of the launch."""
    from accelerate.utils import parse_flag_from_env

    return bool(training.get("deepspeed") or training.get("fsdp") or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
                or parse_flag_from_env("ACCELERATE_USE_FSDP"))
