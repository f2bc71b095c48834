"""Tiny random models WITH a real (tiny, trained on the fly) tokenizer, saved like a hub checkpoint.

The pipeline tests need what a user has: a model directory holding config, safetensors weights and a
tokenizer. The tokenizer is a byte-level BPE with a few hundred tokens trained on the built-in text, so the
whole chain (text -> windows -> calibration -> plan -> pruned model -> reload -> generate) runs in seconds.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sglp_fast.calibration.text import builtin_text

TOKENIZER_VOCAB = 320


@functools.lru_cache(maxsize=1)
def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([builtin_text("calib")[:60000]], trainer)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", model_max_length=64)


def tiny_config(family: str, layers: int = 6):
    vocab = len(tiny_tokenizer())
    if family == "llama":
        return tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                              num_key_value_heads=2, num_hidden_layers=layers, max_position_embeddings=128,
                              eos_token_id=0, bos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_head=4, n_layer=layers, n_positions=128,
                             eos_token_id=0, bos_token_id=0)
    if family == "qwen2":
        return tf.Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                              num_key_value_heads=2, num_hidden_layers=layers, max_position_embeddings=128,
                              use_sliding_window=True, sliding_window=8, max_window_layers=2,
                              eos_token_id=0, bos_token_id=0)
    if family == "bert":
        return tf.BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                             num_hidden_layers=layers, max_position_embeddings=128, architectures=["BertModel"])
    raise KeyError(family)


def tiny_model(family: str = "llama", layers: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    if family == "bert":
        return tf.BertModel(tiny_config(family, layers), add_pooling_layer=False).eval()
    return tf.AutoModelForCausalLM.from_config(tiny_config(family, layers)).eval()


def save_tiny(directory: Path, family: str = "llama", layers: int = 6, seed: int = 0) -> Path:
    """A model directory as a user would have it: config.json, model.safetensors, tokenizer files."""
    model = tiny_model(family, layers, seed)
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return Path(directory)


@contextlib.contextmanager
def single_thread():
    """Tiny models run fastest on one thread; on a shared 2-core box, more threads only spin and wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    with single_thread():
        yield
