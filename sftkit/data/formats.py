"""Every supported row format -> a list of {"role", "content"} chat messages, the one internal format.

`text` is the exception: plain language-model data is not a conversation, so its rows stay text and every token
trains (see tokenize.tokenize_text).
"""

import json

from sftkit.errors import DataError

ROLES = ("system", "user", "assistant", "tool")
# A reply's reasoning, passed to the chat template as reasoning_content (transformers gives gpt-oss's its
# `thinking`): the names datasets give it, on a message or (beside a single reply) as a column
REASONING = ("reasoning_content", "reasoning", "thinking")
# What Llama-Nemotron's data (and others') hold there instead: a switch saying whether the reply reasons, not text
REASONING_SWITCHES = ("on", "off", "true", "false", "yes", "no")
# What a message holds for a tool call, passed to the chat template: an assistant's calls (OpenAI's tool_calls, or
# its older function_call) and the id of the call a tool message answers.
CALL_KEYS = ("tool_calls", "function_call", "tool_call_id")
# The row's tool definitions: OpenAI's tools, or its older functions
TOOL_COLUMNS = ("tools", "functions")
# Other tools' per-turn training switches (Axolotl's `training`/`train`), read as sftkit's weight
OTHER_SWITCHES = ("train", "training", "trainable")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant",
                  "tool": "tool", "observation": "tool"}


class RowDefect(ValueError):
    """A row with nothing to train, or a message without a role or text: a defect of that row alone, whose error
    suggests dataset.on_bad_row: skip. (skip leaves out every row that fails, but a format or role names to map,
    which every row shares, are better fixed in the config: their error does not suggest it.)"""


def from_messages(row: dict, answer_source: str) -> list[dict]:
    """OpenAI / ChatML: {"messages": [{"role": ..., "content": ...}, ...], optional "system"} (Anthropic's layout)."""
    messages = _as_list(row["messages"])
    return _system(row, messages) + messages


def from_sharegpt(row: dict, answer_source: str) -> list[dict]:
    """ShareGPT: {"conversations": [{"from": "human" | "gpt" | "system", "value": ...}, ...], optional "system"}; a
    reply's weight is a message's (other turns never train, and datasets that weigh every turn give them 0)."""
    messages = []
    for index, turn in enumerate(_as_list(row["conversations"])):
        if isinstance(turn, dict) and "from" not in turn and "role" in turn:
            raise ValueError(f"turn {index} has role and content, as OpenAI messages do, not ShareGPT's from and "
                             "value; map the column: column_map: {conversations: messages}")
        if not isinstance(turn, dict):
            raise ValueError(f"turn {index} is a {type(turn).__name__}, not a mapping with from and value"
                             f"{_nested_hint(turn)}")
        if turn.get("from") == "function_call":  # LLaMA-Factory's tool call turn: its value is the call's JSON
            calls = _parsed(turn.get("value"), f"turn {index} (function_call)'s value")  # named as the data has it
            messages.append({"role": "assistant", "content": "", "tool_calls": calls, "weight": turn.get("weight")})
            continue
        if turn.get("from") not in SHAREGPT_ROLES:
            raise ValueError(f"turn {index} has from={turn.get('from')!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        role = SHAREGPT_ROLES[turn["from"]]
        switches = {key: turn[key] for key in (*OTHER_SWITCHES, *REASONING, *CALL_KEYS) if turn.get(key) is not None}
        messages.append({"role": role, "content": turn.get("value"), **switches,
                         **({"weight": turn.get("weight")} if role == "assistant" else {})})
    return _system(row, messages) + messages


def from_prompt_response(row: dict, answer_source: str) -> list[dict]:
    """{"prompt", "response"} or TRL's {"prompt", "completion"}, each a string or a list of messages, optional
    "system". Only the response trains: assistant turns inside a conversational prompt get weight 0, as TRL trains the
    completion."""
    answer = "response" if "response" in row else "completion"
    prompt = [{**turn, "weight": 0} if isinstance(turn, dict) and turn.get("role") == "assistant" else turn
              for turn in _as_turns(row, "prompt", "user")]
    return _system(row, prompt) + prompt + _as_turns(row, answer, "assistant")


def from_question_answer(row: dict, answer_source: str) -> list[dict]:
    """{"question", "answer", optional "source" and "system"}; the source is dropped or appended to the answer."""
    answer, source = _filled(row, "answer"), _text(row.get("source"))
    if answer_source == "append" and _written(answer) and _written(source):  # an empty answer is refused as it is
        answer = f"{answer}\n\nSource: {source}"
    return [*_system(row), {"role": "user", "content": _filled(row, "question")},
            {"role": "assistant", "content": answer}]


def from_alpaca(row: dict, answer_source: str) -> list[dict]:
    """Alpaca: {"instruction", optional "input", "output", optional "system"}; the input follows the instruction in
    the user turn. LLaMA-Factory's optional "history", [[instruction, response], ...], is the turns before it."""
    instruction, extra = _filled(row, "instruction"), _text(row.get("input"))
    if _written(extra):
        instruction = f"{instruction}\n\n{extra}"
    return [*_system(row), *_history(row.get("history")), {"role": "user", "content": instruction},
            {"role": "assistant", "content": _filled(row, "output")}]


def _history(pairs) -> list[dict]:
    if pairs is None or pairs == []:
        return []
    if not isinstance(pairs, list):  # a CSV's cell holds text
        raise ValueError(f"history is {type(pairs).__name__} {pairs!r:.60}; expected a list of [instruction, response] "
                         "pairs (save the rows as JSON Lines to keep it a list)")
    turns = []
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"history[{index}] is {pair!r}; expected a pair [instruction, response]")
        turns += [{"role": "user", "content": _text(pair[0])}, {"role": "assistant", "content": _text(pair[1])}]
    return turns


FORMATS = {
    "messages": from_messages,
    "sharegpt": from_sharegpt,
    "prompt_response": from_prompt_response,
    "prompt_completion": from_prompt_response,
    "question_answer": from_question_answer,
    "alpaca": from_alpaca,
}
# What each format reads of a row: columns and message keys.
MESSAGE_KEYS = {"role", "content", "weight"}
READS = {
    "messages": {"messages", "system", *MESSAGE_KEYS},
    "sharegpt": {"conversations", "from", "value", "weight", "system"},
    "prompt_response": {"prompt", "response", "system", *MESSAGE_KEYS},
    "prompt_completion": {"prompt", "completion", "system", *MESSAGE_KEYS},
    "question_answer": {"question", "answer", "source", "system"},
    "alpaca": {"instruction", "input", "output", "system", "history"},
    "text": {"text"},
}
# Columns that identify each format, most specific first.
SIGNATURES = [
    ("messages", {"messages"}),
    ("sharegpt", {"conversations"}),
    ("alpaca", {"instruction", "output"}),
    ("question_answer", {"question", "answer"}),
    ("prompt_response", {"prompt", "response"}),
    ("prompt_completion", {"prompt", "completion"}),
    ("text", {"text"}),
]


def detect_format(columns: list[str], source: str) -> str:
    for name, required in SIGNATURES:
        if required <= set(columns):
            return name
    for name, required in SIGNATURES:  # headers written Prompt, Response
        if renames := _renames_by_case(columns, required):
            raise DataError(f"{source}: its columns {columns} are named like format {name}'s in other letter case; "
                            f"map them: dataset.column_map: {as_yaml(renames)}")
    separator = next((mark for mark in (";", "\t", "|") if len(columns) == 1 and mark in columns[0]), None)
    if separator:  # a CSV saved with Excel's European default, or tab-separated under a .csv name
        raise DataError(f"{source}: its one column {columns[0]!r} looks like columns separated by {separator!r}; "
                        "save the file comma-separated (CSV) or as JSON Lines")
    if len(columns) == 1:  # a JSON document {"data": [rows]} reads as one row of one column
        raise DataError(f"{source}: cannot tell the dataset format from its one column {columns[0]!r}; if it is a "
                        f"JSON document with the rows under that key ({{\"{columns[0]}\": [rows]}}), save the rows "
                        "themselves as a JSON list or as JSON Lines; else rename columns with column_map")
    hint = next((hint for required, hint in OTHER_LAYOUTS if required <= set(columns)), "")
    raise DataError(
        f"{source}: cannot tell the dataset format from its columns {columns}; {hint}set its format to one of "
        f"{', '.join(name for name, _ in SIGNATURES)}, or rename columns with column_map"
    )


def refuse_missing_columns(columns: list[str], format_name: str, source: str) -> None:
    """A format given in the config whose columns the source lacks: said once, with its columns and the map that
    would read them (each row said 'missing column' of itself, and on_bad_row: skip left none)."""
    required = dict(SIGNATURES)[format_name]
    missing = sorted(required - set(columns))
    if not missing:
        return
    renames = _renames_by_case(columns, required)
    fits = next((name for name, needs in SIGNATURES if needs <= set(columns)), None)
    if not renames and fits is not None:  # LLaMA-Factory calls OpenAI's messages "sharegpt": mapping went in circles
        raise DataError(f"{source} has the columns {columns}, as format {fits} reads them, and dataset.format "
                        f"{format_name} reads {' and '.join(missing)}, which it lacks: leave dataset.format out (the "
                        f"format is told from the columns), or set it to {fits}")
    others = [column for column in columns if column not in required]
    if not renames and len(others) == len(missing) == 1:
        renames = {others[0]: missing[0]}
    example = as_yaml(renames) if renames else "{" + ", ".join(f"<your column>: {name}" for name in missing) + "}"
    raise DataError(f"{source} has the columns {columns}, and format {format_name} reads {' and '.join(missing)}, "
                    f"which it lacks: map them with dataset.column_map: {example}")


def _renames_by_case(columns: list[str], required: set[str]) -> dict[str, str] | None:
    """{Prompt: prompt, ...} where the columns hold every required one in other letter case; else None."""
    lowered = {column.lower(): column for column in columns}
    if not required <= lowered.keys():
        return None
    renames = {lowered[name]: name for name in sorted(required) if lowered[name] != name}
    return renames or None


def as_yaml(mapping: dict[str, str]) -> str:
    return "{" + ", ".join(f"{old}: {new}" for old, new in mapping.items()) + "}"


# Well-known layouts of other kinds of data, and how to train on them as SFT rows
OTHER_LAYOUTS = [
    ({"chosen", "rejected"}, "these are preference pairs (DPO): to train on the chosen replies, map chosen to "
                              "messages where it holds the whole conversation (column_map: {chosen: messages}), or to "
                              "completion beside a prompt column ({chosen: completion}); else "),
    ({"instruction", "context", "response"}, "this is Dolly's layout: give column_map: {context: input, response: "
                                              "output} to read it as alpaca; else "),
    ({"query", "answers", "tools"}, "this is xLAM's (APIGen's) function-calling layout: convert each row to messages, "
                                    "its answers to the assistant message's tool_calls, and keep tools beside them; "
                                    "else "),
]


def to_messages(row: dict, format_name: str, system_prompt: str | None = None, answer_source: str = "drop"):
    """Convert one row and validate it. Raises ValueError saying what is wrong with the row."""
    columns = dict(SIGNATURES)[format_name]
    held = [column for column, value in row.items() if value is not None]
    if held and columns <= row.keys() and not columns & set(held):  # datasets fills the columns of other rows with None
        raise ValueError(f"the row has no {' or '.join(sorted(columns))} column but has the columns {', '.join(held)}, "
                         f"while the source is read as {format_name} rows; if the file mixes formats, split it into "
                         "files of one format each, listed in dataset.sources; else fix the row, or set "
                         "dataset.on_bad_row: skip")
    try:
        messages = FORMATS[format_name](row, answer_source)
    except KeyError as missing:
        raise ValueError(f"missing column {missing} for format {format_name!r}") from None
    messages = _with_reasoning_column(row, format_name, _as_list(messages))
    checked = [(index, _check_message(message, index)) for index, message in enumerate(messages)
               if not _empty_system(message)]  # common in ShareGPT dumps ("system": ""): no system prompt
    _refuse_calls_without_results(checked)
    messages = _results_in_call_order([message for _, message in checked])
    if not any(message["role"] == "assistant" for message in messages):
        raise RowDefect("no assistant message: there is nothing to train on")
    if not any(trains(message) for message in messages):
        raise RowDefect("every assistant message has weight 0: there is nothing to train on")
    return with_system(messages, system_prompt)


def _refuse_calls_without_results(checked: list[tuple[int, dict]]) -> None:
    """A call answered by the assistant itself, with no tool message between: the reply after it would learn to
    make the tool's result up. (A row may end at a call: the call is what trains; parallel calls may be written as
    consecutive assistant messages, their results after the last.)"""
    for (index, message), (_, following) in zip(checked, checked[1:]):
        if message.get("tool_calls") and following["role"] == "assistant" and not following.get("tool_calls"):
            raise RowDefect(f"message {index} (assistant) calls {message['tool_calls'][0]['function']['name']}, and "
                            f"the next message is the assistant's, with no tool result between: the model would learn "
                            "to make the result up; add the tool's result after the call, or end the row at the call")


def _results_in_call_order(messages: list[dict]) -> list[dict]:
    """Tool results put in the order of the calls they answer (by tool_call_id), where the data logs them as they
    finished: templates without ids (Qwen's, Llama's) pair a result with the call at its position, and a reply
    trained on "Rome 21, Oslo 3" read Oslo's 21 in its prompt (helper-75)."""
    ordered = list(messages)
    for index, message in enumerate(messages):
        ids = [call.get("id") for call in message.get("tool_calls", [])]
        if len(ids) < 2:
            continue
        end = index + 1
        while end < len(messages) and messages[end]["role"] == "tool":
            end += 1
        answered = [result.get("tool_call_id") for result in messages[index + 1 : end]]
        known = None not in ids + answered and len(set(ids)) == len(ids)
        if known and sorted(answered) == sorted(ids):
            ordered[index + 1 : end] = sorted(messages[index + 1 : end],
                                              key=lambda result: ids.index(result["tool_call_id"]))
    return ordered


def _with_reasoning_column(row: dict, format_name: str, messages: list) -> list:
    """A row's reasoning column as the reasoning of its reply: the last message of a prompt/response, question/answer
    or Alpaca row. A conversation may hold several replies, so its reasoning goes on the message it belongs to."""
    held = next((key for key in REASONING if _reasoning_text(row.get(key))), None)
    if held is None:
        return messages
    if not isinstance(row[held], str):
        raise RowDefect(f"the row's {held} column holds a {type(row[held]).__name__}, expected the reply's reasoning "
                        "as text")
    if format_name in ("messages", "sharegpt") or not isinstance(messages[-1], dict):
        raise RowDefect(f"the row has a {held} column, but a conversation may hold several replies; put the reasoning "
                        f"on the assistant message it belongs to (its {held} key)")
    return [*messages[:-1], {**messages[-1], held: row[held]}]


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """The messages with system_prompt first, unless it is empty or they begin with a system message already."""
    if system_prompt and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system_prompt}, *messages]
    return list(messages)


def to_text(row: dict) -> str:
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        raise RowDefect("the text column is missing or empty")
    return text


def _system(row: dict, then: list | None = None) -> list[dict]:
    """A row's own system column, as its first message: it wins over dataset.system_prompt (see with_system). A
    conversation `then` that opens with a system message of its own keeps that one alone."""
    message = {"role": "system", "content": row.get("system")}
    opens_with_system = bool(then) and isinstance(then[0], dict) and then[0].get("role") == "system"
    return [] if _empty_system(message) or opens_with_system else [message]


def _text(value):
    """A number in a text column (JSON 4, a parquet int column) as its text; anything else is checked as content."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _filled(row: dict, column: str):
    """A column of a one-turn format (Alpaca's output), named where it is empty: its rows hold no message 1."""
    value = _text(row[column])
    if value is None or isinstance(value, str) and not value.strip():
        raise RowDefect(f"column {column!r} is empty")
    return value


def _written(value) -> bool:
    """Text with something in it (0 is; None and blanks are not)."""
    return isinstance(value, str) and bool(value.strip())


def _as_turns(row: dict, column: str, role: str) -> list[dict]:
    value = _filled(row, column)  # None: an empty CSV cell, or a missing key in some JSON rows
    return [{"role": role, "content": value}] if isinstance(value, str) else _as_list(value)


def _as_list(messages) -> list:
    if isinstance(messages, str) and messages.lstrip().startswith("["):  # a CSV's or a database export's cell
        raise ValueError("expected a list of messages, got text that looks like a JSON list of them; parse it into a "
                         "list (json.loads) and save the rows as JSON Lines")
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if isinstance(messages, list) else type(messages).__name__
        raise RowDefect(f"expected a non-empty list of messages, got {got}")
    return messages


def _nested_hint(turn) -> str:
    """A JSON document {"conversations": [[...], [...]]} reads as one row whose turns are whole conversations."""
    if not (isinstance(turn, list) and turn and isinstance(turn[0], dict)):
        return ""
    return ("; a list of conversations under one key of a JSON document reads as a single row: save each "
            "conversation as a row of JSON Lines")


def _empty_system(message) -> bool:
    if not isinstance(message, dict) or message.get("role") not in ("system", "developer"):
        return False
    content = message.get("content")
    if isinstance(content, list):
        try:
            content = _joined_text_parts(content, 0, "system")
        except RowDefect:
            return False  # refused by _check_message, as any message's parts
    return content is None or (isinstance(content, str) and not content.strip())  # other types: _check_message


def _check_message(message, index: int) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"message {index} is a {type(message).__name__}, not a mapping with role and content"
                         f"{_nested_hint(message)}")
    if "role" not in message and {"from", "value"} <= message.keys():  # every row is so: not a row's defect
        raise ValueError(f"message {index} has from and value, as ShareGPT turns do, not role and content; map the "
                         "column: column_map: {messages: conversations}")
    if "role" not in message and message.get("type") in ("reasoning", "function_call", "function_call_output"):
        raise RowDefect(f"message {index} is a Responses API {message['type']} item, which sftkit does not pass to the "
                        "chat template yet (the turns would train without it)")
    if "role" not in message:
        raise RowDefect(f"message {index} has no role")
    # OpenAI's name for the system message, with its o1 and later models
    role, content = "system" if message["role"] == "developer" else message["role"], message.get("content")
    role = "tool" if role == "function" else role  # OpenAI's older name for a tool's result
    if role not in ROLES:
        mapped = f" (ShareGPT's name for {SHAREGPT_ROLES[role]}: rename it)" if role in SHAREGPT_ROLES else ""
        raise ValueError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}{mapped}")
    calls = _tool_calls(message, index, role)
    if isinstance(content, list):
        content = _joined_text_parts(content, index, role)
    if content is not None and not isinstance(content, str):
        encode = " (a tool's result as an object: write it as JSON text)" if role == "tool" and isinstance(
            content, (dict, list)) else ""
        raise ValueError(f"message {index} ({role}) has content of type {type(content).__name__}, expected "
                         f"text{encode}")
    if not content or not content.strip():
        if role != "tool" and not calls:  # a tool's empty result is a command that printed nothing
            raise RowDefect(f"message {index} ({role}) has empty content")
        content = ""
    if role == "assistant" and content.count("<think>") > content.count("</think>"):
        raise RowDefect(f"message {index} ({role}) opens a reasoning block (<think>) it never closes (a trace cut "
                        "at its length limit): the model would learn to end its turn mid-thought")
    reasoning = _reasoning(message, index, role, content)
    checked = {"role": role, "content": content, **({"reasoning_content": reasoning} if reasoning else {}),
               **({"tool_calls": calls} if calls else {}), **_answered_call(message)}
    weight = _weight(message, index, role)
    if weight is None or (weight == 1 and role == "assistant"):
        return checked
    if role != "assistant" and weight == 0 and not isinstance(weight, bool):  # as loss_on assistant trains it anyway
        return {**checked, "weight": 0}
    if role != "assistant":
        raise ValueError(f"message {index} ({role}) has weight {weight!r}, but only assistant messages train (every "
                         "token does with dataset.loss_on: all); remove it, or give 0")
    if weight != 0 or isinstance(weight, bool):
        raise ValueError(f"message {index} ({role}) has weight {weight!r}; a weight is the number 0 (not trained) or "
                         "1")
    return {**checked, "weight": 0}


def _reasoning(message: dict, index: int, role: str, content: str) -> str | None:
    held = [key for key in REASONING if _reasoning_text(message.get(key))]
    if not held:
        return None
    reasoning = message[held[0]]
    if role != "assistant":
        raise RowDefect(f"message {index} ({role}) has {held[0]}, but only assistant messages reason")
    if not isinstance(reasoning, str):
        raise RowDefect(f"message {index} ({role}) has {held[0]} of type {type(reasoning).__name__}, expected text")
    if any(message[key] != reasoning for key in held[1:]):
        raise RowDefect(f"message {index} ({role}) has both {held[0]} and {held[1]}, which differ; keep one")
    if "<think>" in content:
        raise RowDefect(f"message {index} ({role}) has reasoning both in {held[0]} and in its content "
                        "(<think>...); keep one")
    if "<think>" in reasoning or "</think>" in reasoning:
        raise RowDefect(f"message {index} ({role}) has {held[0]} that holds a <think> or </think> tag, which would "
                        "open or close the reasoning block where the template writes it; remove the tag")
    return reasoning.strip()


def _reasoning_text(value) -> bool:
    """Whether a reasoning field holds reasoning: not empty, nor a switch ("on", true) that says whether the reply
    reasons (Llama-Nemotron's `reasoning`), which is not trained."""
    if isinstance(value, bool) or (isinstance(value, str) and value.strip().lower() in REASONING_SWITCHES):
        return False
    return _holds(value)


def tools_of(row: dict, format_name: str) -> list[dict] | None:
    """The row's tool definitions, each as {"type": "function", "function": {name, description, parameters}}, the
    shape chat templates read; None where it has none."""
    column = next((column for column in TOOL_COLUMNS if _holds(row.get(column))), None)
    if column is None:
        return None
    if format_name in ("question_answer", "alpaca"):
        raise RowDefect(f"the row has {column}, but format {format_name} has no tool calls: its answer would train as "
                        "text after a prompt that lists the tools; write the rows as messages whose assistant "
                        "messages hold tool_calls")
    tools = _parsed(row[column], f"the row's {column}")
    if not isinstance(tools, list):
        tools = [tools]
    return [_function(tool, f"{column}[{number}]") for number, tool in enumerate(tools)]


def _function(tool, where: str) -> dict:
    """OpenAI's {"type": "function", "function": schema}, or the bare schema (its older `functions`, Glaive's and
    LLaMA-Factory's tools), as the former."""
    schema = tool.get("function") if isinstance(tool, dict) and "function" in tool else tool
    if not (isinstance(schema, dict) and isinstance(schema.get("name"), str) and schema["name"].strip()):
        raise RowDefect(f"{where} is not a function definition with a name ({{name, description, parameters}}, or "
                        f"{{type: function, function: {{name, ...}}}}): {tool!r:.80}")
    return {"type": "function", "function": _without_nulls(schema)}


def _tool_calls(message: dict, index: int, role: str) -> list[dict]:
    """The message's tool calls, each as {"type": "function", "function": {"name", "arguments"}} with its id."""
    given = [key for key in ("tool_calls", "function_call") if _holds(message.get(key))]
    if not given:
        return []
    if role != "assistant":
        raise RowDefect(f"message {index} ({role}) has {given[0]}, but only assistant messages call tools")
    calls = _parsed(message[given[0]], f"message {index} ({role})'s {given[0]}")
    return [_call(call, f"message {index} ({role}): tool call {number}")
            for number, call in enumerate(calls if isinstance(calls, list) else [calls])]


def _call(call, where: str) -> dict:
    function = call.get("function", call) if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name.strip():
        raise RowDefect(f"{where} has no function name: {call!r:.80}")
    # Arguments as an object, whichever way the data holds them: templates write them with tojson (Qwen2.5's,
    # Llama 3.1's), which would quote a JSON text again. Llama's own data names them parameters.
    given = function.get("arguments", function.get("parameters"))
    arguments = _parsed(given, f"{where} ({name})'s arguments") if given not in (None, "") else {}
    if isinstance(arguments, str) and isinstance(_parsed_or_none(arguments), dict):
        raise RowDefect(f"{where} ({name})'s arguments are JSON text of JSON text (encoded twice): {arguments!r:.60}; "
                        "encode them once")
    if not isinstance(arguments, dict):
        raise RowDefect(f"{where} ({name}) has arguments {arguments!r:.60}; expected an object of named arguments")
    found_id = call.get("id")
    # nulls in JSON text were written on purpose (an argument set to null); Arrow adds them only to objects
    return {**({"id": found_id} if isinstance(found_id, str) and found_id else {}), "type": "function",
            "function": {"name": name, "arguments": arguments if isinstance(given, str) else _without_nulls(arguments)}}


def _without_nulls(value):
    """An object without its keys whose value is null, at every depth. datasets reads Parquet (and most hub data)
    into Arrow structs that give every row each key any row has, null where it has none: a call trained to pass every
    argument the dataset names, and the prompt listed parameters its tool lacks. A null the data meant (an argument
    left unset, a schema's default: null) says no more than the key left out."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def _answered_call(message: dict) -> dict:
    """A tool message's tool_call_id and name (its function's), which some templates render (Mistral's ids)."""
    return {key: message[key] for key in ("tool_call_id", "name")
            if message.get("role") in ("tool", "function") and isinstance(message.get(key), str)}


def _parsed_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _parsed(value, what: str):
    """A value that datasets or the data's author may hold as JSON text."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        raise RowDefect(f"{what} is text that is not JSON: {value!r:.60}") from None


def _weight(message: dict, index: int, role: str):
    """The message's weight, or what another tool's per-turn switch says (Axolotl's `training: false` on a reply is
    weight 0): read as nothing, the turn trained whatever it said."""
    weight = message.get("weight")
    switch = next((key for key in OTHER_SWITCHES if message.get(key) is not None), None)
    if switch is None:
        return weight
    value = message[switch]
    if not isinstance(value, bool):
        raise ValueError(f"message {index} ({role}) has {switch} {value!r}; give true or false (or sftkit's weight, "
                         "0 or 1)")
    if value and role != "assistant":
        raise ValueError(f"message {index} ({role}) has {switch} true, but only assistant messages train (every "
                         "token does with dataset.loss_on: all)")
    return 0 if role == "assistant" and not value else weight


TEXT_PARTS = ("text", "input_text", "output_text")  # Chat Completions', and the Responses API's


def _joined_text_parts(parts: list, index: int, role: str) -> str:
    """OpenAI's content parts, [{"type": "text", "text": ...}, ...], as one text: joined as the API and the chat
    templates that take parts (Llama 3.2 Vision, Gemma 3) join them, with nothing between. A part of another kind (an
    image) is refused: sftkit trains on text."""
    texts = []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            what = f"a part of type {kind!r}" if kind else \
                f"a part that is not {{type: text, text: ...}} ({part!r:.60})"
            raise RowDefect(f"message {index} ({role}) has {what}, and sftkit trains on text only")
        text = part.get("text")
        if not isinstance(text, (str, type(None))):
            raise RowDefect(f"message {index} ({role}) has a text part whose text is a {type(text).__name__}")
        texts.append(text or "")
    return "".join(texts)


def _holds(value) -> bool:
    """Whether a tools or tool_calls value holds anything: datasets fills keys other rows have with None, and some
    datasets store them as JSON text ("[]")."""
    return bool(value.strip() not in ("", "[]", "{}", "null") if isinstance(value, str) else value)


def trains(message: dict) -> bool:
    """An assistant message trains unless its weight is 0 (OpenAI's fine-tuning format; a missing weight is read
    back as None from a dataset where other rows have one)."""
    return message["role"] == "assistant" and message.get("weight") != 0


def split_at_user_turns(messages: list[dict]) -> list[list[dict]]:
    """dataset.split_user_turns: a conversation for each user turn whose replies train, the messages up to the next
    user turn, the replies before it kept as context (weight 0). Thinking models' templates drop the reasoning of
    the turns before the last user message (Qwen3's) or mark the turns after it (Qwen3.6's), so only those turns can
    train as the model will see them; Qwen's team advises training such conversations in these pieces."""
    starts = [0] + [index for index, message in enumerate(messages) if message["role"] == "user"][1:]
    pieces = []
    for start, end in zip(starts, [*starts[1:], len(messages)]):
        if any(trains(message) for message in messages[start:end]):
            pieces.append([{**message, "weight": 0} if index < start and trains(message) else message
                           for index, message in enumerate(messages[:end])])
    return pieces or [messages]
