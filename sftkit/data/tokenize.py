"""Chat messages -> input_ids + labels, rendered by the tokenizer's own chat template.

Which tokens train is derived from prefix renderings of the conversation, not from `{% generation %}` markers (few
templates have them) and not from searching the rendered text. For each assistant turn two renderings matter:
- up to the turn, with the generation prompt. It must be a prefix of the whole conversation and the reply starts
  where it ends, exactly where a model's reply starts at inference. A template whose generation prompt adds text
  the conversation does not have (DeepSeek's `<think>`) is accepted when only that added text differs: the reply
  starts where the two part, and a warning says that training and inference contexts differ.
- through the turn. Where it stops matching the whole conversation bounds the turn, and the turn ends at its last
  special token before that point (the end-of-turn token), so the model learns to stop while whitespace after it
  stays masked. What the through-rendering has after that token may only be whitespace or special tokens (Phi-3
  appends eos to the last turn only). A template that renders a turn differently once later messages follow it
  (Qwen3 adds an empty think block to the last turn only, or drops reasoning from earlier ones) is handled by
  taking the turn as rendered in the whole conversation, up to its first special token, and accepting it only if
  that decodes to the message's own content; otherwise the row fails instead of training a wrong mask.
A template that closes the whole conversation with one more special token (Phi-3's eos after the last `<|end|>`)
trains that token too on the last turn, as TRL's own Phi-3 training template does.

Rendering and tokenizing those prefixes for every row costs the square of its turns. So the prefixes are rendered
once per sequence of roles, with a placeholder for each message's content (a skeleton, cached), and each row is
rendered once and tokenized once, with the fast tokenizer's character offsets. The row's text must be its skeleton
with every placeholder replaced by the message's content (as the template trims it): then every position of the
skeleton outside a content has its place in the row's text, and the offsets say which token starts there. A row
for which that does not hold (the template treats some content unlike a placeholder, a message has other keys than
role and content: tool calls, reasoning; the row has tools) takes the same positions from its own prefix
renderings, which costs rendering each prefix but not tokenizing it. Where positions do not fall on token
boundaries, or the generation prompt adds text, the row is masked the old way, from its own prefixes, tokenized.
With max_length the row is still rendered whole (a template is one program over the whole conversation, and
rendering is a small part of the cost), but tokenized, masked and checked only up to the end of the assistant turn
the cut falls in.

Either way every trained span is checked: it must hold the reply's content (as the template trims it), its
reasoning and each tool call it makes, and end with a special token, else MaskError naming the template. A template
without an end-of-turn token of its own (GLM-4.5: the next role token ends a reply) otherwise trains only the
special tokens before the reply, silently. The row's tools, calls and reasoning are passed to the template as TRL
and transformers pass them; a template that renders none of them where the row has some is refused, as the model
would learn to call tools it was never shown, or to answer without the call or the reasoning it was given.
"""

import bisect
import hashlib
import json
import re
from dataclasses import dataclass
from operator import itemgetter

import jinja2
from transformers.utils import logging

from sftkit.data.formats import RowDefect, trains

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
# Stands for the content of message k in a skeleton: plain text to a template, and never produced by one itself.
OPEN, CLOSE = "\u27ea", "\u27eb"
CACHE_SIZE = 4096  # entries per cache; a dataset has few distinct role sequences
# Where an earlier turn cannot train as the whole conversation renders it; sftkit.data keeps it in an error only
# where the rows split at user turns would train
SPLIT_ADVICE = "set dataset.split_user_turns: true (each user turn's replies train in a row of their own), "
ID_CHARACTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class MaskError(ValueError):
    """The chat template does not allow an exact assistant mask for this conversation."""


class TemplateLacks(MaskError):
    """The chat template renders no tools, calls or reasoning, which the row holds: a fault of the config, which
    every such row shares. dataset.on_bad_row: skip leaves out rows for their own defects, not for this: it had
    dropped every tool row of a run whose template renders no tools, and trained on the rest (helper-75)."""


def stop_token_ids(tokenizer, configured=None) -> list[int]:
    """The tokens generation stops at: the eos, the token the chat template closes each reply with (the last one a
    reply trains: `<|im_end|>` where a base model's eos is `<|endoftext|>`, `<|eot_id|>` beside Llama 3's
    `<|end_of_text|>`), and any the model's generation config already lists (`configured`: an id or a list)."""
    ids = [*([configured] if isinstance(configured, int) else configured or []), tokenizer.eos_token_id]
    reply = _trained_reply(tokenizer)
    ids += reply[-1:] if reply else []  # a template that refuses the probe (a row would say why): the eos alone
    return list(dict.fromkeys(token for token in ids if token is not None))


def stop_at_the_end_of_a_reply(generation, tokenizer) -> bool:
    """Make a generation config's eos_token_id the stop_token_ids; whether that changed it."""
    stops = stop_token_ids(tokenizer, generation.eos_token_id)
    if stops == ([generation.eos_token_id] if isinstance(generation.eos_token_id, int) else generation.eos_token_id):
        return False
    generation.eos_token_id = stops if len(stops) > 1 else stops[0]
    return True


def _trained_reply(tokenizer) -> list[int] | None:
    """The tokens a one-turn chat's reply trains (its text, then the end-of-turn token); None where the chat template
    refuses that chat."""
    try:
        row = tokenize_messages(tokenizer, [{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"}])
    except Exception:  # noqa: BLE001 - MaskError, or a template's own error
        return None
    return [token for token, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]


def tokenize_messages(tokenizer, messages: list[dict], loss_on: str = "assistant", max_length: int | None = None,
                      tools: list[dict] | None = None):
    """Tokenize a conversation; labels are -100 except on the trained tokens.

    loss_on: "assistant" trains every assistant turn (but those of weight 0), "last_assistant" only the last one
    of those, "all" every token.
    max_length: tokenize only as far as the row is kept: its first max_length tokens, one more when the row goes on
    (so its length shows it is cut) and the rest of the assistant turn the cut falls in (so that turn is checked
    whole). None keeps the whole row.
    tools: the row's tool definitions, which the template writes into the prompt.
    """
    turns = [index for index, message in enumerate(messages) if trains(message)]
    if loss_on == "all" and (held_out := next((i for i, message in enumerate(messages) if message.get("weight") == 0),
                                              None)) is not None:
        raise ValueError(f"message {held_out} ({messages[held_out]['role']}) has weight 0 (or training: false), but "
                         "dataset.loss_on all trains every token; use loss_on: assistant to leave such turns out, or "
                         "remove their weights")
    if loss_on == "last_assistant":
        turns = turns[-1:]
    # a weight says which turns train; the template never sees it (and rows without other keys take the fast way)
    messages = [{key: value for key, value in message.items() if key != "weight"} for message in messages]
    template = _template(tokenizer)
    _refuse_special_token_text(template, messages, tools)
    messages = _with_arguments_the_template_takes(tokenizer, template, messages)
    messages = _with_ids_the_template_takes(tokenizer, template, messages)
    _refuse_messages_left_out(tokenizer, template, messages)
    text = _render(tokenizer, [messages], tools=tools)[0]
    _refuse_tools_left_out(tokenizer, template, messages, tools, text)
    _refuse_reasoning_left_out(tokenizer, template, messages, turns if loss_on != "all" else range(len(messages)))
    if loss_on == "all":
        _refuse_reasoning_dropped(template, messages, text)
        input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"input_ids": input_ids, "labels": list(input_ids)}
    found = None if tools else _spans_from_skeleton(tokenizer, template, messages, turns, text, max_length)
    found = found or _spans_from_own_renderings(tokenizer, template, messages, turns, text, max_length, tools)
    tokens, spans = found or _spans_from_prefixes(tokenizer, template, messages, turns, text, tools)
    if max_length is not None:
        spans = [span for span in spans if span[1] < max_length]  # the turns that start past the cut are not kept
    labels = [IGNORE_INDEX] * len(tokens.ids)
    for span in spans:
        turn, start, end, _ = span
        _check_span(tokenizer, template, tokens, span, messages[turn])
        labels[start:end] = tokens.ids[start:end]
    if spans and labels == tokens.ids:
        raise MaskError(f"{template.source} renders nothing around the replies, so every "
                        "token would train; set dataset.chat_template to a chat template with role markers")
    keep = len(tokens.ids) if max_length is None else max([max_length + 1] + [span[2] for span in spans])
    return {"input_ids": tokens.ids[:keep], "labels": labels[:keep]}


def tokenize_text(tokenizer, text: str) -> dict:
    """Plain language-model data: the tokenizer's own special tokens around the text, eos at the end; all train."""
    input_ids = tokenizer(text)["input_ids"]
    if tokenizer.eos_token_id is not None and input_ids[-1:] != [tokenizer.eos_token_id]:
        input_ids.append(tokenizer.eos_token_id)
    return {"input_ids": input_ids, "labels": list(input_ids)}


# --- what both ways share -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Template:
    """One tokenizer's chat template and special tokens: the key of every cache below."""
    key: tuple
    name: str  # the tokenizer's model
    source: str  # "the chat template of MODEL", or of the file dataset.chat_template names
    special_ids: frozenset
    special_text: re.Pattern | None  # the text of any special token, which rendering would turn into that token


@dataclass
class _Tokens:
    """A text tokenized once, with each token's character span."""
    text: str
    ids: list
    starts: tuple
    ends: tuple

    @classmethod
    def of(cls, tokenizer, text: str) -> "_Tokens":
        if not tokenizer.is_fast:  # a Python tokenizer gives no offsets: only the old way and decoded text work
            return cls(text, tokenizer(text, add_special_tokens=False)["input_ids"], None, None)
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = encoding["offset_mapping"]  # not zip(*offsets): its argument tuple cost 0.5 s at 264k tokens
        return cls(text, encoding["input_ids"], tuple(map(itemgetter(0), offsets)), tuple(map(itemgetter(1), offsets)))

    def between(self, tokenizer, first: int, last: int) -> str:
        """The text of tokens first to last - 1."""
        if self.starts is None:
            return tokenizer.decode(self.ids[first:last])
        return self.text[self.position(first) : self.position(last)]

    def at(self, position: int) -> int | None:
        """The index of the token that starts at `position` (the count of tokens at the end of the text), or None
        when no token boundary falls there."""
        index = bisect.bisect_left(self.starts, position)
        if index < len(self.ids) and self.starts[index] != position:
            return None
        if index > 0 and self.ends[index - 1] != position:
            return None
        return index

    def position(self, index: int) -> int:
        return self.starts[index] if index < len(self.ids) else len(self.text)


def _template(tokenizer) -> _Template:
    chat_template = tokenizer.chat_template  # a dict where a tokenizer has named templates
    key = (chat_template if isinstance(chat_template, str) else repr(chat_template), tokenizer.name_or_path,
           len(tokenizer), str(tokenizer.special_tokens_map), getattr(tokenizer, "sftkit_chat_template", None))
    return _cached(_TEMPLATES, key, lambda: _new_template(tokenizer, key))


def _new_template(tokenizer, key: tuple) -> _Template:
    return _Template(key, key[1], template_source(tokenizer), frozenset(tokenizer.all_special_ids),
                     _special_text(tokenizer))


def warn_of_markers_trained_as_text(tokenizer) -> None:
    """A template written for another tokenizer closes replies with <|markers|> this one reads as plain text (Phi-3's
    <|end|>): replies then train that text before the real end of turn, and the model learns to write it. Zephyr's
    <|user|>, plain text by design, is fine: it is never in a reply."""
    reply = _trained_reply(tokenizer)
    if reply is None:
        return  # each row will say why
    foreign = _markers_not_special(tokenizer, tokenizer.decode(reply), r"<\|[\w.-]+\|>")
    if foreign:
        logger.warning(f"{template_source(tokenizer)} ends each reply with {', '.join(foreign)}, which the tokenizer "
                       f"of {tokenizer.name_or_path} reads as plain text, not as a special token: the template is "
                       "likely written for another model's tokenizer, and every reply trains that text")


def template_source(tokenizer) -> str:
    """Whose chat template the tokenizer holds, for an error: its model's, or the one dataset.chat_template set
    (model.set_template records it)."""
    given = getattr(tokenizer, "sftkit_chat_template", None)
    return f"the chat template {given}" if given else f"the chat template of {tokenizer.name_or_path}"


def _special_text(tokenizer) -> re.Pattern | None:
    texts = {*tokenizer.all_special_tokens,
             *(token.content for token in tokenizer.added_tokens_decoder.values() if token.special)}
    texts = sorted(filter(None, texts), key=len, reverse=True)  # the longest first, so it is the one named
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def special_token_text(tokenizer, text: str) -> str | None:
    """The first text of one of the tokenizer's special tokens in `text` (which the tokenizer would read as it)."""
    pattern = _template(tokenizer).special_text
    found = pattern.search(text) if pattern else None
    return found.group() if found else None


def _refuse_special_token_text(template: _Template, messages: list[dict], tools: list[dict] | None) -> None:
    """The chat template renders a message's text as it is and the tokenizer then reads a special token's text as
    that token: "end a turn with <|im_end|>" in a reply trained an end of turn mid-reply, and the same text in a
    user message ended that turn early. So in a call's name or arguments, and in a tool's definition."""
    if template.special_text is None:
        return
    places = [(f"message {index} ({message.get('role')})", message.get(key))
              for index, message in enumerate(messages) for key in ("content", "reasoning_content")]
    places += [(f"message {index} ({message['role']})'s tool call {number} ({call['function']['name']})",
                json.dumps(call["function"], ensure_ascii=False))
               for index, message in enumerate(messages) for number, call in enumerate(message.get("tool_calls", []))]
    places += [(f"tools[{number}] ({tool['function']['name']})", json.dumps(tool, ensure_ascii=False))
               for number, tool in enumerate(tools or [])]
    for place, text in places:
        found = template.special_text.search(text) if isinstance(text, str) else None
        if found:
            raise RowDefect(f"{place} holds the text {found.group()!r}, which the tokenizer reads as its special "
                            "token, not as text (it ends or starts a turn mid-message); reword it")


def _refuse_messages_left_out(tokenizer, template: _Template, messages: list[dict]) -> None:
    """A template without a branch for a role skips its messages without an error (Phi-3's and Zephyr's skip tool
    messages): the tool's result vanished from the prompt, and the reply that reports it trained as if the model had
    made it up."""
    roles = tuple(message["role"] for message in messages)
    for index in _left_out(tokenizer, template, messages):
        if str(messages[index].get("content") or "").strip():
            raise MaskError(f"message {index} ({roles[index]}): {template.source} renders no {roles[index]} message "
                            "here, so its content would be left out of what trains; set dataset.chat_template to a "
                            f"template that renders {roles[index]} messages, or leave them out of the data")


def _left_out(tokenizer, template: _Template, messages: list[dict]) -> list[int]:
    """The first system or tool message (the roles templates leave out; replies are checked as they train) in a
    conversation of these roles that the template does not render: its rendering stays the same whatever it holds.
    Once per template and sequence of roles; per row where it calls tools, as calls decide what a template renders
    of the messages after them (Gemma 4's writes a tool's result into the turn of the call it answers)."""
    roles = tuple(message["role"] for message in messages)
    calls = any(message.get("tool_calls") for message in messages)

    def render(index: int, text: str) -> str | None:
        conversation = [{**message, "content": text} if place == index else message
                        for place, message in enumerate(messages)] if calls else [
            {"role": role, "content": text if place == index else _placeholder(place)}
            for place, role in enumerate(roles)]
        return _rendered(tokenizer, conversation)

    def compute() -> list[int]:
        firsts = [roles.index(role) for role in dict.fromkeys(roles) if role not in ("assistant", "user")]
        return [index for index in firsts
                if (once := render(index, "one")) is not None and once == render(index, "two")]

    return compute() if calls else _cached(_LEFT_OUT, (template.key, roles), compute)


def _refuse_tools_left_out(tokenizer, template: _Template, messages: list[dict], tools: list[dict] | None,
                           text: str) -> None:
    """A template that knows no tools (ChatML's, Llama 3's) renders a row's tool definitions and calls as nothing,
    without an error: the model would learn to call tools it was never shown, or to announce a call and stop."""
    if tools and text == _render(tokenizer, [messages])[0]:
        raise TemplateLacks(f"{template.source} renders no tools, so the row's tool definitions would be left out of "
                            "the prompt; set dataset.chat_template to a template that renders tools (the model's own, "
                            "if it was trained to call them)")
    calls = next((index for index, message in enumerate(messages) if message.get("tool_calls")), None)
    if calls is None:
        return
    try:
        without = _render(tokenizer, [[{key: value for key, value in message.items() if key != "tool_calls"}
                                       for message in messages]], tools=tools)[0]
    except MaskError:  # gpt-oss's wants the call a tool message answers: it renders them
        return
    if text == without:
        raise TemplateLacks(f"message {calls} (assistant): {template.source} renders no tool_calls, so the turn "
                            "would train without its call; set dataset.chat_template to a template that renders "
                            "tool_calls (the model's own, if it was trained to call tools)")


def _with_arguments_the_template_takes(tokenizer, template: _Template, messages: list[dict]) -> list[dict]:
    """Tool calls' arguments as an object, which most templates write with tojson, or as JSON text for a template
    that adds them to its text (DeepSeek-V3's: an object fails there with a TypeError)."""
    if not any(message.get("tool_calls") for message in messages) or not _takes_arguments_as_text(tokenizer, template):
        return messages

    def as_text(call: dict) -> dict:
        return {**call, "function": {**call["function"],
                                     "arguments": json.dumps(call["function"]["arguments"], ensure_ascii=False)}}

    return [{**message, "tool_calls": [as_text(call) for call in message["tool_calls"]]} if message.get("tool_calls")
            else message for message in messages]


def _with_ids_the_template_takes(tokenizer, template: _Template, messages: list[dict]) -> list[dict]:
    """Calls and their results paired by ids of 9 letters and digits, for a template that takes no others (Mistral's;
    vLLM makes such ids up when it serves these models), where OpenAI's data has `call_` and 24 more and ShareGPT's
    none: each other id becomes one made from it, the same in the call and its result; a call without one gets one
    made from the call; a result without one, or whose id names no call, answers the earliest call not answered yet."""
    if not any(message.get("tool_calls") for message in messages) or not _takes_only_nine_character_ids(tokenizer,
                                                                                                          template):
        return messages
    made, unanswered, paired = {}, [], []
    for index, message in enumerate(messages):
        if message.get("tool_calls"):
            calls = []
            for number, call in enumerate(message["tool_calls"]):
                given = call.get("id")
                new = _nine_character_id(given or f"{index}.{number} {json.dumps(call['function'], sort_keys=True)}")
                made.update({given: new} if given else {})
                unanswered.append(new)
                calls.append({**call, "id": new})
            message = {**message, "tool_calls": calls}
        elif message["role"] == "tool":
            given = message.get("tool_call_id")
            new = made.get(given) or (unanswered[0] if unanswered else _nine_character_id(given or str(index)))
            unanswered = [call for call in unanswered if call != new]
            message = {**message, "tool_call_id": new}
        paired.append(message)
    return paired


def _nine_character_id(given: str) -> str:
    """`given` where it is 9 letters and digits, else 9 made from it (the same in every process)."""
    if re.fullmatch("[A-Za-z0-9]{9}", given):
        return given
    number = int.from_bytes(hashlib.sha256(given.encode()).digest()[:8], "big")
    return "".join(ID_CHARACTERS[number // len(ID_CHARACTERS) ** place % len(ID_CHARACTERS)] for place in range(9))


def _takes_only_nine_character_ids(tokenizer, template: _Template) -> bool:
    arguments = '{"x": 1}' if _takes_arguments_as_text(tokenizer, template) else {"x": 1}

    def renders(call_id: str) -> bool:
        call = {"id": call_id, "type": "function", "function": {"name": "f", "arguments": arguments}}
        return _rendered(tokenizer, [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "", "tool_calls": [call]},
                                     {"role": "tool", "tool_call_id": call_id, "content": "1"},
                                     {"role": "assistant", "content": "One."}]) is not None

    return _cached(_IDS, template.key, lambda: not renders("call_0123456789") and renders("a1B2c3D4e"))


def _refuse_reasoning_left_out(tokenizer, template: _Template, messages: list[dict], turns: list[int]) -> None:
    """A template that reads no reasoning (transformers 5.24 passes it as reasoning_content, thinking and reasoning
    alike) renders it as nothing, without an error: the reply would train without it. Reasoning on a turn that does
    not train is context, which the template may leave out as it leaves out earlier turns' reasoning."""
    reasoned = next((turn for turn in turns if _reasoning(messages[turn])), None)
    if reasoned is not None and not _renders_reasoning(tokenizer, template):
        raise TemplateLacks(f"message {reasoned} (assistant): {template.source} renders no reasoning "
                            "(reasoning_content or thinking), so the reply would train without it; set "
                            "dataset.chat_template to a template that renders it (a thinking model's own)")


def _refuse_reasoning_dropped(template: _Template, messages: list[dict], text: str) -> None:
    """Under loss_on all, where no turn's span is checked: reasoning the template drops from a turn (Qwen3's, before
    the last user message) would vanish from what trains."""
    dropped = next((index for index, message in enumerate(messages)
                    if _reasoning(message) and _reasoning(message) not in text), None)
    if dropped is not None:
        raise MaskError(f"message {dropped} (assistant): {template.source} leaves its reasoning out of the "
                        "conversation (Qwen3's drops it from the turns before the last user message), so the row "
                        "would train without it; leave the reasoning out of the rows, or set dataset.loss_on: "
                        "assistant, which trains the replies only and says how such a row can keep its reasoning")


def _renders_reasoning(tokenizer, template: _Template) -> bool:
    """Whether the template writes a reply's reasoning: before a reply, or (Gemma 4's) before a tool call."""
    def probe() -> bool:
        call = {"type": "function", "function": {"name": "f", "arguments": {}}}
        return any("sftkit probes the reasoning" in (_rendered(tokenizer, [{"role": "user", "content": "Hi"}, {
            "role": "assistant", **reply, "reasoning_content": "sftkit probes the reasoning"}]) or "")
            for reply in ({"content": "Hello"}, {"content": "", "tool_calls": [call]}))

    return _cached(_REASONING, template.key, probe)


def _takes_arguments_as_text(tokenizer, template: _Template) -> bool:
    def probe() -> bool:
        call = {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}
        try:
            tokenizer.apply_chat_template([{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "", "tool_calls": [call]}], tokenize=False)
        except TypeError:
            return True
        except Exception:  # noqa: BLE001 - a template may reject the probe in any way; the rows report it
            return False
        return False

    return _cached(_ARGUMENTS, template.key, probe)


def _rendered(tokenizer, conversation: list[dict], add_generation_prompt: bool = False,
              tools: list[dict] | None = None) -> str | None:
    """One conversation rendered, or None where the template rejects it: for a probe or a shortcut, where the row's
    own rendering (`_render`) then says what is wrong."""
    try:
        return tokenizer.apply_chat_template([conversation], tokenize=False, tools=tools,
                                             add_generation_prompt=add_generation_prompt)[0]
    except Exception:  # noqa: BLE001 - a template may reject a conversation in any way
        return None


def _render(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool = False,
            tools: list[dict] | None = None) -> list[str]:
    if not conversations:
        return []
    try:
        return tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             tools=tools)
    except (jinja2.TemplateError, TypeError) as error:  # TypeError: a template adding a value to its text
        if _renders_without_system_messages(tokenizer, conversations, add_generation_prompt, tools):
            raise MaskError(f"{template_source(tokenizer)} takes no system message (it said: {error}); remove the "
                            "system messages from the data (and dataset.system_prompt), or use a template that "
                            "takes them") from None
        raise MaskError(f"{template_source(tokenizer)} rejected the conversation: {error}") from None


def _renders_without_system_messages(tokenizer, conversations: list[list[dict]], add_generation_prompt: bool,
                                     tools: list[dict] | None) -> bool:
    """Mistral's and Gemma's templates refuse a system message, Mistral's as roles that do not alternate."""
    if not any(message.get("role") == "system" for conversation in conversations for message in conversation):
        return False
    try:
        tokenizer.apply_chat_template([[message for message in conversation if message.get("role") != "system"]
                                       for conversation in conversations], tokenize=False,
                                      add_generation_prompt=add_generation_prompt, tools=tools)
    except (jinja2.TemplateError, TypeError):
        return False
    return True


def _turn_end(tokenizer, template: _Template, tokens: _Tokens, turn: int, message: dict, start: int, common: int,
              through_matches: bool, tail_is_blank) -> int:
    """Where assistant turn `turn` stops training. `common`: how many tokens the rendering through the turn shares
    with the conversation (all of it when `through_matches`); `tail_is_blank(index)`: whether that rendering holds
    only whitespace and special tokens from token `index` on."""
    ids = tokens.ids
    end = next((i + 1 for i in range(common - 1, start - 1, -1) if ids[i] in template.special_ids), None)
    if through_matches or tail_is_blank(end or start):
        # rendered alike in both places (only whitespace or special tokens after the end-of-turn differ)
        if end is None:
            raise MaskError(
                f"{template.source} ends assistant turn {turn} without a special token (it "
                f"renders as {tokenizer.decode(ids[start:common])!r}{_foreign_markers(tokenizer, ids[start:common])}), "
                "so the model could not learn to stop; set dataset.chat_template to a template that closes assistant "
                "turns with the eos or an end-of-turn token"
            )
        return end
    end = next((i + 1 for i in range(start, len(ids)) if ids[i] in template.special_ids), None)
    if end is None or not _is_the_reply(tokenizer.decode(ids[start : end - 1]), message):
        raise MaskError(
            f"{template.source} renders assistant turn {turn} differently when later messages "
            "follow it (for example it drops reasoning from earlier turns), so its tokens cannot be told apart "
            f"exactly; {SPLIT_ADVICE}give such turns \"weight\": 0, or set dataset.chat_template to a template that "
            "renders earlier turns unchanged"
        )
    return end


def _is_the_reply(text: str, message: dict) -> bool:
    """Whether a turn's text, as the whole conversation renders it, is the message: its content, or (where it calls
    tools or reasons, which the template writes in its own way) its content, its reasoning and its calls."""
    if not message.get("tool_calls") and not _reasoning(message):
        return text.strip() == message["content"].strip()
    reply = message["content"].strip()
    return reply in text and _reasoning(message) in text.replace(reply, "", 1) and _call_left_out(text, message) is None


def _reasoning(message: dict) -> str:
    return message.get("reasoning_content") or ""


def _called(message: dict) -> list[str]:
    return [call["function"]["name"] for call in message.get("tool_calls", [])]


def _call_left_out(text: str, message: dict) -> int | None:
    """The first of the message's calls that a turn's text does not hold (gpt-oss's template writes only the first of
    several): its function's name, as often as the message calls it, and each of its text arguments that JSON writes
    as they are (templates write arguments each in its own way: JSON, XML, Python)."""
    names = _called(message)
    for number, call in enumerate(message.get("tool_calls", [])):
        name, arguments = call["function"]["name"], call["function"]["arguments"]
        values = arguments.values() if isinstance(arguments, dict) else ()
        plain = [value for value in values if isinstance(value, str) and value
                 and json.dumps(value, ensure_ascii=False)[1:-1] == value]
        if text.count(name) < names[: number + 1].count(name) or any(value not in text for value in plain):
            return number
    return None


def _markers_not_special(tokenizer, text: str, marker: str) -> list[str]:
    """The markers (text matching the `marker` pattern) in `text` that are no special token of the tokenizer."""
    return [found for found in dict.fromkeys(re.findall(marker, text)) if found not in tokenizer.all_special_tokens]


def _foreign_markers(tokenizer, ids: list[int]) -> str:
    """'; <|eot_id|> is no special token of this tokenizer...' where a template written for another model's tokenizer
    renders its markers as plain text."""
    foreign = _markers_not_special(tokenizer, tokenizer.decode(ids), r"</?\|?[A-Za-z][\w.-]*\|?>")
    return (f"; {', '.join(foreign)} {'is' if len(foreign) == 1 else 'are'} no special token of the tokenizer of "
            f"{tokenizer.name_or_path}: the template is written for another model's tokenizer" if foreign else "")


def _check_span(tokenizer, template: _Template, tokens: _Tokens, span: tuple, message: dict):
    """The generic check on every row: the trained span holds the reply (its reasoning and each call it makes), then
    ends with a special token. A reply may begin with what its generation prompt ends with after its last special
    token (a thinking model's `<think>`), when that prompt is a prefix of the conversation."""
    turn, start, end, prompt_is_prefix = span
    content = message["content"]
    if end > start and tokens.ids[end - 1] in template.special_ids:
        header = start
        if prompt_is_prefix:
            header = next((i for i in range(start - 1, -1, -1) if tokens.ids[i] in template.special_ids), start)
        opener, text = tokens.between(tokenizer, header, start), tokens.between(tokenizer, header, end - 1)
        reply = content.strip()
        found = text.rfind(reply)
        left_out = _call_left_out(text, message)
        reasoned = found >= 0 and _reasoning(message) in text[:found] + text[found + len(reply):]
        if found >= 0 and found + len(reply) > len(opener) and left_out is None and reasoned:
            return
        if not reasoned and found >= 0 and left_out is None:
            raise MaskError(f"{template.source} writes no reasoning in assistant turn {turn} here (Qwen3's drops it "
                            "from the turns before the last user message, Gemma 4's writes it only before tool "
                            f"calls); {SPLIT_ADVICE}leave the reasoning out of such turns, or give them \"weight\": 0")
        if left_out:  # it wrote the first call, but not all
            raise MaskError(f"{template.source} leaves out tool call {left_out} ({_called(message)[left_out]}) of "
                            f"assistant turn {turn}, which it renders as {tokens.between(tokenizer, start, end)!r}; "
                            "give each assistant message one call (gpt-oss's template writes only the first), set "
                            "dataset.chat_template to a template that writes every call, or set "
                            "dataset.on_bad_row: skip")
        if left_out is None and _called(message):
            raise RowDefect(f"{template.source} writes no text beside the tool calls of assistant turn {turn} "
                            f"(Llama 3.1's and Mistral's drop it), so {_shortened(reply)!r} would be left out of "
                            "what trains; remove the text beside the calls")
    raise MaskError(
        f"{template.source} would train {tokenizer.decode(tokens.ids[start:end])!r} for assistant turn {turn}, "
        f"which is not {_the_reply(message)} followed by an end-of-turn token: the template "
        "closes the reply with no special token of its own, or renders it unlike its content (Qwen3's rewrites the "
        "whitespace around <think>...</think>, DeepSeek-R1's cuts the reasoning out); write the replies as the "
        "template renders them, or set dataset.chat_template to a template that ends every assistant turn with an "
        "end-of-turn token and renders replies as they are"
    )


def _the_reply(message: dict) -> str:
    content, calls = _shortened(message["content"].strip()), " and ".join(_called(message))
    if not calls:
        return f"the reply {content!r}"
    return f"the reply {content!r} with its call of {calls}" if content else f"the call of {calls}"


def _shortened(text: str, length: int = 120) -> str:
    return text if len(text) <= length else f"{text[:length - 3]}..."


def _warn_prompt_adds(template: _Template, added: str):
    logger.warning_once(
        f"the generation prompt of {template.source} adds {added!r}, which the training conversations "
        "do not have; replies train after the part they share, so the model sees a slightly different context at "
        "inference"
    )


# --- the old way: every prefix of the row rendered and tokenized --------------------------------------------------

def _spans_from_prefixes(tokenizer, template: _Template, messages: list[dict], turns: list[int], text: str,
                         tools: list[dict] | None):
    tokens = _Tokens.of(tokenizer, text)
    # every rendering the masks need, tokenized in one call: most of the cost of tokenizing is per call
    texts = _render(tokenizer, [messages[: turn + 1] for turn in turns], tools=tools)
    texts += _render(tokenizer, [messages[:turn] for turn in turns], add_generation_prompt=True, tools=tools)
    renderings = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    spans = []
    for turn, through, prompt, prompt_text in zip(turns, renderings[: len(turns)], renderings[len(turns) :],
                                                  texts[len(turns) :]):
        start = _prefix_start(tokenizer, template, messages[:turn], prompt, tokens, prompt_text, tools)
        prompt_is_prefix = start == len(prompt)
        common = _common_prefix(through, tokens.ids)

        def tail_is_blank(index, through=through):
            return not tokenizer.decode(through[index:], skip_special_tokens=True).strip()

        end = _turn_end(tokenizer, template, tokens, turn, messages[turn], start, common,
                        common == len(through), tail_is_blank)
        spans.append((turn, start, end, prompt_is_prefix))
    return tokens, spans


def _merged_across(tokenizer, template: _Template, turn: int, merged: list[int]) -> str:
    """The generation prompt's text is where the conversation's is, but one token holds its end and the reply's
    start: training it would train part of the prompt, and leaving it out part of the reply."""
    return (f"the tokenizer of {template.name} merges the end of the generation prompt with the start of assistant "
            f"turn {turn} into one token ({tokenizer.decode(merged)!r}), so the reply's tokens cannot be told apart "
            "from the prompt's; start the reply otherwise (without its leading whitespace), or set "
            "dataset.on_bad_row: skip")


def _prefix_start(tokenizer, template: _Template, history: list[dict], prompt: list[int], tokens: _Tokens,
                  prompt_text: str, tools: list[dict] | None) -> int:
    full_ids = tokens.ids
    if full_ids[: len(prompt)] == prompt:
        return len(prompt)
    common = _common_prefix(prompt, full_ids)
    history_ids = tokenizer(_render(tokenizer, [history], tools=tools), add_special_tokens=False)["input_ids"][0]
    if common >= len(history_ids):  # only what the generation prompt adds differs
        if tokens.text.startswith(prompt_text):  # or nothing, but one token holds the prompt's end and the reply's start
            raise MaskError(_merged_across(tokenizer, template, len(history), full_ids[common : common + 1]))
        start = _reply_start(tokenizer, history, tokens, common, tools)
        _warn_prompt_adds(template, tokenizer.decode(prompt[start:]))
        return start
    raise MaskError(
        f"{template.source} renders the first {len(history)} messages differently from the same "
        "messages inside the whole conversation, so the reply cannot be located exactly (Mistral's writes the tools "
        f"before the last user message, Qwen3.6's an empty think block in the turns after it); {SPLIT_ADVICE}give the "
        "earlier assistant turns \"weight\": 0, or set dataset.chat_template to a template that renders earlier turns "
        "unchanged"
    )


def _reply_start(tokenizer, history: list[dict], tokens: _Tokens, common: int, tools: list[dict] | None) -> int:
    """Where the reply after `history` starts, when the generation prompt adds text: the tokens shared with the
    conversation may run into the reply (DeepSeek's added '<think>' and a reply '<b>' share '<'). The reply starts
    where a placeholder for it starts, in the history rendered with one (the skeletons' way, for this row); else
    where the shared tokens end."""
    placeholder = _placeholder(len(history))
    marked = _render(tokenizer, [[*history, {"role": "assistant", "content": placeholder}]], tools=tools)[0]
    at = marked.rfind(placeholder)  # the history's own text may hold the placeholder's brackets
    start = tokens.at(at) if at >= 0 and tokens.starts is not None and tokens.text.startswith(marked[:at]) else None
    return start if start is not None and start <= common else common


def _common_prefix(a, b) -> int:
    """How long a prefix two strings (or lists) share. Slices are compared, not items one by one: a prefix rendering
    is usually a prefix of the whole, and a row of 100k characters compared item by item in Python cost seconds."""
    shorter = min(len(a), len(b))
    if a[:shorter] == b[:shorter]:
        return shorter
    low, high = 0, shorter - 1  # a[:low] == b[:low]; they differ within a[:high + 1]
    while low < high:
        middle = (low + high + 1) // 2
        if a[:middle] == b[:middle]:
            low = middle
        else:
            high = middle - 1
    return low


# --- the fast way: prefixes rendered once per sequence of roles, the row rendered and tokenized once ---------------

@dataclass(frozen=True)
class _Skeleton:
    """A rendering with a placeholder for each message's content, cut at the placeholders."""
    text: str
    literals: tuple  # the template's own text around the placeholders: one more than there are placeholders
    starts: tuple  # where each literal starts in `text`
    messages: tuple  # the message each placeholder stands for, in order


@dataclass(frozen=True)
class _TurnShape:
    """One assistant turn, in positions of the whole conversation's skeleton."""
    start: int  # where the reply starts: the end of the generation prompt, or where the two part
    prompt_adds: str  # what the generation prompt has from there on instead ("" when it is a prefix)
    common: int  # how far the rendering through the turn matches the whole conversation
    through_rest: str  # what that rendering has from there on instead ("" when it is a prefix)
    end: int  # a safe place to stop tokenizing: just after the first special token past the turn and `common`
    common_at_content: bool  # whether the rendering through the turn parts from the conversation at a content


@dataclass(frozen=True)
class _Layout:
    """What every conversation with one sequence of roles shares: its skeleton and the shape of each assistant turn."""
    skeleton: _Skeleton
    turns: dict  # message index -> _TurnShape, or None where the prefixes do not line up (the old way decides)


def _spans_from_skeleton(tokenizer, template, messages, turns, text, max_length):
    """(tokens, spans) for the row, or None when it must be masked the old way."""
    if not tokenizer.is_fast or not all(_plain(message) for message in messages):
        return None
    layout = _layout(tokenizer, template, tuple(message["role"] for message in messages))
    placed = layout and _place(layout.skeleton, messages, text)
    if placed is None or any(layout.turns[turn] is None for turn in turns):
        return None
    return _spans_from_layout(tokenizer, template, messages, turns, text, max_length, layout, placed)


def _spans_from_own_renderings(tokenizer, template, messages, turns, text, max_length, tools):
    """A row no skeleton stands for (it has tools, tool calls, other keys, or content a template treats unlike a
    placeholder): the shapes of its turns from its own prefix renderings, each rendered but not tokenized (tokenizing
    them is most of the old way's cost). None where the old way must decide: a generation prompt that adds text
    (DeepSeek's `<think>`, which may share characters with the reply).
    With max_length, the row is tokenized only as far as the kept turns reach, and the turns past the cut are not
    rendered: an agent's trace of 264k tokens cut at 8,192 took 1.9 s, most of it in renderings and tokens no one
    kept."""
    if not tokenizer.is_fast:
        return None
    renderings = {}

    def render(count: int, add_generation_prompt: bool) -> str | None:  # each once, however far the row is tokenized
        return _cached(renderings, (count, add_generation_prompt),
                       lambda: _rendered(tokenizer, messages[:count], add_generation_prompt, tools))

    whole = _Skeleton(text, (text,), (0,), ())
    reach = len(text) if max_length is None else 4 * max_length  # characters: most text has 3 to 5 per token
    while True:
        tokens = _Tokens.of(tokenizer, text[: _just_past_a_special_token(template, text, reach)])
        cut = len(tokens.text) < len(text)
        if not cut or len(tokens.ids) > max_length:
            shapes = _shapes_as_far_as_kept(whole, _special_spans(template, tokens), turns, render, tokens, max_length)
            if shapes is None:
                return None
            if not cut or all(shape.end <= len(tokens.text) for shape in shapes.values()
                              if _tokens_before(tokens, shape.start) < max_length):
                break
        reach *= 2
    return _spans_from_layout(tokenizer, template, messages, list(shapes), text, max_length, _Layout(whole, shapes),
                              [0], tokens)


def _just_past_a_special_token(template: _Template, text: str, position: int) -> int:
    """Where to cut the row at or after `position` so that its tokens up to there are the whole row's: just past a
    special token, which the tokenizer splits the text at before anything else."""
    found = template.special_text.search(text, position) if template.special_text else None
    return found.end() if found else len(text)


def _shapes_as_far_as_kept(whole, specials, turns, render, tokens, max_length) -> dict | None:
    """The shapes of the turns that start within max_length, and of the first that does not (its prefixes rendered
    to find where it starts); None where one has none."""
    shapes = {}
    for turn in turns:
        shape = shapes[turn] = _turn_shape(whole, specials, turn, render)
        if shape is None or shape.prompt_adds:
            return None
        if max_length is not None and _tokens_before(tokens, shape.start) >= max_length:
            break
    return shapes


def _tokens_before(tokens: _Tokens, position: int) -> int:
    return bisect.bisect_left(tokens.starts, position)


def _spans_from_layout(tokenizer, template, messages, turns, text, max_length, layout, placed, tokens=None):
    """`tokens`: the whole row's, where they are at hand; else the row is tokenized as far as max_length needs."""
    place = _Placement(layout.skeleton, placed)
    tokens = tokens or _tokenize_far_enough(tokenizer, text, place, layout, turns, max_length)
    spans = []
    for turn in turns:
        shape = layout.turns[turn]
        start_at = place.in_text(shape.start)
        if start_at > len(tokens.text):
            break  # tokenized only as far as max_length: this turn and the later ones lie past the cut
        start = tokens.at(start_at)
        if start is None:
            return None
        if max_length is not None and start >= max_length:
            break
        span = _turn_span(tokenizer, template, tokens, place, shape, turn, messages[turn], start)
        if span is None:
            return None
        spans.append(span)
    return tokens, spans


def _plain(message) -> bool:
    """Only role and content, the content text: a placeholder can stand for it."""
    if type(message) is not dict or len(message) != 2 or "role" not in message:
        return False
    content = message.get("content")
    return type(content) is str and bool(content) and not content.isspace()


def _turn_span(tokenizer, template, tokens, place, shape, turn, message, start):
    """(turn, start, end, whether the generation prompt is a prefix) in tokens, or None where positions do not fall
    on token boundaries or the row's own text parts from the prefixes elsewhere than its skeleton does."""
    if shape.prompt_adds:
        _warn_prompt_adds(template, shape.prompt_adds)
    common_at = place.in_text(shape.common)
    if common_at is None or common_at > len(tokens.text):
        return None
    # where the skeletons part at a placeholder, the row's content must part from the template's text there too
    if shape.through_rest and (shape.through_rest.startswith(OPEN) or shape.common_at_content
                               and tokens.text.startswith(shape.through_rest[0], common_at)):
        return None
    common = tokens.at(common_at)
    if common is None:
        return None

    def tail_is_blank(index):  # what the rendering through the turn has from token `index` on
        at = place.in_skeleton(tokens.position(index))
        if at is None:
            raise _NotOnSkeleton
        return _blank(tokenizer, template, place.skeleton.text[at : shape.common] + shape.through_rest)

    try:
        end = _turn_end(tokenizer, template, tokens, turn, message, start, common, not shape.through_rest,
                        tail_is_blank)
    except (MaskError, _NotOnSkeleton):
        return None  # the old way decides, and words the error
    return turn, start, end, not shape.prompt_adds


class _NotOnSkeleton(Exception):
    """A position inside a message's content: the skeleton cannot speak for it."""


@dataclass
class _Placement:
    """Where the skeleton's literals lie in the row's text."""
    skeleton: _Skeleton
    placed: list

    def in_text(self, position: int) -> int | None:
        return _translate(position, self.skeleton.starts, self.placed, self.skeleton.literals)

    def in_skeleton(self, position: int) -> int | None:
        return _translate(position, self.placed, self.skeleton.starts, self.skeleton.literals)


def _translate(position: int, from_starts, to_starts, literals) -> int | None:
    """A position within (or at the end of) a literal, from one text to the other; None inside a content."""
    index = bisect.bisect_right(from_starts, position) - 1
    offset = position - from_starts[index]
    return to_starts[index] + offset if offset <= len(literals[index]) else None


def _place(skeleton: _Skeleton, messages: list[dict], text: str) -> list[int] | None:
    """Where each literal of the skeleton starts in the row's text; None unless the text is the skeleton with each
    placeholder replaced by its message's content, as given or as the template trims it."""
    placed, position = [], 0
    last = len(skeleton.messages)
    for index, literal in enumerate(skeleton.literals):
        if not text.startswith(literal, position):
            return None
        placed.append(position)
        position += len(literal)
        if index == last:
            break
        following = skeleton.literals[index + 1]
        end_of_text = len(text) - len(following) if index + 1 == last else None
        length = _rendered_length(messages[skeleton.messages[index]]["content"], text, position, following, end_of_text)
        if length is None:
            return None
        position += length
    return placed if position == len(text) else None


def _rendered_length(content: str, text: str, position: int, following: str, end_of_text: int | None) -> int | None:
    """How long the content is in the row's text at `position`, followed by the literal `following` (and, for the
    last content, by nothing more): as given, or as the template trims it (`trim`, `strip()`, Qwen3's
    `lstrip('\n')`, ...). None when no way, or more than one way, fits."""
    variants = [content]
    if content[0].isspace() or content[-1].isspace():
        variants = {content, content.strip(), content.lstrip(), content.rstrip(), content.strip("\n"),
                    content.lstrip("\n"), content.rstrip("\n")} - {""}
    lengths = {len(variant) for variant in variants
               if text.startswith(variant, position) and text.startswith(following, position + len(variant))
               and (end_of_text is None or position + len(variant) == end_of_text)}
    return lengths.pop() if len(lengths) == 1 else None


def _layout(tokenizer, template: _Template, roles: tuple) -> _Layout | None:
    return _cached(_LAYOUTS, (template.key, roles), lambda: _build_layout(tokenizer, template, roles))


def _build_layout(tokenizer, template: _Template, roles: tuple) -> _Layout | None:
    text = _skeleton(tokenizer, template, roles, False)
    skeleton = text and _split(text)
    if skeleton is None:
        return None
    specials = _special_spans(template, _Tokens.of(tokenizer, skeleton.text))
    turns = {}
    for turn, role in enumerate(roles):
        if role == "assistant":
            turns[turn] = _turn_shape(skeleton, specials, turn,
                                      lambda count, prompt: _skeleton(tokenizer, template, roles[:count], prompt))
    return _Layout(skeleton, turns)


def _turn_shape(skeleton, specials, turn, render) -> _TurnShape | None:
    """`render(count, add_generation_prompt)`: the rendering of the first `count` messages, or None."""
    prompt = render(turn, True)
    through = render(turn + 1, False)
    if prompt is None or through is None:
        return None
    whole = skeleton.text
    start = _token_prefix(prompt, whole, specials)
    if start < len(prompt):  # the generation prompt adds what the conversation does not have (DeepSeek)
        history = render(turn, False)
        if history is None or start < len(history) or _inside_placeholder(prompt, start):
            return None
    common = _token_prefix(through, whole, specials)
    placeholder = _placeholder(turn)
    after_reply = whole.find(placeholder) + len(placeholder) if placeholder in whole else start
    end = next((stop for _, stop in specials if stop >= max(common, after_reply)), len(whole))
    return _TurnShape(start, prompt[start:], common, through[common:], end, whole.startswith(OPEN, common))


def _token_prefix(text: str, whole: str, specials: list) -> int:
    """How much of `text` the skeleton `whole` starts with, backed off to the start of a special token of `whole`
    that the two part inside (`<|im_start|>` against `<|im_end|>`): tokens, not characters, are compared."""
    common = _common_prefix(text, whole)
    return next((first for first, stop in specials if first < common < stop), common)


def _skeleton(tokenizer, template: _Template, roles: tuple, add_generation_prompt: bool) -> str | None:
    """The rendering of a conversation with these roles and a placeholder for each content."""
    def render():
        conversation = [{"role": role, "content": _placeholder(index)} for index, role in enumerate(roles)]
        return _rendered(tokenizer, conversation, add_generation_prompt)

    return _cached(_SKELETONS, (template.key, roles, add_generation_prompt), render)


def _placeholder(index: int) -> str:
    return f"{OPEN}{index}{CLOSE}"


def _split(text: str) -> _Skeleton | None:
    literals, starts, messages, position = [], [], [], 0
    while (opened := text.find(OPEN, position)) >= 0:
        closed = text.find(CLOSE, opened)
        if closed < 0 or not text[opened + 1 : closed].isdigit():
            return None
        literals.append(text[position:opened])
        starts.append(position)
        messages.append(int(text[opened + 1 : closed]))
        position = closed + 1
    literals.append(text[position:])
    starts.append(position)
    if len(set(messages)) != len(messages):  # a content rendered twice
        return None
    return _Skeleton(text, tuple(literals), tuple(starts), tuple(messages))


def _inside_placeholder(text: str, position: int) -> bool:
    """Whether `position` is at or inside a placeholder (the row's text has content there, not the template's)."""
    opened = text.rfind(OPEN, 0, position + 1)
    return opened >= 0 and text.find(CLOSE, opened) >= position


def _special_spans(template: _Template, tokens: _Tokens) -> list[tuple]:
    """Where the template's own special tokens lie in a skeleton. Just after one, tokenizing a prefix of the row
    gives the same tokens as tokenizing all of it."""
    return [(first, stop) for token, first, stop in zip(tokens.ids, tokens.starts, tokens.ends)
            if token in template.special_ids]


def _tokenize_far_enough(tokenizer, text: str, place: _Placement, layout: _Layout, turns: list[int], max_length):
    """The row's tokens: all of them, or with max_length one past it and as far as the turns that start within it
    reach."""
    if max_length is None:
        return _Tokens.of(tokenizer, text)
    stops = sorted({place.in_text(shape.end) for shape in layout.turns.values() if shape} | {len(text)})
    guess = 4 * max_length  # characters: most text has 3 to 5 per token
    while True:
        stop = stops[bisect.bisect_left(stops, min(guess, len(text)))]
        tokens = _Tokens.of(tokenizer, text[:stop])
        if len(tokens.ids) > max_length or stop == len(text):
            break
        guess = 2 * stop
    # a turn that starts before the cut is tokenized to its end, whatever the guess
    ends = [place.in_text(layout.turns[turn].end) for turn in turns if place.in_text(layout.turns[turn].start) < stop]
    reach = max(ends, default=stop)
    return tokens if reach <= stop else _Tokens.of(tokenizer, text[:reach])


def _blank(tokenizer, template: _Template, tail: str) -> bool:
    if OPEN in tail:
        return False
    return _cached(_BLANKS, (template.key, tail),
                   lambda: not tokenizer.decode(tokenizer(tail, add_special_tokens=False)["input_ids"],
                                                skip_special_tokens=True).strip())


_TEMPLATES: dict = {}
_LAYOUTS: dict = {}
_SKELETONS: dict = {}
_LEFT_OUT: dict = {}
_ARGUMENTS: dict = {}
_IDS: dict = {}
_REASONING: dict = {}
_BLANKS: dict = {}


def _cached(cache: dict, key, compute):
    if key in cache:
        return cache[key]
    if len(cache) >= CACHE_SIZE:
        cache.clear()
    value = cache[key] = compute()
    return value
