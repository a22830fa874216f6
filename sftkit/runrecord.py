"""The run record (RUN_FILE): what a run is (a fingerprint of its resolved config and digests of its local inputs)
and how far it got. It sits in output_dir and in every checkpoint, and decides which runs a resume may continue.
"""

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from sftkit.layout import RUN_FILE, SUMMARY_FILE, TOKENIZER_FILES, is_checkpoint, written_by_sftkit
from sftkit.paths import directory_splits, file_digest, local_files, resolve_path
from sftkit.schema import DatasetConfig, ModelConfig

# Settings a resume may change without changing what is trained: the length of the run, logging, saving,
# evaluation and where results go. Everything else in the resolved config is part of the fingerprint.
RESUMABLE = {
    "training": {
        "output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs", "logging_strategy", "logging_steps",
        "logging_first_step", "log_level", "log_level_replica", "log_on_each_node", "disable_tqdm",
        "report_to", "run_name", "project", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
        "save_on_each_node", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
        "eval_accumulation_steps", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_token",
        "hub_always_push", "hub_revision", "dataloader_num_workers", "dataloader_prefetch_factor",
        "dataloader_pin_memory", "dataloader_persistent_workers", "dataset_num_proc", "ddp_timeout", "local_rank",
        "include_num_input_tokens_seen", "logging_nan_inf_filter", "load_best_model_at_end", "metric_for_best_model",
        "greater_is_better", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
        "do_eval", "do_train", "do_predict",  # what TrainingArguments derives from eval_strategy and the like
        # how fast, not what is computed (sftkit.fastpath chooses them from the machine)
        "torch_compile", "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "pad_to_multiple_of",
    },
    "model": {"attn_implementation", "allow_hub_kernels", "cast_adapter_inputs",
              "merge_adapter"},  # what the export publishes, not what trains
    "dataset": {"sample_prompts"},
}


def fingerprint(resolved: dict) -> str:
    """A hash of the resolved config less the settings a resume may change (RESUMABLE)."""
    kept = {section: {key: value for key, value in values.items() if key not in RESUMABLE.get(section, ())}
            for section, values in resolved.items()}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def same_settings(record: dict | None, resolved: dict) -> bool:
    """Whether a run record is of a run with these settings (the RESUMABLE ones aside). Records written before
    2026-11-28 hold transformers' placeholders for training's *_token fields (<EOS_TOKEN>, see
    compat.training_fields), and are compared so."""
    if record is None:
        return False
    resolved = _without_settings_added_since(record, resolved)
    theirs = record.get("fingerprint")
    if theirs == fingerprint(resolved):
        return True
    training = resolved.get("training", {})
    as_before = {**resolved, "training": {key: f"<{key.upper()}>" if key.endswith("_token") else value
                                          for key, value in training.items()}}
    if theirs == fingerprint(as_before):
        return True
    # records before 2026-11-28 hold a hub model's revision as written (null: main), not the commit it pinned
    model = resolved.get("model", {})
    if record.get("config", {}).get("model", {}).get("revision", "") is None and model.get("revision"):
        unpinned = {**resolved, "model": {**model, "revision": None}}
        return same_settings({"fingerprint": theirs}, unpinned)
    return False


def _without_settings_added_since(record: dict, resolved: dict) -> dict:
    """The resolved config less the model and dataset keys that the record's config lacks and that hold their
    default: settings added to sftkit since that run (dataset.split_user_turns, 2026-11-29), which ran as the default
    runs now. Set otherwise, they differ from that run, and stay."""
    theirs = record.get("config")
    if not isinstance(theirs, dict):  # a record compared by its fingerprint alone
        return resolved
    trimmed = dict(resolved)
    for section, cls in (("model", ModelConfig), ("dataset", DatasetConfig)):
        defaults = {item.name: item.default for item in dataclasses.fields(cls)}
        ours, recorded = resolved.get(section), theirs.get(section)
        if isinstance(ours, dict) and isinstance(recorded, dict):
            trimmed[section] = {key: value for key, value in ours.items()
                                if key in recorded or key not in defaults or value != defaults[key]}
    return trimmed


def config_differences(ours: dict, theirs: dict) -> list[str]:
    """`training.learning_rate 0.001 (that run: 0.003)` for each fingerprinted setting that differs."""
    ours = _without_settings_added_since({"config": theirs}, ours)
    differences = []
    for section, values in ours.items():
        for key, value in values.items():
            other = theirs.get(section, {}).get(key)
            if key not in RESUMABLE.get(section, ()) and json.dumps(value, default=str) != json.dumps(other, default=str):
                differences.append(f"{section}.{key} {value} (that run: {other})")
    return differences


def run_record(resolved: dict, inputs: dict | None = None, **extra) -> dict:
    """`inputs`: the digests of the run's files (input_digests) as the run began; taken now where None."""
    from sftkit.data import PREPARATION

    return {"fingerprint": fingerprint(resolved), "config": resolved,
            "inputs": input_digests(resolved) if inputs is None else inputs, "preparation": PREPARATION,
            "model_files": MODEL_FILES_VERSION, **extra}


# A base model's files whose contents decide what trains: its config, weights and every tokenizer file
MODEL_FILES = ("config.json", "*.safetensors", "pytorch_model*.bin", "adapter_config.json", *TOKENIZER_FILES)
MODEL_FILES_VERSION = 2  # 1 (records before 2026-11-29): no vocab.json, merges.txt nor added_tokens.json
UNRECORDED_BEFORE_2 = ("vocab.json", "merges.txt", "added_tokens.json")


def input_digests(resolved: dict) -> dict[str, str]:
    """What the local files the run trains from hold: each dataset file (of dataset.name and the sources), the chat
    template file and the model's config and weights, by the name the config gives them, as a digest of their
    contents. The fingerprint covers the names only, and a resume onto a rewritten data file, another template or
    changed base weights would train something else under the same config. Hub ids are left out (their revision is
    in the config)."""
    dataset, files = resolved.get("dataset", {}), {}
    names = [dataset.get("name")] + [source.get("name") for key in ("sources", "eval_sources")
                                     for source in dataset.get(key) or []]
    for name in filter(None, names):
        root = Path(resolve_path(name))
        if root.is_dir():  # every split's files
            files.update({f"{name}/{Path(path).relative_to(root)}": Path(path)
                          for split_files in directory_splits(root).values() for path in split_files})
        else:  # a file or a glob; nothing for a hub id, nor for a glob that matches nothing (the run says so)
            matched = local_files(name)
            files.update({f"{name}:{Path(path).name}" if path != str(root) else name: Path(path) for path in matched})
    # read whole by the run anyway; one that cannot be read (a dangling link a glob matches) the data loader names
    digests = {name: digest for name, path in files.items() if (digest := _readable_digest(path, whole=True))}
    digests.update(_template_digests(dataset))
    model = resolved.get("model", {}).get("path")
    if model and Path(resolve_path(model)).is_dir():
        model_files = _model_digests(Path(resolve_path(model)))
        digests.update({f"{model}/{name}": digest for name, digest in model_files.items()})
    return digests


def _template_digests(dataset: dict) -> dict[str, str]:
    """dataset.chat_template given as a file, which decides every token and mask that trains: its digest by the path
    the config gives ({} for the template's own text, or none)."""
    path = chat_template_file(dataset)
    return {dataset["chat_template"]: file_digest(path, whole=True)} if path is not None else {}


def chat_template_file(dataset: dict) -> Path | None:
    """The file dataset.chat_template names; None for the template's own text, or none."""
    template = dataset.get("chat_template")
    path = Path(resolve_path(template)) if template and "{" not in template else None  # a Jinja tag: the text itself
    return path if path is not None and path.is_file() else None


def _model_digests(model_dir: Path) -> dict[str, str]:
    """A model directory's config, tokenizer and weights files, by name."""
    return {path.name: digest for pattern in MODEL_FILES for path in sorted(model_dir.glob(pattern))
            if (digest := _readable_digest(path))}


def _readable_digest(path: Path, whole: bool = False) -> str | None:
    """file_digest, or None for a file that cannot be read: what loads it says why, in one line."""
    try:
        return file_digest(path, whole)
    except OSError:
        return None



def changed_inputs(record: dict, resolved: dict | None = None) -> list[str]:
    """The local files (data, chat template, base model) whose contents, as the config `resolved` (the record's own
    by default) finds them from here, differ from those the run recorded; [] for a record without digests (before
    2026-11-27)."""
    if "inputs" not in record:
        return []
    config = record.get("config", {}) if resolved is None else resolved
    now = _as_recorded(record, input_digests(config), record["inputs"])
    for template in _template_digests(config.get("dataset", {})).keys() - record["inputs"].keys():
        now.pop(template)  # a record before 2026-11-28 holds no digest of the template (its path is fingerprinted)
    return sorted(name for name in {*record["inputs"], *now} if record["inputs"].get(name) != now.get(name))


def changed_model_files(record: dict | None, model_dir: Path) -> list[str]:
    """The files of the base model in model_dir (by name) whose contents differ from those the run recorded; [] where
    the record holds none (a hub model, or a record before 2026-11-27)."""
    model = (record or {}).get("config", {}).get("model", {}).get("path")
    recorded = {name.removeprefix(f"{model}/"): digest for name, digest in (record or {}).get("inputs", {}).items()
                if model and name.startswith(f"{model}/")}
    if not recorded:
        return []
    now = _as_recorded(record, _model_digests(Path(model_dir)), recorded)
    return sorted(name for name in {*recorded, *now} if recorded.get(name) != now.get(name))


def _as_recorded(record: dict, digests: dict[str, str], recorded: dict[str, str]) -> dict[str, str]:
    """digests less the files an older record took no digest of, to compare with its `recorded` digests."""
    if record.get("model_files", 1) >= MODEL_FILES_VERSION:
        return digests
    return {name: digest for name, digest in digests.items()
            if Path(name).name not in UNRECORDED_BEFORE_2 or name in recorded}


def read_run_record(directory: Path) -> dict | None:
    try:
        return json.loads((Path(directory) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None


def trained_to_step(directory: Path) -> int | None:
    """The step a finished run in directory trained to (its last, whichever checkpoint's model it published): from
    its run record (since 2026-11-28), else from its summary; None when no finished run is recorded there."""
    record = read_run_record(directory) or {}
    if record.get("status") != "finished":
        return None
    if "step" in record:
        return record["step"]
    try:
        return int(json.loads((Path(directory) / SUMMARY_FILE).read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_published(directory: Path, **extra) -> None:
    """The run record says finished as soon as the model is in place: a kill while the report is written leaves a
    finished model, not one that looks still exporting."""
    record = read_run_record(directory)
    if record is not None:
        record.pop("error", None)  # of an export that failed before
        write_json(Path(directory) / RUN_FILE, {**record, "status": "finished", **extra})


def signature(item: Path):
    """What an item looked like when its run wrote it: a file's size, modification time and digest (file_digest); a
    directory's, those of each file in it."""
    if item.is_dir():
        return sorted([str(file.relative_to(item)), *signature(file)] for file in item.rglob("*") if file.is_file())
    stat = item.stat()
    return [stat.st_size, stat.st_mtime_ns, file_digest(item)]


def as_written(file: Path, recorded: list) -> bool:
    """Whether a file is as its signature `recorded` says the run wrote it: the same size and modification time, or,
    copied without its times (cp -r, rsync without -t), the same size and digest. An older signature holds no
    digest: a copy without times counts as changed there."""
    stat = file.stat()
    if stat.st_size != recorded[0]:
        return False
    return stat.st_mtime_ns == recorded[1] or (len(recorded) > 2 and file_digest(file) == recorded[2])


def signatures(directory: Path, names: list[str] | None = None) -> dict:
    """The signature of each item under a name sftkit writes in output_dir (of `names` only, if given), checkpoints
    aside (each holds its own record)."""
    return {item.name: signature(item) for item in Path(directory).iterdir()
            if written_by_sftkit(item.name) and not item.is_symlink() and not is_checkpoint(item)
            and (names is None or item.name in names)}


def record_written(directory: Path, names: list[str] | None = None, found: dict | None = None) -> None:
    """Record in the run record what the run wrote into output_dir, as it is now (or as `found`, signatures taken
    earlier): --overwrite later removes only that, and what the user has added or changed there since counts as
    theirs. Called as each command that writes there ends: training (everything it wrote), `sftkit export` and
    `sftkit compare` (the `names` they wrote)."""
    record = read_run_record(directory)
    if record is None:
        return
    written = signatures(directory, names) if found is None else found
    if names is not None:
        written = {**record.get("written", {}), **written}
    try:
        write_json(Path(directory) / RUN_FILE, {**record, "written": written})
    except OSError:  # a full disk: without the list, what the names say is the run's counts as the run's
        pass


def write_json(path: Path, value: dict) -> None:
    """Written whole or not at all: a crash or a full disk mid-write leaves the previous file."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(json.dumps(value, indent=2, default=str) + "\n")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise

