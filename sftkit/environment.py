"""`python sft.py env`: what this machine has for training, one verdict per check, to paste into a bug report.

The pieces come from the libraries themselves (what `accelerate env`, `transformers env` and `ds_report` read);
this puts them in one short report and compares the stack with requirements.txt.
"""

import importlib.metadata
import os
import platform
from pathlib import Path

from sftkit.errors import first_line
from sftkit.paths import PROJECT_DIR

STACK = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "deepspeed", "bitsandbytes", "pyyaml",
         "tensorboard", "matplotlib")
EXTRAS = {"gradio": "web chat (python -m sftkit.webchat)", "wandb": "report_to: wandb"}


# where a container's memory limit is read: cgroup v2, then v1 (whose "no limit" is a huge number); beside each,
# what the container uses, and the statistics with its page cache (file; v1, over its children: total_cache)
CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")
CGROUP_MEMORY_USAGE = ("/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory/memory.usage_in_bytes")
CGROUP_MEMORY_STATS = ("/sys/fs/cgroup/memory.stat", "/sys/fs/cgroup/memory/memory.stat")
MEMINFO = Path("/proc/meminfo")


def host_memory() -> int | None:
    """Bytes of memory a process here can have at most: the machine's, or its container's limit where lower. None
    where the system does not say (not a POSIX system)."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None
    for limit in CGROUP_MEMORY_LIMITS:
        try:
            value = Path(limit).read_text().strip()
        except OSError:
            continue
        if value.isdigit():  # "max": none
            memory = min(memory, int(value))
    return memory


def available_memory() -> int | None:
    """Bytes of memory a process here can take now, without the system killing one: what the system says it can
    free (MemAvailable, the page cache included) and its free swap, or what the container's limit leaves, where less.
    None where the system does not say (not Linux)."""
    try:
        fields = dict(line.split(":", 1) for line in MEMINFO.read_text().splitlines() if ":" in line)
        available = sum(int(fields.get(key, "0 kB").split()[0]) for key in ("MemAvailable", "SwapFree")) * 1024
    except (OSError, ValueError):
        return None
    if "MemAvailable" not in fields:  # kernels before 3.14 do not say
        return None
    for limit, usage, stats in zip(CGROUP_MEMORY_LIMITS, CGROUP_MEMORY_USAGE, CGROUP_MEMORY_STATS):
        try:
            value, used = Path(limit).read_text().strip(), int(Path(usage).read_text())
            dropped = dict(line.split() for line in Path(stats).read_text().splitlines() if line.count(" ") == 1)
        except (OSError, ValueError):
            continue
        if value.isdigit():  # the page cache (the base's own files, read before) is dropped before a process is
            in_use = used - int(dropped.get("file", dropped.get("total_cache", 0)))  # killed: not in use
            available = min(available, int(value) - in_use)
    return max(available, 0)


def report() -> str:
    checks = [("ok", "sftkit", sftkit_version()), ("ok", "python", f"{platform.python_version()} on {platform.platform()}")]
    checks += _library_checks()
    checks += _accelerator_checks()
    checks += [_bitsandbytes_check(), _deepspeed_check(), _accelerate_config_check()]
    width = max(len(name) for _, name, _ in checks)
    lines = [f"  {verdict:<5} {name:<{width}}  {detail}" for verdict, name, detail in checks]
    failed = sum(verdict == "FAIL" for verdict, _, _ in checks)
    summary = "ready to train" if not failed else f"{failed} check(s) failed: see FAIL above"
    return "sftkit environment (paste this into a bug report)\n" + "\n".join(lines) + f"\n  => {summary}"


def sftkit_version() -> str:
    """This sftkit's version, with its git commit where it runs from a checkout (a fix can land between versions)."""
    try:
        version = importlib.metadata.version("sftkit")
    except importlib.metadata.PackageNotFoundError:
        version = "not installed"
    commit = _checkout_commit()
    return f"{version} (git {commit[:12]})" if commit else version


def _checkout_commit() -> str | None:
    """The commit checked out in PROJECT_DIR, from git's own files (HEAD, its ref, or packed-refs; a worktree's .git
    file names its directory, whose refs are shared with the main one)."""
    git = PROJECT_DIR / ".git"
    try:
        if git.is_file():
            git = PROJECT_DIR / git.read_text().strip().removeprefix("gitdir: ")
        shared = git / (git / "commondir").read_text().strip() if (git / "commondir").is_file() else git
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        if (shared / ref).is_file():
            return (shared / ref).read_text().strip()
        packed = (line.split() for line in (shared / "packed-refs").read_text().splitlines() if line[:1] not in "#^")
        return next((words[0] for words in packed if words[1:] == [ref]), None)
    except OSError:  # not a checkout (an installed package)
        return None


def library_versions(names=STACK) -> dict[str, str | None]:
    """sftkit's, Python's and each library's version (None: not installed), as a run records them beside its model."""
    versions = {"sftkit": sftkit_version(), "python": platform.python_version()}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _library_checks() -> list[tuple[str, str, str]]:
    pins = _pinned_versions()
    checks = []
    for name, version in library_versions((*STACK, *EXTRAS)).items():
        if name in ("sftkit", "python"):
            continue
        if version is None:
            if name in EXTRAS:
                checks.append(("warn", name, f"not installed, needed for {EXTRAS[name]}: "
                                             "pip install -r requirements-extras.txt"))
            else:
                checks.append(("FAIL", name, "not installed: pip install -r requirements.txt"))
            continue
        wanted = pins.get(name)
        if wanted is None or version.split("+")[0] == wanted:  # 2.13.0+cpu is the CPU build of 2.13.0
            checks.append(("ok", name, version))
        else:
            checks.append(("warn", name, f"{version}, requirements.txt pins {wanted} (tested combination)"))
    return checks


def _pinned_versions() -> dict[str, str]:
    """The versions pinned in requirements*.txt: from the installed package's metadata, else from a clone's files."""
    try:
        lines = importlib.metadata.requires("sftkit") or []
    except importlib.metadata.PackageNotFoundError:
        lines = [line for file in ("requirements.txt", "requirements-extras.txt") if (PROJECT_DIR / file).exists()
                 for line in (PROJECT_DIR / file).read_text().splitlines()]
    pins = {}
    for line in lines:
        name, _, version = line.split("#")[0].split(";")[0].strip().partition("==")
        if version:
            pins[name.lower()] = version
    return pins


def _accelerator_checks() -> list[tuple[str, str, str]]:
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build"
        return [("warn", "gpu", f"none visible (torch {build}): training runs on the CPU, fine for the embedded "
                                "default, far too slow for real models")]
    checks = [("ok", "cuda", f"{torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")]
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        bf16 = "bf16" if props.major >= 8 else "no bf16 (fp16 or fp32 only)"
        checks.append(("ok", f"gpu {index}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                             f"compute {props.major}.{props.minor}, {bf16}"))
    return checks


def _bitsandbytes_check() -> tuple[str, str, str]:
    try:
        from bitsandbytes import cextension
    except Exception as error:  # a broken native library raises all kinds of errors at import
        return "FAIL", "bitsandbytes", f"import failed ({type(error).__name__}: {error}); QLoRA will not work"
    backend = cextension.BNB_BACKEND
    if backend == "CPU":
        return "ok", "bitsandbytes", "CPU backend: 4-bit (QLoRA) and 8-bit optimizers work, slowly"
    return "ok", "bitsandbytes", f"{backend} backend"


def _deepspeed_check() -> tuple[str, str, str]:
    try:
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
    except Exception as error:
        return "FAIL", "deepspeed ops", f"import failed ({type(error).__name__}: {error})"
    compatible = {name: builder.is_compatible(verbose=False) for name, builder in ALL_OPS.items()
                  if name != "deepspeed_not_implemented"}
    can = ", ".join(name for name, ok in compatible.items() if ok) or "none"
    cannot = ", ".join(name for name, ok in compatible.items() if not ok)
    detail = f"can build {can}" + (f"; cannot build {cannot}" if cannot else "") + " (built on first use)"
    needed = "cpu_adam" in compatible and not compatible["cpu_adam"]
    return ("warn" if needed else "ok"), "deepspeed ops", detail + ("; ZeRO offload needs cpu_adam" if needed else "")


def _accelerate_config_check() -> tuple[str, str, str]:
    import yaml
    from accelerate.commands.config import default_config_file

    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE") or default_config_file)
    if not path.exists():
        return "ok", "accelerate config", (f"none at {path}: `accelerate launch` runs one process unless given "
                                           "--config_file (see accelerate_configs/) or `accelerate config`")
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        return "FAIL", "accelerate config", f"{path} is not valid YAML: {first_line(error)}"
    keys = ("distributed_type", "num_processes", "num_machines", "mixed_precision", "use_cpu")
    detail = ", ".join(f"{key} {settings[key]}" for key in keys if key in settings)
    deepspeed = (settings.get("deepspeed_config") or {}).get("deepspeed_config_file")
    return "ok", "accelerate config", f"{path}: {detail}" + (f", DeepSpeed {deepspeed}" if deepspeed else "")


if __name__ == "__main__":
    print(report())
