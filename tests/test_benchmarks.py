"""The benchmark scripts keep working: they produce their tables and files (timings are not asserted here)."""

import json
import re
import runpy
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow
FIGURES = ["wall_ratio", "step_time_ratio", "preprocess_ratio", "nonpad_share_packed", "nonpad_share_unpacked",
           "config_error_seconds", "peak_rss_ratio"]


def test_quick_benchmark_writes_every_figure(tmp_path):
    # One repetition: what is checked here is that every figure is written and is the ratio its raw numbers give.
    result = subprocess.run([sys.executable, "benchmarks/run.py", "--quick", "--repeats", "1", "--results", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    [json_file] = tmp_path.glob("*.json")
    report = json.loads(json_file.read_text())
    assert all(isinstance(report[name], float) for name in FIGURES)  # values are timings: not asserted
    # ...but every ratio is the one its raw measurements give (a benchmark that mislabels or inverts a ratio fails)
    raw = report["raw"]
    median = raw["training"]["median"]
    assert report["wall_ratio"] == pytest.approx(median["ours"]["wall"] / median["baseline"]["wall"])
    assert report["peak_rss_ratio"] == pytest.approx(median["ours"]["rss"] / median["baseline"]["rss"])
    preprocessing = raw["preprocessing"]
    assert report["preprocess_ratio"] == pytest.approx(
        preprocessing["ours_rows_per_second"] / preprocessing["trl_rows_per_second"])
    for turns, measured in raw["preprocessing_by_turns"].items():
        rates = measured["rows_per_second"]
        assert report["preprocess_ratio_by_turns"][turns] == pytest.approx(rates["ours"] / rates["plain"])
    assert report["nonpad_share_packed"] > report["nonpad_share_unpacked"] > 0
    assert len(report["raw"]["training"]["raw"]["ours"]["wall"]) == report["repeats"] == 1
    table = json_file.with_suffix(".md").read_text()
    assert all(f"| {name} |" in table for name in FIGURES) and table in result.stdout
    by_turns = report["preprocess_ratio_by_turns"]  # masking against one plain tokenization, by turns per row
    assert list(by_turns) == ["1", "4", "16", "64"]
    assert all(isinstance(ratio, float) and ratio > 0 for ratio in by_turns.values())
    assert all(f"| preprocess_ratio_by_turns[{turns}] |" in table for turns in by_turns)
    by_calls = report["preprocess_ratio_by_calls"]  # the same for agent traces with tools, by calls per row
    assert list(by_calls) == ["1", "4", "16"]
    for calls, measured in raw["preprocessing_by_calls"].items():
        rates = measured["rows_per_second"]
        assert by_calls[calls] == pytest.approx(rates["ours"] / rates["plain"]) and rates["tokenized_prefixes"] > 0
    assert all(f"| preprocess_ratio_by_calls[{calls}] |" in table for calls in by_calls)


def test_gpu_script_runs_its_tiny_shape_anywhere(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--results", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*gpu-tiny.json")).read_text())
    assert set(report["model_build_seconds"]) == {"tiny"} and report["model_build_seconds"]["tiny"] > 0
    attention = report["variants"].pop("attention-kernels")
    assert set(report["variants"]) == {"lora-trl-same-settings", "lora-sftkit-no-liger", "lora-sftkit-profile",
                                       "lora-sftkit-torch-varlen", "qlora-8b-example"}
    assert all(v.get("tokens_per_second", 0) > 0 and v["variant_seconds"] > 0 for v in report["variants"].values()), report
    for variant in report["variants"].values():  # where each variant's time went, in its own process
        phases = variant["seconds"]
        assert phases["setup"] > 0 and phases["warmup_steps"] > 0 and phases["measured"] > 0
        assert sum(phases.values()) < variant["variant_seconds"]
    kernels = report["variants"]["lora-sftkit-profile"]["profile"]  # on a CPU, operators: matmuls among the first
    assert 0 < sum(k["share"] for k in kernels) <= 1 and any(k["name"] == "aten::mm" for k in kernels[:5]), kernels
    table = next(tmp_path.glob("*gpu-tiny.md")).read_text()
    ours, fair = (report["variants"][name]["tokens_per_second"] for name in ("lora-sftkit-no-liger",
                                                                           "lora-trl-same-settings"))
    assert f"| lora-sftkit-no-liger | {ours:,.0f} |  | {ours / fair:.2f} |" in table  # no defaults baseline here
    # attention alone on packed micro-batches: each way timed, sdpa's backend named, torch_varlen equal to the mask
    assert set(attention["forward_backward_ms"]) == {"sdpa-block-mask", "sdpa-causal-no-mask", "torch_varlen"}
    assert all(ms > 0 for ms in attention["forward_backward_ms"].values())
    assert set(attention["sdpa_backend"].values()) <= {"MATH", "FLASH_ATTENTION", "EFFICIENT_ATTENTION",
                                                       "CUDNN_ATTENTION"}
    assert attention["errors"] == {} and attention["torch_varlen_max_abs_difference"] < 1e-4  # float32 on a CPU
    assert attention["conversations_per_micro_batch"] > 1 and 0 < attention["own_conversation_pair_share"] < 1
    assert "Attention alone" in table and f"{attention['forward_backward_ms']['torch_varlen']:.2f} ms" in table
    assert table in result.stdout
    assert report["variants"]["qlora-8b-example"]["dry_run_estimate_gib"] > 0  # each sftkit variant's estimate
    assert report["variants"]["lora-trl-same-settings"]["dry_run_estimate_gib"] is None
    import torch

    assert report["versions"]["torch"] == torch.__version__ and "liger-kernel" in report["versions"]


def test_memory_benchmark_sets_the_estimate_against_real_runs():
    result = subprocess.run([sys.executable, "benchmarks/memory.py", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("tiny")]
    assert [line.split()[2] for line in lines] == ["full", "LoRA", "QLoRA"]
    for line in lines:
        estimate, measured = (int(n.replace(",", "")) for n in re.findall(r"(?:estimate|measured) +([\d,]+) MiB", line))
        assert estimate > 0 and measured > 0 and f"ratio {measured / estimate:.2f}" in line
        # measured 1.6-3.3x on the 2-core VM (4.2x before the loss buffers were counted): the estimate is calibrated on GPU peaks (bf16, cuDNN attention), and
        # RSS growth on a CPU also counts the allocator's slack and fp32 CPU kernels; a gross error in the estimate
        # (a term left out, or counted in KiB or bits) still falls outside
        assert 0.5 < measured / estimate < 6, line


def test_gpu_script_runs_its_core_set_by_default_and_every_variant_with_all(tmp_path):
    def planned(*flags):
        subprocess.run([sys.executable, "benchmarks/gpu.py", "--budget", "0", "--results", str(tmp_path), *flags],
                       cwd=REPO, check=True, capture_output=True, timeout=300)
        return list(json.loads(next(tmp_path.glob("*gpu.json")).read_text())["variants"])

    core = list(runpy.run_path(str(REPO / "benchmarks" / "gpu.py"))["CORE"])
    assert planned() == core
    every = planned("--all")
    assert every[:len(core)] == core and len(every) > len(core) + 10
    assert {"tinyllama-1.1b-lora-example", "qwen2.5-1.5b-full-example", "lora-sftkit-profile"} <= set(every)


def test_gpu_script_skips_what_would_start_past_its_budget_and_says_so(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/gpu.py", "--tiny", "--budget", "0", "--results", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(next(tmp_path.glob("*gpu-tiny.json")).read_text())
    assert report["variants"] and all(v == {"skipped": "past the budget of 0 s"} for v in report["variants"].values())


@pytest.mark.slow
def test_the_compile_time_benchmark_sets_regional_compilation_beside_the_whole_model(tmp_path):
    result = subprocess.run([sys.executable, "benchmarks/compile_time.py", "--results", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in result.stdout.splitlines()
            if line.startswith("| whole") or line.startswith("| each")}
    assert set(rows) == {"whole model", "each layer (regional)"} and rows["whole model"][2] == "1.00"
    whole, regional = (json.loads(rows[name][3].rstrip(" |")) for name in ("whole model", "each layer (regional)"))
    assert regional == pytest.approx(whole, rel=0.05)  # the same training; bf16 kernels round apart (1.2% seen)
    assert next(tmp_path.glob("*-compile-time.md")).read_text() in result.stdout
