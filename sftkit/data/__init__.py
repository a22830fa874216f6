"""Sources -> rows -> chat messages -> input_ids + labels, mixed and split, ready for TRL's SFTTrainer."""

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from sftkit import compat
from sftkit.data.formats import (
    READS,
    RowDefect,
    detect_format,
    refuse_missing_columns,
    split_at_user_turns,
    to_messages,
    to_text,
    tools_of,
    with_system,
)
from sftkit.data.load import load_source, row_place, source_files
from sftkit.data.tokenize import (
    IGNORE_INDEX,
    SPLIT_ADVICE,
    MaskError,
    TemplateLacks,
    special_token_text,
    tokenize_messages,
    tokenize_text,
    warn_of_markers_trained_as_text,
)
from sftkit.engines import is_main_process
from sftkit.errors import DataError, not_utf8
from sftkit.paths import is_pattern, local_files, named_splits, resolve_path, saved_by_datasets, splits_of
from sftkit.schema import DatasetConfig, SourceConfig

logger = logging.getLogger(__name__)

__all__ = ["DataError", "MaskError", "PreparedData", "prepare_data", "prepare_for_training", "tokenize_messages"]
HELPER_COLUMNS = ["source", "row", "trainable_tokens", "prompt_tokens", "problem", "tokens_digest"]
BAD_ROW, NOTHING_TO_TRAIN = "bad rows", "with nothing to train within max_seq_length"
# training.dataset_num_proc left out: a source of at least MIN_ROWS_FOR_PROCESSES rows is prepared by one process per
# usable core, at most MAX_PROCESSES. A worker costs a fork, a copy of the tokenizer (megabytes for real ones) and
# its own cache shard, and rows cost about 0.3 ms each (the tiny tokenizer, short chats, one process on this 2-core
# VM). On that VM, shared and loaded, two processes did not pay even at 12,800 rows (4.4-4.9 s against 4.7 s); on
# idle cores the start-up (~0.05 s measured at 320 rows, more for large tokenizers) is repaid within a few thousand
# rows. 10,000 rows is ~3 s of work in one process: below it there is little to gain and a loaded machine loses.
MIN_ROWS_FOR_PROCESSES = 10_000
MAX_PROCESSES = 8
# Raised whenever the same config and files give other rows, tokens or labels, so that a resume can say its checkpoint
# trained on rows prepared another way. 1: checkpoints saved before it was recorded. 2 (2026-11-27): rows with tool
# calls or reasoning refused, CSV cells reading None or NA kept as text, a token merged across a reply's start
# refused (and, since 2026-11-26, the eval split before source weights, rows kept by the trainer's window).
# 3 (2026-11-28): OpenAI content parts joined into text (such rows were bad rows), rows cut at max_length one token
# longer. 4 (2026-11-28): a folder reads its data files only, as one split unless each is named for one; a row's
# system column, an alpaca input of 0, numbers in text columns and ShareGPT weights read; a message holding a special
# token's text refused. 5 (2026-11-28): LLaMA-Factory's alpaca history read as the earlier turns, weight 0 on a
# prompt turn accepted, and refused under loss_on all (which trained it). 6 (2026-11-28): the held-out rows and the
# sources' weighted samples seeded by training.data_seed where it is set and differs from seed. 7 (2026-11-28): a
# system column beside messages read as the row's system message; OpenAI's developer role (its system message) and
# the Responses API's input_text and output_text parts read. 8 (2026-11-29): call ids made for Mistral's templates,
# which refused rows whose ids were not 9 letters and digits.
PREPARATION = 8


def describe_dropped(dropped: dict[str, int], only_some: bool = False) -> str:
    """'0 bad rows, 1 with nothing to train within max_seq_length' (only_some: the reasons some row was dropped for)."""
    return ", ".join(f"{count} {reason.removesuffix('s') if count == 1 and reason == BAD_ROW else reason}"
                     for reason, count in dropped.items() if count or not only_some)


def split_words(pieces: int | None) -> str:
    """' (split at user turns into 31)' where dataset.split_user_turns made the rows read into more rows."""
    return f" (split at user turns into {pieces:,})" if pieces is not None else ""


@dataclass
class PreparedData:
    train: object  # datasets.Dataset with input_ids and labels
    eval: object | None
    formats: list[str]  # of each train source
    rows_per_source: list[int]  # train rows of each train source, in the order `train` holds them
    rows: int  # train rows read from the sources (before mixing weights)
    dropped: dict[str, int]  # train rows dropped, by reason
    trainable_tokens: int  # trained tokens in one epoch of the train rows
    sample_prompts: list[list[dict]]  # dataset.sample_prompts, else the first eval (or train) row up to its reply
    sample_tools: list[dict] | None  # the tool definitions of that row, which the sample prompts are asked with
    # token count of every kept train row, before truncation (keeping the start, up to the end of the turn it is cut in)
    lengths: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what was wrong with the first skipped bad rows
    eval_dropped: dict[str, int] = field(default_factory=dict)  # rows of eval_sources or eval_split dropped, by reason
    # max_length where rows were tokenized only as far as the trainer keeps them: a length past it is a lower bound
    measured_to: int | None = None
    eval_also_trained: int = 0  # eval rows that are also train rows, token for token
    pieces: int | None = None  # the train rows read once split at user turns (dataset.split_user_turns)

    def sources_words(self, cfg: DatasetConfig) -> str:
        """'data/chat.jsonl as 'messages', faq.csv as 'question_answer'': each train source and the format it is read as."""
        return ", ".join(f"{source.name} as {name!r}" for source, name in zip(cfg.train_sources(), self.formats))

    def split_words(self) -> str:
        return split_words(self.pieces)

    def longest_row(self) -> int:
        """The tokens of the longest train or eval row, before truncation."""
        return max(pc.max(pc.list_value_length(ids)).as_py() or 0 for ids in self._input_ids())

    def largest_token_id(self) -> int:
        """The largest token id in the train and eval rows."""
        return max(pc.max(pc.list_flatten(ids)).as_py() or 0 for ids in self._input_ids())

    def repeated_words(self) -> str:
        """' (3 eval rows are also train rows, token for token)': rows the data repeats fall on both sides of
        test_size's split, and their eval loss measures recall, not what the model learned."""
        repeated = self.eval_also_trained
        if not repeated:
            return ""
        return f" ({repeated} eval row{'s are' if repeated > 1 else ' is'} also train rows, token for token)"

    def _input_ids(self) -> list:
        """The input_ids column of the train rows and of the eval rows, where there are any."""
        return [_column(rows, "input_ids") for rows in (self.train, self.eval) if rows is not None and len(rows)]

    def length_words(self, length: int) -> str:
        """'1,644', or 'more than 256' for a row measured only past max_length."""
        return f"more than {self.measured_to:,}" if self.measured_to and length > self.measured_to else f"{length:,}"

    def kept(self, args) -> tuple[int, int]:
        """(tokens of an epoch the trainer keeps, rows it cuts to max_length): long rows are cut unless packing
        splits them (trainer_keeps)."""
        if trainer_keeps(args) == "all":
            return sum(self.lengths), 0
        return (sum(min(length, args.max_length) for length in self.lengths),
                sum(length > args.max_length for length in self.lengths))

    def dropped_words(self) -> str:
        """'; dropped 18 bad rows (the first: ...), ...' for the plan, before training; '' when none was dropped."""
        first = f" (the first: {self.problems[0]})" if self.dropped[BAD_ROW] and self.problems else ""
        bad = describe_dropped({BAD_ROW: self.dropped[BAD_ROW]}, only_some=True) + first
        parts = ", ".join(filter(None, [bad, describe_dropped({NOTHING_TO_TRAIN: self.dropped[NOTHING_TO_TRAIN]},
                                                              only_some=True)]))
        eval_parts = describe_dropped(self.eval_dropped, only_some=True)
        return ((f"; dropped {parts}" if parts else "")
                + (f"; dropped from the eval data {eval_parts}" if eval_parts else ""))


def prepare_for_training(cfg: DatasetConfig, tokenizer, args):
    """prepare_data with the run's SFTConfig: rows are tokenized only as far as the trainer will keep them. The
    held-out rows and the sources' weighted samples are seeded as the Trainer seeds its data order: by data_seed
    where it is set, else by seed, so that a sweep over seeds with data_seed fixed evaluates on the same rows."""
    keeps = trainer_keeps(args)
    seed = args.seed if args.data_seed is None else args.data_seed
    return prepare_data(cfg, tokenizer, args.max_length, seed, args.dataset_num_proc, keeps, keeps == "start")


def trainer_keeps(args) -> str:
    """Which tokens of a row longer than max_length TRL 1.16 trains: 'start' unpacked with truncation_mode
    keep_start, or packed best-fit ('bfd' cuts each row); 'end' unpacked with keep_end; 'all' when packing splits
    long rows ('bfd_split', 'wrapped')."""
    if args.packing:
        return "start" if args.packing_strategy == "bfd" else "all"
    return "end" if args.truncation_mode == "keep_end" else "start"


def prepare_data(cfg: DatasetConfig, tokenizer, max_length: int, seed: int = 42, num_proc: int | None = None,
                 keeps: str = "start", truncate: bool = False):
    """num_proc None: one process per usable core for large sources (see MIN_ROWS_FOR_PROCESSES).
    keeps: the tokens of a long row the trainer trains (trainer_keeps); a row with no trainable token among them is
    dropped. truncate (with keeps 'start' only): tokenize a conversation only as far as max_length keeps it (its
    first max_length tokens and the rest of the assistant turn the cut falls in)."""
    if truncate and keeps != "start":
        raise ValueError(f"truncate keeps the start of each row, but the trainer keeps {keeps!r}")
    if cfg.system_prompt and (token := special_token_text(tokenizer, cfg.system_prompt)):
        raise DataError(f"dataset.system_prompt holds the text {token!r}, which the tokenizer reads as its special "
                        "token, not as text, in every row; reword it")
    prepare = _Preparation(cfg, tokenizer, max_length, num_proc, keeps, truncate)
    sources = cfg.train_sources()
    if is_main_process():
        _warn_of_files_not_read(cfg)
        _warn_of_rows_both_trained_and_evaluated_on(cfg)
    train_parts = [prepare.source(source, _train_key(cfg, i), train=True) for i, source in enumerate(sources)]
    if not any(len(rows) for rows, _ in train_parts):
        raise DataError(prepare.nothing_to_train())
    train_rows = [rows for rows, _ in train_parts]
    evaluation = None
    if cfg.eval_sources:
        parts = [prepare.source(source, f"dataset.eval_sources[{i}]") for i, source in enumerate(cfg.eval_sources)]
        evaluation = _mix([(rows, None) for rows, _ in parts], seed)
    elif cfg.eval_split:
        parts = [prepare.source(source, _train_key(cfg, i), split=cfg.eval_split) for i, source in enumerate(sources)]
        evaluation = _mix([(rows, None) for rows, _ in parts], seed)
    elif cfg.test_size is not None:
        train_rows, evaluation = _split_off_eval(train_rows, [position for position, _ in prepare.tokenized],
                                                 cfg.test_size, seed, by_conversation=cfg.split_user_turns)
    train = _mix([(rows, source.weight) for rows, source in zip(train_rows, sources)], seed)
    if evaluation is not None and len(evaluation) == 0:
        raise DataError(f"the eval data has no row with a trainable token within max_seq_length {max_length}: "
                        "every eval row was dropped")
    if len(train) == 0:  # rows were kept, but weight x rows rounded to none of them
        raise DataError("the dataset.sources weights leave no train row (each keeps round(weight x rows)); raise "
                        "them")
    repeated = _eval_rows_also_trained(train, evaluation)
    if is_main_process() and repeated > len(evaluation or ()) / 2 and not both_trained_and_evaluated_on(cfg):
        logger.warning(f"{repeated} of the {len(evaluation)} eval rows are also train rows, token for token, so the "
                       "eval loss measures recall more than learning; remove those rows from the train or the eval "
                       "data")
    first = evaluation[0] if evaluation is not None and len(evaluation) else train[0]
    return PreparedData(
        train=train.remove_columns(HELPER_COLUMNS),
        eval=evaluation.remove_columns(HELPER_COLUMNS) if evaluation is not None else None,
        formats=[format_name for _, format_name in train_parts],
        rows_per_source=_mixed_counts([(rows, source.weight) for rows, source in zip(train_rows, sources)]),
        rows=prepare.rows_read,
        dropped=prepare.dropped,
        trainable_tokens=pc.sum(_column(train, "trainable_tokens")).as_py() or 0,
        sample_prompts=prepare.sample_prompts(first),
        sample_tools=prepare.tools_of(first),
        lengths=pc.list_value_length(_column(train, "input_ids")).to_pylist(),
        problems=prepare.problems,
        eval_dropped=prepare.eval_dropped,
        measured_to=max_length if truncate else None,
        eval_also_trained=repeated,
        pieces=sum(len(rows) for _, rows in prepare.tokenized)
        if cfg.split_user_turns and any(name != "text" for _, name in train_parts) else None,
    )


def _eval_rows_also_trained(train, evaluation) -> int:
    """Eval rows whose tokens a train row has too (by the digest each row got as it was tokenized)."""
    if evaluation is None:
        return 0
    trained = _column(train, "tokens_digest").combine_chunks()
    return pc.sum(pc.is_in(_column(evaluation, "tokens_digest"), value_set=trained)).as_py() or 0


def _warn_of_files_not_read(cfg: DatasetConfig) -> None:
    """A folder's files of a split the run reads nowhere (test_cases.jsonl beside train_math.jsonl) are not trained
    on, and where any file is named for no split, those named for another split are: say so, and what to do."""
    trains = {(_folder(source), source.split) for source in cfg.train_sources()}
    evaluates = {(_folder(source), source.split) for source in cfg.eval_sources or []}
    evaluates |= {(folder, cfg.eval_split) for folder, _ in trains if cfg.eval_split}
    for folder in sorted({folder for folder, _ in trains | evaluates if folder is not None}):
        named = named_splits(folder)
        splits = splits_of(named)
        for split, files in splits.items():
            if (folder, split) not in trains | evaluates:
                logger.warning(f"dataset {folder}: {_some_files(folder, files)} named for split {split!r}, which this "
                               "run reads nowhere"
                               + (f"; evaluate on it with dataset.eval_split: {split}" if split != "train" else ""))
        merged = [file for file, split in named.items() if split not in (None, "train") or _named_like_a_split(file)]
        if list(splits) == ["train"] and merged:
            unnamed = next((Path(file).name for file, split in named.items() if split is None), None)
            why = f"as {unnamed} is named for none" if unnamed else "as datasets reads split names in lower case only"
            logger.warning(f"dataset {folder}: {_some_files(folder, merged)} named for a split but trained on with "
                           f"the rest, {why} (train*, test* or eval*, validation* or dev*); name every file for its "
                           "split, in lower case, to evaluate on one")


def both_trained_and_evaluated_on(cfg: DatasetConfig) -> list[str]:
    """The data dataset.eval_split (the split trained on) or eval_sources (a train file, a folder's split, a hub
    dataset's) evaluates on that is also trained on: an eval loss there measures what the model remembers."""
    trains = {part for source in cfg.train_sources() for part in _parts(source, source.split)}
    evaluates = {part for source in cfg.eval_sources or [] for part in _parts(source, source.split)}
    evaluates |= {part for source in cfg.train_sources() if cfg.eval_split for part in _parts(source, cfg.eval_split)}
    return sorted(trains & evaluates)


def _warn_of_rows_both_trained_and_evaluated_on(cfg: DatasetConfig) -> None:
    for place in both_trained_and_evaluated_on(cfg):
        logger.warning(f"dataset {place} is both trained and evaluated on, so the eval loss measures memory, not "
                       "learning; evaluate on other rows, or hold out rows with dataset.test_size")


def _parts(source: SourceConfig, split: str) -> set[str]:
    """The pieces of data a source reads as `split`, named alike whichever way the config names them: each file of a
    file or a glob, a folder's split, a hub dataset's split."""
    folder = _folder(source)
    if folder is not None:
        return {f"{folder}: split {split!r}"}
    files = local_files(source.name)
    if files:
        return {str(Path(file).resolve()) for file in files}
    subset = f" ({source.subset})" if source.subset else ""
    return {f"{source.name}{subset}: split {split!r}"}


def _folder(source: SourceConfig) -> Path | None:
    """The folder of data files a source names; None for anything else."""
    folder = Path(resolve_path(source.name))
    return folder.resolve() if folder.is_dir() and not saved_by_datasets(folder) else None


def _named_like_a_split(file: str) -> bool:
    """Test.jsonl, VALID-1.csv: named for a split in capitals, which datasets does not read as one."""
    return re.match(r"(test|testing|eval|evaluation|validation|valid|dev|val)([-._ 0-9]|$)",
                    Path(file).name.lower()) is not None and not re.match(r"[a-z]", Path(file).name)


def _some_files(folder: Path, files: list[str]) -> str:
    names = [str(Path(file).relative_to(folder)) for file in files]
    return (", ".join(names[:3]) + (" ..." if len(names) > 3 else "")) + (" is" if len(names) == 1 else " are")


def _column(rows, name: str):
    """A whole column as one Arrow array. datasets 5.2's rows[name] is a Column that decodes row by row in Python: 5.3 s
    for the lengths of 224,000 rows on a cache hit, against 0.75 s so."""
    return rows.with_format("arrow")[name]


class _Preparation:
    """Tokenizes sources one at a time, counting what it drops and keeping the raw rows for the sample prompt."""

    def __init__(self, cfg: DatasetConfig, tokenizer, max_length: int, num_proc: int | None, keeps: str,
                 truncate: bool):
        self.cfg, self.tokenizer, self.max_length, self.num_proc = cfg, tokenizer, max_length, num_proc
        self.truncate = truncate
        self.kept = {"start": slice(None, max_length), "end": slice(-max_length, None), "all": slice(None)}[keeps]
        self.raw: list[tuple] = []  # (rows, format, source) of each source prepared; rows name theirs by position
        self.rows_read = 0
        self.dropped = {BAD_ROW: 0, NOTHING_TO_TRAIN: 0}
        self.eval_dropped = {BAD_ROW: 0, NOTHING_TO_TRAIN: 0}
        self.problems: list[str] = []
        self.tokenized: list[tuple] = []  # (position in raw, rows) of each train source, before any row is dropped
        self.template_checked = False  # warn_of_markers_trained_as_text, at the first source of chat rows

    def source(self, source: SourceConfig, key: str, train: bool = False, split: str | None = None):
        """Tokenize one source (`key`: where it is in the config, for errors), counting the rows it drops."""
        rows = load_source(source, split, key)
        format_name = source.format or detect_format(rows.column_names, source.name)
        refuse_missing_columns(rows.column_names, format_name, f"dataset {source.name}")
        if format_name == "text" and is_main_process():
            self._warn_of_settings_text_ignores(source)
        elif is_main_process() and not self.template_checked:  # chat rows meet the template: once per run
            warn_of_markers_trained_as_text(self.tokenizer)
            self.template_checked = True
        if is_main_process():
            _warn_of_system_columns_not_read(rows.column_names, source, format_name)
        if format_name == "messages" and is_main_process():
            _warn_of_speaker_names(rows, source)
        if format_name in ("messages", "sharegpt") and is_main_process():
            _warn_of_calls_without_tools(rows, source, format_name)
        position = len(self.raw)
        self.raw.append((rows, format_name, source))
        num_proc = self.num_proc or _processes_for(len(rows))
        tokenized = self.tokenize(rows, format_name, source, position, num_proc, self.truncate, split)
        kept = tokenized.filter(lambda count: count > 0, input_columns="trainable_tokens", num_proc=num_proc)
        problems = [problem for problem in _column(tokenized, "problem").to_pylist() if problem]
        dropped = self.dropped if train else self.eval_dropped
        dropped[BAD_ROW] += len(problems)
        dropped[NOTHING_TO_TRAIN] += len(tokenized) - len(kept) - len(problems)
        if train:  # the problems are what the plan and --inspect show beside the train rows dropped
            self.tokenized.append((position, tokenized))
            self.rows_read += len(rows)
            self.problems += problems[: 5 - len(self.problems)]
        return kept, format_name

    def _warn_of_settings_text_ignores(self, source: SourceConfig) -> None:
        """Plain text rows train every token as written: no system prompt, no turns to choose from."""
        ignored = [f"dataset.{key} {value}" for key, value in (("system_prompt", repr(self.cfg.system_prompt)),
                                                                ("loss_on", self.cfg.loss_on),
                                                                ("split_user_turns", "true"))
                   if getattr(self.cfg, key) not in (None, False, "assistant", "all")]
        if ignored:
            logger.warning(f"dataset {source.name} is plain text, whose rows train every token as written: "
                           f"{' and '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} nothing to them")

    def tokenize(self, rows, format_name: str, source: SourceConfig, position: int, num_proc: int | None,
                 truncate: bool, split: str | None = None):
        arguments = {
            "tokenizer": self.tokenizer,
            "format_name": format_name,
            "system_prompt": self.cfg.system_prompt,
            "answer_source": source.answer_source,
            "loss_on": self.cfg.loss_on,
            "split": self.cfg.split_user_turns,
            "kept": self.kept,
            "cut": self.max_length if truncate else None,
            "source_position": position,
            "where": f"dataset {source.name}",
            "files": source_files(source, split),
            "name_the_file": is_pattern(source.name) or Path(resolve_path(source.name)).is_dir(),
            "skip_bad_rows": self.cfg.on_bad_row == "skip",
            "code": compat.data_code_digest(),
        }
        return rows.map(_tokenize_rows, with_indices=True, batched=True, remove_columns=rows.column_names,
                        num_proc=num_proc, fn_kwargs=arguments, features=_tokenized_features(),
                        cache_file_name=compat.cache_away_from_the_users_data(rows, arguments))

    def nothing_to_train(self) -> str:
        """Why every train row was dropped, and what to change."""
        where = f"dataset {self.cfg.name or 'sources'}"
        if not self.dropped[NOTHING_TO_TRAIN]:
            return (f"{where}: every one of the {self.rows_read} rows is bad and was skipped; the first: "
                    f"{self.problems[0] if self.problems else 'unknown'}")
        prompts, lengths = [], []
        for position, tokenized in self.tokenized:
            if self.truncate:  # rows were tokenized only as far as max_length: the advice needs their whole length
                rows, format_name, source = self.raw[position]
                tokenized = self.tokenize(rows, format_name, source, position, self.num_proc, truncate=False)
            good = tokenized.filter(lambda problem: not problem, input_columns="problem")
            prompts += _column(good, "prompt_tokens").to_pylist()
            lengths += pc.list_value_length(_column(good, "input_ids")).to_pylist()
        return (f"{where}: no row has a trainable token within max_seq_length {self.max_length}: replies start "
                f"after at least {min(prompts)} prompt tokens and the longest row has {max(lengths)} tokens; set "
                f"model.max_seq_length to {max(lengths)} or more to keep every row whole")

    def sample_prompts(self, first_example: dict) -> list[list[dict]]:
        if self.cfg.sample_prompts:
            return [with_system([{"role": "user", "content": prompt}], self.cfg.system_prompt)
                    for prompt in self.cfg.sample_prompts]
        prompt = self.prompt_of(first_example)
        return [prompt] if prompt else []

    def tools_of(self, example: dict) -> list[dict] | None:
        row, format_name, _ = self._raw_row(example)
        return None if format_name == "text" else tools_of(row, format_name)

    def prompt_of(self, example: dict) -> list[dict] | None:
        row, format_name, source = self._raw_row(example)
        if format_name == "text":
            return None
        messages = to_messages(row, format_name, self.cfg.system_prompt, source.answer_source)
        return messages[: next(i for i, message in enumerate(messages) if message["role"] == "assistant")]

    def _raw_row(self, example: dict) -> tuple[dict, str, SourceConfig]:
        """The row a tokenized example was made from, with its source's format and config."""
        rows, format_name, source = self.raw[example["source"]]
        return rows[example["row"]], format_name, source


def _warn_of_system_columns_not_read(columns: list[str], source: SourceConfig, format_name: str) -> None:
    """A column of system prompts under another name (OpenOrca's system_prompt) is not read: the rows trained without
    the system turn their data gives them, and nothing said so (helper-78). Other columns (ids, metadata) are left
    unread in silence."""
    unread = [column for column in columns if column not in READS[format_name]
              and re.fullmatch(r"(sys|system)[ _]?(prompt|message|instruction)s?", column.lower())]
    if unread and format_name != "text":
        logger.warning(f"dataset {source.name}: column {unread[0]} is not read (format {format_name} takes a row's "
                       f"system prompt from a column named system), so the rows train without it; to read it, map "
                       f"it: column_map: {{{unread[0]}: system}}")


def _warn_of_speaker_names(rows, source: SourceConfig, looked_at: int = 100) -> None:
    """OpenAI's multi-party chats name each speaker (`name`), which sftkit does not pass to the chat template (few
    render it): said once, from the first rows, as the turns then train without saying who speaks."""
    try:
        named = next((index for index, row in enumerate(rows.select(range(min(looked_at, len(rows)))))
                      if isinstance(row.get("messages"), list) and any(
                          isinstance(message, dict) and message.get("name")
                          and message.get("role") not in ("tool", "function")
                          for message in row["messages"])), None)  # a tool message's name is its function's
    except UnicodeDecodeError:  # a row that is not UTF-8: tokenizing names it (or skips it)
        return
    if named is not None:
        logger.warning(f"dataset {source.name}: messages name their speaker (\"name\", row {named + 1} first), which "
                       "sftkit does not pass to the chat template: the turns train without it; write the names into "
                       "the content if they matter")


def _warn_of_calls_without_tools(rows, source: SourceConfig, format_name: str, looked_at: int = 100) -> None:
    """A row that calls tools without their definitions trains the calls on a prompt that shows no tools, as a
    template that renders none would (which is refused); said once, from the first rows: a system message may
    describe the tools in its own words (glaive's), which sftkit cannot tell."""
    try:
        first = next(((index, undefined) for index, row in enumerate(rows.select(range(min(looked_at, len(rows)))))
                      if (undefined := _undefined_calls(row, format_name))), None)
    except UnicodeDecodeError:  # a row that is not UTF-8: tokenizing names it (or skips it)
        return
    if first is None:
        return
    index, (names, defined) = first
    what = f"calls {', '.join(names)}, which its tools do not define" if defined else \
        "calls tools but defines none (no tools column)"
    logger.warning(f"dataset {source.name}: row {index + 1} (and maybe others) {what}: its prompt does not show them, "
                   "so the model learns to call tools it is not shown; give each row the definitions of the tools it "
                   "calls, unless its system message describes them")


def _undefined_calls(row: dict, format_name: str) -> tuple[list[str], bool] | None:
    """(the names the row calls that its tools do not define, whether it defines any), or None."""
    try:
        messages, tools = to_messages(row, format_name), tools_of(row, format_name) or []
    except ValueError:  # a bad row: tokenizing names it, or skips it
        return None
    defined = {tool["function"]["name"] for tool in tools}
    called = {call["function"]["name"] for message in messages for call in message.get("tool_calls", [])}
    return (sorted(called - defined), bool(tools)) if called - defined else None


def _train_key(cfg: DatasetConfig, index: int) -> str:
    """Where train source `index` is in the config, for error messages."""
    return f"dataset.sources[{index}]" if cfg.sources else "dataset"


def _processes_for(rows: int) -> int | None:
    """The processes that prepare a source of `rows` rows when training.dataset_num_proc is left out."""
    if rows < MIN_ROWS_FOR_PROCESSES:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_PROCESSES) if cores > 1 else None


def _tokenized_features():
    """The tokenized rows' columns, given: inferred, a first batch of bad rows alone (their input_ids empty) typed
    input_ids as a list of nulls, and the next batch's ids could not be cast to it."""
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int64")), "labels": List(Value("int64")), "problem": Value("string"),
                     **{column: Value("int64") for column in HELPER_COLUMNS if column != "problem"}})


def _tokenize_rows(rows: dict, indices: list[int], **arguments) -> dict:
    """A batch of rows tokenized: a row each, or one for each user turn where dataset.split_user_turns says so."""
    tokenized = [piece for row, index in zip(compat.rows_of(rows), indices)
                 for piece in _tokenize_row(row, index, **arguments)]
    return {column: [piece[column] for piece in tokenized] for column in ["input_ids", "labels", *HELPER_COLUMNS]}


def _tokenize_row(row, index, tokenizer, format_name, system_prompt, answer_source, loss_on, split, kept, cut,
                  source_position, where, files, name_the_file, skip_bad_rows, code) -> list[dict]:
    try:
        if format_name == "text":
            pieces = [tokenize_text(tokenizer, to_text(row))]
        else:
            messages = to_messages(row, format_name, system_prompt, answer_source)
            pieces = _tokenize_conversation(tokenizer, messages, loss_on, split, cut, tools_of(row, format_name))
    except ValueError as error:
        # 1-based: the line of a JSON Lines or CSV file, else the row
        place = f"row {index + 1}"
        if files and (found := row_place(files, index)):
            file, place = found
            where = f"dataset {file}" if name_the_file else where
        if isinstance(error, UnicodeDecodeError):  # Arrow keeps the bytes and decodes them when the row is read
            problem, _, fix = not_utf8(f"{where} {place}", error).rpartition("; ")
        else:
            problem = f"{where} {place}: {error}"
            fix = "fix or remove the row, or set dataset.on_bad_row: skip" if isinstance(error, RowDefect) else None
        if not skip_bad_rows or isinstance(error, TemplateLacks):  # the config's fault: skip would drop every such row
            raise DataError(f"{problem}; {fix}" if fix else problem) from None
        return [{"input_ids": [], "labels": [], "source": source_position, "row": index, "trainable_tokens": 0,
                 "prompt_tokens": 0, "problem": problem, "tokens_digest": 0}]
    return [_with_helper_columns(tokens, source_position, index, kept) for tokens in pieces]


def _tokenize_conversation(tokenizer, messages: list[dict], loss_on: str, split: bool, cut: int | None,
                           tools: list[dict] | None) -> list[dict]:
    """The conversation tokenized: as one row, or one for each user turn (split). An error advises splitting it only
    where its rows split at user turns would train: not where the split is on, nor where a template drops what a
    turn needs within one user turn (gpt-oss's analysis before a call, Gemma 4's reasoning before a reply)."""
    try:
        return _tokenized(tokenizer, split_at_user_turns(messages) if split else [messages], loss_on, cut, tools)
    except MaskError as error:
        if SPLIT_ADVICE not in str(error):
            raise
        pieces = split_at_user_turns(messages)
        if not split and len(pieces) > 1 and _masks(tokenizer, pieces, loss_on, cut, tools):
            raise
        raise MaskError(str(error).replace(SPLIT_ADVICE, "")) from None


def _tokenized(tokenizer, conversations: list[list[dict]], loss_on: str, cut: int | None,
               tools: list[dict] | None) -> list[dict]:
    return [tokenize_messages(tokenizer, conversation, loss_on, max_length=cut, tools=tools)
            for conversation in conversations]


def _masks(tokenizer, conversations: list[list[dict]], loss_on: str, cut: int | None,
           tools: list[dict] | None) -> bool:
    """Whether every conversation can be tokenized and masked."""
    try:
        _tokenized(tokenizer, conversations, loss_on, cut, tools)
    except ValueError:
        return False
    return True


def _with_helper_columns(tokens: dict, source_position: int, index: int, kept: slice) -> dict:
    labels = tokens["labels"]
    trainable = sum(label != IGNORE_INDEX for label in labels[kept])
    prompt = next((position for position, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
    return {**tokens, "source": source_position, "row": index, "trainable_tokens": trainable, "prompt_tokens": prompt,
            "problem": "", "tokens_digest": hash(tuple(tokens["input_ids"]))}  # ints' hashes are the same everywhere


def _split_off_eval(sources: list, positions: list[int], test_size: float, seed: int,
                    by_conversation: bool = False) -> tuple[list, object]:
    """dataset.test_size of the rows read, held out before the sources' weights repeat rows (a repeated row would
    land on both sides); the train rows are handed back per source, for their weights. by_conversation: the rows
    are a conversation's pieces (dataset.split_user_turns), and test_size holds out whole conversations, whose
    pieces would otherwise show the eval rows' turns in training."""
    whole = _mix([(rows, None) for rows in sources], seed)
    size = test_size if test_size < 1 else int(test_size)
    units, noun = (_conversations(whole), "conversation") if by_conversation else (whole, "row")
    try:
        split = units.train_test_split(test_size=size, seed=seed)
    except ValueError:
        if len(units) < 2:
            raise DataError(f"dataset.test_size {size} cannot hold out an eval {noun} from {len(units)} {noun}: it "
                            f"would leave none to train; remove test_size, or add rows") from None
        raise DataError(f"dataset.test_size {size} cannot split {len(units)} {noun}s into train and eval; give a "
                        f"fraction below 1 (0.05) or a count from 1 to {len(units) - 1}") from None
    if by_conversation:
        held = set(zip(_column(split["test"], "source").to_pylist(), _column(split["test"], "row").to_pylist()))
        split = {side: whole.filter(lambda source, row, test=test: ((source, row) in held) == test,
                                    input_columns=["source", "row"])
                 for side, test in (("train", False), ("test", True))}
    if len(sources) == 1:
        return [split["train"]], split["test"]
    return [split["train"].filter(lambda source: source == position, input_columns="source")
            for position in positions], split["test"]


def _conversations(rows):
    """The (source, row) of each conversation the rows were tokenized from, once each, in order."""
    from datasets import Dataset

    pairs = sorted(set(zip(_column(rows, "source").to_pylist(), _column(rows, "row").to_pylist())))
    return Dataset.from_dict({"source": [source for source, _ in pairs], "row": [row for _, row in pairs]})


def _mix(parts: list[tuple], seed: int):
    """Concatenate sources; a source with a weight is repeated or subsampled (seeded) to weight x its rows."""
    from datasets import concatenate_datasets

    pieces = []
    for (rows, _), count in zip(parts, _mixed_counts(parts)):
        whole, rest = divmod(count, len(rows)) if len(rows) else (0, 0)
        pieces += [rows] * whole
        if rest:
            pieces.append(rows.shuffle(seed=seed).select(range(rest)))
    if not pieces:  # every weighted source rounded down to no row
        return parts[0][0].select([])
    return concatenate_datasets(pieces) if len(pieces) != 1 else pieces[0]


def _mixed_counts(parts: list[tuple]) -> list[int]:
    """The rows _mix takes of each (rows, weight): weight x its rows, or all of them."""
    return [len(rows) if weight is None else round(weight * len(rows)) for rows, weight in parts]
