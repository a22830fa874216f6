"""Packing through TRL with our pre-tokenized rows: the labels survive, and packed samples do not see each other."""

import pytest
import torch
from trl import SFTTrainer

from sftkit.config import load_config
from sftkit.data import prepare_data
from sftkit.model import load_model, load_tokenizer


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_keep_their_labels_and_attend_only_within_themselves(tmp_path, attention):
    config = load_config("default_train_config.yaml", [
        "--training.packing", "true", "--training.per_device_train_batch_size", "2",
        "--training.output_dir", str(tmp_path), "--model.attn_implementation", attention,
    ])
    tokenizer = load_tokenizer(config.model, config.dataset)
    data = prepare_data(config.dataset, tokenizer, config.training.max_length)
    model = load_model(config.model, torch.float32, gradient_checkpointing=False).eval()
    trainer = SFTTrainer(model=model, args=config.training, train_dataset=data.train, processing_class=tokenizer)

    labels_of = {tuple(row["input_ids"]): row["labels"] for row in data.train}
    packed = trainer.train_dataset[0]
    assert len(packed["seq_lengths"]) > 1
    offset = 0
    for length in packed["seq_lengths"]:
        segment = tuple(packed["input_ids"][offset : offset + length])
        assert packed["labels"][offset : offset + length] == labels_of[segment]
        offset += length

    batch = next(iter(trainer.get_train_dataloader()))
    input_ids, positions = batch["input_ids"], batch["position_ids"]
    assert input_ids.shape[0] == 1 and (batch["labels"] != -100).any()
    with torch.no_grad():
        together = model(input_ids=input_ids, position_ids=positions).logits[0]
        starts = (positions[0] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]
        assert len(starts) > 2
        for start, end in zip(starts, starts[1:]):
            alone = model(input_ids=input_ids[:, start:end]).logits[0]
            assert torch.allclose(together[start:end], alone, atol=1e-4)
