"""Two-process runs through `accelerate launch` on the CPU (gloo): DDP, ZeRO-2, ZeRO-3, with complete saves.

Each is compared with a single-process run of the same config and the same global batch (2 x 8 = 1 x 16 rows).
The mean train loss over the run must agree within 1%. Both see the same rows in the same order and the Trainer
normalises the loss by the token count of all processes together, so the two are the same sum computed in a
different order: measured here, 0.00% apart for full and LoRA runs and 0.02% for QLoRA. 1% leaves room for other
CPUs' summation order while still catching a launch that silently trains on fewer rows (one seen while building
this, where each process believed it was alone, was 8% off).
"""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftkit.config import load_config
from sftkit.train import train

pytestmark = pytest.mark.slow
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
STEPS = ["--training.max_steps", "10", "--training.logging_steps", "5"]
PROMPTS = [[{"role": "user", "content": "What is the capital of Norway?"}, {"role": "assistant", "content": "Oslo."}]]


def accelerate_launch(accelerate_config: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    command = [ACCELERATE, "launch", "--config_file", f"accelerate_configs/{accelerate_config}", "sft.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def single_process_loss(tmp_path, config: str) -> float:
    config = load_config(config, ["--training.output_dir", str(tmp_path / "single"), "--training.per_device_train_batch_size", "16", *STEPS])
    return train(config).summary["train_loss_mean"]


def logits(model, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(PROMPTS[0], tokenize=False)
    with torch.no_grad():
        return model.eval()(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits


def assert_complete_model(out: Path):
    """Every tensor has the base model's shape and the training precision (none empty, none silently 16-bit)."""
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL).state_dict()
    with safe_open(out / "model.safetensors", "pt") as saved:
        shapes = {key: tuple(saved.get_slice(key).get_shape()) for key in saved.keys()}
        dtypes = {saved.get_slice(key).get_dtype() for key in saved.keys()}
    assert shapes == {key: tuple(tensor.shape) for key, tensor in base.items() if key != "lm_head.weight"}
    assert dtypes == {"F32"}


@pytest.mark.parametrize(
    ("accelerate_config", "config"),
    [
        ("cpu_ddp_2proc.yaml", "default_train_config.yaml"),
        ("cpu_zero2_2proc.yaml", "lora_train_config.yaml"),
        ("cpu_zero3_2proc.yaml", "lora_train_config.yaml"),
        ("cpu_zero3_2proc.yaml", "default_train_config.yaml"),
        ("cpu_zero3_2proc.yaml", "qlora_train_config.yaml"),
    ],
    ids=["ddp-full", "zero2-lora", "zero3-lora", "zero3-full", "zero3-qlora"],
)
def test_two_processes_train_like_one_and_save_complete_models(tmp_path, accelerate_config, config):
    import json

    out = tmp_path / "out"
    started = time.perf_counter()
    result = accelerate_launch(accelerate_config, "--config", config, "--training.output_dir", str(out),
                               "--training.per_device_train_batch_size", "8", *STEPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    print(f"{accelerate_config} {config}: {time.perf_counter() - started:.1f} s")
    assert result.stdout.count("Run summary") == 1, "only the main process prints the summary"
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 10 and summary["saved_dtypes"] == ["float32"]

    assert_complete_model(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    merged = AutoModelForCausalLM.from_pretrained(out)
    if "lora" in config:
        with safe_open(out / "lora_weights" / "adapter_model.safetensors", "pt") as adapter:
            lora = {key: adapter.get_slice(key).get_shape() for key in adapter.keys()}
        assert len(lora) == 2 * 7 * 4 and all(0 not in shape and shape for shape in lora.values())
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), out / "lora_weights")
        assert (logits(merged, tokenizer) - logits(with_adapter, tokenizer)).abs().max().item() < 1e-4

    single = single_process_loss(tmp_path, config)
    relative = abs(summary["train_loss_mean"] - single) / single
    print(f"loss: 2 processes {summary['train_loss_mean']:.4f}, 1 process {single:.4f}, difference {relative:.2%}")
    assert relative < 0.01


def test_a_config_error_in_a_distributed_launch_is_printed_once():
    result = accelerate_launch("cpu_zero2_2proc.yaml", "--model.use_lorra", "true", timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("unknown key model.use_lorra (did you mean 'use_lora'?)") == 1, result.stderr


def test_a_failure_on_one_process_ends_the_launch(tmp_path):
    """The main process alone fails to write its output; the other must not wait for it forever."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    started = time.perf_counter()
    result = accelerate_launch("cpu_ddp_2proc.yaml", "--training.output_dir", str(blocker / "out"), *STEPS, timeout=300)
    assert result.returncode != 0
    assert time.perf_counter() - started < 120


def test_training_deepspeed_without_a_gpu_stops_early_with_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, where training.deepspeed works")
    result = accelerate_launch("cpu_ddp_2proc.yaml", "--training.deepspeed", "deepspeed_configs/zero2.json", timeout=120)
    assert result.returncode != 0
    assert result.stderr.count("training.deepspeed needs GPUs") == 1, result.stderr[-3000:]
    assert "AssertionError" not in result.stderr

