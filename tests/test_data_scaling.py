"""Large data: how many processes prepare it when training.dataset_num_proc is left out (the cache still works), and
rows tokenized only as far as max_seq_length keeps them."""

import json
import os
from pathlib import Path

import pytest
from conftest import SAMPLE_DATA

import sftkit.data as data
from sftkit import compat
from sftkit.data import DataError, prepare_data
from sftkit.schema import DatasetConfig

CORES = len(os.sched_getaffinity(0))


def test_small_sources_are_prepared_in_this_process_large_ones_by_the_usable_cores():
    assert data._processes_for(data.MIN_ROWS_FOR_PROCESSES - 1) is None
    expected = min(CORES, data.MAX_PROCESSES) if CORES > 1 else None
    assert data._processes_for(data.MIN_ROWS_FOR_PROCESSES) == expected


@pytest.mark.skipif(CORES < 2, reason="one usable core: the default stays one process")
def test_default_processes_give_the_same_rows_and_reuse_the_cache(monkeypatch, tokenizer):
    from conftest import TINY_MODEL
    from transformers import AutoTokenizer

    one = prepare_data(DatasetConfig(name=str(SAMPLE_DATA)), tokenizer, max_length=256, num_proc=1)
    monkeypatch.setattr(data, "MIN_ROWS_FOR_PROCESSES", 100)  # the sample data has 320 rows
    first = prepare_data(DatasetConfig(name=str(SAMPLE_DATA)), AutoTokenizer.from_pretrained(TINY_MODEL), 256)
    files = {f["filename"]: Path(f["filename"]).stat().st_mtime_ns for f in first.train.cache_files}
    assert len(files) > 1  # a shard per process
    second = prepare_data(DatasetConfig(name=str(SAMPLE_DATA)), AutoTokenizer.from_pretrained(TINY_MODEL), 256)
    assert {f["filename"]: Path(f["filename"]).stat().st_mtime_ns for f in second.train.cache_files} == files
    assert first.train["labels"] == one.train["labels"] and first.lengths == one.lengths


def long_rows(tmp_path, turns: int = 30) -> str:
    rows = [{"messages": [message for k in range(turns) for message in (
        {"role": "user", "content": f"Row {row}, question {k}?"},
        {"role": "assistant", "content": f"Answer {k} of row {row}."},
    )]} for row in range(4)]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_truncate_tokenizes_rows_only_as_far_as_max_length_keeps_them(tmp_path, tokenizer):
    path = long_rows(tmp_path)
    whole = prepare_data(DatasetConfig(name=path), tokenizer, max_length=100)
    cut = prepare_data(DatasetConfig(name=path), tokenizer, max_length=100, truncate=True)
    assert all(100 <= length < whole_length for length, whole_length in zip(cut.lengths, whole.lengths))
    assert cut.trainable_tokens == whole.trainable_tokens  # what trains within max_length is the same
    for short, full in zip(cut.train, whole.train):
        assert short["labels"] == full["labels"][: len(short["labels"])]


def test_truncated_rows_still_say_which_max_seq_length_keeps_them_whole(tmp_path, tokenizer):
    path = long_rows(tmp_path)
    with pytest.raises(DataError) as whole:
        prepare_data(DatasetConfig(name=path), tokenizer, max_length=4)
    with pytest.raises(DataError) as cut:
        prepare_data(DatasetConfig(name=path), tokenizer, max_length=4, truncate=True)
    assert str(cut.value) == str(whole.value)


def test_the_cache_of_prepared_rows_is_not_reused_by_other_code(tmp_path, monkeypatch, tokenizer):
    """datasets fingerprints the map by its function's name: an sftkit with other masking code reused the labels an
    older one had cached."""
    import shutil
    import subprocess
    import sys

    from conftest import REPO

    copy = tmp_path / "copy"
    shutil.copytree(REPO / "sftkit", copy / "sftkit", ignore=shutil.ignore_patterns("__pycache__"))
    digest = [sys.executable, "-c", "from sftkit.compat import data_code_digest; print(data_code_digest())"]
    same = subprocess.run(digest, cwd=copy, capture_output=True, text=True, check=True).stdout.strip()
    assert same == compat.data_code_digest()
    with (copy / "sftkit" / "data" / "tokenize.py").open("a") as file:
        file.write("# changed\n")
    assert subprocess.run(digest, cwd=copy, capture_output=True, text=True, check=True).stdout.strip() != same

    first = prepare_data(DatasetConfig(name=str(SAMPLE_DATA)), tokenizer, 256)
    monkeypatch.setattr(compat, "data_code_digest", lambda: "other code")
    other = prepare_data(DatasetConfig(name=str(SAMPLE_DATA)), tokenizer, 256)
    assert {f["filename"] for f in first.train.cache_files} != {f["filename"] for f in other.train.cache_files}
