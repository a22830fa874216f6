"""Checkpoints a run may resume from: the same run's (by fingerprint), and intact (every file readable whole)."""

import json
import logging
import shutil
import time
import zipfile
from pathlib import Path

from transformers import TrainerCallback

from sftkit.command import export_command
from sftkit.compat import follow_a_new_schedule_length, take_the_step_settings_of_a_resume
from sftkit.engines import launch_engine
from sftkit.errors import AlreadyFinished, ConfigError, RunFailed, first_line
from sftkit.layout import (
    ADAPTER_DIR,
    PER_PROCESS,
    RUN_FILE,
    STAGING_DIR,
    checkpoint_dir,
    checkpoint_step,
    is_checkpoint,
    pushed_from_a_checkpoint,
)
from sftkit.peers import split_across_machines
from sftkit.runrecord import (
    changed_inputs,
    config_differences,
    read_run_record,
    record_written,
    run_record,
    same_settings,
    trained_to_step,
    write_json,
)
from sftkit.weightfiles import empty_tensors, missing_weights, readable_like_other_files

logger = logging.getLogger(__name__)
# A fresh start over a run's checkpoints, also where the config or a scheduler's script asks to resume (--overwrite
# alone is refused beside resume_from_checkpoint true or auto)
AFRESH = "--overwrite --training.resume_from_checkpoint null"

STATE_FILE = "trainer_state.json"
AUTO = "auto"


def checkpoints_in(directory: Path) -> list[Path]:
    """checkpoint-N directories, oldest first."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if is_checkpoint(path)]
    return sorted(found, key=lambda path: checkpoint_step(path.name))


def added_to_checkpoint(checkpoint: Path) -> list[str]:
    """Files put in a checkpoint after the Trainer saved it (eval notes, say), by the list of what it saved that its
    record holds (since 2026-11-28; none for older checkpoints)."""
    saved = (read_run_record(checkpoint) or {}).get("files")
    if saved is None:
        return []
    saved = {*saved, RUN_FILE}
    return sorted(name for name in (str(file.relative_to(checkpoint)) for file in checkpoint.rglob("*")
                                    if file.is_file())
                  if name not in saved and not PER_PROCESS.fullmatch(name))


def left_out_of_rotation(folder: Path, limited: bool = True) -> bool:
    """Whether the Trainer's rotation (save_total_limit) must leave a folder named checkpoint-*: a copy the user keeps
    under another name (checkpoint-best, checkpoint-8.bak), or a checkpoint holding files it did not save there
    (said once, where `limited`: the run has a save_total_limit)."""
    if checkpoint_step(folder.name) is None:
        return True
    added = added_to_checkpoint(folder)
    if added and limited and folder not in _said_kept:
        _said_kept.add(folder)
        logger.warning(f"{folder} holds files the Trainer did not save ({', '.join(added[:3])}): it stays, beyond "
                       "training.save_total_limit")
    return bool(added)


_said_kept: set[Path] = set()


def damage(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint, naming the file, or None when every file reads whole.

    Only headers and archive directories are read (a truncated file loses them), never the tensors themselves.
    """
    if not (checkpoint / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing (the save did not finish)"
    # the Trainer's weights (model or adapter_model.safetensors; FSDP's pytorch_model_fsdp*; DeepSpeed's global_stepN/)
    if not any(next(checkpoint.glob(pattern), None) for pattern in ("*.safetensors", "pytorch_model*", "global_step*")):
        return "it holds no model weights (model.safetensors or adapter_model.safetensors is missing)"
    processes = (read_run_record(checkpoint) or {}).get("world_size", 1)  # recorded since 2026-11-27
    saves_random_state = any(checkpoint.glob("rng_state_*.pth"))  # none with training.save_only_model
    for rank in range(processes if processes > 1 and saves_random_state else 0):  # each process saves its own
        if not (checkpoint / f"rng_state_{rank}.pth").is_file():
            return f"rng_state_{rank}.pth is missing (process {rank} of {processes} did not finish the save)"
    for file in sorted(path for path in checkpoint.rglob("*") if path.is_file()):
        name = file.relative_to(checkpoint)
        try:
            if file.suffix == ".safetensors" and (empty := empty_tensors(file)):
                return f"{name} holds empty tensors (e.g. {empty[0]}): a process without the gathered weights wrote it"
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file):  # torch.save writes a zip archive whose directory is at its end
                    pass
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except Exception as error:  # each reader raises its own types; any of them means "unreadable"
            reason = "truncated or not a complete archive" if isinstance(error, zipfile.BadZipFile) else \
                first_line(error)
            return f"{name} is damaged: {reason}"
    return None


def resume_problem(checkpoint: Path) -> str | None:
    """Why a resume cannot continue from a checkpoint (damage, or the model alone), or None."""
    if (problem := damage(checkpoint)) is not None:
        return problem
    if not _optimizer_state(checkpoint):
        return ("it holds the model alone, no optimizer or learning-rate schedule state (training.save_only_model, or "
                "they were removed), so a resume would start both afresh")
    return None


def _optimizer_state(checkpoint: Path) -> bool:
    """Whether the Trainer (transformers 5.24) saved the optimizer's state there (optimizer.pt; DeepSpeed's
    global_stepN/; FSDP's optimizer_0/ or optimizer.bin) and the schedule's: scheduler.pt, or DeepSpeed's own
    files where DeepSpeed steps the schedule (its config names an optimizer or a scheduler, as zero3_offload.json
    does: the Trainer then writes no scheduler.pt), which the checkpoint's run record says (since 2026-11-28)."""
    deepspeed = any(path.is_dir() for path in checkpoint.glob("global_step*"))
    optimizer = deepspeed or any((checkpoint / name).exists() for name in ("optimizer.pt", "optimizer.bin",
                                                                          "optimizer_0"))
    return optimizer and ((checkpoint / "scheduler.pt").is_file() or deepspeed and (
        read_run_record(checkpoint) or {}).get("schedule_in") == DEEPSPEED_SCHEDULE)  # the record only where needed


DEEPSPEED_SCHEDULE = "DeepSpeed's checkpoint files"


def schedule_keeper(lr_scheduler) -> str:
    """Where a checkpoint keeps the learning-rate schedule's state: Accelerate 1.15 wraps a schedule that DeepSpeed
    steps (DeepSpeedSchedulerWrapper), and DeepSpeed saves it in its own files."""
    return DEEPSPEED_SCHEDULE if type(lr_scheduler).__name__ == "DeepSpeedSchedulerWrapper" else "scheduler.pt"


def resume_request(requested, output_dir: Path, resolved: dict, overwrite: bool = False):
    """`training.resume_from_checkpoint: auto` is true where output_dir holds a checkpoint, else a fresh start (which
    still refuses another run's work): one command for a job's first launch and every relaunch of it by a scheduler
    (transformers has no such value; its true fails where nothing was saved yet). A relaunch of this run once it has
    finished raises AlreadyFinished, unless told to --overwrite it."""
    if requested != AUTO:
        return requested
    if not overwrite:
        _stop_if_finished(output_dir, resolved)
    return True if checkpoints_in(output_dir) else None


def _stop_if_finished(output_dir: Path, resolved: dict) -> None:
    record, trained = read_run_record(output_dir) or {}, trained_to_step(output_dir)
    ran = record.get("config", {}).get("training", {})
    now = resolved.get("training", {})
    same_length = all(ran.get(key) == now.get(key) for key in ("max_steps", "num_train_epochs"))
    if trained is not None and same_settings(record, resolved) and same_length:
        raise AlreadyFinished(f"training.output_dir {output_dir} already holds this run's finished model (step "
                              f"{trained}): nothing is left to train (training.resume_from_checkpoint auto)")


def checkpoint_to_resume(requested, output_dir: Path, resolved: dict, processes: int | None,
                         engine: str | None = None) -> str | None:
    """`training.resume_from_checkpoint` checked: true is the newest intact checkpoint of this run in output_dir
    (a damaged newer one is skipped with a warning), a path is that checkpoint, which must be intact, of this run,
    and saved by as many `processes` as this launch has, under its `engine` (engines.launch_engine; None: not known,
    as in a dry run outside the launcher). Raises ConfigError with the way on otherwise."""
    if requested in (None, False):
        return None
    if requested is True:
        candidates = checkpoints_in(output_dir)
        if not candidates:
            raise ConfigError(f"training.resume_from_checkpoint is true but {output_dir} holds no checkpoint-N "
                              "directory; remove the key to start afresh, or give a checkpoint's path")
        for newest in reversed(candidates):
            problem = resume_problem(newest)
            if problem is None:
                break
            logger.warning(f"skipping {newest}: {problem}")
        else:
            weights = newest_resumable(output_dir, weights_only=True)
            tune = f"fine-tune the weights of {weights} further as model.path into another training.output_dir, " \
                if weights is not None else ""
            raise ConfigError(f"training.resume_from_checkpoint: no checkpoint in {output_dir} can be resumed "
                              f"({candidates[-1].name}: {resume_problem(candidates[-1])}); {tune}"
                              f"{'or ' if tune else ''}start afresh with {AFRESH}")
        checkpoint = newest
    else:
        checkpoint = Path(requested)
        if not checkpoint.is_dir():
            raise ConfigError(f"training.resume_from_checkpoint {checkpoint} is not a directory; give a checkpoint-N "
                              "directory or true for the newest one in output_dir")
        problem = resume_problem(checkpoint)
        if problem is not None:
            intact = [path for path in checkpoints_in(checkpoint.parent)
                      if path != checkpoint and not resume_problem(path)]
            way = f"resume from {intact[-1]} instead" if intact else "no other checkpoint there can be resumed"
            raise ConfigError(f"training.resume_from_checkpoint {checkpoint}: {problem}; {way}")
        _refuse_rewinding_over_later_checkpoints(checkpoint, output_dir)
    if processes is not None:  # first: a CPU launch fills in settings (use_cpu, ddp_backend) the user never wrote
        _refuse_another_number_of_processes(checkpoint, processes)
    if engine is not None:
        _refuse_another_engine(checkpoint, engine)
    _check_same_run(checkpoint, resolved)
    _refuse_resuming_at_the_end(checkpoint, resolved)
    if requested is True:  # a checkpoint named by its path is the user's choice
        _refuse_going_back_behind_the_published_model(checkpoint, output_dir)
    return str(checkpoint)


def _refuse_going_back_behind_the_published_model(checkpoint: Path, output_dir: Path) -> None:
    """A run stopped by a signal (a checkpoint at step 11) and resumed to its end (step 30) without saving again:
    its newest checkpoint is behind its model, and a resume from the newest (the printed resume command, run again
    by a requeued job) would train steps 12-30 over again and publish that over the finished model."""
    step, trained = _step_of(checkpoint), trained_to_step(output_dir)
    if step is None or trained is None or step >= trained:
        return
    again = f"step {trained}" if step + 1 == trained else f"steps {step + 1}-{trained}"
    raise ConfigError(f"training.resume_from_checkpoint: {checkpoint} is step {step}, behind the model published in "
                      f"{output_dir}, which trained to step {trained}: a resume would train {again} again and replace "
                      f"it. To train that model further, fine-tune it as model.path {output_dir} into "
                      "another training.output_dir; to resume from the checkpoint all the same, give its path as "
                      "training.resume_from_checkpoint")


def _refuse_another_number_of_processes(checkpoint: Path, now: int) -> None:
    """The global batch is per_device x accumulation x processes, and each process resumes its own data position
    and random state: a resume under another number of processes trains something else."""
    saved = (checkpoint_record(checkpoint) or {}).get("world_size")  # recorded since 2026-11-27
    if saved is not None and saved != now:
        raise ConfigError(f"training.resume_from_checkpoint: {checkpoint} was saved by {saved} process"
                          f"{'es' if saved > 1 else ''} and this launch has {now}; resume with {saved} (the global "
                          f"batch and each process's place in the data depend on it); to go on with {now}, fine-tune "
                          f"its weights further as model.path into another training.output_dir, or start afresh "
                          f"with {AFRESH}")


def _refuse_another_engine(checkpoint: Path, now: str) -> None:
    """Each engine saves its own layout of the weights and optimizer states (ZeRO-2 and ZeRO-3 partition them
    differently, DDP saves them whole): under another one DeepSpeed failed with a bare AssertionError once
    everything had loaded."""
    saved = (checkpoint_record(checkpoint) or {}).get("engine")  # recorded since 2026-11-28
    if saved is not None and _layout(saved) != _layout(now):
        raise ConfigError(f"training.resume_from_checkpoint: {checkpoint} was saved under {saved} and this launch "
                          f"runs {now}, which cannot load it; resume with the Accelerate config (or "
                          f"training.deepspeed) of that run, or start afresh with {AFRESH}")


def _layout(engine: str) -> str:
    """The files an engine saves: ZeRO-1 and ZeRO-2 the same ones (DeepSpeed 0.19 records the stage and never checks
    it on load), DDP those of one process (their number is checked apart)."""
    return {"DeepSpeed ZeRO-1": "DeepSpeed ZeRO-1/2", "DeepSpeed ZeRO-2": "DeepSpeed ZeRO-1/2",
            "DDP": "one copy"}.get(engine, "one copy" if engine == "one process" else engine)


def last_step(checkpoint: Path, training: dict) -> int | None:
    """The last step of a run of `training`'s length (training.max_steps, or num_train_epochs) that reached this
    checkpoint: None where only counting the data could tell (the checkpoint's run had another length)."""
    max_steps = training.get("max_steps", -1)
    if max_steps is not None and max_steps > 0:
        return max_steps
    saved = (checkpoint_record(checkpoint) or {}).get("config", {}).get("training", {})
    if saved.get("max_steps", -1) > 0 or saved.get("num_train_epochs") != training.get("num_train_epochs"):
        return None  # its trainer state's max_steps is another length (not the run's epochs: a cap, other epochs)
    try:  # the length the Trainer planned for those epochs (it records epochs rounded up: 2 for 1.5)
        return int(json.loads((checkpoint / STATE_FILE).read_text())["max_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def epochs_words(epochs: float) -> str:
    """`1 epoch`, `2.5 epochs`: training.num_train_epochs in a sentence."""
    return f"{epochs:g} epoch{'s' if epochs != 1 else ''}"


def _refuse_resuming_at_the_end(checkpoint: Path, resolved: dict) -> None:
    """A checkpoint of the run's last step has nothing left to train, and transformers 5.24 would still train one
    step past it (step 7 of 6) and publish that over the run's model."""
    training = resolved.get("training", {})
    step, end = _step_of(checkpoint), last_step(checkpoint, training)
    if step is None or end is None:
        return
    max_steps, epochs = training.get("max_steps", -1), training.get("num_train_epochs")
    length = f"training.max_steps {max_steps}" if max_steps is not None and max_steps > 0 else \
        f"{epochs_words(epochs)}, {end} steps"
    if step >= end:
        output_dir = checkpoint.parent
        if trained_to_step(output_dir) is not None:
            model = f"Its model is in {output_dir}, and in the checkpoint itself"
        elif (output_dir / STAGING_DIR).is_dir():  # killed during the export: nothing is published yet
            model = (f"Its export did not finish, so {output_dir} holds no model yet: finish it with "
                     f"{export_command(output_dir)}")
        elif unexported_last_step(output_dir) is not None:  # killed after this checkpoint, before the export
            model = f"Its export did not begin: publish its trained model with {export_command(output_dir)}"
        else:
            model = "Its trained weights are in the checkpoint itself"
        raise ConfigError(f"training.resume_from_checkpoint: {checkpoint} is step {step}, at or past the end of this "
                          f"run ({length}): nothing is left to train. {model}; to train longer, raise "
                          "training.max_steps or training.num_train_epochs")


def last_step_checkpoint(output_dir: Path, stem: str) -> Path | None:
    """The run's checkpoint with whole weights `stem` that holds the model it exports: its last step's, or under
    load_best_model_at_end the best one, which the Trainer loaded back (its trainer state names it). The last step of
    the run recorded in output_dir, by the length the checkpoint's own trainer state was saved with: after a resume
    that trains longer, the step that ended the first attempt is not the run's last."""
    newest = newest_resumable(output_dir, weights_only=True)
    training = (read_run_record(output_dir) or {}).get("config", {}).get("training", {})
    end = last_step(newest, training) if newest is not None else None
    state = json.loads((newest / STATE_FILE).read_text()) if end is not None else {}
    if end is None or state["global_step"] < end:
        return None
    if training.get("load_best_model_at_end"):
        newest = checkpoint_dir(output_dir, state["best_global_step"]) if state.get("best_global_step") else None
    return None if newest is None or missing_weights(newest, stem) else newest


def unexported_last_step(output_dir: Path) -> Path | None:
    """The checkpoint of a run's last step, where the run stopped after saving it and before its export began (a
    kill in between, with no staging directory yet): `sftkit export` publishes the model it holds."""
    record = read_run_record(output_dir) or {}
    if record.get("status") not in ("training", "exporting") or "planned_export" not in record or \
            (output_dir / STAGING_DIR).exists():
        return None
    return last_step_checkpoint(output_dir, "adapter_model" if record["config"]["model"].get("use_lora") else "model")


def checkpoint_record(checkpoint: Path) -> dict | None:
    """The run record of the run that saved a checkpoint: its own copy, or else (a stop between the Trainer's save
    and RecordRunInCheckpoints.on_save) that of the output_dir holding it, whose checkpoints are all one run's
    (a run with other settings starts there only with --overwrite, which removes them)."""
    return read_run_record(checkpoint) or read_run_record(checkpoint.parent)


def _refuse_rewinding_over_later_checkpoints(checkpoint: Path, output_dir: Path) -> None:
    """Resuming from an earlier checkpoint than output_dir's newest intact one would save over the later ones as the
    run reaches their steps (the Trainer writes checkpoint-N into an existing directory), and the printed resume
    command, whose `true` means the newest, would then continue the older branch."""
    step = _step_of(checkpoint)
    if step is None:
        return
    later = [path.name for path in checkpoints_in(output_dir)
             if checkpoint_step(path.name) > step and resume_problem(path) is None]
    if later:
        raise ConfigError(f"training.resume_from_checkpoint {checkpoint} is older than {', '.join(later[-3:])} in "
                          f"{output_dir}, which this run would save over as it reaches their steps; move them out of "
                          f"{output_dir} to go back to step {step}, or resume with true (from {later[-1]})")


def _step_of(checkpoint: Path) -> int | None:
    """A checkpoint's step: from its checkpoint-N name, else (a copy under another name) from its trainer state."""
    if is_checkpoint(checkpoint):
        return checkpoint_step(checkpoint.name)
    try:
        return int(json.loads((checkpoint / STATE_FILE).read_text())["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_same_run(checkpoint: Path, resolved: dict) -> None:
    record = checkpoint_record(checkpoint)
    if record is None:
        raise ConfigError(f"training.resume_from_checkpoint: {checkpoint} has no {RUN_FILE}, so it was not saved by "
                          f"this version of sftkit and cannot be checked to be this run's; start afresh with {AFRESH}")
    if not same_settings(record, resolved):
        differences = config_differences(resolved, record.get("config", {}))
        raise ConfigError(f"training.resume_from_checkpoint: {checkpoint} belongs to a run with other settings "
                          f"({'; '.join(differences[:4]) or 'its fingerprint differs'}); resume with that run's "
                          "settings (only the run length, logging, saving and evaluation may change), or start "
                          f"afresh with {AFRESH}")
    changed = changed_inputs(record, resolved)
    if changed:
        raise ConfigError(f"training.resume_from_checkpoint: {checkpoint} was trained on other contents of "
                          f"{', '.join(changed[:3])}{' and more' if len(changed) > 3 else ''} (changed, added or "
                          f"removed since); resume with the files as they were, or start afresh with {AFRESH}")
    _warn_of_another_preparation(checkpoint, record.get("preparation", 1))


def _warn_of_another_preparation(checkpoint: Path, saved: int) -> None:
    """Rows prepared another way (data.PREPARATION) make the resumed run skip the batches it had trained by count,
    over other rows: some may repeat or be left out this epoch. Not refused: the trained steps are still the user's,
    and starting afresh would lose them."""
    from sftkit.data import PREPARATION

    if saved != PREPARATION:
        logger.warning(f"{checkpoint} was trained on rows prepared by an sftkit of another data preparation "
                       f"({saved}, now {PREPARATION}); the run continues on the rows as prepared now, so this epoch "
                       f"may repeat or leave out some of them (start afresh with {AFRESH} to train on them evenly)")


def warn_of_other_weights(checkpoint: str | None, weights: str, dtype: str) -> None:
    """A checkpoint of a bf16 full fine-tune saved before 2026-11-27 trained bf16 weights (then loaded in the run's
    dtype); the same config now keeps float32 ones (model.weights_dtype). The resume casts them, and from then on
    the weights, gradients and Adam states take twice the memory: say so before it runs out."""
    record = read_run_record(Path(checkpoint)) if checkpoint else None  # its own: output_dir's has no weights
    saved = record.get("weights", dtype) if record else weights
    if saved != weights:
        ratio = "twice" if weights == "float32" else "half"
        logger.warning(f"{checkpoint} trained {saved} weights; this sftkit continues with {weights} weights "
                       "(bf16 full fine-tuning keeps float32 weights since 2026-11-27, so small updates are not lost), "
                       f"which take {ratio} the memory for weights, gradients and Adam states")


def earlier_progress(checkpoint: str | None) -> dict:
    """What the run had done before this resume: its wall and training time so far, and the lengths its learning-rate
    schedule was planned for ([from step, steps] each; a record from before this field holds none: the checkpoint's
    own length then)."""
    record = (read_run_record(Path(checkpoint)) if checkpoint else None) or {}
    lengths = record.get("schedule_lengths")
    if checkpoint and not lengths and (Path(checkpoint) / STATE_FILE).is_file():
        lengths = [[0, json.loads((Path(checkpoint) / STATE_FILE).read_text())["max_steps"]]]
    return {**{key: record.get(key, 0.0) for key in ("wall_seconds", "train_seconds")},
            "schedule_lengths": lengths or []}


def drop_unsaved_checkpoint(args, step: int, error: Exception, reason: str) -> None:
    """A checkpoint that could not be written whole (a full disk, a file too large, a disk gone read-only) is
    removed, so that it never looks resumable; the older ones stay (the Trainer rotates them away only after a whole
    save). One process trains on and its export waits for the disk; several stop together, since each save is
    collective."""
    checkpoint = checkpoint_dir(args.output_dir, step)
    if args.should_save:
        shutil.rmtree(checkpoint, ignore_errors=True)
    unsaved = f"could not save {checkpoint}: {reason}"
    if args.world_size > 1:
        raise RunFailed(f"{unsaved}; {newest_checkpoint_words(Path(args.output_dir))}") from error
    logger.warning(f"{unsaved}; training goes on (mend the disk: the export at the end waits for it)")


class RecordRunInCheckpoints(TrainerCallback):
    """Writes RUN_FILE into every checkpoint: this run's fingerprint and config, and its wall and training time so
    far (earlier segments of a resumed run included), so that the summary after a resume covers the whole run."""

    def __init__(self, resolved: dict, earlier: dict, started: float, weights: str, inputs: dict | None):
        self.resolved = resolved
        self.inputs = inputs  # the digests of the run's files as it began (OutputDir.inputs)
        self.weights = weights  # the dtype the weights train in
        self.earlier = earlier
        self.started = started  # time.time() at the start of this segment (the process's start, from the CLI)
        self.training_began = None
        self.schedule_lengths = [list(length) for length in earlier["schedule_lengths"]]

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.training_began = time.time()
        take_the_step_settings_of_a_resume(args, state)
        if not self.schedule_lengths or self.schedule_lengths[-1][1] != state.max_steps:
            if self.schedule_lengths:  # a resume with another max_steps or num_train_epochs
                follow_a_new_schedule_length(args, state, optimizer, lr_scheduler, self.schedule_lengths[-1][1])
            self.schedule_lengths.append([state.global_step, state.max_steps])

    def seconds(self) -> dict:
        now = time.time()
        return {"wall_seconds": round(self.earlier["wall_seconds"] + now - self.started, 1),
                "train_seconds": round(self.earlier["train_seconds"] + now - (self.training_began or now), 3)}

    def on_save(self, args, state, control, lr_scheduler=None, **kwargs):
        checkpoint = checkpoint_dir(args.output_dir, state.global_step)
        if state.is_world_process_zero and checkpoint.is_dir():
            try:
                # `files`: what the Trainer saved there, which --overwrite removes; anything added later is the user's
                files = sorted(str(file.relative_to(checkpoint)) for file in checkpoint.rglob("*") if file.is_file())
                write_json(checkpoint / RUN_FILE, run_record(
                    self.resolved, inputs=self.inputs, step=state.global_step, weights=self.weights,
                    world_size=args.world_size, engine=launch_engine(args), files=files,
                    schedule_in=schedule_keeper(lr_scheduler), schedule_lengths=self.schedule_lengths,
                    **self.seconds()))
            except OSError as error:  # without its record no resume accepts it
                drop_unsaved_checkpoint(args, state.global_step, error, error.strerror or first_line(error))
                return
            readable_like_other_files(checkpoint.glob("*.safetensors"))
            if args.push_to_hub and args.hub_strategy != "end":  # the Trainer copied the checkpoint's model there
                output_dir = Path(args.output_dir)
                record_written(output_dir, [item.name for item in output_dir.iterdir()
                                            if pushed_from_a_checkpoint(item.name)])


def newest_resumable(output_dir: Path, weights_only: bool = False) -> Path | None:
    """The newest checkpoint in output_dir that a resume can continue (with `weights_only`: that holds whole
    weights), vouched for by a run record."""
    usable = damage if weights_only else resume_problem
    intact = [path for path in checkpoints_in(output_dir) if usable(path) is None and checkpoint_record(path)]
    return intact[-1] if intact else None


def newest_checkpoint_words(output_dir: Path, max_steps: int | None = None) -> str:
    """Where a failed run can continue from, for its error message."""
    newest = newest_resumable(output_dir)
    saved = checkpoints_in(output_dir)
    if newest is None and saved and split_across_machines():
        return (f"each checkpoint is split across the machines' output_dirs; {saved[-1]} holds this machine's part: "
                f"copy every machine's {saved[-1].name} files into one directory to make it whole")
    if newest is None and saved:
        why = resume_problem(saved[-1]) or "no run record says which run saved it"
        return f"no checkpoint here can resume: the newest, {saved[-1]}: {why}"
    if newest is None:
        saving = ((read_run_record(output_dir) or {}).get("config", {}).get("training", {})).get("save_strategy", "no")
        return "no checkpoint was saved" + (" (set training.save_strategy: steps to keep some)" if saving == "no" else
                                            " yet")
    of = f" of {max_steps}" if max_steps else ""
    return f"the newest checkpoint is {newest} (step {newest.name.rsplit('-', 1)[-1]}{of})"


def kept_work_words(output_dir: Path) -> str:
    """Where the work of a run that failed is kept, for its error message: its trained weights, once written to the
    staging directory (the final evaluation or the merge failed after), else its newest checkpoint."""
    staging = output_dir / STAGING_DIR
    kept, what = (staging / ADAPTER_DIR, "adapter") if (staging / ADAPTER_DIR).is_dir() else (staging, "model")
    if missing_weights(kept, "adapter_model" if what == "adapter" else "model") is not None:
        return newest_checkpoint_words(output_dir)
    return f"the trained {what} is kept in {kept}: finish the export with: {export_command(output_dir)}"


def unfinished_run_words(directory: Path) -> str | None:
    """Why `directory`, given as a model to chat with or compare, holds none: it does not exist, or its run has not
    published one (and where its work is); None for any other directory."""
    if not directory.exists():
        return "no such directory"
    if (directory / "trainer_state.json").is_file():
        return "a checkpoint, not a run's output_dir (sftkit chat takes a checkpoint, sftkit compare a finished run)"
    record = read_run_record(directory)
    if record is None or trained_to_step(directory) is not None:
        return None
    return (f"its run has not published a model (it is {record.get('status', 'unfinished')}); "
            f"{kept_work_words(directory)}")
