"""The commands of the README, run as a user runs them: `accelerate launch sft.py` and `python sft.py`."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, assistant_replies

from sftkit.layout import SUMMARY_FILE

ACCELERATE = str(Path(sys.executable).parent / "accelerate")


def launch(command: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_default_job_learns_the_sample_data_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "default"
    result = launch([ACCELERATE, "launch", "--num_processes", "1", "sft.py", "--training.output_dir", str(out)], REPO)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["train_loss_last"] < summary["train_loss_first"] / 3, summary
    assert summary["sample_reply"] in assistant_replies(), summary["sample_reply"]
    assert sum(summary["rows_dropped"].values()) == 0
    for line in ("train loss", "eval loss", "tokens", "rows", "parameters", "peak memory", "loss plot", str(out)):
        assert line in result.stdout
    assert "Traceback" not in result.stderr
    assert_readme_transcript_matches(result.stdout.replace(str(out), "outputs/default"))
    AutoTokenizer.from_pretrained(out)
    AutoModelForCausalLM.from_pretrained(out)


# What varies from run to run (speed, memory, time) is compared as a placeholder; everything else, the words, the
# counts (integers) and the sample reply, must be what the README shows. Decimal numbers (losses, learning rates,
# gradient norms) are compared within LOSS_BAND: the order of a CPU's float sums depends on its instructions (AVX2
# or AVX-512, the BLAS library's code path), and 228 steps carry the differences into the second digit. Measured
# from a clean clone: a mean loss of 0.471 on the AVX-512 AMD EPYC whose run the README shows, 0.459 on the CPU
# earlier READMEs were measured on, 0.463 on the EPYC with ATen and MKL held to AVX2; the step-220 loss 0.1583, 0.1405
# and 0.1392.
VARIES = [(re.compile(r"[\d,]+ tok/s"), "N tok/s"), (re.compile(r"mem [\d,]+ MiB \(peak [\d,]+\)"), "mem N"),
          (re.compile(r"wall time .*"), "wall time N"), (re.compile(r"\([\d,]+/s\)"), "(N/s)"),
          (re.compile(r"rss peak [\d,]+ MiB"), "rss peak N MiB"), (re.compile(r"config \S+"), "config C")]
DECIMAL = re.compile(r"\d+\.\d+(?:e[-+]\d+)?")
LOSS_BAND = 0.25  # relative


def readme_transcript() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("The first command prints", 1)[1].split("```", 2)[1]
    return [line for line in block.splitlines()[1:] if line.strip() and line != "..." and "it/s]" not in line]


def assert_readme_transcript_matches(stdout: str):
    def normal(line: str) -> str:
        for pattern, placeholder in VARIES:
            line = pattern.sub(placeholder, line)
        return line.rstrip()

    def within_band(shown: str, printed: str) -> bool:
        return DECIMAL.sub("D", shown) == DECIMAL.sub("D", printed) and all(
            abs(float(a) - float(b)) <= LOSS_BAND * abs(float(a))
            for a, b in zip(DECIMAL.findall(shown), DECIMAL.findall(printed)))

    printed = [normal(line) for line in stdout.splitlines()]
    missing = [line for line in readme_transcript()
               if not any(within_band(normal(line), other) for other in printed)]
    assert not missing, f"the README's transcript is not what the default job prints: {missing}"


@pytest.mark.slow
def test_bare_config_name_works_from_any_directory(tmp_path):
    out = tmp_path / "lora"
    launch([sys.executable, str(REPO / "sft.py"), "--config", "lora_train_config.yaml",
            "--training.max_steps", "3", "--training.output_dir", str(out)], tmp_path)
    assert (out / "lora_weights" / "adapter_model.safetensors").exists()
    assert (out / "model.safetensors").exists()


def test_accelerate_asked_for_several_processes_that_start_one_is_refused_before_loading(tmp_path):
    """Without a launch config for several processes, Accelerate starts one on a CPU (or one GPU): it trained alone,
    with half the batch asked for, and nothing said so."""
    out = tmp_path / "out"
    result = subprocess.run([ACCELERATE, "launch", "--num_processes", "2", "sft.py", "--training.output_dir", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert ("sft.py: error: accelerate launch --num_processes 2 started 1 process: without a launch config for several "
            "processes Accelerate runs one here; add --config_file accelerate_configs/cpu_ddp_2proc.yaml"
            ) in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_bad_data_fails_before_any_weight_loads_with_one_line(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Yo"}]}) + "\n")
    result = subprocess.run([sys.executable, str(REPO / "sft.py"), "--dataset.name", str(data), "--dataset.test_size", "null",
                             "--training.output_dir", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"sft.py: error: dataset {data} line 1: message 1 has role 'robot'; expected one of system, user, assistant, tool"
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow
def test_inspect_needs_no_weights_and_shows_what_trains(tmp_path):
    import shutil

    from conftest import TINY_MODEL

    tokenizer_only = tmp_path / "tokenizer-only"
    shutil.copytree(TINY_MODEL, tokenizer_only, ignore=shutil.ignore_patterns("*.safetensors"))
    result = subprocess.run([sys.executable, str(REPO / "sft.py"), "--inspect", "2", "--model.path", str(tokenizer_only),
                             "--dataset.test_size", "null"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    for line in ("rows read          320", "rows dropped       0 bad rows", "rows kept          320 train",
                 "tokens per row     min", "tokens that train", "rows truncated     0 longer than max_seq_length 256"):
        assert line in out
    assert out.count("--- sample") == 2
    assert "[[The capital of France is Paris.<|im_end|>]]" in out  # the first row's first reply, and only that
    assert "[[Which city" not in out


@pytest.mark.parametrize(("args", "expected"), [
    (["--inspect", "-1"], "sft.py: error: argument --inspect: -1 samples; give 0 or more"),
    (["--dry-run", "--inspect", "2"], "sft.py: error: --dry-run and --inspect each read the data and exit; give one "
                                      "of them"),
    (["chat", "configs"], "sftkit chat: error: "),  # sftkit's command, as `sft.py env` is (it read "chat" as a config)
])
def test_sft_py_refuses_what_it_would_drop_and_runs_sftkits_commands(args, expected):
    from conftest import run_sft

    result = run_sft(*args, check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr
