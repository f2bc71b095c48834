"""Write a Llama-3-70B-shaped checkpoint with N blocks of random bf16 weights (scale tests without a download).

    python benchmarks/make_synthetic.py OUT --blocks 8                 # 70B shapes: 1.7 GB a block, 4.2 GB embed+head
    python benchmarks/make_synthetic.py OUT --blocks 2 --shape tiny    # the same layout at test size

Shapes ("70b"): hidden 8192, intermediate 28672, 64 heads, 8 KV heads, head_dim 128, vocab 128256, RoPE theta
500000, RMSNorm eps 1e-5, untied head. Weights are N(0, 1/fan_in) per projection (the output projections of
attention and MLP further scaled by 1/sqrt(2 x blocks)), norms 1, embeddings N(0, 1): the residual stream's
scale grows slowly with depth, so activations stay finite in bf16 through any number of blocks. Every tensor
is drawn from its own generator seeded by (seed, tensor name), so the bytes do not depend on the shard size or
on the order of writing: the same seed gives the same files. Sharded safetensors (at most --shard-bytes each,
default 5 GB) with model.safetensors.index.json, config.json and a small byte-level BPE tokenizer (trained on
the built-in calibration text; its vocabulary is a prefix of the model's, as for any model whose tokenizer is
smaller than its embedding).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES = {
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                head_dim=128, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=224, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 vocab_size=512),
}


def config_for(shape: str, blocks: int):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], num_hidden_layers=blocks, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, tie_word_embeddings=False, torch_dtype="bfloat16",
                       bos_token_id=0, eos_token_id=0, architectures=["LlamaForCausalLM"])


def tensor_specs(cfg) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) of every tensor, in the order transformers names them (std 0: a norm, all ones)."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    out_scale = 1.0 / math.sqrt(2 * L)
    specs = [("model.embed_tokens.weight", (cfg.vocab_size, d), 1.0)]
    for i in range(L):
        p = f"model.layers.{i}."
        specs += [(p + "input_layernorm.weight", (d,), 0.0),
                  (p + "self_attn.q_proj.weight", (q, d), d ** -0.5),
                  (p + "self_attn.k_proj.weight", (kv, d), d ** -0.5),
                  (p + "self_attn.v_proj.weight", (kv, d), d ** -0.5),
                  (p + "self_attn.o_proj.weight", (d, q), q ** -0.5 * out_scale),
                  (p + "post_attention_layernorm.weight", (d,), 0.0),
                  (p + "mlp.gate_proj.weight", (f, d), d ** -0.5),
                  (p + "mlp.up_proj.weight", (f, d), d ** -0.5),
                  (p + "mlp.down_proj.weight", (d, f), f ** -0.5 * out_scale)]
    specs += [("model.norm.weight", (d,), 0.0), ("lm_head.weight", (cfg.vocab_size, d), d ** -0.5)]
    return specs


def make_tensor(name: str, shape: tuple[int, ...], std: float, seed: int, device: str = "cpu") -> torch.Tensor:
    """One bf16 tensor (on the CPU) from its own generator (seed, name); drawn in row chunks to bound the fp32
    scratch. ``device``: where the numbers are drawn: one CPU generator took 114 s for a 16-block 70B-shaped
    checkpoint on the H200 machine (benchmarks/results/scale_gpu.md); "cuda" draws them on the GPU (not yet
    timed), other numbers than the CPU's, as deterministic (same seed, same kind of device: same files)."""
    if std == 0.0:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(
        int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    out = torch.empty(shape, dtype=torch.bfloat16)
    rows = max(1, (64 << 20) // (4 * math.prod(shape[1:])))  # 64 MiB of fp32 at a time
    for start in range(0, shape[0], rows):
        chunk = torch.randn((min(rows, shape[0] - start), *shape[1:]), generator=g, device=device)
        out[start:start + chunk.shape[0]] = chunk.mul_(std).to(torch.bfloat16).cpu()
    return out


def make_tokenizer(directory: Path) -> None:
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from sglp_fast.calibration.text import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<|end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([builtin_text("calib")[:60000]], trainer)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end|>", bos_token="<|end|>",
                                      model_max_length=8192)
    fast.save_pretrained(directory)


def write_checkpoint(out: str | os.PathLike, blocks: int, shape: str = "70b", seed: int = 0,
                     shard_bytes: int = 5 * 10**9, log=print, device: str = "cpu") -> dict:
    """Write the checkpoint into ``out`` (created; must be empty); returns sizes and timings. ``device``:
    where the random numbers are drawn (``make_tensor``)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"out: {str(out)!r} is not empty; pass a new folder")
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_for(shape, blocks)
    t0 = time.perf_counter()
    weight_map: dict[str, str] = {}
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    total = 0
    files: list[str] = []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], out / name, metadata={"format": "pt"})
        files.append(name)
        for key in shards[-1]:
            weight_map[key] = name
        log(f"  wrote {name}: {sizes[-1] / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)")
        shards[-1] = {}
        sizes[-1] = 0

    for name, tshape, std in tensor_specs(cfg):
        t = make_tensor(name, tshape, std, seed, device)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + nbytes > shard_bytes:
            flush()
        shards[-1][name] = t
        sizes[-1] += nbytes
        total += nbytes
    flush()
    final = {}
    for i, name in enumerate(files):  # the usual names: model-0000i-of-0000n.safetensors
        new = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(out / name, out / new)
        final[name] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in sorted(weight_map.items())}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    cfg.save_pretrained(out)
    make_tokenizer(out)
    return {"blocks": blocks, "shape": shape, "bytes": total, "shards": len(files), "drawn_on": device,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="new folder for the checkpoint")
    ap.add_argument("--blocks", type=int, required=True, help="number of transformer blocks")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="70b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-bytes", type=float, default=5e9, help="largest shard, bytes (default 5e9)")
    ap.add_argument("--device", default="cpu",
                    help="where the random numbers are drawn (cuda: fast; other numbers than the CPU's)")
    args = ap.parse_args(argv)
    info = write_checkpoint(args.out, args.blocks, args.shape, args.seed, int(args.shard_bytes),
                            device=args.device)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
