"""The names of what a run writes into output_dir, and which of them hold its trained model."""

import json
import re
from pathlib import Path

RUN_FILE = "sftkit_run.json"  # in output_dir and in every checkpoint: the fingerprint and the resolved config
LOCK_FILE = ".sftkit.lock"
GUARD_FILE = ".sftkit.lock.guard"  # see runlock.RunLock._one_at_a_time
STAGING_DIR = ".export-incomplete"
PUBLISHING_FILE = "publishing.json"  # in the staging directory once its contents start moving into output_dir
REPLACED_DIR = ".sftkit-replaced"  # what --overwrite removes, moved here first (OutputDir._remove_earlier_run)
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR (5.24), without importing the Trainer here
# What a run writes into output_dir beside the model and its tokenizer
ADAPTER_DIR = "lora_weights"
SUMMARY_FILE = "run_summary.json"  # the report's; an export finished later adds the dtypes it saved
RUN_CONFIG_FILE = "sftkit_config.yaml"
VERSIONS_FILE = "sftkit_versions.json"
LOSS_PLOT = "loss.png"
MODEL_CARD = "README.md"
SAMPLES_FILE = "sample_replies.jsonl"
BEFORE_AFTER_FILE = "before_after.md"  # sftkit compare's report, of the model it compared
DURING_TRAINING = (SAMPLES_FILE, "runs")  # what a run writes as it trains (sample replies, TensorBoard's logs)
# What sftkit and the Trainer write into output_dir (checkpoint-N directories aside), by whole name. Only a directory
# that holds a run record (RUN_FILE) can hold an earlier run's files; anything else there is the user's, never
# removed and never replaced: a model.safetensors.bak or adapter_notes.txt beside the model is theirs.
PUBLISHED_WEIGHTS = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # save_pretrained's shard names (transformers 5.24)
TRAINED = ("config.json", "model.safetensors", "model.safetensors.index.json", ADAPTER_DIR, STAGING_DIR, SUMMARY_FILE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json")
WRITTEN = PUBLISHED_WEIGHTS + TRAINED + TOKENIZER_FILES + (
    "training_args.bin", RUN_CONFIG_FILE, VERSIONS_FILE, MODEL_CARD, LOSS_PLOT, SAMPLES_FILE, BEFORE_AFTER_FILE, "runs",
)


def published_weights(name: str) -> bool:
    """A file an export writes into output_dir beside the model's tokenizer and reports: weights, their index, the
    model's config (the adapter goes into lora_weights/)."""
    return _one_of(name, PUBLISHED_WEIGHTS)


def pushed_from_a_checkpoint(name: str) -> bool:
    """What the Trainer copies into output_dir to push each checkpoint (training.push_to_hub; transformers 5.24's
    _push_from_checkpoint): the weights, their configs, the tokenizer and training_args.bin."""
    return published_weights(name) or name in TOKENIZER_FILES or name == "training_args.bin"


def written_by_sftkit(name: str) -> bool:
    """A name sftkit or the Trainer writes into output_dir (checkpoints aside)."""
    return _one_of(name, WRITTEN)


def holds_training(name: str) -> bool:
    """What holds the trained weights or says how they trained: a run's model, not only its report."""
    return _one_of(name, TRAINED)


def _one_of(name: str, names: tuple[str, ...]) -> bool:
    return name in names or SHARD.fullmatch(name) is not None


LOSS_WINDOW_FILE = "sftkit_loss_window_{rank}.json"  # each process's, in each checkpoint (compat.TrainerWorkarounds)
# What each process saves into a checkpoint of several (transformers 5.24, DeepSpeed, FSDP's sharded states, sftkit's
# loss window), with no barrier before the main process lists the checkpoint: it may list some of them late
PER_PROCESS = re.compile(r"rng_state_\d+\.pth|sftkit_loss_window_\d+\.json|"
                         r"(global_step\d+|pytorch_model_fsdp_\d+|optimizer_\d+)/.*")


def moved_by_a_publish_cut_short(output_dir: Path) -> set[str]:
    """What a publish cut short (export._publish, which lists what it moves in PUBLISHING_FILE first) had moved from
    the staging directory into output_dir: this run's export, whatever the run record says of the names. The
    adapter directory a resume's publish was moving file by file counts once one of its files moved."""
    staging = output_dir / STAGING_DIR
    try:
        listed = json.loads((staging / PUBLISHING_FILE).read_text())
    except (OSError, ValueError):
        return set()
    moved = {name for name in listed["items"] if not (staging / name).exists()}
    if (staging / ADAPTER_DIR).is_dir() and any(not (staging / ADAPTER_DIR / name).exists()
                                                for name in listed.get("adapter", [])):
        moved.add(ADAPTER_DIR)
    return moved


def checkpoint_step(name: str) -> int | None:
    """N of a checkpoint-N name; None for any other name."""
    prefix, _, number = name.rpartition("-")
    return int(number) if prefix == CHECKPOINT_PREFIX and number.isdigit() else None


def checkpoint_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{step}"


def is_checkpoint(path: Path) -> bool:
    """A checkpoint-N directory, as the Trainer names them."""
    return checkpoint_step(path.name) is not None and path.is_dir() and not path.is_symlink()


def run_directory(model_dir: Path) -> Path:
    """The output_dir of the run a model directory comes from: itself, or above it for the run's lora_weights."""
    adapter = (model_dir / "adapter_config.json").is_file() and (model_dir.parent / RUN_CONFIG_FILE).is_file()
    return model_dir.parent if adapter else model_dir


def adapter_in(model_dir: Path) -> Path | None:
    """The LoRA adapter a directory given to chat or compare stands for: itself (a run's lora_weights), or the
    lora_weights of a run that published its adapter alone (model.merge_adapter: false: no config.json); None for a
    merged or full model."""
    if (model_dir / "adapter_config.json").is_file():
        return model_dir
    alone = not (model_dir / "config.json").is_file() and (model_dir / ADAPTER_DIR / "adapter_config.json").is_file()
    return model_dir / ADAPTER_DIR if alone else None


def adapter_base(adapter_dir: Path) -> str:
    """The base model an adapter records: a hub id, or (since 2026-11-28) a local one by its absolute path."""
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
