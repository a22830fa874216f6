"""The workarounds in sftkit/compat.py: each still needed, each doing what it says."""

import logging
import warnings

from sftkit.compat import announce_deepspeed_cpu_op_build


def test_deepspeeds_first_cpu_op_build_is_announced_once_per_machine(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("RANK", raising=False)
    announce_deepspeed_cpu_op_build()
    assert "DeepSpeed is building its CPU communication op (once per machine; 1 to 4 minutes)" in capsys.readouterr().out
    built = tmp_path / "py311_cpu" / "deepspeed_shm_comm"  # where DeepSpeed 0.19 leaves the built op
    built.mkdir(parents=True)
    (built / "deepspeed_shm_comm.so").write_bytes(b"")
    announce_deepspeed_cpu_op_build()
    assert capsys.readouterr().out == ""


def test_known_noise_is_filtered_at_its_source_and_nothing_else(caplog):
    import sftkit  # noqa: F401  (installs the filters)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.resetwarnings()
        import sftkit.compat

        sftkit.compat.quiet_known_noise()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    with caplog.at_level(logging.WARNING):
        logging.getLogger("transformers.tokenization_utils_base").warning(
            "Token indices sequence length is longer than the specified maximum sequence length (528 > 512)")
        logging.getLogger("transformers.tokenization_utils_base").warning("another tokenizer warning")
    assert [record.getMessage() for record in caplog.records] == ["another tokenizer warning"]
