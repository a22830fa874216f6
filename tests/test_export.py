"""Nothing broken is published and nothing trained is lost at the end: divergence stops the run, non-finite weights
are refused, a full disk is found before training and, at export, keeps the trained adapter with the way to finish."""

import contextlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_MODEL, export_float32, run_here, run_python, run_sft, tmpfs
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from sftkit import export as export_module
from sftkit.config import load_config
from sftkit.errors import ConfigError, Interrupted, RunFailed
from sftkit.export import ADAPTER_FILE
from sftkit.export import main as export_main
from sftkit.layout import ADAPTER_DIR, RUN_FILE, STAGING_DIR
from sftkit.rundir import OutputDir
from sftkit.runrecord import record_written
from sftkit.schema import ModelConfig
from sftkit.train import train
from sftkit.weightfiles import finite, non_finite_tensors, size_words

SHORT = ["--training.max_steps", "3", "--training.logging_steps", "1", "--dataset.test_size", "null"]


def config(out, name="default_train_config.yaml", *overrides):
    return load_config(name, ["--training.output_dir", str(out), "--training.max_steps", "3", "--training.logging_steps",
                              "1", "--dataset.test_size", "null", *overrides])


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB filesystem: room for the tiny LoRA run's export (about 7 MiB) and little more."""
    with tmpfs(tmp_path / "disk", "size=12m") as disk:
        yield disk


def test_a_diverged_run_stops_names_the_step_and_publishes_nothing(tmp_path):
    out = tmp_path / "out"
    result = run_sft("--training.output_dir", str(out), "--training.max_steps", "30", "--training.logging_steps", "1",
                     "--training.learning_rate", "1e6", check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("sft.py: error: training diverged at step ") and " of 30: the loss, the gradient norm or the weights are no longer finite" in error
    assert "training.learning_rate is 1e+06" in error and "Nothing was published; no checkpoint was saved" in error
    assert int(error.split("step ")[1].split(" ")[0]) < 10, "stopped as soon as the loss was not finite"
    assert not (out / "config.json").exists() and not (out / STAGING_DIR).exists()
    assert json.loads((out / RUN_FILE).read_text())["status"] == "failed"


def test_a_run_that_saves_checkpoints_is_not_told_to_turn_saving_on(tmp_path):
    """Stopped before its first checkpoint, a run with save_strategy steps was told "set training.save_strategy:
    steps to keep some"."""
    with pytest.raises(RunFailed, match=r"Nothing was published; no checkpoint was saved yet$"):
        train(config(tmp_path / "out", "default_train_config.yaml", "--training.max_steps", "30",
                     "--training.learning_rate", "1e6", "--training.save_strategy", "steps", "--training.save_steps",
                     "20"))


def test_gradients_that_are_not_finite_stop_the_run_before_their_step_is_saved(tmp_path):
    """A finite loss with an inf gradient (bf16 has no loss scaler to skip the step; here one step's gradient is made
    inf) turns the clipped update, and so the weights, into nan: that step's checkpoint is never written."""
    trainer = trainer_with_an_inf_gradient_at(3, tmp_path, "--training.max_steps", "5", "--training.save_strategy",
                                              "steps", "--training.save_steps", "1")
    trainer.train()
    assert trainer.guard.diverged_at == 3 and trainer.state.global_step == 3
    assert [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1] < 10, "the loss was finite"
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not non_finite_tensors(tmp_path / "checkpoint-2")


def test_an_update_that_breaks_the_weights_under_a_finite_loss_is_not_saved_and_keeps_the_good_checkpoint(tmp_path):
    """A learning rate of 1e40 in warmup: step 2's loss and gradient norm were finite but its update made the weights
    inf; checkpoint-2 was saved of them, save_total_limit 1 deleted checkpoint-1, and the error named checkpoint-2
    as the one to resume."""
    out = tmp_path / "out"
    result = run_sft("--training.output_dir", str(out), "--training.max_steps", "6", "--training.logging_steps", "1",
                     "--training.learning_rate", "1e40", "--training.warmup_steps", "3", "--training.save_strategy",
                     "steps", "--training.save_steps", "1", "--training.save_total_limit", "1", check=False)
    assert result.returncode == 1, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert "training diverged at step 2 of 6" in error, error
    assert f"the newest checkpoint is {out}/checkpoint-1 (step 1 of 6)" in error, error
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-1"]
    assert not non_finite_tensors(out / "checkpoint-1")


def test_a_divergence_within_an_epoch_saves_no_checkpoint_at_its_end_nor_rotates_the_good_one_away(tmp_path):
    """After the stop the Trainer still ends the epoch, and with save_strategy: epoch its flow asked for the epoch's
    checkpoint: the broken weights were saved, and save_total_limit 1 deleted the epoch before's."""
    trainer = trainer_with_an_inf_gradient_at(6, tmp_path, "--dataset.max_samples", "32", "--training.max_steps", "-1",
                                              "--training.per_device_train_batch_size", "8", "--training.num_train_epochs",
                                              "4", "--training.save_strategy", "epoch", "--training.save_total_limit", "1")
    trainer.train()
    assert trainer.guard.diverged_at == 6 and trainer.state.global_step == 6
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-4"]  # the first epoch's
    assert not non_finite_tensors(tmp_path / "checkpoint-4")


def test_a_transformers_without_the_gradient_norm_hook_is_said_to_leave_the_gradients_unchecked(tmp_path,
                                                                                                 monkeypatch, caplog):
    import transformers

    monkeypatch.delattr(transformers.Trainer, "_get_grad_norm")
    trainer_with_an_inf_gradient_at(2, tmp_path)
    assert "this transformers' Trainer has no _get_grad_norm: gradient norms are not checked to be finite" in caplog.text


def trainer_with_an_inf_gradient_at(step: int, output_dir, *overrides: str):
    """The default config's trainer, whose gradient at `step` is made inf (a finite loss, broken weights after it)."""
    from transformers import TrainerCallback

    from sftkit.data import prepare_data
    from sftkit.model import load_model, load_tokenizer
    from sftkit.monitor import MonitoredSFTTrainer

    class InfiniteGradient(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == step - 1:
                model.lm_head.weight.register_hook(lambda grad: grad * float("inf"))

    cfg = config(output_dir, "default_train_config.yaml", *overrides)
    tokenizer = load_tokenizer(cfg.model, cfg.dataset)
    return MonitoredSFTTrainer(model=load_model(cfg.model, torch.float32, False), args=cfg.training,
                               train_dataset=prepare_data(cfg.dataset, tokenizer, cfg.training.max_length).train,
                               processing_class=tokenizer, callbacks=[InfiniteGradient()])


def test_weights_that_are_not_finite_are_never_published(tmp_path):
    out = tmp_path / "out"
    cfg = config(out)
    run = train(cfg)
    before = (out / "model.safetensors").read_bytes()
    with torch.no_grad():
        run.trainer.model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(RunFailed, match=r"the trained weights are not finite \(1 tensors hold nan or inf, e.g. "
                                        r"model.safetensors:model.layers.1.mlp.down_proj.weight\); nothing was published"):
        export_float32(run.trainer, cfg, run.trainer.processing_class)
    assert (out / "model.safetensors").read_bytes() == before and not (out / STAGING_DIR).exists()


def base_with_an_inf_row(directory) -> str:
    """The tiny model, untied, with one embedding row no sample row uses set to inf, as in some converted models."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(TINY_MODEL, directory)
    weights = load_file(directory / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    weights["model.embed_tokens.weight"][-1] = float("inf")
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    settings = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**settings, "tie_word_embeddings": False}))
    return str(directory)


def test_a_base_whose_weights_are_not_finite_is_refused_before_training(tmp_path):
    """Every loss was finite (no row reads the row), and after the whole run the export found the merged model
    broken and deleted it, the finite trained adapter with it."""
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"model.path .*base: its weights hold nan or inf \(model.embed_tokens.weight"
                                          r"\), which training would carry into the model it publishes"):
        train(config(out, "lora_train_config.yaml", "--model.path", base_with_an_inf_row(tmp_path / "base")))
    assert not list(out.glob("checkpoint-*")) and not (out / "model.safetensors").exists()


def test_the_finite_checks_read_float8_weights_and_skip_those_not_loaded_here(tmp_path):
    """torch has no isfinite for float8 (FP8 checkpoints on Hopper): a traceback instead of training, or of the
    export's check of what it wrote; FSDP's other processes may hold weights on the meta device."""
    from safetensors.torch import save_file

    assert finite(torch.randn(64).to(torch.float8_e4m3fn))
    assert not finite(torch.tensor([1.0, float("inf")]).to(torch.float8_e5m2))
    assert finite(torch.empty(8, device="meta"))
    save_file({"ok": torch.randn(4).to(torch.float8_e4m3fn), "inf": torch.tensor([float("inf")]).to(torch.float8_e5m2),
               "steps": torch.tensor([3])}, tmp_path / "model.safetensors")
    assert non_finite_tensors(tmp_path) == ["model.safetensors:inf"]


def test_a_merge_that_is_not_finite_keeps_the_finite_adapter(lora_run, tmp_path):
    """The merge can overflow where the adapter is finite, and the base can change under `sftkit export`: the
    adapter, the run's whole training, was deleted with the merged model."""
    staging = tmp_path / STAGING_DIR
    shutil.copytree(lora_run / ADAPTER_DIR, staging / ADAPTER_DIR)
    adapter_config = staging / ADAPTER_DIR / "adapter_config.json"
    base = base_with_an_inf_row(tmp_path / "base")
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()), "base_model_name_or_path": base}))
    with pytest.raises(RunFailed, match=r"merging the trained adapter into its base gave weights that are not finite "
                                        r"\(1 tensors hold nan or inf, e.g. model.safetensors:model.embed_tokens.weight"
                                        r"\), though the adapter's are finite: nothing was published; the adapter is "
                                        f"kept in {staging / ADAPTER_DIR}"):
        export_module._complete_and_check(staging, ModelConfig(path=base, use_lora=True), torch.float32)
    assert sorted(path.name for path in staging.iterdir()) == [ADAPTER_DIR]
    assert non_finite_tensors(staging / ADAPTER_DIR) == [] and (staging / ADAPTER_DIR / "adapter_model.safetensors").is_file()


def export_cut_off(out, *names: str):
    """A finished 3-step run, turned into one whose export stopped with `names` in its staging directory."""
    train(config(out))
    staging = out / STAGING_DIR
    staging.mkdir()
    for name in names:
        (out / name).rename(staging / name)
    return staging


def test_an_export_without_the_weights_and_no_checkpoint_to_finish_it_from_is_cleared_and_says_so(tmp_path, capsys):
    """What an export cut off before the weights leaves (config.json and the tokenizer, no model) is not a model:
    finishing it publishes nothing. Without a checkpoint of the run's last step nothing can finish it, and the
    staging directory goes, so that the output_dir no longer says it holds an unfinished export (before, every rerun
    said to finish it, and the export blamed the DeepSpeed config of a one-process run)."""
    out = tmp_path / "out"
    staging = export_cut_off(out, "config.json", "tokenizer.json", "tokenizer_config.json")
    (out / "model.safetensors").unlink()
    capsys.readouterr()
    assert export_main([str(out)]) == 1
    assert capsys.readouterr().err.startswith(
        "python -m sftkit.export: error: the export was cut off before the trained weights were written (no "
        f"model.safetensors), and no checkpoint holds the run's last step, so there is no trained model to finish; "
        f"{staging} held nothing else and was removed; no checkpoint was saved")
    assert not staging.exists() and not (out / "config.json").exists()


def test_an_export_cut_off_before_the_weights_is_finished_from_the_last_steps_checkpoint(tmp_path, capsys):
    """A process lost, or the run killed, as the export starts: the staging directory has the tokenizer and config
    only, and the checkpoint of the run's last step has the trained adapter; `sftkit export` publishes from it."""
    out = tmp_path / "out"
    cfg = config(out, "lora_train_config.yaml", "--training.save_strategy", "steps", "--training.save_steps", "2")
    train(cfg)
    finished = AutoModelForCausalLM.from_pretrained(out)
    staging = out / STAGING_DIR
    staging.mkdir()
    for item in list(out.iterdir()):  # as the run left it: metadata in the staging directory, nothing published
        if item.name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "sftkit_config.yaml"):
            item.rename(staging / item.name)
        elif item.name.startswith(("model", "config", "generation", ADAPTER_DIR)):
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    record = {**json.loads((out / RUN_FILE).read_text()), "status": "exporting", "dtype": "float32"}
    record["config"]["training"]["load_best_model_at_end"] = True
    (out / RUN_FILE).write_text(json.dumps(record))
    kept = shutil.copytree(staging, tmp_path / "staging")
    capsys.readouterr()
    assert export_main([str(out)]) == 1, "the best checkpoint, not the last, was to be exported: unknown here"
    assert "so there is no trained model to finish" in capsys.readouterr().err
    shutil.copytree(kept, staging)
    record["config"]["training"]["load_best_model_at_end"] = False
    (out / RUN_FILE).write_text(json.dumps(record))
    assert export_main([str(out)]) == 0, capsys.readouterr().err
    assert f"taking them from {out / 'checkpoint-3'}, the run's last step" in capsys.readouterr().out
    published = AutoModelForCausalLM.from_pretrained(out)
    for (name, tensor), (_, expected) in zip(published.state_dict().items(), finished.state_dict().items()):
        assert torch.equal(tensor, expected), name
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file() and not staging.exists()


def killed_in_the_export(tmp_path, *args: str, cut: bool):
    """`python sft.py ARGS` whose process is killed (os._exit, as SIGKILL: no cleanup) as the export writes the
    trained weights: once they are half written (`cut`), or before any is."""
    script = tmp_path / "sft_killed.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(REPO)!r})
import peft.peft_model, transformers.modeling_utils
from safetensors.torch import save_file

def save_then_die(tensors, filename, metadata=None):
    if "{STAGING_DIR}" not in str(filename):
        return save_file(tensors, filename, metadata=metadata)
    if {cut!r}:
        save_file(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
    os._exit(137)

transformers.modeling_utils.safe_save_file = peft.peft_model.safe_save_file = save_then_die
from sftkit.cli import main
raise SystemExit(main())
""")
    result = run_python(str(script), *args, check=False)
    assert result.returncode == 137, result.stdout[-2000:] + result.stderr[-2000:]


@pytest.mark.parametrize("config_file", ["default_train_config.yaml", "lora_train_config.yaml"])
def test_an_export_killed_while_writing_the_weights_is_finished_from_the_last_steps_checkpoint(tmp_path, capsys,
                                                                                               config_file):
    """A kill mid-write (a scheduler's SIGKILL after its grace period, the OOM killer) left a half-written weights
    file in the staging directory: `sftkit export` failed on it every time, a rerun was told to finish it, and only
    --overwrite, which deletes the intact checkpoint of the last step, got past it."""
    out = tmp_path / "out"
    killed_in_the_export(tmp_path, "--config", config_file, "--training.output_dir", str(out), *SHORT,
                         "--training.save_strategy", "steps", "--training.save_steps", "2", cut=True)
    stem, weights = ("adapter_model", out / STAGING_DIR / ADAPTER_DIR) if "lora" in config_file else (
        "model", out / STAGING_DIR)
    assert 0 < (weights / f"{stem}.safetensors").stat().st_size, "the kill left half a file"
    rerun = run_sft("--config", config_file, "--training.output_dir", str(out), *SHORT, check=False)
    assert f"already holds 2 checkpoint(s) (checkpoint-2, checkpoint-3) and an unfinished export ({STAGING_DIR})" \
        in rerun.stderr or f"already holds an unfinished export ({STAGING_DIR})" in rerun.stderr, rerun.stderr
    assert f"finish its export with python -m sftkit.export {out}" in rerun.stderr
    capsys.readouterr()
    assert export_main([str(out)]) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert f"the export had no whole trained weights ({stem}.safetensors is cut short); taking them from" in said
    assert f"taking them from {out / 'checkpoint-3'}, the run's last step" in said
    with safe_open(out / "checkpoint-3" / f"{stem}.safetensors", "pt") as trained:
        published = out / ADAPTER_DIR if "lora" in config_file else out
        with safe_open(published / f"{stem}.safetensors", "pt") as weights:
            assert set(weights.keys()) == set(trained.keys())
            assert all(torch.equal(weights.get_tensor(name), trained.get_tensor(name)) for name in trained.keys())
    AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"


def test_a_run_killed_in_its_final_evaluation_keeps_the_trained_model(tmp_path, capsys):
    """A kill during the final evaluation (the OOM killer, a scheduler's SIGKILL; a large eval set takes minutes)
    lost the trained model where no checkpoint held its last step: the weights were written only after it."""
    out = tmp_path / "out"
    script = tmp_path / "sft_killed_in_eval.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(REPO)!r})
from sftkit import monitor
prediction_step = monitor.MonitoredSFTTrainer.prediction_step

def killed_in_the_final_evaluation(self, *args, **kwargs):
    if self.guard.training_over:
        os._exit(137)
    return prediction_step(self, *args, **kwargs)

monitor.MonitoredSFTTrainer.prediction_step = killed_in_the_final_evaluation
from sftkit.cli import main
raise SystemExit(main())
""")
    args = ["--training.output_dir", str(out), "--training.max_steps", "3"]  # with the config's eval rows
    result = run_python(str(script), *args, check=False)
    assert result.returncode == 137, result.stderr[-2000:]
    rerun = run_sft(*args, check=False)
    assert f"finish its export with python -m sftkit.export {out}" in rerun.stderr, rerun.stderr[-2000:]
    assert export_main([str(out)]) == 0, capsys.readouterr().err
    AutoModelForCausalLM.from_pretrained(out)
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"


@pytest.mark.parametrize("own_record", [True, False])
def test_an_export_killed_after_a_resume_that_trains_longer_never_publishes_the_first_attempts_last_step(
        tmp_path, capsys, own_record):
    """The first attempt's last checkpoint (step 3) looked like the run's last step to `sftkit export` after a resume
    to 5 steps was killed in its export: it published step 3's weights and marked the 5-step run finished. So did a
    checkpoint without its own run record (a stop between the Trainer's save and sftkit's), which reads the
    output_dir's."""
    out = tmp_path / "out"
    args = ["--training.output_dir", str(out), *SHORT]
    run_sft(*args, "--training.save_strategy", "steps", "--training.save_steps", "2")
    first = (out / "model.safetensors").read_bytes()
    if not own_record:
        (out / "checkpoint-3" / RUN_FILE).unlink()
    killed_in_the_export(tmp_path, *args, "--training.max_steps", "5", "--training.save_strategy", "no",
                         "--training.resume_from_checkpoint", "true", cut=False)
    capsys.readouterr()
    assert export_main([str(out)]) == 1
    assert "so there is no trained model to finish" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first, "the first attempt's model is left as it was"
    assert json.loads((out / RUN_FILE).read_text())["status"] != "finished"


def test_weights_that_cannot_be_read_but_are_not_cut_short_are_never_deleted(tmp_path, capsys):
    """Only a file shorter than its own header says is cut short; one that cannot be read otherwise (an I/O error
    on a network filesystem, here a garbled header) may be the only copy of the trained weights and stays."""
    out = tmp_path / "out"
    staging = export_cut_off(out, "config.json", "tokenizer.json", "model.safetensors")
    weights = bytearray((staging / "model.safetensors").read_bytes())
    weights[8:10] = b"#!"  # the header's JSON no longer parses; the file keeps its length
    (staging / "model.safetensors").write_bytes(weights)
    (out / RUN_FILE).write_text(json.dumps({**json.loads((out / RUN_FILE).read_text()), "status": "exporting"}))
    capsys.readouterr()
    assert export_main([str(out)]) == 1
    assert "model.safetensors could not be read" in capsys.readouterr().err
    assert (staging / "model.safetensors").read_bytes() == weights


def test_a_publish_cut_short_is_finished_by_running_the_export_again(tmp_path, monkeypatch):
    """A kill or an I/O error part way through moving the checked export into output_dir (made to happen here at
    the move after the weights'): nothing looks finished, and `sftkit export` moves the rest, keeping what had
    moved as this export's rather than deleting it as an earlier export's."""
    from pathlib import Path

    out = tmp_path / "out"
    cfg = config(out)
    run = train(cfg)
    weights = (out / "model.safetensors").read_bytes()
    rename, moves = Path.rename, []

    def rename_failing_after_the_weights(self, target):
        if moves and moves[-1] == "model.safetensors":
            raise OSError(5, "Input/output error")
        moves.append(self.name)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_failing_after_the_weights)
    with pytest.raises(RunFailed, match=rf"publishing the model in {out} failed part way: .*Input/output error.*"
                                        rf"finish with: python -m sftkit.export {out}"):
        export_float32(run.trainer, cfg, run.trainer.processing_class)
    monkeypatch.undo()
    assert moves[-1] == "model.safetensors" and not (out / "config.json").exists()
    assert export_main([str(out)]) == 0
    assert (out / "model.safetensors").read_bytes() == weights and (out / "config.json").is_file()
    assert not (out / STAGING_DIR).exists()
    AutoModelForCausalLM.from_pretrained(out)


def killed_at(tmp_path, *args: str, at: str):
    """`python sft.py ARGS` killed (os._exit, as SIGKILL: no cleanup) as it creates or moves into place the path
    ending in `at` (the staging directory, a staged file as the publish moves it, or one of its adapter's)."""
    script = tmp_path / "sft_killed_at.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(REPO)!r})
from pathlib import Path

def die_at(method):
    def at(self, *args, **kwargs):
        if str(self).endswith({at!r}):
            os._exit(137)
        return method(self, *args, **kwargs)
    return at

Path.rename, Path.replace, Path.mkdir = die_at(Path.rename), die_at(Path.replace), die_at(Path.mkdir)
from sftkit.cli import main
raise SystemExit(main())
""")
    result = run_python(str(script), *args, check=False)
    assert result.returncode == 137, result.stdout[-2000:] + result.stderr[-2000:]


def test_a_run_killed_between_its_last_checkpoint_and_its_export_is_published_by_sftkit_export(tmp_path):
    """The rerun said to resume, the resume that nothing was left to train, and `sftkit export` that there was no
    export to finish: no command published the trained model (helper-77)."""
    out = tmp_path / "out"
    args = ["--training.output_dir", str(out), "--training.max_steps", "3", "--training.save_strategy", "steps",
            "--training.save_steps", "3", "--dataset.test_size", "null"]
    killed_at(tmp_path, *args, at=f"out/{STAGING_DIR}")
    assert (out / "checkpoint-3" / "model.safetensors").is_file() and not (out / STAGING_DIR).exists()
    rerun = run_sft(*args, check=False)
    assert rerun.returncode == 2 and f"publish the model its last step's checkpoint holds with python -m " \
        f"sftkit.export {out}" in rerun.stderr, rerun.stderr
    resumed = run_sft(*args, "--training.resume_from_checkpoint", "true", check=False)
    assert resumed.returncode == 2 and f"Its export did not begin: publish its trained model with python -m " \
        f"sftkit.export {out}" in resumed.stderr, resumed.stderr
    finished = run_here(export_main, str(out))
    assert "exporting the model" in finished.stdout and f"its training log is in {out}/checkpoint-3" in finished.stdout
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished" and (out / "chat_template.jinja").is_file()
    published, trained = (AutoModelForCausalLM.from_pretrained(path) for path in (out, out / "checkpoint-3"))
    for (name, tensor), (_, expected) in zip(published.state_dict().items(), trained.state_dict().items()):
        assert torch.equal(tensor, expected), name


def test_a_publish_killed_part_way_is_named_as_an_unfinished_export_and_finished_whole(tmp_path):
    """A kill after the chat template, generation config and adapter had moved in: a rerun called them "files sftkit
    did not write there ... move them elsewhere", and `sftkit export` then finished a model without them that looked
    whole (helper-77)."""
    out = tmp_path / "out"
    args = ["--config", "configs/lora_train_config.yaml", "--training.output_dir", str(out), *SHORT]
    killed_at(tmp_path, *args, at=f"{STAGING_DIR}/model.safetensors")
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").is_file() and not (out / "config.json").exists()
    rerun = run_sft(*args, check=False)
    assert rerun.returncode == 2 and "did not write" not in rerun.stderr and "changed since" not in rerun.stderr
    assert f"an unfinished export ({STAGING_DIR}): finish its export with python -m sftkit.export {out}" in \
        rerun.stderr
    (out / ADAPTER_DIR).rename(tmp_path / "moved")  # taken away since: never finished without it
    refused = run_here(export_main, str(out), check=False)
    assert refused.returncode == 1 and f"the export moved {ADAPTER_DIR} there before it was cut short, and it is " \
        f"gone since; put it back, then finish the export with: python -m sftkit.export {out}" in refused.stderr
    (tmp_path / "moved").rename(out / ADAPTER_DIR)
    assert run_here(export_main, str(out)).returncode == 0
    assert (out / "chat_template.jinja").is_file() and (out / "generation_config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"


def test_a_resumes_publish_killed_while_replacing_the_adapter_is_finished_with_the_new_adapter(tmp_path):
    """A resume that trains longer replaces lora_weights/ file by file: a kill after the new weights moved in made
    the rerun and `sftkit export` call it "changed since the run wrote them", and moving it away as they said
    published an adapter without weights (helper-77). The earlier model's card and summary are gone before the new
    model comes in: a kill later left step 4's weights under step 2's card."""
    out = tmp_path / "out"
    args = ["--config", "configs/lora_train_config.yaml", "--training.output_dir", str(out), "--training.max_steps",
            "2", "--training.save_strategy", "steps", "--training.save_steps", "2", "--dataset.test_size", "null"]
    run_sft(*args)
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 2
    longer = [*args, "--training.max_steps", "4", "--training.resume_from_checkpoint", "true"]
    killed_at(tmp_path, *longer, at=f"{STAGING_DIR}/{ADAPTER_DIR}/adapter_config.json")
    trained = (out / "checkpoint-4" / "adapter_model.safetensors").read_bytes()
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").read_bytes() == trained
    assert not (out / "README.md").exists() and not (out / "run_summary.json").exists()
    rerun = run_sft(*longer, check=False)
    assert rerun.returncode == 2 and "changed since" not in rerun.stderr, rerun.stderr
    assert run_here(export_main, str(out)).returncode == 0
    assert sorted(path.name for path in (out / ADAPTER_DIR).iterdir() if ADAPTER_FILE.fullmatch(path.name)) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").read_bytes() == trained
    assert json.loads((out / RUN_FILE).read_text())["step"] == 4


def test_a_disk_too_small_for_the_export_is_refused_before_training(tmp_path):
    with tmpfs(tmp_path / "disk", "size=1m") as disk:
        result = run_sft("--training.output_dir", str(disk / "out"), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert f"the export needs 5.5 MiB in {disk / 'out'} but its filesystem has 1.0 MiB free: free 4.5 MiB" in error
    assert "step 1/" not in result.stdout


def test_overwrite_counts_the_space_it_frees_for_the_export(small_disk):
    """The earlier model stays until training begins: the space check before it counts what --overwrite removes."""
    out = small_disk / "out"
    run_sft("--training.output_dir", str(out), *SHORT)
    (small_disk / "filler").write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 2 * 2**20))
    refused = run_sft("--training.output_dir", str(small_disk / "other"), *SHORT, check=False)
    assert "the export needs 5.5 MiB" in refused.stderr, "without the earlier model's space it does not fit"
    assert run_sft("--training.output_dir", str(out), *SHORT, "--overwrite").returncode == 0
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 3


def test_a_full_disk_at_export_keeps_the_trained_adapter_and_the_export_can_be_finished(small_disk, monkeypatch):
    out = small_disk / "out"
    cfg = config(out, "lora_train_config.yaml")
    run = train(cfg)
    published = {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()}
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 2 * 2**20))  # 2 MiB left: the adapter fits
    monkeypatch.setattr(export_module, "DISK_WAIT_SECONDS", 0)
    with pytest.raises(RunFailed) as failure:
        export_float32(run.trainer, cfg, run.trainer.processing_class)
    kept = out / STAGING_DIR / ADAPTER_DIR
    assert "No space left on device" in str(failure.value)
    assert f"The trained adapter is kept in {kept}; once that is fixed, finish the export with: python -m " \
           f"sftkit.export {out}" in str(failure.value)
    assert {path.name: path.read_bytes() for path in out.iterdir() if path.is_file()} == published
    assert (kept / "adapter_model.safetensors").exists() and not (out / STAGING_DIR / "config.json").exists()

    output = OutputDir(out, cfg.resolved)
    output.owner = True
    output.mark("failed", error=str(failure.value).splitlines()[0])  # as train() records the failure

    filler.unlink()
    shutil.rmtree(out / ADAPTER_DIR)  # the adapter published by the first export, to tell the two apart
    refused = run_sft("--config", "lora_train_config.yaml", "--training.output_dir", str(out), check=False)
    assert refused.returncode == 2 and f"finish its export with python -m sftkit.export {out}" in refused.stderr
    finished = run_here(export_main, str(out))
    assert f"the model is in {out}" in finished.stdout and not (out / STAGING_DIR).exists()
    record = json.loads((out / RUN_FILE).read_text())
    assert record["status"] == "finished" and "error" not in record
    merged = AutoModelForCausalLM.from_pretrained(out)
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), out / ADAPTER_DIR)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        assert (merged(ids).logits - with_adapter(ids).logits).abs().max() < 1e-4


def test_a_disk_full_as_training_ends_waits_for_space_and_publishes_the_model(small_disk, monkeypatch, capsys):
    """The run record's "exporting" could not be written on the full disk: a traceback, and the trained model was
    lost before the export's wait for space began."""
    import threading

    import sftkit.train as train_module

    out, filler = small_disk / "out", small_disk / "filler"
    trained = train_module._stop_unless_trained

    def fill_the_disk_as_training_ends(*args):
        with contextlib.suppress(OSError), filler.open("wb") as handle:
            while True:
                handle.write(b"\0" * 2**16)
        threading.Timer(1.0, filler.unlink).start()  # the user frees space while the export waits
        return trained(*args)

    monkeypatch.setattr(train_module, "_stop_unless_trained", fill_the_disk_as_training_ends)
    monkeypatch.setattr(export_module, "DISK_POLL_SECONDS", 0.5)
    run = train(config(out))
    said = capsys.readouterr()
    assert (f"sftkit: warning: could not record the run as exporting in {out / RUN_FILE}: No space left on device"
            in said.err)
    assert "waiting for space" in said.err and (out / "config.json").is_file() and not (out / STAGING_DIR).exists()
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished" and run.summary["steps"] == 3
    assert not list(out.glob("*.partial"))


@pytest.mark.parametrize("mended", [True, False])
def test_a_disk_gone_read_only_as_training_ends_is_waited_for(tmp_path, monkeypatch, capsys, mended):
    """A filesystem remounted read-only (ext4's errors=remount-ro after an I/O error, a stale network mount): the
    trained model, in memory only, was dropped at once, in a traceback about the lock file that could not be
    removed (which hid the run's own error). Now the export waits for the disk as it waits for space."""
    import threading

    import sftkit.train as train_module

    with tmpfs(tmp_path / "disk", "size=64m") as disk:
        out, trained = disk / "out", train_module._stop_unless_trained

        def remount(mode: str) -> None:
            subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)

        def read_only_as_training_ends(*args):
            remount("ro")
            if mended:
                threading.Timer(1.0, remount, ["rw"]).start()  # the admin mends it while the export waits
            return trained(*args)

        monkeypatch.setattr(train_module, "_stop_unless_trained", read_only_as_training_ends)
        monkeypatch.setattr(export_module, "DISK_POLL_SECONDS", 0.5)
        monkeypatch.setattr(export_module, "DISK_WAIT_SECONDS", 3 if mended else 0.5)
        try:
            if mended:
                run = train(config(out))
                assert run.summary["steps"] == 3 and (out / "model.safetensors").is_file()
                assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"
            else:
                with pytest.raises(RunFailed, match=f"could not write the trained model to {out / STAGING_DIR}: "
                                                    r"\[Errno 30\] Read-only file system"):
                    train(config(out))
                assert f"could not remove the lock {out / '.sftkit.lock'} (Read-only file system)" in \
                    capsys.readouterr().err
        finally:
            remount("rw")
        said = capsys.readouterr().err
        assert not mended or (f"sftkit: {out / STAGING_DIR} cannot be written (Read-only file system); the trained "
                              "model is in memory only: waiting for the disk to be mended" in said)


def test_a_checkpoint_too_large_for_a_file_size_limit_is_removed_and_training_goes_on(tmp_path):
    """A per-file size limit (ulimit -f on a cluster, FAT32's 4 GiB) cut the optimizer's file short: torch.save's
    RuntimeError ended the run in a traceback, every step trained lost and the cut checkpoint left behind. Here
    the limit lets the model's file (3.5 MB) be written and not the optimizer's (7 MB)."""
    import resource

    def file_size_limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (5 * 10**6, resource.RLIM_INFINITY))

    out = tmp_path / "out"
    result = run_python("sft.py", "--training.output_dir", str(out), *SHORT[:2], "--training.save_strategy", "steps",
                        "--training.save_steps", "2", preexec_fn=file_size_limit)
    assert f"sftkit: warning: could not save {out}/checkpoint-2: File too large (beyond the file size limit, ulimit " \
           "-f)" in result.stderr
    assert "training goes on (mend the disk: the export at the end waits for it)" in result.stderr
    assert not list(out.glob("checkpoint-*")) and (out / "model.safetensors").is_file()
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"


def test_a_weights_file_too_large_for_a_file_size_limit_is_a_disk_failure(tmp_path):
    """safetensors' own error type, errno in its text: the model's file of a checkpoint (written first) cut short by
    the limit ended the run in a traceback, where torch.save's optimizer file was recognised."""
    import resource

    from safetensors.torch import save_file

    from sftkit.weightfiles import disk_failure

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10**6, hard))
    try:
        with pytest.raises(Exception) as raised:
            save_file({"weight": torch.zeros(10**6)}, tmp_path / "model.safetensors")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert disk_failure(raised.value, tmp_path) == "File too large"
    assert disk_failure(ValueError("a bug, not a disk"), tmp_path) is None


def test_a_precise_disk_error_is_named_on_a_nearly_full_disk(small_disk):
    """A read-only or failing disk that was also nearly full was said to be "full": the user freed space and the
    next save failed again."""
    import errno

    from sftkit.weightfiles import disk_failure

    (small_disk / "filler").write_bytes(b"\0" * (12 * 2**20 - 4096))
    assert disk_failure(OSError(errno.EROFS, "Read-only file system"), small_disk) == "Read-only file system"
    assert disk_failure(OSError(errno.EIO, "Input/output error"), small_disk) == "Input/output error"
    assert disk_failure(OSError(errno.ENOSPC, "No space left on device"), small_disk) == "its disk is full"


def test_a_checkpoint_the_full_disk_cuts_short_is_removed_and_training_goes_on(small_disk, monkeypatch, capsys):
    """torch.save raised its RuntimeError through the Trainer: a traceback, the trained model lost, and the cut
    checkpoint left among the good ones."""
    import transformers

    out, filler = small_disk / "out", small_disk / "filler"
    save = transformers.Trainer._save_optimizer_and_scheduler

    def full_disk_at_step_2(self, output_dir):
        if self.state.global_step == 2:
            with contextlib.suppress(OSError), filler.open("wb") as handle:
                while True:
                    handle.write(b"\0" * 2**16)
        else:
            filler.unlink(missing_ok=True)  # the user freed space by step 3
        return save(self, output_dir)

    monkeypatch.setattr(transformers.Trainer, "_save_optimizer_and_scheduler", full_disk_at_step_2)
    run = train(config(out, "lora_train_config.yaml", "--training.save_strategy", "steps", "--training.save_steps", "1",
                       "--training.save_total_limit", "1"))
    assert f"sftkit: warning: could not save {out}/checkpoint-2: its disk is full; training goes on (mend the disk" in \
        capsys.readouterr().err
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert run.summary["steps"] == 3 and (out / "config.json").is_file()
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"


def test_a_run_whose_export_fails_keeps_its_summary_loss_plot_and_card_for_the_finished_export(small_disk,
                                                                                               monkeypatch):
    """The log history lives only in the training process: the report waits with the kept adapter, and finishing
    the export publishes it with the model."""
    out = small_disk / "out"
    filler = small_disk / "filler"
    finish = export_module.finish_export

    def fill_the_disk_then_finish(*args):  # the disk fills up while the adapter is saved: the merge fails
        filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - 2 * 2**20))
        finish(*args)

    monkeypatch.setattr(export_module, "finish_export", fill_the_disk_then_finish)
    monkeypatch.setattr(export_module, "DISK_WAIT_SECONDS", 0)
    with pytest.raises(RunFailed, match="No space left on device"):
        train(config(out, "lora_train_config.yaml"))
    kept = {path.name for path in (out / STAGING_DIR).iterdir()}
    assert {"README.md", "loss.png", "run_summary.json", ADAPTER_DIR} <= kept and "config.json" not in kept
    assert not (out / "run_summary.json").exists()

    filler.unlink()
    monkeypatch.undo()
    assert run_here(export_main, str(out)).returncode == 0
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["model_card"] == str(out / "README.md")
    assert summary["saved_dtypes"] == ["float32"] and summary["train_loss_last"] < summary["train_loss_first"]
    assert (out / "README.md").read_text().startswith("---\nbase_model: data/tiny-chat-llama\n")
    assert (out / "loss.png").stat().st_size > 10_000 and (out / "config.json").is_file()


def test_a_disk_that_fills_after_the_model_is_published_leaves_a_finished_model_and_says_the_report_is_missing(
        small_disk, monkeypatch, capsys):
    """The model is in place before its report is written: a report that no longer fits does not fail the run, nor
    mark a published model failed."""
    out = small_disk / "out"
    finish = export_module.finish_export

    def finish_then_fill_the_disk(*args):
        finish(*args)
        (small_disk / "filler").write_bytes(b"\0" * shutil.disk_usage(small_disk).free)

    monkeypatch.setattr(export_module, "finish_export", finish_then_fill_the_disk)
    run = train(config(out, "lora_train_config.yaml"))
    said = capsys.readouterr()
    assert f"sftkit: the model is published in {out}, but its report (loss plot, model card, run_summary.json) " \
           "could not be written there: [Errno 28] No space left on device; any earlier report there was removed" \
           in said.err
    assert f"model + tokenizer  {out} (float32)" in said.out and "  summary  " not in said.out
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"
    assert run.summary["steps"] == 3 and not (out / STAGING_DIR).exists()
    AutoModelForCausalLM.from_pretrained(out)


def test_a_report_that_cannot_be_written_leaves_no_earlier_report_beside_the_new_model(tmp_path, monkeypatch):
    """The first attempt's report (3 steps) stayed beside the model of the resume that trained longer (5 steps)."""
    import errno

    from sftkit import report as report_module

    out = tmp_path / "out"
    train(config(out, "default_train_config.yaml", "--training.save_strategy", "steps", "--training.save_steps", "3"))

    def no_space(history, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report_module, "plot_loss", no_space)
    longer = config(out, "default_train_config.yaml", "--training.max_steps", "5", "--training.resume_from_checkpoint",
                    "true")
    assert train(longer).summary["steps"] == 5
    assert not {"run_summary.json", "README.md", "loss.png"} & {path.name for path in out.iterdir()}
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"


def test_a_resume_that_publishes_a_new_model_removes_the_old_models_before_after_report(tmp_path):
    out = tmp_path / "out"
    train(config(out, "default_train_config.yaml", "--training.save_strategy", "steps", "--training.save_steps", "3"))
    (out / "before_after.md").write_text("fine-tuned 2.322: the step-3 model's")
    record_written(out, ["before_after.md"])  # as sftkit compare records its report
    train(config(out, "default_train_config.yaml", "--training.max_steps", "4", "--training.resume_from_checkpoint",
                 "true"))
    assert not (out / "before_after.md").exists()


def test_a_second_ctrl_c_after_the_publish_keeps_the_run_finished(tmp_path, monkeypatch):
    """A KeyboardInterrupt while the report was written marked the published model's run interrupted, so a resume
    of it was no longer refused, and said to resume it."""
    out = tmp_path / "out"
    finish = export_module.finish_export

    def finish_then_interrupt(*args):
        finish(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "finish_export", finish_then_interrupt)
    with pytest.raises(Interrupted, match=f"stopped at once, after the model was published in {out}$"):
        train(config(out))
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"
    AutoModelForCausalLM.from_pretrained(out)


def test_a_run_killed_while_writing_its_report_has_a_finished_model(tmp_path):
    """A SIGKILL after the publish left status "exporting" beside a whole model: a rerun then asked to continue a
    run that had finished."""
    out = tmp_path / "out"
    script = tmp_path / "sft_killed.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(REPO)!r})
import sftkit.report
sftkit.report.plot_loss = lambda history, path: os._exit(137)
from sftkit.cli import main
raise SystemExit(main())
""")
    args = ["--training.output_dir", str(out), *SHORT, "--training.save_strategy", "steps", "--training.save_steps", "3"]
    assert run_python(str(script), *args, check=False).returncode == 137
    assert json.loads((out / RUN_FILE).read_text())["status"] == "finished"
    AutoModelForCausalLM.from_pretrained(out)
    rerun = run_sft(*args, check=False)
    assert rerun.returncode == 2 and "train it longer with --training.resume_from_checkpoint true" in rerun.stderr


def test_an_export_is_finished_without_the_attention_kernel_the_run_used(lora_run, tmp_path):
    """A GPU run with flash-attn installed records flash_attention_2; merging its adapter on a machine without
    flash-attn (as `sftkit export` may) loads the base with the default kernel and gives the run's merged model."""
    from sftkit.export import _merge_adapter

    run_cfg = ModelConfig(path=str(TINY_MODEL), use_lora=True, attn_implementation="flash_attention_2")
    _merge_adapter(run_cfg, lora_run / ADAPTER_DIR, tmp_path / "merged", torch.float32)
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as merged, \
            safe_open(lora_run / "model.safetensors", "pt") as published:
        for key in published.keys():
            assert torch.equal(merged.get_tensor(key), published.get_tensor(key)), key


def test_the_tensors_a_model_keeps_in_float32_by_design_stay_so_when_its_float32_weights_are_published_in_bf16(
        tmp_path):
    """Full fine-tuning in bf16 trains float32 weights, published in bf16; a DeepSeek-V3 router's gate.weight and
    e_score_correction_bias stay float32, as from_pretrained loads them whatever the dtype (before this, the export
    rounded them to bf16 with the rest)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.for_model("deepseek_v3", vocab_size=64, hidden_size=16, intermediate_size=32,
                                  moe_intermediate_size=8, num_hidden_layers=2, first_k_dense_replace=1,
                                  num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4,
                                  num_experts_per_tok=2, n_group=1, topk_group=1, kv_lora_rank=8, q_lora_rank=8,
                                  qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(tmp_path)
    export_module._cast_float32_weights(tmp_path, torch.bfloat16, trust_remote_code=False)
    saved = load_file(tmp_path / "model.safetensors")
    kept = {name for name, tensor in saved.items() if tensor.dtype == torch.float32}
    assert kept == {"model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"}
    assert {tensor.dtype for name, tensor in saved.items() if name not in kept} == {torch.bfloat16}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").state_dict()
    assert {name for name, tensor in loaded.items() if tensor.dtype == torch.float32} == kept
    assert all(torch.equal(loaded[name], saved[name]) for name in kept)


def test_a_resume_that_publishes_anew_keeps_the_users_files_in_the_adapter_directory(tmp_path):
    """It removed lora_weights/ whole: a backup of the earlier adapter and notes kept there were lost."""
    out = tmp_path / "out"
    saving = ["--training.save_strategy", "steps", "--training.save_steps", "3"]
    train(config(out, "lora_train_config.yaml", *saving))
    adapter = out / ADAPTER_DIR
    earlier = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "NOTES.md").write_text("lr sweep: this one\n")
    (adapter / "adapter_model.safetensors.bak").write_bytes(earlier)
    train(config(out, "lora_train_config.yaml", *saving, "--training.max_steps", "6",
                 "--training.resume_from_checkpoint", "true"))
    assert (adapter / "NOTES.md").read_text() == "lr sweep: this one\n"
    assert (adapter / "adapter_model.safetensors.bak").read_bytes() == earlier
    assert (adapter / "adapter_model.safetensors").read_bytes() != earlier
    assert not (out / STAGING_DIR).exists()


def test_an_adapter_is_merged_only_into_the_base_it_trained_on(tmp_path):
    """`sftkit export` merged a kept adapter into whatever model lay at the base's path by then, and said finished."""
    from safetensors.torch import load_file, save_file

    base, out = tmp_path / "base", tmp_path / "out"
    shutil.copytree(TINY_MODEL, base)
    cfg = config(out, "lora_train_config.yaml", "--model.path", str(base))
    run = train(cfg)
    weights = load_file(base / "model.safetensors")
    original = (base / "model.safetensors").read_bytes()
    save_file({name: tensor + 0.01 for name, tensor in weights.items()}, base / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(RunFailed, match=f"the base model {base} changed since the run trained on it "
                                        r"\(model.safetensors\): merging the adapter into it would publish other"):
        export_float32(run.trainer, cfg, run.trainer.processing_class)
    assert (out / STAGING_DIR / ADAPTER_DIR / "adapter_model.safetensors").is_file()
    shutil.move(base, tmp_path / "moved")
    refused = run_here(export_main, str(out), check=False)
    assert refused.returncode == 1 and f"the base model {base} that the adapter trained on is gone" in refused.stderr
    shutil.move(tmp_path / "moved", base)
    (base / "model.safetensors").write_bytes(original)
    assert run_here(export_main, str(out)).returncode == 0 and not (out / STAGING_DIR).exists()


def test_weights_that_cannot_be_written_at_all_are_said_to_be_lost_and_leave_nothing_that_looks_trained(small_disk,
                                                                                                        monkeypatch):
    """The error said only that the adapter could not be written, beside a staging directory of its tokenizer and
    config alone."""
    out = small_disk / "out"
    cfg = config(out, "lora_train_config.yaml")
    run = train(cfg)
    with contextlib.suppress(OSError), (small_disk / "filler").open("wb") as handle:
        while True:
            handle.write(b"\0" * 2**16)
    monkeypatch.setattr(export_module, "DISK_WAIT_SECONDS", 0)
    with pytest.raises(RunFailed) as failure:
        export_float32(run.trainer, cfg, run.trainer.processing_class)
    assert str(failure.value).startswith(f"could not write the trained adapter to {out / STAGING_DIR}: ")
    assert str(failure.value).endswith(", so no trained weights were saved; no checkpoint was saved (set "
                                       "training.save_strategy: steps to keep some)")
    assert not (out / STAGING_DIR).exists()


def test_finishing_an_export_names_a_missing_directory_and_a_finished_one(monitored_run, tmp_path, capsys):
    """Both were "has no unfinished export to finish (... or its run record is missing)", which sent a user with a
    typo in the path, or with a model that was fine, looking for a lost run record."""
    assert export_main([str(tmp_path / "typo")]) == 2
    assert capsys.readouterr().err == (f"python -m sftkit.export: error: {tmp_path / 'typo'}: no such directory; give "
                                       "the training.output_dir of the run whose export failed\n")
    assert export_main([str(monitored_run.out)]) == 2
    assert capsys.readouterr().err == (f"python -m sftkit.export: error: {monitored_run.out}: its export finished "
                                       "already; the model there is complete\n")


def test_finishing_the_export_of_a_stopped_run_names_its_newest_checkpoint(tmp_path, monkeypatch, capsys):
    """A run stopped before its end was told "(... or its run record is missing)", with its record right there."""
    from test_monitor import signal_at

    out = tmp_path / "out"
    signal_at(monkeypatch, "on_step_end", 2)
    with pytest.raises(Interrupted):
        train(config(out, "default_train_config.yaml", "--training.save_strategy", "steps", "--training.save_steps",
                     "1"))
    capsys.readouterr()
    assert export_main([str(out)]) == 2
    assert capsys.readouterr().err == (f"python -m sftkit.export: error: {out} has no unfinished export to finish (no "
                                       f"{STAGING_DIR} there); the newest checkpoint is {out / 'checkpoint-2'} (step "
                                       "2)\n")


def notes_written_during(monkeypatch, step: str, notes: Path, text: str) -> None:
    """The user writes `notes` as the run reaches `step` (a function of sftkit.train's)."""
    import sftkit.train as train_module

    original = getattr(train_module, step)

    def with_notes(*args):
        notes.write_text(text)
        return original(*args)

    monkeypatch.setattr(train_module, step, with_notes)


def test_files_put_in_output_dir_as_the_run_prepares_its_data_are_never_replaced(tmp_path, monkeypatch):
    """Between the check of output_dir and the start of training (tokenizing, loading the model: minutes to hours),
    a README.md written there was taken for the earlier run's, and the export replaced it with the model card."""
    out = tmp_path / "out"
    notes_written_during(monkeypatch, "tokenizer_and_data", out / "README.md", "# my notes\n")
    with pytest.raises(RunFailed, match=r"under names the export writes \(README.md\)"):
        train(config(out))
    assert (out / "README.md").read_text() == "# my notes\n"


def test_files_the_user_puts_in_output_dir_while_the_run_trains_are_never_replaced(tmp_path, monkeypatch):
    """Notes written into README.md during a run (hours on a real model) became the model card, and a config.json put
    there before `sftkit export` became the model's: the check ran only as the run started."""
    out = tmp_path / "out"
    notes_written_during(monkeypatch, "_final_reply", out / "README.md", "# my notes: lr sweep 3 of 5\n")  # at the end
    with pytest.raises(RunFailed, match=f"{out} holds files made or changed since the run began, under names the "
                                        r"export writes \(README.md\): they are not the run's, so nothing was "
                                        f"replaced. The checked model is kept in {out / STAGING_DIR}"):
        train(config(out))
    assert (out / "README.md").read_text() == "# my notes: lr sweep 3 of 5\n" and not (out / "config.json").exists()
    (out / "README.md").rename(tmp_path / "notes.md")
    (out / "config.json").write_text('{"mine": true}')  # and another, before the export is finished
    assert export_main([str(out)]) == 1 and json.loads((out / "config.json").read_text()) == {"mine": True}
    (out / "config.json").unlink()
    assert export_main([str(out)]) == 0
    assert (out / "model.safetensors").is_file() and "sftkit" in (out / "README.md").read_text()


def test_a_model_whose_tokenizer_ships_its_own_code_exports(tmp_path):
    """The export read the saved tokenizer back without trust_remote_code, to list its end-of-turn token: every run
    of such a model (GLM-4, InternLM2, Baichuan2) failed its export, and `sftkit export` could never finish it."""
    base = tmp_path / "base"
    shutil.copytree(TINY_MODEL, base)
    (base / "tok.py").write_text("from transformers import PreTrainedTokenizerFast\n\n\n"
                                 "class MyTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    settings = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**settings, "auto_map": {
        "AutoTokenizer": [None, "tok.MyTokenizer"]}}))
    out = tmp_path / "out"
    result = run_python("sft.py", "--model.path", str(base), "--model.trust_remote_code", "true",
                        "--training.output_dir", str(out), *SHORT, stdin=subprocess.DEVNULL)
    assert (out / "model.safetensors").is_file() and "custom code" not in result.stderr, result.stderr[-2000:]


def test_a_run_that_pushes_each_checkpoint_publishes_over_the_trainers_copies(tmp_path, monkeypatch):
    """The Trainer copies each checkpoint's model and tokenizer into output_dir to push them (hub_strategy
    every_save): the export took them for the user's files, made during the run, and every such run failed."""
    import concurrent.futures
    import types

    import transformers.trainer

    class Hub:  # the hub's side, offline: the repo and the uploads the Trainer asks for
        def create_repo(self, name, **kwargs):
            return types.SimpleNamespace(repo_id=f"me/{name}")

        def upload_folder(self, **kwargs):
            done = concurrent.futures.Future()
            done.set_result(None)
            return done

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: Hub())
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    out = tmp_path / "out"
    train(config(out, "default_train_config.yaml", "--training.push_to_hub", "true", "--training.hub_strategy",
                 "every_save", "--training.save_strategy", "steps", "--training.save_steps", "2"))
    assert (out / "model.safetensors").is_file() and json.loads((out / RUN_FILE).read_text())["status"] == "finished"


def test_the_saved_configs_keep_the_base_models_use_cache(tmp_path):
    """The Trainer turns use_cache off for training, and the published config.json and every checkpoint's said
    false: a plain forward of the fine-tuned model returned no cache, where the base's did."""
    out = tmp_path / "out"
    train(config(out, "default_train_config.yaml", "--training.save_strategy", "steps", "--training.save_steps", "2"))
    base = json.loads((TINY_MODEL / "config.json").read_text())["use_cache"]
    assert base is True
    for model_dir in (out, out / "checkpoint-2"):
        assert json.loads((model_dir / "config.json").read_text())["use_cache"] is base, model_dir
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).past_key_values is not None


def test_an_export_killed_while_writing_the_best_checkpoints_weights_is_finished_from_that_checkpoint(tmp_path,
                                                                                                     capsys):
    """Under load_best_model_at_end `sftkit export` said that no checkpoint held the run's last step, "so there is no
    trained model to finish", and removed the staging, while the best checkpoint, which the trainer state names,
    was on disk (here it is also the last step's)."""
    out = tmp_path / "out"
    killed_in_the_export(tmp_path, "--training.output_dir", str(out), *SHORT, "--training.save_strategy", "steps",
                         "--training.save_steps", "1", "--training.eval_strategy", "steps", "--training.eval_steps",
                         "1", "--training.load_best_model_at_end", "true", "--dataset.test_size", "0.05", cut=True)
    best = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["best_global_step"]
    capsys.readouterr()
    assert export_main([str(out)]) == 0, capsys.readouterr().err
    assert f"taking them from {out / f'checkpoint-{best}'}, the run's " in capsys.readouterr().out
    with safe_open(out / f"checkpoint-{best}" / "model.safetensors", "pt") as trained, \
            safe_open(out / "model.safetensors", "pt") as weights:
        assert all(torch.equal(weights.get_tensor(name), trained.get_tensor(name)) for name in trained.keys())


def test_a_lora_run_can_publish_its_adapter_alone_and_merge_it_later(tmp_path):
    """A base too large for the machine's memory could not be merged at the end (the system killed the run there):
    model.merge_adapter: false publishes the adapter alone, which chat loads from the run's directory and
    `sftkit export --merge` merges later, where memory allows."""
    from sftkit.inference import load_for_inference

    base, out = tmp_path / "base", tmp_path / "out"
    shutil.copytree(TINY_MODEL, base)
    result = run_sft("--config", "configs/lora_train_config.yaml", "--model.path", str(base), "--training.output_dir",
                     str(out), *SHORT, "--model.merge_adapter", "false")
    adapter = (out / ADAPTER_DIR / "adapter_model.safetensors").read_bytes()
    assert not (out / "config.json").exists() and not list(out.glob("model*.safetensors"))
    assert (out / "tokenizer.json").is_file() and not (out / STAGING_DIR).exists()
    assert f"tokenizer          {out} (the adapter alone is published: model.merge_adapter is false)" in result.stdout
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["merged"] is False and summary["saved_dtypes"] == [] and summary["adapter_dtypes"] == ["float32"]
    assert "AutoPeftModelForCausalLM.from_pretrained(\"path/to/this/directory/lora_weights\")" in \
        (out / "README.md").read_text()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        published, _ = load_for_inference(str(out))  # the run's directory: the adapter on its base
        expected = published(ids).logits
        assert isinstance(published, PeftModel)
        assert torch.equal(expected, load_for_inference(str(out / ADAPTER_DIR))[0](ids).logits)

    finished = run_here(export_main, str(out), check=False)
    assert finished.returncode == 2 and "--merge merges the adapter it published alone" in finished.stderr
    (base / "model.safetensors").rename(tmp_path / "away")  # a base changed since: refused before any merging
    refused = run_here(export_main, str(out), "--merge", check=False)
    assert refused.returncode == 2 and f"the base model {base} changed since the run trained on it" in refused.stderr
    assert refused.stderr.rstrip().endswith("put the base back as it was, then merge again")
    assert not (out / STAGING_DIR).exists() and not (out / "config.json").exists()
    (tmp_path / "away").rename(base / "model.safetensors")
    (out / STAGING_DIR).mkdir()  # a merge killed part way: its partial files only
    (out / STAGING_DIR / "model.safetensors").write_bytes(b"cut")
    cut = run_here(export_main, str(out), check=False)
    assert cut.returncode == 2 and "a merge of its adapter (--merge) was cut short there" in cut.stderr
    assert cut.stderr.rstrip().endswith(f"the adapter is whole: merge again with: python -m sftkit.export {out} "
                                        "--merge")
    (out / "README.md").write_text((out / "README.md").read_text() + "\nMy own notes.\n")  # the user's card now
    card = (out / "README.md").read_text()

    assert run_here(export_main, str(out), "--merge").returncode == 0
    assert not (out / STAGING_DIR).exists() and (out / "README.md").read_text() == card  # the user's, untouched
    assert (out / ADAPTER_DIR / "adapter_model.safetensors").read_bytes() == adapter
    again = run_here(export_main, str(out), "--merge", check=False)
    assert again.returncode == 2 and "holds a merged model already (config.json)" in again.stderr


def test_merging_later_adds_a_line_to_the_card_the_run_wrote(tmp_path):
    out = tmp_path / "out"
    run_sft("--config", "configs/lora_train_config.yaml", "--training.output_dir", str(out), *SHORT,
            "--model.merge_adapter", "false")
    assert "library_name: peft" in (out / "README.md").read_text()
    assert run_here(export_main, str(out), "--merge").returncode == 0
    assert (out / "README.md").read_text().endswith("The merged model was published here since, by `python -m "
                                                    "sftkit.export --merge`: it loads with `AutoModelForCausalLM."
                                                    "from_pretrained(\"path/to/this/directory\")`.\n")
    full = tmp_path / "full"
    run_sft("--training.output_dir", str(full), *SHORT)
    refused = run_here(export_main, str(full), "--merge", check=False)
    assert refused.returncode == 2 and "(a full fine-tuning): there is no adapter to merge" in refused.stderr


def test_a_merge_the_free_memory_cannot_hold_keeps_the_adapter_and_is_finished_later(tmp_path, monkeypatch):
    """The check before training counts the machine's memory; by the end, other processes (or the run's own host copy
    of the model under ZeRO-3 offload) may hold part of it, and the system killed the run in the merge, without a
    word. The memory free is read before the base is loaded: the adapter is kept, with the way to finish."""
    from sftkit import environment
    from sftkit.model import parameter_count

    out, meminfo = tmp_path / "out", tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24684092 kB\nMemAvailable:        1024 kB\nSwapFree:           1024 kB\n")
    monkeypatch.setattr(environment, "MEMINFO", meminfo)
    monkeypatch.setattr(environment, "CGROUP_MEMORY_LIMITS", ())
    failed = run_sft("--config", "configs/lora_train_config.yaml", "--training.output_dir", str(out), *SHORT,
                     check=False)
    base = parameter_count(ModelConfig(path=str(TINY_MODEL))) * 4
    kept = out / STAGING_DIR / ADAPTER_DIR
    assert failed.returncode == 1 and not (out / "config.json").exists()
    assert (f"merging the adapter loads its whole base, unquantized: about {size_words(base)} in float32, and 2.0 "
            f"MiB of memory is free now (free memory, or finish on a machine with more). The trained adapter is kept "
            f"in {kept}; once that is fixed, finish the export with: python -m sftkit.export {out}") in failed.stderr
    assert (kept / "adapter_model.safetensors").is_file()

    meminfo.write_text(f"MemAvailable: {base // 1024 + 1} kB\n")  # room for the base: the export finishes
    assert run_here(export_main, str(out)).returncode == 0
    assert (out / "config.json").is_file() and not (out / STAGING_DIR).exists()
    alone = tmp_path / "alone"  # and --merge, later, of an adapter published alone
    run_sft("--config", "configs/lora_train_config.yaml", "--training.output_dir", str(alone), *SHORT,
            "--model.merge_adapter", "false")
    meminfo.write_text(f"MemAvailable: {base // 1024 - 1} kB\n")
    refused = run_here(export_main, str(alone), "--merge", check=False)
    assert refused.returncode == 1 and "is free now (free memory, or finish on a machine with more); nothing was " \
        "published and the adapter is as it was" in refused.stderr
    assert not (alone / "config.json").exists() and not (alone / STAGING_DIR).exists()


def test_a_merge_the_machines_memory_cannot_hold_is_refused_before_training():
    """The merge loads the whole base unquantized: an 8B model in bf16 beside the process, on a 16 GiB machine."""
    lora = ModelConfig(path="meta-llama/Llama-3.1-8B-Instruct", use_lora=True)
    base, adapter = 8_030_261_248, 41_943_040
    problem = export_module.merge_memory_problem(lora, base + adapter, adapter, torch.bfloat16, 16 * 2**30)
    assert problem == ("model.merge_adapter: merging the adapter into its base at the end loads the whole base, "
                       "unquantized, into host memory: about 16.96 GiB in bfloat16, and this machine has 16.00 GiB; "
                       "set model.merge_adapter: false to publish the adapter alone (and merge it where memory "
                       "allows, with: python -m sftkit.export OUTPUT_DIR --merge), or train on a machine with more "
                       "memory")
    assert export_module.merge_memory_problem(lora, base + adapter, adapter, torch.bfloat16, 32 * 2**30) is None
    alone = ModelConfig(path=lora.path, use_lora=True, merge_adapter=False)
    assert export_module.merge_memory_problem(alone, base + adapter, adapter, torch.bfloat16, 16 * 2**30) is None
