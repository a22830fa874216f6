"""Completion-only masks from the chat template: exactly each assistant reply plus its end-of-turn token trains."""

import json
import re

import pytest
from conftest import FAMILIES, REJECT_SYSTEM, TEMPLATES, TINY_MODEL, family_tokenizer, trained_spans

from sftkit.data import MaskError, tokenize_messages
from sftkit.data.formats import RowDefect
from sftkit.data.tokenize import CHATML_TEMPLATE

SYSTEM = {"role": "system", "content": "You are a polite assistant."}
SINGLE = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
]
MULTI = SINGLE + [
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "The capital of Italy is Rome."},
    {"role": "user", "content": "Thank you!"},
    {"role": "assistant", "content": "You are welcome! Have a nice day."},
]


def replies(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


def expected_spans(family, messages):
    """Each reply plus the end-of-turn token; Phi-3 also closes the conversation with eos, which the last turn trains."""
    end = FAMILIES[family]["end"]
    spans = [reply + end for reply in replies(messages)]
    if family == "phi3":
        spans[-1] += "\n<|endoftext|>"
    if family == "qwen3":  # the last turn is rendered with an empty think block, earlier ones without
        spans[-1] = "<think>\n\n</think>\n\n" + spans[-1]
    if family == "qwen3_6":  # the same block, but the generation prompt already opens it: the model writes the rest
        spans[-1] = "\n</think>\n\n" + spans[-1]
    if family == "command_a":  # the reply closes with <|END_RESPONSE|>, then the turn with <|END_OF_TURN_TOKEN|>
        spans = [reply + "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>" for reply in replies(messages)]
    if family == "gpt_oss":  # the model writes its channel header after `<|start|>assistant`, then the final reply
        spans = ["<|channel|>final<|message|>" + reply + "<|return|>" for reply in replies(messages)]
    return spans


# Conversations a family's template allows no exact mask for, and the MaskError that says so.
REFUSED = {
    # GLM ends a reply with no token of its own (the next <|user|> does): the old masks trained '\n<think></think>'
    **{("glm4_5", name): r"glm4_5 would train '\\n<think></think>' for assistant turn \d, which is not the reply "
       "'[^']+' followed by an end-of-turn token" for name in ("single", "multi", "system_multi")},
    # gpt-oss closes earlier replies with <|end|> and the last with <|return|>
    **{("gpt_oss", name): "gpt_oss renders assistant turn \\d differently when later messages follow it"
       for name in ("multi", "system_multi")},
    # Mistral Nemo moves the system message into the last user message
    ("mistral_nemo", "system_multi"):
        "message 0 \\(system\\): the chat template of mistral_nemo renders no system message",
}
CONVERSATIONS = {"single": SINGLE, "multi": MULTI, "system_multi": [SYSTEM] + MULTI}


def masked_families(*names):
    return [(family, name) for family in sorted(FAMILIES) for name in names if (family, name) not in REFUSED]


@pytest.mark.parametrize("messages", [SINGLE, MULTI, [SYSTEM] + SINGLE, [SYSTEM] + MULTI], ids=["single", "multi", "system_single", "system_multi"])
def test_shipped_template_trains_each_reply_and_its_end_of_turn(tokenizer, messages):
    tokens = tokenize_messages(tokenizer, messages)
    assert trained_spans(tokenizer, tokens) == [reply + "<|im_end|>" for reply in replies(messages)]
    assert len(tokens["input_ids"]) == len(tokens["labels"])


def test_exact_label_vector_of_a_single_turn(tokenizer):
    tokens = tokenize_messages(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    pieces = [tokenizer.decode([t]) for t in tokens["input_ids"]]
    assert pieces == ["<|begin_of_text|>", "<|im_start|>", "user", "\n", "Hi", "<|im_end|>", "\n",
                      "<|im_start|>", "assistant", "\n", "Hello", "!", "<|im_end|>", "\n"]
    trained = [label != -100 for label in tokens["labels"]]
    assert trained == [False] * 10 + [True, True, True, False]


def test_loss_on_last_assistant_and_all(tokenizer):
    last = tokenize_messages(tokenizer, [SYSTEM] + MULTI, loss_on="last_assistant")
    assert trained_spans(tokenizer, last) == ["You are welcome! Have a nice day.<|im_end|>"]
    everything = tokenize_messages(tokenizer, [SYSTEM] + MULTI, loss_on="all")
    assert everything["labels"] == everything["input_ids"]


@pytest.mark.parametrize("family, name", masked_families("single", "multi"))
def test_real_family_templates(family, name):
    tokenizer = family_tokenizer(family)
    tokens = tokenize_messages(tokenizer, CONVERSATIONS[name])
    assert trained_spans(tokenizer, tokens) == expected_spans(family, CONVERSATIONS[name])


@pytest.mark.parametrize("family", [f for f, _ in masked_families("system_multi") if f not in REJECT_SYSTEM])
def test_real_family_templates_with_a_system_message(family):
    tokenizer = family_tokenizer(family)
    tokens = tokenize_messages(tokenizer, [SYSTEM] + MULTI)
    assert trained_spans(tokenizer, tokens) == expected_spans(family, MULTI)


@pytest.mark.parametrize("family, name", sorted(REFUSED))
def test_templates_without_an_exact_mask_are_refused_with_their_name(family, name):
    with pytest.raises(MaskError, match=REFUSED[(family, name)]):
        tokenize_messages(family_tokenizer(family), CONVERSATIONS[name])


def test_gpt_oss_trains_the_last_turn_of_a_multi_turn_conversation():
    tokenizer = family_tokenizer("gpt_oss")
    tokens = tokenize_messages(tokenizer, MULTI, loss_on="last_assistant")
    assert trained_spans(tokenizer, tokens) == expected_spans("gpt_oss", MULTI)[-1:]


@pytest.mark.parametrize("family", sorted(REJECT_SYSTEM))
def test_template_that_rejects_a_system_message_gives_a_clear_error(family):
    """Mistral's said the roles did not alternate, of conversations that alternate after their system message."""
    said = re.escape(f"{family} takes no system message (it said: {REJECT_SYSTEM[family]}")
    with pytest.raises(MaskError, match=said + r".*\); remove the system messages from the data \(and "
                                               r"dataset.system_prompt\), or use a template that takes them"):
        tokenize_messages(family_tokenizer(family), [SYSTEM] + SINGLE)
    with pytest.raises(MaskError, match=f"{family} rejected the conversation: "):  # for another reason
        tokenize_messages(family_tokenizer(family), SINGLE[:1] + SINGLE)


def test_gemma3_folds_the_system_message_into_the_first_user_turn_and_never_trains_it():
    tokenizer = family_tokenizer("gemma3")
    tokens = tokenize_messages(tokenizer, [SYSTEM] + MULTI)
    assert SYSTEM["content"] in tokenizer.decode(tokens["input_ids"])
    assert trained_spans(tokenizer, tokens) == expected_spans("gemma3", MULTI)


REASONING = [
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "<think>\nTwo and two.\n</think>\n\nIt is 4."},
    {"role": "user", "content": "3+3?"},
    {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\nIt is 6."},
]


def test_qwen3_dropping_reasoning_from_history_is_refused_unless_only_the_last_turn_trains():
    tokenizer = family_tokenizer("qwen3")
    with pytest.raises(MaskError, match="renders assistant turn 1 differently when later messages follow it"):
        tokenize_messages(tokenizer, REASONING)
    last = tokenize_messages(tokenizer, REASONING, loss_on="last_assistant")
    assert trained_spans(tokenizer, last) == ["<think>\nThree and three.\n</think>\n\nIt is 6.<|im_end|>"]


def test_deepseek_generation_prompt_that_adds_think_warns_once_and_masks_exactly(caplog):
    tokenizer = family_tokenizer("deepseekv3")
    tokenizer.name_or_path = "deepseek-warned-here"  # other tests may already have had their one warning
    with caplog.at_level("WARNING"):
        tokens = tokenize_messages(tokenizer, MULTI)
        tokenize_messages(tokenizer, MULTI)
    assert trained_spans(tokenizer, tokens) == expected_spans("deepseekv3", MULTI)
    assert sum("adds '<think>\\n'" in record.getMessage() for record in caplog.records) == 1


def test_template_without_an_end_of_turn_token_is_refused():
    tokenizer = family_tokenizer("qwen2_5")
    tokenizer.chat_template = (TEMPLATES / "bad_no_end_token.jinja").read_text()
    with pytest.raises(MaskError, match="without a special token.*could not learn to stop"):
        tokenize_messages(tokenizer, MULTI)


def test_another_models_template_set_in_the_config_is_named_with_what_its_tokenizer_lacks(tmp_path):
    """The error blamed the model's own template (data/tiny-chat-llama) for a template the user set, and did not say
    that <|eot_id|> is no special token of this tokenizer."""
    from sftkit.config import load_config
    from sftkit.data import DataError, prepare_for_training
    from sftkit.model import load_tokenizer

    template = TEMPLATES / "llama3.jinja"
    config = load_config(None, ["--dataset.chat_template", str(template), "--training.output_dir", str(tmp_path)])
    tokenizer = load_tokenizer(config.model, config.dataset)
    with pytest.raises(DataError, match=re.escape(
            f"the chat template {template} (dataset.chat_template) ends assistant turn 2 without a special token (it "
            f"renders as 'The capital of France is Paris.<|eot_id|>'; <|eot_id|> is no special token of the tokenizer "
            f"of {tokenizer.name_or_path}: the template is written for another model's tokenizer)")):
        prepare_for_training(config.dataset, tokenizer, config.training)


def test_a_template_whose_replies_end_with_markers_the_tokenizer_reads_as_text_is_warned_of(capsys, tmp_path):
    """Phi-3's template on a ChatML tokenizer was accepted without a word: every reply trained '<|end|>' as text.
    Zephyr's <|user|>, plain text in its own tokenizer, never is in a reply, and is not warned of."""
    from transformers import AutoTokenizer

    from sftkit.data import prepare_data
    from sftkit.schema import DatasetConfig

    phi3_on_chatml = AutoTokenizer.from_pretrained(TINY_MODEL)
    phi3_on_chatml.chat_template = (TEMPLATES / "phi3.jinja").read_text()
    for tokenizer, warned in ((phi3_on_chatml, True), (family_tokenizer("zephyr"), False)):
        rows = tmp_path / "rows.jsonl"
        rows.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello!"}]}) + "\n")
        prepare_data(DatasetConfig(name=str(rows)), tokenizer, max_length=256)
        said = capsys.readouterr().err
        assert (f"ends each reply with <|end|>, which the tokenizer of {TINY_MODEL} reads as plain text, not as a "
                "special token" in said) == warned, said
        assert ("<|user|>" in said) is False, said
    text = tmp_path / "text.jsonl"  # plain text rows never meet the template
    text.write_text(json.dumps({"text": "A sentence."}) + "\n")
    prepare_data(DatasetConfig(name=str(text)), phi3_on_chatml, max_length=256)
    assert "<|end|>" not in capsys.readouterr().err


def test_fallback_chatml_template_closes_turns_with_eos(tokenizer):
    tokenizer = family_tokenizer("zephyr")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokens = tokenize_messages(tokenizer, [SYSTEM] + MULTI)
    assert trained_spans(tokenizer, tokens) == [reply + "</s>" for reply in replies(MULTI)]


def test_a_model_without_a_chat_template_gets_chatml_and_the_run_says_so(tmp_path, caplog):
    import shutil

    from sftkit.model import load_tokenizer
    from sftkit.schema import DatasetConfig, ModelConfig

    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):  # the tiny model, its template left out
        shutil.copy(TINY_MODEL / name, tmp_path / name)
    tokenizer = load_tokenizer(ModelConfig(path=str(tmp_path)), DatasetConfig(name="d.jsonl"))
    assert tokenizer.chat_template == CHATML_TEMPLATE
    assert f"model.path {tmp_path} has no chat template: conversations are written in ChatML" in caplog.text
    caplog.clear()
    load_tokenizer(ModelConfig(path=str(TINY_MODEL)), DatasetConfig(name="d.jsonl"))
    assert "chat template" not in caplog.text


def test_a_template_in_tokenizer_config_beside_a_jinja_file_is_said_to_be_ignored(tmp_path, caplog):
    """transformers reads chat_template.jinja and ignores tokenizer_config.json's chat_template without a word: an
    edit there trained with the other template."""
    import json
    import shutil

    from sftkit.model import load_tokenizer
    from sftkit.schema import DatasetConfig, ModelConfig

    shutil.copytree(TINY_MODEL, tmp_path / "model")
    settings = json.loads((tmp_path / "model" / "tokenizer_config.json").read_text())
    edited = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
    (tmp_path / "model" / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": edited}))
    tokenizer = load_tokenizer(ModelConfig(path=str(tmp_path / "model")), DatasetConfig(name="d.jsonl"))
    assert tokenizer.chat_template == (TINY_MODEL / "chat_template.jinja").read_text()
    assert (f"model.path {tmp_path / 'model'} has two chat templates that differ: chat_template.jinja, which is used, "
            "and tokenizer_config.json's chat_template, which transformers ignores") in caplog.text
    caplog.clear()
    load_tokenizer(ModelConfig(path=str(tmp_path / "model")), DatasetConfig(name="d.jsonl", chat_template=edited))
    assert "two chat templates" not in caplog.text


LONG = [message for k in range(40) for message in (
    {"role": "user", "content": f"Question {k}: what comes after {k}?"},
    {"role": "assistant", "content": f"After {k} comes {k + 1}."},
)]
SPACED = [
    {"role": "user", "content": "  Spaces around  "},
    {"role": "assistant", "content": "\n\nA reply after blank lines, and a space after it "},
    {"role": "user", "content": "<b>markup</b> first"},
    {"role": "assistant", "content": "Some <b>markup</b> in the reply too."},
]


def the_old_way(monkeypatch):
    """Mask every row from its own prefix renderings, each tokenized, as before the skeletons."""
    from sftkit.data import tokenize

    monkeypatch.setattr(tokenize, "_spans_from_skeleton", lambda *args: None)
    monkeypatch.setattr(tokenize, "_spans_from_own_renderings", lambda *args: None)


def outcome(tokenizer, messages, loss_on, tools=None):
    try:
        return tokenize_messages(tokenizer, messages, loss_on, tools=tools)
    except MaskError as error:
        return str(error)


@pytest.mark.parametrize("family, name", masked_families("single", "multi", "system_multi"))
@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant"])
def test_skeletons_give_the_labels_of_the_prefix_renderings(monkeypatch, family, name, loss_on):
    tokenizer = family_tokenizer(family)
    conversations = [CONVERSATIONS[name], LONG, SPACED]
    fast = [outcome(tokenizer, messages, loss_on) for messages in conversations]
    the_old_way(monkeypatch)
    assert fast == [outcome(tokenizer, messages, loss_on) for messages in conversations]


@pytest.mark.parametrize("family, name", masked_families("single", "multi", "system_multi"))
@pytest.mark.parametrize("loss_on", ["assistant", "last_assistant"])
def test_a_rows_own_renderings_give_the_labels_of_its_tokenized_prefixes(monkeypatch, family, name, loss_on):
    """The way of rows no skeleton stands for (tools, tool calls): their prefixes rendered, not tokenized."""
    from sftkit.data import tokenize

    tokenizer = family_tokenizer(family)
    conversations = [(CONVERSATIONS[name], None), (LONG, None), (SPACED, None)]
    if family in CALL_TURNS:
        conversations.append((AGENT, TOOLS))
    monkeypatch.setattr(tokenize, "_spans_from_skeleton", lambda *args: None)
    own = [outcome(tokenizer, messages, loss_on, tools) for messages, tools in conversations]
    the_old_way(monkeypatch)
    assert own == [outcome(tokenizer, messages, loss_on, tools) for messages, tools in conversations]


def test_a_row_is_rendered_and_tokenized_once_and_its_prefixes_once_per_sequence_of_roles(monkeypatch):
    """The cost of a row grows with its tokens: prefixes are rendered once per sequence of roles, not per row."""
    tokenizer = family_tokenizer("llama3")
    tokenizer.name_or_path = "llama3-counted"  # a template key no other test has warmed
    calls = {"render": 0, "tokenize": 0}
    render, tokenize = type(tokenizer).apply_chat_template, type(tokenizer).__call__

    def counted(name, function):
        def wrapper(self, *args, **kwargs):
            calls[name] += 1
            return function(self, *args, **kwargs)
        return wrapper

    monkeypatch.setattr(type(tokenizer), "apply_chat_template", counted("render", render))
    monkeypatch.setattr(type(tokenizer), "__call__", counted("tokenize", tokenize))
    rows = [[dict(message, content=f"{message['content']} ({row})") for message in LONG] for row in range(3)]
    tokenize_messages(tokenizer, rows[0])
    first = dict(calls)
    assert first["render"] > 2 * 40  # the skeletons: the whole conversation and two prefixes per assistant turn
    for row in rows[1:]:
        tokenize_messages(tokenizer, row)
    assert calls == {"render": first["render"] + 2, "tokenize": first["tokenize"] + 2}


@pytest.mark.parametrize("family", ["llama3", "deepseekv3"])
def test_a_turn_of_weight_0_keeps_the_row_on_the_fast_way(monkeypatch, family):
    """prompt/completion rows give the prompt's assistant turns weight 0. Such rows were masked from all their
    prefixes (2.3 s for a row of 200 turns, against 14 ms), and a DeepSeek reply starting with '<' was refused."""
    from sftkit.data import tokenize

    tokenizer = family_tokenizer(family)
    weighted = [dict(message, weight=0) if index == 1 else message for index, message in enumerate(LONG)]
    weighted[3] = dict(weighted[3], content="<b>After 1</b> comes 2.")
    unweighted = [{key: value for key, value in message.items() if key != "weight"} for message in weighted]
    monkeypatch.setattr(tokenize, "_spans_from_prefixes", None)  # the old way would render every prefix
    fast = tokenize_messages(tokenizer, weighted)
    assert fast["input_ids"] == tokenize_messages(tokenizer, unweighted)["input_ids"]  # the weight is never rendered
    turns = trained_spans(tokenizer, fast)
    assert len(turns) == len(LONG) // 2 - 1 and "After 0 comes 1" not in "".join(turns)
    assert turns[0].startswith("<b>After 1</b> comes 2.")


def test_a_token_merged_across_the_start_of_a_reply_is_refused(tmp_path):
    """Real tokenizers merge '\n\n' (Qwen, Llama): a reply starting with a newline after the template's own
    'assistant\n' shares a token with the prompt. Trained, it taught the prompt's newline, under a wrong warning that
    the generation prompt adds text."""
    import json
    import shutil

    from transformers import AutoTokenizer

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(TINY_MODEL / name, tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["vocab"]["ĊĊ"] = max(spec["model"]["vocab"].values()) + 1
    merges = spec["model"]["merges"]
    merges.insert(0, ["Ċ", "Ċ"] if isinstance(merges[0], list) else "Ċ Ċ")
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    tokenizer.chat_template = (TEMPLATES / "qwen2_5.jinja").read_text()
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "additional_special_tokens": ["<|im_start|>"]})
    tokenizer.name_or_path = "qwen2_5-merging-newlines"
    assert len(tokenizer("\n\n", add_special_tokens=False)["input_ids"]) == 1
    hello = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert trained_spans(tokenizer, tokenize_messages(tokenizer, hello)) == ["Hello.<|im_end|>"]
    with pytest.raises(MaskError, match=r"qwen2_5-merging-newlines merges the end of the generation prompt with the "
                                        r"start of assistant turn 1 into one token \('\\n\\n'\)"):
        tokenize_messages(tokenizer, [hello[0], {"role": "assistant", "content": "\n\nHello."}])


@pytest.mark.parametrize("family", ["llama3", "qwen3", "phi3", "gemma3"])
@pytest.mark.parametrize("max_length", [5, 60, 333, 10_000])
def test_max_length_tokenizes_only_what_is_kept_and_the_turn_it_cuts(monkeypatch, family, max_length):
    from sftkit.data import tokenize

    tokenizer = family_tokenizer(family)
    whole = tokenize_messages(tokenizer, LONG)
    tokenized = []
    of = tokenize._Tokens.of.__func__
    monkeypatch.setattr(tokenize._Tokens, "of", classmethod(lambda cls, tok, text: tokenized.append(text) or
                                                            of(cls, tok, text)))
    monkeypatch.setattr(tokenize, "_spans_from_prefixes", None)  # the old way would tokenize every prefix
    cut = tokenize_messages(tokenizer, LONG, max_length=max_length)
    kept = len(cut["input_ids"])
    assert cut == {"input_ids": whole["input_ids"][:kept], "labels": whole["labels"][:kept]}
    # a row cut at max_length is one token longer, so that it is counted as cut
    assert kept == len(whole["input_ids"]) if max_length >= len(whole["input_ids"]) else max_length < kept
    if max_length < len(whole["input_ids"]) // 2:
        assert max(map(len, tokenized)) < len(tokenizer.apply_chat_template(LONG, tokenize=False)) // 2
    if kept > max_length + 1:  # the cut fell in an assistant turn, which is kept whole up to its end-of-turn token
        assert tokenizer.decode(cut["input_ids"][-1:]) == FAMILIES[family]["end"] and cut["labels"][-1] != -100


def test_a_special_token_inside_a_reply_does_not_end_its_mask_early():
    """The old masks trained only '<|im_end|>' here: the reply holds the special token's text, and the template has
    no end-of-turn token of its own. The row is refused before it is masked."""
    tokenizer = family_tokenizer("qwen2_5")
    tokenizer.chat_template = (TEMPLATES / "bad_no_end_token.jinja").read_text()
    tokenizer.name_or_path = "no-end-token"
    messages = [{"role": "user", "content": "Quote it"}, {"role": "assistant", "content": "<|im_end|> is the token"}]
    with pytest.raises(RowDefect, match=r"message 1 \(assistant\) holds the text '<\|im_end\|>', which the tokenizer"):
        tokenize_messages(tokenizer, messages, loss_on="last_assistant")


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("role", ["user", "assistant"])
def test_a_special_tokens_text_in_a_message_is_a_bad_row(family, role):
    """The tokenizer reads the text of its special tokens as those tokens: a reply explaining "end a turn with
    <|im_end|>" trained an end of turn in the middle of the reply, and a user message with it ended the user's turn
    early. Text that only looks like one stays text."""
    tokenizer = family_tokenizer(family)
    end = FAMILIES[family]["eos"]
    messages = [{"role": "user", "content": "How does a turn end?"}, {"role": "assistant", "content": "Like this."}]
    messages[0 if role == "user" else 1]["content"] += f" With {end} after it."
    with pytest.raises(RowDefect, match=f"message {0 if role == 'user' else 1} \\({role}\\) holds the text "
                                        f"'{re.escape(end)}', which the tokenizer reads as its special token"):
        tokenize_messages(tokenizer, messages)
    messages[0 if role == "user" else 1]["content"] = f"With {end[:-1]} {end[-1]} after it."
    if (family, "single") not in REFUSED:  # refused for its template, whatever the text
        tokenize_messages(tokenizer, messages)


@pytest.mark.parametrize("way", ["skeleton", "prefixes"])
def test_deepseek_reply_that_starts_like_the_think_tag_trains_whole(monkeypatch, way):
    """The old masks left the reply's first '<' untrained: it matched the '<think>' the generation prompt adds. Masked
    from the row's own prefixes (the way rows the skeletons cannot place take), a reply after an earlier turn was
    then refused."""
    tokenizer = family_tokenizer("deepseekv3")
    if way == "prefixes":
        the_old_way(monkeypatch)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Bold?"}, {"role": "assistant", "content": "<b>Yes</b>, bold."}]
    tokens = tokenize_messages(tokenizer, messages, loss_on="last_assistant")
    assert trained_spans(tokenizer, tokens) == ["<b>Yes</b>, bold.<｜end▁of▁sentence｜>"]
    messages[2] = {"role": "user", "content": "What does \u27eax\u27eb mean?"}  # the placeholder's brackets, as text
    tokens = tokenize_messages(tokenizer, messages, loss_on="last_assistant")
    assert trained_spans(tokenizer, tokens) == ["<b>Yes</b>, bold.<｜end▁of▁sentence｜>"]


def test_a_tokenizer_with_named_chat_templates_uses_its_default_one():
    tokenizer = family_tokenizer("qwen2_5")
    tokenizer.chat_template = {"default": (TEMPLATES / "qwen2_5.jinja").read_text(), "tool_use": CHATML_TEMPLATE}
    assert trained_spans(tokenizer, tokenize_messages(tokenizer, MULTI)) == expected_spans("qwen2_5", MULTI)


TOOL_ROUND = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}'
                                               "</tool_call>"},
              {"role": "tool", "content": '{"temp": 20}'},
              {"role": "assistant", "content": "It is 20 degrees in Paris."}]


@pytest.mark.parametrize("family", ["phi3", "zephyr", "gemma4"])
def test_a_tool_message_the_template_does_not_render_makes_a_bad_row(family):
    """Phi-3's, Zephyr's and Gemma 4's templates skip tool messages without an error: the tool's result vanished
    from the prompt, and the reply that reports it trained as if the model had made it up."""
    tokenizer = family_tokenizer(family)
    assert "temp" not in tokenizer.apply_chat_template([TOOL_ROUND], tokenize=False)[0]
    with pytest.raises(MaskError, match=rf"^message 2 \(tool\): the chat template of {family} renders no tool "
                                         "message here, so its content would be left out of what trains"):
        tokenize_messages(tokenizer, TOOL_ROUND)


@pytest.mark.parametrize("family", ["qwen2_5", "qwen3", "llama3_1", "granite3_3", "deepseekv3", "lfm2_5"])
def test_tool_messages_a_template_renders_in_its_own_way_are_kept_and_never_trained(family):
    """Llama 3.1 writes a tool's result as JSON text (its content quoted and escaped), Qwen inside <tool_response>."""
    tokenizer = family_tokenizer(family)
    tokens = tokenize_messages(tokenizer, TOOL_ROUND)
    assert "temp" in tokenizer.decode(tokens["input_ids"])
    assert not any("temp" in span for span in trained_spans(tokenizer, tokens))


def weather_call(city: str, call_id: str) -> dict:
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]}


# An agent's trace: two calls, each answered by the tool, then the reply (ids as Mistral's template demands them)
AGENT = [{"role": "user", "content": "Weather in Paris and in Rome?"}, weather_call("Paris", "call00001"),
         {"role": "tool", "tool_call_id": "call00001", "content": '{"temp": 20}'}, weather_call("Rome", "call00002"),
         {"role": "tool", "tool_call_id": "call00002", "content": '{"temp": 25}'},
         {"role": "assistant", "content": "Paris has 20 degrees, Rome 25."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# What each family's template writes for a call of get_weather(city=CITY), as that turn trains: the call and the
# token that closes the turn (gpt-oss: the model writes its recipient after `<|start|>assistant`)
CALL_TURNS = {
    "qwen2_5": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "CITY"}}\n</tool_call><|im_end|>',
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "CITY"}}\n</tool_call><|im_end|>',
    "qwen3_6": "\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nCITY\n</parameter>\n</function>\n"
               "</tool_call><|im_end|>",
    "llama3_1": '{"name": "get_weather", "parameters": {"city": "CITY"}}<|eot_id|>',
    "llama4": '<|python_start|><|python_end|>{"name": "get_weather", "parameters": {"city": "CITY"}}<|eot|>',
    "mistral_nemo": '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "CITY"}, "id": "ID"}]</s>',
    "gpt_oss": ' to=functions.get_weather<|channel|>commentary json<|message|>{"city": "CITY"}<|call|>',
    "lfm2_5": "<|tool_call_start|>[get_weather(city='CITY')]<|tool_call_end|><|im_end|>",
    # the result follows in the same turn: a pending call ends with <|tool_response>, where the model stops for it
    "gemma4": '<|tool_call>call:get_weather{city:<|"|>CITY<|"|>}<tool_call|><|tool_response>',
}


@pytest.mark.parametrize("family", sorted(CALL_TURNS))
def test_tool_calls_train_as_the_template_writes_them_and_tools_stay_in_the_prompt(monkeypatch, family):
    """Calls and tool definitions were refused: now the template renders them, each call trains as it writes it (with
    the token that ends the turn), and the definitions and the tools' results never train. Masked from the row's
    own prefix renderings, untokenized: tokenizing each prefix cost the square of the row's length."""
    from sftkit.data import tokenize

    monkeypatch.setattr(tokenize, "_spans_from_prefixes", None)
    tokenizer = family_tokenizer(family)
    tokens = tokenize_messages(tokenizer, AGENT, tools=TOOLS)
    calls = [CALL_TURNS[family].replace("CITY", city).replace("ID", call_id)
             for city, call_id in (("Paris", "call00001"), ("Rome", "call00002"))]
    assert trained_spans(tokenizer, tokens) == calls + expected_spans(family, AGENT[-1:])
    prompt = tokenizer.decode(tokens["input_ids"])
    assert "The weather of a city" in prompt and '"temp": 25' in prompt.replace('\\"', '"')


@pytest.mark.parametrize("family", ["qwen2_5", "llama3_1", "gemma4"])
@pytest.mark.parametrize("max_length", [40, 300, 100_000])
def test_a_long_agent_trace_cut_at_max_length_renders_only_the_turns_it_keeps(monkeypatch, family, max_length):
    """Each turn's mask renders the row up to that turn: a trace of 60 calls cut at max_length rendered all 60
    prefixes and tokenized the whole row (1.9 s a row for 128 calls of 4 KB results cut at 8,192 tokens; 0.13 s
    now)."""
    from sftkit.data import tokenize

    trace = [AGENT[0]] + [message for k in range(60) for message in (
        weather_call(f"City{k}", f"call{k:05d}"), {"role": "tool", "tool_call_id": f"call{k:05d}", "content": "{}"})]
    trace.append(AGENT[-1])
    tokenizer = family_tokenizer(family)
    monkeypatch.setattr(tokenize, "_spans_from_prefixes", None)
    whole = tokenize_messages(tokenizer, trace, tools=TOOLS)
    rendered, tokenized = [], []
    render, of = tokenize._rendered, tokenize._Tokens.of.__func__
    monkeypatch.setattr(tokenize, "_rendered", lambda tok, conversation, *args: rendered.append(len(conversation))
                        or render(tok, conversation, *args))
    monkeypatch.setattr(tokenize._Tokens, "of", classmethod(lambda cls, tok, text: tokenized.append(len(text)) or
                                                            of(cls, tok, text)))
    cut = tokenize_messages(tokenizer, trace, tools=TOOLS, max_length=max_length)
    kept = len(cut["input_ids"])
    assert cut == {"input_ids": whole["input_ids"][:kept], "labels": whole["labels"][:kept]}
    assert kept == len(whole["input_ids"]) if max_length >= len(whole["input_ids"]) else max_length < kept
    turns = len(trained_spans(tokenizer, cut))  # the calls the cut keeps, whole or in part
    prefixes = [count for count in rendered if count < len(trace)]  # (the whole row is rendered by the checks)
    assert max(prefixes) <= 2 * turns + 2 if max_length < len(whole["input_ids"]) else len(trace) - 1 in prefixes
    if max_length < len(whole["input_ids"]) // 4:  # tokenized only as far as the kept turns reach
        assert max(tokenized) < len(tokenizer.apply_chat_template(trace, tools=TOOLS, tokenize=False)) // 2


def test_deepseek_takes_a_calls_arguments_as_json_text():
    """DeepSeek-V3's template adds the arguments to its text, where an object fails with a TypeError; written as
    they are, not as \\u escapes."""
    tokenizer = family_tokenizer("deepseekv3")
    tokens = tokenize_messages(tokenizer, [AGENT[0], weather_call("Zürich", "call00001"), *AGENT[2:3], AGENT[-1]])
    assert trained_spans(tokenizer, tokens)[0] == (
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Zürich"}\n```'
        "<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>")


@pytest.mark.parametrize(("family", "tools", "refused"), [
    ("llama3", TOOLS, "the chat template of llama3 renders no tools, so the row's tool definitions would be left out "
                      "of the prompt; set dataset.chat_template to a template that renders tools"),
    (None, TOOLS, f"the chat template of {TINY_MODEL} renders no tools"),
    ("granite3_3", None, "message 1 \\(assistant\\): the chat template of granite3_3 renders no tool_calls, so the "
                         "turn would train without its call"),
    (None, None, f"message 1 \\(assistant\\): the chat template of {TINY_MODEL} renders no tool_calls"),
    # GLM closes no turn with a token of its own: the call would not train
    ("glm4_5", TOOLS, "the chat template of glm4_5 would train '\\\\n<think></think>' for assistant turn 1, which "
                      "is not the call of get_weather followed by an end-of-turn token"),
])
def test_a_template_that_drops_tools_or_calls_is_refused(tokenizer, family, tools, refused):
    """Templates that know no tools render the definitions and calls as nothing, without an error: the model learnt
    to call tools it was never shown, or to answer a question with an empty turn."""
    with pytest.raises(MaskError, match=f"^{refused}"):
        tokenize_messages(family_tokenizer(family) if family else tokenizer, AGENT, tools=tools)


def test_a_template_that_writes_one_of_several_calls_is_refused_naming_the_call():
    """gpt-oss's template writes only the first of a message's tool_calls: the second, of the same function, trained
    as if never made, while the prompt showed both results."""
    tokenizer = family_tokenizer("gpt_oss")
    both = {"role": "assistant", "content": "", "tool_calls": AGENT[1]["tool_calls"] + AGENT[3]["tool_calls"]}
    with pytest.raises(MaskError, match=re.escape(
            "the chat template of gpt_oss leaves out tool call 1 (get_weather) of assistant turn 1, which it renders "
            "as ' to=functions.get_weather<|channel|>commentary json<|message|>{\"city\": \"Paris\"}<|call|>'; "
            "give each assistant message one call")):
        tokenize_messages(tokenizer, [AGENT[0], both, AGENT[2], AGENT[4], AGENT[5]], tools=TOOLS)


def test_text_beside_a_call_that_the_template_drops_makes_a_bad_row():
    """Llama 3.1's template writes a call turn without its content: the error blamed a missing end-of-turn token."""
    tokenizer = family_tokenizer("llama3_1")
    said = {**AGENT[1], "content": "Let me check."}
    with pytest.raises(RowDefect, match="^the chat template of llama3_1 writes no text beside the tool calls of "
                                        "assistant turn 1 .*, so 'Let me check.' would be left out of what trains"):
        tokenize_messages(tokenizer, [AGENT[0], said, *AGENT[2:3], AGENT[-1]], tools=TOOLS)


@pytest.mark.parametrize(("where", "row", "tools"), [
    ("message 1 \\(assistant\\)'s tool call 0 \\(get_weather\\)",
     [AGENT[0], weather_call("Paris<|im_end|>", "call00001"), *AGENT[2:3], AGENT[-1]], TOOLS),
    ("tools\\[0\\] \\(get_weather\\)", AGENT, [{"type": "function", "function": {
        **TOOLS[0]["function"], "description": "Weather.<|im_end|>\n<|im_start|>assistant\nSure"}}]),
])
def test_special_token_text_in_a_call_or_a_tool_is_a_bad_row(where, row, tools):
    """Only contents were checked: a call's arguments trained a real <|im_end|> mid-call, and a tool's description
    ended the system turn inside the tool list."""
    with pytest.raises(RowDefect, match=f"^{where} holds the text '<\\|im_end\\|>', which the tokenizer reads as "
                                        "its special token"):
        tokenize_messages(family_tokenizer("qwen2_5"), row, tools=tools)


def test_call_ids_mistral_takes_are_made_for_data_that_has_others_or_none():
    """Mistral's template takes only ids of 9 letters and digits: OpenAI's `call_...` ids, and ShareGPT's calls with
    none, failed every row with the template's own words. Ids are made (the same in a call and its result; results
    without one answer the calls in order); other templates keep the data's ids."""
    openai_id = "call_Xy12abCD34efGH56ijKL78mn"
    trace = [AGENT[0], {**AGENT[1], "tool_calls": [{**AGENT[1]["tool_calls"][0], "id": openai_id}]},
             {**AGENT[2], "tool_call_id": openai_id},
             {**AGENT[3], "tool_calls": [{key: AGENT[3]["tool_calls"][0][key] for key in ("type", "function")}]},
             {key: value for key, value in AGENT[4].items() if key != "tool_call_id"}, AGENT[5]]
    tokenizer = family_tokenizer("mistral_nemo")
    tokens = tokenize_messages(tokenizer, trace, tools=TOOLS)
    text = tokenizer.decode(tokens["input_ids"])
    ids = re.findall(r'"id": "([A-Za-z0-9]{9})"', text)
    assert len(set(ids)) == 2 and re.findall(r'"call_id": "([A-Za-z0-9]{9})"', text) == ids
    assert trained_spans(tokenizer, tokens) == [CALL_TURNS["mistral_nemo"].replace("CITY", city).replace("ID", made)
                                                for city, made in zip(("Paris", "Rome"), ids)] + [
        "Paris has 20 degrees, Rome 25.</s>"]
    assert tokenize_messages(tokenizer, trace, tools=TOOLS) == tokens  # the same ids each time
    # a result whose id names no call (its call had none) answers the open call (helper-74)
    unnamed = [*trace[:4], {**trace[4], "tool_call_id": "call_elsewhere"}, trace[5]]
    paired = tokenizer.decode(tokenize_messages(tokenizer, unnamed, tools=TOOLS)["input_ids"])
    assert re.findall(r'"call_id": "(\w+)"', paired) == re.findall(r'"id": "(\w+)"', paired) == ids
    kept = tokenizer.decode(tokenize_messages(tokenizer, AGENT, tools=TOOLS)["input_ids"])  # ids Mistral takes
    assert re.findall(r'"call_id": "(\w+)"', kept) == ["call00001", "call00002"]


def test_tools_written_before_the_last_user_message_say_to_train_the_turns_after_it():
    """Mistral Nemo writes the tools before the last user message, so earlier turns' prefixes differ: the error said
    only to change the template, while the turns after the last user message train."""
    tokenizer = family_tokenizer("mistral_nemo")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}, *AGENT]
    with pytest.raises(MaskError, match=re.escape(
            "(Mistral's writes the tools before the last user message, Qwen3.6's an empty think block in the turns "
            "after it); set dataset.split_user_turns: true (each user turn's replies train in a row of their own), "
            "give the earlier assistant turns \"weight\": 0")):
        tokenize_messages(tokenizer, chat, tools=TOOLS)
    earlier = [dict(message, weight=0) if index == 1 else message for index, message in enumerate(chat)]
    assert len(trained_spans(tokenizer, tokenize_messages(tokenizer, earlier, tools=TOOLS))) == 3


THOUGHT = [{"role": "user", "content": "What is 2+2?"},
           {"role": "assistant", "content": "4.", "reasoning_content": "Two and two make four."}]
# How each thinking family's template writes that reply and its reasoning, as it trains
REASONED = {
    "qwen3": "<think>\nTwo and two make four.\n</think>\n\n4.<|im_end|>",
    "qwen3_6": "Two and two make four.\n</think>\n\n4.<|im_end|>",  # the generation prompt opens <think>
    "gpt_oss": "<|channel|>analysis<|message|>Two and two make four.<|end|><|start|>assistant<|channel|>final"
               "<|message|>4.<|return|>",  # read from `thinking`
    "lfm2_5": "<think>Two and two make four.</think>4.<|im_end|>",
}


@pytest.mark.parametrize("family", sorted(REASONED))
def test_reasoning_trains_before_its_reply_as_the_template_writes_it(family):
    """A reply's reasoning_content was refused: now it goes to the template (as `thinking` where the template reads
    that) and trains with the reply."""
    tokenizer = family_tokenizer(family)
    assert trained_spans(tokenizer, tokenize_messages(tokenizer, THOUGHT)) == [REASONED[family]]


def test_an_agents_reasoning_before_each_call_trains_with_it():
    """Qwen3 keeps the reasoning of the turns after the last user message: an agent's trace trains whole."""
    tokenizer = family_tokenizer("qwen3")
    trace = [AGENT[0], {**AGENT[1], "reasoning_content": "Paris first."}, AGENT[2],
             {**AGENT[3], "reasoning_content": "Now Rome."}, AGENT[4], AGENT[5]]
    spans = trained_spans(tokenizer, tokenize_messages(tokenizer, trace, tools=TOOLS))
    assert spans[:2] == [f"<think>\nParis first.\n</think>\n\n{CALL_TURNS['qwen3'].replace('CITY', 'Paris')}",
                         f"<think>\nNow Rome.\n</think>\n\n{CALL_TURNS['qwen3'].replace('CITY', 'Rome')}"]


def test_reasoning_a_template_would_leave_out_is_refused():
    with pytest.raises(MaskError, match="^message 1 \\(assistant\\): the chat template of qwen2_5 renders no reasoning "
                                        "\\(reasoning_content or thinking\\), so the reply would train without it"):
        tokenize_messages(family_tokenizer("qwen2_5"), THOUGHT)
    # Qwen3 drops the reasoning of the turns before the last user message: those turns cannot train as reasoned
    tokenizer = family_tokenizer("qwen3")
    chat = THOUGHT + [{"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]
    with pytest.raises(MaskError, match="^the chat template of qwen3 renders assistant turn 1 differently when later "
                                        "messages follow it"):
        tokenize_messages(tokenizer, chat)
    assert trained_spans(tokenizer, tokenize_messages(tokenizer, chat, "last_assistant")) == [
        "<think>\n\n</think>\n\n6.<|im_end|>"]


def test_reasoning_is_checked_where_only_it_could_be_lost():
    """Reasoning on a turn that does not train is context the template may leave out (as it leaves out earlier turns'
    reasoning), so such rows were refused for nothing; under loss_on all, reasoning a template drops vanished
    without a word; and a reasoning that the reply happens to contain ("Yes") passed the check."""
    chat = THOUGHT + [{"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6."}]
    untrained = [dict(message, weight=0) if index == 1 else message for index, message in enumerate(chat)]
    assert trained_spans(family_tokenizer("llama3"), tokenize_messages(family_tokenizer("llama3"), untrained)) == [
        "6.<|eot_id|>"]
    with pytest.raises(MaskError, match="^message 1 \\(assistant\\): the chat template of qwen3 leaves its reasoning "
                                        "out of the conversation"):
        tokenize_messages(family_tokenizer("qwen3"), chat, "all")
    echoed = [chat[0], {"role": "assistant", "content": "Yes, it is four.", "reasoning_content": "Yes"}, *chat[2:]]
    with pytest.raises(MaskError, match="renders assistant turn 1 differently when later messages follow it"):
        tokenize_messages(family_tokenizer("qwen3"), echoed)


def test_gemma4_writes_reasoning_before_tool_calls():
    """Gemma 4's template writes reasoning only before a call: its agent traces were refused as reasoning-free."""
    tokenizer = family_tokenizer("gemma4")
    trace = [AGENT[0], {**AGENT[1], "reasoning_content": "Paris first."}, *AGENT[2:]]
    spans = trained_spans(tokenizer, tokenize_messages(tokenizer, trace, tools=TOOLS))
    assert "Paris first." in spans[0] and spans[0].endswith(CALL_TURNS["gemma4"].replace("CITY", "Paris"))
    # before a final reply it writes none: the advice named "the earlier" turns, where the turn was the last
    with pytest.raises(MaskError, match='leave the reasoning out of such turns, or give them "weight": 0$'):
        tokenize_messages(tokenizer, THOUGHT)
