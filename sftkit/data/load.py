"""Raw rows of one source: a hub dataset, a local file, a glob, a directory or a `save_to_disk` directory."""

import csv
import functools
import glob
import json
import os
from pathlib import Path

from sftkit.checks import source_errors
from sftkit.compat import blank_line_datasets_cannot_read, cache_named_by_contents, refuse_values_datasets_reads_as_json
from sftkit.data.formats import READS, as_yaml, detect_format
from sftkit.errors import NOT_UTF8_FIX, DataError, first_line, not_utf8
from sftkit.paths import (
    DATA_FILE_BUILDERS,
    data_suffix,
    directory_splits,
    local_files,
    looked_in,
    looks_local,
    open_data,
    resolve_path,
    saved_by_datasets,
)
from sftkit.schema import SourceConfig

# pandas reads cells holding None, null, NA or nan as missing by default: in a chat dataset they are text. Only an
# empty cell is missing.
READER_OPTIONS = {"csv": {"keep_default_na": False, "na_values": [""]}}


def load_source(source: SourceConfig, split: str | None = None, key: str = "dataset"):
    """The rows of `split` (default: the source's own), with column_map applied and cut to max_samples.

    `key` is where the source is in the config (dataset, dataset.sources[1]), for the errors; a given `split` is
    dataset.eval_split.
    """
    split_key = "dataset.eval_split" if split else f"{key}.split"
    problems = source_errors(key, source, split)  # checked with the config already; files may change until now
    if problems:
        raise DataError(problems[0])
    split = split or source.split
    try:
        rows = _load(source, split)
    except DataError:
        raise
    except Exception as error:  # datasets raises many types; all mean "this source or split cannot be read"
        # a hub dataset that just answered about its splits (a local source's are checked before it loads)
        splits = _split_names(source) if not looks_local(source.name) and "split" in str(error) else None  # 5.2
        if splits and split not in splits:
            raise DataError(f"{split_key}: {split!r} is not a split of {source.name}: its splits are "
                            f"{', '.join(splits)}; use one of them") from error
        reason = error
        while reason.__cause__ is not None:  # datasets wraps the reader's own error ("while generating the dataset")
            reason = reason.__cause__
        # a hub name and a local one look alike (my_data, data/chat): say both were tried, as for model.path
        local = "" if looks_local(source.name) else \
            f"; no local file or directory {source.name} either{looked_in(source.name)}"
        raise DataError(f"{key}.name: {source.name} (split {split!r}) could not be loaded: "
                        f"{first_line(reason)}{local}") from error
    if source.column_map:
        missing = sorted(set(source.column_map) - set(rows.column_names))
        if missing:
            reverse = {new: old for old, new in source.column_map.items()}  # as Axolotl's field_x: theirs reads
            turned = f"; column_map goes from the data's name to sftkit's: {as_yaml(reverse)}" if set(reverse) <= set(
                rows.column_names) else ""
            raise DataError(f"dataset {source.name}: column_map names columns it does not have: {missing}; "
                            f"its columns are {rows.column_names}{turned}")
        taken = sorted(set(source.column_map.values()) & (set(rows.column_names) - set(source.column_map)))
        if taken:
            renamed = next(old for old, new in source.column_map.items() if new == taken[0])
            raise DataError(f"dataset {source.name}: column_map renames {renamed!r} to {taken[0]!r}, a column the rows "
                            "have already; map that one to another name too, or leave the rename out")
        rows = rows.rename_columns(source.column_map)
    if source.max_samples is not None:
        rows = rows.select(range(min(source.max_samples, len(rows))))
    if len(rows) == 0:
        raise DataError(f"dataset {source.name!r} (split {split!r}) has no rows")
    return rows


def source_files(source: SourceConfig, split: str | None = None) -> list[str] | None:
    """The local files of a source (a file, a glob or a folder's `split`) in the order their rows load, whose errors
    can name the file and the row's place in it; None for a hub dataset or a save_to_disk folder."""
    files, path = local_files(source.name), Path(resolve_path(source.name))
    if not files and path.is_dir() and not saved_by_datasets(path):
        files = directory_splits(path).get(split or source.split, [])
    return files or None


def row_place(files: list[str], index: int) -> tuple[str, str] | None:
    """The file and the place in it ("line 7" of JSON Lines and CSV, "row 3" of a JSON list or Parquet) of row
    `index` of the rows those files hold, one after the other; None where a file's rows cannot be told apart."""
    for file in files:
        places = _places(file, os.stat(file).st_mtime_ns)
        if places is None:
            return None
        if index < len(places):
            return file, places[index]
        index -= len(places)
    return None


@functools.cache
def _places(file: str, modified: int) -> list[str] | None:
    """Where each row of a file is, as datasets reads them (by modification time: a file rewritten in this process
    is read again)."""
    kind = data_suffix(file)
    if kind == ".parquet":
        import pyarrow.parquet

        return [f"row {number}" for number in range(1, pyarrow.parquet.ParquetFile(file).metadata.num_rows + 1)]
    if kind == ".csv":
        with open_data(file) as handle:
            lines = (line.decode("utf-8-sig", "replace") for line in handle)
            reader, places, start = csv.reader(lines), [], 1
            for number, record in enumerate(reader):
                if number and record:  # the header, and blank lines, which pandas skips
                    places.append(f"line {start}")
                start = reader.line_num + 1
            return places
    lines = _line_numbers(file)
    if lines is not None:
        return [f"line {number}" for number in lines]
    if kind == ".json":
        with open_data(file) as handle:
            try:
                document = json.loads(handle.read().decode("utf-8-sig"))
            except ValueError:
                return None
        return [f"row {number}" for number in range(1, len(document) + 1)] if isinstance(document, list) else None
    return None


def _line_numbers(file: str) -> list[int] | None:
    """The 1-based line number of each row of a JSON Lines file (the loader skips blank lines); None where its rows
    are not one per line, which datasets reads all the same: a row spread over lines, rows parted by a carriage
    return alone, a JSON list."""
    numbers = []
    with open_data(file) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    if not isinstance(json.loads(line), dict):
                        return None
                except UnicodeDecodeError:
                    pass  # a row all the same: datasets keeps its bytes, and the row's error says they are not UTF-8
                except ValueError:
                    return None
                numbers.append(number)
    return numbers


def _load(source: SourceConfig, split: str):
    from datasets import DatasetDict, load_dataset, load_from_disk

    files = source_files(source, split)
    if files:
        unknown = [file for file in files if data_suffix(file) not in DATA_FILE_BUILDERS]
        if unknown:
            raise DataError(f"dataset {source.name}: files must all be one of {', '.join(DATA_FILE_BUILDERS)} (or "
                            "those compressed: .gz, .bz2, .xz)"
                            + (f"; {Path(unknown[0]).name} is not" if len(files) > 1 else ""))
        builder = _one_file_type(source.name, files)
        if all(_blank(file) for file in files):
            raise DataError(f"dataset {source.name}: {'the file is' if len(files) == 1 else 'its files are'} empty")
        options = READER_OPTIONS.get(builder, {})
        if builder == "csv":
            options = {**options, "features": _text_columns(source.name, files)}
        try:
            # local files load as one "train" split; escaped, as datasets reads them as patterns (chat[1].jsonl)
            rows = load_dataset(builder, cache_named_by_contents(files),
                                data_files=[glob.escape(file) for file in files], split="train", **options)
        except Exception as error:
            problem = next(filter(None, map(_json_problem if builder == "json" else _text_problem, files)), None)
            if problem:  # a file not in UTF-8 is saved again whole, not fixed line by line
                fix = "" if problem.endswith(NOT_UTF8_FIX) else "; fix or remove that line"
                raise DataError(f"dataset {problem}{fix}") from None
            if builder == "json" and (blank := blank_line_datasets_cannot_read(files, error)):
                raise DataError(f"dataset {blank}: a blank line, which datasets cannot read where a field holds text "
                                "in some rows and content parts or other values in others; remove the blank lines") \
                    from None
            if "corresponds to no data" in str(error):  # datasets 5.2's words
                raise DataError(f"dataset {source.name} has no rows (a CSV file of its header alone, or a JSON list "
                                "that is empty)") from None
            _refuse_other_columns(source.name, files)
            raise
        if builder == "json" and len(rows) == 1 and all(isinstance(value, dict) for value in rows[0].values()):
            raise DataError(f"dataset {source.name}: one JSON object of columns, each a mapping of row numbers to "
                            "values, as pandas' to_json writes by default; save the rows instead: "
                            "df.to_json(path, orient='records', lines=True)")
        refuse_values_datasets_reads_as_json(rows.features, files, _fields_read(source, rows.column_names),
                                             source.column_map or {}, source.name)
        return rows
    path = Path(resolve_path(source.name))
    if saved_by_datasets(path):
        saved = load_from_disk(str(path))
        return saved[split] if isinstance(saved, DatasetDict) else saved
    rows = load_dataset(source.name, source.subset, split=split)
    refuse_values_datasets_reads_as_json(rows.features, [], _fields_read(source, rows.column_names),
                                         source.column_map or {}, source.name)
    return rows



def _fields_read(source: SourceConfig, columns: list[str]) -> set:
    """What the source's format reads of a row (every format's, where its format cannot be told)."""
    renamed = [(source.column_map or {}).get(column, column) for column in columns]
    try:
        return READS[source.format or detect_format(renamed, source.name)]
    except DataError:
        return set().union(*READS.values())


def _blank(file: str) -> bool:
    """Empty, or (JSON Lines) only blank lines: datasets then says 'Instruction "train" corresponds to no data'."""
    with open_data(file) as handle:
        if data_suffix(file) != ".jsonl":
            return not handle.read(1)
        return not any(block.strip() for block in iter(lambda: handle.read(2**20), b""))


def _one_file_type(name: str, files: list[str]) -> str | None:
    """The datasets builder of the files (None for none): it reads one type of file, and of a folder of .jsonl and
    .csv files it quietly reads one kind."""
    kinds = {}
    for file in sorted(files):
        kinds.setdefault(DATA_FILE_BUILDERS[data_suffix(file)], Path(file).name)
    if len(kinds) > 1:
        raise DataError(f"dataset {name} mixes file types ({', '.join(kinds.values())}), and only one type is read; "
                        "keep one type there, or list each as one of dataset.sources")
    return next(iter(kinds), None)


def _split_names(source: SourceConfig) -> list[str] | None:
    """The splits a folder of data files or a hub dataset has, or None where that cannot be found out."""
    from datasets import get_dataset_split_names

    try:
        return get_dataset_split_names(resolve_path(source.name), source.subset)
    except Exception:
        return None


def _json_problem(file: str) -> str | None:
    """Where a .json or .jsonl file is not JSON, as "FILE line N: ..." (1-based); None if it all parses.

    The datasets loader only says that generating the dataset failed. A .json file may be JSON Lines or one
    document; a document is checked as a whole.
    """
    with open_data(file) as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw.decode("utf-8-sig" if number == 1 else "utf-8").rstrip("\r\n"))
            except UnicodeDecodeError as error:
                return not_utf8(f"{file} line {number}", error)
            except json.JSONDecodeError as error:
                if number == 1 and data_suffix(file) == ".json":
                    break  # a document spread over lines
                return f"{file} line {number}: not valid JSON: {_json_message(error)}"
            if not isinstance(value, dict):
                if number == 1 and data_suffix(file) == ".json":
                    break
                return f"{file} line {number}: expected a JSON object of the row's columns, got {type(value).__name__}"
        else:
            return None
    try:
        with open_data(file) as handle:
            json.loads(handle.read().decode("utf-8-sig"))  # the BOM Windows tools start a file with is no error
    except json.JSONDecodeError as error:
        return f"{file} line {error.lineno}: not valid JSON: {_json_message(error)}"
    except UnicodeDecodeError as error:
        return not_utf8(file, error)
    return None


def _text_columns(name: str, files: list[str]):
    """Every column of CSV files read as text: a column of numbers (answers "4", an alpaca input "0") became
    integers, or floats ("0.0") where a cell was empty, and "007" lost its zeros. The files' headers must agree."""
    from datasets import Features, Value

    _refuse_other_columns(name, files)  # else the first file's columns would be read from every one
    header = _header(files[0])
    if twice := next((column for column in header if header.count(column) > 1), None):
        raise DataError(f"dataset {files[0]}: its header names the column {twice!r} twice; rename one")
    if "" in header:  # Arrow said 'Field "" does not exist in schema'
        first = " (pandas' index, as df.to_csv writes it: save with index=False)" if header[0] == "" else ""
        raise DataError(f"dataset {files[0]}: column {header.index('') + 1} of its header has no name{first}; name "
                        "it, or remove the column")
    return Features({column: Value("string") for column in header}) or None


def _header(file: str) -> list[str]:
    with open_data(file) as handle:
        line = next((line for line in handle if line.strip()), b"").decode("utf-8-sig", "replace")
    return next(csv.reader([line]), [])


def _text_problem(file: str) -> str | None:
    """Where a CSV file is not UTF-8 text, as "FILE line N: ..."."""
    if data_suffix(file) != ".csv":
        return None
    with open_data(file) as handle:
        for number, raw in enumerate(handle, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return not_utf8(f"{file} line {number}", error)
    return None


def _refuse_other_columns(name: str, files: list[str]) -> None:
    if len(files) > 1 and (columns := _other_columns(files)):
        raise DataError(f"dataset {name}: its files have other columns ({columns}), and datasets reads files of one "
                        "set of columns; give every file the same columns, or list them apart as dataset.sources")


def _other_columns(files: list[str]) -> str | None:
    """'a.jsonl: messages; b.jsonl: id, messages, tags' where the files' first rows have other columns."""
    import pyarrow.parquet

    def columns(file: str) -> tuple:
        if data_suffix(file) == ".parquet":
            return tuple(pyarrow.parquet.read_schema(file).names)
        if data_suffix(file) == ".csv":
            return tuple(_header(file))
        row = _first_row(file)
        return tuple(row) if isinstance(row, dict) else ()

    found = {file: tuple(sorted(columns(file))) for file in files}
    if len(set(found.values())) < 2:
        return None
    kinds = {}
    for file, names in found.items():
        kinds.setdefault(names, file)
    return "; ".join(f"{Path(file).name}: {', '.join(sorted(names)) or 'none'}" for names, file in kinds.items())


def _first_row(file: str):
    """The first row of a JSON Lines file, or of a JSON array of rows (LLaMA-Factory's files, whose first line is
    "["), read as far as it goes; None where it is not JSON."""
    head, size = b"", 2**20
    with open_data(file) as handle:
        while True:
            chunk = handle.read(size)
            head, size = head + chunk, 2 * size
            text = head.decode("utf-8-sig", "replace")  # a byte order mark is no JSON
            start = len(text) - len(text.lstrip())
            if text.startswith("[", start):
                start = len(text) - len(text[start + 1 :].lstrip())
            try:
                return json.JSONDecoder().raw_decode(text, start)[0]
            except ValueError:
                if not chunk:
                    return None


def _json_message(error: json.JSONDecodeError) -> str:
    return f"{error.msg.removesuffix(' at')} at column {error.colno}"
