"""Weight files on disk: whether they are whole, how they are shared, and the room an export needs for them."""

import errno
import json
import os
import re
import shutil
from pathlib import Path

from sftkit.errors import first_line
from sftkit.layout import published_weights


def readable_like_other_files(files) -> None:
    """safetensors 0.8 writes its files with mode 0600; give them the mode every other file gets (0644 under the
    usual umask), so a model or checkpoint shared on a cluster's filesystem can be read, and resumed, by the team."""
    umask = os.umask(0)
    os.umask(umask)
    for file in files:
        file.chmod(0o666 & ~umask)


def safetensors_weights(directory: Path) -> list[Path]:
    """The safetensors weights an export published in output_dir, by name: a user's files there are left alone."""
    return sorted(path for path in directory.glob("*.safetensors") if published_weights(path.name))


def finite(tensor) -> bool:
    """No nan or inf in a tensor, read in slices (no copy of a whole large tensor)."""
    import torch

    if not tensor.is_floating_point() or tensor.is_meta:  # FSDP's other processes may load onto meta
        return True
    parts = tensor.detach().reshape(-1).split(2**24)
    if tensor.element_size() == 1:  # float8 weights: torch 2.13 has no isfinite for them
        parts = (part.float() for part in parts)
    return all(torch.isfinite(part).all() for part in parts)


def non_finite_tensors(directory: Path) -> list[str]:
    """Names of the floating-point tensors with a nan or inf in any safetensors file under directory."""
    from safetensors import safe_open

    broken = []
    for file in sorted(directory.rglob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            broken += [f"{file.relative_to(directory)}:{name}" for name in weights.keys()
                       if not finite(weights.get_tensor(name))]
    return broken


def empty_tensors(file: Path) -> list[str]:
    """Names of the tensors in a safetensors file that hold no element, read from its header alone. A process that
    saves without holding the gathered weights (ZeRO-3 outside process 0) writes each partitioned parameter's empty
    placeholder: every name there, no weights."""
    from safetensors import safe_open

    with safe_open(file, "pt") as weights:
        return [name for name in weights.keys() if 0 in weights.get_slice(name).get_shape()]


def missing_weights(folder: Path, stem: str) -> str | None:
    """What keeps folder from holding whole weights `stem` (model, adapter_model), read from the headers alone: none
    written, shards missing, a file cut short (its process killed while writing it), unreadable or of empty tensors;
    None when they are whole."""
    index = folder / f"{stem}.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    except (ValueError, KeyError) as error:
        return f"{index.name} is cut short or unreadable ({error})"
    if shards is None:
        shards = [f"{stem}.safetensors"]
        if not (folder / shards[0]).is_file():
            return f"no {stem}.safetensors"
    absent = [shard for shard in shards if not (folder / shard).is_file()]
    if absent:
        return f"{len(absent)} of its {len(shards)} shards are missing, e.g. {absent[0]}"
    for shard in shards:
        if cut_short(folder / shard):
            return f"{shard} is cut short"
        try:
            empty = empty_tensors(folder / shard)
        except Exception as error:  # an OSError, or safetensors' own error type
            return f"{shard} could not be read ({first_line(error)})"
        if empty:
            return f"{shard} holds empty tensors (e.g. {empty[0]})"
    return None


def cut_short(file: Path) -> bool:
    """A safetensors file shorter than its own header says it is: its writer was stopped part way. (A file that
    cannot be read at all is not known to be cut short.)"""
    try:
        with open(file, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            size = os.fstat(handle.fileno()).st_size
            if size < 8 + length:
                return True
            header = json.loads(handle.read(length))
    except (OSError, ValueError):
        return False
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    return size < 8 + length + max(ends, default=0)


# save_pretrained's max_shard_size in transformers 5.24; the export casts float32 weights one shard at a time.
SHARD_BYTES = 50 * 10**9


def export_bytes(total_parameters: int, trainable_parameters: int, dtype, lora: bool, weights=None,
                 merged: bool = True) -> int:
    """What the export writes at its peak: the model in the training dtype, and for LoRA the float32 adapter beside
    it (or alone, not `merged`). A model trained in other `weights` (float32 under bf16) is saved in them first, then
    each shard is cast beside itself and replaces it."""
    if lora:  # PEFT's total counts the adapter too; the merged model does not hold it
        size = merged * (total_parameters - trainable_parameters) * dtype.itemsize + trainable_parameters * 4
    elif weights in (None, dtype):
        size = total_parameters * dtype.itemsize
    else:
        size = total_parameters * weights.itemsize + min(total_parameters, SHARD_BYTES // weights.itemsize) * \
            dtype.itemsize
    return int(size * 1.02) + 2 * 2**20  # headers, tokenizer and reports


def check_free_space(directory: Path, needed: int, when: str) -> str | None:
    """None when `needed` bytes fit on directory's filesystem, else what is missing, in words."""
    free = shutil.disk_usage(directory).free
    if free >= needed:
        return None
    return (f"{when} needs {size_words(needed)} in {directory} but its filesystem has {size_words(free)} free: "
            f"free {size_words(needed - free)} or choose a training.output_dir on a larger disk")


# A write that failed for its disk: no space or quota, a file too large for the filesystem or a size limit (ulimit -f,
# FAT32's 4 GiB), an I/O error, a filesystem gone read-only or stale (NFS), a permission taken away.
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_ERRNOS = (*SPACE_ERRNOS, errno.EFBIG, errno.EIO, errno.EROFS, errno.ESTALE, errno.EACCES)
# torch.save's writer says only this, without an errno (torch 2.13): "basic_ios::clear: iostream error", "[enforce
# fail at inline_container.cc] . unexpected pos", "PytorchStreamWriter failed writing file"
TORCH_WRITE_ERRORS = ("iostream error", "unexpected pos", "PytorchStreamWriter failed writing")
# safetensors 0.8 raises its own error type, with the errno in its text: "Error while serializing: I/O error: File too
# large (os error 27)"
SAFETENSORS_ERRNO = re.compile(r"I/O error: (.+) \(os error (\d+)\)")


def _file_size_limited() -> bool:
    import resource

    return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY


def disk_failure(error: BaseException, directory) -> str | None:
    """Why a failed write failed, where its disk is the cause (DISK_ERRNOS, torch's writer's errors, a filesystem
    left with next to nothing free: safetensors raises its own error on a full disk); else None. A precise cause (a
    read-only disk, an I/O error, a file size limit) is named even on a nearly full disk."""
    seen, found, precise = error, None, False
    while seen is not None and found is None:
        if isinstance(seen, OSError) and seen.errno in DISK_ERRNOS:
            found, precise = seen.strerror or os.strerror(seen.errno), seen.errno not in SPACE_ERRNOS
        elif isinstance(seen, RuntimeError) and any(words in str(seen) for words in TORCH_WRITE_ERRORS):
            precise = _file_size_limited()
            found = "File too large (beyond the file size limit, ulimit -f)" if precise else \
                f"the file could not be written ({first_line(seen)})"
        elif (written := SAFETENSORS_ERRNO.search(str(seen))) and int(written[2]) in DISK_ERRNOS:
            found, precise = written[1], int(written[2]) not in SPACE_ERRNOS
        seen = seen.__cause__ or seen.__context__
    if precise:
        return found
    try:
        usage = shutil.disk_usage(directory)
    except OSError:
        return found
    return "its disk is full" if usage.free < min(64 * 2**20, usage.total // 100) else found


def size_words(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 / 10 else f"{size / 2**20:.1f} MiB"
