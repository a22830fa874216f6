"""The run configuration: a YAML file with `model`, `dataset` and `training` sections, plus CLI overrides.

`model` and `dataset` are typed here; `training` is every field of `trl.SFTConfig`, passed through. All errors of a
config are collected and raised together as one `ConfigError`, before any model weight is loaded.
"""

import ast
import dataclasses
import difflib
import enum
import functools
import importlib.util
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PROJECT_DIR = Path(__file__).resolve().parent.parent
CONFIGS_DIR = PROJECT_DIR / "configs"
PRESETS_DIR = CONFIGS_DIR / "presets"
DEFAULT_CONFIG = CONFIGS_DIR / "default_train_config.yaml"
SECTIONS = ("model", "dataset", "training")
YAML_BOOLEAN_WORDS = {"yes", "no", "on", "off", "y", "n"}


class ConfigError(Exception):
    """A problem with the user's config or data, reported as one message and exit code 2."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint; the message says how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass
class LoraSettings:
    r: int = 16  # rank of the update matrices
    lora_alpha: int = 32  # scaling numerator; usually 2 x r
    target_modules: list[str] | str = "all-linear"  # module names, or "all-linear" for every linear layer but the head
    lora_dropout: float = 0.05
    bias: Literal["none", "all", "lora_only"] = "none"
    task_type: str = "CAUSAL_LM"
    use_dora: bool = False  # weight-decomposed LoRA (slower, sometimes better)
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    modules_to_save: list[str] | None = None  # modules trained in full and saved with the adapter, e.g. [lm_head]


@dataclass
class ModelConfig:
    path: str = "data/tiny-chat-llama"  # hub id or local directory
    max_seq_length: int = 2048  # longer samples are truncated; becomes SFTConfig.max_length
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None  # None/auto: bf16 if training.bf16, else fp32
    load_in_4bit: bool = False  # QLoRA: base weights in 4-bit NF4 (needs use_lora)
    use_lora: bool = False  # train LoRA adapters instead of every weight
    lora_config: LoraSettings = field(default_factory=LoraSettings)
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2; None: the transformers default
    revision: str | None = None  # hub branch, tag or commit
    trust_remote_code: bool = False  # run code shipped with the model; only for models you trust

    @property
    def method(self) -> str:
        return "QLoRA" if self.load_in_4bit else "LoRA" if self.use_lora else "full fine-tuning"


FORMAT_NAMES = Literal[
    "messages", "sharegpt", "prompt_response", "prompt_completion", "question_answer", "alpaca", "text"
]


@dataclass
class SourceConfig:
    name: str | None = None  # hub id; a local .jsonl/.json/.csv/.parquet file, a glob, a directory or a save_to_disk dir
    subset: str | None = None  # hub configuration name
    split: str = "train"
    format: FORMAT_NAMES | None = None  # None: detected from the columns
    column_map: dict[str, str] | None = None  # rename columns first: {their_name: our_name}
    max_samples: int | None = None  # keep only the first N rows
    weight: float | None = None  # when mixing: 2 uses every row twice, 0.5 a seeded half; None: every row once
    answer_source: Literal["drop", "append"] = "drop"  # question_answer: append the `source` column to the answer


@dataclass
class DatasetConfig(SourceConfig):
    sources: list[SourceConfig] | None = None  # several sources to mix, instead of name/subset/split/... above
    eval_sources: list[SourceConfig] | None = None  # evaluate on these sources
    system_prompt: str | None = None  # prepended to rows that have no system message
    test_size: float | int | None = None  # hold out a fraction (< 1) or a count of rows for evaluation
    eval_split: str | None = None  # or evaluate on this split of the same source(s)
    loss_on: Literal["assistant", "last_assistant", "all"] = "assistant"  # which tokens train
    chat_template: str | None = None  # override: a Jinja string or a path to a .jinja file
    on_bad_row: Literal["error", "skip"] = "error"  # skip: drop malformed rows and count them in the summary
    sample_prompts: list[str] | None = None  # replies to these are generated at each evaluation and epoch end

    def train_sources(self) -> list[SourceConfig]:
        return self.sources or [self]


@dataclass
class RunConfig:
    model: ModelConfig
    dataset: DatasetConfig
    training: Any  # trl.SFTConfig
    source: Path  # the YAML file it came from
    resolved: dict  # the three sections as finally used, for printing and saving


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
    raise ConfigError(f"config file not found: {name} (looked in the working directory and in {directory})")


def resolve_path(value: str) -> str:
    """A relative local path, found from the working directory or else the project; anything else is a hub id."""
    if Path(value).exists() or Path(value).is_absolute():
        return value
    in_project = PROJECT_DIR / value
    return str(in_project) if in_project.exists() else value


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
            if index + 1 >= len(args):
                raise ConfigError(f"override {arg} has no value")
            index += 1
            value = args[index]
        *parents, leaf = key.split(".")
        node = overrides
        for part in parents:
            node = node.setdefault(part, {})
        # YAML 1.1 reads yes/no/on/off as booleans; on the command line they are the words (save_strategy no).
        node[leaf] = value if value.lower() in YAML_BOOLEAN_WORDS else yaml.safe_load(value)
        index += 1
    return overrides


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {str(error).splitlines()[0]} {getattr(error, 'problem_mark', '')}")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected sections {', '.join(SECTIONS)} at the top level")
    return data


def load_config(config_name: str | None = None, cli_args: list[str] = (), preset: str | None = None) -> RunConfig:
    """Read, merge and validate a config: defaults < YAML < preset < CLI overrides. Raises ConfigError listing
    every problem. A preset (configs/presets/) is a partial config laid over the user's, e.g. fast_test."""
    path = find_config_file(config_name)
    raw = read_yaml(path)
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
    errors += _precheck_training(raw.get("training") or {})
    if errors:  # before importing trl and torch, which take seconds
        raise ConfigError(f"{path}: " + "; ".join(errors))
    training = _build_training(dict(raw.get("training") or {}), model, dataset, errors)
    if errors:
        raise ConfigError(f"{path}: " + "; ".join(errors))
    resolved = {
        "model": dataclasses.asdict(model),
        "dataset": dataclasses.asdict(dataset),
        "training": _public_training_fields(training),
    }
    return RunConfig(model=model, dataset=dataset, training=training, source=path, resolved=resolved)


def read_section(cls, values: Any, section: str, source: Path):
    """One typed section (ModelConfig or DatasetConfig) from a mapping, e.g. of a saved sftkit_config.yaml."""
    errors: list[str] = []
    built = _build(cls, values, section, errors)
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    return built


def _cross_field_errors(model: ModelConfig, dataset: DatasetConfig, training: dict) -> list[str]:
    errors = []
    if dataset.name is None and not dataset.sources:
        errors.append("dataset.name is required: a hub id or a local file or directory (or list dataset.sources)")
    if dataset.name is not None and dataset.sources:
        errors.append("set dataset.name or dataset.sources, not both")
    for index, source in enumerate((dataset.sources or []) + (dataset.eval_sources or [])):
        if source.name is None:
            errors.append(f"dataset source {index} has no name")
    for source in dataset.train_sources():
        if source.weight is not None and source.weight <= 0:
            errors.append(f"dataset weight of {source.name} must be positive (leave a source out to drop it)")
    if sum(x is not None for x in (dataset.test_size, dataset.eval_split, dataset.eval_sources)) > 1:
        errors.append("set only one of dataset.test_size, dataset.eval_split and dataset.eval_sources")
    if model.load_in_4bit and not model.use_lora:
        errors.append("model.load_in_4bit: true needs model.use_lora: true (4-bit weights can only train adapters)")
    size = dataset.test_size
    if size is not None and not (0 < size < 1 or (size >= 1 and float(size).is_integer())):
        errors.append("dataset.test_size must be a fraction between 0 and 1, or a row count")
    if model.max_seq_length is not None and model.max_seq_length < 1:
        errors.append("model.max_seq_length must be positive")
    if "max_length" in training:
        errors.append("training.max_length is set from model.max_seq_length; remove it from training")
    if model.lora_config.r < 1:
        errors.append("model.lora_config.r must be at least 1")
    return errors


def _precheck_training(values: Any) -> list[str]:
    """Unknown keys and plainly wrong types in `training`, found without importing trl (see _sft_config_fields)."""
    if not isinstance(values, dict):
        return [f"training must be a mapping of keys to values, not {type(values).__name__}"]
    fields = _sft_config_fields()
    errors = []
    for key, value in values.items():
        if key not in fields:
            errors.append(f"unknown key training.{key}{_suggest(key, fields)}")
            continue
        hint = _TRAINING_HINTS.get(key) or _SIMPLE_HINTS.get(fields[key].replace(" ", ""))
        if hint is not None:
            try:
                _coerce(value, hint)
            except (TypeError, ValueError) as error:
                errors.append(f"training.{key}: {error}")
    return errors


# SFTConfig types it as a path, but Trainer.train() also takes true for "the latest checkpoint in output_dir".
_TRAINING_HINTS = {"resume_from_checkpoint": bool | str | None}
_SIMPLE_HINTS = {
    name: hint
    for base in (bool, int, float, str)
    for name, hint in ((base.__name__, base), (f"{base.__name__}|None", base | None), (f"Optional[{base.__name__}]", base | None))
}


@functools.cache
def _sft_config_fields() -> dict[str, str]:
    """SFTConfig's field names and annotations, read from the installed sources instead of imported.

    Importing trl imports torch and transformers (about 6 s on a CPU machine); reading the three files that
    define SFTConfig and its bases takes a few tens of milliseconds, so a typo fails in well under a second.
    The full check against the real class follows once these pass.
    """
    trl_dir = Path(importlib.util.find_spec("trl").origin).parent
    transformers_dir = Path(importlib.util.find_spec("transformers").origin).parent
    classes = {
        trl_dir / "trainer" / "sft_config.py": "SFTConfig",
        trl_dir / "trainer" / "base_config.py": "_BaseConfig",
        transformers_dir / "training_args.py": "TrainingArguments",
    }
    fields: dict[str, str] = {}
    for file, class_name in classes.items():
        tree = ast.parse(file.read_text())
        body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name).body
        for node in body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                fields.setdefault(node.target.id, ast.unparse(node.annotation))
    return fields


def _build_training(values: dict, model: ModelConfig, dataset: DatasetConfig, errors: list[str]):
    """Coerce the `training` values to SFTConfig's field types and build it (_precheck_training checked the keys)."""
    from trl import SFTConfig

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
    if dataset.test_size or dataset.eval_split or dataset.eval_sources:
        kwargs.setdefault("eval_on_start", True)  # so the summary has the eval loss before training to compare with
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")  # the Trainer then logs tokens/s
    _resolve_hardware_defaults(kwargs)
    if kwargs.get("deepspeed") and not _has_gpu() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        errors.append("training.deepspeed needs GPUs: without one, Accelerate counts a single process and DeepSpeed "
                      "rejects the batch size; on a CPU use accelerate_configs/cpu_zero2_2proc.yaml or "
                      "cpu_zero3_2proc.yaml instead")
        return None
    if kwargs.get("deepspeed") and "LOCAL_RANK" not in os.environ:
        # Outside a launcher DeepSpeed looks for MPI to find its processes; a plain `python sft.py` is one process.
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                            ("MASTER_PORT", "29500")):
            os.environ.setdefault(name, value)
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as error:
        errors.append(f"training: {str(error).splitlines()[0]}")
        return None


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve_hardware_defaults(kwargs: dict) -> None:
    """Fill the SFTConfig defaults that depend on the machine, so one config runs on a CPU and on a GPU."""
    import torch

    has_gpu = _has_gpu()
    if "bf16" not in kwargs and "fp16" not in kwargs:
        kwargs["bf16"] = has_gpu and torch.cuda.is_bf16_supported()  # SFTConfig's bf16=True default fails on a CPU
    kwargs.setdefault("dataloader_pin_memory", has_gpu)
    # The Trainer asks DDP to look for unused parameters whenever activation checkpointing is off: an extra graph
    # traversal every step, and a warning, for causal LMs that use every parameter.
    kwargs.setdefault("ddp_find_unused_parameters", False)
    if not has_gpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # DeepSpeed without a GPU: Accelerate finds no backend of its own, starts DeepSpeed's process group but then
        # counts a single process, so DeepSpeed's batch-size check fails. Naming gloo makes it count them all.
        kwargs.setdefault("ddp_backend", "gloo")
    elif not has_gpu:
        # Several processes without a GPU (torchrun, or accelerate's multi-GPU launcher) only form a DDP group
        # when the Trainer is told it runs on the CPU; a single process is unaffected.
        kwargs.setdefault("use_cpu", True)
    # transformers 5 renamed gradient_checkpointing to activation_checkpointing and warns on every run where only
    # the old name is set, which TRL's own default (True) does. Users know the old name, so both are accepted.
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if new not in kwargs:
            kwargs[new] = kwargs.pop(old, True if old == "gradient_checkpointing" else None)
        kwargs.pop(old, None)


def _public_training_fields(training) -> dict:
    """SFTConfig as a plain dict with secrets hidden (for the printed and saved config)."""
    values = training.to_dict()
    for key in ("hub_token", "push_to_hub_token"):
        if values.get(key):
            values[key] = "<hidden>"
    return values


def _build(cls, values: Any, section: str, errors: list[str]):
    """Instantiate a config dataclass from a YAML mapping, collecting errors for unknown keys and wrong types."""
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
        raise ValueError(f"expected {_describe(hint)}, got {value!r}")
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
        raise ValueError(f"expected true or false, got {value!r}")
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
        raise ValueError(f"expected a string, got {value!r}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value).value
    return value


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


def is_main_process() -> bool:
    """Rank 0 of a launch (readable before torch.distributed starts), so errors print once."""
    return os.environ.get("RANK", "0") == "0"
