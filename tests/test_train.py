"""Real short training runs of the tiny model, in process: full, LoRA and QLoRA, and what each saves."""

import json
import shutil

import pytest
import torch
from conftest import SAMPLE_DATA, TINY_MODEL, export_float32
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from sftkit.config import load_config
from sftkit.errors import RunFailed
from sftkit.layout import ADAPTER_DIR, RUN_CONFIG_FILE, STAGING_DIR, SUMMARY_FILE, VERSIONS_FILE
from sftkit.report import format_summary
from sftkit.runrecord import fingerprint
from sftkit.train import train

PROMPTS = [
    [{"role": "user", "content": "What is the capital of Norway?"}, {"role": "assistant", "content": "The capital of Norway is Oslo."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What sound does a cow make?"}],
]


def run(tmp_path, config_name: str, *overrides: str, steps: int = 30):
    config = load_config(config_name, ["--training.output_dir", str(tmp_path / "out"), "--training.max_steps", str(steps),
                                       "--training.logging_steps", "5", *overrides])
    return config, train(config)


def batch(tokenizer) -> torch.Tensor:
    rows = [tokenizer.apply_chat_template(p, tokenize=False) for p in PROMPTS]
    return tokenizer(rows, add_special_tokens=False, padding=True, return_tensors="pt")


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**inputs).logits.float()


def base_model(**kwargs):
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32, **kwargs)


def test_full_fine_tuning_learns_and_saves_exactly_the_trained_model(tmp_path):
    config, result = run(tmp_path, "default_train_config.yaml")
    out = tmp_path / "out"
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["train_loss_last"] < summary["train_loss_first"] * 0.7
    assert summary["trainable_parameters"] == summary["total_parameters"] > 0
    assert summary["trained_tokens"] > 0 and summary["peak_memory_mib"]["rss_peak"] > 0
    assert summary["adapter_dir"] is None and not (out / ADAPTER_DIR).exists()

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(TINY_MODEL).chat_template
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.float32
    inputs = batch(tokenizer)
    assert torch.allclose(logits(reloaded, inputs), logits(result.trainer.model, inputs), atol=1e-5)
    assert not torch.allclose(logits(reloaded, inputs), logits(base_model(), inputs), atol=1e-3), "weights changed"

    saved_config = (out / RUN_CONFIG_FILE).read_text()
    assert "use_lora: false" in saved_config and "learning_rate: 0.003" in saved_config
    again = load_config(str(out / RUN_CONFIG_FILE))  # the resolved config trains again as it is
    assert again.resolved["training"]["learning_rate"] == 0.003 and again.training.max_length == result.trainer.args.max_length
    assert fingerprint(again.resolved) == fingerprint(config.resolved), "the same run, as a resume would find it"
    assert (again.training.eos_token, again.training.pad_token, again.training.hub_token) == \
        (config.training.eos_token, config.training.pad_token, None), "no <EOS_TOKEN> placeholder of to_dict's"
    assert "torch_compile:" not in saved_config and all(choice.chosen for choice in again.speed), \
        "what the fast path chose for this machine is chosen again on the next"
    assert json.loads((out / VERSIONS_FILE).read_text())["trl"]
    assert not (out / STAGING_DIR).exists()


def changed_weights(model_dir) -> float:
    """The share of the published weights that differ from the base's, at the published precision."""
    from safetensors.torch import load_file

    base, trained = load_file(TINY_MODEL / "model.safetensors"), load_file(model_dir / "model.safetensors")
    changed = sum((value != base[name].to(value.dtype)).sum().item() for name, value in trained.items())
    return changed / sum(value.numel() for value in trained.values())


def test_full_fine_tuning_in_bf16_keeps_float32_weights_so_small_updates_are_not_lost(tmp_path, capsys):
    """In bf16 weights AdamW's updates below 1/256 of a weight are lost: at learning rate 1e-5 most weights never
    changed. With model.dtype auto the weights stay float32 (bf16 autocast) and the model is published in bf16."""
    settings = ["--training.bf16", "true", "--training.learning_rate", "1e-5", "--training.warmup_steps", "0",
                "--training.lr_scheduler_type", "constant", "--dataset.test_size", "null"]
    run(tmp_path / "mixed", "default_train_config.yaml", *settings, steps=10)
    assert "full fine-tuning of data/tiny-chat-llama in bfloat16 with float32 weights" in capsys.readouterr().out
    run(tmp_path / "pure", "default_train_config.yaml", *settings, "--model.dtype", "bfloat16", steps=10)
    mixed, pure = tmp_path / "mixed" / "out", tmp_path / "pure" / "out"
    with safe_open(mixed / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert json.loads((mixed / "config.json").read_text())["dtype"] == "bfloat16"  # what dtype "auto" loads
    assert AutoModelForCausalLM.from_pretrained(mixed).dtype == torch.bfloat16
    assert changed_weights(mixed) > 0.4 and changed_weights(pure) < 0.2


def test_lora_saves_the_adapter_and_a_merged_model_equal_to_base_plus_adapter(tmp_path):
    _, result = run(tmp_path, "lora_train_config.yaml")
    out = tmp_path / "out"
    summary = result.summary
    assert summary["adapter_dtypes"] == ["float32"]
    assert 0 < summary["trainable_parameters"] < summary["total_parameters"]
    assert summary["train_loss_last"] < summary["train_loss_first"]

    with safe_open(out / ADAPTER_DIR / "adapter_model.safetensors", "pt") as adapter:
        names = list(adapter.keys())
        assert all(adapter.get_tensor(name).numel() > 0 for name in names)
    assert not (out / ADAPTER_DIR / "README.md").exists(), "no empty card template beside the adapter"
    for weights in (out / "model.safetensors", out / ADAPTER_DIR / "adapter_model.safetensors"):
        assert weights.stat().st_mode & 0o777 == (out / "config.json").stat().st_mode & 0o777 == 0o644
    linear_layers = 7 * 4  # q k v o gate up down, in each of the 4 layers
    assert sum("lora_A" in n for n in names) == sum("lora_B" in n for n in names) == linear_layers

    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32 and not any("lora" in n for n, _ in merged.named_parameters())
    with_adapter = PeftModel.from_pretrained(base_model(), out / ADAPTER_DIR)
    inputs = batch(AutoTokenizer.from_pretrained(out))
    difference = (logits(merged, inputs) - logits(with_adapter, inputs)).abs().max().item()
    assert difference < 1e-4
    assert not torch.allclose(logits(merged, inputs), logits(base_model(), inputs), atol=1e-3), "the adapter did something"


def test_a_lora_of_tied_input_embeddings_publishes_the_model_it_trained(tmp_path):
    """The tiny model ties its output layer to its input embeddings (as Llama 3.2 1B, Qwen2.5 0.5B and Gemma do):
    PEFT merged the embeddings' LoRA into the shared weight, so the published model's output layer changed too,
    though training never adapted it (logits 5.6 apart; eval loss 1.90 where the run reported 1.80)."""
    assert AutoConfig.from_pretrained(TINY_MODEL).tie_word_embeddings
    _, result = run(tmp_path, "lora_train_config.yaml", "--model.lora_config.target_modules", "[q_proj, embed_tokens]",
                    steps=10)
    out = tmp_path / "out"
    merged = AutoModelForCausalLM.from_pretrained(out)
    with_adapter = PeftModel.from_pretrained(base_model(), out / ADAPTER_DIR)
    assert any("embed_tokens.lora_embedding_A" in name for name, _ in with_adapter.named_parameters())
    inputs = batch(AutoTokenizer.from_pretrained(out))
    assert (logits(merged, inputs) - logits(with_adapter, inputs)).abs().max().item() < 1e-4
    assert not merged.config.tie_word_embeddings
    assert torch.equal(merged.get_output_embeddings().weight, base_model().get_output_embeddings().weight)


def test_a_merged_model_names_the_pad_and_eos_tokens_of_its_tokenizer(tmp_path):
    """A base that pads with its eos: the run pads with another token (model.ensure_distinct_pad_token) and the
    published tokenizer says so, but the merged model's config and generation config kept the base's pad (the eos),
    as did its eos where training.eos_token changed it; a full fine-tune's said the tokenizer's (TRL sets them)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(TINY_MODEL, base)
    for name in ("tokenizer_config.json", "config.json", "generation_config.json"):
        settings = json.loads((base / name).read_text())
        settings.update({"pad_token": "<|im_end|>"} if name.startswith("tokenizer") else {"pad_token_id": 1})
        (base / name).write_text(json.dumps(settings))
    run(tmp_path, "lora_train_config.yaml", "--model.path", str(base), "--training.eos_token", "<|im_start|>", steps=2)
    out = tmp_path / "out"
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (2, 3)
    config, generation = (json.loads((out / name).read_text()) for name in ("config.json", "generation_config.json"))
    assert (config["pad_token_id"], config["eos_token_id"]) == (2, 3)
    assert (generation["pad_token_id"], generation["eos_token_id"]) == (2, [3, 1])


def test_a_configured_pad_token_pads_and_is_published_without_a_deprecation_warning(tmp_path):
    """TRL 1.16 warned that training.pad_token is deprecated and to set tokenizer.pad_token, which a sftkit user
    cannot reach; TRL still applies it, and the published tokenizer and model say it."""
    from conftest import run_python

    result = run_python("sft.py", "--training.pad_token", "<|begin_of_text|>", "--training.max_steps", "1",
                        "--training.output_dir", str(tmp_path / "out"))
    assert "deprecated" not in result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tokenizer.pad_token == "<|begin_of_text|>"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["pad_token_id"] == tokenizer.pad_token_id


def test_qlora_merges_into_the_unquantized_base(tmp_path):
    from transformers import BitsAndBytesConfig

    _, result = run(tmp_path, "qlora_train_config.yaml")
    out = tmp_path / "out"
    # TRL keeps QLoRA's adapters in bf16 in a float32 run: the summary says what each file holds
    assert (result.summary["saved_dtypes"], result.summary["adapter_dtypes"]) == (["float32"], ["bfloat16"])
    assert f"LoRA adapter       {out / ADAPTER_DIR} (bfloat16)" in format_summary(result.summary)
    # its eval losses are the 4-bit model's, which is not the one published
    assert result.summary["evaluated_in_4_bits"] and result.summary["eval_loss"] is not None
    assert "(start -> end), of the 4-bit base with the adapter, as it trained; `sftkit compare` evaluates the " \
        "published merged model, unquantized" in format_summary(result.summary)
    assert "The eval losses are of the 4-bit base with the adapter" in (out / "README.md").read_text()
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.float32
    inputs = batch(AutoTokenizer.from_pretrained(out))

    full_precision = PeftModel.from_pretrained(base_model(), out / ADAPTER_DIR)
    assert (logits(merged, inputs) - logits(full_precision, inputs)).abs().max().item() < 1e-4
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    quantized = PeftModel.from_pretrained(base_model(quantization_config=four_bit), out / ADAPTER_DIR)
    assert (logits(merged, inputs) - logits(quantized, inputs)).abs().max().item() > 1e-2, "not a dequantized merge"


def test_qlora_trains_the_same_with_evaluations_and_sample_replies_in_between(tmp_path):
    def losses(name, *overrides):
        _, result = run(tmp_path / name, "qlora_train_config.yaml", "--training.logging_steps", "1", *overrides, steps=8)
        return [entry["loss"] for entry in result.trainer.state.log_history if "loss" in entry]

    plain = losses("plain", "--training.eval_on_start", "false")
    evaluated = losses("evaluated", "--training.eval_strategy", "steps", "--training.eval_steps", "3",
                       "--dataset.sample_prompts", '["Hello!"]')
    assert evaluated == pytest.approx(plain, abs=1e-4)  # bitsandbytes' CPU inference repacking is kept off


def test_qlora_trains_a_whole_lm_head_and_still_samples_replies(tmp_path, caplog):
    _, result = run(tmp_path, "qlora_train_config.yaml", "--model.lora_config.modules_to_save", "[lm_head]",
                    "--dataset.sample_prompts", '["Hello!"]', steps=2)
    assert "could not be generated" not in caplog.text
    samples = [json.loads(line) for line in (tmp_path / "out" / "sample_replies.jsonl").read_text().splitlines()]
    assert samples and all(sample["reply"] for sample in samples)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not torch.equal(merged.lm_head.weight, base_model().lm_head.weight), "the trained lm_head is published"


@pytest.mark.parametrize(("preset", "steps", "method"), [("fast_test", None, "full"), ("low_memory", 2, "QLoRA"),
                                                       ("full_training", 2, "full")])
def test_presets_train_the_tiny_model(tmp_path, preset, steps, method):
    overrides = ["--training.output_dir", str(tmp_path / "out")] + (["--training.max_steps", str(steps)] if steps else [])
    config = load_config(None, overrides, preset)
    summary = train(config).summary
    assert summary["steps"] == (steps or 20)
    assert ("QLoRA" if config.model.load_in_4bit else "full") == method
    if preset == "fast_test":  # 20 steps with a log at each: the loss visibly falls
        assert summary["train_loss_last"] < summary["train_loss_first"] * 0.8, summary
    assert (tmp_path / "out" / "config.json").exists()


def test_use_lora_alone_switches_the_method(tmp_path):
    _, result = run(tmp_path, "default_train_config.yaml", "--model.use_lora", "true", steps=3)
    assert (tmp_path / "out" / ADAPTER_DIR / "adapter_config.json").exists()
    assert result.summary["trainable_parameters"] < result.summary["total_parameters"]


def test_a_failed_export_leaves_the_previous_complete_model_untouched(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(TINY_MODEL, base)
    config, result = run(tmp_path, "lora_train_config.yaml", "--model.path", str(base), steps=3)
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    shutil.rmtree(base)  # the merge reloads the base, so this export fails half-way
    tokenizer = result.trainer.processing_class
    with pytest.raises(RunFailed, match=f"The trained adapter is kept in {out / STAGING_DIR / ADAPTER_DIR}"):
        export_float32(result.trainer, config, tokenizer)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert (out / STAGING_DIR / ADAPTER_DIR).exists(), "the partial export stays in the staging directory"
    AutoModelForCausalLM.from_pretrained(out)


def test_eval_loss_is_logged_and_the_best_checkpoint_is_kept(tmp_path):
    _, result = run(tmp_path, "default_train_config.yaml", "--training.eval_strategy", "steps", "--training.eval_steps", "4",
                    "--training.save_strategy", "steps", "--training.save_steps", "4", "--training.load_best_model_at_end", "true",
                    "--training.metric_for_best_model", "eval_loss", steps=12)
    state = result.trainer.state
    evals = [entry["eval_loss"] for entry in state.log_history if "eval_loss" in entry]
    assert len(evals) >= 3
    assert state.best_model_checkpoint and state.best_metric == min(evals[:3])


def test_a_run_that_publishes_its_best_checkpoint_reports_that_checkpoints_eval_loss(tmp_path):
    """load_best_model_at_end publishes the best checkpoint's model; the summary and card reported the last step's
    eval loss. The best by the lowest entropy of the replies is an earlier checkpoint's, as an overfitting run's is."""
    _, result = run(tmp_path, "default_train_config.yaml", "--training.eval_strategy", "steps", "--training.eval_steps",
                    "4", "--training.save_strategy", "steps", "--training.save_steps", "4",
                    "--training.load_best_model_at_end", "true", "--training.metric_for_best_model", "eval_entropy",
                    "--training.greater_is_better", "false", steps=12)
    out, summary = tmp_path / "out", result.summary
    evaluations = [entry for entry in result.trainer.state.log_history if "eval_loss" in entry and entry["step"]]
    step = min(evaluations, key=lambda entry: entry["eval_entropy"])["step"]
    assert step < 12, "the test needs a best checkpoint before the last step"
    at_step = {entry["step"]: entry["eval_loss"] for entry in evaluations}
    assert (summary["best_checkpoint_step"], summary["eval_loss"]) == (step, at_step[step])
    said = format_summary(summary)
    assert f"(start -> step {step}, the best checkpoint)" in said
    assert f"{out} (float32; step {step}, the best checkpoint)" in said
    assert f"The model is the best checkpoint's, step {step} of 12" in (out / "README.md").read_text()
    with safe_open(out / "model.safetensors", "pt") as published, \
            safe_open(out / f"checkpoint-{step}" / "model.safetensors", "pt") as best:
        assert all(torch.equal(published.get_tensor(name), best.get_tensor(name)) for name in best.keys())


def test_a_run_that_does_not_count_its_input_tokens_says_so_instead_of_a_speed_of_zero(tmp_path):
    """It printed "tokens n/a input (0/s)": the Trainer counts input tokens only where asked to."""
    _, result = run(tmp_path, "default_train_config.yaml", "--training.include_num_input_tokens_seen", "no", steps=2)
    assert (result.summary["input_tokens"], result.summary["tokens_per_second"]) == (None, None)
    assert (f"  tokens             {result.summary['trained_tokens']:,} trained (input tokens not counted: "
            "training.include_num_input_tokens_seen is off)\n") in format_summary(result.summary)


def test_the_summary_covers_every_step_whatever_the_logging_interval(tmp_path):
    """The last step is logged too: a 4-step run logging every 10 steps had its first step's loss as its mean and
    last train loss."""
    every_step = run(tmp_path / "each", "default_train_config.yaml", "--training.logging_steps", "1", steps=4)[1]
    sparse = run(tmp_path / "sparse", "default_train_config.yaml", "--training.logging_steps", "10", steps=4)[1]
    losses = [entry["loss"] for entry in every_step.trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and sparse.summary["train_loss_mean"] == pytest.approx(sum(losses) / 4, rel=1e-4)
    logged = {entry["step"]: entry["loss"] for entry in sparse.trainer.state.log_history if "loss" in entry}
    assert list(logged) == [1, 4] and logged[4] == pytest.approx(sum(losses[1:]) / 3, rel=1e-4)  # steps 2 to 4


def test_a_run_evaluated_on_its_own_train_rows_says_so_in_its_header_summary_and_card(tmp_path, capsys):
    """Eval rows that are train rows too (a second export of the same pool, rows the data repeats) were said only by
    the dry run; the run, its summary and its card called their loss held-out."""
    evaluated = tmp_path / "eval.jsonl"
    evaluated.write_text("\n".join(SAMPLE_DATA.read_text().splitlines()[:8]) + "\n")  # trained on: no test_size
    _, result = run(tmp_path, "default_train_config.yaml", "--dataset.test_size", "null", "--dataset.eval_sources",
                    json.dumps([{"name": str(evaluated)}]), steps=2)
    said = capsys.readouterr()
    repeated = 8
    assert f"to train, {repeated} eval rows ({repeated} eval rows are also train rows, token for token)" in said.out
    assert (f"{repeated} of the {repeated} eval rows are also train rows, token for token, so the eval loss measures "
            "recall more than learning") in said.err
    assert result.summary["eval_rows_also_trained"] == result.summary["eval_rows"] == repeated
    card = (tmp_path / "out" / "README.md").read_text()
    assert f", {repeated} evaluated on ({repeated} of them also trained on)" in card


def test_a_tool_calling_dataset_trains_its_calls_and_publishes_a_template_that_renders_tools(tmp_path):
    """Tools and calls reach the template in training, in the sample replies (asked with the row's tools) and in
    the published tokenizer, so the model is asked at inference as it was trained."""
    from conftest import TEMPLATES, run_sft

    weather = {"name": "get_weather", "description": "The weather of a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    rows = [{"messages": [
        {"role": "user", "content": f"What is the weather in {city}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
        {"role": "tool", "content": json.dumps({"temp": temp})},
        {"role": "assistant", "content": f"It is {temp} degrees in {city}."}],
        "tools": [{"type": "function", "function": weather}]}
        for city, temp in [("Paris", 20), ("Rome", 25), ("Oslo", 5), ("Lima", 18)] * 3]
    data = tmp_path / "calls.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    run_sft("--dataset.name", str(data), "--dataset.chat_template", str(TEMPLATES / "qwen2_5.jinja"),
            "--dataset.sample_prompts", '["What is the weather in Rome?"]', "--model.max_seq_length", "640",
            "--training.max_steps", "2", "--training.eval_strategy", "steps", "--training.eval_steps", "1",
            "--training.output_dir", str(out))
    summary = json.loads((out / SUMMARY_FILE).read_text())
    # per row, the call and the reply train: far more than the replies alone
    published = AutoTokenizer.from_pretrained(out)
    replies = sum(len(published(row["messages"][3]["content"])["input_ids"]) for row in rows)
    assert summary["trained_tokens"] > 2 * replies
    prompt = published.apply_chat_template([rows[0]["messages"][0]], tools=rows[0]["tools"], tokenize=False,
                                           add_generation_prompt=True)
    assert '"name": "get_weather"' in prompt and prompt.endswith("<|im_start|>assistant\n")
    samples = [json.loads(line) for line in (out / "sample_replies.jsonl").read_text().splitlines()]
    assert [sample["prompt"] for sample in samples] == ["What is the weather in Rome?"] * len(samples) and samples
