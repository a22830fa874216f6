"""An output directory belongs to one run.

A run takes a lock on output_dir, records what it is (a fingerprint of its resolved config) and refuses to start
where another run's finished model or checkpoints are, unless told to replace them (`--overwrite`) or to continue
them (`training.resume_from_checkpoint`, accepted only for checkpoints of the same run; see checkpoints.py).
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from sftkit.errors import ConfigError

RUN_FILE = "sftkit_run.json"  # in output_dir and in every checkpoint: the fingerprint and the resolved config
LOCK_FILE = ".sftkit.lock"
GUARD_FILE = ".sftkit.lock.guard"  # see OutputDir._one_at_a_time
STAGING_DIR = ".export-incomplete"
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
# Settings a resume may change without changing what is trained: the length of the run, logging, saving,
# evaluation and where results go. Everything else in the resolved config is part of the fingerprint.
RESUMABLE = {
    "training": {
        "output_dir", "resume_from_checkpoint", "max_steps", "num_train_epochs", "logging_strategy", "logging_steps",
        "logging_first_step", "logging_dir", "log_level", "log_level_replica", "log_on_each_node", "disable_tqdm",
        "report_to", "run_name", "project", "save_strategy", "save_steps", "save_total_limit", "save_only_model",
        "save_on_each_node", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "per_device_eval_batch_size",
        "eval_accumulation_steps", "push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_token",
        "hub_always_push", "hub_revision", "dataloader_num_workers", "dataloader_prefetch_factor",
        "dataloader_pin_memory", "dataloader_persistent_workers", "dataset_num_proc", "ddp_timeout", "local_rank",
        "include_num_input_tokens_seen", "logging_nan_inf_filter", "load_best_model_at_end", "metric_for_best_model",
        "greater_is_better", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
        # how fast, not what is computed (sftkit.fastpath chooses them from the machine)
        "torch_compile", "torch_compile_backend", "torch_compile_mode", "use_liger_kernel", "pad_to_multiple_of",
    },
    "model": {"attn_implementation", "allow_hub_kernels", "cast_adapter_inputs"},
    "dataset": {"sample_prompts"},
}
# What sftkit and the Trainer write into output_dir (checkpoint-N directories aside), by whole name. Only a directory
# that holds a run record (RUN_FILE) can hold an earlier run's files; anything else there is the user's, never
# removed and never replaced: a model.safetensors.bak or adapter_notes.txt beside the model is theirs.
PUBLISHED_WEIGHTS = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")
SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # save_pretrained's shard names (transformers 5.24)
TRAINED = ("config.json", "model.safetensors", "model.safetensors.index.json", ADAPTER_DIR, STAGING_DIR, SUMMARY_FILE)
WRITTEN = PUBLISHED_WEIGHTS + TRAINED + (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "chat_template.jinja", "vocab.json", "merges.txt", "added_tokens.json", "training_args.bin", RUN_CONFIG_FILE,
    VERSIONS_FILE, MODEL_CARD, LOSS_PLOT, SAMPLES_FILE, BEFORE_AFTER_FILE, "runs",
)


def published_weights(name: str) -> bool:
    """A file an export writes into output_dir beside the model's tokenizer and reports: weights, their index, the
    model's config (the adapter goes into lora_weights/)."""
    return _one_of(name, PUBLISHED_WEIGHTS)


def written_by_sftkit(name: str) -> bool:
    """A name sftkit or the Trainer writes into output_dir (checkpoints aside)."""
    return _one_of(name, WRITTEN)


def _trained(name: str) -> bool:
    """What holds the trained weights or says how they trained: a run's model, not only its report."""
    return _one_of(name, TRAINED)


def _one_of(name: str, names: tuple[str, ...]) -> bool:
    return name in names or SHARD.fullmatch(name) is not None


def fingerprint(resolved: dict) -> str:
    """A hash of the resolved config less the settings a resume may change (RESUMABLE)."""
    kept = {section: {key: value for key, value in values.items() if key not in RESUMABLE.get(section, ())}
            for section, values in resolved.items()}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_differences(ours: dict, theirs: dict) -> list[str]:
    """`training.learning_rate 0.001 (that run: 0.003)` for each fingerprinted setting that differs."""
    differences = []
    for section, values in ours.items():
        for key, value in values.items():
            other = theirs.get(section, {}).get(key)
            if key not in RESUMABLE.get(section, ()) and json.dumps(value, default=str) != json.dumps(other, default=str):
                differences.append(f"{section}.{key} {value} (that run: {other})")
    return differences


def run_record(resolved: dict, **extra) -> dict:
    from sftkit.data import PREPARATION

    return {"fingerprint": fingerprint(resolved), "config": resolved, "inputs": input_digests(resolved),
            "preparation": PREPARATION, **extra}


MODEL_FILES = ("config.json", "*.safetensors", "pytorch_model*.bin", "adapter_config.json", "tokenizer.json",
               "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "chat_template.jinja")


def input_digests(resolved: dict) -> dict[str, str]:
    """What the local files the run trains from hold: each dataset file (of dataset.name and the sources) and the
    model's config and weights, by the name the config gives them, as a digest of their contents. The fingerprint
    covers the names only, and a resume onto a rewritten data file or changed base weights would train something
    else under the same config. Hub ids are left out (their revision is in the config)."""
    from sftkit.paths import directory_splits, local_files, resolve_path

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
    digests = {name: _digest(path, whole=True) for name, path in files.items()}  # read whole by the run anyway
    model = resolved.get("model", {}).get("path")
    if model and Path(resolve_path(model)).is_dir():
        root = Path(resolve_path(model))
        digests.update({f"{model}/{path.name}": _digest(path) for pattern in MODEL_FILES
                        for path in sorted(root.glob(pattern))})
    return digests


_DIGESTS: dict[tuple, str] = {}


def _digest(path: Path, whole: bool = False) -> str:
    """sha256 of a file's size and contents: all of it when `whole` or below 32 MiB, else (a model's weights) 16
    evenly spaced 256 KiB pieces and the end, a few milliseconds. Computed once per file and modification time in a
    process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256(str(stat.st_size).encode())
        with path.open("rb") as handle:
            if whole or stat.st_size <= 32 * 2**20:
                for block in iter(lambda: handle.read(2**24), b""):
                    digest.update(block)
            else:
                for offset in [stat.st_size * k // 16 for k in range(16)] + [stat.st_size - 2**18]:
                    handle.seek(offset)
                    digest.update(handle.read(2**18))
        _DIGESTS[key] = digest.hexdigest()[:16]
    return _DIGESTS[key]


def readable_like_other_files(files) -> None:
    """safetensors writes its files with mode 0600; give them the mode every other file gets (0644 under the
    usual umask), so a model or checkpoint shared on a cluster's filesystem can be read, and resumed, by the team."""
    umask = os.umask(0)
    os.umask(umask)
    for file in files:
        file.chmod(0o666 & ~umask)


def safetensors_weights(directory: Path) -> list[Path]:
    """The safetensors weights an export published in output_dir, by name: a user's files there are left alone."""
    return sorted(path for path in directory.glob("*.safetensors") if published_weights(path.name))


def empty_tensors(file: Path) -> list[str]:
    """Names of the tensors in a safetensors file that hold no element, read from its header alone. A process that
    saves without holding the gathered weights (ZeRO-3 outside process 0) writes each partitioned parameter's empty
    placeholder: every name there, no weights."""
    from safetensors import safe_open

    with safe_open(file, "pt") as weights:
        return [name for name in weights.keys() if 0 in weights.get_slice(name).get_shape()]


def missing_weights(folder: Path, stem: str) -> str | None:
    """What keeps folder from holding whole weights `stem` (model, adapter_model), read from the headers alone: none
    written, shards missing, a file cut short (its process killed while writing it), unreadable or of empty tensors;
    None when they are whole."""
    index = folder / f"{stem}.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    except (ValueError, KeyError) as error:
        return f"{index.name} is cut short or unreadable ({error})"
    if shards is None:
        shards = [f"{stem}.safetensors"]
        if not (folder / shards[0]).is_file():
            return f"no {stem}.safetensors"
    absent = [shard for shard in shards if not (folder / shard).is_file()]
    if absent:
        return f"{len(absent)} of its {len(shards)} shards are missing, e.g. {absent[0]}"
    for shard in shards:
        if cut_short(folder / shard):
            return f"{shard} is cut short"
        try:
            empty = empty_tensors(folder / shard)
        except Exception as error:  # an OSError, or safetensors' own error type
            return f"{shard} could not be read ({str(error).splitlines()[0]})"
        if empty:
            return f"{shard} holds empty tensors (e.g. {empty[0]})"
    return None


def cut_short(file: Path) -> bool:
    """A safetensors file shorter than its own header says it is: its writer was stopped part way. (A file that
    cannot be read at all is not known to be cut short.)"""
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            size = os.fstat(handle.fileno()).st_size
            if size < 8 + length:
                return True
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return False
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return size < 8 + length + max(ends, default=0)


def changed_inputs(record: dict, resolved: dict | None = None) -> list[str]:
    """The local files (data, base model) whose contents, as the config `resolved` (the record's own by default)
    finds them from here, differ from those the run recorded; [] for a record without digests (before
    2026-11-27)."""
    if "inputs" not in record:
        return []
    now = input_digests(record.get("config", {}) if resolved is None else resolved)
    return sorted(name for name in {*record["inputs"], *now} if record["inputs"].get(name) != now.get(name))


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


def write_json(path: Path, value: dict) -> None:
    """Written whole or not at all: a crash mid-write leaves the previous file."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(partial, path)


@dataclass
class Contents:
    """What an output_dir holds, sorted by who made it."""
    models: list[str] = field(default_factory=list)  # a finished model or adapter, or an unfinished export
    checkpoints: list[str] = field(default_factory=list)
    ours: list[str] = field(default_factory=list)  # reports and other files an earlier run wrote
    foreign: list[str] = field(default_factory=list)  # not written by sftkit or the Trainer
    in_the_way: list[str] = field(default_factory=list)  # foreign, with the name of a file a run writes

    def describe(self) -> str:
        parts = []
        published = [name for name in self.models if name != STAGING_DIR]
        if published:
            parts.append(f"a trained model ({', '.join(published[:3])})")
        if STAGING_DIR in self.models:  # its weights may be whole or cut short; sftkit export tells and finishes it
            parts.append(f"an unfinished export ({STAGING_DIR})")
        if self.checkpoints:
            parts.append(f"{len(self.checkpoints)} checkpoint(s) ({', '.join(self.checkpoints[-2:])})")
        if self.foreign:
            parts.append(f"files sftkit did not write ({', '.join(self.foreign[:3])})")
        if not parts and self.ours:
            parts.append(f"files of an earlier run ({', '.join(self.ours[:3])})")
        return " and ".join(parts)

    def removed(self) -> list[str]:
        """What --overwrite removes: what an earlier run wrote."""
        return self.models + self.checkpoints + self.ours


def survey(directory: Path) -> Contents:
    contents = Contents()
    if not directory.is_dir():
        return contents
    recorded = (directory / RUN_FILE).is_file()  # without a run record nothing there is an earlier run's
    for item in sorted(directory.iterdir(), key=lambda path: _natural_key(path.name)):
        name = item.name
        if name in (LOCK_FILE, GUARD_FILE, RUN_FILE) or name.endswith(".partial"):
            continue
        ours = is_checkpoint(item) or written_by_sftkit(name)
        if not (recorded and ours) or item.is_symlink():
            contents.foreign.append(name)
            if ours:
                contents.in_the_way.append(name)
        elif is_checkpoint(item):
            contents.checkpoints.append(name)
        elif _trained(name):
            contents.models.append(name)
        else:
            contents.ours.append(name)
    return contents


def checkpoint_step(name: str) -> int | None:
    """N of a checkpoint-N name; None for any other name."""
    prefix, _, number = name.rpartition("-")
    return int(number) if prefix == CHECKPOINT_PREFIX and number.isdigit() else None


def checkpoint_dir(output_dir, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}-{step}"


def is_checkpoint(path: Path) -> bool:
    """A checkpoint-N directory, as the Trainer names them."""
    return checkpoint_step(path.name) is not None and path.is_dir() and not path.is_symlink()


def _some(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _natural_key(name: str):
    number = name.rsplit("-", 1)[-1]
    return (name.rsplit("-", 1)[0], int(number)) if number.isdigit() else (name, -1)


class OutputDir:
    """The output directory of one run: locked while the run lives, claimed only when that is safe."""

    def __init__(self, path: str | Path, resolved: dict):
        self.path = Path(path)
        self.resolved = resolved
        self.locked = False
        self.owner = False  # the process that claimed it (the main one) records how the run ends
        self.replaces: Contents | None = None  # what --overwrite removes once training begins
        self.began = False  # training began (begin), in every process

    def claim(self, overwrite: bool, resume) -> None:
        """Create output_dir, lock it, and make sure it is this run's to write. Raises ConfigError otherwise.
        `resume` is training.resume_from_checkpoint: true, a path or None. What --overwrite replaces stays until
        training begins (begin)."""
        self._create()
        self.take_lock()
        try:
            contents = self._contents_this_run_may_take(overwrite, resume)
        except BaseException:
            self.release()
            raise
        self.replaces = contents if overwrite else None

    def freed_at_begin(self) -> int:
        """The bytes begin() frees: what --overwrite removes of the earlier run."""
        if self.replaces is None:
            return 0
        items = [self.path / name for name in self.replaces.removed()]
        return sum(file.stat().st_size for item in items
                   for file in ([item] if item.is_file() else item.rglob("*")) if file.is_file())

    def begin(self, main: bool) -> None:
        """Training begins: in the main process output_dir is recorded as this run's and what --overwrite replaces
        is removed, now that this run's data, model and trainer are ready (a bad row, a failed load or a Ctrl-C
        before it keeps the earlier run whole)."""
        self.began = True
        if not main:
            return
        self.record_start()  # first: a kill while removing leaves this run's record, not the earlier one's "finished"
        if self.replaces is not None:
            self._remove_earlier_run(self.replaces)
            self.replaces = None

    def preview(self, overwrite: bool, resume, model_path: str) -> str:
        """What claim would find, checked the same way but with nothing created, locked or removed (the dry run):
        raises claim's ConfigError, else says what the run would do there."""
        refuse_before_claiming(self.path, model_path, overwrite, resume)
        self._refuse_a_file()
        with contextlib.suppress(FileNotFoundError):  # no lock, or released meanwhile
            self._refuse_a_live_holder((self.path / LOCK_FILE).read_text(), self.path / LOCK_FILE)
        contents = self._contents_this_run_may_take(overwrite, resume)
        earlier = contents.describe()
        if overwrite and earlier:  # as _remove_earlier_run does: files sftkit did not write stay
            removed = Contents(contents.models, contents.checkpoints, contents.ours).describe() or "nothing"
            kept = f"; keeps files sftkit did not write ({_some(contents.foreign, 3)})" if contents.foreign else ""
            return (f"{self.path} (--overwrite: as training begins, the run removes what the earlier run wrote: "
                    f"{removed}{kept})")
        return f"{self.path} ({'new' if not self.path.exists() else 'holds ' + earlier if earlier else 'empty'})"

    def _contents_this_run_may_take(self, overwrite: bool, resume) -> "Contents":
        contents = survey(self.path)
        if contents.in_the_way:
            raise ConfigError(f"training.output_dir {self.path} holds files sftkit did not write under the names a "
                              f"run writes ({_some(contents.in_the_way)}); move them elsewhere or choose another "
                              "training.output_dir")
        if not overwrite and resume is not True:  # resuming from output_dir: checkpoint_to_resume checks the run
            self._refuse_another_runs_work(contents, resuming=resume is not None)
        return contents

    def record_start(self) -> None:
        """Mark output_dir as this run's; called once the checkpoint to resume (if any) was found to be its own."""
        write_json(self.path / RUN_FILE, run_record(self.resolved, status="training", started=time.time()))
        self.owner = True

    def release(self) -> None:
        if self.locked:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self.locked = False

    def mark(self, status: str, **extra) -> None:
        """Record where the run is (exporting) or how it ended early (interrupted, failed: diverged or an export
        that failed, with its error) beside its fingerprint; record_published says it finished."""
        if not self.owner:
            return
        record = read_run_record(self.path) or run_record(self.resolved)
        if record.get("status") == "finished":  # this run's model is published (record_published): nothing undoes it
            return
        write_json(self.path / RUN_FILE, {**record, "status": status, **extra})

    def _refuse_a_file(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"training.output_dir {self.path} is a file, not a directory; choose a directory path")

    def _create(self) -> None:
        key = "training.output_dir"
        self._refuse_a_file()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".sftkit-write-test-{os.getpid()}"
            probe.write_bytes(b"0")
            probe.unlink()
        except OSError as error:
            raise ConfigError(f"{key} {self.path} cannot be written: {error.strerror or error} "
                              f"({type(error).__name__}); choose a directory you can write to") from None

    def take_lock(self) -> None:
        """An exclusive lock file holding who owns it; one left by a process that no longer runs is taken over."""
        lock = self.path / LOCK_FILE
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), **_slurm_run()}
        partial = self.path / f"{LOCK_FILE}.{os.getpid()}.partial"
        partial.write_text(json.dumps(mine))
        try:
            for _ in range(3):
                if self._link(partial, lock):
                    return
                with self._one_at_a_time():  # two runs finding the same stale lock: only one takes it over
                    try:
                        text = lock.read_text()
                    except FileNotFoundError:
                        continue  # released meanwhile: the atomic link again, deleting nothing
                    stale = self._refuse_a_live_holder(text, lock)
                    whose = f"its process {stale['pid']} no longer runs" if "pid" in stale else "it cannot be read"
                    if stale.get("host", socket.gethostname()) != socket.gethostname():
                        whose = f"Slurm requeued its job {stale['slurm_job']}, which this is"
                    print(f"sftkit: taking over {lock}: {whose}", flush=True)
                    lock.unlink(missing_ok=True)  # a dead process's: only a holder of the guard deletes one
                    if self._link(partial, lock):
                        return
        finally:
            partial.unlink(missing_ok=True)
        raise ConfigError(f"training.output_dir {self.path}: could not take the lock {lock}; delete it if no run uses it")

    def _refuse_a_live_holder(self, text: str, lock: Path) -> dict:
        """ConfigError naming the lock's owner while it runs; else what the stale lock says ({} when unreadable)."""
        holder, alive = self._holder(text)
        if alive:
            since = time.strftime('%H:%M:%S', time.localtime(holder['since']))
            raise ConfigError(f"training.output_dir {self.path} is in use by another run (process {holder['pid']} on "
                              f"{holder['host']}, since {since}); wait for it or choose another output_dir (if no "
                              f"run uses it, delete {lock})")
        return holder

    def _link(self, partial: Path, lock: Path) -> bool:
        try:
            os.link(partial, lock)  # atomic: fails if the lock exists, and never shows a half-written lock
        except FileExistsError:
            return False
        self.locked = True
        return True

    @contextlib.contextmanager
    def _one_at_a_time(self):
        """An exclusive lock (fcntl, which NFS shares between machines) on GUARD_FILE while a stale lock is judged
        and replaced: otherwise a second run that read the same stale lock could delete the first one's new lock and
        take it too. The guard file stays (deleting it would let a waiter lock a file no longer there). Where the
        filesystem has no locks (Lustre without -o flock), the takeover goes unguarded, and says so."""
        import fcntl

        descriptor = None
        try:
            descriptor = os.open(self.path / GUARD_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.lockf(descriptor, fcntl.LOCK_EX)
        except OSError as error:
            print(f"sftkit: {self.path} has no file locks ({error.strerror or error}); taking over a stale lock "
                  "unguarded: start one run at a time there", flush=True)
        try:
            yield
        finally:
            if descriptor is not None:
                os.close(descriptor)  # releases the lock

    @staticmethod
    def _holder(text: str) -> tuple[dict, bool]:
        """The lock's owner, and whether it still runs (not if its process is gone, or the pid was reused)."""
        try:
            holder = json.loads(text)
        except ValueError:
            return {}, False
        if holder.get("host") != socket.gethostname():  # another machine's process cannot be checked from here,
            # but a Slurm job runs again (requeued: preempted, or at its time limit) only once its last run has ended
            requeued = holder.get("slurm_job") is not None and holder.get("slurm_job") == _slurm_run().get(
                "slurm_job") and holder.get("slurm_restart", 0) < _slurm_run()["slurm_restart"]
            return holder, not requeued
        try:
            return holder, psutil.Process(holder["pid"]).create_time() <= holder["since"] + 1
        except (psutil.Error, KeyError, TypeError):
            return holder, False

    def _refuse_another_runs_work(self, contents: Contents, resuming: bool) -> None:
        """A fresh run starts in an empty directory, or in one left by an earlier attempt of the same config that
        saved nothing; a resumed one where the same run left its work. Anything else is another run's work."""
        earlier = read_run_record(self.path)
        same_config = earlier is not None and earlier.get("fingerprint") == fingerprint(self.resolved)
        if resuming and same_config:
            return  # the checkpoint itself is checked to be this run's (checkpoints.checkpoint_to_resume)
        if not (contents.models or contents.checkpoints or contents.foreign or (contents.ours and not same_config)):
            return
        why = ""
        ways = ["pass --overwrite to replace it (removes only what an earlier run wrote)",
                "choose another training.output_dir"]
        if STAGING_DIR in contents.models:  # the trained weights, kept when the export failed
            ways.insert(0, f"finish its export with python -m sftkit.export {self.path}")
        elif contents.checkpoints and same_config and earlier.get("status") == "finished":
            trained = trained_to_step(self.path) or 0
            if checkpoint_step(contents.checkpoints[-1]) >= trained:
                ways.insert(0, "train it longer with --training.resume_from_checkpoint true and a higher "
                               "training.max_steps or num_train_epochs")
            else:  # no checkpoint of its last step (after a signal's, save_strategy no or epoch): a resume redoes steps
                why = f"; its newest checkpoint is behind its model, which trained to step {trained}"
                ways = [f"fine-tune that model further as model.path {self.path} into another training.output_dir",
                        "pass --overwrite to redo the run (removes only what it wrote)",
                        "choose another training.output_dir"]
        elif contents.checkpoints and same_config:
            ways.insert(0, "continue it with --training.resume_from_checkpoint true")
        elif contents.checkpoints and earlier is not None:
            differences = config_differences(self.resolved, earlier.get("config", {}))
            why = f"; its checkpoints belong to a run with other settings ({'; '.join(differences[:3])})"
        raise ConfigError(f"training.output_dir {self.path} already holds {contents.describe()}{why}: "
                          f"{', '.join(ways[:-1])}, or {ways[-1]}")

    def _remove_earlier_run(self, contents: Contents) -> None:
        for name in contents.removed():
            item = self.path / name
            with contextlib.suppress(FileNotFoundError):  # found at the start, and removed since by someone else
                shutil.rmtree(item) if item.is_dir() else item.unlink()
        removed = len(contents.removed())
        if removed:
            kept = f"; kept {', '.join(contents.foreign)} (not written by sftkit)" if contents.foreign else ""
            print(f"sftkit: --overwrite: removed {removed} item(s) of the earlier run in {self.path}{kept}", flush=True)


def _slurm_run() -> dict:
    """Which Slurm job this process belongs to, and how many times it was requeued (it keeps its id)."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job, "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)} if job else {}


def refuse_before_claiming(output_dir: Path, model_path: str, overwrite: bool, resume) -> None:
    """What no output_dir can allow, checked in every process before any of them claims it."""
    if overwrite and resume is not None:
        raise ConfigError("--overwrite removes the checkpoints that training.resume_from_checkpoint would continue; "
                          "use one or the other")
    model, output = Path(model_path).expanduser().resolve(), output_dir.expanduser().resolve()
    if model.exists() and (model == output or output in model.parents):
        # --overwrite would remove it before it loads (a finished run's model, one of its checkpoints or its
        # adapter), and the export would write the new model over it
        raise ConfigError(f"model.path {model_path} lies in training.output_dir {output_dir}, where this run writes "
                          "its model; choose another training.output_dir (the model in model.path stays as it is)")


# save_pretrained's max_shard_size in transformers 5.24; the export casts float32 weights one shard at a time.
SHARD_BYTES = 50 * 10**9


def export_bytes(total_parameters: int, trainable_parameters: int, dtype, lora: bool, weights=None) -> int:
    """What the export writes at its peak: the model in the training dtype, and for LoRA the float32 adapter beside
    it. A model trained in other `weights` (float32 under bf16) is saved in them first, then each shard is cast
    beside itself and replaces it."""
    if lora:  # PEFT's total counts the adapter too; the merged model does not hold it
        size = (total_parameters - trainable_parameters) * dtype.itemsize + trainable_parameters * 4
    elif weights in (None, dtype):
        size = total_parameters * dtype.itemsize
    else:
        size = total_parameters * weights.itemsize + min(total_parameters, SHARD_BYTES // weights.itemsize) * \
            dtype.itemsize
    return int(size * 1.02) + 2 * 2**20  # headers, tokenizer and reports


def check_free_space(directory: Path, needed: int, when: str) -> str | None:
    """None when `needed` bytes fit on directory's filesystem, else what is missing, in words."""
    free = shutil.disk_usage(directory).free
    if free >= needed:
        return None
    return (f"{when} needs {size_words(needed)} in {directory} but its filesystem has {size_words(free)} free: "
            f"free {size_words(needed - free)} or choose a training.output_dir on a larger disk")


def size_words(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 / 10 else f"{size / 2**20:.1f} MiB"
