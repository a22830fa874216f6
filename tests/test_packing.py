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


@pytest.mark.parametrize(("settings", "rows_trained"), [
    ([], 1),  # keep_start: the long row's reply is cut off, and the row dropped
    (["--training.truncation_mode", "keep_end"], 2),
    (["--training.packing", "true"], 1),  # best-fit packing cuts long rows too
    (["--training.packing", "true", "--training.packing_strategy", "bfd_split"], 2),  # their rest is packed apart
])
def test_a_long_row_is_kept_exactly_when_the_trainer_trains_part_of_it(tmp_path, settings, rows_trained):
    """A reply past max_seq_length trains under keep_end or split packing: the row is prepared and counted, and
    TRL's own truncation keeps it (a row dropped here would never reach the trainer)."""
    import json

    from sftkit.data import prepare_for_training

    rows = [[{"role": "user", "content": " ".join(["hello"] * 60)}, {"role": "assistant", "content": "Paris."}],
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in rows))
    config = load_config("default_train_config.yaml", [
        "--dataset.name", str(path), "--dataset.test_size", "null", "--model.max_seq_length", "24",
        "--training.output_dir", str(tmp_path / "out"), *settings])
    tokenizer = load_tokenizer(config.model, config.dataset)
    data = prepare_for_training(config.dataset, tokenizer, config.training)
    assert len(data.train) == rows_trained
    model = load_model(config.model, torch.float32, gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, args=config.training, train_dataset=data.train, processing_class=tokenizer)
    trained = sum(label != -100 for row in trainer.train_dataset for label in row["labels"])
    assert trained == data.trainable_tokens
