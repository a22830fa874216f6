"""Where things are: the project's configs and data (beside the package in a clone, inside it when installed), and
local paths and globs as a config names them, found from the working directory, else beside the config file (made
absolute when the config is read), else in the project."""

import bz2
import glob
import gzip
import hashlib
import json
import lzma
import os
from pathlib import Path

from sftkit.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
# A clone (or `pip install -e .`) has configs/ and data/ beside the package; an installed wheel carries them inside
# it, in sftkit/project/ (see pyproject.toml).
PROJECT_DIR = next(directory for directory in (PACKAGE_DIR.parent, PACKAGE_DIR / "project")
                   if (directory / "configs" / "default_train_config.yaml").is_file() or directory.name == "project")


CONFIGS_DIR = PROJECT_DIR / "configs"
PRESETS_DIR = CONFIGS_DIR / "presets"
DEFAULT_CONFIG = CONFIGS_DIR / "default_train_config.yaml"
# The local data files sftkit reads, by the datasets builder that reads them; each may be compressed too
# (data.jsonl.gz), which datasets reads as it is and sftkit's own checks read through open_data.
DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
# A name with one of these extensions is a local file, never a hub id (see looks_local).
LOCAL_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".yaml", ".yml",
                  ".jinja", ".j2", *COMPRESSIONS)


def find_config_file(name: str | None, directory: Path = CONFIGS_DIR) -> Path:
    """The config to use: the given path, else a shipped one by its name in `directory` (.yaml optional; `lora` for
    lora_train_config.yaml, an example's name for examples/NAME.yaml, as sftkit init takes them), else the default."""
    if name is None:
        return _from_here(DEFAULT_CONFIG)
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (directory / path, directory / f"{path}.yaml", directory / f"{path}_train_config.yaml",
                      directory / "examples" / f"{path}.yaml"):
        if not path.is_absolute() and candidate.is_file():
            return _from_here(candidate)
    there = ", ".join(sorted(file.stem for file in directory.glob("*.yaml")))
    raise ConfigError(f"config file not found: {name} (looked in the working directory and in {directory}, which "
                      f"has {there})")


def _from_here(path: Path) -> Path:
    """A shipped config as the user would write it from the working directory (configs/lora_train_config.yaml in
    the project), for the messages that name it; else its whole path."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def resolve_path(value: str) -> str:
    """A relative local path, found from the working directory or else the project; anything else is a hub id."""
    value = os.path.expanduser(value)
    if Path(value).exists() or Path(value).is_absolute():
        return value
    in_project = PROJECT_DIR / value
    return str(in_project) if in_project.exists() else value


def absolute_if_local(value: str) -> str:
    """resolve_path's answer, absolute where it is a local path: what a model is loaded from, since transformers and
    PEFT record it (the adapter's base_model_name_or_path), and a relative one is lost once the working directory
    changes."""
    found = resolve_path(value)
    return os.path.abspath(found) if Path(found).exists() else found


def resolve_glob(pattern: str) -> list[str]:
    """The files a glob matches (** any folders deep, as datasets and a shell's globstar read it), as resolve_path
    finds a path: from the working directory, else the project."""
    pattern = os.path.expanduser(pattern)
    return sorted(glob.glob(pattern, recursive=True)) or sorted(glob.glob(str(PROJECT_DIR / pattern), recursive=True))


def is_pattern(name: str) -> bool:
    """A glob, not a path that exists: chat[1].jsonl is that file where it exists."""
    return glob.has_magic(name) and not Path(resolve_path(name)).exists()


def looks_local(value: str) -> bool:
    """A path meant on this machine, which is never sent to the hub (a typo would cost a minute of hub retries and
    end in an error about the internet): it exists, starts with `.`, `/` or `~`, has a file extension such as
    .jsonl or .yaml, or lies in a folder that exists."""
    path = Path(value)
    if value.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_SUFFIXES or Path(resolve_path(value)).exists():
        return True
    return path.parent != Path(".") and Path(resolve_path(str(path.parent))).is_dir()


def found_beside(value, directory: Path):
    """A relative local path (or glob) of a config file, as an absolute one where it is not found from the working
    directory but is beside the config file: a config kept with its data runs from any directory. Anything else
    (absolute, found from the working directory, a hub id, not a text) as it is."""
    if not isinstance(value, str) or not value or "\n" in value or "{" in value:  # a template's text, say
        return value
    if Path(os.path.expanduser(value)).is_absolute():
        return value
    if glob.has_magic(value) and not Path(value).exists():
        found = not glob.glob(value, recursive=True) and glob.glob(str(directory / value), recursive=True)
    else:
        found = not Path(value).exists() and (directory / value).exists()
    return str(directory.resolve() / value) if found else value


def looked_in(value: str, beside: Path | None = None) -> str:
    """Where resolve_path looked for a relative path (and load_config beside the config file), for an error
    message."""
    if Path(os.path.expanduser(value)).is_absolute():
        return ""
    places = list(dict.fromkeys([Path.cwd(), *([beside.resolve()] if beside else []), PROJECT_DIR]))
    return f" (looked in {' and in '.join(map(str, places))})"


def data_suffix(file) -> str:
    """The kind of data a file holds, by its name: .jsonl for train.JSONL.gz (and for .ndjson, its other name)."""
    suffixes = [suffix.lower() for suffix in Path(file).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return {".ndjson": ".jsonl"}.get(suffixes[-1], suffixes[-1]) if suffixes else ""


def open_data(file):
    """A data file's bytes, decompressed."""
    return COMPRESSIONS.get(Path(file).suffix.lower(), open)(file, "rb")


def local_splits(path: Path) -> list[str] | None:
    """The splits local data has: a data file has one, train; a save_to_disk DatasetDict has its own; a single
    saved Dataset counts as train; a folder of data files those of directory_splits."""
    if path.is_file():
        return ["train"]
    if (path / "dataset_dict.json").is_file():
        return list(json.loads((path / "dataset_dict.json").read_text()).get("splits", []))
    return ["train"] if saved_by_datasets(path) else list(directory_splits(path))


def saved_by_datasets(folder: Path) -> bool:
    """A folder written by save_to_disk (a DatasetDict, or one Dataset)."""
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def directory_splits(folder: Path) -> dict[str, list[str]]:
    """The data files of a folder (and its subfolders; hidden ones and files of other kinds never) by split. Where
    every one is named for a split as datasets names them (train*, test* or eval*, validation* or dev*, ...), those
    are the splits; else they are all one split, train.

    Not datasets' own reading of a folder: it reads only the most common kind of file there (notes.txt beside
    data.jsonl was trained on, data.jsonl never read), and leaves out a file named for no split when others are
    (chats.jsonl beside eval.jsonl)."""
    return splits_of(named_splits(folder))


def splits_of(named: dict[str, str | None]) -> dict[str, list[str]]:
    """named_splits' files by split, as directory_splits reads them."""
    if None in named.values():
        return {"train": list(named)} if named else {}
    splits: dict[str, list[str]] = {}
    for file, split in named.items():
        splits.setdefault(split, []).append(file)
    return splits


def named_splits(folder: Path) -> dict[str, str | None]:
    """Each data file of a folder, and the split its name names as datasets reads names (None: none)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    files = sorted(str(path) for path in folder.rglob("*") if data_suffix(path) in DATA_FILE_BUILDERS and
                   path.is_file() and not any(part.startswith((".", "__")) for part in path.relative_to(folder).parts))
    try:
        named = DataFilesDict.from_patterns(get_data_patterns(str(folder)), str(folder))
    except FileNotFoundError:  # datasets' EmptyDatasetError: no file, or a pattern that matches none
        named = {}
    split_of = {}
    for split, split_files in named.items():
        for file in split_files:
            split_of.setdefault(str(Path(file).resolve()), str(split))
    return {file: split_of.get(str(Path(file).resolve())) for file in files}


def local_files(name: str) -> list[str]:
    """The files a local file name or glob stands for, from the working directory or else the project."""
    if is_pattern(name):
        return resolve_glob(name)
    path = Path(resolve_path(name))
    return [str(path)] if path.is_file() else []


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: Path, whole: bool = False) -> str:
    """sha256 of a file's size and contents: all of it when `whole` or below 32 MiB, else (a model's weights) 16
    evenly spaced 256 KiB pieces and the end, a few milliseconds. Computed once per file and modification time in a
    process."""
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        digest = hashlib.sha256(str(stat.st_size).encode())
        with path.open("rb") as handle:
            if whole or stat.st_size <= 32 * 2**20:
                for block in iter(lambda: handle.read(2**24), b""):
                    digest.update(block)
            else:
                for offset in [stat.st_size * k // 16 for k in range(16)] + [stat.st_size - 2**18]:
                    handle.seek(offset)
                    digest.update(handle.read(2**18))
        _DIGESTS[key] = digest.hexdigest()[:16]
    return _DIGESTS[key]
