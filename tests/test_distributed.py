"""Two-process runs through `accelerate launch` on the CPU (gloo): DDP, ZeRO-2, ZeRO-3, FSDP2, with complete saves.

Each is compared with a single-process run of the same config and the same global batch (2 x 8 = 1 x 16 rows).
The mean train loss over the run must agree within 1%. Both see the same rows in the same order and the Trainer
normalises the loss by the token count of all processes together, so the two are the same sum computed in a
different order: measured here, 0.00% apart for full and LoRA runs and 0.02% for QLoRA. 1% leaves room for other
CPUs' summation order while still catching a launch that silently trains on fewer rows (one seen while building
this, where each process believed it was alone, was 8% off).

FSDP2 runs the shipped fsdp2*.yaml files with --num_processes 2. Accelerate 1.15 turns FSDP on only for processes
on accelerators; sftkit's workaround (compat.allow_fsdp_on_cpu) lets it shard over gloo, and the run fails instead
of silently training full copies if FSDP is not on. Single-process baselines are computed once per session and
shared with test_multinode.py.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL, said
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
    command = [ACCELERATE, "launch", "--config_file", f"accelerate_configs/{accelerate_config}", "--num_processes", "2",
               "sft.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)


_single_losses: dict[str, float] = {}


def single_process_loss(tmp_path, config: str) -> float:
    """The mean train loss of one process over the same 10 steps of 16 rows; once per config and session."""
    if config not in _single_losses:
        run_config = load_config(config, ["--training.output_dir", str(tmp_path / "single"),
                                          "--training.per_device_train_batch_size", "16", *STEPS])
        _single_losses[config] = train(run_config).summary["train_loss_mean"]
    return _single_losses[config]


def logits(model, tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(PROMPTS[0], tokenize=False)
    with torch.no_grad():
        return model.eval()(**tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits


def assert_complete_model(out: Path):
    """Every tensor has the base model's shape and the training precision (none empty, none silently 16-bit).
    The output head shares the embeddings' weights, which are saved once, as transformers saves them."""
    base = AutoModelForCausalLM.from_pretrained(TINY_MODEL).state_dict()
    base = {key: tuple(tensor.shape) for key, tensor in base.items()}
    with safe_open(out / "model.safetensors", "pt") as saved:
        shapes = {key: tuple(saved.get_slice(key).get_shape()) for key in saved.keys()}
        dtypes = {saved.get_slice(key).get_dtype() for key in saved.keys()}
    assert shapes.keys() | {"lm_head.weight"} == base.keys() and "lm_head.weight" not in shapes
    assert all(shapes[key] == base[key] for key in shapes)
    assert dtypes == {"F32"}


@pytest.mark.parametrize(
    ("accelerate_config", "config"),
    [
        ("multi_gpu.yaml", "default_train_config.yaml"),  # the GPU files with --num_processes 2 run on CPUs too
        ("deepspeed_zero2.yaml", "lora_train_config.yaml"),
        ("deepspeed_zero2.yaml", "default_train_config.yaml"),
        # ZeRO-3 + LoRA runs in test_multinode.py (two machines of one process: the same sharding, plus the
        # rendezvous across machines), so here ZeRO-3 trains the full model and QLoRA
        ("deepspeed_zero3.yaml", "default_train_config.yaml"),
        ("cpu_zero3_2proc.yaml", "qlora_train_config.yaml"),
        ("fsdp2.yaml", "lora_train_config.yaml"),
        ("fsdp2.yaml", "default_train_config.yaml"),
        ("fsdp2_offload.yaml", "lora_train_config.yaml"),
    ],
    ids=["ddp-full", "zero2-lora", "zero2-full", "zero3-full", "zero3-qlora", "fsdp2-lora", "fsdp2-full",
         "fsdp2-offload-lora"],
)
def test_two_processes_train_like_one_and_save_complete_models(tmp_path, accelerate_config, config):
    out = tmp_path / "out"
    started = time.perf_counter()
    result = accelerate_launch(accelerate_config, "--config", config, "--training.output_dir", str(out),
                               "--training.per_device_train_batch_size", "8", *STEPS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    print(f"{accelerate_config} {config}: {time.perf_counter() - started:.1f} s")
    assert result.stdout.count("Run summary") == 1, "only the main process prints the summary"
    summary = check_saved_run(out, config)
    assert_loss_like_one_process(tmp_path, config, summary, "2 processes")


def check_saved_run(out: Path, config: str) -> dict:
    """The run's summary, once its model (and adapter) are checked complete, in fp32, and in agreement."""
    import json

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 10 and summary["saved_dtypes"] == ["float32"]
    assert_complete_model(out)
    if "lora" not in config:  # counted whole, though ZeRO-3 and FSDP leave each process a shard of each
        total = sum(parameter.numel() for parameter in AutoModelForCausalLM.from_pretrained(TINY_MODEL).parameters())
        assert summary["trainable_parameters"] == summary["total_parameters"] == total
    if "lora" in config:
        with safe_open(out / "lora_weights" / "adapter_model.safetensors", "pt") as adapter:
            lora = {key: adapter.get_slice(key).get_shape() for key in adapter.keys()}
        assert len(lora) == 2 * 7 * 4 and all(0 not in shape and shape for shape in lora.values())
        tokenizer = AutoTokenizer.from_pretrained(out)
        merged = AutoModelForCausalLM.from_pretrained(out)
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), out / "lora_weights")
        assert (logits(merged, tokenizer) - logits(with_adapter, tokenizer)).abs().max().item() < 1e-4
    return summary


def assert_loss_like_one_process(tmp_path, config: str, summary: dict, label: str) -> None:
    single = single_process_loss(tmp_path, config)
    relative = abs(summary["train_loss_mean"] - single) / single
    print(f"loss: {label} {summary['train_loss_mean']:.4f}, 1 process {single:.4f}, difference {relative:.2%}")
    assert relative < 0.01


@pytest.mark.parametrize("rows, packing", [(15, "false"), (9, "false"), (15, "true")])
def test_the_eval_loss_of_two_processes_is_one_processs_where_the_rows_do_not_split_evenly(tmp_path, rows, packing):
    """Accelerate fills the last round of eval batches up with rows from the start, and the Trainer's mean counted
    their tokens: 15 eval rows read 3.300 on two processes where one process read 3.260. Packed, the rows of a batch
    lie one after another (padding-free)."""
    overrides = ["--dataset.test_size", str(rows), "--training.max_steps", "1", "--training.eval_on_start", "true",
                 "--training.packing", packing]
    single = train(load_config("lora_train_config.yaml", [*overrides, "--training.output_dir", str(tmp_path / "one")]))
    result = accelerate_launch("cpu_ddp_2proc.yaml", "--config", "lora_train_config.yaml", *overrides,
                               "--training.output_dir", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "run_summary.json").read_text())["eval_loss_first"]
    assert two == pytest.approx(single.summary["eval_loss_first"], rel=1e-4)


def test_a_config_error_in_a_distributed_launch_is_printed_once_and_again_as_the_launchs_last_line():
    """Else the launcher's box ended with "traceback : To enable traceback see: https://pytorch.org/...", 40 lines
    below the error."""
    result = accelerate_launch("cpu_zero2_2proc.yaml", "--model.use_lorra", "true", timeout=120)
    assert result.returncode != 0
    assert said(result.stderr, "unknown key model.use_lorra (did you mean 'use_lora'?)") == 1, result.stderr
    root_cause = result.stderr.rstrip().splitlines()[-2]
    assert root_cause.startswith("  traceback : sft.py: error: ") and "model.use_lorra" in root_cause, result.stderr


def test_a_warning_in_a_distributed_launch_is_printed_once(tmp_path):
    """Every process printed it: 8 copies per machine of 8 GPUs."""
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(TINY_MODEL, model, ignore=shutil.ignore_patterns("chat_template.jinja", "model.safetensors"))
    result = accelerate_launch("cpu_ddp_2proc.yaml", "--dry-run", "--model.path", str(model), "--training.output_dir",
                               str(tmp_path / "out"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert said(result.stderr, f"sftkit: warning: model.path {model} has no chat template") == 1, result.stderr


def test_a_failure_on_one_process_ends_the_launch(tmp_path):
    """The main process alone fails to write its output; the other must not wait for it forever."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    started = time.perf_counter()
    result = accelerate_launch("cpu_ddp_2proc.yaml", "--training.output_dir", str(blocker / "out"), *STEPS, timeout=300)
    assert result.returncode != 0
    assert time.perf_counter() - started < 120


def test_compile_under_zero3_is_refused_before_loading_with_one_line(tmp_path):
    """It would fail at the first backward pass, after the model and data have loaded (compat.py says how)."""
    result = accelerate_launch("cpu_zero3_2proc.yaml", "--training.torch_compile", "true", "--training.output_dir",
                               str(tmp_path / "out"), timeout=120)
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    assert said(result.stderr, "training.torch_compile: true fails under DeepSpeed ZeRO-3") == 1, result.stderr[-3000:]


@pytest.mark.parametrize("engine", ["zero3", "fsdp2"])
def test_a_sharded_engine_that_would_save_no_model_is_refused_before_loading(tmp_path, engine):
    """DeepSpeed's default (no 16-bit gather) and Accelerate's FSDP2 default (a sharded state dict) leave the Trainer
    no whole model to save: found after the whole run, the trained weights would be lost (FSDP) or kept only as
    DeepSpeed's shards, so they are refused at the start."""
    if engine == "zero3":
        settings = json.loads((REPO / "deepspeed_configs" / "zero3.json").read_text())
        settings["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
        (tmp_path / "zero3.json").write_text(json.dumps(settings))
        launch = (REPO / "accelerate_configs" / "cpu_zero3_2proc.yaml").read_text()
        launch = launch.replace("deepspeed_configs/zero3.json", str(tmp_path / "zero3.json"))
        expected = (f"{tmp_path / 'zero3.json'}: DeepSpeed ZeRO-3 saves no model at the end unless zero_optimization."
                    "stage3_gather_16bit_weights_on_model_save is true")
    else:  # an Accelerate config that leaves the state dict type out
        launch = "\n".join(line for line in (REPO / "accelerate_configs" / "fsdp2.yaml").read_text().splitlines()
                           if "fsdp_state_dict_type" not in line)
        expected = ("the Accelerate config's fsdp_config: FSDP with state_dict_type SHARDED_STATE_DICT saves no model "
                    "at the end; set fsdp_state_dict_type: FULL_STATE_DICT")
    (tmp_path / "launch.yaml").write_text(launch)
    result = subprocess.run([ACCELERATE, "launch", "--config_file", str(tmp_path / "launch.yaml"), "--num_processes",
                             "2", "sft.py", "--training.output_dir", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and not (tmp_path / "out").exists()
    assert said(result.stderr, expected) == 1, result.stderr[-3000:]


def test_the_dry_run_plans_the_offloads_an_accelerate_config_sets_without_a_deepspeed_file(tmp_path):
    """`accelerate config` writes zero_stage and offload devices into its own file, with no DeepSpeed JSON: the plan
    said plain ZeRO-3 and counted the model states on the device."""
    launch = (REPO / "accelerate_configs" / "cpu_zero3_2proc.yaml").read_text().replace(
        "  deepspeed_config_file: deepspeed_configs/zero3.json", "  zero_stage: 3\n  offload_optimizer_device: cpu\n"
        "  offload_param_device: cpu\n  zero3_save_16bit_model: true")
    (tmp_path / "launch.yaml").write_text(launch)
    result = subprocess.run([ACCELERATE, "launch", "--config_file", str(tmp_path / "launch.yaml"), "sft.py",
                             "--dry-run", "--training.output_dir", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("  distributed        DeepSpeed ZeRO-3 with optimizer and parameters on the CPU, 2 processes\n"
            in result.stdout)
    assert "of host memory for offloaded states" in result.stdout


@pytest.mark.parametrize("launch, layout", [("fsdp2.yaml", "FSDP2 (full shard)"), (
    "fsdp2_offload.yaml", "FSDP2 (full shard) with optimizer and parameters on the CPU")])
def test_the_dry_run_of_fsdp_plans_sharded_float32_states(tmp_path, launch, layout):
    """FSDP under bf16 upcasts the weights it trains to float32 even where model.dtype asks for bfloat16 (Accelerate
    1.15), and shards every model state: the plan said "no DeepSpeed", pure bf16, and whole states on each device,
    and the export's disk check counted 2 bytes a weight where the run writes 4."""
    result = accelerate_launch(launch, "--dry-run", "--training.output_dir", str(tmp_path / "out"),
                               "--training.bf16", "true", "--model.dtype", "bfloat16", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"  distributed        {layout}, 2 processes\n" in result.stdout
    method = re.search(r"full fine-tuning in bfloat16 with float32 weights: ([\d,]+) of", result.stdout)
    assert method, result.stdout
    parameters = int(method[1].replace(",", ""))
    memory = re.search(r"~[\d.]+ MiB: ([\d.]+) MiB model states", result.stdout)
    host = re.search(r"([\d.]+) MiB of host memory", result.stdout)
    # float32 weights and gradients and two Adam states, 16 bytes a parameter, halved over the two processes; on
    # the device besides: the two decoder layers FSDP gathers in bf16
    on_device, on_host = float(memory[1]) * 2**20, float(host[1]) * 2**20 if host else 0
    halved = 16 * parameters / 2
    if "offload" in launch:
        assert on_host == pytest.approx(halved, rel=0.01) and on_device < 0.2 * halved
    else:
        assert halved < on_device < 1.2 * halved and on_host == 0


def test_training_deepspeed_without_a_gpu_stops_early_with_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, where training.deepspeed works")
    result = accelerate_launch("cpu_ddp_2proc.yaml", "--training.deepspeed", "deepspeed_configs/zero2.json", timeout=120)
    assert result.returncode != 0
    assert said(result.stderr, "training.deepspeed needs GPUs") == 1, result.stderr[-3000:]
    assert "AssertionError" not in result.stderr



def test_an_fsdp_launch_that_accelerate_runs_without_fsdp_stops(tmp_path):
    """Without sftkit's workaround, Accelerate 1.15 turns an FSDP launch on CPU processes into plain data parallel
    (a full copy per process) without a word; sftkit refuses such a run instead of training it."""
    script = tmp_path / "sft_without_workaround.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(REPO)!r})\nimport sftkit.train\n"
                      "sftkit.train.allow_fsdp_on_cpu = lambda: None\n"
                      "from sftkit.cli import main\nraise SystemExit(main())\n")
    command = [ACCELERATE, "launch", "--config_file", "accelerate_configs/fsdp2.yaml", "--num_processes", "2",
               str(script), "--training.output_dir", str(tmp_path / "out"), *STEPS]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert said(result.stderr, "the launch asks for FSDP, but Accelerate (distributed type MULTI_CPU) did not turn "
                               "it on") == 1, result.stderr[-3000:]


def test_a_checkpoint_whose_schedule_deepspeed_steps_is_resumed(tmp_path):
    """A DeepSpeed config that names its own optimizer (zero3_offload.json does) has DeepSpeed step the schedule and
    keep its state in DeepSpeed's files: the Trainer writes no scheduler.pt, and every checkpoint was taken for one
    of the model alone, so a stopped offload run could never resume."""
    from sftkit.checkpoints import resume_problem

    zero2 = json.loads((REPO / "deepspeed_configs" / "zero2.json").read_text())
    zero2["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                      "weight_decay": "auto", "torch_adam": True}}
    (tmp_path / "zero2_own_optimizer.json").write_text(json.dumps(zero2))
    launch = (REPO / "accelerate_configs" / "deepspeed_zero2.yaml").read_text().replace(
        "deepspeed_configs/zero2.json", str(tmp_path / "zero2_own_optimizer.json"))
    (tmp_path / "launch.yaml").write_text(launch)
    out = tmp_path / "out"
    args = ["--config", "configs/lora_train_config.yaml", "--training.output_dir", str(out), "--training.save_strategy",
            "steps", "--training.save_steps", "2", "--dataset.test_size", "null"]
    command = [ACCELERATE, "launch", "--config_file", str(tmp_path / "launch.yaml"), "--num_processes", "2", "sft.py"]
    first = subprocess.run([*command, *args, "--training.max_steps", "4"], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (out / "checkpoint-4" / "scheduler.pt").exists() and list((out / "checkpoint-4").glob("global_step*"))
    assert resume_problem(out / "checkpoint-4") is None
    longer = subprocess.run([*command, *args, "--training.max_steps", "6", "--training.resume_from_checkpoint",
                             "true"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert f"resumes from {out / 'checkpoint-4'}" in longer.stdout, longer.stdout[-3000:]
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 6


def test_a_16_bit_full_fine_tune_gathered_in_fp32_is_published_in_16_bit(tmp_path):
    """FSDP2 under bf16 mixed precision keeps fp32 master weights, so the state dict it gathers is fp32 (a
    fsdp2.yaml run of the default config with training.bf16 true published float32 before this)."""
    from safetensors.torch import load_file, save_file

    from sftkit.export import _cast_float32_weights

    save_file({"weight": torch.ones(2, 2), "position": torch.tensor([3])}, tmp_path / "model.safetensors")
    save_file({"norm": torch.ones(2), "weight": torch.ones(2, dtype=torch.bfloat16)},
              tmp_path / "model-mixed.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float32", "text_config": {"dtype": "float32"}}))
    _cast_float32_weights(tmp_path, torch.bfloat16, trust_remote_code=False)
    assert {name: tensor.dtype for name, tensor in load_file(tmp_path / "model.safetensors").items()} == {
        "weight": torch.bfloat16, "position": torch.int64}
    assert load_file(tmp_path / "model-mixed.safetensors")["norm"].dtype == torch.float32  # kept in fp32 on purpose
    # what from_pretrained(dtype="auto") loads in, as the weights are saved
    assert json.loads((tmp_path / "config.json").read_text()) == {"dtype": "bfloat16", "text_config": {"dtype": "bfloat16"}}


def test_every_shipped_launch_config_loads_and_is_in_the_readme_table():
    """Accelerate reads each file (an unknown key fails), the DeepSpeed file it names exists, and the README's table
    of launch configs lists it."""
    from accelerate.commands.config.config_args import load_config_from_file

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Multi-GPU and multi-node"):]
    table = section[:section.index("\n## ")]
    for path in sorted((REPO / "accelerate_configs").glob("*.yaml")):
        config = load_config_from_file(str(path))
        deepspeed = (config.deepspeed_config or {}).get("deepspeed_config_file")
        assert deepspeed is None or (REPO / deepspeed).is_file(), path.name
        assert config.num_processes % config.num_machines == 0, path.name
        assert f"| `accelerate_configs/{path.name}`" in table, f"{path.name} is missing from the README table"


def test_a_zero2_checkpoint_resumed_under_zero3_is_refused_before_loading_with_one_line(tmp_path):
    """The engine was recorded nowhere: DeepSpeed failed on both processes with a bare AssertionError once everything
    had loaded, and the finished run's record was turned into "failed"."""
    out = tmp_path / "out"
    saving = ["--training.save_strategy", "steps", "--training.save_steps", "2", "--dataset.test_size", "null",
              "--training.output_dir", str(out)]
    result = accelerate_launch("cpu_zero2_2proc.yaml", *saving, "--training.max_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "checkpoint-2" / "sftkit_run.json").read_text())["engine"] == "DeepSpeed ZeRO-2"
    result = accelerate_launch("cpu_zero3_2proc.yaml", *saving, "--training.max_steps", "4",
                               "--training.resume_from_checkpoint", "true", timeout=180)
    assert result.returncode != 0 and "AssertionError" not in result.stderr, result.stderr[-3000:]
    assert said(result.stderr, f"{out}/checkpoint-2 was saved under DeepSpeed ZeRO-2 and this launch runs DeepSpeed "
                               "ZeRO-3, which cannot load it") == 1, result.stderr[-3000:]
    assert json.loads((out / "sftkit_run.json").read_text())["status"] == "finished"
    # refused by the main process alone: the other one, left in the barrier, said it had lost contact with another
    # process that "stopped, or its machine went away"
    result = accelerate_launch("cpu_ddp_2proc.yaml", *saving, "--training.max_steps", "2", timeout=180)
    assert result.returncode != 0 and said(result.stderr, f"{out} already holds a trained model") == 1
    assert "lost contact" not in result.stderr, result.stderr[-3000:]
    # --overwrite's stop check asked every process from the main one alone, and the launch hung (helper-79)
    result = accelerate_launch("cpu_ddp_2proc.yaml", *saving, "--training.max_steps", "2", "--overwrite",
                               timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "sftkit_run.json").read_text())["status"] == "finished"
    assert not list(out.glob(".sftkit-replaced*"))


@pytest.mark.parametrize("failing", [0, 1])
def test_a_final_evaluation_failing_on_one_process_keeps_the_trained_model(tmp_path, failing):
    """One process alone ran out of memory in the final evaluation: the other waited for it in the evaluation's
    collectives until the launch was torn down, and nothing of the trained model was on disk (no checkpoint at the
    last step). The weights are now written before the evaluation: the main process publishes them where another
    process failed, and `sftkit export` does where the main one did."""
    from sftkit.export import main as export_main
    from sftkit.layout import ADAPTER_DIR, RUN_FILE, STAGING_DIR

    script = tmp_path / "sft_eval_oom.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(REPO)!r})
import torch
from sftkit import monitor
prediction_step = monitor.MonitoredSFTTrainer.prediction_step

def out_of_memory_on_one_process(self, *args, **kwargs):
    if self.guard.training_over and os.environ["RANK"] == "{failing}":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.83 GiB")
    return prediction_step(self, *args, **kwargs)

monitor.MonitoredSFTTrainer.prediction_step = out_of_memory_on_one_process
from sftkit.cli import main
raise SystemExit(main())
""")
    out = tmp_path / "out"
    started = time.perf_counter()
    result = subprocess.run([ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_zero3_2proc.yaml",
                             "--num_processes", "2", str(script), "--config", "lora_train_config.yaml",
                             "--training.output_dir", str(out), "--training.max_steps", "4"],
                            cwd=REPO, capture_output=True, text=True, timeout=400)
    assert result.returncode != 0 and time.perf_counter() - started < 300, result.stderr[-3000:]
    kept = f"the trained adapter is kept in {out / STAGING_DIR / ADAPTER_DIR}: finish the export with: python -m " \
           f"sftkit.export {out}"
    kept = kept if failing == 0 else f"the main process publishes the trained model without it (if it is stopped " \
                                     f"first, {kept})"
    assert f"sft.py: error: the final evaluation failed on process {failing} (OutOfMemoryError: CUDA out of memory. " \
           f"Tried to allocate 7.83 GiB); {kept}" in result.stderr, result.stderr[-3000:]
    assert not list(out.glob("checkpoint-*"))
    if failing == 0:
        assert not (out / "config.json").exists()
        assert export_main([str(out)]) == 0
    else:
        assert "the trained model is published without the final evaluation and sample reply" in result.stderr, \
            result.stderr[-3000:]
    AutoModelForCausalLM.from_pretrained(out)
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"


def test_a_disk_that_stays_read_only_as_the_export_begins_stops_every_process(tmp_path):
    """The main process gave up waiting for the disk before the barrier the other waited at, and then waited in
    another collective: both hung until killed, leaving the lock and an "exporting" record."""
    from conftest import tmpfs

    script = tmp_path / "sft_read_only.py"
    with tmpfs(tmp_path / "disk", "size=64m") as disk:
        script.write_text(f"""import os, subprocess, sys
sys.path.insert(0, {str(REPO)!r})
import sftkit.train
trained = sftkit.train._stop_unless_trained

def read_only_as_training_ends(trainer):
    if os.environ["RANK"] == "0":
        subprocess.run(["mount", "-o", "remount,ro", {str(disk)!r}], check=True)
    return trained(trainer)

sftkit.train._stop_unless_trained = read_only_as_training_ends
from sftkit.cli import main
raise SystemExit(main())
""")
        out = disk / "out"
        started = time.perf_counter()
        result = subprocess.run([ACCELERATE, "launch", "--config_file", "accelerate_configs/cpu_ddp_2proc.yaml",
                                 "--num_processes", "2", str(script), "--training.output_dir", str(out),
                                 "--training.max_steps", "2", "--dataset.test_size", "null"],
                                cwd=REPO, capture_output=True, text=True, timeout=150,
                                env={**os.environ, "SFTKIT_DISK_WAIT_SECONDS": "2"})
        assert result.returncode != 0 and time.perf_counter() - started < 100, result.stderr[-3000:]
        assert f"could not write the trained model to {out / '.export-incomplete'}" in result.stderr, \
            result.stderr[-3000:]


def test_a_shipped_deepspeed_launch_config_runs_from_the_users_own_directory(tmp_path):
    """Its deepspeed_config_file, deepspeed_configs/zero3.json, was looked up from the working directory only: from
    the user's project the run was refused as if its config's training section were wrong."""
    command = [ACCELERATE, "launch", "--config_file", str(REPO / "accelerate_configs" / "cpu_zero3_2proc.yaml"),
               "-m", "sftkit", "train", "--dry-run", "--training.output_dir", str(tmp_path / "out")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ZeRO-3" in result.stdout, result.stdout
