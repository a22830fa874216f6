"""After training: the terminal chat, the before/after report and the web chat in a real headless browser."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_PROMPTS, TINY_MODEL, run_here, run_python

from sftkit import chat as chat_command
from sftkit import compare
from sftkit.inference import generate_reply, load_for_inference
from sftkit.layout import STAGING_DIR


def greedy(model_dir, conversation: list[dict]) -> str:
    model, tokenizer = load_for_inference(str(model_dir))
    return generate_reply(model, tokenizer, conversation, max_new_tokens=40)


def chat(model_dir, *lines: str, in_process: bool = False):
    """`python -m sftkit.chat DIR`, typed `lines`; as a process, or its main in this one."""
    args = [str(model_dir), "--temperature", "0", "--max_new_tokens", "40"]
    if in_process:
        return run_here(chat_command.main, *args, input="\n".join(lines) + "\n")
    return run_python("-m", "sftkit.chat", *args, input="\n".join(lines) + "\n")


def test_terminal_chat_is_multi_turn_with_reset_and_exit(monitored_run):
    first, second = SAMPLE_PROMPTS
    result = chat(monitored_run.out, first, second, "/reset", second, "/bogus", "/exit", "never read")
    replies = re.findall(r"model> (.*)", result.stdout)
    reply_1 = greedy(monitored_run.out, [{"role": "user", "content": first}])
    history = [{"role": "user", "content": first}, {"role": "assistant", "content": reply_1},
               {"role": "user", "content": second}]
    assert replies == [reply_1, greedy(monitored_run.out, history),
                       greedy(monitored_run.out, [{"role": "user", "content": second}])]
    assert replies[1] != replies[2] or history[1]["content"] == "", "the second turn saw the first"
    assert "(new conversation)" in result.stdout and "unknown command /bogus" in result.stdout
    assert "never read" not in result.stdout and result.returncode == 0


def test_terminal_chat_on_base_plus_adapter_matches_the_merged_model(lora_run):
    prompt = SAMPLE_PROMPTS[0]
    merged = chat(lora_run, prompt, in_process=True)
    adapter = chat(lora_run / "lora_weights", prompt, in_process=True)
    assert re.findall(r"model> (.*)", adapter.stdout) == re.findall(r"model> (.*)", merged.stdout)
    assert re.findall(r"model> (.*)", merged.stdout)[0]
    base = json.loads((lora_run / "lora_weights" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert f"Chatting with {lora_run / 'lora_weights'} (the LoRA adapter on {base}) (" in adapter.stdout
    assert f"Chatting with {lora_run} (/reset" in merged.stdout
    missing = run_here(chat_command.main, str(REPO / "configs"), check=False)
    assert missing.returncode == 2 and "no model here" in missing.stderr


def test_terminal_chat_offers_tools_and_takes_a_calls_result(tmp_path):
    """A model trained to call tools could only be chatted with without them: --tools puts them in the prompt as
    the rows' tools were, and /tool TEXT answers a call. A template that renders no tools is refused."""
    from test_tokenize import TOOLS

    model = tmp_path / "agent"
    shutil.copytree(TINY_MODEL, model)
    shutil.copy(REPO / "tests" / "templates" / "qwen2_5.jinja", model / "chat_template.jinja")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps({"tools": [TOOLS[0]["function"]]}))  # a bare schema, under "tools"
    args = [str(model), "--tools", str(tools), "--temperature", "0", "--max_new_tokens", "8"]
    said = run_here(chat_command.main, *args, input="/tool too early\nWeather in Paris?\n/tool {\"temp\": 20}\n/exit\n")
    assert "/tool TEXT answers the model's tool call); tools: get_weather." in said.stdout
    assert "(/tool answers the model's tool call: ask it something first)" in said.stdout
    loaded, tokenizer = load_for_inference(str(model))
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    first = generate_reply(loaded, tokenizer, asked, max_new_tokens=8, tools=TOOLS)
    answered = [*asked, {"role": "assistant", "content": first}, {"role": "tool", "content": '{"temp": 20}'}]
    assert re.findall(r"model> (.*)", said.stdout) == [
        first, generate_reply(loaded, tokenizer, answered, max_new_tokens=8, tools=TOOLS)]
    assert first != generate_reply(loaded, tokenizer, asked, max_new_tokens=8)  # the tools changed the prompt
    refused = run_here(chat_command.main, str(TINY_MODEL), "--tools", str(tools), check=False)
    assert refused.returncode == 2 and "its chat template renders no tools" in refused.stderr
    tools.write_text('{"a": 1}')
    refused = run_here(chat_command.main, *args, check=False)
    assert refused.returncode == 2 and f"--tools {tools}: tools[0] is not a function definition" in refused.stderr


def test_the_chat_and_compare_on_a_stopped_run_name_its_checkpoint_and_on_a_missing_path_say_so(tmp_path,
                                                                                               monkeypatch):
    """Both said "no model here" of a run stopped before its end, and of a path that does not exist."""
    from test_monitor import signal_at

    from sftkit.config import load_config
    from sftkit.errors import Interrupted
    from sftkit.train import train

    out = tmp_path / "out"
    signal_at(monkeypatch, "on_step_end", 3)
    with pytest.raises(Interrupted):
        train(load_config(None, ["--training.output_dir", str(out), "--training.max_steps", "6", "--dataset.test_size",
                                 "null", "--training.save_strategy", "steps", "--training.save_steps", "2"]))
    for tool, then in ((chat_command.main, "; a checkpoint's directory can be given; pass the output_dir of a run"),
                       (compare.main, "; pass the output_dir of a finished sftkit run")):
        said = run_here(tool, str(out), check=False)
        assert said.returncode == 2 and f"{out}: its run has not published a model (it is interrupted); the newest " \
            f"checkpoint is {out / 'checkpoint-3'} (step 3){then}" in said.stderr, said.stderr
        said = run_here(tool, str(tmp_path / "nowhere"), check=False)
        assert said.returncode == 2 and f"{tmp_path / 'nowhere'}: no such directory" in said.stderr, said.stderr
    touched = (out / "checkpoint-3").stat().st_mtime_ns  # rotation deletes checkpoints by modification time
    said = run_here(compare.main, str(out / "checkpoint-3"), check=False)  # it said no checkpoint was saved
    assert said.returncode == 2 and f"{out / 'checkpoint-3'}: a checkpoint, not a run's output_dir (sftkit chat " \
        "takes a checkpoint, sftkit compare a finished run)" in said.stderr, said.stderr
    assert (out / "checkpoint-3").stat().st_mtime_ns == touched, "compare wrote its lock into the checkpoint"


def test_before_after_report_on_sample_prompts(monitored_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffWhat day comes after Monday?\r\n\r\nHello!\r\n".encode())  # as Notepad saves it
    run_here(compare.main, str(monitored_run.out), "--out", str(tmp_path / "custom.md"), "--prompts", str(prompts),
             "--max_new_tokens", "40")
    custom = (tmp_path / "custom.md").read_text()
    assert custom.count("| base model | fine-tuned |") == 2 and "Hello!" in custom
    assert "\ufeff" not in custom and "\r" not in custom and "What day comes after Monday?" in custom
    result = run_here(compare.main, str(monitored_run.out), "--max_new_tokens", "40")
    report = (monitored_run.out / "before_after.md").read_text()
    assert f"wrote {monitored_run.out / 'before_after.md'}" in result.stdout
    base, tuned = map(float, re.search(r"base ([\d.]+)\*\*, \*\*fine-tuned ([\d.]+)", report).groups())
    assert tuned < base / 2, "fine-tuning lowered the held-out loss"
    import json

    summary = json.loads((monitored_run.out / "run_summary.json").read_text())
    # the report rounds to 3 decimals; computed as the Trainer's eval, so the same numbers as the summary
    assert tuned == pytest.approx(summary["eval_loss"], abs=6e-4) and base == pytest.approx(summary["eval_loss_first"], abs=6e-4)
    tuned_reply = greedy(monitored_run.out, [{"role": "user", "content": SAMPLE_PROMPTS[0]}])
    assert f"| {tuned_reply} |" in report.split("## 2")[0]
    with (monitored_run.out / "before_after.md").open("a") as notes:  # compare replaced them silently
        notes.write("\nMy notes: the base model rambles.\n")
    refused = run_here(compare.main, str(monitored_run.out), check=False)
    assert refused.returncode == 2 and "before_after.md was changed since sftkit compare wrote it" in refused.stderr
    # --rows asks for held-out rows: it was ignored where the run had sample_prompts
    run_here(compare.main, str(monitored_run.out), "--rows", "1", "--out", str(tmp_path / "rows.md"),
             "--max_new_tokens", "8")
    rows = (tmp_path / "rows.md").read_text()
    assert len(re.findall(r"^## \d", rows, re.M)) == 1 and "Reference reply: " in rows, rows


@pytest.mark.slow
def test_the_before_after_loss_of_a_packed_run_is_its_eval_loss(tmp_path):
    """A packed run evaluates packed batches: the report's hand-computed loss (each row alone, batches of 8) said
    3.191 and 0.909 where the run's summary said 3.165 and 0.898."""
    import json

    from conftest import run_sft

    out = tmp_path / "packed"
    run_sft("--training.packing", "true", "--training.max_steps", "12", "--training.output_dir", str(out))
    run_here(compare.main, str(out), "--max_new_tokens", "8")
    report = (out / "before_after.md").read_text()
    base, tuned = map(float, re.search(r"base ([\d.]+)\*\*, \*\*fine-tuned ([\d.]+)", report).groups())
    summary = json.loads((out / "run_summary.json").read_text())
    assert tuned == pytest.approx(summary["eval_loss"], abs=6e-4) and base == pytest.approx(summary["eval_loss_first"], abs=6e-4)


def test_before_after_report_on_held_out_rows_shows_the_reference(lora_run):
    run_here(compare.main, str(lora_run / "lora_weights"), "--rows", "2", "--max_new_tokens", "30")
    report = (lora_run / "before_after.md").read_text()
    # the sample data repeats rows: 3 of the 16 held out are train rows too, and the report says so
    assert "Loss on 16 eval rows (3 of the 16 also train rows, token for token), computed as the run's eval loss: " \
        in report
    assert report.count("Reference reply: ") == 2 and "## 3" not in report
    assert "<|im_start|>user" in report, "the exact prompt the row trained with"
    # on some of them it is not the run's eval loss, which it claimed to be
    run_here(compare.main, str(lora_run / "lora_weights"), "--rows", "1", "--loss_rows", "4", "--max_new_tokens", "4")
    assert "Loss on the first 4 of 16 eval rows (3 of the 16 also train rows, token for token), computed as the " \
           "run's eval loss is, on these rows (--loss_rows sets how many): " \
        in (lora_run / "before_after.md").read_text()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def browser():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        if os.environ.get("CI"):
            pytest.fail("Debian's chromium and chromium-driver must be installed in CI (see .ci/run)")
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    yield driver
    driver.quit()


@pytest.mark.slow
def test_web_chat_answers_in_a_real_browser(monitored_run, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "sftkit.webchat", str(monitored_run.out), "--port", str(port),
                               "--temperature", "0", "--max_new_tokens", "40"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        for line in server.stdout:
            if f"http://127.0.0.1:{port}" in line:
                break
        browser.get(f"http://127.0.0.1:{port}")
        box = WebDriverWait(browser, 60).until(lambda page: page.find_element(By.CSS_SELECTOR, "textarea"))
        box.send_keys(SAMPLE_PROMPTS[0], Keys.ENTER)

        def finished_reply(page):
            bots = page.find_elements(By.CSS_SELECTOR, '[data-testid="bot"]')
            generating = page.find_elements(By.CSS_SELECTOR, ".pending, .generating")
            return bots[-1].text if bots and bots[-1].text and not generating else None

        reply = WebDriverWait(browser, 60).until(finished_reply)
        time.sleep(1)  # let the stream settle, then read it again
        reply = finished_reply(browser)
        screenshot = tmp_path / "web_chat.png"
        assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
        assert browser.find_element(By.CSS_SELECTOR, '[data-testid="user"]').text == SAMPLE_PROMPTS[0]
        assert reply == greedy(monitored_run.out, [{"role": "user", "content": SAMPLE_PROMPTS[0]}])
        assert "temperature" in browser.page_source and "top-p" in browser.page_source
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_generation_that_fails_ends_the_reply_with_its_error_instead_of_waiting_for_tokens():
    """Generation streams from a thread: its error used to leave the chat waiting forever for the next token."""
    from conftest import TINY_MODEL

    from sftkit.inference import stream_reply

    model, tokenizer = load_for_inference(str(TINY_MODEL))
    with pytest.raises(ValueError, match="max_new_tokens"):
        list(stream_reply(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=0))


@pytest.mark.parametrize(("option", "rule"), [("--max_new_tokens", "a whole number of 1 or more"),
                                              ("--top_p", "above 0 and at most 1"), ("--temperature", "0 or more")])
def test_the_chats_generation_options_are_checked_before_the_model_loads(option, rule, capsys):
    with pytest.raises(SystemExit) as exit_code:
        chat_command.main([str(REPO / "data" / "tiny-chat-llama"), option, "-1"])
    assert exit_code.value.code == 2 and capsys.readouterr().err == (
        f"python -m sftkit.chat: error: argument {option}: '-1' is not {rule}; see python -m sftkit.chat --help\n")


@pytest.mark.parametrize("port", ["99999", "0", "http"])
def test_the_web_chats_port_is_checked_before_the_model_loads(port, capsys):
    """99999 ended in gradio's OverflowError traceback after the model had loaded."""
    from sftkit import webchat

    with pytest.raises(SystemExit) as exit_code:
        webchat.main([str(REPO / "data" / "tiny-chat-llama"), "--port", port])
    assert exit_code.value.code == 2 and capsys.readouterr().err == (
        f"python -m sftkit.webchat: error: argument --port: '{port}' is not a port number from 1 to 65535; see "
        "python -m sftkit.webchat --help\n")


@pytest.mark.parametrize(("options", "expected"), [
    (["--prompts", "nosuch.txt"], "--prompts nosuch.txt is not a file; give a text file with one prompt per line"),
    (["--out", "nodir/x.md"], "--out nodir/x.md: the directory nodir does not exist; create it or choose another path"),
    (["--loss_rows", "0"], "--loss_rows 0: give 1 or more"),
    (["--rows", "0"], "--rows 0: give 1 or more"),
    (["--prompts", "blank.txt", "--rows", "2"], "--prompts and --rows: give one of them, the prompts to reply to or "
                                                "the held-out rows"),
    (["--prompts", "blank.txt"], "--prompts blank.txt holds no prompt; write one prompt per line"),
    (["--out", "blank.txt"], "--out blank.txt exists already; choose another path (compare never replaces a file it "
                             "is given)"),
])
def test_compare_refuses_bad_options_in_one_line_before_generating(tmp_path, options, expected, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert compare.main([str(tmp_path), *options]) == 2
    assert capsys.readouterr().err == f"python -m sftkit.compare: error: {expected}\n"
    assert (tmp_path / "blank.txt").read_text() == "\n  \n"


def test_an_adapter_is_loaded_on_the_revision_of_the_base_it_trained_on(tmp_path):
    """model.revision goes into adapter_config.json, and the chat loads the base at it: a hub cache (offline) holds
    two revisions of the tiny model, the adapter trained on the older one, and `main` has other weights."""
    import hashlib

    from safetensors.torch import load_file, save_file

    repo = tmp_path / "hub" / "models--team--tiny"
    for revision, scale in (("v1", 1.0), ("main", 2.0)):
        commit = hashlib.sha1(revision.encode()).hexdigest()
        snapshot = repo / "snapshots" / commit
        shutil.copytree(REPO / "data" / "tiny-chat-llama", snapshot)
        weights = load_file(snapshot / "model.safetensors")
        save_file({name: tensor * scale for name, tensor in weights.items()}, snapshot / "model.safetensors",
                  metadata={"format": "pt"})
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / revision).write_text(commit)
    script = f"""
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from sftkit.config import load_config
from sftkit.inference import load_for_inference
from sftkit.model import lora_config
config = load_config(None, ["--model.path", "team/tiny", "--model.revision", "v1", "--model.use_lora", "true"])
base = AutoModelForCausalLM.from_pretrained("team/tiny", revision="v1")
get_peft_model(base, lora_config(config.model)).save_pretrained("{tmp_path / 'adapter'}")
AutoTokenizer.from_pretrained("team/tiny", revision="v1").save_pretrained("{tmp_path / 'adapter'}")
model, _ = load_for_inference("{tmp_path / 'adapter'}")
loaded = model.get_base_model().model.embed_tokens.weight
print("v1" if torch.equal(loaded, base.model.embed_tokens.weight) else "other")
"""
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    assert run_python("-c", script, env=env).stdout.strip().splitlines()[-1] == "v1"


def test_compare_does_not_call_rows_the_run_trained_on_held_out(tmp_path):
    """eval_split train on a file: the run warned, and compare reported the loss of the train rows as that of
    held-out rows, "computed as the run's eval loss"."""
    from conftest import SAMPLE_DATA, run_sft

    out = tmp_path / "out"
    run_sft("--dataset.test_size", "null", "--dataset.eval_split", "train", "--training.max_steps", "1",
            "--training.output_dir", str(out))
    run_here(compare.main, str(out), "--rows", "1", "--loss_rows", "2", "--max_new_tokens", "2")
    assert (f"Loss on the first 2 of 320 eval rows, which it also trained on ({SAMPLE_DATA.resolve()}), computed "
            "as the run's eval loss is") in (out / "before_after.md").read_text()


@pytest.mark.parametrize("packing", ["bfd_split", "wrapped"])
def test_compare_holds_out_the_rows_the_run_held_out(tmp_path, packing):
    """Packing that splits long rows keeps rows that truncation drops, so the run's test_size split differs from one
    over the rows truncation keeps: compare took 5 of its 7 held-out rows from those the run trained on."""
    import json

    import yaml

    from sftkit.config import load_config
    from sftkit.data import prepare_for_training
    from sftkit.export import write_metadata
    from sftkit.layout import RUN_CONFIG_FILE
    from sftkit.model import load_tokenizer

    rows = [{"messages": [{"role": "user", "content": f"question {i} " + ("filler " * 80 if i % 3 == 0 else "")},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(40)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = load_config(None, ["--dataset.name", str(tmp_path / "rows.jsonl"), "--dataset.test_size", "0.25",
                                "--model.max_seq_length", "64", "--training.packing", "true",
                                "--training.packing_strategy", packing, "--training.output_dir", str(tmp_path / "out")])
    tokenizer = load_tokenizer(config.model, config.dataset)
    run = prepare_for_training(config.dataset, tokenizer, config.training)
    write_metadata(tmp_path, config, tokenizer)
    saved = yaml.safe_load((tmp_path / RUN_CONFIG_FILE).read_text())
    held_out = compare.run_data(saved, config.dataset, config.model, tokenizer).eval
    assert held_out["input_ids"] == run.eval["input_ids"]
    assert not {tuple(ids) for ids in held_out["input_ids"]} & {tuple(ids) for ids in run.train["input_ids"]}


def test_the_chat_and_compare_ask_after_the_runs_system_prompt_and_compare_says_where_to_run_from(
        tmp_path, monkeypatch, capsys):
    """A run trained after dataset.system_prompt: the chat (and the web chat) asked without it, so `--temperature 0`
    did not give the summary's greedy reply, and compare's --prompts left it out too. compare run from another
    directory could not find the run's relative data path and did not say why."""
    import json

    from sftkit.config import load_config
    from sftkit.train import train

    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "data" / "sample_chat.jsonl", tmp_path / "rows.jsonl")
    out = tmp_path / "out"
    train(load_config(None, ["--dataset.name", "rows.jsonl", "--dataset.system_prompt", "You are a pirate.",
                             "--dataset.sample_prompts", json.dumps(SAMPLE_PROMPTS[:1]), "--training.max_steps", "6",
                             "--training.output_dir", str(out), "--dataset.test_size", "null"]))
    summary = json.loads((out / "run_summary.json").read_text())
    said = chat(out, SAMPLE_PROMPTS[0], "/exit", in_process=True).stdout
    assert "system prompt: 'You are a pirate.'" in said
    reply = re.findall(r"model> (.*)", said)[0]
    assert reply and (reply.startswith(summary["sample_reply"]) or summary["sample_reply"].startswith(reply))
    plain = run_here(chat_command.main, str(out), "--temperature", "0", "--max_new_tokens", "40", "--system", "",
                     input=f"{SAMPLE_PROMPTS[0]}\n/exit\n").stdout
    assert "system prompt" not in plain and re.findall(r"model> (.*)", plain)[0] != reply
    (tmp_path / "prompts.txt").write_text(SAMPLE_PROMPTS[0] + "\n")
    monkeypatch.chdir(REPO / "configs")
    assert compare.main([str(out), "--prompts", str(tmp_path / "prompts.txt")]) == 2
    assert capsys.readouterr().err.rstrip().endswith(
        f"{out}: its run trained on other contents of rows.jsonl than are found from here ({REPO / 'configs'}): "
        "those files changed since the run (put them back as they were), or, as relative paths in its "
        "sftkit_config.yaml are found from the working directory, run sftkit compare from the directory the run was "
        "started in")


def test_the_system_prompt_is_read_only_from_the_runs_own_config_and_a_bad_one_is_none(tmp_path):
    """A merged model copied into another run's directory took that run's system prompt; a run config that is not
    a mapping ended the chat in a traceback after the model had loaded."""
    from types import SimpleNamespace

    run = tmp_path / "run"
    (run / "lora_weights").mkdir(parents=True)
    (run / "lora_weights" / "adapter_config.json").write_text("{}")
    (run / "merged").mkdir()
    (run / "sftkit_config.yaml").write_text("dataset:\n  system_prompt: Be a pirate.\n")
    asked = lambda model, system=None: chat_command.system_prompt(SimpleNamespace(model=str(model), system=system))
    assert asked(run / "lora_weights") == asked(run) == "Be a pirate." and asked(run, "") is None
    assert asked(run / "merged") is None, "another run's config above a model is not its own"
    for text in ("- a list\n", "dataset: [a]\n", "dataset: {system_prompt: [\n"):
        (run / "sftkit_config.yaml").write_text(text)
        assert asked(run) is None


def test_a_checkpoint_is_asked_after_the_system_prompt_its_run_trained_with(tmp_path):
    """A checkpoint holds no sftkit_config.yaml: the chat on a stopped run's checkpoint asked without the system
    prompt, and the model replied as it never learned to."""
    from types import SimpleNamespace

    from sftkit.config import load_config
    from sftkit.train import train

    out = tmp_path / "out"
    train(load_config(None, ["--training.output_dir", str(out), "--training.max_steps", "2", "--dataset.test_size",
                             "null", "--dataset.system_prompt", "You are a pirate.", "--training.save_strategy", "steps",
                             "--training.save_steps", "1"]))
    assert chat_command.system_prompt(SimpleNamespace(model=str(out / "checkpoint-1"), system=None)) == \
        "You are a pirate."


def test_an_adapter_trained_on_a_relative_local_model_path_loads_from_any_directory(tmp_path, monkeypatch, capsys):
    """The adapter recorded its base as given ("mymodel", from the working directory): the chat and `sftkit export`
    from anywhere else tried the hub for 60 s and ended in a traceback."""
    from sftkit.config import load_config
    from sftkit.export import main as export_main
    from sftkit.train import train

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    shutil.copytree(TINY_MODEL, work / "mymodel")
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "out"
    train(load_config("lora_train_config.yaml", ["--model.path", "mymodel", "--training.output_dir", str(out),
                                                 "--training.max_steps", "2", "--dataset.test_size", "null"]))
    adapter = out / "lora_weights" / "adapter_config.json"
    assert json.loads(adapter.read_text())["base_model_name_or_path"] == str(work / "mymodel")
    monkeypatch.chdir(elsewhere)
    load_for_inference(str(out / "lora_weights"))
    (out / STAGING_DIR).mkdir()  # an export to finish from here, as after a kill: merged from the adapter's base
    shutil.copytree(out / "lora_weights", out / STAGING_DIR / "lora_weights")
    record = out / "sftkit_run.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "status": "exporting"}))
    assert run_here(export_main, str(out)).returncode == 0 and not (out / STAGING_DIR).exists()

    small = [str(out), "--rows", "1", "--loss_rows", "2", "--max_new_tokens", "4"]
    capsys.readouterr()
    assert compare.main(small) == 2  # from elsewhere: no mymodel here
    said = capsys.readouterr().err
    assert f"its run trained on other contents of mymodel/chat_template.jinja, mymodel/config.json, " \
           f"mymodel/model.safetensors than are found from here ({elsewhere})" in said
    monkeypatch.chdir(work)
    assert compare.main(small) == 0

    adapter.write_text(json.dumps({**json.loads(adapter.read_text()), "base_model_name_or_path": "mymodel"}))
    result = subprocess.run([sys.executable, "-m", "sftkit.chat", str(out / "lora_weights")], cwd=elsewhere,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}, input="/exit\n",
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "its base model mymodel (base_model_name_or_path in its adapter_config.json) could not be loaded: " \
           in result.stderr and "run from the directory the training ran in" in result.stderr


def with_eos_moved(source: Path, target: Path) -> Path:
    """A copy of a model whose eos is another token than the <|im_end|> its template closes replies with: a base
    model's layout (Qwen2.5 base: eos <|endoftext|>, ChatML template)."""
    shutil.copytree(source, target)
    settings = json.loads((target / "tokenizer_config.json").read_text())
    settings.update(eos_token="<|begin_of_text|>", extra_special_tokens=["<|im_start|>", "<|im_end|>"])
    (target / "tokenizer_config.json").write_text(json.dumps(settings))
    for name in ("generation_config.json", "config.json"):
        if (target / name).is_file():
            (target / name).write_text(json.dumps({**json.loads((target / name).read_text()), "eos_token_id": 0}))
    return target


def test_replies_stop_at_the_end_of_turn_token_where_it_is_not_the_eos(lora_run, tmp_path):
    """The model learned to close its reply with <|im_end|>, but generation stopped only at the eos: the sample
    replies, the summary, the chat and compare ran on past every reply (special tokens hidden, so the cause too)."""
    messages = [{"role": "user", "content": SAMPLE_PROMPTS[0]}]
    model, tokenizer = load_for_inference(str(lora_run))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = model.generate(**prompt, max_new_tokens=64, do_sample=False)[0, prompt["input_ids"].shape[1]:].tolist()
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and len(ids) < 64, "the model learned to stop"
    moved = load_for_inference(str(with_eos_moved(lora_run, tmp_path / "moved")))
    assert moved[1].eos_token == "<|begin_of_text|>"
    assert generate_reply(*moved, messages, max_new_tokens=64) == generate_reply(model, tokenizer, messages, 64)


def test_the_published_and_checkpointed_generation_configs_stop_at_the_end_of_turn_token(tmp_path):
    """It listed the eos alone: plain transformers, vLLM and TGI ran on past every reply of a base model trained on
    its ChatML template. The checkpoints, all a stopped run has, kept listing it alone."""
    from sftkit.config import load_config
    from sftkit.train import train

    base = with_eos_moved(TINY_MODEL, tmp_path / "base")
    out = tmp_path / "out"
    train(load_config(None, ["--model.path", str(base), "--training.output_dir", str(out), "--training.max_steps",
                             "2", "--dataset.test_size", "null", "--training.save_strategy", "steps",
                             "--training.save_steps", "1"]))
    for model_dir in (out, out / "checkpoint-1", out / "checkpoint-2"):
        assert json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"] == [0, 1], model_dir


def test_an_adapter_whose_base_changed_since_training_is_refused(tmp_path):
    """A first stage trained again under the second stage's adapter: the chat put the adapter on the new base and
    gave other replies without a word (the export and compare refuse it)."""
    from safetensors.torch import load_file, save_file

    from sftkit.config import load_config
    from sftkit.train import train

    base, out = tmp_path / "base", tmp_path / "out"
    shutil.copytree(TINY_MODEL, base)
    train(load_config("lora_train_config.yaml", ["--model.path", str(base), "--training.output_dir", str(out),
                                                 "--training.max_steps", "2", "--dataset.test_size", "null",
                                                 "--training.save_strategy", "steps", "--training.save_steps", "2"]))
    weights = load_file(base / "model.safetensors")
    weights[next(iter(weights))] += 0.01
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    for adapter in (out / "lora_weights", out / "checkpoint-2"):
        said = run_here(chat_command.main, str(adapter), check=False)
        assert said.returncode == 2 and f"{adapter}: its base model {base} changed since the run trained the adapter " \
            "on it (model.safetensors)" in said.stderr, said.stderr


def test_compare_waits_for_a_run_that_writes_its_output_dir(lora_run, tmp_path):
    """A resume that trains the run longer publishes another model: compare, started meanwhile, wrote the report of
    the model it replaced beside the new one, and recorded it as the run's."""
    from sftkit.errors import ConfigError
    from sftkit.layout import LOCK_FILE
    from sftkit.runlock import RunLock

    running = RunLock(lora_run)
    running.take()  # as a live run holds it (this process's)
    try:
        said = run_here(compare.main, str(lora_run), "--rows", "1", "--out", str(tmp_path / "report.md"), check=False)
    finally:
        running.release()
    assert said.returncode == 2 and f"is in use by another run (process {os.getpid()} on " in said.stderr
    assert "; compare it once that run ends (if no run uses it, delete " in said.stderr
    assert not (tmp_path / "report.md").exists()
    run_here(compare.main, str(lora_run), "--rows", "1", "--max_new_tokens", "2", "--out", str(tmp_path / "report.md"))
    assert (tmp_path / "report.md").is_file() and not (lora_run / LOCK_FILE).exists(), "compare let the lock go"
    comparing = RunLock(lora_run, "sftkit compare")
    comparing.take()
    try:  # a run, or another compare, started meanwhile is told it is a compare, not a run
        with pytest.raises(ConfigError, match=f"is in use by sftkit compare \\(process {os.getpid()} on "):
            RunLock(lora_run).take()
    finally:
        comparing.release()


def test_chat_with_a_system_prompt_the_template_refuses_says_so_in_one_line(tmp_path):
    """Gemma's template takes no system message: the first reply ended in a Jinja traceback."""
    from conftest import TEMPLATES

    model = tmp_path / "gemma-like"
    shutil.copytree(TINY_MODEL, model)
    (model / "chat_template.jinja").write_text((TEMPLATES / "gemma.jinja").read_text())
    said = run_here(chat_command.main, str(model), "--system", "Be brief.", "--temperature", "0",
                    input="Hello!\n/exit\n", check=False)
    assert said.returncode == 2 and said.stderr.strip() == (
        f"python -m sftkit.chat: error: {model}: its chat template takes no system message (System role not "
        "supported), so not the system prompt 'Be brief.'; pass --system '' to chat without one"), said.stderr
    said = run_here(chat_command.main, str(model), "--system", "", "--temperature", "0", "--max_new_tokens", "4",
                    input="Hello!\n/exit\n")
    assert "model> " in said.stdout
