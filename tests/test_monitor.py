"""What a user sees during and after a run: logs, TensorBoard and W&B files, memory, sample replies, the summary,
loss.png and the model card; and a run stopped by a signal, then resumed."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_PROMPTS, save_tiny_gpt2
from transformers import TrainerCallback

from sftkit.config import load_config
from sftkit.errors import ConfigError
from sftkit.layout import SUMMARY_FILE
from sftkit.train import train

LOG_LINE = re.compile(r"step (\d+)/(\d+)  loss ([\d.]+)  lr ([\d.e+-]+)  grad norm ([\d.e+-]+)  ([\d,]+) tok/s  "
                      r"mem ([\d,]+) MiB \(peak ([\d,]+)\)")


def logged_losses(stdout: str) -> dict[int, float]:
    return {int(m[1]): float(m[3]) for m in LOG_LINE.finditer(stdout)}


def test_each_log_shows_loss_lr_grad_norm_tokens_per_second_and_memory(monitored_run):
    lines = LOG_LINE.findall(monitored_run.stdout)
    assert [int(line[0]) for line in lines] == [1, 4, 8, 12, 16, 20, 24], monitored_run.stdout[-2000:]
    for step, total, loss, lr, grad_norm, tokens_per_second, rss, peak in lines:
        assert total == "24" and float(loss) > 0 and float(grad_norm) > 0
        assert int(tokens_per_second.replace(",", "")) > 0
        assert 0 < int(rss.replace(",", "")) <= int(peak.replace(",", ""))
    assert float(lines[-1][2]) < float(lines[0][2]) / 2, "the loss falls"
    assert re.search(r"step 12/24  eval loss [\d.]+  mem", monitored_run.stdout)
    assert "Traceback" not in monitored_run.stderr


def test_tensorboard_event_files_hold_the_logged_scalars(monitored_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((monitored_run.out / "runs").rglob("events.out.tfevents.*"))
    assert event_files
    scalars = {}
    for file in event_files:
        events = EventAccumulator(str(file)).Reload()
        for tag in events.Tags()["scalars"]:
            scalars[tag] = [event.step for event in events.Scalars(tag)]
    for tag in ("train/loss", "train/learning_rate", "train/grad_norm", "train/train_tokens_per_second"):
        assert scalars[tag] == [1, 4, 8, 12, 16, 20, 24], tag
    for tag in ("train/mem_rss_mib", "train/mem_rss_peak_mib"):  # in evaluation logs too
        assert {1, 4, 8, 12, 16, 20, 24} <= set(scalars[tag]), tag
    assert scalars["eval/loss"] == [0, 12, 24]


def wandb_records(history: Path):
    """The records of an offline W&B run's file (wandb 0.31): a 7-byte header (":W&B", magic, version), then
    LevelDB-log blocks of 32 KiB whose chunks each start with a CRC, a length and a type (1: whole, 4: last part)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, position, block, pending = history.read_bytes(), 7, 32768, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = struct.unpack("<HB", data[position + 4:position + 7])
        if length == 0 and kind == 0:
            return
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def test_wandb_writes_an_offline_run_named_after_output_dir_with_sftkits_settings(monitored_run):
    """W&B named each run of a sweep at random, and its config held the Trainer's arguments only: runs that
    differed in model.lora_config.r or the data could not be told apart."""
    runs = list((monitored_run.root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (history,) = runs[0].glob("run-*.wandb")
    records = list(wandb_records(history))
    assert [record.run.display_name for record in records if record.HasField("run")][0] == monitored_run.out.name
    settings = [json.loads(item.value_json) for record in records if record.HasField("config")
                for item in record.config.update if item.key == "sftkit"]
    assert settings and settings[0]["model"]["path"] == "data/tiny-chat-llama"
    assert settings[0]["dataset"]["name"] == "data/sample_chat.jsonl"
    assert any(item.key == "learning_rate" for record in records if record.HasField("config")
               for item in record.config.update), "the Trainer's arguments are still there"


def test_sample_replies_at_each_evaluation_and_epoch_end(monitored_run):
    records = [json.loads(line) for line in (monitored_run.out / "sample_replies.jsonl").read_text().splitlines()]
    assert [(r["step"], r["event"]) for r in records[::2]] == [
        (0, "evaluation"), (12, "evaluation"), (19, "epoch end"), (24, "evaluation")]
    assert [r["prompt"] for r in records] == SAMPLE_PROMPTS * 4
    assert all(r["reply"] for r in records if r["step"] > 0)  # the base model may stop at once
    assert records[-2]["reply"] != records[0]["reply"], "the model learned something between start and end"
    assert f"sample at step 12: {SAMPLE_PROMPTS[0]!r} -> {records[2]['reply']!r}" in monitored_run.stdout


def test_a_fresh_run_starts_the_sample_file_anew_and_a_resumed_one_appends(tmp_path):
    overrides = ["--training.output_dir", str(tmp_path), "--training.max_steps", "4", "--training.save_steps", "2",
                 "--training.save_strategy", "steps", "--dataset.sample_prompts", '["Hello!"]', "--dataset.test_size", "null"]
    samples = tmp_path / "sample_replies.jsonl"
    for overwrite in (False, True):  # one epoch end (step 4) per run; the second run replaces the first's file
        train(load_config(None, overrides), overwrite=overwrite)
        assert len(samples.read_text().splitlines()) == 1
    shutil.rmtree(tmp_path / "checkpoint-4")
    # from step 2, named: `true` refuses a checkpoint behind the finished model
    train(load_config(None, overrides + ["--training.resume_from_checkpoint", str(tmp_path / "checkpoint-2")]))
    assert [json.loads(line)["step"] for line in samples.read_text().splitlines()] == [4, 4]


def test_final_summary_is_printed_and_saved(monitored_run):
    summary = json.loads((monitored_run.out / SUMMARY_FILE).read_text())
    assert summary["steps"] == 24
    assert summary["input_tokens"] > summary["trained_tokens"] > 0
    assert summary["tokens_per_second"] == pytest.approx(summary["input_tokens"] / summary["train_seconds"], rel=0.05)
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert summary["eval_loss"] < summary["eval_loss_first"]
    assert summary["peak_memory_mib"]["rss_peak"] > 100
    for key in ("output_dir", "loss_plot", "model_card", "sample_replies_file"):
        assert (monitored_run.out / summary[key]).exists(), key
    table = monitored_run.stdout[monitored_run.stdout.index("Run summary"):]
    for label in ("wall time", "tokens", "train loss", "eval loss", "peak memory", "model + tokenizer", "loss plot",
                  "model card", "summary"):
        assert re.search(rf"^  {re.escape(label)} +\S", table, re.M), label
    assert f"{summary['eval_loss_first']:.3f} -> {summary['eval_loss']:.3f} (start -> end)" in table
    # every logged point, as the log lines printed them (a sweep compares its runs' curves from this file)
    evaluated = [(entry["step"], round(entry["eval_loss"], 4)) for entry in summary["log_history"] if "eval_loss" in entry]
    printed = [(int(step), float(loss)) for step, loss in
               re.findall(r"^step (\d+)/24  eval loss ([\d.]+)", monitored_run.stdout, re.M)]
    assert evaluated == printed and [step for step, _ in evaluated][:2] == [0, 12]


def test_the_summary_names_the_checkpoints_kept_beside_the_model(tmp_path):
    """A config without save_strategy (the README's minimal one) kept transformers' checkpoint of the last step, its
    optimizer states included, beside the model: three times its size, and named nowhere."""
    from sftkit.report import format_summary

    out = tmp_path / "out"
    run = train(load_config(None, ["--training.output_dir", str(out), "--training.max_steps", "2",
                                   "--training.save_strategy", "steps", "--training.save_steps", "1"]))
    kept = run.summary["checkpoints"]
    size = sum(file.stat().st_size for file in out.glob("checkpoint-*/**/*") if file.is_file())
    assert kept == {"count": 2, "newest": str(out / "checkpoint-2"), "bytes": size, "resumable": True} and size > 3 * 2**20
    assert re.search(rf"^  checkpoints +2, newest {out}/checkpoint-2 \([\d.]+ MiB in all, optimizer states included; "
                     r'training.save_strategy: "no" would keep none\)$', format_summary(run.summary), re.M)
    assert json.loads((out / SUMMARY_FILE).read_text())["checkpoints"] == kept


def test_loss_plot_is_a_real_image_of_train_and_eval_loss(monitored_run):
    from PIL import Image

    image = Image.open(monitored_run.out / "loss.png")
    assert image.format == "PNG" and image.size == (800, 450)
    colors = image.convert("RGB").getcolors(maxcolors=100_000)
    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue (train) and tab:orange (eval)
    assert {blue, orange} <= {color for _, color in colors}


def test_loss_plot_of_a_run_that_logged_once_shows_the_point(tmp_path):
    from PIL import Image

    from sftkit.report import plot_loss

    plot_loss([{"step": 3, "loss": 2.5}], tmp_path / "loss.png")
    image = Image.open(tmp_path / "loss.png").convert("RGB")
    middle = image.crop((300, 150, 560, 280))  # the axes' middle, away from the legend's sample of the line
    assert (31, 119, 180) in {color for _, color in middle.getcolors(maxcolors=100_000)}  # the point, in tab:blue


def test_rows_cut_to_max_seq_length_are_said_by_the_run_as_by_the_dry_run(tmp_path, capsys):
    """The dry run said how many rows the trainer cuts to max_seq_length, and the run said nothing, though a reply
    cut there trains without its end-of-turn token. A run without evaluation data printed `eval loss n/a -> n/a`,
    and a one-step run `1 steps`."""
    from conftest import run_sft

    args = ["--config", "lora_train_config.yaml", "--model.max_seq_length", "40", "--dataset.test_size", "null",
            "--training.max_steps", "1", "--training.output_dir", str(tmp_path / "out")]
    planned = int(re.search(r"max_seq_length 40: (\d+) rows are cut to it", run_sft(*args, "--dry-run").stdout)[1])
    said = run_sft(*args).stdout
    assert f"{planned} rows cut to max_seq_length 40 (a reply cut there trains without its end)" in said
    assert f"dropped: 0 bad rows, 0 with nothing to train within max_seq_length; {planned} cut to max_seq_length" \
        in said
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())["rows_cut"] == planned > 0
    assert "  eval loss " not in said and "  wall time " in said and " 1 step\n" in said


def test_model_card_describes_the_run_and_how_to_load_it(monitored_run):
    card = (monitored_run.out / "README.md").read_text()
    summary = json.loads((monitored_run.out / SUMMARY_FILE).read_text())
    assert card.startswith("---\nbase_model: data/tiny-chat-llama\n")
    assert "| method | full fine-tuning |" in card
    assert "| data | `data/sample_chat.jsonl`: 320 rows read, 304 trained on, 16 evaluated on (3 of them also " \
           "trained on) |" in card  # the sample data repeats rows
    assert f"| eval loss | {summary['eval_loss_first']:.3f} | {summary['eval_loss']:.3f} |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "python -m sftkit.chat" in card
    assert "![loss](loss.png)" in card
    assert f"| steps | 24 (training.max_steps; {summary['epochs']:.2f} epochs of the data) |" in card
    assert "system prompt" not in card and 'messages = [{"role": "user", "content": "Hello!"}]' in card


def test_the_summary_and_the_model_card_say_the_rows_were_split_at_user_turns(monitored_run):
    """With dataset.split_user_turns more rows train than were read: the card said "320 rows read, 488 trained on"
    without a word of the split (helper-73)."""
    from sftkit.report import format_summary, model_card

    summary = json.loads((monitored_run.out / SUMMARY_FILE).read_text())
    assert summary["rows_split_into"] is None
    summary["rows_split_into"] = 562
    assert "| data | `data/sample_chat.jsonl`: 320 rows read (split at user turns into 562), 304 trained on" in \
        model_card(load_config(None, ["--dataset.split_user_turns", "true"]), summary)
    assert "  rows               320 read (split at user turns into 562), dropped: 0 bad rows" in format_summary(summary)


def test_the_model_card_prompts_the_model_with_the_system_prompt_it_trained_with(monitored_run):
    """It never said that every row had been given dataset.system_prompt, and its code prompted the model without
    it, unlike training (sftkit chat, compare and the sample replies use it)."""
    import ast

    from sftkit.report import model_card

    system = 'You are Acme\'s agent | answer in "one" sentence.'
    config = load_config(None, ["--dataset.system_prompt", system])
    summary = json.loads((monitored_run.out / SUMMARY_FILE).read_text())
    summary["rows_dropped"] = {"bad rows": 2, "with nothing to train within max_seq_length": 0}
    card = model_card(config, summary)
    assert "320 rows read (dropped: 2 bad rows), 304 trained on, 16 evaluated on (3 of them also trained on) |" \
        in card
    assert ('| system prompt | "You are Acme\'s agent &#124; answer in \\"one\\" sentence." (dataset.system_prompt: '
            "first in every row without a system message of its own) |") in card, card
    code = card.split("```python\n")[1].split("```")[0]
    messages = next(line for line in code.splitlines() if line.startswith("messages = "))
    assert ast.literal_eval(messages.removeprefix("messages = ")) == [{"role": "system", "content": system},
                                                                      {"role": "user", "content": "Hello!"}]


def interrupted_run(out, signum: int, steps: int = 40, at: str = "step 5/", again_after: float | None = None):
    """Start a run, send `signum` once it has printed `at` (by default, logged step 5), and again `again_after`
    seconds later if given, and return its result."""
    command = [sys.executable, "sft.py", "--training.output_dir", str(out), "--training.max_steps", str(steps),
               "--training.logging_steps", "1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    stdout = ""
    for line in process.stdout:
        stdout += line
        if at in line:
            process.send_signal(signum)
            if again_after is not None:
                time.sleep(again_after)
                process.send_signal(signum)
            break
    rest, stderr = process.communicate(timeout=120)
    return process.returncode, stdout + rest, stderr


LAUNCH_STEPS = 38  # 2 epochs of the default config


def launch(out, *extra):
    """`accelerate launch sft.py` as the README runs it: 2 epochs of the default config, a log every 4 steps."""
    accelerate = str(Path(sys.executable).parent / "accelerate")
    return [accelerate, "launch", "sft.py", "--training.output_dir", str(out),
            "--training.num_train_epochs", "2", "--training.logging_steps", "4", "--dataset.system_prompt",
            "Be brief.", *extra]


def history(out) -> tuple[dict, float]:
    entries = json.loads((out / f"checkpoint-{LAUNCH_STEPS}" / "trainer_state.json").read_text())["log_history"]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    return {entry["step"]: entry["loss"] for entry in entries if "loss" in entry}, summary


def test_ctrl_c_in_the_terminal_under_accelerate_launch_prints_an_accelerate_resume_command(tmp_path):
    """Ctrl-C signals the whole process group: `accelerate launch` exited before the training process wrote its
    resume command, which then read `python sft.py ...` (helper-75): one process only, under several."""
    out = tmp_path / "out"
    process = subprocess.Popen(launch(out, "--training.max_steps", "30"), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in process.stdout:
        if "step 4/" in line:
            os.killpg(process.pid, signal.SIGINT)  # what the terminal sends on Ctrl-C
            process.kill()  # the launcher gone before the checkpoint is saved, as after a slow save
            break
    _, stderr = process.communicate(timeout=120)
    time.sleep(1)  # the training process, orphaned, ends after its pipes close
    assert re.search(r"Resume with: accelerate launch sft.py --training.output_dir \S+ --training.num_train_epochs 2",
                     stderr), stderr[-2000:]


@pytest.mark.slow
def test_sigterm_mid_epoch_then_the_printed_command_resumes_exactly(tmp_path):
    # a checkpoint at the end, to compare
    common = ["--training.save_strategy", "steps", "--training.save_steps", str(LAUNCH_STEPS)]
    whole = subprocess.run(launch(tmp_path / "whole", *common), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "split run"  # a space, which the printed command must quote
    process = subprocess.Popen(launch(out, *common), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    stdout = ""
    for line in process.stdout:
        stdout += line
        if "step 4/" in line:  # the training process, not the launcher, gets the signal (as `kill PID` would)
            __import__("psutil").Process(process.pid).children()[0].send_signal(signal.SIGTERM)
            break
    rest, stderr = process.communicate(timeout=120)
    stopped = int(re.search(rf"stopped by SIGTERM at step (\d+) of {LAUNCH_STEPS}", stderr)[1])
    assert 4 < stopped < LAUNCH_STEPS and stopped % 4, "stopped between two logs, so the resume must restore a partial window"
    assert f"checkpoint saved in {out}/checkpoint-{stopped}" in stderr
    assert not (out / "config.json").exists(), "no exported model that looks complete"
    assert not (out / "README.md").exists(), "no model card before there is a model"
    command = re.search(r"Resume with: (.*)", stderr)[1]
    assert command.startswith("accelerate launch sft.py") and f"'{out}'" in command and "'Be brief.'" in command

    resumed = subprocess.run(shlex.split(command), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "missing keys" not in resumed.stderr and "Traceback" not in resumed.stderr
    (losses, summary), (expected, whole) = history(out), history(tmp_path / "whole")
    assert sorted(losses) == sorted(expected) == [1, *range(4, LAUNCH_STEPS, 4), LAUNCH_STEPS]  # the last step too
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, abs=1e-4), f"step {step}: {losses[step]} vs {loss}"
    assert summary["eval_loss"] == pytest.approx(whole["eval_loss"], abs=1e-4)
    assert summary["eval_loss_first"] == pytest.approx(whole["eval_loss_first"], abs=1e-4)
    assert summary["train_loss_mean"] == pytest.approx(whole["train_loss_mean"], abs=1e-4), "the whole run's mean"
    assert summary["steps"] == LAUNCH_STEPS and summary["input_tokens"] == whole["input_tokens"]
    record = json.loads((out / f"checkpoint-{LAUNCH_STEPS}" / "sftkit_run.json").read_text())
    assert summary["wall_seconds"] > record["wall_seconds"] - 1


def test_a_resume_under_another_cpu_thread_count_uses_the_interrupted_runs(tmp_path, caplog):
    import torch

    overrides = ["--training.max_steps", "6", "--training.logging_steps", "4", "--dataset.test_size", "null",
                 "--training.save_strategy", "steps", "--training.save_steps", "3"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        whole = train(load_config(None, ["--training.output_dir", str(tmp_path / "whole"), *overrides]))
        shutil.copytree(tmp_path / "whole" / "checkpoint-3", tmp_path / "split" / "checkpoint-3")
        record = json.loads((tmp_path / "whole" / "sftkit_run.json").read_text())  # as a run stopped at step 3 left it
        (tmp_path / "split" / "sftkit_run.json").write_text(json.dumps({**record, "status": "interrupted"}))
        torch.set_num_threads(2)
        resumed = train(load_config(None, ["--training.output_dir", str(tmp_path / "split"), *overrides,
                                           "--training.resume_from_checkpoint", "true"]))
        assert torch.get_num_threads() == 1 and "resuming with 1 CPU threads, as the interrupted run had" in caplog.text
    finally:
        torch.set_num_threads(threads)
    logged = {entry["step"]: entry["loss"] for entry in resumed.trainer.state.log_history if "loss" in entry}
    expected = {entry["step"]: entry["loss"] for entry in whole.trainer.state.log_history if "loss" in entry}
    assert list(logged) == [1, 4, 6] and logged == pytest.approx(expected, abs=1e-6)


class SignalAt(TrainerCallback):
    """Sends `signum` to this process on the `count`-th call of the callback event `event` (before sftkit's own
    callbacks see that call): where a signal from outside would land by chance, here every time."""

    def __init__(self, event: str, count: int, signum: int = signal.SIGTERM):
        self.calls, self.count, self.signum = [], count, signum

        def event_happened(args, state, control, **kwargs):
            self.calls.append(state.global_step)
            if len(self.calls) == self.count:
                os.kill(os.getpid(), self.signum)

        setattr(self, event, event_happened)


def signal_at(monkeypatch, event: str, count: int, signum: int = signal.SIGTERM) -> SignalAt:
    """Every trainer sftkit.train builds from now on signals itself as SignalAt says."""
    import sftkit.train

    callback, build = SignalAt(event, count, signum), sftkit.train._trainer

    def with_a_signal(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.callback_handler.callbacks.insert(0, callback)
        return trainer

    monkeypatch.setattr(sftkit.train, "_trainer", with_a_signal)
    return callback


@pytest.mark.parametrize("saving", [["--training.save_strategy", "steps", "--training.save_steps", "3",
                                      "--training.save_total_limit", "1"], ["--training.save_strategy", "best"]])
def test_a_signal_under_the_best_model_settings_keeps_its_checkpoint(tmp_path, monkeypatch, saving):
    """transformers ends a stopped loop as a finished one: with load_best_model_at_end and save_total_limit 1 it
    deleted the checkpoint the signal had saved, and save_strategy best saved none at an evaluation that was no new
    best; the resume went back to the best checkpoint (here step 1 or 3: the entropy of the replies rises in the
    first steps, so the first is the best)."""
    from sftkit.errors import Interrupted

    signal_at(monkeypatch, "on_step_begin", 5)  # during step 5
    out = tmp_path / "out"
    with pytest.raises(Interrupted, match=f"stopped by SIGTERM at step 5 of 12; checkpoint saved in {out}/checkpoint-5"):
        train(load_config(None, ["--training.output_dir", str(out), "--training.max_steps", "12",
                                 "--training.eval_strategy", "steps", "--training.eval_steps", "1" if "best" in saving
                                 else "3", "--training.load_best_model_at_end", "true",
                                 "--training.metric_for_best_model", "eval_entropy", "--training.greater_is_better",
                                 "false", *saving]))
    history = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["log_history"]
    # the checkpoint comes at once, without the evaluation due at step 5 (eval_steps 1): a scheduler's SIGKILL
    # follows its SIGTERM within seconds, and the evaluation of a large eval set takes minutes
    assert [entry["step"] for entry in history if "eval_loss" in entry][-1] == (4 if "best" in saving else 3)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_non_zero(tmp_path):
    code, stdout, stderr = interrupted_run(tmp_path / "out", signal.SIGINT)
    assert code == 130
    assert "stopped by SIGINT" in stderr and "Resume with: python sft.py" in stderr
    assert list((tmp_path / "out").glob("checkpoint-*/trainer_state.json"))
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_sigterm_delivered_twice_at_once_is_one_stop_with_a_checkpoint(tmp_path):
    """A scheduler signals every process and torchrun forwards its own: two SIGTERMs 50 ms apart are one stop."""
    code, stdout, stderr = interrupted_run(tmp_path / "out", signal.SIGTERM, again_after=0.05)
    assert code == 143 and "stopped by SIGTERM" in stderr, stderr[-3000:]
    assert list((tmp_path / "out").glob("checkpoint-*/trainer_state.json"))


@pytest.mark.slow
def test_a_signal_after_the_last_step_still_exports_the_trained_model(tmp_path):
    """Ctrl-C once the last step is done (during the final evaluation, the sample reply or the export) must not drop
    the trained model, which exists only in memory: the run exports it, skipping what is left of the extras."""
    code, stdout, stderr = interrupted_run(tmp_path / "out", signal.SIGINT, steps=6, at="step 6/6")
    assert code == 0, stderr[-3000:]
    assert "sftkit: SIGINT" in stderr and "Traceback" not in stderr, stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file() and "Run summary" in stdout
    assert json.loads((tmp_path / "out" / "sftkit_run.json").read_text())["status"] == "finished"


@pytest.mark.parametrize("per_epoch", [False, True])
def test_a_stop_mid_epoch_ends_without_the_epochs_evaluation_save_or_sample(tmp_path, monkeypatch, per_epoch):
    """The Trainer ends the epoch it leaves at a stop: a sample reply was generated and saved as an "epoch end" at
    step 3 of an epoch of 19, after the checkpoint and before the run said where it was (and, after a divergence,
    from weights that were not finite); with evaluations and saves per epoch, the whole evaluation ran and the
    checkpoint was saved a second time."""
    from sftkit.errors import Interrupted

    signal_at(monkeypatch, "on_step_begin", 3)
    saved = signal_at(monkeypatch, "on_save", 0).calls  # records each save (never the 0th)
    out = tmp_path / "out"
    per_epoch_settings = ["--training.eval_strategy", "epoch", "--training.save_strategy", "epoch"] if per_epoch else []
    with pytest.raises(Interrupted, match="stopped by SIGTERM at step 3 of 19"):
        train(load_config(None, ["--training.output_dir", str(out), "--training.num_train_epochs", "1",
                                 "--dataset.sample_prompts", json.dumps(SAMPLE_PROMPTS[:1]), *per_epoch_settings]))
    samples = [json.loads(line) for line in (out / "sample_replies.jsonl").read_text().splitlines()]
    assert [(sample["step"], sample["event"]) for sample in samples] == [(0, "evaluation")]
    assert saved == [3]


def test_evaluations_leave_what_trains_as_it_is(tmp_path):
    """Each evaluation drew its DataLoader's seed from torch's global generator and moved every later dropout mask:
    runs that differed only in eval_steps trained differently (eval loss 1.1798 against 1.1914 in a 10-step LoRA run
    with lora_dropout 0.1), and a resume after a stop that skipped a due evaluation was not exact."""
    def final_eval_loss(tmp_path, *evaluations):
        return train(load_config("lora_train_config.yaml", [
            "--training.output_dir", str(tmp_path), "--training.max_steps", "6", "--model.lora_config.lora_dropout",
            "0.1", "--training.eval_on_start", "false", *evaluations])).summary["eval_loss"]

    assert final_eval_loss(tmp_path / "none") == final_eval_loss(tmp_path / "every_2", "--training.eval_strategy",
                                                                 "steps", "--training.eval_steps", "2")


def test_a_signal_during_an_evaluation_between_steps_saves_that_steps_checkpoint_at_once(tmp_path, monkeypatch):
    """The evaluation ran to its end (minutes on a large eval set), then the run trained one more step before it
    saved: a scheduler's SIGKILL, seconds after its SIGTERM, came first and the work since the last checkpoint was
    lost."""
    from sftkit.errors import Interrupted
    from sftkit.report import format_summary

    evaluated = signal_at(monkeypatch, "on_prediction_step", 3).calls
    trained = signal_at(monkeypatch, "on_step_begin", 0).calls  # records each step's start (never signals)
    out = tmp_path / "out"
    with pytest.raises(Interrupted, match=f"stopped by SIGTERM at step 2 of 6; checkpoint saved in {out}/checkpoint-2"):
        train(load_config(None, ["--training.output_dir", str(out), "--training.max_steps", "6",
                                 "--training.eval_on_start", "false", "--training.eval_strategy", "steps",
                                 "--training.eval_steps", "2", "--training.per_device_eval_batch_size", "1"]))
    assert evaluated == [2, 2, 2] and trained == [0, 1]  # 3 of 16 eval rows, and no third step
    assert [path.name for path in out.glob("checkpoint-*")] == ["checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and not any("eval_loss" in entry for entry in state["log_history"])
    # in the last step's evaluation: the export comes next, without a checkpoint first (it writes more, and later)
    monkeypatch.undo()
    evaluated = signal_at(monkeypatch, "on_prediction_step", 16 + 3).calls
    last = tmp_path / "last"
    run = train(load_config(None, ["--training.output_dir", str(last), "--training.max_steps", "4",
                                   "--training.eval_on_start", "false", "--training.eval_strategy", "steps",
                                   "--training.eval_steps", "2", "--training.per_device_eval_batch_size", "1"]))
    assert evaluated == [2] * 16 + [4] * 3 and not list(last.glob("checkpoint-*"))
    assert (last / "model.safetensors").is_file() and run.summary["steps"] == 4
    # the last eval loss is step 2's, and is not called the published model's
    assert run.summary["eval_loss_step"] == 2 and "(start -> step 2, not the published model's step 4)" in \
        format_summary(run.summary)
    assert "The eval loss at the end is that of step 2, not the published model's step 4 (a stop skipped the final " \
           "evaluation)." in (last / "README.md").read_text()


def test_a_checkpoint_save_that_fails_is_not_tried_again_on_the_way_out(tmp_path, monkeypatch):
    """The hook that saves a signal's checkpoint after a stopped evaluation saved again as any error left it: under
    ZeRO-2 a full disk's RunFailed on one process sent it into a second save's collectives while the other waited in
    the first one's, and both hung until ddp_timeout (30 minutes), deaf to SIGTERM."""
    import transformers

    saves = []

    def failing_save(self, output_dir):
        saves.append(self.state.global_step)
        raise ValueError("the optimizer's states could not be written")

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", failing_save)
    with pytest.raises(ValueError, match="the optimizer's states could not be written"):
        train(load_config(None, ["--training.output_dir", str(tmp_path / "out"), "--training.max_steps", "3",
                                 "--training.save_strategy", "steps", "--training.save_steps", "2"]))
    assert saves == [2]


def test_a_signal_during_the_final_evaluation_stops_it_and_the_model_is_exported(tmp_path, monkeypatch):
    """The evaluation after the last step ran to its end first (minutes on a large eval set), so the SIGKILL a
    scheduler sends seconds after its SIGTERM lost the whole run: no checkpoint, no model."""
    from sftkit.report import format_summary

    evaluated = signal_at(monkeypatch, "on_prediction_step", 16 + 2).calls
    out = tmp_path / "out"
    run = train(load_config(None, ["--training.output_dir", str(out), "--training.max_steps", "3",
                                   "--training.per_device_eval_batch_size", "1"]))
    assert evaluated == [0] * 16 + [3] * 2  # the evaluation at the start, then 2 of the final one's 16 rows
    assert (out / "model.safetensors").is_file() and json.loads((out / "sftkit_run.json").read_text())["status"] == \
        "finished"
    assert run.summary["eval_loss"] is None and run.summary["sample_reply"] is None
    # the start's eval loss is not shown as the end's, the trained model's ("n/a -> 3.191 (start -> step 0...)")
    assert run.summary["eval_loss_first"] > 3 and \
        f"{run.summary['eval_loss_first']:.3f} at the start (a stop skipped the final evaluation)" in \
        format_summary(run.summary)


def test_a_signal_in_the_evaluation_before_the_first_step_stops_it_at_once(tmp_path, monkeypatch, capsys):
    """The signal was said nothing of while the evaluation ran to its end (minutes on a large eval set), and the run
    then trained a step it was asked not to; a second Ctrl-C, the natural reaction, stopped it with nothing saved."""
    import sftkit.train
    from sftkit.errors import Interrupted

    build = sftkit.train._trainer
    evaluated = signal_at(monkeypatch, "on_prediction_step", 2, signal.SIGINT).calls
    out = tmp_path / "out"
    arguments = ["--training.output_dir", str(out), "--training.max_steps", "3", "--training.per_device_eval_batch_size",
                 "1"]
    with pytest.raises(Interrupted, match="^stopped by SIGINT before the first step: nothing was trained$"):
        train(load_config(None, arguments))
    assert evaluated == [0, 0]  # of 16 eval rows
    assert "sftkit: SIGINT: the run stops with a checkpoint after the current step (an evaluation at its next batch; " \
           "at the last step the export takes its place), or at once before the first step; Ctrl-C again" in \
        capsys.readouterr().err
    # in the Trainer's setup, without an evaluation at the start: it trained step 1 and saved it first
    signal_at(monkeypatch, "on_train_begin", 1)
    with pytest.raises(Interrupted, match="^stopped by SIGTERM before the first step: nothing was trained$"):
        train(load_config(None, [*arguments, "--training.eval_on_start", "false"]))
    assert not list(out.glob("checkpoint-*"))
    monkeypatch.setattr(sftkit.train, "_trainer", build)
    assert train(load_config(None, arguments)).trainer.state.global_step == 3  # the same command starts it again


def test_a_failed_sample_reply_or_final_evaluation_never_costs_the_trained_model(tmp_path, capsys, monkeypatch):
    """A model with learned positions (GPT-2's 128 here) given a sample prompt longer than them raised IndexError in
    the reply after the last step, as did an eval row as long in the final evaluation (such rows are refused before
    loading now: the failure is made here): a traceback, and the trained model, which existed only in memory, was
    lost."""
    import transformers

    model = save_tiny_gpt2(tmp_path / "gpt2", positions=128)
    long = "Tell me about the weather today, please. " * 12
    (tmp_path / "eval.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "Weather?"},
                                                                  {"role": "assistant", "content": "Sunny."}]}) + "\n")

    def out_of_range(self, *args, **kwargs):
        raise IndexError("index out of range in self")

    monkeypatch.setattr(transformers.Trainer, "evaluate", out_of_range)
    out = tmp_path / "out"
    run = train(load_config(None, [
        "--model.path", model, "--model.max_seq_length", "128", "--training.output_dir", str(out),
        "--training.max_steps", "2", "--dataset.test_size", "null", "--training.eval_on_start", "false",
        "--dataset.eval_sources", json.dumps([{"name": str(tmp_path / "eval.jsonl")}]),
        "--dataset.sample_prompts", json.dumps([long]), "--training.num_train_epochs", "1"]))
    warnings = capsys.readouterr().err
    assert "sftkit: warning: the final evaluation failed (IndexError: index out of range in self); the trained " \
           "model is exported without it" in warnings, warnings
    assert "sftkit: warning: a sample reply could not be generated (IndexError" in warnings, warnings
    assert (out / "model.safetensors").is_file() and json.loads((out / "sftkit_run.json").read_text())["status"] == \
        "finished"
    assert run.summary["eval_loss"] is None and run.summary["sample_reply"] is None


def test_resume_without_a_checkpoint_is_a_config_error(tmp_path):
    config = load_config(None, ["--training.output_dir", str(tmp_path), "--training.resume_from_checkpoint", "true"])
    with pytest.raises(ConfigError, match=f"training.resume_from_checkpoint is true but {tmp_path} holds no checkpoint"):
        train(config)


def test_the_printed_summary_counts_the_eval_rows_dropped_as_its_json_does(monitored_run):
    """They were in run_summary.json and the plan only."""
    from sftkit.report import format_summary

    summary = json.loads((monitored_run.out / SUMMARY_FILE).read_text())
    assert "eval data" not in format_summary(summary)
    summary["eval_rows_dropped"] = {"bad rows": 1, "with nothing to train within max_seq_length": 0}
    assert "; dropped from the eval data: 1 bad row\n" in format_summary(summary) + "\n"


def test_the_model_card_carries_the_base_models_license(tmp_path):
    """The card's metadata held no license: a fine-tune of a model under Llama's license, pushed to the Hub, showed
    "license: unknown", which that license forbids for a derivative."""
    from conftest import TINY_MODEL
    from huggingface_hub import metadata_load

    base = tmp_path / "base"
    shutil.copytree(TINY_MODEL, base)
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: llama3.1\nlicense_link: "
                                    "https://llama.meta.com/llama3_1/license/\n---\n\n# a base model\n")
    out = tmp_path / "out"
    train(load_config(None, ["--model.path", str(base), "--training.output_dir", str(out), "--training.max_steps",
                             "2", "--dataset.test_size", "null"]))
    card = metadata_load(out / "README.md")
    assert (card["license"], card["license_name"], card["license_link"]) == (
        "other", "llama3.1", "https://llama.meta.com/llama3_1/license/")
    assert card["base_model"] == str(base) and "datasets" not in card, "a local data file is no hub dataset"


def test_a_samples_prompt_is_shown_as_its_last_user_message_not_a_tool_result_after_it():
    from sftkit.inference import asked

    prompt = [{"role": "user", "content": "Weather in Paris?"}, {"role": "tool", "content": '{"temp": 20}'}]
    assert asked(prompt) == "Weather in Paris?"
    assert asked([{"role": "system", "content": "Be brief."}]) == "Be brief."
