"""`sft.py --dry-run`: what a run would do, from the config, the tokenizer and the data alone (no weights loaded).

The model is built on the meta device from its config.json, so parameter counts (LoRA included) are exact and
cost no memory. The memory estimate is a model of model states plus activations, stated with its assumptions.
"""

import math
import os
from dataclasses import dataclass

import torch

from sftkit.checkpoints import checkpoint_to_resume, epochs_words, resume_request
from sftkit.checks import warmup_outlasts
from sftkit.compat import zero_model_states
from sftkit.engines import fsdp_plugin, launch_engine, processes_on_this_machine, rows_per_step, several_machines
from sftkit.engines import world_size as launched_world_size
from sftkit.environment import host_memory
from sftkit.errors import ConfigError
from sftkit.export import merge_memory
from sftkit.fastpath import describe as describe_speed
from sftkit.model import (
    check_model_source,
    lora_config,
    precision_words,
    resolve_dtype,
    tokenizer_and_data,
    weights_dtype,
    with_base_pinned,
)
from sftkit.paths import resolve_path
from sftkit.rundir import OutputDir
from sftkit.schema import RunConfig
from sftkit.weightfiles import size_words

ADAM_STATES = 2  # exp_avg and exp_avg_sq per trained parameter


def batch_words(args, world_size: int) -> str:
    """`8 per device x 3 accumulation x 2 processes = 48 rows per step`: the dry run's and a launched run's."""
    return (f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation "
            f"x {world_size} process{'es' if world_size > 1 else ''} = {rows_per_step(args, world_size)} rows per step")


@dataclass
class ModelShape:
    description: str
    total: int
    trainable: int
    largest_layer: int  # parameters of the largest single module (what ZeRO-3 gathers at once)
    quantizable: int  # parameters in the decoder's linear layers (4-bit under QLoRA)
    hidden: int
    intermediate: int
    layers: int
    vocab: int


@dataclass
class Plan:
    data: object  # PreparedData
    shape: ModelShape
    dtype: torch.dtype
    world_size: int
    train_rows: int  # rows per epoch as the dataloader sees them (after packing)
    steps_per_epoch: int
    total_steps: int
    sharding: "Sharding"
    memory: "MemoryEstimate"


def build_plan(config: RunConfig) -> Plan:
    args = config.training
    meta_model = check_model_source(config.model)
    data = tokenizer_and_data(config)[1]
    shape = model_shape(config, meta_model)
    dtype = resolve_dtype(config.model, args)
    world_size = launched_world_size()
    train_rows = _rows_per_epoch(data.train, args)
    steps_per_epoch = _steps_per_epoch(train_rows, args, world_size)
    total_steps = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    spread = sharding(args, world_size)
    memory = estimate_memory(config, shape, dtype, spread, world_size, tokens_per_micro_batch(args, data.lengths))
    return Plan(data, shape, dtype, world_size, train_rows, steps_per_epoch, total_steps, spread, memory)


def tokens_per_micro_batch(args, lengths: list[int]) -> int:
    """The longest batch the collator can build: full rows when packing, else padded to the longest row."""
    return args.per_device_train_batch_size * (args.max_length if args.packing else min(max(lengths), args.max_length))


def dry_run(config: RunConfig, overwrite: bool = False) -> str:
    config = with_base_pinned(config)
    args = config.training
    output = output_dir_plan(config, overwrite)  # first: it reads only output_dir
    plan = build_plan(config)
    data, shape, world_size = plan.data, plan.shape, plan.world_size
    method = config.model.method
    eval_rows = f" / {len(data.eval)} eval" if data.eval is not None else ""
    tokens, long_rows = data.kept(args)
    counted = shape.total + (shape.trainable if config.model.use_lora else 0)  # with the adapters, as the run counts
    rows = [
        ("model", f"{config.model.path} ({shape.description})"),
        ("method", f"{method} in {precision_words(config.model, args, plan.dtype)}: {shape.trainable:,} of "
                   f"{counted:,} parameters train ({100 * shape.trainable / counted:.2f}%)" + _planned_for_a_cpu(args)),
        ("data", f"{data.sources_words(config.dataset)}: {data.rows} rows read{data.split_words()}, "
                 f"{len(data.train)} train{eval_rows}"
                 f"{data.repeated_words()}{data.dropped_words()}; {tokens:,} "
                 f"tokens per epoch, {data.trainable_tokens:,} of them trained; longest row "
                 f"{data.length_words(max(data.lengths))} tokens "
                 f"(max_seq_length {args.max_length}"
                 + (f": {long_rows} row{'s are' if long_rows > 1 else ' is'} cut to it{_wrap_text(data)})"
                    if long_rows else ")")
                 + (f"; packed into {plan.train_rows} rows" if args.packing else "")),
        ("batch", batch_words(args, world_size)),
        ("steps", f"{plan.steps_per_epoch} per epoch; {plan.total_steps} in all"
                  + (" (training.max_steps)" if args.max_steps > 0 else f" ({epochs_words(args.num_train_epochs)})")
                  + (f"; {outlasts}" if (outlasts := warmup_outlasts(args, plan.total_steps)) else "")),
        ("distributed", plan.sharding.description + _processes_words(world_size)),
        ("speed", describe_speed(config.speed)),
        ("memory per device", plan.memory.description),
        ("export", _export_words(config, shape, plan.dtype)),
        ("output", output),
    ]
    return f"Dry run of {config.source} (no weights loaded, nothing trained)\n" + "\n".join(
        f"  {label:<18} {value}" for label, value in rows)


def _export_words(config: RunConfig, shape, dtype) -> str:
    """What the run publishes, and for a LoRA merge the host memory it takes (the machine the run is planned for
    may not be this one: said, not refused, as the run itself refuses)."""
    model = config.model
    if not model.use_lora:
        return f"the model in {str(dtype).removeprefix('torch.')}"
    if not model.merge_adapter:
        return "the adapter alone (model.merge_adapter: false)"
    memory = host_memory()
    here = f"; this machine has {size_words(memory)}" if memory else ""
    return (f"the adapter, and the merged model: the merge loads the base into host memory, about "
            f"{size_words(merge_memory(shape.total, dtype))}{here}")


def _processes_words(world_size: int) -> str:
    """', 16 processes on 2 machines' where the launch spans several (each machine's launcher says its own count)."""
    if world_size < 2:
        return ""
    per_machine = processes_on_this_machine() or world_size
    machines = f" on {world_size // per_machine} machines" if several_machines() and per_machine < world_size else ""
    return f", {world_size} processes{machines}"


def _wrap_text(data) -> str:
    """Plain text cut to max_length loses the rest of each row (70% of a corpus of long documents, helper-78), where
    Axolotl's and LLaMA-Factory's pretraining modes pack it whole by default."""
    if "text" not in data.formats:
        return ""
    return ", and what follows never trains; training.packing: true with packing_strategy: wrapped trains all of it"


def _planned_for_a_cpu(args) -> str:
    """A machine without a GPU plans its own float32 run: a GPU example's dry run on a laptop read as the GPU's."""
    if torch.cuda.is_available() or args.bf16 or args.fp16:
        return ""
    return "; planned for this machine, which has no GPU: add --training.bf16 true to plan a bf16 GPU's run"


def output_dir_plan(config: RunConfig, overwrite: bool) -> str:
    """What the run would do with training.output_dir and the checkpoint it would resume, checked as the run checks
    them (a finished model there without --overwrite, another run's checkpoints, a missing checkpoint) but with
    nothing written: the run's own ConfigError otherwise."""
    args = config.training
    output = OutputDir(args.output_dir, config.resolved)
    resume = resume_request(args.resume_from_checkpoint, output.path, config.resolved, overwrite)
    where = output.preview(overwrite, resume, resolve_path(config.model.path))
    # the launcher sets WORLD_SIZE; a plain `python sft.py --dry-run` cannot know how the run will be launched
    launched = os.environ.get("WORLD_SIZE")
    checkpoint = checkpoint_to_resume(resume, output.path, config.resolved, int(launched) if launched else None,
                                      launch_engine(args) if launched else None)
    return where + (f"; resumes from {checkpoint}" if checkpoint else "")


def model_shape(config: RunConfig, model) -> ModelShape:
    """Parameter counts of the model as check_model_source built it on the meta device (no memory)."""
    model_cfg = config.model
    if model is None:
        raise ConfigError(f"model.path {model_cfg.path}: its own modeling code cannot be built on the meta device, so "
                          "a dry run cannot count its parameters; run without --dry-run")
    hf_config = model.config
    total = sum(parameter.numel() for parameter in model.parameters())
    largest = max(sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules())
    output = model.get_output_embeddings()
    quantizable = sum(module.weight.numel() for module in model.modules()
                      if isinstance(module, torch.nn.Linear) and module is not output)
    trainable = total
    if model_cfg.use_lora:
        from peft import get_peft_model

        with torch.device("meta"):
            trainable, _ = get_peft_model(model, lora_config(model_cfg)).get_nb_trainable_parameters()
    text = hf_config.get_text_config()
    description = (f"{hf_config.model_type}, {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
                   f"vocab {text.vocab_size}")
    return ModelShape(description, total, trainable, largest, quantizable, text.hidden_size,
                      getattr(text, "intermediate_size", None) or 4 * text.hidden_size, text.num_hidden_layers,
                      text.vocab_size)


@dataclass
class Sharding:
    """How the engine spreads the model states over the processes."""

    zero_stage: int  # DeepSpeed's; 0 without DeepSpeed
    fsdp: bool
    shards_weights: bool  # only a shard of the weights between layers, none gathered whole (ZeRO-3, FSDP full shard)
    shard_group: int  # how many processes FSDP divides the model states over (1 without FSDP)
    offload_optimizer: bool
    offload_params: bool
    description: str


def sharding(args, world_size: int) -> Sharding:
    """The ZeRO stage or FSDP layout and offloads as the engine will get them: from training.deepspeed or
    training.fsdp, or from the Accelerate config this process was launched with."""
    if args.deepspeed_plugin is not None:  # a DeepSpeed JSON file, or the Accelerate config's own zero_stage keys
        zero = args.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        offload_optimizer = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
        offload_params = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
        return Sharding(stage, False, stage == 3, 1, offload_optimizer, offload_params,
                        f"DeepSpeed ZeRO-{stage}" + _offloads(offload_optimizer, offload_params))
    fsdp = fsdp_plugin(args)
    if fsdp is not None:
        # FSDP2's reshard_after_forward is a bool; FSDP1's layout is its ShardingStrategy (FULL_SHARD reshards,
        # SHARD_GRAD_OP keeps the weights gathered until the backward pass, NO_SHARD keeps whole copies like DDP)
        layout = fsdp.sharding_strategy if fsdp.reshard_after_forward is None else fsdp.reshard_after_forward
        layout = str(layout).rsplit(".", 1)[-1].upper()
        if layout == "NO_SHARD":
            return Sharding(0, False, False, 1, False, False, f"FSDP{fsdp.fsdp_version} (no sharding)")
        reshards = layout in ("TRUE", "FULL_SHARD", "HYBRID_SHARD")
        # the hybrid layouts shard within a machine and copy across machines
        group = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if "HYBRID" in layout else world_size
        # FSDP2's CPUOffloadPolicy (its OffloadPolicy base offloads nothing), FSDP1's CPUOffload(offload_params)
        offload = type(fsdp.cpu_offload).__name__ == "CPUOffloadPolicy" or getattr(fsdp.cpu_offload,
                                                                                  "offload_params", False)
        words = "full shard" if reshards else "weights gathered from forward to backward"
        return Sharding(0, True, reshards, group, offload, offload,
                        f"FSDP{fsdp.fsdp_version} ({words}{', within each machine' if group != world_size else ''})"
                        + _offloads(offload, offload))
    if world_size > 1:
        return Sharding(0, False, False, 1, False, False, "data parallel: each process holds the whole model")
    return Sharding(0, False, False, 1, False, False, "one process")


def _offloads(optimizer: bool, parameters: bool) -> str:
    on = [name for name, offloaded in (("optimizer", optimizer), ("parameters", parameters)) if offloaded]
    return f" with {' and '.join(on)} on the CPU" if on else ""


@dataclass
class MemoryEstimate:
    weights: float  # bytes on each device of the model's weights (part of model_states)
    model_states: float  # bytes on each device: weights, gradients, optimizer states
    activations: float  # with the loss's buffers
    peak: float  # bytes on each device at the peak (what torch.cuda.max_memory_allocated reads)
    description: str


def estimate_memory(config: RunConfig, shape: ModelShape, dtype, spread: Sharding, world_size: int,
                    tokens_per_step: int) -> MemoryEstimate:
    """Peak device memory, excluding the CUDA context (~0.5 GiB) or, on a CPU, the Python process itself.

    Full fine-tuning under ZeRO uses DeepSpeed's own estimators (mixed precision: 16-bit weights, fp32 master
    weights, gradients and Adam states). Otherwise: weights in model.weights_dtype (float32 for full fine-tuning in
    bf16 with dtype auto, whose matmul weights autocast copies to bf16 for the forward pass; else the training
    dtype; under QLoRA 4-bit NF4 linear layers, ~0.56 bytes each with their scales, and the rest in float32), and per
    trained parameter a gradient and two Adam states in its dtype (one byte each for 8-bit optimizers; LoRA adapters
    are float32, QLoRA's bf16).
    ZeRO-3 partitions frozen weights across the processes too. FSDP divides every model state by the processes,
    with float32 weights under mixed precision (Accelerate's master weights, model.weights_dtype); it gathers two
    decoder layers at once in the training dtype (the one computing and the one prefetched), or, where it does not
    reshard after the forward pass, every layer until the backward pass; parameter offload keeps the states on the
    CPU.
    Activations, per token and layer (a Llama layer; h hidden size, i intermediate size): 3.33 h + 4 i values
    whichever weights train (norms, attention's q, k, v and output, the MLP's gate, up and product); without Liger's
    layer kernels (training.use_liger_kernel) another 2 h + i (the norms' float32 copies, SwiGLU's activation); full
    fine-tuning adds the inputs its linear layers (and, without Liger, norms) keep for their weight gradients; LoRA
    dropout adds each adapted input again, with its mask. With activation checkpointing: the layer inputs, plus one
    layer recomputed in the backward pass. No full-vocabulary logits: TRL 1.16's SFTTrainer computes the loss from
    the hidden states in chunks (and turns Liger's fused cross-entropy off); its buffers are counted, and the logits
    only with label smoothing. At the peak, without gradient accumulation, the gradients are built while the
    backward pass frees the activations, so they do not add up. The coefficients are calibrated on torch's peak
    allocated memory measured on one H200 (issue 13: Llama-3.2-1B shape, 4 x 2,048 packed tokens, bf16, sdpa, no
    compile, PEFT's adapter-input casts on: LoRA 19.8 GiB with Liger and 22.8 without, full 20.7 with Liger;
    Llama-3.1-8B shape QLoRA, 4 x 4,096 with checkpointing, without Liger: 24.5 GiB); see tests/test_plan.py.
    Checked with today's defaults (compile, no casts; the 8B example at micro-batch 2 with Liger) on one H100:
    20.2, 21.3 and 15.3 GiB measured, within 2% (benchmarks/results/2026-11-27-h100.md).
    """
    element = torch.finfo(dtype).bits // 8  # of the activations
    stored = torch.finfo(weights_dtype(config.model, config.training, dtype)).bits // 8  # of the weights
    cpu, gradients = 0.0, 0.0
    if spread.zero_stage in (2, 3) and not config.model.use_lora:
        cpu, states = zero_model_states(spread.zero_stage, shape.total, shape.largest_layer, world_size,
                                        spread.offload_optimizer, spread.offload_params)
        if spread.zero_stage == 2:
            weights = 2 * shape.total
        else:
            weights = 0 if spread.offload_params else 2 * shape.total / world_size
        source = "DeepSpeed's estimator"
    else:
        if config.model.load_in_4bit:  # PEFT's k-bit preparation casts what stays unquantized to float32
            weights = shape.quantizable * 0.5625 + (shape.total - shape.quantizable) * 4
        else:
            weights = shape.total * stored
        if spread.zero_stage == 3:
            weights /= world_size
        # LoRA adapters in float32 (PEFT), QLoRA's in bf16 (TRL 1.16 casts them), full fine-tuning in its weights'
        trained_element = (2 if config.model.load_in_4bit else 4) if config.model.use_lora else stored
        if config.model.use_lora:
            weights += shape.trainable * trained_element  # the adapters themselves
        optimizer = shape.trainable * ADAM_STATES * (1 if "8bit" in str(config.training.optim) else trained_element)
        gradients = shape.trainable * trained_element
        if spread.fsdp:  # every model state sharded; what is gathered to compute is counted below
            weights, gradients, optimizer = (state / spread.shard_group for state in (weights, gradients, optimizer))
        states = weights + gradients + optimizer
        source = "weights, gradients and Adam states"
        if spread.offload_params:
            cpu, states, weights, gradients = states, 0, 0, 0
        if spread.fsdp:
            states += _fsdp_gathered_weights(shape, spread, element)
    activations = tokens_per_step * _activations_per_token(config, shape, element) + _loss_buffers(
        config, shape, element, tokens_per_step)
    if stored > element and spread.zero_stage == 0 and not spread.fsdp:  # autocast's 16-bit copy of float32 weights
        activations += (shape.quantizable + shape.vocab * shape.hidden) * element  # until the forward pass ends
    peak = states + activations
    if gradients and config.training.gradient_accumulation_steps == 1:
        # the gradients are built as the backward pass frees the activations (the Trainer sets them to None after
        # each step); with accumulation they stay from one micro-batch to the next
        peak -= min(gradients, activations)
    description = (f"~{size_words(peak)}: {size_words(states)} model states ({source}) + "
                   f"{size_words(activations)} activations for {tokens_per_step:,} tokens per micro-batch"
                   + ("; the gradients take the activations' place" if peak < states + activations else "")
                   + (f"; {size_words(cpu)} of host memory for offloaded states" if spread.offload_optimizer else "")
                   + "; excludes the CUDA context (~0.5 GiB) or the Python process on a CPU")
    return MemoryEstimate(weights, states, activations, peak, description)


def _fsdp_gathered_weights(shape: ModelShape, spread: Sharding, element: int) -> float:
    """The training-dtype copies FSDP gathers for computing: two decoder layers, or every layer where it keeps them
    gathered from the forward pass to the backward pass."""
    layer = (shape.total - shape.vocab * shape.hidden) / shape.layers
    return (2 * layer if spread.shards_weights else shape.total) * element


def _activations_per_token(config: RunConfig, shape: ModelShape, element: int) -> float:
    """What autograd keeps per token in the layers (see estimate_memory)."""
    liger = config.training.use_liger_kernel
    full_layer = (3.33 * shape.hidden + 4 * shape.intermediate) * element
    if not liger:
        full_layer += (2 * shape.hidden + shape.intermediate) * element  # what Liger's norm and SwiGLU do not keep
    if not config.model.use_lora:  # the inputs kept for weight gradients (Liger's norms keep theirs already)
        full_layer += ((3 if liger else 5) * shape.hidden + shape.intermediate) * element
    if config.model.use_lora and config.model.lora_config.lora_dropout > 0:
        full_layer += (6 * shape.hidden + shape.intermediate) * (element + 1)  # dropped-out inputs and their masks
    if not config.training.gradient_checkpointing:
        return full_layer * shape.layers
    # the layer inputs, and one layer recomputed in the backward pass; under QLoRA the residual stream is float32,
    # since PEFT's k-bit preparation casts the embeddings and norms to float32
    residual = 4 if config.model.load_in_4bit else element
    return shape.hidden * residual * shape.layers + full_layer


def _loss_buffers(config: RunConfig, shape: ModelShape, element: int, tokens: int) -> float:
    """TRL 1.16's chunked loss: a tile of 4,096 tokens x 32,768 vocabulary entries in the forward and the backward
    pass, the hidden states' gradient in float32, a 16-bit copy of a float32 head's tile (QLoRA), and in full
    fine-tuning the head's gradient in float32. Label smoothing goes through the full logits instead: the logits,
    their float32 log-softmax and its gradient."""
    buffers = 2 * min(tokens, 4096) * min(shape.vocab, 32768) * element + tokens * shape.hidden * 4
    if config.model.load_in_4bit:
        buffers += min(shape.vocab, 32768) * shape.hidden * element
    if not config.model.use_lora:
        buffers += shape.vocab * shape.hidden * 4
    if config.training.label_smoothing_factor > 0:
        buffers += tokens * shape.vocab * (element + 8)
    return buffers


def _rows_per_epoch(train, args) -> int:
    """Rows the dataloader sees: packing (TRL's own packer, run here on token ids only) merges rows."""
    if not args.packing:
        return len(train)
    from trl.data_utils import pack_dataset

    return len(pack_dataset(train, args.max_length, args.packing_strategy))


def _steps_per_epoch(rows: int, args, world_size: int) -> int:
    """As the Trainer counts them: batches per process, then optimizer steps (a partial accumulation counts)."""
    batches = math.ceil(math.ceil(rows / world_size) / args.per_device_train_batch_size)
    if args.dataloader_drop_last:
        batches = rows // world_size // args.per_device_train_batch_size
    return max(math.ceil(batches / args.gradient_accumulation_steps), 1)
