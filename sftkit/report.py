"""What a finished run tells a person: the summary (printed and run_summary.json), loss.png and a model card."""

import json
import math
import sys
from pathlib import Path

from sftkit.checkpoints import checkpoints_in, epochs_words, resume_problem
from sftkit.data import describe_dropped, split_words
from sftkit.engines import rows_per_step
from sftkit.errors import first_line
from sftkit.export import saved_dtypes
from sftkit.inference import asked
from sftkit.layout import ADAPTER_DIR, LOSS_PLOT, MODEL_CARD, SAMPLES_FILE, SUMMARY_FILE, checkpoint_step
from sftkit.model import base_license
from sftkit.monitor import memory_mib
from sftkit.paths import looks_local
from sftkit.runrecord import record_written
from sftkit.weightfiles import size_words


def build_summary(trainer, config, data, dtype, parameters: tuple[int, int], reply: str | None, seconds: dict,
                  train_seconds: float, memory_at_start: dict, schedule_lengths: list) -> dict:
    """The run in numbers, from the Trainer's state and log history (which a resume restores, so the summary
    after a resume covers the whole run); `seconds` counts earlier segments too, and `schedule_lengths` says what
    length the learning-rate schedule was planned for from which step (checkpoints.RecordRunInCheckpoints)."""
    state, output_dir = trainer.state, Path(trainer.args.output_dir)
    history = state.log_history
    losses = [entry["loss"] for entry in history if "loss" in entry]
    evaluations = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    best = best_checkpoint_step(trainer)
    if best is not None:  # the model published is that checkpoint's, evaluated at its step
        evaluations.append(next(evaluation for evaluation in evaluations if evaluation[0] == best))
    start = evaluations[0][1] if evaluations and evaluations[0][0] == 0 else None  # eval_on_start's
    end = evaluations[-1] if evaluations and evaluations[-1][0] > 0 else (None, None)  # none: the final one skipped
    return {
        "wall_seconds": seconds["wall_seconds"],
        "steps": state.global_step,
        "schedule_lengths": schedule_lengths,  # [from step, steps] each: more than one after a resume of another length
        "epochs": round(state.epoch, 3),
        "processes": trainer.args.world_size,
        "rows_per_step": rows_per_step(trainer.args),
        "train_seconds": train_seconds,
        "input_tokens": state.num_input_tokens_seen or None,
        "tokens_per_second": round(state.num_input_tokens_seen / train_seconds, 1) if state.num_input_tokens_seen
        else None,
        "trained_tokens": round(data.trainable_tokens * state.epoch),
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": mean_logged_loss(history),
        "eval_loss_first": start,
        "eval_loss": end[1],
        "eval_loss_step": end[0],  # before the last step where a stop skipped the final evaluation
        "evaluated_in_4_bits": config.model.load_in_4bit,  # QLoRA: of the 4-bit base, not of the merged model
        "best_checkpoint_step": best,
        "rows": data.rows,
        "rows_split_into": data.pieces,  # dataset.split_user_turns: a row for each user turn whose replies train
        "train_rows": len(data.train),
        "eval_rows": len(data.eval) if data.eval is not None else None,
        "eval_rows_also_trained": data.eval_also_trained if data.eval is not None else None,
        "rows_dropped": data.dropped,
        "rows_cut": data.kept(trainer.args)[1],  # to max_seq_length: a reply cut there trains without its end
        "eval_rows_dropped": data.eval_dropped,
        "trainable_parameters": parameters[0],
        "total_parameters": parameters[1],
        "peak_memory_mib": _peak_memory(memory_mib()),
        "memory_before_training_mib": memory_at_start,
        "sample_prompt": asked(data.sample_prompts[0]) if data.sample_prompts else None,
        "sample_reply": reply,
        "training_dtype": str(dtype).removeprefix("torch."),
        "output_dir": str(output_dir),
        "adapter_dir": str(output_dir / ADAPTER_DIR) if config.model.use_lora else None,
        "merged": config.model.merge_adapter if config.model.use_lora else None,  # the adapter into its base
        "sample_replies_file": str(output_dir / SAMPLES_FILE) if config.dataset.sample_prompts else None,
        "checkpoints": _checkpoints(output_dir),
    }


def _checkpoints(output_dir: Path) -> dict | None:
    """The checkpoints kept beside the model (transformers saves one at the end unless save_strategy is no): each
    holds the optimizer's states, several times an adapter's size, which a config written by hand may not expect."""
    kept = checkpoints_in(output_dir)
    if not kept:
        return None
    size = sum(file.stat().st_size for checkpoint in kept for file in checkpoint.rglob("*") if file.is_file())
    return {"count": len(kept), "newest": str(kept[-1]), "bytes": size,
            "resumable": resume_problem(kept[-1]) is None}  # e.g. not of the model alone (training.save_only_model)


def report(output_dir: Path, config, summary: dict, history: list[dict]) -> dict:
    """Write loss.png, the model card and run_summary.json beside the exported model, print the summary; the
    summary with their paths. The model is published by then: a report that cannot be written (a full disk) is said,
    and the summary is still printed."""
    summary = {**summary, **saved_dtypes(output_dir)}
    try:
        summary = write_report(output_dir, output_dir, config, summary, history)
        record_written(output_dir, [LOSS_PLOT, MODEL_CARD, SUMMARY_FILE])
    except OSError as error:  # an earlier export's report, or this one's written in part, would describe another run
        for name in (LOSS_PLOT, MODEL_CARD, SUMMARY_FILE):
            (output_dir / name).unlink(missing_ok=True)
        print(f"sftkit: the model is published in {output_dir}, but its report (loss plot, model card, "
              f"{SUMMARY_FILE}) could not be written there: {first_line(error)}; any earlier report there was "
              "removed", file=sys.stderr, flush=True)
    print(format_summary(summary), flush=True)
    return summary


def write_report(directory: Path, output_dir: Path, config, summary: dict, history: list[dict]) -> dict:
    """loss.png, the model card and run_summary.json in `directory`: output_dir, or the unfinished export's
    staging directory, from which `sftkit export` publishes them with the model (the log history lives only in
    this process)."""
    plot_loss(history, directory / LOSS_PLOT)
    summary = {**summary, "loss_plot": str(output_dir / LOSS_PLOT), "model_card": str(output_dir / MODEL_CARD),
               "summary_file": str(output_dir / SUMMARY_FILE)}
    (directory / MODEL_CARD).write_text(model_card(config, summary))
    # with every logged loss and evaluation: a sweep compares its runs' curves from these files
    written = {**summary, "log_history": history}
    (directory / SUMMARY_FILE).write_text(json.dumps(_finite(written), indent=2, allow_nan=False) + "\n")
    return summary


def best_checkpoint_step(trainer) -> int | None:
    """The step of the best checkpoint that training.load_best_model_at_end loaded back at the end, whose model the
    run publishes; None when that is the last step's model."""
    state, args = trainer.state, trainer.args
    if not (args.load_best_model_at_end and state.best_model_checkpoint and Path(state.best_model_checkpoint).is_dir()):
        return None  # the Trainer loads no best checkpoint that is gone (rotated away, deleted), with a warning
    step = checkpoint_step(Path(state.best_model_checkpoint).name)
    logged = any("eval_loss" in entry and entry["step"] == step for entry in state.log_history)
    return step if step != state.global_step and logged else None


def mean_logged_loss(history: list[dict]) -> float | None:
    """The mean train loss over the whole run, resumed parts included: each log's loss is the mean over the steps
    since the previous log, so the logs weighted by their steps give it (the Trainer's own `training_loss` covers
    only the steps since the last resume)."""
    total = steps = previous = 0
    for entry in history:
        if "loss" in entry:
            total += entry["loss"] * (entry["step"] - previous)
            steps += entry["step"] - previous
            previous = entry["step"]
    return total / steps if steps else None


def _peak_memory(memory: dict) -> dict:
    return {name.removeprefix("mem_").removesuffix("_mib"): mib for name, mib in memory.items() if "peak" in name}


def _finite(value):
    """JSON has no nan or inf: they are written as null (a bare NaN makes the file unreadable to strict parsers)."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def plot_loss(history: list[dict], path: Path) -> None:
    """Train and eval loss against the optimizer step, from the Trainer's log history."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        # a run that logged once (a short one) would draw a line of one point: nothing
        axes.plot(*zip(*train), color="tab:blue", label="train loss", marker="o" if len(train) == 1 else None)
    if evaluation:
        axes.plot(*zip(*evaluation), "o", color="tab:orange", label="eval loss")  # points: nothing between them
    axes.set_xlabel("step")
    axes.set_ylabel("loss (trained tokens)")
    axes.set_title("Training loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def model_card(config, summary: dict) -> str:
    """A Hugging Face style README.md: what the model is, how it was trained, how well, and how to load it."""
    model, training = config.model, config.training
    method = model.method
    sources = ", ".join(f"`{source.name}`" for source in config.dataset.train_sources())
    batch = rows_per_step(training)
    system = config.resolved["dataset"]["system_prompt"]  # secrets hidden, as in the saved config
    # prompted as it was trained: a model trained with a system prompt in every row answers best with it
    system_message = f'{{"role": "system", "content": {system!r}}}, ' if system else ""
    lines = [
        "---",
        _front_matter(config, method),
        "---",
        "",
        f"# {Path(summary['output_dir']).name}",
        "",
        f"`{model.path}` fine-tuned on {sources} with sftkit ({method}, loss on {config.dataset.loss_on} tokens).",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        f"| method | {method} |",
        f"| data | {sources}: {_rows_words(summary)} |",
        *([f"| system prompt | {json.dumps(system, ensure_ascii=False).replace('|', '&#124;')} (dataset.system_prompt: "
           "first in every row without a system message of its own) |"] if system else []),
        f"| steps | {_length(training, summary)} |",
        f"| learning rate | {training.learning_rate} ({getattr(training.lr_scheduler_type, 'value', '')} schedule) |",
        f"| effective batch size | {batch} |",
        f"| max sequence length | {model.max_seq_length} |",
        f"| precision | {summary['training_dtype']} |",
    ]
    if model.use_lora:
        lora = model.lora_config
        lines.append(f"| LoRA | r={lora.r}, alpha={lora.lora_alpha}, dropout={lora.lora_dropout}, "
                     f"targets={lora.target_modules} |")
    lines += [
        f"| trainable parameters | {summary['trainable_parameters']:,} of {summary['total_parameters']:,} |",
        "",
        "## Results",
        "",
        "| metric | start | end |",
        "|---|---|---|",
        f"| train loss | {_number(summary['train_loss_first'])} | {_number(summary['train_loss_last'])} |",
        f"| eval loss | {_number(summary['eval_loss_first'])} | {_number(summary['eval_loss'])} |",
        *(["", f"The model is the best checkpoint's, step {summary['best_checkpoint_step']} of {summary['steps']} "
               "(training.load_best_model_at_end): the eval loss at the end is that checkpoint's."]
          if summary.get("best_checkpoint_step") else []),
        *(["", f"The eval loss at the end is that of {_eval_end_words(summary)} (a stop skipped the final "
               "evaluation)."] if _eval_end_words(summary).startswith("step ") and
          not summary.get("best_checkpoint_step") else []),
        *(["", f"The eval losses are {QUANTIZED_EVAL[2:]}."] if summary.get("evaluated_in_4_bits") else []),
        "",
        f"{summary['trained_tokens']:,} tokens trained in {summary['train_seconds']:.1f} s of training "
        f"({summary['wall_seconds']} s in all).",
        "",
        f"![loss]({LOSS_PLOT})",
        "",
        "## Use",
        "",
        "```python",
        *_loading_lines(model.use_lora and not model.merge_adapter),
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        f"messages = [{system_message}{{\"role\": \"user\", \"content\": \"Hello!\"}}]",
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)",
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))",
        "```",
        "",
        "Or chat with it: `python -m sftkit.chat path/to/this/directory`.",
    ]
    if model.use_lora and model.merge_adapter:
        lines += ["", "The LoRA adapter alone is in `lora_weights/` (load it with `peft.PeftModel.from_pretrained` "
                      f"on `{model.path}`); the weights here are already merged."]
    elif model.use_lora:
        lines += ["", f"The run published the LoRA adapter alone, in `lora_weights/` (model.merge_adapter: false); "
                      f"it loads on its base, `{model.path}`. `python -m sftkit.export path/to/this/directory "
                      "--merge` merges it into the base and publishes the merged model here."]
    return "\n".join(lines) + "\n"


def _loading_lines(adapter_only: bool) -> list[str]:
    """The model card's lines that load the published model: the merged one, or the adapter on its base."""
    if adapter_only:
        return ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer", "",
                'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/directory/lora_weights")']
    return ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")']


def _rows_words(summary: dict) -> str:
    """'320 rows read, 304 trained on, 16 held out to evaluate', with the rows dropped and why."""
    dropped = describe_dropped(summary.get("rows_dropped") or {}, only_some=True)
    repeated = summary.get("eval_rows_also_trained")
    held_out = "" if summary.get("eval_rows") is None else \
        f", {summary['eval_rows']} evaluated on" + (f" ({repeated} of them also trained on)" if repeated else "")
    trained = f", {summary['train_rows']} trained on" if summary.get("train_rows") is not None else ""
    return (f"{summary['rows']} rows read{split_words(summary.get('rows_split_into'))}"
            f"{f' (dropped: {dropped})' if dropped else ''}{trained}{held_out}")


def _front_matter(config, method: str) -> str:
    """The Hub's model card metadata, as huggingface_hub writes it (it quotes and validates the values): the base
    model, its license, the hub datasets trained on."""
    from huggingface_hub import ModelCardData

    tags = ["sftkit", "sft", method.split()[0].lower()]
    datasets = [source.name for source in config.dataset.train_sources() if not looks_local(source.name)]
    library = "peft" if config.model.use_lora and not config.model.merge_adapter else "transformers"  # what loads it
    return ModelCardData(base_model=config.model.path, library_name=library, tags=tags,
                         datasets=datasets or None, **base_license(config.model)).to_yaml()


def _length(training, summary: dict) -> str:
    lengths = summary.get("schedule_lengths") or []
    replanned = "".join(f", then anew for {steps} from step {start}" for start, steps in lengths[1:])
    replanned = f"; resumed with another length: the learning-rate schedule was planned for {lengths[0][1]} steps" \
                f"{replanned}" if replanned else ""
    if training.max_steps > 0:
        return f"{summary['steps']} (training.max_steps; {summary['epochs']:.2f} epochs of the data{replanned})"
    return f"{summary['steps']} ({epochs_words(training.num_train_epochs)}{replanned})"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _best_checkpoint_words(summary: dict) -> str:
    """'step 5, the best checkpoint' where the run published an earlier checkpoint's model than its last step's."""
    step = summary.get("best_checkpoint_step")
    return f"step {step}, the best checkpoint" if step else ""


QUANTIZED_EVAL = (", of the 4-bit base with the adapter, as it trained; `sftkit compare` evaluates the published "
                  "merged model, unquantized")


def _eval_end_words(summary: dict) -> str:
    """Whose the last eval loss is: the published model's ('end'), the best checkpoint's, or an earlier step's where
    a stop skipped the final evaluation."""
    step = summary.get("eval_loss_step")
    if summary.get("best_checkpoint_step") or step is None or step == summary["steps"]:
        return _best_checkpoint_words(summary) or "end"
    return f"step {step}, not the published model's step {summary['steps']}"


def format_summary(summary: dict) -> str:
    def count(value):
        return "n/a" if value is None else f"{value:,.0f}"

    memory = ", ".join(f"{name.replace('_', ' ')} {mib:,} MiB" for name, mib in summary["peak_memory_mib"].items())
    share = 100 * summary["trainable_parameters"] / max(summary["total_parameters"], 1)
    saved = ", ".join(summary["saved_dtypes"])
    if saved != summary["training_dtype"]:
        saved += f" (trained in {summary['training_dtype']})"
    rows = [
        ("wall time", f"{summary['wall_seconds']:.1f} s ({summary['train_seconds']:.1f} s training), "
                      f"{summary['steps']} step{'s' if summary['steps'] != 1 else ''}"),
        ("tokens", f"{count(summary['input_tokens'])} input ({count(summary['tokens_per_second'])}/s), "
                   f"{summary['trained_tokens']:,} trained" if summary["input_tokens"] else
                   f"{summary['trained_tokens']:,} trained (input tokens not counted: "
                   "training.include_num_input_tokens_seen is off)"),
        ("train loss", f"{_number(summary['train_loss_first'])} -> {_number(summary['train_loss_last'])} "
                       f"(first -> last log), {_number(summary['train_loss_mean'])} mean"),
        *([("eval loss", f"{_number(summary['eval_loss_first'])} -> {_number(summary['eval_loss'])} (start -> "
                         f"{_eval_end_words(summary)}){QUANTIZED_EVAL if summary.get('evaluated_in_4_bits') else ''}")]
          if summary["eval_loss"] is not None else
          [("eval loss", f"{_number(summary['eval_loss_first'])} at the start (a stop skipped the final evaluation)")]
          if summary["eval_loss_first"] is not None else []),  # no evaluation data
        ("rows", f"{summary['rows']} read{split_words(summary.get('rows_split_into'))}, dropped: "
                 f"{describe_dropped(summary['rows_dropped'])}"
                 + (f"; {summary['rows_cut']} cut to max_seq_length" if summary.get("rows_cut") else "")
                 + (f"; dropped from the eval data: {describe_dropped(summary['eval_rows_dropped'], only_some=True)}"
                    if any((summary.get("eval_rows_dropped") or {}).values()) else "")),
        ("parameters", f"{summary['trainable_parameters']:,} of {summary['total_parameters']:,} train ({share:.2f}%)"),
        ("peak memory", memory),
    ]
    if summary["sample_reply"] is not None:
        rows.append(("sample", f"{summary['sample_prompt']!r} -> {summary['sample_reply']!r}"))
    best = _best_checkpoint_words(summary)
    if summary.get("merged") is False:  # model.merge_adapter: false
        rows.append(("tokenizer", f"{summary['output_dir']} (the adapter alone is published: model.merge_adapter "
                                  f"is false{'; ' + best if best else ''})"))
    else:
        rows.append(("model + tokenizer", f"{summary['output_dir']} ({saved}{'; ' + best if best else ''})"))
    if summary.get("adapter_dir"):
        adapter = summary.get("adapter_dtypes")
        rows.append(("LoRA adapter", summary["adapter_dir"] + (f" ({', '.join(adapter)})" if adapter else "")))
    if summary.get("checkpoints"):
        kept = summary["checkpoints"]
        held = "optimizer states included" if kept.get("resumable", True) else \
            "without what a resume needs: no resume continues the newest"
        rows.append(("checkpoints", f"{kept['count']}, newest {kept['newest']} ({size_words(kept['bytes'])} in all, "
                                    f"{held}; training.save_strategy: \"no\" would keep none)"))
    for label, key in (("sample replies", "sample_replies_file"),
                       ("loss plot", "loss_plot"), ("model card", "model_card"), ("summary", "summary_file")):
        if summary.get(key):
            rows.append((label, summary[key]))
    return "Run summary\n" + "\n".join(f"  {label:<18} {value}" for label, value in rows)
