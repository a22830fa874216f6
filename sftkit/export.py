"""Save what a run produced: the LoRA adapter and a merged model, or the full model; tokenizer and config beside.

Everything is first written to a staging directory inside output_dir (so on the same filesystem, and a rename
publishes it), checked to be finite, and moved into place at the end, config.json last: an interrupted export never
leaves a directory that loads as if it were complete. If the export fails after the trained weights were written,
they stay in the staging directory and `python -m sftkit.export OUTPUT_DIR` finishes the job.

    python -m sftkit.export outputs/lora     # finish an export that failed (for example on a full disk)
"""

import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path

import yaml

from sftkit.checkpoints import (
    kept_work_words,
    last_step_checkpoint,
    newest_checkpoint_words,
    newest_resumable,
    unexported_last_step,
)
from sftkit.command import export_command
from sftkit.compat import float32_by_design, untie_an_adapted_embedding, zero3_init_disabled
from sftkit.config import read_section
from sftkit.environment import available_memory, library_versions
from sftkit.errors import ConfigError, OneLineArgumentParser, RunFailed, SftkitError, first_line, say_error
from sftkit.layout import (
    ADAPTER_DIR,
    BEFORE_AFTER_FILE,
    LOSS_PLOT,
    MODEL_CARD,
    PUBLISHING_FILE,
    RUN_CONFIG_FILE,
    RUN_FILE,
    STAGING_DIR,
    SUMMARY_FILE,
    VERSIONS_FILE,
    adapter_base,
    moved_by_a_publish_cut_short,
    published_weights,
    written_by_sftkit,
)
from sftkit.peers import lost_contact
from sftkit.rundir import survey
from sftkit.runlock import RunLock
from sftkit.runrecord import (
    changed_model_files,
    read_run_record,
    record_published,
    record_written,
    trained_to_step,
    write_json,
)
from sftkit.schema import ModelConfig
from sftkit.weightfiles import (
    check_free_space,
    cut_short,
    disk_failure,
    export_bytes,
    missing_weights,
    non_finite_tensors,
    readable_like_other_files,
    safetensors_weights,
    size_words,
)

DISK_WAIT_SECONDS = float(os.environ.get("SFTKIT_DISK_WAIT_SECONDS", 900))
DISK_POLL_SECONDS = 30
MERGE_OVERHEAD = 2 * 2**30  # host memory of the process itself beside the base it merges into: torch, the tokenizer


def stage_trained_weights(trainer, run_config, tokenizer, dtype, weights, parameters: tuple[int, int]) -> bool:
    """The export's first half, on every process: the trained weights written to the staging directory. From there
    a failure or a kill of what follows (the final evaluation, the merge) leaves them for `python -m sftkit.export`
    to finish. False where another process was lost after they were written (the main process publishes them)."""
    output_dir = Path(trainer.args.output_dir)
    staging = output_dir / STAGING_DIR
    lora = run_config.model.use_lora
    main = trainer.accelerator.is_main_process
    failure = None
    if main:  # the others wait meanwhile, at most training.ddp_timeout
        limit = DISK_WAIT_SECONDS if trainer.args.world_size == 1 else min(DISK_WAIT_SECONDS,
                                                                            trainer.args.ddp_timeout * 0.8)
        try:
            _begin_staging(staging, run_config, tokenizer,
                           export_bytes(parameters[1], parameters[0], dtype, lora, weights,
                                        run_config.model.merge_adapter), limit)
        except Exception as error:  # an unwritable disk that stayed so
            failure = error
    # every process asks the same questions, in the same order: one that failed alone left the others waiting
    if not _failed_anywhere(trainer, failure is not None):
        try:
            trainer.save_model(str(staging / ADAPTER_DIR if lora else staging))
            if main and lora:  # PEFT's empty card template; output_dir/README.md describes the model
                (staging / ADAPTER_DIR / "README.md").unlink(missing_ok=True)
        except Exception as error:  # OSError, or safetensors' own error on a full disk
            if lost := lost_contact(error):  # before or in the ZeRO-3 or FSDP gather: no weights reached this process
                raise _lost_before_the_weights(f"{lost}; it happened before the weights were written", output_dir,
                                               lora, main) from error
            failure = error
        try:
            if not _failed_anywhere(trainer, failure is not None):
                return True
        except Exception as error:
            if failure is not None or not lost_after_staging(error, main, output_dir):
                raise
            return False
    what = f"could not write the trained {'adapter' if lora else 'model'} to {staging}: {first_line(failure)}" \
        if failure is not None else "another process could not write the trained weights (why is in its output)"
    raise _lost_before_the_weights(what, output_dir, lora, main) from failure


def lost_after_staging(error: BaseException, main: bool, output_dir: Path) -> bool:
    """Whether `error` is another process lost after the trained weights were staged; then said as a warning: the main
    process publishes them alone, without what needs every process (the final evaluation, the sample reply), and
    the others end quietly, which a failure would not let it (its machine's launcher, or watcher, would stop it)."""
    lost = lost_contact(error)
    if lost is None:
        return False
    then = "the trained model is published without the final evaluation and sample reply, which need every process" \
        if main else f"the main process publishes the trained model without them; if it is the one gone, " \
                     f"{kept_work_words(output_dir)}"
    logging.getLogger("sftkit").warning(f"{lost}; {then}")
    return True


def _failed_anywhere(trainer, failed: bool) -> bool:
    """Whether writing the weights failed on any process: then every one stops here, where the others would wait for
    the failed one in the final evaluation's collectives."""
    if trainer.args.world_size < 2:
        return failed
    import torch

    flag = torch.tensor(float(failed), device=trainer.args.device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())


def publish_staged(trainer, run_config, dtype) -> Path:
    """The export's second half: the main process merges, checks and publishes the staged weights."""
    output_dir = Path(trainer.args.output_dir)
    if trainer.accelerator.is_main_process:  # the others are done and leave: waiting for the merge and checks of a
        # large model at a barrier, they would be torn down by NCCL's watchdog after training.ddp_timeout, and the
        # launcher would stop this process
        finish_export(output_dir, run_config.model, dtype)
    return output_dir


def _lost_before_the_weights(lost: str, output_dir: Path, lora: bool, main: bool) -> RunFailed:
    """The weights were never written (a process lost before they were gathered, a disk that stayed full): the
    staging directory is kept where the run's last-step checkpoint holds them (`sftkit export` finishes from it),
    else removed (its tokenizer and config are no trained model to finish)."""
    last = last_step_checkpoint(output_dir, "adapter_model" if lora else "model")
    if last is not None:
        return RunFailed(f"{lost}, so the export was not finished; the model it exports is saved in {last}: finish "
                         f"the export from it with: {export_command(output_dir)}")
    if main:
        shutil.rmtree(output_dir / STAGING_DIR, ignore_errors=True)
    return RunFailed(f"{lost}, so no trained weights were saved; {newest_checkpoint_words(output_dir)}")


def write_metadata(directory: Path, run_config, tokenizer) -> None:
    """Tokenizer, resolved config (secrets hidden) and library versions: small, so written first."""
    tokenizer.save_pretrained(directory)
    # without what the fast path chose for this machine (flash_attention_2, compile...): the next one chooses its own
    _write_config_and_versions(directory, run_config.resolved, {choice.key for choice in run_config.speed
                                                                if choice.chosen})


def _write_config_and_versions(directory: Path, resolved: dict, left_out: set[str]) -> None:
    """A config to train with again (without training.max_length, which comes from model.max_seq_length, nor the
    keys `left_out`), and the library versions."""
    left_out = left_out | {"training.max_length"}
    reusable = {section: {key: value for key, value in values.items() if f"{section}.{key}" not in left_out}
                for section, values in resolved.items()}
    (directory / RUN_CONFIG_FILE).write_text(yaml.safe_dump(reusable, sort_keys=False))
    (directory / VERSIONS_FILE).write_text(json.dumps(library_versions(), indent=2) + "\n")


def finish_export(output_dir: Path, model_cfg: ModelConfig, dtype, **record) -> None:
    """From trained weights in the staging directory to a published model: merge (LoRA), check, move into place,
    record the run finished (with `record` added). Any failure keeps the staging directory and says how to finish
    from it."""
    staging = output_dir / STAGING_DIR
    try:
        if not (staging / PUBLISHING_FILE).is_file():  # else a publish cut short: checked, and part of it moved
            _complete_and_check(staging, model_cfg, dtype)
        _publish(staging, output_dir)
    except RunFailed:
        raise
    except Exception as error:  # a full disk raises OSError or safetensors' own error; any failure keeps the weights
        reason = first_line(error)
        if (staging / PUBLISHING_FILE).is_file():
            raise RunFailed(f"publishing the model in {output_dir} failed part way: {reason}. What is not moved yet "
                            f"is in {staging}; once that is fixed, finish with: "
                            f"{export_command(output_dir)}") from error
        if model_cfg.use_lora:  # a half-written merged model: gone, so the staging directory holds only the adapter
            _drop_merged_model(staging)
        kept = staging / ADAPTER_DIR if model_cfg.use_lora else staging
        raise RunFailed(f"the export to {output_dir} failed: {reason}. The trained "
                        f"{'adapter' if model_cfg.use_lora else 'model'} is kept in {kept}; once that is fixed, "
                        f"finish the export with: {export_command(output_dir)}") from error
    record_published(output_dir, **record)


def _complete_and_check(staging: Path, model_cfg: ModelConfig, dtype) -> None:
    """The merged model (LoRA), the adapter alone (model.merge_adapter false) or the model in the training dtype,
    checked whole and finite."""
    if model_cfg.use_lora:
        require_weights(staging / ADAPTER_DIR, "adapter_model")
    if model_cfg.use_lora and model_cfg.merge_adapter:
        _merge_adapter(model_cfg, staging / ADAPTER_DIR, staging, dtype)
    elif not model_cfg.use_lora:
        _cast_float32_weights(staging, dtype, model_cfg.trust_remote_code)
    if not model_cfg.use_lora or model_cfg.merge_adapter:
        require_weights(staging, "model")
        _stop_at_the_end_of_a_reply(staging, model_cfg.trust_remote_code)
    broken = non_finite_tensors(staging)
    if broken and model_cfg.use_lora and not any(name.startswith(f"{ADAPTER_DIR}/") for name in broken):
        _drop_merged_model(staging)
        raise RunFailed(f"merging the trained adapter into its base gave weights that are not finite ({len(broken)} "
                        f"tensors hold nan or inf, e.g. {broken[0]}), though the adapter's are finite: nothing was "
                        f"published; the adapter is kept in {staging / ADAPTER_DIR}, to load on its base with PEFT (the merge "
                        "overflowed its dtype, or the base holds nan or inf)")
    if broken:
        shutil.rmtree(staging)
        raise RunFailed(f"the trained weights are not finite ({len(broken)} tensors hold nan or inf, e.g. "
                        f"{broken[0]}); nothing was published and the broken weights were deleted")


def merge_memory(base_parameters: int, dtype) -> int:
    """Host memory the merge of a LoRA adapter holds at its peak: the whole base, unquantized, in the training dtype,
    beside the process itself (the adapter is small)."""
    return base_parameters * dtype.itemsize + MERGE_OVERHEAD


def merge_memory_problem(model_cfg: ModelConfig, total_parameters: int, trainable_parameters: int, dtype,
                         memory: int | None) -> str | None:
    """Why the merge at the end cannot fit in `memory` bytes of host memory, or None: where it cannot, the run would
    train for hours and then be killed by the system while merging."""
    if not model_cfg.use_lora or not model_cfg.merge_adapter or memory is None:
        return None
    needed = merge_memory(total_parameters - trainable_parameters, dtype)
    if needed <= memory:
        return None
    return (f"model.merge_adapter: merging the adapter into its base at the end loads the whole base, unquantized, "
            f"into host memory: about {size_words(needed)} in {str(dtype).removeprefix('torch.')}, and this machine "
            f"has {size_words(memory)}; set model.merge_adapter: false to publish the adapter alone (and merge it "
            f"where memory allows, with: {export_command(Path('OUTPUT_DIR'))} --merge), or train on a machine with "
            "more memory")


def _stop_at_the_end_of_a_reply(directory: Path, trust_remote_code: bool, tokenizer_dir: Path | None = None) -> None:
    """The published generation config stops at the token the chat template ends each reply with, as the model
    learned to: where that is not the eos (a base model's ChatML template), plain `generate`, vLLM and TGI ran on
    past every reply. (The run set it in the trained model too, for its checkpoints; a merge reloads the base's.) A
    nicety: whatever fails here keeps the base's generation config, never the export."""
    from transformers import AutoTokenizer, GenerationConfig

    from sftkit.data.tokenize import stop_at_the_end_of_a_reply

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or directory, trust_remote_code=trust_remote_code)
    except Exception as error:  # noqa: BLE001 - e.g. killed before it saved the tokenizer
        logging.getLogger("sftkit").warning(f"the published generation config stops at the eos alone: the tokenizer "
                                            f"in {directory} could not be read ({first_line(error)})")
        return
    try:
        generation = GenerationConfig.from_pretrained(directory)
    except OSError:  # the model has none
        generation = GenerationConfig()
    if stop_at_the_end_of_a_reply(generation, tokenizer):
        generation.save_pretrained(directory)


def _drop_merged_model(staging: Path) -> None:
    for merged in [*staging.glob("model*.safetensors*"), staging / "config.json", staging / "generation_config.json"]:
        merged.unlink(missing_ok=True)


def _begin_staging(staging: Path, run_config, tokenizer, needed: int, limit: float) -> None:
    """The staging directory, with the tokenizer and config. The trained model exists only in memory until the
    export: rather than lose it to a full disk, or one that cannot be written (a filesystem remounted read-only after
    an I/O error, a network mount gone stale), wait for the user to mend it (checked every DISK_POLL_SECONDS, for
    `limit` seconds), then try anyway."""
    deadline = time.monotonic() + limit
    while True:
        try:
            problem = check_free_space(staging.parent, needed, "the export")
            if not problem or time.monotonic() >= deadline:
                _write_staging(staging, run_config, tokenizer)
                return
            waiting = "waiting for space"
        except OSError as error:
            reason = disk_failure(error, staging.parent)
            if reason is None or time.monotonic() >= deadline:
                raise
            problem = f"{staging} cannot be written ({reason})"
            waiting = "the trained model is in memory only: waiting for the disk to be mended"
        print(f"sftkit: {problem}; {waiting} (checking every {DISK_POLL_SECONDS} s until "
              f"{time.strftime('%H:%M', time.localtime(time.time() + deadline - time.monotonic()))})",
              file=sys.stderr, flush=True)
        time.sleep(min(DISK_POLL_SECONDS, max(deadline - time.monotonic(), 0)))


def _write_staging(staging: Path, run_config, tokenizer) -> None:
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    write_metadata(staging, run_config, tokenizer)


def _merge_adapter(model_cfg, adapter_dir: Path, target: Path, dtype) -> None:
    """Merge the saved adapter into a fresh, unquantized copy of the base (never into dequantized 4-bit weights)."""
    from peft import PeftModel

    from sftkit.model import load_model

    # The attention kernel plays no part in merging, and `sftkit export` may finish the export on a machine without
    # the one the run used (flash_attention_2, chosen where flash-attn is installed): load with the default. The
    # base is the one the adapter records (a local one by its absolute path), so `sftkit export` finds it from any
    # working directory.
    base_cfg = dataclasses.replace(model_cfg, path=adapter_base(adapter_dir), attn_implementation=None)
    _refuse_another_base(Path(base_cfg.path), target.parent)
    _refuse_a_merge_the_free_memory_cannot_hold(base_cfg, dtype)
    with zero3_init_disabled():
        base = load_model(base_cfg, dtype, gradient_checkpointing=False, quantize=False)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir))
    untie_an_adapted_embedding(adapted)
    merged = adapted.merge_and_unload()
    _agree_with_the_tokenizer(merged, target, adapter_dir)
    merged.save_pretrained(target)


def _refuse_a_merge_the_free_memory_cannot_hold(base_cfg: ModelConfig, dtype) -> None:
    """The check before training counted the machine's memory; by the merge, other processes, or this run's own
    host copy of the model (ZeRO-3 offload), may hold part of it, and the system would kill the process in the middle
    of the merge without a word. (This process itself is in memory already: the base alone is counted.)"""
    from sftkit.model import parameter_count

    available, parameters = available_memory(), parameter_count(base_cfg)
    if available is None or parameters is None or parameters * dtype.itemsize <= available:
        return
    raise MemoryError(f"merging the adapter loads its whole base, unquantized: about "
                      f"{size_words(parameters * dtype.itemsize)} in {str(dtype).removeprefix('torch.')}, and "
                      f"{size_words(available)} of memory is free now (free memory, or finish on a machine with more)")


def _agree_with_the_tokenizer(model, *places: Path) -> None:
    """The merged model's config and generation config name the pad and eos tokens the run trained with and its
    tokenizer is published with (the first of `places` that holds it), as TRL 1.16 sets them on the model it trains:
    the fresh copy of the base has the base's (a base padding with its eos gave its merged model pad_token_id = eos
    beside a tokenizer with another)."""
    from transformers import AutoTokenizer

    from sftkit.model import TOKENIZER_MARKERS

    found = next((place for place in places if any((place / name).is_file() for name in TOKENIZER_MARKERS)), None)
    if found is None:
        return
    try:
        tokenizer = AutoTokenizer.from_pretrained(found)
    except (OSError, TypeError, ValueError):  # not whole there: the base's ids stay, the export goes on
        return
    text, generation = model.config.get_text_config(), model.generation_config
    if tokenizer.pad_token_id is not None:
        text.pad_token_id = generation.pad_token_id = tokenizer.pad_token_id
    ends = [] if generation.eos_token_id is None else [generation.eos_token_id] \
        if isinstance(generation.eos_token_id, int) else list(generation.eos_token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ends:
        text.eos_token_id = tokenizer.eos_token_id
        generation.eos_token_id = [tokenizer.eos_token_id, *ends]


def _refuse_another_base(base: Path, output_dir: Path) -> None:
    problem = _another_base(base, output_dir)
    if problem:
        raise RunFailed(f"{problem}. The trained adapter is kept in {output_dir / STAGING_DIR / ADAPTER_DIR}; put the "
                        f"base back as it was, then finish the export with: {export_command(output_dir)}")


def _another_base(base: Path, output_dir: Path) -> str | None:
    """The adapter merges only into the base it trained on: a local base moved away, or replaced since, would
    publish other weights under this run's name (the run record holds its files' digests)."""
    if base.is_absolute() and not base.exists():  # a local base (its absolute path); a hub id is never absolute
        return f"the base model {base} that the adapter trained on is gone"
    changed = changed_model_files(read_run_record(output_dir), base) if base.is_dir() else []
    if changed:
        return (f"the base model {base} changed since the run trained on it ({', '.join(changed[:3])}): merging the "
                "adapter into it would publish other weights")
    return None


def _cast_float32_weights(directory: Path, dtype, trust_remote_code: bool) -> None:
    """Full fine-tuning in 16 bits trains float32 weights (mixed precision: model.weights_dtype, and FSDP's master
    weights), and the model is published in the training dtype, as DeepSpeed's 16-bit gather publishes it; the
    tensors the model keeps in float32 by design stay so, as from_pretrained would load them."""
    import torch
    from safetensors.torch import load_file, save_file

    if dtype not in (torch.bfloat16, torch.float16):
        return
    kept = functools.cache(lambda: float32_by_design(directory, dtype, trust_remote_code))  # at the first float32
    cast = False
    for file in sorted(directory.glob("model*.safetensors")):
        weights = load_file(file)
        floats = {name for name, tensor in weights.items() if tensor.is_floating_point()}
        float32 = {name for name in floats if weights[name].dtype == torch.float32}
        if not float32:
            continue
        pattern = kept()
        to_cast = {name for name in float32 if not (pattern and pattern.search(name))}
        if not to_cast or (pattern is None and to_cast != floats):  # an unknown model's mixed file: left as it is
            continue
        partial = file.with_name(file.name + ".partial")  # written beside, then renamed: a kill keeps the fp32 file
        save_file({name: tensor.to(dtype) if name in to_cast else tensor for name, tensor in weights.items()},
                  partial, metadata={"format": "pt"})
        os.replace(partial, file)
        cast = True
    config = directory / "config.json"  # save_pretrained wrote the float32 it held: dtype "auto" would load that
    if cast or (config.is_file() and json.loads(config.read_text()).get("dtype") == "float32"):  # or a cast cut short
        _record_dtype(config, str(dtype).removeprefix("torch."))


def _record_dtype(config_file: Path, dtype: str) -> None:
    """config.json's dtype, and its sub-configs' (a text_config), as the weights are saved."""
    def record(node: dict) -> dict:
        return {key: dtype if key in ("dtype", "torch_dtype") and isinstance(value, str) else
                record(value) if isinstance(value, dict) else value for key, value in node.items()}

    write_json(config_file, record(json.loads(config_file.read_text())))


def require_weights(folder: Path, stem: str) -> None:
    """RunFailed unless `stem`.safetensors, or every shard its index names, is in folder, whole. Where the Trainer
    cannot gather the weights (ZeRO-3 without its 16-bit gather, FSDP's sharded state dict) it saves none, yet
    writes config.json; a process without the gathered weights writes empty tensors."""
    missing = missing_weights(folder, stem)
    if missing is None:
        return
    if "empty tensors" in missing:
        raise RunFailed(f"the export wrote no complete model to {folder}: {missing}, as a process without the "
                        "gathered weights writes them, so nothing was published")
    raise RunFailed(f"the export wrote no complete model to {folder} ({missing}), so nothing was published. "
                    "Under DeepSpeed ZeRO-3 the DeepSpeed config needs stage3_gather_16bit_weights_on_model_save: "
                    "true (a checkpoint DeepSpeed saved instead stays there); under FSDP, fsdp_state_dict_type: "
                    "FULL_STATE_DICT")


def _refuse_files_made_meanwhile(staging: Path, output_dir: Path, moved: set[str], reports: bool) -> None:
    """Files the user put in output_dir under the names the export and its report (`reports`) write, while the run
    trained or before `sftkit export` (notes in README.md, say), are theirs: nothing is replaced, the checked model
    waits."""
    targets = {item.name for item in staging.iterdir()} | ({MODEL_CARD, LOSS_PLOT, SUMMARY_FILE} if reports else set())
    made = [name for name in survey(output_dir).in_the_way if name in targets - moved]
    if made:
        raise RunFailed(f"{output_dir} holds files made or changed since the run began, under names the export "
                        f"writes ({', '.join(made[:4])}): they are not the run's, so nothing was replaced. The checked "
                        f"model is kept in {staging}; move those files elsewhere, then finish the export with: "
                        f"{export_command(output_dir)}")


def _refuse_a_publish_missing_what_it_moved(output_dir: Path, moved: set[str]) -> None:
    """A publish cut short is finished where it stopped: what it had moved in must still be there, or the model it
    finishes lacks it (an adapter, the chat template) and yet looks whole."""
    gone = sorted(name for name in moved if not (output_dir / name).exists())
    if gone:
        raise RunFailed(f"{output_dir}: the export moved {', '.join(gone)} there before it was cut short, and "
                        f"{'they are' if len(gone) > 1 else 'it is'} gone since; put {'them' if len(gone) > 1 else 'it'}"
                        f" back, then finish the export with: {export_command(output_dir)}")


def _remove_the_earlier_models_reports(output_dir: Path) -> None:
    """The model a resume that trains longer replaces leaves its card, summary and loss plot (and compare's report)
    until the run's report replaces them: a kill in between left step 6's weights under step 4's card. Gone before
    the new model comes in; the report of this run's own export that failed (which `sftkit export` finishes) stays."""
    (output_dir / BEFORE_AFTER_FILE).unlink(missing_ok=True)
    try:
        reported = json.loads((output_dir / SUMMARY_FILE).read_text()).get("steps")
    except (OSError, ValueError):
        return
    if reported != (read_run_record(output_dir) or {}).get("step"):
        for report in (MODEL_CARD, SUMMARY_FILE, LOSS_PLOT):
            (output_dir / report).unlink(missing_ok=True)


def _publish(staging: Path, output_dir: Path, reports: bool = True) -> None:
    """Move the checked export into output_dir, config.json last. What it moves is listed first (PUBLISHING_FILE),
    so that a publish cut short is finished by running it again: the files it already moved are this export's, not
    stale ones of an earlier export to delete. `reports`: a run's report follows (not --merge's, whose model is the
    published adapter's: the before/after report stays)."""
    manifest = staging / PUBLISHING_FILE
    if not manifest.is_file():
        adapter = staging / ADAPTER_DIR
        write_json(manifest, {"items": sorted(item.name for item in staging.iterdir()),
                              "adapter": sorted(item.name for item in adapter.iterdir()) if adapter.is_dir() else []})
    listed = json.loads(manifest.read_text())
    moved = moved_by_a_publish_cut_short(output_dir)
    _refuse_files_made_meanwhile(staging, output_dir, moved, reports)
    _refuse_a_publish_missing_what_it_moved(output_dir, moved)
    if reports:
        _remove_the_earlier_models_reports(output_dir)
    # an earlier export's weights, whose names this one may not replace (other shards); its config.json goes first:
    # until the new one lands, none is there
    for stale in sorted(output_dir.iterdir(), key=lambda path: path.name != "config.json"):
        if published_weights(stale.name) and stale.name not in moved and stale.is_file():
            stale.unlink()
    for item in sorted(staging.iterdir(), key=lambda path: (path.name == "config.json", path.name)):
        if item == manifest:
            continue
        target = output_dir / item.name
        if item.name == ADAPTER_DIR and target.is_dir():
            _replace_adapter(item, target, set(listed.get("adapter", [])))
            continue
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        item.rename(target)
    record_written(output_dir, listed["items"])  # this run's now, as a kill before the run's end leaves them
    manifest.unlink()
    staging.rmdir()
    readable_like_other_files([*safetensors_weights(output_dir), *(output_dir / ADAPTER_DIR).glob("*.safetensors")])


# what PEFT 0.21 writes into an adapter's directory (its README.md aside, which the export removes)
ADAPTER_FILE = re.compile(r"adapter_config\.json|adapter_model.*\.(safetensors|bin)"
                          r"|adapter_model\.safetensors\.index\.json")


def _replace_adapter(new: Path, published: Path, written: set[str]) -> None:
    """The earlier adapter's files in output_dir/lora_weights are replaced by this export's `written` ones; files
    the user keeps beside them there (notes, a backup) stay."""
    for stale in published.iterdir():
        if ADAPTER_FILE.fullmatch(stale.name) and stale.name not in written and stale.is_file():
            stale.unlink()
    for item in new.iterdir():
        item.replace(published / item.name)
    new.rmdir()


def saved_dtypes(output_dir: Path) -> dict[str, list[str]]:
    """The dtypes of the weights actually written (read from the safetensors headers, not from config.json): of the
    model, and of the LoRA adapter where there is one (TRL 1.16 keeps QLoRA's in bf16 whatever the run's dtype)."""
    adapter = sorted((output_dir / ADAPTER_DIR).glob("adapter_model*.safetensors"))
    return {"saved_dtypes": _dtypes_in(safetensors_weights(output_dir)),
            **({"adapter_dtypes": _dtypes_in(adapter)} if adapter else {})}


def _dtypes_in(files: list[Path]) -> list[str]:
    from safetensors import safe_open

    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    dtypes = set()
    for file in files:
        with safe_open(file, "pt") as weights:
            dtypes.update(names.get(weights.get_slice(key).get_dtype(), "other") for key in weights.keys())
    return sorted(dtypes)


def _begin_staging_from(checkpoint: Path, staging: Path, record: dict) -> None:
    """A run stopped after its last step's checkpoint was saved, before its export began (a kill in between): the
    staging directory as the export begins it, from the checkpoint (the trained weights follow: _recover_weights)."""
    from transformers import AutoTokenizer

    trust = record["config"]["model"].get("trust_remote_code", False)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust)
    partial = staging.with_name(f"{staging.name}.partial")  # whole or not there: a kill or a full disk in between
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    tokenizer.save_pretrained(partial)
    _write_config_and_versions(partial, record["config"], set(record.get("chosen", [])))
    partial.rename(staging)
    print(f"sftkit.export: the run stopped after its last step's checkpoint, before its export began; exporting the "
          f"model {checkpoint} holds")


def _recover_weights(output_dir: Path, lora: bool) -> None:
    """An export cut off before the trained weights were whole in the staging directory (a process lost, the run
    killed while writing them) is finished from the run's checkpoint of its last step, which holds the same weights.
    Without one, and where the staging directory holds only sftkit's own files, none of them whole weights (none
    written, or cut short), no trained model is left to finish: it is removed, so that nothing there looks trained.
    Anything else (weights that cannot be read, an engine's own checkpoint) is left for require_weights to name."""
    staging = output_dir / STAGING_DIR
    target, stem = (staging / ADAPTER_DIR, "adapter_model") if lora else (staging, "model")
    missing = missing_weights(target, stem)
    if missing is None or (staging / PUBLISHING_FILE).is_file():
        return
    newest = last_step_checkpoint(output_dir, stem)
    if newest is not None:
        for partial in target.glob(f"{stem}*"):
            partial.unlink()
        target.mkdir(parents=True, exist_ok=True)
        for file in newest.iterdir():
            if file.name.startswith(stem) or file.name in ("config.json", "adapter_config.json",
                                                           "generation_config.json"):
                shutil.copy2(file, target / file.name)
        which = "best checkpoint" if newest != newest_resumable(output_dir, weights_only=True) else "last step"
        print(f"sftkit.export: the export had no whole trained weights ({missing}); taking them from {newest}, the "
              f"run's {which}")
        return
    files = [file for file in staging.rglob("*") if file.is_file()]
    weights = [file for file in files if file.suffix == ".safetensors"]
    if any(not written_by_sftkit(file.name) and file.parent.name != ADAPTER_DIR for file in files) or not all(
            map(cut_short, weights)):
        return
    shutil.rmtree(staging)
    raise RunFailed(f"the export was cut off before the trained weights were written ({missing}), and no checkpoint "
                    f"holds the run's last step, so there is no trained model to finish; {staging} held nothing else "
                    f"and was removed; {newest_checkpoint_words(output_dir)}")


def _merge_or_finish_merging(output_dir: Path, record: dict, asked: bool) -> None:
    """--merge, or the publish of one cut short (its files checked and moving in). A merge cut short before that left
    only its partial merged model: --merge starts it again."""
    staging = output_dir / STAGING_DIR
    if (staging / PUBLISHING_FILE).is_file():
        _publish(staging, output_dir, reports=False)
        record_published(output_dir, merged_by="python -m sftkit.export --merge")
        _record_the_merge(output_dir)
    elif asked:
        _merge_published_adapter(output_dir, record)
    else:
        raise ConfigError(f"{output_dir}: a merge of its adapter (--merge) was cut short there, leaving the partial "
                          f"merged model in {staging}; the adapter is whole: merge again with: "
                          f"{export_command(output_dir)} --merge")


def _merge_published_adapter(output_dir: Path, record: dict) -> None:
    """`sftkit export OUTPUT_DIR --merge`: the adapter a finished run published alone (model.merge_adapter: false),
    merged into its base where memory allows, checked, and published beside it (config.json last). The adapter and
    tokenizer are read where they are and never rewritten; a merge that fails or is cut short leaves only its own
    partial files, which the next --merge replaces."""
    adapter = output_dir / ADAPTER_DIR
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"{output_dir}: no LoRA adapter in {adapter} to merge (a full fine-tuning has none)")
    if (output_dir / "config.json").is_file():
        raise ConfigError(f"{output_dir} holds a merged model already (config.json); its adapter is in {adapter}")
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    model_cfg = read_section(ModelConfig, record["config"]["model"], "model", output_dir)
    if problem := _another_base(Path(adapter_base(adapter)), output_dir):
        raise ConfigError(f"{problem}; put the base back as it was, then merge again")
    staging = output_dir / STAGING_DIR
    shutil.rmtree(staging, ignore_errors=True)  # a --merge cut short: its partial merged model
    staging.mkdir()
    try:
        _merge_adapter(model_cfg, adapter, staging, getattr(torch, record["dtype"]))
        require_weights(staging, "model")
        _stop_at_the_end_of_a_reply(staging, model_cfg.trust_remote_code, tokenizer_dir=output_dir)
        broken = non_finite_tensors(staging)
        if broken:
            raise RunFailed(f"the merged weights are not finite ({len(broken)} tensors hold nan or inf, e.g. "
                            f"{broken[0]}): the merge overflowed its dtype, or the base holds nan or inf")
    except Exception as error:  # out of memory, a full disk, a base changed since: the adapter is as it was
        shutil.rmtree(staging, ignore_errors=True)
        raise RunFailed(f"merging the adapter in {adapter} into its base failed: {first_line(error)}; nothing was "
                        "published and the adapter is as it was") from error
    _publish(staging, output_dir, reports=False)
    record_published(output_dir, merged_by="python -m sftkit.export --merge")
    _record_the_merge(output_dir)


def _record_the_merge(output_dir: Path) -> None:
    """The summary and card of a run that published its adapter alone, once `--merge` published the merged model;
    each only where it is as the run wrote it (a card the user edited is theirs)."""
    changed = set(survey(output_dir).in_the_way)
    summary, card = output_dir / SUMMARY_FILE, output_dir / MODEL_CARD
    if summary.is_file() and SUMMARY_FILE not in changed:
        write_json(summary, {**json.loads(summary.read_text()), "merged": True, **saved_dtypes(output_dir)})
        record_written(output_dir, [SUMMARY_FILE])
    if card.is_file() and MODEL_CARD not in changed:
        card.write_text(card.read_text() + "\nThe merged model was published here since, by `python -m sftkit.export "
                        "--merge`: it loads with `AutoModelForCausalLM.from_pretrained(\"path/to/this/directory\")`.\n")
        record_written(output_dir, [MODEL_CARD])


def _add_saved_dtypes_to_the_summary(output_dir: Path) -> None:
    """The summary a run wrote when its export failed (report.write_report) lacks the dtypes saved."""
    path = output_dir / SUMMARY_FILE
    if path.is_file():
        write_json(path, {**json.loads(path.read_text()), **saved_dtypes(output_dir)})


def main(argv: list[str] | None = None, prog: str = "python -m sftkit.export") -> int:
    """Finish an export that failed after training, from the weights kept in OUTPUT_DIR/.export-incomplete; or, with
    --merge, merge the adapter a run published alone (model.merge_adapter: false) into its base."""
    parser = OneLineArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--merge", action="store_true",
                        help="publish the merged model beside the adapter of a run with model.merge_adapter: false")
    args = parser.parse_args(argv)
    staging = args.output_dir / STAGING_DIR
    lock = RunLock(args.output_dir, "sftkit export")
    try:
        record = read_run_record(args.output_dir)
        if not args.output_dir.is_dir():
            raise ConfigError(f"{args.output_dir}: no such directory; give the training.output_dir of the run whose "
                              "export failed")
        finished = trained_to_step(args.output_dir) is not None
        alone = finished and (record or {}).get("config", {}).get("model", {}).get("merge_adapter") is False
        if args.merge and finished and not alone:
            raise ConfigError(f"{args.output_dir}: its run published "
                              + ("a merged model already" if (args.output_dir / ADAPTER_DIR).is_dir() else
                                 "a model without an adapter (a full fine-tuning): there is no adapter to merge"))
        if alone and (args.merge or staging.is_dir()):  # its own export removed its own staging directory: --merge's
            lock.take("merge its adapter once that run ends")
            _merge_or_finish_merging(args.output_dir, record, args.merge)
            print(f"{prog}: the merged model is in {args.output_dir}")
            return 0
        if not staging.is_dir() and finished:
            unmerged = alone and not (args.output_dir / "config.json").is_file()
            raise ConfigError(f"{args.output_dir}: its export finished already; the model there is complete"
                              + ("; --merge merges the adapter it published alone" if unmerged else ""))
        if not staging.is_dir() and unexported_last_step(args.output_dir) is None:
            where = f"; {kept_work_words(args.output_dir)}" if record is not None else ""
            raise ConfigError(f"{args.output_dir} has no unfinished export to finish (no {STAGING_DIR} there){where}")
        lock.take("finish its export once that run ends")  # not while a run still writes there
        record = read_run_record(args.output_dir)  # as that run left it
        if (unexported := unexported_last_step(args.output_dir)) is not None:
            record = {**record, **record["planned_export"]}
            _begin_staging_from(unexported, staging, record)
        if record is None or "dtype" not in record or not staging.is_dir():
            raise ConfigError(f"{args.output_dir} has no unfinished export to finish: its run record {RUN_FILE} is "
                              "missing, or the run never reached its export, or finished it meanwhile")
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()  # the merge's loading and saving bars, as in a run

        model_cfg = read_section(ModelConfig, record["config"]["model"], "model", args.output_dir)
        model_cfg = dataclasses.replace(model_cfg, merge_adapter=model_cfg.merge_adapter or args.merge)
        _recover_weights(args.output_dir, model_cfg.use_lora)
        if not (staging / RUN_CONFIG_FILE).is_file() and not (args.output_dir / RUN_CONFIG_FILE).is_file():
            # killed before the export wrote them: `sftkit chat` and `compare` read the run's config
            _write_config_and_versions(staging, record["config"], set(record.get("chosen", [])))
        published = [item.name for item in staging.iterdir()]
        finish_export(args.output_dir, model_cfg, getattr(torch, record["dtype"]), export="python -m sftkit.export")
        _add_saved_dtypes_to_the_summary(args.output_dir)
        record_written(args.output_dir, [*published, SUMMARY_FILE])
        if not (args.output_dir / SUMMARY_FILE).is_file():
            newest = newest_resumable(args.output_dir, weights_only=True)
            log = f"; its training log is in {newest / 'trainer_state.json'}" if newest else ""
            print(f"{prog}: the run stopped before it wrote its report ({MODEL_CARD}, {SUMMARY_FILE}, {LOSS_PLOT}), "
                  f"so there is none{log}")
    except SftkitError as error:
        return say_error(prog, error)
    finally:
        lock.release()
    print(f"{prog}: the model is in {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
