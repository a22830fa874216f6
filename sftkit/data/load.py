"""Raw rows from a hub dataset or a local file or directory, with the train / eval split."""

from pathlib import Path

from sftkit.config import DatasetConfig, resolve_path
from sftkit.data.formats import DataError

LOCAL_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def load_rows(cfg: DatasetConfig, seed: int):
    """The train rows and the eval rows (None without dataset.test_size or dataset.eval_split)."""
    train = _load_split(cfg, cfg.split)
    if cfg.max_samples is not None:
        train = train.select(range(min(cfg.max_samples, len(train))))
    if cfg.eval_split is not None:
        return train, _load_split(cfg, cfg.eval_split)
    if cfg.test_size is not None:
        size = cfg.test_size if cfg.test_size < 1 else int(cfg.test_size)
        try:
            split = train.train_test_split(test_size=size, seed=seed)
        except ValueError:
            raise DataError(f"dataset.test_size {size} cannot split {len(train)} rows into train and eval") from None
        return split["train"], split["test"]
    return train, None


def _load_split(cfg: DatasetConfig, split: str):
    from datasets import load_dataset

    source = resolve_path(cfg.name)
    path = Path(source)
    if path.is_file():
        builder = LOCAL_FILE_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(
                f"dataset.name {cfg.name}: unsupported file type {path.suffix!r}; "
                f"use one of {', '.join(LOCAL_FILE_BUILDERS)}"
            )
        if split != cfg.split:
            raise DataError(f"dataset.eval_split: {cfg.name} is a single file with one split; use dataset.test_size")
        args, kwargs = (builder,), {"data_files": str(path), "split": "train"}  # a lone file loads as "train"
    else:
        args, kwargs = (source, cfg.subset), {"split": split}
    try:
        rows = load_dataset(*args, **kwargs)
    except Exception as error:  # datasets raises many types; all mean "this source or split cannot be read"
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"dataset.name {cfg.name!r} (split {split!r}) could not be loaded: {message}") from None
    if len(rows) == 0:
        raise DataError(f"dataset.name {cfg.name!r} (split {split!r}) has no rows")
    return rows
