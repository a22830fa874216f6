"""Chat messages -> input_ids + labels, rendered by the tokenizer's own chat template.

Which tokens train is derived from token prefixes, not from `{% generation %}` markers (few templates have them)
and not from searching the rendered text: the conversation is rendered up to each assistant turn (with the
generation prompt) and through it, and both renderings must tokenize to a prefix of the whole conversation. The
tokens in between are the turn's content and its closing tokens; training stops at the last special token among
them (the end-of-turn), so the model learns to stop and the whitespace a template puts after a turn stays masked.
"""

import jinja2

IGNORE_INDEX = -100

# For a tokenizer that has no chat template. The model's own eos token closes every turn, so no token has to be
# added to the vocabulary and a model that learns this format stops generating where it should.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class MaskError(ValueError):
    """The chat template does not allow an exact assistant mask for this conversation."""


def tokenize_messages(tokenizer, messages: list[dict], loss_on: str = "assistant") -> dict:
    """Tokenize a conversation; labels are -100 except on the trained tokens.

    loss_on: "assistant" trains every assistant turn, "last_assistant" only the last one, "all" every token.
    """
    input_ids = _render(tokenizer, messages)
    if loss_on == "all":
        return {"input_ids": input_ids, "labels": list(input_ids)}
    turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if loss_on == "last_assistant":
        turns = turns[-1:]
    special_ids = set(tokenizer.all_special_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    for turn in turns:
        start = _prefix_length(tokenizer, messages[:turn], input_ids, add_generation_prompt=True)
        end = _prefix_length(tokenizer, messages[: turn + 1], input_ids)
        end = _end_of_turn(tokenizer, input_ids, start, end, special_ids)
        labels[start:end] = input_ids[start:end]
    return {"input_ids": input_ids, "labels": labels}


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        raise MaskError(f"the chat template of {tokenizer.name_or_path} rejected the conversation: {error}") from None
    # The template writes any bos token itself; adding special tokens here would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prefix_length(tokenizer, messages: list[dict], full_ids: list[int], add_generation_prompt: bool = False) -> int:
    prefix = _render(tokenizer, messages, add_generation_prompt)
    if full_ids[: len(prefix)] != prefix:
        raise MaskError(
            f"the chat template of {tokenizer.name_or_path} renders the first {len(messages)} messages differently "
            "from the same messages inside the whole conversation, so the assistant tokens cannot be told apart "
            "exactly; set dataset.chat_template to a template that renders earlier turns unchanged"
        )
    return len(prefix)


def _end_of_turn(tokenizer, input_ids: list[int], start: int, end: int, special_ids: set[int]) -> int:
    """One past the last special token of the turn: content plus end-of-turn train, trailing whitespace does not."""
    for position in range(end - 1, start - 1, -1):
        if input_ids[position] in special_ids:
            return position + 1
    raise MaskError(
        f"the chat template of {tokenizer.name_or_path} ends an assistant turn without a special token "
        f"(it renders as {tokenizer.decode(input_ids[start:end])!r}), so the model could not learn to stop; "
        "set dataset.chat_template to a template that closes assistant turns with the eos or an end-of-turn token"
    )
