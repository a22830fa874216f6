"""Several machines: a process that fails on one machine stops the processes on the others at once.

torchrun's agents (torch 2.13) watch only their own machine's processes. Once torch.distributed is up, a process
that dies breaks its connections and the others fail within seconds; but a process that fails before (a config or
data file missing on one machine, a different package version) leaves the others waiting in the rendezvous for
training.ddp_timeout (30 minutes). So the failing process posts its error in the launcher's own key-value store
(on the main machine, at MASTER_ADDR:MASTER_PORT), and the first process of every machine polls it once a second:
on a failure elsewhere it prints it and exits, and its machine's launcher stops the rest. Single-machine launches
skip all of this: there the launcher already stops every process when one fails.
"""

import atexit
import os
import socket
import sys
import threading
import time

FAILURE_KEY = "sftkit/failure"
POLL_SECONDS = 1.0
WATCH_STORE_SECONDS = 10.0  # the longest a call of the watcher to the store may block
_stop = threading.Event()


def _several_machines() -> bool:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", world)) and "MASTER_ADDR" in os.environ


def _store(seconds: float):
    from datetime import timedelta

    from torch.distributed import TCPStore

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=seconds))


def watch(prog: str) -> None:
    """Under a launch over several machines, the first process of this machine watches for a failure elsewhere."""
    if not _several_machines() or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    try:
        store = _store(WATCH_STORE_SECONDS)
    except Exception:  # no store to watch (another launcher): the connection timeouts still apply
        return

    def poll():
        while not _stop.wait(POLL_SECONDS):
            try:
                if not store.check([FAILURE_KEY]):
                    continue
                failure = store.get(FAILURE_KEY).decode()
            except Exception:  # the main machine's launcher has ended (the run finished or failed there)
                return
            if _stop.is_set():  # this process is failing itself and says why on its own
                return
            print(f"{prog}: error: stopping, because {failure}", file=sys.stderr, flush=True)
            os._exit(1)

    thread = threading.Thread(target=poll, name="sftkit-peers", daemon=True)
    thread.start()
    # The watcher must be out of the store before Python finalizes: a daemon thread that returns from a C++ call
    # after that is ended by pthread_exit, whose unwinding through the call can abort the process ("terminate called
    # without an active exception", SIGABRT; seen once at the end of a two-machine test on a loaded machine, when
    # this wait was 2 s). So wait as long as one store call can take.
    atexit.register(lambda: (_stop.set(), thread.join(WATCH_STORE_SECONDS + POLL_SECONDS + 1)))


def says_errors() -> bool:
    """Whether this process prints a config or data error: rank 0, and the first process of every other machine
    (a file missing on one machine fails only there, and each machine keeps its own log)."""
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


def report_failure(message: str) -> None:
    """Tell the other machines' processes why this one stops (best effort, a few seconds at most)."""
    _stop.set()
    if not _several_machines():
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
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    text = str(error)
    lost = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted")
    distributed = type(error).__name__ in ("DistNetworkError", "DistBackendError")
    if not distributed and not any(words in text for words in lost):
        return None
    first_sentence = (text.strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
    return (f"lost contact with another process ({first_sentence}): it stopped, or its machine went away; why "
            "is in its own output (the launcher's report names its rank)")
