"""Chat with a trained model in the terminal, with its own chat template, the reply streamed as it is generated.

    python -m sftkit.chat outputs/default                     # the merged (or fully trained) model
    python -m sftkit.chat outputs/lora/lora_weights           # the base model + the LoRA adapter
    python -m sftkit.chat outputs/default --temperature 0.7 --top_p 0.9 --max_new_tokens 200
    python -m sftkit.chat outputs/agent --tools tools.json           # tools the model may call

Commands: /reset starts a new conversation, /exit (or Ctrl-D) quits, /tool TEXT answers the model's tool call.
"""

import argparse
import json
import sys
from pathlib import Path

import jinja2
import yaml

from sftkit.data.formats import RowDefect, tools_of, with_system
from sftkit.errors import ConfigError, OneLineArgumentParser, say_error
from sftkit.layout import RUN_CONFIG_FILE, adapter_base, adapter_in, run_directory
from sftkit.paths import resolve_path
from sftkit.runrecord import read_run_record

COMMANDS = "/reset starts a new conversation, /exit quits"
TOOL_COMMAND = "/tool TEXT answers the model's tool call"


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
        if (adapter_dir := adapter_in(model_dir)) is not None:
            parts.append(f"the LoRA adapter on {adapter_base(adapter_dir)}")
    except (OSError, ValueError, KeyError):  # a state cut short: the model loaded all the same
        pass
    return f" ({': '.join(parts)})" if parts else ""


def read_tools(path: str) -> list[dict]:
    """--tools: a JSON file of tool definitions (a list, or an object whose `tools` is one), in any layout the data
    takes, as the rows' tools reach the template."""
    try:
        found = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"--tools {path}: {error}") from None
    try:
        tools = tools_of(found if isinstance(found, dict) and "tools" in found else {"tools": found}, "messages")
    except RowDefect as error:
        raise ConfigError(f"--tools {path}: {error}") from None
    if not tools:
        raise ConfigError(f"--tools {path}: no tool definitions (a JSON list of them, or {{\"tools\": [...]}})")
    return tools


def _renders_no_tools(tokenizer, tools: list[dict]) -> bool:
    """Whether the chat template leaves the tools out of the prompt (ChatML's, Llama 3's): the model would never see
    them."""
    hello = [{"role": "user", "content": "Hi"}]
    return (tokenizer.apply_chat_template(hello, tools=tools, tokenize=False, add_generation_prompt=True)
            == tokenizer.apply_chat_template(hello, tokenize=False, add_generation_prompt=True))


def _refused_by_the_template(tokenizer, system: str) -> str | None:
    """What the chat template says of a conversation that opens with the system prompt (Gemma's and Mistral's refuse
    one: the first reply ended in a Jinja traceback); None where it takes it."""
    try:
        tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
                                      tokenize=False, add_generation_prompt=True)
    except jinja2.TemplateError as error:
        return str(error)
    return None


def main(argv: list[str] | None = None, prog: str = "python -m sftkit.chat") -> int:
    parser = OneLineArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--tools", help="a JSON file of tool definitions the model may call (as a row's tools); "
                                        "answer a call with /tool TEXT")
    args = generation_arguments(parser).parse_args(argv)
    from sftkit.inference import load_for_inference, stream_reply

    try:
        tools = read_tools(args.tools) if args.tools else None
        model, tokenizer = load_for_inference(args.model, args.trust_remote_code)
    except ConfigError as error:
        return say_error(prog, error)
    if tools and _renders_no_tools(tokenizer, tools):
        return say_error(prog, ConfigError(f"{args.model}: its chat template renders no tools, so the model would "
                                           "never see them; chat without --tools, or train with a template that "
                                           "renders them (dataset.chat_template)"))
    commands = f"{COMMANDS}, {TOOL_COMMAND}" if tools else COMMANDS
    system = system_prompt(args)
    if system and (refusal := _refused_by_the_template(tokenizer, system)):
        return say_error(prog, ConfigError(f"{args.model}: its chat template takes no system message ({refusal}), "
                                           f"so not the system prompt {system!r}; pass --system '' to chat without "
                                           "one"))
    start = with_system([], system)
    history = list(start)
    print(f"Chatting with {args.model}{_what_it_is(Path(resolve_path(args.model)))} ({commands})"
          + (f"; system prompt: {system!r}" if system else "")
          + (f"; tools: {', '.join(tool['function']['name'] for tool in tools)}" if tools else "") + ".", flush=True)
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
        if tools and text.startswith("/tool "):
            if not history or history[-1]["role"] not in ("assistant", "tool"):
                print("(/tool answers the model's tool call: ask it something first)", flush=True)
                continue
            history.append({"role": "tool", "content": text.removeprefix("/tool ").strip()})
        elif text.startswith("/"):
            print(f"unknown command {text}: {commands}", flush=True)
            continue
        else:
            history.append({"role": "user", "content": text})
        print("model> ", end="", flush=True)
        reply = ""
        try:
            for piece in stream_reply(model, tokenizer, history, args.max_new_tokens, args.temperature, args.top_p,
                                      tools):
                print(piece, end="", flush=True)
                reply += piece
        except jinja2.TemplateError as error:  # Mistral's wants a tool result's call id, which a typed one lacks
            print(f"(the chat template refused the conversation: {error})", flush=True)
            history.pop()
            continue
        print(flush=True)
        history.append({"role": "assistant", "content": reply.strip()})


if __name__ == "__main__":
    sys.exit(main())
