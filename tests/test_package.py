"""sftkit as an installed package: the wheel carries the configs and the embedded model, the `sftkit` command trains
from any directory, `sftkit init` writes a config to edit, `python -m sftkit` is the same command."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install .` of a wheel built from this checkout, into a prefix of its own (the dependencies are this
    environment's), and the environment to run its `sftkit` command with."""
    root = tmp_path_factory.mktemp("installed")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "wheel"),
                    str(REPO)], check=True, capture_output=True)
    wheel = next((root / "wheel").glob("sftkit-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--prefix", str(root / "prefix"), str(wheel)],
                   check=True, capture_output=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(root / "prefix")}))
    env = {**os.environ, "PYTHONPATH": str(site), "PATH": f"{root / 'prefix' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    work = root / "elsewhere"  # not the checkout: nothing may be found through the working directory
    work.mkdir()
    return env, site, work


def sftkit(installed, *args, timeout=300):
    env, _, work = installed
    return subprocess.run(["sftkit", *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_the_configs_and_the_embedded_model(installed):
    _, site, _ = installed
    project = site / "sftkit" / "project"
    assert (project / "configs" / "default_train_config.yaml").is_file()
    assert (project / "configs" / "presets" / "fast_test.yaml").is_file()
    assert (project / "data" / "tiny-chat-llama" / "model.safetensors").is_file()
    assert (project / "accelerate_configs" / "deepspeed_zero3.yaml").is_file()


def test_sftkit_train_from_another_directory_trains_the_default_model(installed):
    _, site, work = installed
    result = sftkit(installed, "train", "--training.output_dir", "out", "--training.max_steps", "3",
                    "--training.logging_steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((work / "out" / "run_summary.json").read_text())
    assert summary["steps"] == 3 and summary["train_loss_last"] < summary["train_loss_first"]
    assert f"config {site / 'sftkit' / 'project' / 'configs' / 'default_train_config.yaml'}" in result.stdout
    bare = sftkit(installed, "train", "lora_train_config", "--dry-run")  # a shipped config by its bare name
    assert bare.returncode == 0 and "LoRA" in bare.stdout, bare.stderr[-2000:]


def test_sftkit_init_writes_a_config_that_trains(installed):
    _, _, work = installed
    made = sftkit(installed, "init", "my_run", "--from", "default")
    assert made.returncode == 0 and "suit the embedded tiny model: for a real one use about 2048, 1-3 and 2e-4 " \
        "(LoRA) or 2e-5 (full)" in made.stdout, "the copy's toy settings, named where the user edits it"
    written = (work / "my_run.yaml").read_text()
    assert written.startswith("# Full fine-tuning of the embedded tiny Llama model")
    assert "#   sftkit train my_run.yaml\n" in written and "default_train_config.yaml" not in written, written[:800]
    assert "sft.py" not in written.split("model:")[0], "sft.py is in the repo only"
    again = sftkit(installed, "init", "my_run")
    assert again.returncode == 2 and "my_run.yaml exists already" in again.stderr
    dry = sftkit(installed, "train", "my_run.yaml", "--dry-run")
    assert dry.returncode == 0 and "Dry run of my_run.yaml" in dry.stdout, dry.stderr[-2000:]


def test_python_dash_m_sftkit_is_the_same_command(installed):
    env, _, work = installed
    result = subprocess.run([sys.executable, "-m", "sftkit", "--help"], cwd=work, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "train [CONFIG]" in result.stdout
    wrong = sftkit(installed, "trian")
    assert wrong.returncode == 2 and "sftkit: error: unknown command 'trian' (did you mean 'train'?); the commands are train," in wrong.stderr
