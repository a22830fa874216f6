"""Training throughput and memory on a GPU: randomly initialised models of real shapes (Llama-3.2-1B at sequence
2,048 in bf16; the shipped examples' models: Llama-3.1-8B under QLoRA, TinyLlama-1.1B, Qwen2.5-1.5B).

    python benchmarks/gpu.py                      # on a GPU: the core set (CORE), in order, within --budget
    python benchmarks/gpu.py --all                # every variant below, the core set first
    python benchmarks/gpu.py --only lora-sftkit   # some of them
    python benchmarks/gpu.py --tiny               # anywhere (CI, a CPU): a tiny shape, so the script keeps working
    python benchmarks/gpu.py --table results.json # the table of an earlier results file

Each variant runs in its own process for a fixed number of optimizer steps; tokens/s is measured after the warm-up
steps, from the Trainer's count of input tokens. The core set: attention alone on the benchmark's packed
micro-batches (benchmarks/attention.py: the SDPA backend PyTorch picks for them, and sdpa's time against
torch_varlen's, in seconds); LoRA and full fine-tuning, sftkit against plain TRL
with its defaults (the baseline) and against plain TRL given sftkit's settings (packing, Liger, compile, attention),
sftkit with PyTorch's own variable-length attention (model.attn_implementation: torch_varlen) in place of sdpa, and
the 8B QLoRA example as shipped. The rest: the other examples as shipped; a profile of three LoRA steps (the
kernels that take the GPU's time); sftkit with and without torch.compile, Liger kernels, packing (padding-free),
activation checkpointing, PEFT's float32 copies of the adapter inputs, flex_attention in place of the default
attention, micro-batch 4 against 8, and packed micro-batches padded to one static shape; the 8B example at
micro-batch 4 without Liger, as issue 13 first measured it. Each sftkit variant also records the dry run's memory
estimate for its settings beside the peak measured.

The results JSON names the device and the library versions, and each variant's seconds (in all, and split into
setup, warm-up steps with any compiling, and measured steps); it is rewritten after every variant, and a variant that
would start after --budget seconds is skipped and says so, so one call on a lent GPU returns what it measured even
when it runs out of time. The table beside it (.md, also printed) sets each variant against both baselines.

MFU = achieved FLOP/s / the device's peak dense bf16 FLOP/s, with per-token FLOPs of
- full fine-tuning: 6 N (forward 2 N, backward 4 N) + attention 12 L s d (forward and backward of QK^T and AV);
- LoRA: 4 N (the frozen base's forward 2 N and the input-gradient half of its backward 2 N; no weight gradients)
  + the same attention term; the adapters' own FLOPs are below 1% and left out;
where N counts the parameters of the linear layers and embeddings-as-head, L layers, d hidden size, s tokens per
sample. Activation checkpointing recomputes the forward pass (another 2 N), which MFU does not credit.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STARTED = time.perf_counter()  # in a variant's own process: its setup time counts from here
sys.path.insert(0, str(ROOT))
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
SHAPES = {  # each real model's architecture and sizes, from its config.json on the Hub
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    "llama-3.1-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": False},
    "tinyllama-1.1b": {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
                       "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000,
                       "tie_word_embeddings": False},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                     "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "tiny": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 820, "tie_word_embeddings": True},
}


def variants(attention: str) -> dict[str, dict]:
    """name -> settings, the most telling first (the budget cuts from the end); the first CORE ones run by default.
    The baseline is plain TRL: its defaults, no packing, no Liger; `trl-same-settings` is plain TRL given the settings
    of sftkit's fast variant. A variant with a `config` trains that shipped example as it is (one micro-batch a step:
    the same peak memory and tokens/s as its accumulation, in a fraction of the time)."""
    fast = {"packing": "true", "use_liger_kernel": "true", "torch_compile": "true", "attn": attention,
            "gradient_checkpointing": "false"}
    table = {"attention-kernels": {"side": "attention", "method": "attention"}}  # benchmarks/attention.py, seconds
    for method in ("lora", "full"):
        table[f"{method}-baseline-trl"] = {"side": "baseline", "method": method}
        table[f"{method}-sftkit"] = {"side": "ours", "method": method, **fast}
        # PyTorch's own varlen kernel (sftkit/varlen.py): each packed conversation attends only to itself
        table[f"{method}-sftkit-torch-varlen"] = {**table[f"{method}-sftkit"], "attn": "torch_varlen"}
    table["qlora-8b-example"] = example("llama3.1_8b_qlora.yaml", "qlora", "llama-3.1-8b", steps=8, warmup=3)
    lora = table["lora-sftkit"]
    table["lora-trl-same-settings"] = {**lora, "side": "baseline"}
    table["tinyllama-1.1b-lora-example"] = example("tinyllama_1.1b_chat_lora.yaml", "lora", "tinyllama-1.1b")
    table["qwen2.5-1.5b-full-example"] = example("qwen2.5_1.5b_full.yaml", "full", "qwen2.5-1.5b")
    table["lora-sftkit-profile"] = {**lora, "profile": True}  # where the GPU time of three steps goes
    # compiling each decoder layer once instead of the whole model (Accelerate's regional compilation): less time
    # compiling, perhaps less speed; users turn it on with ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=1
    table["lora-sftkit-regional-compile"] = {**lora, "regional_compile": True}
    table["qlora-8b-example-compile"] = {**table["qlora-8b-example"], "torch_compile": "true"}  # off by default
    # sftkit trains full fine-tuning in bf16 with float32 weights (model.weights_dtype): the fair baseline does too
    table["full-trl-same-settings"] = {**table["full-sftkit"], "side": "baseline", "float32_weights": True}
    table["full-sftkit-bf16-weights"] = {**table["full-sftkit"], "dtype": "bfloat16"}  # pure bf16: half the states
    for method in ("lora", "full"):
        ours = table[f"{method}-sftkit"]
        table[f"{method}-sftkit-no-compile"] = {**ours, "torch_compile": "false"}
        table[f"{method}-sftkit-torch-varlen-no-compile"] = {**ours, "attn": "torch_varlen", "torch_compile": "false"}
        table[f"{method}-sftkit-flex-attention"] = {**ours, "attn": "flex_attention"}
    if attention != "sdpa":
        table["lora-sftkit-sdpa"] = {**lora, "attn": "sdpa"}
    table["lora-sftkit-adapter-input-casts"] = {**lora, "cast_adapter_inputs": "true"}
    table["lora-sftkit-no-liger"] = {**lora, "use_liger_kernel": "false"}
    table["lora-sftkit-micro-batch-8"] = {**lora, "micro_batch": 8}
    table["lora-sftkit-checkpointing"] = {**lora, "gradient_checkpointing": "true"}
    table["lora-sftkit-no-packing"] = {**lora, "packing": "false"}
    # every micro-batch padded to 4 x 2,048: one static shape for the compiler, against the default rounding to 64
    table["lora-sftkit-one-shape"] = {**lora, "pad_to_multiple_of": "8192"}
    # the dry run's calibration point: the 8B example as measured in issue 13 (micro-batch 4, no Liger)
    table["qlora-8b-example-micro-batch-4"] = {**table["qlora-8b-example"], "micro_batch": 4,
                                               "use_liger_kernel": "false"}
    return table


# Measured on one H100 with 16 cores (2026-11-27), before the torch-varlen variants: the two baselines, sftkit's two
# runs and the 8B example took 412 s in their own processes; the call took 537 s in all, 66 s of them in the fair
# baseline it stopped at the budget (it took 100 s in a call of its own). So the core set takes two calls of the
# default budget; the rest run with --all or --only.
CORE = ("attention-kernels", "lora-baseline-trl", "lora-sftkit", "lora-sftkit-torch-varlen", "full-baseline-trl", "full-sftkit",
        "full-sftkit-torch-varlen", "qlora-8b-example", "lora-trl-same-settings")


def example(config: str, method: str, shape: str, steps: int = 20, warmup: int = 6) -> dict:
    return {"side": "ours", "method": method, "shape": shape, "config": f"examples/{config}", "steps": steps,
            "warmup": warmup, "gradient_accumulation_steps": 1}


def build_model(shape: str, seq_len: int, directory: Path) -> Path:
    """A random-weight bf16 model of `shape` (its architecture and sizes) with the tiny model's tokenizer, built on
    the GPU (an 8B model initialises in seconds there) and saved, so each variant loads it the way a run loads a real
    one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "data" / "tiny-chat-llama")
    config = AutoConfig.for_model(**SHAPES[shape], max_position_embeddings=max(seq_len, 4096),
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return directory


def build_data(rows: int, data_file: Path) -> Path:
    """Chat rows of realistic, varied length, from the sample data."""
    sample = [json.loads(line)["messages"] for line in (ROOT / "data" / "sample_chat.jsonl").read_text().splitlines()]
    with data_file.open("w") as out:
        for index in range(rows):  # 1 to ~40 conversations chained into one: from a few dozen to ~2000 tokens
            turns = [m for k in range(1 + (index * 7919) % 40) for m in sample[(index + k) % len(sample)] if m["role"] != "system"]
            out.write(json.dumps({"messages": turns}) + "\n")
    return data_file


def run_variant(spec: dict, model_dir: str, data_file: str, seq_len: int, steps: int, warmup: int) -> dict:
    """One variant in this process: train `steps` steps (or the variant's own), time the ones after `warmup`."""
    import torch
    from transformers import TrainerCallback

    class Meter(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup:
                self.start = (time.perf_counter(), state.num_input_tokens_seen)
            if state.global_step <= steps:  # not the profiled steps
                self.end = (time.perf_counter(), state.num_input_tokens_seen)

    steps, warmup = spec.get("steps", steps), spec.get("warmup", warmup)
    if spec.get("regional_compile"):  # read by Accelerate's TorchDynamoPlugin when the Trainer builds it
        os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "1"
    meter = Meter()
    profile = profile_callback(steps) if spec.get("profile") else None
    common = {"max_steps": steps + (PROFILED_STEPS if profile else 0), "learning_rate": 1e-4, "logging_steps": 1000, "save_strategy": "no",
              "eval_strategy": "no", "report_to": "none", "include_num_input_tokens_seen": "non_padding",
              "output_dir": tempfile.mkdtemp(),
              "dataset_num_proc": min(os.cpu_count() or 1, 8)}  # both sides tokenize in parallel
    if "config" not in spec or "micro_batch" in spec:  # a shipped example keeps its own
        common["per_device_train_batch_size"] = spec.get("micro_batch", 4)
    if "gradient_accumulation_steps" in spec:
        common["gradient_accumulation_steps"] = spec["gradient_accumulation_steps"]
    estimate = None
    if spec["side"] == "baseline":
        trainer = _baseline_trainer(spec, model_dir, data_file, seq_len, common)
    else:
        trainer, estimate = _sftkit_trainer(spec, model_dir, data_file, seq_len, common)
    trainer.add_callback(meter)
    if profile:
        trainer.add_callback(profile)
    gpu = torch.cuda.is_available()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    from torch._dynamo.utils import counters

    seconds, tokens = meter.end[0] - meter.start[0], meter.end[1] - meter.start[1]
    config = trainer.model.config
    return {
        "tokens_per_second": tokens / seconds,
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if gpu else None,
        "dry_run_estimate_gib": estimate,
        "flops_per_token": flops_per_token(config, trainer.args.max_length, spec["method"]),
        "device": torch.cuda.get_device_name(0) if gpu else "cpu",
        "method": spec["method"],
        # where a variant's time goes: loading and preparing, the warm-up steps (compiling), the measured steps
        "seconds": {"setup": meter.begin - STARTED, "warmup_steps": meter.start[0] - meter.begin, "measured": seconds},
        "compiled_graphs": counters["stats"]["unique_graphs"],  # each compile and recompile of a graph
        **({"profile": profile.top_kernels} if profile else {}),
    }


PROFILED_STEPS = 3


def profile_callback(after: int, steps: int = PROFILED_STEPS, top: int = 12):
    """torch.profiler over `steps` more steps after step `after` (past the timed ones, which the profiler would slow
    down): the kernels (the operators, without a GPU) that took the most device time, each with its share of it.
    Issue 13's profile put 53% of the GPU time in attention."""
    import torch
    from transformers import TrainerCallback

    gpu = torch.cuda.is_available()
    activities = [torch.profiler.ProfilerActivity.CUDA if gpu else torch.profiler.ProfilerActivity.CPU]

    class Profile(TrainerCallback):
        profiler, top_kernels = None, []

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == after and self.profiler is None and not self.top_kernels:
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is None or state.global_step < after + steps:
                return
            if gpu:
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            events = self.profiler.key_averages()
            self.profiler = None
            times = {e.key: e.self_device_time_total if gpu else e.self_cpu_time_total for e in events}
            total = sum(times.values()) or 1
            self.top_kernels = [{"name": name[:120], "share": t / total}
                                for name, t in sorted(times.items(), key=lambda item: -item[1])[:top]]

    return Profile()


def _sftkit_trainer(spec, model_dir, data_file, seq_len, common):
    """sftkit's own trainer on its own config (the variant's settings as overrides), and the dry run's memory
    estimate for those settings (what --dry-run prints, from the same model shape and micro-batch)."""
    from sftkit.config import load_config
    from sftkit.data import prepare_data
    from sftkit.model import check_model_source, load_model, load_tokenizer, lora_config, resolve_dtype, weights_dtype
    from sftkit.monitor import MonitoredSFTTrainer
    from sftkit.plan import estimate_memory, model_shape, sharding, tokens_per_micro_batch

    overrides = ["--model.path", model_dir, "--dataset.name", data_file, "--dataset.split", "train",
                 "--dataset.eval_split", "null", "--dataset.test_size", "null"]
    if "config" not in spec:  # the 1B variants: the default config at the benchmark's shape
        overrides += ["--model.use_lora", str(spec["method"] == "lora").lower()]
    if "config" not in spec or spec.get("tiny"):
        overrides += ["--model.max_seq_length", str(seq_len)]
    for key, setting in (("attn", "model.attn_implementation"), ("cast_adapter_inputs", "model.cast_adapter_inputs"),
                         ("dtype", "model.dtype"),
                         *((key, f"training.{key}") for key in (*FAST_SETTINGS, "pad_to_multiple_of"))):
        if key in spec:
            overrides += [f"--{setting}", spec[key]]
    for key, value in common.items():
        overrides += [f"--training.{key}", str(value)]
    config = load_config(spec.get("config", "default_train_config.yaml"), overrides)
    args = config.training
    tokenizer = load_tokenizer(config.model, config.dataset)
    data = prepare_data(config.dataset, tokenizer, args.max_length, num_proc=args.dataset_num_proc)
    dtype = resolve_dtype(config.model, args)
    shape = model_shape(config, check_model_source(config.model))
    memory = estimate_memory(config, shape, dtype, sharding(args, 1), 1, tokens_per_micro_batch(args, data.lengths))
    model = load_model(config.model, weights_dtype(config.model, args, dtype), args.gradient_checkpointing)
    trainer = MonitoredSFTTrainer(model=model, args=args, train_dataset=data.train, processing_class=tokenizer,
                                  peft_config=lora_config(config.model),
                                  cast_adapter_inputs=config.model.cast_adapter_inputs)
    return trainer, memory.peak / 2**30


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
    sixteen_bit = args.bf16 and not spec.get("float32_weights")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if sixteen_bit else torch.float32,
                                                 attn_implementation=spec.get("attn"))
    peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM") if spec["method"] == "lora" else None
    return SFTTrainer(model=model, args=args, train_dataset=dataset,
                      processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft)


GRACE_SECONDS = 60  # a variant started just before the budget may run this far past it
FAST_SETTINGS = ("packing", "use_liger_kernel", "torch_compile", "gradient_checkpointing")
GPU_EXTRAS = ("liger-kernel", "flash-attn")  # requirements-gpu.txt


def library_versions() -> dict[str, str | None]:
    from sftkit import environment

    return environment.library_versions((*environment.STACK, *GPU_EXTRAS))


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
    parser.add_argument("--only", nargs="*", help="variant names to run (default: the core set, %s)" % ", ".join(CORE))
    parser.add_argument("--all", action="store_true", help="every variant, the core set first")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier results file, and write it "
                                                        "beside it as .md")
    parser.add_argument("--budget", type=float, default=480,
                        help="seconds of the whole call (default 480): no variant starts after them, and a running "
                             "one is stopped at them plus a minute and marked")
    parser.add_argument("--run", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.table:
        return write_table(Path(args.table), json.loads(Path(args.table).read_text()))
    # 800 rows pack into about 340 rows of 2,048 (30 steps of micro-batch 8 take 240) and leave 800 for the unpacked
    # baseline's 120: 2,000 rows (before 2026-11-27) were preprocessed in every variant for nothing. Setup of a
    # LoRA variant's trainer on a 2-core CPU (2 preprocessing processes): 8.3 s -> 6.3 s (sftkit), 10.5 s -> 6.7 s
    # (plain TRL)
    seq_len, steps, warmup, rows = (128, 6, 2, 64) if args.tiny else (2048, 30, 10, 800)
    if args.run:
        spec = json.loads(args.spec)
        if spec["side"] == "ours":  # as sftkit's command does, before CUDA starts
            from sftkit.fastpath import use_expandable_segments

            use_expandable_segments()
        if spec["side"] == "attention":
            from attention import measure

            result = measure(SHAPES["tiny" if args.tiny else spec.get("shape", "llama-3.2-1b")], seq_len, 4,
                             Path(spec["data_file"]))
        else:
            result = run_variant(spec, spec["model_dir"], spec["data_file"], seq_len, steps, warmup)
        print("RESULT " + json.dumps(result))
        return {}

    import torch

    started = time.perf_counter()
    gpu = torch.cuda.is_available()
    attention = "flash_attention_2" if gpu and _flash_attention_installed() else "sdpa"
    table = variants(attention)
    if args.tiny:  # no Liger and no compiling on a CPU; one variant of each kind keeps the script working
        table = {name: {**spec, "use_liger_kernel": "false", "torch_compile": "false", "steps": steps, "warmup": warmup,
                        "tiny": True}
                 for name, spec in table.items()
                 if name in ("attention-kernels", "lora-trl-same-settings", "lora-sftkit-no-liger", "lora-sftkit-profile",
                             "lora-sftkit-torch-varlen", "qlora-8b-example")}
    if args.only:
        table = {name: spec for name, spec in table.items() if name in args.only}
    elif not (args.all or args.tiny):
        table = {name: spec for name, spec in table.items() if name in CORE}
    report = {"device": torch.cuda.get_device_name(0) if gpu else "cpu (no GPU available)", "seq_len": seq_len,
              "steps": steps, "warmup_steps": warmup, "attention": attention, "versions": library_versions(),
              "budget_seconds": args.budget, "model_build_seconds": {}, "variants": {}}
    Path(args.results).mkdir(parents=True, exist_ok=True)
    out = Path(args.results) / f"{time.strftime('%Y-%m-%d')}-{'gpu-tiny' if args.tiny else 'gpu'}.json"
    with tempfile.TemporaryDirectory() as workdir:
        data_file = build_data(rows, Path(workdir) / "chat.jsonl")
        models = {}
        for name, spec in table.items():
            if time.perf_counter() - started > args.budget:
                report["variants"][name] = {"skipped": f"past the budget of {args.budget:g} s"}
                continue
            shape = "tiny" if args.tiny else spec.get("shape", "llama-3.2-1b")
            if shape not in models and spec["side"] != "attention":
                building = time.perf_counter()
                models[shape] = build_model(shape, seq_len, Path(workdir) / shape)
                report["model_build_seconds"][shape] = time.perf_counter() - building  # part of the budget too
            left = args.budget + GRACE_SECONDS - (time.perf_counter() - started)
            report["variants"][name] = _run_in_subprocess(name, {**spec, "model_dir": str(models.get(shape)),
                                                                 "data_file": str(data_file)}, args.tiny, left)
            out.write_text(json.dumps(report, indent=2) + "\n")  # what was measured survives a timeout
    report["total_seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=2) + "\n")
    return write_table(out, report)


def write_table(results: Path, report: dict) -> dict:
    """The results side by side: each variant's tokens/s as a ratio to plain TRL's defaults and to plain TRL given
    the same settings (for the same model and method: the same FLOPs per token), and its peak memory beside the dry
    run's estimate. Printed, and written beside the JSON as .md."""
    variants = report["variants"]
    versions = report["versions"]
    lines = [f"GPU benchmark on {report['device']}: sequence {report['seq_len']}, {report['steps']} steps "
             f"({report['warmup_steps']} warm-up), attention {report['attention']}; "
             + ", ".join(f"{name} {versions.get(name)}" for name in ("torch", "transformers", "trl", "peft",
                                                                   "liger-kernel", "bitsandbytes")), "",
             f"(x TRL same settings: plain TRL with packing, Liger, compile and {report['attention']}; for the "
             "torch_varlen rows too, as plain TRL has no such kernel)", "",
             "| variant | tokens/s | x TRL defaults | x TRL same settings | MFU | peak allocated GiB | reserved GiB "
             "| dry run GiB | dry run / peak | seconds |", "|---" * 10 + "|"]
    for name, result in variants.items():
        if "forward_backward_ms" in result:
            continue
        if "tokens_per_second" not in result:
            lines.append(f"| {name} | {result.get('error') or result.get('skipped')} |" + " |" * 8)
            continue
        method = result.get("method") or name.split("-")[0]
        ratios = [_ratio(result, variants.get(f"{method}-{baseline}")) for baseline in ("baseline-trl",
                                                                                        "trl-same-settings")]
        peak, estimate = result["peak_gpu_gib"], result["dry_run_estimate_gib"]
        lines.append("| " + " | ".join([
            name, f"{result['tokens_per_second']:,.0f}", *ratios,
            f"{result['mfu']:.1%}" if result.get("mfu") else "",
            *(f"{value:.2f}" if value is not None else "" for value in (peak, result["peak_reserved_gib"], estimate)),
            f"{estimate / peak:.2f}" if estimate and peak else "", f"{result['variant_seconds']:.0f}"]) + " |")
    if "forward_backward_ms" in variants.get("attention-kernels", {}):
        from attention import describe

        lines += ["", describe(variants["attention-kernels"])]
    text = "\n".join(lines) + "\n"
    results.with_suffix(".md").write_text(text)
    print(text)
    return report


def _ratio(result: dict, baseline: dict | None) -> str:
    same_model = baseline and baseline.get("flops_per_token") == result["flops_per_token"]
    return f"{result['tokens_per_second'] / baseline['tokens_per_second']:.2f}" if same_model else ""


def _run_in_subprocess(name: str, spec: dict, tiny: bool, timeout: float) -> dict:
    command = [sys.executable, __file__, "--run", name, "--spec", json.dumps(spec)] + (["--tiny"] if tiny else [])
    started = time.perf_counter()
    try:
        output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s: past the budget", "variant_seconds": timeout}
    elapsed = time.perf_counter() - started
    line = next((line for line in output.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        return {"error": output.stderr.strip().splitlines()[-1] if output.stderr.strip() else "no result",
                "variant_seconds": elapsed}
    result = json.loads(line[len("RESULT "):])
    peak = peak_flops(result["device"])
    if "tokens_per_second" in result:
        result["mfu"] = result["tokens_per_second"] * result["flops_per_token"] / peak if peak else None
    return {**result, "variant_seconds": elapsed}


def _flash_attention_installed() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


if __name__ == "__main__":
    main()
