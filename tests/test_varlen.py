"""model.attn_implementation: torch_varlen (sftkit/varlen.py): each packed conversation attends only to itself.

On a GPU it calls PyTorch's flash varlen kernel, which this CPU lacks; here the same boundaries go through sdpa one
conversation at a time, so these tests check what both share: the registration with transformers, the layouts, the
boundaries, the fallback, training and export."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODEL, run_python

from sftkit.config import load_config
from sftkit.train import train
from sftkit.varlen import NAME, attention


class Layer(torch.nn.Module):  # what transformers' sdpa fallback reads from an attention layer
    is_causal = True
    num_key_value_groups = 2


def test_each_packed_conversation_attends_only_to_itself():
    torch.manual_seed(0)
    bounds = [0, 5, 12, 13, 16]  # three conversations and a padding token (TRL gives it a position id of 0)
    query, key, value = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)  # 4 heads, 2 kv
    cu = torch.tensor(bounds, dtype=torch.int32)
    out, weights = attention(Layer(), query, key, value, None, scaling=0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                             max_length_q=7, max_length_k=7)
    assert out.shape == (1, 16, 4, 8) and weights is None  # transformers' layout: (batch, tokens, heads, head_dim)
    for start, end in zip(bounds[:-1], bounds[1:]):
        alone = F.scaled_dot_product_attention(query[..., start:end, :], key[..., start:end, :],
                                               value[..., start:end, :], is_causal=True, scale=0.5, enable_gqa=True)
        torch.testing.assert_close(out[0, start:end], alone[0].transpose(0, 1))
    whole_row = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.5, enable_gqa=True)
    assert not torch.allclose(out[0, 5:12], whole_row[0, :, 5:12].transpose(0, 1))  # it did not look past its start

    unpacked, _ = attention(Layer(), query, key, value, None, scaling=0.5)  # no boundaries: sdpa, causal
    torch.testing.assert_close(unpacked[0], whole_row[0].transpose(0, 1))


def packed_batch(tokenizer, rows: int = 6):
    """A real padding-free micro-batch: sample conversations tokenized as sftkit does, collated by TRL."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from sftkit.data import prepare_data

    config = load_config(None, ["--dataset.test_size", "null"])
    data = prepare_data(config.dataset, tokenizer, 256)
    collate = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True,
                                              pad_to_multiple_of=64)
    return collate([data.train[i] for i in range(rows)])


def test_the_tiny_model_computes_each_packed_conversation_as_if_it_were_alone(tokenizer):
    from transformers import AutoModelForCausalLM

    batch = packed_batch(tokenizer)
    assert batch["cu_seq_lens_q"].numel() > 3 and batch["input_ids"].shape[0] == 1
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, attn_implementation=NAME)
    assert model.config._attn_implementation == NAME
    packed = model(**batch, use_cache=False).logits[0]
    bounds = batch["cu_seq_lens_q"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        alone = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits[0]
        torch.testing.assert_close(packed[start:end], alone, rtol=1e-4, atol=1e-4)  # float32, summed in another order


def test_the_gradients_are_those_of_sdpa_with_its_block_mask(tokenizer):
    from transformers import AutoModelForCausalLM

    batch = packed_batch(tokenizer)
    gradients = {}
    for implementation in ("sdpa", NAME):  # sdpa keeps the conversations apart with a tokens x tokens mask
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, attn_implementation=implementation)
        model(**batch, use_cache=False).loss.backward()  # with a cache, transformers builds sdpa no block mask
        gradients[implementation] = model.model.layers[0].self_attn.q_proj.weight.grad
    torch.testing.assert_close(gradients[NAME], gradients["sdpa"], rtol=1e-4, atol=1e-6)


def test_generation_with_a_cache_takes_sdpa_and_gives_its_tokens(tokenizer):
    from transformers import AutoModelForCausalLM

    prompts = tokenizer(["What color is an orange?", "Hi"], return_tensors="pt", padding=True, padding_side="left")
    replies = {}
    for implementation in ("sdpa", NAME):
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, attn_implementation=implementation)
        replies[implementation] = model.generate(**prompts, max_new_tokens=8, do_sample=False)
    assert torch.equal(replies[NAME], replies["sdpa"])


def test_bidirectional_packed_attention_still_stays_within_each_conversation_and_softcap_is_refused():
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    bidirectional, _ = attention(Layer(), query, key, value, None, is_causal=False, cu_seq_lens_q=cu,
                                 cu_seq_lens_k=cu, max_length_q=4, max_length_k=4)
    for start, end in ((0, 2), (2, 6)):
        alone = F.scaled_dot_product_attention(query[..., start:end, :], key[..., start:end, :],
                                               value[..., start:end, :], enable_gqa=True)
        torch.testing.assert_close(bidirectional[0, start:end], alone[0].transpose(0, 1))
    with pytest.raises(ValueError, match="torch_varlen does not support softcap"):
        attention(Layer(), query, key, value, None, softcap=30.0, cu_seq_lens_q=cu)


def test_a_packed_run_trains_like_sdpa_and_exports_a_model_that_loads_without_sftkit(tmp_path):
    args = ["--training.max_steps", "4", "--training.logging_steps", "1", "--dataset.test_size", "null",
            "--training.packing", "true", "--training.per_device_train_batch_size", "4"]
    runs = {name: train(load_config(None, ["--training.output_dir", str(tmp_path / name),
                                           "--model.attn_implementation", name, *args]))
            for name in ("sdpa", NAME)}
    losses = {name: [entry["loss"] for entry in run.trainer.state.log_history if "loss" in entry]
              for name, run in runs.items()}
    assert len(losses[NAME]) == 4 and losses[NAME] == pytest.approx(losses["sdpa"], rel=1e-4)
    # a user's transformers, without sftkit and its registration, loads the exported model
    run_python("-c", "import sys; from transformers import AutoModelForCausalLM; "
                     "AutoModelForCausalLM.from_pretrained(sys.argv[1])", str(tmp_path / NAME))



def test_the_gpu_kernel_takes_the_keywords_given_to_it_by_this_torch():
    """The flash varlen kernel has no CPU build; on the meta device its shape function still checks the call."""
    from sftkit.varlen import _flash_varlen

    query = torch.empty(16, 4, 8, device="meta", dtype=torch.bfloat16)
    key = torch.empty(16, 2, 8, device="meta", dtype=torch.bfloat16)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32, device="meta")
    out = _flash_varlen(query, key, key, cu, cu, 11, 11, 0.25)
    assert (out.shape, out.dtype, out.device.type) == (query.shape, torch.bfloat16, "meta")


@pytest.mark.parametrize(("keywords", "expected"), [
    ({"return_aux", "scale", "window_size"}, {"window_size": (-1, 0), "scale": 0.25}),  # torch 2.11
    ({"return_aux", "scale", "window_size", "enable_gqa", "seqused_k"},  # torch 2.12 and 2.13
     {"window_size": (-1, 0), "scale": 0.25, "enable_gqa": True}),
], ids=["torch-2.11", "torch-2.13"])
def test_each_torch_release_is_asked_for_causal_attention_in_its_own_words(monkeypatch, keywords, expected):
    """What varlen_attn is called with, for the signatures read from torch 2.11-2.13's sources (the device image
    has 2.11, this machine 2.13): the kernels cannot run here, so a recorder stands in for varlen_attn."""
    import torch.nn.attention.varlen as torch_varlen

    import sftkit.varlen as varlen

    calls = []
    monkeypatch.setattr(varlen, "VARLEN_KEYWORDS", frozenset(keywords))
    monkeypatch.setattr(torch_varlen, "varlen_attn", lambda q, *args, **options: calls.append((q, options)) or q)
    query, key = torch.ones(16, 4, 8), torch.ones(16, 2, 8)
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    varlen._flash_varlen(query, key, key, cu, cu, 11, 11, 0.25)
    (passed_query, options), = calls
    assert options == expected and passed_query is query
