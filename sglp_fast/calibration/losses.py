"""The calibration loss and the layer-wise (top-down) backward that yields GradNorm.

Loss, summed over batches: ``L = Σ_b S_b / N`` where ``S_b`` is batch b's summed per-target loss and ``N``
the number of targets over all batches. Because every batch's ``S_b / N`` is backpropagated separately and
gradients add, the per-parameter gradient equals the full-model gradient of that single scalar.

* causal LM: next-token cross entropy; target t+1 counts when both t and t+1 are real tokens
  (``attention_mask``), so left and right padding are both handled.
* encoder with a masked-LM head: the MLM head's cross entropy for every real token on the *unmasked* input
  (BERT's pre-training already asks the head to reproduce unchanged tokens; no [MASK] id is needed, the
  layers' inputs stay the clean text the similarity statistics see).
* encoder without a head (sentence-embedding models): the proxy ``‖mean_pool(h_L)‖² / d`` per sequence,
  averaged over sequences (mean pool over real tokens) - the energy of the pooled embedding the model exists
  to produce; differentiable, batch-separable, no labels.

Backward walk: given dL/dh_L per batch, for l = L-1..0: recompute block l's forward from its cached input
with grad on, backpropagate the incoming gradient, accumulate the parameters' gradients over batches, pass
dL/dh_l down. Memory: one block, its gradients and one batch's autograd graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def token_mask(batch: dict) -> torch.Tensor:
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)


def loss_kind(adapter) -> str:
    if adapter.kind == "causal_lm":
        return "next_token_ce"
    return "mlm_reconstruction_ce" if adapter.has_lm_head() else "pooled_energy"


def loss_count(kind: str, batch: dict) -> int:
    """How many terms batch ``batch`` adds to the loss's denominator N."""
    mask = token_mask(batch)
    if kind == "next_token_ce":
        return int((mask[:, 1:] & mask[:, :-1]).sum())
    if kind == "mlm_reconstruction_ce":
        return int(mask.sum())
    return int(mask.shape[0])


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged (the float64 reference path stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def loss_sum(kind: str, output, batch: dict) -> torch.Tensor:
    """Batch ``batch``'s summed loss terms (fp32 scalar) from the model's output."""
    ids = batch["input_ids"]
    mask = token_mask(batch).to(ids.device)
    if kind == "next_token_ce":
        logits = at_least_fp32(output.logits[:, :-1])
        valid = mask[:, 1:] & mask[:, :-1]
        if bool(valid.all()):  # no padding: the same rows in the same order, without a copy of the logits
            rows = logits.reshape(-1, logits.shape[-1])
            return F.cross_entropy(rows, ids[:, 1:].reshape(-1), reduction="sum")
        return F.cross_entropy(logits[valid], ids[:, 1:][valid], reduction="sum")
    if kind == "mlm_reconstruction_ce":
        logits = at_least_fp32(output.logits)
        return F.cross_entropy(logits[mask], ids[mask], reduction="sum")
    hidden = at_least_fp32(last_hidden(output))
    pooled = mean_pooled(hidden, mask)
    return (pooled.pow(2).sum(-1) / hidden.shape[-1]).sum()


def last_hidden(output) -> torch.Tensor:
    return output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens of each sequence (the sentence embedding of mean-pooling encoders)."""
    w = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


def embedding_distortion_sum(output, dense_pooled: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum over sequences of 1 - cos(pooled embedding, the dense model's pooled embedding).

    Why: for an encoder without a head the pooled-energy proxy gives GradNorm a gradient, but it is not a
    quality to minimize (a pruned model that shrinks its embeddings would "win"); a plan is judged by how far
    it moves the sentence embeddings the model exists to produce. Same count of terms (one per sequence).
    """
    mask = token_mask(batch).to(dense_pooled.device)
    pooled = mean_pooled(at_least_fp32(last_hidden(output)), mask)
    return (1.0 - F.cosine_similarity(pooled, at_least_fp32(dense_pooled), dim=-1)).sum()


class BlockGradStats:
    """Accumulates one block's parameter statistics after its gradients are complete (float64)."""

    def __init__(self):
        self.param_grad_norms: dict[str, float] = {}

    def record(self, prefix: str, named_params) -> tuple[float, float, float]:
        g2 = w2 = taylor = 0.0
        for name, p in named_params:
            w = p.detach().double()
            g = p.grad.double() if p.grad is not None else torch.zeros_like(w)
            gn2 = float(g.pow(2).sum())
            self.param_grad_norms[prefix + name] = gn2**0.5
            g2 += gn2
            w2 += float(w.pow(2).sum())
            taylor += float((w * g).abs().sum())
        return g2**0.5, w2**0.5, taylor
