"""Resuming only from intact checkpoints of the same run: a damaged file is named in one line, and `true` falls back
to the newest intact checkpoint with a warning."""

import json
import shutil

import pytest
from conftest import run_sft
from transformers import TrainerCallback

import sftkit.train
from sftkit.checkpoints import damage
from sftkit.config import load_config
from sftkit.errors import ConfigError
from sftkit.layout import RUN_FILE
from sftkit.train import train

ARGS = ["--training.max_steps", "4", "--training.logging_steps", "1", "--dataset.test_size", "null",
        "--training.save_strategy", "steps", "--training.save_steps", "2"]


def config(out, *overrides):
    return load_config(None, ["--training.output_dir", str(out), *ARGS, *overrides])


@pytest.fixture(scope="module")
def with_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoints") / "out"
    train(config(out))
    return out


@pytest.fixture
def damaged(with_checkpoints, tmp_path):
    """A copy of the run whose newest checkpoint (checkpoint-4) has one file cut in half."""
    out = tmp_path / "out"
    shutil.copytree(with_checkpoints, out)

    def cut(name: str):
        file = out / "checkpoint-4" / name
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        return out
    return cut


@pytest.mark.parametrize(("name", "problem"), [
    ("model.safetensors", "model.safetensors is damaged: Error while deserializing header"),
    ("optimizer.pt", "optimizer.pt is damaged: truncated or not a complete archive"),
    ("trainer_state.json", "trainer_state.json is damaged: "),
])
def test_a_damaged_checkpoint_is_named_with_the_newest_intact_one(damaged, name, problem):
    out = damaged(name)
    assert problem in damage(out / "checkpoint-4")
    with pytest.raises(ConfigError, match=f"training.resume_from_checkpoint {out}/checkpoint-4: {problem}.*; resume "
                                          f"from {out}/checkpoint-2 instead"):
        train(config(out, "--training.resume_from_checkpoint", str(out / "checkpoint-4")))


def test_the_command_line_shows_one_line_for_a_damaged_checkpoint(damaged):
    out = damaged("optimizer.pt")
    result = run_sft("--training.output_dir", str(out), *ARGS, "--training.resume_from_checkpoint",
                     str(out / "checkpoint-4"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"sft.py: error: training.resume_from_checkpoint {out}/checkpoint-4: optimizer.pt is damaged")


def test_resume_true_falls_back_to_the_newest_intact_checkpoint_with_a_warning(damaged, capsys):
    out = damaged("optimizer.pt")
    record = out / RUN_FILE  # killed as it saved checkpoint-4 (how a checkpoint is damaged): the run did not finish
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "interrupted"}))
    run = train(config(out, "--training.resume_from_checkpoint", "true"))
    assert f"warning: skipping {out}/checkpoint-4: optimizer.pt is damaged" in capsys.readouterr().err
    logged = [entry["step"] for entry in run.trainer.state.log_history if "loss" in entry]
    assert logged == [1, 2, 3, 4] and run.summary["steps"] == 4  # steps 3 and 4 trained again from checkpoint-2


def test_no_file_of_the_run_or_its_checkpoints_holds_the_hub_token(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    token = "hf_" + "sEcReT" * 6
    out = tmp_path / "out"
    train(config(out, "--training.hub_token", token, "--dataset.system_prompt", f"key {token}"))
    files = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.name == "training_args.bin" for path in files) and list(out.glob("checkpoint-*/optimizer.pt"))
    assert [path for path in files if token.encode() in path.read_bytes()] == []
    assert __import__("os").environ["HF_TOKEN"] == token, "kept where huggingface_hub reads it for push_to_hub"


def test_resuming_a_finished_run_is_refused_instead_of_training_past_its_end(with_checkpoints, tmp_path):
    """checkpoint-4 is the last step of a 4-step run: transformers would train a step 5 of 4 and publish it over the
    finished model."""
    out = tmp_path / "out"
    shutil.copytree(with_checkpoints, out)
    model = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=f"{out}/checkpoint-4 is step 4, at or past the end of this run \\(training.max_steps "
                                          "4\\): nothing is left to train"):
        train(config(out, "--training.resume_from_checkpoint", "true"))
    assert (out / "model.safetensors").read_bytes() == model


def test_resuming_a_run_killed_during_its_export_says_to_finish_the_export_not_that_its_model_is_there(
        with_checkpoints, tmp_path):
    """A SIGKILL (the OOM killer, a scheduler) while the export wrote its staging directory: a relaunch said "Its model
    is in OUTPUT_DIR", which held none."""
    from sftkit.export import main as export_main
    from sftkit.layout import STAGING_DIR

    out = tmp_path / "my runs" / "out"  # the command it gives is shell-quoted
    shutil.copytree(with_checkpoints, out)
    (out / STAGING_DIR).mkdir()
    for name in ("model.safetensors", "config.json"):
        (out / name).rename(out / STAGING_DIR / name)
    for name in ("sftkit_config.yaml", "sftkit_versions.json", "README.md", "run_summary.json", "loss.png"):
        (out / name).unlink()  # the export writes them, the report later
    record = json.loads((out / RUN_FILE).read_text())
    (out / RUN_FILE).write_text(json.dumps({**record, "status": "exporting"}))  # as it stood when killed
    with pytest.raises(ConfigError, match=f"nothing is left to train. Its export did not finish, so {out} holds no "
                                          f"model yet: finish it with python -m sftkit.export '{out}'; to train longer"):
        train(config(out, "--training.resume_from_checkpoint", "auto"))
    assert export_main([str(out)]) == 0 and (out / "model.safetensors").is_file()
    again = load_config(str(out / "sftkit_config.yaml"), [])  # what `sftkit chat` and `compare` read
    assert (again.resolved["dataset"], again.training.max_steps) == (record["config"]["dataset"], 4)
    assert "torch_compile:" not in (out / "sftkit_config.yaml").read_text(), "what the fast path chose, it chooses again"


@pytest.mark.parametrize("epochs", ["1", "1.5"])
def test_resuming_a_finished_run_of_epochs_is_refused_however_many(tmp_path, epochs):
    """The Trainer records 1.5 epochs as 2 in its state: the check compared that with the config's 1.5, found another
    run length, and the resume trained a step 7 of 6 and published it over the finished model."""
    out = tmp_path / "out"
    by_epochs = ["--training.max_steps", "-1", "--training.num_train_epochs", epochs, "--dataset.max_samples", "48",
                 "--training.save_steps", "1"]
    train(config(out, *by_epochs))
    model, last = (out / "model.safetensors").read_bytes(), max(out.glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    with pytest.raises(ConfigError, match=f"{last} is step {last.name[11:]}, at or past the end of this run "
                                          f"\\({epochs} epochs?, {last.name[11:]} steps\\): nothing is left to train"):
        train(config(out, *by_epochs, "--training.resume_from_checkpoint", "true"))
    assert (out / "model.safetensors").read_bytes() == model


def test_a_run_capped_by_max_steps_resumes_for_whole_epochs(with_checkpoints, tmp_path):
    """Its trainer state records the cap as max_steps: that is not where a run of whole epochs ends."""
    from sftkit.checkpoints import checkpoint_to_resume

    epochs = config(with_checkpoints, "--training.max_steps", "-1", "--training.num_train_epochs", "1").resolved
    assert checkpoint_to_resume(str(with_checkpoints / "checkpoint-4"), tmp_path, epochs, 1)


def test_a_resume_under_another_number_of_processes_is_refused(with_checkpoints, tmp_path):
    from sftkit.checkpoints import checkpoint_to_resume

    checkpoint, resolved = str(with_checkpoints / "checkpoint-2"), config(with_checkpoints).resolved
    assert checkpoint_to_resume(checkpoint, tmp_path, resolved, 1) == checkpoint
    with pytest.raises(ConfigError, match="checkpoint-2 was saved by 1 process and this launch has 2; resume with 1"):
        checkpoint_to_resume(checkpoint, tmp_path, resolved, 2)
    # a CPU launch of 2 processes fills in training.ddp_backend itself: the count is what to fix, not that key
    launched = {**resolved, "training": {**resolved["training"], "ddp_backend": "gloo"}}
    with pytest.raises(ConfigError, match="and this launch has 2; resume with 1 .*; to go on with 2, fine-tune its "
                                          "weights further as model.path into another training.output_dir"):
        checkpoint_to_resume(checkpoint, tmp_path, launched, 2)
    assert checkpoint_to_resume(checkpoint, tmp_path, resolved, None) == checkpoint  # a dry run outside a launcher


def test_a_checkpoint_one_process_did_not_finish_is_damaged(with_checkpoints, tmp_path):
    """Each process of a launch saves its own random state: rank 1 killed after rank 0's save leaves none."""
    import json

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(with_checkpoints / "checkpoint-2", checkpoint)
    record = json.loads((checkpoint / "sftkit_run.json").read_text())
    (checkpoint / "sftkit_run.json").write_text(json.dumps({**record, "world_size": 2}))
    (checkpoint / "rng_state.pth").rename(checkpoint / "rng_state_0.pth")  # as rank 0 of two names it
    assert damage(checkpoint) == "rng_state_1.pth is missing (process 1 of 2 did not finish the save)"
    (checkpoint / "rng_state_0.pth").unlink()  # training.save_only_model: no process saves its random state
    assert damage(checkpoint) is None


def test_weights_written_by_a_process_without_them_are_damage_and_never_published(with_checkpoints, tmp_path):
    """Under ZeRO-3 a process that did not gather the weights saves their empty placeholders: every name, no values.
    Such a checkpoint read as intact, and such an export was published (save_on_each_node over two machines)."""
    from safetensors.torch import load_file, save_file

    from sftkit.errors import RunFailed
    from sftkit.export import require_weights

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(with_checkpoints / "checkpoint-2", checkpoint)
    weights = load_file(checkpoint / "model.safetensors")
    save_file({name: tensor.new_empty(0) for name, tensor in weights.items()}, checkpoint / "model.safetensors")
    assert damage(checkpoint).startswith("model.safetensors holds empty tensors (e.g. ")
    with pytest.raises(RunFailed, match=f"the export wrote no complete model to {checkpoint}: model.safetensors "
                                        r"holds empty tensors \(e.g. "):
        require_weights(checkpoint, "model")


@pytest.mark.parametrize("saved", [None, 1])  # None: a checkpoint saved before the preparation was recorded
def test_a_resume_onto_rows_prepared_another_way_warns(with_checkpoints, tmp_path, capsys, saved):
    """The same config and files gave other rows before data.PREPARATION 2; resuming skips batches by count."""
    import json

    from sftkit.checkpoints import checkpoint_to_resume
    from sftkit.data import PREPARATION

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(with_checkpoints / "checkpoint-2", checkpoint)
    record = json.loads((checkpoint / "sftkit_run.json").read_text())
    assert record["preparation"] == PREPARATION
    resolved = config(with_checkpoints).resolved
    assert checkpoint_to_resume(str(checkpoint), tmp_path, resolved, 1) and "warning" not in capsys.readouterr().err
    record.pop("preparation")
    (checkpoint / "sftkit_run.json").write_text(json.dumps({**record, **({"preparation": saved} if saved else {})}))
    assert checkpoint_to_resume(str(checkpoint), tmp_path, resolved, 1) == str(checkpoint)
    assert (f"checkpoint-2 was trained on rows prepared by an sftkit of another data preparation (1, now {PREPARATION})"
            in capsys.readouterr().err)


def test_every_tokenizer_file_of_a_local_base_is_recorded_and_checked(tmp_path):
    """A base whose tokenizer lives in vocab.json and merges.txt (a slow BPE tokenizer) or keeps its added tokens in
    added_tokens.json, rewritten in place: a resume, the merge and the chat on its adapter went on without a word."""
    from conftest import TINY_MODEL

    from sftkit.runrecord import changed_inputs, changed_model_files, run_record

    base = tmp_path / "base"
    shutil.copytree(TINY_MODEL, base)
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        (base / name).write_text("{}\n" if name.endswith(".json") else "#version: 0.2\n")
    record = run_record({"model": {"path": str(base)}, "dataset": {}})
    for name in ("vocab.json", "merges.txt", "added_tokens.json"):
        (base / name).write_text((base / name).read_text() + "\n")
    changed = ["added_tokens.json", "merges.txt", "vocab.json"]
    assert changed_model_files(record, base) == changed
    assert changed_inputs(record) == [f"{base}/{name}" for name in changed]

    # a record written before these files had digests: their contents are no change, the other files still are
    older = {**record, "inputs": {name: digest for name, digest in record["inputs"].items()
                                  if not name.endswith(tuple(changed))}}
    older.pop("model_files")
    assert changed_model_files(older, base) == [] and changed_inputs(older) == []
    (base / "config.json").write_text((base / "config.json").read_text() + "\n")
    assert changed_model_files(older, base) == ["config.json"]


def test_checkpoints_are_readable_like_the_other_files_of_the_run(with_checkpoints):
    """safetensors writes 0600: a teammate on the same filesystem could not read, or resume, the checkpoints."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for checkpoint in with_checkpoints.glob("checkpoint-*"):
        mode = (checkpoint / "trainer_state.json").stat().st_mode & 0o777
        assert (checkpoint / "model.safetensors").stat().st_mode & 0o777 == mode == 0o666 & ~umask


def test_a_resume_onto_other_weights_warns(with_checkpoints, tmp_path, capsys):
    """A bf16 full fine-tune checkpointed before 2026-11-27 trained bf16 weights; the same config now keeps float32
    ones, which take twice the memory from the resume on."""
    import json

    from sftkit.checkpoints import warn_of_other_weights

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(with_checkpoints / "checkpoint-2", checkpoint)
    record = json.loads((checkpoint / "sftkit_run.json").read_text())
    assert record["weights"] == "float32"
    warn_of_other_weights(str(checkpoint), "float32", "float32")
    assert "warning" not in capsys.readouterr().err
    record.pop("weights")  # saved before the weights were recorded: they were in the run's dtype
    (checkpoint / "sftkit_run.json").write_text(json.dumps(record))
    warn_of_other_weights(str(checkpoint), "float32", "bfloat16")
    assert f"{checkpoint} trained bfloat16 weights; this sftkit continues with float32 weights" in capsys.readouterr().err
    (checkpoint / "sftkit_run.json").unlink()  # cut short before its record: output_dir's record says no weights
    warn_of_other_weights(str(checkpoint), "float32", "bfloat16")
    assert "warning" not in capsys.readouterr().err


def test_eos_token_is_part_of_the_run_and_records_with_transformers_placeholders_still_resume(with_checkpoints, tmp_path):
    """Records before 2026-11-28 saved to_dict's <EOS_TOKEN> for training.eos_token and pad_token (so another
    eos_token went unseen): the run they record still resumes."""
    from sftkit.checkpoints import checkpoint_to_resume
    from sftkit.runrecord import fingerprint

    out = tmp_path / "out"
    shutil.copytree(with_checkpoints, out)
    longer = config(out, "--training.max_steps", "6").resolved
    with pytest.raises(ConfigError, match=r"other settings \(training.eos_token </s> \(that run: None\)\)"):
        checkpoint_to_resume(True, out, config(out, "--training.max_steps", "6", "--training.eos_token", "</s>").resolved, 1)
    for record_file in [out / RUN_FILE, *out.glob(f"checkpoint-*/{RUN_FILE}")]:
        record = json.loads(record_file.read_text())
        record["config"]["training"].update(eos_token="<EOS_TOKEN>", pad_token="<PAD_TOKEN>", hub_token="<hidden>")
        record["fingerprint"] = fingerprint(record["config"])
        record_file.write_text(json.dumps(record))
    assert checkpoint_to_resume(True, out, longer, 1) == str(out / "checkpoint-4")


def test_a_resume_logs_and_saves_at_the_steps_it_is_given(tmp_path):
    """transformers loads the checkpoint's logging and save steps over the resume's own, with a warning that they
    differ: a resume asked to log every step logged every second one, as the run before it (helper-75)."""
    import logging

    out = tmp_path / "out"
    train(config(out, "--training.logging_steps", "2"))
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("transformers.trainer_utils").addHandler(handler)
    try:
        train(config(out, "--training.max_steps", "8", "--training.save_steps", "3",
                     "--training.resume_from_checkpoint", "true"))
    finally:
        logging.getLogger("transformers.trainer_utils").removeHandler(handler)
    history = json.loads((out / "run_summary.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2, 4, 5, 6, 7, 8]  # the first step too
    assert (out / "checkpoint-6").is_dir() and not (out / "checkpoint-5").exists()
    assert not any("trainer_state.json" in message for message in seen)


def test_a_resume_may_turn_evaluation_on(tmp_path):
    """eval_strategy may change on a resume, but the do_eval that TrainingArguments derives from it was fingerprinted:
    the resume was refused as a run with other settings (training.do_eval True (that run: False))."""
    from sftkit.checkpoints import checkpoint_to_resume

    out = tmp_path / "out"
    quiet = ["--training.max_steps", "2", "--training.save_strategy", "steps", "--training.save_steps", "2",
             "--training.eval_strategy", "no"]
    train(load_config(None, ["--training.output_dir", str(out), *quiet]))
    evaluating = load_config(None, ["--training.output_dir", str(out), *quiet, "--training.max_steps", "4",
                                    "--training.eval_strategy", "steps", "--training.eval_steps", "2"])
    assert evaluating.training.do_eval
    assert checkpoint_to_resume(True, out, evaluating.resolved, 1) == str(out / "checkpoint-2")


def test_a_checkpoint_without_optimizer_state_is_not_resumed_as_if_it_had_it(with_checkpoints, tmp_path, capsys):
    """A resume from the model alone restarted Adam and the warmup (lr 0.00e+00 at step 4 of 8) and said nothing."""
    from sftkit.checkpoints import checkpoint_to_resume

    out = tmp_path / "out"
    shutil.copytree(with_checkpoints, out)
    (out / "checkpoint-4" / "optimizer.pt").unlink()  # to save space, say
    record = json.loads((out / RUN_FILE).read_text())
    (out / RUN_FILE).write_text(json.dumps({**record, "status": "interrupted"}))  # as a run stopped at step 4
    longer = config(out, "--training.max_steps", "6").resolved
    assert checkpoint_to_resume(True, out, longer, 1) == str(out / "checkpoint-2")
    assert f"skipping {out}/checkpoint-4: it holds the model alone, no optimizer or learning-rate schedule state" in \
        capsys.readouterr().err
    with pytest.raises(ConfigError, match="checkpoint-4: it holds the model alone.*resume from .*checkpoint-2 instead"):
        checkpoint_to_resume(str(out / "checkpoint-4"), out, longer, 1)

    model_only = tmp_path / "model-only"
    train(config(model_only, "--training.save_only_model", "true"))
    with pytest.raises(ConfigError, match=f"no checkpoint in {model_only} can be resumed \\(checkpoint-4: it holds "
                                          "the model alone"):
        checkpoint_to_resume(True, model_only, config(model_only, "--training.max_steps", "6",
                                                      "--training.save_only_model", "true").resolved, 1)


def test_a_checkpoint_without_its_weights_is_damaged(with_checkpoints, tmp_path):
    """It passed the check, and the resume ended in transformers' "Can't find a valid checkpoint" traceback."""
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(with_checkpoints / "checkpoint-2", checkpoint)
    (checkpoint / "model.safetensors").unlink()
    assert damage(checkpoint) == "it holds no model weights (model.safetensors or adapter_model.safetensors is missing)"


def test_a_resume_after_the_chat_template_file_changed_is_refused_naming_it(tmp_path):
    """dataset.chat_template given as a file was fingerprinted by its path alone: after the file was edited, a resume
    trained its last steps on the new rendering without a word. Records saved before it was digested still resume."""
    from conftest import TINY_MODEL

    from sftkit.checkpoints import checkpoint_to_resume

    template, out = tmp_path / "template.jinja", tmp_path / "out"
    shutil.copy(TINY_MODEL / "chat_template.jinja", template)
    train(config(out, "--dataset.chat_template", str(template)))
    template.write_text(template.read_text().replace("'<|im_start|>' + message['role']",
                                                     "'<|im_start|>' + message['role'] + ' says'"))
    longer = config(out, "--dataset.chat_template", str(template), "--training.max_steps", "6",
                    "--training.resume_from_checkpoint", "true")
    with pytest.raises(ConfigError, match=f"{out}/checkpoint-4 was trained on other contents of {template} "):
        train(longer)
    for record_file in out.glob(f"checkpoint-*/{RUN_FILE}"):  # as saved before the template was digested
        record = json.loads(record_file.read_text())
        record["inputs"].pop(str(template))
        record_file.write_text(json.dumps(record))
    assert checkpoint_to_resume(True, out, longer.resolved, 1) == str(out / "checkpoint-4")


def test_a_resume_under_another_engine_is_refused_and_one_saved_before_engines_were_recorded_resumes(
        with_checkpoints, tmp_path):
    """A ZeRO-2 checkpoint resumed under ZeRO-3 failed in DeepSpeed with a bare AssertionError once everything had
    loaded (test_distributed.py launches that run); the engine is in each checkpoint's record now."""
    from sftkit.checkpoints import checkpoint_to_resume

    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(with_checkpoints / "checkpoint-2", checkpoint)
    resolved = config(with_checkpoints).resolved
    assert json.loads((checkpoint / RUN_FILE).read_text())["engine"] == "one process"
    assert checkpoint_to_resume(str(checkpoint), tmp_path, resolved, 1, "one process") == str(checkpoint)
    with pytest.raises(ConfigError, match=f"{checkpoint} was saved under one process and this launch runs DeepSpeed "
                                          "ZeRO-3, which cannot load it; resume with the Accelerate config"):
        checkpoint_to_resume(str(checkpoint), tmp_path, resolved, 1, "DeepSpeed ZeRO-3")
    record = json.loads((checkpoint / RUN_FILE).read_text())
    # ZeRO-1 and ZeRO-2 save the same files, which DeepSpeed loads under either
    (checkpoint / RUN_FILE).write_text(json.dumps({**record, "engine": "DeepSpeed ZeRO-2"}))
    assert checkpoint_to_resume(str(checkpoint), tmp_path, resolved, 1, "DeepSpeed ZeRO-1") == str(checkpoint)
    with pytest.raises(ConfigError, match="saved under DeepSpeed ZeRO-2 and this launch runs DeepSpeed ZeRO-3"):
        checkpoint_to_resume(str(checkpoint), tmp_path, resolved, 1, "DeepSpeed ZeRO-3")
    record.pop("engine")
    (checkpoint / RUN_FILE).write_text(json.dumps(record))
    assert checkpoint_to_resume(str(checkpoint), tmp_path, resolved, 1, "DeepSpeed ZeRO-3") == str(checkpoint)


def test_a_resume_that_lengthens_the_run_follows_the_new_schedule_at_once_and_says_so(tmp_path, capsys,
                                                                                      monkeypatch):
    """Raising max_steps on a resume (sftkit's own advice to train a finished run longer): the first step trained at
    the old schedule's end (learning rate 0), then the rate jumped to the new one's, without a word; the card called
    it one cosine schedule."""
    out = tmp_path / "out"
    args = ["--training.save_strategy", "steps", "--training.save_steps", "2", "--training.logging_steps", "1",
            "--training.warmup_steps", "0"]
    train(config(out, *args, "--training.max_steps", "4"))
    capsys.readouterr()
    used = {}  # the rate the optimizer trains each step at, not the one logged

    class RatesUsed(TrainerCallback):
        def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
            used[state.global_step + 1] = optimizer.param_groups[0]["lr"]

    build = sftkit.train._trainer
    monkeypatch.setattr(sftkit.train, "_trainer", lambda *a, **k: (trainer := build(*a, **k)).add_callback(
        RatesUsed()) or trainer)
    resumed = train(config(out, *args, "--training.max_steps", "8", "--training.resume_from_checkpoint", "true"))
    said = capsys.readouterr().err
    assert "the run resumes at step 4 with another length, 8 steps where its cosine learning-rate schedule was " \
           "planned for 4: the schedule is planned anew and goes on at " in said
    fresh = train(config(tmp_path / "fresh", *args, "--training.max_steps", "8"))
    rates = [{entry["step"]: entry["learning_rate"] for entry in run.trainer.state.log_history
              if "learning_rate" in entry} for run in (resumed, fresh)]
    assert used[5] == pytest.approx(rates[1][5]) and used[5] > 0, "step 5 trains at the new schedule's rate"
    assert rates[0][5] == pytest.approx(used[5]), "and logs the rate it trained at"
    assert resumed.summary["schedule_lengths"] == [[0, 4], [4, 8]]
    assert "resumed with another length: the learning-rate schedule was planned for 4 steps, then anew for 8 from " \
           "step 4" in (out / "README.md").read_text()


def test_save_total_limit_leaves_the_users_checkpoint_folders(tmp_path, caplog):
    """transformers' rotation deleted every folder named checkpoint-*: a copy the user kept (checkpoint-best,
    checkpoint-4.bak) and a checkpoint holding the user's notes, on the resume sftkit advises after a run."""
    out = tmp_path / "out"
    saving = ["--training.output_dir", str(out), "--training.save_strategy", "steps", "--training.save_steps", "2",
              "--training.save_total_limit", "2", "--dataset.test_size", "null"]
    train(load_config(None, [*saving, "--training.max_steps", "4"]))
    (out / "checkpoint-2" / "my_eval_notes.txt").write_text("step 2 answers best\n")
    for copy in ("checkpoint-best", "checkpoint-4.bak"):
        shutil.copytree(out / "checkpoint-4", out / copy)
    train(load_config(None, [*saving, "--training.max_steps", "8", "--training.resume_from_checkpoint", "true"]))
    assert sorted(path.name for path in out.glob("checkpoint-*")) == [
        "checkpoint-2", "checkpoint-4.bak", "checkpoint-6", "checkpoint-8", "checkpoint-best"]
    assert (out / "checkpoint-2" / "my_eval_notes.txt").is_file()
    assert f"{out}/checkpoint-2 holds files the Trainer did not save (my_eval_notes.txt): it stays, beyond " \
           "training.save_total_limit" in caplog.text


def test_a_failed_run_whose_only_checkpoint_cannot_resume_says_why_instead_of_that_none_was_saved(tmp_path):
    """A checkpoint cut off mid-save (a kill, a full disk) was reported as 'no checkpoint was saved yet'."""
    from sftkit.checkpoints import newest_checkpoint_words

    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / "checkpoint-3" / "adapter_model.safetensors").write_bytes(b"")
    assert newest_checkpoint_words(tmp_path) == (f"no checkpoint here can resume: the newest, {tmp_path}/checkpoint-3: "
                                                 "trainer_state.json is missing (the save did not finish)")
