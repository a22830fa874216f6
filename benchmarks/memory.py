"""The dry run's memory estimate against what a real run uses, side by side.

    python benchmarks/memory.py            # the tiny model and a 60M-parameter Llama, full / LoRA / QLoRA
    python benchmarks/memory.py --quick    # the tiny model only

Each case is estimated in this process (sftkit.plan, as `--dry-run` does) and then trained for a few steps in its
own process. On a GPU the measured figure is torch's peak allocated memory, which is what the estimate models. On
a CPU there is no such counter: the measured figure is the peak RSS minus the RSS just before the first step,
set against the estimate minus the weights (which are already loaded at that point).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MIB = 2**20
METHODS = {"full": "default_train_config.yaml", "LoRA": "lora_train_config.yaml", "QLoRA": "qlora_train_config.yaml"}


def random_llama(directory: Path) -> Path:
    """A 60M-parameter Llama with the tiny model's tokenizer and random weights (no download)."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    shutil.copytree(ROOT / "data" / "tiny-chat-llama", directory, ignore=shutil.ignore_patterns("*.safetensors"))
    config = LlamaConfig.from_pretrained(directory)
    config.update({"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12,
                   "num_key_value_heads": 12, "head_dim": 64})
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def measure(config_name: str, overrides: list[str], workdir: Path) -> dict:
    from sftkit.config import load_config
    from sftkit.plan import build_plan

    out = workdir / f"run-{len(list(workdir.iterdir()))}"
    overrides = overrides + ["--training.output_dir", str(out), "--training.max_steps", "6", "--dataset.test_size",
                             "null", "--training.logging_steps", "3"]
    estimate = build_plan(load_config(config_name, overrides)).memory
    result = subprocess.run([sys.executable, "sft.py", "--config", config_name, *overrides], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    summary = json.loads((out / "run_summary.json").read_text())
    total = estimate.peak / MIB
    if "gpu_peak" in summary["peak_memory_mib"]:
        return {"estimate_mib": round(total), "measured_mib": summary["peak_memory_mib"]["gpu_peak"],
                "what": "GPU peak allocated"}
    before = summary["memory_before_training_mib"]["mem_rss_mib"]
    return {"estimate_mib": round(total - estimate.weights / MIB), "measured_mib":
            summary["peak_memory_mib"]["rss_peak"] - before, "what": "CPU: RSS growth during training"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model only")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp) / "runs"
        workdir.mkdir()
        models = {"tiny (0.9M)": []}
        if not args.quick:
            models["random Llama (60M)"] = ["--model.path", str(random_llama(Path(tmp) / "llama60m"))]
        for model, model_overrides in models.items():
            for method, config_name in METHODS.items():
                measured = measure(config_name, model_overrides, workdir)
                rows.append((model, method, measured))
                print(f"{model:<20} {method:<6} estimate {measured['estimate_mib']:>6,} MiB  measured "
                      f"{measured['measured_mib']:>6,} MiB  ratio {measured['measured_mib'] / max(measured['estimate_mib'], 1):.2f}"
                      f"  ({measured['what']})", flush=True)


if __name__ == "__main__":
    main()
