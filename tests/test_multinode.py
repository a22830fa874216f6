"""Two machines simulated on one host, and the Slurm script that launches the same commands on a cluster.

Each "machine" is its own `accelerate launch` over the shipped accelerate_configs/multi_node_zero3.yaml, with one CPU
process, told its rank, the main machine's address (127.0.0.1) and a free port: the same command a user runs on
each machine, with the values a test must set given on the command line. The two launches rendezvous over TCP as
two machines would (torchrun's static rendezvous, gloo); they share this host's filesystem, as nodes of a cluster
share theirs. Single-process baselines come from test_distributed.py (the same 10 steps of 16 rows).
"""

import contextlib
import importlib.metadata
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import REPO, said
from test_distributed import ACCELERATE, STEPS, assert_loss_like_one_process, check_saved_run

pytestmark = pytest.mark.slow
MULTI_NODE_CONFIG = "accelerate_configs/multi_node_zero3.yaml"
SLURM_SCRIPT = REPO / "examples" / "slurm" / "sft_multinode.sbatch"
MACHINES = 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def machine_commands(port: int, *args: str) -> list[list[str]]:
    """What each machine runs: `accelerate launch` with its rank, one process per machine."""
    return [["accelerate", "launch", "--config_file", MULTI_NODE_CONFIG, "--num_machines", str(MACHINES),
             "--num_processes", str(MACHINES), "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
             "--main_process_port", str(port), "sft.py", *args] for rank in range(MACHINES)]


def training_args(config: str, out: Path) -> list[str]:
    return ["--config", f"configs/{config}", "--training.output_dir", str(out),
            "--training.per_device_train_batch_size", "8", *STEPS]


class Machines:
    """The launches of all machines, started together; each machine's output goes to its own log files."""

    def __init__(self, commands: list[list[str]], logs: Path):
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        self.started = time.perf_counter()
        self.processes = []
        for rank, command in enumerate(commands):
            with open(logs / f"machine{rank}.out", "w") as out, open(logs / f"machine{rank}.err", "w") as err:
                self.processes.append(subprocess.Popen([ACCELERATE, *command[1:]], cwd=REPO, stdout=out, stderr=err,
                                                       env={**os.environ, "PYTHONUNBUFFERED": "1"}))

    def wait(self, timeout: float) -> list[float]:
        """Seconds from the start until each machine's launch ended; any still running after timeout is killed."""
        ended = [None] * len(self.processes)
        deadline = time.perf_counter() + timeout
        while None in ended and time.perf_counter() < deadline:
            for rank, process in enumerate(self.processes):
                if ended[rank] is None and process.poll() is not None:
                    ended[rank] = time.perf_counter() - self.started
            time.sleep(0.2)
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        return ended

    def wait_for(self, path: Path, timeout: float = 300) -> None:
        """Until `path` exists (a checkpoint's trainer_state.json: it is saved); fails if a machine ended first."""
        deadline = time.perf_counter() + timeout
        while not path.is_file():
            if time.perf_counter() > deadline or any(process.poll() is not None for process in self.processes):
                pytest.fail(self.output())
            time.sleep(0.2)

    def signal_workers(self, rank: int, signal_number) -> list:
        """Sends machine `rank`'s training processes (its launcher's children) a signal; returns them."""
        workers = psutil.Process(self.processes[rank].pid).children(recursive=True)
        for worker in workers:
            worker.send_signal(signal_number)
        return workers

    def returncodes(self) -> list[int]:
        return [process.returncode for process in self.processes]

    def stdout(self, rank: int) -> str:
        return (self.logs / f"machine{rank}.out").read_text()

    def stderr(self, rank: int) -> str:
        return (self.logs / f"machine{rank}.err").read_text()

    def output(self) -> str:
        return "\n".join(f"--- machine {rank}\n{self.stdout(rank)[-2000:]}{self.stderr(rank)[-4000:]}"
                         for rank in range(len(self.processes)))


@pytest.mark.parametrize("config", ["lora_train_config.yaml", "default_train_config.yaml"],
                         ids=["zero3-lora", "zero3-full"])
def test_two_machines_on_one_host_train_like_one_process(tmp_path, config):
    out = tmp_path / "out"
    machines = Machines(machine_commands(free_port(), *training_args(config, out)), tmp_path / "logs")
    ended = machines.wait(timeout=600)
    assert machines.returncodes() == [0, 0], machines.output()
    print(f"two machines, ZeRO-3, {config}: {max(ended):.1f} s wall")
    assert machines.stdout(0).count("Run summary") == 1 and "Run summary" not in machines.stdout(1)
    assert [path.parent for path in tmp_path.rglob("model*.safetensors")] == [out], "one model, by the main process"
    summary = check_saved_run(out, config)
    assert (summary["processes"], summary["rows_per_step"]) == (2, 16)
    assert "batch: 8 per device x 1 accumulation x 2 processes = 16 rows per step" in machines.stdout(0), \
        machines.output()
    assert_loss_like_one_process(tmp_path, config, summary, "2 machines")


def test_a_machine_that_fails_before_training_stops_the_other(tmp_path):
    """A data file missing on machine 1 only: it fails before torch.distributed is up, where machine 0 would wait
    in the rendezvous for training.ddp_timeout (30 minutes) if nothing told it."""
    args = training_args("lora_train_config.yaml", tmp_path / "out")
    commands = machine_commands(free_port(), *args)
    commands[1] += ["--dataset.name", str(tmp_path / "only-on-machine-0.jsonl")]
    machines = Machines(commands, tmp_path / "logs")
    ended = machines.wait(timeout=180)
    print(f"machine 1 failed at {ended[1]:.1f} s, machine 0 stopped at {ended[0]:.1f} s")
    assert None not in ended and all(code != 0 for code in machines.returncodes()), machines.output()
    assert ended[0] - ended[1] < 15, machines.output()
    missing = f"dataset.name: {tmp_path / 'only-on-machine-0.jsonl'} does not exist"
    assert said(machines.stderr(1), missing) == 1, machines.output()
    assert said(machines.stderr(0), "stopping, because process 1 on") == 1, machines.output()
    assert missing in machines.stderr(0)


def test_a_machine_that_cannot_start_sftkit_stops_the_other(tmp_path, monkeypatch):
    """Machine 1's command names an sft.py that is not there: its launcher ends at once without a word to machine 0,
    whose processes would wait for training.ddp_timeout (30 minutes) unless it notices who never started."""
    # long enough for machine 0 to have loaded DeepSpeed's op: an exit during the load leaves torch's lock file
    monkeypatch.setenv("SFTKIT_ARRIVAL_SECONDS", "60")
    commands = machine_commands(free_port(), *training_args("lora_train_config.yaml", tmp_path / "out"))
    commands[1][commands[1].index("sft.py")] = str(tmp_path / "elsewhere" / "sft.py")
    machines = Machines(commands, tmp_path / "logs")
    ended = machines.wait(timeout=180)
    print(f"machine 1 ended at {ended[1]:.1f} s, machine 0 at {ended[0]:.1f} s")
    assert None not in ended and all(code != 0 for code in machines.returncodes()), machines.output()
    assert "stopping, because process 1 never started sftkit within 60 s" in machines.stderr(0), machines.output()


@pytest.mark.parametrize("other", ["max_steps", "zero_stage", "num_processes", "sftkit"])
def test_machines_given_other_settings_stop_together_before_training(tmp_path, other):
    """Another max_steps on machine 1 would leave machine 0 waiting in a collective for training.ddp_timeout; so did
    machines launched with ZeRO-3 and ZeRO-2 (each machine has its own Accelerate config), in the model's loading.
    Machines given other process counts trained together, on a number of processes none was given, without a word."""
    commands = machine_commands(free_port(), *training_args("lora_train_config.yaml", tmp_path / "out"))
    if other == "max_steps":
        commands[1] += ["--training.max_steps", "6"]
        expected = "training.max_steps 6 (process 0: 10)"
    elif other == "sftkit":  # a `git pull` on machine 0 only: machine 1 runs the commit before
        older = tmp_path / "older"
        subprocess.run(["git", "clone", "-q", str(REPO), str(older)], check=True)
        subprocess.run(["git", "-C", str(older), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                        "--allow-empty", "-m", "another commit"], check=True)
        head = subprocess.run(["git", "-C", str(older), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        commands[1][commands[1].index("sft.py")] = str(older / "sft.py")
        expected = (f"runs other software than process 0 on {socket.gethostname()}: sftkit "
                    f"{importlib.metadata.version('sftkit')} (git {head})")
    elif other == "num_processes":  # 1 process on machine 0, 2 on machine 1: 3 in all, which neither was given
        commands[1][commands[1].index("--num_processes") + 1] = "4"
        expected = (f"the machines were launched with other --num_processes: 2 processes on the machine of process 1 "
                    f"on {socket.gethostname()} and 1 on that of process 0 on {socket.gethostname()}, 3 in all")
    else:
        launch = (REPO / MULTI_NODE_CONFIG).read_text().replace("deepspeed_configs/zero3.json",
                                                                str(REPO / "deepspeed_configs" / "zero2.json"))
        (tmp_path / "zero2.yaml").write_text(launch)
        commands[1][commands[1].index(MULTI_NODE_CONFIG)] = str(tmp_path / "zero2.yaml")
        expected = "DeepSpeed config.zero_optimization.stage 2 (process 0: 3)"
    machines = Machines(commands, tmp_path / "logs")
    ended = machines.wait(timeout=180)
    assert None not in ended and all(code != 0 for code in machines.returncodes()), machines.output()
    assert abs(ended[0] - ended[1]) < 15, machines.output()
    for machine in range(MACHINES):
        said = machines.stderr(machine)
        assert "process 1 on " in said and expected in said, machines.output()
        assert other in ("sftkit", "num_processes") or "runs with other settings or data than process 0 on " in said
    assert "step 1/" not in machines.stdout(0) + machines.stderr(0)


def training_for_long(args: list[str], logs: Path) -> Machines:
    """Two machines started on a run of 1,000 steps, once the first step is logged."""
    args[args.index("--training.max_steps") + 1] = "1000"
    machines = Machines(machine_commands(free_port(), *args), logs)
    deadline = time.perf_counter() + 300
    while "step 1/" not in machines.stderr(0) + machines.stdout(0):
        if time.perf_counter() > deadline or any(process.poll() is not None for process in machines.processes):
            pytest.fail(machines.output())
        time.sleep(0.2)
    return machines


def test_a_killed_process_stops_the_other_machine(tmp_path):
    """Machine 1's training process dies (SIGKILL: out of memory, a node failure) mid-training."""
    args = training_args("lora_train_config.yaml", tmp_path / "out")
    machines = training_for_long(args, tmp_path / "logs")
    killed = time.perf_counter()
    assert machines.signal_workers(1, signal.SIGKILL), "machine 1's launcher has its training process"
    ended = machines.wait(timeout=120)
    stopped = [seconds - (killed - machines.started) for seconds in ended if seconds is not None]
    print(f"after the kill: machine 1 stopped in {stopped[1]:.1f} s, machine 0 in {stopped[0]:.1f} s")
    assert len(stopped) == 2 and all(code != 0 for code in machines.returncodes()), machines.output()
    assert max(stopped) < 60
    assert "lost contact with another process" in machines.stderr(0), machines.output()
    assert "no checkpoint was saved (set training.save_strategy: steps to keep some)" in machines.stderr(0)
    assert "Signal 9 (SIGKILL)" in machines.stderr(1)


def test_the_main_machines_death_leaves_the_newest_checkpoint_named_in_the_other_machines_log(tmp_path):
    """Only the main process named the newest checkpoint after a lost contact: with the main machine gone, no log
    said where the run could resume from."""
    out = tmp_path / "out"
    args = training_args("lora_train_config.yaml", out) + ["--training.save_strategy", "steps", "--training.save_steps",
                                                           "2"]
    machines = training_for_long(args, tmp_path / "logs")
    machines.wait_for(out / "checkpoint-2" / "trainer_state.json", timeout=120)
    machines.signal_workers(0, signal.SIGKILL)
    machines.wait(timeout=120)
    assert "lost contact with another process" in machines.stderr(1), machines.output()
    assert f"the newest checkpoint is {out}/checkpoint-" in machines.stderr(1), machines.output()


def test_a_hung_machine_is_named_after_ddp_timeout_with_the_newest_checkpoint(tmp_path):
    """A frozen machine (a stalled disk or GPU) keeps its connections open: the other one waited ddp_timeout, then
    ended with gloo's traceback alone, no line of sftkit's and no checkpoint named."""
    out = tmp_path / "out"
    args = training_args("lora_train_config.yaml", out) + ["--training.save_strategy", "steps", "--training.save_steps",
                                                           "2", "--training.ddp_timeout", "20"]
    machines = training_for_long(args, tmp_path / "logs")
    machines.wait_for(out / "checkpoint-2" / "trainer_state.json", timeout=120)
    frozen = machines.signal_workers(1, signal.SIGSTOP)
    deadline = time.perf_counter() + 120
    while machines.processes[0].poll() is None and time.perf_counter() < deadline:
        time.sleep(0.2)
    for worker in frozen:  # machine 1 would wait forever
        with contextlib.suppress(psutil.Error):
            worker.send_signal(signal.SIGKILL)
    machines.wait(timeout=60)
    assert machines.returncodes()[0] not in (0, None), machines.output()
    # gloo says either, as its recv's or its pair's timeout comes first
    assert re.search(r"sft.py: error: another process did not answer within training.ddp_timeout \((Timed out waiting "
                     r"20000ms|Application timeout caused pair closure)", machines.stderr(0)), machines.output()
    assert f"the newest checkpoint is {out}/checkpoint-" in machines.stderr(0), machines.output()


def test_a_stop_on_one_machine_is_explained_in_every_machines_log_with_its_own_resume_command(tmp_path):
    """A scheduler's SIGTERM to machine 1 alone (one node preempted): both machines stop at the same step with one
    shared checkpoint. Machine 1's log showed only torchrun's exit report, and machine 0's resume command carried
    --machine_rank 0, wrong for machine 1."""
    out = tmp_path / "out"
    args = training_args("lora_train_config.yaml", out)
    machines = training_for_long(args, tmp_path / "logs")
    machines.processes[1].send_signal(signal.SIGTERM)  # the launcher, which passes it on to its training process
    machines.wait(timeout=180)
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1, machines.output()
    for rank in range(MACHINES):
        said = [line for line in machines.stderr(rank).splitlines() if line.startswith("sft.py: stopped by SIGTERM")]
        assert len(said) == 1, machines.output()
        assert f"checkpoint saved in {checkpoints[0]}" in said[0]
        assert "Resume with, on every machine, the command that started it there and --training.resume_from_checkpoint" \
               " true; on this one: accelerate launch" in said[0]
        assert f" --machine_rank {rank} " in said[0] and said[0].endswith(
            f"sft.py {' '.join(args)} --training.resume_from_checkpoint true"), said[0]


def dying_machine(tmp_path, when: str) -> str:
    """sft.py for machine 1, whose processes die (os._exit, as a lost node) in the export: as they start gathering
    the weights ('gather'), or once the weights are gathered, while machine 0 merges and publishes ('saved')."""
    script = tmp_path / "sft_that_dies.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(REPO)!r})
import transformers
save_model = transformers.Trainer.save_model

def dying_save_model(self, output_dir=None, _internal_call=False):
    if _internal_call:  # a checkpoint
        return save_model(self, output_dir, _internal_call)
    if {when!r} == "saved":
        save_model(self, output_dir, _internal_call)
    os._exit(9)

transformers.Trainer.save_model = dying_save_model
from sftkit.cli import main
raise SystemExit(main())
""")
    return str(script)


@pytest.mark.parametrize("per_machine", [1, 2])
def test_a_machine_lost_after_the_model_is_published_leaves_a_finished_run(tmp_path, per_machine):
    """Machine 1 died once the weights were gathered: machine 0 said the run failed and no checkpoint was saved, and
    marked it failed, beside a complete published model (which the next run would have a user --overwrite). With
    two processes on each machine, machine 0's second one failed at the last barrier while the first published.
    No process waits for the publish now: it has nothing left to do with the model."""
    out = tmp_path / "out"
    commands = machine_commands(free_port(), *training_args("lora_train_config.yaml", out))
    for command in commands:
        command[command.index("--num_processes") + 1] = str(MACHINES * per_machine)
    commands[1][commands[1].index("sft.py")] = dying_machine(tmp_path, "saved")
    machines = Machines(commands, tmp_path / "logs")
    deadline = time.perf_counter() + 400
    while "Run summary" not in machines.stdout(0) and machines.processes[0].poll() is None \
            and time.perf_counter() < deadline:
        time.sleep(0.5)
    # machine 0's training processes have ended; its launcher would wait 300 s more for machine 1's (torchrun's exit
    # barrier), then exit as its processes did
    machines.wait(timeout=10)
    assert "Run summary" in machines.stdout(0) and "sft.py: error" not in machines.stderr(0), machines.output()
    # lost in the final evaluation, which now comes after the weights are staged
    assert "the trained model is published without the final evaluation and sample reply" in machines.stderr(0)
    assert json.loads((out / "sftkit_run.json").read_text())["status"] == "finished"
    assert (out / "run_summary.json").is_file() and (out / "lora_weights" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("checkpoints", [False, True])
def test_a_machine_lost_while_the_weights_are_gathered_leaves_what_can_be_finished(tmp_path, checkpoints):
    """Machine 1 died as the export began: machine 0 said it could not write the adapter, kept a staging directory
    without weights that the next run called a trained model, and `sftkit export` blamed the DeepSpeed config.
    Where the run's last step is a checkpoint, `sftkit export` publishes from it."""
    out = tmp_path / "out"
    args = training_args("lora_train_config.yaml", out)
    if checkpoints:
        args += ["--training.save_strategy", "steps", "--training.save_steps", "5"]
    commands = machine_commands(free_port(), *args)
    commands[1][commands[1].index("sft.py")] = dying_machine(tmp_path, "gather")
    machines = Machines(commands, tmp_path / "logs")
    machines.wait(timeout=300)
    assert machines.returncodes()[0] != 0, machines.output()
    assert "lost contact with another process" in machines.stderr(0), machines.output()
    if not checkpoints:
        assert ("it happened before the weights were written, so no trained weights were saved; no checkpoint was saved"
                in machines.stderr(0)), machines.output()
        assert not (out / ".export-incomplete").exists() and not (out / "config.json").exists()
        return
    assert (f"the model it exports is saved in {out / 'checkpoint-10'}: finish the export from it with: python -m "
            f"sftkit.export {out}") in machines.stderr(0), machines.output()
    finished = subprocess.run([sys.executable, "-m", "sftkit.export", str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert (out / "config.json").is_file() and (out / "lora_weights" / "adapter_model.safetensors").is_file()


def test_save_on_each_node_over_several_machines_is_refused_before_loading(tmp_path):
    """Each machine's first process wrote the adapter into the shared output_dir; under ZeRO-3 machine 1's held 56
    empty tensors, published once with exit code 0."""
    args = [*training_args("lora_train_config.yaml", tmp_path / "out"), "--training.save_on_each_node", "true"]
    machines = Machines(machine_commands(free_port(), *args), tmp_path / "logs")
    machines.wait(timeout=180)
    assert all(code != 0 for code in machines.returncodes()), machines.output()
    assert "training.save_on_each_node: true has every machine write the model and checkpoints into output_dir" in \
        machines.stderr(0), machines.output()
    assert not (tmp_path / "out").exists()


def test_an_output_dir_the_machines_do_not_share_is_said_at_the_start_and_refused_for_a_resume(tmp_path):
    """Each machine given its own directory: the run went on without a word, and its resume failed on each machine
    with another part of the checkpoint 'damaged' and the advice to start afresh with --overwrite."""
    args = [*training_args("lora_train_config.yaml", tmp_path / "shared"), "--training.save_strategy", "steps",
            "--training.save_steps", "5"]
    commands = machine_commands(free_port(), *args)
    commands[1] += ["--training.output_dir", str(tmp_path / "machine1")]
    machines = Machines(commands, tmp_path / "logs")
    machines.wait(timeout=300)
    assert machines.returncodes() == [0, 0], machines.output()
    assert (f"sftkit: warning: training.output_dir is not one directory every machine shares: process 1 on "
            f"{socket.gethostname()} does not see this run's lock in {tmp_path / 'machine1'}") in machines.stderr(0)
    resume = machine_commands(free_port(), *args, "--training.max_steps", "12", "--training.resume_from_checkpoint",
                              "true")
    resume[1] += ["--training.output_dir", str(tmp_path / "machine1")]
    machines = Machines(resume, tmp_path / "resume-logs")
    machines.wait(timeout=180)
    assert all(code != 0 for code in machines.returncodes()), machines.output()
    assert ("error: training.output_dir is not one directory every machine shares: process 1 on "
            in machines.stderr(0)), machines.output()
    assert "start afresh with --overwrite" not in machines.stderr(0) + machines.stderr(1)
    assert "each machine holds only its own part of every checkpoint" in machines.stderr(0), machines.output()

    # the Slurm script's first launch (resume_from_checkpoint auto, no checkpoint yet): no resume to speak of
    fresh = [*training_args("lora_train_config.yaml", tmp_path / "fresh"), "--training.resume_from_checkpoint",
             "auto"]
    commands = machine_commands(free_port(), *fresh)
    commands[1] += ["--training.output_dir", str(tmp_path / "fresh1")]
    machines = Machines(commands, tmp_path / "fresh-logs")
    machines.wait(timeout=180)
    assert all(code != 0 for code in machines.returncodes()), machines.output()
    assert ("training.resume_from_checkpoint asks a relaunch to continue from its checkpoints, which would each be "
            "split across the machines' disks. Nothing was trained") in machines.stderr(0), machines.output()

    # the best checkpoint read back at the end, each machine from its own disk: it waited for ddp_timeout, then
    # published nothing and said no checkpoint was saved
    best = [*training_args("lora_train_config.yaml", tmp_path / "best"), "--training.save_strategy", "steps",
            "--training.save_steps", "5", "--training.eval_strategy", "steps", "--training.eval_steps", "5",
            "--training.load_best_model_at_end", "true", "--training.metric_for_best_model", "eval_loss"]
    commands = machine_commands(free_port(), *best)
    commands[1] += ["--training.output_dir", str(tmp_path / "best1")]
    machines = Machines(commands, tmp_path / "best-logs")
    machines.wait(timeout=180)
    assert all(code != 0 for code in machines.returncodes()), machines.output()
    assert "training.load_best_model_at_end reads the best checkpoint back at the end" in machines.stderr(0), \
        machines.output()
    assert "step 1/" not in machines.stdout(0) + machines.stderr(0)


def test_a_machine_lost_with_unshared_output_dirs_names_the_checkpoint_parts_this_machine_holds(tmp_path):
    """Each machine held its part of every checkpoint, and the other machine's loss was reported with 'no
    checkpoint was saved yet'."""
    out = tmp_path / "machine0"
    args = training_args("lora_train_config.yaml", out) + ["--training.save_strategy", "steps", "--training.save_steps",
                                                           "2"]
    args[args.index("--training.max_steps") + 1] = "1000"
    commands = machine_commands(free_port(), *args)
    commands[1] += ["--training.output_dir", str(tmp_path / "machine1")]
    machines = Machines(commands, tmp_path / "logs")
    machines.wait_for(out / "checkpoint-2" / "trainer_state.json")
    machines.signal_workers(1, signal.SIGKILL)
    machines.wait(timeout=120)
    assert "lost contact with another process" in machines.stderr(0), machines.output()
    assert f"each checkpoint is split across the machines' output_dirs; {out}/checkpoint-" in machines.stderr(0)
    assert "holds this machine's part: copy every machine's checkpoint-" in machines.stderr(0)


def test_the_slurm_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_slurm_script_without_a_gpu_count_stops_instead_of_launching_no_process(tmp_path):
    """Without SLURM_GPUS_ON_NODE (a job that asked for GPUs with --gres) and without nvidia-smi (a login node), it
    printed and ran `--num_processes 0`, which torch's launcher refuses on every node with a bare AssertionError."""
    (tmp_path / "srun").write_text('#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n')  # one node's task
    (tmp_path / "srun").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
           "SLURM_JOB_NODELIST": "a,b"}
    for args in (["--print-command"], []):
        result = subprocess.run(["bash", str(SLURM_SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True,
                                text=True)
        assert result.returncode == 1 and "--num_processes" not in result.stdout, result.stdout
        assert "cannot tell how many GPUs this node has" in result.stderr, result.stderr


def test_the_slurm_script_runs_the_loopback_commands_on_each_node(tmp_path):
    """With Slurm's variables as a 2-node allocation sets them, the script's command for node 0 and node 1 is
    exactly what the two-machine test runs. Checked twice: printed (--print-command), and through the script's own
    srun line, with srun and accelerate replaced by stand-ins that record what each node would run."""
    port = free_port()
    args = training_args("lora_train_config.yaml", tmp_path / "out")
    expected = machine_commands(port, *args[:2], "--training.resume_from_checkpoint", "auto", *args[2:])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        # srun: the task once per node, with that node's SLURM_NODEID, after the options.
        "srun": 'printf "%s\\n" "$@" > "$RECORD/srun"; while [[ $1 == --* ]]; do shift; done\n'
                'for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do SLURM_NODEID=$node "$@" || exit; done\n',
        "accelerate": 'printf "%s\\0" accelerate "$@" > "$RECORD/node$SLURM_NODEID"\n',
        "scontrol": '[[ $1 == show && $2 == hostnames ]] && tr , "\\n" <<< "$3"\n',  # a list, expanded
    }
    # Every stand-in is written before any is run (an executable rewritten just before it is run can be "text file
    # busy" while a forked process still holds it open for writing); the range-expanding scontrol has its own folder.
    ranges_dir = tmp_path / "bin-ranges"
    ranges_dir.mkdir()
    for folder, name, body in [*((bin_dir, name, body) for name, body in stand_ins.items()),
                               (ranges_dir, "scontrol", 'printf "gpu07\\ngpu08\\n"\n')]:
        (folder / name).write_text("#!/bin/bash\n" + body)
        (folder / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "RECORD": str(tmp_path), "SLURM_JOB_NUM_NODES": str(MACHINES),
           "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.2", "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": "4242",
           "MAIN_PROCESS_PORT": str(port), "SFTKIT_CONFIG": "configs/lora_train_config.yaml",
           "SLURM_CPUS_PER_TASK": "16"}
    script_args = args[2:]  # the script names the config itself (SFTKIT_CONFIG)

    for rank in range(MACHINES):
        printed = subprocess.run(["bash", str(SLURM_SCRIPT), "--print-command", *script_args], cwd=REPO,
                                 env={**env, "SLURM_NODEID": str(rank)}, capture_output=True, text=True)
        assert printed.returncode == 0, printed.stderr
        assert shlex.split(printed.stdout) == expected[rank]

    submitted = subprocess.run(["bash", str(SLURM_SCRIPT), *script_args], cwd=REPO, env=env, capture_output=True,
                               text=True)
    assert submitted.returncode == 0, submitted.stderr
    for rank in range(MACHINES):
        assert (tmp_path / f"node{rank}").read_text().split("\0")[:-1] == expected[rank]
    # Slurm 22.05 and later: srun does not take the job's --cpus-per-task, and binds each task to one core without it
    assert "--cpus-per-task=16" in (tmp_path / "srun").read_text().splitlines()

    del env["MAIN_PROCESS_PORT"]
    env["SLURM_JOB_NODELIST"] = "gpu[07-08]"  # scontrol expands a range; its first host is the main node
    env["PATH"] = f"{ranges_dir}:{env['PATH']}"
    printed = subprocess.run(["bash", str(SLURM_SCRIPT), "--print-command"], cwd=REPO,
                             env={**env, "SLURM_NODEID": "1"}, capture_output=True, text=True)
    assert printed.returncode == 0 and "--main_process_ip" in printed.stdout, (printed.returncode, printed.stderr)
    command = shlex.split(printed.stdout)
    assert command[command.index("--main_process_ip") + 1] == "gpu07"
    assert command[command.index("--main_process_port") + 1] == str(20000 + 4242 % 20000)


def test_the_slurm_script_stops_at_the_time_limit_with_a_checkpoint_and_its_relaunch_finishes_the_run(tmp_path):
    """Slurm's warning before the time limit (--signal=B:USR1) reaches the script, which has Slurm signal every
    process of the job's steps: both machines stop at one step with one checkpoint and the job queues itself again.
    The relaunch, the same script with the same arguments, resumes from that checkpoint (resume_from_checkpoint auto)
    and finishes the run; one more relaunch finds it finished and ends. srun, scancel and scontrol are stand-ins;
    each node's `accelerate launch` and its training process are real."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_ins = {
        # srun: the task once per node, all at once, with that node's SLURM_NODEID, each its own process group (a
        # step's processes, as Slurm tracks them)
        "srun": 'while [[ $1 == --* ]]; do shift; done\n'
                'pids=()\n'
                'for node in $(seq 0 $((SLURM_JOB_NUM_NODES - 1))); do\n'
                '  SLURM_NODEID=$node setsid "$@" & pids+=($!); echo $! >> "$RECORD/steps"\n'
                'done\n'
                'status=0\n'
                'for pid in "${pids[@]}"; do wait $pid || status=$?; done\n'
                'exit $status\n',
        # scancel --signal=TERM JOB: the signal to every process of the job's steps, not to the batch script
        "scancel": '[[ $1 == --signal=TERM ]] && while read -r group; do kill -TERM -- -$group; done < "$RECORD/steps"\n',
        "scontrol": 'if [[ $1 == show ]]; then tr , "\\n" <<< "$3"; else echo "$@" >> "$RECORD/scontrol"; fi\n',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text("#!/bin/bash\n" + body)
        (bin_dir / name).chmod(0o755)
    out = tmp_path / "out"
    args = training_args("lora_train_config.yaml", out)[2:]  # the script names the config itself (SFTKIT_CONFIG)
    args[args.index("--training.max_steps") + 1] = "40"
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(ACCELERATE).parent}:/usr/bin:/bin", "RECORD": str(tmp_path),
           "SLURM_JOB_NUM_NODES": str(MACHINES), "SLURM_JOB_NODELIST": "127.0.0.1,127.0.0.2",
           "SLURM_GPUS_ON_NODE": "1", "SLURM_JOB_ID": "4242", "MAIN_PROCESS_PORT": str(free_port()),
           "SFTKIT_CONFIG": "configs/lora_train_config.yaml", "PYTHONUNBUFFERED": "1"}

    log = tmp_path / "job.out"
    with open(log, "w") as written:
        job = subprocess.Popen(["bash", str(SLURM_SCRIPT), *args], cwd=REPO, env=env, stdout=written,
                               stderr=subprocess.STDOUT)
    deadline = time.perf_counter() + 300
    while "step 1/" not in log.read_text():
        if time.perf_counter() > deadline or job.poll() is not None:
            job.kill()
            pytest.fail(log.read_text()[-6000:])
        time.sleep(0.2)
    job.send_signal(signal.SIGUSR1)  # what Slurm sends the batch script 600 s before the time limit
    assert job.wait(timeout=180) == 0, log.read_text()[-6000:]
    first = log.read_text()
    checkpoints = sorted(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and not (out / "adapter_config.json").exists(), first[-6000:]
    assert "sbatch: the time limit is near: stopping with a checkpoint, then queuing job 4242 again" in first
    assert first.count(f"checkpoint saved in {checkpoints[0]}") == MACHINES, first[-6000:]
    assert (tmp_path / "scontrol").read_text() == "requeue 4242\n"
    stopped_at = int(checkpoints[0].name.rsplit("-", 1)[1])
    assert 0 < stopped_at < 40

    env["MAIN_PROCESS_PORT"] = str(free_port())
    relaunch = subprocess.run(["bash", str(SLURM_SCRIPT), *args], cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"},
                              capture_output=True, text=True, timeout=600)
    assert relaunch.returncode == 0, (relaunch.stdout + relaunch.stderr)[-6000:]
    assert f"resumes from {checkpoints[0]}" in relaunch.stdout
    assert json.loads((out / "run_summary.json").read_text())["steps"] == 40
    assert json.loads((out / "sftkit_run.json").read_text())["status"] == "finished"
    assert (tmp_path / "scontrol").read_text() == "requeue 4242\n"  # not queued again once finished

    env["MAIN_PROCESS_PORT"] = str(free_port())  # requeued once more (the run ended as the signal came): nothing to do
    again = subprocess.run(["bash", str(SLURM_SCRIPT), *args], cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "2"},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-6000:]
    assert f"training.output_dir {out} already holds this run's finished model (step 40): nothing is left to " \
           "train" in again.stdout + again.stderr


def test_a_final_evaluation_failing_on_another_machine_leaves_the_run_failed_unlocked_and_its_model_named(tmp_path):
    """Machine 1 ran out of memory in the final evaluation: machine 0's watcher ended its processes at once, which
    left the lock (so `sftkit export` from another host was refused), the record saying "exporting", and machine 0's
    log naming only machine 1's view of the work (its own output_dir need not be shared)."""
    from sftkit.export import main as export_main
    from sftkit.layout import ADAPTER_DIR, LOCK_FILE, RUN_FILE, STAGING_DIR

    script = tmp_path / "sft_eval_oom.py"
    script.write_text(f"""import sys
sys.path.insert(0, {str(REPO)!r})
import torch
from sftkit import monitor
prediction_step = monitor.MonitoredSFTTrainer.prediction_step

def out_of_memory_in_the_final_evaluation(self, *args, **kwargs):
    if self.guard.training_over:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.83 GiB")
    return prediction_step(self, *args, **kwargs)

monitor.MonitoredSFTTrainer.prediction_step = out_of_memory_in_the_final_evaluation
from sftkit.cli import main
raise SystemExit(main())
""")
    out = tmp_path / "out"
    commands = machine_commands(free_port(), *training_args("lora_train_config.yaml", out))
    commands[1][commands[1].index("sft.py")] = str(script)
    machines = Machines(commands, tmp_path / "logs")
    machines.wait(timeout=400)
    assert all(code != 0 for code in machines.returncodes()), machines.output()
    assert "the final evaluation failed on process 1 (OutOfMemoryError" in machines.stderr(1), machines.output()
    assert f"sftkit: on this machine, the trained adapter is kept in {out / STAGING_DIR / ADAPTER_DIR}: finish the " \
           f"export with: python -m sftkit.export {out}" in machines.stderr(0), machines.output()
    assert not (out / LOCK_FILE).exists() and json.loads((out / RUN_FILE).read_text())["status"] == "failed"
    assert export_main([str(out)]) == 0 and (out / ADAPTER_DIR / "adapter_model.safetensors").is_file()
