"""An output directory belongs to one run.

A run takes a lock on output_dir, records what it is (a fingerprint of its resolved config) and refuses to start
where another run's finished model or checkpoints are, unless told to replace them (`--overwrite`) or to continue
them (`training.resume_from_checkpoint`, accepted only for checkpoints of the same run; see checkpoints.py).
"""

import contextlib
import errno
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sftkit.checkpoints import added_to_checkpoint, newest_resumable, resume_problem, unexported_last_step
from sftkit.command import export_command
from sftkit.errors import ConfigError
from sftkit.layout import (
    CHECKPOINT_PREFIX,
    DURING_TRAINING,
    GUARD_FILE,
    LOCK_FILE,
    REPLACED_DIR,
    RUN_FILE,
    STAGING_DIR,
    checkpoint_step,
    holds_training,
    is_checkpoint,
    moved_by_a_publish_cut_short,
    written_by_sftkit,
)
from sftkit.runlock import RunLock
from sftkit.runrecord import (
    as_written,
    chat_template_file,
    config_differences,
    input_digests,
    read_run_record,
    record_written,
    run_record,
    same_settings,
    signatures,
    trained_to_step,
    write_json,
)

logger = logging.getLogger(__name__)


@dataclass
class Contents:
    """What an output_dir holds, sorted by who made it."""
    models: list[str] = field(default_factory=list)  # a finished model or adapter, or an unfinished export
    checkpoints: list[str] = field(default_factory=list)
    ours: list[str] = field(default_factory=list)  # reports and other files an earlier run wrote
    foreign: list[str] = field(default_factory=list)  # not the earlier run's: the user's, or changed since
    in_the_way: list[str] = field(default_factory=list)  # foreign, with the name of a file a run writes
    changed: list[str] = field(default_factory=list)  # in the way: the earlier run wrote it, and it changed since
    written: dict | None = None  # what the earlier run recorded it wrote (runrecord.record_written), if it did

    def describe(self) -> str:
        parts = []
        published = [name for name in self.models if name != STAGING_DIR]
        if published:
            parts.append(f"a trained model ({', '.join(published[:3])})")
        if STAGING_DIR in self.models:  # its weights may be whole or cut short; sftkit export tells and finishes it
            parts.append(f"an unfinished export ({STAGING_DIR})")
        if self.checkpoints:
            newest = "the newest " if len(self.checkpoints) > 2 else ""
            parts.append(f"{len(self.checkpoints)} checkpoint(s) ({newest}{', '.join(self.checkpoints[-2:])})")
        if self.foreign:
            parts.append(f"files sftkit did not write ({', '.join(self.foreign[:3])})")
        replaced = [name for name in self.ours if name.startswith(f"{REPLACED_DIR}-")]
        if replaced:  # a kill while --overwrite moved them: the next --overwrite removes them
            parts.append(f"the earlier run's files an --overwrite cut short had moved aside ({', '.join(replaced)})")
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
    record = (read_run_record(directory) or {}) if recorded else {}
    # what the run recorded it wrote, as it wrote it (record_written; none for a run killed before its end)
    written = contents.written = record.get("written")
    items = sorted(directory.iterdir(), key=lambda path: _natural_key(path.name))
    newest = max((item.name for item in items if is_checkpoint(item)), key=checkpoint_step, default=None)
    trained = trained_to_step(directory) if recorded else None
    publishing = moved_by_a_publish_cut_short(directory)  # changed since the record, by the run's own export
    for item in items:
        name = item.name
        if name in (LOCK_FILE, GUARD_FILE, RUN_FILE) or name.endswith(".partial"):
            continue
        if name.startswith(f"{REPLACED_DIR}-") and item.is_dir():  # an --overwrite cut short: what it was removing
            contents.ours.append(name)
        elif name in publishing:
            (contents.models if holds_training(name) else contents.ours).append(name)
        elif not (is_checkpoint(item) or written_by_sftkit(name)):
            contents.foreign.append(name)
        elif is_checkpoint(item) and recorded and _saved_by_the_run(item, record, name == newest, trained):
            contents.checkpoints.append(name)
        elif is_checkpoint(item) or not recorded or item.is_symlink() or (
                written is not None and not _written_by_a_run_cut_short(name, record)
                and changed_since_written(item, written.get(name))):
            contents.foreign.append(name)
            contents.in_the_way.append(name)
            if written and name in written:
                contents.changed.append(name)
        elif holds_training(name):
            contents.models.append(name)
        else:
            contents.ours.append(name)
    return contents


def _written_by_a_run_cut_short(name: str, record: dict) -> bool:
    """What a run writes as it trains (sample replies, TensorBoard's logs): end() records them, and a run killed
    before it (its record still says training or exporting), once or again after a resume, leaves them unrecorded or
    grown since."""
    return name in DURING_TRAINING and record.get("status") in ("training", "exporting")


def _saved_by_the_run(checkpoint: Path, record: dict, newest: bool, trained: int | None) -> bool:
    """Whether a checkpoint-N is the earlier run's: its own record (RecordRunInCheckpoints) is of the same settings
    as output_dir's. One without a record is the run's only as the newest checkpoint, and no later than the step a
    finished run trained to: a kill between the Trainer's save and that record leaves one so. Any other (made by hand,
    copied from another run) is the user's, and --overwrite may not remove it."""
    if checkpoint.name in record.get("replacing", ()):
        return True  # the run before, whose checkpoints a stopped --overwrite was removing
    own = read_run_record(checkpoint)
    if own is None:
        return newest and (trained is None or checkpoint_step(checkpoint.name) <= trained)
    return own.get("fingerprint") == record.get("fingerprint") or same_settings(own, record.get("config", {}))


def changed_since_written(item: Path, recorded) -> bool:
    """Whether the user made or changed `item` since the earlier run wrote it (signature `recorded`, None where it
    did not): a file changed, or a file the run wrote in a directory changed. Files the user added to such a
    directory are theirs, and --overwrite leaves them (_remove_earlier_run); the staging directory is always
    sftkit's."""
    if item.name == STAGING_DIR:
        return False
    if recorded is None or item.is_dir() != all(isinstance(entry, list) for entry in recorded):
        return True  # not written, or a file then and a directory now (or the other way)
    if not item.is_dir():
        return not as_written(item, recorded)
    return any(not as_written(item / entry[0], entry[1:]) for entry in recorded if (item / entry[0]).is_file())


def _what_is_in_the_way(contents: Contents) -> str:
    made = [name for name in contents.in_the_way if name not in contents.changed]
    parts = [f"files sftkit did not write there ({_some(made)})" if made else "",
             f"files changed since the run wrote them ({_some(contents.changed)})" if contents.changed else ""]
    return " and ".join(filter(None, parts))


def _some(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _natural_key(name: str):
    number = name.rsplit("-", 1)[-1]
    return (name.rsplit("-", 1)[0], int(number)) if number.isdigit() else (name, -1)


class OutputDir:
    """The output directory of one run: locked while the run lives, claimed only when that is safe."""

    def __init__(self, path: str | Path, resolved: dict, config_file: Path | None = None):
        self.path = Path(path)
        self.resolved = resolved
        self.config_file = config_file  # the run's own --config, which --overwrite keeps where it is the earlier run's
        self.lock = RunLock(self.path)
        self.owner = False  # the process that claimed it (the main one) records how the run ends
        self.replaces: Contents | None = None  # what --overwrite removes once training begins
        self.began = False  # training began (begin), in every process
        self.found: dict = {}  # the signatures of what claim found under a run's names (runrecord.signatures)
        self.inputs: dict | None = None  # the digests of the data, template and model files as claim found them

    def claim(self, overwrite: bool, resume) -> None:
        """Create output_dir, lock it, and make sure it is this run's to write. Raises ConfigError otherwise.
        `resume` is training.resume_from_checkpoint: true, a path or None. What --overwrite replaces stays until
        training begins (begin)."""
        self._create()
        self.lock.take()
        try:
            # before the data is read: the run and its checkpoints record what it trained on, not what a file holds
            # when they are saved (data edited during the run was taken for the data it trained on)
            self.inputs = input_digests(self.resolved)
            contents = self._contents_this_run_may_take(overwrite, resume)
        except BaseException:
            self.lock.release()
            raise
        self.replaces = contents if overwrite else None
        self.found = signatures(self.path)  # as checked here: what appears until training begins is the user's too

    def freed_at_begin(self) -> int:
        """The bytes begin() frees: what --overwrite removes of the earlier run."""
        if self.replaces is None:
            return 0
        items = [self.path / name for name in self.replaces.removed()]
        return sum(file.stat().st_size for item in items
                   for file in ([item] if item.is_file() else item.rglob("*")) if file.is_file())

    def begin(self, main: bool, stop_requested=lambda: False) -> None:
        """Training begins: in the main process output_dir is recorded as this run's and what --overwrite replaces
        is removed, now that this run's data, model and trainer are ready (a bad row, a failed load or a Ctrl-C
        before it keeps the earlier run whole; so does one while its files are moved aside, before they are
        deleted: raises EarlierRunKept)."""
        self.began = True
        if not main:
            return
        earlier = read_run_record(self.path) if self.replaces is not None else None
        # first: a kill while removing leaves this run's record, not the earlier one's "finished"
        self.record_start(replacing=self.replaces.checkpoints if self.replaces else None)
        if self.replaces is not None:
            try:
                self._remove_earlier_run(self.replaces, stop_requested)
            except (ConfigError, EarlierRunKept):  # it removed nothing: the earlier run stays whole, with its record
                if earlier is not None:
                    write_json(self.path / RUN_FILE, earlier)
                self.owner = False
                raise
            self.replaces = None
            self.record_start()  # none of them is left
        # what claim found and checked is the earlier run's, less what --overwrite removed: what appears under a run's
        # names from claim on is the user's, and the export replaces none of it (export._refuse_files_made_meanwhile)
        record_written(self.path, found={name: found for name, found in self.found.items()
                                         if (self.path / name).exists()})

    def preview(self, overwrite: bool, resume, model_path: str) -> str:
        """What claim would find, checked the same way but with nothing created, locked or removed (the dry run):
        raises claim's ConfigError, else says what the run would do there."""
        refuse_before_claiming(self.path, model_path, overwrite, resume)
        self._refuse_a_file()
        self.lock.refuse_a_live_holder()
        contents = self._contents_this_run_may_take(overwrite, resume)
        earlier = contents.describe()
        if overwrite and earlier:  # as _remove_earlier_run does: files sftkit did not write stay
            removed = Contents(contents.models, contents.checkpoints, contents.ours).describe() or "nothing"
            kept = f"; keeps files sftkit did not write ({_some(contents.foreign, 3)})" if contents.foreign else ""
            return (f"{self.path} (--overwrite: as training begins, the run removes what the earlier run wrote: "
                    f"{removed}{kept})")
        return f"{self.path} ({'new' if not self.path.exists() else 'holds ' + earlier if earlier else 'empty'})"

    def _contents_this_run_may_take(self, overwrite: bool, resume) -> "Contents":
        self._refuse_linked_checkpoints()
        contents = survey(self.path)
        if contents.in_the_way:
            raise ConfigError(f"training.output_dir {self.path} holds {_what_is_in_the_way(contents)}, under the names "
                              "a run writes; move them elsewhere or choose another training.output_dir")
        if not overwrite and resume is not True:  # resuming from output_dir: checkpoint_to_resume checks the run
            self._refuse_another_runs_work(contents, resuming=resume is not None)
        added = [f"{name}/{file}" for name in contents.checkpoints if overwrite
                 for file in added_to_checkpoint(self.path / name)]
        if added:
            raise ConfigError(f"training.output_dir {self.path}: --overwrite would remove the earlier run's checkpoints, "
                              f"which hold files it did not save ({_some(added)}); move them elsewhere first")
        return contents

    def record_start(self, replacing: list[str] | None = None) -> None:
        """Mark output_dir as this run's; called once the checkpoint to resume (if any) was found to be its own. While
        --overwrite removes the earlier run's checkpoints, the record names them: a stop midway leaves them this run's
        to remove (_saved_by_the_run), not the user's."""
        extra = {"replacing": replacing} if replacing else {}
        write_json(self.path / RUN_FILE, run_record(self.resolved, inputs=self.inputs, status="training",
                                                    started=time.time(), **extra))
        self.owner = True

    def end(self) -> None:
        """The run ends, however: what it wrote is recorded (record_written), and the lock released."""
        if self.owner:
            record_written(self.path, None if self._published_or_stopped_in_begin() else list(DURING_TRAINING))
        self.lock.release()

    def _published_or_stopped_in_begin(self) -> bool:
        """Whether all that is under a run's names in output_dir is sftkit's: the run published its model, or it
        stopped as begin() removed the earlier run (what is left is that run's). Else the run, which published
        nothing, wrote there only what training writes, and the rest appeared since begin() recorded what was
        there: the user's."""
        return trained_to_step(self.path) is not None or "written" not in (read_run_record(self.path) or {})

    def mark(self, status: str, **extra) -> None:
        """Record where the run is (exporting) or how it ended early (interrupted, failed: diverged or an export
        that failed, with its error) beside its fingerprint; record_published says it finished."""
        if not self.owner:
            return
        record = read_run_record(self.path) or run_record(self.resolved, inputs=self.inputs)
        if record.get("status") == "finished":  # this run's model is published (record_published): nothing undoes it
            return
        try:
            write_json(self.path / RUN_FILE, {**record, "status": status, **extra})
        except OSError as error:  # a full disk: what the run does next (wait for space, export) matters more
            logger.warning(f"could not record the run as {status} in {self.path / RUN_FILE}: "
                           f"{error.strerror or error}")

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

    def _refuse_another_runs_work(self, contents: Contents, resuming: bool) -> None:
        """A fresh run starts in an empty directory, or in one left by an earlier attempt of the same config that
        saved nothing; a resumed one where the same run left its work. Anything else is another run's work."""
        earlier = read_run_record(self.path)
        same_config = same_settings(earlier, self.resolved)
        if resuming and same_config:
            return  # the checkpoint itself is checked to be this run's (checkpoints.checkpoint_to_resume)
        if not (contents.models or contents.checkpoints or contents.foreign or (contents.ours and not same_config)):
            return
        why = ""
        ways = ["pass --overwrite to replace it (removes only what an earlier run wrote)",
                "choose another training.output_dir"]
        if STAGING_DIR in contents.models:  # the trained weights, kept when the export failed
            ways.insert(0, f"finish its export with {export_command(self.path)}")
        elif contents.checkpoints and same_config and earlier.get("status") == "finished":
            why, ways = self._ways_past_a_finished_run(contents.checkpoints[-1], ways)
        elif contents.checkpoints and same_config and not newest_resumable(self.path):
            weights = newest_resumable(self.path, weights_only=True)
            newest = self.path / contents.checkpoints[-1]
            why = f"; none of its checkpoints can be resumed ({newest.name}: {resume_problem(newest)})"
            if weights is not None:
                ways.insert(0, f"fine-tune the weights of {weights} further as model.path into another "
                               "training.output_dir")
        elif contents.checkpoints and same_config and unexported_last_step(self.path) is not None:
            ways.insert(0, f"publish the model its last step's checkpoint holds with {export_command(self.path)}")
        elif contents.checkpoints and same_config:
            ways.insert(0, "continue it with --training.resume_from_checkpoint true")
        elif contents.checkpoints and earlier is not None:
            differences = config_differences(self.resolved, earlier.get("config", {}))
            why = f"; its checkpoints belong to a run with other settings ({'; '.join(differences[:3])})"
        raise ConfigError(f"training.output_dir {self.path} already holds {contents.describe()}{why}: "
                          f"{', '.join(ways[:-1])}, or {ways[-1]}")

    def _ways_past_a_finished_run(self, newest_name: str, ways: list[str]) -> tuple[str, list[str]]:
        """(why, ways) for a finished run of the same config: train it longer from its newest checkpoint, where that
        is of its last step and can be resumed. Else (a signal's checkpoint, save_strategy no or epoch, or the model
        alone: save_only_model) a resume would redo steps, or cannot continue."""
        trained = trained_to_step(self.path) or 0
        problem = resume_problem(self.path / newest_name)
        if checkpoint_step(newest_name) >= trained and problem is None:
            return "", ["train it longer with --training.resume_from_checkpoint true and a higher training.max_steps "
                        "or num_train_epochs", *ways]
        why = f"; its newest checkpoint is behind its model, which trained to step {trained}" if \
            checkpoint_step(newest_name) < trained else f"; its newest checkpoint cannot be resumed: {problem}"
        return why, [f"fine-tune that model further as model.path {self.path} into another training.output_dir",
                     "pass --overwrite to redo the run (removes only what it wrote)",
                     "choose another training.output_dir"]

    def _refuse_linked_checkpoints(self) -> None:
        """A checkpoint moved to another disk and linked back was not followed: a resume went back to an older one,
        and the run then saved its own checkpoint of that step through the link, over the user's copy."""
        links = [item for item in self.path.glob(f"{CHECKPOINT_PREFIX}-*") if item.is_symlink()
                 and checkpoint_step(item.name) is not None] if self.path.is_dir() else []
        if links:
            raise ConfigError(f"training.output_dir {self.path} holds {links[0].name}, a link to "
                              f"{os.readlink(links[0])}, which sftkit does not follow: a run would write its own "
                              f"{links[0].name} through it; move that checkpoint back into {self.path}, or remove "
                              "the link")

    def _remove_earlier_run(self, contents: Contents, stop_requested) -> None:
        # the earlier run's files this run reads (its saved config, its chat template) stay: a resume after a stop or
        # a failure reads them again
        reads = {path.resolve(): what for path, what in ((self.config_file, "this run's config"), (
            chat_template_file(self.resolved.get("dataset", {})), "this run's chat template")) if path is not None}
        kept = {name: reads[(self.path / name).resolve()] for name in contents.removed()
                if (self.path / name).resolve() in reads}
        removed = [name for name in contents.removed() if name not in kept]
        replaced, moved = _move_aside(self.path, removed, contents.written or {})
        if stop_requested():  # Ctrl-C as they moved (the deleting is what takes long): nothing is lost yet
            _move_back(replaced, moved)
            raise EarlierRunKept
        if failures := _delete_what_can_be(replaced):  # the earlier run is gone from output_dir: this run goes on
            path, error = failures[0]
            logger.warning(f"--overwrite could not delete {len(failures)} of the earlier run's files, moved to "
                           f"{replaced} ({error.strerror or error}: {Path(path).relative_to(replaced)}); delete that "
                           "folder once it can be")
        if removed:
            left = [f"{name} ({what})" for name, what in kept.items()] + \
                ([f"{', '.join(contents.foreign)} (not written by sftkit)"] if contents.foreign else [])
            print(f"sftkit: --overwrite: removed {len(removed)} item(s) of the earlier run in {self.path}"
                  f"{'; kept ' + ', '.join(left) if left else ''}", flush=True)


class EarlierRunKept(Exception):
    """A stop was asked for as --overwrite moved the earlier run aside: every file of it is back in place."""


def _move_aside(directory: Path, names: list[str], written: dict) -> tuple[Path, list]:
    """Moves the earlier run's items into a new folder there, named for REPLACED_DIR, which it returns: all of them
    or, where one cannot be moved (another user's folder, an immutable file, a busy mount), none. They were deleted
    one by one, and a failure halfway left the earlier model deleted, its card and half its checkpoints behind, and a
    traceback. A folder whose files the run recorded (written) loses only those: what the user added stays."""
    aside, moved = Path(tempfile.mkdtemp(prefix=f"{REPLACED_DIR}-", dir=directory)), []
    try:
        for name in names:
            if name in written and (directory / name).is_dir():
                for entry in written[name]:
                    _move(directory / name / entry[0], aside / name / entry[0], moved)
            else:
                _move(directory / name, aside / name, moved)
    except OSError as error:
        _move_back(aside, moved)
        raise ConfigError(f"--overwrite could not move {error.filename or directory} aside ({error.strerror or error}),"
                          f" so it removed nothing: the earlier run in {directory} is as it was; make its files yours "
                          "to remove, or choose another training.output_dir") from None
    for name in names:
        if (directory / name).is_dir():  # files the user added there, or a folder moved file by file
            _remove_empty_folders(directory / name)
    return aside, moved


def _move_back(aside: Path, moved: list) -> None:
    for source, target in reversed(moved):
        source.parent.mkdir(parents=True, exist_ok=True)
        target.rename(source)
    shutil.rmtree(aside, ignore_errors=True)


def _delete_what_can_be(folder: Path) -> list[tuple[str, OSError]]:
    """Deletes all of `folder` that can be; (path, error) of the files that could not be, else of the folders (each
    folder above such a file cannot be deleted either)."""
    failures = []
    if sys.version_info >= (3, 12):  # onerror is deprecated there
        shutil.rmtree(folder, onexc=lambda _, path, error: failures.append((path, error)))
    else:
        shutil.rmtree(folder, onerror=lambda _, path, info: failures.append((path, info[1])))
    return [(path, error) for path, error in failures if not Path(path).is_dir()] or failures


def _move(source: Path, target: Path, moved: list) -> None:
    if not source.exists() and not source.is_symlink():
        return  # found at the start, and removed since by someone else
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        source.rename(target)
    except OSError as error:
        # gcsfuse renames no folder that holds files (its default, "Too many open files"): file by file there
        if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EBUSY) or not source.is_dir() or \
                source.is_symlink():
            raise
        for file in sorted(path for path in source.rglob("*") if not path.is_dir() or path.is_symlink()):
            _move(file, target / file.relative_to(source), moved)
        return
    moved.append((source, target))


def _remove_empty_folders(directory: Path) -> None:
    for folder in sorted((path for path in directory.rglob("*") if path.is_dir()), key=lambda path: -len(path.parts)):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only an empty one
    with contextlib.suppress(OSError):
        directory.rmdir()


def refuse_before_claiming(output_dir: Path, model_path: str, overwrite: bool, resume) -> None:
    """What no output_dir can allow, checked in every process before any of them claims it."""
    if overwrite and resume is not None:
        raise ConfigError("--overwrite removes the checkpoints that training.resume_from_checkpoint would continue; "
                          "use one or the other (to start afresh where a config or a script asks to resume, pass "
                          "--training.resume_from_checkpoint null after it)")
    model, output = Path(model_path).expanduser().resolve(), output_dir.expanduser().resolve()
    if model.exists() and (model == output or output in model.parents):
        # --overwrite would remove it before it loads (a finished run's model, one of its checkpoints or its
        # adapter), and the export would write the new model over it
        raise ConfigError(f"model.path {model_path} lies in training.output_dir {output_dir}, where this run writes "
                          "its model; choose another training.output_dir (the model in model.path stays as it is)")


