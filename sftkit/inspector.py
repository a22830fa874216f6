"""`sft.py --inspect`: what the model will be trained on, from the tokenizer and the data alone (no weights).

    python sft.py --config configs/lora_train_config.yaml --inspect 5
"""

import itertools
import math
import statistics
import sys

from sftkit.data import describe_dropped, trainer_keeps
from sftkit.data.tokenize import IGNORE_INDEX
from sftkit.model import tokenizer_and_data
from sftkit.schema import RunConfig

GREEN, RESET = "\033[1;32m", "\033[0m"


def inspect(config: RunConfig, samples: int = 3) -> str:
    color = sys.stdout.isatty()
    args = config.training
    tokenizer, data = tokenizer_and_data(config)
    lines = [f"sftkit inspect: {config.source}, tokenizer {config.model.path}",
             f"data               {data.sources_words(config.dataset)}", *_statistics(data, args)]
    names = [source.name for source in config.dataset.train_sources()]
    for number, (index, source) in enumerate(_sample_rows(data.rows_per_source, samples)):
        row = data.train[index]
        where = f"{names[source]}, " if len(names) > 1 else ""
        lines += ["", f"--- sample {number} ({where}{data.length_words(len(row['input_ids']))} tokens; trained "
                  f"tokens {'in green' if color else 'in [[double brackets]]'}) ---",
                  *_as_trained(tokenizer, row, args, color, measured=data.measured_to is None)]
    return "\n".join(lines)


def _sample_rows(rows_per_source: list[int], samples: int) -> list[tuple[int, int]]:
    """(index in the train rows, source) of the first `samples` rows taken from each source in turn, so that every
    source's format and masks are shown, not only the first one's."""
    starts = list(itertools.accumulate(rows_per_source, initial=0))
    turns = itertools.chain.from_iterable(itertools.zip_longest(
        *[[(start + row, source) for row in range(count)] for source, (start, count)
          in enumerate(zip(starts, rows_per_source))]))
    return list(itertools.islice(filter(None, turns), samples))


def _as_trained(tokenizer, row: dict, args, color: bool, measured: bool) -> list[str]:
    """The row as the trainer sees it: a row longer than max_seq_length cut where the trainer cuts it (keeps).
    `measured`: the row was tokenized whole, so what is cut can be counted."""
    ids, labels, limit = row["input_ids"], row["labels"], args.max_length
    cut, keeps = len(ids) - limit, trainer_keeps(args)
    if cut <= 0 or keeps == "all":
        split = [f"... packing ({args.packing_strategy}) splits its tokens over rows of {limit}"] if cut > 0 else []
        return [render_trained(tokenizer, ids, labels, color), *split]
    if keeps == "end":
        return [f"{cut} tokens cut from the start by max_seq_length (truncation_mode keep_end) ...",
                render_trained(tokenizer, ids[cut:], labels[cut:], color)]
    return [render_trained(tokenizer, ids[:limit], labels[:limit], color),
            f"... {cut} more tokens cut by max_seq_length" if measured else "... the rest is cut by max_seq_length"]


def _statistics(data, args) -> list[str]:
    lengths = sorted(data.lengths)
    kept_tokens, cut_rows = data.kept(args)
    eval_rows = f", {len(data.eval)} eval" if data.eval is not None else ""
    lines = [
        f"rows read          {data.rows:,}{data.split_words()}",
        "rows dropped       " + describe_dropped(data.dropped),
        *(f"                   {problem}" for problem in data.problems),
        *(["eval rows dropped  " + describe_dropped(data.eval_dropped)]
          if any(data.eval_dropped.values()) else []),
        f"rows kept          {len(data.train):,} train{eval_rows}{data.repeated_words()}",
        _length_statistics(data, lengths),
        f"tokens that train  {data.trainable_tokens:,} of {kept_tokens:,} ({100 * data.trainable_tokens / kept_tokens:.1f}%)",
        f"rows truncated     {cut_rows} longer than max_seq_length {args.max_length}"
        + (" (packing splits them instead)" if cut_rows == 0 and lengths[-1] > args.max_length else ""),
    ]
    return lines


def _length_statistics(data, lengths: list[int]) -> str:
    """Rows measured only past max_seq_length have no mean, and their lengths are said as 'more than N'."""
    if data.measured_to and lengths[-1] > data.measured_to:
        words = data.length_words
        return (f"tokens per row     min {words(lengths[0])}, median {words(lengths[len(lengths) // 2])}, p95 "
                f"{words(lengths[math.ceil(0.95 * len(lengths)) - 1])}, max {words(lengths[-1])} (rows are tokenized "
                "only as far as max_seq_length keeps them)")
    return (f"tokens per row     min {lengths[0]}, mean {statistics.mean(lengths):.1f}, median "
            f"{statistics.median(lengths):g}, p95 {lengths[math.ceil(0.95 * len(lengths)) - 1]}, max {lengths[-1]}")


def render_trained(tokenizer, input_ids: list[int], labels: list[int], color: bool) -> str:
    """The decoded sequence with the trained runs highlighted."""
    pieces = []
    for trained, run in itertools.groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        text = tokenizer.decode([token for token, _ in run])
        pieces.append((f"{GREEN}{text}{RESET}" if color else f"[[{text}]]") if trained else text)
    return "".join(pieces)
