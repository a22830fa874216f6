"""How long a compiled run takes from start to finish, the whole model compiled (sftkit's default) against each
decoder layer compiled once (Accelerate's regional compilation, ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=1), each
in a fresh process with an empty compile cache, side by side with the first and last losses both logged.

    python benchmarks/compile_time.py              # the tiny LoRA model, packed, bf16: minutes on a CPU
    python benchmarks/compile_time.py --model.path meta-llama/Llama-3.2-1B --model.max_seq_length 2048   # a GPU
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ["--training.max_steps", "12", "--training.logging_steps", "4", "--dataset.test_size", "null",
            "--training.packing", "true", "--training.torch_compile", "true", "--training.bf16", "true",
            "--model.max_seq_length", "256", "--training.per_device_train_batch_size", "2"]


def one_run(regional: bool, overrides: list[str]) -> dict:
    """`python sft.py` on the LoRA config, as a user runs it, timed from outside."""
    with tempfile.TemporaryDirectory() as work:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{work}/inductor",
               "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1" if regional else "0"}
        started = time.perf_counter()
        subprocess.run([sys.executable, "sft.py", "--config", "configs/lora_train_config.yaml",
                        "--training.output_dir", f"{work}/out", *SETTINGS, *overrides],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        seconds = time.perf_counter() - started
        summary = json.loads((Path(work) / "out" / "run_summary.json").read_text())
    return {"seconds": seconds, "losses": [round(summary[key], 4) for key in ("train_loss_first", "train_loss_last")]}


def main() -> None:
    overrides = sys.argv[1:]
    whole, regional = one_run(False, overrides), one_run(True, overrides)
    print("| compiled | seconds | ratio | first and last loss |\n|---|---|---|---|")
    for name, run in (("whole model", whole), ("each layer (regional)", regional)):
        print(f"| {name} | {run['seconds']:.1f} | {run['seconds'] / whole['seconds']:.2f} | {run['losses']} |")


if __name__ == "__main__":
    main()
