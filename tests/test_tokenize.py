"""Completion-only masks from the chat template: exactly each assistant reply plus its end-of-turn token trains."""

import pytest
from conftest import FAMILIES, REJECT_SYSTEM, TEMPLATES, family_tokenizer, trained_spans

from sftkit.data import MaskError, tokenize_messages
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
    return spans


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


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("messages", [SINGLE, MULTI], ids=["single", "multi"])
def test_real_family_templates(family, messages):
    tokenizer = family_tokenizer(family)
    tokens = tokenize_messages(tokenizer, messages)
    assert trained_spans(tokenizer, tokens) == expected_spans(family, messages)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - set(REJECT_SYSTEM)))
def test_real_family_templates_with_a_system_message(family):
    tokenizer = family_tokenizer(family)
    tokens = tokenize_messages(tokenizer, [SYSTEM] + MULTI)
    assert trained_spans(tokenizer, tokens) == expected_spans(family, MULTI)


@pytest.mark.parametrize("family", sorted(REJECT_SYSTEM))
def test_template_that_rejects_a_system_message_gives_a_clear_error(family):
    with pytest.raises(MaskError, match=f"{family} rejected the conversation: {REJECT_SYSTEM[family]}"):
        tokenize_messages(family_tokenizer(family), [SYSTEM] + SINGLE)


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


def test_fallback_chatml_template_closes_turns_with_eos(tokenizer):
    tokenizer = family_tokenizer("zephyr")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokens = tokenize_messages(tokenizer, [SYSTEM] + MULTI)
    assert trained_spans(tokenizer, tokens) == [reply + "</s>" for reply in replies(MULTI)]
