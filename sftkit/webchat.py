"""Chat with a trained model in the browser: a Gradio app on localhost with temperature, top-p and max-new-tokens.

    pip install -r requirements-extras.txt
    python -m sftkit.webchat outputs/default              # then open http://127.0.0.1:7860
    python -m sftkit.webchat outputs/lora/lora_weights --port 8000

The page keeps the conversation; the reply streams in as it is generated, with the model's own chat template.
"""

import argparse
import importlib.util
import os
import sys

from sftkit.chat import generation_arguments, system_prompt
from sftkit.data.formats import with_system
from sftkit.errors import ConfigError, OneLineArgumentParser, say_error


def build_app(model, tokenizer, title: str, system: str | None = None, temperature: float = 0.7, top_p: float = 0.9,
              max_new_tokens: int = 256):
    import gradio as gr

    from sftkit.inference import stream_reply

    def respond(message: str, history: list[dict], temperature: float, top_p: float, max_new_tokens: int):
        turns = [{"role": turn["role"], "content": _text(turn["content"])} for turn in history]
        messages = with_system([*turns, {"role": "user", "content": _text(message)}], system)
        reply = ""
        for piece in stream_reply(model, tokenizer, messages, int(max_new_tokens), temperature, top_p):
            reply += piece
            yield reply.strip()

    return gr.ChatInterface(
        respond,
        title=title,
        additional_inputs=[
            gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="temperature (0: greedy)"),
            gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="top-p"),
            gr.Slider(1, 2048, value=max_new_tokens, step=1, label="max new tokens"),
        ],
        additional_inputs_accordion=gr.Accordion("Generation settings", open=True),
        flagging_mode="never",
        analytics_enabled=False,
    )


def _text(content) -> str:
    """Gradio gives a message's content as a string or as a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number from 1 to 65535")
    return int(text)


def main(argv: list[str] | None = None, prog: str = "python -m sftkit.webchat") -> int:
    parser = generation_arguments(OneLineArgumentParser(prog=prog, description=__doc__.split("\n")[0]))
    parser.add_argument("--host", default="127.0.0.1", help="127.0.0.1 keeps it on this machine (default)")
    parser.add_argument("--port", type=_port, default=7860, help="a TCP port, 1 to 65535 (default 7860)")
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from an offline machine
    if importlib.util.find_spec("gradio") is None:
        return say_error(prog, ConfigError("gradio is not installed; pip install -r requirements-extras.txt"))
    from sftkit.inference import load_for_inference

    try:
        model, tokenizer = load_for_inference(args.model, args.trust_remote_code)
    except ConfigError as error:
        return say_error(prog, error)
    app = build_app(model, tokenizer, f"sftkit chat: {args.model}", system_prompt(args), args.temperature, args.top_p,
                    args.max_new_tokens)
    app.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
