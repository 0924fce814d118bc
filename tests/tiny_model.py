"""A tiny random Llama with a real tokenizer and chat template, built offline in a second or two.

Tests need a base model that loads through the same from_pretrained calls as a real one, but no hub is
reachable and a real model is too slow for CI. The weights are random (the model says nothing sensible);
the tokenizer is byte-level BPE, so any unicode text encodes without unknown tokens, and its chat template
is ChatML like SmolLM2's, so chat data, loss masks and generation prompts behave as with the real model.
Variants that do not fit their model (more tokens than embedding rows, no chat template, a tokenizer that
encodes nothing beside a Qwen2) test the checks made before training.
"""

from __future__ import annotations

import itertools
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 1024

# ChatML as SmolLM2 writes it, minus its default system prompt: a system message is optional.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SUBJECTS = ["The cat", "A small dog", "My neighbour", "The teacher", "Every student", "The old ship",
             "Our assistant", "The river", "A quiet city", "The machine"]
_VERBS = ["walks to", "looks at", "writes about", "thinks of", "answers", "remembers", "carries", "builds",
          "learns from", "sings about"]
_OBJECTS = ["the market.", "a red apple.", "the capital of France.", "three green boxes.", "the weather today.",
            "a long letter.", "the evening news.", "the number seven.", "a question and an answer.",
            "the mountains in winter."]
_EXTRA = [
    "What is the capital of France? The capital of France is Paris.",
    "User: hello, how are you? Assistant: I am fine, thank you for asking.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 42 100 1000 3.14",
    "Punctuation, quotes \"like this\", (brackets), [lists], {braces}, colons: and semicolons; done!",
    "def train(model, data):\n    return model.fit(data)\n",
    '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}',
]


def corpus() -> list[str]:
    """A few hundred lines of plain English (and a little code and JSON) to learn merges from."""
    lines = [f"{s} {v} {o}" for s, v, o in itertools.product(_SUBJECTS, _VERBS, _OBJECTS)][::3]
    return lines + _EXTRA * 5


def build_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact, which loss-mask code relies on.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   chat_template=chat_template, model_max_length=4096)


def build_word_level_tokenizer():
    """A word-level tokenizer whose pre-tokenizer removes all text: it encodes anything to no ids at all (what a
    broken conversion can leave beside a model)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, "[UNK]", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]+"), behavior="removed")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="[UNK]", chat_template=CHAT_TEMPLATE)


def build_tiny_model(path, *, added_tokens: int = 0, chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """Write a loadable tiny Llama (safetensors) and its tokenizer into `path`; returns the folder.

    Variants for the model/tokenizer fit checks: `added_tokens` tokens added to the tokenizer after the model's
    embedding was sized (a tokenizer with more tokens than the model's vocab_size), `chat_template` None for a
    tokenizer without one (or another template)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(chat_template)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
    )
    model = _seeded(LlamaForCausalLM, config)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(added_tokens)])
    tokenizer.save_pretrained(path)
    return path


def build_word_level_qwen2(path) -> Path:
    """A tiny random Qwen2 beside a word-level tokenizer that encodes text to nothing; returns the folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_word_level_tokenizer()
    config = Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    _seeded(Qwen2ForCausalLM, config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def _seeded(model_class, config):
    """The model with seed-0 random weights. A private generator would not reach the layers' own init: seed the
    global one and restore it after."""
    import torch

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        return model_class(config)
    finally:
        torch.random.set_rng_state(state)


if __name__ == "__main__":
    import sys

    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else "tiny-model"))
