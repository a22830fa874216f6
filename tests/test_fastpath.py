"""The fast path: what a run turns on when the config leaves it out, on a GPU and on this CPU, and torch.compile on
the tiny model (one compile for every step of packed batches, the same losses)."""

import pytest
from conftest import TINY_MODEL, run_sft
from safetensors import safe_open

from sftkit.config import ModelConfig, load_config
from sftkit.errors import ConfigError
from sftkit.fastpath import PACKED_LENGTH_MULTIPLE, choose
from sftkit.train import train

NOTHING, BOTH = set(), {"flash_attn", "liger_kernel"}


def chosen(training: dict, model: ModelConfig | None = None, gpu: bool = True, installed=NOTHING) -> dict:
    model = model or ModelConfig(dtype="bfloat16")
    return {choice.key: (choice.value, choice.why, choice.chosen) for choice in choose(training, model, gpu, installed)}


def test_on_a_gpu_compile_is_on_and_what_is_installed_is_used():
    training = {}
    choices = chosen(training, installed=BOTH)
    assert training == {"torch_compile": True, "use_liger_kernel": True}
    assert choices["model.attn_implementation"][0] == "flash_attention_2"
    assert choices["training.use_liger_kernel"][1].startswith("installed: fused linear cross-entropy")


def test_on_a_gpu_without_the_extras_each_choice_says_what_to_install():
    choices = chosen({}, installed=NOTHING)
    assert choices["training.use_liger_kernel"][:2] == (False, "not installed: pip install -r requirements-gpu.txt")
    assert choices["model.attn_implementation"][:2] == ("sdpa", "transformers' default; pip install flash-attn for "
                                                                "packed batches")
    assert chosen({}, ModelConfig(dtype="float32"), installed=BOTH)["model.attn_implementation"][0] == "sdpa"


def test_the_configs_own_settings_are_kept():
    training = {"torch_compile": False, "use_liger_kernel": False}
    choices = chosen(training, ModelConfig(attn_implementation="eager"), installed=BOTH)
    assert training == {"torch_compile": False, "use_liger_kernel": False}
    assert all(not was_chosen for _, _, was_chosen in choices.values())
    assert choose({}, ModelConfig(attn_implementation="eager"), True, BOTH)[2].describe() == \
        "attn_implementation eager (set in the config)"


@pytest.mark.parametrize(("model", "training", "why"), [
    (ModelConfig(use_lora=True, load_in_4bit=True), {}, "not measured with 4-bit layers"),
    (ModelConfig(), {"deepspeed": "deepspeed_configs/zero3.json"}, "not measured under DeepSpeed or FSDP"),
])
def test_compile_stays_off_where_it_was_not_measured(model, training, why):
    value, reason, _ = chosen(training, model)["training.torch_compile"]
    assert value is False and reason.startswith(why) and "set training.torch_compile: true to try" in reason


def test_an_attention_the_model_cannot_use_is_named_with_the_way_out():
    from sftkit.model import check_model_source

    with pytest.raises(ConfigError, match=r"model.attn_implementation: flash_attention_2 \(sftkit's choice where "
                                          r"flash-attn is installed and the setting is left out\) cannot be used: .*; "
                                          r"set model.attn_implementation: sdpa \(or eager\)"):
        check_model_source(ModelConfig(path=str(TINY_MODEL), attn_implementation="flash_attention_2"))


def test_compile_under_an_accelerate_deepspeed_launch_stays_off(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert chosen({})["training.torch_compile"][0] is False


def test_compiled_packed_batches_are_rounded_up_unless_the_config_says():
    training = {"packing": True}
    chosen(training)
    assert training["pad_to_multiple_of"] == PACKED_LENGTH_MULTIPLE
    training = {"packing": True, "pad_to_multiple_of": 8}
    chosen(training)
    assert training["pad_to_multiple_of"] == 8
    training = {"packing": True, "packing_strategy": "wrapped"}  # rows of a fixed length already
    chosen(training)
    assert "pad_to_multiple_of" not in training


def test_this_cpu_run_shows_its_choices_in_the_plan_and_keeps_them_off(tmp_path):
    config = load_config(None, ["--training.output_dir", str(tmp_path)])
    assert config.training.torch_compile is False and config.training.use_liger_kernel is False
    assert [choice.key for choice in config.speed] == ["training.torch_compile", "training.use_liger_kernel",
                                                       "model.attn_implementation"]
    plan = run_sft("--dry-run", "--training.output_dir", str(tmp_path)).stdout
    assert "  speed              torch_compile off (a CPU run: compiling takes minutes), use_liger_kernel off (GPU " \
           "kernels), attn_implementation sdpa (transformers' default)" in plan


@pytest.mark.slow
def test_compile_trains_the_tiny_model_like_eager_on_packed_batches_of_one_shape(tmp_path):
    """Packed rows of at most 32 tokens, 2 to a batch: every padding-free batch is rounded up to 64 tokens, one shape
    for the compiled model (each new length would be a recompile)."""
    from torch._dynamo.utils import counters

    args = ["--training.max_steps", "3", "--training.logging_steps", "1", "--dataset.test_size", "null",
            "--training.packing", "true", "--model.max_seq_length", "32", "--training.per_device_train_batch_size", "2"]
    eager = train(load_config(None, ["--training.output_dir", str(tmp_path / "eager"), *args]))
    counters.clear()
    compiled = train(load_config(None, ["--training.output_dir", str(tmp_path / "compiled"),
                                        "--training.torch_compile", "true", *args]))
    assert counters["aot_autograd"]["total"] >= 1, "the model was compiled"
    assert compiled.trainer.args.pad_to_multiple_of == PACKED_LENGTH_MULTIPLE
    lengths = {batch["input_ids"].shape[1] for batch in compiled.trainer.get_train_dataloader()}
    assert lengths == {PACKED_LENGTH_MULTIPLE}
    losses = [[entry["loss"] for entry in run.trainer.state.log_history if "loss" in entry] for run in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    with safe_open(tmp_path / "eager" / "model.safetensors", "pt") as eager_file, \
            safe_open(tmp_path / "compiled" / "model.safetensors", "pt") as compiled_file:
        assert set(compiled_file.keys()) == set(eager_file.keys()), "the compiled model saved under its own names"
