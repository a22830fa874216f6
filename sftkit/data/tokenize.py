"""Chat messages -> input_ids + labels, rendered by the tokenizer's own chat template.

Which tokens train is derived from token prefixes, not from `{% generation %}` markers (few templates have them)
and not from searching the rendered text. For each assistant turn the conversation is rendered twice more:
- up to the turn, with the generation prompt: it must tokenize to an exact prefix of the whole conversation, and
  the turn starts where it ends (exactly where a model's reply starts at inference);
- through the turn: where it stops matching the whole conversation bounds the turn, and the turn ends at its last
  special token before that point (the end-of-turn token), so the model learns to stop, while whitespace after it
  stays masked. What the through-rendering has after that token may only be whitespace or special tokens (Phi-3
  appends eos to the last turn only); anything else means the template renders the turn differently in context
  (e.g. drops reasoning from earlier turns), and the row fails instead of training a wrong mask.
A template that closes the whole conversation with one more special token (Phi-3's eos after the last `<|end|>`)
trains that token too on the last turn, as TRL's own Phi-3 training template does.
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
        start = _turn_start(tokenizer, messages[:turn], input_ids)
        end = _turn_end(tokenizer, messages[: turn + 1], input_ids, start, special_ids)
        labels[start:end] = input_ids[start:end]
    if labels == input_ids:
        raise MaskError(f"the chat template of {tokenizer.name_or_path} renders nothing around the replies, so every "
                        "token would train; set dataset.chat_template to a chat template with role markers")
    return {"input_ids": input_ids, "labels": labels}


def tokenize_text(tokenizer, text: str) -> dict:
    """Plain language-model data: the tokenizer's own special tokens around the text, eos at the end; all train."""
    input_ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and input_ids[-1:] != [tokenizer.eos_token_id]:
        input_ids.append(tokenizer.eos_token_id)
    return {"input_ids": input_ids, "labels": list(input_ids)}


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        raise MaskError(f"the chat template of {tokenizer.name_or_path} rejected the conversation: {error}") from None
    # The template writes any bos token itself; adding special tokens here would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _turn_start(tokenizer, history: list[dict], full_ids: list[int]) -> int:
    prompt = _render(tokenizer, history, add_generation_prompt=True)
    if full_ids[: len(prompt)] != prompt:
        raise MaskError(
            f"the chat template of {tokenizer.name_or_path} renders the first {len(history)} messages plus the "
            "generation prompt differently from the same messages inside the whole conversation, so the reply "
            "cannot be located exactly; set dataset.chat_template to a template that renders earlier turns unchanged"
        )
    return len(prompt)


def _turn_end(tokenizer, through_turn: list[dict], full_ids: list[int], start: int, special_ids: set[int]) -> int:
    through = _render(tokenizer, through_turn)
    common = next((i for i, (a, b) in enumerate(zip(through, full_ids)) if a != b), min(len(through), len(full_ids)))
    end = next((i + 1 for i in range(common - 1, start - 1, -1) if full_ids[i] in special_ids), None)
    rendered_alike = common == len(through) or not tokenizer.decode(through[end or start :], skip_special_tokens=True).strip()
    if not rendered_alike:
        raise MaskError(
            f"the chat template of {tokenizer.name_or_path} renders assistant turn {len(through_turn) - 1} "
            "differently when later messages follow it (for example it drops reasoning from earlier turns), so its "
            "tokens cannot be told apart exactly; use dataset.loss_on: last_assistant, or set dataset.chat_template "
            "to a template that renders earlier turns unchanged"
        )
    if end is None:
        raise MaskError(
            f"the chat template of {tokenizer.name_or_path} ends assistant turn {len(through_turn) - 1} without a "
            f"special token (it renders as {tokenizer.decode(full_ids[start:common])!r}), so the model could not "
            "learn to stop; set dataset.chat_template to a template that closes assistant turns with the eos or an "
            "end-of-turn token"
        )
    return end
