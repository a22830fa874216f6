"""The config's checks that need more than one key's type: keys that go together, number ranges, paths that must
exist, and settings of the built SFTConfig that would fail late or save no model; each returns its errors as one-line
messages (config.load_config raises them together)."""

import dataclasses
import fnmatch
import glob
import importlib.util
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftkit.command import processes_asked_of_accelerate
from sftkit.compat import RENAMED_TRAINING_KEYS, compile_under_zero3_error
from sftkit.engines import is_main_process, launch_uses_fsdp, several_machines, uses_deepspeed, uses_fsdp, zero_stage
from sftkit.layout import ADAPTER_DIR, RUN_FILE, WRITTEN, checkpoint_dir
from sftkit.paths import (
    DATA_FILE_BUILDERS,
    PROJECT_DIR,
    directory_splits,
    is_pattern,
    local_splits,
    looked_in,
    looks_local,
    resolve_glob,
    resolve_path,
    saved_by_datasets,
)
from sftkit.schema import EVAL_DATA_KEYS, DatasetConfig, ModelConfig, SourceConfig, yaml_word


def cross_field_errors(model: ModelConfig, dataset: DatasetConfig, training: dict) -> list[str]:
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
    chosen = [f"dataset.{key}" for key in EVAL_DATA_KEYS if getattr(dataset, key) is not None]
    if len(chosen) > 1:
        errors.append(f"{', '.join(chosen[:-1])} and {chosen[-1]} are {'both' if len(chosen) == 2 else 'all'} set: "
                      "set only one of dataset.test_size, dataset.eval_split and dataset.eval_sources")
    if dataset.split_user_turns and dataset.loss_on == "all":
        errors.append("dataset.split_user_turns: true trains the replies after each user turn, but dataset.loss_on: "
                      "all trains every token, each earlier turn again in every piece; set loss_on: assistant, or "
                      "remove split_user_turns")
    if model.load_in_4bit and not model.use_lora:
        errors.append("model.load_in_4bit: true needs model.use_lora: true (4-bit weights can only train adapters)")
    if not model.merge_adapter and not model.use_lora:
        errors.append("model.merge_adapter: false publishes a LoRA adapter alone, but model.use_lora is false (a "
                      "full fine-tuning has no adapter); remove merge_adapter, or set use_lora: true")
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
    errors += _evaluation_errors(dataset, training) + _hub_errors(training) + _precision_errors(model, training)
    errors += _unused_training_keys(training)
    for old, new in RENAMED_TRAINING_KEYS:
        if old in training and new in training and training[old] != training[new]:  # compat keeps one of them
            errors.append(f"training.{old} ({yaml_word(training[old])}) and training.{new} "
                          f"({yaml_word(training[new])}) are one setting under its old and its new name (transformers "
                          "5): give only one of them")
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
    has_data = dataset.test_size or dataset.eval_split or dataset.eval_sources
    if training.get("load_best_model_at_end") is True and training.get("eval_strategy") in (None, False, "no"):
        # transformers 5.24 refuses only a save_strategy other than eval_strategy: with both "no" it trains and
        # keeps the last weights without a word
        errors.append("training.load_best_model_at_end: true needs evaluations to pick the best checkpoint from, but "
                      "training.eval_strategy is no; set eval_strategy and save_strategy both to steps (or epoch)"
                      + ("" if has_data else " and hold out evaluation data (dataset.test_size: 0.05)")
                      + ", or remove load_best_model_at_end")
        asks.remove("load_best_model_at_end")
    if asks and not has_data:
        errors.append(f"training.{asks[0]} needs evaluation data: set dataset.test_size (0.05 holds out 5% of the "
                      f"rows), dataset.eval_split or dataset.eval_sources, or remove training.{asks[0]}")
    if training.get("save_strategy") == "best" and not training.get("metric_for_best_model"):
        errors.append("training.save_strategy: best needs training.metric_for_best_model (eval_loss, say), the "
                      "metric that decides which checkpoint is best")
    return errors + _best_metric_errors(training.get("metric_for_best_model"), training.get("greater_is_better"))


# What an evaluation of TRL 1.16's SFTTrainer reports, without compute_metrics (sftkit passes none), and whether more
# is better: the Trainer picked a best checkpoint by another metric only at the first evaluation, with a KeyError
# that ended the run before its checkpoint was saved.
EVAL_METRICS = {"loss": False, "mean_token_accuracy": True, "entropy": None}  # None: either way round makes sense


def _best_metric_errors(metric, greater_is_better) -> list[str]:
    if not isinstance(metric, str):
        return []
    name = metric.removeprefix("eval_")
    if name not in EVAL_METRICS:
        return [f"training.metric_for_best_model: {metric!r} is not a metric the evaluations report; use one of "
                f"{', '.join('eval_' + known for known in EVAL_METRICS)}"]
    if isinstance(greater_is_better, bool) and EVAL_METRICS[name] not in (None, greater_is_better):
        more = "highest" if greater_is_better else "lowest"
        return [f"training.greater_is_better: {yaml_word(greater_is_better)} counts the checkpoint of the {more} "
                f"{metric} as the best, and publishes the worst; remove greater_is_better (the Trainer sets it from "
                "the metric's name)"]
    return []


def _precision_errors(model: ModelConfig, training: dict) -> list[str]:
    """Full fine-tuning of float16 weights: AdamW's small updates round away and large ones overflow (the tiny
    model's loss went 3.2, 2.8, 58, 1071 in four steps, and the run published). Mixed precision (training.fp16 with
    model.dtype auto) keeps float32 weights; so do DeepSpeed and FSDP under fp16 or bf16, as master weights. LoRA
    trains float32 adapters over the frozen float16 base."""
    if model.dtype != "float16" or model.use_lora:
        return []
    mixed = training.get("fp16") is True or training.get("bf16") is True
    if mixed and (uses_deepspeed(training) or uses_fsdp(training)):
        return []
    return ["model.dtype: float16 with full fine-tuning trains float16 weights, which lose small updates and "
            "overflow; on a GPU without bf16 set training.fp16: true and model.dtype auto (mixed precision keeps "
            "float32 weights), else use model.dtype auto or bfloat16"]


# TRL settings that act on the rows TRL tokenizes; sftkit hands it input_ids and labels, so they would do nothing.
# The values a saved sftkit_config.yaml holds (TRL 1.16's defaults) pass.
UNUSED_TRL_KEYS = {
    "assistant_only_loss": (False, "choose what trains with dataset.loss_on: assistant (every assistant turn, the "
                                   "default), last_assistant or all"),
    "completion_only_loss": (None, "choose what trains with dataset.loss_on: assistant (the replies, the default) "
                                   "or all (every token)"),
    "dataset_text_field": ("text", "rename your column with dataset.column_map: {your_column: text} (text-format "
                                   "rows are read from the column text)"),
}


def _unused_training_keys(training: dict) -> list[str]:
    unused = [f"training.{key}: {yaml_word(training[key])} would have no effect, as sftkit hands TRL its rows "
              f"tokenized; remove it and {fix}"
              for key, (default, fix) in UNUSED_TRL_KEYS.items() if key in training and training[key] != default]
    if training.get("chat_template_path"):  # TRL 1.16 sets it on the tokenizer it saves, after the rows are masked
        unused.append("training.chat_template_path: the rows are rendered and masked before TRL reads it, with the "
                      "model's template or dataset.chat_template, so the model would train on one template and be "
                      "published with this one; remove it and set dataset.chat_template to the template file")
    return unused


def _hub_errors(training: dict) -> list[str]:
    """training.push_to_hub needs the hub and a login, which the Trainer finds missing only once it is built, after
    the data and the model have loaded (transformers 5.24 creates the repo then)."""
    if training.get("hub_token") == "<hidden>":
        return ["training.hub_token is <hidden>, what sftkit saves in place of a token; remove the key "
                "(huggingface_hub finds your login or HF_TOKEN)"]
    if not training.get("push_to_hub") or not is_main_process():  # only the main process talks to the hub
        return []
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        return ["training.push_to_hub: true needs the hub, but HF_HUB_OFFLINE is set; unset it, or remove "
                "push_to_hub (the model is saved in training.output_dir either way)"]
    if not (training.get("hub_token") or get_token()):
        return ["training.push_to_hub: true needs a hub login: run `hf auth login` or set HF_TOKEN, or remove "
                "push_to_hub (the model is saved in training.output_dir either way)"]
    return []


def warmup_outlasts(args, total_steps: int) -> str | None:
    """What a warmup as long as the run does: the learning rate never reaches training.learning_rate (a 1-step smoke
    run of a shipped config trains at a rate of 0 and publishes the base unchanged)."""
    warmup = args.get_warmup_steps(total_steps)
    if warmup < total_steps or total_steps <= 0 or args.lr_scheduler_type in ("constant", "reduce_lr_on_plateau"):
        return None  # those two have no warmup
    peak = args.learning_rate * (total_steps - 1) / warmup  # a linear warmup's rate at the last step
    return (f"training.warmup_steps ({warmup} steps) is at least the run's {total_steps} "
            f"step{'s' if total_steps != 1 else ''}: the learning rate "
            f"never reaches training.learning_rate {args.learning_rate:g} (it peaks at {peak:.2g}); lower "
            "warmup_steps or train longer")


def built_config_errors(training) -> list[str]:
    """What is wrong with the built SFTConfig that the Trainer finds only after the model has loaded, or never: the
    scheduler's arguments and the reporting integrations (transformers 5.24), and settings under which the run would
    save no model, or a broken one, at its end."""
    errors = _report_to_errors(training.report_to)
    if not _deepspeed_owns("scheduler", training):
        errors.append(_scheduler_error(training))
    errors += [compile_under_zero3_error(training), _zero3_save_error(training), _fsdp_save_error(training),
               _save_on_each_node_error(training)]
    return [error for error in errors if error]


def _zero3_save_error(training) -> str | None:
    """Without its 16-bit gather (DeepSpeed's default is off) ZeRO-3 can save no model at the end, only its own
    sharded checkpoint; the export then fails after the whole run (export.require_weights)."""
    if zero_stage(training) != 3:
        return None
    plugin = training.deepspeed_plugin
    gather = plugin.deepspeed_config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save")
    if gather is True or (gather == "auto" and plugin.zero3_save_16bit_model):
        return None
    source = training.deepspeed if isinstance(training.deepspeed, str) else \
        os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    return (f"{source}: DeepSpeed ZeRO-3 saves no model at the end unless zero_optimization."
            "stage3_gather_16bit_weights_on_model_save is true; set it to true, as deepspeed_configs/zero3.json does")


def _save_on_each_node_error(training) -> str | None:
    """Over several machines output_dir is on storage they all share (README, "Where files must live"), where
    save_on_each_node has the first process of each machine write the same files over each other's; under ZeRO-3
    those of the other machines hold no gathered weights and write empty tensors (transformers 5.24): a two-machine
    run published an adapter of 56 empty tensors, with exit code 0."""
    if not training.save_on_each_node or not several_machines():
        return None
    return ("training.save_on_each_node: true has every machine write the model and checkpoints into output_dir, "
            "which several machines share, over each other's (under ZeRO-3 with empty weights); remove it")


def _fsdp_save_error(training) -> str | None:
    """From a sharded state dict the Trainer saves no model at the end. Accelerate's FSDP2 uses one unless its
    config names another (transformers' training.fsdp defaults to the full one)."""
    if training.fsdp:
        kind, where = training.fsdp_config.get("state_dict_type", "FULL_STATE_DICT"), "training.fsdp_config"
    elif launch_uses_fsdp():
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


def machine_errors(training) -> list[str]:
    """What this machine lacks for the run, which the Trainer finds only once the model has loaded: a package
    (liger-kernel, the optimizer's), a W&B login. Checked as the run starts, not with the config: a dry run may plan
    a GPU machine's run on a laptop."""
    errors = []
    if training.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        errors.append("training.use_liger_kernel: true needs the liger-kernel package: pip install -r "
                      "requirements-gpu.txt, or remove the key")
    optimizer = None if _deepspeed_owns("optimizer", training) else _optimizer_error(training)
    return errors + [error for error in (optimizer, _wandb_login_error(training),
                                         _one_process_of_several_error(training), _fp16_on_a_cpu_error(training))
                     if error]


def _fp16_on_a_cpu_error(training) -> str | None:
    """Accelerate 1.15 has no float16 mixed precision on a CPU: the run trained in float32, and said so only in the
    plan's precision (helper-78)."""
    import torch

    if not training.fp16 or torch.cuda.is_available():
        return None
    return ("training.fp16: true needs a GPU, and this machine has none: the run would train in float32; run it on "
            "a GPU, or remove the key")


def _one_process_of_several_error(training) -> str | None:
    """`accelerate launch --num_processes 2` without a launch config for several processes starts one on a CPU or a
    single GPU (Accelerate 1.15 turns on multi-GPU by itself only where it sees several GPUs), which trained alone
    with a batch half the size asked for, without a word."""
    asked = processes_asked_of_accelerate()
    if asked is None or asked < 2 or training.world_size > 1:  # Accelerate's count, MPI's processes included
        return None
    return (f"accelerate launch --num_processes {asked} started 1 process: without a launch config for several "
            "processes Accelerate runs one here; add --config_file accelerate_configs/cpu_ddp_2proc.yaml (CPU) or "
            "multi_gpu.yaml (or one of accelerate_configs/), or launch with --num_processes 1")


def _deepspeed_owns(part: str, training) -> bool:
    """An optimizer or scheduler in the DeepSpeed config replaces the Trainer's (transformers 5.24)."""
    plugin = getattr(training, "deepspeed_plugin", None)
    return plugin is not None and part in plugin.deepspeed_config


def _optimizer_error(training) -> str | None:
    """The Trainer's own choice of optimizer class, which raises for a package that is missing (galore_torch,
    torchao, bitsandbytes, ...) or a setting it lacks (optim_target_modules); those that need the model pass."""
    from transformers import Trainer

    try:
        Trainer.get_optimizer_cls_and_kwargs(training)
    except (ImportError, ValueError, TypeError, NotImplementedError) as error:
        message = " ".join(str(error).split())
        if re.search(r"You need to pass a `?model`?", message):  # transformers 5.24: only the model is missing here
            return None
        return f"training.optim: {getattr(training.optim, 'value', training.optim)} cannot be used: {message}"
    return None


def _scheduler_error(training) -> str | None:
    """The scheduler built as the Trainer builds it, over a throwaway optimizer (cosine_with_min_lr without
    lr_scheduler_kwargs min_lr or min_lr_rate, a keyword the schedule does not take)."""
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=training.learning_rate)
    try:
        get_scheduler(training.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=100,
                      scheduler_specific_kwargs=training.lr_scheduler_kwargs)
    except (ValueError, TypeError) as error:
        name = getattr(training.lr_scheduler_type, "value", training.lr_scheduler_type)
        return (f"training.lr_scheduler_type: {name} with training.lr_scheduler_kwargs "
                f"{yaml_word(training.lr_scheduler_kwargs)}: {' '.join(str(error).split())}; give the schedule's own "
                "arguments in training.lr_scheduler_kwargs")
    return None


def _wandb_login_error(training) -> str | None:
    """report_to wandb (or all, with wandb installed) needs a W&B key, which wandb.init() looks for only once the
    Trainer starts: without a terminal it raised UsageError after the model had loaded, and in one its prompt would
    come there too, so a missing key is refused either way. Offline and disabled runs need none. The key is looked up
    as wandb 0.31 does: WANDB_API_KEY (or an identity token file), ~/.netrc, wandb's settings file."""
    if "wandb" not in (training.report_to or []) or not is_main_process():  # only the main process logs to W&B
        return None
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth
    except ImportError:  # another wandb layout: left to wandb.init()
        return None
    settings = wandb_setup.singleton().settings
    if settings.mode in ("offline", "dryrun", "disabled"):
        return None
    try:
        found = wbauth.authenticate_session(host=settings.base_url, source="sftkit", prompt=False,
                                            update_session=False)
    except AuthenticationError as error:  # a key of the wrong format; both a key and an identity token file
        return f"training.report_to: wandb cannot log in: {' '.join(str(error).split())}"
    except Exception:  # wandb's internals changed (written for 0.31): left to wandb.init()
        return None
    if found is None:
        return ("training.report_to: wandb needs a W&B login: run `wandb login` or set WANDB_API_KEY, or set "
                "WANDB_MODE=offline to log locally (wandb sync uploads later), or remove wandb from report_to")
    return None


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


def number_errors(values: dict[str, Any]) -> list[str]:
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


def numbers(value: Any, key: str) -> dict[str, Any]:
    """The numbers of a config dataclass, flat: {"model.lora_config.r": 16, "dataset.sources[0].weight": 2, ...}."""
    if dataclasses.is_dataclass(value):
        found = {}
        for item in dataclasses.fields(value):
            found.update(numbers(getattr(value, item.name), f"{key}.{item.name}"))
        return found
    if isinstance(value, list):
        return {name: number for index, item in enumerate(value)
                for name, number in numbers(item, f"{key}[{index}]").items()}
    return {key: value} if isinstance(value, (int, float)) and not isinstance(value, bool) else {}


def path_errors(model: ModelConfig, dataset: DatasetConfig, training: Any, beside: Path | None = None) -> list[str]:
    """Local paths that do not exist, and splits that local data does not have; hub ids are left to the hub.
    `beside`: the config file's directory, also looked in."""
    errors = []
    deepspeed = training.get("deepspeed") if isinstance(training, dict) else None
    shipped = PROJECT_DIR / "deepspeed_configs" / f"{deepspeed}.json" if isinstance(deepspeed, str) else None
    if shipped is not None and not looks_local(deepspeed) and shipped.is_file():
        errors.append(f"training.deepspeed: {deepspeed} is not a file; the shipped config of that name is "
                      f"deepspeed_configs/{deepspeed}.json")
    elif isinstance(deepspeed, str) and looks_local(deepspeed) and not Path(resolve_path(deepspeed)).is_file():
        errors.append(f"training.deepspeed: {deepspeed} does not exist{looked_in(deepspeed, beside)}; give the path "
                      "of a DeepSpeed JSON file such as deepspeed_configs/zero2.json")
    if model.path is not None and looks_local(model.path):
        path = Path(resolve_path(model.path))
        if not path.exists():
            errors.append(f"model.path: {model.path} does not exist{looked_in(model.path, beside)}; fix the path, or "
                          "give a hub id such as Qwen/Qwen2.5-0.5B-Instruct")
        elif not (path / "config.json").is_file():
            errors.append(f"model.path: {model.path} is not a model directory (it has no config.json); point it at the "
                          "directory written by save_pretrained, which holds config.json and the weights")
    template = dataset.chat_template
    if template and "{" not in template and not Path(resolve_path(template)).is_file():  # no Jinja tag: a file meant
        errors.append(f"dataset.chat_template: {template} does not exist{looked_in(template, beside)}; give the "
                      "path of a Jinja file, or the template itself")
    sources = [("dataset", dataset)] if not dataset.sources else []
    sources += [(f"dataset.sources[{index}]", source) for index, source in enumerate(dataset.sources or [])]
    evaluation = [(f"dataset.eval_sources[{index}]", source) for index, source in enumerate(dataset.eval_sources or [])]
    for key, source in sources:
        errors += source_errors(key, source, dataset.eval_split, beside)
    for key, source in evaluation:
        errors += source_errors(key, source, None, beside)
    output_dir = training.get("output_dir") if isinstance(training, dict) else None
    if not isinstance(output_dir, str):
        return errors
    return errors + _unexpanded_variables(output_dir) + _output_dir_among_data(output_dir, sources + evaluation)


def _unexpanded_variables(output_dir: str) -> list[str]:
    """`$HOME/runs/x` from a YAML file (or a quoted argument) made a directory named `$HOME` in the working
    directory: neither sftkit nor the Trainer expands variables (the Trainer expands `~`)."""
    variables = re.findall(r"\$(?:\{\w+\}|\w+)", output_dir)
    if not variables or Path(output_dir).expanduser().exists():  # a directory named with a $ is one
        return []
    expanded = os.path.expandvars(output_dir)
    written_out = f" ({expanded})" if "$" not in expanded else ""
    return [f"training.output_dir {output_dir}: {', '.join(variables)} is not expanded (a config's paths are taken as "
            f"written); write the path out{written_out}, or pass it on the command line unquoted for the shell to "
            "expand"]


def _output_dir_among_data(output_dir: str, sources: list[tuple]) -> list[str]:
    """The .json and .jsonl files a run writes into output_dir must never be read as rows, by this run's export and
    resumes or by any later run on the same data: refused where a data directory holds output_dir (read whole,
    subdirectories included), or a data pattern matches a name the run writes there."""
    out = Path(output_dir).expanduser().resolve()
    for key, source in sources:
        if not source.name:
            continue
        if is_pattern(source.name):
            # glob's ** follows symlinked folders: output_dir as written and resolved, against the pattern both ways
            spelled = Path(os.path.abspath(os.path.expanduser(output_dir)))
            patterns = _absolute_patterns(source.name)
            if caught := next(filter(None, (_written_file_a_pattern_matches(place, pattern)
                                            for place in (out, spelled) for pattern in patterns)), None):
                return [f"training.output_dir: {output_dir} is within reach of {key}.name ({source.name}), which would "
                        f"match the run's own {caught} and read it as rows; choose an output_dir the pattern cannot "
                        "match"]
            continue
        data = Path(resolve_path(source.name)).resolve()
        if data.is_dir() and (out == data or data in out.parents):
            where = "the data directory" if out == data else "inside the data directory"
            return [f"training.output_dir: {output_dir} is {where} of {key}.name ({source.name}), which would read "
                    "the run's own files as rows; choose an output_dir outside it"]
    return []


def _written_file_a_pattern_matches(out: Path, pattern: str) -> str | None:
    """The first file a run writes under `out` (by the names layout.py lists, in output_dir and one folder below:
    a checkpoint, the adapter) that the glob matches, relative to `out`; None where it matches none."""
    names = (*WRITTEN, RUN_FILE, "trainer_state.json", "adapter_config.json")
    written = [Path(name) for name in names] + [Path(folder, name) for folder in (checkpoint_dir("", 1), ADAPTER_DIR)
                                                for name in names]
    pattern_parts = Path(pattern).parts
    return next((str(path) for path in written if _parts_match(pattern_parts, (out / path).parts)), None)


def _absolute_patterns(pattern: str) -> tuple[str, str]:
    """A glob as resolve_glob reads it (from the working directory where it matches there, else from the project),
    its fixed folders resolved as output_dir's are, and as written."""
    pattern = os.path.expanduser(pattern)
    if not os.path.isabs(pattern):
        pattern = os.path.join(os.getcwd() if glob.glob(pattern, recursive=True) else PROJECT_DIR, pattern)
    parts = Path(pattern).parts
    fixed = next(index for index, part in enumerate(parts) if glob.has_magic(part))
    fixed_part = Path(*parts[:fixed])
    return str(fixed_part.resolve().joinpath(*parts[fixed:])), str(fixed_part.joinpath(*parts[fixed:]))


def _parts_match(pattern: tuple[str, ...], parts: tuple[str, ...]) -> bool:
    """Whether glob.glob(pattern, recursive=True) would match the path of these parts. Segment by segment, since
    fnmatch's * crosses /: ** stands for any number of folders (none too), and neither it nor a wildcard matches a
    hidden name (.name), as glob reads them."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return _parts_match(pattern[1:], parts) or (
            bool(parts) and not parts[0].startswith(".") and _parts_match(pattern, parts[1:]))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and (
        not parts[0].startswith(".") or pattern[0].startswith(".")) and _parts_match(pattern[1:], parts[1:])


def _files_by_split(folder: Path) -> str:
    """'split train (a.jsonl, b.jsonl) and split test (test.jsonl)', with how the files came to be split."""
    splits = directory_splits(folder)
    listed = " and ".join(f"split {split} ({', '.join(Path(file).name for file in files[:3])}"
                          f"{f' and {len(files) - 3} more' if len(files) > 3 else ''})"
                          for split, files in splits.items())
    why = ("named for their splits as datasets names them" if len(splits) > 1 or "train" not in splits else
           "one split, as not every file is named for a split (train*, test* or eval*, validation* or dev*)")
    return f"{listed}: {why}"


def source_errors(key: str, source: SourceConfig, eval_split: str | None, beside: Path | None = None) -> list[str]:
    """What is wrong with a source that can be told without loading it: a local path or pattern that finds nothing,
    a split it does not have, a hub-only setting on it."""
    name = source.name
    if name is None:
        return []
    targets = list((source.column_map or {}).values())
    if twice := next((target for target in targets if targets.count(target) > 1), None):
        both = [old for old, new in source.column_map.items() if new == twice]
        return [f"{key}.column_map maps {' and '.join(map(str, both))} to the same name {twice!r}; map only one of "
                "them to it"]
    if is_pattern(name):
        if not resolve_glob(name):
            return [f"{key}.name: the pattern {name} matches no file{looked_in(name, beside)}"]
        splits, what = ["train"], "local files have one split, train"
    elif looks_local(name):
        path = Path(resolve_path(name))
        if not path.exists() and "," in name and all(looks_local(part.strip()) for part in name.split(",")):
            return [f"{key}.name: {name} names several files separated by commas (as LLaMA-Factory's dataset: does); "
                    f"list them as dataset.sources: [{', '.join(part.strip() for part in name.split(','))}]"]
        if not path.exists():
            return [f"{key}.name: {name} does not exist{looked_in(name, beside)}; fix the path, or give a hub dataset "
                    "id such as HuggingFaceH4/ultrachat_200k"]
        if source.subset is not None:
            return [f"{key}.subset: {source.subset} names a configuration of a hub dataset, but {name} is local; "
                    "remove it"]
        splits = local_splits(path)
        if not splits:
            return [f"{key}.name: the folder {name} holds no {', '.join(DATA_FILE_BUILDERS)} file (nor one of those "
                    "compressed: .gz, .bz2, .xz); put the data there, or name the file itself"]
        what = "a local file has one split, train"
        if path.is_dir():
            what = f"its splits are {', '.join(splits)}"
            if not saved_by_datasets(path):
                what = f"its files are {_files_by_split(path)}"
    else:
        return []
    errors = []
    if source.split not in splits:
        part = "[" in source.split and source.split.split("[")[0] in splits  # datasets' slices: train[:50]
        errors.append(f"{key}.split: {source.split!r} is not a split of {name}: {what}; "
                      + ("remove the split setting" if splits == ["train"] else "use one of them")
                      + (f"; for its first rows, set {key}.max_samples" if part else ""))
    if eval_split is not None and eval_split not in splits:
        errors.append(f"dataset.eval_split: {eval_split!r} is not a split of {name}: {what}; "
                      + ("hold out rows with dataset.test_size, or evaluate on dataset.eval_sources"
                         if splits == ["train"] else "use one of them"))
    return errors
