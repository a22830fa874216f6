"""Rows from local files in every supported type and both formats -> masked tokens; bad rows name the row."""

import json
import logging
import re
from pathlib import Path

import pytest
from conftest import SAMPLE_DATA, TINY_MODEL, family_tokenizer, trained_spans

from sftkit.data import DataError, prepare_data
from sftkit.data.formats import to_messages
from sftkit.schema import DatasetConfig, SourceConfig

ROWS = [
    {"prompt": "What is the capital of Peru?", "response": "The capital of Peru is Lima."},
    {"prompt": "What color is snow?", "response": "Snow is usually white."},
    {"prompt": "What is 2 plus 3?", "response": "2 plus 3 is 5."},
]


def write_rows(tmp_path, suffix: str, rows: list[dict]) -> str:
    import datasets

    path = tmp_path / f"rows{suffix}"
    dataset = datasets.Dataset.from_list(rows)
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    elif suffix == ".csv":
        dataset.to_csv(path)
    elif suffix == ".parquet":
        dataset.to_parquet(path)
    return str(path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_local_files_of_every_type_with_prompt_response_rows(tmp_path, tokenizer, suffix):
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, suffix, ROWS)), tokenizer, max_length=128)
    assert data.formats == ["prompt_response"]
    assert data.rows == len(data.train) == 3
    assert [trained_spans(tokenizer, row) for row in data.train] == [[r["response"] + "<|im_end|>"] for r in ROWS]


def test_prompt_completion_in_conversational_form(tokenizer, tmp_path):
    row = {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "completion": [{"role": "assistant", "content": "Hello!"}],
    }
    assert to_messages(row, "prompt_response") == row["prompt"] + row["completion"]


def test_only_the_completion_trains_when_the_prompt_holds_assistant_turns(tokenizer, tmp_path):
    """TRL's conversational prompt-completion rows train the completion alone, earlier assistant turns included."""
    row = {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello there"},
                      {"role": "user", "content": "How are you?"}],
           "completion": [{"role": "assistant", "content": "fine"}]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    data = prepare_data(DatasetConfig(name=str(tmp_path / "rows.jsonl")), tokenizer, max_length=128)
    assert data.formats == ["prompt_completion"]
    assert [trained_spans(tokenizer, row) for row in data.train] == [["fine<|im_end|>"]]


def test_assistant_messages_of_weight_0_do_not_train(tokenizer, tmp_path):
    """OpenAI's fine-tuning format: weight 0 leaves a reply out of the loss. Rows with and without weights in one
    file (a row without one is read back with weight None, which trains)."""
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "BAD answer", "weight": 0},
                          {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello!", "weight": 1}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Only bad", "weight": 0}]},
            # weight 0 on a prompt turn says what sftkit does anyway: it was refused, and with it the whole dataset
            {"messages": [{"role": "system", "content": "Be brief.", "weight": 0}, {"role": "user", "content": "Hey",
                                                                                  "weight": 0},
                          {"role": "assistant", "content": "Yo"}]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = prepare_data(DatasetConfig(name=str(tmp_path / "rows.jsonl"), on_bad_row="skip"), tokenizer, max_length=128)
    assert [trained_spans(tokenizer, row) for row in data.train] == [["Hello!<|im_end|>"], ["Yo<|im_end|>"],
                                                                    ["Yo<|im_end|>"]]
    with pytest.raises(ValueError, match="every assistant message has weight 0: there is nothing to train on"):
        to_messages(rows[2], "messages")
    with pytest.raises(ValueError, match=r"message 0 \(user\) has weight 1, but only assistant messages train \(every "
                                         r"token does with dataset.loss_on: all\); remove it, or give 0"):
        to_messages({"messages": [{"role": "user", "content": "Hi", "weight": 1}, rows[1]["messages"][1]]}, "messages")
    # loss_on all trains every token: it trained the turns of weight 0 too, without a word
    for row, turn in ((rows[0], "message 1 \\(assistant\\)"), (rows[3], "message 0 \\(system\\)")):
        (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=f"line 1: {turn} has weight 0 \\(or training: false\\), but "
                                            "dataset.loss_on all trains every token"):
            prepare_data(DatasetConfig(name=str(tmp_path / "rows.jsonl"), loss_on="all"), tokenizer, max_length=128)


@pytest.mark.parametrize("sharegpt", [False, True])
def test_another_tools_per_turn_training_switch_is_read_as_a_weight(tokenizer, tmp_path, sharegpt):
    """Axolotl's `training: false` on a reply trained it, without a word; its explicit flags that agree with what
    sftkit trains anyway are read too."""
    def turn(role, text, **switch):
        return ({"from": {"user": "human", "assistant": "gpt"}[role], "value": text, **switch} if sharegpt
                else {"role": role, "content": text, **switch})

    row = {"conversations" if sharegpt else "messages": [
        turn("user", "Hi", training=False), turn("assistant", "BAD", training=False),
        turn("user", "Again", train=False), turn("assistant", "Good.", trainable=True)]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    data = prepare_data(DatasetConfig(name=str(tmp_path / "rows.jsonl")), tokenizer, max_length=128)
    assert [trained_spans(tokenizer, tokens) for tokens in data.train] == [["Good.<|im_end|>"]]


@pytest.mark.parametrize(("message", "said"), [
    ({"role": "assistant", "train": "no"}, "message 1 (assistant) has train 'no'; give true or false (or sftkit's "
                                           "weight, 0 or 1)"),
    ({"role": "user", "training": True}, "message 1 (user) has training true, but only assistant messages train "
                                         "(every token does with dataset.loss_on: all)"),
    ({"role": "assistant", "weight": False}, "message 1 (assistant) has weight False; a weight is the number 0 (not "
                                             "trained) or 1"),
    ({"role": "assistant", "weight": 0.5}, "message 1 (assistant) has weight 0.5; a weight is the number 0 (not "
                                           "trained) or 1"),
])
def test_a_per_turn_switch_sftkit_cannot_follow_is_refused(tokenizer, tmp_path, message, said):
    """A weight of false was told that only assistant messages take a weight, on an assistant message."""
    row = {"messages": [{"role": "user", "content": "Hi"}, {"content": "Hello", **message},
                        {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Good."}]}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=re.escape(said)):
        prepare_data(DatasetConfig(name=str(tmp_path / "rows.jsonl")), tokenizer, max_length=128)


def test_an_empty_system_message_is_no_system_prompt(tokenizer):
    """ShareGPT dumps often carry {"from": "system", "value": ""}; such rows failed as bad rows."""
    row = {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello!"}]}
    assert to_messages(row, "sharegpt") == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    assert to_messages(row, "sharegpt", "Be brief.")[0] == {"role": "system", "content": "Be brief."}


def test_sample_data_is_messages_with_system_and_multi_turn_rows(tokenizer):
    rows = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()]
    assert len(rows) >= 200
    assert any(row["messages"][0]["role"] == "system" for row in rows)
    assert any(sum(m["role"] == "assistant" for m in row["messages"]) > 1 for row in rows)
    data = prepare_data(DatasetConfig(name=str(SAMPLE_DATA), test_size=0.1), tokenizer, max_length=256)
    assert data.formats == ["messages"]
    assert (len(data.train), len(data.eval)) == (288, 32)
    assert sum(data.dropped.values()) == 0 and data.trainable_tokens > 0


def test_system_prompt_is_prepended_to_rows_without_one(tokenizer):
    with_system = to_messages({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}, "messages", "Be kind.")
    assert with_system[0] == {"role": "system", "content": "Be kind."}
    own = [{"role": "system", "content": "Mine."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    assert to_messages({"messages": own}, "messages", "Be kind.") == own


def test_max_samples_and_count_test_size(tmp_path, tokenizer):
    data = prepare_data(DatasetConfig(name=str(SAMPLE_DATA), max_samples=50, test_size=10), tokenizer, max_length=256)
    assert (data.rows, len(data.train), len(data.eval)) == (50, 40, 10)


def test_rows_left_with_nothing_to_train_by_truncation_are_dropped_and_counted(tmp_path, tokenizer):
    long_prompt = {"prompt": "Tell me " + "a very long story " * 30, "response": "No."}
    path = write_rows(tmp_path, ".jsonl", ROWS + [long_prompt])
    data = prepare_data(DatasetConfig(name=path), tokenizer, max_length=40)
    assert (data.rows, len(data.train), data.dropped) == (4, 3, {"bad rows": 0, "with nothing to train within max_seq_length": 1})


def test_every_row_longer_than_max_seq_length_is_counted_as_cut_wherever_the_cut_falls(tmp_path, tokenizer):
    """A row cut where no reply was (in a prompt, or between turns) came back max_length tokens long, like a row that
    fits exactly, and the summary's rows cut left it out."""
    from trl import SFTConfig

    cfg = DatasetConfig(name=str(SAMPLE_DATA), max_samples=40)
    rows = prepare_data(cfg, tokenizer, max_length=10_000).train
    whole = [len(ids) for ids in rows["input_ids"]]
    prompts = [next(at for at, label in enumerate(labels) if label != -100) for labels in rows["labels"]]
    for max_length in range(max(prompts) + 1, max(whole) + 1):  # every row keeps a trained token: none is dropped
        data = prepare_data(cfg, tokenizer, max_length, keeps="start", truncate=True)
        args = SFTConfig(output_dir=str(tmp_path), max_length=max_length, use_cpu=True, report_to=[])
        longer = [length for length in whole if length > max_length]
        assert data.kept(args) == (sum(min(length, max_length) for length in whole), len(longer)), max_length


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}


@pytest.mark.parametrize("every_row", [True, False])
def test_openai_content_parts_train_as_their_joined_text(tmp_path, tokenizer, every_row):
    """[{type: text, text: ...}] content, in every row or beside plain text in others (which datasets then reads as
    JSON), trains exactly as the text the parts join to."""
    def parts(text: str) -> list[dict]:
        half = len(text) // 2
        return [{"type": "text", "text": text[:half]}, {"type": "text", "text": text[half:]}]

    plain = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": row["prompt"]},
                           {"role": "assistant", "content": row["response"]}]} for row in ROWS]
    with_parts = [{"messages": [{**message, "content": parts(message["content"])} if every_row or number % 2 else
                                message for message in row["messages"]]} for number, row in enumerate(plain)]
    for name, rows in (("plain", plain), ("parts", with_parts)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = prepare_data(DatasetConfig(name=str(tmp_path / "plain.jsonl")), tokenizer, 128).train
    got = prepare_data(DatasetConfig(name=str(tmp_path / "parts.jsonl")), tokenizer, 128).train
    assert got["input_ids"] == expected["input_ids"] and got["labels"] == expected["labels"]
    assert trained_spans(tokenizer, got[1]) == [ROWS[1]["response"] + tokenizer.eos_token]


@pytest.mark.parametrize("empty", ["", [], [{"type": "text", "text": " "}]])
def test_an_empty_system_message_is_left_out_whether_text_or_parts(empty):
    row = {"messages": [{"role": "system", "content": empty}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Yo"}]}
    assert to_messages(row, "messages") == row["messages"][1:]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}]}, "message 1 has role 'bot'"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"content": "Yo"}]}, "message 1 has no role"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]}, "message 1 (assistant) has empty content"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 42}]}, "message 1 (assistant) has content of type int"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]},
                       {"role": "assistant", "content": "Yo"}]},
         "message 0 (user) has a part of type 'image_url', and sftkit trains on text only"),
        ({"messages": [{"role": "user", "content": ["Hi"]}, {"role": "assistant", "content": "Yo"}]},
         "message 0 (user) has a part that is not {type: text, text: ...} ('Hi')"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"type": "text", "text": ""}]}]},
         "message 1 (assistant) has empty content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 7}]}, {"role": "assistant", "content": "Yo"}]},
         "message 0 (user) has a text part whose text is a int"),
        ({"messages": [{"role": "system", "content": 7}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Yo"}]}, "message 0 (system) has content of type int"),
        ({"messages": [{"role": "user", "content": "Hi"}]}, "no assistant message"),
        ({"messages": "Hi"}, "expected a non-empty list of messages, got str"),
        ({"messages": []}, "expected a non-empty list of messages, got an empty list"),
        ({"messages": [{"role": "user", "content": "Hi"}, ["assistant", "Yo"]]}, "message 1 is a list"),
        # what the template would render besides the content: the turn must not train without it
        ({"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Let me check.",
                                                                 "tool_calls": [CALL]}]},
         f"message 1 (assistant): the chat template of {TINY_MODEL} renders no tool_calls, so the "
         "turn would train without its call; set dataset.chat_template to a template that renders tool_calls"),
        ({"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4.",
                                                             "reasoning_content": "Two and two make four."}]},
         f"message 1 (assistant): the chat template of {TINY_MODEL} renders no reasoning (reasoning_content or "
         "thinking), so the reply would train without it"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "tools": [CALL]},
         f"the chat template of {TINY_MODEL} renders no tools, so the row's tool definitions would "
         "be left out of the prompt"),
        ({"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None,
                                                                 "tool_calls": [{"function": {"arguments": "{}"}}]}]},
         "message 1 (assistant): tool call 0 has no function name: {'function': {'arguments': '{}'}}"),
        ({"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]},
         "message 1 (assistant): tool call 0 (get_weather)'s arguments is text that is not JSON: '{city: Paris}'"),
        ({"messages": [{"role": "user", "content": "Weather?"}, {"role": "tool", "content": "20",
                                                                 "tool_calls": [CALL]}]},
         "message 1 (tool) has tool_calls, but only assistant messages call tools"),
        ({"messages": [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "get_weather", "arguments": json.dumps(json.dumps({"city": "Rome"}))}}]}]},
         "message 1 (assistant): tool call 0 (get_weather)'s arguments are JSON text of JSON text (encoded twice)"),
        ({"messages": [{"role": "user", "content": "Weather?"},
                       {"role": "assistant", "content": "", "tool_calls": [CALL]},
                       {"role": "tool", "content": {"temp": 20}}, {"role": "assistant", "content": "20."}]},
         "message 2 (tool) has content of type dict, expected text (a tool's result as an object: write it as JSON "
         "text)"),
        ({"messages": [{"role": "user", "content": "Weather?"},
                       {"role": "assistant", "content": "", "tool_calls": [CALL]},
                       {"role": "assistant", "content": "It is 20 degrees."}]},
         "message 1 (assistant) calls get_weather, and the next message is the assistant's, with no tool result "
         "between: the model would learn to make the result up"),
    ],
)
def test_bad_rows_name_the_source_row_line_and_problem(tmp_path, tokenizer, row, problem):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=re.escape(f"bad.jsonl line 2: {problem}")) as error:
        prepare_data(DatasetConfig(name=str(path), format="messages"), tokenizer, max_length=64)
    # a defect of the row may be left out; a role name every row shares may not
    skip = "; fix or remove the row, or set dataset.on_bad_row: skip"
    assert str(error.value).endswith(skip) == (problem.startswith(("message 1 has no", "no assistant", "expected"))
                                                or "empty content" in problem or "which sftkit" in problem
                                                or " part" in problem or "tool call 0" in problem
                                                or "call tools" in problem or "no tool result" in problem)


@pytest.mark.parametrize(("format_name", "row", "problem"), [
    ("sharegpt", {"conversations": [{"from": "human", "value": "2+2?"},
                                    {"from": "gpt", "value": "4.", "reasoning_content": "Two and two make four."}]},
     f"message 1 (assistant): the chat template of {TINY_MODEL} renders no reasoning"),
    # a reasoning column beside a single reply is that reply's
    ("prompt_response", {"prompt": "2+2?", "response": "4.", "reasoning_content": "Two and two make four."},
     f"message 1 (assistant): the chat template of {TINY_MODEL} renders no reasoning"),
    ("alpaca", {"instruction": "Add 2 and 2.", "input": "", "output": "4.", "thinking": "Two and two make four."},
     f"message 1 (assistant): the chat template of {TINY_MODEL} renders no reasoning"),
    ("messages", {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4."}],
                  "reasoning": "Two and two make four."},
     "the row has a reasoning column, but a conversation may hold several replies; put the reasoning on the "
     "assistant message it belongs to"),
    ("messages", {"messages": [{"role": "user", "content": "2+2?", "reasoning_content": "Easy."},
                               {"role": "assistant", "content": "4."}]},
     "message 0 (user) has reasoning_content, but only assistant messages reason"),
    ("messages", {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>Easy."
                                                                     "</think>4.", "reasoning_content": "Easy."}]},
     "message 1 (assistant) has reasoning both in reasoning_content and in its content (<think>...); keep one"),
    ("messages", {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4.",
                                                                     "reasoning": "Add </think> two and two."}]},
     "message 1 (assistant) has reasoning that holds a <think> or </think> tag"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call",
                                                                             "value": '{"arguments": {"city": "Paris"}}'},
                                    {"from": "observation", "value": "20"}, {"from": "gpt", "value": "It is 20."}]},
     "message 1 (assistant): tool call 0 has no function name: {'arguments': {'city': 'Paris'}}"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call",
                                                                             "value": "get_weather(city=Paris)"},
                                    {"from": "observation", "value": "20"}, {"from": "gpt", "value": "It is 20."}]},
     "turn 1 (function_call)'s value is text that is not JSON: 'get_weather(city=Paris)'"),
    ("messages", {"messages": [{"role": "user", "content": "Hi"}, {"type": "reasoning", "summary": []},
                               {"role": "assistant", "content": "Yo"}]},
     "message 1 is a Responses API reasoning item, which sftkit does not pass to the chat template yet"),
    ("messages", {"messages": [{"role": "user", "content": "Is Paris a capital?"},
                               {"role": "assistant", "content": "<think>\nParis is the capital of France, so"}]},
     "message 1 (assistant) opens a reasoning block (<think>) it never closes"),
])
def test_what_other_formats_hold_beside_the_reply_is_refused_as_the_messages_format_refuses_it(
        tmp_path, tokenizer, format_name, row, problem):
    """ShareGPT turns kept only from and value, and a reasoning column beside the reply was never read: the reply
    trained without its tool call or its reasoning (under Qwen3's template, after an empty <think> block)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=re.escape(f"rows.jsonl line 1: {problem}")):
        prepare_data(DatasetConfig(name=str(path), format=format_name), tokenizer, max_length=64)


def test_a_column_of_system_prompts_under_another_name_is_warned_of_and_read_once_mapped(tmp_path, caplog,
                                                                                        tokenizer):
    """OpenOrca's system_prompt beside an Alpaca layout was dropped without a word: the rows trained without their
    system turn (helper-78). An id column is left unread in silence."""
    path = tmp_path / "orca.jsonl"
    path.write_text(json.dumps({"id": "niv.1", "system_prompt": "Be terse.", "instruction": "Name a color",
                                "output": "Blue"}) + "\n")
    data = prepare_data(DatasetConfig(name=str(path), test_size=None), tokenizer, max_length=128)
    assert caplog.text.count("is not read") == 1 and f"dataset {path}: column system_prompt is not read (format " \
        "alpaca takes a row's system prompt from a column named system), so the rows train without it; to read it, " \
        "map it: column_map: {system_prompt: system}" in caplog.text
    assert "Be terse." not in tokenizer.decode(data.train[0]["input_ids"])
    caplog.clear()
    mapped = prepare_data(DatasetConfig(name=str(path), test_size=None, column_map={"system_prompt": "system"}),
                          tokenizer, max_length=128)
    assert "not read" not in caplog.text and "Be terse." in tokenizer.decode(mapped.train[0]["input_ids"])


def test_rows_that_call_tools_they_do_not_define_are_warned_of(tmp_path, caplog):
    """A row with calls and no tools column, or calling a tool its tools lack, trained its calls on a prompt that
    shows no such tool, without a word (helper-75); a system message may describe them in its own words, so it is
    said, not refused."""
    tokenizer = family_tokenizer("qwen2_5")
    trace = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
             {"role": "tool", "content": "20"}, {"role": "assistant", "content": "20 degrees."}]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": trace, "tools": [WEATHER]}) + "\n" + json.dumps({"messages": trace}) + "\n")
    prepare_data(DatasetConfig(name=str(path), test_size=None), tokenizer, max_length=512)
    assert f"dataset {path}: row 2 (and maybe others) calls tools but defines none (no tools column)" in caplog.text
    caplog.clear()
    path.write_text(json.dumps({"messages": trace, "tools": [WEATHER]}) + "\n")
    prepare_data(DatasetConfig(name=str(path), test_size=None), tokenizer, max_length=512)
    assert "calls" not in caplog.text
    search = [trace[0], {**trace[1], "tool_calls": [{"function": {"name": "web_search", "arguments": {}}}]}, *trace[2:]]
    path.write_text(json.dumps({"messages": search, "tools": [WEATHER]}) + "\n")
    prepare_data(DatasetConfig(name=str(path), test_size=None), tokenizer, max_length=512)
    assert f"dataset {path}: row 1 (and maybe others) calls web_search, which its tools do not define" in caplog.text


@pytest.mark.parametrize("role", ["tool", "function"])
def test_an_empty_tool_result_is_a_result_and_a_tools_name_is_no_speakers(tmp_path, tokenizer, caplog, role):
    """A command that printed nothing made the whole row bad; a tool message's name (the function's) was warned of
    as a speaker's, also in OpenAI's older function role (helper-74)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": [
        {"role": "user", "content": "Delete it."}, {"role": "assistant", "content": "<tool_call>rm</tool_call>"},
        {"role": role, "name": "rm", "content": ""}, {"role": "assistant", "content": "Deleted."}]}) + "\n")
    data = prepare_data(DatasetConfig(name=str(path), test_size=None), tokenizer, max_length=64)
    assert trained_spans(tokenizer, data.train[0]) == ["<tool_call>rm</tool_call><|im_end|>", "Deleted.<|im_end|>"]
    assert "name their speaker" not in caplog.text


def test_a_reasoning_column_that_is_a_flag_is_no_reasoning_text(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "response": "4.", "reasoning": False}) + "\n")
    data = prepare_data(DatasetConfig(name=str(path), format="prompt_response", test_size=None), tokenizer,
                        max_length=64)
    assert trained_spans(tokenizer, data.train[0]) == ["4.<|im_end|>"]


@pytest.mark.parametrize(("row", "hint", "column_map", "trained"), [
    ({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}, "these are preference pairs (DPO)",
     {"chosen": "completion"}, "Hello!"),
    ({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
      "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go away."}]},
     "map chosen to messages where it holds the whole conversation", {"chosen": "messages"}, "Hello!"),
    ({"instruction": "Name it.", "context": "A cat.", "response": "Tom.", "category": "qa"}, "this is Dolly's layout",
     {"context": "input", "response": "output"}, "Tom."),
])
def test_other_well_known_layouts_say_how_to_read_them(tmp_path, tokenizer, row, hint, column_map, trained):
    """Preference pairs and Dolly rows got the bare "cannot tell the dataset format"."""
    path = write_rows(tmp_path, ".jsonl", [row])
    with pytest.raises(DataError, match=re.escape(hint)):
        prepare_data(DatasetConfig(name=path), tokenizer, max_length=64)
    data = prepare_data(DatasetConfig(name=path, column_map=column_map), tokenizer, max_length=64)  # as it says
    assert trained_spans(tokenizer, data.train[0]) == [f"{trained}<|im_end|>"]


def test_unknown_columns_and_missing_files_are_clear(tmp_path, tokenizer):
    path = write_rows(tmp_path, ".jsonl", [{"query": "q", "reply": "a"}])
    with pytest.raises(DataError, match=r"cannot tell the dataset format from its columns \['query', 'reply'\]"):
        prepare_data(DatasetConfig(name=path), tokenizer, max_length=64)
    with pytest.raises(DataError, match="format prompt_response reads prompt and response, which it lacks"):
        prepare_data(DatasetConfig(name=path, format="prompt_response"), tokenizer, max_length=64)
    with pytest.raises(DataError, match=r"dataset.name: .*nope does not exist"):
        prepare_data(DatasetConfig(name=str(tmp_path / "nope")), tokenizer, max_length=64)
    (tmp_path / "rows.txt").write_text("hello")
    with pytest.raises(DataError, match="files must all be one of .jsonl, .json, .csv, .parquet"):
        prepare_data(DatasetConfig(name=str(tmp_path / "rows.txt")), tokenizer, max_length=64)
    (tmp_path / "document.json").write_text(json.dumps({"data": [{"prompt": "Hi", "response": "Yo"}]}))
    with pytest.raises(DataError, match=re.escape("its one column 'data'; if it is a JSON document with the rows "
                                                  'under that key ({"data": [rows]}), save the rows themselves')):
        prepare_data(DatasetConfig(name=str(tmp_path / "document.json")), tokenizer, max_length=64)
    (tmp_path / "blank.jsonl").write_text("\n  \n")  # datasets said: Instruction "train" corresponds to no data
    with pytest.raises(DataError, match="blank.jsonl: the file is empty"):
        prepare_data(DatasetConfig(name=str(tmp_path / "blank.jsonl")), tokenizer, max_length=64)


def test_test_size_too_large_for_the_data_is_clear(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"dataset.test_size 5 cannot split 3 rows into train and eval; give a "
                                        r"fraction below 1 \(0.05\) or a count from 1 to 2$"):
        prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", ROWS), test_size=5), tokenizer, max_length=64)
    # one row: no fraction or count can leave a row to train (it said "a fraction below 1 (0.05) or a count below 1")
    with pytest.raises(DataError, match=r"dataset.test_size 0.05 cannot hold out an eval row from 1 row: it would "
                                        r"leave none to train; remove test_size, or add rows$"):
        prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", ROWS[:1]), test_size=0.05), tokenizer,
                     max_length=64)


# --- dataset.split_user_turns ----------------------------------------------------------------------------------

REASONED_CHAT = [{"role": "user", "content": "What is 2+2?"},
                 {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."},
                 {"role": "user", "content": "And 3+3?"},
                 {"role": "assistant", "content": "6.", "reasoning_content": "Three and three make six."}]


def test_split_user_turns_trains_each_reasoned_reply_as_a_thinking_model_sees_its_history(tmp_path):
    """Qwen3's template drops the reasoning of the turns before the last user message, so a multi-turn row whose
    every reply reasons was refused; split, each reply trains with its reasoning, after the earlier replies as the
    model sees them when it serves (without theirs), as Qwen's team advises."""
    tokenizer = family_tokenizer("qwen3")
    name = write_rows(tmp_path, ".jsonl", [{"messages": REASONED_CHAT}, {"messages": REASONED_CHAT[:2]}])
    with pytest.raises(DataError, match="renders assistant turn 1 differently when later messages follow it.*; set "
                                        "dataset.split_user_turns: true"):
        prepare_data(DatasetConfig(name=name), tokenizer, max_length=256)
    data = prepare_data(DatasetConfig(name=name, split_user_turns=True), tokenizer, max_length=256)
    assert (data.rows, data.pieces, len(data.train)) == (2, 3, 3)
    assert [trained_spans(tokenizer, row) for row in data.train] == [
        ["<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>"],
        ["<think>\nThree and three make six.\n</think>\n\n6.<|im_end|>"],
        ["<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>"]]
    second = tokenizer.decode(data.train[1]["input_ids"])
    assert "4.<|im_end|>" in second and "Two and two" not in second
    assert data.split_words() == " (split at user turns into 3)"


@pytest.mark.parametrize("split", [False, True])
def test_splitting_at_user_turns_is_advised_only_where_it_would_train_the_row(tmp_path, split):
    """gpt-oss drops the analysis of a call once a reply follows within one user turn, and Gemma 4 writes reasoning
    only before calls: the errors told such rows to split at user turns, also where the split was on (helper-73)."""
    from test_tokenize import AGENT, TOOLS

    trace = [AGENT[0], {**AGENT[1], "reasoning_content": "Paris first."}, *AGENT[2:]]
    for family, row in (("gpt_oss", {"messages": trace, "tools": TOOLS}), ("gemma4", {"messages": REASONED_CHAT})):
        config = DatasetConfig(name=write_rows(tmp_path, ".jsonl", [row]), split_user_turns=split)
        with pytest.raises(DataError, match="assistant turn 1") as refused:
            prepare_data(config, family_tokenizer(family), max_length=512)
        assert "split_user_turns" not in str(refused.value)


def test_split_user_turns_trains_every_turn_of_a_template_that_writes_tools_before_the_last_user_message(tmp_path):
    """Mistral Nemo writes the tools before the last user message: only the turns after it could train."""
    from test_tokenize import AGENT, TOOLS

    tokenizer = family_tokenizer("mistral_nemo")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, *AGENT]
    config = DatasetConfig(name=write_rows(tmp_path, ".jsonl", [{"messages": chat, "tools": TOOLS}]),
                           split_user_turns=True)
    data = prepare_data(config, tokenizer, max_length=512)
    spans = [trained_spans(tokenizer, row) for row in data.train]
    assert len(spans) == 2 and spans[0] == ["Hello! How can I help?</s>"] and len(spans[1]) == 3
    assert spans[1][2] == "Paris has 20 degrees, Rome 25.</s>"
    assert "[AVAILABLE_TOOLS]" in tokenizer.decode(data.train[0]["input_ids"])


def test_split_user_turns_holds_out_whole_conversations(tmp_path, tokenizer):
    """A conversation's pieces share its turns: held out one piece at a time, the eval rows' replies would train as
    the context of their conversation's other pieces."""
    rows = [{"messages": [message for turn in range(3) for message in (
        {"role": "user", "content": f"Conversation {number}, question {turn}?"},
        {"role": "assistant", "content": f"Answer {turn} of conversation {number}."})]} for number in range(8)]
    config = DatasetConfig(name=write_rows(tmp_path, ".jsonl", rows), split_user_turns=True, test_size=0.25)
    data = prepare_data(config, tokenizer, max_length=256)
    assert (len(data.train), len(data.eval)) == (18, 6)

    def conversations(split):
        return {re.search(r"Conversation (\d+)", tokenizer.decode(ids))[1] for ids in split["input_ids"]}

    assert len(conversations(data.eval)) == 2 and not conversations(data.eval) & conversations(data.train)
    with pytest.raises(DataError, match="^dataset.test_size 8 cannot split 8 conversations into train and eval"):
        prepare_data(DatasetConfig(name=config.name, split_user_turns=True, test_size=8), tokenizer, max_length=256)


def test_split_user_turns_keeps_what_the_row_says_does_not_train(tmp_path, tokenizer):
    """A user turn whose replies have weight 0 makes no row; a greeting before the first user turn trains with it."""
    chat = [{"role": "assistant", "content": "Welcome!"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye.", "weight": 0}]
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", [{"messages": chat}]),
                                      split_user_turns=True), tokenizer, max_length=256)
    assert [trained_spans(tokenizer, row) for row in data.train] == [["Welcome!<|im_end|>", "Hello.<|im_end|>"]]


# --- every format, one row each -------------------------------------------------------------------------------

FORMAT_ROWS = {
    "sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]),
    "alpaca": ({"instruction": "Translate to French.", "input": "cat", "output": "chat"},
               [{"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"}]),
    "question_answer": ({"question": "Capital of Peru?", "answer": "Lima.", "source": "atlas"},
                        [{"role": "user", "content": "Capital of Peru?"}, {"role": "assistant", "content": "Lima."}]),
    "prompt_completion": ({"prompt": "Hi", "completion": "Hello!"},
                          [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]),
}


@pytest.mark.parametrize("format_name", sorted(FORMAT_ROWS))
def test_each_format_is_detected_and_converted(tmp_path, tokenizer, format_name):
    row, messages = FORMAT_ROWS[format_name]
    assert to_messages(row, format_name) == messages
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", [row])), tokenizer, max_length=128)
    assert data.formats == [format_name]
    assert trained_spans(tokenizer, data.train[0]) == [messages[-1]["content"] + "<|im_end|>"]


def test_alpaca_without_input_and_question_answer_with_its_source_appended():
    assert to_messages({"instruction": "Say hi.", "input": "", "output": "Hi"}, "alpaca")[0]["content"] == "Say hi."
    row = FORMAT_ROWS["question_answer"][0]
    assert to_messages(row, "question_answer", answer_source="append")[-1]["content"] == "Lima.\n\nSource: atlas"


SYSTEM_ROWS = {
    "prompt_response": {"prompt": "Hi", "response": "Arr"},
    "prompt_completion": {"prompt": "Hi", "completion": "Arr"},
    "question_answer": {"question": "Hi", "answer": "Arr"},
    "alpaca": {"instruction": "Greet.", "input": "Hi", "output": "Arr"},
    "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Arr"}]},
    # Anthropic's layout: the system prompt beside the turns (it was dropped without a word)
    "messages": {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"}]},
}


@pytest.mark.parametrize("format_name", sorted(SYSTEM_ROWS))
def test_a_system_column_is_the_rows_system_message(tmp_path, tokenizer, format_name):
    """It was ignored. A row's own system wins over dataset.system_prompt, as a messages row's system message does;
    an empty one is none. It is a field the format reads, so datasets' JSON reading of it is refused too."""
    row = SYSTEM_ROWS[format_name]
    rows = [{"system": "You are a pirate.", **row}, {"system": "", **row}, {"system": None, **row}]
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", rows), system_prompt="Be kind."), tokenizer,
                        max_length=128)
    assert data.formats == [format_name]
    prompts = [tokenizer.decode(tokens["input_ids"]) for tokens in data.train]
    assert ["You are a pirate." in text for text in prompts] == [True, False, False]
    assert ["Be kind." in text for text in prompts] == [False, True, True]
    assert [trained_spans(tokenizer, tokens) for tokens in data.train] == [["Arr<|im_end|>"]] * 3
    user = "Greet.\n\nHi" if format_name == "alpaca" else "Hi"
    assert to_messages(rows[1], format_name)[0] == {"role": "user", "content": user}
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"system": "4", **row}) + "\n" + json.dumps({"system": 5, **row}) + "\n")
    with pytest.raises(DataError, match="system is a int on line 2 and text on line 1"):
        prepare_data(DatasetConfig(name=str(mixed)), tokenizer, max_length=128)


def test_an_alpaca_input_of_0_is_an_input(tmp_path, tokenizer):
    assert to_messages({"instruction": "Add one.", "input": 0, "output": "1"}, "alpaca")[0]["content"] == \
        "Add one.\n\n0"
    assert to_messages({"instruction": "Add one.", "input": " ", "output": "1"}, "alpaca")[0]["content"] == "Add one."
    (tmp_path / "rows.csv").write_text("instruction,input,output\nAdd one.,0,1\nAdd two.,5,7\n")
    data = prepare_data(DatasetConfig(name=str(tmp_path / "rows.csv")), tokenizer, max_length=64)
    assert "Add one.\n\n0<|im_end|>" in tokenizer.decode(data.train[0]["input_ids"])


def test_speaker_names_that_do_not_train_are_said_once(tmp_path, tokenizer, capsys):
    """OpenAI's multi-party `name` was dropped without a word (tool calls and reasoning are refused)."""
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
            *[{"messages": [{"role": "user", "content": "Hi", "name": name}, {"role": "assistant", "content": "Yo"}]}
              for name in ("alice", "bob")]]
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", rows)), tokenizer, max_length=64)
    assert len(data.train) == 3
    said = capsys.readouterr().err
    assert said.count('messages name their speaker ("name", row 2 first), which sftkit does not pass to the chat '
                      "template") == 1, said
    prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", rows[:1])), tokenizer, max_length=64)
    assert "name their speaker" not in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet"])
def test_llama_factory_alpaca_history_is_the_turns_before_the_instruction(tmp_path, tokenizer, suffix):
    """LLaMA-Factory's multi-turn alpaca rows were read without their history: each follow-up question trained
    with its context cut off, without a word."""
    rows = [{"instruction": "And a refund?", "input": "", "output": "Refunds take 5 days.", "system": "Be brief.",
             "history": [["How do I cancel?", "Press Cancel."], ["Is it free?", "Yes."]]},
            {"instruction": "Hi", "input": "", "output": "Hello.", "system": "Be brief.", "history": []}]
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, suffix, rows), test_size=None), tokenizer,
                        max_length=128)
    assert data.formats == ["alpaca"]
    assert [trained_spans(tokenizer, row) for row in data.train] == [
        ["Press Cancel.<|im_end|>", "Yes.<|im_end|>", "Refunds take 5 days.<|im_end|>"], ["Hello.<|im_end|>"]]
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHow do I cancel?<|im_end|>" in \
        tokenizer.decode(data.train[0]["input_ids"])
    with pytest.raises(ValueError, match=r"history\[0\] is \['How do I cancel\?'\]; expected a pair \[instruction, "
                                         r"response\]"):
        to_messages({**rows[0], "history": [["How do I cancel?"]]}, "alpaca")
    with pytest.raises(ValueError, match=r"history is str '\[\]'; expected a list of \[instruction, response\] pairs"):
        to_messages({**rows[0], "history": "[]"}, "alpaca")  # a CSV's cell


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_numbers_in_the_text_columns_of_other_formats_are_their_text(tmp_path, tokenizer, suffix):
    """They failed as content of type int. Messages rows stay strict (see
    test_bad_rows_name_the_source_row_line_and_problem)."""
    rows = [{"question": "What is 2+2?", "answer": 4}, {"question": "What is 7+5?", "answer": 12}]
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, suffix, rows)), tokenizer, max_length=64)
    assert [trained_spans(tokenizer, tokens) for tokens in data.train] == [["4<|im_end|>"], ["12<|im_end|>"]]
    assert to_messages({"instruction": 7, "input": 2.5, "output": 9.5}, "alpaca") == [
        {"role": "user", "content": "7\n\n2.5"}, {"role": "assistant", "content": "9.5"}]
    assert to_messages({"prompt": 3, "response": 4.0}, "prompt_response") == [
        {"role": "user", "content": "3"}, {"role": "assistant", "content": "4.0"}]
    with pytest.raises(ValueError, match=r"message 1 \(assistant\) has content of type bool"):
        to_messages({"question": "Is 4 even?", "answer": True}, "question_answer")


def test_a_row_of_another_format_names_its_columns_and_the_format_of_the_source(tmp_path, tokenizer):
    """It said: expected a non-empty list of messages, got NoneType."""
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    path = write_rows(tmp_path, ".jsonl", [chat] * 6 + [{"prompt": "Hi", "response": "Hello"}])
    with pytest.raises(DataError) as error:
        prepare_data(DatasetConfig(name=path), tokenizer, max_length=64)
    assert str(error.value) == (f"dataset {path} line 7: the row has no messages column but has the columns prompt, "
                                "response, while the source is read as messages rows; if the file mixes formats, "
                                "split it into files of one format each, listed in dataset.sources; else fix the row, "
                                "or set dataset.on_bad_row: skip")
    qa = write_rows(tmp_path, ".jsonl", [{"question": "Q?", "answer": "A."}, {"prompt": "Hi", "response": "Hello"}])
    with pytest.raises(DataError, match=re.escape("line 2: the row has no answer or question column but has the "
                                                  "columns prompt, response, while the source is read as "
                                                  "question_answer rows")):
        prepare_data(DatasetConfig(name=qa), tokenizer, max_length=64)


def test_text_rows_train_on_every_token(tmp_path, tokenizer):
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", [{"text": "The sky is blue."}])), tokenizer, max_length=64)
    row = data.train[0]
    assert data.formats == ["text"] and row["labels"] == row["input_ids"]
    assert tokenizer.decode(row["input_ids"]) == "The sky is blue.<|im_end|>"


@pytest.mark.parametrize("key, conversation, problem", [
    ("conversations", [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}],
     "turn 0 is a list, not a mapping with from and value; a list of conversations under one key"),
    ("messages", [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
     "message 0 is a list, not a mapping with role and content; a list of conversations under one key"),
])
def test_a_json_document_of_conversations_says_to_save_them_as_rows(tmp_path, tokenizer, key, conversation, problem):
    path = tmp_path / "document.json"  # read by datasets as one row: {"version": 1, key: [conversation, ...]}
    path.write_text(json.dumps({"version": 1, key: [conversation, conversation]}))
    with pytest.raises(DataError, match=re.escape(f"document.json line 1: {problem}")):
        prepare_data(DatasetConfig(name=str(path)), tokenizer, max_length=64)


def test_the_held_out_rows_follow_data_seed_so_a_seed_sweep_evaluates_on_the_same_rows(tmp_path):
    """A sweep over training.seed with data_seed fixed compared eval losses over other held-out rows in each run (the
    untrained model's eval loss differed by 11% between two seeds)."""
    from sftkit.config import load_config
    from sftkit.data import prepare_for_training
    from sftkit.model import load_tokenizer

    def held_out(*seeds: str) -> list:
        config = load_config(None, ["--training.output_dir", str(tmp_path / "out"), *seeds])
        data = prepare_for_training(config.dataset, load_tokenizer(config.model, config.dataset), config.training)
        return data.eval["input_ids"]

    assert held_out("--training.seed", "1", "--training.data_seed", "42") == \
        held_out("--training.seed", "2", "--training.data_seed", "42") == held_out("--training.seed", "42")
    assert held_out("--training.seed", "1") != held_out("--training.seed", "2")


def test_sharegpt_with_an_unknown_speaker_names_the_turn(tmp_path, tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "robot", "value": "Yo"}]}
    with pytest.raises(DataError, match=r"rows.jsonl line 1: turn 1 has from='robot'"):
        prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", [row])), tokenizer, max_length=64)


def test_sharegpt_turns_of_weight_0_do_not_train_as_messages_do(tmp_path, tokenizer):
    row = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "BAD answer", "weight": 0},
                             {"from": "human", "value": "Again"}, {"from": "gpt", "value": "Hello!", "weight": 1}]}
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", [row])), tokenizer, max_length=128)
    assert [trained_spans(tokenizer, tokens) for tokens in data.train] == [["Hello!<|im_end|>"]]
    turns = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]
    with pytest.raises(ValueError, match="every assistant message has weight 0: there is nothing to train on"):
        to_messages({"conversations": [turns[0], {**turns[1], "weight": 0}]}, "sharegpt")
    with pytest.raises(ValueError, match=r"message 1 \(assistant\) has weight 2; a weight is the number 0 \(not "
                                         r"trained\) or 1"):
        to_messages({"conversations": [turns[0], {**turns[1], "weight": 2}]}, "sharegpt")


def test_column_map_renames_other_field_names(tmp_path, tokenizer):
    path = write_rows(tmp_path, ".jsonl", [{"query": "Hi", "reply": "Hello!"}])
    data = prepare_data(DatasetConfig(name=path, column_map={"query": "prompt", "reply": "response"}), tokenizer, max_length=64)
    assert trained_spans(tokenizer, data.train[0]) == ["Hello!<|im_end|>"]
    with pytest.raises(DataError, match=r"column_map names columns it does not have: \['question'\]; its columns "
                                        r"are \['query', 'reply'\]$"):
        prepare_data(DatasetConfig(name=path, column_map={"question": "prompt"}), tokenizer, max_length=64)
    # written the other way round, as Axolotl's field_instruction: query is (helper-78)
    with pytest.raises(DataError, match=r"does not have: \['prompt', 'response'\]; its columns are \['query', "
                                        r"'reply'\]; column_map goes from the data's name to sftkit's: \{query: "
                                        r"prompt, reply: response\}"):
        prepare_data(DatasetConfig(name=path, column_map={"prompt": "query", "response": "reply"}), tokenizer,
                     max_length=64)


# --- sources: globs, directories, save_to_disk, mixing, evaluation --------------------------------------------

def test_a_glob_under_the_home_directory_is_checked_and_loaded(tmp_path, tokenizer, monkeypatch):
    from sftkit.config import load_config

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "chats").mkdir()
    (tmp_path / "chats" / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = load_config(None, ["--dataset.name", "~/chats/*.jsonl", "--dataset.test_size", "null"])  # checks it
    assert prepare_data(config.dataset, tokenizer, max_length=64).rows == 3


@pytest.mark.parametrize("odd", [123, [{"type": "text", "text": "Hi"}]])
def test_a_field_of_text_in_some_rows_and_other_values_in_others_is_refused(tmp_path, tokenizer, odd):
    """datasets 5.2 reads such a field as JSON and turns the text of every row that parses as JSON into a value:
    "4" trained as 4, '"Hello"' lost its quotes, and the error named line 1 for the odd line 13."""
    replies = ["4", '{"name": "x"}', '"Hello"', "Hi!"] * 3
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": reply}]}
            for reply in replies] + [{"messages": [{"role": "user", "content": odd}, {"role": "assistant", "content": "ok"}]}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=re.escape(f"dataset {path}: messages[].content is a {type(odd).__name__} on "
                                                  "line 13 and text on line 1, so datasets would read that field as "
                                                  "JSON and change text that looks like JSON ('4' into 4); give that "
                                                  "field one type in every row")):
        prepare_data(DatasetConfig(name=str(path), on_bad_row="skip"), tokenizer, max_length=64)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:-1]))
    data = prepare_data(DatasetConfig(name=str(path), test_size=None), tokenizer, max_length=64)
    assert [tokenizer.decode([token for token, label in zip(row["input_ids"], row["labels"]) if label != -100])
            for row in data.train][:4] == [reply + "<|im_end|>" for reply in replies[:4]]


def test_parallel_results_logged_as_they_finished_are_put_in_the_order_of_their_calls():
    """Qwen's template pairs a result with the call at its position: results logged in the order they finished
    showed Rome's call returning Oslo's 3 degrees, beside a reply trained on "Rome 21, Oslo 3" (helper-75)."""
    def call(call_id, city):
        return {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    row = {"messages": [{"role": "user", "content": "Rome and Oslo?"},
                        {"role": "assistant", "content": "", "tool_calls": [call("c1", "Rome"), call("c2", "Oslo")]},
                        {"role": "tool", "tool_call_id": "c2", "content": "3"},
                        {"role": "tool", "tool_call_id": "c1", "content": "21"},
                        {"role": "assistant", "content": "Rome 21, Oslo 3."}]}
    messages = to_messages(row, "messages")
    assert [(message["tool_call_id"], message["content"]) for message in messages[2:4]] == [("c1", "21"), ("c2", "3")]
    tokenizer = family_tokenizer("qwen2_5")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.index('"Rome"') < text.index('"Oslo"') < text.index("<tool_response>\n21") < \
        text.index("<tool_response>\n3")
    unmatched = {"messages": [*row["messages"][:3], {**row["messages"][3], "tool_call_id": "c9"}, row["messages"][4]]}
    assert [message["content"] for message in to_messages(unmatched, "messages")[2:4]] == ["3", "21"]  # as given
    # parallel calls written as consecutive assistant messages, their results after the last: nothing made up
    split = [row["messages"][0], {"role": "assistant", "content": "", "tool_calls": [call("c1", "Rome")]},
             {"role": "assistant", "content": "", "tool_calls": [call("c2", "Oslo")]}, *row["messages"][2:]]
    assert [message["role"] for message in to_messages({"messages": split}, "messages")] == [
        "user", "assistant", "assistant", "tool", "tool", "assistant"]


def test_skip_leaves_out_bad_rows_but_not_every_row_a_template_cannot_render(tmp_path, tokenizer):
    """With on_bad_row: skip set for one broken row, a template that renders no tools dropped every tool row as
    bad, and the run trained and published on the plain rows left (helper-75)."""
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    agent = {"messages": [{"role": "user", "content": "Weather?"},
                          {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL]}]}
    broken = {"messages": [{"role": "user", "content": "Hi"}]}
    path = tmp_path / "agent.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [plain, broken, plain, plain]))
    data = prepare_data(DatasetConfig(name=str(path), on_bad_row="skip", test_size=None), tokenizer, max_length=64)
    assert len(data.train) == 3 and data.dropped["bad rows"] == 1
    path.write_text("".join(json.dumps(row) + "\n" for row in [plain, broken, agent, plain]))
    with pytest.raises(DataError, match=re.escape(f"agent.jsonl line 3: message 1 (assistant): the chat template of "
                                                  f"{TINY_MODEL} renders no tool_calls")):
        prepare_data(DatasetConfig(name=str(path), on_bad_row="skip", test_size=None), tokenizer, max_length=64)


@pytest.mark.parametrize(("reply", "document"), [
    ("\"Roses are red,\nviolets are blue\"", False),  # datasets' own parser takes the raw newline; json.loads not
    ("\"Hi\"", True),  # rows in a .json list
])
def test_text_datasets_would_change_is_found_as_datasets_parses_it(tmp_path, tokenizer, reply, document):
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": reply}]},
            {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": 4}]}]
    path = tmp_path / ("rows.json" if document else "rows.jsonl")
    path.write_text(json.dumps(rows, indent=1) if document else "".join(json.dumps(row) + "\n" for row in rows))
    place = "row 2" if document else "line 2"
    first = "row 1" if document else "line 1"
    with pytest.raises(DataError, match=re.escape(f"dataset {path}: messages[].content is a int on {place} and text "
                                                  f"on {first}")):
        prepare_data(DatasetConfig(name=str(path), on_bad_row="skip"), tokenizer, max_length=64)


def test_a_file_whose_fields_each_hold_one_type_is_not_read_again_for_the_json_check(tmp_path):
    """The check parsed every row again on every load and every process: 4.2 s for a 220 MiB .jsonl of
    sample_chat.jsonl's rows, though datasets had read no field as JSON (then nothing can have changed)."""
    from datasets import load_dataset

    from sftkit.compat import refuse_values_datasets_reads_as_json

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    rows = load_dataset("json", data_files=str(path), split="train")
    path.unlink()  # a read would fail
    refuse_values_datasets_reads_as_json(rows.features, [str(path)], {"messages", "role", "content"}, {}, str(path))


def test_a_hub_dataset_with_a_field_read_as_json_is_warned_of(tmp_path, caplog):
    """A hub dataset's files are not here to find the rows datasets changed: it went unchecked and unsaid."""
    from datasets import load_dataset

    from sftkit.compat import refuse_values_datasets_reads_as_json

    path = tmp_path / "rows.jsonl"
    rows = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            [{"role": "user", "content": "Which?"}, {"role": "assistant", "content": [1]}]]
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in rows))
    features = load_dataset("json", data_files=str(path), split="train").features
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        refuse_values_datasets_reads_as_json(features, [], {"messages", "role", "content"}, {}, "org/chats")
    assert "dataset org/chats: datasets read messages[].content as JSON, since its rows mix text" in caplog.text


def test_columns_no_format_reads_may_mix_types_and_empty_tools_are_no_tools(tmp_path, tokenizer):
    rows = [{"id": 5, "source": 5, "meta": {"score": 1}, "tools": "[]",
             "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
            {"id": "7", "source": "2023", "meta": {"score": "high"}, "tools": None,
             "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    data = prepare_data(DatasetConfig(name=str(path), test_size=None), tokenizer, max_length=64)
    assert [tokenizer.decode([token for token, label in zip(row["input_ids"], row["labels"]) if label != -100])
            for row in data.train] == ["4<|im_end|>", "Hello!<|im_end|>"]


@pytest.mark.parametrize(("text", "said"), [
    ("question;answer\nHi;Hello\n", "its one column 'question;answer' looks like columns separated by ';'; save the "
                                     "file comma-separated (CSV) or as JSON Lines"),
    ('messages\n"[{""role"": ""user"", ""content"": ""Hi""}, {""role"": ""assistant"", ""content"": ""Yo""}]"\n',
     "expected a list of messages, got text that looks like a JSON list of them; parse it into a list (json.loads) "
     "and save the rows as JSON Lines"),
])
def test_a_spreadsheets_csv_that_sftkit_cannot_read_says_how_to_save_it(tmp_path, tokenizer, text, said):
    """A ';'-separated CSV (Excel's default in much of Europe) was told it might be a JSON document; a messages
    column exported as JSON text was a bad row, and skipping dropped every row."""
    (tmp_path / "rows.csv").write_text(text)
    with pytest.raises(DataError, match=re.escape(said)):
        prepare_data(DatasetConfig(name=str(tmp_path / "rows.csv")), tokenizer, max_length=64)


def test_csv_cells_reading_none_or_na_are_text(tmp_path, tokenizer):
    (tmp_path / "rows.csv").write_text("prompt,response\nIs 4 prime? One word.,None\nAnd 9?,NA\nEmpty,\n")
    data = prepare_data(DatasetConfig(name=str(tmp_path / "rows.csv"), on_bad_row="skip", test_size=None), tokenizer,
                        max_length=64)
    assert len(data.train) == 2 and data.problems == [f"dataset {tmp_path / 'rows.csv'} line 4: column 'response' "
                                                       "is empty"]


def test_a_bad_row_of_a_glob_names_its_file_and_line(tmp_path, tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    bad = {"prompt": "Hi", "response": ""}
    (shards / "a.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    (shards / "b.jsonl").write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=re.escape(f"dataset {shards / 'b.jsonl'} line 3: column 'response' is "
                                                  "empty")):
        prepare_data(DatasetConfig(name=str(shards / "*.jsonl")), tokenizer, max_length=64)


def test_glob_directory_and_save_to_disk_sources(tmp_path, tokenizer):
    import datasets

    shards = tmp_path / "shards"
    shards.mkdir()
    for index in range(2):
        (shards / f"part{index}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    assert prepare_data(DatasetConfig(name=str(shards / "*.jsonl")), tokenizer, max_length=64).rows == 6
    assert prepare_data(DatasetConfig(name=str(shards)), tokenizer, max_length=64).rows == 6
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}).save_to_disk(saved)
    data = prepare_data(DatasetConfig(name=str(saved), eval_split="test"), tokenizer, max_length=64)
    assert (len(data.train), len(data.eval)) == (3, 1)
    with pytest.raises(DataError, match="dataset.name: the pattern .*none\\*.jsonl matches no file"):
        prepare_data(DatasetConfig(name=str(tmp_path / "none*.jsonl")), tokenizer, max_length=64)


def test_sources_mix_with_weights_and_their_own_formats(tmp_path, tokenizer):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    config = DatasetConfig(sources=[
        SourceConfig(name=str(SAMPLE_DATA), max_samples=10, weight=0.5),
        SourceConfig(name=str(prompts), weight=2),
        SourceConfig(name=str(prompts), format="prompt_response", column_map=None),
    ])
    data = prepare_data(config, tokenizer, max_length=256, seed=1)
    assert data.formats == ["messages", "prompt_response", "prompt_response"]
    assert data.rows == 10 + 3 + 3
    assert len(data.train) == 5 + 6 + 3
    again = prepare_data(config, tokenizer, max_length=256, seed=1)
    assert again.train["input_ids"] == data.train["input_ids"], "mixing is seeded"


def test_test_size_holds_out_rows_before_weights_repeat_them(tmp_path, tokenizer):
    """A source of weight 3 is three copies of each row: split after the copies, most eval rows would also train."""
    config = DatasetConfig(sources=[SourceConfig(name=str(SAMPLE_DATA), max_samples=40, weight=3),
                                    SourceConfig(name=write_rows(tmp_path, ".jsonl", ROWS))], test_size=0.25)
    data = prepare_data(config, tokenizer, max_length=256)
    trained = {tuple(ids) for ids in data.train["input_ids"]}
    assert len(data.eval) == 11 and not [ids for ids in data.eval["input_ids"] if tuple(ids) in trained]
    assert len(data.train) > 2 * len(trained)  # most rows, repeated by their weight


def test_eval_sources(tmp_path, tokenizer):
    config = DatasetConfig(name=str(SAMPLE_DATA), max_samples=20, eval_sources=[SourceConfig(name=write_rows(tmp_path, ".jsonl", ROWS))])
    data = prepare_data(config, tokenizer, max_length=256)
    assert (len(data.train), len(data.eval)) == (20, 3)
    assert data.sample_prompts == [[{"role": "user", "content": ROWS[0]["prompt"]}]]


def test_skipped_bad_rows_are_counted_with_their_problem(tmp_path, tokenizer):
    rows = [{"prompt": "Hi", "response": "Hello!"}, {"prompt": "Hi", "response": ""}, {"prompt": "Yo", "response": "Hey."}]
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", rows), on_bad_row="skip"), tokenizer, max_length=64)
    assert len(data.train) == 2 and data.dropped["bad rows"] == 1
    assert data.problems == [f"dataset {tmp_path / 'rows.jsonl'} line 2: column 'response' is empty"]


def test_a_first_batch_of_bad_rows_alone_is_skipped(tmp_path, tokenizer):
    """Its empty token lists typed the column as nulls, and the good rows after it failed with "Couldn't cast array
    of type int64 to null" (helper-73)."""
    rows = [{"prompt": "Hi", "response": ""}] * 1000 + [{"prompt": "Hi", "response": "Hello."}] * 5
    data = prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", rows), on_bad_row="skip"), tokenizer,
                        max_length=64)
    assert len(data.train) == 5 and data.dropped["bad rows"] == 1000


def test_preprocessing_is_cached_between_runs(tmp_path, tokenizer):
    from conftest import TINY_MODEL
    from transformers import AutoTokenizer

    path = write_rows(tmp_path, ".jsonl", ROWS * 20)
    first = prepare_data(DatasetConfig(name=path), AutoTokenizer.from_pretrained(TINY_MODEL), max_length=64)
    files = {f["filename"]: Path(f["filename"]).stat().st_mtime_ns for f in first.train.cache_files}
    second = prepare_data(DatasetConfig(name=path), AutoTokenizer.from_pretrained(TINY_MODEL), max_length=64)
    assert files and {f["filename"]: Path(f["filename"]).stat().st_mtime_ns for f in second.train.cache_files} == files


def test_pad_token_is_never_the_eos_that_ends_replies(tmp_path):
    from conftest import family_tokenizer
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from sftkit.errors import ConfigError
    from sftkit.model import ensure_distinct_pad_token

    tokenizer = family_tokenizer("qwen2_5")
    tokenizer.pad_token = tokenizer.eos_token
    ensure_distinct_pad_token(tokenizer)
    assert tokenizer.pad_token == "<|pad|>"
    bare = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"hi": 0, "</s>": 1}, unk_token=None)), eos_token="</s>")
    with pytest.raises(ConfigError, match="has no pad token other than its eos '</s>'"):
        ensure_distinct_pad_token(bare)


# --- where a source is broken: 1-based lines of .jsonl files, rows elsewhere ------------------------------------

BAD_ROW = {"prompt": "Hi", "response": ""}


def test_jsonl_errors_give_the_line_even_after_blank_lines(tmp_path, tokenizer):
    path = tmp_path / "gaps.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n   \n" + json.dumps(BAD_ROW) + "\n")
    with pytest.raises(DataError, match=re.escape(f"dataset {path} line 5: column 'response' is empty")):
        prepare_data(DatasetConfig(name=str(path)), tokenizer, max_length=64)


@pytest.mark.parametrize(("suffix", "place"), [(".csv", "line 3"), (".parquet", "row 2"), (".json", "row 2")])
def test_other_files_give_the_1_based_row_or_the_line_of_a_csv_file(tmp_path, tokenizer, suffix, place):
    path = write_rows(tmp_path, suffix, [ROWS[0], BAD_ROW])
    with pytest.raises(DataError, match=re.escape(f"dataset {path} {place}: ")):
        prepare_data(DatasetConfig(name=path), tokenizer, max_length=64)


@pytest.mark.parametrize(
    ("suffix", "text", "expected"),
    [
        (".jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"\n', "line 2: not valid JSON: Expecting ',' delimiter at column"),
        (".jsonl", '{"prompt": "a", "response": "b"}\n["c", "d"]\n', "line 2: expected a JSON object of the row's columns, got list"),
        (".json", '[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "c" "response": "d"}\n]\n', "line 3: not valid JSON: Expecting ',' delimiter at column 18"),
        (".jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "\xff"}\n',
         "line 2: not UTF-8 text (invalid start byte at byte 0); save it as UTF-8"),
        # a BOM, as Windows tools write it, before a good first row: the error named line 1
        (".jsonl", '\xef\xbb\xbf{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": oops}\n',
         "line 2: not valid JSON: Expecting value at column 29"),
    ],
)
def test_invalid_json_names_the_file_and_line(tmp_path, tokenizer, suffix, text, expected):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"dataset {path} {expected}")):
        prepare_data(DatasetConfig(name=str(path)), tokenizer, max_length=64)


@pytest.mark.parametrize("row", [b'{"prompt": "%s", "response": "c"}', b'{"messages": [{"role": "user", "content": '
                                                                        b'"%s"}, {"role": "assistant", "content": "c"}]}'])
def test_a_row_that_is_not_utf8_is_skipped_alone(tmp_path, tokenizer, row):
    """Rows are tokenized a batch at a time, and Arrow decodes a batch's text whole: the bad row must still be the
    only one skipped, and named. Messages rows crashed the speaker-name check with a traceback (helper-73)."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\n".join(row % text for text in (b"a", b"\xff", b"d")) + b"\n")
    data = prepare_data(DatasetConfig(name=str(path), on_bad_row="skip"), tokenizer, max_length=64)
    assert len(data.train) == 2 and data.dropped["bad rows"] == 1
    assert data.problems == [f"dataset {path} line 2: not UTF-8 text (invalid start byte at byte 0)"]


def test_a_blank_line_datasets_cannot_read_is_named_with_what_to_do(tmp_path, tokenizer):
    """datasets 5.2 reads a file mixing text and content parts in one field line by line again, and failed on a
    blank line with "Expected object or value"; without the blank line the same rows load."""
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                          {"role": "assistant", "content": "Hello."}]}]
    path = tmp_path / "parts.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    with pytest.raises(DataError, match=re.escape(f"dataset {path} line 2: a blank line, which datasets cannot read "
                                                  "where a field holds text in some rows and content parts")):
        prepare_data(DatasetConfig(name=str(path), test_size=None), tokenizer, max_length=64)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert len(prepare_data(DatasetConfig(name=str(path), test_size=None), tokenizer, max_length=64).train) == 2


def test_every_row_truncated_away_says_which_max_seq_length_fits(tmp_path, tokenizer):
    with pytest.raises(DataError) as error:
        prepare_data(DatasetConfig(name=write_rows(tmp_path, ".jsonl", ROWS)), tokenizer, max_length=4)
    from sftkit.data import tokenize_messages

    rows = [tokenize_messages(tokenizer, to_messages(row, "prompt_response")) for row in ROWS]
    prompts = [next(i for i, label in enumerate(row["labels"]) if label != -100) for row in rows]
    longest = max(len(row["input_ids"]) for row in rows)
    assert str(error.value).endswith(
        f"no row has a trainable token within max_seq_length 4: replies start after at least {min(prompts)} prompt "
        f"tokens and the longest row has {longest} tokens; set model.max_seq_length to {longest} or more to keep "
        "every row whole")


def test_splits_of_local_data(tmp_path, tokenizer):
    import datasets

    path = write_rows(tmp_path, ".jsonl", ROWS)
    with pytest.raises(DataError, match=r"dataset.split: 'test' is not a split of .*rows.jsonl: a local file has one split, train"):
        prepare_data(DatasetConfig(name=path, split="test"), tokenizer, max_length=64)
    with pytest.raises(DataError, match=r"dataset.eval_split: 'test' is not a split .*dataset.test_size"):
        prepare_data(DatasetConfig(name=path, eval_split="test"), tokenizer, max_length=64)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "dev": datasets.Dataset.from_list(ROWS)}).save_to_disk(saved)
    with pytest.raises(DataError, match="dataset.sources\\[1\\].split: 'test' is not a split of .*saved: its splits are train, dev; use one of them"):
        prepare_data(DatasetConfig(sources=[SourceConfig(name=path), SourceConfig(name=str(saved), split="test")]), tokenizer, max_length=64)


def test_weights_that_round_every_row_away_are_clear(tmp_path, tokenizer):
    config = DatasetConfig(sources=[SourceConfig(name=write_rows(tmp_path, ".jsonl", ROWS), weight=0.1)])
    with pytest.raises(DataError, match="the dataset.sources weights leave no train row"):
        prepare_data(config, tokenizer, max_length=64)


def test_training_data_is_tokenized_only_as_far_as_the_trainer_keeps_it(tokenizer):
    from sftkit.config import load_config
    from sftkit.data import prepare_data, prepare_for_training

    config = load_config(None, ["--model.max_seq_length", "24", "--dataset.test_size", "null"])
    cut = prepare_for_training(config.dataset, tokenizer, config.training)
    whole = prepare_data(config.dataset, tokenizer, 24, truncate=False)
    assert max(map(len, cut.train["input_ids"])) < max(map(len, whole.train["input_ids"]))
    for short, full in zip(cut.train, whole.train):  # what trains, the first 24 tokens, is the same
        assert short["input_ids"][:24] == full["input_ids"][:24] and short["labels"][:24] == full["labels"][:24]
    keep_end = load_config(None, ["--model.max_seq_length", "24", "--dataset.test_size", "null",
                                  "--training.truncation_mode", "keep_end"])
    ends = prepare_for_training(keep_end.dataset, tokenizer, keep_end.training)  # whole rows, and every reply trains
    assert len(ends.train) == ends.rows > len(whole.train) and max(map(len, ends.train["input_ids"])) > 24


def test_eval_rows_dropped_are_counted_apart_from_the_train_rows(tmp_path, tokenizer):
    """An eval loss over the rows left is biased (the long ones went): the plan and summary say so."""
    rows = [{"prompt": "Hi", "response": ""}, {"prompt": "Tell me " + "a very long story " * 30, "response": "No."},
            *ROWS]
    evaluation = SourceConfig(name=str(tmp_path / "eval.jsonl"))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DatasetConfig(name=str(SAMPLE_DATA), max_samples=20, eval_sources=[evaluation], on_bad_row="skip")
    data = prepare_data(config, tokenizer, max_length=40)
    assert (len(data.train), len(data.eval)) == (20, len(ROWS))
    assert data.dropped == {"bad rows": 0, "with nothing to train within max_seq_length": 0}
    assert data.eval_dropped == {"bad rows": 1, "with nothing to train within max_seq_length": 1}
    assert data.dropped_words() == ("; dropped from the eval data 1 bad row, 1 with nothing to train within "
                                    "max_seq_length")


@pytest.mark.parametrize(("row", "format_name", "expected"), [
    # named by their column: their rows hold no "message 1" (helper-78)
    ({"instruction": None, "input": "Paris", "output": "France"}, "alpaca", "column 'instruction' is empty"),
    ({"instruction": "Capital?", "input": "", "output": " "}, "alpaca", "column 'output' is empty"),
    ({"question": "Why?", "answer": None, "source": "a book"}, "question_answer", "column 'answer' is empty"),
])
def test_an_empty_instruction_or_answer_is_never_trained_as_the_word_none(row, format_name, expected):
    """They trained "None\\n\\nParis" and "None\\n\\nSource: a book"."""
    with pytest.raises(ValueError, match=re.escape(expected)):
        to_messages(row, format_name, answer_source="append")


def test_a_source_of_0_is_appended():
    row = {"question": "Which page?", "answer": "The first.", "source": 0}
    assert to_messages(row, "question_answer", answer_source="append")[-1]["content"] == "The first.\n\nSource: 0"


def test_sharegpt_weights_on_turns_that_never_train_are_accepted():
    """Datasets that weigh every turn give human turns weight 0: such rows were refused (only replies take a
    weight), every one of them under on_bad_row: skip."""
    row = {"conversations": [{"from": "human", "value": "Hi", "weight": 0}, {"from": "gpt", "value": "Yo", "weight": 1},
                             {"from": "human", "value": "Again", "weight": 0},
                             {"from": "gpt", "value": "No", "weight": 0}]}
    assert to_messages(row, "sharegpt") == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                                            {"role": "user", "content": "Again"},
                                            {"role": "assistant", "content": "No", "weight": 0}]


@pytest.mark.parametrize(("row", "format_name"), [
    ({"system": "From the column.", "conversations": [{"from": "system", "value": "From the turn."},
                                                      {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
     "sharegpt"),
    ({"system": "From the column.", "prompt": [{"role": "system", "content": "From the turn."},
                                               {"role": "user", "content": "Hi"}],
      "completion": [{"role": "assistant", "content": "Yo"}]}, "prompt_completion"),
    ({"system": "From the column.", "messages": [{"role": "system", "content": "From the turn."},
                                                 {"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Yo"}]}, "messages"),
])
def test_a_conversations_own_system_message_is_kept_alone_beside_a_system_column(row, format_name):
    """Both were rendered, two system messages in a row, which most chat templates mishandle."""
    messages = to_messages(row, format_name)
    assert [message["content"] for message in messages if message["role"] == "system"] == ["From the turn."]


def test_a_save_to_disk_folder_is_only_read(tmp_path, tokenizer):
    """datasets writes a map's cache beside the files the rows came from: each run added its tokenized rows to the
    user's dataset folder, and a read-only one (a team's shared copy) failed the run with a traceback."""
    import os
    import subprocess

    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS * 20).save_to_disk(saved)
    before = sorted(path.name for path in saved.iterdir())
    read_only = subprocess.run(["chattr", "+i", str(saved)], capture_output=True, text=True)
    if read_only.returncode:
        if os.environ.get("CI"):
            pytest.fail(f"CI runs as root on a filesystem with chattr: {read_only.stderr}")
        pytest.skip(f"chattr +i needs root and a filesystem that has it: {read_only.stderr}")
    try:
        for processes in (None, 2):
            data = prepare_data(DatasetConfig(name=str(saved), test_size=None), tokenizer, max_length=64,
                                num_proc=processes)
            assert len(data.train) == len(ROWS) * 20
    finally:
        subprocess.run(["chattr", "-i", str(saved)], check=True)
    assert sorted(path.name for path in saved.iterdir()) == before


def test_the_files_pandas_writes_by_default_are_refused_saying_how_to_save_rows(tmp_path, tokenizer):
    """df.to_csv writes the index as a column without a name (Arrow said 'Field "" does not exist in schema'), and
    df.to_json one object of columns (read as one bad row without messages, "fix or remove the row")."""
    import pandas

    frame = pandas.DataFrame(ROWS)
    frame.to_csv(tmp_path / "index.csv")
    frame.to_json(tmp_path / "columns.json")
    index = f"dataset {tmp_path / 'index.csv'}: column 1 of its header has no name (pandas' index, as df.to_csv " \
            "writes it: save with index=False)"
    with pytest.raises(DataError, match=re.escape(index)):
        prepare_data(DatasetConfig(name=str(tmp_path / "index.csv")), tokenizer, max_length=64)
    with pytest.raises(DataError, match=re.escape("as pandas' to_json writes by default; save the rows instead: "
                                                  "df.to_json(path, orient='records', lines=True)")):
        prepare_data(DatasetConfig(name=str(tmp_path / "columns.json")), tokenizer, max_length=64)
    frame.to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    assert len(prepare_data(DatasetConfig(name=str(tmp_path / "rows.jsonl"), test_size=None), tokenizer,
                            max_length=64).train) == len(ROWS)


@pytest.mark.parametrize(("rows", "format_name", "expected"), [
    # each row said "missing column" of itself, with on_bad_row: skip as the way on, which left no row
    ([{"customer_question": "Hi", "agent_reply": "Hello"}], "prompt_response",
     "has the columns ['customer_question', 'agent_reply'], and format prompt_response reads prompt and response, "
     "which it lacks: map them with dataset.column_map: {<your column>: prompt, <your column>: response}"),
    ([{"Prompt": "Hi", "Response": "Hello"}], None,
     "its columns ['Prompt', 'Response'] are named like format prompt_response's in other letter case; map them: "
     "dataset.column_map: {Prompt: prompt, Response: response}"),
    # ShareGPT turns under a messages key, as some hub exports have: "message 0 has no role ... on_bad_row: skip"
    ([{"messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}], None,
     "line 1: message 0 has from and value, as ShareGPT turns do, not role and content; map the column: "
     "column_map: {messages: conversations}"),
    # LLaMA-Factory calls OpenAI's layout "sharegpt": the map said, then its reverse (helper-78)
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}], "sharegpt",
     "has the columns ['messages'], as format messages reads them, and dataset.format sharegpt reads conversations, "
     "which it lacks: leave dataset.format out (the format is told from the columns), or set it to messages"),
])
def test_columns_named_otherwise_are_said_once_with_the_map_that_reads_them(tmp_path, tokenizer, rows, format_name,
                                                                            expected):
    path = write_rows(tmp_path, ".jsonl", rows * 3)
    with pytest.raises(DataError, match=re.escape(expected)) as error:
        prepare_data(DatasetConfig(name=path, format=format_name, test_size=None), tokenizer, max_length=64)
    assert "on_bad_row" not in str(error.value)


def test_openais_developer_role_and_responses_api_text_parts_are_read_as_a_system_message_and_text():
    """Both were refused: the developer role as unknown, input_text and output_text parts as not text."""
    row = {"messages": [{"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
                        {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
                        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello."}]}]}
    assert to_messages(row, "messages") == [{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello."}]
    empty = {"messages": [{"role": "developer", "content": ""}, *row["messages"][1:]]}
    assert [message["role"] for message in to_messages(empty, "messages")] == ["user", "assistant"]


WEATHER = {"name": "get_weather", "description": "The weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
# One tool-calling conversation in each layout that datasets hold it in: they must train alike
TOOL_LAYOUTS = {
    "openai": ("messages", {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "It is 20 degrees."}], "tools": [{"type": "function", "function": WEATHER}]}),
    # arguments as an object, tools as bare schemas and JSON text
    "objects": ("messages", {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather",
                                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "name": "get_weather", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "It is 20 degrees."}], "tools": json.dumps([WEATHER])}),
    # OpenAI's older function calling
    "functions": ("messages", {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather",
                                                                 "arguments": '{"city": "Paris"}'}},
        {"role": "function", "name": "get_weather", "content": '{"temp": 20}'},
        {"role": "assistant", "content": "It is 20 degrees."}], "functions": [WEATHER]}),
    # LLaMA-Factory's ShareGPT (glaive_toolcall)
    "llamafactory": ("sharegpt", {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Paris"}}'},
        {"from": "observation", "value": '{"temp": 20}'},
        {"from": "gpt", "value": "It is 20 degrees."}], "tools": json.dumps([WEATHER])}),
}


@pytest.mark.parametrize("layout", sorted(TOOL_LAYOUTS))
def test_tool_calling_rows_train_alike_in_every_layout(tmp_path, layout):
    """Each layout was refused; now each passes its tools and calls to the chat template, as TRL passes a row's
    tools, and the call trains as the template writes it."""
    from conftest import family_tokenizer

    tokenizer = family_tokenizer("qwen2_5")
    format_name, row = TOOL_LAYOUTS[layout]
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = prepare_data(DatasetConfig(name=str(path), format=format_name, test_size=None), tokenizer, max_length=512)
    tokens = data.train[0]
    assert data.sample_tools == [{"type": "function", "function": WEATHER}]  # the sample replies are asked with them
    assert trained_spans(tokenizer, tokens) == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
        "It is 20 degrees.<|im_end|>"]
    assert tokenizer.decode(tokens["input_ids"]).startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
        f"signatures within <tools></tools> XML tags:\n<tools>\n{json.dumps({'type': 'function', 'function': WEATHER})}"
        "\n</tools>")


def test_keys_arrow_adds_to_a_parquet_files_calls_and_tools_are_left_out(tmp_path):
    """Parquet rows come back as Arrow structs holding every key any row has, null where a row has none: the call
    trained `"query": null` beside its city, and the prompt listed a parameter the tool lacks."""
    import datasets
    from conftest import family_tokenizer

    search = {"name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}
    rows = [{"messages": [{"role": "user", "content": question},
                          {"role": "assistant", "content": "", "tool_calls": [
                              {"type": "function", "function": {"name": tool["name"], "arguments": arguments}}]},
                          {"role": "tool", "content": "done"}, {"role": "assistant", "content": "Done."}],
             "tools": [{"type": "function", "function": tool}]}
            for question, tool, arguments in [("Weather in Paris?", WEATHER, {"city": "Paris"}),
                                              ("Find cats.", search, {"query": "cats"})]]
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "rows.parquet")
    assert datasets.load_dataset("parquet", data_files=str(tmp_path / "rows.parquet"), split="train")[0][
        "messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "query": None}
    tokenizer = family_tokenizer("qwen2_5")
    data = prepare_data(DatasetConfig(name=str(tmp_path / "rows.parquet"), test_size=None), tokenizer,
                        max_length=512)
    assert trained_spans(tokenizer, data.train[0])[0] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
    assert "null" not in tokenizer.decode(data.train[0]["input_ids"])
    # a null written in JSON text is the call's own (an argument cleared), which Arrow never added (helper-75)
    cleared = {"type": "function", "function": {"name": "set_unit", "arguments": '{"city": "Rome", "unit": null}'}}
    messages = to_messages({"messages": [rows[0]["messages"][0], {"role": "assistant", "content": "",
                                                                  "tool_calls": [cleared]}]}, "messages")
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome", "unit": None}


def test_tools_beside_a_format_without_calls_are_refused_and_xlams_layout_is_named(tmp_path, tokenizer):
    """xLAM's rows mapped to question/answer listed the tools in the prompt and trained the answer's calls as text."""
    row = {"id": 1, "query": "Weather in Paris?", "tools": json.dumps([WEATHER]),
           "answers": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'}
    path = tmp_path / "xlam.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match="this is xLAM's \\(APIGen's\\) function-calling layout: convert each row to "
                                        "messages, its answers to the assistant message's tool_calls"):
        prepare_data(DatasetConfig(name=str(path)), tokenizer, max_length=512)
    mapped = SourceConfig(name=str(path), column_map={"query": "question", "answers": "answer"})
    with pytest.raises(DataError, match="line 1: the row has tools, but format question_answer has no tool calls"):
        prepare_data(DatasetConfig(sources=[mapped], test_size=None), tokenizer, max_length=512)


@pytest.mark.parametrize(("format_name", "row"), [
    ("messages", {"messages": [{"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4.", "reasoning_content": "Two and two."}]}),
    ("messages", {"messages": [{"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4.", "thinking": "Two and two."}]}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "2+2?"},
                                    {"from": "gpt", "value": "4.", "reasoning": "Two and two."}]}),
    ("prompt_response", {"prompt": "2+2?", "response": "4.", "reasoning_content": "Two and two."}),
    ("question_answer", {"question": "2+2?", "answer": "4.", "thinking": "Two and two."}),
])
def test_a_replys_reasoning_trains_with_it_whatever_the_layout_names_it(tmp_path, format_name, row):
    """Reasoning on a message or in a column beside a single reply was refused: it goes to the template now."""
    from conftest import family_tokenizer

    tokenizer = family_tokenizer("qwen3")
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = prepare_data(DatasetConfig(name=str(path), format=format_name, test_size=None), tokenizer, max_length=64)
    assert trained_spans(tokenizer, data.train[0]) == ["<think>\nTwo and two.\n</think>\n\n4.<|im_end|>"]


def test_a_reasoning_switch_is_no_reasoning(tmp_path):
    """Llama-Nemotron's rows say `reasoning: "on"` or "off" beside the reply (which holds its own <think> block when
    on): "off" trained as the reasoning text, "on" rows were refused, and so was every row of its messages layout."""
    from conftest import family_tokenizer

    tokenizer = family_tokenizer("qwen3")
    rows = [{"input": "Capital of France?", "output": "Paris.", "reasoning": "off"},
            {"input": "2+3?", "output": "<think>\nTwo plus three.\n</think>\n\n5.", "reasoning": "on"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    source = SourceConfig(name=str(path), column_map={"input": "prompt", "output": "response"})
    data = prepare_data(DatasetConfig(sources=[source], test_size=None), tokenizer, max_length=64)
    assert [trained_spans(tokenizer, row) for row in data.train] == [
        ["<think>\n\n</think>\n\nParis.<|im_end|>"], ["<think>\nTwo plus three.\n</think>\n\n5.<|im_end|>"]]
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "reasoning": "off"}
    assert to_messages(chat, "messages") == chat["messages"]
