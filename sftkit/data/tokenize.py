"""Chat messages -> input_ids + labels, rendered by the tokenizer's own chat template.

Which tokens train is derived from token prefixes, not from `{% generation %}` markers (few templates have them)
and not from searching the rendered text. For each assistant turn the conversation is rendered twice more:
- up to the turn, with the generation prompt. It must tokenize to a prefix of the whole conversation and the reply
  starts where it ends, exactly where a model's reply starts at inference. A template whose generation prompt adds
  tokens the conversation does not have (DeepSeek's `<think>`) is accepted when only those added tokens differ:
  the reply starts where the two diverge, and a warning says that training and inference contexts differ.
- through the turn. Where it stops matching the whole conversation bounds the turn, and the turn ends at its last
  special token before that point (the end-of-turn token), so the model learns to stop while whitespace after it
  stays masked. What the through-rendering has after that token may only be whitespace or special tokens (Phi-3
  appends eos to the last turn only). A template that renders a turn differently once later messages follow it
  (Qwen3 adds an empty think block to the last turn only, or drops reasoning from earlier ones) is handled by
  taking the turn as rendered in the whole conversation, up to its first special token, and accepting it only if
  that decodes to the message's own content; otherwise the row fails instead of training a wrong mask.
A template that closes the whole conversation with one more special token (Phi-3's eos after the last `<|end|>`)
trains that token too on the last turn, as TRL's own Phi-3 training template does.
"""

import jinja2
from transformers.utils import logging

IGNORE_INDEX = -100
logger = logging.get_logger(__name__)

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
    turns = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    if loss_on == "last_assistant":
        turns = turns[-1:]
    if loss_on == "all":
        turns = []
    # Every rendering the masks need, tokenized in one call: most of the cost of tokenizing is per call.
    texts = _render(tokenizer, [messages] + [messages[: turn + 1] for turn in turns])
    texts += _render(tokenizer, [messages[:turn] for turn in turns], add_generation_prompt=True)
    input_ids, *renderings = tokenizer(texts, add_special_tokens=False)["input_ids"]  # templates write their own bos
    if loss_on == "all":
        return {"input_ids": input_ids, "labels": list(input_ids)}
    special_ids = set(tokenizer.all_special_ids)
    labels = [IGNORE_INDEX] * len(input_ids)
    for turn, through, prompt in zip(turns, renderings[: len(turns)], renderings[len(turns) :]):
        start = _turn_start(tokenizer, messages[:turn], prompt, input_ids)
        end = _turn_end(tokenizer, messages[: turn + 1], through, input_ids, start, special_ids)
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


def _render(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False) -> list[str]:
    if not conversations:
        return []
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        raise MaskError(f"the chat template of {tokenizer.name_or_path} rejected the conversation: {error}") from None


def _turn_start(tokenizer, history: list[dict], prompt: list[int], full_ids: list[int]) -> int:
    if full_ids[: len(prompt)] == prompt:
        return len(prompt)
    common = _common_prefix(prompt, full_ids)
    history_ids = tokenizer(_render(tokenizer, [history]), add_special_tokens=False)["input_ids"][0]
    if common >= len(history_ids):  # only what the generation prompt adds differs
        logger.warning_once(
            f"the generation prompt of {tokenizer.name_or_path}'s chat template adds "
            f"{tokenizer.decode(prompt[common:])!r}, which the training conversations do not have; replies train "
            "after the part they share, so the model sees a slightly different context at inference"
        )
        return common
    raise MaskError(
        f"the chat template of {tokenizer.name_or_path} renders the first {len(history)} messages differently from "
        "the same messages inside the whole conversation, so the reply cannot be located exactly; set "
        "dataset.chat_template to a template that renders earlier turns unchanged"
    )


def _turn_end(tokenizer, through_turn: list[dict], through: list[int], full_ids: list[int], start: int,
              special_ids: set[int]) -> int:
    common = _common_prefix(through, full_ids)
    end = next((i + 1 for i in range(common - 1, start - 1, -1) if full_ids[i] in special_ids), None)
    if common == len(through) or not tokenizer.decode(through[end or start :], skip_special_tokens=True).strip():
        # rendered alike in both places (only whitespace or special tokens after the end-of-turn differ)
        if end is None:
            raise MaskError(
                f"the chat template of {tokenizer.name_or_path} ends assistant turn {len(through_turn) - 1} without "
                f"a special token (it renders as {tokenizer.decode(full_ids[start:common])!r}), so the model could not "
                "learn to stop; set dataset.chat_template to a template that closes assistant turns with the eos or "
                "an end-of-turn token"
            )
        return end
    end = next((i + 1 for i in range(start, len(full_ids)) if full_ids[i] in special_ids), None)
    if end is None or tokenizer.decode(full_ids[start : end - 1]).strip() != through_turn[-1]["content"].strip():
        raise MaskError(
            f"the chat template of {tokenizer.name_or_path} renders assistant turn {len(through_turn) - 1} "
            "differently when later messages follow it (for example it drops reasoning from earlier turns), so its "
            "tokens cannot be told apart exactly; use dataset.loss_on: last_assistant, or set dataset.chat_template "
            "to a template that renders earlier turns unchanged"
        )
    return end


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

