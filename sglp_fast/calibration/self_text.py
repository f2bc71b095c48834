"""Text the model writes itself: token windows sampled from the dense model, for fitting compensation maps.

Why: a least-squares map fitted on one kind of text (the user's calibration text) learns that kind's
corrections and can hurt on any other (docs/quality.md, round 7). The model's own samples are the widest
text it knows (the "self-calibration" of Williams et al., 2024, arXiv 2410.17170); fitted on them too, the
maps keep what the removed blocks did in general, not only on the calibration text.

Sampling: plain ancestral sampling (temperature 1, no top-k/top-p: the model's own distribution) from the
model's start token, with a key-value cache. Window i draws its tokens from its own random stream
(Gumbel-max with a generator seeded by (seed, i)), so a window is the same whatever the batch it is sampled in
and whichever rank of a data-parallel run samples it. A window is [start token, the next seq_len - 1 samples].
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch

from ..checks import check_int

_SEED_STRIDE = 1_000_003  # window i of seed s draws from generator seed s * stride + i
SAMPLING_TOKENS = 4096  # windows x length sampled in one batch: the default's 16 x 256, whatever the length


def sampling_batch(length: int) -> int:
    """Windows of ``length`` tokens sampled together: at least 16, and as many as hold ``SAMPLING_TOKENS``.

    Why: a sampling step reads every weight of the model for one token per window, so its time hardly grows
    with the batch (SmolLM2 on 2 CPU cores: 239 ms at 16 windows, 412 ms at 64); shorter windows in a wider
    batch take fewer steps for the same tokens, and for windows of up to 256 tokens the key-value cache
    holds no more than 16 x 256 tokens'.
    """
    check_int("length", length, 1)
    return max(16, SAMPLING_TOKENS // length)


def start_token(model: Any, tokenizer: Any = None) -> int:
    """The token a sample starts from: the tokenizer's BOS, else the config's BOS, else an EOS; one the
    model's embedding has (a tiny test model may name GPT-2's 50256 with 97 embeddings)."""
    vocab = _vocab_size(model)
    config = getattr(model, "config", None)
    for owner, name in ((tokenizer, "bos_token_id"), (config, "bos_token_id"), (config, "eos_token_id"),
                        (tokenizer, "eos_token_id")):
        value = getattr(owner, name, None) if owner is not None else None
        if isinstance(value, Sequence) and not isinstance(value, str):
            value = value[0] if value else None
        if isinstance(value, int) and 0 <= value and (vocab is None or value < vocab):
            return value
    raise ValueError("self_fit_windows: the model has no BOS or EOS token in its vocabulary to start its samples "
                     "from; use --fit-windows with text instead of --self-fit-windows")


def _vocab_size(model: Any) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows) if rows is not None else getattr(getattr(model, "config", None), "vocab_size", None)


@torch.no_grad()
def sample_windows(model: Any, indices: Sequence[int], seq_len: int, *, start: int, seed: int = 0,
                   batch: int = 16) -> torch.Tensor:
    """int64 [len(indices), seq_len] windows sampled from ``model`` (a causal LM with a KV cache), window
    ``indices[j]`` in row j, on the CPU. Runs where the model's weights are."""
    check_int("seq_len", seq_len, 1)
    check_int("batch", batch, 1)
    indices = [int(i) for i in indices]
    out = torch.empty(len(indices), seq_len, dtype=torch.long)
    if not indices:
        return out
    device = next(model.parameters()).device
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(indices), batch):
            rows = indices[lo:lo + batch]
            streams = [torch.Generator().manual_seed(seed * _SEED_STRIDE + i) for i in rows]
            token = torch.full((len(rows), 1), start, dtype=torch.long, device=device)
            out[lo:lo + len(rows), 0] = start
            past = None
            for t in range(1, seq_len):
                step = model(input_ids=token, use_cache=True, **{cache_arg: past})
                past = getattr(step, cache_arg)
                logits = step.logits[:, -1].float()
                token = (logits + _gumbel(streams, logits.shape[-1]).to(device)).argmax(-1, keepdim=True)
                out[lo:lo + len(rows), t] = token[:, 0].cpu()
            del past
    finally:
        model.train(was_training)
    return out


def _gumbel(streams: list[torch.Generator], vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [rows, vocab], row r from ``streams[r]``: argmax(logits + noise) samples softmax."""
    tiny = torch.finfo(torch.float32).tiny
    u = torch.stack([torch.rand(vocab, generator=g) for g in streams]).clamp_(min=tiny)
    return -torch.log(-torch.log(u))
