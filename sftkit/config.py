"""The run configuration: a YAML file with `model`, `dataset` and `training` sections, plus CLI overrides.

`model` and `dataset` are typed in schema.py; `training` is every field of `trl.SFTConfig`, passed through. The
errors of a config are collected and raised together as one `ConfigError` (the key and type errors, and the checks
across keys of checks.py, first; then those that need the values read), before any model weight is loaded.
"""

import dataclasses
import difflib
import enum
import functools
import logging
import operator
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from sftkit.checks import built_config_errors, cross_field_errors, number_errors, numbers, path_errors
from sftkit.compat import (
    RENAMED_TRAINING_KEYS,
    before_deepspeed_cpu_op_build,
    group_cpu_processes,
    let_deepspeed_find_one_process,
    rename_gradient_checkpointing,
    sft_config_fields,
    training_fields,
)
from sftkit.engines import uses_deepspeed, world_size
from sftkit.errors import ConfigError, first_line, not_utf8
from sftkit.fastpath import bf16_by_default, choose_adapter_inputs
from sftkit.fastpath import choose as choose_fast_path
from sftkit.paths import PRESETS_DIR, PROJECT_DIR, find_config_file, found_beside, looks_local, resolve_path
from sftkit.schema import (
    EVAL_DATA_KEYS,
    SECTIONS,
    DatasetConfig,
    LoraSettings,
    ModelConfig,
    RunConfig,
    SourceConfig,
)

logger = logging.getLogger("sftkit")

YAML_BOOLEAN_WORDS = {"yes", "no", "on", "off", "y", "n"}


def _paths_found_beside(raw: dict, directory: Path) -> dict:
    """The config's local paths, each found beside the config file where the working directory has none
    (paths.found_beside)."""
    found = {section: dict(values) if isinstance(values, dict) else values for section, values in raw.items()}
    for section, key in (("model", "path"), ("dataset", "name"), ("dataset", "chat_template"),
                         ("training", "deepspeed")):
        if isinstance(found.get(section), dict) and key in found[section]:
            found[section][key] = found_beside(found[section][key], directory)
    for key in ("sources", "eval_sources"):
        sources = found["dataset"].get(key) if isinstance(found.get("dataset"), dict) else None
        if isinstance(sources, list):
            found["dataset"][key] = [{**source, "name": found_beside(source.get("name"), directory)}
                                     if isinstance(source, dict) and "name" in source else source
                                     for source in sources]
    return found


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
        for depth, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):  # --model.path x, then --model.path.y 1
                raise ConfigError(f"override --{key}: {'.'.join(parents[: depth + 1])} is given a value already, "
                                  "not keys; give one or the other")
        # YAML 1.1 reads yes/no/on/off as booleans; on the command line they are the words (save_strategy no).
        node[leaf] = value if value.lower() in YAML_BOOLEAN_WORDS else _parse_value(key, value)
        index += 1
    return overrides


def _parse_value(key: str, value: str) -> Any:
    """An override's value as YAML (numbers, lists, true); text that is not YAML is the text the user typed,
    unless it starts like a list or a mapping (a Jinja template starts with {{ or {%: that is text). So is prose
    with a colon ("Note: be brief"), which YAML would read as a mapping: a mapping is written {key: value}. A `#`
    in plain text starts no comment."""
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError as error:
        start = value.lstrip()
        if start.startswith(("[", "{")) and not start.startswith(("{{", "{%", "{#")):
            raise ConfigError(f"override --{key}: {value!r} is not a valid YAML list or mapping "
                              f"({getattr(error, 'problem', None) or first_line(error)}); fix it, or to "
                              f"pass it as text quote it inside the shell quotes: '\"{value}\"'") from None
        return value
    if isinstance(parsed, dict) and not value.lstrip().startswith("{"):
        return value
    # YAML drops a comment: `out #3` would be `out`, and `#1 rule: be brief` nothing. On the command line plain text
    # keeps it; quoted text is YAML's to unquote.
    if "#" in value and (parsed is None or isinstance(parsed, str)) and parsed != value \
            and not value.lstrip().startswith(("'", '"')):
        return value
    return parsed


def _where(errors: list[str], overrides: dict, path) -> str:
    """The command line, when every error is about a key given there (`--training.learning_rate -1`); else the
    config file."""
    def keys(values: dict, prefix: str = ""):  # the leaves: an error about a whole section is not the command line's
        for key, value in values.items():
            if isinstance(value, dict):
                yield from keys(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}"

    given = set(keys(overrides))
    about = [re.split(r"[ :\[,]", error.removeprefix("unknown key "), maxsplit=1)[0] for error in errors]
    return "the command line" if given and all(key in given for key in about) else str(path)


def merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _laid_over(base: dict, layer: dict) -> dict:
    """`layer` merged over `base`, where a training key `layer` gives under one of its two names (transformers 5
    renamed gradient_checkpointing) replaces the other name in `base` too: a saved sftkit_config.yaml holds both,
    and `--training.gradient_checkpointing true` over it was refused as two values of one setting."""
    given = (layer.get("training") or {}) if isinstance(layer.get("training"), dict) else {}
    replaced = {other for pair in RENAMED_TRAINING_KEYS for name, other in (pair, pair[::-1]) if name in given}
    if replaced and isinstance(base.get("training"), dict):
        base = {**base, "training": {key: value for key, value in base["training"].items() if key not in replaced}}
    return merge(base, layer)


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
        text = path.read_text(encoding="utf-8")
        data = yaml.load(text, Loader=_StrictLoader) or {}
    except UnicodeDecodeError as error:
        raise ConfigError(not_utf8(str(path), error)) from None
    except yaml.YAMLError as error:
        mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        hint = "; indent with spaces, not tabs" if problem and "'\\t'" in problem else ""
        if problem and "<block" in problem:
            hint = "; check this line's indentation against the lines above it"
        if problem and "could not find expected ':'" in problem and mark:
            hint = _colon_without_space(text.splitlines(), mark.line) or hint
        raise ConfigError(f"{path}{where}: not valid YAML: {problem or first_line(error)}{hint}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected sections {', '.join(SECTIONS)} at the top level")
    for section in SECTIONS:  # here, before a command-line override of one of its keys replaces it
        if data.get(section) is not None and not isinstance(data[section], dict):
            raise ConfigError(f"{path}: {section} must be a mapping of keys to values (indented `key: value` lines "
                              f"under `{section}:`, no `- `), not {type(data[section]).__name__}")
    return data


def _colon_without_space(lines: list[str], line: int) -> str:
    """`learning_rate:1e-4` is one word to YAML, which then fails a line or two later; name the line."""
    for number in range(min(line, len(lines) - 1), max(line - 3, -1), -1):
        written = re.match(r"^\s*([\w.-]+):(\S.*)$", lines[number])
        if written:
            return f"; line {number + 1} needs a space after its colon: '{written[1]}: {written[2]}'"
    return ""


def _preset_layer(preset: str, under_sources: bool) -> dict:
    """The preset's config (configs/presets/), to lay over the user's. Under dataset.sources its keys of a source
    (max_samples, say), which a preset gives for dataset.name, are left out with a warning."""
    layer = read_yaml(find_config_file(preset, PRESETS_DIR))
    if under_sources:
        source_keys = {key.name for key in dataclasses.fields(SourceConfig)}
        dropped = {key: value for key, value in (layer.get("dataset") or {}).items() if key in source_keys}
        layer["dataset"] = {key: value for key, value in (layer.get("dataset") or {}).items()
                            if key not in source_keys}
        if dropped:
            settings = ", ".join(f"dataset.{key} {value}" for key, value in dropped.items())
            logger.warning(f"--preset {preset}: its {settings} is a source's setting, left out under "
                           "dataset.sources; set it in each source (dataset.sources[0].max_samples) to read fewer "
                           "rows")
    return layer


def _warn_of_unused_lora_settings(model_layers: list[dict], model: ModelConfig) -> None:
    """`model_layers`: the model sections of the file, the preset and the command line, in that order. use_lora
    given with the LoRA settings or after them (a saved sftkit_config.yaml has both; --model.use_lora false over
    lora_train_config.yaml) turns LoRA off on purpose."""
    with_lora = [index for index, layer in enumerate(model_layers) if "lora_config" in layer]
    if with_lora and not any("use_lora" in layer for layer in model_layers[with_lora[-1]:]) and not model.use_lora:
        logger.warning("model.lora_config is set but model.use_lora is false: this run fine-tunes every weight and "
                       "leaves the LoRA settings unused; set model.use_lora: true to train LoRA adapters")


def _without_the_eval_data_overridden(raw: dict, overrides: dict) -> dict:
    """The config less its choice of eval data where the command line makes another: the default config holds out
    test_size 0.05, and `--dataset.eval_sources [...]` was refused for setting two of the three."""
    chosen = [key for key in EVAL_DATA_KEYS if (overrides.get("dataset") or {}).get(key) not in (None, [])]
    if not chosen or not isinstance(raw.get("dataset"), dict):
        return raw
    return {**raw, "dataset": {key: value for key, value in raw["dataset"].items()
                               if key not in EVAL_DATA_KEYS or key in chosen}}


def load_config(config_name: str | None = None, cli_args: list[str] = (), preset: str | None = None) -> RunConfig:
    """Read, merge and validate a config: defaults < YAML < preset < CLI overrides. Raises ConfigError listing
    every problem. A preset (configs/presets/) is a partial config laid over the user's, e.g. fast_test."""
    path = find_config_file(config_name)
    raw = read_yaml(path)
    model_layers = [raw.get("model") or {}]  # the model sections of the file, the preset and the command line
    overrides = parse_overrides(list(cli_args))
    if preset is not None:
        layer = _preset_layer(preset, under_sources=bool((merge(raw, overrides).get("dataset") or {}).get("sources")))
        model_layers.append(layer.get("model") or {})
        raw = _laid_over(raw, layer)
    raw = _paths_found_beside(_laid_over(_without_the_eval_data_overridden(raw, overrides), overrides), path.parent)
    errors: list[str] = []
    for section in raw:
        if section not in SECTIONS:
            errors.append(f"unknown section {section!r}{_suggest(section, SECTIONS)}")
    model = _build(ModelConfig, raw.get("model") or {}, "model", errors)
    dataset = _build(DatasetConfig, raw.get("dataset") or {}, "dataset", errors)
    errors += cross_field_errors(model, dataset, raw.get("training") or {})
    training_errors, training_values = _precheck_training(raw.get("training") or {})
    errors += training_errors
    errors += number_errors({**numbers(model, "model"), **numbers(dataset, "dataset"),
                              **{f"training.{key}": value for key, value in training_values.items()}})
    errors += path_errors(model, dataset, raw.get("training") or {}, path.parent)
    if errors:  # before importing trl and torch, which take seconds
        raise ConfigError(f"{_where(errors, overrides, path)}: " + "; ".join(errors))
    _warn_of_unused_lora_settings([*model_layers, overrides.get("model") or {}], model)
    training_values, gpu = dict(raw.get("training") or {}), _has_gpu()
    speed = choose_fast_path(training_values, model, gpu)
    training = _build_training(training_values, model, dataset, errors)
    if errors:
        raise ConfigError(f"{_where(errors, overrides, path)}: " + "; ".join(errors))
    speed += choose_adapter_inputs(model, training, gpu)
    resolved = {
        "model": hide_secrets(dataclasses.asdict(model)),
        "dataset": hide_secrets(dataclasses.asdict(dataset)),
        "training": hide_secrets(training_fields(training)),
    }
    return RunConfig(model=model, dataset=dataset, training=training, source=path, resolved=resolved, speed=speed)


def read_section(cls, values: Any, section: str, source: Path):
    """One typed section (ModelConfig or DatasetConfig) from a mapping, e.g. of a saved sftkit_config.yaml."""
    errors: list[str] = []
    built = _build(cls, values, section, errors)
    if errors:
        raise ConfigError(f"{source}: " + "; ".join(errors))
    return built


def _precheck_training(values: Any) -> tuple[list[str], dict]:
    """Unknown keys and plainly wrong types in `training`, found without importing trl (see compat.sft_config_fields).
    Returns the errors and the values that could be coerced to their field's type (for checks.number_errors)."""
    if not isinstance(values, dict):
        return [f"training must be a mapping of keys to values, not {type(values).__name__}"], {}
    fields = sft_config_fields()
    errors, coerced = [], {}
    for key, value in values.items():
        if key not in fields:
            errors.append(f"unknown key training.{key}{_suggest(key, fields, 'training')}")
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
    """`int | str | None` (as SFTConfig's source spells it) as a type; None for other types."""
    text = annotation.replace(" ", "")
    parts = text.split("|")
    if not all(part in _SIMPLE_TYPES for part in parts):
        return None
    return functools.reduce(operator.or_, (_SIMPLE_TYPES[part] for part in parts))


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
    if isinstance(kwargs.get("deepspeed"), str) and looks_local(kwargs["deepspeed"]):
        kwargs["deepspeed"] = resolve_path(kwargs["deepspeed"])  # from the working directory, else the project
    if problem := _find_the_launchers_deepspeed_file():
        errors.append(problem)
        return None
    if dataset.test_size or dataset.eval_split or dataset.eval_sources:
        kwargs.setdefault("eval_on_start", True)  # so the summary has the eval loss before training to compare with
    kwargs.setdefault("include_num_input_tokens_seen", "non_padding")  # the Trainer then logs tokens/s
    # A non-finite loss stops the run (monitor.StopGuard), so the Trainer's filter that hides it from the logs would
    # only add a device sync per micro-batch.
    kwargs.setdefault("logging_nan_inf_filter", False)
    _move_hub_token_to_environment(kwargs)
    has_gpu = _has_gpu()
    _resolve_hardware_defaults(kwargs, has_gpu)
    if kwargs.get("deepspeed") and not has_gpu and world_size() > 1:
        errors.append("training.deepspeed needs GPUs: without one, Accelerate counts a single process and DeepSpeed "
                      "rejects the batch size; on a CPU use accelerate_configs/cpu_zero2_2proc.yaml or "
                      "cpu_zero3_2proc.yaml instead")
        return None
    if uses_deepspeed(kwargs) and not has_gpu:
        before_deepspeed_cpu_op_build()  # it happens while SFTConfig sets up the processes, below
    if kwargs.get("deepspeed"):
        let_deepspeed_find_one_process()
    try:
        training = SFTConfig(**kwargs)
    except (ValueError, TypeError) as error:
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        key = _key_in_error(message, values)
        errors.append(f"training{f'.{key}' if key else ''}: {message}")
        return None
    errors += built_config_errors(training)
    return training


def _key_in_error(message: str, given: dict) -> str | None:
    """The training key a library's error is about, for the message to name it (and the command line, where it was
    given there): named in it, or else the only given text quoted in it. SFTConfig's own checks seldom name the key:
    `bogus is not a valid SchedulerType`."""
    named = {key: found.start() for key in given
             if (found := re.search(rf"(?<![\w.]){re.escape(key)}(?!\w)", message))}
    if named:
        return min(named, key=named.get)  # the first named
    quoted = [key for key, value in given.items() if isinstance(value, str) and len(value) >= 3
              and re.search(rf"(?<![\w.]){re.escape(value)}(?!\w)", message)]
    return quoted[0] if len(quoted) == 1 else None


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _resolve_hardware_defaults(kwargs: dict, has_gpu: bool) -> None:
    """Fill the SFTConfig defaults that depend on the machine, so one config runs on a CPU and on a GPU."""
    if "bf16" not in kwargs and "fp16" not in kwargs:
        kwargs["bf16"] = bf16_by_default(has_gpu)  # SFTConfig's bf16=True default fails on a CPU
    kwargs.setdefault("dataloader_pin_memory", has_gpu)
    # The Trainer asks DDP to look for unused parameters whenever activation checkpointing is off: an extra graph
    # traversal every step, and a warning, for causal LMs that use every parameter.
    kwargs.setdefault("ddp_find_unused_parameters", False)
    if not has_gpu:
        group_cpu_processes(kwargs)
    rename_gradient_checkpointing(kwargs)


def _find_the_launchers_deepspeed_file() -> str | None:
    """An Accelerate config's deepspeed_config_file (ACCELERATE_DEEPSPEED_CONFIG_FILE), found as training.deepspeed
    is: from the working directory, else the project. The shipped launch configs name deepspeed_configs/*.json, and
    from the user's own directory the run was refused as if its training section were wrong."""
    launched = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not launched or Path(launched).is_file():
        return None
    found = resolve_path(launched)
    if Path(found).is_file():
        os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = os.path.abspath(found)
        return None
    return (f"the Accelerate config's deepspeed_config_file {launched} does not exist (looked in {os.getcwd()} and in "
            f"{PROJECT_DIR}); give its absolute path there")


def _move_hub_token_to_environment(kwargs: dict) -> None:
    """The Trainer (transformers 5.24) pickles the whole SFTConfig into training_args.bin in output_dir and in every
    checkpoint, so a token in it ends up on disk (and on the Hub with push_to_hub). huggingface_hub reads HF_TOKEN
    when the field is empty, so the token moves there: pushing works and no file holds it."""
    token = kwargs.pop("hub_token", None)
    if token:
        os.environ["HF_TOKEN"] = token


# Access tokens of the Hugging Face Hub, OpenAI-style APIs, GitHub and W&B, by their prefixes. The prefixes also
# start ordinary names (hf-internal-testing, api-documentation-chats.jsonl), so a candidate is hidden only where it
# holds a random-looking run (_RANDOM_RUN): hf_ + 34 mixed-case letters, sk-proj-..., ghp_ + mixed alphanumerics.
TOKEN_LIKE = re.compile(r"\b(?:hf|sk|ghp|gho|github_pat|wandb|api)[_-][A-Za-z0-9_-]{16,}")
_RANDOM_RUN = re.compile(r"[A-Za-z0-9]{16,}")


def _random_looking(run: str) -> bool:
    """16+ letters and digits that mix upper and lower case, or letters and digits, as generated tokens do; words
    in one case do not."""
    letters = [char for char in run if char.isalpha()]
    mixed_case = any(char.islower() for char in letters) and any(char.isupper() for char in letters)
    return mixed_case or (bool(letters) and len(letters) < len(run))


def _hide_token(match: re.Match) -> str:
    return "<hidden>" if any(map(_random_looking, _RANDOM_RUN.findall(match[0]))) else match[0]


def hide_secrets(value: Any) -> Any:
    """`value` with every token-like string replaced by <hidden> (for the printed and saved config)."""
    if isinstance(value, dict):
        return {key: hide_secrets(item) for key, item in value.items()}
    if isinstance(value, list):
        return [hide_secrets(item) for item in value]
    return TOKEN_LIKE.sub(_hide_token, value) if isinstance(value, str) else value


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
            errors.append(f"unknown key {section}.{key}{_suggest(key, fields, section)}")
        elif dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, f"{section}.{key}", errors)
        elif _list_of_dataclass(hints[key]) and isinstance(value, list):
            item = _list_of_dataclass(hints[key])
            # `- data/chat.jsonl` is a source of that name, as dataset.name takes the same text
            value = [{"name": entry} if isinstance(entry, str) and item is SourceConfig else entry for entry in value]
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


# What other tools call sftkit's keys (Axolotl, LLaMA-Factory, TRL's script arguments, PEFT), by themselves or in
# a section: spelling distance finds none of these, or a wrong one (batch_size -> auto_find_batch_size).
KNOWN_AS = {
    "base_model": "model.path", "model_name_or_path": "model.path", "model_name": "model.path",
    "model.name": "model.path",
    "sequence_len": "model.max_seq_length", "cutoff_len": "model.max_seq_length", "max_seq_len": "model.max_seq_length",
    "torch_dtype": "model.dtype", "adapter": "model.use_lora", "finetuning_type": "model.use_lora",
    "lora_r": "model.lora_config.r", "lora_rank": "model.lora_config.r", "rank": "model.lora_config.r",
    "lora_target": "model.lora_config.target_modules", "lora_target_modules": "model.lora_config.target_modules",
    "dataset.path": "dataset.name", "dataset_name": "dataset.name", "data_files": "dataset.name",
    "data_path": "dataset.name",
    "val_set_size": "dataset.test_size", "val_size": "dataset.test_size", "default_system": "dataset.system_prompt",
    "system_message": "dataset.system_prompt", "train_on_inputs": "dataset.loss_on",
    "micro_batch_size": "training.per_device_train_batch_size", "batch_size": "training.per_device_train_batch_size",
    "epochs": "training.num_train_epochs", "num_epochs": "training.num_train_epochs", "lr": "training.learning_rate",
    "warmup_ratio": "training.warmup_steps", "dataset.type": "dataset.format",
    "eval_file": "dataset.eval_sources", "validation_file": "dataset.eval_sources", "val_file": "dataset.eval_sources",
    "eval_dataset": "dataset.eval_sources", "dataset.eval_name": "dataset.eval_sources",
    "test_datasets": "dataset.eval_sources", "datasets": "dataset.sources", "sample_packing": "training.packing",
    "optimizer": "training.optim", "lr_scheduler": "training.lr_scheduler_type",
    "lora_modules_to_save": "model.lora_config.modules_to_save", "lora_target_linear": "model.lora_config.target_modules",
    "flash_attention": "model.attn_implementation", "template": "dataset.chat_template",
    "wandb_project": "training.report_to", "preprocessing_num_workers": "training.dataset_num_proc",
}
# What a suggestion adds where the key it suggests takes the value another way
EVAL_FILE_NOTE = "a list of sources: eval_sources: [{name: heldout.jsonl}]"
KNOWN_AS_NOTES = {
    "warmup_ratio": "transformers 5 removed warmup_ratio: a warmup_steps below 1 is that fraction of the steps",
    **{key: EVAL_FILE_NOTE for key in ("eval_file", "validation_file", "val_file", "eval_dataset", "eval_name",
                                       "test_datasets")},
    "datasets": "a list of sources: dataset: {sources: [{name: a.jsonl}, {name: b.json}]}",
    "lora_target_linear": "target_modules: all-linear",
    "flash_attention": "attn_implementation: flash_attention_2, or leave it out: sftkit chooses it where flash-attn "
                       "is installed",
    "template": "leave it out to use the tokenizer's own chat template, or give a Jinja file",
    "wandb_project": "report_to: wandb, with the project in the WANDB_PROJECT environment variable",
}
# keys of older versions that nothing replaces in the config: what to do instead
REMOVED = {
    "overwrite_output_dir": "transformers 5 removed overwrite_output_dir: pass --overwrite to sft.py to replace what "
                            "an earlier run left in output_dir",
    "logging_dir": "transformers 5 removed logging_dir: TensorBoard writes under output_dir/runs/, or into the "
                   "directory the TENSORBOARD_LOGGING_DIR environment variable names (one per run of a sweep)",
}


def _suggest(key: str, valid, section: str = "") -> str:
    """What an unknown `key` of `section` may be meant as: a key of that section, or the key of another section
    (its full name) that holds it or that other tools call `key`."""
    written, colon, value = key.partition(":")
    if colon and written in valid:  # `{name:x}` is YAML for the key "name:x"
        return f" (YAML needs a space after the colon: '{written}: {value}')"
    if key in REMOVED:
        return f" ({REMOVED[key]})"
    meant = KNOWN_AS.get(f"{section.partition('.')[0]}.{key}") or KNOWN_AS.get(key) or _home_of(key)
    note = f" {KNOWN_AS_NOTES[key]}" if key in KNOWN_AS_NOTES else ""
    if meant and meant.rpartition(".")[2] in valid:  # this section's (a source's `name` for dataset.name)
        return f" (did you mean {meant.rpartition('.')[2]!r}?{note})"
    if meant:
        return f" (did you mean {meant}?{note})"
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _home_of(key: str) -> str | None:
    """The full name of the key `key` in another section, as `training.learning_rate`; None where there is none."""
    homes = [("model", ModelConfig), ("model.lora_config", LoraSettings), ("dataset", DatasetConfig)]
    for section, cls in homes:
        if key in {field.name for field in dataclasses.fields(cls)}:
            return f"{section}.{key}"
    return f"training.{key}" if key in sft_config_fields() and key != "max_length" else None


def _coerce(value: Any, hint: Any) -> Any:
    """Return `value` as type `hint`, or raise ValueError saying what was expected.

    YAML reads `1e-4` as a string and CLI overrides arrive as strings, so numbers in strings are accepted.
    Written here because transformers' HfArgumentParser.parse_dict (5.24) hands a mapping's values to the dataclass
    unchecked (`learning_rate: abc` would reach SFTConfig as text), and SFTConfig checks few of them.
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
            except (TypeError, ValueError) as error:
                if isinstance(value, list) and _is_list(option):  # a list with a wrong item: that item is named
                    raise error
        if isinstance(value, bool) and str in args:
            raise ValueError(f"expected {_describe(hint)}, got {str(value).lower()} (YAML reads a bare no, off, yes "
                             "or on as a boolean: quote it, as in \"no\")")
        raise ValueError(f"expected {_describe(hint)}, got {value!r}{_number_for_text(value) if str in args else ''}")
    if origin is Literal:
        if value in args:
            return value
        raise ValueError(f"expected one of {', '.join(map(str, args))}, got {value!r}")
    if _is_list(hint):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return [_list_item(item, number, args[0]) if args else item for number, item in enumerate(value, 1)]
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
        raise ValueError(f"expected a string, got {value!r}{_number_for_text(value)}{_mapping_for_text(value)}")
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value).value
    return value


def _is_list(hint: Any) -> bool:
    return typing.get_origin(hint) in (list, tuple) or hint in (list, tuple)


def _list_item(item: Any, number: int, hint: Any) -> Any:
    try:
        return _coerce(item, hint)
    except (TypeError, ValueError) as error:
        raise ValueError(f"item {number}: {error}") from None


def _mapping_for_text(value: Any) -> str:
    """The fix for text that holds ': ' unquoted (- Note: how do I get a refund?), which YAML reads as a mapping."""
    if isinstance(value, dict) and len(value) == 1:
        key, text = next(iter(value.items()))
        return f" (YAML reads 'key: value' as a mapping: quote it, as in \"{key}: {text}\")"
    return ""


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
