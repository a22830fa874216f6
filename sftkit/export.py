"""Save what a run produced: the LoRA adapter and a merged model, or the full model; tokenizer and config beside.

Everything is first written to a staging directory inside output_dir and moved into place at the end, config.json
last, so an interrupted export never leaves a directory that loads as if it were complete.
"""

import importlib.metadata
import json
import platform
import shutil
from pathlib import Path

import yaml

ADAPTER_DIR = "lora_weights"
STAGING_DIR = ".export-incomplete"
RUN_CONFIG_FILE = "sftkit_config.yaml"
VERSIONS_FILE = "sftkit_versions.json"
STACK = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "bitsandbytes")
# Files of an earlier export that would otherwise mix with the new one.
STALE_PATTERNS = ("config.json", "model*.safetensors*", "pytorch_model*", "adapter_*", "generation_config.json")


def export(trainer, run_config, tokenizer, dtype) -> Path:
    """Save the trained model; every process must call this (under ZeRO-3 saving gathers from all of them)."""
    output_dir = Path(trainer.args.output_dir)
    staging = output_dir / STAGING_DIR
    if trainer.accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    if run_config.model.use_lora:
        trainer.save_model(str(staging / ADAPTER_DIR))
        if trainer.accelerator.is_main_process:
            _merge_adapter(run_config.model, staging / ADAPTER_DIR, staging, dtype)
    else:
        trainer.save_model(str(staging))
    if trainer.accelerator.is_main_process:
        tokenizer.save_pretrained(staging)
        (staging / RUN_CONFIG_FILE).write_text(yaml.safe_dump(run_config.resolved, sort_keys=False))
        (staging / VERSIONS_FILE).write_text(json.dumps(library_versions(), indent=2) + "\n")
        _publish(staging, output_dir)
    trainer.accelerator.wait_for_everyone()
    return output_dir


def _merge_adapter(model_cfg, adapter_dir: Path, target: Path, dtype) -> None:
    """Merge the saved adapter into a fresh, unquantized copy of the base (never into dequantized 4-bit weights)."""
    from peft import PeftModel

    from sftkit.model import load_model, zero3_init_disabled

    with zero3_init_disabled():
        base = load_model(model_cfg, dtype, gradient_checkpointing=False, quantize=False)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(target)


def _publish(staging: Path, output_dir: Path) -> None:
    for pattern in STALE_PATTERNS:
        for stale in output_dir.glob(pattern):
            stale.unlink()
    if (staging / ADAPTER_DIR).exists() and (output_dir / ADAPTER_DIR).exists():
        shutil.rmtree(output_dir / ADAPTER_DIR)
    for item in sorted(staging.iterdir(), key=lambda path: path.name == "config.json"):
        target = output_dir / item.name
        if target.is_file():
            target.unlink()
        item.rename(target)
    staging.rmdir()


def saved_dtypes(directory: Path) -> list[str]:
    """The dtypes of the weights actually written (read from the safetensors headers, not from config.json)."""
    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    dtypes = set()
    for file in directory.glob("model*.safetensors"):
        with safe_open(file, "pt") as weights:
            dtypes.update(names.get(weights.get_slice(key).get_dtype(), "other") for key in weights.keys())
    return sorted(dtypes)


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in STACK:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions
