import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import pytest

# pytest.ini runs the tests on one pytest-xdist worker per core. Each worker, and every process it starts, computes
# on one thread (as `accelerate launch` gives each of its processes): with a thread pool per worker on every core,
# the pools spin against each other and the QLoRA preset test took 84 s instead of 3 s. Before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parent.parent
TINY_MODEL = REPO / "data" / "tiny-chat-llama"
SAMPLE_DATA = REPO / "data" / "sample_chat.jsonl"
TEMPLATES = Path(__file__).parent / "templates"
sys.path.insert(0, str(REPO))

# Real model-family chat templates (tests/templates/*.jinja, as the models ship them) with the special tokens
# their tokenizers define, added to the tiny BPE tokenizer; `end` is the token that closes an assistant turn.
FAMILIES = {
    "llama3": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "extra": ["<|start_header_id|>", "<|end_header_id|>"], "end": "<|eot_id|>"},
    "qwen2_5": {"bos": None, "eos": "<|im_end|>", "extra": ["<|im_start|>"], "end": "<|im_end|>"},
    "gemma": {"bos": "<bos>", "eos": "<eos>", "extra": ["<start_of_turn>", "<end_of_turn>"], "end": "<end_of_turn>"},
    "phi3": {"bos": "<s>", "eos": "<|endoftext|>", "extra": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], "end": "<|end|>"},
    "zephyr": {"bos": "<s>", "eos": "</s>", "extra": [], "end": "</s>"},
    "llama3_1": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|python_tag|>"], "end": "<|eot_id|>"},
    "qwen3": {"bos": None, "eos": "<|im_end|>", "extra": ["<|im_start|>"], "end": "<|im_end|>"},
    "mistral": {"bos": "<s>", "eos": "</s>", "extra": [], "end": "</s>"},
    "deepseekv3": {"bos": "<｜begin▁of▁sentence｜>", "eos": "<｜end▁of▁sentence｜>", "extra": ["<｜User｜>", "<｜Assistant｜>"], "end": "<｜end▁of▁sentence｜>"},
    "gemma3": {"bos": "<bos>", "eos": "<eos>", "extra": ["<start_of_turn>", "<end_of_turn>"], "end": "<end_of_turn>"},
    # Families added with the linear-cost masks; tests/templates/README.md says where each template comes from.
    "glm4_5": {"bos": None, "eos": "<|endoftext|>", "extra": ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>"], "end": "</think>"},
    "gpt_oss": {"bos": "<|startoftext|>", "eos": "<|return|>", "extra": ["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|call|>", "<|constrain|>"], "end": "<|return|>"},
    "command_r": {"bos": "<BOS_TOKEN>", "eos": "<|END_OF_TURN_TOKEN|>", "extra": ["<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>"], "end": "<|END_OF_TURN_TOKEN|>"},
    "command_a": {"bos": "<BOS_TOKEN>", "eos": "<|END_OF_TURN_TOKEN|>", "extra": ["<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>"], "end": "<|END_OF_TURN_TOKEN|>"},
    "granite3_3": {"bos": None, "eos": "<|end_of_text|>", "extra": ["<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>"], "end": "<|end_of_text|>"},
    "llama4": {"bos": "<|begin_of_text|>", "eos": "<|eot|>", "extra": ["<|header_start|>", "<|header_end|>", "<|python_start|>", "<|python_end|>", "<|image|>"], "end": "<|eot|>"},
    "mistral_nemo": {"bos": "<s>", "eos": "</s>", "extra": ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], "end": "</s>"},
    "gemma4": {"bos": "<bos>", "eos": "<eos>", "extra": ["<|turn>", "<|channel>", "<channel|>", "<|think|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>"], "end": "<turn|>"},
    "lfm2_5": {"bos": "<|startoftext|>", "eos": "<|im_end|>", "extra": ["<|im_start|>", "<|tool_call_start|>", "<|tool_call_end|>", "<|tool_response_start|>", "<|tool_response_end|>"], "end": "<|im_end|>"},
    "qwen3_6": {"bos": None, "eos": "<|im_end|>", "extra": ["<|im_start|>"], "end": "<|im_end|>"},
}
REJECT_SYSTEM = {"gemma": "System role not supported", "mistral": "Conversation roles must alternate"}


@pytest.fixture(autouse=True)
def signal_handlers_given_back():
    """A test that trains a Trainer it built itself leaves sftkit's Ctrl-C and SIGTERM handler installed (sftkit's
    run gives it back; the Trainer alone does not), and the worker's later tests would inherit it."""
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


def save_tiny_gpt2(directory, positions: int = 128) -> str:
    """A model with learned positions (GPT-2's, `positions` of them), random, with the embedded model's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=positions, n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def family_tokenizer(family: str):
    from transformers import AutoTokenizer

    spec = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    tokens = {"eos_token": spec["eos"], "additional_special_tokens": spec["extra"] + [spec["end"]]}
    if spec["bos"]:
        tokens["bos_token"] = spec["bos"]
    tokenizer.add_special_tokens(tokens)
    tokenizer.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    tokenizer.name_or_path = family
    return tokenizer


def trained_spans(tokenizer, tokens: dict) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    spans, current = [], []
    for token, label in zip(tokens["input_ids"], tokens["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    return [tokenizer.decode(span) for span in spans]


def assistant_replies() -> set[str]:
    rows = [json.loads(line) for line in SAMPLE_DATA.read_text().splitlines()]
    return {m["content"] for row in rows for m in row["messages"] if m["role"] == "assistant"}


SAMPLE_PROMPTS = ["What color is an orange?", "What is 2 plus 3?"]


def run_python(*args: str, env: dict | None = None, timeout: int = 300, check: bool = True, **kwargs):
    """`python ARGS` in the repository, as a user runs it; output unbuffered so a test can read it as it comes."""
    import os
    import subprocess

    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=environment, capture_output=True, text=True,
                            timeout=timeout, **kwargs)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def run_here(main, *args: str, env: dict | None = None, input: str = "", check: bool = True):
    """A command's `main(args)` in this process, as its `python ...` runs it (from the repository, with `env` added
    and `input` on stdin), its output captured; a CompletedProcess like run_python's. For what a command says and
    leaves, where a new interpreter only adds 5-6 s of imports. What only a process shows (the README commands,
    launches, signals, the quiet console at start-up) stays in subprocesses."""
    import io
    import subprocess
    from contextlib import redirect_stderr, redirect_stdout

    saved_env, saved_cwd, saved_stdin = dict(os.environ), os.getcwd(), sys.stdin
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        os.environ.update(env or {})
        os.chdir(REPO)
        sys.stdin = io.StringIO(input)
        with redirect_stdout(stdout), redirect_stderr(stderr):
            try:
                code = main(list(args))
            except SystemExit as stop:  # argparse's errors, as the process exits with them
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        sys.stdin = saved_stdin
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    result = subprocess.CompletedProcess([main.__module__, *args], code, stdout.getvalue(), stderr.getvalue())
    if check:
        assert code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def said(stderr: str, text: str) -> int:
    """How many lines of a launch's processes' output hold `text`: the launcher's failure box repeats the error of
    the first process that failed as its last line (compat.tell_the_launcher)."""
    return sum(text in line for line in stderr.splitlines() if not line.startswith("  traceback : "))


def run_sft(*args: str, **kwargs):
    """`python sft.py ARGS`, in this process (run_here)."""
    from sftkit.cli import main

    return run_here(main, *args, **kwargs)


def export_float32(trainer, config, tokenizer):
    """The export as train.py runs it (its two halves; the final evaluation, between them there, left out), of
    weights trained in float32."""
    import torch

    from sftkit.export import publish_staged, stage_trained_weights

    stage_trained_weights(trainer, config, tokenizer, torch.float32, torch.float32, (1, 1))
    return publish_staged(trainer, config, torch.float32)


@pytest.fixture(scope="session")
def monitored_run(tmp_path_factory):
    """One real `python sft.py` run of the default config with what a user watches turned on: evaluation every
    12 steps, sample prompts, TensorBoard and W&B (offline). 24 steps; an epoch ends at step 19."""
    from types import SimpleNamespace

    root = tmp_path_factory.mktemp("monitored")
    out = root / "out"
    result = run_python(
        "sft.py", "--training.output_dir", str(out), "--training.max_steps", "24", "--training.logging_steps", "4",
        "--training.eval_strategy", "steps", "--training.eval_steps", "12", "--training.report_to", "[tensorboard, wandb]",
        "--dataset.sample_prompts", json.dumps(SAMPLE_PROMPTS),
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(root), "WANDB_SILENT": "true"},
    )
    return SimpleNamespace(out=out, root=root, stdout=result.stdout, stderr=result.stderr)


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    """A short LoRA run in process (no sample prompts, so reports fall back to held-out rows)."""
    from sftkit.config import load_config
    from sftkit.train import train

    out = tmp_path_factory.mktemp("lora") / "out"
    train(load_config("lora_train_config.yaml", ["--training.output_dir", str(out), "--training.max_steps", "40",
                                                 "--training.logging_steps", "10"]))
    return out


@contextlib.contextmanager
def tmpfs(directory: Path, options: str):
    """A small (or read-only) filesystem mounted at `directory`, for what a full or unwritable disk does. Needs root,
    which CI has: there a failed mount fails the test instead of skipping it."""
    import os
    import subprocess

    directory.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)]).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail("CI runs as root and must be able to mount a tmpfs")
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)
