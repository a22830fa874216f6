"""Rows -> chat messages -> input_ids + labels, ready for TRL's SFTTrainer."""

from dataclasses import dataclass

from sftkit.config import DatasetConfig
from sftkit.data.formats import DataError, detect_format, to_messages
from sftkit.data.load import load_rows
from sftkit.data.tokenize import IGNORE_INDEX, MaskError, tokenize_messages

__all__ = ["DataError", "MaskError", "PreparedData", "prepare_data", "tokenize_messages"]


@dataclass
class PreparedData:
    train: object  # datasets.Dataset with input_ids and labels
    eval: object | None
    format: str
    rows: int  # train rows read
    dropped: int  # train rows with no trainable token within max_length
    trainable_tokens: int  # trained tokens in one epoch of the train rows
    sample_prompt: list[dict]  # the messages before the first reply of the first eval (else train) row


def prepare_data(cfg: DatasetConfig, tokenizer, max_length: int, seed: int = 42, num_proc: int | None = None):
    train_rows, eval_rows = load_rows(cfg, seed)
    format_name = cfg.format or detect_format(train_rows.column_names)
    train, dropped, trainable_tokens = _tokenize(train_rows, cfg, format_name, tokenizer, max_length, num_proc)
    if len(train) == 0:
        raise DataError(f"dataset {cfg.name}: no row has a trainable token within model.max_seq_length {max_length}")
    evaluation = None
    if eval_rows is not None:
        evaluation = _tokenize(eval_rows, cfg, format_name, tokenizer, max_length, num_proc)[0]
    sample_prompt = _prompt_of((eval_rows or train_rows)[0], format_name, cfg.system_prompt)
    return PreparedData(train, evaluation, format_name, len(train_rows), dropped, trainable_tokens, sample_prompt)


def _prompt_of(row: dict, format_name: str, system_prompt: str | None) -> list[dict]:
    messages = to_messages(row, format_name, system_prompt)
    first_reply = next(index for index, message in enumerate(messages) if message["role"] == "assistant")
    return messages[:first_reply]


def _tokenize(rows, cfg: DatasetConfig, format_name: str, tokenizer, max_length: int, num_proc: int | None):
    """Tokenize every row (cached by `datasets`), then drop the rows that truncation leaves with nothing to train."""
    tokenized = rows.map(
        _tokenize_row,
        with_indices=True,
        remove_columns=rows.column_names,
        num_proc=num_proc,
        fn_kwargs={
            "tokenizer": tokenizer,
            "format_name": format_name,
            "system_prompt": cfg.system_prompt,
            "loss_on": cfg.loss_on,
            "max_length": max_length,
            "source": cfg.name,
        },
    )
    kept = tokenized.filter(lambda count: count > 0, input_columns="trainable_tokens", num_proc=num_proc)
    trainable_tokens = sum(kept["trainable_tokens"])
    return kept.remove_columns("trainable_tokens"), len(tokenized) - len(kept), trainable_tokens


def _tokenize_row(row, index, tokenizer, format_name, system_prompt, loss_on, max_length, source):
    try:
        messages = to_messages(row, format_name, system_prompt)
        tokens = tokenize_messages(tokenizer, messages, loss_on)
    except ValueError as error:
        raise DataError(f"dataset {source}, row {index}: {error}") from None
    trainable = sum(label != IGNORE_INDEX for label in tokens["labels"][:max_length])
    return {**tokens, "trainable_tokens": trainable}
