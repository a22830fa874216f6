"""Before/after report: the base model's and the fine-tuned model's replies side by side, and the eval loss of each.

    python -m sftkit.compare outputs/default                        # the run's sample_prompts, else held-out rows
    python -m sftkit.compare outputs/default --prompts prompts.txt  # one prompt per line

Writes OUTPUT_DIR/before_after.md (or --out). The base model and the data come from the run's sftkit_config.yaml.
Loss is the run's eval loss, computed by the Trainer with the run's batch size and packing, on the held-out rows if
the run had any, else on the first training rows (the report says which). OUTPUT_DIR may also be its lora_weights.
"""

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from sftkit.checkpoints import unfinished_run_words
from sftkit.compat import rename_gradient_checkpointing
from sftkit.config import read_section
from sftkit.data import both_trained_and_evaluated_on
from sftkit.data.formats import with_system
from sftkit.data.tokenize import IGNORE_INDEX
from sftkit.errors import ConfigError, OneLineArgumentParser, say_error
from sftkit.layout import ADAPTER_DIR, BEFORE_AFTER_FILE, RUN_CONFIG_FILE, adapter_base, run_directory
from sftkit.paths import resolve_path
from sftkit.rundir import changed_since_written
from sftkit.runlock import RunLock
from sftkit.runrecord import changed_inputs, read_run_record, record_written
from sftkit.schema import DatasetConfig, ModelConfig


@dataclass
class Prompt:
    input_ids: object  # 1 x n tensor: the rendered conversation up to the reply
    shown: str  # what the report shows as the prompt
    reference: str | None = None  # the reply in the data, for held-out rows


def main(argv: list[str] | None = None, prog: str = "python -m sftkit.compare") -> int:
    parser = OneLineArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("output_dir", help="output_dir of a finished run")
    parser.add_argument("--prompts", help="a text file with one prompt per line")
    parser.add_argument("--rows", type=int, help="held-out rows to reply to instead of the run's sample_prompts "
                                                 "(default 5, where the run had none and no --prompts is given)")
    parser.add_argument("--loss_rows", type=int, default=64, help="rows the loss is computed on (default 64)")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--out", help=f"report path (default OUTPUT_DIR/{BEFORE_AFTER_FILE})")
    args = parser.parse_args(argv)
    lock = RunLock(run_directory(Path(args.output_dir)), "sftkit compare")
    try:
        _check_paths(args)  # before minutes of generating
        _lock_the_run(lock)
        path = write_before_after(args)
    except ConfigError as error:
        return say_error(prog, error)
    finally:
        lock.release()
    print(f"wrote {path}")
    return 0


def _lock_the_run(lock: RunLock) -> None:
    """A run that resumes to train longer publishes another model: a report of the one it replaced was written, and
    recorded as the run's, beside the new one. Where the lock cannot be written (a read-only share, a full disk), no
    run writes either, and the report may go elsewhere (--out).
    Only a finished run's directory is locked: a checkpoint or a model of another origin is not written to."""
    if not (lock.path / RUN_CONFIG_FILE).is_file():
        return
    with contextlib.suppress(OSError):
        lock.take("compare it once that run ends")


def _check_paths(args) -> None:
    if args.prompts and args.rows is not None:
        raise ConfigError("--prompts and --rows: give one of them, the prompts to reply to or the held-out rows")
    if args.prompts and not Path(args.prompts).is_file():
        raise ConfigError(f"--prompts {args.prompts} is not a file; give a text file with one prompt per line")
    if args.prompts and not _read_prompts(args.prompts):
        raise ConfigError(f"--prompts {args.prompts} holds no prompt; write one prompt per line")
    if args.out and Path(args.out).exists():  # the default report file in the run's directory is compare's own
        raise ConfigError(f"--out {args.out} exists already; choose another path (compare never replaces a file "
                          "it is given)")
    _refuse_replacing_a_changed_report(Path(args.output_dir) / BEFORE_AFTER_FILE, args.out)
    if args.out and not Path(args.out).parent.is_dir():
        raise ConfigError(f"--out {args.out}: the directory {Path(args.out).parent} does not exist; create it or "
                          "choose another path")
    for option in ("rows", "loss_rows", "max_new_tokens"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise ConfigError(f"--{option} {getattr(args, option)}: give 1 or more")


def _refuse_replacing_a_changed_report(report: Path, out: str | None) -> None:
    """The report in the run's directory is compare's own to replace, as compare wrote it (run record): notes the
    user added to it are not."""
    written = (read_run_record(report.parent) or {}).get("written")
    if out or written is None or not report.exists() or not changed_since_written(report, written.get(report.name)):
        return
    raise ConfigError(f"{report} was changed since sftkit compare wrote it; move it, or pass --out to write the report "
                      "elsewhere")


def _read_prompts(path: str) -> list[str]:
    text = Path(path).read_text(encoding="utf-8-sig")  # the BOM Windows editors start a file with is no prompt
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_before_after(args) -> Path:
    import datasets
    from transformers import AutoModelForCausalLM

    from sftkit.inference import generate_from_ids, load_for_inference

    datasets.disable_progress_bars()

    model_dir = Path(args.output_dir)
    # for the run's lora_weights, the adapter on its base is compared, and the report goes to the run's directory
    output_dir = run_directory(model_dir)
    saved_config = output_dir / RUN_CONFIG_FILE
    if not saved_config.is_file():
        raise ConfigError(f"{output_dir}: {unfinished_run_words(output_dir) or f'no {RUN_CONFIG_FILE}'}; pass the "
                          "output_dir of a finished sftkit run")
    saved = yaml.safe_load(saved_config.read_text())
    model_cfg = read_section(ModelConfig, saved["model"], "model", saved_config)
    dataset_cfg = read_section(DatasetConfig, saved["dataset"], "dataset", saved_config)
    _refuse_other_inputs(output_dir)
    tuned, tokenizer = load_for_inference(str(model_dir), model_cfg.trust_remote_code)
    adapter = output_dir / ADAPTER_DIR
    base_path = adapter_base(adapter) if (adapter / "adapter_config.json").is_file() else resolve_path(model_cfg.path)
    base = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=tuned.dtype, revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code).to(tuned.device).eval()
    data = run_data(saved, dataset_cfg, model_cfg, tokenizer)
    held_out = data.eval is not None
    rows = data.eval if held_out else data.train
    loss_rows = rows.select(range(min(args.loss_rows, len(rows))))
    texts = _read_prompts(args.prompts) if args.prompts else dataset_cfg.sample_prompts if args.rows is None else None
    if texts:  # asked as the run's prompts were, after its system prompt
        prompts = [_prompt_from_text(tokenizer, text, dataset_cfg.system_prompt) for text in texts]
    else:
        prompts = [_prompt_from_row(tokenizer, row) for row in rows.select(range(min(args.rows or 5, len(rows))))]
    losses = {name: eval_loss(model, tokenizer, loss_rows, saved["training"], model_cfg.max_seq_length)
              for name, model in (("base", base), ("tuned", tuned))}
    replies = {name: [generate_from_ids(model, tokenizer, prompt.input_ids, args.max_new_tokens) for prompt in prompts]
               for name, model in (("base", base), ("tuned", tuned))}
    some = f"the first {len(loss_rows)} of {len(rows)}" if len(loss_rows) < len(rows) else f"{len(loss_rows)}"
    trained_on = both_trained_and_evaluated_on(dataset_cfg) if held_out else []
    repeated = f" ({data.eval_also_trained} of the {len(rows)} also train rows, token for token)" \
        if held_out and data.eval_also_trained else ""
    where = (f"{some} eval rows, which it also trained on ({', '.join(trained_on)})" if trained_on else
             f"{some} eval rows{repeated}" if repeated else
             f"{some} held-out rows" if held_out else f"{some} training rows (no held-out set)")
    how = "computed as the run's eval loss" if held_out and len(loss_rows) == len(rows) else \
        "computed as the run's eval loss is, on these rows (--loss_rows sets how many)"
    if model_cfg.load_in_4bit:  # the run evaluated its 4-bit base (with the adapter), this the unquantized models
        how += ", of the base unquantized and the merged model (the run's own figures are of its 4-bit base)"
    lines = [
        f"# Before and after: `{model_cfg.path}` vs `{model_dir}`",
        "",
        f"Loss on {where}, {how}: **base {losses['base']:.3f}**, **fine-tuned {losses['tuned']:.3f}**.",
        "",
        f"Greedy replies, at most {args.max_new_tokens} new tokens.",
    ]
    for index, prompt in enumerate(prompts, 1):
        lines += ["", f"## {index}", "", "```", prompt.shown, "```", ""]
        if prompt.reference is not None:
            lines += [f"Reference reply: {_cell(prompt.reference)}", ""]
        lines += ["| base model | fine-tuned |", "|---|---|",
                  f"| {_cell(replies['base'][index - 1])} | {_cell(replies['tuned'][index - 1])} |"]
    path = Path(args.out) if args.out else output_dir / BEFORE_AFTER_FILE
    path.write_text("\n".join(lines) + "\n")
    if not args.out:
        record_written(output_dir, [BEFORE_AFTER_FILE])
    return path


def _refuse_other_inputs(output_dir: Path) -> None:
    """The run's config names its data and base model as it was given them, relative paths from where it started:
    from another directory they may be other files, and the report would compare the model on other data, or
    against another base, without a word."""
    record = read_run_record(output_dir)
    changed = changed_inputs(record) if record else []
    if changed:
        raise ConfigError(f"{output_dir}: its run trained on other contents of {', '.join(changed[:3])} than are "
                          f"found from here ({Path.cwd()}): those files changed since the run (put them back as they "
                          f"were), or, as relative paths in its {RUN_CONFIG_FILE} are found from the working "
                          "directory, run sftkit compare from the directory the run was started in")


# The training settings that decide what an evaluation computes; the rest (engines, precision, logging) are this
# machine's to choose, and the models are compared in the dtype they were saved in.
EVAL_SETTINGS = ("per_device_eval_batch_size", "packing", "packing_strategy", "padding_free", "eval_packing",
                 "label_smoothing_factor")


def eval_loss(model, tokenizer, rows, training: dict, max_length: int) -> float:
    """The run's eval loss on `rows`: TRL's SFTTrainer evaluates them with the run's settings (batches, packing)."""
    import tempfile

    import torch
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    settings = {key: training[key] for key in EVAL_SETTINGS if key in training}
    rename_gradient_checkpointing(settings)  # TRL's default under its old name: a warning on every report
    with tempfile.TemporaryDirectory() as scratch:
        args = SFTConfig(output_dir=scratch, report_to="none", max_length=max_length, bf16=False, fp16=False,
                         use_cpu=not torch.cuda.is_available(), dataloader_pin_memory=False, disable_tqdm=True,
                         **settings)
        trainer = SFTTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows,  # TRL 1.16 needs both
                             processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)  # the metrics dict it prints with disable_tqdm; the report says them
        return trainer.evaluate()["eval_loss"]


def run_data(saved: dict, dataset_cfg: DatasetConfig, model_cfg: ModelConfig, tokenizer):
    """The run's rows, split into train and eval as the run split them: which rows a run keeps (and so which it holds
    out) depends on how its trainer truncates and packs."""
    from types import SimpleNamespace

    from sftkit.data import prepare_for_training

    args = SimpleNamespace(**{**saved["training"], "max_length": model_cfg.max_seq_length})
    return prepare_for_training(dataset_cfg, tokenizer, args)


def _prompt_from_text(tokenizer, text: str, system_prompt: str | None = None) -> Prompt:
    messages = with_system([{"role": "user", "content": text}], system_prompt)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    return Prompt(ids, text)


def _prompt_from_row(tokenizer, row: dict) -> Prompt:
    """The row's tokens up to its first trained token (the exact prompt it trained with) and that reply."""
    import torch

    labels = row["labels"]
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    prompt_ids = row["input_ids"][:start]
    return Prompt(torch.tensor([prompt_ids]), tokenizer.decode(prompt_ids, skip_special_tokens=False).strip(),
                  tokenizer.decode(row["input_ids"][start:end], skip_special_tokens=True).strip())


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", "<br>") or "(empty)"


if __name__ == "__main__":
    sys.exit(main())
