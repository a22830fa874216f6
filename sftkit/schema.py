"""The config's schema: the typed `model` and `dataset` sections, each key with its default and one line of help
(`--help model`, and the README's tables, which tests hold against it). `training` is trl.SFTConfig's."""

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

SECTIONS = ("model", "dataset", "training")


def option(default=None, help: str = "", factory=None):
    """A config field with its one line of documentation, which `--help model` prints and the README's tables
    are tested against (tests/test_config.py)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class LoraSettings:
    r: int = option(16, "adapter rank")
    lora_alpha: int = option(32, "scaling numerator, usually 2 × r")
    target_modules: list[str] | str = option(
        "all-linear", "module names, or `all-linear` for every linear layer but the output head (an adapter there "
                      "would never train: TRL reads its weight directly; list it in `modules_to_save`). `embed_tokens` "
                      "of a model that ties its output layer to it: the merged model gets an untied copy of the output "
                      "layer, so it is the model trained")
    lora_dropout: float = option(0.05, "dropout on the adapters' input, in [0, 1)")
    bias: Literal["none", "all", "lora_only"] = option("none", "`none`, `all` or `lora_only`")
    task_type: Literal["CAUSAL_LM"] = option("CAUSAL_LM", "the only PEFT task type of a causal LM")
    use_dora: bool = option(False, "weight-decomposed LoRA (slower, sometimes better)")
    use_rslora: bool = option(False, "rank-stabilized scaling (alpha / sqrt(r) instead of alpha / r)")
    modules_to_save: list[str] | None = option(
        None, "modules trained in full and saved with the adapter, e.g. `[lm_head]`")


@dataclass
class ModelConfig:
    path: str | None = option(None, "required: hub id or local directory")
    max_seq_length: int = option(2048, "longer samples are truncated (becomes `SFTConfig.max_length`)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = option(
        None, "`auto`/`null`: bfloat16 when `training.bf16` is on (full fine-tuning keeps float32 weights and computes "
              "in bf16, outside DeepSpeed, which keeps its own), else float32; or `float32`, `bfloat16` (pure bf16), "
              "`float16` (LoRA; full fine-tuning on a GPU without bf16 takes `auto` and `training.fp16: true`)")
    load_in_4bit: bool = option(
        False, "QLoRA: NF4 with double quantization, compute and storage in `dtype`; needs `use_lora`")
    use_lora: bool = option(False, "train LoRA adapters instead of every weight")
    lora_config: LoraSettings = option(help="the adapters (keys below)", factory=LoraSettings)
    merge_adapter: bool = option(
        True, "LoRA: publish the adapter merged into its base as well (the merge loads the whole base, unquantized, "
              "into host memory); false: the adapter and tokenizer alone, for a base too large for this machine")
    attn_implementation: str | None = option(
        None, "e.g. `sdpa`, `eager`, `flash_attention_2`, `flex_attention`, `torch_varlen` (PyTorch's own "
              "variable-length flash attention for packed batches, torch >= 2.11); null: `flash_attention_2` on a GPU "
              "with flash-attn installed, else the Hub's flash-attention kernel where allowed (below), else `sdpa`")
    allow_hub_kernels: bool = option(
        False, "let transformers download flash-attention from the Hub's kernels-community (`pip install kernels`); "
               "sftkit then uses it when flash-attn is not installed: packed batches need a variable-length kernel")
    cast_adapter_inputs: bool | None = option(
        None, "LoRA: copy each adapter input to the adapters' float32 (PEFT's way); null: not under bf16/fp16 mixed "
              "precision (autocast computes the adapters in 16 bits either way), except DoRA, QLoRA and DeepSpeed")
    revision: str | None = option(None, "hub branch, tag or commit; a run pins the commit it points at as it starts")
    trust_remote_code: bool = option(False, "run code shipped with the model; only for models you trust")

    @property
    def method(self) -> str:
        return "QLoRA" if self.load_in_4bit else "LoRA" if self.use_lora else "full fine-tuning"


FORMAT_NAMES = Literal[
    "messages", "sharegpt", "prompt_response", "prompt_completion", "question_answer", "alpaca", "text"
]


@dataclass
class SourceConfig:
    name: str | None = option(
        None, "required (or `sources`): hub id; a local `.jsonl` (or `.ndjson`), `.json`, `.csv` or `.parquet` file, "
              "also compressed (`.gz`, `.bz2`, `.xz`); a glob (`data/*.jsonl`); a directory of such files; or a "
              "`save_to_disk` directory")
    subset: str | None = option(None, "hub configuration name")
    split: str = option("train", "the split to train on (a local file has one: `train`; a directory's are named by "
                                 "its files)")
    format: FORMAT_NAMES | None = option(
        None, "`messages`, `sharegpt`, `prompt_response`, `prompt_completion`, `question_answer`, `alpaca` or `text` "
              "(see the README's Formats); detected from the columns when null")
    column_map: dict[str, str] | None = option(
        None, "rename columns first, `{their_name: our_name}`, e.g. `{query: prompt, reply: response}`")
    max_samples: int | None = option(None, "keep only the first N rows")
    weight: float | None = option(
        None, "when mixing `sources`: 2 uses every row twice, 0.5 a seeded half, null every row once")
    answer_source: Literal["drop", "append"] = option(
        "drop", "`question_answer` rows: `append` adds \"Source: ...\" from the `source` column to the answer")


EVAL_DATA_KEYS = ("test_size", "eval_split", "eval_sources")  # DatasetConfig's three ways to choose the eval data


@dataclass
class DatasetConfig(SourceConfig):
    sources: list[SourceConfig] | None = option(
        None, "several sources to mix, each with the keys above (see the README's Mixing)")
    eval_sources: list[SourceConfig] | None = option(None, "evaluate on these sources (same keys)")
    system_prompt: str | None = option(None, "prepended to rows that have no system message")
    test_size: float | int | None = option(
        None, "or hold out a fraction (below 1) or a count of the rows read, seeded by `training.data_seed` (else "
              "`seed`), before `sources` weights repeat rows (rows the data repeats can fall on both sides: the "
              "dry run counts them)")
    eval_split: str | None = option(None, "or evaluate on this split of the same source(s)")
    loss_on: Literal["assistant", "last_assistant", "all"] = option(
        "assistant", "`assistant`: every assistant turn; `last_assistant`: the last one that trains (weight not 0); `all`: every token")
    split_user_turns: bool = option(
        False, "train each user turn's replies in a row of its own, the earlier turns as their context: how a "
               "thinking model (Qwen3) sees its history, whose template drops the reasoning of earlier turns")
    chat_template: str | None = option(
        None, "override the tokenizer's template: a Jinja string or a path to a `.jinja` file")
    on_bad_row: Literal["error", "skip"] = option(
        "error", "`error`: stop before training at the first malformed row; `skip`: drop such rows and count them")
    sample_prompts: list[str] | None = option(
        None, "a list of user messages; the model's greedy replies are printed and saved at each evaluation and "
              "epoch end")

    def train_sources(self) -> list[SourceConfig]:
        return self.sources or [self]


def yaml_word(value) -> str:
    """A value as the config writes it: true, null."""
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def schema_table(cls, prefix: str = "") -> list[str]:
    """The Markdown rows `| key | default | meaning |` of a config section, nested sections flattened."""
    rows, hints = [], typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[item.name]):
            rows += schema_table(hints[item.name], f"{prefix}{item.name}.")
            continue
        rows.append(f"| `{prefix}{item.name}` | `{yaml_word(item.default)}` | {item.metadata.get('help', '')} |")
    return rows


def section_help(section: str) -> str:
    """`--help model` (or dataset): every key of the section with its default and meaning."""
    if section == "training":
        return ("training: every field of trl.SFTConfig (see `python -c \"from trl import SFTConfig; "
                "help(SFTConfig)\"`); sftkit sets max_length from model.max_seq_length")
    cls = {"model": ModelConfig, "dataset": DatasetConfig}[section]
    rows = [row.strip("| ").split(" | ") for row in schema_table(cls)]
    width = max(len(key) for key, _, _ in rows)
    return f"{section}:\n" + "\n".join(f"  {key.strip('`'):<{width}}  {default.strip('`'):<20}  {meaning}"
                                      for key, default, meaning in rows)


@dataclass
class RunConfig:
    model: ModelConfig
    dataset: DatasetConfig
    training: Any  # trl.SFTConfig
    source: Path  # the YAML file it came from
    resolved: dict  # the three sections as finally used, for printing and saving
    speed: list = field(default_factory=list)  # the fast-path choices (sftkit.fastpath.Choice)
