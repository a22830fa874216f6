"""Config loading: every shipped file validates; typos, wrong types and conflicts fail together, naming the key."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, SAMPLE_DATA, TINY_MODEL, run_python

from sftkit.config import _paths_found_beside, load_config
from sftkit.errors import ConfigError
from sftkit.paths import CONFIGS_DIR, PRESETS_DIR, find_config_file

SHIPPED = sorted(path for path in CONFIGS_DIR.rglob("*.yaml") if path.parent != PRESETS_DIR)
PRESETS = sorted(PRESETS_DIR.glob("*.yaml"))


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


DATA_AND_OUTPUT = "dataset:\n  name: data/sample_chat.jsonl\ntraining:\n  output_dir: out\n"
MINIMAL = "model:\n  path: data/tiny-chat-llama\n" + DATA_AND_OUTPUT


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_validates(path):
    config = load_config(str(path))
    assert config.training.max_length == config.model.max_seq_length
    assert config.training.output_dir
    assert path.read_text().startswith("#"), "shipped configs start with a header comment"
    assert "accelerate launch sft.py" in path.read_text(), "the header gives the launch command"


def test_the_three_presets_are_shipped_and_documented():
    assert [path.stem for path in PRESETS] == ["fast_test", "full_training", "low_memory"]
    for path in PRESETS:
        assert path.read_text().startswith("# Preset:") and f"--preset {path.stem}" in path.read_text()


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_validates_over_every_shipped_config(path):
    for config_path in SHIPPED:
        config = load_config(str(config_path), [], path.stem)
        preset = yaml.safe_load(path.read_text())
        for key, value in preset.get("training", {}).items():
            actual = getattr(config.training, "activation_checkpointing" if key == "gradient_checkpointing" else key)
            if key == "report_to":
                value = [] if value == "none" else [value]
            assert getattr(actual, "value", actual) == value, (config_path.name, key)
        assert config.dataset.name == load_config(str(config_path)).dataset.name, "the user's data is kept"


def test_a_preset_over_sources_leaves_their_own_keys_alone(tmp_path, caplog):
    """fast_test's max_samples is dataset.name's: with dataset.sources each source keeps its own, and the run says
    so (it read and tokenized every row of every source, silently, where the README promises 200)."""
    sources = ("model:\n  path: data/tiny-chat-llama\ndataset:\n  sources:\n    - name: data/sample_chat.jsonl\n"
               "      max_samples: 50\ntraining:\n  output_dir: out\n")
    config = load_config(write(tmp_path, sources), [], "fast_test")
    assert config.dataset.max_samples is None and config.dataset.sources[0].max_samples == 50
    assert config.training.max_steps == 20
    assert "--preset fast_test: its dataset.max_samples 200 is a source's setting, left out under dataset.sources; " \
           "set it in each source" in caplog.text


def test_fast_test_lies_over_a_config_that_keeps_the_best_checkpoint(tmp_path):
    """It set eval_strategy no, and the config's load_best_model_at_end was then refused as the config's mistake."""
    best = ("model:\n  path: data/tiny-chat-llama\ndataset:\n  name: data/sample_chat.jsonl\n  test_size: 0.05\n"
            "training:\n  output_dir: out\n  eval_strategy: steps\n  save_strategy: steps\n"
            "  load_best_model_at_end: true\n  metric_for_best_model: eval_loss\n")
    config = load_config(write(tmp_path, best), [], "fast_test")
    assert (config.training.load_best_model_at_end, config.training.save_strategy) == (False, "no")


def test_preset_lies_between_the_config_and_the_command_line(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "  max_steps: 500\n  logging_steps: 7\n"), ["--training.logging_steps", "3"],
                         "fast_test")
    assert config.training.max_steps == 20, "the preset wins over the config"
    assert config.training.logging_steps == 3, "the command line wins over the preset"
    low = load_config(write(tmp_path, MINIMAL), [], "low_memory")
    assert (low.model.use_lora, low.model.load_in_4bit, low.training.activation_checkpointing) == (True, True, True)
    with pytest.raises(ConfigError, match="config file not found: no_such_preset .*, which has fast_test, "
                                          "full_training, low_memory"):
        load_config(write(tmp_path, MINIMAL), [], "no_such_preset")


def test_eval_data_chosen_on_the_command_line_replaces_the_configs_choice():
    """The default config holds out test_size 0.05: --dataset.eval_sources or --dataset.eval_split was refused for
    setting two of the three. Two given on the command line are the command line's error, not the config file's; an
    empty list chooses nothing (it turned evaluation off without a word; helper-74)."""
    sources = load_config(None, ["--dataset.eval_sources", f"[{{name: {SAMPLE_DATA}, max_samples: 10}}]"]).dataset
    assert (sources.test_size, sources.eval_sources[0].max_samples) == (None, 10)
    assert load_config(None, ["--dataset.eval_split", "train"]).dataset.test_size is None
    assert load_config(None, ["--dataset.test_size", "0.1"]).dataset.test_size == 0.1
    with pytest.raises(ConfigError, match="^the command line: dataset.test_size and dataset.eval_split are both set"):
        load_config(None, ["--dataset.eval_split", "train", "--dataset.test_size", "0.1"])
    with pytest.raises(ConfigError, match="dataset.test_size and dataset.eval_sources are both set"):
        load_config(None, ["--dataset.eval_sources", "[]"])


def test_resume_from_checkpoint_accepts_true_or_a_path(tmp_path):
    assert load_config(write(tmp_path, MINIMAL), ["--training.resume_from_checkpoint", "true"]).training.resume_from_checkpoint is True
    assert load_config(write(tmp_path, MINIMAL), ["--training.resume_from_checkpoint", "false"]).training.resume_from_checkpoint is None
    assert load_config(write(tmp_path, MINIMAL), ["--training.resume_from_checkpoint", "out/checkpoint-5"]).training.resume_from_checkpoint == "out/checkpoint-5"
    with pytest.raises(ConfigError, match="training.resume_from_checkpoint: expected true or false or a string or null, got 3"):
        load_config(write(tmp_path, MINIMAL), ["--training.resume_from_checkpoint", "3"])


def test_no_config_means_the_shipped_default_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = yaml.safe_load((REPO / "configs" / "default_train_config.yaml").read_text())
    config = load_config(None, [])
    assert config.source.resolve() == (REPO / "configs" / "default_train_config.yaml").resolve()
    assert config.training.num_train_epochs == shipped["training"]["num_train_epochs"]
    assert Path(config.model.path).name == "tiny-chat-llama" and config.dataset.test_size == shipped["dataset"]["test_size"]


def test_bare_name_is_found_in_configs_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config_file("lora_train_config.yaml") == CONFIGS_DIR / "lora_train_config.yaml"
    # the names sftkit init --from takes (`sftkit train lora` was not found)
    assert find_config_file("lora") == CONFIGS_DIR / "lora_train_config.yaml"
    assert find_config_file("qwen2.5_1.5b_full") == CONFIGS_DIR / "examples" / "qwen2.5_1.5b_full.yaml"
    with pytest.raises(ConfigError, match="config file not found: missing.yaml"):
        find_config_file("missing.yaml")


def test_a_configs_own_paths_are_found_beside_it_from_any_directory(tmp_path, monkeypatch):
    """A config kept with its data and DeepSpeed file runs from another directory; the working directory comes
    first, and the project last."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy(SAMPLE_DATA, project / "data" / "chat.jsonl")
    shutil.copy(REPO / "deepspeed_configs" / "zero2.json", project / "ds.json")
    (project / "config.yaml").write_text(
        f"model:\n  path: {TINY_MODEL}\ndataset:\n  name: data/chat.jsonl\n  eval_sources:\n    - name: data/*.jsonl\n"
        "training:\n  output_dir: out\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(str(project / "config.yaml"))
    assert config.dataset.name == str(project / "data" / "chat.jsonl")
    assert config.dataset.eval_sources[0].name == str(project / "data" / "*.jsonl")
    assert config.training.output_dir == "out", "what a run writes goes where it runs"
    # (a DeepSpeed config loaded here would start torch.distributed in the test process, on a port later tests need)
    found = _paths_found_beside({"training": {"deepspeed": "ds.json", "output_dir": "out"}}, project)
    assert found["training"] == {"deepspeed": str(project / "ds.json"), "output_dir": "out"}

    (elsewhere / "data").mkdir()
    shutil.copy(SAMPLE_DATA, elsewhere / "data" / "chat.jsonl")
    assert load_config(str(project / "config.yaml")).dataset.name == "data/chat.jsonl", "the working directory's first"
    with pytest.raises(ConfigError, match=re.escape(f"dataset.name: data/other.jsonl does not exist (looked in "
                                                    f"{elsewhere} and in {project} and in {REPO})")):
        load_config(str(project / "config.yaml"), ["--dataset.name", "data/other.jsonl"])


def test_unknown_keys_in_every_section_are_reported_together_with_suggestions(tmp_path):
    text = (
        "model:\n  use_lorra: true\n  lora_config:\n    rank: 8\n"
        "dataset:\n  name: data/sample_chat.jsonl\n  sytem_prompt: hi\n"
        "training:\n  learning_rat: 0.1\n"
        "trainig: {}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, text))
    message = str(error.value)
    assert "unknown key model.use_lorra (did you mean 'use_lora'?)" in message
    assert "unknown key model.lora_config.rank (did you mean 'r'?)" in message
    assert "unknown key dataset.sytem_prompt (did you mean 'system_prompt'?)" in message
    assert "unknown key training.learning_rat (did you mean 'learning_rate'?)" in message
    assert "unknown section 'trainig' (did you mean 'training'?)" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("section", "key", "meant"),
    [
        ("model", "base_model", "'path'"),  # Axolotl's names
        ("model", "sequence_len", "'max_seq_length'"),
        ("model", "lora_r", "model.lora_config.r"),
        ("training", "micro_batch_size", "'per_device_train_batch_size'"),
        ("training", "batch_size", "'per_device_train_batch_size'"),  # not auto_find_batch_size, the nearest spelling
        ("training", "epochs", "'num_train_epochs'"),
        ("model", "learning_rate", "training.learning_rate"),  # a key of another section
        ("training", "max_seq_length", "model.max_seq_length"),
        ("training", "use_lora", "model.use_lora"),
        ("dataset", "path", "'name'"),  # load_dataset's path, not model.path
        ("dataset", "val_set_size", "'test_size'"),
        ("dataset", "type", "'format'"),  # Axolotl's
        ("training", "warmup_ratio", "'warmup_steps'? transformers 5 removed warmup_ratio: a warmup_steps below 1 is "
                                     "that fraction of the steps"),
        ("dataset", "validation_file", "'eval_sources'? a list of sources: eval_sources: [{name: heldout.jsonl}]"),
        ("dataset", "eval_file", "'eval_sources'? a list of sources"),  # was eval_split, a split's name
        ("training", "sample_packing", "'packing'"),  # was eval_packing, which packs no training (helper-78)
        ("dataset", "test_datasets", "'eval_sources'? a list of sources"),  # was test_size
        ("training", "optimizer", "'optim'"),
        ("model", "flash_attention", "'attn_implementation'? attn_implementation: flash_attention_2, or leave it out"),
        ("model", "template", "dataset.chat_template? leave it out to use the tokenizer's own chat template"),
        ("dataset", "preprocessing_num_workers", "training.dataset_num_proc"),
    ],
)
def test_keys_other_tools_use_or_another_section_holds_are_named_as_sftkit_calls_them(tmp_path, section, key, meant):
    ending = "" if "?" in meant else "?)"
    with pytest.raises(ConfigError, match=re.escape(f"unknown key {section}.{key} (did you mean {meant}{ending}")):
        load_config(write(tmp_path, f"{section}:\n  {key}: 1\n"))


def test_sources_listed_as_bare_paths_are_sources_of_those_names(tmp_path):
    """`sources: [a.jsonl, b.jsonl]` (the obvious YAML) was refused twice per item: "must be a mapping" and "has no
    name"; LLaMA-Factory's comma list in dataset.name said only "does not exist"."""
    sample = str(REPO / "data" / "sample_chat.jsonl")
    config = load_config(None, ["--dataset.name", "null", "--dataset.sources", f"[{sample}]",
                                "--dataset.eval_sources", f"[{sample}]", "--dataset.test_size", "null"])
    assert [source.name for source in config.dataset.sources + config.dataset.eval_sources] == [sample, sample]
    with pytest.raises(ConfigError, match=re.escape(f"dataset.name: {sample},{sample} names several files separated by "
                                                    f"commas (as LLaMA-Factory's dataset: does); list them as "
                                                    f"dataset.sources: [{sample}, {sample}]")):
        load_config(None, ["--dataset.name", f"{sample},{sample}"])


def test_a_key_transformers_removed_says_what_replaces_it(tmp_path):
    """logging_dir, the usual way to gather a sweep's TensorBoard logs, was taken for a typo of logging_first_step."""
    with pytest.raises(ConfigError, match=re.escape("unknown key training.logging_dir (transformers 5 removed "
                                                    "logging_dir: TensorBoard writes under output_dir/runs/, or into "
                                                    "the directory the TENSORBOARD_LOGGING_DIR environment variable")):
        load_config(write(tmp_path, "training:\n  logging_dir: tb/run1\n"))
    with pytest.raises(ConfigError, match=re.escape("unknown key training.overwrite_output_dir (transformers 5 removed "
                                                    "overwrite_output_dir: pass --overwrite to sft.py")):
        load_config(write(tmp_path, "training:\n  overwrite_output_dir: true\n"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model:\n  use_lora: maybe\n", "model.use_lora: expected true or false, got 'maybe'"),
        ("model:\n  max_seq_length: long\n", "model.max_seq_length: expected an integer, got 'long'"),
        ("model:\n  dtype: float64\n", "model.dtype: expected one of auto, float32, bfloat16, float16"),
        ("model:\n  lora_config:\n    target_modules: 3\n", "model.lora_config.target_modules: expected"),
        ("dataset:\n  loss_on: prompt\n", "dataset.loss_on: expected one of assistant, last_assistant, all"),
        ("training:\n  num_train_epochs: many\n", "training.num_train_epochs: expected a number, got 'many'"),
        ("training:\n  per_device_train_batch_size: 2.5\n", "training.per_device_train_batch_size: expected"),
        ("model:\n  load_in_4bit: true\n", "model.load_in_4bit: true needs model.use_lora: true"),
        ("model:\n  merge_adapter: false\n", "model.merge_adapter: false publishes a LoRA adapter alone, but "
         "model.use_lora is false"),
        ("dataset:\n  loss_on: all\n  split_user_turns: true\n", "dataset.split_user_turns: true trains the replies "
         "after each user turn, but dataset.loss_on: all trains every token"),
        ("training:\n  max_length: 64\n", "training.max_length is set from model.max_seq_length"),
        ("dataset:\n  test_size: 0.1\n  eval_split: test\n",
         "dataset.test_size and dataset.eval_split are both set: set only one of dataset.test_size, dataset.eval_split "
         "and dataset.eval_sources"),
        ("dataset:\n  test_size: 2.5\n", "dataset.test_size must be a fraction between 0 and 1, or a row count"),
        ("model: [1, 2]\n", "model must be a mapping"),
        ("model:\n  use_lora: \"false\"\n", "model.use_lora: expected true or false, got 'false' (text, in quotes: "
                                              "remove the quotes)"),
        ("model:\n  lora_config:\n", "model.lora_config is empty: give it keys, or remove the line"),
        ("training:\n  deepspeed: zero2\n", "training.deepspeed: zero2 is not a file; the shipped config of that name "
                                           "is deepspeed_configs/zero2.json"),
    ],
)
def test_bad_values_name_the_key_and_what_is_expected(tmp_path, text, expected):
    text = text + "dataset:\n  name: data/sample_chat.jsonl\n" if "dataset:" not in text else text.replace("dataset:\n", "dataset:\n  name: d.jsonl\n")
    with pytest.raises(ConfigError, match=None) as error:
        load_config(write(tmp_path, text))
    assert expected in str(error.value)


@pytest.mark.parametrize("section", ["model", "dataset", "training"])
@pytest.mark.parametrize("written", ["\n  - num_train_epochs: 1\n", " epochs 3\n"], ids=["a list", "text"])
def test_a_section_that_is_not_a_mapping_is_refused_even_beside_an_override_of_it(tmp_path, section, written):
    """An override of one key merged into a list would have replaced the user's whole section without a word."""
    text = {"model": "model:\n  path: data/tiny-chat-llama\n", "dataset": "dataset:\n  name: data/sample_chat.jsonl\n",
            "training": "training:\n  output_dir: out\n"}
    text[section] = f"{section}:{written}"
    path = write(tmp_path, "".join(text.values()))
    expected = rf"config.yaml: {section} must be a mapping of keys to values .* not (list|str)$"
    for overrides in ([], [f"--{section}.{'path' if section == 'model' else 'name'}", "x"]):
        with pytest.raises(ConfigError, match=expected):
            load_config(path, overrides)


def test_a_whole_message_of_trl_is_kept(tmp_path):
    """TRL's message spans lines; its first line ended in "but found"."""
    with pytest.raises(ConfigError, match=r"requires the save and eval strategy to match, .*but found - Evaluation "
                                          r"strategy: .*STEPS - Save strategy: .*EPOCH"):
        load_config(write(tmp_path, MINIMAL + "  eval_strategy: steps\n  eval_steps: 10\n  save_strategy: epoch\n"
                                              "  load_best_model_at_end: true\n"), ["--dataset.test_size", "0.1"])


def test_lora_settings_with_lora_off_are_named_as_unused(tmp_path, caplog):
    lora_settings = "model:\n  path: data/tiny-chat-llama\n  lora_config:\n    r: 8\n" + DATA_AND_OUTPUT
    config = load_config(write(tmp_path, lora_settings))
    assert config.model.use_lora is False
    assert "model.lora_config is set but model.use_lora is false" in caplog.text
    caplog.clear()
    load_config(None, ["--model.lora_config.r", "4"])  # on the command line too
    assert "model.lora_config is set but model.use_lora is false" in caplog.text
    caplog.clear()
    load_config(write(tmp_path, lora_settings), ["--model.use_lora", "true"])
    load_config("lora_train_config.yaml", ["--model.use_lora", "false"])  # off on purpose, as the config says to
    load_config("lora_train_config.yaml", preset="full_training")
    assert "lora_config" not in caplog.text


def test_a_saved_config_takes_the_checkpointing_switch_under_either_name(monitored_run):
    """A run's sftkit_config.yaml holds both names (SFTConfig has both fields): turning checkpointing on over it, the
    usual change to fit memory, was refused as two values of one setting."""
    saved = str(monitored_run.out / "sftkit_config.yaml")
    for name in ("gradient_checkpointing", "activation_checkpointing"):
        assert load_config(saved, [f"--training.{name}", "true"]).training.gradient_checkpointing is True


def test_lora_settings_turned_off_on_purpose_are_not_warned_of(tmp_path, caplog):
    """A run of lora_train_config.yaml with --model.use_lora false saves use_lora: false beside its lora_config;
    rerunning that sftkit_config.yaml, or a config that writes use_lora: false itself, warned each time."""
    for text in ("model:\n  path: data/tiny-chat-llama\n  use_lora: false\n  lora_config:\n    r: 8\n",
                 (REPO / "configs" / "lora_train_config.yaml").read_text().replace("use_lora: true", "use_lora: false")):
        load_config(write(tmp_path, text if "dataset:" in text else text + DATA_AND_OUTPUT))
    assert "lora_config" not in caplog.text


@pytest.mark.parametrize(("overrides", "refused"), [
    (["--model.dtype", "float16"], True),
    (["--model.dtype", "float16", "--training.fp16", "true"], True),  # fp16 autocast over float16 weights
    (["--training.fp16", "true"], False),  # model.dtype auto: float32 weights, fp16 mixed precision
    (["--model.dtype", "float16", "--model.use_lora", "true"], False),  # float32 adapters over a frozen fp16 base
])
def test_full_fine_tuning_of_float16_weights_is_refused_and_mixed_precision_is_not(tmp_path, overrides, refused):
    """Pure float16 weights under AdamW: the tiny model's loss went 3.21, 2.84, 57.8, 1071 and the run exited 0."""
    if not refused:
        load_config(write(tmp_path, MINIMAL), overrides)
        return
    with pytest.raises(ConfigError, match=re.escape(
            "model.dtype: float16 with full fine-tuning trains float16 weights, which lose small updates and "
            "overflow; on a GPU without bf16 set training.fp16: true and model.dtype auto (mixed precision keeps "
            "float32 weights), else use model.dtype auto or bfloat16")):
        load_config(write(tmp_path, MINIMAL), overrides)


def test_float16_weights_under_deepspeed_or_fsdp_mixed_precision_are_allowed():
    """Both keep float32 master weights of their own (checked on the raw values: loading a DeepSpeed config here
    would start torch.distributed in the test process)."""
    from sftkit.checks import _precision_errors
    from sftkit.schema import ModelConfig

    model = ModelConfig(path="m", dtype="float16")
    assert _precision_errors(model, {"deepspeed": "ds.json", "fp16": True}) == []
    assert _precision_errors(model, {"fsdp": "full_shard", "bf16": True}) == []
    assert _precision_errors(model, {"deepspeed": "ds.json"})  # no mixed precision: float16 weights train


def test_missing_dataset_name(tmp_path):
    with pytest.raises(ConfigError, match="dataset.name is required"):
        load_config(write(tmp_path, "training:\n  output_dir: out\n"))


def test_numbers_written_the_yaml_1_1_way_are_numbers(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "  learning_rate: 1e-4\n  num_train_epochs: '2'\n"))
    assert config.training.learning_rate == 1e-4
    assert config.training.num_train_epochs == 2.0


def test_cli_overrides_beat_yaml_and_are_validated(tmp_path):
    path = write(tmp_path, MINIMAL + "  learning_rate: 0.1\n")
    config = load_config(path, ["--training.learning_rate", "1e-4", "--model.use_lora=true", "--model.lora_config.r", "4"])
    assert config.training.learning_rate == 1e-4
    assert config.model.use_lora is True
    assert config.model.lora_config.r == 4
    with pytest.raises(ConfigError, match="unknown key model.use_lorra"):
        load_config(path, ["--model.use_lorra", "true"])
    with pytest.raises(ConfigError, match="overrides look like --training.learning_rate 1e-4"):
        load_config(path, ["learning_rate=3"])
    with pytest.raises(ConfigError, match="^override --training.learning_rate has no value: write "
                                          "--training.learning_rate VALUE$"):
        load_config(path, ["--training.learning_rate", "--model.use_lora", "true"])


def test_precision_is_chosen_for_the_hardware_when_not_set(tmp_path):
    import torch

    config = load_config(write(tmp_path, MINIMAL))
    assert config.training.bf16 == (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    assert config.training.fp16 is False


def test_gradient_checkpointing_keeps_its_familiar_name(tmp_path):
    config = load_config(write(tmp_path, MINIMAL + "  gradient_checkpointing: false\n"))
    assert config.training.gradient_checkpointing is False
    assert load_config(write(tmp_path, MINIMAL)).training.gradient_checkpointing is True  # TRL's default


def test_secrets_are_hidden_in_the_resolved_config(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("HF_TOKEN", "")  # so the test leaves HF_TOKEN as it found it
    config = load_config(write(tmp_path, MINIMAL + "  hub_token: hf_secret123\n"))
    assert config.training.hub_token is None, "the Trainer would pickle it into output_dir"
    assert os.environ["HF_TOKEN"] == "hf_secret123", "huggingface_hub reads it from there"
    assert "hf_secret123" not in str(config.resolved)


def test_only_random_looking_tokens_are_hidden_and_ordinary_names_with_their_prefixes_are_kept(tmp_path, monkeypatch):
    """hf-, api- and sk- also start ordinary names: a data file api-documentation-chats.jsonl was saved as
    <hidden>.jsonl and output_dir hf-finetune-experiment-1 as <hidden>, so `sftkit compare` and reruns broke."""
    from sftkit.config import hide_secrets

    data = tmp_path / "d" / "api-documentation-chats.jsonl"
    data.parent.mkdir()
    shutil.copy(SAMPLE_DATA, data)
    token = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"  # 34 mixed-case letters, as the Hub issues them
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, MINIMAL), [
        "--dataset.name", str(data), "--training.output_dir", "hf-finetune-experiment-1",
        "--training.hub_model_id", "hf-internal-testing/tiny-random-llama", "--training.run_name", f"run-{token}"])
    assert config.resolved["dataset"]["name"] == str(data)
    assert config.resolved["training"]["output_dir"] == "hf-finetune-experiment-1"
    assert config.resolved["training"]["hub_model_id"] == "hf-internal-testing/tiny-random-llama"
    assert config.resolved["training"]["run_name"] == "run-<hidden>"
    for secret in ("ghp_" + "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1dF3hJ5", "github_pat_11ABCDEFG0" + "aBcDeF123456789_xYz",
                   "sk-proj-" + "Ab12Cd34Ef56Gh78Ij90Kl12Mn34", "wandb_" + "0123456789abcdef" * 2 + "01234567"):
        assert hide_secrets({"key": f"x {secret} y"}) == {"key": "x <hidden> y"}, secret
    for name in ("hf-supercalifragilisticexpialidocious", "sk-1234567890123456789", "api_documentation_chats_v2"):
        assert hide_secrets(name) == name


def test_bad_config_exits_2_with_one_line_and_no_traceback(tmp_path):
    path = write(tmp_path, "model:\n  use_lorra: true\ndataset:\n  name: data/sample_chat.jsonl\n")
    result = subprocess.run([sys.executable, str(REPO / "sft.py"), "--config", path], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "unknown key model.use_lorra (did you mean 'use_lora'?)" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "expected"), [
    (["--inspect", "abc"], "sft.py: error: argument --inspect: invalid int value: 'abc'; see sft.py --help"),
    (["--config"], "sft.py: error: argument --config: expected one argument; see sft.py --help"),
])
def test_a_mistaken_launcher_option_is_one_line_too(args, expected):
    """argparse printed its usage block above the error."""
    result = subprocess.run([sys.executable, str(REPO / "sft.py"), *args], capture_output=True, text=True)
    assert (result.returncode, result.stderr) == (2, expected + "\n")



def test_training_keys_are_checked_without_importing_torch(tmp_path):
    """By sft.py's own command line: its imports had come to take in transformers and PEFT (sftkit.peers imported
    sftkit.checkpoints), and a typo took 7 s to say (helper-78)."""
    code = (
        "import sys\nfrom sftkit.cli import main\n"
        f"code = main(['--config', {write(tmp_path, MINIMAL + '  learning_rat: 1e-4' + chr(10))!r}])\n"
        "print(code, 'torch' in sys.modules, 'transformers' in sys.modules, 'trl.trainer' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert "unknown key training.learning_rat (did you mean 'learning_rate'?)" in result.stderr
    assert result.stdout.strip() == "2 False False False", result.stdout


def test_the_static_field_list_matches_sft_config():
    import dataclasses

    from trl import SFTConfig

    from sftkit.compat import sft_config_fields

    assert set(sft_config_fields()) == {f.name for f in dataclasses.fields(SFTConfig) if f.init}


@pytest.mark.parametrize(("text", "expected"), [
    (MINIMAL + "  learning_rate: 1e-4\n  learning_rate: 5\n",
     r"config.yaml, line 8, column 3: not valid YAML: the key 'learning_rate' is set twice$"),
    ("dataset:\n\tname: data/sample_chat.jsonl\n",
     r"config.yaml, line 2, column 1: not valid YAML: found character '\\t' that cannot start any token; indent "
     r"with spaces, not tabs$"),
    ("dataset:\n  system_prompt: \"R\xe9ponds\"\n".encode("latin-1"),
     r"config.yaml: not UTF-8 text \(invalid continuation byte at byte 28\); save it as UTF-8$"),
    (MINIMAL.replace("training:", " training:"),
     r"config.yaml, line 5, column 2: not valid YAML: expected <block end>, but found '<block mapping start>'; "
     r"check this line's indentation against the lines above it$"),
    (MINIMAL + "  learning_rate:1e-4\n  max_steps: 3\n",
     r"config.yaml, line 8, column 3: not valid YAML: could not find expected ':'; line 7 needs a space after its "
     r"colon: 'learning_rate: 1e-4'$"),
], ids=["a key set twice", "a tab", "latin-1", "indentation", "no space after a colon"])
def test_a_config_file_that_does_not_read_cleanly_is_one_line_naming_the_place(tmp_path, text, expected):
    """PyYAML keeps the last of two equal keys without a word; a tab or another encoding raised with three lines."""
    path = tmp_path / "config.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError, match=expected):
        load_config(str(path))


def test_a_text_setting_given_digits_says_to_quote_them(tmp_path):
    """YAML, and an override, read output_dir: 2024 as a number."""
    with pytest.raises(ConfigError, match=r'training.output_dir: expected a string or null, got 2024 \(YAML reads '
                                          r'it as a number: quote it, as in "2024"\)'):
        load_config(write(tmp_path, MINIMAL), ["--training.output_dir", "2024"])


def test_a_wrong_item_of_a_list_is_named_with_the_fix(tmp_path):
    """The whole list was quoted as not a list: "expected a list or null, got ['How do I cancel?', {'Note': ...}]"."""
    config = MINIMAL.replace("dataset:\n", "dataset:\n  sample_prompts:\n    - How do I cancel?\n"
                                           "    - Note: how do I get a refund?\n")
    with pytest.raises(ConfigError, match=r"dataset.sample_prompts: item 2: expected a string, got \{'Note': 'how do I "
                                          r"get a refund\?'\} \(YAML reads 'key: value' as a mapping: quote it, as in "
                                          r'"Note: how do I get a refund\?"\)'):
        load_config(write(tmp_path, config))
    with pytest.raises(ConfigError, match=r"model.lora_config.target_modules: item 2: expected a string, got 3 "):
        load_config(write(tmp_path, MINIMAL), ["--model.lora_config.target_modules", "[q_proj, 3]"])


def test_yaml_boolean_words(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["--training.save_strategy", "no"])
    assert config.training.save_strategy == "no"
    with pytest.raises(ConfigError, match=r'training.save_strategy: .*got false \(YAML reads a bare no.*quote it'):
        load_config(write(tmp_path, MINIMAL + "  save_strategy: no\n"))


def test_override_values_that_are_not_yaml_are_the_text_typed(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["--dataset.system_prompt", "Note: be brief: always"])
    assert config.dataset.system_prompt == "Note: be brief: always"
    assert load_config(write(tmp_path, MINIMAL), ["--dataset.system_prompt", "Note: be brief"]).dataset.system_prompt == "Note: be brief"
    assert load_config(write(tmp_path, MINIMAL), ["--dataset.column_map", "{q: prompt}"]).dataset.column_map == {"q": "prompt"}
    for text in ("#1 rule: be brief", "Answer in English #always", "# only"):  # YAML would drop them as comments
        assert load_config(write(tmp_path, MINIMAL), ["--dataset.system_prompt", text]).dataset.system_prompt == text
    assert load_config(write(tmp_path, MINIMAL), ["--training.output_dir", "out #3"]).training.output_dir == "out #3"
    with pytest.raises(ConfigError, match="override --model.path.y: model.path is given a value already, not keys"):
        load_config(write(tmp_path, MINIMAL), ["--model.path", "x", "--model.path.y", "1"])  # was a TypeError
    quoted = load_config(write(tmp_path, MINIMAL), ["--dataset.system_prompt", '"Rule #1: be brief"'])
    assert quoted.dataset.system_prompt == "Rule #1: be brief"  # quoted as the YAML errors advise: unquoted
    with pytest.raises(ConfigError, match=r"override --dataset.sample_prompts: '\[Hi, there' is not a valid YAML list .*quote it"):
        load_config(write(tmp_path, MINIMAL), ["--dataset.sample_prompts", "[Hi, there"])


def test_every_number_rule_names_a_real_field_and_every_default_passes_it():
    import dataclasses

    from trl import SFTConfig

    from sftkit.checks import NUMBER_RULES, number_errors, numbers
    from sftkit.compat import sft_config_fields
    from sftkit.schema import DatasetConfig, ModelConfig

    defaults = {**numbers(ModelConfig(), "model"), **numbers(DatasetConfig(max_samples=1, weight=1, test_size=0.1), "dataset")}
    for key in NUMBER_RULES:
        section, _, name = key.partition(".")
        assert name in sft_config_fields() if section == "training" else key in defaults, key
    # the fields that take a negative value (max_steps -1, local_rank -1) are allowed it
    defaults.update({f"training.{f.name}": f.default for f in dataclasses.fields(SFTConfig) if f.init})
    assert number_errors(defaults) == []


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--training.num_train_epochs", "0"], "training.num_train_epochs must be greater than 0, got 0 (or set training.max_steps)"),
        (["--training.max_steps", "-2"], "training.max_steps must be -1 or at least 1, got -2"),
        (["--training.max_grad_norm", "-1"], "training.max_grad_norm must be at least 0, got -1"),
        (["--training.logging_steps", "0"], "training.logging_steps must be greater than 0, got 0"),
        (["--training.dataset_num_proc", "0"], "training.dataset_num_proc must be at least 1, got 0 (null: one process per usable core"),
        (["--training.adam_epsilon", "0"], "training.adam_epsilon must be greater than 0, got 0"),
        (["--training.dataloader_num_workers", "-1"], "training.dataloader_num_workers must be at least 0, got -1"),
        (["--training.max_grad_norm", ".inf"], "training.max_grad_norm must be a finite number, got inf"),
        (["--model.lora_config.lora_alpha", "0"], "model.lora_config.lora_alpha must be greater than 0, got 0"),
        (["--dataset.name", "null", "--dataset.sources", "[{name: data/sample_chat.jsonl, weight: 0}]"],
         "dataset.sources[0].weight must be greater than 0, got 0 (leave a source out to drop it)"),
    ],
)
def test_numbers_out_of_range_name_the_key_and_the_range(tmp_path, override, expected):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), override)
    assert expected in str(error.value)


def test_zero_epochs_are_fine_when_max_steps_sets_the_length(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["--training.num_train_epochs", "0", "--training.max_steps", "5"])
    assert config.training.max_steps == 5


@pytest.mark.parametrize(
    ("name", "local"),
    [("data/tiny-chat-llama", True), ("data/typo", True), ("./model", True), ("/abs/model", True), ("~/model", True),
     ("chat.jsonl", True), ("template.jinja", True), ("Qwen/Qwen2.5-0.5B-Instruct", False), ("gpt2", False),
     ("meta-llama/Llama-3.1-8B-Instruct", False), ("HuggingFaceH4/ultrachat_200k", False)],
)
def test_what_looks_like_a_local_path_is_never_a_hub_id(name, local):
    from sftkit.paths import looks_local

    assert looks_local(name) is local


def test_local_paths_are_checked_and_hub_ids_are_not(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["--model.path", "Qwen/Qwen2.5-0.5B-Instruct", "--dataset.chat_template", "{{ messages }}"])
    assert config.model.path == "Qwen/Qwen2.5-0.5B-Instruct"
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, MINIMAL), ["--model.path", "./nowhere", "--dataset.name", "data/*.csv",
                                               "--dataset.eval_sources", "[{name: data/sample_chat.jsonl, split: test}]"])
    message = str(error.value)
    assert "model.path: ./nowhere does not exist" in message
    assert "dataset.name: the pattern data/*.csv matches no file" in message
    assert "dataset.eval_sources[0].split: 'test' is not a split of data/sample_chat.jsonl" in message


@pytest.mark.parametrize("output_dir", ["shards", "shards/run"])
def test_an_output_dir_in_a_directory_of_data_is_refused(tmp_path, monkeypatch, output_dir):
    """The run's sftkit_run.json there was read as rows: the run, and every later one on that data, failed with
    "Couldn't cast"."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.jsonl").write_text('{"prompt": "Hi", "response": "Hello!"}\n')
    where = "the data directory" if output_dir == "shards" else "inside the data directory"
    with pytest.raises(ConfigError, match=f"training.output_dir: {output_dir} is {where} of dataset.name \\(shards\\), "
                                          "which would read the run's own files as rows; choose an output_dir outside it"):
        load_config(write(tmp_path, MINIMAL), ["--dataset.name", "shards", "--training.output_dir", output_dir])
    assert load_config(write(tmp_path, MINIMAL), ["--dataset.name", "shards", "--training.output_dir", "out"])


def test_the_readme_shows_what_inspect_prints():
    """It showed p95 82 where the command prints 83."""
    command = "python sft.py --config configs/lora_train_config.yaml --inspect 2"
    readme = (REPO / "README.md").read_text()
    assert command in readme
    printed = run_python(*command.split()[1:]).stdout.strip()
    assert f"```\n{printed}\n```" in readme


def test_a_launch_config_for_full_fine_tuning_shows_a_full_fine_tuning_config():
    """deepspeed_zero3.yaml said it was for full fine-tuning and showed a LoRA config."""
    for path in sorted((REPO / "accelerate_configs").glob("*.yaml")):
        header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
        if "full fine-tuning" in header and "LoRA" not in header:
            shown = re.search(r"--config (\S+\.yaml)", header)[1]
            assert load_config(str(REPO / shown)).model.use_lora is False, path.name


def test_the_launch_configs_train_on_the_gpus_the_user_or_the_scheduler_gave(tmp_path):
    """single_gpu.yaml named gpu_ids '0': Accelerate then set CUDA_VISIBLE_DEVICES=0, so a launch given GPU 3
    (CUDA_VISIBLE_DEVICES=3, or Slurm on a node without device cgroups) trained on GPU 0, maybe someone else's."""
    import yaml

    for path in sorted((REPO / "accelerate_configs").glob("*.yaml")):
        assert yaml.safe_load(path.read_text()).get("gpu_ids", "all") == "all", path.name
    script = tmp_path / "devices.py"
    script.write_text("import os\nprint('devices', os.environ.get('CUDA_VISIBLE_DEVICES'))\n")
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launched = subprocess.run([accelerate, "launch", "--config_file", str(REPO / "accelerate_configs" / "single_gpu.yaml"),
                               str(script)], capture_output=True, text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": "3"})
    assert "devices 3" in launched.stdout, launched.stdout + launched.stderr


@pytest.mark.parametrize(("section", "cls"), [("model", "ModelConfig"), ("dataset", "DatasetConfig")])
def test_the_readme_tables_are_the_schemas_own_documentation(section, cls):
    import sftkit.schema

    table = "\n".join(["| key | default | meaning |", "|---|---|---|", *sftkit.schema.schema_table(getattr(sftkit.schema, cls))])
    assert f"### `{section}`\n\n{table}\n\n" in (REPO / "README.md").read_text(), "regenerate with schema.schema_table"


def test_help_for_a_section_lists_its_keys_with_defaults_and_meaning():
    result = run_python("sft.py", "--help", "model")
    assert result.stdout.startswith("model:\n  path ")
    assert "lora_config.lora_dropout" in result.stdout and "dropout on the adapters' input" in result.stdout


@pytest.mark.parametrize("model_section", ["", "model:\n", "model:\n  use_lora: true\n"],
                         ids=["no section", "an empty one", "no path"])
def test_a_config_without_a_model_path_says_so_instead_of_training_the_tiny_model(tmp_path, model_section):
    with pytest.raises(ConfigError, match=r"config.yaml: model.path is required: the model to fine-tune, a hub id "
                                          r"\(e.g. Qwen/Qwen2.5-0.5B-Instruct\) or a local directory$"):
        load_config(write(tmp_path, model_section + DATA_AND_OUTPUT))


def test_an_unknown_sftkit_command_is_named_in_one_line(capsys):
    from sftkit.cli import sftkit

    assert sftkit(["nosuch"]) == 2
    assert capsys.readouterr().err == ("sftkit: error: unknown command 'nosuch'; the commands are train, init, env, "
                                       "chat, compare, webchat, export (sftkit --help)\n")
    assert sftkit(["--help"]) == 0 and capsys.readouterr().out.startswith("usage: sftkit COMMAND")


def test_sftkit_says_its_version_and_commit_in_the_command_the_bug_report_and_beside_each_model(capsys):
    """It was nowhere: not in `sftkit env` ("paste this into a bug report"), not in sftkit_versions.json, and there
    was no --version, while fixes land between versions."""
    import importlib.metadata
    import subprocess

    from sftkit.cli import sftkit
    from sftkit.environment import library_versions, report

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    expected = f"{importlib.metadata.version('sftkit')} (git {commit[:12]})" if commit else \
        importlib.metadata.version("sftkit")
    assert sftkit(["--version"]) == 0 and capsys.readouterr().out == f"sftkit {expected}\n"
    from sftkit.cli import main

    with pytest.raises(SystemExit) as done:  # sft.py --version, as argparse answers it
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"sftkit {expected}\n"
    assert library_versions(())["sftkit"] == expected and "  ok    sftkit " in report()


def test_sft_py_takes_the_config_as_its_first_argument_as_sftkit_train_does(tmp_path, capsys):
    from sftkit.cli import main

    assert main(["lora_train_config.yaml", "--dry-run", "--training.output_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Dry run of " in out and "lora_train_config.yaml" in out.splitlines()[0] and "LoRA" in out


def test_an_error_in_a_command_line_value_names_the_command_line_not_the_file(tmp_path):
    config = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match=r"^the command line: training.learning_rate must be greater than 0, got -1$"):
        load_config(config, ["--training.learning_rate", "-1"])
    with pytest.raises(ConfigError, match=r"^the command line: unknown key training.learning_rat "):
        load_config(config, ["--training.learning_rat", "1"])
    in_the_file = write(tmp_path, MINIMAL.replace("model:\n", "model:\n  max_seq_length: 0\n"))
    with pytest.raises(ConfigError, match=f"^{in_the_file}: model.max_seq_length must be"):  # with one given here too
        load_config(in_the_file, ["--training.learning_rate", "-1"])


def test_an_error_about_a_value_from_the_file_is_not_blamed_on_the_command_line(tmp_path):
    """SFTConfig's error names no key where two given keys hold the text it quotes; with any --training option given,
    the section name itself counted as given there, and the file's bad value was called the command line's."""
    config = tmp_path / "run.yaml"
    values = yaml.safe_load((REPO / "configs" / "default_train_config.yaml").read_text())
    values["training"]["lr_scheduler_type"] = "bogus"
    config.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError) as error:
        load_config(str(config), ["--training.run_name", "bogus"])
    assert str(error.value).startswith(f"{config}: training: bogus is not a valid SchedulerType")
    with pytest.raises(ConfigError) as error:
        load_config(str(config), ["--training.learning_rate", "1e-4"])
    assert str(error.value).startswith(f"{config}: training.lr_scheduler_type: bogus is not a valid SchedulerType")
