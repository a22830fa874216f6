"""The run configuration: a YAML file with `model`, `dataset` and `training` sections, plus CLI overrides.

`model` and `dataset` are typed here; `training` is every field of `trl.SFTConfig`, passed through. The errors of a
config are collected and raised together as one `ConfigError` (the key and type errors first, then those that need
the values read), before any model weight is loaded.
"""

import dataclasses
import difflib
import enum
import functools
import glob
import importlib.util
import logging
import math
import operator
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sftkit.compat import compile_under_zero3_error, rename_gradient_checkpointing, sft_config_fields
from sftkit.errors import ConfigError
from sftkit.fastpath import choose as choose_fast_path
from sftkit.fastpath import choose_adapter_inputs

logger = logging.getLogger("sftkit")

PACKAGE_DIR = Path(__file__).resolve().parent
# A clone (or `pip install -e .`) has configs/ and data/ beside the package; an installed wheel carries them inside
# it, in sftkit/project/ (see pyproject.toml).
PROJECT_DIR = next(directory for directory in (PACKAGE_DIR.parent, PACKAGE_DIR / "project")
                   if (directory / "configs" / "default_train_config.yaml").is_file() or directory.name == "project")
CONFIGS_DIR = PROJECT_DIR / "configs"
PRESETS_DIR = CONFIGS_DIR / "presets"
DEFAULT_CONFIG = CONFIGS_DIR / "default_train_config.yaml"
SECTIONS = ("model", "dataset", "training")
YAML_BOOLEAN_WORDS = {"yes", "no", "on", "off", "y", "n"}
# A name with one of these extensions is a local file, never a hub id (see looks_local).
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".yaml", ".yml", ".jinja", ".j2")


def option(default=None, help: str = "", factory=None):
    """A config field with its one line of documentation, which `--help model` prints and the README's tables
    are tested against (tests/test_config.py)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoraSettings:
    r: int = option(16, "adapter rank")
    lora_alpha: int = option(32, "scaling numerator, usually 2 × r")
    target_modules: list[str] | str = option(
        "all-linear", "module names, or `all-linear` for every linear layer but the output head")
    lora_dropout: float = option(0.05, "dropout on the adapters' input, in [0, 1)")
    bias: Literal["none", "all", "lora_only"] = option("none", "`none`, `all` or `lora_only`")
    task_type: Literal["CAUSAL_LM"] = option("CAUSAL_LM", "the only PEFT task type of a causal LM")
    use_dora: bool = option(False, "weight-decomposed LoRA (slower, sometimes better)")
    use_rslora: bool = option(False, "rank-stabilized scaling (alpha / sqrt(r) instead of alpha / r)")
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter, e.g. `[lm_head]`")


@dataclass
class ModelConfig:
    path: str | None = option(None, "required: hub id or local directory")
    max_seq_length: int = option(2048, "longer samples are truncated (becomes `SFTConfig.max_length`)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = option(
        None, "`auto`/`null`: bfloat16 when `training.bf16` is on, else float32; or `float32`, `bfloat16`, `float16`")
    load_in_4bit: bool = option(
        False, "QLoRA: NF4 with double quantization, compute and storage in `dtype`; needs `use_lora`")
    use_lora: bool = option(False, "train LoRA adapters instead of every weight")
    lora_config: LoraSettings = option(help="the adapters (keys below)", factory=LoraSettings)
    attn_implementation: str | None = option(
        None, "e.g. `sdpa`, `eager`, `flash_attention_2`, `flex_attention`, `torch_varlen` (PyTorch's own "
              "variable-length flash attention for packed batches, torch >= 2.10); null: `flash_attention_2` on a GPU "
              "with flash-attn installed, else the Hub's flash-attention kernel where allowed (below), else `sdpa`")
    allow_hub_kernels: bool = option(
        False, "let transformers download flash-attention from the Hub's kernels-community (`pip install kernels`); "
               "sftkit then uses it when flash-attn is not installed: packed batches need a variable-length kernel")
    cast_adapter_inputs: bool | None = option(
        None, "LoRA: copy each adapter input to the adapters' float32 (PEFT's way); null: not under bf16/fp16 mixed "
              "precision (autocast computes the adapters in 16 bits either way), except DoRA, QLoRA and DeepSpeed")
    revision: str | None = option(None, "hub branch, tag or commit")
    trust_remote_code: bool = option(False, "run code shipped with the model; only for models you trust")

    @property
    def method(self) -> str:
        return "QLoRA" if self.load_in_4bit else "LoRA" if self.use_lora else "full fine-tuning"


FORMAT_NAMES = Literal[
    "messages", "sharegpt", "prompt_response", "prompt_completion", "question_answer", "alpaca", "text"
]


@dataclass
class SourceConfig:
    name: str | None = option(
        None, "required (or `sources`): hub id; a local `.jsonl`, `.json`, `.csv` or `.parquet` file; a glob "
              "(`data/*.jsonl`); a directory of such files; or a `save_to_disk` directory")
    subset: str | None = option(None, "hub configuration name")
    split: str = option("train", "the split to train on (a local file has one: `train`)")
    format: FORMAT_NAMES | None = option(
        None, "`messages`, `sharegpt`, `prompt_response`, `prompt_completion`, `question_answer`, `alpaca` or `text` "
              "(see the README's Formats); detected from the columns when null")
    column_map: dict[str, str] | None = option(
        None, "rename columns first, `{their_name: our_name}`, e.g. `{query: prompt, reply: response}`")
    max_samples: int | None = option(None, "keep only the first N rows")
    weight: float | None = option(
        None, "when mixing `sources`: 2 uses every row twice, 0.5 a seeded half, null every row once")
    answer_source: Literal["drop", "append"] = option(
        "drop", "`question_answer` rows: `append` adds \"Source: ...\" from the `source` column to the answer")


@dataclass
class DatasetConfig(SourceConfig):
    sources: list[SourceConfig] | None = option(
        None, "several sources to mix, each with the keys above (see the README's Mixing)")
    eval_sources: list[SourceConfig] | None = option(None, "evaluate on these sources (same keys)")
    system_prompt: str | None = option(None, "prepended to rows that have no system message")
    test_size: float | int | None = option(
        None, "or hold out a fraction (below 1) or a count of the rows read, seeded by `training.seed`, before "
              "`sources` weights repeat rows (no eval row also trains)")
    eval_split: str | None = option(None, "or evaluate on this split of the same source(s)")
    loss_on: Literal["assistant", "last_assistant", "all"] = option(
        "assistant", "`assistant`: every assistant turn; `last_assistant`: the final one; `all`: every token")
    chat_template: str | None = option(
        None, "override the tokenizer's template: a Jinja string or a path to a `.jinja` file")
    on_bad_row: Literal["error", "skip"] = option(
        "error", "`error`: stop before training at the first malformed row; `skip`: drop such rows and count them")
    sample_prompts: list[str] | None = option(
        None, "a list of user messages; the model's greedy replies are printed and saved at each evaluation and "
              "epoch end")

    def train_sources(self) -> list[SourceConfig]:
        return self.sources or [self]


def schema_table(cls, prefix: str = "") -> list[str]:
    """The Markdown rows `| key | default | meaning |` of a config section, nested sections flattened."""
    rows, hints = [], typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            rows += schema_table(hints[item.name], f"{prefix}{item.name}.")
            continue
        default = item.default
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
        rows.append(f"| `{prefix}{item.name}` | `{shown}` | {item.metadata.get('help', '')} |")
    return rows


def section_help(section: str) -> str:
    """`--help model` (or dataset): every key of the section with its default and meaning."""
    if section == "training":
        return ("training: every field of trl.SFTConfig (see `python -c \"from trl import SFTConfig; "
                "help(SFTConfig)\"`); sftkit sets max_length from model.max_seq_length")
    cls = {"model": ModelConfig, "dataset": DatasetConfig}[section]
    rows = [row.strip("| ").split(" | ") for row in schema_table(cls)]
    width = max(len(key) for key, _, _ in rows)
    return f"{section}:\n" + "\n".join(f"  {key.strip('`'):<{width}}  {default.strip('`'):<20}  {meaning}"
                                      for key, default, meaning in rows)


@dataclass
class RunConfig:
    model: ModelConfig
    dataset: DatasetConfig
    training: Any  # trl.SFTConfig
    source: Path  # the YAML file it came from
    resolved: dict  # the three sections as finally used, for printing and saving
    speed: list = field(default_factory=list)  # the fast-path choices (sftkit.fastpath.Choice)


def find_config_file(name: str | None, directory: Path = CONFIGS_DIR) -> Path:
    """The config to use: the given path, else the same name (.yaml optional) in `directory`, else the default."""
    if name is None:
        return DEFAULT_CONFIG
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (directory / path, directory / f"{path}.yaml"):
        if not path.is_absolute() and candidate.is_file():
            return candidate
    there = ", ".join(sorted(file.stem for file in directory.glob("*.yaml")))
    raise ConfigError(f"config file not found: {name} (looked in the working directory and in {directory}, which "
                      f"has {there})")


def resolve_path(value: str) -> str:
    """A relative local path, found from the working directory or else the project; anything else is a hub id."""
    value = os.path.expanduser(value)
    if Path(value).exists() or Path(value).is_absolute():
        return value
    in_project = PROJECT_DIR / value
    return str(in_project) if in_project.exists() else value


def resolve_glob(pattern: str) -> list[str]:
    """The files a glob matches, as resolve_path finds a path: from the working directory, else the project."""
    pattern = os.path.expanduser(pattern)
    return sorted(glob.glob(pattern)) or sorted(glob.glob(str(PROJECT_DIR / pattern)))


def looks_local(value: str) -> bool:
    """A path meant on this machine, which is never sent to the hub (a typo would cost a minute of hub retries and
    end in an error about the internet): it exists, starts with `.`, `/` or `~`, has a file extension such as
    .jsonl or .yaml, or lies in a folder that exists."""
    path = Path(value)
    if value.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES or Path(resolve_path(value)).exists():
        return True
    return path.parent != Path(".") and Path(resolve_path(str(path.parent))).is_dir()


def looked_in(value: str) -> str:
    """Where resolve_path looked for a relative path, for an error message."""
    if Path(os.path.expanduser(value)).is_absolute():
        return ""
    places = [Path.cwd()] + ([PROJECT_DIR] if Path.cwd() != PROJECT_DIR else [])
    return f" (looked in {' and in '.join(map(str, places))})"


def parse_overrides(args: list[str]) -> dict:
    """`--training.learning_rate 1e-4 --model.use_lora=true` -> {"training": {"learning_rate": ...}, ...}."""
    overrides: dict = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --training.learning_rate 1e-4")
        key, has_value, value = arg[2:].partition("=")
        if not has_value:
            if index + 1 >= len(args) or (args[index + 1].startswith("--") and "." in args[index + 1]):
                raise ConfigError(f"override {arg} has no value: write {arg} VALUE")
            index += 1
            value = args[index]
        *parents, leaf = key.split(".")
        node = overrides
        for part in parents:
            node = node.setdefault(part, {})
        # YAML 1.1 reads yes/no/on/off as booleans; on the command line they are the words (save_strategy no).
        node[leaf] = value if value.lower() in YAML_BOOLEAN_WORDS else _parse_value(key, value)
        index += 1
    return overrides


def _parse_value(key: str, value: str) -> Any:
    """An override's value as YAML (numbers, lists, true); text that is not YAML is the text the user typed,
    unless it starts like a list or a mapping (a Jinja template starts with {{ or {%: that is text). So is prose
    with a colon ("Note: be brief"), which YAML would read as a mapping: a mapping is written {key: value}."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as error:
        start = value.lstrip()
        if start.startswith(("[", "{")) and not start.startswith(("{{", "{%", "{#")):
            raise ConfigError(f"override --{key}: {value!r} is not a valid YAML list or mapping "
                              f"({getattr(error, 'problem', None) or str(error).splitlines()[0]}); fix it, or to "
                              f"pass it as text quote it inside the shell quotes: '\"{value}\"'") from None
        return value
    return value if isinstance(parsed, dict) and not value.lstrip().startswith("{") else parsed


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word: a config that sets one twice is refused instead."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(problem=f"the key {key_node.value!r} is set twice",
                                                            problem_mark=key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        hint = "; indent with spaces, not tabs" if problem and "'\\t'" in problem else ""
        if problem and "<block" in problem:
            hint = "; check this line's indentation against the lines above it"
        raise ConfigError(f"{path}{where}: not valid YAML: {problem or str(error).splitlines()[0]}{hint}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected sections {', '.join(SECTIONS)} at the top level")
    for section in SECTIONS:  # here, before a command-line override of one of its keys replaces it
        if data.get(section) is not None and not isinstance(data[section], dict):
            raise ConfigError(f"{path}: {section} must be a mapping of keys to values (indented `key: value` lines "
                              f"under `{section}:`, no `- `), not {type(data[section]).__name__}")
    return data


def load_config(config_name: str | None = None, cli_args: list[str] = (), preset: str | None = None) -> RunConfig:
    """Read, merge and validate a config: defaults < YAML < preset < CLI overrides. Raises ConfigError listing
    every problem. A preset (configs/presets/) is a partial config laid over the user's, e.g. fast_test."""
    path = find_config_file(config_name)
    raw = read_yaml(path)
    written = raw.get("model") or {}  # the file's own model section, before a preset or an override
    if preset is not None:
        raw = merge(raw, read_yaml(find_config_file(preset, PRESETS_DIR)))
    raw = merge(raw, parse_overrides(list(cli_args)))
    errors: list[str] = []
    for section in raw:
        if section not in SECTIONS:
            errors.append(f"unknown section {section!r}{_suggest(section, SECTIONS)}")
    model = _build(ModelConfig, raw.get("model") or {}, "model", errors)
    dataset = _build(DatasetConfig, raw.get("dataset") or {}, "dataset", errors)
    errors += _cross_field_errors(model, dataset, raw.get("training") or {})
    training_errors, training_values = _precheck_training(raw.get("training") or {})
    errors += training_errors
    errors += _number_errors({**_numbers(model, "model"), **_numbers(dataset, "dataset"),
                              **{f"training.{key}": value for key, value in training_values.items()}})
    errors += _path_errors(model, dataset, raw.get("training") or {})
    if errors:  # before importing trl and torch, which take seconds
        raise ConfigError(f"{path}: " + "; ".join(errors))
    if "lora_config" in written and not written.get("use_lora") and not model.use_lora:  # not turned off on purpose
        logger.warning("model.lora_config is set but model.use_lora is false: this run fine-tunes every weight and "
                       "leaves the LoRA settings unused; set model.use_lora: true to train LoRA adapters")
    training_values, gpu = dict(raw.get("training") or {}), _has_gpu()
    speed = choose_fast_path(training_values, model, gpu)
    training = _build_training(training_values, model, dataset, errors)
    if errors:
        raise ConfigError(f"{path}: " + "; ".join(errors))
    speed += choose_adapter_inputs(model, training, gpu)
    resolved = {
        "model": hide_secrets(dataclasses.asdict(model)),
        "dataset": hide_secrets(dataclasses.asdict(dataset)),
        "training": _public_training_fields(training),
    }
    return RunConfig(model=model, dataset=dataset, training=training, source=path, resolved=resolved, speed=speed)


def read_section(cls, values: Any, section: str, source: Path):
    """One typed section (ModelConfig or DatasetConfig) from a mapping, e.g. of a saved sftkit_config.yaml."""
    errors: list[str] = []
    built = _build(cls, values, section, errors)
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    return built


def _cross_field_errors(model: ModelConfig, dataset: DatasetConfig, training: dict) -> list[str]:
    errors = []
    if model.path is None:  # no silent default: a config that forgot it would fine-tune the embedded tiny model
        errors.append("model.path is required: the model to fine-tune, a hub id (e.g. Qwen/Qwen2.5-0.5B-Instruct) or "
                      "a local directory")
    if dataset.name is None and not dataset.sources:
        errors.append("dataset.name is required: a hub id or a local file or directory (or list dataset.sources)")
    if dataset.name is not None and dataset.sources:
        errors.append("set dataset.name or dataset.sources, not both")
    for key in ("sources", "eval_sources"):
        for index, source in enumerate(getattr(dataset, key) or []):
            if source.name is None:
                errors.append(f"dataset.{key}[{index}] has no name: give each source a name (a hub id or a path)")
    if dataset.sources:
        errors += [f"dataset.{key.name} is set beside dataset.sources, where it would be ignored; set it in the "
                   f"sources it is for (dataset.sources[0].{key.name})"
                   for key in dataclasses.fields(SourceConfig)
                   if key.name != "name" and getattr(dataset, key.name) != key.default]
    if sum(x is not None for x in (dataset.test_size, dataset.eval_split, dataset.eval_sources)) > 1:
        errors.append("set only one of dataset.test_size, dataset.eval_split and dataset.eval_sources")
    if model.load_in_4bit and not model.use_lora:
        errors.append("model.load_in_4bit: true needs model.use_lora: true (4-bit weights can only train adapters)")
    if model.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        errors.append("model.load_in_4bit: true needs the bitsandbytes package: pip install bitsandbytes")
    size = dataset.test_size
    if size is not None and size >= 1 and not float(size).is_integer():
        errors.append("dataset.test_size must be a fraction between 0 and 1, or a row count")
    if "max_length" in training:
        errors.append("training.max_length is set from model.max_seq_length; remove it from training")
    if training.get("padding_free") and not training.get("packing"):
        # TRL 1.16 refuses it only once the Trainer is built: without packing it would not cut rows to max_length
        errors.append("training.padding_free: true needs training.packing: true (TRL does not cut unpacked rows to "
                      "model.max_seq_length when padding-free); set training.packing: true, which is padding-free "
                      "itself, and remove padding_free")
    errors += _evaluation_errors(dataset, training)
    if isinstance(training.get("liger_kernel_config"), dict) and training["liger_kernel_config"].get(
            "fused_linear_cross_entropy"):
        # TRL 1.16 raises this only once the Trainer is built, after the model has loaded
        errors.append("training.liger_kernel_config.fused_linear_cross_entropy: TRL's trainer computes the loss in "
                      "chunks itself and refuses Liger's fused cross-entropy; remove it")
    return errors


def _evaluation_errors(dataset: DatasetConfig, training: dict) -> list[str]:
    """What the Trainer refuses only once it is built, after the model has loaded (transformers 5.24)."""
    errors = []
    asks = [key for key in ("eval_strategy", "load_best_model_at_end", "eval_on_start")
            if training.get(key) not in (None, False, "no")]
    if asks and not (dataset.test_size or dataset.eval_split or dataset.eval_sources):
        errors.append(f"training.{asks[0]} needs evaluation data: set dataset.test_size (0.05 holds out 5% of the "
                      f"rows), dataset.eval_split or dataset.eval_sources, or remove training.{asks[0]}")
    if training.get("save_strategy") == "best" and not training.get("metric_for_best_model"):
        errors.append("training.save_strategy: best needs training.metric_for_best_model (eval_loss, say), the "
                      "metric that decides which checkpoint is best")
    return errors


@dataclass(frozen=True)
class Bound:
    """The allowed values of a numeric setting: low..high, either end open, plus special values (max_steps -1)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False  # low itself is not allowed
    high_open: bool = False
    also: tuple = ()
    hint: str = ""  # how to fix, or what a special value means

    def allows(self, value: float) -> bool:
        above = self.low < value if self.low_open else self.low <= value
        below = value < self.high if self.high_open else value <= self.high
        return value in self.also or (above and below)

    def __str__(self) -> str:
        low = f"{'greater than' if self.low_open else 'at least'} {_show(self.low)}"
        high = f"{'below' if self.high_open else 'at most'} {_show(self.high)}"
        text = low if self.high == math.inf else f"{low} and {high}"
        return " or ".join([*map(_show, self.also), text])


def _show(number: float) -> str:
    """1e-05, 0.5, 4294967295 (whole numbers in full)."""
    return str(int(number)) if math.isfinite(number) and float(number).is_integer() else f"{number:g}"


AT_LEAST_1 = Bound(1)
POSITIVE = Bound(0, low_open=True)
NON_NEGATIVE = Bound(0)
PROBABILITY = Bound(0, 1, high_open=True)  # a dropout, an Adam beta
SEED = Bound(0, 2**32 - 1)  # numpy's range
# Every number of the three sections ("dataset.x" also covers dataset.sources[i].x and dataset.eval_sources[i].x).
# A number not listed must be at least 0 (training.weight_decay, max_grad_norm, warmup_steps, dataloader_num_workers,
# neftune_noise_alpha, ...). NaN and infinity are never allowed.
NUMBER_RULES = {
    "model.max_seq_length": AT_LEAST_1,
    "model.lora_config.r": AT_LEAST_1,
    "model.lora_config.lora_alpha": POSITIVE,
    "model.lora_config.lora_dropout": PROBABILITY,
    "dataset.max_samples": Bound(1, hint="leave it unset to use every row"),
    "dataset.weight": Bound(0, low_open=True, hint="leave a source out to drop it"),
    "dataset.test_size": Bound(0, low_open=True, hint="a fraction below 1 or a row count"),
    "training.learning_rate": POSITIVE,
    "training.num_train_epochs": Bound(0, low_open=True, hint="or set training.max_steps"),  # >= 0 with max_steps
    "training.max_steps": Bound(1, also=(-1,), hint="-1 trains for training.num_train_epochs"),
    "training.per_device_train_batch_size": AT_LEAST_1,
    "training.per_device_eval_batch_size": AT_LEAST_1,
    "training.gradient_accumulation_steps": AT_LEAST_1,
    "training.eval_accumulation_steps": AT_LEAST_1,
    "training.logging_steps": Bound(0, low_open=True, hint="below 1: a fraction of the total steps"),
    "training.save_steps": Bound(0, low_open=True, hint="below 1: a fraction of the total steps"),
    "training.eval_steps": Bound(0, low_open=True, hint="below 1: a fraction of the total steps"),
    "training.save_total_limit": Bound(1, hint="null keeps every checkpoint"),
    "training.dataset_num_proc": Bound(1, hint="null: one process per usable core for sources of 10,000 rows or more"),
    "training.dataloader_prefetch_factor": AT_LEAST_1,
    "training.torch_empty_cache_steps": AT_LEAST_1,
    "training.ddp_bucket_cap_mb": AT_LEAST_1,
    "training.ddp_timeout": POSITIVE,
    "training.pad_to_multiple_of": AT_LEAST_1,
    "training.adam_beta1": PROBABILITY,
    "training.adam_beta2": PROBABILITY,
    "training.adam_epsilon": POSITIVE,
    "training.label_smoothing_factor": PROBABILITY,
    "training.seed": SEED,
    "training.data_seed": SEED,
    "training.local_rank": Bound(0, also=(-1,)),
}


def _number_errors(values: dict[str, Any]) -> list[str]:
    """Check every number against NUMBER_RULES; `values` is flat: {"training.seed": 42, "dataset.max_samples": 9}."""
    errors = []
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            errors.append(f"{key} must be a finite number, got {value}")
            continue
        rule = re.sub(r"\.(eval_)?sources\[\d+\]", "", key)
        bound = NUMBER_RULES.get(rule, NON_NEGATIVE)
        if rule == "training.num_train_epochs" and values.get("training.max_steps", -1) > 0:
            bound = NON_NEGATIVE  # max_steps decides the length
        if not bound.allows(value):
            errors.append(f"{key} must be {bound}, got {_show(value)}" + (f" ({bound.hint})" if bound.hint else ""))
    return errors


def _numbers(value: Any, key: str) -> dict[str, Any]:
    """The numbers of a config dataclass, flat: {"model.lora_config.r": 16, "dataset.sources[0].weight": 2, ...}."""
    if dataclasses.is_dataclass(value):
        found = {}
        for item in dataclasses.fields(value):
            found.update(_numbers(getattr(value, item.name), f"{key}.{item.name}"))
        return found
    if isinstance(value, list):
        return {name: number for index, item in enumerate(value)
                for name, number in _numbers(item, f"{key}[{index}]").items()}
    return {key: value} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def _path_errors(model: ModelConfig, dataset: DatasetConfig, training: Any) -> list[str]:
    """Local paths that do not exist, and splits that local data does not have; hub ids are left to the hub."""
    errors = []
    deepspeed = training.get("deepspeed") if isinstance(training, dict) else None
    shipped = PROJECT_DIR / "deepspeed_configs" / f"{deepspeed}.json" if isinstance(deepspeed, str) else None
    if shipped is not None and not looks_local(deepspeed) and shipped.is_file():
        errors.append(f"training.deepspeed: {deepspeed} is not a file; the shipped config of that name is "
                      f"deepspeed_configs/{deepspeed}.json")
    elif isinstance(deepspeed, str) and looks_local(deepspeed) and not Path(resolve_path(deepspeed)).is_file():
        errors.append(f"training.deepspeed: {deepspeed} does not exist{looked_in(deepspeed)}; give the path of a "
                      "DeepSpeed JSON file such as deepspeed_configs/zero2.json")
    if model.path is not None and looks_local(model.path):
        path = Path(resolve_path(model.path))
        if not path.exists():
            errors.append(f"model.path: {model.path} does not exist{looked_in(model.path)}; fix the path, or give a "
                          "hub id such as Qwen/Qwen2.5-0.5B-Instruct")
        elif not (path / "config.json").is_file():
            errors.append(f"model.path: {model.path} is not a model directory (it has no config.json); point it at the "
                          "directory written by save_pretrained, which holds config.json and the weights")
    template = dataset.chat_template
    if template and "\n" not in template and "{" not in template and looks_local(template):
        if not Path(resolve_path(template)).is_file():
            errors.append(f"dataset.chat_template: {template} does not exist{looked_in(template)}; give the path of "
                          "a Jinja file, or the template itself")
    sources = [("dataset", dataset)] if not dataset.sources else []
    sources += [(f"dataset.sources[{index}]", source) for index, source in enumerate(dataset.sources or [])]
    for key, source in sources:
        errors += _source_errors(key, source, dataset.eval_split)
    for index, source in enumerate(dataset.eval_sources or []):
        errors += _source_errors(f"dataset.eval_sources[{index}]", source, None)
    return errors


def _source_errors(key: str, source: SourceConfig, eval_split: str | None) -> list[str]:
    name = source.name
    if name is None:
        return []
    if glob.has_magic(name):
        if not resolve_glob(name):
            return [f"{key}.name: the pattern {name} matches no file{looked_in(name)}"]
        splits, what = ["train"], "local files have one split, train"
    elif looks_local(name):
        path = Path(resolve_path(name))
        if not path.exists():
            return [f"{key}.name: {name} does not exist{looked_in(name)}; fix the path, or give a hub dataset id "
                    "such as HuggingFaceH4/ultrachat_200k"]
        if source.subset is not None:
            return [f"{key}.subset: {source.subset} names a configuration of a hub dataset, but {name} is local; "
                    "remove it"]
        splits = local_splits(path)
        if splits is None:  # a folder of data files: load_dataset names its splits after the files, when it loads
            return []
        what = f"its splits are {', '.join(splits)}" if path.is_dir() else "a local file has one split, train"
    else:
        return []
    errors = []
    if source.split not in splits:
        errors.append(f"{key}.split: {source.split!r} is not a split of {name}: {what}; "
                      + ("remove the split setting" if splits == ["train"] else "use one of them"))
    if eval_split is not None and eval_split not in splits:
        errors.append(f"dataset.eval_split: {eval_split!r} is not a split of {name}: {what}; "
                      + ("hold out rows with dataset.test_size, or evaluate on dataset.eval_sources"
                         if splits == ["train"] else "use one of them"))
    return errors


def local_splits(path: Path) -> list[str] | None:
    """The splits local data has: a data file has one, train; a save_to_disk DatasetDict has its own; a single
    saved Dataset counts as train; None for a folder of data files (load_dataset names splits after the files)."""
    if path.is_file():
        return ["train"]
    if (path / "dataset_dict.json").is_file():
        import json

        return list(json.loads((path / "dataset_dict.json").read_text()).get("splits", []))
    if (path / "state.json").is_file():
        return ["train"]
    return None


def _precheck_training(values: Any) -> tuple[list[str], dict]:
    """Unknown keys and plainly wrong types in `training`, found without importing trl (see compat.sft_config_fields).
    Returns the errors and the values that could be coerced to their field's type (for _number_errors)."""
    if not isinstance(values, dict):
        return [f"training must be a mapping of keys to values, not {type(values).__name__}"], {}
    fields = sft_config_fields()
    errors, coerced = [], {}
    for key, value in values.items():
        if key not in fields:
            errors.append(f"unknown key training.{key}{_suggest(key, fields)}")
            continue
        hint = _TRAINING_HINTS.get(key) or _simple_hint(fields[key])
        if hint is not None:
            try:
                coerced[key] = _coerce(value, hint)
            except (TypeError, ValueError) as error:
                errors.append(f"training.{key}: {error}")
    return errors, coerced


# SFTConfig types it as a path, but Trainer.train() also takes true for "the latest checkpoint in output_dir".
_TRAINING_HINTS = {"resume_from_checkpoint": bool | str | None}
_SIMPLE_TYPES = {"bool": bool, "int": int, "float": float, "str": str, "None": type(None)}


def _simple_hint(annotation: str):
    """`int | str | None` or `Optional[float]` (as SFTConfig's source spells it) as a type; None for other types."""
    text = annotation.replace(" ", "")
    if text.startswith("Optional[") and text.endswith("]"):
        text = text[len("Optional["):-1] + "|None"
    parts = text.split("|")
    if not all(part in _SIMPLE_TYPES for part in parts):
        return None
    return functools.reduce(operator.or_, (_SIMPLE_TYPES[part] for part in parts))


def _build_training(values: dict, model: ModelConfig, dataset: DatasetConfig, errors: list[str]):
    """Coerce the `training` values to SFTConfig's field types and build it (_precheck_training checked the keys)."""
    from accelerate.utils import parse_flag_from_env
    from trl import SFTConfig

    from sftkit.compat import announce_deepspeed_cpu_op_build

    hints = typing.get_type_hints(SFTConfig)
    kwargs = {}
    for key, value in values.items():
        try:
            kwargs[key] = _coerce(value, _TRAINING_HINTS.get(key, hints[key]))
        except (TypeError, ValueError) as error:
            errors.append(f"training.{key}: {error}")
    if errors:
        return None
    if kwargs.get("resume_from_checkpoint") is False:
        kwargs["resume_from_checkpoint"] = None
    kwargs["max_length"] = model.max_seq_length
    if isinstance(kwargs.get("deepspeed"), str) and looks_local(kwargs["deepspeed"]):
        kwargs["deepspeed"] = resolve_path(kwargs["deepspeed"])  # from the working directory, else the project
    if dataset.test_size or dataset.eval_split or dataset.eval_sources:
        kwargs.setdefault("eval_on_start", True)  # so the summary has the eval loss before training to compare with
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")  # the Trainer then logs tokens/s
    # A non-finite loss stops the run (monitor.StopGuard), so the Trainer's filter that hides it from the logs would
    # only add a device sync per micro-batch.
    kwargs.setdefault("logging_nan_inf_filter", False)
    _move_hub_token_to_environment(kwargs)
    _resolve_hardware_defaults(kwargs)
    if kwargs.get("deepspeed") and not _has_gpu() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        errors.append("training.deepspeed needs GPUs: without one, Accelerate counts a single process and DeepSpeed "
                      "rejects the batch size; on a CPU use accelerate_configs/cpu_zero2_2proc.yaml or "
                      "cpu_zero3_2proc.yaml instead")
        return None
    if (kwargs.get("deepspeed") or parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")) and not _has_gpu():
        announce_deepspeed_cpu_op_build()  # it happens while SFTConfig sets up the processes, below
    if kwargs.get("deepspeed") and "LOCAL_RANK" not in os.environ:
        # Outside a launcher DeepSpeed looks for MPI to find its processes; a plain `python sft.py` is one process
        # (on a free port: two such runs, or one beside a launch, must not collide on a fixed one).
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        training = SFTConfig(**kwargs)
    except (ValueError, TypeError) as error:
        errors.append(f"training: {' '.join(line.strip() for line in str(error).splitlines() if line.strip())}")
        return None
    errors += _report_to_errors(training.report_to)
    errors += [error for error in [compile_under_zero3_error(training), _zero3_save_error(training),
                                  _fsdp_save_error(training)] if error]
    return training


def _zero3_save_error(training) -> str | None:
    """Without its 16-bit gather (DeepSpeed's default is off) ZeRO-3 can save no model at the end, only its own
    sharded checkpoint; the export then fails after the whole run (export.require_weights)."""
    plugin = training.deepspeed_plugin
    if plugin is None or plugin.zero_stage != 3:
        return None
    gather = plugin.deepspeed_config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save")
    if gather is True or (gather == "auto" and plugin.zero3_save_16bit_model):
        return None
    source = training.deepspeed if isinstance(training.deepspeed, str) else \
        os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    return (f"{source}: DeepSpeed ZeRO-3 saves no model at the end unless zero_optimization."
            "stage3_gather_16bit_weights_on_model_save is true; set it to true, as deepspeed_configs/zero3.json does")


def _fsdp_save_error(training) -> str | None:
    """From a sharded state dict the Trainer saves no model at the end. Accelerate's FSDP2 uses one unless its
    config names another (transformers' training.fsdp defaults to the full one)."""
    from accelerate.utils import parse_flag_from_env

    if training.fsdp:
        kind, where = training.fsdp_config.get("state_dict_type", "FULL_STATE_DICT"), "training.fsdp_config"
    elif parse_flag_from_env("ACCELERATE_USE_FSDP"):
        default = "FULL_STATE_DICT" if os.environ.get("FSDP_VERSION", "1") == "1" else "SHARDED_STATE_DICT"
        kind, where = os.environ.get("FSDP_STATE_DICT_TYPE", default), "the Accelerate config's fsdp_config"
    else:
        return None
    if str(kind).upper() in ("FULL_STATE_DICT", "1"):
        return None
    return (f"{where}: FSDP with state_dict_type {kind} saves no model at the end; set fsdp_state_dict_type: "
            "FULL_STATE_DICT, as accelerate_configs/fsdp2.yaml does")


def _report_to_errors(report_to: list[str]) -> list[str]:
    """The Trainer only checks these when it is built, after the model has loaded."""
    from transformers.integrations.integration_utils import (
        INTEGRATION_TO_CALLBACK,
        get_available_reporting_integrations,
    )

    errors = []
    for name in report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            errors.append(f"training.report_to: {name} is not one of {', '.join(INTEGRATION_TO_CALLBACK)}, all or none")
        elif name not in get_available_reporting_integrations():
            errors.append(f"training.report_to: {name} needs its package, which is not installed (pip install {name})")
    return errors


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve_hardware_defaults(kwargs: dict) -> None:
    """Fill the SFTConfig defaults that depend on the machine, so one config runs on a CPU and on a GPU."""
    import torch
    from accelerate.utils import parse_flag_from_env

    has_gpu = _has_gpu()
    if "bf16" not in kwargs and "fp16" not in kwargs:
        kwargs["bf16"] = has_gpu and torch.cuda.is_bf16_supported()  # SFTConfig's bf16=True default fails on a CPU
    kwargs.setdefault("dataloader_pin_memory", has_gpu)
    # The Trainer asks DDP to look for unused parameters whenever activation checkpointing is off: an extra graph
    # traversal every step, and a warning, for causal LMs that use every parameter.
    kwargs.setdefault("ddp_find_unused_parameters", False)
    if not has_gpu and parse_flag_from_env("ACCELERATE_USE_DEEPSPEED"):
        # DeepSpeed without a GPU: Accelerate finds no backend of its own, starts DeepSpeed's process group but then
        # counts a single process, so DeepSpeed's batch-size check fails. Naming gloo makes it count them all.
        kwargs.setdefault("ddp_backend", "gloo")
    elif not has_gpu:
        # Several processes without a GPU (torchrun, or accelerate's multi-GPU launcher) only form a DDP group
        # when the Trainer is told it runs on the CPU; a single process is unaffected.
        kwargs.setdefault("use_cpu", True)
    rename_gradient_checkpointing(kwargs)


def _move_hub_token_to_environment(kwargs: dict) -> None:
    """The Trainer pickles the whole SFTConfig into training_args.bin in output_dir and in every checkpoint, so a
    token in it ends up on disk (and on the Hub with push_to_hub). huggingface_hub reads HF_TOKEN when the field is
    empty, so the token moves there: pushing works and no file holds it."""
    token = kwargs.pop("hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token


# Access tokens of the Hugging Face Hub, OpenAI-style APIs, GitHub and W&B, by their prefixes.
TOKEN_LIKE = re.compile(r"\b(?:hf|sk|ghp|gho|github_pat|wandb|api)[_-][A-Za-z0-9_-]{16,}")


def hide_secrets(value: Any) -> Any:
    """`value` with every token-like string replaced by <hidden> (for the printed and saved config)."""
    if isinstance(value, dict):
        return {key: hide_secrets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [hide_secrets(item) for item in value]
    return TOKEN_LIKE.sub("<hidden>", value) if isinstance(value, str) else value


def _public_training_fields(training) -> dict:
    """SFTConfig as a plain dict with secrets hidden (for the printed and saved config)."""
    values = hide_secrets(training.to_dict())
    for key in ("hub_token", "push_to_hub_token"):
        if values.get(key):
            values[key] = "<hidden>"
    return values


def _build(cls, values: Any, section: str, errors: list[str]):
    """Instantiate a config dataclass from a YAML mapping, collecting errors for unknown keys and wrong types."""
    if values is None:  # `lora_config:` with every key below it commented out
        errors.append(f"{section} is empty: give it keys, or remove the line to take its defaults")
        return cls()
    if not isinstance(values, dict):
        errors.append(f"{section} must be a mapping of keys to values, not {type(values).__name__}")
        return cls()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            errors.append(f"unknown key {section}.{key}{_suggest(key, fields)}")
        elif dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, f"{section}.{key}", errors)
        elif _list_of_dataclass(hints[key]) and isinstance(value, list):
            item = _list_of_dataclass(hints[key])
            kwargs[key] = [_build(item, entry, f"{section}.{key}[{i}]", errors) for i, entry in enumerate(value)]
        else:
            try:
                kwargs[key] = _coerce(value, hints[key])
            except (TypeError, ValueError) as error:
                errors.append(f"{section}.{key}: {error}")
    return cls(**kwargs)


def _list_of_dataclass(hint: Any):
    """The item type of `list[SomeDataclass] | None`, else None."""
    for option in (hint, *typing.get_args(hint)):
        if typing.get_origin(option) is list and dataclasses.is_dataclass(typing.get_args(option)[0]):
            return typing.get_args(option)[0]
    return None


def _suggest(key: str, valid) -> str:
    written, colon, value = key.partition(":")
    if colon and written in valid:  # `{name:x}` is YAML for the key "name:x"
        return f" (YAML needs a space after the colon: '{written}: {value}')"
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _coerce(value: Any, hint: Any) -> Any:
    """Return `value` as type `hint`, or raise ValueError saying what was expected.

    YAML reads `1e-4` as a string and CLI overrides arrive as strings, so numbers in strings are accepted.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option)
            except (TypeError, ValueError):
                continue
        if isinstance(value, bool) and str in args:
            raise ValueError(f"expected {_describe(hint)}, got {str(value).lower()} (YAML reads a bare no, off, yes "
                             "or on as a boolean: quote it, as in \"no\")")
        raise ValueError(f"expected {_describe(hint)}, got {value!r}{_number_for_text(value) if str in args else ''}")
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"expected one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (list, tuple) or hint in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return [_coerce(item, args[0]) if args else item for item in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        quoted = isinstance(value, str) and value.strip().lower() in ("true", "false")
        raise ValueError(f"expected true or false, got {value!r}" + (" (text, in quotes: remove the quotes)"
                                                                     if quoted else ""))
    if hint in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        if isinstance(value, str):
            try:
                value = float(value) if hint is float else int(value)
            except ValueError:
                raise ValueError(f"expected {'a number' if hint is float else 'an integer'}, got {value!r}") from None
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        if isinstance(value, (int, float)):
            return hint(value)
        raise ValueError(f"expected {hint.__name__}, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"expected a string, got {value!r}{_number_for_text(value)}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value).value
    return value


def _number_for_text(value: Any) -> str:
    """The fix for digits given where text is expected (output_dir: 2024)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f' (YAML reads it as a number: quote it, as in "{value}")'
    return ""


def _describe(hint: Any) -> str:
    """A type as a user reads it: `Literal["a", "b"] | None` -> "one of a, b or null"."""
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(hint)))
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) in (list, tuple):
        return "a list"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "a mapping"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
