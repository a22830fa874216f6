"""An output directory belongs to one run: a second run refuses to replace a finished model or another run's
checkpoints, --overwrite replaces exactly what an earlier run left, a lock keeps two runs apart, and a run that cannot
write its output_dir fails before loading anything."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY_MODEL, run_python, run_sft, tmpfs

from sftkit.checkpoints import checkpoint_to_resume
from sftkit.config import load_config
from sftkit.errors import AlreadyFinished, ConfigError, Interrupted
from sftkit.layout import LOCK_FILE, RUN_FILE
from sftkit.plan import output_dir_plan
from sftkit.rundir import OutputDir
from sftkit.runlock import RunLock
from sftkit.runrecord import fingerprint, record_written
from sftkit.train import train

SHORT = ["--training.max_steps", "3", "--training.logging_steps", "1", "--dataset.test_size", "null"]


def config(out, *overrides):
    return load_config(None, ["--training.output_dir", str(out), *SHORT, *overrides])


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished full fine-tuning run, with a checkpoint."""
    out = tmp_path_factory.mktemp("finished") / "out"
    train(config(out, "--training.save_strategy", "steps", "--training.save_steps", "2"))
    return out


def copy_of(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    return out


def contents(directory):
    return {path.relative_to(directory): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("sft.py:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def test_a_second_run_refuses_to_replace_a_finished_model_and_says_how_to_go_on(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = contents(out)
    started = time.perf_counter()
    result = run_sft("--training.output_dir", str(out), "--preset", "fast_test", check=False)
    error = one_line_error(result)
    assert time.perf_counter() - started < 30, "refused before the data and the model were loaded"
    assert f"training.output_dir {out} already holds a trained model (config.json, model.safetensors" in error
    assert "2 checkpoint(s) (checkpoint-2, checkpoint-3); its checkpoints belong to a run with other settings " \
           "(dataset.max_samples 200 (that run: None)" in error
    assert error.endswith("pass --overwrite to replace it (removes only what an earlier run wrote), or choose another "
                          "training.output_dir")
    assert contents(out) == before, "nothing was touched"


def test_overwrite_removes_everything_the_earlier_run_left_and_keeps_the_users_files(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "lora_weights").mkdir()  # as if the earlier run had been a LoRA run
    (out / "lora_weights" / "adapter_config.json").write_text("{}")
    (out / "before_after.md").write_text("the old model's replies")
    record_written(out, ["lora_weights", "before_after.md"])  # as the earlier run, and its compare, recorded them
    (out / "my_notes.txt").write_text("mine")
    (out / "lora_weights" / "NOTES.md").write_text("which sweep this was")  # added since: the user's
    train(config(out, "--training.max_steps", "2"), overwrite=True)
    left = {path.name for path in out.iterdir()}
    assert not {"before_after.md", "checkpoint-2"} & left
    assert [path.name for path in (out / "lora_weights").iterdir()] == ["NOTES.md"]
    assert (out / "my_notes.txt").read_text() == "mine"
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 2
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"


@pytest.mark.parametrize("failure", ["a bad row", "a model that does not load"])
def test_overwrite_keeps_the_earlier_run_whole_until_training_begins(finished, tmp_path, failure):
    """--overwrite removed the finished model at once: a bad row in the new data (the commonest first-hour error),
    or a model that failed to load, then left an output_dir with nothing in it."""
    out = copy_of(finished, tmp_path)
    before = contents(out)
    if failure == "a bad row":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]})
                       + "\n")
        result = run_sft("--training.output_dir", str(out), *SHORT, "--dataset.name", str(bad), "--overwrite",
                         check=False)
        assert "message 1 has role 'bot'" in one_line_error(result)
    else:
        model = tmp_path / "model"
        shutil.copytree(TINY_MODEL, model)
        (model / "model.safetensors").write_bytes(b"not weights")
        with pytest.raises(Exception, match="header too large"):  # safetensors' own error
            run_sft("--training.output_dir", str(out), *SHORT, "--model.path", str(model), "--overwrite")
    assert contents(out) == before, "the earlier run is as it was"
    earlier = len({path.name for path in out.iterdir()} - {RUN_FILE})
    rerun = run_sft("--training.output_dir", str(out), *SHORT, "--overwrite").stdout
    removed = rerun.index(f"sftkit: --overwrite: removed {earlier} item(s) of the earlier run in {out}")
    assert rerun.index("sftkit: full fine-tuning") < removed < rerun.index("step 1/3")


def test_overwrite_keeps_the_earlier_runs_saved_config_where_this_run_reads_it(finished, tmp_path, monkeypatch, capsys):
    """A finished run's sftkit_config.yaml, run again with a change into the same output_dir: --overwrite removed the
    config the run was reading, so after a stop the resume command failed with "config file not found". So with the
    chat template it published, given as the new run's dataset.chat_template."""
    from test_monitor import signal_at

    out = copy_of(finished, tmp_path)
    saved = out / "sftkit_config.yaml"
    again = ["--training.output_dir", str(out), "--training.max_steps", "5", "--training.save_strategy", "steps",
             "--training.save_steps", "2", "--training.learning_rate", "1e-3",
             "--dataset.chat_template", str(out / "chat_template.jinja")]
    signal_at(monkeypatch, "on_step_begin", 3)
    with pytest.raises(Interrupted, match=f"stopped by SIGTERM at step 3 of 5; checkpoint saved in {out}/checkpoint-3"):
        train(load_config(str(saved), again), overwrite=True)
    assert re.search(rf"--overwrite: removed \d+ item\(s\) of the earlier run in {out}; kept chat_template.jinja "
                     r"\(this run's chat template\), sftkit_config.yaml \(this run's config\)\n",
                     capsys.readouterr().out)
    monkeypatch.undo()
    resumed = train(load_config(str(saved), [*again, "--training.resume_from_checkpoint", "true"]))
    assert resumed.trainer.state.global_step == 5 and "learning_rate: 0.001" in saved.read_text()


def test_a_ctrl_c_before_training_began_keeps_the_earlier_run_and_offers_none_of_its_checkpoints(finished, tmp_path,
                                                                                                  monkeypatch):
    """It said "Resume with: ... true" about the checkpoints of the run --overwrite was to replace."""
    import sftkit.train

    out = copy_of(finished, tmp_path)
    before = contents(out)

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sftkit.train, "tokenizer_and_data", interrupted)
    with pytest.raises(Interrupted, match=f"^stopped at once, before training began: this run wrote nothing in {out}$"):
        train(config(out, "--training.learning_rate", "1e-4"), overwrite=True)
    assert contents(out) == before


def test_overwrite_goes_on_past_an_item_of_the_earlier_run_that_is_gone_when_training_begins(finished, tmp_path):
    """The items are listed as the run starts and removed minutes later: one removed meanwhile stopped the removal
    half-way with a traceback, after the loading."""
    out = copy_of(finished, tmp_path)
    output = OutputDir(out, config(out, "--training.learning_rate", "1e-4").resolved)
    output.claim(overwrite=True, resume=None)
    shutil.rmtree(out / "checkpoint-2")
    output.begin(main=True)
    output.lock.release()
    assert {path.name for path in out.iterdir()} == {RUN_FILE}


def test_a_signal_while_the_trainer_sets_up_keeps_the_earlier_run(finished, tmp_path, monkeypatch):
    """The Trainer catches signals only once its setup is done (tens of seconds under DeepSpeed): a SIGTERM before
    that, once --overwrite had removed the earlier run, killed the run with nothing of either left."""
    import signal

    from sftkit.monitor import StopGuard

    out = copy_of(finished, tmp_path)
    before = contents(out)
    install = StopGuard.install

    def install_then_signal(guard):
        install(guard)
        os.kill(os.getpid(), signal.SIGTERM)  # as the scheduler's, right after sftkit catches it

    monkeypatch.setattr(StopGuard, "install", install_then_signal)
    handler = signal.getsignal(signal.SIGTERM)  # the default, or what a Trainer of an earlier test left installed
    with pytest.raises(Interrupted, match=f"^stopped by SIGTERM before training began: this run wrote nothing in "
                                          f"{out}$") as stop:
        train(config(out, "--training.learning_rate", "1e-4"), overwrite=True)
    assert stop.value.exit_code == 143 and contents(out) == before
    assert signal.getsignal(signal.SIGTERM) == handler, "the run gave the signal back"


def test_a_ctrl_c_as_overwrite_moves_the_earlier_run_aside_puts_it_all_back(finished, tmp_path, monkeypatch):
    """The stop was only noted, the earlier run deleted, and the run then stopped before its first step: neither run
    was left (helper-77). Seen before anything is deleted, it moves every file back."""
    import signal
    from pathlib import Path

    out = copy_of(finished, tmp_path)
    before = contents(out)
    rename = Path.rename

    def interrupted_as_it_moves(self, target):
        if "checkpoint-2" in str(target) and ".sftkit-replaced" in str(target):
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, as the run's guard receives it
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", interrupted_as_it_moves)
    with pytest.raises(Interrupted, match=f"^stopped by SIGINT before training began, as --overwrite moved the "
                                          f"earlier run aside: every file of it is back in {out}$"):
        train(config(out, "--training.learning_rate", "1e-4"), overwrite=True)
    monkeypatch.undo()
    assert contents(out) == before and json.loads((out / RUN_FILE).read_text())["status"] == "finished"


def test_a_stop_while_overwrite_removes_the_earlier_run_never_leaves_its_finished_record(finished, tmp_path,
                                                                                         monkeypatch):
    """The earlier run's record ("finished") went last: a stop in between left it beside half its files."""
    import sftkit.rundir

    out = copy_of(finished, tmp_path)
    removing = sftkit.rundir.shutil.rmtree

    def stopped_after_one(path, *args, **kwargs):
        removing(path, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(sftkit.rundir.shutil, "rmtree", stopped_after_one)
    with pytest.raises(Interrupted):
        train(config(out, "--training.learning_rate", "1e-4"), overwrite=True)
    monkeypatch.undo()
    record = json.loads((out / RUN_FILE).read_text())
    assert record["status"] == "interrupted" and record["config"]["training"]["learning_rate"] == 1e-4
    assert train(config(out, "--training.learning_rate", "1e-4"), overwrite=True).summary["steps"] == 3


@pytest.mark.parametrize("how", ["overwrite", "resume"])
def test_a_new_model_keeps_the_users_files_even_under_names_like_a_runs(finished, tmp_path, how):
    """The export removed an earlier export's files by pattern (model*.safetensors*, adapter_*): a backup such as
    model.safetensors.bak, made before a run that replaces the model, went with them, and a folder adapter_v1 failed
    the publish."""
    out = copy_of(finished, tmp_path)
    (out / "checkpoint-best").mkdir()
    (out / "checkpoint-best" / "note.txt").write_text("mine")
    (out / "tokenizer_experiments").mkdir()
    (out / "adapter_v1").mkdir()
    users = ["my_embeddings.safetensors", "model.safetensors.bak", "model-v1.safetensors", "adapter_notes.txt",
             "pytorch_model_old.pt", "pytorch_model.bin", "adapter_config.json", "adapter_model.safetensors"]
    for name in users:
        (out / name).write_bytes(b"mine")
    if how == "overwrite":
        train(config(out, "--training.max_steps", "2"), overwrite=True)
    else:
        train(config(out, "--training.max_steps", "4", "--training.resume_from_checkpoint", "true"))
    assert (out / "checkpoint-best" / "note.txt").read_text() == "mine"
    assert all((out / name).read_bytes() == b"mine" for name in users)
    assert (out / "tokenizer_experiments").is_dir() and (out / "adapter_v1").is_dir()
    assert json.loads((out / "run_summary.json").read_text())["steps"] == (2 if how == "overwrite" else 4)
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"


@pytest.mark.parametrize("how", ["overwrite", "resume from a path"])
def test_a_directory_without_a_run_record_is_never_written_over(finished, tmp_path, how):
    """A downloaded model, or one an older tool wrote: sftkit did not write it, so --overwrite may not remove it, and
    neither may a resumed run's export replace it."""
    out = tmp_path / "out"
    shutil.copytree(TINY_MODEL, out)
    (out / "README.md").write_text("the model card of a model I downloaded")
    before = contents(out)
    overrides = ["--training.resume_from_checkpoint", str(finished / "checkpoint-3")] if how != "overwrite" else []
    with pytest.raises(ConfigError, match=rf"training.output_dir {out} holds files sftkit did not write there "
                                          r"\(README.md, chat_template.jinja, config.json, generation_config.json "
                                          r"and 3 more\), under the names a run writes; move them elsewhere or choose "
                                          r"another training.output_dir"):
        train(config(out, *overrides), overwrite=how == "overwrite")
    assert contents(out) == before


@pytest.mark.parametrize("resume", ["true", "auto"])
def test_checkpoints_of_a_run_with_other_settings_are_never_resumed(finished, tmp_path, resume):
    """`auto` (a requeued job's resume) is true where output_dir holds checkpoints: never a fresh start over them."""
    out = copy_of(finished, tmp_path)
    other = config(out, "--training.learning_rate", "1e-3", "--training.resume_from_checkpoint", resume)
    with pytest.raises(ConfigError, match=r"checkpoint-3 belongs to a run with other settings \(training.learning_rate "
                                          r"0.001 \(that run: 0.003\)\)"):
        train(other)
    fresh = config(out, "--training.learning_rate", "1e-3")
    with pytest.raises(ConfigError, match=r"its checkpoints belong to a run with other settings \(training.learning_rate"):
        train(fresh)


def test_the_same_run_resumes_with_a_longer_schedule(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    summary = train(config(out, "--training.max_steps", "4", "--training.resume_from_checkpoint", "true")).summary
    assert summary["steps"] == 4
    assert f"resumes from {out}/checkpoint-3; at the end its model replaces the one in {out}" in capsys.readouterr().out


def test_a_checkpoint_saved_just_before_a_crash_is_resumed(finished, tmp_path):
    """The Trainer saves a checkpoint (and rotates the older ones away) before sftkit writes its run record into it:
    a crash in between leaves the newest checkpoint without one, which the output_dir's record vouches for."""
    out = copy_of(finished, tmp_path)
    (out / "checkpoint-3" / RUN_FILE).unlink()
    longer = config(out, "--training.max_steps", "4", "--training.resume_from_checkpoint", "true")
    assert checkpoint_to_resume(True, out, longer.resolved, 1) == str(out / "checkpoint-3")
    assert train(longer).trainer.state.global_step == 4


def test_a_run_into_a_directory_in_use_stops_at_once_and_a_dead_runs_lock_does_not_block(tmp_path):
    out = tmp_path / "out"
    # A schedule it cannot finish before the kill, however fast the machine: its lock must still be there.
    first = subprocess.Popen([sys.executable, "sft.py", "--training.output_dir", str(out), "--training.max_steps", "100000",
                              "--training.logging_steps", "1"], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in first.stdout:
        if "step 1/" in line:
            break
    started = time.perf_counter()
    second = run_sft("--training.output_dir", str(out), "--training.max_steps", "3", check=False)
    error = one_line_error(second)
    assert f"training.output_dir {out} is in use by another run (process {first.pid} on" in error
    assert time.perf_counter() - started < 30
    assert first.poll() is None, "the first run ended before it could be killed"
    first.kill()  # SIGKILL: no chance to remove its lock
    first.communicate()
    assert (out / LOCK_FILE).exists()
    preview = run_sft("--training.output_dir", str(out), "--overwrite", "--dry-run")
    assert "taking over" not in preview.stdout + preview.stderr and (out / LOCK_FILE).exists()  # it takes nothing

    third = run_sft("--training.output_dir", str(out), "--training.max_steps", "2", "--overwrite")
    assert f"taking over {out / LOCK_FILE}: its process {first.pid} no longer runs" in third.stdout
    assert (out / "config.json").exists() and not (out / LOCK_FILE).exists()


@pytest.fixture
def read_only_dir(tmp_path):
    with tmpfs(tmp_path / "read-only", "ro,size=1m") as directory:
        yield directory


@pytest.mark.parametrize(("where", "expected"), [("file", "is a file, not a directory"),
                                                 ("file/out", "cannot be written: Not a directory"),
                                                 ("read-only/out", "cannot be written: Read-only file system")])
def test_an_output_dir_that_cannot_be_written_fails_before_anything_loads(tmp_path, where, expected, request):
    if where.startswith("read-only"):
        request.getfixturevalue("read_only_dir")
    (tmp_path / "file").write_text("x")
    out = tmp_path / where
    started = time.perf_counter()
    error = one_line_error(run_sft("--training.output_dir", str(out), check=False))
    assert f"training.output_dir {out} {expected}" in error
    assert time.perf_counter() - started < 30


def test_a_failed_attempt_that_saved_nothing_can_simply_be_run_again(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="max_seq_length"):
        train(config(out, "--model.max_seq_length", "4"))  # every row is cut away: fails after claiming output_dir
    assert not list(out.iterdir()), "a run that failed before training began leaves output_dir as it found it"
    assert train(config(out)).summary["steps"] == 3


def test_data_edited_while_the_run_trains_is_not_taken_for_the_data_it_trained_on(tmp_path, monkeypatch):
    """Each checkpoint's record digested the data file as it was when the checkpoint was saved: the next version of
    the data, written in place during a run, was recorded as what steps 1 to 3 trained on, and the resume onto it
    was accepted without a word."""
    from sftkit.checkpoints import RecordRunInCheckpoints

    data = tmp_path / "chat.jsonl"
    shutil.copy(REPO / "data" / "sample_chat.jsonl", data)
    saved = RecordRunInCheckpoints.on_save

    def next_version_written_after_the_first_save(self, args, state, control, **kwargs):
        saved(self, args, state, control, **kwargs)
        if state.global_step == 1:
            data.write_text("".join(data.read_text().splitlines(keepends=True)[:160]))

    monkeypatch.setattr(RecordRunInCheckpoints, "on_save", next_version_written_after_the_first_save)
    out = tmp_path / "out"
    run = ["--dataset.name", str(data), "--training.save_strategy", "steps", "--training.save_steps", "1"]
    train(config(out, *run))
    resume = config(out, *run, "--training.max_steps", "5", "--training.resume_from_checkpoint", "true")
    with pytest.raises(ConfigError, match=f"checkpoint-3 was trained on other contents of {re.escape(str(data))} "):
        checkpoint_to_resume(True, out, resume.resolved, 1)


def test_data_written_while_the_run_reads_it_stops_the_run(tmp_path, monkeypatch):
    """The main process prepares the data first and the others read it after: a file written in between gave them
    other rows, without a word (and a hang where the row count changed)."""
    import sftkit.train

    data = tmp_path / "chat.jsonl"
    shutil.copy(REPO / "data" / "sample_chat.jsonl", data)
    prepared = sftkit.train.tokenizer_and_data

    def next_version_written_meanwhile(config):
        read = prepared(config)
        data.write_text("".join(data.read_text().splitlines(keepends=True)[:160]))
        return read

    monkeypatch.setattr(sftkit.train, "tokenizer_and_data", next_version_written_meanwhile)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"^{re.escape(str(data))} changed while the run read it: the rows trained "
                                          "could mix two versions; run again once the files are written$"):
        train(config(out, "--dataset.name", str(data)))
    assert not (out / LOCK_FILE).exists() and not (out / "config.json").exists()


def test_overwrite_and_resume_together_are_refused_before_anything_is_removed(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    before = contents(out)
    with pytest.raises(ConfigError, match="--overwrite removes the checkpoints that training.resume_from_checkpoint"):
        train(config(out, "--training.resume_from_checkpoint", "true"), overwrite=True)
    assert contents(out) == before


@pytest.mark.parametrize("changed", ["data", "a file of a glob", "model", "tokenizer"])
def test_a_resume_onto_changed_data_or_base_weights_is_refused(tmp_path, changed):
    """The config names the files; a resume after they were rewritten would train something else under the same
    config, and replace the finished model with it. A hidden file beside the data (an editor's autosave) is not
    the data."""
    data, model = tmp_path / "data" / "chat.jsonl", tmp_path / "model"
    data.parent.mkdir()
    shutil.copy(REPO / "data" / "sample_chat.jsonl", data)
    shutil.copytree(TINY_MODEL, model)
    out = tmp_path / "out"
    run = ["--dataset.name", str(tmp_path / "data" / "*.jsonl") if changed == "a file of a glob" else str(data),
           "--model.path", str(model), "--training.save_strategy", "steps", "--training.save_steps", "2"]
    train(config(out, *run))
    resume = config(out, *run, "--training.max_steps", "5", "--training.resume_from_checkpoint", "true")
    (tmp_path / "data" / ".chat.jsonl.swp").write_text("{}")
    assert checkpoint_to_resume(True, out, resume.resolved, 1) == str(out / "checkpoint-3")  # the files as they were
    if changed in ("data", "a file of a glob"):
        rows = data.read_text().splitlines()
        data.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # the same rows, in another order
        name = str(data) if changed == "data" else f"{tmp_path / 'data' / '*.jsonl'}:chat.jsonl"
    elif changed == "tokenizer":
        settings = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 64}))
        name = f"{model}/tokenizer_config.json"
    else:
        from safetensors.torch import load_file, save_file

        weights = load_file(model / "model.safetensors")
        weights[next(iter(weights))] += 0.01
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
        name = f"{model}/model.safetensors"
    with pytest.raises(ConfigError, match=f"^training.resume_from_checkpoint: {out}/checkpoint-3 was trained on "
                                          f"other contents of {re.escape(name)} \\(changed, added or removed since\\); "
                                          "resume with the files as they were, or start afresh with --overwrite "
                                          "--training.resume_from_checkpoint null$"):
        checkpoint_to_resume(True, out, resume.resolved, 1)


@pytest.mark.slow
def test_a_hub_base_model_updated_since_the_run_began_is_not_resumed_onto(tmp_path):
    """With model.revision null (main), a hub repository updated upstream gave a resumed LoRA run another base model,
    silently: its first steps trained against one, its last against the other, and it merged into the new one. The
    run now pins the commit main pointed at: in its saved config, its fingerprint and the adapter's revision. The hub
    here is a local cache (HF_HUB_OFFLINE) whose main moves as an update moves it."""
    repo = tmp_path / "hf" / "hub" / "models--fakeorg--tiny"
    first, second = "a" * 40, "b" * 40
    for commit in (first, second):
        shutil.copytree(TINY_MODEL, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(first)
    env, out = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}, tmp_path / "out"
    run = ["sft.py", "configs/lora_train_config.yaml", "--model.path", "fakeorg/tiny", "--training.output_dir", str(out),
           "--training.save_strategy", "steps", "--training.save_steps", "2"]
    run_python(*run, "--training.max_steps", "2", env=env)
    assert f"revision: {first}" in (out / "sftkit_config.yaml").read_text()
    assert json.loads((out / "lora_weights" / "adapter_config.json").read_text())["revision"] == first
    (repo / "refs" / "main").write_text(second)  # the repository was updated
    resume = [*run, "--training.max_steps", "4", "--training.resume_from_checkpoint", "true", "--dry-run"]
    refused = run_python(*resume, env=env, check=False)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1] == (
        f"sft.py: error: training.resume_from_checkpoint: {out}/checkpoint-2 belongs to a run with other settings "
        f"(model.revision {second} (that run: {first})); resume with that run's settings (only the run length, "
        "logging, saving and evaluation may change), or start afresh with --overwrite "
        "--training.resume_from_checkpoint null")
    planned = run_python(*resume, "--model.revision", first, env=env).stdout
    assert f"resumes from {out}/checkpoint-2" in planned


def test_a_checkpoint_recorded_before_hub_models_were_pinned_still_resumes(tmp_path):
    """Its record holds the revision as written (null): the pinned commit now in the config never matched it, and
    no --model.revision could (null and main are pinned again)."""
    from sftkit.runrecord import same_settings

    written = config(tmp_path / "out").resolved  # a local model: no revision, as a hub model's before pinning
    pinned = {**written, "model": {**written["model"], "revision": "a" * 40}}
    other = {**written, "model": {**written["model"], "revision": "b" * 40}}
    assert same_settings({"fingerprint": fingerprint(written), "config": written}, pinned)
    assert not same_settings({"fingerprint": fingerprint(other), "config": other}, pinned)


def test_a_checkpoint_recorded_before_a_setting_was_added_resumes_while_it_holds_its_default(tmp_path):
    """dataset.split_user_turns came with 2026-11-29: every record written before lacks it, and its run could not
    be resumed with the same config ("dataset.split_user_turns False (that run: None)"), only thrown away."""
    from sftkit.runrecord import config_differences, same_settings

    now = config(tmp_path / "out").resolved
    written = {**now, "dataset": {key: value for key, value in now["dataset"].items() if key != "split_user_turns"}}
    record = {"fingerprint": fingerprint(written), "config": written}
    assert same_settings(record, now) and config_differences(now, written) == []
    split = {**now, "dataset": {**now["dataset"], "split_user_turns": True}}
    assert not same_settings(record, split)
    assert config_differences(split, written) == ["dataset.split_user_turns True (that run: None)"]


def test_resuming_an_earlier_checkpoint_than_the_newest_is_refused_before_it_saves_over_the_later_ones(finished,
                                                                                                     tmp_path):
    out = copy_of(finished, tmp_path)
    before = contents(out)
    resume = ["--training.save_strategy", "steps", "--training.save_steps", "2", "--training.max_steps", "6"]
    error = one_line_error(run_sft("--training.output_dir", str(out), *SHORT, *resume,
                                   "--training.resume_from_checkpoint", str(out / "checkpoint-2"), check=False))
    assert error.endswith(f"training.resume_from_checkpoint {out / 'checkpoint-2'} is older than checkpoint-3 in "
                          f"{out}, which this run would save over as it reaches their steps; move them out of {out} "
                          "to go back to step 2, or resume with true (from checkpoint-3)")
    assert contents(out) == before
    shutil.copytree(out / "checkpoint-2", tmp_path / "best")  # a copy under another name: its step from its state
    assert "is older than checkpoint-3" in one_line_error(run_sft(
        "--training.output_dir", str(out), *SHORT, *resume, "--training.resume_from_checkpoint", str(tmp_path / "best"),
        "--dry-run", check=False))
    shutil.move(out / "checkpoint-3", tmp_path / "checkpoint-3")  # as the error says
    assert run_sft("--training.output_dir", str(out), *SHORT, *resume, "--training.resume_from_checkpoint",
                   str(out / "checkpoint-2")).returncode == 0


@pytest.mark.parametrize("model", ["", "checkpoint-3"], ids=["its model", "its checkpoint"])
def test_a_model_inside_output_dir_is_refused_before_overwrite_removes_it(finished, tmp_path, model):
    """Fine-tuning a finished run's model again into its own directory: --overwrite removed the model (or the
    checkpoint) before it was loaded."""
    out = copy_of(finished, tmp_path)
    before = contents(out)
    for extra in ([], ["--overwrite"], ["--overwrite", "--dry-run"]):
        error = one_line_error(run_sft("--model.path", str(out / model), "--training.output_dir", str(out), *SHORT,
                                       *extra, check=False))
        assert error.endswith(f"model.path {out / model} lies in training.output_dir {out}, where this run writes its "
                              "model; choose another training.output_dir (the model in model.path stays as it is)")
    assert contents(out) == before


def test_a_finished_run_whose_newest_checkpoint_is_behind_its_model_is_never_resumed_from_it(finished, tmp_path):
    """Stopped by SIGTERM at step 2 (its checkpoint), resumed to its end without saving again: the rerun advised
    training longer from checkpoint-2, and the printed resume command, run again by a requeued job, trained step 3
    again and published it over the finished model."""
    out = copy_of(finished, tmp_path)
    shutil.rmtree(out / "checkpoint-3")
    before = contents(out)
    rerun = one_line_error(run_sft("--training.output_dir", str(out), *SHORT, check=False))
    assert "; its newest checkpoint is behind its model, which trained to step 3: fine-tune that model further as " \
           f"model.path {out} into another training.output_dir, pass --overwrite to redo the run" in rerun
    for longer in ([], ["--training.max_steps", "6"]):
        resumed = one_line_error(run_sft("--training.output_dir", str(out), *SHORT, *longer,
                                         "--training.resume_from_checkpoint", "true", check=False))
        assert f"training.resume_from_checkpoint: {out / 'checkpoint-2'} is step 2, behind the model published in " \
               f"{out}, which trained to step 3: a resume would train step 3 again and replace it" in resumed
    assert contents(out) == before
    chosen = run_sft("--training.output_dir", str(out), *SHORT, "--training.max_steps", "4",
                     "--training.resume_from_checkpoint", str(out / "checkpoint-2"))  # a path is the user's choice
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 4 and chosen.returncode == 0


def test_a_finished_run_of_model_only_checkpoints_is_not_told_to_resume_them(tmp_path, capsys):
    """With training.save_only_model the summary said its checkpoints held the optimizer states, and running the
    command again advised a resume, which then failed and offered --overwrite: that deletes the finished model."""
    out = tmp_path / "out"
    only_model = ["--training.save_strategy", "steps", "--training.save_steps", "2", "--training.save_only_model",
                  "true"]
    capsys.readouterr()
    train(config(out, *only_model))
    assert "without what a resume needs: no resume continues the newest" in capsys.readouterr().out
    refused = one_line_error(run_sft("--training.output_dir", str(out), *SHORT, *only_model, check=False))
    assert "its newest checkpoint cannot be resumed: it holds the model alone, no optimizer or learning-rate " \
           "schedule state (training.save_only_model, or they were removed), so a resume would start both afresh: " \
           f"fine-tune that model further as model.path {out} into another training.output_dir" in refused
    assert "train it longer" not in refused


def test_the_dry_run_refuses_what_the_run_refuses_and_writes_nothing(finished, tmp_path):
    """The dry run checks output_dir and the checkpoint to resume as the run does, without creating, locking or
    removing anything, and says what the run would do there."""
    out = copy_of(finished, tmp_path)
    (out / "notes.txt").write_text("the user's own")
    before = contents(out)
    refused = one_line_error(run_sft("--dry-run", "--training.output_dir", str(out), *SHORT, check=False))
    run = one_line_error(run_sft("--training.output_dir", str(out), *SHORT, check=False))
    assert refused == run and "already holds a trained model" in refused
    # its checkpoint-3 is its last step: resuming as such would be refused, so the way is to train longer
    assert "train it longer with --training.resume_from_checkpoint true and a higher training.max_steps" in refused
    plan = run_sft("--dry-run", "--overwrite", "--training.output_dir", str(out), *SHORT).stdout
    assert f"output             {out} (--overwrite: as training begins, the run removes what the earlier run wrote: a trained " \
           "model (config.json" in plan
    assert plan.rstrip().endswith("; keeps files sftkit did not write (notes.txt))")  # as the run keeps them
    resume = ["--training.save_strategy", "steps", "--training.save_steps", "2", "--training.resume_from_checkpoint",
              "true"]
    assert "is step 3, at or past the end of this run (training.max_steps 3): nothing is left to train" in one_line_error(
        run_sft("--dry-run", "--training.output_dir", str(out), *SHORT, *resume, check=False))
    plan = run_sft("--dry-run", "--training.output_dir", str(out), *SHORT, *resume, "--training.max_steps", "5").stdout
    assert plan.rstrip().endswith(f"; resumes from {out / 'checkpoint-3'}")
    for refused_here in (["--training.resume_from_checkpoint", str(tmp_path / "none")],
                         ["--training.resume_from_checkpoint", "true", "--overwrite"]):
        assert "Traceback" not in one_line_error(run_sft("--dry-run", "--training.output_dir", str(out), *SHORT,
                                                         *refused_here, check=False))
    assert contents(out) == before and not (out / LOCK_FILE).exists()
    (tmp_path / "a-file").write_text("notes")
    assert one_line_error(run_sft("--dry-run", "--training.output_dir", str(tmp_path / "a-file"), check=False)) \
        .endswith("is a file, not a directory; choose a directory path")
    plan = run_sft("--dry-run", "--training.output_dir", str(tmp_path / "new"), *SHORT).stdout
    assert f"output             {tmp_path / 'new'} (new)" in plan and not (tmp_path / "new").exists()
    running = RunLock(out)
    running.take()  # a live run's lock (this process's)
    try:
        assert "is in use by another run (process" in one_line_error(
            run_sft("--dry-run", "--overwrite", "--training.output_dir", str(out), *SHORT, check=False))
    finally:
        running.release()


RACER = """
import errno, os, sys, time
from pathlib import Path
from sftkit.errors import ConfigError, Interrupted
from sftkit.runlock import RunLock
out, start = Path(sys.argv[1]), Path(sys.argv[2])
if sys.argv[3:] == ["no-hard-links"]:  # as gcsfuse, s3fs, blobfuse2 and FAT answer link()
    def link(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")
    os.link = link
print("ready", flush=True)
while not start.exists():
    time.sleep(0.0005)
try:
    RunLock(out).take()
    print("took", flush=True)
    time.sleep(3)  # holding it while the others try
except ConfigError as error:
    print("refused", error, flush=True)
"""


@pytest.mark.parametrize("filesystem", ["", "no-hard-links"])
def test_of_several_runs_finding_the_same_stale_lock_only_one_takes_it_over(tmp_path, filesystem):
    """Where the filesystem has no hard links (a bucket mounted with gcsfuse or s3fs, a FAT disk), every run ended at
    the lock in a PermissionError traceback, while the dry run said output_dir was fine."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                             "since": time.time()}))
    start = tmp_path / "start"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(out), str(start), filesystem], cwd=REPO, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(8)]
    assert all(racer.stdout.readline() == "ready\n" for racer in racers)  # each waits at the line
    start.touch()
    outcomes = [racer.communicate(timeout=120)[0] for racer in racers]
    took = [outcome for outcome in outcomes if "took" in outcome.splitlines()[-1]]
    assert len(took) == 1, outcomes
    assert all("is in use by another run" in outcome for outcome in outcomes if outcome not in took), outcomes


def test_a_lock_read_empty_while_its_run_writes_it_is_not_taken_over(tmp_path):
    """Without hard links the lock is created empty and then written (RunLock._create_exclusively): a run reading it
    in between took it for a dead run's and took it over, and two runs trained into one output_dir."""
    import threading

    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text("")  # created by the other run, which writes who it is a moment later
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    threading.Timer(0.3, (out / LOCK_FILE).write_text, [json.dumps(holder)]).start()
    with pytest.raises(ConfigError, match="is in use by another run"):
        RunLock(out).take()


def test_the_export_of_float32_weights_needs_room_for_them_and_one_shard_cast_beside_them():
    """The cast replaces one 50 GB shard at a time: a 20B model trained in float32 weights and published in bf16
    peaks at 80 GB plus 25 GB, not at 80 GB plus the whole 40 GB bf16 model (refused with room to spare before)."""
    import torch

    from sftkit.weightfiles import export_bytes

    def needed(parameters):
        return export_bytes(parameters, parameters, torch.bfloat16, lora=False, weights=torch.float32) / 1e9

    assert needed(10**9) == pytest.approx(6 * 1.02, abs=0.01)  # below one shard: float32 and the whole bf16 copy
    assert needed(20 * 10**9) == pytest.approx((80 + 25) * 1.02, abs=0.01)
    assert export_bytes(10**9, 10**9, torch.bfloat16, lora=False) / 1e9 == pytest.approx(2 * 1.02, abs=0.01)


@pytest.mark.parametrize(("job", "restart", "taken"), [("4242", "1", True), ("4242", None, False), ("77", "1", False),
                                                        (None, None, False)])
def test_a_requeued_slurm_job_takes_over_the_lock_its_last_run_left_on_another_node(tmp_path, monkeypatch, capsys,
                                                                                       job, restart, taken):
    """A node that fails (not a signal: the lock stays) is requeued by Slurm onto other nodes, where the lock of its
    last run cannot be checked: every relaunch was refused as "in use by another run". Any other holder on another
    machine still is."""
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_FILE).write_text(json.dumps({"pid": 999999, "host": "node-that-failed", "since": time.time(),
                                             "slurm_job": "4242", "slurm_restart": 0}))
    for name, value in (("SLURM_JOB_ID", job), ("SLURM_RESTART_COUNT", restart)):
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    run = RunLock(out)
    if taken:
        run.take()
        assert json.loads((out / LOCK_FILE).read_text())["slurm_restart"] == 1
        assert f"taking over {out / LOCK_FILE}: Slurm requeued its job 4242, which this is" in capsys.readouterr().out
        run.release()
    else:
        with pytest.raises(ConfigError, match="is in use by another run \\(process 999999 on node-that-failed"):
            run.take()


def test_auto_on_a_finished_run_has_nothing_to_do_and_resumes_a_longer_one(finished, tmp_path, capsys):
    """A scheduler relaunches a job whose run finished as it was stopped: `true` was refused (nothing left to train)
    and the job ended failed. A longer schedule of the same run is resumed."""
    out = copy_of(finished, tmp_path)
    before = contents(out)
    with pytest.raises(AlreadyFinished, match=f"training.output_dir {out} already holds this run's finished model "
                                              r"\(step 3\): nothing is left to train"):
        train(config(out, "--training.save_strategy", "steps", "--training.save_steps", "2",
                      "--training.resume_from_checkpoint", "auto"))
    assert contents(out) == before
    with pytest.raises(ConfigError, match="--overwrite removes the checkpoints that training.resume_from_checkpoint "
                                          "would continue"):  # told to redo it: not "nothing to do"
        train(config(out, "--training.resume_from_checkpoint", "auto"), overwrite=True)
    longer = train(config(out, "--training.save_strategy", "steps", "--training.save_steps", "2",
                          "--training.max_steps", "4", "--training.resume_from_checkpoint", "auto"))
    assert longer.summary["steps"] == 4 and f"resumes from {out}/checkpoint-3" in capsys.readouterr().out
    # the way out the refusal names, after a script's auto: a fresh start
    assert train(config(out, "--training.resume_from_checkpoint", "auto", "--training.resume_from_checkpoint", "null"),
                 overwrite=True).summary["steps"] == 3


def test_overwrite_removes_only_what_the_run_wrote_as_it_wrote_it(finished, tmp_path):
    """It went by names: a README.md the user wrote over the model card, and a runs/ folder of their own (the run
    logged to no TensorBoard), were removed as the earlier run's, and the message said only notes.txt was kept."""
    out = copy_of(finished, tmp_path)
    (out / "README.md").write_text("# my project notes\n")
    (out / "runs" / "exp1").mkdir(parents=True)
    (out / "runs" / "exp1" / "log.txt").write_text("log\n")
    before = contents(out)
    with pytest.raises(ConfigError, match=r"holds files sftkit did not write there \(runs\) and files changed since "
                                          r"the run wrote them \(README.md\), under the names a run writes; move "
                                          r"them elsewhere"):
        train(config(out, "--training.max_steps", "2"), overwrite=True)
    assert contents(out) == before
    shutil.rmtree(out / "runs")
    (out / "README.md").unlink()
    train(config(out, "--training.max_steps", "2"), overwrite=True)  # what is left is the earlier run's, as written
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 2


def test_a_run_directory_copied_without_its_modification_times_is_still_the_runs(finished, tmp_path):
    """cp -r (or rsync without -t, most backup restores) gives every file a new modification time: every file the run
    wrote looked changed since, and the copy could be neither resumed nor overwritten ("holds files sftkit did not
    write"). A file whose contents changed in the copy is still refused."""
    edited = tmp_path / "edited"
    shutil.copytree(finished, edited, copy_function=shutil.copy)  # contents and modes, not times
    card = (edited / "README.md").read_bytes()
    (edited / "README.md").write_bytes(bytes([card[0] ^ 1]) + card[1:])  # the same size
    before = contents(edited)
    longer = ["--training.max_steps", "4", "--training.resume_from_checkpoint", "true"]
    with pytest.raises(ConfigError, match=rf"^training.output_dir {edited} holds files changed since the run wrote "
                                          r"them \(README.md\), under the names a run writes; move them elsewhere"):
        train(config(edited, *longer))
    assert contents(edited) == before
    out = tmp_path / "out"
    shutil.copytree(finished, out, copy_function=shutil.copy)
    assert (out / "config.json").stat().st_mtime_ns != (finished / "config.json").stat().st_mtime_ns
    assert "removes what the earlier run wrote" in output_dir_plan(config(out), overwrite=True)
    assert train(config(out, *longer)).summary["steps"] == 4


@pytest.mark.parametrize("whose", ["made by hand", "of a run with other settings"])
def test_overwrite_never_removes_a_checkpoint_the_earlier_run_did_not_save(finished, tmp_path, whose):
    """Every checkpoint-N went as the earlier run's: a checkpoint-99 the user made, or one copied in from another
    run, was removed by --overwrite, and the dry run said it would be."""
    out = copy_of(finished, tmp_path)
    if whose == "made by hand":
        name = "checkpoint-99"
        (out / name).mkdir()
        (out / name / "notes.txt").write_text("my notes")
    else:
        name = "checkpoint-1"  # a step the earlier run passed: its record, not its number, tells
        shutil.copytree(out / "checkpoint-2", out / name)
        other = config(out, "--training.learning_rate", "1e-3").resolved
        record = json.loads((out / name / RUN_FILE).read_text())
        (out / name / RUN_FILE).write_text(json.dumps({**record, "fingerprint": fingerprint(other), "config": other}))
    before = contents(out)
    fresh = config(out, "--training.max_steps", "2")
    with pytest.raises(ConfigError) as planned:
        output_dir_plan(fresh, overwrite=True)
    with pytest.raises(ConfigError) as run:
        train(fresh, overwrite=True)
    assert str(planned.value) == str(run.value) == (
        f"training.output_dir {out} holds files sftkit did not write there ({name}), under the names a run writes; "
        "move them elsewhere or choose another training.output_dir")
    assert contents(out) == before


def test_overwrite_never_removes_files_added_to_the_earlier_runs_checkpoints(finished, tmp_path):
    """--overwrite removed each checkpoint whole: eval notes put beside a checkpoint's weights went with it. Each
    checkpoint's record lists what the Trainer saved there."""
    out = copy_of(finished, tmp_path)
    (out / "checkpoint-2" / "eval_notes.txt").write_text("step 2 was the best")
    before = contents(out)
    fresh = config(out, "--training.max_steps", "2")
    said = (f"training.output_dir {out}: --overwrite would remove the earlier run's checkpoints, which hold files it "
            "did not save (checkpoint-2/eval_notes.txt); move them elsewhere first")
    with pytest.raises(ConfigError, match=re.escape(said)):
        output_dir_plan(fresh, overwrite=True)
    with pytest.raises(ConfigError, match=re.escape(said)):
        train(fresh, overwrite=True)
    assert contents(out) == before
    (out / "checkpoint-2" / "eval_notes.txt").unlink()
    # what another process saves there, which the main process may have listed before it was written, is the run's
    (out / "checkpoint-2" / "sftkit_loss_window_1.json").write_text("{}\n")
    assert train(fresh, overwrite=True).summary["steps"] == 2


def test_a_run_killed_as_it_trains_resumes_with_its_sample_replies_and_logs(tmp_path):
    """Killed (the OOM killer, a preemption) before its end recorded what it wrote, the run's own
    sample_replies.jsonl and TensorBoard logs counted as the user's files: neither a resume nor --overwrite went on.
    Killed again after a resume, they had grown since its start recorded them."""
    from conftest import run_python

    out = tmp_path / "out"
    script = tmp_path / "sft_killed.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(REPO)!r})
import sftkit.checkpoints
saved = sftkit.checkpoints.RecordRunInCheckpoints.on_save
def on_save(self, args, state, *rest, **kwargs):
    saved(self, args, state, *rest, **kwargs)
    if state.global_step in (2, 3):
        os._exit(137)
sftkit.checkpoints.RecordRunInCheckpoints.on_save = on_save
from sftkit.cli import main
raise SystemExit(main())
""")
    args = ["--training.output_dir", str(out), *SHORT, "--training.save_strategy", "steps", "--training.save_steps",
            "1", "--dataset.sample_prompts", "[Hi]", "--training.eval_strategy", "steps", "--training.eval_steps", "1",
            "--dataset.test_size", "16", "--training.max_steps", "4",
            "--training.report_to", "tensorboard"]
    assert run_python(str(script), *args, check=False).returncode == 137
    assert (out / "sample_replies.jsonl").is_file() and (out / "runs").is_dir()
    # killed again after a resume, once its start recorded them, and they grew since
    assert run_python(str(script), *args, "--training.resume_from_checkpoint", "true", check=False).returncode == 137
    resumed = run_sft(*args, "--training.resume_from_checkpoint", "true")
    assert "resumes from" in resumed.stdout and (out / "model.safetensors").is_file()


def immutable(*paths):
    """chattr +i: a file not even root may move or delete, as another user's files are to the user (the tests run as
    root, which every permission lets through)."""
    result = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True)
    if result.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root on a filesystem with chattr: {result.stderr}")
        pytest.skip(f"chattr +i needs root and a filesystem that has it: {result.stderr}")


def mutable(directory):
    """Every file there as it was (pytest deletes old temporary folders)."""
    subprocess.run(["chattr", "-R", "-i", str(directory)], check=True)


def test_overwrite_that_cannot_remove_an_item_of_the_earlier_run_removes_nothing(finished, tmp_path):
    """The items were deleted one by one: one that could not be (another user's, an immutable file, a busy mount)
    ended the run in a traceback with the earlier model deleted and its card, report and half its checkpoints left."""
    out = copy_of(finished, tmp_path)
    before, before_names = contents(out), [path.name for path in out.iterdir()]
    immutable(out / "loss.png")
    try:
        error = one_line_error(run_sft("--training.output_dir", str(out), *SHORT, "--overwrite", check=False))
    finally:
        mutable(out)
    assert error == (f"sft.py: error: --overwrite could not move {out}/loss.png aside (Operation not permitted), so it "
                     f"removed nothing: the earlier run in {out} is as it was; make its files yours to remove, or "
                     "choose another training.output_dir")
    assert contents(out) == before and sorted(path.name for path in out.iterdir()) == sorted(before_names)


def test_overwrite_that_cannot_delete_what_it_moved_aside_trains_and_says_where_it_is(finished, tmp_path, caplog):
    out = copy_of(finished, tmp_path)
    stuck = out / "checkpoint-2" / "trainer_state.json"
    immutable(stuck)
    try:
        run_sft("--training.output_dir", str(out), *SHORT, "--overwrite")
        aside = next(out.glob(".sftkit-replaced-*"))
        assert f"could not delete 1 of the earlier run's files, moved to {aside} (Operation not permitted: " \
               "checkpoint-2/trainer_state.json); delete that folder once it can be" in caplog.text
        assert [path.relative_to(aside) for path in aside.rglob("*") if path.is_file()] == \
               [stuck.relative_to(out)], "the rest went"
    finally:
        mutable(out)
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"


def test_what_an_overwrite_cut_short_moved_aside_is_the_earlier_runs_and_the_next_overwrite_removes_it(finished,
                                                                                                         tmp_path):
    """A kill while --overwrite moved the earlier run aside left .sftkit-replaced-*: sftkit called it the user's
    files, kept it on every --overwrite, and a run without --overwrite named it as files sftkit did not write."""
    out = copy_of(finished, tmp_path)
    aside = out / ".sftkit-replaced-k1ll3d"
    aside.mkdir()
    shutil.move(out / "model.safetensors", aside / "model.safetensors")
    refused = one_line_error(run_sft("--training.output_dir", str(out), *SHORT, check=False))
    assert "did not write" not in refused, refused
    assert "the earlier run's files an --overwrite cut short had moved aside (.sftkit-replaced-k1ll3d)" in refused
    run_sft("--training.output_dir", str(out), *SHORT, "--overwrite")
    assert not aside.exists() and (out / "model.safetensors").is_file()


def test_a_stopped_run_whose_checkpoints_cannot_be_resumed_is_told_to_fine_tune_their_weights(tmp_path, monkeypatch):
    """Run again, it was told to resume; the resume then said to start afresh with --overwrite, which deletes the
    weights the stop had said to fine-tune further."""
    from test_monitor import signal_at

    out = tmp_path / "out"
    alone = ["--training.save_strategy", "steps", "--training.save_steps", "1", "--training.save_only_model", "true"]
    signal_at(monkeypatch, "on_step_end", 2)
    with pytest.raises(Interrupted):
        train(config(out, *alone))
    monkeypatch.undo()
    fine_tune = f"fine-tune the weights of {out / 'checkpoint-2'} further as model.path into another " \
                "training.output_dir"
    again = one_line_error(run_sft("--training.output_dir", str(out), *SHORT, *alone, check=False))
    assert "none of its checkpoints can be resumed (checkpoint-2: it holds the model alone" in again
    assert f"): {fine_tune}, pass --overwrite" in again and "continue it" not in again
    resumed = one_line_error(run_sft("--training.output_dir", str(out), *SHORT, *alone,
                                     "--training.resume_from_checkpoint", "true", check=False))
    assert f"; {fine_tune}, or start afresh with --overwrite" in resumed


def test_a_checkpoint_linked_from_another_disk_is_refused_before_a_run_writes_through_the_link(finished, tmp_path):
    """It was not followed: a resume went back to an older checkpoint and saved its own of that step through the
    link, over the user's copy; --overwrite said it kept it, and wrote the new run's weights into it."""
    out = copy_of(finished, tmp_path)
    elsewhere = tmp_path / "bigger-disk" / "checkpoint-3"
    elsewhere.parent.mkdir()
    shutil.move(out / "checkpoint-3", elsewhere)
    (out / "checkpoint-3").symlink_to(elsewhere)
    kept = contents(elsewhere)
    for how in (["--training.resume_from_checkpoint", "true", "--training.max_steps", "4"], ["--overwrite"]):
        error = one_line_error(run_sft("--training.output_dir", str(out), *SHORT, *how, check=False))
        assert error == (f"sft.py: error: training.output_dir {out} holds checkpoint-3, a link to {elsewhere}, which "
                         "sftkit does not follow: a run would write its own checkpoint-3 through it; move that "
                         f"checkpoint back into {out}, or remove the link")
    assert contents(elsewhere) == kept


def test_overwrite_on_a_filesystem_that_renames_no_folder_holding_files_moves_them_one_by_one(finished, tmp_path,
                                                                                             monkeypatch):
    """gcsfuse (by default) renames no folder that holds files, with "Too many open files": --overwrite, which moves
    the earlier run aside whole, stopped at its first checkpoint and blamed the files' owner."""
    import errno
    import pathlib

    out = copy_of(finished, tmp_path)
    rename = pathlib.Path.rename

    def like_gcsfuse(path, target):
        if path.is_dir() and any(path.iterdir()):
            raise OSError(errno.EMFILE, "Too many open files", str(path))
        return rename(path, target)

    output = OutputDir(out, config(out, "--training.learning_rate", "1e-4").resolved)
    output.claim(overwrite=True, resume=None)
    monkeypatch.setattr(pathlib.Path, "rename", like_gcsfuse)
    output.begin(main=True)
    monkeypatch.undo()
    output.lock.release()
    assert {path.name for path in out.iterdir()} == {RUN_FILE}
