"""What a user sees during and after a run: logs, TensorBoard and W&B files, memory, sample replies, the summary,
loss.png and the model card; and a run stopped by a signal, then resumed."""

import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import REPO, SAMPLE_PROMPTS, run_python

from sftkit.config import ConfigError, load_config
from sftkit.train import SUMMARY_FILE, train

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


def test_wandb_writes_an_offline_run(monitored_run):
    runs = list((monitored_run.root / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    (history,) = runs[0].glob("run-*.wandb")
    assert history.stat().st_size > 1000


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
    train(load_config(None, overrides + ["--training.resume_from_checkpoint", "true"]))  # from step 2
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


def test_loss_plot_is_a_real_image_of_train_and_eval_loss(monitored_run):
    from PIL import Image

    image = Image.open(monitored_run.out / "loss.png")
    assert image.format == "PNG" and image.size == (800, 450)
    colors = image.convert("RGB").getcolors(maxcolors=100_000)
    blue, orange = (31, 119, 180), (255, 127, 14)  # matplotlib's tab:blue (train) and tab:orange (eval)
    assert {blue, orange} <= {color for _, color in colors}


def test_model_card_describes_the_run_and_how_to_load_it(monitored_run):
    card = (monitored_run.out / "README.md").read_text()
    summary = json.loads((monitored_run.out / SUMMARY_FILE).read_text())
    assert card.startswith("---\nbase_model: data/tiny-chat-llama\n")
    assert "| method | full fine-tuning |" in card
    assert f"| eval loss | {summary['eval_loss_first']:.3f} | {summary['eval_loss']:.3f} |" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "python -m sftkit.chat" in card
    assert "![loss](loss.png)" in card


def interrupted_run(out, signum: int, steps: int = 40):
    """Start a run, send `signum` once it has logged step 5, and return its result."""
    command = [sys.executable, "sft.py", "--training.output_dir", str(out), "--training.max_steps", str(steps),
               "--training.logging_steps", "1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    stdout = ""
    for line in process.stdout:
        stdout += line
        if "step 5/" in line:
            process.send_signal(signum)
            break
    rest, stderr = process.communicate(timeout=120)
    return process.returncode, stdout + rest, stderr


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resumed_run_matches_an_uninterrupted_one(tmp_path):
    whole = run_python("sft.py", "--training.output_dir", str(tmp_path / "whole"), "--training.max_steps", "40",
                       "--training.logging_steps", "1")
    code, stdout, stderr = interrupted_run(tmp_path / "split", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    stopped = max(logged_losses(stdout))
    assert 5 <= stopped < 40
    assert f"stopped by SIGTERM at step {stopped} of 40; checkpoint saved in {tmp_path / 'split'}/checkpoint-{stopped}" in stderr
    assert "--training.resume_from_checkpoint true" in stderr
    assert (tmp_path / "split" / f"checkpoint-{stopped}" / "optimizer.pt").exists()
    assert not (tmp_path / "split" / "config.json").exists(), "no exported model that looks complete"
    resumed = run_python("sft.py", "--training.output_dir", str(tmp_path / "split"), "--training.max_steps", "40",
                         "--training.logging_steps", "1", "--training.resume_from_checkpoint", "true")
    expected = logged_losses(whole.stdout)
    combined = {**logged_losses(stdout), **logged_losses(resumed.stdout)}
    assert sorted(combined) == list(range(1, 41)) and min(logged_losses(resumed.stdout)) == stopped + 1
    for step, loss in expected.items():
        assert combined[step] == pytest.approx(loss, abs=2e-4), f"step {step}: {combined[step]} vs {loss}"
    assert json.loads((tmp_path / "split" / SUMMARY_FILE).read_text())["steps"] == 40


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_non_zero(tmp_path):
    code, stdout, stderr = interrupted_run(tmp_path / "out", signal.SIGINT)
    assert code == 130
    assert "stopped by SIGINT" in stderr and "Resume with: python sft.py" in stderr
    assert list((tmp_path / "out").glob("checkpoint-*/trainer_state.json"))
    assert "Traceback" not in stderr


def test_resume_without_a_checkpoint_is_a_config_error(tmp_path):
    config = load_config(None, ["--training.output_dir", str(tmp_path), "--training.resume_from_checkpoint", "true"])
    with pytest.raises(ConfigError, match=f"training.resume_from_checkpoint is true but {tmp_path} holds no checkpoint"):
        train(config)
