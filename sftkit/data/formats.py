"""Every supported row format -> a list of {"role", "content"} chat messages, the one internal format."""

from sftkit.config import ConfigError

ROLES = ("system", "user", "assistant", "tool")


class DataError(ConfigError):
    """A row that cannot be turned into a valid conversation."""


def from_messages(row: dict) -> list[dict]:
    """OpenAI / ChatML: {"messages": [{"role": ..., "content": ...}, ...]}."""
    return row["messages"]


def from_prompt_response(row: dict) -> list[dict]:
    """{"prompt", "response"} or TRL's {"prompt", "completion"}, each a string or a list of messages."""
    prompt = _as_turns(row["prompt"], "user")
    return prompt + _as_turns(row["response"] if "response" in row else row["completion"], "assistant")


FORMATS = {"messages": from_messages, "prompt_response": from_prompt_response}


def detect_format(columns: list[str]) -> str:
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and ("response" in columns or "completion" in columns):
        return "prompt_response"
    raise DataError(
        f"cannot tell the dataset format from its columns {columns}; "
        f"set dataset.format to one of {', '.join(FORMATS)}"
    )


def to_messages(row: dict, format_name: str, system_prompt: str | None = None) -> list[dict]:
    """Convert one row and validate it. Raises ValueError saying what is wrong with the row."""
    try:
        messages = FORMATS[format_name](row)
    except KeyError as missing:
        raise ValueError(f"missing column {missing} for format {format_name!r}") from None
    messages = [_check_message(message, index) for index, message in enumerate(_as_list(messages))]
    if not any(message["role"] == "assistant" for message in messages):
        raise ValueError("no assistant message: there is nothing to train on")
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _as_turns(value, role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else _as_list(value)


def _as_list(messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"expected a non-empty list of messages, got {type(messages).__name__}")
    return messages


def _check_message(message, index: int) -> dict:
    if not isinstance(message, dict):
        raise ValueError(f"message {index} is a {type(message).__name__}, not a mapping with role and content")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise ValueError(f"message {index} has role {role!r}; expected one of {', '.join(ROLES)}")
    if not isinstance(content, str) or not content.strip():
        raise ValueError(f"message {index} ({role}) has no text content")
    return {"role": role, "content": content}
