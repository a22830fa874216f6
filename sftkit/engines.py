"""Which engine shards the run: DeepSpeed (and its ZeRO stage) or FSDP, asked for by the config (training.deepspeed,
training.fsdp) or by the Accelerate config of the launch (which sets ACCELERATE_USE_* for each process).

`training` is the training section's values before SFTConfig is built from them (a dict), or the SFTConfig.

Where this process stands in the launch is read from the launcher's variables, before torch.distributed starts."""

import os


def is_main_process() -> bool:
    """Rank 0 of the launch: the process that writes output_dir and pushes to the hub."""
    return os.environ.get("RANK", "0") == "0"


def first_on_its_machine() -> bool:
    return os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) == "0"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def processes_on_this_machine() -> int | None:
    """LOCAL_WORLD_SIZE, which torchrun (and so accelerate launch) sets; None under a launcher that does not."""
    return int(os.environ["LOCAL_WORLD_SIZE"]) if "LOCAL_WORLD_SIZE" in os.environ else None


def rows_per_step(args, processes: int | None = None) -> int:
    """The global batch: per device x accumulation x processes (the launch's, or those a dry run plans for)."""
    return args.per_device_train_batch_size * args.gradient_accumulation_steps * (processes or args.world_size)


def several_machines() -> bool:
    return world_size() > int(os.environ.get("LOCAL_WORLD_SIZE", world_size())) and "MASTER_ADDR" in os.environ


def launch_uses_deepspeed() -> bool:
    from accelerate.utils import parse_flag_from_env  # here: the config's checks run before torch is imported

    return parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")


def launch_uses_fsdp() -> bool:
    from accelerate.utils import parse_flag_from_env

    return parse_flag_from_env("ACCELERATE_USE_FSDP")


def uses_deepspeed(training) -> bool:
    if isinstance(training, dict):
        return bool(training.get("deepspeed")) or launch_uses_deepspeed()
    return getattr(training, "deepspeed_plugin", None) is not None  # SFTConfig builds it from either


def uses_fsdp(training) -> bool:
    value = training.get("fsdp") if isinstance(training, dict) else training.fsdp
    return bool(value) or launch_uses_fsdp()


def fsdp_plugin(args):
    """Accelerate's FSDP plugin as the run's Accelerator builds it, from training.fsdp or else the launch's
    FSDP_* variables, for its layout (version, sharding, offload); None without FSDP."""
    if not uses_fsdp(args):
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    # sync_module_states asks for the current GPU in Accelerate 1.15's checks, which a dry run on a machine without
    # one (a login node) has not
    return FullyShardedDataParallelPlugin(**{**(args.fsdp_plugin_args or {}), "sync_module_states": False})


def zero_stage(args) -> int | None:
    """The ZeRO stage of an SFTConfig's DeepSpeed; None without DeepSpeed."""
    plugin = getattr(args, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


def launch_engine(args) -> str:
    """The engine this launch saves and loads checkpoints with, from the same answers as plan.sharding:
    "DeepSpeed ZeRO-2", "FSDP2", "DDP" or "one process". Offloads and FSDP's sharding strategies, which the dry run
    also names, are left out: they save the same files."""
    if (stage := zero_stage(args)) is not None:
        return f"DeepSpeed ZeRO-{stage}"
    if (fsdp := fsdp_plugin(args)) is not None:
        return f"FSDP{fsdp.fsdp_version}"
    return "DDP" if args.world_size > 1 else "one process"


def shards_weights(args) -> bool:
    """Each process holds only a shard of the weights: ZeRO-3 or FSDP."""
    return zero_stage(args) == 3 or uses_fsdp(args)


def local_shard(parameter):
    """The part of a parameter this process holds: ZeRO-3's ds_tensor, FSDP2's local shard, else all of it."""
    shard = getattr(parameter, "ds_tensor", None)
    if shard is None:
        return getattr(parameter, "to_local", lambda: parameter)()
    import torch.distributed as dist

    # DeepSpeed 0.19 pads the last processes' partitions to one size and leaves the padding uninitialized
    rank = dist.get_rank(getattr(parameter, "ds_process_group", None)) if dist.is_initialized() else 0
    return shard.narrow(0, 0, max(0, min(shard.numel(), parameter.ds_numel - rank * shard.numel())))


def holds_a_shard(parameter) -> bool:
    """Whether each process holds its own part of the parameter (ZeRO-3, FSDP2), not a whole copy."""
    return getattr(parameter, "ds_tensor", None) is not None or hasattr(parameter, "to_local")
