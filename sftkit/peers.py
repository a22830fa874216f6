"""Several machines: a process that fails on one machine stops the processes on the others at once, and every
process checks that all of them run the same settings on the same data.

torchrun's agents (torch 2.13) watch only their own machine's processes. Once torch.distributed is up, a process
that dies breaks its connections and the others fail within seconds; but a process that fails before (a config or
data file missing on one machine, a different package version) leaves the others waiting in the rendezvous for
training.ddp_timeout (30 minutes). So the failing process posts its error in the launcher's own key-value store
(on the main machine, at MASTER_ADDR:MASTER_PORT), and the first process of every machine polls it once a second:
on a failure elsewhere it prints it and exits, and its machine's launcher stops the rest. Single-machine launches
skip all of this: there the launcher already stops every process when one fails.
"""

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from sftkit.command import launcher
from sftkit.engines import (
    first_on_its_machine,
    is_main_process,
    processes_on_this_machine,
    rows_per_step,
    several_machines,
    uses_fsdp,
    world_size,
)
from sftkit.environment import library_versions
from sftkit.errors import ConfigError
from sftkit.layout import LOCK_FILE, is_checkpoint
from sftkit.runrecord import input_digests

logger = logging.getLogger(__name__)
# check_output_dir_is_shared found output_dir is not one directory: each machine writes its part of every checkpoint
# into its own (a module's state: the error that names the newest checkpoint comes from elsewhere)
_SPLIT_ACROSS_MACHINES: list = []


def split_across_machines() -> bool:
    """Whether this launch's machines each write their part of every checkpoint into their own output_dir."""
    return bool(_SPLIT_ACROSS_MACHINES)


# The launcher's store outlives a restart of its processes (`--max_restarts`), so the keys are the attempt's: a
# restarted process must not read the failure that ended the attempt before as a new one. torchrun counts an attempt
# on each machine whose processes failed, which over several machines is all of them (a process that dies breaks the
# others' connections); a restart for a machine joining an elastic (c10d) rendezvous is not counted, and there the
# counts, and so the keys, can differ: the connection timeouts still apply.
_ATTEMPT = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
FAILURE_KEY = f"sftkit/{_ATTEMPT}/failure"
POLL_SECONDS = 1.0
WATCH_STORE_SECONDS = 10.0  # the longest a call of the watcher to the store may block
ARRIVED_KEY = f"sftkit/{_ATTEMPT}/arrived/{{rank}}"
# A process that has not started sftkit by then never will: its machine could not run the command (a wrong path to
# sft.py, a failed import), and its launcher ended there without a word to the others. Imports from a slow shared
# filesystem take a minute at most; the others would otherwise wait for training.ddp_timeout (30 minutes).
ARRIVAL_SECONDS = float(os.environ.get("SFTKIT_ARRIVAL_SECONDS", 300))
_stop = threading.Event()
_leaving: list = []  # see before_leaving_for_a_failure_elsewhere
_leaving_lock = threading.Lock()  # the watcher ending the process, or the process handling its own failure: not both


def _store(seconds: float):
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=seconds))


def watch(prog: str) -> None:
    """Under a launch over several machines, every process says it has started, and the first process of each
    machine watches for a failure elsewhere; the main one also for a process that never started."""
    if not several_machines():
        return
    try:
        store = _store(WATCH_STORE_SECONDS)
        store.set(ARRIVED_KEY.format(rank=os.environ.get("RANK", "0")), socket.gethostname())
    except Exception:  # no store to watch (another launcher): the connection timeouts still apply
        return
    if os.environ.get("LOCAL_RANK", "0") != "0":
        return
    arrivals_due = time.monotonic() + ARRIVAL_SECONDS if is_main_process() else None

    def poll():
        nonlocal arrivals_due
        while not _stop.wait(POLL_SECONDS):
            try:
                if arrivals_due is not None and time.monotonic() > arrivals_due:
                    arrivals_due = None
                    _report_who_never_started(store)
                if not store.check([FAILURE_KEY]):
                    continue
                failure = store.get(FAILURE_KEY).decode()
            except Exception:  # the main machine's launcher has ended (the run finished or failed there)
                return
            with _leaving_lock:  # held until the process ends
                if _stop.is_set():  # this process is failing itself and says why on its own
                    return
                print(f"{prog}: error: stopping, because {failure}", file=sys.stderr, flush=True)
                for hook in _leaving:
                    try:
                        hook(failure)
                    except Exception:  # noqa: BLE001 - the process ends either way
                        pass
                os._exit(1)

    thread = threading.Thread(target=poll, name="sftkit-peers", daemon=True)
    thread.start()
    # The watcher must be out of the store before Python finalizes: a daemon thread that returns from a C++ call
    # after that is ended by pthread_exit, whose unwinding through the call can abort the process ("terminate called
    # without an active exception", SIGABRT; seen once at the end of a two-machine test on a loaded machine, when
    # this wait was 2 s). So wait as long as one store call can take.
    atexit.register(lambda: (_stop.set(), thread.join(WATCH_STORE_SECONDS + POLL_SECONDS + 1)))


def handling_a_failure() -> None:
    """This process handles its own failure (records it, keeps its report): the watcher no longer ends it for a
    failure elsewhere, and if it already is, this waits for that (its hooks do what the handling would)."""
    with _leaving_lock:
        _stop.set()


def before_leaving_for_a_failure_elsewhere(hook) -> None:
    """Run `hook(failure)` in the watcher before it ends this process for another machine's failure: the main thread,
    waiting in a collective, cannot be interrupted, so what the run must leave right on disk (its record, its lock,
    where its work is) is done from there."""
    _leaving.append(hook)


def _report_who_never_started(store) -> None:
    """Posts, as a failure, the processes that have not said they started (every machine's watcher then stops)."""
    missing = [str(rank) for rank in range(world_size())
               if not store.check([ARRIVED_KEY.format(rank=rank)])]
    if missing:
        store.set(FAILURE_KEY, f"process{'es' if len(missing) > 1 else ''} {', '.join(missing)} never started sftkit "
                               f"within {ARRIVAL_SECONDS:g} s: its machine could not run the command (a wrong path to "
                               "sft.py, a failed import); see that machine's own output")


def says_errors() -> bool:
    """Whether this process prints a config or data error: rank 0, and the first process of every other machine
    (a file missing on one machine fails only there, and each machine keeps its own log)."""
    return first_on_its_machine()


def report_failure(message: str) -> None:
    """Tell the other machines' processes why this one stops (best effort, a few seconds at most)."""
    handling_a_failure()
    if not several_machines():
        return
    rank = os.environ.get("RANK", "?")
    first_line = (message.strip().splitlines() or ["no message"])[0]
    try:
        _store(5).set(FAILURE_KEY, f"process {rank} on {socket.gethostname()} failed: {first_line}")
    except Exception:
        return
    time.sleep(POLL_SECONDS + 0.5)  # the store lives as long as the main machine's launcher: let them read it


def lost_contact(error: BaseException) -> str | None:
    """The one line to print when a collective failed because another process is gone, else None."""
    if world_size() < 2:
        return None
    text = str(error)
    lost = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")
    # torch 2.13's gloo ("Timed out waiting 45000ms for recv operation to complete", or, where its pair's own
    # timeout comes first, "Application timeout caused pair closure") and NCCL's watchdog
    timed_out = ("Timed out waiting", "Application timeout caused pair closure", "collective operation timeout")
    distributed = type(error).__name__ in ("DistNetworkError", "DistBackendError")
    if not distributed and not any(words in text for words in lost + timed_out):
        return None
    first_sentence = (text.strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
    if any(words in text for words in timed_out):  # a hung machine keeps its connections open: only this tells
        return (f"another process did not answer within training.ddp_timeout ({first_sentence.split('] ')[-1]}): "
                "it hangs (a stalled disk, GPU or network, a machine swapping or stopped) or went away without a "
                "word; why may be in its own output")
    return (f"lost contact with another process ({first_sentence}): it stopped, or its machine went away; why "
            "is in its own output (the launcher's report names its rank)")


def check_the_data_held_still(config, before: dict) -> None:
    """The files the run trains from (runrecord.input_digests) hold what they held as it began (`before`, this
    process's view), on every process: the main process prepares the data first and the others read it after, so a
    file written meanwhile gave them other rows (and a hang where the row count changed), and one process's edit
    midway trained rows of both versions."""
    now = input_digests(config.resolved)
    changed = {name for name in before.keys() | now.keys() if before.get(name) != now.get(name)}
    if config.training.world_size > 1:
        from accelerate.utils import gather_object

        changed = set().union(*gather_object([changed]))
    if changed:
        raise ConfigError(f"{', '.join(sorted(changed)[:3])} changed while the run read it: the rows trained could "
                          "mix two versions; run again once the files are written")


# Settings each machine may have its own of: where it writes and logs, and how fast it reads data (what the fast
# path chose for its hardware is left out too, see check_every_process_runs_the_same).
PER_MACHINE = {"output_dir", "local_rank", "log_level", "log_level_replica", "disable_tqdm",
               "dataloader_num_workers", "dataloader_prefetch_factor", "dataloader_pin_memory",
               "dataloader_persistent_workers", "dataset_num_proc"}


def check_every_process_runs_the_same(config) -> None:
    """Every process of a launch trains with the same settings on the same data contents, or all stop with one
    line, before anything is claimed or loaded. A machine given another max_steps or save_steps would wait in a
    collective its peers never reach (for training.ddp_timeout, 30 minutes), and one with another copy of the data
    would train on it unnoticed, under a model card that names the first machine's."""
    args = config.training
    if args.world_size < 2:
        return
    from accelerate.utils import gather_object

    mine = {"where": f"process {args.process_index} on {socket.gethostname()}", "settings": _settings(config),
            "processes here": processes_on_this_machine(), "launcher": launcher(), "versions": _versions(),
            "chosen": {choice.key for choice in config.speed if choice.chosen},
            "inputs": input_digests(config.resolved)}
    first, *others = gather_object([mine])
    for other in others:
        _refuse_other_versions(first, other)  # first: an older sftkit may exchange other keys
    _refuse_another_process_count(first, others, args)
    for other in others:
        keys = sorted((first["settings"].keys() | other["settings"].keys()) - first["chosen"] - other["chosen"],
                      key=lambda key: (key not in first["settings"] or key not in other["settings"], key))
        # values both have come first (a changed stage), then keys only one has
        differences = [f"{key} {other['settings'].get(key)} (process 0: {first['settings'].get(key)})"
                       for key in keys if _differ(first["settings"].get(key), other["settings"].get(key))]
        differences += [f"the contents of {name}" for name in sorted(first["inputs"].keys() | other["inputs"].keys())
                        if first["inputs"].get(name) != other["inputs"].get(name)]
        if differences:
            raise ConfigError(f"{other['where']} runs with other settings or data than {first['where']}: "
                              f"{'; '.join(differences[:3])}; give every machine the same config and data files")


# What every machine must run alike: sftkit (its git commit too) and the libraries that train
SAME_EVERYWHERE = ("sftkit", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed",
                   "bitsandbytes")


def _versions() -> dict:
    versions = library_versions()
    return {name: versions.get(name) for name in SAME_EVERYWHERE}


def _refuse_other_versions(first: dict, other: dict) -> None:
    """Machines running other sftkit commits or library versions trained together unnoticed, or failed in this very
    check on a key the older sftkit did not send (a `git pull` on one machine only)."""
    if "versions" not in other and "versions" not in first:
        return  # two processes of older sftkits: this one, which is newer, is compared with the first in its turn
    if "versions" not in other or "versions" not in first:
        older, newer = (other, first) if "versions" not in other else (first, other)
        differences = [f"{older['where']} runs an sftkit older than {newer['versions']['sftkit']}"]
    else:
        mine, theirs = other["versions"], first["versions"]
        differences = [f"{name} {mine.get(name) or 'not installed'} "
                       f"(process 0: {theirs.get(name) or 'not installed'})"
                       for name in SAME_EVERYWHERE if mine.get(name) != theirs.get(name)]
    if differences:
        raise ConfigError(f"{other['where']} runs other software than {first['where']}: {'; '.join(differences[:3])}"
                          "; install the same sftkit and libraries on every machine")


def _refuse_another_process_count(first: dict, others: list[dict], args) -> None:
    """Machines launched with other process counts (accelerate launch --num_processes 2 on one, 4 on the other) train
    together on the sum of what each started (3), a world size no machine was given, with another batch per step.
    accelerate launch divides --num_processes evenly among the machines, so there it is always a slip; torchrun
    takes --nproc_per_node per machine, which may differ on purpose (machines of 8 and 4 GPUs): there, a warning."""
    theirs = first.get("processes here")
    other = next((other for other in others if other.get("processes here") not in (None, theirs)), None)
    if theirs is None or other is None:
        return
    mine = other["processes here"]
    counts = (f"{mine} processes on the machine of {other['where']} and {theirs} on that of {first['where']}, "
              f"{args.world_size} in all")
    if "accelerate" in (other.get("launcher"), first.get("launcher")):
        raise ConfigError(f"the machines were launched with other --num_processes: {counts}, which no machine was "
                          "given; launch every machine with the same --num_processes (the total over all machines)")
    if args.process_index == 0:
        logger.warning(f"the machines run other numbers of processes: {counts}, so {rows_per_step(args)} rows per "
                       "step; if that is not what you meant, give every machine the same --nproc_per_node")


def check_output_dir_is_shared(output_dir: Path, args, resuming: bool) -> None:
    """Over several machines output_dir is one directory they all share, which each process tells by seeing the lock
    process 0 has just taken there. Where one does not, the model is still written (by process 0), but each process
    writes its part of every checkpoint to its own machine's disk: a warning, and a resume is refused (each machine
    found another part of the checkpoint damaged, and said to start afresh with --overwrite)."""
    if not several_machines():
        return
    from accelerate.utils import gather_object

    lock = output_dir / LOCK_FILE
    checkpoints = output_dir.is_dir() and any(is_checkpoint(path) for path in output_dir.iterdir())
    seen = gather_object([(f"process {args.process_index} on {socket.gethostname()}", str(output_dir),
                           lock.read_text() if lock.is_file() else None, checkpoints)])
    apart = [(where, directory) for where, directory, text, _ in seen[1:] if text != seen[0][2]]
    if not apart:
        return
    where, directory = apart[0]
    unshared = (f"training.output_dir is not one directory every machine shares: {where} does not see this run's "
                f"lock in {directory}")
    if resuming and not any(found for *_, found in seen):  # a first launch of `auto`: no machine has a checkpoint
        raise ConfigError(f"{unshared}; training.resume_from_checkpoint asks a relaunch to continue from its "
                          "checkpoints, which would each be split across the machines' disks. Nothing was trained: "
                          "put output_dir on a filesystem every machine shares, or leave resume_from_checkpoint out")
    if args.load_best_model_at_end and args.save_strategy != "no":
        raise ConfigError(f"{unshared}; training.load_best_model_at_end reads the best checkpoint back at the end, "
                          "and each machine would hold only its own part of it (the run waited for ddp_timeout "
                          "there, then published nothing). Nothing was trained: put output_dir on a filesystem every "
                          "machine shares, or leave load_best_model_at_end out")
    if resuming:  # asked for, even where this machine found nothing to resume
        raise ConfigError(f"{unshared}, so each machine holds only its own part of every checkpoint; resume with "
                          "output_dir on a filesystem every machine shares (copying each machine's checkpoint-N "
                          "files into one directory there makes them whole)")
    _SPLIT_ACROSS_MACHINES.append(True)
    if args.process_index == 0:
        logger.warning(f"{unshared}. The model is written on this machine, but each checkpoint is split across the "
                       "machines' disks and cannot resume, and save_total_limit removes only this machine's parts; "
                       "put output_dir on a filesystem every machine shares")


def _settings(config) -> dict:
    """The resolved config less PER_MACHINE, how this sftkit prepares rows (machines with other versions of sftkit
    may train on other rows from the same files), and the engine the launch set up on this machine."""
    from sftkit.data import PREPARATION

    return {"sftkit data preparation": PREPARATION, **_launch_settings(config.training),
            **{f"{section}.{key}": value for section, values in config.resolved.items()
               for key, value in values.items() if key not in PER_MACHINE}}


def _launch_settings(args) -> dict:
    """What each machine's own Accelerate config decides (`accelerate config` is run on each): the DeepSpeed config
    key by key, FSDP's settings and the mixed precision. Machines launched with ZeRO-3 and ZeRO-2 waited for each
    other in the first collective of loading, for training.ddp_timeout."""
    def flat(node, path: str) -> dict:
        if not isinstance(node, dict):
            return {path: node}
        return {key: value for name, child in node.items() for key, value in flat(child, f"{path}.{name}").items()}

    plugin = args.deepspeed_plugin
    settings = flat(plugin.deepspeed_config, "DeepSpeed config") if plugin else {"DeepSpeed": None}
    settings = {key: value for key, value in settings.items() if not key.endswith("nvme_path")}  # each machine's disk
    settings["FSDP"] = uses_fsdp(args)
    settings.update({f"the launch's {name}": value for name, value in sorted(os.environ.items())
                     if name.startswith(("FSDP_", "ACCELERATE_MIXED_PRECISION"))})
    return settings


def _differ(one, other) -> bool:
    return json.dumps(one, sort_keys=True, default=str) != json.dumps(other, sort_keys=True, default=str)
