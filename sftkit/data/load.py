"""Raw rows of one source: a hub dataset, a local file, a glob, a directory or a `save_to_disk` directory."""

import glob
from pathlib import Path

from sftkit.config import PROJECT_DIR, SourceConfig, resolve_path
from sftkit.data.formats import DataError

LOCAL_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_source(source: SourceConfig, split: str | None = None):
    """The rows of `split` (default: the source's own), with column_map applied and cut to max_samples."""
    split = split or source.split
    try:
        rows = _load(source, split)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types; all mean "this source or split cannot be read"
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"dataset {source.name!r} (split {split!r}) could not be loaded: {message}") from None
    if source.column_map:
        missing = sorted(set(source.column_map) - set(rows.column_names))
        if missing:
            raise DataError(f"dataset {source.name}: column_map names columns it does not have: {missing}; "
                            f"its columns are {rows.column_names}")
        rows = rows.rename_columns(source.column_map)
    if source.max_samples is not None:
        rows = rows.select(range(min(source.max_samples, len(rows))))
    if len(rows) == 0:
        raise DataError(f"dataset {source.name!r} (split {split!r}) has no rows")
    return rows


def is_jsonl(source: SourceConfig) -> bool:
    """Row numbers of a single .jsonl file are line numbers minus one, so errors can name the line."""
    return source.name.endswith(".jsonl") and "*" not in source.name


def _load(source: SourceConfig, split: str):
    from datasets import DatasetDict, load_dataset, load_from_disk

    files = _local_files(source.name)
    if files:
        builders = {LOCAL_FILE_BUILDERS.get(Path(file).suffix) for file in files}
        if None in builders or len(builders) > 1:
            raise DataError(f"dataset {source.name}: files must all be one of {', '.join(LOCAL_FILE_BUILDERS)}")
        if split != source.split:
            raise DataError(f"dataset {source.name} is local files with a single split; evaluate with test_size "
                            "or eval_sources instead of eval_split")
        return load_dataset(builders.pop(), data_files=files, split="train")  # local files load as one "train" split
    path = Path(resolve_path(source.name))
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():  # written by save_to_disk
        saved = load_from_disk(str(path))
        return saved[split] if isinstance(saved, DatasetDict) else saved
    if path.is_dir():
        return load_dataset(str(path), split=split)
    return load_dataset(source.name, source.subset, split=split)


def _local_files(name: str) -> list[str]:
    """The files a local file name or glob stands for, from the working directory or else the project."""
    if glob.has_magic(name):
        files = sorted(glob.glob(name)) or sorted(glob.glob(str(PROJECT_DIR / name)))
        if not files:
            raise DataError(f"dataset {name}: the pattern matches no file")
        return files
    path = Path(resolve_path(name))
    return [str(path)] if path.is_file() else []
