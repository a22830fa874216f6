"""Workarounds for the libraries' behaviour, in one place, each with the version it was written for.

Noise filters: messages the libraries repeat on every run that tell the user nothing they can act on. They are
installed when sftkit is imported (sftkit/__init__.py), so the training command, the tests and `python -m sftkit.*`
all see the same quiet output. Each matches one message at its source logger or warning, never a whole library.
"""

import glob
import logging
import os
import warnings


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
    # DeepSpeed 0.19's collectives call torch.distributed functions that torch deprecated, once per step and process.
    _drop_warning(r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    # DeepSpeed on a machine without a GPU, once per process at import; a run on CPU says so in its plan.
    _drop_log("DeepSpeed", "Setting accelerator to CPU")
    # transformers 5.24 warns when a tokenized row is longer than the tokenizer's model_max_length, once per
    # process; sftkit tokenizes whole conversations on purpose and truncates to model.max_seq_length itself.
    _drop_log("transformers.tokenization_utils_base", "Token indices sequence length is longer than")


def _drop_log(logger: str, text: str) -> None:
    logging.getLogger(logger).addFilter(lambda record: text not in record.getMessage())


def _drop_warning(pattern: str, category: type[Warning]) -> None:
    warnings.filterwarnings("ignore", message=pattern, category=category)


def announce_deepspeed_cpu_op_build() -> None:
    """DeepSpeed 0.19 on a machine without a GPU compiles its shared-memory collective op with the C++ compiler the
    first time it starts there, silently, for one to four minutes (measured on 2 cores); say so before it starts.
    It caches the build with torch's other extensions (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions)."""
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    if os.environ.get("RANK", "0") == "0" and not glob.glob(os.path.join(cache, "*", "deepspeed_shm_comm", "*.so")):
        print("sftkit: DeepSpeed is building its CPU communication op (once per machine; 1 to 4 minutes)...",
              flush=True)
