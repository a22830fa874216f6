"""The workarounds in sftkit/compat.py: each still needed, each doing what it says."""

import logging
import warnings

import pytest

from sftkit.compat import before_deepspeed_cpu_op_build


def test_deepspeeds_first_cpu_op_build_is_announced_once_per_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    before_deepspeed_cpu_op_build()
    assert "DeepSpeed is building its CPU communication op (once per machine; 1 to 4 minutes)" in capsys.readouterr().out
    built = tmp_path / "py311_cpu" / "deepspeed_shm_comm"  # where DeepSpeed 0.19 leaves the built op
    built.mkdir(parents=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    before_deepspeed_cpu_op_build()
    assert capsys.readouterr().out == ""


def test_a_stale_deepspeed_op_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch, caplog):
    """torch's FileBaton lock has no owner: one left by a killed process made every later DeepSpeed run wait."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    built = tmp_path / "py311_cpu" / "deepspeed_shm_comm"
    built.mkdir(parents=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    (built / "lock").write_bytes(b"")
    before_deepspeed_cpu_op_build()
    assert (built / "lock").exists(), "a build may be running: its lock stays"
    an_hour_ago = time.time() - 3600
    os.utime(built / "lock", (an_hour_ago, an_hour_ago))
    with caplog.at_level(logging.WARNING, logger="sftkit"):
        before_deepspeed_cpu_op_build()
    assert not (built / "lock").exists() and "left 60 minutes ago by a DeepSpeed op build" in caplog.text


def test_known_noise_is_filtered_at_its_source_and_nothing_else(caplog):
    import sftkit  # noqa: F401  (installs the filters)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.resetwarnings()
        import sftkit.compat

        sftkit.compat.quiet_known_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`use_liger_kernel=True` is deprecated and will be removed in v2.0.0.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.tokenization_utils_base").warning(
            "Token indices sequence length is longer than the specified maximum sequence length (528 > 512)")
        logging.getLogger("transformers.tokenization_utils_base").warning("another tokenizer warning")
    assert [record.getMessage() for record in caplog.records] == ["another tokenizer warning"]


# Each workaround in sftkit/compat.py, checked against the library behaviour it works around: when one of these
# fails after an upgrade, the workaround may be obsolete (or need changing), not the test.

def test_trl_still_warns_about_liger_as_the_filter_expects_and_still_accepts_it():
    """sftkit turns Liger on where it is installed; TRL 2.0 is to remove use_liger_kernel (then the fast path needs
    transformers' Hub kernels instead, and the filter goes)."""
    import inspect

    from trl import SFTConfig, SFTTrainer

    source = inspect.getsource(SFTTrainer.__init__)
    assert "`use_liger_kernel=True` is deprecated" in source
    # and refuses Liger's fused cross-entropy, which sftkit refuses first, before loading (checks.cross_field_errors)
    assert '"fused_linear_cross_entropy": True}` is not supported' in source
    assert "use_liger_kernel" in SFTConfig.__dataclass_fields__


def test_trl_still_defaults_to_the_old_gradient_checkpointing_name():
    import dataclasses

    from trl import SFTConfig

    fields = {field.name: field for field in dataclasses.fields(SFTConfig)}
    assert fields["gradient_checkpointing"].default is True and "activation_checkpointing" in fields
    kwargs = {"gradient_checkpointing": False}
    from sftkit.compat import rename_gradient_checkpointing

    rename_gradient_checkpointing(kwargs)
    assert kwargs == {"activation_checkpointing": False, "activation_checkpointing_kwargs": None}


def test_transformers_still_hides_every_token_field_and_sftkit_keeps_the_vocabulary_ones(tmp_path):
    from trl import SFTConfig

    from sftkit.compat import training_fields

    training = SFTConfig(output_dir=str(tmp_path), eos_token="<|im_end|>", pad_token="<|endoftext|>", use_cpu=True)
    assert training.to_dict()["eos_token"] == "<EOS_TOKEN>", "to_dict keeps eos_token now: remove training_fields"
    values = training_fields(training)
    assert (values["eos_token"], values["pad_token"], values["hub_token"]) == ("<|im_end|>", "<|endoftext|>", None)
    assert values["learning_rate"] == training.learning_rate and values["lr_scheduler_type"] == "linear"


def test_bitsandbytes_4bit_layers_still_have_the_cpu_repacking_flag():
    """The attribute compat.keep_cpu_4bit_layout_trainable turns off; it is false already on a CPU without
    AVX-512 BF16 (this test asserted it true, and failed on such a CPU)."""
    import bitsandbytes

    assert hasattr(bitsandbytes.nn.Linear4bit(16, 16), "support_avx512bf16_for_cpu")


def test_transformers_still_registers_its_deepspeed_config_in_a_module_global():
    from transformers.integrations import deepspeed as hf_deepspeed

    from sftkit.compat import zero3_init_disabled

    marker = object()
    hf_deepspeed._hf_deepspeed_config_weak_ref, before = marker, hf_deepspeed._hf_deepspeed_config_weak_ref
    try:
        with zero3_init_disabled():
            assert hf_deepspeed._hf_deepspeed_config_weak_ref is None
        assert hf_deepspeed._hf_deepspeed_config_weak_ref is marker
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = before


def test_deepspeeds_estimators_take_the_arguments_by_these_names():
    from sftkit.compat import zero_model_states

    cpu, gpu = zero_model_states(3, total=10**9, largest_layer=10**8, world_size=2, offload_optimizer=True,
                                 offload_params=False)
    assert cpu > 0 and gpu > 0
    assert zero_model_states(2, 10**9, 0, 2, False, False)[1] > gpu


def test_the_trainer_still_leaves_the_loss_window_and_tied_keys_to_sftkit():
    import inspect

    from transformers import Trainer
    from trl import SFTTrainer

    assert "_tr_loss" in inspect.getsource(Trainer) and "_tr_loss" not in inspect.getsource(Trainer._save_checkpoint)
    assert "tied" not in inspect.getsource(Trainer._issue_warnings_after_load)
    assert "create_model_card" in inspect.getsource(SFTTrainer._save_checkpoint)


def test_datasets_still_reads_a_field_of_mixed_types_as_json_and_changes_text_that_parses(tmp_path):
    """compat.refuse_values_datasets_reads_as_json exists for this (datasets 5.2)."""
    import json

    from datasets import Json, load_dataset
    from datasets.utils.json import ujson_loads  # the parser datasets reads with, which the check uses

    assert ujson_loads('"4"') == "4" and ujson_loads("4") == 4

    rows = [{"messages": [{"role": "assistant", "content": "4"}]}, {"messages": [{"role": "user", "content": [1]}]}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_dataset("json", data_files=str(tmp_path / "rows.jsonl"), split="train")
    assert isinstance(loaded.features["messages"].feature["content"], Json)
    assert loaded[0]["messages"][0]["content"] == 4


def test_checkpoint_folders_are_named_as_the_trainer_names_them():
    """sftkit finds, names and builds checkpoint paths with its own copy of the Trainer's prefix."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    from sftkit.layout import CHECKPOINT_PREFIX

    assert CHECKPOINT_PREFIX == PREFIX_CHECKPOINT_DIR


@pytest.mark.parametrize("text", ["[pair.cc:598] Timed out waiting 20000ms for recv operation to complete",
                                  "[pair.cc:123] Application timeout caused pair closure"])
def test_both_of_gloos_timeout_texts_are_read_as_a_machine_that_does_not_answer(monkeypatch, text):
    """Where gloo's pair timeout came before its recv's (a loaded CI host), the run ended in a traceback."""
    from sftkit.peers import lost_contact

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert lost_contact(RuntimeError(text)).startswith("another process did not answer within training.ddp_timeout")
