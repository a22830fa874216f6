"""The baseline: the short script a competent user writes with plain TRL instead of using sftkit.

Conversational data, completion-only loss (TRL's prompt/completion format: the last assistant reply trains, as TRL
does by default for that format), the same hyperparameters as the sftkit run it is compared with.

    python benchmarks/baseline_trl.py --model data/tiny-chat-llama --data data/sample_chat.jsonl --output_dir out
"""

import argparse

import torch
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer


def to_prompt_completion(row):
    last_reply = max(i for i, message in enumerate(row["messages"]) if message["role"] == "assistant")
    return {"prompt": row["messages"][:last_reply], "completion": [row["messages"][last_reply]]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--max_steps", type=int, default=-1)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--max_length", type=int, default=256)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dataset = load_dataset("json", data_files=args.data, split="train")
    dataset = dataset.map(to_prompt_completion, remove_columns=dataset.column_names)
    gpu = torch.cuda.is_available()
    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        max_length=args.max_length,
        packing=args.packing,
        gradient_checkpointing=False,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        use_cpu=not gpu,
        dataloader_pin_memory=gpu,
        logging_steps=20,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
    )
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16 if config.bf16 else torch.float32)
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)


if __name__ == "__main__":
    main()
