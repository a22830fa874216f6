"""What a run shows while it trains: memory in every log, sample replies at each evaluation and epoch end, a
clean stop with a checkpoint on Ctrl-C or SIGTERM, and a stop without one when the loss or the gradient norm is no
longer finite. Loss, learning rate, grad norm and tokens/s are the Trainer's."""

import functools
import json
import logging
import resource
import signal
import sys
import time
from pathlib import Path

import psutil
import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from trl import SFTTrainer

from sftkit.checkpoints import drop_unsaved_checkpoint, left_out_of_rotation
from sftkit.checks import warmup_outlasts
from sftkit.compat import TrainerWorkarounds, keep_checkpoints_at_an_early_stop, rotate_only_checkpoints_not
from sftkit.engines import first_on_its_machine, local_shard, shards_weights
from sftkit.errors import first_line
from sftkit.fastpath import adapter_input_casts, bound_max_lengths, lengths_vary, mark_lengths_dynamic
from sftkit.inference import asked, generate_reply
from sftkit.layout import SAMPLES_FILE
from sftkit.weightfiles import disk_failure

REPEATED_SIGTERM_SECONDS = 2.0  # a SIGTERM this soon after the first is the same stop, delivered twice
SAMPLE_REPLY_TOKENS = 64  # the longest sample reply at an evaluation (the summary's final one: 40)


class MonitoredSFTTrainer(TrainerWorkarounds, SFTTrainer):
    """SFTTrainer whose every micro-batch loss is checked to be finite (see StopGuard), and whose every log also
    carries memory. `Trainer.log` is the documented place to add metrics: what is added here reaches the progress
    bar, `log_history`, TensorBoard and W&B alike (a callback's `on_log` comes after `log_history` is written).
    It hooks four of the Trainer's private methods (`_prepare_inputs` for torch.compile's shape hints, `_get_grad_norm`
    for the finite check, `_save_checkpoint` for a checkpoint that cannot be written, `_maybe_log_save_evaluate` for a
    stop during an evaluation; it warns where they are gone),
    and logs the last step (LogTheLastStep); the fixes to the Trainer's own behaviour are in
    compat.TrainerWorkarounds. `cast_adapter_inputs`: see fastpath.choose_adapter_inputs."""

    def __init__(self, *args, cast_adapter_inputs: bool | None = True, guard: "StopGuard | None" = None, **kwargs):
        super().__init__(*args, **kwargs)
        lost = {"_prepare_inputs": "compiled runs may compile more often",
                "_get_grad_norm": "gradient norms are not checked to be finite",
                "_save_checkpoint": "a checkpoint that cannot be written ends the run",
                "_maybe_log_save_evaluate": "a signal during an evaluation stops the run only after the next step"}
        for hook, loss in lost.items():  # the Trainer's own methods, overridden below (written for 5.24)
            if not hasattr(SFTTrainer, hook):
                logging.getLogger("sftkit").warning(f"this transformers' Trainer has no {hook}: {loss}; install the "
                                                    "versions in requirements.txt")
        rotate_only_checkpoints_not(functools.partial(left_out_of_rotation, limited=bool(self.args.save_total_limit)))
        self.guard = guard or StopGuard()
        self.add_callback(self.guard)
        self.add_callback(LogTheLastStep())
        self.add_callback(WarnOfAWarmupAsLongAsTheRun())
        self.cast_adapter_inputs = cast_adapter_inputs is not False  # None: PEFT's default
        self.mark_lengths_dynamic = self.args.torch_compile and lengths_vary(self.args)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.update(memory_mib())
        super().log(logs, start_time)

    def _prepare_inputs(self, inputs):
        # marked where the tensors the model sees are made (transformers 5.24 moves each batch to the device here)
        inputs = super()._prepare_inputs(inputs)
        if self.mark_lengths_dynamic:
            mark_lengths_dynamic(inputs)
        if self.args.torch_compile and self.args.max_length:  # padding-free batches of one shape too
            bound_max_lengths(inputs, self.args.max_length)
        return inputs

    def _get_grad_norm(self, model, grad_norm=None):
        # transformers 5.24 computes each step's gradient norm here, before the optimizer step. A finite loss with
        # gradients that are not (bf16 and float32 have no loss scaler to skip that step) makes the weights nan.
        norm = super()._get_grad_norm(model, grad_norm)
        if norm is not None and not self.args.fp16:  # fp16's loss scaler skips a step whose gradients overflow
            # under FSDP2 a DTensor: each process checks its part, and the guard shares the verdict
            self.guard.observe(norm.to_local() if hasattr(norm, "to_local") else torch.as_tensor(norm))
        return norm

    def _save_checkpoint(self, model, trial):
        # transformers 5.24 saves each checkpoint here, and rotates the older ones away only once it is whole
        try:
            super()._save_checkpoint(model, trial)
        except Exception as error:
            reason = disk_failure(error, self.args.output_dir)
            if reason is None:
                raise
            # the model in memory is worth more than one checkpoint
            drop_unsaved_checkpoint(self.args, self.state.global_step, error, reason)

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, *args, **kwargs):
        # transformers 5.24 evaluates here after a step, then saves its checkpoint. A signal during that evaluation
        # stops it at the next batch (StopGuard.on_prediction_step), and the checkpoint is saved at once: the
        # evaluation and one more step would take longer than a scheduler waits for its SIGKILL.
        self.guard.between_steps = True
        try:
            super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, *args, **kwargs)
        except StopRequested:
            # the step ends as if the signal had come before it ended, with a checkpoint of finite weights
            self.guard.on_step_end(self.args, self.state, self.control, model=self.model)
            if self.control.should_save:
                self._save_checkpoint(model, trial)
                self.control = self.callback_handler.on_save(self.args, self.state, self.control)
        finally:
            self.guard.between_steps = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        # the backward pass too: activation checkpointing runs each layer's forward again there
        with adapter_input_casts(model, self.cast_adapter_inputs):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.observe(loss)
        return loss

    def prediction_step(self, model, inputs, *args, **kwargs):
        with adapter_input_casts(model, self.cast_adapter_inputs):
            return super().prediction_step(model, inputs, *args, **kwargs)


def memory_mib() -> dict[str, int]:
    """This process's memory now and at its peak; on a GPU also what torch allocated and reserved on it."""
    memory = {
        "mem_rss_mib": round(psutil.Process().memory_info().rss / 2**20),
        "mem_rss_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    if torch.cuda.is_available():
        memory["mem_gpu_allocated_mib"] = round(torch.cuda.memory_allocated() / 2**20)
        memory["mem_gpu_reserved_mib"] = round(torch.cuda.memory_reserved() / 2**20)
        memory["mem_gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return memory


class ProgressBar(ProgressCallback):
    """The Trainer's training bar alone (no second bar for each evaluation), with each log as one short line."""

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        pass

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and ("loss" in logs or "eval_loss" in logs):
            self.training_bar.write(format_log(state, logs))


def format_log(state, logs: dict) -> str:
    """`step 20/228  loss 1.084  lr 1.7e-03  grad norm 1.72  4,512 tok/s  mem 681 MiB (peak 705)`."""
    parts = [f"step {state.global_step}/{state.max_steps}"]
    for key, label, spec in (("loss", "loss", ".4f"), ("eval_loss", "eval loss", ".4f"),
                             ("learning_rate", "lr", ".2e"), ("grad_norm", "grad norm", ".3g"),
                             ("train_tokens_per_second", "tok/s", ",.0f")):
        if key in logs:
            value = format(logs[key], spec)
            parts.append(f"{value} {label}" if label == "tok/s" else f"{label} {value}")
    memory = f"mem {logs['mem_rss_mib']:,} MiB (peak {logs['mem_rss_peak_mib']:,})"
    if "mem_gpu_allocated_mib" in logs:
        memory = (f"gpu {logs['mem_gpu_allocated_mib']:,} MiB allocated, {logs['mem_gpu_reserved_mib']:,} reserved "
                  f"(peak {logs['mem_gpu_peak_mib']:,}); " + memory.replace("mem", "rss"))
    return "  ".join(parts + [memory])


class SampleReplies(TrainerCallback):
    """Greedy replies to `dataset.sample_prompts` at each evaluation and epoch end, printed and appended to
    output_dir/sample_replies.jsonl, so the user sees the model learn."""

    def __init__(self, tokenizer, prompts: list[list[dict]], tools: list[dict] | None, resumed: bool,
                 guard: "StopGuard"):
        self.tokenizer = tokenizer
        self.guard = guard  # no sample where it stopped the run
        self.prompts, self.tools = prompts, tools
        self.resumed = resumed  # a resumed run appends to the file; a fresh one starts it anew
        self.last_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not self.resumed:
            (Path(args.output_dir) / SAMPLES_FILE).unlink(missing_ok=True)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self._sample(args, state, model, "evaluation")

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        # the Trainer ends the epoch it leaves at a stop too: after a signal (whose checkpoint is saved, and the
        # scheduler's SIGKILL near) or a divergence (whose weights are not finite), no sample
        if not self.guard.stopped_early(state):
            self._sample(args, state, model, "epoch end")

    def _sample(self, args, state, model, event: str) -> None:
        if state.global_step == self.last_step:  # an evaluation at an epoch end: once is enough
            return
        self.last_step = state.global_step
        replies = sample_replies(model, self.tokenizer, self.prompts, self.tools, args, SAMPLE_REPLY_TOKENS)
        if replies is not None and state.is_world_process_zero:
            with (Path(args.output_dir) / SAMPLES_FILE).open("a") as file:
                for prompt, reply in zip(self.prompts, replies):
                    record = {"step": state.global_step, "epoch": state.epoch, "event": event,
                              "prompt": asked(prompt), "reply": reply}
                    file.write(json.dumps(record) + "\n")
                    tqdm.write(f"sample at step {state.global_step}: {record['prompt']!r} -> {reply!r}")


def sample_replies(model, tokenizer, prompts: list[list[dict]], tools: list[dict] | None, args,
                   max_new_tokens: int) -> list[str] | None:
    """Greedy replies to `prompts`, by the main process alone, or under ZeRO-3 and FSDP, where each process holds a
    shard of the weights, by all of them together (synced_gpus); None on a process that takes no part."""
    together = shards_weights(args) and args.world_size > 1
    if not (args.process_index == 0 or together):
        return None
    was_training = model.training
    model.eval()
    try:
        return [generate_reply(model, tokenizer, prompt, max_new_tokens, synced_gpus=together, tools=tools)
                for prompt in prompts]
    except Exception as error:
        if together:  # every process generates: one that went on alone would wait for the others forever
            raise
        # a sample shows what the model learned; it must not cost the training (a prompt past a model's learned
        # positions, a GPU out of memory with the optimizer's states still held)
        logging.getLogger("sftkit").warning(f"a sample reply could not be generated ({type(error).__name__}: "
                                            f"{first_line(error)}); the run goes on without it")
        return None
    finally:
        model.train(was_training)


class WarnOfAWarmupAsLongAsTheRun(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and (outlasts := warmup_outlasts(args, state.max_steps)):
            logging.getLogger("sftkit").warning(outlasts)


class SettingsToWandb(TrainerCallback):
    """W&B's run config holds the Trainer's arguments and the model's configs (transformers 5.24's WandbCallback),
    not sftkit's dataset settings nor its model ones (path, revision, QLoRA, dtype): a sweep over the data or the
    base could not tell its runs apart there. Runs after the Trainer's own callbacks, so W&B's run has begun."""

    def __init__(self, resolved: dict):
        self.settings = {section: resolved[section] for section in ("model", "dataset")}  # secrets hidden

    def on_train_begin(self, args, state, control, **kwargs):
        import wandb

        if state.is_world_process_zero and wandb.run is not None:
            wandb.run.config.update({"sftkit": self.settings}, allow_val_change=True)


class LogTheLastStep(TrainerCallback):
    """A log at the last step too (the Trainer logs every logging_steps only): otherwise the steps after the last
    multiple of logging_steps are in no log, and the summary's last and mean train loss, and the loss plot, leave
    them out (a 4-step run logging every 10 steps had its first step's loss as its mean)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.logging_strategy == "steps":
            control.should_log = True


class StopRequested(Exception):
    """A signal asked to stop where the Trainer has no place to: before the first step (in its setup, or the
    evaluation at its start) or in an evaluation (StopGuard)."""


class StopGuard(TrainerCallback):
    """Ends training after the current step: with a checkpoint on Ctrl-C or SIGTERM, without one when the loss, the
    gradient norm or (where a checkpoint is due) the trained weights are no longer finite (the weights are then
    broken, so nothing of that step may be saved).

    A second signal gets the default behaviour (stop at once). With several processes both flags are shared every
    step, so all of them stop, and save, together (saving under ZeRO is collective). The handlers stay until the
    run calls restore_signals, after its export: a signal after the last step asks the run to export the trained
    model without its extras (stop_requested), never to drop it.
    """

    def __init__(self):
        self.received: int | None = None  # the signal that asked for the stop
        self.diverged_at: int | None = None  # the optimizer step whose loss or gradient norm was not finite
        self._finite = None  # a device tensor: every loss and gradient norm since the last step was finite
        self._previous: dict = {}
        self._received_at: dict = {}  # signal -> when it first came
        self.training_over = False
        self.between_steps = False  # in MonitoredSFTTrainer._maybe_log_save_evaluate, which catches StopRequested

    def stop_signal(self) -> signal.Signals:
        """The signal that asked for the stop; SIGTERM where another process received it (_shared_flags)."""
        return signal.Signals(self.received or signal.SIGTERM)

    def observe(self, value: torch.Tensor) -> None:
        """Called with each micro-batch's loss and each step's gradient norm; kept on the device so that the check
        costs one sync per step."""
        finite = torch.isfinite(value.detach()).all()
        self._finite = finite if self._finite is None else self._finite & finite.to(self._finite.device)

    def install(self) -> None:
        """Catch Ctrl-C and SIGTERM from now on (sftkit's run installs it before --overwrite removes the earlier
        run, the Trainer's start only after its setup, which under DeepSpeed takes tens of seconds)."""
        if not self._previous:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()
        if self.stop_requested(args):  # during the Trainer's setup: the loop would train a step before it stops
            raise StopRequested

    def _handle(self, signum, frame) -> None:
        if signum in self._received_at:  # the same signal again
            if signum == signal.SIGTERM and time.monotonic() - self._received_at[signum] < REPEATED_SIGTERM_SECONDS:
                return  # one stop delivered twice: a scheduler signals every process, and torchrun forwards its own
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)  # stop at once, as without sftkit
            return
        self._received_at[signum] = time.monotonic()
        self.received = signum
        if first_on_its_machine():  # said at once: the step, or an evaluation, may take minutes
            what = ("training is over; the trained model is exported before the run stops" if self.training_over else
                    "the run stops with a checkpoint after the current step (an evaluation at its next batch; at the "
                    "last step the export takes its place), or at once before the first step")
            print(f"\nsftkit: {signal.Signals(signum).name}: {what}; Ctrl-C again, or a SIGTERM more than 2 s later, "
                  "stops it at once", file=sys.stderr, flush=True)

    def stop_requested(self, args) -> bool:
        """Whether any process received a signal; every process must ask at the same point."""
        return self._shared_flags(args)[0]

    def restore_signals(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save or self.received is not None:  # a checkpoint may be saved: of finite weights only
            self._observe_trained_weights(model)
        signalled, diverged = self._shared_flags(args)
        self._finite = None
        if diverged:
            self.diverged_at = state.global_step
            control.should_save = False
            control.should_evaluate = False
            control.should_training_stop = True
            keep_checkpoints_at_an_early_stop(args)
        elif signalled:
            if self.received is None and first_on_its_machine():  # a signal to another process alone (kill PID)
                print("\nsftkit: another process of the run received a signal: the run stops after this step",
                      file=sys.stderr, flush=True)
            self.received = self.received or signal.SIGTERM
            control.should_evaluate = False  # the checkpoint first: a SIGKILL follows a scheduler's SIGTERM
            control.should_training_stop = True
            # at the last step the run ends as planned, best model and all: the export, which writes less than a
            # checkpoint, comes next
            if state.global_step < state.max_steps:
                control.should_save = True
                keep_checkpoints_at_an_early_stop(args)

    def _observe_trained_weights(self, model) -> None:
        """A step's update can make the weights inf while its loss and gradient norm were finite (a learning rate
        far too high): caught one step later, after the checkpoint of the broken weights was saved and rotation had
        deleted the last good one. Each process reads its own part (ZeRO-3's ds_tensor, FSDP2's local shard)."""
        for parameter in model.parameters() if model is not None else ():
            if parameter.requires_grad:
                self.observe(local_shard(parameter))

    def on_prediction_step(self, args, state, control, **kwargs):
        # an evaluation gives way at once to the stop, the checkpoint or the export: a scheduler's SIGKILL follows its
        # SIGTERM within seconds (Slurm's KillWait: 30 s), and a large eval set takes minutes. Every process evaluates
        # the same number of batches, so each asks here, together.
        if (self.training_over or state.global_step == 0 or self.between_steps) and self.stop_requested(args):
            raise StopRequested

    def on_epoch_end(self, args, state, control, **kwargs):
        # the Trainer leaves the epoch after a stop and ends it: its flow callback then asks again for the epoch's
        # save and evaluation (save_strategy, eval_strategy: epoch), which after a divergence would write the broken
        # weights and let rotation delete a good checkpoint, and after a signal would save its checkpoint again
        # after a whole evaluation, as the scheduler's SIGKILL nears
        if self.stopped_early(state):
            control.should_save = False
            control.should_evaluate = False

    def stopped_early(self, state) -> bool:
        """Training stopped before its last step (by a signal, or a divergence), or diverged at it."""
        return self.diverged_at is not None or (self.received is not None and state.global_step < state.max_steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.training_over = True

    def _shared_flags(self, args) -> tuple[bool, bool]:
        """(signalled, diverged) on any process. Accelerate's set_trigger/check_trigger shares one flag per
        collective; these are two, so one all-reduce of both here instead of two a step."""
        device = self._finite.device if self._finite is not None else args.device
        diverged = torch.zeros((), device=device) if self._finite is None else (~self._finite).float()
        flags = torch.stack([torch.tensor(float(self.received is not None), device=device), diverged])
        if args.world_size > 1:
            flags = flags.to(args.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signalled, diverged = flags.tolist()
        return bool(signalled), bool(diverged)
