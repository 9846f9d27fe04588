"""Build tiny Qwen2-style causal LMs with their own byte-level BPE tokenizer and chat template.

Used by ``examples/tiny-model/make.py`` (the bundled model) and by tests (seeded random models).
head_dim is kept ≥ 32 because vLLM's CPU attention rejects smaller heads.
"""

from __future__ import annotations

from pathlib import Path

# <|endoftext|> is in the vocabulary because transformers reloads a qwen2 tokenizer as Qwen2Tokenizer,
# which adds it as unk_token: outside the vocabulary it would get an id past the embedding table.
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_WORDS = (
    "the a an of to and in is it that for on with as was be by this are or at from but not have "
    "what answer question sum plus equals number total please compute add result think step user "
    "assistant system good bad yes no hello world model reward token"
).split()


def corpus(seed: int = 0, lines: int = 2000) -> list[str]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        a, b = rng.randrange(100), rng.randrange(100)
        out.append(f"<|im_start|>user\n{a}+{b}=<|im_end|>\n<|im_start|>assistant\n{a + b}<|im_end|>\n")
        out.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randrange(3, 12))))
    return out


def build_tokenizer(vocab_size: int = 384, seed: int = 0):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|im_end|>", pad_token="<|pad|>",
        unk_token="<|endoftext|>", padding_side="left"
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def build_model(tokenizer, hidden: int = 128, layers: int = 4, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 512, max_positions: int = 256, seed: int = 0):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg)


def save(model, tokenizer, out: str | Path) -> Path:
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    return out


def make_random(out: str | Path, seed: int = 0, **model_kwargs) -> Path:
    """A seeded random tiny model + tokenizer saved to ``out`` (tests)."""
    tok = build_tokenizer(seed=0)
    return save(build_model(tok, seed=seed, **model_kwargs), tok, out)
