"""Tiny random-init HF models of every supported family, and calibration batches with awkward shapes."""
from __future__ import annotations

import numpy as np
import torch
import transformers as tf

from sglp_fast.models import get_adapter

VOCAB = 97


def tiny_config(family: str, layers: int = 3):
    common = dict(vocab_size=VOCAB, num_hidden_layers=layers)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, **common)
    if family == "qwen2":  # sliding-window layers above max_window_layers: per-layer masks and layer_types
        return tf.Qwen2Config(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64, use_sliding_window=True, sliding_window=4,
                              max_window_layers=1, **common)
    if family == "gemma2":
        return tf.Gemma2Config(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=8, max_position_embeddings=64, sliding_window=4, **common)
    if family in ("mistral", "qwen3", "phi3", "gemma"):  # the rest of the llama family (model.layers + rotary)
        cls = {"mistral": tf.MistralConfig, "qwen3": tf.Qwen3Config, "phi3": tf.Phi3Config, "gemma": tf.GemmaConfig}[family]
        extra = {"head_dim": 8} if family in ("qwen3", "gemma") else {}
        return cls(hidden_size=32, intermediate_size=40, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, **extra, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_head=4, n_positions=64, n_layer=layers, vocab_size=VOCAB)
    if family == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=40, num_attention_heads=4, max_position_embeddings=64,
                            word_embed_proj_dim=32, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, intermediate_size=40, num_attention_heads=4,
                                max_position_embeddings=64, rotary_pct=0.5, **common)
    if family in ("bert", "bert_mlm"):
        return tf.BertConfig(hidden_size=32, intermediate_size=40, num_attention_heads=4, max_position_embeddings=64,
                             **common)
    raise KeyError(family)


FAMILIES = ("llama", "qwen2", "gemma2", "gpt2", "opt", "gpt_neox", "bert", "bert_mlm")
CAUSAL = ("llama", "qwen2", "gemma2", "gpt2", "opt", "gpt_neox")


def tiny_model(family: str, layers: int = 3, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = tiny_config(family, layers)
    if family == "bert":
        model = tf.BertModel(cfg, add_pooling_layer=False)
    elif family == "bert_mlm":
        model = tf.BertForMaskedLM(cfg)
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype).eval()


def tiny_batches(family: str, seed: int = 1, shapes=((1, 17), (3, 5), (2, 9))):
    """Batches of different shapes; the last one padded (left for decoders, right for encoders)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (b, s) in enumerate(shapes):
        ids = torch.randint(0, VOCAB, (b, s), generator=g)
        batch = {"input_ids": ids}
        if i == len(shapes) - 1 and b > 1:
            mask = torch.ones(b, s, dtype=torch.long)
            if family.startswith("bert"):
                mask[0, s - 3 :] = 0
            else:
                mask[0, :3] = 0
            batch["attention_mask"] = mask
        out.append(batch)
    return out


def reference_loss(model, family: str, batches):
    """The calibration loss written independently of sglp_fast (per-sequence loops), with autograd graph.

    Returns (loss, block_outputs) where block_outputs[l][b] is block l's output on batch b, recorded by
    forward hooks during the full model's ordinary forward.
    """
    blocks = get_adapter(model).blocks
    outputs = [[] for _ in blocks]
    hooks = [blk.register_forward_hook(lambda m, a, o, l=l: outputs[l].append(o[0] if isinstance(o, tuple) else o))
             for l, blk in enumerate(blocks)]
    total, terms = 0.0, 0
    try:
        for batch in batches:
            kwargs = dict(batch)
            if not family.startswith("bert"):
                kwargs["use_cache"] = False
            out = model(**kwargs)
            ids = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
            for i in range(ids.shape[0]):
                real = mask[i]
                if family == "bert":
                    h = out.last_hidden_state[i][real]
                    pooled = h.mean(0)
                    total = total + pooled.pow(2).sum() / h.shape[-1]
                    terms += 1
                elif family == "bert_mlm":
                    logp = torch.log_softmax(out.logits[i][real], -1)
                    total = total - logp.gather(1, ids[i][real][:, None]).sum()
                    terms += int(real.sum())
                else:
                    logp = torch.log_softmax(out.logits[i], -1)
                    for t in range(ids.shape[1] - 1):
                        if real[t] and real[t + 1]:
                            total = total - logp[t, ids[i, t + 1]]
                            terms += 1
    finally:
        for h in hooks:
            h.remove()
    return total / terms, outputs


def reference_block_grads(model, family: str, batches):
    """(loss, per-block grad norm, per-block weight norm, per-block Σ|W·∇W|, {name: grad norm}) by full autograd."""
    adapter = get_adapter(model)
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    loss, _ = reference_loss(model, family, batches)
    loss.backward()
    gn, wn, ty, per = [], [], [], {}
    for l, blk in enumerate(adapter.blocks):
        g2 = w2 = t = 0.0
        for name, p in blk.named_parameters():
            g = p.grad.double() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
            per[adapter.block_prefix(l) + name] = float(g.norm())
            g2 += float(g.pow(2).sum())
            w2 += float(p.detach().double().pow(2).sum())
            t += float((p.detach().double() * g).abs().sum())
        gn.append(g2**0.5)
        wn.append(w2**0.5)
        ty.append(t)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    return float(loss.detach()), gn, wn, ty, per


class RecordingObserver:
    """Keeps a copy of every (layer, batch) input/output it is shown, and the call order."""

    def __init__(self):
        self.inputs, self.outputs, self.masks, self.order = {}, {}, {}, []

    def observe(self, layer, block_input, block_output, batch_id, mask):
        self.order.append((layer, batch_id))
        self.inputs[(layer, batch_id)] = block_input.detach().clone()
        self.outputs[(layer, batch_id)] = block_output.detach().clone()
        self.masks[(layer, batch_id)] = None if mask is None else mask.clone()


def calibrate_recorded(model, batches, **kw):
    """(calibrate's result, a RecordingObserver that saw the pass), without progress output."""
    from sglp_fast.calibration.runtime import calibrate
    rec = RecordingObserver()
    return calibrate(model, batches, observers=[rec], progress=False, **kw), rec


def rel(a, b) -> float:
    """Relative Frobenius error ‖a-b‖/‖b‖ in float64."""
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    b = b.detach().double().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))
