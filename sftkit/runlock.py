"""output_dir/.sftkit.lock: one live sftkit command writes an output directory at a time (a run, `sftkit export`,
`sftkit compare`). Taken atomically (a hard link, or an exclusive create where the filesystem has no links); a lock
left by a process that no longer runs, or by an earlier run of a requeued Slurm job, is taken over.
"""

import contextlib
import errno
import json
import logging
import os
import socket
import time
from pathlib import Path

import psutil

from sftkit.errors import ConfigError
from sftkit.layout import GUARD_FILE, LOCK_FILE

logger = logging.getLogger("sftkit")


class RunLock:
    def __init__(self, directory: str | Path, command: str = "another run"):
        self.path = Path(directory)
        self.command = command  # who holds it, as a refused command is told
        self.held = False

    def refuse_a_live_holder(self) -> None:
        """ConfigError while a live command holds the lock, without taking it (the dry run)."""
        with contextlib.suppress(FileNotFoundError):  # no lock, or released meanwhile
            self._refuse_a_live_holder(self._lock_text(self.path / LOCK_FILE), self.path / LOCK_FILE)

    def take(self, instead: str = "wait for it or choose another output_dir") -> None:
        """An exclusive lock file holding who owns it; one left by a process that no longer runs is taken over.
        `instead`: what to do while a live run holds it."""
        lock = self.path / LOCK_FILE
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": self.command,
                **_slurm_run()}
        partial = self.path / f"{LOCK_FILE}.{os.getpid()}.partial"
        partial.write_text(json.dumps(mine))
        try:
            for _ in range(3):
                if self._link(partial, lock):
                    return
                with self._one_at_a_time():  # two runs finding the same stale lock: only one takes it over
                    try:
                        text = self._lock_text(lock)
                    except FileNotFoundError:
                        continue  # released meanwhile: the atomic link again, deleting nothing
                    stale = self._refuse_a_live_holder(text, lock, instead)
                    whose = f"its process {stale['pid']} no longer runs" if "pid" in stale else "it cannot be read"
                    if stale.get("host", socket.gethostname()) != socket.gethostname():
                        whose = f"Slurm requeued its job {stale['slurm_job']}, which this is"
                    print(f"sftkit: taking over {lock}: {whose}", flush=True)
                    lock.unlink(missing_ok=True)  # a dead process's: only a holder of the guard deletes one
                    if self._link(partial, lock):
                        return
        finally:
            partial.unlink(missing_ok=True)
        raise ConfigError(f"training.output_dir {self.path}: could not take the lock {lock}; delete it if no run uses it")

    def release(self) -> None:
        if self.held:
            try:
                (self.path / LOCK_FILE).unlink(missing_ok=True)
            except OSError as error:  # a filesystem gone read-only: how the run ended matters more
                logger.warning(f"could not remove the lock {self.path / LOCK_FILE} ({error.strerror or error}); "
                               "delete it once the disk is mended (a later run takes it over all the same)")
            self.held = False

    def _refuse_a_live_holder(self, text: str, lock: Path, instead: str = "wait for it or choose another "
                                                                            "output_dir") -> dict:
        """ConfigError naming the lock's owner while it runs; else what the stale lock says ({} when unreadable)."""
        holder, alive = self._holder(text)
        if alive:
            since = time.strftime('%H:%M:%S', time.localtime(holder['since']))
            raise ConfigError(f"training.output_dir {self.path} is in use by {holder.get('command', 'another run')} "
                              f"(process {holder['pid']} on {holder['host']}, since {since}); {instead} (if no run "
                              f"uses it, delete {lock})")
        return holder

    def _link(self, partial: Path, lock: Path) -> bool:
        try:
            os.link(partial, lock)  # atomic: fails if the lock exists, and never shows a half-written lock
        except FileExistsError:
            return False
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            return self._create_exclusively(partial, lock)
        self.held = True
        return True

    @staticmethod
    def _lock_text(lock: Path) -> str:
        """The lock's contents; a lock read empty is being written (_create_exclusively): read again a second later."""
        text = lock.read_text()
        if not text:
            time.sleep(1)
            text = lock.read_text()
        return text

    def _create_exclusively(self, partial: Path, lock: Path) -> bool:
        """The lock on a filesystem without hard links (gcsfuse, s3fs, blobfuse2, FAT): an exclusive create, then
        its contents; a lock read empty meanwhile is waited for (take)."""
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as file:
            file.write(partial.read_text())
        self.held = True
        return True

    @contextlib.contextmanager
    def _one_at_a_time(self):
        """An exclusive lock (fcntl, which NFS shares between machines) on GUARD_FILE while a stale lock is judged
        and replaced: otherwise a second run that read the same stale lock could delete the first one's new lock and
        take it too. The guard file stays (deleting it would let a waiter lock a file no longer there). Where the
        filesystem has no locks (Lustre without -o flock), the takeover goes unguarded, and says so."""
        import fcntl

        descriptor = None
        try:
            descriptor = os.open(self.path / GUARD_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.lockf(descriptor, fcntl.LOCK_EX)
        except OSError as error:
            logger.warning(f"{self.path} has no file locks ({error.strerror or error}); taking over a stale lock "
                           "unguarded: start one run at a time there")
        try:
            yield
        finally:
            if descriptor is not None:
                os.close(descriptor)  # releases the lock

    @staticmethod
    def _holder(text: str) -> tuple[dict, bool]:
        """The lock's owner, and whether it still runs (not if its process is gone, or the pid was reused)."""
        try:
            holder = json.loads(text)
        except ValueError:
            return {}, False
        if holder.get("host") != socket.gethostname():  # another machine's process cannot be checked from here,
            # but a Slurm job runs again (requeued: preempted, or at its time limit) only once its last run has ended
            requeued = holder.get("slurm_job") is not None and holder.get("slurm_job") == _slurm_run().get(
                "slurm_job") and holder.get("slurm_restart", 0) < _slurm_run()["slurm_restart"]
            return holder, not requeued
        try:
            return holder, psutil.Process(holder["pid"]).create_time() <= holder["since"] + 1
        except (psutil.Error, KeyError, TypeError):
            return holder, False


def _slurm_run() -> dict:
    """Which Slurm job this process belongs to, and how many times it was requeued (it keeps its id)."""
    job = os.environ.get("SLURM_JOB_ID")
    return {"slurm_job": job, "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0)} if job else {}
