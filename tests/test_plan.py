"""`sft.py --dry-run` and `sft.py env`: the plan from the config, tokenizer and data alone, and the environment."""

import importlib.metadata
import json
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import conftest
import pytest
from conftest import REPO, SAMPLE_DATA, TINY_MODEL, run_python
from transformers import LlamaConfig

from sftkit.config import load_config
from sftkit.train import train


def run_sft(*args: str, **kwargs):
    """sft.py in this process, into an output_dir that does not exist unless the arguments name one: the dry run
    checks output_dir as the run does, and the configs' own (outputs/...) may hold a developer's finished run."""
    if "--training.output_dir" not in args:
        args = (*args, "--training.output_dir", str(Path(tempfile.gettempdir()) / f"sftkit-dry-run-{uuid.uuid4()}"))
    return conftest.run_sft(*args, **kwargs)


def plan_value(stdout: str, label: str) -> str:
    return re.search(rf"^  {label} +(.+)$", stdout, re.M).group(1)


def weightless_copy(tmp_path, **config_changes):
    """The tiny model's tokenizer beside a config.json, and no weights at all."""
    directory = tmp_path / "no-weights"
    shutil.copytree(TINY_MODEL, directory, ignore=shutil.ignore_patterns("*.safetensors"))
    if config_changes:
        LlamaConfig(**config_changes).save_pretrained(directory)
    return directory


def test_dry_run_counts_the_steps_a_real_run_takes(tmp_path):
    overrides = ["--training.output_dir", str(tmp_path / "out"), "--training.num_train_epochs", "2",
                 "--training.per_device_train_batch_size", "8", "--training.gradient_accumulation_steps", "3"]
    result = run_sft("--dry-run", *overrides)
    assert plan_value(result.stdout, "batch") == "8 per device x 3 accumulation x 1 process = 24 rows per step"
    steps = int(re.match(r"(\d+) per epoch; (\d+) in all \(2 epochs\)$", plan_value(result.stdout, "steps")).group(2))
    assert not (tmp_path / "out").exists(), "a dry run writes nothing"
    assert train(load_config(None, overrides)).trainer.state.global_step == steps == 26  # 304 rows: 38 batches / 3


def test_dry_run_of_packing_counts_packed_rows(tmp_path):
    overrides = ["--training.output_dir", str(tmp_path / "out"), "--training.num_train_epochs", "1",
                 "--training.packing", "true", "--training.per_device_train_batch_size", "4"]
    result = run_sft("--dry-run", *overrides)
    packed = int(re.search(r"packed into (\d+) rows", plan_value(result.stdout, "data")).group(1))
    steps = int(re.match(r"(\d+) per epoch", plan_value(result.stdout, "steps")).group(1))
    assert plan_value(result.stdout, "steps") == f"{steps} per epoch; {steps} in all (1 epoch)"
    assert steps == -(-packed // 4)
    assert train(load_config(None, overrides)).trainer.state.global_step == steps


def test_the_plan_says_how_many_rows_were_dropped_and_why_before_training(tmp_path):
    rows = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()[:20]]
    for row in rows[:14]:  # most replies empty: with on_bad_row skip, most of the data goes
        row["messages"][-1]["content"] = ""
    data = tmp_path / "mostly-bad.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = run_sft("--dry-run", "--dataset.name", str(data), "--dataset.on_bad_row", "skip", "--dataset.test_size",
                     "null", "--training.output_dir", str(tmp_path / "out"))
    assert plan_value(result.stdout, "data").startswith(
        f"{data} as 'messages': 20 rows read, 6 train; dropped 14 bad rows (the first: dataset {data} line 1: message 6 (assistant) has "
        "empty content); ")


def test_the_plan_says_the_rows_were_split_at_user_turns(tmp_path):
    """Qwen3's template drops earlier turns' reasoning: with dataset.split_user_turns each user turn trains in a row
    of its own, and the plan says how many rows the split made of the rows read."""
    from test_data import REASONED_CHAT

    data = tmp_path / "reasoned.jsonl"
    data.write_text("".join(json.dumps({"messages": REASONED_CHAT[:length]}) + "\n" for length in (4, 2, 4)))
    result = run_sft("--dry-run", "--dataset.name", str(data), "--dataset.chat_template",
                     str(REPO / "tests" / "templates" / "qwen3.jinja"), "--dataset.split_user_turns", "true",
                     "--dataset.test_size", "null", "--training.output_dir", str(tmp_path / "out"))
    assert plan_value(result.stdout, "data").startswith(
        f"{data} as 'messages': 3 rows read (split at user turns into 5), 5 train; ")


def test_dry_run_loads_no_weights_and_counts_parameters_from_the_config(tmp_path):
    # Llama-3-8B's published shape: 8.03B parameters, 41.9M LoRA parameters at r=16 on every linear layer.
    llama3_8b = weightless_copy(tmp_path, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    full = run_sft("--dry-run", "--model.path", str(llama3_8b), "--model.max_seq_length", "2048")
    assert "8,030,261,248 of 8,030,261,248 parameters train" in plan_value(full.stdout, "method")
    lora = run_sft("--dry-run", "--config", "lora_train_config.yaml", "--model.path", str(llama3_8b),
                      "--model.lora_config.r", "16")
    assert "41,943,040 of 8,072,204,288 parameters train" in plan_value(lora.stdout, "method")  # base + adapters
    # a laptop's plan of tomorrow's GPU run read as the GPU's: float32, twice the memory
    assert plan_value(lora.stdout, "method").endswith("; planned for this machine, which has no GPU: add "
                                                      "--training.bf16 true to plan a bf16 GPU's run")
    on_a_gpu = run_sft("--dry-run", "--config", "lora_train_config.yaml", "--model.path", str(llama3_8b),
                       "--training.bf16", "true")
    assert plan_value(on_a_gpu.stdout, "method").startswith("LoRA in bfloat16") and "planned for" not in on_a_gpu.stdout
    # the merge at the end loads the base in bf16 into host memory (the run refuses where it cannot fit)
    assert plan_value(on_a_gpu.stdout, "export").startswith("the adapter, and the merged model: the merge loads the "
                                                           "base into host memory, about 16.96 GiB; this machine has ")
    assert plan_value(full.stdout, "export") == "the model in float32"
    # full fine-tuning in fp32 on one device: 4 bytes each for weight and gradient, 8 for Adam's two states
    memory = plan_value(full.stdout, "memory per device")
    assert f"{8_030_261_248 * 16 / 2**30:.2f} GiB model states" in memory


def test_dry_run_uses_deepspeeds_estimator_for_zero(tmp_path):
    model = weightless_copy(tmp_path, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                            num_attention_heads=8, vocab_size=820)
    result = run_sft("--dry-run", "--model.path", str(model), "--training.deepspeed",
                        "deepspeed_configs/zero3_offload.json")
    assert plan_value(result.stdout, "distributed") == "DeepSpeed ZeRO-3 with optimizer and parameters on the CPU"
    total = int(re.search(r"([\d,]+) of ([\d,]+) parameters", result.stdout).group(2).replace(",", ""))
    # ZeRO-3 with parameters and optimizer on the CPU (ZeRO-Infinity paper; DeepSpeed's docs): the GPU holds only the
    # largest layer (here an MLP projection, 1024 x 4096) in fp32, the CPU 18 bytes per parameter.
    gpu, cpu = 4 * 1024 * 4096, 18 * total
    memory = plan_value(result.stdout, "memory per device")
    assert f"{gpu / 2**20:.1f} MiB model states (DeepSpeed's estimator)" in memory, memory
    assert f"{cpu / 2**20:.1f} MiB of host memory" in memory or f"{cpu / 2**30:.2f} GiB of host memory" in memory


def test_dry_run_of_a_preset_and_a_bad_config():
    result = run_sft("--dry-run", "--preset", "low_memory")
    assert plan_value(result.stdout, "method").startswith("QLoRA in ")
    assert plan_value(result.stdout, "batch").startswith("1 per device x 16 accumulation")
    bad = run_sft("--dry-run", "--training.learning_rat", "1", check=False)
    assert bad.returncode == 2 and "did you mean 'learning_rate'" in bad.stderr


def test_env_reports_every_library_and_a_verdict_per_check():
    result = run_python("sft.py", "env")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("sftkit environment")
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "bitsandbytes"):
        version = importlib.metadata.version(name)
        assert re.search(rf"^  (ok|warn) +{name} +{re.escape(version)}", result.stdout, re.M), name
    checks = [line for line in lines[1:-1]]
    assert all(re.match(r"  (ok|warn|FAIL) ", line) for line in checks), checks
    assert any(" gpu " in line or " cuda " in line for line in checks)
    assert re.search(r"deepspeed ops +can build .*cpu_adam", result.stdout)
    assert "bitsandbytes" in result.stdout and "backend" in result.stdout
    assert lines[-1] == "  => ready to train"
    assert "Traceback" not in result.stderr and not result.stderr.strip(), result.stderr


def test_env_and_init_answer_a_mistyped_argument_in_one_line(tmp_path):
    wrong = run_python("-m", "sftkit", "env", "--foo", check=False)
    assert wrong.returncode == 2 and wrong.stderr == "sftkit env: error: env takes no arguments, got --foo\n"
    assert run_python("-m", "sftkit", "env", "--help").stdout.startswith("usage: sftkit env\n")
    assert "usage: sftkit train [CONFIG]" in run_python("-m", "sftkit", "train", "--help").stdout
    init = run_python("-m", "sftkit", "init", "--fro", "lora", check=False)
    assert init.returncode == 2 and init.stderr.count("\n") == 1 and "see sftkit init --help" in init.stderr
    run_python("-m", "sftkit", "init", str(tmp_path / "mine.yaml"), "--config", "qlora")  # --config as train has it
    shipped = (REPO / "configs" / "qlora_train_config.yaml").read_text()
    checkpoints = ("  save_strategy: steps ", "  save_steps: 500 ", "  save_total_limit: 2 ")
    copy = (tmp_path / "mine.yaml").read_text()
    assert [line for line in copy.split("\nmodel:")[1].splitlines() if not line.startswith(checkpoints)] == \
        [line for line in shipped.split("\nmodel:")[1].splitlines() if 'save_strategy: "no"' not in line]  # its header
    assert all(f"\n{line}" in copy for line in checkpoints), "a copy for a real model's run saves checkpoints"
    assert load_config(str(tmp_path / "mine.yaml")).training.save_steps == 500
    assert f"accelerate launch -m sftkit train {tmp_path / 'mine.yaml'}" in (tmp_path / "mine.yaml").read_text()
    json_name = run_python("-m", "sftkit", "init", str(tmp_path / "mine.json"), check=False)  # not mine.json.yaml
    assert json_name.returncode == 2 and "a config is a YAML file; give a name ending in .yaml" in json_name.stderr
    assert not list(tmp_path.glob("mine.json*"))
    run_python("-m", "sftkit", "init", str(tmp_path / "llama3.1_mine"), "--from", "default")  # a dot in the name
    assert (tmp_path / "llama3.1_mine.yaml").is_file()
    run_python("-m", "sftkit", "init", str(tmp_path / "runs" / "first.yaml"))  # its folder is made
    first = (tmp_path / "runs" / "first.yaml").read_text()
    assert "\n  save_steps: 500 " in first and "\nmodel:\n  path: data/tiny-chat-llama\n" in first
    again = run_python("-m", "sftkit", "init", str(tmp_path / "runs" / "first.yaml"), "--from", "qlora", check=False)
    assert again.returncode == 2 and "exists already" in again.stderr
    assert (tmp_path / "runs" / "first.yaml").read_text() == first


def test_env_shows_the_accelerate_config_in_use():
    result = run_python("sft.py", "env", env={"ACCELERATE_CONFIG_FILE": "accelerate_configs/cpu_zero2_2proc.yaml"})
    line = next(line for line in result.stdout.splitlines() if "accelerate config" in line)
    assert "distributed_type DEEPSPEED, num_processes 2" in line and "zero2.json" in line


def test_dry_run_counts_parameters_as_the_run_does(lora_run):
    summary = json.loads((lora_run / "run_summary.json").read_text())
    dry = run_sft("--dry-run", "--config", "lora_train_config.yaml")
    assert (f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,} parameters train"
            in plan_value(dry.stdout, "method"))


@pytest.mark.parametrize("label_smoothing", [0, 0.1])
def test_the_estimate_counts_full_vocabulary_logits_only_where_training_builds_them(tmp_path, label_smoothing):
    """TRL's SFTTrainer computes the loss from the hidden states in chunks of the vocabulary, without running the LM
    head as a module; with label smoothing it runs the head over every token. The estimate follows: the logits
    count only then (if a TRL release changes which way a run goes, this fails)."""
    from sftkit.data import prepare_data
    from sftkit.model import load_model, load_tokenizer, resolve_dtype
    from sftkit.monitor import MonitoredSFTTrainer
    from sftkit.plan import build_plan

    overrides = ["--training.output_dir", str(tmp_path), "--training.max_steps", "2", "--dataset.test_size", "null"]
    config = load_config(None, [*overrides, "--training.label_smoothing_factor", str(label_smoothing)])
    tokenizer = load_tokenizer(config.model, config.dataset)
    model = load_model(config.model, resolve_dtype(config.model, config.training), False)
    data = prepare_data(config.dataset, tokenizer, config.training.max_length)
    trainer = MonitoredSFTTrainer(model=model, args=config.training, processing_class=tokenizer, train_dataset=data.train)
    head_outputs = []
    trainer.model.get_output_embeddings().register_forward_hook(lambda module, inputs, out: head_outputs.append(out))
    trainer.train()
    assert trainer.state.global_step == 2
    assert bool(head_outputs) == (label_smoothing > 0)
    assert all(output.shape[-1] == model.config.vocab_size for output in head_outputs)
    plain = build_plan(load_config(None, overrides))
    plan = build_plan(config)
    logits = plan.memory.activations - plain.memory.activations
    tokens = config.training.per_device_train_batch_size * min(max(plan.data.lengths), config.training.max_length)
    assert logits == (tokens * plan.shape.vocab * 12 if label_smoothing else 0)  # fp32 logits, log-softmax, gradient


LLAMA_3_2_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": True}
LLAMA_3_1_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}


BENCHMARK_1B = ["--model.max_seq_length", "2048", "--training.per_device_train_batch_size", "4",
                "--training.packing", "true", "--training.gradient_checkpointing", "false"]


@pytest.mark.parametrize(("shape", "config_file", "overrides", "measured_gib"), [
    (LLAMA_3_2_1B, None, [*BENCHMARK_1B, "--model.use_lora", "true", "--training.use_liger_kernel", "true"], 19.8),
    (LLAMA_3_2_1B, None, [*BENCHMARK_1B, "--model.use_lora", "true", "--training.use_liger_kernel", "false"], 22.8),
    # the full runs were measured in pure bf16, before full fine-tuning kept float32 weights by default
    (LLAMA_3_2_1B, None, [*BENCHMARK_1B, "--model.use_lora", "false", "--training.use_liger_kernel", "true",
                          "--model.dtype", "bfloat16"], 20.7),
    (LLAMA_3_1_8B, "examples/llama3.1_8b_qlora.yaml",
     ["--dataset.eval_split", "null", "--training.eval_strategy", "no", "--training.use_liger_kernel", "false",
      "--training.per_device_train_batch_size", "4"], 24.5),
    # benchmarks/results/2026-11-27-h100.md: today's defaults (compile, Liger, no adapter-input casts) on one H100
    (LLAMA_3_2_1B, None, [*BENCHMARK_1B, "--model.use_lora", "true", "--training.use_liger_kernel", "true",
                          "--training.torch_compile", "true"], 20.20),
    (LLAMA_3_2_1B, None, [*BENCHMARK_1B, "--model.use_lora", "false", "--training.use_liger_kernel", "true",
                          "--training.torch_compile", "true", "--model.dtype", "bfloat16"], 21.26),
    (LLAMA_3_1_8B, "examples/llama3.1_8b_qlora.yaml",
     ["--dataset.eval_split", "null", "--training.eval_strategy", "no", "--training.use_liger_kernel", "true"], 15.31),
], ids=["lora-1b-liger", "lora-1b", "full-1b-liger", "qlora-8b-example-micro-batch-4", "h100-lora-1b-sftkit",
        "h100-full-1b-sftkit", "h100-qlora-8b-example"])
def test_the_memory_estimate_is_within_20_percent_of_what_a_gpu_measured(tmp_path, shape, config_file, overrides,
                                                                          measured_gib):
    """torch's peak allocated memory measured on a GPU (random weights of these shapes, bf16, sdpa, packed; the 1B
    runs 4 x 2,048 tokens without activation checkpointing): on one H200 for issue 13, without torch.compile and with
    PEFT's adapter-input casts, the 8B example as shipped then (micro-batch 4); on one H100 with benchmarks/gpu.py,
    sftkit's defaults and the 8B example as shipped now. Against the estimate for the same settings."""
    from sftkit.plan import build_plan

    model = weightless_copy(tmp_path, **shape)
    config = load_config(config_file, ["--training.output_dir", str(tmp_path / "out"), *overrides,
                                       "--model.path", str(model), "--dataset.name", "data/sample_chat.jsonl",
                                       "--dataset.split", "train", "--dataset.test_size", "null",
                                       "--training.bf16", "true"])
    memory = build_plan(config).memory
    estimate_gib = memory.peak / 2**30
    assert 0.8 < estimate_gib / measured_gib < 1.2, memory.description


def test_rows_longer_than_the_models_positions_are_refused_or_warned_of_before_loading(tmp_path):
    """A model with learned positions (GPT-2's 64 here) under a max_seq_length longer than them failed in the first
    forward pass of such a row with an IndexError, after the model had loaded, though a warning had said it would
    (helper-78): refused. A rotary model was not pretrained past them: a warning."""
    model = conftest.save_tiny_gpt2(tmp_path / "gpt2", positions=64)
    refused = run_sft("--dry-run", "--model.path", model, "--training.output_dir", str(tmp_path / "out"), check=False)
    assert refused.returncode == 2 and refused.stderr.rstrip().endswith(
        f"sft.py: error: rows of up to 92 tokens reach the model (model.max_seq_length 256), but {model} has 64 "
        "positions (max_position_embeddings in config.json), which it looks up in a table of that many rows: training "
        "would fail on the first longer row; set model.max_seq_length to 64 or less"), refused.stderr
    fits = run_sft("--dry-run", "--model.path", model, "--model.max_seq_length", "64", "--training.output_dir",
                   str(tmp_path / "out"))
    assert "positions" not in fits.stderr, fits.stderr
    # positions run on across packed rows under packing wrapped; an eval row counts as a train row does
    wider = conftest.save_tiny_gpt2(tmp_path / "gpt2-128", positions=128)
    assert "positions" not in run_sft("--dry-run", "--model.path", wider).stderr
    wrapped = run_sft("--dry-run", "--model.path", wider, "--training.packing", "true", "--training.packing_strategy",
                      "wrapped", check=False).stderr
    assert "rows of up to 256 tokens reach the model (model.max_seq_length 256), but" in wrapped, wrapped
    (tmp_path / "eval.jsonl").write_text(json.dumps({"messages": [
        {"role": "user", "content": "Tell me about the weather today, please. " * 12},
        {"role": "assistant", "content": "Sunny."}]}) + "\n")
    evaluated = run_sft("--dry-run", "--model.path", wider, "--dataset.test_size", "null", "--dataset.eval_sources",
                        json.dumps([{"name": str(tmp_path / "eval.jsonl")}]), check=False).stderr
    assert "rows of up to 233 tokens reach the model" in evaluated, evaluated
    rotary = weightless_copy(tmp_path, max_position_embeddings=64)
    warned = run_sft("--dry-run", "--model.path", str(rotary), "--training.output_dir", str(tmp_path / "out"))
    assert (f"sftkit: warning: rows of up to 92 tokens reach the model (model.max_seq_length 256), but {rotary} has "
            "64 positions (max_position_embeddings in config.json): it was not pretrained past them; set "
            "model.max_seq_length to 64 or less, unless its rope scaling extends them") in warned.stderr, warned.stderr


def test_plain_text_cut_at_max_length_points_to_wrapped_packing(tmp_path):
    """Long documents cut to max_seq_length lost 70% of a corpus, and the plan said only that rows were cut
    (helper-78); packed `wrapped` they train whole."""
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": "word " * 900}) + "\n" for _ in range(5)))
    args = ["--dry-run", "--dataset.name", str(tmp_path / "long.jsonl"), "--dataset.test_size", "null",
            "--training.output_dir", str(tmp_path / "out")]
    cut = plan_value(run_sft(*args).stdout, "data")
    assert cut.endswith("(max_seq_length 256: 5 rows are cut to it, and what follows never trains; training.packing: "
                        "true with packing_strategy: wrapped trains all of it)"), cut
    wrapped = plan_value(run_sft(*args, "--training.packing", "true", "--training.packing_strategy", "wrapped").stdout,
                         "data")
    assert "cut to it" not in wrapped and "packed into" in wrapped, wrapped


def test_eval_rows_the_data_repeats_among_the_train_rows_are_counted(tmp_path):
    """The docs said no eval row also trains; the sample data repeats 53 of its 320 rows, and 3 of the default run's
    16 held-out rows are train rows token for token (39 of 48 in an export joined to part of itself)."""
    rows = SAMPLE_DATA.read_text().splitlines()
    unique = list(dict.fromkeys(rows))
    assert len(unique) < len(rows)
    plan = run_sft("--dry-run").stdout
    assert "304 train / 16 eval (3 eval rows are also train rows, token for token);" in plan_value(plan, "data")
    (tmp_path / "unique.jsonl").write_text("\n".join(unique) + "\n")
    plan = run_sft("--dry-run", "--dataset.name", str(tmp_path / "unique.jsonl")).stdout
    assert "token for token" not in plan


def test_the_dry_run_counts_the_tokens_the_trainer_keeps_as_inspect_does(tmp_path):
    """It counted rows before truncation: 600,228 tokens per epoch for a file with one huge row, --inspect 440."""
    overrides = ["--training.output_dir", str(tmp_path / "out"), "--model.max_seq_length", "48"]
    data = plan_value(run_sft("--dry-run", *overrides).stdout, "data")
    inspected = run_sft("--inspect", "0", *overrides).stdout
    kept = re.search(r"tokens that train  [\d,]+ of ([\d,]+)", inspected).group(1)
    cut = re.search(r"rows truncated     (\d+) longer", inspected).group(1)
    assert f"; {kept} tokens per epoch, " in data and f"(max_seq_length 48: {cut} rows are cut to it)" in data
    assert int(cut) > 0


def test_full_fine_tuning_in_bf16_is_estimated_with_float32_weights_and_their_bf16_copies(tmp_path):
    """16 bytes per parameter of weights, gradients and Adam states instead of pure bf16's 8, and autocast's bf16
    copy of every matmul weight while the forward pass runs."""
    from sftkit.plan import build_plan

    model = weightless_copy(tmp_path, **LLAMA_3_2_1B)
    overrides = ["--training.output_dir", str(tmp_path / "out"), *BENCHMARK_1B, "--model.path", str(model),
                 "--dataset.name", "data/sample_chat.jsonl", "--dataset.test_size", "null", "--training.bf16", "true"]
    mixed = build_plan(load_config(None, overrides))
    pure = build_plan(load_config(None, [*overrides, "--model.dtype", "bfloat16"]))
    assert mixed.memory.model_states - pure.memory.model_states == 8 * mixed.shape.total
    copies = (mixed.shape.quantizable + mixed.shape.vocab * mixed.shape.hidden) * 2
    assert mixed.memory.activations - pure.memory.activations == copies


@pytest.mark.parametrize("layout, words", [("full_shard", "FSDP1 (full shard)"),
                                           ("shard_grad_op", "FSDP1 (weights gathered from forward to backward)")])
def test_the_dry_run_of_fsdp1_set_in_the_config_plans_it_on_a_machine_without_a_gpu(layout, words):
    """Planning a GPU job on a login node: Accelerate's FSDP1 plugin asks for the current GPU while it checks
    sync_module_states, and the dry run ended in its traceback."""
    result = run_sft("--dry-run", "--training.fsdp", layout, "--training.fsdp_config", '{"version": 1}')
    assert plan_value(result.stdout, "distributed") == words


def test_the_length_of_rows_tokenized_only_as_far_as_training_keeps_them_is_said_as_more_than_the_cut(tmp_path):
    """A conversation of about 1,600 tokens was "257 tokens" under max_seq_length 256 (tokenized one token past the
    cut, for speed), and "... 1 more tokens cut": a user raised max_seq_length to 257 and still cut every row."""
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {row}?"},
                                                     {"role": "assistant", "content": "A long answer. " * 60}]}) + "\n"
                            for row in range(2)))
    common = ["--dataset.name", str(data), "--dataset.test_size", "null", "--model.max_seq_length", "40",
              "--training.output_dir", str(tmp_path / "out")]
    inspected = run_sft("--inspect", "1", *common).stdout
    assert ("tokens per row     min more than 40, median more than 40, p95 more than 40, max more than 40 (rows are "
            "tokenized only as far as max_seq_length keeps them)") in inspected, inspected
    assert "--- sample 0 (more than 40 tokens;" in inspected and "... the rest is cut by max_seq_length" in inspected
    planned = plan_value(run_sft("--dry-run", *common).stdout, "data")
    assert "longest row more than 40 tokens (max_seq_length 40: 2 rows are cut to it)" in planned, planned
    whole = run_sft("--inspect", "1", *common, "--training.truncation_mode", "keep_end").stdout  # tokenized whole
    assert "max more than" not in whole and "tokens cut from the start by max_seq_length" in whole


def test_a_warmup_as_long_as_the_run_is_said_by_the_dry_run_and_the_run(tmp_path):
    """A 1-step smoke run of a shipped config (warmup_steps 10) trained at a learning rate of 0 and published the
    base unchanged, without a word."""
    args = ["--training.max_steps", "2", "--training.output_dir", str(tmp_path / "out"), "--dataset.test_size", "null"]
    said = ("training.warmup_steps (10 steps) is at least the run's 2 steps: the learning rate never reaches "
            "training.learning_rate 0.003 (it peaks at 0.0003); lower warmup_steps or train longer")
    assert plan_value(run_sft("--dry-run", *args).stdout, "steps").endswith(f"; 2 in all (training.max_steps); {said}")
    assert "warmup_steps" not in run_sft("--dry-run", *args, "--training.warmup_steps", "1").stdout
    assert f"sftkit: warning: {said}\n" in run_sft(*args).stderr


@pytest.mark.parametrize(("settings", "shown", "hidden", "note"), [
    ([], "Alpha", "Omega", "... the rest is cut by max_seq_length"),  # tokenized only as far as it is kept
    (["--training.truncation_mode", "keep_end"], "Omega", "Alpha", "tokens cut from the start by max_seq_length"),
    (["--training.packing", "true", "--training.packing_strategy", "bfd_split"], "Omega", None,
     "packing (bfd_split) splits its tokens over rows of 40"),
])
def test_inspect_shows_a_long_row_as_the_trainer_keeps_it(tmp_path, settings, shown, hidden, note):
    """It always showed the first max_seq_length tokens: with keep_end the trainer trains the row's end, and
    bfd_split packing trains all of it."""
    turns = [("user", "First question?"), ("assistant", "Alpha " * 20), ("user", "Last question?"),
             ("assistant", "Omega " * 10)]
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": [{"role": role, "content": text} for role, text in turns]}) + "\n")
    inspected = run_sft("--inspect", "1", "--dataset.name", str(data), "--dataset.test_size", "null",
                        "--model.max_seq_length", "40", "--training.output_dir", str(tmp_path / "out"),
                        *settings).stdout
    sample = inspected.split("--- sample 0", 1)[1]
    assert note in sample and shown in sample and "[[" in sample, sample
    assert hidden is None or hidden not in sample, sample


@pytest.mark.parametrize("variables, words", [({}, ""), ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "8"}, ", 8 processes"),
                                              ({"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1"},
                                               ", 16 processes on 2 machines")])
def test_the_dry_runs_distributed_line_counts_the_launchs_processes_and_machines(monkeypatch, variables, words):
    from sftkit.engines import world_size
    from sftkit.plan import _processes_words

    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    assert _processes_words(world_size()) == words
