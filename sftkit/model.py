"""Tokenizer, dtype, 4-bit quantization and the LoRA config."""

import dataclasses
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from sftkit.config import ConfigError, DatasetConfig, ModelConfig, resolve_path
from sftkit.data.tokenize import CHATML_TEMPLATE


def load_tokenizer(model_cfg: ModelConfig, dataset_cfg: DatasetConfig):
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_path(model_cfg.path), revision=model_cfg.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if dataset_cfg.chat_template:
        tokenizer.chat_template = _read_template(dataset_cfg.chat_template)
    elif tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    ensure_distinct_pad_token(tokenizer)
    return tokenizer


def ensure_distinct_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token other than eos (TRL would pad with eos when there is none).

    With pad == eos, anything that masks padding by token id also masks the eos that ends every reply, and the
    model never learns to stop. Our labels are padded by position, but the saved tokenizer is used elsewhere too.
    An existing token is reused (padding only fills positions the attention mask hides), so the vocabulary and
    the embeddings stay as they are.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    candidates = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", tokenizer.unk_token]
    for token in candidates:
        if token in vocab and vocab[token] != tokenizer.eos_token_id:
            tokenizer.pad_token = token
            return
    raise ConfigError(
        f"the tokenizer of {tokenizer.name_or_path} has no pad token other than its eos {tokenizer.eos_token!r}, "
        "which ends every reply; add one (tokenizer.add_special_tokens({'pad_token': '<pad>'}), then save it "
        "with the model) and point model.path at that copy"
    )


def _read_template(value: str) -> str:
    path = Path(resolve_path(value))
    return path.read_text() if path.is_file() else value


def resolve_dtype(model_cfg: ModelConfig, training) -> torch.dtype:
    """model.dtype, or by default bf16 weights for a bf16 run and fp32 otherwise (fp16 AMP needs fp32 weights)."""
    if model_cfg.dtype in (None, "auto"):
        return torch.bfloat16 if training.bf16 else torch.float32
    return getattr(torch, model_cfg.dtype)


def load_model(model_cfg: ModelConfig, dtype: torch.dtype, gradient_checkpointing: bool, quantize: bool | None = None):
    """The base model; 4-bit NF4 and prepared for k-bit training when model.load_in_4bit (unless quantize=False)."""
    quantize = model_cfg.load_in_4bit if quantize is None else quantize
    kwargs = {
        "dtype": dtype,
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "attn_implementation": model_cfg.attn_implementation,
    }
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,  # ZeRO-3 can only shard 4-bit weights stored in the compute dtype
        )
    model = AutoModelForCausalLM.from_pretrained(resolve_path(model_cfg.path), **kwargs)
    if quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        _keep_cpu_4bit_layout_trainable(model)
    return model


def _keep_cpu_4bit_layout_trainable(model) -> None:
    """bitsandbytes' CPU backend repacks a 4-bit weight into an inference layout on its first forward in eval mode
    (an evaluation, a sample reply) and does not unpack it when training resumes; the gradients are wrong from then
    on (measured with bitsandbytes 0.50.2: grad norm 0.7 instead of 10, and the loss doubled after one evaluation).
    bitsandbytes has no switch for this, so the flag that enables the repacking is turned off."""
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def lora_config(model_cfg: ModelConfig) -> LoraConfig | None:
    if not model_cfg.use_lora:
        return None
    return LoraConfig(**dataclasses.asdict(model_cfg.lora_config))


@contextmanager
def zero3_init_disabled():
    """While a ZeRO-3 config is registered, from_pretrained partitions the weights across all processes, which
    would deadlock the main process merging alone (and from_config would allocate a meta-device model in full);
    transformers has no switch for this, so unregister it briefly."""
    from transformers.integrations import deepspeed as hf_deepspeed

    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered
