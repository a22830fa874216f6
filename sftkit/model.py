"""Tokenizer, dtype, 4-bit quantization and the LoRA config."""

import dataclasses
import json
import logging
import re
from pathlib import Path

import torch
from peft import LoraConfig, prepare_model_for_kbit_training
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from transformers.pytorch_utils import Conv1D

from sftkit import varlen
from sftkit.compat import keep_cpu_4bit_layout_trainable, zero3_init_disabled
from sftkit.data import prepare_for_training
from sftkit.data.tokenize import CHATML_TEMPLATE
from sftkit.engines import holds_a_shard, is_main_process, local_shard, uses_deepspeed, uses_fsdp
from sftkit.errors import ConfigError, first_line
from sftkit.paths import absolute_if_local, looked_in, looks_local, resolve_path
from sftkit.schema import DatasetConfig, ModelConfig, RunConfig
from sftkit.weightfiles import finite

logger = logging.getLogger("sftkit")

varlen.register()  # model.attn_implementation: torch_varlen is then a name transformers accepts

# The layer types PEFT's LoRA can adapt (target_modules must name some of these).
ADAPTABLE_LAYERS = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)


def check_model_source(model_cfg: ModelConfig):
    """Fail in about a second, before the data is prepared and before any weight is read, where loading would
    fail later: a config.json transformers cannot read, modeling code that is not trusted, an attention
    implementation the model or this machine lacks, LoRA target_modules or modules_to_save that name no layer.
    The model is built on the meta device from its config.json alone (no weights, no memory) and returned (None
    where the model's own code cannot be built there). Raises ConfigError.
    """
    if model_cfg.attn_implementation == varlen.NAME and not varlen.available():
        raise ConfigError(f"model.attn_implementation: {varlen.NAME} needs torch 2.11 or later (this is torch "
                          f"{torch.__version__}); upgrade torch, or use sdpa")
    if model_cfg.use_lora:
        try:
            lora_config(model_cfg)
        except (ValueError, TypeError) as error:
            raise ConfigError(f"model.lora_config: {first_line(error)}") from error
    hf_config = _read_model_config(model_cfg)
    model = _meta_model(model_cfg, hf_config)
    if model is None or not model_cfg.use_lora:
        return model
    lora = model_cfg.lora_config
    adaptable = [name for name, module in model.named_modules() if isinstance(module, ADAPTABLE_LAYERS)]
    if isinstance(lora.target_modules, str) and lora.target_modules != "all-linear":
        missing = [] if any(re.fullmatch(lora.target_modules, name) for name in adaptable) else [lora.target_modules]
        if missing and _names_module(lora.target_modules, adaptable):
            raise ConfigError(f"model.lora_config.target_modules: PEFT reads the text {lora.target_modules!r} as a "
                              "regular expression over whole module names (model.layers.0.self_attn.q_proj), which it "
                              f"does not match; for the layers of that name write a list: [{lora.target_modules}]")
    elif isinstance(lora.target_modules, list):
        missing = [target for target in lora.target_modules if not _names_module(target, adaptable)]
    else:
        missing = []
    if missing:
        linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
        raise ConfigError(
            f"model.lora_config.target_modules: {', '.join(missing)} {'matches' if len(missing) == 1 else 'match'} "
            f"no layer of {model_cfg.path} that LoRA can adapt; its linear layers are {', '.join(_leaf_names(linear))} (or use all-linear)"
        )
    if _targets_the_output_layer(lora.target_modules, model):
        head = _leaf_names([_output_layer_name(model)])[0]
        raise ConfigError(f"model.lora_config.target_modules: {head} is the output layer, whose weight TRL 1.16 "
                          "multiplies by directly, so an adapter there would never train; to train it, list it in "
                          f"model.lora_config.modules_to_save instead (trained in full): modules_to_save: [{head}]")
    named = [name for name, _ in model.named_modules() if name]
    missing = [name for name in lora.modules_to_save or [] if not _names_module(name, named)]
    if missing:
        top = [name for name, module in model.named_modules() if name and any(True for _ in module.parameters(False))]
        raise ConfigError(f"model.lora_config.modules_to_save: {', '.join(missing)} names no module of "
                          f"{model_cfg.path}; its modules with weights are {', '.join(_leaf_names(top))}")
    return model


def with_base_pinned(config: RunConfig) -> RunConfig:
    """The run's config with a hub model at the commit its revision (a branch, a tag, or none: main) points at now,
    so that a resume, the export's merge and the adapter's revision (lora_config) all use the weights the run began
    on: a repository updated upstream meanwhile gave a resumed LoRA run another base, silently. The commit is saved
    with the config and fingerprinted, so a resume after such an update is refused and names both commits. Unchanged
    where the model is a local directory or already a commit; ConfigError where it cannot be looked up."""
    from transformers.utils.hub import cached_file, extract_commit_hash

    model_cfg = config.model
    if looks_local(model_cfg.path):
        return config
    if re.fullmatch(r"[0-9a-f]{40}", model_cfg.revision or ""):
        base_card_file(model_cfg.path, model_cfg.revision, fetch=True)
        return config
    try:
        found = cached_file(model_cfg.path, "config.json", revision=model_cfg.revision)
    except Exception as error:  # not found, gated or unreachable: said now, not after check_model_source's retries
        raise _unreadable_config(model_cfg, error) from error
    commit = extract_commit_hash(found, None)
    if commit is None:
        return config
    base_card_file(model_cfg.path, commit, fetch=True)  # now that the hub answers: the model card reads its license
    resolved = {**config.resolved, "model": {**config.resolved["model"], "revision": commit}}
    return dataclasses.replace(config, model=dataclasses.replace(model_cfg, revision=commit), resolved=resolved)


def base_card_file(path: str, revision: str | None, fetch: bool = False) -> Path | None:
    """The base model's own card (README.md): in its local directory, or the hub's in the cache (downloaded first
    with `fetch`); None where it has none or it cannot be had."""
    if looks_local(path):
        card = Path(resolve_path(path)) / "README.md"
        return card if card.is_file() else None
    from transformers.utils.hub import cached_file

    try:
        found = cached_file(path, "README.md", revision=revision, local_files_only=not fetch,
                            _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except Exception:  # noqa: BLE001 - a card is a nicety: the run goes on without it
        return None
    return Path(found) if found else None


def base_license(model_cfg: ModelConfig) -> dict:
    """license, license_name and license_link from the base model's card metadata, for the fine-tune's card: a
    derivative of a model under Llama's or Gemma's license must carry it."""
    card = base_card_file(model_cfg.path, model_cfg.revision)
    if card is None:
        return {}
    from huggingface_hub import metadata_load

    try:
        metadata = metadata_load(card) or {}
    except Exception:  # noqa: BLE001 - front matter that is not YAML: no license to carry
        return {}
    return {key: metadata[key] for key in ("license", "license_name", "license_link") if metadata.get(key)}


def _read_model_config(model_cfg: ModelConfig):
    """The model's config.json as transformers reads it; never trusts remote code on its own."""
    try:
        return AutoConfig.from_pretrained(resolve_path(model_cfg.path), revision=model_cfg.revision,
                                          trust_remote_code=model_cfg.trust_remote_code)
    except Exception as error:  # transformers raises ValueError, OSError, KeyError...: all mean "cannot read it"
        raise _unreadable_config(model_cfg, error) from error


def _unreadable_config(model_cfg: ModelConfig, error: Exception) -> ConfigError:
    message = str(error)  # transformers 5.24's words
    if "trust_remote_code" in message:
        return ConfigError(f"model.path {model_cfg.path} ships its own modeling code; set model.trust_remote_code: "
                           "true if you trust it")
    if "does not recognize this architecture" in message:
        import transformers

        return ConfigError(f"model.path {model_cfg.path}: transformers {transformers.__version__} does not know its "
                           "model_type; upgrade transformers, or, if the model ships its own modeling code (auto_map "
                           "in config.json), set model.trust_remote_code: true")
    # a hub id and a local path look alike (org/name, models/my-llama): say both were tried
    local = "" if Path(resolve_path(model_cfg.path)).exists() else \
        f"; no local directory {model_cfg.path} either{looked_in(model_cfg.path)}"
    return ConfigError(f"model.path {model_cfg.path}: cannot read its config.json: {first_line(error)}{local}")


def parameter_count(model_cfg: ModelConfig) -> int | None:
    """The model's parameters, counted on the meta device from its config.json (no weight read); None where its own
    code cannot be built there."""
    model = _meta_model(model_cfg, _read_model_config(model_cfg))
    return None if model is None else sum(parameter.numel() for parameter in model.parameters())


def _meta_model(model_cfg: ModelConfig, hf_config):
    """The model built on the meta device, or None where the model's own code cannot be built there."""
    def build(attn_implementation):
        with zero3_init_disabled(), torch.device("meta"):
            return AutoModelForCausalLM.from_config(hf_config, trust_remote_code=model_cfg.trust_remote_code,
                                                    attn_implementation=attn_implementation, dtype=torch.bfloat16)

    try:
        return build(model_cfg.attn_implementation)
    except Exception as error:
        failure = error
    if model_cfg.attn_implementation is not None:
        try:
            build(None)
        except Exception:
            pass
        else:
            chosen, way_out = "", "set model.attn_implementation: sdpa (or eager)"
            if model_cfg.attn_implementation == "flash_attention_2" and model_cfg.allow_hub_kernels:
                chosen = (" (sftkit's choice where model.allow_hub_kernels is on: loaded from the Hub's "
                          "kernels-community)")
                way_out += ", or set model.allow_hub_kernels: false"
            elif model_cfg.attn_implementation == "flash_attention_2":
                chosen = " (as set, or as sftkit chooses where flash-attn is installed and the key is left out)"
            raise ConfigError(f"model.attn_implementation: {model_cfg.attn_implementation}{chosen} cannot be used: "
                              f"{first_line(failure)}; {way_out}") from failure
    if model_cfg.trust_remote_code:
        return None  # the model's own code may not support the meta device; loading it will tell
    raise ConfigError(f"model.path {model_cfg.path} ({hf_config.model_type}) cannot be built as a causal LM: "
                      f"{first_line(failure)}") from failure


def _output_layer_name(model) -> str | None:
    head = model.get_output_embeddings()
    return next((name for name, module in model.named_modules() if module is head), None)


def _targets_the_output_layer(target_modules, model) -> bool:
    """Whether LoRA's target_modules name the output layer (PEFT 0.21 leaves it out of all-linear)."""
    head = _output_layer_name(model)
    if head is None or target_modules == "all-linear":
        return False
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, head) is not None
    return any(_names_module(target, [head]) for target in target_modules or [])


def _names_module(target: str, names: list[str]) -> bool:
    """PEFT's rule for a list entry: the module's full name, or its last dotted parts."""
    return any(name == target or name.endswith(f".{target}") for name in names)


def _leaf_names(names: list[str]) -> list[str]:
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))


# any one of them tells a tokenizer is there (layout.TOKENIZER_FILES: those a run writes)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(model_cfg: ModelConfig, dataset_cfg: DatasetConfig):
    path = resolve_path(model_cfg.path)
    if Path(path).is_dir() and not any((Path(path) / name).is_file() for name in TOKENIZER_MARKERS):
        raise ConfigError(f"model.path {model_cfg.path} has no tokenizer files ({', '.join(TOKENIZER_MARKERS)}); save "
                          "the tokenizer beside the model (tokenizer.save_pretrained(path))")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=model_cfg.revision,
                                                  trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError) as error:  # transformers' words for a tokenizer it cannot build
        raise ConfigError(f"model.path {model_cfg.path}: its tokenizer cannot be loaded: {first_line(error)}") \
            from error
    if not dataset_cfg.chat_template and Path(path).is_dir():
        _warn_of_a_second_template(Path(path), model_cfg.path)
    if dataset_cfg.chat_template:
        _set_template(tokenizer, dataset_cfg.chat_template)
    elif tokenizer.chat_template is None:
        logger.warning(f"model.path {model_cfg.path} has no chat template: conversations are written in ChatML "
                       "(<|im_start|>role ... <|im_end|>); set dataset.chat_template for another format")
        tokenizer.chat_template = CHATML_TEMPLATE
    ensure_distinct_pad_token(tokenizer)
    return tokenizer


def _warn_of_a_second_template(directory: Path, named: str) -> None:
    """transformers 5.24 reads chat_template.jinja where a directory has one, and says nothing of the chat_template
    that tokenizer_config.json may also hold: an edit there (as older guides show) trained with the other one."""
    jinja, settings = directory / "chat_template.jinja", directory / "tokenizer_config.json"
    if not (jinja.is_file() and settings.is_file()):
        return
    try:
        written = json.loads(settings.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, OSError):  # the tokenizer loaded, so transformers read it; nothing to compare here
        return
    if isinstance(written, str) and written.strip() != jinja.read_text(encoding="utf-8").strip():
        logger.warning(f"model.path {named} has two chat templates that differ: chat_template.jinja, which is used, "
                       "and tokenizer_config.json's chat_template, which transformers ignores; delete the one you "
                       "did not mean (or set dataset.chat_template)")


def tokenizer_and_data(config: RunConfig) -> tuple:
    """The tokenizer and the prepared data, checked against the model's config.json: the run, its dry run and
    --inspect read them here alike, so that each refuses, and warns of, the same things."""
    args = config.training
    tokenizer = load_tokenizer(config.model, config.dataset)
    check_token_settings(tokenizer, args, config.model.path)
    with args.main_process_first(desc="dataset preparation"):
        data = prepare_for_training(config.dataset, tokenizer, args)
    check_data_fits_model(tokenizer, config.model, data, args)
    return tokenizer, data


def check_token_settings(tokenizer, training, model_path: str) -> None:
    """training.eos_token and pad_token must be tokens of the tokenizer: TRL refuses others only when it builds the
    trainer, after the data is prepared and the model loaded."""
    vocab = tokenizer.get_vocab()
    for key in ("eos_token", "pad_token"):
        value = getattr(training, key)
        if value is not None and value not in vocab:
            raise ConfigError(f"training.{key} {value!r} is not a token of the tokenizer of model.path {model_path}; "
                              f"give one of its tokens (its eos is {tokenizer.eos_token!r}) or remove the key")


def check_data_fits_model(tokenizer, model_cfg: ModelConfig, data, args) -> None:
    """The prepared rows against the model's config.json: their token ids and their lengths."""
    hf_config = _read_model_config(model_cfg)
    text_config = hf_config.get_text_config()
    _check_vocabulary_fits(tokenizer, model_cfg, data, text_config)
    _check_rows_within_positions(model_cfg, data, args, hf_config, text_config)


def _check_vocabulary_fits(tokenizer, model_cfg: ModelConfig, data, text_config) -> None:
    """Every token id the rows use (and the pad and eos the collator and generation add) must have a row in the
    model's embeddings: tokens added to the tokenizer alone passed --inspect and the dry run, then failed in the first
    forward pass with an IndexError (a device-side assert on a GPU). Ids no row uses may lie past them: Gemma 3's
    tokenizer holds <image_soft_token> beyond its text model's vocab_size."""
    rows = getattr(text_config, "vocab_size", None)
    used = max(data.largest_token_id(), *(token for token in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                                          if token is not None))
    if rows is not None and used >= rows:
        raise ConfigError(f"model.path {model_cfg.path}: the rows (or the pad or eos) use token id {used:,} "
                          f"({tokenizer.convert_ids_to_tokens(used)!r}), but the model's embeddings hold {rows:,} rows "
                          "(vocab_size in config.json), so training would fail; resize the embeddings to the tokenizer "
                          "and save both (model.resize_token_embeddings(len(tokenizer)), then save_pretrained of "
                          "each) and point model.path at that copy")


def _check_rows_within_positions(model_cfg: ModelConfig, data, args, hf_config, text_config) -> None:
    """Rows (train or eval) longer than the positions the model has: where it looks them up in a table (GPT-2, OPT)
    training fails on the first such row with an IndexError, after the model has loaded (an error, before); rotary
    ones were not pretrained past them, and rope scaling may extend them (a warning). Packing `wrapped` runs
    positions on across rows, to max_length."""
    positions, max_length = getattr(text_config, "max_position_embeddings", None), args.max_length
    wrapped = args.packing and args.packing_strategy == "wrapped"
    longest = max_length if wrapped else min(data.longest_row(), max_length)
    if not isinstance(positions, int) or longest <= positions:
        return
    problem = (f"rows of up to {longest:,} tokens reach the model (model.max_seq_length {max_length:,}), but "
               f"{model_cfg.path} has {positions:,} positions (max_position_embeddings in config.json)")
    if _learned_positions(model_cfg, hf_config, positions):
        raise ConfigError(f"{problem}, which it looks up in a table of that many rows: training would fail on the "
                          f"first longer row; set model.max_seq_length to {positions:,} or less")
    if is_main_process():
        logger.warning(f"{problem}: it was not pretrained past them; set model.max_seq_length to {positions:,} or "
                       "less, unless its rope scaling extends them")


def _learned_positions(model_cfg: ModelConfig, hf_config, positions: int) -> bool:
    """Whether the model has a table of position embeddings (GPT-2's wpe, OPT's embed_positions, two rows longer):
    rotary and ALiBi models have none."""
    model = _meta_model(model_cfg, hf_config)
    tokens = model.get_input_embeddings() if model is not None else None
    return model is not None and any(isinstance(module, torch.nn.Embedding) and module is not tokens
                                     and module.num_embeddings in (positions, positions + 2)
                                     and module.embedding_dim == tokens.embedding_dim
                                     and not re.search(r"vision|visual|image", name)  # a vision tower's patches
                                     for name, module in model.named_modules())


def ensure_distinct_pad_token(tokenizer) -> None:
    """Give the tokenizer a pad token other than eos (TRL would pad with eos when there is none).

    With pad == eos, anything that masks padding by token id also masks the eos that ends every reply, and the
    model never learns to stop. Our labels are padded by position, but the saved tokenizer is used elsewhere too.
    An existing token is reused (padding only fills positions the attention mask hides), so the vocabulary and
    the embeddings stay as they are.
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return
    vocab = tokenizer.get_vocab()
    candidates = ["<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|endoftext|>", tokenizer.unk_token]
    for token in candidates:
        if token in vocab and vocab[token] != tokenizer.eos_token_id:
            tokenizer.pad_token = token
            return
    raise ConfigError(
        f"the tokenizer of {tokenizer.name_or_path} has no pad token other than its eos {tokenizer.eos_token!r}, "
        "which ends every reply; add one (tokenizer.add_special_tokens({'pad_token': '<pad>'}) and "
        "model.resize_token_embeddings(len(tokenizer)), then save_pretrained of each) and point model.path at that copy"
    )


def _set_template(tokenizer, value: str) -> None:
    """dataset.chat_template, a file's path or the template itself, checked to be Jinja before any row meets it
    (compiled the way transformers compiles it, by rendering a two-message chat; only a syntax error counts here,
    since a template may refuse such a chat on purpose)."""
    import jinja2

    path = Path(resolve_path(value))
    tokenizer.chat_template = path.read_text() if path.is_file() else value
    tokenizer.sftkit_chat_template = f"{value} (dataset.chat_template)" if path.is_file() else \
        "given as dataset.chat_template"  # its errors name it (data.tokenize.template_source)
    try:
        tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                      tokenize=False)
    except jinja2.TemplateSyntaxError as error:
        where = path if path.is_file() else "(the text given)"
        raise ConfigError(f"dataset.chat_template {where}: not a valid Jinja template, line {error.lineno}: "
                          f"{error.message}") from None
    except Exception:  # what the template refuses, each row that meets it reports
        pass


def resolve_dtype(model_cfg: ModelConfig, training) -> torch.dtype:
    """The run's dtype, in which it computes and publishes: model.dtype, or by default bf16 for a bf16 run and fp32
    otherwise (fp16 AMP needs fp32 weights)."""
    if model_cfg.dtype in (None, "auto"):
        return torch.bfloat16 if training.bf16 else torch.float32
    return getattr(torch, model_cfg.dtype)


def weights_dtype(model_cfg: ModelConfig, training, dtype: torch.dtype) -> torch.dtype:
    """The dtype the weights train and are saved in. Full fine-tuning in bf16 with model.dtype auto keeps float32
    weights and computes in bf16 under the Trainer's autocast (mixed precision): AdamW's updates smaller than bf16's
    resolution (1/256 of a weight) are lost in bf16 weights; in a 10-step run at learning rate 1e-5, 92% of them
    never changed. DeepSpeed keeps float32 master weights of its own, and LoRA trains float32 adapters over the
    frozen base, so both load in `dtype`; model.dtype: bfloat16 asks for pure bf16 (half the memory of the states).
    FSDP under mixed precision (training.bf16 or fp16) trains float32 weights whatever they load in: Accelerate
    1.15 upcasts them itself, as its master weights."""
    if model_cfg.use_lora or dtype == torch.float32:
        return dtype
    if uses_fsdp(training) and (training.bf16 or training.fp16):
        return torch.float32
    auto = model_cfg.dtype in (None, "auto")
    return torch.float32 if auto and dtype == torch.bfloat16 and not uses_deepspeed(training) else dtype


def precision_words(model_cfg: ModelConfig, training, dtype: torch.dtype) -> str:
    """`bfloat16`, or `bfloat16 with float32 weights` where weights_dtype keeps them apart, for the plan lines."""
    name = str(dtype).removeprefix("torch.")
    return name if weights_dtype(model_cfg, training, dtype) == dtype else f"{name} with float32 weights"


def load_model(model_cfg: ModelConfig, dtype: torch.dtype, gradient_checkpointing: bool, quantize: bool | None = None):
    """The base model; 4-bit NF4 and prepared for k-bit training when model.load_in_4bit (unless quantize=False)."""
    quantize = model_cfg.load_in_4bit if quantize is None else quantize
    kwargs = {
        "dtype": dtype,
        "revision": model_cfg.revision,
        "trust_remote_code": model_cfg.trust_remote_code,
        "attn_implementation": model_cfg.attn_implementation,
    }
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=dtype,  # ZeRO-3 can only shard 4-bit weights stored in the compute dtype
        )
    model = AutoModelForCausalLM.from_pretrained(absolute_if_local(model_cfg.path), **kwargs)
    if quantize:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        keep_cpu_4bit_layout_trainable(model)
    return model


def refuse_non_finite_weights(model, model_path: str, args) -> None:
    """A nan or inf in the base (an unused embedding row of a converted model, say) leaves every loss finite where
    no row reads it, and the export then finds the published weights broken after the whole run: refused before
    training. A process reads its own shard where the weights are sharded, else the main process reads them (every
    process holds the same copy, on the CPU until the Trainer places it), in slices (a whole-tensor isfinite doubles
    the largest one); 4-bit weights are packed bytes (stored as floats for ZeRO-3), not numbers to check."""
    broken = [name for name, parameter in model.named_parameters()
              if type(parameter).__name__ != "Params4bit" and (args.process_index == 0 or holds_a_shard(parameter))
              and not finite(local_shard(parameter))]
    found = torch.tensor(float(len(broken)), device=args.device)
    if args.world_size > 1:
        torch.distributed.all_reduce(found)
    if found.item():
        which = f"{', '.join(broken[:3])}{' and more' if len(broken) > 3 else ''}" if broken else \
            "a shard another process holds"
        raise ConfigError(f"model.path {model_path}: its weights hold nan or inf ({which}), which training would "
                          "carry into the model it publishes; fine-tune a copy of the model whose weights are finite")


def lora_config(model_cfg: ModelConfig) -> LoraConfig | None:
    if not model_cfg.use_lora:
        return None
    # revision: written to adapter_config.json, so the adapter is loaded (by PEFT, or sftkit's chat) on its base's
    # revision, not the hub's newest
    return LoraConfig(**dataclasses.asdict(model_cfg.lora_config), revision=model_cfg.revision)
