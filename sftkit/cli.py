"""Command line: parse arguments, validate the config, run; a bad config or bad data exits 2 with one line.

    python sft.py [--config FILE] [--key.path value ...]    # what `accelerate launch sft.py` runs
    sftkit train [CONFIG] [--key.path value ...]             # the same, installed (`pip install .`)
    sftkit init my_run.yaml [--from lora]                    # a starting config to edit
    sftkit env | chat DIR | compare DIR | webchat DIR | export DIR
"""

import contextlib
import re
import sys
import time
from pathlib import Path

from sftkit.config import load_config
from sftkit.engines import is_main_process
from sftkit.environment import report, sftkit_version
from sftkit.errors import (
    AlreadyFinished,
    ConfigError,
    FailedHere,
    Interrupted,
    OneLineArgumentParser,
    SftkitError,
    say_error,
)
from sftkit.fastpath import use_expandable_segments
from sftkit.paths import CONFIGS_DIR, find_config_file
from sftkit.peers import lost_contact, report_failure, says_errors, watch
from sftkit.schema import SECTIONS, section_help


def main(argv: list[str] | None = None, prog: str = "sft.py") -> int:
    parser = _parser(prog)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["--help"], ["-h"]) and argv[1:2] and argv[1] in SECTIONS:
        print(section_help(argv[1]))
        return 0
    if argv[:1] == ["env"]:
        return _env(argv[1:], prog, parser)
    if argv[:1] and argv[0] in (*TOOLS, "init") and not Path(argv[0]).exists():  # `sft.py chat DIR`, as `env` works
        return sftkit(argv)
    if argv and not argv[0].startswith("-"):  # `sft.py my.yaml`, as `sftkit train my.yaml`
        argv = ["--config", argv[0], *argv[1:]]
    if sum(arg == "--config" or arg.startswith("--config=") for arg in argv) > 1:  # argparse keeps the last one
        parser.error("two configs given (a config file name first, and --config, or --config twice); give one")
    args, overrides = parser.parse_known_args(argv)
    if args.inspect is not None and args.inspect < 0:
        parser.error(f"argument --inspect: {args.inspect} samples; give 0 or more")
    if args.inspect is not None and args.dry_run:
        parser.error("--dry-run and --inspect each read the data and exit; give one of them")
    use_expandable_segments()  # before anything starts CUDA
    watch(prog)  # under several machines: a failure on another one stops this one at once
    return _run(args, overrides, prog)


def _parser(prog: str) -> OneLineArgumentParser:
    parser = OneLineArgumentParser(
        prog=prog,
        allow_abbrev=False,  # --conf would be --config, beside the config given by name
        usage=f"{prog} [CONFIG] [options] [--section.key value ...]",
        description="Fine-tune a causal LM on chat data from a YAML config. `python sft.py env` reports the "
                    "environment for a bug report.",
        epilog="Any config key can be overridden: --training.learning_rate 1e-4 --model.use_lora true. "
               "--help model (or dataset, training) lists a section's keys.",
    )
    parser.add_argument("--config", help="YAML file, or the name of one in configs/ (default: default_train_config.yaml)")
    parser.add_argument("--preset", help="a partial config from configs/presets/ laid over --config: fast_test, "
                                         "low_memory or full_training (or a path)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what an earlier run left in training.output_dir (its model, adapter, reports "
                             "and checkpoints); without it a run refuses to start there")
    parser.add_argument("--dry-run", action="store_true",
                        help="load the tokenizer and the data (no weights), print the plan with a memory estimate, exit")
    parser.add_argument("--version", action="version", version=f"sftkit {sftkit_version()}",
                        help="this sftkit's version (and git commit, in a checkout)")
    parser.add_argument("--inspect", nargs="?", type=int, const=3, metavar="N",
                        help="load only the tokenizer and the data, print statistics and N samples (default 3) "
                             "with the trained tokens highlighted, and exit")
    return parser


def _env(argv: list[str], prog: str, parser) -> int:
    if argv in (["-h"], ["--help"]):
        print(f"usage: {prog}\n\nPrint what this machine has for training (libraries, devices, the accelerate "
              "config in use), for a bug report.")
        return 0
    if argv:
        parser.exit(2, f"{prog}: error: env takes no arguments, got {' '.join(argv)}\n")
    print(report())
    return 0


def _run(args, overrides: list[str], prog: str) -> int:
    """Load the config and train (or plan, or inspect); how it ends is the exit code, each process's log saying why."""
    config = None
    try:
        config = load_config(args.config, overrides, args.preset)
        if args.dry_run:
            from sftkit.plan import dry_run

            plan = dry_run(config, overwrite=args.overwrite)
            if is_main_process():
                print(plan)
            return 0
        if args.inspect is not None:
            from sftkit.inspector import inspect

            statistics = inspect(config, samples=args.inspect)
            if is_main_process():
                print(statistics)
            return 0
        from sftkit.train import train

        train(config, overwrite=args.overwrite, started=_process_start())
    except AlreadyFinished as done:
        if is_main_process():
            print(f"{prog}: {done}", flush=True)
        return 0
    except Interrupted as stop:
        if says_errors():  # every process stops; each machine's log says why, and how to resume there
            print(f"{prog}: {stop}", file=sys.stderr)
        return stop.exit_code
    except SftkitError as error:
        if says_errors() or isinstance(error, FailedHere):
            say_error(prog, error)
        report_failure(str(error))
        if isinstance(error, ConfigError) and not says_errors():
            # Every process finds the same error; the launcher kills the others as soon as one exits, so the
            # others give the main process a moment to print it.
            time.sleep(5)
        return error.exit_code
    except KeyboardInterrupt:
        if is_main_process():
            print(f"{prog}: interrupted before training started; nothing was saved", file=sys.stderr)
        return 130
    except Exception as error:
        lost = lost_contact(error)
        if lost and config is not None and says_errors():  # each machine's log: the main one may be the one gone
            from sftkit.checkpoints import kept_work_words

            lost += f"; {kept_work_words(Path(config.training.output_dir))}"
        if lost and says_errors():  # once per machine: the others of a machine lose contact alike
            print(f"\n{prog}: error: {lost}", file=sys.stderr, flush=True)
        report_failure(lost or f"{type(error).__name__}: {error}")
        if lost is None:
            raise
        return 1
    return 0


def _process_start() -> float:
    import psutil

    return psutil.Process().create_time()


TOOLS = {  # sftkit NAME ... -> the module whose main() takes the rest of the command line
    "chat": "sftkit.chat", "compare": "sftkit.compare", "webchat": "sftkit.webchat", "export": "sftkit.export",
}
USAGE = """usage: sftkit COMMAND ...

  train [CONFIG] [--preset NAME] [--overwrite] [--dry-run] [--inspect [N]] [--section.key value ...]
                      fine-tune (CONFIG: a YAML file or a shipped config's name; default: the embedded default)
  init FILE [--from NAME]
                      write a starting config to edit (NAME: default, lora, qlora, or an example's name)
  env                 what this machine has for training, for a bug report
  chat DIR            talk to a trained model in the terminal
  compare DIR         base vs fine-tuned replies, written to DIR/before_after.md
  webchat DIR         talk to it in the browser (needs the extras)
  export DIR [--merge]
                      finish an export that failed (a full disk, say); --merge: merge an adapter published alone
  --version           this sftkit's version (and git commit, in a checkout)

Under several processes: accelerate launch -m sftkit train CONFIG"""


def sftkit(argv: list[str] | None = None) -> int:
    """The `sftkit` console command (and `python -m sftkit`): one entry point, one subcommand per task."""
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else ("--help", [])
    if command == "train":
        if rest[:1] == ["env"]:  # a config file named env, not sft.py's env report
            rest = ["--config", *rest]
        return main(rest, prog="sftkit train")
    if command == "init":
        return init(rest)
    if command == "env":
        return main(["env", *rest], prog="sftkit env")
    if command in TOOLS:
        import importlib

        return importlib.import_module(TOOLS[command]).main(rest, prog=f"sftkit {command}")
    if command in ("-h", "--help"):
        print(USAGE)
        return 0
    if command in ("-V", "--version"):
        print(f"sftkit {sftkit_version()}")
        return 0
    import difflib

    nearest = difflib.get_close_matches(command, ["train", "init", "env", *TOOLS], n=1)
    meant = f" (did you mean {nearest[0]!r}?)" if nearest else ""
    print(f"sftkit: error: unknown command {command!r}{meant}; the commands are train, init, env, {', '.join(TOOLS)} "
          "(sftkit --help)", file=sys.stderr)
    return 2


def init(argv: list[str]) -> int:
    """Write a copy of a shipped config (its comments are its documentation) where the user can edit it."""
    parser = OneLineArgumentParser(prog="sftkit init", description=init.__doc__)
    parser.add_argument("file", help="the config to write, e.g. my_run.yaml")
    parser.add_argument("--from", "--config", dest="source", default="lora",
                        help="the shipped config to start from (default: lora): default, lora, qlora, or an "
                             "example's name (llama3.1_8b_qlora, qwen2.5_1.5b_full, tinyllama_1.1b_chat_lora)")
    args = parser.parse_args(argv)
    target = Path(args.file if args.file.endswith((".yaml", ".yml")) else f"{args.file}.yaml")
    try:
        if Path(args.file).suffix in (".json", ".jsonl", ".csv", ".parquet", ".txt", ".py", ".md"):
            raise ConfigError(f"{args.file}: a config is a YAML file; give a name ending in .yaml, or none")
        source = _shipped_config(args.source)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(target, "x") as file:  # never over a file, even one made meanwhile
                file.write(_as_written_to(source, target))
        except FileExistsError:
            raise ConfigError(f"{target} exists already; choose another name (sftkit init never replaces a "
                              "file)") from None
    except OSError as error:
        return say_error("sftkit init", ConfigError(str(error)))
    except ConfigError as error:
        return say_error("sftkit init", error)
    tuned = "" if "examples" in source.parts else (
        "; its max_seq_length, num_train_epochs and learning_rate suit the embedded tiny model: for a real one use "
        "about 2048, 1-3 and 2e-4 (LoRA) or 2e-5 (full), or start from an example (--from tinyllama_1.1b_chat_lora)")
    print(f"sftkit init: wrote {target} (from {source.name}); edit model.path, dataset.name and training.output_dir"
          f"{tuned}, then: sftkit train {target}")
    return 0


def _as_written_to(source: Path, target: Path) -> str:
    """The shipped config's text, its header's launch commands naming the copy and the installed command (sft.py
    is in the repo only, where the user's config may not be), and checkpoints saved: the tiny model's configs save
    none, which on a real model's hours of training lost them all to a crash."""
    shipped = f"configs/{source.relative_to(CONFIGS_DIR)}"
    lines = [CHECKPOINTS_OF_A_COPY if re.match(r' +save_strategy: "no"', line) else
             line.replace(f"accelerate launch sft.py --config {shipped}", f"accelerate launch -m sftkit train {target}")
                 .replace(f"python sft.py --config {shipped}", f"sftkit train {target}")
             for line in source.read_text().splitlines(keepends=True)
             if "(this file is the default)" not in line]  # the copy is not
    return "".join(lines)


CHECKPOINTS_OF_A_COPY = """\
  save_strategy: steps         # a checkpoint every save_steps: a crash or a stop loses at most that many steps;
  save_steps: 500              # relaunch with --training.resume_from_checkpoint auto to continue from the newest
  save_total_limit: 2          # the newest two are kept (the final model is saved besides)
"""


def _shipped_config(name: str) -> Path:
    with contextlib.suppress(ConfigError):
        found = find_config_file(name, CONFIGS_DIR)
        if CONFIGS_DIR.resolve() in found.resolve().parents:
            return found.resolve()
    raise ConfigError(f"no shipped config named {name!r}: use default, lora, qlora, or one of "
                      f"{', '.join(path.stem for path in sorted((CONFIGS_DIR / 'examples').glob('*.yaml')))}")
