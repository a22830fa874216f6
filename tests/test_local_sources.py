"""Local data as users keep it: folders with notes and files named for splits, compressed files, JSON Lines files
that are not one row per line. Each reads exactly the rows it holds, or says in one line what it does not read."""

import bz2
import gzip
import json
import re

import pytest
from conftest import run_sft, trained_spans

from sftkit.data import DataError, load, prepare_data
from sftkit.schema import DatasetConfig, SourceConfig


def chat(index: int, reply: str | None = None, role: str = "assistant") -> dict:
    return {"messages": [{"role": "user", "content": f"Question {index}?"},
                         {"role": role, "content": reply or f"Answer {index}."}]}


def write_jsonl(path, rows, opener=open) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt") as out:
        out.writelines(json.dumps(row) + "\n" for row in rows)
    return str(path)


def replies(tokenizer, data) -> list[str]:
    return sorted(span for row in data.train for span in trained_spans(tokenizer, row))


def test_a_folder_trains_its_data_files_and_never_the_notes_beside_them(tmp_path, tokenizer):
    """datasets reads a folder's most common kind of file: two .txt notes were trained as text, and data.jsonl was
    never read."""
    write_jsonl(tmp_path / "data" / "data.jsonl", [chat(0), chat(1)])
    (tmp_path / "data" / "notes.txt").write_text("Remember to clean row 3.\nTODO: add more.\n")
    (tmp_path / "data" / "CHANGES.txt").write_text("v2 changelog\n")
    (tmp_path / "data" / "README.md").write_text("# my data\n")
    data = prepare_data(DatasetConfig(name=str(tmp_path / "data")), tokenizer, max_length=128)
    assert data.formats == ["messages"] and data.rows == 2
    assert replies(tokenizer, data) == ["Answer 0.<|im_end|>", "Answer 1.<|im_end|>"]


def test_a_file_named_for_no_split_makes_the_whole_folder_one_train_split(tmp_path, tokenizer, capsys):
    """datasets left chats.jsonl out (named for no split) and read eval.jsonl as split test: the advice to use that
    split trained on the eval file alone."""
    write_jsonl(tmp_path / "data" / "chats.jsonl", [chat(0), chat(1), chat(2)])
    write_jsonl(tmp_path / "data" / "eval.jsonl", [chat(3)])
    write_jsonl(tmp_path / "data" / "more" / "extra.jsonl", [chat(4)])  # subfolders too, as datasets reads them
    data = prepare_data(DatasetConfig(name=str(tmp_path / "data")), tokenizer, max_length=128)
    assert data.rows == 5
    assert (f"sftkit: warning: dataset {tmp_path / 'data'}: eval.jsonl is named for a split but trained on with the "
            "rest, as chats.jsonl is named for none") in capsys.readouterr().err
    with pytest.raises(DataError, match=r"dataset.eval_split: 'test' is not a split of .*: its files are split train "
                                         r"\(chats.jsonl, eval.jsonl, extra.jsonl\): one split, as not every file is "
                                         r"named for a split"):
        prepare_data(DatasetConfig(name=str(tmp_path / "data"), eval_split="test"), tokenizer, max_length=128)


def test_a_folder_of_files_named_for_splits_says_which_files_it_does_not_read(tmp_path, tokenizer, capsys):
    write_jsonl(tmp_path / "data" / "train_general.jsonl", [chat(0), chat(1)])
    write_jsonl(tmp_path / "data" / "train_math.jsonl", [chat(2)])
    write_jsonl(tmp_path / "data" / "test_cases.jsonl", [chat(3), chat(4)])
    data = prepare_data(DatasetConfig(name=str(tmp_path / "data")), tokenizer, max_length=128)
    assert data.rows == 3 and data.eval is None
    assert (f"sftkit: warning: dataset {tmp_path / 'data'}: test_cases.jsonl is named for split 'test', which this "
            "run reads nowhere; evaluate on it with dataset.eval_split: test") in capsys.readouterr().err
    data = prepare_data(DatasetConfig(name=str(tmp_path / "data"), eval_split="test"), tokenizer, max_length=128)
    assert data.rows == 3 and len(data.eval) == 2
    assert "warning" not in capsys.readouterr().err


def test_a_bad_row_in_a_folder_names_its_file_and_line(tmp_path):
    write_jsonl(tmp_path / "data" / "part0.jsonl", [chat(0), chat(1)])
    write_jsonl(tmp_path / "data" / "part1.jsonl", [chat(2), chat(3, role="bot")])
    result = run_sft("--dataset.name", str(tmp_path / "data"), "--training.output_dir", str(tmp_path / "out"),
                     "--dry-run", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"sft.py: error: dataset {tmp_path / 'data' / 'part1.jsonl'} line 2: message 1 has role 'bot'")


def test_an_empty_folder_is_one_line(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("nothing yet\n")
    result = run_sft("--dataset.name", str(tmp_path / "data"), "--training.output_dir", str(tmp_path / "out"),
                     "--dry-run", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"dataset.name: the folder {tmp_path / 'data'} holds no .jsonl, .json, .csv, .parquet file" in \
        result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(("name", "opener"), [("rows.jsonl.gz", gzip.open), ("rows.jsonl.bz2", bz2.open),
                                              ("ROWS.JSONL", open), ("rows.ndjson", open)])
def test_compressed_and_otherwise_named_json_lines_files_load_and_name_a_bad_line(tmp_path, tokenizer, name, opener):
    path = write_jsonl(tmp_path / name, [chat(0), chat(1)], opener)
    data = prepare_data(DatasetConfig(name=path), tokenizer, max_length=128)
    assert data.rows == 2 and replies(tokenizer, data) == ["Answer 0.<|im_end|>", "Answer 1.<|im_end|>"]
    write_jsonl(tmp_path / name, [chat(0), chat(1), chat(2, role="bot")], opener)
    with pytest.raises(DataError, match=f"dataset {path} line 3: message 1 has role 'bot'"):
        prepare_data(DatasetConfig(name=path), tokenizer, max_length=128)


@pytest.mark.parametrize("layout", ["rows parted by a carriage return", "a JSON list", "rows spread over lines"])
def test_a_json_lines_file_that_is_not_one_row_per_line_names_the_bad_row_by_number(tmp_path, tokenizer, layout):
    """datasets reads all three; naming the bad row's line then crashed (IndexError) or named a wrong line."""
    rows = [chat(0), chat(1), chat(2, role="bot"), chat(3)]
    text = {"rows parted by a carriage return": "\r".join(json.dumps(row) for row in rows),
            "a JSON list": json.dumps(rows),
            "rows spread over lines": "\n".join(json.dumps(row, indent=2) for row in rows)}[layout]
    (tmp_path / "rows.jsonl").write_text(text + "\n")
    config = DatasetConfig(name=str(tmp_path / "rows.jsonl"))
    with pytest.raises(DataError, match=f"dataset {tmp_path / 'rows.jsonl'} row 3: message 1 has role 'bot'"):
        prepare_data(config, tokenizer, max_length=128)
    config.on_bad_row = "skip"
    data = prepare_data(config, tokenizer, max_length=128)
    assert data.rows == 4 and len(data.train) == 3 and data.dropped["bad rows"] == 1


def test_csv_cells_are_read_as_text(tmp_path, tokenizer):
    """Numbers became integers, floats where a cell was empty ("0.0"), and lost their leading zeros."""
    (tmp_path / "rows.csv").write_text("instruction,input,output\nAdd one.,0,1\nSay the code.,,007\n")
    data = prepare_data(DatasetConfig(name=str(tmp_path / "rows.csv")), tokenizer, max_length=128)
    assert replies(tokenizer, data) == ["007<|im_end|>", "1<|im_end|>"]
    prompts = [tokenizer.decode(row["input_ids"]) for row in data.train]
    assert any("Add one.\n\n0<|im_end|>" in prompt for prompt in prompts), prompts


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("rows.csv", "prompt,response\nHi,Hello\nCaf\xe9?,Oui\n", "rows.csv line 3: not UTF-8 text (invalid continuation "
                                                               "byte at byte 3); save it as UTF-8"),
    ("rows.csv", "prompt,response\n", "has no rows (a CSV file of its header alone, or a JSON list that is empty)"),
    ("rows.json", "[]", "has no rows (a CSV file of its header alone, or a JSON list that is empty)"),
])
def test_a_file_datasets_cannot_read_is_named_with_the_reason(tmp_path, tokenizer, name, text, expected):
    (tmp_path / name).write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(expected) + "$"):
        prepare_data(DatasetConfig(name=str(tmp_path / name)), tokenizer, max_length=128)


def test_files_of_one_source_with_other_columns_are_named(tmp_path, tokenizer):
    """datasets said only "Couldn't cast"."""
    write_jsonl(tmp_path / "a.jsonl", [chat(0)])
    write_jsonl(tmp_path / "b.jsonl", [{**chat(1), "id": 7, "lang": "en"}])
    with pytest.raises(DataError, match=r"its files have other columns \(a.jsonl: messages; b.jsonl: id, lang, "
                                        r"messages\), and datasets reads files of one set of columns"):
        prepare_data(DatasetConfig(name=str(tmp_path / "*.jsonl")), tokenizer, max_length=128)


def test_json_array_files_with_other_columns_are_named(tmp_path, tokenizer):
    """LLaMA-Factory's files are pretty-printed JSON arrays: their first line, "[", was read as their first row, so
    two of them passed the check, and datasets said only "An error occurred while generating the dataset" (helper-78)."""
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Hi", "input": "", "output": "Hello"}], indent=2))
    (tmp_path / "b.json").write_text(json.dumps([chat(1)], indent=2))
    with pytest.raises(DataError, match=r"its files have other columns \(a.json: input, instruction, output; b.json: "
                                        r"messages\), and datasets reads files of one set of columns"):
        prepare_data(DatasetConfig(name=str(tmp_path)), tokenizer, max_length=128)
    # of the same columns: a first row longer than the first MiB read, and a byte order mark, are read whole
    same = tmp_path / "same"
    same.mkdir()
    write_jsonl(same / "a.jsonl", [{"messages": [{"role": "user", "content": "x" * 2**21},
                                                 {"role": "assistant", "content": "Yo"}]}])
    (same / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(chat(1)) + "\n").encode())
    assert load._other_columns([str(same / "a.jsonl"), str(same / "b.jsonl")]) is None


def test_a_column_map_onto_one_name_twice_is_refused_before_loading(tmp_path):
    """datasets raised a ValueError with a traceback."""
    path = write_jsonl(tmp_path / "rows.jsonl", [{"q": "Hi", "query": "Hi?", "a": "Hello"}])
    result = run_sft("--dataset.name", path, "--dataset.column_map", "{q: question, query: question, a: answer}",
                     "--training.output_dir", str(tmp_path / "out"), "--dry-run", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith(
        "dataset.column_map maps q and query to the same name 'question'; map only one of them to it")


def test_inspect_gives_the_95th_percentile_of_two_rows_as_the_longer(tmp_path):
    """It gave the shorter: the index was rounded down."""
    path = write_jsonl(tmp_path / "rows.jsonl", [chat(0), chat(1, reply="A much longer answer than the other one.")])
    out = run_sft("--dataset.name", path, "--dataset.test_size", "null", "--training.output_dir",
                  str(tmp_path / "out"), "--inspect", "0").stdout
    line = next(line for line in out.splitlines() if line.startswith("tokens per row"))
    assert line.split("p95 ")[1].split(",")[0] == line.split("max ")[1], line


def test_settings_plain_text_rows_ignore_are_said(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": "A sentence to learn."}])
    data = prepare_data(DatasetConfig(name=path, system_prompt="Be nice", loss_on="last_assistant"), tokenizer,
                        max_length=128)
    assert data.formats == ["text"]
    assert (f"sftkit: warning: dataset {path} is plain text, whose rows train every token as written: "
            "dataset.system_prompt 'Be nice' and dataset.loss_on last_assistant do nothing to them") in \
        capsys.readouterr().err
    prepare_data(DatasetConfig(name=path), tokenizer, max_length=128)
    assert "warning" not in capsys.readouterr().err
    data = prepare_data(DatasetConfig(name=path, split_user_turns=True), tokenizer, max_length=128)
    assert "dataset.split_user_turns true does nothing to them" in capsys.readouterr().err
    assert data.split_words() == ""  # no row was split


def test_csv_files_of_one_source_with_other_headers_or_a_column_named_twice_are_refused(tmp_path, tokenizer):
    """The first file's header was read for every file: a column the second one had (system) was dropped, and a
    column named twice lost its second one."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("prompt,response\nHi,Hello\n")
    (tmp_path / "data" / "b.csv").write_text('response,prompt,system\nYo,Hey,"Be kind, always"\n')
    with pytest.raises(DataError, match=r"its files have other columns \(a.csv: prompt, response; b.csv: prompt, "
                                        r"response, system\)"):
        prepare_data(DatasetConfig(name=str(tmp_path / "data")), tokenizer, max_length=128)
    (tmp_path / "twice.csv").write_text('"prompt, long",response,response\nHi,Hello,Yo\n')
    with pytest.raises(DataError, match=r"twice.csv: its header names the column 'response' twice; rename one"):
        prepare_data(DatasetConfig(name=str(tmp_path / "twice.csv")), tokenizer, max_length=128)


def test_a_system_prompt_holding_a_special_tokens_text_is_one_config_error(tmp_path, tokenizer):
    """Every row was a bad row."""
    path = write_jsonl(tmp_path / "rows.jsonl", [chat(0)])
    with pytest.raises(DataError, match=r"dataset.system_prompt holds the text '<\|im_end\|>', which the tokenizer "
                                        r"reads as its special token"):
        prepare_data(DatasetConfig(name=path, system_prompt="Close with <|im_end|>.", on_bad_row="skip"), tokenizer,
                     max_length=128)


def test_a_file_whose_name_looks_like_a_glob_is_read_as_itself(tmp_path, tokenizer):
    """chat[1].jsonl was read as the pattern chat[1].jsonl, which matches chat1.jsonl: the decoy beside it trained
    (and the resume check digested the other file)."""
    path = write_jsonl(tmp_path / "chat[1].jsonl", [chat(0, reply="The real one.")])
    write_jsonl(tmp_path / "chat1.jsonl", [chat(0, reply="The decoy.")])
    for name in (path, str(tmp_path)):
        data = prepare_data(DatasetConfig(name=name), tokenizer, max_length=128)
        assert "The real one.<|im_end|>" in replies(tokenizer, data)
    assert data.rows == 2


def test_a_recursive_glob_reads_every_folder_level(tmp_path, tokenizer):
    write_jsonl(tmp_path / "a.jsonl", [chat(0)])
    write_jsonl(tmp_path / "x" / "b.jsonl", [chat(1)])
    write_jsonl(tmp_path / "x" / "y" / "c.jsonl.gz", [chat(2)], gzip.open)
    data = prepare_data(DatasetConfig(name=str(tmp_path / "**" / "*.jsonl*")), tokenizer, max_length=128)
    assert data.rows == 3


def test_a_folders_split_read_as_eval_source_is_read_and_its_train_split_as_eval_is_said(tmp_path, tokenizer, capsys):
    write_jsonl(tmp_path / "data" / "train.jsonl", [chat(0), chat(1)])
    write_jsonl(tmp_path / "data" / "test.jsonl", [chat(2)])
    folder = str(tmp_path / "data")
    data = prepare_data(DatasetConfig(name=folder, eval_sources=[SourceConfig(name=folder, split="test")]), tokenizer,
                        max_length=128)
    assert (data.rows, len(data.eval)) == (2, 1) and "warning" not in capsys.readouterr().err
    prepare_data(DatasetConfig(name=folder, eval_sources=[SourceConfig(name=folder)]), tokenizer, max_length=128)
    out = capsys.readouterr().err
    assert f"dataset {tmp_path / 'data'}: split 'train' is both trained and evaluated on, so the eval loss measures " \
           "memory, not learning" in out
    assert "test.jsonl is named for split 'test', which this run reads nowhere" in out


def test_a_file_both_trained_and_evaluated_on_is_said(tmp_path, tokenizer, capsys):
    """Said of a folder's split only: eval_split train on a file, or eval_sources naming a file of the train glob,
    reported the train rows' loss as the eval loss, and `sftkit compare` called them held-out rows."""
    first = write_jsonl(tmp_path / "a.jsonl", [chat(0), chat(1)])
    write_jsonl(tmp_path / "b.jsonl", [chat(2)])
    for config in (DatasetConfig(name=first, eval_split="train"),
                   DatasetConfig(name=str(tmp_path / "*.jsonl"), eval_sources=[SourceConfig(name=first)])):
        prepare_data(config, tokenizer, max_length=128)
        assert capsys.readouterr().err.count("both trained and evaluated on") == 1
    prepare_data(DatasetConfig(name=str(tmp_path / "b.jsonl"), eval_sources=[SourceConfig(name=first)]), tokenizer,
                 max_length=128)
    assert "warning" not in capsys.readouterr().err


def test_split_names_in_capitals_are_said_to_be_trained_on(tmp_path, tokenizer, capsys):
    """datasets names splits by lower-case names: Test.jsonl was trained on beside Train.jsonl, unsaid."""
    write_jsonl(tmp_path / "data" / "Train.jsonl", [chat(0)])
    write_jsonl(tmp_path / "data" / "Test.jsonl", [chat(1)])
    assert prepare_data(DatasetConfig(name=str(tmp_path / "data")), tokenizer, max_length=128).rows == 2
    assert "Test.jsonl is named for a split but trained on with the rest, as datasets reads split names in lower " \
           "case only" in capsys.readouterr().err


def test_a_bad_row_in_a_folder_of_any_kind_of_file_names_its_file_and_place(tmp_path, tokenizer):
    """Only JSON Lines files were named: a Parquet shard's bad row was "row 6" of the whole folder."""
    import datasets

    rows = [{"prompt": f"Question {index}?", "response": f"Answer {index}."} for index in range(3)]
    bad = [*rows[:2], {"prompt": "Question 2?", "response": ""}]
    cases = {".parquet": "row 3", ".csv": "line 4", ".json": "row 3"}
    for suffix, place in cases.items():
        folder = tmp_path / suffix.strip(".")
        folder.mkdir()
        for name, content in (("a", rows), ("b", bad)):
            table = datasets.Dataset.from_list(content)
            path = folder / f"{name}{suffix}"
            table.to_parquet(path) if suffix == ".parquet" else table.to_csv(path, index=False) if suffix == ".csv" \
                else path.write_text(json.dumps(content))
        with pytest.raises(DataError, match=f"dataset {re.escape(str(folder / ('b' + suffix)))} {place}: "):
            prepare_data(DatasetConfig(name=str(folder)), tokenizer, max_length=128)


def test_inspect_shows_rows_of_every_source_in_turn(tmp_path):
    """Its samples were the first rows of the train data, all from the first source: a second source's format and
    masks were never shown."""
    chats = write_jsonl(tmp_path / "chats.jsonl", [chat(index) for index in range(3)])
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"Name colour {index}.", "output": f"Red {index}."}
                                                     for index in range(3)])
    sources = json.dumps([{"name": chats}, {"name": alpaca, "weight": 2}])
    out = run_sft("--dataset.name", "null", "--dataset.sources", sources, "--dataset.test_size", "null", "--training.output_dir",
                  str(tmp_path / "out"), "--inspect", "3").stdout
    samples = out.split("--- sample ")[1:]
    assert [sample.split(",")[0] for sample in samples] == [f"0 ({chats}", f"1 ({alpaca}", f"2 ({chats}"], out
    assert "Question 0?" in samples[0] and "[[Red 0." in samples[1] and "Question 1?" in samples[2], out


def test_a_file_replaced_by_one_of_the_same_modification_time_is_read_again(tmp_path, tokenizer):
    """datasets keys its cache of a local file by path and modification time: a new version copied in with
    `cp -p` (or rsync -a, or unpacked from an archive) trained the old rows, tokenized, from the cache."""
    import os

    data = tmp_path / "chats.jsonl"
    write_jsonl(data, [chat(index) for index in range(4)])
    first = prepare_data(DatasetConfig(name=str(data)), tokenizer, max_length=128)
    assert first.rows == 4
    times = os.stat(data).st_atime_ns, os.stat(data).st_mtime_ns
    write_jsonl(data, [chat(index, f"New answer {index}.") for index in range(2)])
    os.utime(data, ns=times)
    again = prepare_data(DatasetConfig(name=str(data)), tokenizer, max_length=128)
    assert again.rows == 2 and replies(tokenizer, again) == ["New answer 0.<|im_end|>", "New answer 1.<|im_end|>"]


def test_a_dangling_link_a_glob_matches_is_one_line_naming_it(tmp_path):
    """The run's input digests, taken as it claims output_dir, read it first and ended in a traceback."""
    write_jsonl(tmp_path / "data" / "a.jsonl", [chat(0), chat(1)])
    (tmp_path / "data" / "b.jsonl").symlink_to(tmp_path / "gone.jsonl")
    result = run_sft("--dataset.name", str(tmp_path / "data" / "*.jsonl"), "--training.output_dir",
                     str(tmp_path / "out"), "--training.max_steps", "1", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"could not be loaded: [Errno 2] No such file or directory: '{tmp_path / 'data' / 'b.jsonl'}'" in \
        result.stderr
