"""One run, top to bottom: output_dir -> tokenizer -> data -> model -> SFTTrainer -> train -> the trained weights
staged -> evaluate -> merge and publish -> summary.

    accelerate launch sft.py --config configs/lora_train_config.yaml
"""

import logging
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import set_seed
from transformers.trainer_pt_utils import get_model_param_count

from sftkit.checkpoints import (
    RecordRunInCheckpoints,
    checkpoint_to_resume,
    earlier_progress,
    kept_work_words,
    newest_checkpoint_words,
    newest_resumable,
    resume_request,
    warn_of_other_weights,
)
from sftkit.checks import machine_errors
from sftkit.command import export_command, resume_words
from sftkit.compat import allow_fsdp_on_cpu, check_fsdp_on
from sftkit.data.tokenize import stop_at_the_end_of_a_reply
from sftkit.engines import launch_engine
from sftkit.environment import host_memory
from sftkit.errors import ConfigError, FailedHere, Interrupted, RunFailed, first_line
from sftkit.export import lost_after_staging, merge_memory_problem, publish_staged, stage_trained_weights
from sftkit.fastpath import describe as describe_speed
from sftkit.layout import STAGING_DIR, checkpoint_dir
from sftkit.model import (
    check_model_source,
    load_model,
    lora_config,
    precision_words,
    refuse_non_finite_weights,
    resolve_dtype,
    tokenizer_and_data,
    weights_dtype,
    with_base_pinned,
)
from sftkit.monitor import (
    MonitoredSFTTrainer,
    ProgressBar,
    SampleReplies,
    SettingsToWandb,
    StopGuard,
    StopRequested,
    memory_mib,
    sample_replies,
)
from sftkit.paths import resolve_path
from sftkit.peers import (
    before_leaving_for_a_failure_elsewhere,
    check_every_process_runs_the_same,
    check_output_dir_is_shared,
    check_the_data_held_still,
    handling_a_failure,
)
from sftkit.plan import batch_words
from sftkit.report import best_checkpoint_step, build_summary, report, write_report
from sftkit.rundir import EarlierRunKept, OutputDir, refuse_before_claiming
from sftkit.runrecord import input_digests, trained_to_step
from sftkit.schema import RunConfig
from sftkit.weightfiles import check_free_space, export_bytes

logger = logging.getLogger(__name__)


@dataclass
class Run:
    summary: dict
    trainer: MonitoredSFTTrainer


def train(config: RunConfig, overwrite: bool = False, started: float | None = None) -> Run:
    """Claim output_dir, train, export, report. Raises ConfigError before loading anything when the run cannot
    start; Interrupted (checkpoint saved) or RunFailed (what was kept and where) when it ends early. `started`
    (time.time()) is when the command started, so the wall time counts imports and DeepSpeed's op builds too."""
    started = started or time.time()
    config = with_base_pinned(config)
    args = config.training  # built before the model, so ZeRO-3 can partition the weights as they load
    if lacking := machine_errors(args):
        raise ConfigError("; ".join(lacking))
    check_every_process_runs_the_same(config)
    output = OutputDir(args.output_dir, config.resolved, config.source)
    resume_from = _claim(output, args, config, overwrite)
    before_leaving_for_a_failure_elsewhere(lambda failure: _left_for_a_failure_elsewhere(output, failure))
    try:
        return _train(config, output, resume_from, started)  # the export recorded it finished
    except BaseException as failure:
        handling_a_failure()
        if isinstance(failure, Interrupted):
            output.mark("interrupted")
            raise
        if isinstance(failure, KeyboardInterrupt):  # a second Ctrl-C (the first stops after the step, or the export)
            output.mark("interrupted")
            raise Interrupted(_stopped_at_once(output), signal.SIGINT) from None
        output.mark("failed", error=first_line(failure))
        raise
    finally:
        output.end()


def _left_for_a_failure_elsewhere(output: OutputDir, failure: str) -> None:
    """Another machine failed and this process ends at once (peers.watch): the run is recorded failed and its lock
    released (`sftkit export` from another host was refused), and this machine's log says where its own work is (the
    failing machine named its own output_dir's, which need not be shared)."""
    output.mark("failed", error=failure)
    output.lock.release()
    print(f"sftkit: on this machine, {kept_work_words(output.path)}", file=sys.stderr, flush=True)


def _claim(output: OutputDir, args, config: RunConfig, overwrite: bool) -> str | None:
    """Make output_dir this run's (the main process locks and checks it first) and find the checkpoint to resume."""
    requested = args.resume_from_checkpoint
    args.resume_from_checkpoint = resume_request(requested, output.path, config.resolved, overwrite)  # before claims
    refuse_before_claiming(output.path, resolve_path(config.model.path), overwrite, args.resume_from_checkpoint)
    check_model_source(config.model)
    main = args.process_index == 0
    with args.main_process_first(desc="claiming output_dir"):
        if main:
            output.claim(overwrite, args.resume_from_checkpoint)
    try:
        check_output_dir_is_shared(output.path, args, resuming=requested not in (None, False))
        checkpoint = checkpoint_to_resume(args.resume_from_checkpoint, output.path, config.resolved, args.world_size,
                                          launch_engine(args))
    except ConfigError:
        output.lock.release()
        raise
    return checkpoint


def _train(config: RunConfig, output: OutputDir, resume_from: str | None, started: float) -> Run:
    run = _set_up(config, output, resume_from, started)
    run.trainer.guard.install()  # a signal from here on stops after a step, with a checkpoint (StopGuard)
    try:
        train_seconds, extras = _train_steps(run, config, output, resume_from)
        return _export_and_report(run, config, train_seconds, extras)
    finally:
        run.trainer.guard.restore_signals()


@dataclass
class _SetUp:
    """What set-up hands to training and the export."""
    trainer: MonitoredSFTTrainer
    tokenizer: object
    data: object  # PreparedData
    dtype: torch.dtype  # the run's, in which it computes and publishes
    weights: torch.dtype  # the weights' (model.weights_dtype)
    parameters: tuple[int, int]  # trainable, total
    timing: RecordRunInCheckpoints
    memory_at_start: dict


def _set_up(config: RunConfig, output: OutputDir, resume_from: str | None, started: float) -> _SetUp:
    transformers.utils.logging.disable_progress_bar()  # weight loading and saving bars; the Trainer keeps its own
    args = config.training
    set_seed(args.seed)
    held = input_digests(config.resolved)  # as this process is about to read them
    tokenizer, data = tokenizer_and_data(config)
    check_the_data_held_still(config, held)
    dtype = resolve_dtype(config.model, args)
    weights = weights_dtype(config.model, args, dtype)
    weights_name = str(weights).removeprefix("torch.")
    if args.process_index == 0:
        warn_of_other_weights(resume_from, weights_name, str(dtype).removeprefix("torch."))
    model = load_model(config.model, weights, args.gradient_checkpointing)
    if getattr(model, "generation_config", None) is not None:  # every checkpoint's too, for plain generate and vLLM
        stop_at_the_end_of_a_reply(model.generation_config, tokenizer)
    refuse_non_finite_weights(model, config.model.path, args)
    timing = RecordRunInCheckpoints(config.resolved, earlier_progress(resume_from), started, weights_name,
                                    output.inputs)
    trainer = _trainer(config, model, tokenizer, data, [timing], resumed=resume_from is not None)
    parameters = _count_parameters(trainer.model)
    if trainer.accelerator.is_main_process:
        _check_room_for_export(output, config, dtype, weights, parameters)
        print(_plan(config, data, dtype, *parameters) + _resuming_words(resume_from, output.path), flush=True)
    memory_at_start = memory_mib()
    if resume_from:
        args.eval_on_start = False  # the run evaluated at its start already
    return _SetUp(trainer, tokenizer, data, dtype, weights, parameters, timing, memory_at_start)


def _train_steps(run: _SetUp, config: RunConfig, output: OutputDir, resume_from: str | None) -> tuple[float, bool]:
    """Trains; (seconds of training, whether the final evaluation and sample reply are still wanted)."""
    trainer = run.trainer
    if trainer.guard.stop_requested(config.training):  # not yet begun: the earlier run stays whole
        signum = trainer.guard.stop_signal()
        raise Interrupted(f"stopped by {signum.name} before training began: this run wrote nothing in {output.path}",
                          signum)
    try:
        # the signal this process received: stop_requested asks every process, and only the main one moves files
        output.begin(trainer.accelerator.is_main_process, lambda: trainer.guard.received is not None)
    except EarlierRunKept:
        signum = trainer.guard.stop_signal()
        raise Interrupted(f"stopped by {signum.name} before training began, as --overwrite moved the earlier run "
                          f"aside: every file of it is back in {output.path}", signum) from None
    if trainer.accelerator.is_main_process:  # a kill after the last step's checkpoint, before the export: see export.main
        output.mark("training", planned_export=_export_settings(run, config))
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except StopRequested:  # in the Trainer's setup, or the evaluation at its start
        raise Interrupted(*_stopped_before_the_first_step(trainer, resume_from)) from None
    # Ctrl-C or SIGTERM from here on asks to export the trained model first
    train_seconds = run.timing.seconds()["train_seconds"]
    _stop_unless_trained(trainer)
    extras = not _asked_to_stop(trainer)
    if trainer.accelerator.is_main_process:
        output.mark("exporting", step=trainer.state.global_step, **_export_settings(run, config))
    return train_seconds, extras


def _export_settings(run: _SetUp, config: RunConfig) -> dict:
    """What `sftkit export` needs, beside the run's config, to finish the export as the run would have."""
    return {"dtype": str(run.dtype).removeprefix("torch."),
            "chosen": sorted(choice.key for choice in config.speed if choice.chosen)}


def _export_and_report(run: _SetUp, config: RunConfig, train_seconds: float, extras: bool) -> Run:
    """The trained weights on disk first: a failure or a kill in the final evaluation or the sample reply (one
    process's out-of-memory error leaves the others waiting in its collectives) keeps them. Then the final
    evaluation, the sample reply, the publish and the report; on a failure the report waits with the kept weights."""
    trainer, reply = run.trainer, None

    def summary() -> dict:  # taken once the export has ended, whose seconds its wall time counts
        return build_summary(trainer, config, run.data, run.dtype, run.parameters, reply, run.timing.seconds(),
                             train_seconds, run.memory_at_start, run.timing.schedule_lengths)

    try:
        extras = stage_trained_weights(trainer, config, run.tokenizer, run.dtype, run.weights, run.parameters) \
            and extras
        evaluated = _last_eval_step(trainer.state.log_history) == trainer.state.global_step or \
            best_checkpoint_step(trainer) is not None  # the model is that checkpoint's, evaluated at its step
        if extras and run.data.eval is not None and not evaluated:
            extras = _evaluated_unless_stopped(trainer)
        reply = _final_reply(trainer, run.tokenizer, run.data) if extras else None
        output_dir = publish_staged(trainer, config, run.dtype)
    except RunFailed:
        handling_a_failure()
        if trainer.accelerator.is_main_process:
            _keep_report_with_the_export(trainer, config, summary())
        raise
    if trainer.accelerator.is_main_process:
        return Run(report(output_dir, config, summary(), trainer.state.log_history), trainer)
    return Run(summary(), trainer)


def _keep_report_with_the_export(trainer, config: RunConfig, summary: dict) -> None:
    """The summary, loss plot and card wait with the kept weights, and `sftkit export` publishes them together."""
    output_dir = Path(trainer.args.output_dir)
    if not (output_dir / STAGING_DIR).is_dir():  # nothing trained was kept there
        return
    try:
        write_report(output_dir / STAGING_DIR, output_dir, config, summary, trainer.state.log_history)
    except OSError:  # the disk that failed the export: the weights matter, the report is lost
        pass


def _trainer(config: RunConfig, model, tokenizer, data, callbacks: list, resumed: bool) -> MonitoredSFTTrainer:
    if (config.training.packing or config.training.padding_free) and config.model.trust_remote_code:
        logger.warning("packing with a model's own modeling code: transformers' built-in attention keeps packed "
                       "samples apart, custom code may let them attend to each other")
    guard = StopGuard()
    if config.training.run_name is None:  # else W&B, MLflow and Comet name a sweep's runs at random
        config.training.run_name = Path(config.training.output_dir).name
    if "wandb" in config.training.report_to:
        callbacks.append(SettingsToWandb(config.resolved))
    if config.dataset.sample_prompts:
        callbacks.append(SampleReplies(tokenizer, data.sample_prompts, data.sample_tools, resumed=resumed,
                                       guard=guard))
    allow_fsdp_on_cpu()  # before the Trainer builds its Accelerator
    try:
        trainer = MonitoredSFTTrainer(
            model=model,
            args=config.training,
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=tokenizer,
            peft_config=lora_config(config.model),
            callbacks=callbacks,
            cast_adapter_inputs=config.model.cast_adapter_inputs,
            guard=guard,
        )
    except Exception as error:
        if config.training.push_to_hub and _from_the_hub(error):  # the Trainer creates the hub repo as it is built
            raise ConfigError(f"training.push_to_hub: the hub failed as the Trainer set up its repo: "
                              f"{first_line(error)}; check the login (hf auth whoami), the network and "
                              "training.hub_model_id, or remove push_to_hub") from error
        raise
    check_fsdp_on(trainer)
    if not config.training.disable_tqdm:
        trainer.remove_callback(transformers.trainer_callback.ProgressCallback)
        trainer.add_callback(ProgressBar)
    return trainer


def _from_the_hub(error: Exception) -> bool:
    """Raised in huggingface_hub (its own errors, or its HTTP client's, whichever that is)."""
    return any("huggingface_hub" in Path(frame.f_code.co_filename).parts
               for frame, _ in traceback.walk_tb(error.__traceback__))


def _check_room_for_export(output: OutputDir, config: RunConfig, dtype, weights, parameters: tuple[int, int]) -> None:
    """Disk space for what the export writes, and host memory for a LoRA merge, before training."""
    trainable, total = parameters
    missing = check_free_space(output.path, export_bytes(total, trainable, dtype, config.model.use_lora, weights,
                                                         config.model.merge_adapter)
                               - output.freed_at_begin(), "the export")
    missing = missing or merge_memory_problem(config.model, total, trainable, dtype, host_memory())
    if missing:
        raise ConfigError(missing)


def _stop_unless_trained(trainer) -> None:
    """Training ended early: a non-finite loss (nothing may be published) or a signal (a checkpoint was saved)."""
    guard = trainer.guard
    if guard.diverged_at is not None:
        raise RunFailed(_diverged(trainer, guard.diverged_at))
    if guard.received is not None and trainer.state.global_step < trainer.state.max_steps:
        raise Interrupted(_how_to_resume(trainer, guard.received), guard.received)


def _asked_to_stop(trainer) -> bool:
    """A signal after the last step (during the epoch's last evaluation, say): the run exports the trained model
    and skips the final evaluation and sample reply."""
    if not trainer.guard.stop_requested(trainer.args):
        return False
    if trainer.accelerator.is_main_process:
        print(f"sftkit: {trainer.guard.stop_signal().name} after the last step: exporting "
              "the trained model, without the final evaluation and sample reply", file=sys.stderr, flush=True)
    return True


def _evaluated_unless_stopped(trainer) -> bool:
    """The final evaluation; False where a signal stopped it, where it failed in a run of one process, or where the
    main process lost the others in it, so that the publish comes next. Else, with several processes, the others would
    wait for the failed one in the evaluation's collectives: the run stops, its trained weights staged."""
    try:
        trainer.evaluate()
    except StopRequested:
        return False
    except Exception as error:
        output_dir = Path(trainer.args.output_dir)
        if lost_after_staging(error, trainer.accelerator.is_main_process, output_dir):
            return False
        if trainer.args.world_size > 1:  # the others lose contact with it, and go on without the evaluation
            kept = kept_work_words(output_dir)
            if trainer.args.process_index:  # the main process publishes the staged weights without it
                kept = f"the main process publishes the trained model without it (if it is stopped first, {kept})"
            raise FailedHere(f"the final evaluation failed on process {trainer.args.process_index} "
                             f"({type(error).__name__}: {first_line(error)}); {kept}") from error
        logger.warning(f"the final evaluation failed ({type(error).__name__}: {first_line(error)}); the trained model "
                       "is exported without it")
        return False
    return True


def _stopped_before_the_first_step(trainer, resume_from: str | None) -> tuple[str, int]:
    signum = trainer.guard.stop_signal()
    if resume_from is not None:  # the checkpoint it resumed from is still the newest
        return f"stopped by {signum.name} before the first step: nothing more was trained. {resume_words()}", signum
    return f"stopped by {signum.name} before the first step: nothing was trained", signum


def _diverged(trainer, step: int) -> str:
    args = trainer.args
    fp16 = ", fp16 overflow (train in bf16 where the GPU supports it)" if args.fp16 else ""
    return (f"training diverged at step {step} of {trainer.state.max_steps}: the loss, the gradient norm or the "
            f"weights are no longer finite (nan or inf). Usual causes: a learning rate too high (training.learning_rate is {args.learning_rate:g}){fp16}, "
            f"no gradient clipping (training.max_grad_norm is {args.max_grad_norm}) or broken data. Nothing was "
            f"published; {newest_checkpoint_words(Path(args.output_dir), trainer.state.max_steps)}")


def _how_to_resume(trainer, signum: int) -> str:
    output_dir, step = Path(trainer.args.output_dir), trainer.state.global_step
    checkpoint = checkpoint_dir(output_dir, step)
    saved = f"checkpoint saved in {checkpoint}" if checkpoint.is_dir() else \
        f"no checkpoint could be saved at it; {newest_checkpoint_words(output_dir, trainer.state.max_steps)}"
    stopped = f"stopped by {signal.Signals(signum).name} at step {step} of {trainer.state.max_steps}; {saved}"
    if checkpoint.is_dir() and trainer.args.save_only_model:
        return (f"{stopped}, of the model alone (training.save_only_model), which a resume cannot continue: "
                f"fine-tune it further as model.path {checkpoint} into another training.output_dir")
    return f"{stopped}. {resume_words()}"


def _stopped_at_once(output: OutputDir) -> str:
    output_dir, staging = output.path, output.path / STAGING_DIR
    if not output.began:  # an earlier run's checkpoints are not this run's to resume
        return f"stopped at once, before training began: this run wrote nothing in {output_dir}"
    if trained_to_step(output_dir) is not None:
        return f"stopped at once, after the model was published in {output_dir}"
    if staging.is_dir():
        return (f"stopped at once during the export; what it wrote is kept in {staging}, and if the weights were "
                f"written, {export_command(output_dir)} finishes it")
    resume = f". {resume_words()}" if newest_resumable(output_dir) else ""
    return f"stopped at once; {newest_checkpoint_words(output_dir)}{resume}"


def _last_eval_step(history: list[dict]) -> int | None:
    return next((entry["step"] for entry in reversed(history) if "eval_loss" in entry), None)


def _count_parameters(model) -> tuple[int, int]:
    """Trainable and total parameters, whole under ZeRO-3 (each process holds an empty shard of each)."""
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT's count also unpacks 4-bit weights
        return model.get_nb_trainable_parameters()
    return get_model_param_count(model, trainable_only=True), get_model_param_count(model)


def _final_reply(trainer, tokenizer, data) -> str | None:
    """Greedy reply of the trained model to the first sample prompt, to show what it learned."""
    replies = sample_replies(trainer.model, tokenizer, data.sample_prompts[:1], data.sample_tools, trainer.args,
                             max_new_tokens=40)
    return replies[0] if replies else None


def _plan(config: RunConfig, data, dtype, trainable: int, total: int) -> str:
    method = config.model.method
    eval_rows = f", {len(data.eval)} eval row{'' if len(data.eval) == 1 else 's'}" if data.eval is not None else ""
    return (
        f"sftkit: {method} of {config.model.path} in {precision_words(config.model, config.training, dtype)} "
        f"({trainable:,} of {total:,} parameters train)\n"
        f"        {data.sources_words(config.dataset)}: {data.rows} rows{data.split_words()}, "
        f"{len(data.train)} to train{eval_rows}"
        f"{data.repeated_words()}{data.dropped_words()}{_cut_words(data, config.training)}; "
        f"config {config.source}\n"
        f"        speed: {describe_speed(config.speed)}"
        + (f"\n        batch: {batch_words(config.training, config.training.world_size)}"
           if config.training.world_size > 1 else "")  # one process: the config says it
    )


def _cut_words(data, args) -> str:
    """'; 14 rows cut to max_seq_length 40 (...)' where the trainer cuts rows (the dry run counts them too)."""
    cut = data.kept(args)[1]
    return (f"; {cut} row{'s' if cut > 1 else ''} cut to max_seq_length {args.max_length} (a reply cut there trains "
            "without its end)" if cut else "")


def _resuming_words(checkpoint: str | None, output_dir: Path) -> str:
    """The plan's last line on a resume: where from, and that the finished model there is replaced at the end."""
    if checkpoint is None:
        return ""
    published = (output_dir / "config.json").is_file()
    replaced = f"; at the end its model replaces the one in {output_dir}" if published else ""
    return f"\n        resumes from {checkpoint}{replaced}"

