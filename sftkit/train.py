"""One run, top to bottom: tokenizer -> data -> model -> SFTTrainer -> train -> evaluate -> export -> summary.

    accelerate launch sft.py --config configs/lora_train_config.yaml
"""

import json
import logging
import resource
import time
from dataclasses import dataclass

import torch
import transformers
from transformers import set_seed
from transformers.integrations import is_deepspeed_zero3_enabled
from trl import SFTTrainer

from sftkit.config import RunConfig
from sftkit.data import prepare_data
from sftkit.export import ADAPTER_DIR, export, saved_dtypes
from sftkit.model import load_model, load_tokenizer, lora_config, resolve_dtype

SUMMARY_FILE = "run_summary.json"
logger = logging.getLogger(__name__)


@dataclass
class Run:
    summary: dict
    trainer: SFTTrainer


def train(config: RunConfig) -> Run:
    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()  # weight loading and saving bars; the Trainer keeps its own
    args = config.training  # built before the model, so ZeRO-3 can partition the weights as they load
    set_seed(args.seed)
    tokenizer = load_tokenizer(config.model, config.dataset)
    with args.main_process_first(desc="dataset preparation"):
        data = prepare_data(config.dataset, tokenizer, args.max_length, args.seed, args.dataset_num_proc)
    dtype = resolve_dtype(config.model, args)
    model = load_model(config.model, dtype, args.gradient_checkpointing)
    if (args.packing or args.padding_free) and config.model.trust_remote_code:
        logger.warning("packing with a model's own modeling code: transformers' built-in attention keeps packed "
                       "samples apart, custom code may let them attend to each other")
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        peft_config=lora_config(config.model),
    )
    trainable, total = _count_parameters(trainer.model)
    if trainer.accelerator.is_main_process:
        print(_plan(config, data, dtype, trainable, total), flush=True)
    train_loss_mean = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint).training_loss
    eval_loss = trainer.evaluate()["eval_loss"] if data.eval is not None else None
    reply = _sample_reply(trainer, tokenizer, data.sample_prompt)
    output_dir = export(trainer, config, tokenizer, dtype)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    summary = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "steps": trainer.state.global_step,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "train_loss_mean": train_loss_mean,
        "eval_loss": eval_loss,
        "trained_tokens": round(data.trainable_tokens * trainer.state.epoch),
        "rows": data.rows,
        "rows_dropped": data.dropped,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "peak_memory_mib": _peak_memory_mib(),
        "sample_prompt": data.sample_prompt[-1]["content"] if data.sample_prompt else None,
        "sample_reply": reply,
        "training_dtype": str(dtype).removeprefix("torch."),
        "saved_dtypes": saved_dtypes(output_dir),
        "output_dir": str(output_dir),
        "adapter_dir": str(output_dir / ADAPTER_DIR) if config.model.use_lora else None,
    }
    if trainer.accelerator.is_main_process:
        (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        print(format_summary(summary), flush=True)
    return Run(summary, trainer)


def _count_parameters(model) -> tuple[int, int]:
    """Trainable and total parameters; ZeRO-3 leaves each process an empty shard, whose full size is ds_numel."""
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT's count also unpacks 4-bit weights
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", parameter.numel())
        total += count
        trainable += count if parameter.requires_grad else 0
    return trainable, total


def _sample_reply(trainer, tokenizer, prompt: list[dict] | None, max_new_tokens: int = 40) -> str | None:
    """Greedy reply of the trained model to the first prompt of the data, to show what it learned."""
    if prompt is None or is_deepspeed_zero3_enabled() or not trainer.accelerator.is_main_process:
        return None  # generating from ZeRO-3 shards needs every process in step; the saved model can be tried instead
    model = trainer.model.eval()
    inputs = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs.to(model.device), max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _peak_memory_mib() -> dict:
    peak = {"process_rss": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    if torch.cuda.is_available():
        peak["gpu_allocated"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return peak


def _plan(config: RunConfig, data, dtype, trainable: int, total: int) -> str:
    method = "QLoRA" if config.model.load_in_4bit else "LoRA" if config.model.use_lora else "full fine-tuning"
    eval_rows = f", {len(data.eval)} eval rows" if data.eval is not None else ""
    return (
        f"sftkit: {method} of {config.model.path} in {str(dtype).removeprefix('torch.')} "
        f"({trainable:,} of {total:,} parameters train)\n"
        f"        {describe_sources(config.dataset, data)}: {data.rows} rows, {len(data.train)} to train{eval_rows}; "
        f"config {config.source}"
    )


def describe_sources(dataset, data) -> str:
    return ", ".join(f"{source.name} as {format_name!r}" for source, format_name in zip(dataset.train_sources(), data.formats))


def describe_dropped(dropped: dict) -> str:
    return ", ".join(f"{count} {reason}" for reason, count in dropped.items())


def format_summary(summary: dict) -> str:
    def loss(value):
        return "n/a" if value is None else f"{value:.3f}"

    memory = ", ".join(f"{name.replace('_', ' ')} {mib:,} MiB" for name, mib in summary["peak_memory_mib"].items())
    share = 100 * summary["trainable_parameters"] / max(summary["total_parameters"], 1)
    lines = [
        f"Done in {summary['wall_seconds']:.1f} s, {summary['steps']} steps",
        f"  train loss        {loss(summary['train_loss_first'])} (first log) -> {loss(summary['train_loss_last'])} "
        f"(last), {loss(summary['train_loss_mean'])} on average",
        f"  eval loss         {loss(summary['eval_loss'])}",
        f"  tokens trained    {summary['trained_tokens']:,}",
        f"  rows dropped      {describe_dropped(summary['rows_dropped'])} (of {summary['rows']})",
        f"  trainable params  {summary['trainable_parameters']:,} of {summary['total_parameters']:,} ({share:.2f}%)",
        f"  peak memory       {memory}",
    ]
    if summary["sample_reply"] is not None:
        lines.append(f"  sample            {summary['sample_prompt']!r} -> {summary['sample_reply']!r}")
    saved = ", ".join(summary["saved_dtypes"])
    if saved != summary["training_dtype"]:
        saved += f" (trained in {summary['training_dtype']})"
    lines.append(f"  model + tokenizer {summary['output_dir']}, weights in {saved}")
    if summary["adapter_dir"]:
        lines.append(f"  LoRA adapter      {summary['adapter_dir']}")
    return "\n".join(lines)
