"""Supervised fine-tuning of a causal LM from one YAML file.

    accelerate launch sft.py                                   # configs/default_train_config.yaml
    accelerate launch sft.py --config lora_train_config.yaml   # a bare name is looked up in configs/
    python sft.py --config my.yaml --training.learning_rate 1e-4 --model.use_lora true
"""

from sftkit.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
