"""Workarounds for the libraries' behaviour, in one place, each with the version it was written for.

Each is guarded: when the library has changed so that a workaround no longer applies, it warns and takes the plain
path instead of failing with a traceback, and tests/test_compat.py fails, so it can be revisited or removed.

Noise filters: messages the libraries repeat on every run that tell the user nothing they can act on. They are
installed when sftkit is imported (sftkit/__init__.py), so the training command, the tests and `python -m sftkit.*`
all see the same quiet output. Each matches one message at its source logger or warning, never a whole library.
"""

import ast
import contextlib
import functools
import glob
import hashlib
import importlib.util
import json
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from sftkit.engines import first_on_its_machine, is_main_process, launch_uses_deepspeed, launch_uses_fsdp, zero_stage
from sftkit.errors import ConfigError, DataError
from sftkit.layout import LOSS_WINDOW_FILE, checkpoint_dir
from sftkit.paths import data_suffix, file_digest, open_data, saved_by_datasets

logger = logging.getLogger("sftkit")


def quiet_known_noise() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # fork warning after the tokenizer was used
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # one progress bar per run: the Trainer's
    # bitsandbytes 0.50 on CPU without the optional `kernels` package; its own fallback path is used and works.
    _drop_log("bitsandbytes.backends.cpu.ops", "kernels-community")
    # transformers 5 renamed gradient to activation checkpointing; PEFT 0.21 and TRL 1.16 still call the old names.
    _drop_warning("`is_gradient_checkpointing` is deprecated", FutureWarning)
    _drop_warning("`gradient_checkpointing_enable` is deprecated", FutureWarning)
    # transformers 5.24 logs this through its own logger for the same rename, from PEFT's k-bit preparation.
    _drop_log("transformers.modeling_utils", "`gradient_checkpointing_enable` is deprecated")
    # TRL 1.16 deprecates use_liger_kernel for transformers' Hub kernels (`model_init_kwargs`, which sftkit does not
    # use: it loads the model itself), once per run where sftkit turns Liger on; it still works until TRL 2.0.
    _drop_warning(r"`use_liger_kernel=True` is deprecated", FutureWarning)
    # TRL 1.16 deprecates training.pad_token for setting tokenizer.pad_token, which a sftkit user cannot reach; TRL
    # still sets the tokenizer's pad token from it, which the published tokenizer keeps.
    _drop_warning(r"`pad_token` is deprecated", FutureWarning)
    # DeepSpeed 0.19's collectives call torch.distributed functions that torch deprecated, once per step and process.
    _drop_warning(r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    # DeepSpeed on a machine without a GPU, once per process at import; a run on CPU says so in its plan.
    _drop_log("DeepSpeed", "Setting accelerator to CPU")
    # transformers 5.24 warns when a tokenized row is longer than the tokenizer's model_max_length, once per
    # process; sftkit tokenizes whole conversations on purpose and truncates to model.max_seq_length itself.
    _drop_log("transformers.tokenization_utils_base", "Token indices sequence length is longer than")
    # datasets 5.2 logs a file it cannot read before raising; sftkit's one-line error says where it is broken.
    _drop_log("datasets.packaged_modules.json.json", "Failed to load JSON from file")
    _drop_log("datasets.packaged_modules.csv.csv", "Failed to read file")
    _drop_log("datasets.packaged_modules.parquet.parquet", "Failed to read file")
    # transformers 5.24, on a resume with other logging, eval or save steps: the run takes them (see
    # take_the_step_settings_of_a_resume); a batch size that differs is refused before, as another run's
    _drop_log("transformers.trainer_utils", "do not match the ones in the `trainer_state.json`")


def _drop_log(logger: str, text: str) -> None:
    logging.getLogger(logger).addFilter(lambda record: text not in record.getMessage())


def _drop_warning(pattern: str, category: type[Warning]) -> None:
    warnings.filterwarnings("ignore", message=pattern, category=category)


STALE_OP_LOCK_SECONDS = 600  # a build takes 1 to 4 minutes; a lock this old was left by a process that died


def tell_the_launcher(error: str) -> None:
    """torch 2.13's elastic launcher (under `accelerate launch` and torchrun) ends a failed launch with a box whose
    root cause reads "traceback : To enable traceback see: https://pytorch.org/...", 40 lines below the one-line
    error; a worker's error file (TORCHELASTIC_ERROR_FILE, which @record writes for an uncaught exception) is
    shown there instead, so the error is the last thing said."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return
    with contextlib.suppress(OSError):
        Path(path).write_text(json.dumps({"message": error, "timestamp": int(time.time())}))


def before_deepspeed_cpu_op_build() -> None:
    """DeepSpeed 0.19 on a machine without a GPU compiles its shared-memory collective op with the C++ compiler the
    first time it starts there, silently, for one to four minutes (measured on 2 cores); say so before it starts.
    It caches the build with torch's other extensions (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions).

    Each start loads the op under torch's FileBaton (torch 2.13), a lock file without an owner: a process killed
    meanwhile (Ctrl-C, a launcher stopping its workers) leaves it, and every later DeepSpeed run on the machine
    waits on it silently, forever. The first process of the machine removes such a lock once it is stale."""
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    op_dirs = os.path.join(cache, "*", "deepspeed_shm_comm")
    if not first_on_its_machine():
        return
    for lock in glob.glob(os.path.join(op_dirs, "lock")):
        with contextlib.suppress(FileNotFoundError):  # the build that holds it may end, and remove it, meanwhile
            age = time.time() - os.path.getmtime(lock)
            if age > STALE_OP_LOCK_SECONDS:
                os.remove(lock)
                logger.warning(f"removed {lock}, left {age / 60:.0f} minutes ago by a DeepSpeed op build that was "
                               "stopped part way; DeepSpeed would otherwise wait on it forever")
    if is_main_process() and not glob.glob(os.path.join(op_dirs, "*.so")):
        print("sftkit: DeepSpeed is building its CPU communication op (once per machine; 1 to 4 minutes)...",
              flush=True)


@functools.cache
def sft_config_fields() -> dict[str, str]:
    """SFTConfig's field names and annotations (TRL 1.16, transformers 5.24), read from the installed sources.

    Importing trl imports torch and transformers (about 6 s on a CPU machine); reading the three files that define
    SFTConfig and its bases takes tens of milliseconds, so a typo in the config fails in well under a second. If
    the files moved or changed shape, the fields come from importing trl instead (slow, always right).
    """
    try:
        trl_dir = Path(importlib.util.find_spec("trl").origin).parent
        transformers_dir = Path(importlib.util.find_spec("transformers").origin).parent
        classes = {
            trl_dir / "trainer" / "sft_config.py": "SFTConfig",
            trl_dir / "trainer" / "base_config.py": "_BaseConfig",
            transformers_dir / "training_args.py": "TrainingArguments",
        }
        fields: dict[str, str] = {}
        for file, class_name in classes.items():
            tree = ast.parse(file.read_text())
            body = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name).body
            for node in body:
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    fields.setdefault(node.target.id, ast.unparse(node.annotation))
        return fields
    except (OSError, SyntaxError, StopIteration, AttributeError) as error:
        logger.warning(f"reading SFTConfig's fields from TRL's sources failed ({error!r}); importing trl instead")
        import dataclasses

        from trl import SFTConfig

        return {field.name: str(field.type) for field in dataclasses.fields(SFTConfig)}


def training_fields(training) -> dict:
    """SFTConfig as a plain dict, with its real eos_token and pad_token: transformers 5.24's to_dict writes a
    placeholder (<EOS_TOKEN>) for every field whose name ends in _token, as if each held a secret, so a config
    saved from it could not train again, and the fingerprint missed a changed eos_token. hub_token holds no token
    here (config moves it to HF_TOKEN); its placeholder is dropped to its default."""
    values = training.to_dict()
    for key in values:
        if key.endswith("_token"):
            values[key] = getattr(training, key)
    return values


def group_cpu_processes(kwargs: dict) -> None:
    """Let several processes without a GPU form one group (Accelerate 1.15, DeepSpeed 0.19.8).

    DeepSpeed: Accelerate finds no backend of its own, starts DeepSpeed's process group but then counts a single
    process, so DeepSpeed's batch-size check fails; naming gloo makes it count them all. Otherwise (torchrun, or
    accelerate's multi-GPU launcher) the processes form a DDP group only when the Trainer is told it runs on the
    CPU; a single process is unaffected."""
    if launch_uses_deepspeed():
        kwargs.setdefault("ddp_backend", "gloo")
    else:
        kwargs.setdefault("use_cpu", True)


def let_deepspeed_find_one_process() -> None:
    """training.deepspeed outside a launcher: DeepSpeed 0.19.8 looks for MPI to find its processes, and a plain
    `python sft.py` is one process. It is told so, on a free port (two such runs, or one beside a launch, must not
    collide on a fixed one)."""
    if "LOCAL_RANK" in os.environ:
        return
    import socket

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(name, value)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))


# (old name, new name) of the training keys transformers 5 renamed, both SFTConfig fields in 5.24
RENAMED_TRAINING_KEYS = (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))


def rename_gradient_checkpointing(kwargs: dict) -> None:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing and warns on every run where only
    the old name is set, which TRL 1.16's own default (gradient_checkpointing=True) does. Users know the old name,
    so both are accepted; the old one is passed on as the new one, with TRL's default."""
    for old, new in RENAMED_TRAINING_KEYS:
        if new not in kwargs:
            kwargs[new] = kwargs.pop(old, True if old == "gradient_checkpointing" else None)
        kwargs.pop(old, None)


def keep_cpu_4bit_layout_trainable(model) -> None:
    """bitsandbytes 0.50.2's CPU backend repacks a 4-bit weight into an inference layout on its first forward in
    eval mode (an evaluation, a sample reply) and does not unpack it when training resumes: the gradients are wrong
    from then on (grad norm 0.7 instead of 10, the loss doubled after one evaluation). Reproduce: QLoRA on a CPU,
    train 3 steps, model.eval() and one forward, model.train(), compare the next step's grad norm with a run
    without the eval forward. bitsandbytes has no switch for this, so the flag that enables the repacking is off."""
    import torch

    if torch.cuda.is_available():
        return
    layers = [module for module in model.modules() if type(module).__name__ == "Linear4bit"]
    if layers and not any(hasattr(layer, "support_avx512bf16_for_cpu") for layer in layers):
        logger.warning("bitsandbytes' 4-bit layers no longer have support_avx512bf16_for_cpu; if an evaluation "
                       "during QLoRA on a CPU changes the training loss, the repacking bug is back")
    for layer in layers:
        if getattr(layer, "support_avx512bf16_for_cpu", False):
            layer.support_avx512bf16_for_cpu = False


def allow_fsdp_on_cpu() -> None:
    """Accelerate 1.15 (AcceleratorState.__init__ in accelerate/state.py) reads its FSDP settings only for
    processes on GPUs or other accelerators: an FSDP launch on CPU processes silently becomes plain data parallel
    (MULTI_CPU), each process training a full copy. PyTorch's FSDP2 itself runs on CPU processes over gloo (torch
    2.13), so while the Accelerator builds its state, CPU processes launched for FSDP are presented as a
    multi-device group, the one case in which Accelerate turns FSDP on (it then records FSDP as the type).
    Reproduce: `accelerate launch --config_file accelerate_configs/fsdp2.yaml --num_processes 2 x.py` without a
    GPU, where x.py prints `Accelerator(cpu=True).distributed_type`: MULTI_CPU. Offload (fsdp_offload_params) is
    then kept in unpinned memory. Call before the Trainer exists."""
    import torch

    if not launch_uses_fsdp() or torch.cuda.is_available():
        return
    try:
        from accelerate import state
        from accelerate.utils import DistributedType

        original = state.AcceleratorState.__init__
        if getattr(original, "sftkit_fsdp_on_cpu", False):
            return

        def init(self, *args, **kwargs):
            shared = state.PartialState._shared_state
            on_cpu = shared.get("distributed_type") == DistributedType.MULTI_CPU
            if on_cpu:
                shared["distributed_type"] = DistributedType.MULTI_GPU
            try:
                original(self, *args, **kwargs)  # which ends by setting the shared type to FSDP
            finally:
                if on_cpu and shared.get("distributed_type") == DistributedType.MULTI_GPU:
                    shared["distributed_type"] = DistributedType.MULTI_CPU
            offload = getattr(getattr(self, "fsdp_plugin", None), "cpu_offload", None)
            if on_cpu and getattr(offload, "pin_memory", False):
                offload.pin_memory = False  # pinning needs an accelerator: torch raises without one

        init.sftkit_fsdp_on_cpu = True
        state.AcceleratorState.__init__ = init
    except (ImportError, AttributeError) as error:
        logger.warning(f"Accelerate changed ({error!r}); FSDP on CPU processes is left to Accelerate")


def check_fsdp_on(trainer) -> None:
    """A launch that asks for FSDP must get it: never a silent full copy of the model on every process (Accelerate
    1.15 turns FSDP on only from its own launch config; allow_fsdp_on_cpu is its other half)."""
    if launch_uses_fsdp() and not trainer.is_fsdp_enabled:
        kind = getattr(trainer.accelerator.distributed_type, "value", trainer.accelerator.distributed_type)
        raise ConfigError(f"the launch asks for FSDP, but Accelerate (distributed type {kind}) did not turn it on, "
                          "so every process would train a full copy of the model; launch with accelerate launch "
                          "--config_file accelerate_configs/fsdp2.yaml (on CPU processes too), or use a DeepSpeed "
                          "config instead (accelerate_configs/cpu_zero3_2proc.yaml on a machine without a GPU)")


@contextmanager
def zero3_init_disabled():
    """While a ZeRO-3 config is registered, from_pretrained partitions the weights across all processes, which
    would deadlock the main process merging alone (and from_config would allocate a meta-device model in full).
    transformers 5.24 has no switch for this, so its registration (a module global) is set aside briefly."""
    from transformers.integrations import deepspeed as hf_deepspeed

    if not hasattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref"):
        logger.warning("transformers no longer keeps its DeepSpeed config in _hf_deepspeed_config_weak_ref; "
                       "loading as registered (a merge under ZeRO-3 may hang)")
        yield
        return
    registered = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = registered


def float32_by_design(directory: Path, dtype, trust_remote_code: bool):
    """The tensors a model keeps in float32 whatever dtype it loads in (MoE routers' gate.weight, e.g. in DeepSeek-V3
    and Nemotron-H), as a pattern to search parameter names with; None where the model cannot be built here. This is
    transformers 5.24's PreTrainedModel._get_dtype_plan (a private method; _keep_in_fp32_modules_strict, and for
    float16 _keep_in_fp32_modules too) on a meta-device model (1.6 s for DeepSeek-V3's 671B parameters)."""
    import re

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
        with torch.device("meta"), zero3_init_disabled():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        plan = model._get_dtype_plan(dtype)
    except Exception as error:  # any model class, any library change: the caller then keeps what it cannot tell
        logger.warning(f"could not tell which tensors this model keeps in float32 ({type(error).__name__}: {error}); "
                       "a weights file that mixes dtypes is published as it is")
        return None
    # transformers matches these as regular expressions with * for any text (core_model_loading.build_glob_alternation)
    return re.compile("|".join(name.replace("*", ".*") for name in plan) or r"(?!)")


def zero_model_states(stage: int, total: int, largest_layer: int, world_size: int, offload_optimizer: bool,
                      offload_params: bool) -> tuple[float, float]:
    """DeepSpeed 0.19's estimate of (CPU, GPU) bytes per device for the model states of a full fine-tune, called by
    keyword so that a changed signature fails loudly here rather than silently shifting arguments."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(total_params=total, num_gpus_per_node=world_size, num_nodes=1,
                                                     cpu_offload=offload_optimizer, additional_buffer_factor=1.0)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=total, largest_layer_params=largest_layer, num_gpus_per_node=world_size, num_nodes=1,
        cpu_offload=offload_optimizer, cpu_offload_params=offload_params, zero_init=True, additional_buffer_factor=1.0)
    return cpu, gpu


def keep_checkpoints_at_an_early_stop(args) -> None:
    """A stop before the last step (a signal, or a loss no longer finite) ends the Trainer's loop as if training were
    over, and transformers 5.24 then reloads the best checkpoint (load_best_model_at_end) and, with save_total_limit
    1, deletes every other one: the checkpoint the signal had just saved too, so the resume went back to the best
    checkpoint and trained every step after it again. And under save_strategy best an evaluation saves only a new
    best, so a signal at one saved nothing. Reproduce: load_best_model_at_end, save_total_limit 1, SIGTERM at step 11
    of 40 with the best at step 3: only checkpoint-3 is left. Called at the stop's step, before its save; the run
    then ends without training further, so these settings are not needed again."""
    args.load_best_model_at_end = False
    args.save_total_limit = None
    try:
        from transformers.trainer_utils import SaveStrategy
    except ImportError as error:
        logger.warning(f"transformers changed ({error}); a stop under save_strategy best may save no checkpoint")
        return
    if args.save_strategy == SaveStrategy.BEST:
        args.save_strategy = SaveStrategy.STEPS


def _share_tied_tensors(model, state_dict: dict) -> None:
    """Makes the state dict's entries of one tied parameter one tensor, where their values are still equal."""
    import torch

    first_name = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        kept = first_name.setdefault(id(parameter), name)
        if kept != name and {kept, name} <= state_dict.keys():
            if state_dict[kept] is not state_dict[name] and torch.equal(state_dict[kept], state_dict[name]):
                state_dict[name] = state_dict[kept]


def _cast_inputs_of_trained_copies(model) -> None:
    """TRL 1.16 casts every trainable parameter of a quantized model to bf16 (QLoRA's adapters, as its paper does),
    PEFT 0.21's modules_to_save copies included. Its LoRA layers cast their inputs to the adapter's dtype; those copies
    do not. Training's loss reads lm_head's weight itself (TRL's fused loss), but generation calls the copy on the
    float32 hidden states of k-bit preparation: a QLoRA run with modules_to_save [lm_head] lost every sample reply to
    "expected m1 and m2 to have the same dtype, but got: float != c10::BFloat16". Such a copy now takes its inputs
    in its own dtype, as the LoRA layers do."""
    import torch

    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError as error:
        logger.warning(f"peft changed ({error}); a QLoRA run's trained copy of a whole layer (modules_to_save) may "
                       "fail its sample replies")
        return

    def in_its_dtype(copy, inputs):
        return (inputs[0].to(copy.weight.dtype), *inputs[1:])

    for wrapper in model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper) or not isinstance(wrapper.original_module, torch.nn.Linear):
            continue
        for copy in wrapper.modules_to_save.values():
            if copy.weight.dtype != wrapper.original_module.weight.dtype:
                copy.register_forward_pre_hook(in_its_dtype)


def untie_an_adapted_embedding(peft_model) -> None:
    """PEFT 0.21 merges a LoRA of the input embeddings into their weight, which a model with tie_word_embeddings
    (Llama 3.2 1B/3B, Qwen2.5 0.5B-3B, Gemma) shares with its output layer: the merged model's output layer changed
    too, though training never adapted it (a run's published model scored 1.90 where it trained to 1.80; PEFT only
    warns). The output layer gets its own copy of the weight before the merge, and the config no longer ties them."""
    import torch
    from peft.tuners.lora import LoraLayer

    model = peft_model.get_base_model()
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or not isinstance(embedding, LoraLayer) or head.weight is not embedding.get_base_layer().weight:
        return
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    for config in (model.config, model.config.get_text_config()):
        config.tie_word_embeddings = False


def _without_padded_duplicates(trainer, inputs: dict) -> dict:
    """Under several processes, Accelerate 1.15 fills the last round of eval batches up with rows from the start
    (even_batches), and transformers 5.24 takes each batch's mean over its tokens, duplicates' included, then drops
    the gathered copies of those means beyond the eval set's length: copies, not the duplicates' tokens. A 2-process
    eval of 15 rows read 3.300 where 1 process read 3.260 (the card and best-checkpoint choice used it). The
    duplicates' labels are masked in the one batch where they share a batch with real rows; a batch of duplicates
    alone is dropped whole by that truncation."""
    state, args = trainer.accelerator.gradient_state, trainer.args
    if args.world_size < 2 or not state.end_of_dataloader or state.remainder <= 0 or "labels" not in inputs:
        return inputs
    first = args.process_index * args.eval_batch_size  # this batch's first row in the round's global batch
    real = state.remainder - first
    if not 0 < real < args.eval_batch_size:
        return inputs
    labels = inputs["labels"].clone()
    if labels.shape[0] > 1:  # padded rows
        labels[real:] = -100
    else:  # padding-free: the rows (packed ones too) lie one after another, the duplicates last
        rows = trainer.eval_dataset.select(range(len(trainer.eval_dataset) - state.remainder + first,
                                                 len(trainer.eval_dataset)))
        labels[0, sum(len(ids) for ids in rows["input_ids"]):] = -100
    return {**inputs, "labels": labels}


def rotate_only_checkpoints_not(left_out) -> None:
    """transformers 5.24 rotates away (save_total_limit) every folder named checkpoint-*, sorted by modification time,
    and at the end of a run with save_total_limit 1 and a best checkpoint every folder named checkpoint-<digits>...:
    a copy the user kept (checkpoint-best, checkpoint-8.bak) and a checkpoint holding the user's files went whole,
    after sftkit had said it keeps them. Its sort_checkpoints, which both call, leaves out the folders for which
    left_out(path) is true. Reproduce: save_total_limit 2, cp -r checkpoint-4 checkpoint-best, train on: it is gone."""
    try:
        import transformers.trainer as trainer
        import transformers.trainer_utils as utils

        sort = utils.sort_checkpoints
        trainer.sort_checkpoints  # noqa: B018 - the name the Trainer calls at the end of a run
    except (ImportError, AttributeError) as error:
        logger.warning(f"transformers changed ({error}); save_total_limit may delete folders named checkpoint-* "
                       "that are not this run's checkpoints")
        return
    original = getattr(sort, "__wrapped__", sort)

    @functools.wraps(original)
    def sort_checkpoints(*args, **kwargs):
        return [path for path in original(*args, **kwargs) if not left_out(Path(path))]

    utils.sort_checkpoints = trainer.sort_checkpoints = sort_checkpoints


class TrainerWorkarounds:
    """Mixed into sftkit's SFTTrainer (monitor.MonitoredSFTTrainer); written for transformers 5.24 and TRL 1.16.

    Exact resume: the Trainer keeps the losses of the steps since the last log in `_tr_loss` and that log's step in
    `_globalstep_last_logged`, and saves neither in a checkpoint, so the first log after a resume averaged only the
    steps since the resume (reproduce: log every 20 steps, stop at step 15, resume: step 20 logs the mean of steps
    16-20). And on a CPU the thread count sets the summation order of every matmul, so a resume under another count
    (`accelerate launch` exports OMP_NUM_THREADS=1, a plain `python` uses every core) drifted from the run it
    continued. Both are saved beside each checkpoint, per process, and restored at the first step of the resume.

    Evaluations leave training's randomness alone: each one drew its DataLoader's base seed from torch's global
    generator (torch 2.13), which moved every later dropout mask, so evaluation settings changed what was trained and
    a resume after a stop that skipped a due evaluation was no longer exact (LoRA with lora_dropout 0.1, 10 steps:
    eval loss 1.1798 without evaluations, 1.1914 with eval_steps 3).

    Saved configs keep the base model's use_cache (see __init__), tied weights stay tied in saved files (_save), and
    QLoRA's trained copies of whole layers take their inputs in their own dtype (_cast_inputs_of_trained_copies).
    """

    def __init__(self, *args, **kwargs):
        # transformers 5.24's Trainer sets the model's config.use_cache to args.use_cache (False) as it is built, for
        # training: every saved config.json then said false, and a plain forward of the published model returned no
        # cache. Saves (save_model) put the base's value back.
        self._saved_use_cache = getattr(getattr(kwargs.get("model"), "config", None), "use_cache", None)
        super().__init__(*args, **kwargs)
        _cast_inputs_of_trained_copies(self.model)

    def save_model(self, output_dir=None, _internal_call=False):
        config = getattr(self.model, "config", None)
        if config is None or self._saved_use_cache is None:
            return super().save_model(output_dir, _internal_call)
        config.use_cache = self._saved_use_cache
        try:
            return super().save_model(output_dir, _internal_call)
        finally:
            config.use_cache = self.args.use_cache

    def _save(self, output_dir=None, state_dict=None):
        # Accelerate 1.15 gathers the state dict under ZeRO-1/2 with DeepSpeed 0.19's clone_tensors_for_torch_save,
        # which clones each tensor on its own: a tied lm_head no longer shares storage with the embeddings, so
        # save_pretrained (which drops tied copies by storage) wrote both: 12% more on disk for the embedded model,
        # 21% by parameter count for a Llama-3.2-1B. Shared again, transformers drops the copy as it does without ZeRO.
        if state_dict:
            _share_tied_tensors(self.accelerator.unwrap_model(self.model), state_dict)
        return super()._save(output_dir, state_dict)

    def evaluate(self, *args, **kwargs):
        import torch

        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            return super().evaluate(*args, **kwargs)

    def prediction_step(self, model, inputs, *args, **kwargs):
        return super().prediction_step(model, _without_padded_duplicates(self, inputs), *args, **kwargs)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        window = Path(str(resume_from_checkpoint)) / LOSS_WINDOW_FILE.format(rank=self.args.process_index)
        self._window_to_restore = window if resume_from_checkpoint and window.is_file() else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if getattr(self, "_window_to_restore", None) is not None:
            self._restore_loss_window(self._window_to_restore)
            self._window_to_restore = None
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if not hasattr(self, "_tr_loss") or not hasattr(self, "_globalstep_last_logged"):
            logger.warning("the Trainer no longer keeps _tr_loss/_globalstep_last_logged; the first log after a "
                           "resume may average fewer steps")
            return
        import torch

        checkpoint = checkpoint_dir(self._get_output_dir(trial), self.state.global_step)
        checkpoint.mkdir(parents=True, exist_ok=True)  # with DDP only the main process saves, maybe not yet
        window = {"loss_sum": self._tr_loss.item(), "last_logged_step": self._globalstep_last_logged,
                  "cpu_threads": torch.get_num_threads()}
        (checkpoint / LOSS_WINDOW_FILE.format(rank=self.args.process_index)).write_text(json.dumps(window) + "\n")

    def _restore_loss_window(self, path: Path) -> None:
        import torch

        window = json.loads(path.read_text())
        self._tr_loss += window["loss_sum"]
        self._total_loss_scalar -= window["loss_sum"]  # so that the Trainer's train_loss stays its own mean
        self._globalstep_last_logged = window["last_logged_step"]
        # on a CPU the thread count orders every sum; a GPU run's sums are the GPU's, whatever the CPU threads
        if self.args.device.type == "cpu" and window["cpu_threads"] != torch.get_num_threads():
            logger.warning(f"resuming with {window['cpu_threads']} CPU threads, as the interrupted run had (not "
                           f"{torch.get_num_threads()}), so that its sums add up in the same order")
            torch.set_num_threads(window["cpu_threads"])

    def create_model_card(self, *args, **kwargs) -> None:
        """TRL 1.16 writes its own card ("fine-tuned version of [None]") to output_dir/README.md with every
        checkpoint, before any model is there; sftkit writes one card, describing the run, with the model."""

    def _issue_warnings_after_load(self, load_result) -> None:
        """transformers 5.24 warns on resume that the checkpoint lacks lm_head.weight when the head shares the
        embeddings' weights, which are saved once: tied keys are not missing."""
        model = self.accelerator.unwrap_model(self.model)
        tied_embeddings = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
        tied = set(getattr(model, "_tied_weights_keys", None) or ()) if tied_embeddings else set()
        missing = [key for key in load_result.missing_keys if key not in tied]
        super()._issue_warnings_after_load(load_result._replace(missing_keys=missing))


def compile_under_zero3_error(args) -> str | None:
    """torch.compile under DeepSpeed ZeRO-3 fails at the first backward pass with DeepSpeed 0.19.8 and torch 2.13
    ("one of the variables needed for gradient computation has been modified by an inplace operation", on a
    partitioned parameter's empty placeholder), after minutes of loading. Reproduce: accelerate launch --config_file
    accelerate_configs/cpu_zero3_2proc.yaml sft.py --training.torch_compile true. ZeRO-2 compiles and trains."""
    if args.torch_compile and zero_stage(args) == 3:
        return ("training.torch_compile: true fails under DeepSpeed ZeRO-3 (DeepSpeed 0.19.8, torch 2.13: an autograd "
                "error at the first backward pass); set training.torch_compile: false, or use ZeRO-2")
    return None


def refuse_values_datasets_reads_as_json(features, files: list[str], read: set, renames: dict, name: str) -> None:
    """datasets 5.2 reads a field that holds text in some rows and other values (a number, content parts) in others
    as JSON (its Json feature), and then turns each row's text there that parses as JSON (its own lax parser's
    JSON: "007", a quoted line with a raw newline) into a value: "4" into 4, '"Hi"' into Hi. A file where that
    would happen is refused with DataError, naming the row whose value is not text, before any row is read wrong
    (dataset.on_bad_row: skip cannot leave that row out: every row's field is read so). Only the fields the
    source's format reads count, `read`, a column by its name after `renames` (the column_map): an id or metadata
    column may mix types. Text that does not parse comes back unchanged, and the rows' own checks name what is
    wrong. Reproduce: load_dataset("json") of two rows whose `content` is "4" and [1]. A hub dataset's files are
    not here to read again: its JSON fields are warned of."""
    try:
        from datasets import Json, LargeList, List, Sequence  # noqa: F401 - what _json_fields looks for
        from datasets.utils.json import ujson_loads
    except ImportError as error:  # another datasets: the coercion may be gone with them
        logger.warning(f"datasets changed ({error}); fields it may read as JSON are not checked")
        return
    paths = [path for path in _json_fields(features)
             if read.issuperset(filter(None, (renames.get(path[0], path[0]), *path[1:])))]
    if not paths:  # the usual case: every field read holds one type, so nothing was read as JSON
        return
    if not files:
        fields = ", ".join("".join(f".{part}" if part else "[]" for part in path).lstrip(".") for path in paths)
        logger.warning(f"dataset {name}: datasets read {fields} as JSON, since its rows mix text with other values: "
                       "text there that looks like JSON (\"4\", '\"Hi\"') arrived as a value (4, Hi); give that "
                       "field one type in every row")
        return
    found = _first_field_of_both_kinds(files, paths, ujson_loads)
    if found is not None:
        path, (file, place, value), (text_file, where, text) = found
        field = "".join(f".{part}" if part else "[]" for part in path).lstrip(".")
        # which row is the odd one, the user knows: both are named
        where += f" of {text_file}" if text_file != file else ""
        raise DataError(f"dataset {file}: {field} is a {type(value).__name__} on {place} and text on {where}, so "
                        "datasets would read that field as JSON and change text that looks like JSON "
                        f"({text!r} into {ujson_loads(text)!r}); give that field one type in every row")


def _first_field_of_both_kinds(files: list[str], paths: list[tuple], loads):
    """(path, (file, place, value), (file, place, text)) of the first field that holds a value other than text on
    one row and text that parses as JSON on another, found row by row as the files are read; None where none does."""
    odd, changed = {}, {}  # path -> the first (file, place, value) of each kind
    for file in files:
        for place, row in _json_rows(file):
            for path in paths:
                for value in _values_at(row, path):
                    if path not in odd and not isinstance(value, (str, type(None))):
                        odd[path] = (file, place, value)
                    elif path not in changed and isinstance(value, str) and _parses(loads, value):
                        changed[path] = (file, place, value)
            both = [path for path in paths if path in odd and path in changed]
            if both:
                return both[0], odd[both[0]], changed[both[0]]
    return None


def blank_line_datasets_cannot_read(files: list[str], error: BaseException) -> str | None:
    """'FILE line N', the first blank line of JSON Lines `files` that datasets 5.2 failed to read with "Expected object
    or value": where a field holds text in some rows and other values in others (OpenAI's content parts), it reads
    the lines again for its Json feature with a parser that takes no blank line. Reproduce: load_dataset("json") of
    a row whose content is "Hi", one whose content is [{"type": "text", "text": "Hi"}], and a blank line between."""
    reasons = []
    while error is not None:
        reasons.append(str(error))
        error = error.__cause__ or error.__context__
    if not any("Expected object or value" in reason for reason in reasons):
        return None
    for file in files:
        with open_data(file) as handle:
            number = next((number for number, line in enumerate(handle, 1) if not line.strip()), None)
        if number is not None:
            return f"{file} line {number}"
    return None


def _json_rows(file: str):
    """('line N', row) of each row of a JSON Lines file, or ('row N', row) of a .json file holding a list of rows."""
    with open_data(file) as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    yield f"line {number}", json.loads(line)
                except ValueError:
                    break  # a document spread over lines
    if data_suffix(file) == ".json":
        try:
            with open_data(file) as handle:
                document = json.loads(handle.read().decode("utf-8-sig"))
        except ValueError:
            return
        if isinstance(document, list):
            yield from ((f"row {index}", row) for index, row in enumerate(document, 1))


def _parses(loads, text: str) -> bool:
    try:
        loads(text)
    except ValueError:
        return False
    return True


def _json_fields(features, path: tuple = ()):
    """The paths of the fields datasets reads as JSON, e.g. ('messages', '', 'content') ('' for a list's items)."""
    from datasets import Json, LargeList, List, Sequence

    if isinstance(features, Json):
        yield path
    elif isinstance(features, dict):
        for key, feature in features.items():
            yield from _json_fields(feature, (*path, key))
    elif isinstance(features, (List, LargeList, Sequence)):
        yield from _json_fields(features.feature, (*path, ""))


def _values_at(value, path: tuple):
    if not path:
        yield value
    elif path[0] == "" and isinstance(value, list):
        for item in value:
            yield from _values_at(item, path[1:])
    elif path[0] and isinstance(value, dict) and path[0] in value:
        yield from _values_at(value[path[0]], path[1:])


@functools.cache
def data_code_digest() -> str:
    """Of the code that prepares rows (sftkit/data). datasets 5.2 fingerprints a map by its function's name and
    arguments, not by the code it calls, so an sftkit whose masks changed would reuse the rows an older one cached:
    the digest is passed to the map as an argument for that reason alone."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "data").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def cache_named_by_contents(files: list[str]) -> str:
    """A name for the builder config that loads local `files`. datasets 5.2 keys its cache of a local file by its
    path and modification time alone (data_files._get_single_origin_metadata), so a file replaced by one of the same
    time (cp -p, rsync -a, an archive's fixed times) loaded, and tokenized, the old rows from the cache. The name
    goes into the cache's key, so other contents are read again."""
    digest = hashlib.sha256("".join(file_digest(Path(file), whole=True) for file in files).encode())
    return f"sftkit-{digest.hexdigest()[:16]}"


def cache_away_from_the_users_data(rows, arguments: dict) -> str | None:
    """datasets 5.2 writes a map's cache beside the files its rows were read from: for a save_to_disk folder that is
    the user's data folder (7 times its size after a run of the sample data), and a read-only one failed the run.
    There, the tokenized rows go to datasets' own cache folder, named by what they are made from; None elsewhere."""
    import datasets
    from datasets.fingerprint import Hasher

    if not rows.cache_files or not saved_by_datasets(Path(rows.cache_files[0]["filename"]).parent):
        return None
    name = Hasher.hash([rows._fingerprint, arguments])
    return str(Path(datasets.config.HF_DATASETS_CACHE) / "sftkit-tokenized" / f"{name}.arrow")


def follow_a_new_schedule_length(args, state, optimizer, lr_scheduler, planned: int) -> None:
    """A resume that changes the run's length: transformers 5.24 builds the learning-rate schedule for the new length
    and loads the checkpoint's step into it, but the optimizer keeps the rate the old schedule set for the next step
    (0 after a finished run's decay), so one step trained at it before the rate jumped. It is set from the new
    schedule at once (and the scheduler's last rate, which the Trainer logs), and the run says where the rate goes.
    Called by checkpoints.RecordRunInCheckpoints as training begins, once the checkpoint's states are loaded."""
    from torch.optim.lr_scheduler import LambdaLR

    if not isinstance(lr_scheduler, LambdaLR) or optimizer is None:  # DeepSpeed's own, reduce_lr_on_plateau
        return
    before = optimizer.param_groups[0]["lr"]
    for group, factor, base in zip(optimizer.param_groups, lr_scheduler.lr_lambdas, lr_scheduler.base_lrs):
        group["lr"] = base * factor(state.global_step)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what the Trainer logs
    after = optimizer.param_groups[0]["lr"]
    kind = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if state.is_world_process_zero and not math.isclose(before, after, rel_tol=1e-3, abs_tol=1e-12):
        logger.warning(f"the run resumes at step {state.global_step} with another length, {state.max_steps} steps "
                       f"where its {kind} learning-rate schedule was planned for {planned}: the schedule is planned "
                       f"anew and goes on at {after:.2e}, where it stood at {before:.2e}; to start a schedule of its "
                       "own instead, fine-tune the published model as model.path into another training.output_dir")


def take_the_step_settings_of_a_resume(args, state) -> None:
    """transformers 5.24 computes logging_steps, eval_steps and save_steps from the arguments, then loads the
    checkpoint's TrainerState over them, so a resume logged, evaluated and saved as the run before it did (with a
    warning that they differ), though a resume may change them (runrecord.RESUMABLE). They are computed from the
    arguments again as training begins (checkpoints.RecordRunInCheckpoints), and the warning is dropped."""
    state.compute_steps(args, state.max_steps)


def rows_of(batch) -> list:
    """The rows of a batched map's batch (datasets 5.2), read a column at a time (a fifth faster than an unbatched
    map). Arrow decodes a column's text whole, so where a row is not UTF-8 the batch's rows are read as an unbatched
    map reads them instead: each a LazyRow, which decodes a key when it is read, so that the bad row fails inside its
    own error handling and is named."""
    try:
        columns = {key: batch[key] for key in batch}
    except UnicodeDecodeError:
        from datasets.formatting.formatting import LazyRow

        return [LazyRow(batch.pa_table.slice(position, 1), batch.formatter)
                for position in range(batch.pa_table.num_rows)]
    return [{key: values[position] for key, values in columns.items()} for position in range(batch.pa_table.num_rows)]
