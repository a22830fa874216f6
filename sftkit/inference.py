"""Load a trained model and generate replies with its chat template: for the sample replies during training, the
terminal and web chats, and the before/after report."""

import json
from collections.abc import Iterator
from pathlib import Path
from threading import Thread

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer

from sftkit.checkpoints import unfinished_run_words
from sftkit.data.tokenize import stop_token_ids
from sftkit.errors import ConfigError, first_line
from sftkit.layout import adapter_in, run_directory
from sftkit.paths import resolve_path
from sftkit.runrecord import changed_model_files, read_run_record


def load_for_inference(path: str, trust_remote_code: bool = False):
    """A merged or full model directory (output_dir), or an adapter directory (output_dir/lora_weights, or the
    output_dir of a run that published its adapter alone) whose base and its revision are read from its
    adapter_config.json. Returns (model, tokenizer), the model in eval mode on the GPU if any."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    directory = Path(resolve_path(path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    options = {"dtype": "auto", "trust_remote_code": trust_remote_code}
    adapter_dir = adapter_in(directory)
    if (directory / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(directory, **options)
    elif adapter_dir is not None:
        from peft import PeftModel

        adapter = json.loads((adapter_dir / "adapter_config.json").read_text())
        name = adapter["base_model_name_or_path"]
        _refuse_a_changed_base(path, adapter_dir, name)
        try:
            base = AutoModelForCausalLM.from_pretrained(resolve_path(name), revision=adapter.get("revision"),
                                                        **options)
        except OSError as error:  # a relative local path (adapters before 2026-11-28) from another directory
            raise ConfigError(f"{path}: its base model {name} (base_model_name_or_path in its adapter_config.json) "
                              f"could not be loaded: {first_line(error)}; if it is a local directory, run from the "
                              "directory the training ran in, or write its absolute path there") from error
        model = PeftModel.from_pretrained(base, adapter_dir)
    else:
        unfinished = unfinished_run_words(directory)
        why = f"{unfinished}; a checkpoint's directory can be given" if unfinished else \
            "no model here (expected config.json, or adapter_config.json for a LoRA adapter)"
        raise ConfigError(f"{path}: {why}; pass the output_dir of a run or its lora_weights directory")
    tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), tokenizer


def _refuse_a_changed_base(path: str, adapter_dir: Path, base: str) -> None:
    """An adapter of an sftkit run answers as trained only on the base it trained on: a local base replaced since (a
    first stage trained again) gave other replies without a word. The run record holds the base's digests."""
    record = read_run_record(adapter_dir) or read_run_record(run_directory(adapter_dir))
    base_dir = Path(resolve_path(base))
    changed = changed_model_files(record, base_dir) if base_dir.is_dir() else []
    if changed:
        raise ConfigError(f"{path}: its base model {base} changed since the run trained the adapter on it "
                          f"({', '.join(changed[:3])}), so the adapter on it is not the trained model; chat with the "
                          "merged model the run published, or put the base back as it was")


def generate_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                   top_p: float = 1.0, streamer=None, synced_gpus: bool = False,
                   tools: list[dict] | None = None) -> str:
    """The model's reply to a conversation (with the tools it may call); greedy when temperature is 0. `streamer`
    receives tokens as they come."""
    inputs = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    return generate_from_ids(model, tokenizer, inputs["input_ids"], max_new_tokens, temperature, top_p, streamer,
                             synced_gpus)


def generate_from_ids(model, tokenizer, input_ids, max_new_tokens: int = 256, temperature: float = 0.0,
                      top_p: float = 1.0, streamer=None, synced_gpus: bool = False) -> str:
    """The reply to an already rendered prompt (a 1 x n tensor of token ids)."""
    inputs = {"input_ids": input_ids.to(model.device), "attention_mask": torch.ones_like(input_ids).to(model.device)}
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                pad_token_id=tokenizer.pad_token_id, synced_gpus=synced_gpus,
                                eos_token_id=stop_token_ids(tokenizer, model.generation_config.eos_token_id),
                                **sampling)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def stream_reply(model, tokenizer, messages: list[dict], max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, tools: list[dict] | None = None) -> Iterator[str]:
    """The reply in pieces as it is generated (generation runs in a thread that feeds the streamer)."""
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    failed = []

    def generate():
        try:
            generate_reply(model, tokenizer, messages, max_new_tokens, temperature, top_p, streamer, tools=tools)
        except Exception as error:  # noqa: BLE001 - raised again below, in the caller's thread
            failed.append(error)
            streamer.end()  # else the caller waits for tokens that never come

    thread = Thread(target=generate)
    thread.start()
    yield from streamer
    thread.join()
    if failed:
        raise failed[0]


def asked(prompt: list[dict]) -> str:
    """What a sample prompt asks, to show beside its reply: its last user message (a tool's result may follow it)."""
    return next((message["content"] for message in reversed(prompt) if message["role"] == "user"),
                prompt[-1]["content"])
