"""How this process was started, and the commands that resume its run or finish its export, for messages."""

import functools
import shlex
import shutil
import sys
from pathlib import Path

from sftkit.engines import several_machines

LAUNCHERS = ("accelerate", "torchrun", "deepspeed")


def resume_words() -> str:
    """`Resume with: COMMAND`; over several machines each has its own command (its --machine_rank), so each
    machine's log says its own."""
    if several_machines():
        return ("Resume with, on every machine, the command that started it there and "
                f"--training.resume_from_checkpoint true; on this one: {resume_command()}")
    return f"Resume with: {resume_command()}"


def export_command(output_dir) -> str:
    """The command that finishes the export of the run in output_dir (sftkit.export), shell-quoted."""
    return shlex.join(["python", "-m", "sftkit.export", str(output_dir)])


def resume_command() -> str:
    """The command that started this run (its launcher included), shell-quoted, set to resume from the newest
    checkpoint; --overwrite is dropped, since it would delete that checkpoint."""
    words = _launcher_command() or _own_command()
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word == "--overwrite" or word.startswith("--training.resume_from_checkpoint="):
            continue
        elif word == "--training.resume_from_checkpoint":
            skip = True
        else:
            kept.append(word)
    return shlex.join([*kept, "--training.resume_from_checkpoint", "true"])


def launcher() -> str | None:
    """`accelerate`, `torchrun` or `deepspeed`: the launcher that started this process, if one did."""
    words = _launcher_command()
    return words[0] if words else None


def processes_asked_of_accelerate() -> int | None:
    """The `--num_processes N` that `accelerate launch` was given on its command line, where it started this one."""
    words = _launcher_command() or []
    if words[:1] != ["accelerate"]:
        return None
    for index, word in enumerate(words):
        if word == "--num_processes":
            value = words[index + 1] if index + 1 < len(words) else ""
        elif word.startswith("--num_processes="):
            value = word.partition("=")[2]
        else:
            continue
        return int(value) if value.isdigit() else None
    return None


@functools.cache
def _launcher_command() -> list[str] | None:
    """`accelerate launch ...`, `torchrun ...` or `deepspeed ...` when one of this process's parents is that
    launcher (each starts the training script as its child or grandchild), from the first launcher word on. Read
    once, as the run starts (checks.machine_errors): on Ctrl-C, `accelerate launch` may have exited before the
    resume command is written, which then named `python sft.py` under several processes."""
    import psutil

    process = psutil.Process()
    for _ in range(3):
        process = process.parent()
        if process is None:
            return None
        try:
            words = process.cmdline()
        except psutil.Error:
            return None
        for index, word in enumerate(words):
            if Path(word).name in LAUNCHERS:
                return [Path(word).name, *words[index + 1:]]
    return None


def _own_command() -> list[str]:
    """How this process was started: `python sft.py ...`, the `sftkit` console command, or `python -m sftkit`."""
    script = Path(sys.argv[0])
    if script.name == "sftkit":
        return ["sftkit", *sys.argv[1:]]
    if script.name == "__main__.py" and script.parent.name == "sftkit":
        return [_python(), "-m", "sftkit", *sys.argv[1:]]
    return [_python(), *sys.argv]


def _python() -> str:
    """`python` when that is this interpreter on PATH, else this interpreter's full path."""
    found = shutil.which("python")
    return "python" if found and Path(found).resolve() == Path(sys.executable).resolve() else sys.executable


