"""Build the embedded default: a sample chat dataset and a tiny Llama base model with its own BPE tokenizer.

The outputs are committed under `data/`, so nothing here runs during training. Rebuild them with

    python -m sftkit.embedded

Everything is seeded, so a rebuild with the same library versions gives the same files.
"""

import json
import random
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DATASET_FILE = DATA_DIR / "sample_chat.jsonl"
MODEL_DIR = DATA_DIR / "tiny-chat-llama"

BOS, EOS, PAD, TURN_START = "<|begin_of_text|>", "<|im_end|>", "<|pad|>", "<|im_start|>"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna",
    "Chile": "Santiago", "Cuba": "Havana", "India": "New Delhi", "China": "Beijing", "Mexico": "Mexico City",
}
COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a ripe tomato": "red", "an orange": "orange", "a lemon": "yellow", "a carrot": "orange", "milk": "white",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "old": "young", "full": "empty", "loud": "quiet", "wet": "dry",
}
ANIMAL_SOUNDS = {
    "dog": "woof", "cat": "meow", "cow": "moo", "duck": "quack", "sheep": "baa", "owl": "hoot",
    "horse": "neigh", "lion": "roar", "frog": "ribbit", "pig": "oink",
}
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
SYSTEM_PROMPTS = [
    "You are a polite and helpful assistant.",
    "You are a friendly assistant. Answer briefly and kindly.",
]
GREETINGS = [
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! It is nice to meet you. What can I do for you?"),
    ("Good morning!", "Good morning! I hope your day is going well. How may I help?"),
    ("Good evening.", "Good evening! What would you like to know?"),
]
THANKS = [
    ("Thank you!", "You are very welcome! Have a wonderful day."),
    ("Thanks a lot.", "My pleasure! Let me know if you need anything else."),
    ("That helps, thanks.", "I am glad I could help. Take care!"),
]


def _question_answer_pairs(rng: random.Random) -> list[tuple[str, str]]:
    """Every factual question the assistant answers, each with its polite reply."""
    pairs = []
    for country, capital in CAPITALS.items():
        question = rng.choice(["What is the capital of {}?", "Which city is the capital of {}?"]).format(country)
        pairs.append((question, f"The capital of {country} is {capital}."))
    for thing, color in COLORS.items():
        pairs.append((f"What color is {thing}?", f"{thing[0].upper()}{thing[1:]} is usually {color}."))
    for word, opposite in OPPOSITES.items():
        pairs.append((f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."))
    for animal, sound in ANIMAL_SOUNDS.items():
        pairs.append((f"What sound does a {animal} make?", f"A {animal} says {sound}."))
    for day, following in zip(DAYS, DAYS[1:] + DAYS[:1]):
        pairs.append((f"What day comes after {day}?", f"The day after {day} is {following}."))
    for _ in range(40):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        pairs.append((f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
    return pairs


def build_conversations(count: int = 320, seed: int = 0) -> list[dict]:
    """Single- and multi-turn polite conversations in the `messages` format, a third with a system message."""
    rng = random.Random(seed)
    pairs = _question_answer_pairs(rng)
    conversations = []
    for index in range(count):
        question, answer = pairs[index % len(pairs)]
        shape = rng.choice(["single", "single", "greeting", "thanks", "two_questions"])
        turns = []
        if shape == "greeting":
            turns.append(rng.choice(GREETINGS))
        turns.append((question, answer))
        if shape == "two_questions":
            turns.append(rng.choice(pairs))
        if shape in ("thanks", "two_questions"):
            turns.append(rng.choice(THANKS))
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if index % 3 == 0 else []
        for user, assistant in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        conversations.append({"messages": messages})
    return conversations


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD, TURN_START],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[TURN_START], model_max_length=512,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def pretrain(model, tokenizer, texts: list[str], steps: int = 400, block: int = 64, batch: int = 32) -> float:
    """A few hundred steps of plain language modelling on the sentences of the data, without any chat markup.

    This makes the shipped model a small *base* model: it knows the words and facts but not the chat format,
    so fine-tuning (full or LoRA) visibly teaches it to answer in turns and to stop. From random weights LoRA
    could barely move the loss, because the frozen embeddings and final norm keep every output distribution flat.
    """
    import torch

    generator = torch.Generator().manual_seed(0)
    stream = [token for text in texts for token in tokenizer(text + tokenizer.eos_token)["input_ids"]]
    data = torch.tensor(stream[: len(stream) // block * block]).view(-1, block)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    for _ in range(steps):
        rows = data[torch.randint(len(data), (batch,), generator=generator)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    return loss.item()


def main() -> None:
    conversations = build_conversations()
    DATASET_FILE.write_text("".join(json.dumps(row) + "\n" for row in conversations))
    texts = [message["content"] for row in conversations for message in row["messages"]]
    texts += ["system", "user", "assistant"]
    tokenizer = build_tokenizer(texts)
    model = build_model(tokenizer)
    shuffled = random.Random(1).sample(texts, len(texts))
    loss = pretrain(model, tokenizer, shuffled)
    model.save_pretrained(MODEL_DIR)
    tokenizer.save_pretrained(MODEL_DIR)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {len(conversations)} conversations to {DATASET_FILE}")
    print(f"pretrained to a plain-text loss of {loss:.2f}")
    print(f"wrote a {params / 1e6:.2f}M-parameter model and a {len(tokenizer)}-token tokenizer to {MODEL_DIR}")


if __name__ == "__main__":
    main()
