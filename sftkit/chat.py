"""Chat with a trained model in the terminal, with its own chat template, the reply streamed as it is generated.

    python -m sftkit.chat outputs/default                     # the merged (or fully trained) model
    python -m sftkit.chat outputs/lora/lora_weights           # the base model + the LoRA adapter
    python -m sftkit.chat outputs/default --temperature 0.7 --top_p 0.9 --max_new_tokens 200

Commands: /reset starts a new conversation, /exit (or Ctrl-D) quits.
"""

import argparse
import json
import sys
from pathlib import Path

import yaml

from sftkit.data.formats import with_system
from sftkit.errors import ConfigError, OneLineArgumentParser, say_error
from sftkit.layout import RUN_CONFIG_FILE, adapter_base, run_directory
from sftkit.paths import resolve_path
from sftkit.runrecord import read_run_record

COMMANDS = "/reset starts a new conversation, /exit quits"


def _number(kind, allowed, rule: str):
    """An argparse type: a number of `kind` that `allowed` accepts, else argparse's one-line error naming `rule`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not allowed(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
        return value
    return parse


def generation_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model", help="output_dir of a run, or its lora_weights directory")
    parser.add_argument("--temperature", type=_number(float, lambda t: t >= 0, "0 or more"), default=0.7,
                        help="0 for greedy decoding (default 0.7)")
    parser.add_argument("--top_p", type=_number(float, lambda p: 0 < p <= 1, "above 0 and at most 1"), default=0.9,
                        help="nucleus sampling threshold (default 0.9)")
    parser.add_argument("--max_new_tokens", type=_number(int, lambda n: n >= 1, "a whole number of 1 or more"),
                        default=256, help="longest reply in tokens (default 256)")
    parser.add_argument("--system", help="a system message at the start of every conversation (default: the "
                                         "run's dataset.system_prompt, which it trained with; '' for none)")
    parser.add_argument("--trust_remote_code", action="store_true", help="only for models whose code you trust")
    return parser


def system_prompt(args) -> str | None:
    """--system, or else the system prompt the run trained with (its dataset.system_prompt, in the run's
    sftkit_config.yaml beside the model, or above the lora_weights adapter; a checkpoint's in its run record): the
    model learned its replies after it."""
    if args.system is not None:
        return args.system or None
    directory = run_directory(Path(resolve_path(args.model)))
    saved = directory / RUN_CONFIG_FILE
    try:
        config = yaml.safe_load(saved.read_text()) if saved.is_file() else (read_run_record(directory) or {}).get(
            "config")
    except yaml.YAMLError:
        return None
    dataset = config.get("dataset") if isinstance(config, dict) else None
    return dataset.get("system_prompt") if isinstance(dataset, dict) else None


def _what_it_is(model_dir: Path) -> str:
    """' (step 44: the LoRA adapter on BASE)': a checkpoint's step, and an adapter's base, which the path alone does
    not say."""
    parts = []
    try:
        if (model_dir / "trainer_state.json").is_file():
            parts.append(f"step {json.loads((model_dir / 'trainer_state.json').read_text())['global_step']}")
        if (model_dir / "adapter_config.json").is_file():
            parts.append(f"the LoRA adapter on {adapter_base(model_dir)}")
    except (OSError, ValueError, KeyError):  # a state cut short: the model loaded all the same
        pass
    return f" ({': '.join(parts)})" if parts else ""


def _refused_by_the_template(tokenizer, system: str) -> str | None:
    """What the chat template says of a conversation that opens with the system prompt (Gemma's and Mistral's refuse
    one: the first reply ended in a Jinja traceback); None where it takes it."""
    import jinja2

    try:
        tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
                                      tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as error:
        return str(error)
    return None


def main(argv: list[str] | None = None, prog: str = "python -m sftkit.chat") -> int:
    parser = OneLineArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    args = generation_arguments(parser).parse_args(argv)
    from sftkit.inference import load_for_inference, stream_reply

    try:
        model, tokenizer = load_for_inference(args.model, args.trust_remote_code)
    except ConfigError as error:
        return say_error(prog, error)
    system = system_prompt(args)
    if system and (refusal := _refused_by_the_template(tokenizer, system)):
        return say_error(prog, ConfigError(f"{args.model}: its chat template takes no system message ({refusal}), "
                                           f"so not the system prompt {system!r}; pass --system '' to chat without "
                                           "one"))
    start = with_system([], system)
    history = list(start)
    print(f"Chatting with {args.model}{_what_it_is(Path(resolve_path(args.model)))} ({COMMANDS})"
          + (f"; system prompt: {system!r}" if system else "") + ".", flush=True)
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if text == "/exit":
            return 0
        if text == "/reset":
            history = list(start)
            print("(new conversation)", flush=True)
            continue
        if not text:
            continue
        if text.startswith("/"):
            print(f"unknown command {text}: {COMMANDS}", flush=True)
            continue
        history.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        reply = ""
        for piece in stream_reply(model, tokenizer, history, args.max_new_tokens, args.temperature, args.top_p):
            print(piece, end="", flush=True)
            reply += piece
        print(flush=True)
        history.append({"role": "assistant", "content": reply.strip()})


if __name__ == "__main__":
    sys.exit(main())
