"""Bad inputs as a user types them: `python sft.py ...` exits 2 with one line naming the key, file or row and how
to fix it, no traceback, and fails before any weight loads (config mistakes within a second or two)."""

import json
import os
import shutil
import time

import pytest
from conftest import REPO, SAMPLE_DATA, TINY_MODEL, run_python, run_sft

# Hub retries for a path mistaken for a hub id took about 50 s; a config error takes well under a second, and a check
# that imports torch about 7 s alone, up to 20 s beside the suite's other worker on 2 busy cores.
FAST = 25


def sft(*args: str, tmp_path) -> tuple[str, float]:
    """Run sft.py as a user would (HF_HUB_OFFLINE unset); return its one stderr line and the seconds it took."""
    env = {key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    started = time.perf_counter()
    result = run_python("sft.py", *args, "--training.output_dir", str(tmp_path / "out"), env=env, check=False,
                        timeout=120)
    elapsed = time.perf_counter() - started
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sft.py: error: "), result.stderr[-3000:]
    assert not (tmp_path / "out" / "model.safetensors").exists()
    return lines[0], elapsed


CONFIG_CASES = {
    "negative epochs": (["--training.num_train_epochs", "-1"],
                        ["training.num_train_epochs must be greater than 0, got -1 (or set training.max_steps)"]),
    "negative learning rate": (["--training.learning_rate", "-1"], ["training.learning_rate must be greater than 0"]),
    "lora dropout": (["--model.lora_config.lora_dropout", "1.5"],
                     ["model.lora_config.lora_dropout must be at least 0 and below 1, got 1.5"]),
    "nan": (["--training.learning_rate", "nan"], ["training.learning_rate must be a finite number, got nan"]),
    "a saved config's hidden token": (["--training.hub_token", "<hidden>"], [
        "training.hub_token is <hidden>, what sftkit saves in place of a token; remove the key (huggingface_hub finds "
        "your login or HF_TOKEN)"]),
    "several at once": (
        ["--training.per_device_train_batch_size", "0", "--training.max_steps", "0", "--training.seed", "-3",
         "--training.warmup_steps", "-1", "--model.max_seq_length", "0", "--model.lora_config.r", "0",
         "--dataset.max_samples", "0", "--training.adam_beta2", "1"],
        ["training.per_device_train_batch_size must be at least 1, got 0",
         "training.max_steps must be -1 or at least 1, got 0", "training.seed must be at least 0",
         "training.warmup_steps must be at least 0, got -1", "model.max_seq_length must be at least 1, got 0",
         "model.lora_config.r must be at least 1, got 0", "dataset.max_samples must be at least 1, got 0",
         "training.adam_beta2 must be at least 0 and below 1, got 1"]),
    "two configs": (["configs/lora_train_config.yaml", "--config", "configs/default_train_config.yaml"],
                    ["sft.py: error: two configs given (a config file name first, and --config, or --config twice); "
                     "give one"]),
    "an abbreviated --config beside a config": (["configs/lora_train_config.yaml", "--conf", "x.yaml"],
                                                ["sft.py: error: unexpected argument '--conf'"]),
    # SFTConfig's own checks name no key, and the file was named where the value came from the command line
    "scheduler SFTConfig refuses": (["--training.lr_scheduler_type", "bogus"],
                                    ["sft.py: error: the command line: training.lr_scheduler_type: bogus is not a "
                                     "valid SchedulerType, please select one of ['linear', 'cosine',"]),
    "strategies SFTConfig refuses": (["--training.eval_strategy", "steps", "--training.save_strategy", "epoch",
                                      "--training.load_best_model_at_end", "true"],
                                     ["sft.py: error: the command line: training.load_best_model_at_end: "
                                      "--load_best_model_at_end requires the save and eval strategy to match"]),
    "evaluation without eval data": (["--dataset.test_size", "null", "--training.eval_strategy", "steps"],
                                     ["training.eval_strategy needs evaluation data: set dataset.test_size"]),
    # datasets' slice syntax, the usual way to take part of a split, has a key of its own here
    "a slice of a split": (["--dataset.split", "train[:50]"],
                           ["dataset.split: 'train[:50]' is not a split of data/sample_chat.jsonl: a local file has "
                            "one split, train; remove the split setting; for its first rows, set dataset.max_samples"]),
    "best checkpoint without a metric": (["--training.save_strategy", "best"],
                                         ["training.save_strategy: best needs training.metric_for_best_model"]),
    # the run trained to its first evaluation, then ended in a KeyError, before that step's checkpoint was saved
    "best checkpoint by a metric no evaluation reports": (
        ["--training.metric_for_best_model", "accuracy"],
        ["training.metric_for_best_model: 'accuracy' is not a metric the evaluations report; use one of eval_loss, "
         "eval_mean_token_accuracy, eval_entropy"]),
    # the run published the checkpoint of the highest eval loss and called it the best
    "the highest loss counted as the best": (
        ["--training.metric_for_best_model", "eval_loss", "--training.greater_is_better", "true"],
        ["training.greater_is_better: true counts the checkpoint of the highest eval_loss as the best, and publishes "
         "the worst; remove greater_is_better"]),
    "broken list override": (["--dataset.system_prompt", "[be brief"],
                             ["override --dataset.system_prompt: '[be brief' is not a valid YAML list or mapping",
                              "quote it"]),
    "missing model path": (["--model.path", "data/tiny-chat-lama"],
                           ["model.path: data/tiny-chat-lama does not exist (looked in", str(REPO)]),
    "model path without config.json": (["--model.path", "data"], ["model.path: data is not a model directory",
                                                                  "config.json"]),
    "missing dataset file": (["--dataset.name", "data/nope.jsonl"],
                             ["dataset.name: data/nope.jsonl does not exist (looked in", str(REPO)]),
    "missing dataset in a source": (["--dataset.name", "null", "--dataset.sources", "[{name: ./missing.csv}]"],
                                    ["dataset.sources[0].name: ./missing.csv does not exist"]),
    "source without a name": (["--dataset.name", "null", "--dataset.sources", "[{name: data/sample_chat.jsonl}]",
                               "--dataset.test_size", "null", "--dataset.eval_sources", "[{split: train}]"],
                              ["dataset.eval_sources[0] has no name: give each source a name"]),
    "source key beside sources": (["--dataset.name", "null", "--dataset.sources", "[{name: data/sample_chat.jsonl}]",
                                   "--dataset.max_samples", "10"],
                                  ["dataset.max_samples is set beside dataset.sources, where it would be ignored; set "
                                   "it in the sources it is for (dataset.sources[0].max_samples)"]),
    "no space after a colon": (["--dataset.name", "null", "--dataset.sources", "[{name:data/sample_chat.jsonl}]"],
                               ["unknown key dataset.sources[0].name:data/sample_chat.jsonl (YAML needs a space after "
                                "the colon: 'name: data/sample_chat.jsonl')"]),
    "padding-free without packing": (["--training.padding_free", "true"],
                                     ["training.padding_free: true needs training.packing: true"]),
    "split of a local file": (["--dataset.split", "validation"],
                              ["dataset.split: 'validation' is not a split of data/sample_chat.jsonl: a local file has "
                               "one split, train; remove the split setting"]),
    "eval split of a local file": (["--dataset.eval_split", "test", "--dataset.test_size", "null"],
                                   ["dataset.eval_split: 'test' is not a split of data/sample_chat.jsonl",
                                    "dataset.test_size"]),
    "missing chat template file": (["--dataset.chat_template", "templates/mine.jinja"],
                                   ["dataset.chat_template: templates/mine.jinja does not exist"]),
    "chat template file without a suffix": (["--dataset.chat_template", "my_chatml"],  # it was the template itself
                                             ["dataset.chat_template: my_chatml does not exist (looked in"]),
    "missing deepspeed file": (["--training.deepspeed", "deepspeed_configs/zero9.json"],
                               ["training.deepspeed: deepspeed_configs/zero9.json does not exist"]),
    "subset of a local file": (["--dataset.subset", "en"], ["dataset.subset: en names a configuration of a hub "
                                                            "dataset, but data/sample_chat.jsonl is local"]),
    "unknown reporting integration": (["--training.report_to", "tensorbord"],
                                      ["training.report_to: tensorbord is not one of", "tensorboard"]),
    "liger's fused cross-entropy": (["--training.liger_kernel_config", "{fused_linear_cross_entropy: true}"],
                                    ["training.liger_kernel_config.fused_linear_cross_entropy: TRL's trainer computes "
                                     "the loss in chunks itself"]),
    # the cases below loaded the model, then died with a traceback (or trained without a word)
    "full fine-tuning in float16": (["--model.dtype", "float16"], [
        "sft.py: error: the command line: model.dtype: float16 with full fine-tuning trains float16 weights, which "
        "lose small updates and overflow; on a GPU without bf16 set training.fp16: true and model.dtype auto"]),
    "min-lr cosine without its minimum": (["--training.lr_scheduler_type", "cosine_with_min_lr"], [
        "sft.py: error: the command line: training.lr_scheduler_type: cosine_with_min_lr with "
        "training.lr_scheduler_kwargs null: One of min_lr or min_lr_rate should be set through the "
        "`lr_scheduler_kwargs`"]),
    "TRL's assistant mask": (["--training.assistant_only_loss", "true"], [
        "sft.py: error: the command line: training.assistant_only_loss: true would have no effect, as sftkit hands TRL "
        "its rows tokenized; remove it and choose what trains with dataset.loss_on"]),
    "TRL's completion mask": (["--training.completion_only_loss", "false"], [
        "training.completion_only_loss: false would have no effect", "dataset.loss_on"]),
    "TRL's chat template": (["--training.chat_template_path", "tests/templates/qwen2_5.jinja"], [
        "training.chat_template_path: the rows are rendered and masked before TRL reads it, with the model's template "
        "or dataset.chat_template, so the model would train on one template and be published with this one"]),
    "TRL's text column": (["--training.dataset_text_field", "body"], [
        "training.dataset_text_field: body would have no effect", "dataset.column_map: {your_column: text}"]),
    "best model without evaluations": (["--training.load_best_model_at_end", "true"], [
        "sft.py: error: the command line: training.load_best_model_at_end: true needs evaluations to pick the best "
        "checkpoint from, but training.eval_strategy is no"]),
    "checkpointing under both names": (["--training.gradient_checkpointing", "true",
                                        "--training.activation_checkpointing", "false"], [
        "sft.py: error: the command line: training.gradient_checkpointing (true) and training.activation_checkpointing "
        "(false) are one setting under its old and its new name (transformers 5): give only one of them"]),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_config_mistakes_fail_at_once_naming_the_key(tmp_path, case):
    args, expected = CONFIG_CASES[case]
    line, elapsed = sft(*args, tmp_path=tmp_path)
    for text in expected:
        assert text in line
    assert elapsed < FAST, f"{elapsed:.1f} s: nothing may be looked up on the hub"


def test_a_variable_in_output_dir_is_refused_where_it_made_a_directory_named_after_it(tmp_path):
    """`output_dir: $SCRATCH/runs/x` in a YAML file trained into ./$SCRATCH/runs/x, where nobody looked for it."""
    written = f"{tmp_path}/${{SCRATCH}}/x"
    result = run_python("sft.py", "--training.output_dir", written, "--training.max_steps", "1",
                        env={"SCRATCH": "scratch"}, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f"sft.py: error: the command line: training.output_dir {written}: ${{SCRATCH}} is not expanded (a config's "
        f"paths are taken as written); write the path out ({tmp_path}/scratch/x), or pass it on the command line "
        "unquoted for the shell to expand")
    assert not list(tmp_path.iterdir())
    unset = run_python("sft.py", "--training.output_dir", "$NOT_SET_ANYWHERE/x", "--dry-run", check=False)
    assert unset.stderr.strip().endswith("$NOT_SET_ANYWHERE is not expanded (a config's paths are taken as written); "
                                         "write the path out, or pass it on the command line unquoted for the shell "
                                         "to expand")
    named = tmp_path / "costs$2024"  # a directory named with a $ is one
    named.mkdir()
    assert run_python("sft.py", "--training.output_dir", str(named), "--dry-run").returncode == 0


@pytest.mark.parametrize(("args", "package", "expected"), [
    (["--training.use_liger_kernel", "true"], "liger_kernel",
     "training.use_liger_kernel: true needs the liger-kernel package: pip install -r requirements-gpu.txt, or remove "
     "the key"),
    (["--training.optim", "galore_adamw"], "galore_torch",
     "training.optim: galore_adamw cannot be used: You need to install `galore_torch` in order to use GaLore "
     "optimizers."),
    (["--training.optim", "adamw_torch_4bit"], "torchao",
     "training.optim: adamw_torch_4bit cannot be used: You need to have `torchao>=0.4.0` in order to use torch 4-bit "
     "optimizers."),
], ids=["liger", "galore", "torchao 4-bit"])
def test_a_missing_package_the_training_needs_is_named_before_loading(tmp_path, args, package, expected):
    """An ImportError with a traceback once the model had loaded (the Trainer imports them as it trains)."""
    import importlib.util

    if importlib.util.find_spec(package):
        pytest.skip(f"{package} is installed here")
    line, elapsed = sft(*args, tmp_path=tmp_path)
    assert line.startswith(f"sft.py: error: {expected}")
    assert elapsed < FAST


def test_wandb_without_a_login_is_refused_before_loading_and_offline_needs_none(tmp_path):
    """wandb.init() raised UsageError "No API key configured" once the model had loaded (no terminal to ask on)."""
    no_login = {"HOME": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_DIR": str(tmp_path),
                "WANDB_SILENT": "true"}
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")} | no_login
    for report_to in ("wandb", "all"):
        result = run_python("sft.py", "--training.report_to", report_to, "--training.output_dir", str(tmp_path / "out"),
                            env=env, check=False, timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.strip().splitlines() == [
            "sft.py: error: training.report_to: wandb needs a W&B login: run `wandb login` or set "
            "WANDB_API_KEY, or set WANDB_MODE=offline to log locally (wandb sync uploads later), or remove wandb from "
            "report_to"]
    key = "0123456789abcdef" * 2 + "01234567"  # 40 hex digits, as W&B issues them
    for found in ({"WANDB_MODE": "offline"}, {"WANDB_MODE": "disabled"}, {"WANDB_API_KEY": key}):
        result = run_python("sft.py", "--training.report_to", "wandb", "--dry-run", "--training.output_dir",
                            str(tmp_path / "out"), env={**env, **found}, check=False, timeout=120)
        assert result.returncode == 0, (found, result.stderr[-3000:])


@pytest.fixture(scope="module")
def saved_dataset_dict(tmp_path_factory):
    import datasets

    path = tmp_path_factory.mktemp("saved") / "chat"
    rows = datasets.load_dataset("json", data_files=str(SAMPLE_DATA), split="train")
    datasets.DatasetDict({"train": rows, "test": rows.select(range(5))}).save_to_disk(path)
    return path


def test_a_split_a_saved_dataset_lacks_lists_its_splits(tmp_path, saved_dataset_dict):
    line, elapsed = sft("--dataset.name", str(saved_dataset_dict), "--dataset.split", "validation", tmp_path=tmp_path)
    assert f"dataset.split: 'validation' is not a split of {saved_dataset_dict}: its splits are train, test" in line
    assert elapsed < FAST


def test_a_split_a_folder_of_files_lacks_lists_its_splits(tmp_path):
    folder = tmp_path / "chat"
    folder.mkdir()
    lines = SAMPLE_DATA.read_text().splitlines(keepends=True)
    (folder / "train.jsonl").write_text("".join(lines[:40]))
    (folder / "test.jsonl").write_text("".join(lines[40:50]))
    line, _ = sft("--dataset.name", str(folder), "--dataset.split", "validation", tmp_path=tmp_path)
    assert line.endswith(f"dataset.split: 'validation' is not a split of {folder}: its files are split test (test.jsonl) "
                         "and split train (train.jsonl): named for their splits as datasets names them; use one of them")


def test_invalid_json_names_the_1_based_line(tmp_path):
    lines = SAMPLE_DATA.read_text().splitlines(keepends=True)
    lines[136] = lines[136].replace('"}]}', '"}]')  # line 137 loses its closing brace
    data = tmp_path / "x.jsonl"
    data.write_text("".join(lines))
    line, _ = sft("--dataset.name", str(data), tmp_path=tmp_path)
    assert line.startswith(f"sft.py: error: dataset {data} line 137: not valid JSON: ")
    assert "fix or remove that line" in line


@pytest.mark.parametrize(("files", "expected"), [
    ({"chat/a.jsonl": "SAMPLE", "chat/b.csv": "prompt,response\nhi,hello\n"},
     "dataset {dir}/chat mixes file types (a.jsonl, b.csv), and only one type is read; keep one type there, or list "
     "each as one of dataset.sources"),
    ({"empty.jsonl": ""}, "dataset {dir}/empty.jsonl: the file is empty"),
    ({"ragged.csv": "prompt,response\nhi,hello\nx,y,z\n"},
     "dataset.name: {dir}/ragged.csv (split 'train') could not be loaded: Error tokenizing data. C error: Expected 2 "
     "fields in line 3, saw 3"),
], ids=["a folder of two file types", "an empty file", "a ragged csv"])
def test_data_files_that_cannot_be_read_as_given_say_why(tmp_path, files, expected):
    """A folder of .jsonl and .csv files read only the .jsonl rows without a word; an empty file said
    StopIteration; a broken CSV only 'An error occurred while generating the dataset'."""
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("".join(SAMPLE_DATA.read_text().splitlines(keepends=True)[:20])
                                     if text == "SAMPLE" else text)
    line, _ = sft("--dataset.name", str(tmp_path / next(iter(files)).split("/")[0]), tmp_path=tmp_path)
    assert line == "sft.py: error: " + expected.format(dir=tmp_path)


def test_sftkit_debug_adds_the_traceback_of_the_library_error_a_one_line_error_quotes(tmp_path):
    """The one line keeps the library's first line only; the traceback it came from was lost before."""
    (tmp_path / "ragged.csv").write_text("prompt,response\nhi,hello\nx,y,z\n")
    result = run_python("sft.py", "--dataset.name", str(tmp_path / "ragged.csv"), "--training.output_dir",
                        str(tmp_path / "out"), env={**os.environ, "SFTKIT_DEBUG": "1"}, check=False, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith(f"sft.py: error: dataset.name: {tmp_path}/ragged.csv (split 'train') could not be "
                               "loaded: Error tokenizing data"), result.stderr[-3000:]
    assert "pandas.errors.ParserError: Error tokenizing data" in result.stderr
    assert "The above exception was the direct cause of the following exception" in result.stderr
    assert lines[-1].startswith("sftkit.errors.DataError: dataset.name:")


def test_sharegpt_role_names_in_openai_messages_say_what_they_mean(tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "human", "content": "Hi"}, {"role": "gpt", "content": "Yo"}]}))
    line, _ = sft("--dataset.name", str(data), "--dataset.test_size", "null", tmp_path=tmp_path)
    assert line.endswith("line 1: message 0 has role 'human'; expected one of system, user, assistant, tool "
                         "(ShareGPT's name for user: rename it)")


@pytest.mark.parametrize(("row", "overrides", "expected"), [
    ({"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, [],
     "line 1: turn 0 has role and content, as OpenAI messages do, not ShareGPT's from and value; map the column: "
     "column_map: {conversations: messages}"),
    ({"query": "a", "prompt": "b", "response": "c"}, ["--dataset.column_map", "{query: prompt}"],
     ": column_map renames 'query' to 'prompt', a column the rows have already; map that one to another name too, "
     "or leave the rename out"),
], ids=["openai messages under conversations", "a rename onto a column it has"])
def test_columns_under_other_names_say_how_to_map_them(tmp_path, row, overrides, expected):
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(row) + "\n")
    line, _ = sft("--dataset.name", str(data), "--dataset.test_size", "null", *overrides, tmp_path=tmp_path)
    assert line.startswith(f"sft.py: error: dataset {data}") and line.endswith(expected)


def test_a_chat_template_file_that_is_not_jinja_is_named(tmp_path):
    """It was blamed on the model's template and the first data row."""
    template = tmp_path / "chat.jinja"
    template.write_text("{% for message in messages %}{{ message.content }\n{% endfor %}")
    line, _ = sft("--dataset.chat_template", str(template), tmp_path=tmp_path)
    assert line == (f"sft.py: error: dataset.chat_template {template}: not a valid Jinja template, line 1: "
                    "unexpected '}'")


def test_an_output_dir_a_data_pattern_reaches_is_refused_at_once(tmp_path):
    """With dataset.name DATA/**/*.jsonl and output_dir below DATA, the run's own sample_replies.jsonl became rows:
    its resume failed on the files' other columns, and with the file moved away on the data's digest, so none of
    its checkpoints could ever be resumed. A directory of data was refused so; a pattern was not checked."""
    from sftkit.config import load_config
    from sftkit.errors import ConfigError

    (tmp_path / "data" / "more").mkdir(parents=True)
    shutil.copy(SAMPLE_DATA, tmp_path / "data" / "chats.jsonl")
    shutil.copy(SAMPLE_DATA, tmp_path / "data" / "more" / "chats.json")
    line, elapsed = sft("--dataset.name", f"{tmp_path}/**/*.jsonl", tmp_path=tmp_path)  # output_dir is tmp_path/out
    assert line.endswith(f"training.output_dir: {tmp_path}/out is within reach of dataset.name ({tmp_path}/**/*.jsonl),"
                         " which would match the run's own sample_replies.jsonl and read it as rows; choose an "
                         "output_dir the pattern cannot match") and elapsed < FAST, line
    with pytest.raises(ConfigError, match=r"training.output_dir: \S+/data/run is within reach of "
                                          r"dataset.sources\[0\].name \(\S+/data/\*/\*.json\), which would match the "
                                          "run's own config.json"):
        load_config(None, ["--dataset.name", "null", "--dataset.sources", f"[{{name: {tmp_path}/data/*/*.json}}]",
                           "--training.output_dir", str(tmp_path / "data" / "run")])
    for pattern, output_dir in ((f"{tmp_path}/data/*.jsonl", "data/runs/r1"), (f"{tmp_path}/data/**/*.jsonl", "out")):
        assert load_config(None, ["--dataset.name", pattern, "--training.output_dir", str(tmp_path / output_dir)])
    (tmp_path / "scratch").mkdir()  # data/outputs -> scratch: glob's ** follows the link
    (tmp_path / "data" / "outputs").symlink_to(tmp_path / "scratch")
    with pytest.raises(ConfigError, match=r"training.output_dir: \S+/data/outputs/r1 is within reach of dataset.name"):
        load_config(None, ["--dataset.name", f"{tmp_path}/data/**/*.jsonl", "--training.output_dir",
                           str(tmp_path / "data" / "outputs" / "r1")])


def test_every_row_truncated_away_says_which_max_seq_length_fits(tmp_path):
    line, _ = sft("--model.max_seq_length", "4", tmp_path=tmp_path)
    assert "no row has a trainable token within max_seq_length 4" in line
    assert "set model.max_seq_length to" in line


def test_a_model_directory_without_its_tokenizer_says_so(tmp_path):
    model = tmp_path / "weights-only"
    model.mkdir()
    shutil.copy(TINY_MODEL / "config.json", model)
    line, _ = sft("--model.path", str(model), "--dry-run", tmp_path=tmp_path)
    assert line == (f"sft.py: error: model.path {model} has no tokenizer files (tokenizer.json, tokenizer.model, "
                    "vocab.json, tokenizer_config.json); save the tokenizer beside the model "
                    "(tokenizer.save_pretrained(path))")


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"], ["--inspect"]])
def test_an_eos_token_the_tokenizer_lacks_is_refused_before_the_data_and_the_model(tmp_path, dry_run):
    """As an older sftkit_config.yaml held it (transformers' <EOS_TOKEN> placeholder); TRL refused it only once
    the data was prepared and the model loaded. (training.pad_token is checked alike.)"""
    line, _ = sft("--training.eos_token", "<EOS_TOKEN>", *dry_run, tmp_path=tmp_path)
    assert line == ("sft.py: error: training.eos_token '<EOS_TOKEN>' is not a token of the tokenizer of "
                    "model.path data/tiny-chat-llama; give one of its tokens (its eos is '<|im_end|>') or remove the key")


def test_a_lora_target_written_as_text_says_peft_reads_it_as_a_pattern(tmp_path):
    line, _ = sft("--model.use_lora", "true", "--model.lora_config.target_modules", "q_proj", tmp_path=tmp_path)
    assert line.endswith("PEFT reads the text 'q_proj' as a regular expression over whole module names "
                         "(model.layers.0.self_attn.q_proj), which it does not match; for the layers of that name "
                         "write a list: [q_proj]")


def test_lora_target_module_that_matches_nothing_lists_the_layers(tmp_path):
    line, _ = sft("--model.use_lora", "true", "--model.lora_config.target_modules", "[q_proj, qkv_proj]",
                  tmp_path=tmp_path)
    assert line == ("sft.py: error: model.lora_config.target_modules: qkv_proj matches no layer of "
                    "data/tiny-chat-llama that LoRA can adapt; its linear layers are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                    "down_proj, lm_head (or use all-linear)")


@pytest.mark.parametrize("targets", ["[q_proj, lm_head]", ".*head"])
def test_a_lora_of_the_output_layer_is_refused_before_loading_with_the_key_that_trains_it(tmp_path, targets):
    """TRL 1.16 reads the output layer's weight itself, so an adapter there never trains: it refused with a
    traceback once the model had loaded, and the dry run planned it."""
    for dry_run in ((), ("--dry-run",)):
        line, _ = sft("--model.use_lora", "true", "--model.lora_config.target_modules", targets, *dry_run,
                      tmp_path=tmp_path)
        assert line == ("sft.py: error: model.lora_config.target_modules: lm_head is the output layer, whose weight "
                        "TRL 1.16 multiplies by directly, so an adapter there would never train; to train it, list it "
                        "in model.lora_config.modules_to_save instead (trained in full): modules_to_save: [lm_head]")


def test_model_with_its_own_code_needs_trust_remote_code(tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(TINY_MODEL, model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "my_custom_llama"
    config["auto_map"] = {"AutoConfig": "modeling_custom.MyConfig", "AutoModelForCausalLM": "modeling_custom.MyModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_custom.py").write_text("raise SystemExit('the untrusted modeling code ran')\n")
    line, elapsed = sft("--model.path", str(model), tmp_path=tmp_path)
    assert line == (f"sft.py: error: model.path {model} ships its own modeling code; set model.trust_remote_code: "
                    "true if you trust it")


def test_a_model_path_that_is_neither_on_the_hub_nor_here_says_both(tmp_path):
    """`models/my-llama` reads as a hub id when no folder `models` exists: the error said only that the hub could
    not be reached, and not that no such local directory exists (offline here, as in the tests)."""
    from conftest import run_sft

    result = run_sft("--model.path", "models/my-llama", "--dry-run", "--training.output_dir", str(tmp_path / "out"),
                     env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("sft.py: error: model.path models/my-llama: cannot read its config.json: ")
    assert line.endswith(f"; no local directory models/my-llama either (looked in {REPO})")


def test_fp16_on_a_machine_without_a_gpu_is_refused_before_loading(tmp_path):
    """It trained in float32, said only by the plan's precision (helper-78)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU, where training.fp16 works")
    result = run_sft("--training.fp16", "true", "--training.output_dir", str(tmp_path / "out"), check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        "sft.py: error: training.fp16: true needs a GPU, and this machine has none: the run would train in float32; "
        "run it on a GPU, or remove the key")
    assert not (tmp_path / "out").exists()


def test_a_dataset_name_neither_on_disk_nor_on_the_hub_says_both_were_tried(tmp_path):
    """LLaMA-Factory's dataset_info names (my_data) and a typo of a local folder read as a hub id: the error spoke of
    the hub alone (helper-78)."""
    result = run_python("sft.py", "--inspect", "0", "--dataset.name", "my_data", env={"HF_HUB_OFFLINE": "1"},
                        check=False)
    line = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and line.startswith("sft.py: error: dataset.name: my_data (split 'train') could "
                                                      "not be loaded: "), result.stderr[-2000:]
    assert line.endswith(f"; no local file or directory my_data either (looked in {REPO})"), line


def test_a_hub_that_cannot_be_reached_is_asked_once_for_the_model(tmp_path):
    """The commit pin (model.with_base_pinned) looked the model up, failed after its retries (23 s here), and left
    the error to check_model_source, which asked the hub again: 46 s, and every retry said twice."""
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf")}
    result = run_python("sft.py", "--dry-run", "--model.path", "someorg/some-model", "--training.output_dir",
                        str(tmp_path / "out"), env=env, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(
        "sft.py: error: model.path someorg/some-model: cannot read its config.json: We couldn't connect to")
    assert result.stderr.count("Retrying in") == 5, result.stderr[-3000:]  # huggingface_hub's one round of them


@pytest.mark.parametrize(("env", "expected"), [
    ({"HF_HUB_OFFLINE": "1"}, "training.push_to_hub: true needs the hub, but HF_HUB_OFFLINE is set"),
    ({}, "training.push_to_hub: true needs a hub login: run `hf auth login` or set HF_TOKEN"),
])
def test_push_to_hub_without_the_hub_or_a_login_is_refused_before_loading(tmp_path, env, expected):
    """The Trainer found it out once built, after the data and the model had loaded, with a traceback."""
    no_login = {"HF_TOKEN": "", "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}  # no token stored there
    result = run_python("sft.py", "--training.push_to_hub", "true", "--training.output_dir", str(tmp_path / "out"),
                        env={**no_login, **env}, check=False, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_only_the_main_process_needs_a_hub_login(tmp_path, monkeypatch):
    """The Trainer creates the repo and pushes from process 0 only: a machine without a login (on a cluster, often
    all but the first) stopped every machine at its config check."""
    from sftkit.checks import _hub_errors

    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("RANK", "0")
    assert _hub_errors({"push_to_hub": True})[0].startswith("training.push_to_hub: true needs ")  # a login or the hub
    monkeypatch.setenv("RANK", "3")
    assert _hub_errors({"push_to_hub": True}) == []


def test_a_hub_repo_the_trainer_cannot_create_is_one_line(tmp_path):
    """A login, but a hub that cannot be reached (here nothing listens at the endpoint): the Trainer's repo creation
    fails once it is built."""
    env = {"HF_TOKEN": "hf_" + "x" * 34, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf")}
    result = run_python("sft.py", "--training.push_to_hub", "true", "--training.hub_model_id", "me/tiny",
                        "--training.output_dir", str(tmp_path / "out"), "--training.max_steps", "1", env=env,
                        check=False, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "sft.py: error: training.push_to_hub: the hub failed as the Trainer set up its repo: ")


def test_a_tokenizer_with_tokens_the_embeddings_lack_is_refused_before_training_and_the_advice_works(tmp_path):
    """A pad added to the tokenizer alone (as sftkit's own no-pad-token error advised) passed --inspect and the dry
    run, then ended training in an IndexError traceback (a device-side assert on a GPU). A token no row uses may lie
    past the embeddings, as Gemma 3's <image_soft_token> does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    tokenizer.save_pretrained(model_dir)
    args = ["--model.path", str(model_dir), "--training.output_dir", str(tmp_path / "out"), "--training.max_steps", "2"]
    assert run_python("sft.py", *args, "--dry-run").returncode == 0, "an id no row uses"
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.save_pretrained(model_dir)
    for mode in ("--dry-run", "--inspect", "--training.logging_steps=1"):
        refused = run_python("sft.py", *args, mode, check=False)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
            f"sft.py: error: model.path {model_dir}: the rows (or the pad or eos) use token id 821 ('<pad>'), but the "
            "model's embeddings hold 820 rows (vocab_size in config.json), so training would fail; resize the "
            "embeddings to the tokenizer and save both (model.resize_token_embeddings(len(tokenizer)), then "
            "save_pretrained of each) and point model.path at that copy"), refused.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(model_dir)
    assert run_python("sft.py", *args).returncode == 0
