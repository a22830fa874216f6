"""Command line: parse arguments, validate the config, run; a bad config or bad data exits 2 with one line."""

import argparse
import logging
import os
import sys
import time
import warnings

from sftkit.config import ConfigError, Interrupted, RunFailed, is_main_process, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sft.py",
        description="Fine-tune a causal LM on chat data from a YAML config. `python sft.py env` reports the "
                    "environment for a bug report.",
        epilog="Any config key can be overridden: --training.learning_rate 1e-4 --model.use_lora true",
    )
    parser.add_argument("--config", help="YAML file, or the name of one in configs/ (default: default_train_config.yaml)")
    parser.add_argument("--preset", help="a partial config from configs/presets/ laid over --config: fast_test, "
                                         "low_memory or full_training (or a path)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what an earlier run left in training.output_dir (its model, adapter, reports "
                             "and checkpoints); without it a run refuses to start there")
    parser.add_argument("--dry-run", action="store_true",
                        help="load the tokenizer and the data (no weights), print the plan with a memory estimate, exit")
    parser.add_argument("--inspect", nargs="?", type=int, const=3, metavar="N",
                        help="load only the tokenizer and the data, print statistics and N samples (default 3) "
                             "with the trained tokens highlighted, and exit")
    argv = sys.argv[1:] if argv is None else argv
    _quiet_known_noise()
    if argv[:1] == ["env"]:
        from sftkit.environment import report

        print(report())
        return 0
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides, args.preset)
        if args.dry_run:
            from sftkit.plan import dry_run

            plan = dry_run(config)
            if is_main_process():
                print(plan)
            return 0
        if args.inspect is not None:
            from sftkit.inspector import inspect

            report = inspect(config, samples=args.inspect)
            if is_main_process():
                print(report)
            return 0
        from sftkit.train import train

        train(config, overwrite=args.overwrite)
    except ConfigError as error:
        if is_main_process():
            print(f"sft.py: error: {error}", file=sys.stderr)
        else:
            # Every process finds the same error; the launcher kills the others as soon as one exits, so the
            # others give the main process a moment to print it.
            time.sleep(5)
        return 2
    except RunFailed as failure:
        if is_main_process():
            print(f"sft.py: error: {failure}", file=sys.stderr)
        return 1
    except Interrupted as stop:
        if is_main_process():
            print(f"sft.py: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        if is_main_process():
            print("sft.py: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    return 0


def _quiet_known_noise() -> None:
    """Silence messages these libraries repeat on every run that tell the user nothing actionable."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork warning after the tokenizer was used
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # one progress bar per run: the Trainer's
    # bitsandbytes on CPU without the optional `kernels` package; its own fallback path is used and works.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "kernels-community" not in record.getMessage()
    )
    # transformers 5 renamed gradient to activation checkpointing; PEFT and TRL still call the old name internally.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # DeepSpeed's collectives call torch.distributed functions that torch deprecated, once per step and process.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # DeepSpeed on a machine without a GPU, once per process at import; a real run on CPU says so in its plan.
    logging.getLogger("DeepSpeed").addFilter(lambda record: "Setting accelerator to CPU" not in record.getMessage())
