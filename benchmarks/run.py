"""sftkit against the plain TRL script a user would write (benchmarks/baseline_trl.py), side by side.

    python benchmarks/run.py            # 3 repetitions of every measurement, medians
    python benchmarks/run.py --quick    # a minute or two (what CI runs)

Both sides train the same model on the same data with the same hyperparameters and optimizer steps, each in its
own process, one after the other on this machine. Ratios are ours / baseline. Writes
benchmarks/results/<date>-<machine>.json and .md, and prints the table.
"""

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MODEL, DATA = ROOT / "data" / "tiny-chat-llama", ROOT / "data" / "sample_chat.jsonl"
TARGETS = {"wall_ratio": "<= 1.02", "step_time_ratio": "<= 1.02", "preprocess_ratio": ">= 0.8",
           "nonpad_share_packed": ">= 0.97", "config_error_seconds": "< 1", "peak_rss_ratio": "(lower is better)",
           "preprocess_ratio_by_turns": ">= half the 1-turn ratio at 64 turns",
           "preprocess_ratio_by_calls": "none yet (each prefix is rendered): ours / tokenized prefixes shown"}
TURNS = (1, 4, 16, 64)  # assistant turns per row in preprocess_ratio_by_turns
CALLS = (1, 4, 16)  # tool calls per row in preprocess_ratio_by_calls


def timed_run(command: list[str], out: str, env: dict | None = None) -> tuple[float, float, float]:
    """Wall seconds and peak RSS (MiB) of one process, start to exit (the model is saved before it exits), and the
    seconds of its training loop as the Trainer reports them (`train_runtime`: printed by the baseline, saved in
    run_summary.json by sftkit). `env`: added to this process's environment."""
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak RSS, not the running maximum of all
        wall = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{output[-3000:]}")
    summary = Path(out) / "run_summary.json"
    if summary.exists():
        runtime = json.loads(summary.read_text())["train_seconds"]
    else:
        runtime = float(re.search(r"'train_runtime': '?([0-9.]+)", output).group(1))
    return wall, usage.ru_maxrss / 1024, runtime


def ours(steps: int, out: str) -> list[str]:
    return [sys.executable, "sft.py", "--training.max_steps", str(steps), "--training.output_dir", out,
            "--dataset.test_size", "null", "--training.logging_steps", "20"]


def baseline(steps: int, out: str) -> list[str]:
    return [sys.executable, "benchmarks/baseline_trl.py", "--model", str(MODEL), "--data", str(DATA),
            "--max_steps", str(steps), "--output_dir", out, "--batch_size", "16", "--learning_rate", "3e-3",
            "--max_length", "256"]


def training_runs(steps: int, repeats: int, workdir: Path) -> dict:
    """End-to-end wall time and peak RSS at `steps`, and steady-state seconds per step from runs of 2 x steps."""
    raw = {side: {"wall": [], "rss": [], "step_seconds": []} for side in ("ours", "baseline")}
    for repeat in range(repeats):
        for side, command in (("ours", ours), ("baseline", baseline)):  # interleaved, so drift hits both
            out, double_out = str(workdir / f"{side}-{repeat}"), str(workdir / f"{side}-{repeat}-double")
            wall, rss, loop = timed_run(command(steps, out), out)
            _, _, double_loop = timed_run(command(2 * steps, double_out), double_out)
            raw[side]["wall"].append(wall)
            raw[side]["rss"].append(rss)
            # the second `steps` steps of the longer run: no first-step warm-up, no start-up, no saving
            raw[side]["step_seconds"].append((double_loop - loop) / steps)
    medians = {side: {key: statistics.median(values) for key, values in runs.items()} for side, runs in raw.items()}
    return {"raw": raw, "median": medians}


def preprocessing(repeats: int, copies: int) -> dict:
    """Rows per second from raw rows to rows the Trainer can batch: sftkit's pipeline plus the SFTTrainer it feeds,
    against an SFTTrainer tokenizing the same rows itself (the model is loaded once, outside the timing)."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sftkit.data import prepare_data
    from sftkit.schema import DatasetConfig

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from baseline_trl import to_prompt_completion

    datasets.disable_caching()  # measure the work, not the cache
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    rows = [json.loads(line) for line in DATA.read_text().splitlines()] * copies
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        args = SFTConfig(output_dir=tmp, max_length=256, use_cpu=not torch.cuda.is_available(), bf16=False,
                         gradient_checkpointing=False, report_to="none")
        seconds = {"ours": [], "trl": []}
        for _ in range(repeats):
            started = time.perf_counter()
            data = prepare_data(DatasetConfig(name=str(path)), tokenizer, max_length=256)
            SFTTrainer(model=model, args=args, train_dataset=data.train, processing_class=tokenizer)
            seconds["ours"].append(time.perf_counter() - started)

            started = time.perf_counter()
            raw = datasets.load_dataset("json", data_files=str(path), split="train")
            raw = raw.map(to_prompt_completion, remove_columns=raw.column_names)
            SFTTrainer(model=model, args=args, train_dataset=raw, processing_class=tokenizer)
            seconds["trl"].append(time.perf_counter() - started)
    return {"rows": len(rows), "raw_seconds": seconds,
            "ours_rows_per_second": len(rows) / statistics.median(seconds["ours"]),
            "trl_rows_per_second": len(rows) / statistics.median(seconds["trl"])}


def conversations(turns: int, rows: int = 40) -> list[list[dict]]:
    """`rows` conversations of `turns` user/assistant exchanges each, drawn from the sample data's exchanges."""
    samples = [json.loads(line)["messages"] for line in DATA.read_text().splitlines()]
    exchanges = [conversation[i : i + 2] for conversation in samples for i in range(len(conversation) - 1)
                 if conversation[i]["role"] == "user" and conversation[i + 1]["role"] == "assistant"]
    return [[message for k in range(turns) for message in exchanges[(7 * row + k) % len(exchanges)]]
            for row in range(rows)]


def agent_traces(calls: int, rows: int = 40) -> list[list[dict]]:
    """`rows` conversations of a question, `calls` tool calls each answered by the tool, and the reply."""
    def call(row: int, k: int) -> list[dict]:
        city = f"city {row}-{k}"
        return [{"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]},
                {"role": "tool", "content": json.dumps({"city": city, "temp": (7 * row + k) % 40})}]
    return [[{"role": "user", "content": f"Plan trip {row}: what is the weather on the way?"},
             *[message for k in range(calls) for message in call(row, k)],
             {"role": "assistant", "content": f"Trip {row} looks fine."}] for row in range(rows)]


WEATHER_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def preprocessing_by_turns(repeats: int) -> dict:
    """Rows per second of masking (tokenize_messages) against one plain rendering and tokenization of the same
    conversation, at 1, 4, 16 and 64 assistant turns per row, 40 rows each."""
    from transformers import AutoTokenizer

    from sftkit.data import tokenize_messages

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    ours = {"ours": lambda tokenizer, messages, tools: tokenize_messages(tokenizer, messages)}
    return _masking_rates(tokenizer, {turns: conversations(turns) for turns in TURNS}, None, repeats, ours)


def preprocessing_by_calls(repeats: int) -> dict:
    """The same for agent traces of 1, 4 and 16 tool calls under Qwen2.5's template (which renders tools and
    calls), beside masking from the row's tokenized prefixes (the way tool rows took before 2026-11-29)."""
    from transformers import AutoTokenizer

    from sftkit.data import tokenize, tokenize_messages

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    tokenizer.chat_template = (ROOT / "tests" / "templates" / "qwen2_5.jinja").read_text()

    def tokenized_prefixes(tokenizer, messages, tools):
        own, tokenize._spans_from_own_renderings = tokenize._spans_from_own_renderings, lambda *args: None
        try:
            return tokenize_messages(tokenizer, messages, tools=tools)
        finally:
            tokenize._spans_from_own_renderings = own

    variants = {"ours": lambda tokenizer, messages, tools: tokenize_messages(tokenizer, messages, tools=tools),
                "tokenized_prefixes": tokenized_prefixes}
    return _masking_rates(tokenizer, {calls: agent_traces(calls) for calls in CALLS}, WEATHER_TOOLS, repeats,
                          variants)


def _masking_rates(tokenizer, rows_by_count: dict, tools, repeats: int, variants: dict) -> dict:
    """Rows per second of each variant and of the plain rendering at each count of turns or calls. The sides take
    turns, each timed over as many passes of the rows as make about the same number of tokens at every count;
    medians."""
    tokenizer.model_max_length = 1_000_000  # no warning about rows longer than the tiny model's context

    def plain(tokenizer, messages, tools=None):
        return tokenizer(tokenizer.apply_chat_template(messages, tools=tools, tokenize=False), add_special_tokens=False)

    sides = {"plain": plain, **variants}
    result = {}
    for count, rows in rows_by_count.items():
        passes = max(1, 64 // count)
        for side in sides.values():  # warm: jinja compiles the template, sftkit caches the row shape
            side(tokenizer, rows[0], tools)
        seconds = {name: [] for name in sides}
        for _ in range(repeats):
            for name, side in sides.items():
                started = time.perf_counter()
                for _ in range(passes):
                    for messages in rows:
                        side(tokenizer, messages, tools)
                seconds[name].append(time.perf_counter() - started)
        rates = {name: passes * len(rows) / statistics.median(values) for name, values in seconds.items()}
        result[count] = {"rows_per_second": rates,
                         "ratio": {name: rate / rates["plain"] for name, rate in rates.items() if name != "plain"}}
    return result


def nonpad_shares() -> dict:
    """Share of real tokens in the batches the model sees over one epoch, without and with packing."""
    import torch
    from trl import SFTTrainer

    from sftkit.config import load_config
    from sftkit.data import prepare_data
    from sftkit.model import load_model, load_tokenizer

    shares = {}
    for packing in (False, True):
        config = load_config("default_train_config.yaml", ["--training.packing", str(packing).lower(),
                                                           "--training.output_dir", tempfile.mkdtemp()])
        tokenizer = load_tokenizer(config.model, config.dataset)
        data = prepare_data(config.dataset, tokenizer, config.training.max_length)
        model = load_model(config.model, torch.float32, gradient_checkpointing=False)
        trainer = SFTTrainer(model=model, args=config.training, train_dataset=data.train, processing_class=tokenizer)
        real = total = 0
        for batch in trainer.get_train_dataloader():
            mask = batch.get("attention_mask")
            real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            total += batch["input_ids"].numel()
        shares["packed" if packing else "unpacked"] = real / total
    return shares


def config_error_seconds(repeats: int) -> list[float]:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as bad:
        bad.write("model:\n  use_lorra: true\ndataset:\n  name: data/sample_chat.jsonl\n")
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "sft.py", "--config", bad.name], cwd=ROOT, capture_output=True)
        seconds.append(time.perf_counter() - started)
        assert result.returncode == 2, result.stderr
    return seconds


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "gpu": gpu, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer steps and rows: a minute or two")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    steps, copies = (10, 2) if args.quick else (50, 10)

    with tempfile.TemporaryDirectory() as workdir:
        runs = training_runs(steps, args.repeats, Path(workdir))
    prep = preprocessing(args.repeats, copies)
    by_turns = preprocessing_by_turns(args.repeats)
    by_calls = preprocessing_by_calls(args.repeats)
    shares = nonpad_shares()
    errors = config_error_seconds(args.repeats)
    ours_run, base_run = runs["median"]["ours"], runs["median"]["baseline"]
    figures = {
        "wall_ratio": ours_run["wall"] / base_run["wall"],
        "step_time_ratio": ours_run["step_seconds"] / base_run["step_seconds"],
        "preprocess_ratio": prep["ours_rows_per_second"] / prep["trl_rows_per_second"],
        "preprocess_ratio_by_turns": {str(turns): figures["ratio"]["ours"] for turns, figures in by_turns.items()},
        "preprocess_ratio_by_calls": {str(calls): figures["ratio"]["ours"] for calls, figures in by_calls.items()},
        "nonpad_share_packed": shares["packed"],
        "nonpad_share_unpacked": shares["unpacked"],
        "config_error_seconds": statistics.median(errors),
        "peak_rss_ratio": ours_run["rss"] / base_run["rss"],
    }
    result = {
        "date": datetime.date.today().isoformat(), "machine": machine(), "quick": args.quick,
        "steps": steps, "repeats": args.repeats, **figures,
        "raw": {"training": runs, "preprocessing": prep, "config_error_seconds": errors,
                "preprocessing_by_turns": {str(turns): figures for turns, figures in by_turns.items()},
                "preprocessing_by_calls": {str(calls): figures for calls, figures in by_calls.items()}},
    }
    table = markdown_table(result)
    print(table)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    stem = Path(args.results) / f"{result['date']}-{result['machine']['host']}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(table + "\n")
    return result


def markdown_table(result: dict) -> str:
    run = result["raw"]["training"]["median"]
    prep = result["raw"]["preprocessing"]
    rows = [
        ("wall_ratio", f"{run['ours']['wall']:.2f} s", f"{run['baseline']['wall']:.2f} s"),
        ("step_time_ratio", f"{run['ours']['step_seconds']:.3f} s", f"{run['baseline']['step_seconds']:.3f} s"),
        ("preprocess_ratio", f"{prep['ours_rows_per_second']:.0f} rows/s", f"{prep['trl_rows_per_second']:.0f} rows/s"),
        ("nonpad_share_packed", "", ""),
        ("nonpad_share_unpacked", "", ""),
        ("config_error_seconds", "", ""),
        ("peak_rss_ratio", f"{run['ours']['rss']:.0f} MiB", f"{run['baseline']['rss']:.0f} MiB"),
    ]
    machine = result["machine"]
    lines = [
        f"Benchmark {result['date']} on {machine['host']} ({machine['cores']} cores, GPU: {machine['gpu'] or 'none'}), "
        f"{result['steps']} steps, median of {result['repeats']}{', quick' if result['quick'] else ''}",
        "",
        "| figure | value | target | ours | baseline |",
        "|---|---|---|---|---|",
    ]
    for name, ours_value, baseline_value in rows:
        lines.append(f"| {name} | {result[name]:.3f} | {TARGETS.get(name, '')} | {ours_value} | {baseline_value} |")
    # masking against one plain rendering + tokenization of the same conversation, by assistant turns per row
    for turns, ratio in result["preprocess_ratio_by_turns"].items():
        rates = result["raw"]["preprocessing_by_turns"][turns]["rows_per_second"]
        target = TARGETS["preprocess_ratio_by_turns"] if turns == str(TURNS[-1]) else ""
        lines.append(f"| preprocess_ratio_by_turns[{turns}] | {ratio:.3f} | {target} | {rates['ours']:.1f} rows/s | "
                     f"{rates['plain']:.1f} rows/s |")
    # the same for agent traces, and how many times faster than masking them from their tokenized prefixes
    for calls, ratio in result["preprocess_ratio_by_calls"].items():
        rates = result["raw"]["preprocessing_by_calls"][calls]["rows_per_second"]
        target = TARGETS["preprocess_ratio_by_calls"] if calls == str(CALLS[-1]) else ""
        lines.append(f"| preprocess_ratio_by_calls[{calls}] | {ratio:.3f} | {target} | {rates['ours']:.1f} rows/s "
                     f"({rates['ours'] / rates['tokenized_prefixes']:.1f}x tokenized prefixes) | "
                     f"{rates['plain']:.1f} rows/s |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
