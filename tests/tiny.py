"""Tiny models, tokenizers and text for tests: built from a config, trained here, never downloaded."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = ["the", "a", "cat", "dog", "bird", "fish", "runs", "jumps", "sleeps", "eats", "big", "small", "red", "blue", "green", "happy", "sad", "fast", "slow", "good", "bad", "very", "not", "and", "or", "but", "if", "then", "when", "where", "why", "how", "what", "who", "answer", "question", "please", "help", "tell", "me", "about", "write", "story", "poem", "code", "list", "one", "two", "three", "four", "five", "yes", "no", "maybe", "always", "never"]  # noqa: E501

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


def random_text(rng: random.Random, n_min: int = 3, n_max: int = 20) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(n_min, n_max)))


def make_tokenizer(path: str | Path, chat_template: bool = True):
    """Train a word-level tokenizer on the test vocabulary and save it as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=specials)
    rng = random.Random(0)
    tok.train_from_iterator([random_text(rng) for _ in range(200)] + [" ".join(WORDS)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


def tiny_config(model_type: str = "llama", head: str = "seqcls", **overrides):
    """A 2-layer, width-64 config of ``model_type`` (llama | mistral | qwen2)."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    if head == "seqcls":
        kw["num_labels"] = 1
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)


def make_dense(path: str | Path, model_type: str = "llama", head: str = "seqcls", seed: int = 0,
               tokenizer: bool = True, **overrides):
    """Build a random tiny dense model (``head``: seqcls | causal), save it with a tokenizer; return it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = tiny_config(model_type, head, **overrides)
    cls = AutoModelForSequenceClassification if head == "seqcls" else AutoModelForCausalLM
    model = cls.from_config(cfg)
    # Norm weights start at 1; perturb them so a test notices if a norm is dropped or swapped.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(path))
    if tokenizer:
        make_tokenizer(path)
    return model


def make_pairs(n: int, seed: int = 0, noise: float = 0.0) -> list[dict]:
    """A learnable preference task: the chosen answer contains 'good', the rejected one 'bad'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = random_text(rng, 3, 8)
        base = random_text(rng, 2, 8)
        good, bad = f"{base} good yes", f"{base} bad no"
        if rng.random() < noise:
            good, bad = bad, good
        rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows
