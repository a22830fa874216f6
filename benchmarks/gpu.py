"""Training throughput on a GPU: a randomly initialised Llama of Llama-3.2-1B's shape, sequence length 2048, bf16.

    python benchmarks/gpu.py             # on a GPU: the variants below, a few minutes each
    python benchmarks/gpu.py --tiny      # anywhere (CI, a CPU): a tiny shape, so the script keeps working

Each variant runs in its own process for a fixed number of optimizer steps; tokens/s is measured after the warm-up
steps, from the Trainer's count of input tokens. Variants: LoRA and full fine-tuning; sftkit vs plain TRL with its
defaults (the baseline) and plain TRL given sftkit's settings (packing, Liger, compile, attention); sftkit with and
without packing (padding-free), Liger kernels, torch.compile, activation checkpointing, the best attention
implementation installed (flash_attention_2 when available, else sdpa), and micro-batch 4 against 8. The results
JSON names the device and the library versions, and each variant's seconds (start-up, compile and all).

MFU = achieved FLOP/s / the device's peak dense bf16 FLOP/s, with per-token FLOPs of
- full fine-tuning: 6 N (forward 2 N, backward 4 N) + attention 12 L s d (forward and backward of QK^T and AV);
- LoRA: 4 N (the frozen base's forward 2 N and the input-gradient half of its backward 2 N; no weight gradients)
  + the same attention term; the adapters' own FLOPs are below 1% and left out;
where N counts the parameters of the linear layers and embeddings-as-head, L layers, d hidden size, s tokens per
sample. Activation checkpointing recomputes the forward pass (another 2 N), which MFU does not credit.
"""

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
SHAPES = {
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 820},
}


def variants(attention: str) -> dict[str, dict]:
    """name -> (side, settings). The baseline is plain TRL: its defaults, no packing, no Liger; `trl-same-settings`
    is plain TRL given the settings of sftkit's fast variant."""
    fast = {"packing": "true", "use_liger_kernel": "true", "torch_compile": "true", "attn": attention,
            "gradient_checkpointing": "false"}
    table = {}
    for method in ("lora", "full"):
        table[f"{method}-baseline-trl"] = {"side": "baseline", "method": method}
        table[f"{method}-trl-same-settings"] = {"side": "baseline", "method": method, **fast}
        table[f"{method}-sftkit"] = {"side": "ours", "method": method, **fast}
        table[f"{method}-sftkit-no-compile"] = {**table[f"{method}-sftkit"], "torch_compile": "false"}
        table[f"{method}-sftkit-micro-batch-8"] = {**table[f"{method}-sftkit"], "micro_batch": 8}
        table[f"{method}-sftkit-no-packing"] = {**table[f"{method}-sftkit"], "packing": "false"}
        table[f"{method}-sftkit-no-liger"] = {**table[f"{method}-sftkit"], "use_liger_kernel": "false"}
        table[f"{method}-sftkit-checkpointing"] = {**table[f"{method}-sftkit"], "gradient_checkpointing": "true"}
        table[f"{method}-sftkit-sdpa"] = {**table[f"{method}-sftkit"], "attn": "sdpa"}
    return table


def build_model_and_data(shape: str, seq_len: int, rows: int, workdir: Path) -> tuple[Path, Path]:
    """A random-weight model with the tiny model's tokenizer, and chat rows of realistic, varied length."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-chat-llama")
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=seq_len, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model_dir = workdir / "model"
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # a 1B model initialises in seconds on a GPU
        model = LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    sample = [json.loads(line)["messages"] for line in (ROOT / "data" / "sample_chat.jsonl").read_text().splitlines()]
    data_file = workdir / "chat.jsonl"
    with data_file.open("w") as out:
        for index in range(rows):  # 1 to ~40 conversations chained into one: from a few dozen to ~2000 tokens
            turns = [m for k in range(1 + (index * 7919) % 40) for m in sample[(index + k) % len(sample)] if m["role"] != "system"]
            out.write(json.dumps({"messages": turns}) + "\n")
    return model_dir, data_file


def run_variant(spec: dict, model_dir: str, data_file: str, seq_len: int, steps: int, warmup: int) -> dict:
    """One variant in this process: train `steps` steps, time the ones after `warmup`."""
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start = (time.perf_counter(), state.num_input_tokens_seen)
            self.end = (time.perf_counter(), state.num_input_tokens_seen)

    meter = Meter()
    common = {"max_steps": steps, "per_device_train_batch_size": spec.get("micro_batch", 4), "learning_rate": 1e-4,
              "logging_steps": 1000, "save_strategy": "no", "report_to": "none",
              "include_num_input_tokens_seen": "non_padding", "output_dir": tempfile.mkdtemp(),
              "dataset_num_proc": min(os.cpu_count() or 1, 8)}  # both sides tokenize in parallel
    if spec["side"] == "baseline":
        trainer = _baseline_trainer(spec, model_dir, data_file, seq_len, common)
    else:
        trainer = _sftkit_trainer(spec, model_dir, data_file, seq_len, common)
    trainer.add_callback(meter)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds, tokens = meter.end[0] - meter.start[0], meter.end[1] - meter.start[1]
    config = trainer.model.config
    return {
        "tokens_per_second": tokens / seconds,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
        "flops_per_token": flops_per_token(config, seq_len, spec["method"]),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }


def _sftkit_trainer(spec, model_dir, data_file, seq_len, common):
    from trl import SFTTrainer

    from sftkit.config import load_config
    from sftkit.data import prepare_data
    from sftkit.model import load_model, load_tokenizer, lora_config, resolve_dtype

    overrides = ["--model.path", model_dir, "--dataset.name", data_file, "--model.max_seq_length", str(seq_len),
                 "--model.use_lora", str(spec["method"] == "lora").lower(), "--model.attn_implementation", spec["attn"],
                 "--dataset.test_size", "null"]
    for key in FAST_SETTINGS:
        overrides += [f"--training.{key}", spec[key]]
    for key, value in common.items():
        overrides += [f"--training.{key}", str(value)]
    config = load_config("default_train_config.yaml", overrides)
    tokenizer = load_tokenizer(config.model, config.dataset)
    data = prepare_data(config.dataset, tokenizer, config.training.max_length,
                        num_proc=config.training.dataset_num_proc)
    model = load_model(config.model, resolve_dtype(config.model, config.training), config.training.gradient_checkpointing)
    return SFTTrainer(model=model, args=config.training, train_dataset=data.train, processing_class=tokenizer,
                      peft_config=lora_config(config.model))


def _baseline_trainer(spec, model_dir, data_file, seq_len, common):
    import torch
    from baseline_trl import to_prompt_completion
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    same = {key: spec[key] == "true" for key in FAST_SETTINGS if key in spec}  # trl-same-settings
    args = SFTConfig(max_length=seq_len, bf16=gpu and torch.cuda.is_bf16_supported(), use_cpu=not gpu, **same,
                     **common)
    dataset = load_dataset("json", data_files=data_file, split="train")
    dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                                                 attn_implementation=spec.get("attn"))
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if spec["method"] == "lora" else None
    return SFTTrainer(model=model, args=args, train_dataset=dataset,
                      processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft)


FAST_SETTINGS = ("packing", "use_liger_kernel", "torch_compile", "gradient_checkpointing")
GPU_EXTRAS = ("liger-kernel", "flash-attn")  # requirements-gpu.txt


def library_versions() -> dict[str, str]:
    from sftkit.environment import STACK

    versions = {}
    for name in (*STACK, *GPU_EXTRAS):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def flops_per_token(config, seq_len: int, method: str) -> float:
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * d // config.num_attention_heads
    per_layer = d * d * 2 + d * kv * 2 + 3 * d * config.intermediate_size  # q, o, k, v, gate/up/down
    n = layers * per_layer + config.vocab_size * d
    attention = 12 * layers * seq_len * d / 2  # causal: half of the s x s scores are computed
    return (6 if method == "full" else 4) * n + attention


def peak_flops(device: str) -> float | None:
    return next((tflops * 1e12 for name, tflops in PEAK_BF16_TFLOPS.items() if name in device), None)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny shape on any device (what CI runs)")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    seq_len, steps, warmup, rows = (128, 6, 2, 64) if args.tiny else (2048, 30, 10, 2000)
    if args.run:
        spec = json.loads(args.spec)
        print("RESULT " + json.dumps(run_variant(spec, spec["model_dir"], spec["data_file"], seq_len, steps, warmup)))
        return {}

    import torch

    gpu = torch.cuda.is_available()
    attention = "flash_attention_2" if gpu and _flash_attention_installed() else "sdpa"
    table = variants(attention)
    if args.tiny:  # no Liger and no compiling on a CPU; one variant of each side keeps the script working
        table = {name: {**spec, "use_liger_kernel": "false", "torch_compile": "false"} for name, spec in table.items()
                 if name in ("lora-trl-same-settings", "lora-sftkit-no-liger")}
    if args.only:
        table = {name: spec for name, spec in table.items() if name in args.only}
    with tempfile.TemporaryDirectory() as workdir:
        model_dir, data_file = build_model_and_data("tiny" if args.tiny else "llama-3.2-1b", seq_len, rows, Path(workdir))
        results = {}
        for name, spec in table.items():
            spec = {**spec, "model_dir": str(model_dir), "data_file": str(data_file)}
            command = [sys.executable, __file__, "--run", name, "--spec", json.dumps(spec)] + (["--tiny"] if args.tiny else [])
            started = time.perf_counter()
            output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            elapsed = time.perf_counter() - started
            line = next((l for l in output.stdout.splitlines() if l.startswith("RESULT ")), None)
            if line is None:
                results[name] = {"error": output.stderr.strip().splitlines()[-1] if output.stderr.strip() else "no result"}
                continue
            result = json.loads(line[len("RESULT "):])
            peak = peak_flops(result["device"])
            result["mfu"] = result["tokens_per_second"] * result["flops_per_token"] / peak if peak else None
            results[name] = {**result, "variant_seconds": elapsed}
    report = {"device": torch.cuda.get_device_name(0) if gpu else "cpu (no GPU available)", "seq_len": seq_len,
              "steps": steps, "warmup_steps": warmup, "attention": attention, "versions": library_versions(),
              "variants": results}
    print(json.dumps(report, indent=2))
    Path(args.results).mkdir(parents=True, exist_ok=True)
    name = "gpu-tiny" if args.tiny else "gpu"
    (Path(args.results) / f"{time.strftime('%Y-%m-%d')}-{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _flash_attention_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


if __name__ == "__main__":
    main()
