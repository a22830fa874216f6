"""How long a compiled run takes from start to finish, the whole model compiled (sftkit's default) against each
decoder layer compiled once (Accelerate's regional compilation, ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION=1), each
in a fresh process with an empty compile cache, side by side with the first and last losses both logged.

    python benchmarks/compile_time.py              # the tiny LoRA model, packed, bf16: minutes on a CPU
    python benchmarks/compile_time.py --model.path meta-llama/Llama-3.2-1B --model.max_seq_length 2048   # a GPU
"""

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

from run import timed_run

SETTINGS = ["--training.max_steps", "12", "--training.logging_steps", "4", "--dataset.test_size", "null",
            "--training.packing", "true", "--training.torch_compile", "true", "--training.bf16", "true",
            "--model.max_seq_length", "256", "--training.per_device_train_batch_size", "2"]


def one_run(regional: bool, overrides: list[str]) -> dict:
    """`python sft.py` on the LoRA config, as a user runs it, timed from outside."""
    with tempfile.TemporaryDirectory() as work:
        out = f"{work}/out"
        seconds, _, _ = timed_run([sys.executable, "sft.py", "--config", "configs/lora_train_config.yaml",
                                   "--training.output_dir", out, *SETTINGS, *overrides], out,
                                  env={"TORCHINDUCTOR_CACHE_DIR": f"{work}/inductor",
                                       "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION": "1" if regional else "0"})
        summary = json.loads((Path(out) / "run_summary.json").read_text())
    return {"seconds": seconds, "losses": [round(summary[key], 4) for key in ("train_loss_first", "train_loss_last")]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(Path(__file__).parent / "results"),
                        help="where the table is written, as <date>-<host>-compile-time.md")
    args, overrides = parser.parse_known_args()  # the rest: sft.py overrides, e.g. --model.path
    whole, regional = one_run(False, overrides), one_run(True, overrides)
    lines = [f"Compile time on {platform.node()} ({os.cpu_count()} cores), {' '.join(overrides) or 'the tiny model'}",
             "", "| compiled | seconds | ratio | first and last loss |", "|---|---|---|---|"]
    for name, result in (("whole model", whole), ("each layer (regional)", regional)):
        lines.append(f"| {name} | {result['seconds']:.1f} | {result['seconds'] / whole['seconds']:.2f} | "
                     f"{result['losses']} |")
    table = "\n".join(lines) + "\n"
    Path(args.results).mkdir(parents=True, exist_ok=True)
    (Path(args.results) / f"{datetime.date.today()}-{platform.node()}-compile-time.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
