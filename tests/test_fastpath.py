"""The fast path: what a run turns on when the config leaves it out, on a GPU and on this CPU, and torch.compile on
the tiny model (one compile for every step of packed batches, the same losses)."""

import json
import os

import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL, run_sft
from safetensors import safe_open

from sftkit.config import load_config
from sftkit.errors import ConfigError
from sftkit.fastpath import PACKED_LENGTH_MULTIPLE, choose, use_expandable_segments
from sftkit.schema import ModelConfig
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
    assert choices["training.use_liger_kernel"][1].startswith("installed: fused norm, SwiGLU and RoPE kernels")


def test_on_a_gpu_without_the_extras_each_choice_says_what_to_install():
    choices = chosen({"packing": True}, installed=NOTHING)
    assert choices["training.use_liger_kernel"][:2] == (False, "not installed: pip install -r requirements-gpu.txt")
    attention, why, _ = choices["model.attn_implementation"]
    assert attention == "sdpa" and why.startswith("transformers' default; packed batches reach it with a mask")
    assert "pip install flash-attn, or set model.allow_hub_kernels: true, or try model.attn_implementation: " \
           "torch_varlen" in why
    assert chosen({}, installed=NOTHING)["model.attn_implementation"][:2] == ("sdpa", "transformers' default")
    assert chosen({}, ModelConfig(dtype="float32"), installed=BOTH)["model.attn_implementation"][0] == "sdpa"
    # dtype auto: float32 weights when the run is not bf16 (model.resolve_dtype), and flash attention takes 16 bits only
    assert chosen({"bf16": False}, ModelConfig(), installed=BOTH)["model.attn_implementation"][0] == "sdpa"
    assert chosen({"fp16": True}, ModelConfig(), installed=BOTH)["model.attn_implementation"][0] == "sdpa"
    assert chosen({"bf16": True}, ModelConfig(), installed=BOTH)["model.attn_implementation"][0] == "flash_attention_2"


def test_the_hubs_flash_attention_is_used_only_where_the_config_allows_it():
    allowed = ModelConfig(dtype="bfloat16", allow_hub_kernels=True)
    attention, why, _ = chosen({"packing": True}, allowed, installed={"kernels"})["model.attn_implementation"]
    assert (attention, allowed.attn_implementation) == ("flash_attention_2", "flash_attention_2")
    assert why.startswith("model.allow_hub_kernels: transformers loads it from the Hub's kernels-community")
    assert chosen({"packing": True}, installed={"kernels"})["model.attn_implementation"][0] == "sdpa"
    without_package = chosen({"packing": True}, ModelConfig(dtype="bfloat16", allow_hub_kernels=True))
    assert "pip install flash-attn, or pip install kernels, or try" in without_package["model.attn_implementation"][1]
    flash_first = chosen({}, ModelConfig(dtype="bfloat16", allow_hub_kernels=True), installed={"kernels", "flash_attn"})
    assert flash_first["model.attn_implementation"][1] == "flash-attn installed: variable-length kernels for packed " \
                                                          "batches"


def test_a_hub_kernel_the_model_cannot_use_names_the_setting_that_chose_it():
    from sftkit.model import check_model_source

    with pytest.raises(ConfigError, match=r"flash_attention_2 \(sftkit's choice where model.allow_hub_kernels is on: "
                                          r".*; set model.attn_implementation: sdpa \(or eager\), or set "
                                          r"model.allow_hub_kernels: false$"):
        check_model_source(ModelConfig(path=str(TINY_MODEL), attn_implementation="flash_attention_2",
                                       allow_hub_kernels=True))


def test_the_configs_own_settings_are_kept():
    training = {"torch_compile": False, "use_liger_kernel": False}
    choices = chosen(training, ModelConfig(attn_implementation="eager"), installed=BOTH)
    assert training == {"torch_compile": False, "use_liger_kernel": False}
    assert all(not was_chosen for key, (_, _, was_chosen) in choices.items() if key != "cuda_allocator")
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

    with pytest.raises(ConfigError, match=r"model.attn_implementation: flash_attention_2 \(as set, or as sftkit chooses "
                                          r"where flash-attn is installed and the key is left out\) cannot be used: .*; "
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


def test_the_adapter_inputs_choice_under_deepspeed_gives_the_runs_own_precision(tmp_path):
    """A float32 ZeRO-2 LoRA run's plan said "DeepSpeed trains the whole model in 16 bits". The selection alone: a
    DeepSpeed launch takes GPUs or two processes (tests/test_distributed.py)."""
    import dataclasses
    from types import SimpleNamespace

    from sftkit.fastpath import choose_adapter_inputs

    model = load_config(None, ["--training.output_dir", str(tmp_path), "--model.use_lora", "true"]).model
    for bf16, why in ((True, "DeepSpeed trains the whole model in 16 bits"),
                      (False, "no mixed precision: the inputs take the adapters' dtype")):
        args = SimpleNamespace(bf16=bf16, fp16=False, deepspeed_plugin=object())
        choice = choose_adapter_inputs(dataclasses.replace(model, cast_adapter_inputs=None), args, gpu=True)[0]
        assert choice.why.startswith(why) and choice.value is True


@pytest.mark.parametrize(("overrides", "expected"), [
    (["--training.bf16", "true"], (False, "mixed precision: the adapters compute in 16 bits")),
    (["--training.bf16", "false"], (True, "no mixed precision: the inputs take the adapters' dtype")),
    (["--training.bf16", "true", "--model.lora_config.use_dora", "true"],
     (True, "DoRA computes its weight norm in the inputs' dtype")),
    (["--training.bf16", "true", "--model.load_in_4bit", "true"], (True, "QLoRA's adapters are bf16 already")),
    (["--training.bf16", "true", "--model.cast_adapter_inputs", "true"], (True, "")),
])
def test_adapter_inputs_stay_in_16_bits_under_mixed_precision_but_not_for_dora_or_qlora(tmp_path, overrides, expected):
    config = load_config(None, ["--training.output_dir", str(tmp_path), "--model.use_lora", "true", *overrides])
    choice = config.speed[-1]
    assert choice.key == "model.cast_adapter_inputs"
    assert (choice.value, choice.why[:len(expected[1])]) == expected
    assert config.model.cast_adapter_inputs is expected[0]
    full = load_config(None, ["--training.output_dir", str(tmp_path), "--training.bf16", "true"])
    assert "model.cast_adapter_inputs" not in [choice.key for choice in full.speed]


def test_skipping_the_casts_without_mixed_precision_is_refused_before_loading(tmp_path):
    """Without autocast nothing would bring float32 adapters and 16-bit inputs to one dtype: the first step fails."""
    result = run_sft("--training.output_dir", str(tmp_path), "--model.use_lora", "true", "--training.bf16", "false",
                     "--model.dtype", "bfloat16", "--model.cast_adapter_inputs", "false", check=False)
    assert result.returncode == 2 and not (tmp_path / "sftkit_run.json").exists()
    assert result.stderr.strip().splitlines()[-1].endswith(
        "model.cast_adapter_inputs: false needs bf16 or fp16 mixed precision (training.bf16 or training.fp16, not "
        "under DeepSpeed), where autocast computes the adapters in 16 bits; remove the setting")


def train_bf16_lora(output_dir, *overrides: str, callbacks=()):
    """sftkit's trainer on the tiny model, LoRA in bf16 mixed precision, dropout off (nothing drawn at random)."""
    from transformers import set_seed

    from sftkit.data import prepare_data
    from sftkit.model import load_model, load_tokenizer, lora_config, resolve_dtype
    from sftkit.monitor import MonitoredSFTTrainer

    config = load_config(None, ["--training.output_dir", str(output_dir), "--model.use_lora", "true",
                                "--training.bf16", "true", "--model.lora_config.lora_dropout", "0",
                                "--training.logging_steps", "1", "--dataset.test_size", "null", *overrides])
    set_seed(0)
    tokenizer = load_tokenizer(config.model, config.dataset)
    data = prepare_data(config.dataset, tokenizer, config.training.max_length)
    model = load_model(config.model, resolve_dtype(config.model, config.training), False)
    trainer = MonitoredSFTTrainer(model=model, args=config.training, train_dataset=data.train,
                                  processing_class=tokenizer, peft_config=lora_config(config.model),
                                  cast_adapter_inputs=config.model.cast_adapter_inputs, callbacks=list(callbacks))
    return trainer


def logged(trainer) -> list[tuple[float, float]]:
    return [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "loss" in entry]


def test_bf16_adapters_without_input_casts_train_exactly_as_with_them(tmp_path):
    """PEFT copies each adapter input to float32 and autocast copies it back to bf16 for the matmul: skipping both
    changes no loss and no gradient."""
    runs = {}
    for cast in ("true", "false"):
        trainer = train_bf16_lora(tmp_path / cast, "--model.cast_adapter_inputs", cast, "--training.max_steps", "4")
        input_dtypes = set()
        for name, module in trainer.model.named_modules():
            if name.endswith("lora_A.default"):
                module.register_forward_pre_hook(lambda _, inputs: input_dtypes.add(inputs[0].dtype))
        trainer.train()
        runs[cast] = logged(trainer), input_dtypes
    assert (runs["true"][1], runs["false"][1]) == ({torch.float32}, {torch.bfloat16})
    assert len(runs["false"][0]) == 4 and runs["false"][0] == runs["true"][0]


@pytest.mark.slow
def test_compiled_bf16_lora_without_input_casts_compiles_once_and_trains_like_eager(tmp_path):
    """PEFT's switch is turned off and on around every loss: the compiled model must not see that as a change and
    recompile each step. Packed batches of one shape (rows of 128 tokens, 2 to a batch)."""
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    class GraphsPerStep(TrainerCallback):
        def __init__(self):
            self.graphs = []

        def on_step_end(self, args, state, control, **kwargs):
            self.graphs.append(counters["stats"]["unique_graphs"])

    packed = ["--training.packing", "true", "--model.max_seq_length", "128", "--training.max_steps", "6",
              "--training.per_device_train_batch_size", "2"]
    eager = train_bf16_lora(tmp_path / "eager", *packed)
    eager.train()
    counters.clear()
    graphs = GraphsPerStep()
    compiled = train_bf16_lora(tmp_path / "compiled", *packed, "--training.torch_compile", "true", callbacks=[graphs])
    assert compiled.cast_adapter_inputs is False
    compiled.train()
    assert graphs.graphs[0] >= 1 and graphs.graphs[-1] == graphs.graphs[0], graphs.graphs
    losses = [[loss for loss, _ in logged(run)] for run in (eager, compiled)]
    assert losses[1] == pytest.approx(losses[0], rel=0.05)  # bf16: the compiled kernels round differently


@pytest.mark.slow
def test_compiled_packed_batches_of_varying_length_never_recompile_for_a_new_length(tmp_path):
    """Rows of 1 to 5 sample conversations, packed to 256 tokens, two to a micro-batch: its length and its number of
    conversations change from step to step. Marked dynamic before the first compile, no new batch sends torch back
    to compiling; unmarked, it compiles the model for the first shapes and again for each of the two lengths once
    it sees it change (TRL's loss tiles, past a graph break, still may: their tensors are not the batch's)."""
    from torch._dynamo.utils import guard_failures

    sample = [json.loads(line)["messages"] for line in SAMPLE_DATA.read_text().splitlines()]
    rows = [{"messages": [message for k in range(1 + i % 5) for message in sample[(3 * i + k) % len(sample)]]}
            for i in range(40)]
    (tmp_path / "chained.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    trainer = train_bf16_lora(tmp_path / "run", "--dataset.name", str(tmp_path / "chained.jsonl"),
                              "--training.packing", "true", "--model.max_seq_length", "256",
                              "--training.per_device_train_batch_size", "2", "--training.max_steps", "8",
                              "--training.torch_compile", "true")
    batches = list(trainer.get_train_dataloader())
    assert len({batch["input_ids"].shape[1] for batch in batches}) > 1
    assert len({batch["cu_seq_lens_q"].shape[0] for batch in batches}) > 1
    guard_failures.clear()
    trainer.train()
    trainer.evaluate(trainer.train_dataset.select(range(6)))
    for_a_batch = [reason for reasons in guard_failures.values() for reason in reasons if "kwargs[" in reason]
    assert for_a_batch == []


def test_a_bf16_lora_run_without_input_casts_checkpoints_evaluates_replies_and_exports(tmp_path):
    """The casts are skipped only inside the Trainer's training and evaluation steps: activation checkpointing runs
    each layer's forward again in the backward pass, which must see the same dtypes (with dropout on, a recomputed
    float32 input fails torch's check), and generation (sample replies, the final reply) runs outside autocast,
    where the float32 adapters need float32 inputs."""
    run = train(load_config(None, ["--training.output_dir", str(tmp_path), "--model.use_lora", "true",
                                   "--training.bf16", "true", "--training.max_steps", "2",
                                   "--training.gradient_checkpointing", "true",
                                   "--model.lora_config.lora_dropout", "0.1",
                                   "--dataset.sample_prompts", "[\"What color is an orange?\"]"]))
    assert run.trainer.cast_adapter_inputs is False
    assert run.summary["sample_reply"] is not None
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "lora_weights").is_dir()


def test_the_command_sets_expandable_segments_before_cuda_unless_the_user_chose(tmp_path, monkeypatch):
    from sftkit.cli import main

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "SFTKIT_SET_ALLOC_CONF"):
        monkeypatch.setenv(name, "")  # recorded, so that teardown puts back what the session had
        monkeypatch.delenv(name)
    assert chosen({})["cuda_allocator"][:2] == ("PyTorch's default", "sftkit's command sets expandable segments")
    assert main(["--dry-run", "--training.output_dir", str(tmp_path)]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert chosen({})["cuda_allocator"] == ("expandable_segments:True", "packed batches vary in length; cached blocks "
                                            "of fixed size fragment (set PYTORCH_ALLOC_CONF to choose)", True)
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:512")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    use_expandable_segments()
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    assert choose({}, ModelConfig(), True, NOTHING)[-1].describe() == \
        "cuda_allocator max_split_size_mb:512 (set in the environment)"
    assert "cuda_allocator" not in chosen({}, gpu=False)


def chained_rows(tmp_path, count: int = 40):
    """Rows of 1 to 5 sample conversations: packed, their lengths and number change from batch to batch."""
    sample = [json.loads(line)["messages"] for line in SAMPLE_DATA.read_text().splitlines()]
    rows = [{"messages": [message for k in range(1 + i % 5) for message in sample[(3 * i + k) % len(sample)]]}
            for i in range(count)]
    (tmp_path / "chained.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(tmp_path / "chained.jsonl")


def test_compiled_padding_free_batches_give_the_kernels_max_length_as_their_longest_conversation(tmp_path):
    """TRL's collator gives each packed batch the length of its longest conversation, as an int; a varlen kernel
    (flash_attention_2, torch_varlen) that reads it makes torch compile the whole model again when it first changes.
    Under compile sftkit hands the kernels training.max_length instead, which none exceeds: one compile. On this CPU
    the kernel's compiling is checked on fake CUDA tensors (torch traces the kernel without running it), with the
    boundaries of the run's own batches."""
    from torch._dynamo.testing import CompileCounter
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers.models.llama.modeling_llama import LlamaAttention

    from sftkit import varlen

    packed = ["--dataset.name", chained_rows(tmp_path), "--training.packing", "true", "--model.max_seq_length", "256",
              "--training.per_device_train_batch_size", "2"]
    compiled = train_bf16_lora(tmp_path / "compiled", *packed, "--training.torch_compile", "true")
    eager = train_bf16_lora(tmp_path / "eager", *packed)
    batches = list(compiled.get_train_dataloader())
    longest = [batch["max_length_q"] for batch in batches]
    assert len(set(longest)) > 1 and max(longest) <= 256
    given = [compiled._prepare_inputs(dict(batch)) for batch in batches]
    assert {(inputs["max_length_q"], inputs["max_length_k"]) for inputs in given} == {(256, 256)}
    assert [eager._prepare_inputs(dict(batch))["max_length_q"] for batch in batches] == longest

    if not varlen.available():
        pytest.skip("this torch has no varlen attention")
    module = compiled.model.get_base_model().model.layers[0].self_attn
    assert isinstance(module, LlamaAttention)
    heads, kv_heads = module.config.num_attention_heads, module.config.num_key_value_heads

    def attention(q, k, v, cu, max_length):
        return varlen.attention(module, q, k, v, None, scaling=module.scaling, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                max_length_q=max_length, max_length_k=max_length)[0]

    def compiles(max_lengths) -> int:
        torch._dynamo.reset()
        counter = CompileCounter()
        step = torch.compile(attention, backend=counter, fullgraph=True)
        boundaries = [batch["cu_seq_lens_q"].tolist() for batch in batches]
        with FakeTensorMode(allow_non_fake_inputs=True):
            for bounds, max_length in zip(boundaries, max_lengths):
                q, k = (torch.empty(1, n, bounds[-1], module.head_dim, device="cuda", dtype=torch.bfloat16)
                        for n in (heads, kv_heads))
                cu = torch.tensor(bounds, device="cuda", dtype=torch.int32)
                for tensor, tokens in ((q, 2), (k, 2), (cu, 0)):  # as the batch's lengths are marked
                    torch._dynamo.maybe_mark_dynamic(tensor, tokens)
                step(q, k, k, cu, max_length)
        torch._dynamo.reset()
        return counter.frame_count

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))  # what an H100 answers
        varlen._flash_capable.cache_clear()
        try:
            assert compiles([inputs["max_length_q"] for inputs in given]) == 1
            assert compiles(longest) == 2
        finally:
            varlen._flash_capable.cache_clear()
