"""Files that explain a finished run to a person, written beside the model: loss.png and a model card README.md."""

from pathlib import Path

LOSS_PLOT = "loss.png"
MODEL_CARD = "README.md"


def write_reports(output_dir: Path, config, summary: dict, history: list[dict]) -> dict:
    plot_loss(history, output_dir / LOSS_PLOT)
    (output_dir / MODEL_CARD).write_text(model_card(config, summary))
    return {"loss_plot": str(output_dir / LOSS_PLOT), "model_card": str(output_dir / MODEL_CARD)}


def plot_loss(history: list[dict], path: Path) -> None:
    """Train and eval loss against the optimizer step, from the Trainer's log history."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    train = [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]
    evaluation = [(entry["step"], entry["eval_loss"]) for entry in history if "eval_loss" in entry]
    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        axes.plot(*zip(*train), color="tab:blue", label="train loss")
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
    batch = training.per_device_train_batch_size * training.gradient_accumulation_steps * training.world_size
    lines = [
        "---",
        f"base_model: {model.path}",
        "library_name: transformers",
        f"tags: [sftkit, sft, {method.split()[0].lower()}]",
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
        f"| data | {sources}: {summary['rows']} rows read |",
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
        "",
        f"{summary['trained_tokens']:,} tokens trained in {summary['wall_seconds']} s.",
        "",
        f"![loss]({LOSS_PLOT})",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        'messages = [{"role": "user", "content": "Hello!"}]',
        "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\", "
        "return_dict=True)",
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0]))",
        "```",
        "",
        "Or chat with it: `python -m sftkit.chat path/to/this/directory`.",
    ]
    if model.use_lora:
        lines += ["", "The LoRA adapter alone is in `lora_weights/` (load it with `peft.PeftModel.from_pretrained` "
                      f"on `{model.path}`); the weights here are already merged."]
    return "\n".join(lines) + "\n"


def _length(training, summary: dict) -> str:
    if training.max_steps > 0:
        return f"{summary['steps']} (training.max_steps; {summary['epochs']:.2f} epochs of the data)"
    return f"{summary['steps']} ({training.num_train_epochs:g} epochs)"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
