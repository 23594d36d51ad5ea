"""attnlab core: one fast GPT that every paper script builds on.

Config (a dataclass whose fields generate the CLI), the GPT model in two families (GPT-2: LayerNorm, GELU, learned
positions, tied head; Llama: RMSNorm, SwiGLU, RoPE, untied head), the Attention base class (project -> attend ->
output projection) with an eager reference and fast paths (SDPA, FlexAttention, flash-attn), the data loader, the
train loop (bf16, torch.compile, DDP, grad accumulation, atomic checkpoints, bit-exact resume), eval, sampling,
MFU accounting, plots and the command line shared by all scripts.

    python core.py --train --preset tiny --device cpu --max-iters 50      # baseline GPT on the embedded dataset
    torchrun --nproc_per_node=2 core.py --train --preset 124m --data data/docs
"""
import argparse
import contextlib
import dataclasses
import glob
import itertools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # optional fast path
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

try:  # the papers' fused kernels (cogformer, sparse_byte); without it they fall back to FlexAttention
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (tests)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(HERE, "assets", "python_tutorial.txt")  # embedded default dataset (PSF licence)


class ConfigError(ValueError):
    """A user mistake: reported as one line and a non-zero exit, never a traceback."""


def opt(default, help):
    return field(default=default, metadata={"help": help})


# ----------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class Config:
    # model
    family: str = opt("gpt2", "gpt2 (LayerNorm, GELU, learned positions, tied head) or llama (RMSNorm, SwiGLU, RoPE)")
    n_layer: int = opt(12, "number of transformer blocks")
    n_head: int = opt(12, "attention heads per block")
    n_embd: int = opt(768, "model width C")
    block_size: int = opt(1024, "context length T")
    vocab_size: int = opt(0, "vocabulary size (0: from the dataset's meta.json, padded to a multiple of 64)")
    mlp_hidden: int = opt(0, "MLP hidden width (0: 4C for gpt2, 8C/3 rounded up to 64 for llama)")
    bias: bool = opt(False, "biases in Linear and LayerNorm (gpt2 family only)")
    dropout: float = opt(0.0, "dropout probability")
    norm_eps: float = opt(1e-5, "epsilon of LayerNorm / RMSNorm")
    rope_theta: float = opt(10000.0, "RoPE base (llama family)")
    attn_impl: str = opt("auto", "attention path: auto (fastest available), eager (reference), sdpa, flex, flash")
    variant: str = opt("", "model variant (paper scripts; see --help of the script)")
    # data and run
    data: str = opt("", "dataset directory made by prepare.py ('' = the embedded Python tutorial, bytes)")
    out: str = opt("runs/default", "output directory: ckpt.pt, log.jsonl, run.json, plots")
    device: str = opt("auto", "auto, cpu or cuda")
    dtype: str = opt("auto", "auto (bfloat16 on GPU, float32 on CPU), float32 or bfloat16")
    compile: bool = opt(True, "torch.compile the model (GPU only)")
    seed: int = opt(1337, "seed for init, data order and dropout")
    # optimisation
    batch_size: int = opt(16, "micro-batch size per process")
    grad_accum: int = opt(1, "micro-batches per optimizer step (per process)")
    max_iters: int = opt(5000, "optimizer steps")
    lr: float = opt(6e-4, "peak learning rate")
    min_lr: float = opt(6e-5, "final learning rate")
    warmup_iters: int = opt(200, "linear warm-up steps")
    lr_decay_iters: int = opt(0, "steps of the decay (0: max_iters); training may stop before the end")
    schedule: str = opt("cosine", "cosine (warm-up then cosine) or wsd (warm-up, constant, linear cool-down)")
    cooldown_frac: float = opt(0.2, "wsd: fraction of lr_decay_iters spent cooling down")
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices and embeddings only)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip gradients to this global norm (0: off)")
    # eval and logging
    eval_interval: int = opt(250, "evaluate and checkpoint every N steps")
    eval_iters: int = opt(20, "val batches per evaluation")
    eval_tokens: int = opt(0, "--eval: val tokens to score (0: the whole split)")
    log_interval: int = opt(10, "print and log every N steps")
    resume: bool = opt(False, "continue from <out>/ckpt.pt")
    init_from: str = opt("", "start from a checkpoint (ours or the paper's published format)")
    wandb: bool = opt(False, "log to Weights & Biases (if installed)")

    PRESETS = {
        "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=8, max_iters=100, lr=1e-3,
                     min_lr=1e-4, warmup_iters=10, eval_interval=50, eval_iters=4, log_interval=10),
        "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16),
    }
    VARIANTS = ()
    # fields that describe a run, not a model: --init-from keeps the checkpoint's model fields, not these
    RUN_FIELDS = ("data", "out", "device", "dtype", "compile", "seed", "batch_size", "grad_accum", "max_iters", "lr",
                  "min_lr", "warmup_iters", "lr_decay_iters", "schedule", "cooldown_frac", "weight_decay", "beta1",
                  "beta2", "grad_clip", "eval_interval", "eval_iters", "eval_tokens", "log_interval", "resume",
                  "init_from", "wandb")
    ATTN_IMPLS = ("auto", "eager", "sdpa", "flex", "flash")

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ConfigError(msg)
        check(self.family in ("gpt2", "llama"), f"--family must be gpt2 or llama, not {self.family!r}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval",
                     "eval_iters", "log_interval"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        check(self.max_iters >= 0, "--max-iters must be >= 0")
        check(self.n_embd % self.n_head == 0,
              f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        check(self.family == "gpt2" or (self.n_embd // self.n_head) % 2 == 0, "RoPE needs an even head dim")
        check(self.attn_impl in self.ATTN_IMPLS,
              f"--attn-impl must be one of {', '.join(self.ATTN_IMPLS)}, not {self.attn_impl!r}")
        if self.VARIANTS:
            self.variant = self.variant or self.VARIANTS[0]
            check(self.variant in self.VARIANTS,
                  f"--variant must be one of {', '.join(self.VARIANTS)}, not {self.variant!r}")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
              f"--device must be auto, cpu or cuda, not {self.device!r}")
        check(self.dtype in ("auto", "float32", "bfloat16"), "--dtype must be auto, float32 or bfloat16")
        check(self.schedule in ("cosine", "wsd"), "--schedule must be cosine or wsd")
        check(0 <= self.dropout < 1, "--dropout must be in [0, 1)")
        check(self.lr > 0 and 0 <= self.min_lr <= self.lr, "need 0 < lr and 0 <= min_lr <= lr")
        check(self.warmup_iters >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
              "--warmup-iters, --weight-decay and --grad-clip must be >= 0")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def hidden(self):
        if self.mlp_hidden:
            return self.mlp_hidden
        return 4 * self.n_embd if self.family == "gpt2" else 64 * math.ceil(8 * self.n_embd / 3 / 64)


def field_names(cfg_cls):
    return {f.name for f in dataclasses.fields(cfg_cls)}


# ----------------------------------------------------------------------------------------------------------------
# Attention

@dataclass
class Ctx:
    """What crosses layers in one forward (no globals)."""
    x0: torch.Tensor = None  # embedding output (B, T, C)
    rope: tuple = None       # (cos, sin), each (T, D/2) in fp32, llama family
    doc: torch.Tensor = None  # (B, T) document ids: attention stays inside a document
    record: object = None    # record(layer, probs): eager attention reports its probabilities (B, H, T, S)
    layers: list = field(default_factory=list)  # per-layer slots for later layers (reflex K/V, Exo anchors)
    cache: dict = field(default_factory=dict)   # e.g. block masks built once per forward


def split_heads(x, H):
    B, T, C = x.shape
    return x.view(B, T, H, C // H).transpose(1, 2)  # (B, H, T, D)


def merge_heads(y):
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)  # (B, T, C)


def rope_tables(T, D, theta, device):
    inv_freq = theta ** (-torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)  # (T, D/2)
    return freqs.cos(), freqs.sin()


def apply_rope(x, cos, sin):
    """Half-split (rotate_half) RoPE on (B, H, T, D); pairs are (i, i + D/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


def causal_mask(T, S, doc=None, device=None):
    """Bool mask (1|B, 1, T, S), True = attend. Causal, aligned bottom-right: query i sees keys j <= i + S - T."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    mask = (j <= i + (S - T))[None, None]
    if doc is not None:  # same document (S == T)
        mask = mask & (doc[:, None, :, None] == doc[:, None, None, :])
    return mask


def flex_block_mask(ctx, mask_mod, B, H, T, S, key="causal", device=None):
    """A FlexAttention BlockMask built once per forward and shared by every layer. The document mask is built in
    GPT.context, before the layers: a layer then only reads it, and its compiled graph has no break in it."""
    if key not in ctx.cache:
        ctx.cache[key] = build_block_mask(mask_mod, B, H, T, S, device or ctx.x0.device)
    return ctx.cache[key]


@torch.compiler.disable  # built eagerly, outside the compiled graph: masks built inside it crashed on the H200
def build_block_mask(mask_mod, B, H, T, S, device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(mask_mod, B, H, T, S, device=device)


def flex_attention(q, k, v, **kw):
    """FlexAttention, compiled: called eagerly, the uncompiled op would materialise the T x T scores."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return flex(q, k, v, **kw)
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex, dynamic=False)
    return _flex_compiled(q, k, v, **kw)


_flex_compiled = None


def doc_causal_mask_mod(ctx):
    doc = ctx.doc

    def mask_mod(b, h, q_idx, kv_idx):
        causal = q_idx >= kv_idx
        return causal if doc is None else causal & (doc[b, q_idx] == doc[b, kv_idx])
    return mask_mod


class Attention(nn.Module):
    """Causal self-attention: project (q, k, v) -> attend -> output projection.

    A paper subclasses this and overrides the fewest methods: usually attend_eager (its math, the reference) and one
    attend_<impl> fast path. attn_impl 'auto' uses FAST on GPU and FAST_CPU on CPU.
    """
    FAST, FAST_CPU = "sdpa", "sdpa"

    def __init__(self, cfg, layer):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        bias = cfg.bias and cfg.family == "gpt2"
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=bias)  # rows: q, k, v blocks, head-major
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=bias)
        self.dropout = cfg.dropout

    def forward(self, x, ctx):
        q, k, v = self.project(x, ctx)
        y = self.attend(q, k, v, ctx)  # (B, H, T, D)
        return self.c_proj(merge_heads(y))

    def project(self, x, ctx):
        return self.split_qkv(self.c_attn(x), ctx)

    def split_qkv(self, qkv, ctx):
        """c_attn's output (B, T, 3C) -> q, k, v (B, H, T, D) each, RoPE on q and k (llama family)."""
        q, k, v = (split_heads(t, self.n_head) for t in qkv.chunk(3, dim=-1))
        if ctx.rope is not None:
            q, k = apply_rope(q, *ctx.rope), apply_rope(k, *ctx.rope)
        return q, k, v

    def impl(self, device):
        impl = self.cfg.attn_impl
        if impl == "auto":
            impl = self.FAST if device.type == "cuda" else self.FAST_CPU
        return impl

    def attend(self, q, k, v, ctx):
        impl = "eager" if ctx.record is not None else self.impl(q.device)
        return getattr(self, "attend_" + impl)(q, k, v, ctx)

    def attend_eager(self, q, k, v, ctx):
        """The reference: materialises the (T, S) scores; reports probabilities when recording."""
        T, S = q.size(-2), k.size(-2)
        att = (q @ k.transpose(-2, -1)).float() * (1.0 / math.sqrt(q.size(-1)))  # (B, H, T, S)
        att = att.masked_fill(~self.eager_mask(T, S, ctx, q.device), float("-inf")).softmax(dim=-1)
        if ctx.record is not None:
            ctx.record(self.layer, att)
        att = F.dropout(att, self.dropout, self.training)
        return att.type_as(v) @ v

    def eager_mask(self, T, S, ctx, device):
        """Bool (1|B, 1|H, T, S) mask of the eager path; a variant with another pattern overrides this."""
        return causal_mask(T, S, ctx.doc, device)

    def attend_sdpa(self, q, k, v, ctx):
        if ctx.doc is not None:  # SDPA has no document mask: FlexAttention does it without a T x T tensor
            return self.attend_flex(q, k, v, ctx)
        drop = self.dropout if self.training else 0.0
        return F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)

    def attend_flex(self, q, k, v, ctx):
        B, H, T, _ = q.shape
        mask = flex_block_mask(ctx, doc_causal_mask_mod(ctx), B if ctx.doc is not None else None, None, T, T)
        return flex_attention(q, k, v, block_mask=mask)

    def attend_flash(self, q, k, v, ctx):
        if flash_attn_func is None or ctx.doc is not None or q.dtype == torch.float32:
            warn_once("flash-attn is not installed (or cannot run this input): using SDPA instead")
            return self.attend_sdpa(q, k, v, ctx)
        drop = self.dropout if self.training else 0.0
        y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=drop, causal=True)
        return y.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)


_warned = set()


def warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        print(f"warning: {msg}", file=sys.stderr)


# Shared plumbing of the papers' FlashAttention-2-style Triton kernels (cogformer, sparse_byte). Each kernel runs as
# a torch.library custom op: torch.compile treats it as an opaque call instead of tracing the autotuner (tracing it
# inside a whole-model graph failed in dynamo on torch 2.11).

def triton_ok(q):
    """A fused kernel's domain: head dim a power of two in 16..128, on GPU or in Triton's interpreter."""
    return (triton is not None and (q.is_cuda or TRITON_INTERPRET) and q.size(-1) in (16, 32, 64, 128)
            and q.dtype in (torch.float32, torch.float16, torch.bfloat16))


def triton_autotune(blocks, small, key):
    """Autotune over (BLOCK_M, BLOCK_N, warps, stages) candidates. The interpreter, and fp32 inputs (PREC 'ieee': the
    parity tests), take the small tile untuned: full-precision fp32 dots compile slowly and fill shared memory."""
    def cfg(m, n, w, s):
        return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
    configs = [cfg(*small)] if TRITON_INTERPRET else [cfg(*b) for b in blocks]
    return triton.autotune(configs=configs, key=key, prune_configs_by={
        "early_config_prune": lambda configs, named_args, **kw: [cfg(*small)] if kw["PREC"] == "ieee" else configs})


def triton_bucket(T):
    """The autotune key for T (the kernels ignore it): one tuning per power of two, not per length (sampling)."""
    return max(16, triton.next_power_of_2(T))


def triton_strides(*ts):
    return [s for t in ts for s in t.stride()[:3]]


def triton_scales(D):
    """(qk scale in log2 units: the kernels use exp2, softmax scale)."""
    return D ** -0.5 * math.log2(math.e), D ** -0.5


def triton_prec(q):
    return "ieee" if q.dtype == torch.float32 else "tf32"


def unit_stride(*ts):
    """The kernels index the head dim densely."""
    return [t if t.stride(-1) == 1 else t.contiguous() for t in ts]


def attn_outputs(q):
    """Empty (O, LSE) of a fused forward; O is laid out (B, T, H, D), so merge_heads after it is free."""
    B, H, T, D = q.shape
    o = torch.empty(B, T, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    return o, torch.empty(B, H, T, device=q.device, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Model

class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, Hd = cfg.n_embd, cfg.hidden
        self.llama = cfg.family == "llama"
        if self.llama:  # SwiGLU: w_down(silu(w_gate x) * w_up x)
            self.w_gate, self.w_up = nn.Linear(C, Hd, bias=False), nn.Linear(C, Hd, bias=False)
            self.w_down = nn.Linear(Hd, C, bias=False)
        else:
            self.c_fc, self.c_proj = nn.Linear(C, Hd, bias=cfg.bias), nn.Linear(Hd, C, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        if self.llama:
            return self.dropout(self.w_down(F.silu(self.w_gate(x)) * self.w_up(x)))
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


def make_norm(cfg):
    if cfg.family == "llama":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg, attn):
        super().__init__()
        self.norm_1, self.attn, self.norm_2, self.mlp = make_norm(cfg), attn, make_norm(cfg), MLP(cfg)

    def forward(self, x, ctx):
        x = x + self.attn(self.norm_1(x), ctx)
        return x + self.mlp(self.norm_2(x))


class GPT(nn.Module):
    """GPT-2 or Llama family decoder. make_attn(cfg, layer) picks each layer's attention module."""

    def __init__(self, cfg, make_attn=Attention):
        super().__init__()
        self.cfg = cfg
        C = cfg.n_embd
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, C),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList(Block(cfg, make_attn(cfg, i)) for i in range(cfg.n_layer)),
            norm_f=make_norm(cfg),
        ))
        if cfg.family == "gpt2":
            self.transformer.wpe = nn.Embedding(cfg.block_size, C)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        if cfg.family == "gpt2":
            self.lm_head.weight = self.transformer.wte.weight  # tied
        self.init_weights()

    def init_weights(self, std=0.02):
        """N(0, 0.02) for matrices and embeddings; residual output projections scaled by 1/sqrt(2L) (GPT-2)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith(("attn.c_proj.weight", "mlp.c_proj.weight", "mlp.w_down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))

    def context(self, idx, doc=None, record=None):
        ctx = Ctx(doc=doc, record=record)
        B, T = idx.shape
        if doc is not None and idx.is_cuda and self.cfg.attn_impl != "eager":  # the fast paths' document mask
            flex_block_mask(ctx, doc_causal_mask_mod(ctx), B, None, T, T, device=idx.device)
        if self.cfg.family == "llama":
            ctx.rope = rope_tables(T, self.cfg.head_dim, self.cfg.rope_theta, idx.device)
        return ctx

    def embed(self, idx, ctx):
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.cfg.family == "gpt2":
            x = x + self.transformer.wpe(torch.arange(idx.size(1), device=idx.device))
        return self.transformer.drop(x)

    def final(self, x, ctx):
        return self.transformer.norm_f(x)

    def loss_fn(self, logits, targets):
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def forward(self, idx, targets=None, doc=None, record=None):
        """idx (B, T) -> logits (B, T, V), or the mean cross-entropy when targets are given."""
        ctx = self.context(idx, doc, record)
        x = ctx.x0 = self.embed(idx, ctx)
        for block in self.transformer.h:
            x = block(x, ctx)
        logits = self.lm_head(self.final(x, ctx))
        return logits if targets is None else self.loss_fn(logits, targets)

    def num_params(self, compute_only=True):
        """Parameters; compute_only drops lookup-only tables (wpe, and wte when the head is untied)."""
        n = sum(p.numel() for p in self.parameters())
        if compute_only:
            n -= self.transformer.wpe.weight.numel() if "wpe" in self.transformer else 0
            n -= 0 if self.cfg.family == "gpt2" else self.transformer.wte.weight.numel()
        return n

    def flops_per_token(self):
        """Training FLOPs per token: 6N for the matmuls + 12·L·C·T for attention scores and values (fwd + bwd)."""
        c = self.cfg
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def configure_optimizers(self, cfg, device_type):
        """AdamW; matrices and embeddings (dim >= 2) decay, gains and biases do not. Groups carry base_lr."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=cfg.weight_decay),
                  dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device_type == "cuda")
        for g in opt.param_groups:
            g["base_lr"] = cfg.lr
        return [opt]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None):
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.block_size:])[:, -1, :] / max(temperature, 1e-6)
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            idx = torch.cat((idx, torch.multinomial(logits.softmax(-1), 1)), dim=1)
        return idx


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and data

R50K_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@dataclass
class Tokenizer:
    name: str
    encode: object  # str -> list[int] (no special tokens)
    decode: object  # list[int] -> str
    eot_token: int
    n_vocab: int


def get_tokenizer(name, path=None):
    """'bytes' or GPT-2 BPE: tiktoken's 'gpt2', or offline from a gpt2.tiktoken file (path or $ATTNLAB_TIKTOKEN)."""
    if name == "bytes":
        return Tokenizer("bytes", lambda s: list(s.encode("utf-8")),
                         lambda ids: bytes(ids).decode("utf-8", errors="replace"), None, 256)
    if name != "gpt2":
        raise ConfigError(f"unknown tokenizer {name!r}: use gpt2 or bytes")
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        raise ConfigError("the gpt2 tokenizer needs tiktoken: pip install tiktoken")
    path = path or os.environ.get("ATTNLAB_TIKTOKEN")
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"GPT-2 vocabulary file not found: {path}")
        enc = tiktoken.Encoding(name="gpt2", pat_str=R50K_PATTERN, mergeable_ranks=tiktoken.load.load_tiktoken_bpe(path),
                                special_tokens={"<|endoftext|>": 50256})
    else:
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no cache
            raise ConfigError(f"cannot load tiktoken's gpt2 vocabulary ({type(e).__name__}); offline, set "
                              "ATTNLAB_TIKTOKEN=/path/to/gpt2.tiktoken") from None
    return Tokenizer("gpt2", enc.encode_ordinary, enc.decode, enc.eot_token, enc.n_vocab)


SHARD_MAGIC, SHARD_HEADER = 20240520, 256  # llm.c shard: 256 int32 header (magic, version, count), uint16 tokens


def read_tokens(path, dtype):
    """Memory-map one token file: llm.c shard (detected by its magic) or plain .bin of `dtype`."""
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER) if os.path.getsize(path) >= 1024 else None
    if header is not None and header[0] == SHARD_MAGIC:
        if header[1] != 1:
            raise ConfigError(f"{path}: unsupported shard version {header[1]}")
        tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER * 4)
        if len(tokens) != header[2]:
            raise ConfigError(f"{path}: header says {header[2]} tokens, file holds {len(tokens)} (truncated?)")
        return tokens
    return np.memmap(path, dtype=dtype, mode="r")


class TokenData:
    """Token files of one dataset directory: <split>.bin or shards *<split>_NNNNNN.bin, plus meta.json.

    A batch is a pure function of (seed, split, step, index): resume is exact, and DDP rank r of W reads the
    micro-batches index = micro * W + r, so the global batch equals a single process's with grad_accum * W.
    """

    def __init__(self, path):
        if not os.path.isdir(path):
            raise ConfigError(f"dataset directory not found: {path} (make it with prepare.py)")
        meta_path = os.path.join(path, "meta.json")
        self.meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
        dtype = np.dtype(self.meta.get("dtype", "uint16"))
        self.splits = {}
        for split in ("train", "val", "test"):
            files = sorted(set(glob.glob(os.path.join(path, f"{split}.bin")) +
                               glob.glob(os.path.join(path, f"*{split}_[0-9]*.bin"))))
            if files:
                self.splits[split] = [read_tokens(f, dtype) for f in files]
        if "train" not in self.splits or "val" not in self.splits:
            raise ConfigError(f"{path} needs train and val token files (train.bin/val.bin or *_train_/*_val_ shards)")
        self.vocab_size = self.meta.get("vocab_size") or 50257
        self.path = path

    def tokens(self, split):
        return sum(len(s) for s in self.splits[split])

    def batch(self, split, B, T, seed, step, index=0, device="cpu"):
        shards = self.splits[split]
        room = np.array([max(len(s) - T - 1, 0) for s in shards], dtype=np.float64)
        if room.sum() == 0:
            raise ConfigError(f"the {split} split of {self.path} is shorter than block_size + 1 = {T + 1} tokens")
        rng = np.random.default_rng([seed, ("train", "val", "test").index(split), step, index])
        which = rng.choice(len(shards), size=B, p=room / room.sum())
        starts = [rng.integers(0, room[i] + 1) for i in which]
        xy = torch.from_numpy(np.stack([shards[i][s:s + T + 1].astype(np.int64) for i, s in zip(which, starts)]))
        xy = xy.to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def windows(self, split, T, max_tokens=0):
        """Non-overlapping (T+1)-token windows covering the split in order (for --eval)."""
        seen = 0
        for shard in self.splits[split]:
            for s in range(0, len(shard) - T - 1 + 1, T):
                if max_tokens and seen >= max_tokens:
                    return
                yield torch.from_numpy(shard[s:s + T + 1].astype(np.int64))
                seen += T


def default_dataset():
    """The embedded Python tutorial as bytes: a fresh clone trains with no download."""
    out = os.path.join(HERE, "data", "tutorial")
    if not os.path.exists(os.path.join(out, "meta.json")):
        import prepare
        prepare.prepare_text([DEFAULT_TEXT], out, tokenizer="bytes")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Devices, MFU, checkpoints

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(device):
    """Dense bf16 peak of the detected GPU (None on CPU or unknown GPUs: MFU is then 'n/a')."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def resolve_device(cfg):
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA GPU is available")
    return torch.device(cfg.device)


def autocast(device, cfg):
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def atomic(path, mode="wb"):
    """Write path.tmp and rename it to path only when the block completes: a crash never leaves a valid-looking file."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, mode) as f:
        yield f
    os.replace(tmp, path)


def save_checkpoint(path, obj):
    """Atomic: a temporary file renamed over the old checkpoint."""
    with atomic(path) as f:
        torch.save(obj, f)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # older pickles (e.g. numpy scalars in a published config) need the full unpickler
        return torch.load(path, map_location="cpu", weights_only=False)


def strip_prefix(state, prefix="_orig_mod."):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def config_from_dict(cfg_cls, d, **overrides):
    names = field_names(cfg_cls)
    return cfg_cls(**{**{k: v for k, v in d.items() if k in names}, **overrides})


def load_ours(path, cfg_cls, build_model, device="cpu"):
    """Our checkpoint -> model in eval mode, or None when the file is in another format."""
    ckpt = load_checkpoint(path)
    if ckpt.get("format") != "attnlab":
        return None
    model = build_model(config_from_dict(cfg_cls, ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()


def run_info(cfg, device):
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        git = ""
    return dict(argv=sys.argv, config=asdict(cfg), git=git, torch=torch.__version__, cuda=torch.version.cuda,
                gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None)


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


# ----------------------------------------------------------------------------------------------------------------
# Training

def lr_mult(it, cfg):
    """Multiplier of each group's base_lr at step it: linear warm-up, then cosine or constant + linear cool-down."""
    decay = cfg.lr_decay_iters or cfg.max_iters
    floor = cfg.min_lr / cfg.lr
    if it < cfg.warmup_iters:
        return (it + 1) / (cfg.warmup_iters + 1)
    if cfg.schedule == "wsd":
        cool = cfg.cooldown_frac * decay
        return 1.0 if it < decay - cool else max(floor, floor + (1 - floor) * (decay - it) / max(cool, 1))
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, decay - cfg.warmup_iters))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def estimate_loss(model, data, cfg, device, rank=0, world=1):
    """Mean loss over eval_iters fixed val batches (the same batches at every evaluation)."""
    model.eval()
    losses = torch.zeros((), device=device)
    for i in range(rank, cfg.eval_iters, world):
        x, y = data.batch("val", cfg.batch_size, cfg.block_size, cfg.seed, 0, i, device)
        with autocast(device, cfg):
            losses += model(x, y).float()
    if world > 1:
        torch.distributed.all_reduce(losses)
    model.train()
    return losses.item() / cfg.eval_iters


def train(cfg, build_model, model=None):
    """The loop: eval/checkpoint block, micro-steps, clip, step, log. model: start from these weights (--init-from)."""
    ddp = "RANK" in os.environ
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = resolve_device(cfg)
    if ddp:
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    master = rank == 0
    torch.manual_seed(cfg.seed)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    data = TokenData(cfg.data)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    ckpt = load_checkpoint(ckpt_path) if cfg.resume else None
    model = (model or build_model(cfg)).to(device).train()
    optimizers = model.configure_optimizers(cfg, device.type)
    start = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        for o, s in zip(optimizers, ckpt["optimizers"]):
            o.load_state_dict(s)
        start = ckpt["step"]
    if master:
        os.makedirs(cfg.out, exist_ok=True)
        json.dump(run_info(cfg, device), open(os.path.join(cfg.out, "run.json"), "w"), indent=1)
        log_path = os.path.join(cfg.out, "log.jsonl")
        kept = [l for l in open(log_path)] if ckpt is not None and os.path.exists(log_path) else []
        kept = [l for l in kept if json.loads(l)["step"] <= start]  # drop what came after the checkpoint
        with open(log_path, "w") as f:
            f.writelines(kept)
        n = model.num_params()
        print(f"{cfg.variant or 'model'}: {n / 1e6:.2f}M parameters (compute), {data.tokens('train'):,} train "
              f"tokens, {cfg.batch_size * cfg.grad_accum * world * cfg.block_size:,} tokens/step, on {device}")
    wandb_run = None
    if cfg.wandb and master:
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs the wandb package: pip install wandb")
        wandb_run = wandb.init(project="attnlab", config=asdict(cfg))

    compiled = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    fast = compiled
    if ddp:
        fast = nn.parallel.DistributedDataParallel(compiled, device_ids=[local] if device.type == "cuda" else None)
    peak = peak_flops(device)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.block_size
    flops_per_token = model.flops_per_token()
    t_last, it_last, loss_sum, val_loss = time.time(), start, torch.zeros((), device=device), None
    for it in range(start, cfg.max_iters):
        mult = lr_mult(it, cfg)
        for o in optimizers:
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * mult
        torch.manual_seed(cfg.seed + it)  # dropout masks depend on the step only: resume is exact
        for micro in range(cfg.grad_accum):
            x, y = data.batch("train", cfg.batch_size, cfg.block_size, cfg.seed, it, micro * world + rank, device)
            sync = not ddp or micro == cfg.grad_accum - 1
            with (contextlib.nullcontext() if sync else fast.no_sync()), autocast(device, cfg):
                loss = fast(x, y) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip else float("inf"))
        for o in optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        step = it + 1
        evaluate_now = step % cfg.eval_interval == 0 or step == cfg.max_iters
        if step % cfg.log_interval and not evaluate_now:
            continue
        if ddp:
            torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
        loss_val, norm_val = loss_sum.item() / (step - it_last), norm.item()
        if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
            msg = f"training diverged: loss {loss_val} / grad norm {norm_val} before step {step}; stopped, the last good checkpoint ({ckpt_path}) is kept"
            raise ConfigError(msg)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.time() - t_last) / (step - it_last)
        rec = dict(step=step, loss=round(loss_val, 5), lr=optimizers[0].param_groups[0]["lr"],
                   tokens=step * tokens_per_step, tok_s=round(tokens_per_step / dt), ms=round(dt * 1e3, 2),
                   mfu=round(flops_per_token * tokens_per_step / dt / (peak * world), 4) if peak else None,
                   grad_norm=round(norm_val, 4), time=round(time.time(), 2),
                   mem_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None)
        if evaluate_now:
            rec["val_loss"] = val_loss = round(estimate_loss(compiled, data, cfg, device, rank, world), 5)
        if master:
            mfu = f"{100 * rec['mfu']:.1f}%" if peak else "n/a"
            val = f" | val {rec['val_loss']:.4f}" if evaluate_now else ""
            print(f"step {step}/{cfg.max_iters} | loss {loss_val:.4f}{val} | {rec['tok_s'] / 1e3:.1f}k tok/s | "
                  f"MFU {mfu} | {rec['ms']:.1f} ms/step | ETA {fmt_time(dt * (cfg.max_iters - step))}", flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if wandb_run:
                wandb_run.log(rec, step=step)
            if evaluate_now:
                save_checkpoint(ckpt_path, dict(format="attnlab", config=asdict(cfg), model=model.state_dict(),
                                                optimizers=[o.state_dict() for o in optimizers], step=step,
                                                val_loss=val_loss))
        loss_sum.zero_()
        t_last, it_last = time.time(), step  # eval and checkpoint time stay out of tokens/s
    if ddp:  # leave together: a rank tearing down while rank 0 still writes its checkpoint hung gloo
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Eval, sampling, benchmark, plots

@torch.no_grad()
def evaluate(model, data, cfg, device, split="val"):
    """Loss over the whole split (or eval_tokens of it) in non-overlapping windows: nats, perplexity, bits."""
    model.eval()
    total, count, windows = 0.0, 0, data.windows(split, cfg.block_size, cfg.eval_tokens)
    while batch := list(itertools.islice(windows, cfg.batch_size)):
        xy = torch.stack(batch).to(device)  # (B, T + 1)
        with autocast(device, cfg):
            total += model(xy[:, :-1], xy[:, 1:]).item() * xy[:, 1:].numel()
        count += xy[:, 1:].numel()
    if not count:
        raise ConfigError(f"the {split} split is shorter than one window of {cfg.block_size + 1} tokens")
    loss = total / count
    res = dict(split=split, tokens=count, loss=loss, ppl=math.exp(min(loss, 50)), bits_per_token=loss / math.log(2))
    info = data.meta.get("splits", {}).get(split, {})
    if data.meta.get("tokenizer") == "bytes":
        res["bpb"] = res["bits_per_token"]
    elif info.get("bytes") and info.get("tokens"):  # bits per byte of the scored text
        res["bpb"] = res["bits_per_token"] * info["tokens"] / info["bytes"]
    return res


def bench(cfg, build_model, steps=20, warmup=5):
    """Train-step timing on random tokens: ms/step, tokens/s, MFU, peak memory."""
    device = resolve_device(cfg)
    torch._dynamo.reset()  # a fresh compile cache: earlier models in this process must not eat the recompile limits
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    fast = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    optimizers = model.configure_optimizers(cfg, device.type)
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with autocast(device, cfg):
            loss = fast(x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.time()
    for _ in range(steps):
        step()
    sync()
    dt = (time.time() - t0) / steps
    tok_s = cfg.batch_size * cfg.block_size / dt
    peak = peak_flops(device)
    return dict(ms=dt * 1e3, tok_s=tok_s, mfu=model.flops_per_token() * tok_s / peak if peak else None,
                mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                params_m=model.num_params(False) / 1e6)


def bench_line(r):
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
    mem = f"{r['mem_gb']:.1f} GiB" if r["mem_gb"] else "n/a"
    return f"{r['ms']:.1f} ms/step, {r['tok_s'] / 1e3:.1f}k tok/s, MFU {mfu}, peak {mem}"


def bench_variants(runs, build_model, out):
    """core.bench of several configs ({label: cfg}, the first is the baseline), each freshly compiled, in one
    process; prints x baseline and writes <out>/compare.json."""
    rows = {}
    for label, cfg in runs.items():
        r = rows[label] = bench(cfg, build_model)
        r["x_baseline"] = r["tok_s"] / next(iter(rows.values()))["tok_s"]
        print(f"{label:>18}: {bench_line(r)}, {r['params_m']:.2f}M params, {r['x_baseline']:.3f}x baseline", flush=True)
    os.makedirs(out, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    json.dump(dict(device=device, torch=torch.__version__, results=rows), open(os.path.join(out, "compare.json"), "w"),
              indent=1)
    return rows


def read_log(path):
    path = os.path.join(path, "log.jsonl") if os.path.isdir(path) else path
    if not os.path.exists(path):
        raise ConfigError(f"no training log at {path}")
    return [json.loads(l) for l in open(path) if l.strip()]


def plot_runs(runs, out_png, title="", x="step"):
    """Train and val loss of several runs ({label: run dir}) side by side, from their log.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, path in runs.items():
        log = read_log(path)
        for ax, key in zip(axes, ("loss", "val_loss")):
            pts = [(r[x], r[key]) for r in log if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None, ms=3)
    for ax, name in zip(axes, ("train loss", "val loss")):
        ax.set_xlabel({"step": "step", "tokens": "tokens", "time": "wall time (s)"}.get(x, x))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------------------------------------------
# Command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


STANDARD_ACTIONS = {
    "train": "train a model (from scratch, --resume, or --init-from)",
    "eval": "score the whole val (and test) split of --data with --init-from or <out>/ckpt.pt",
    "plot": "plot loss curves of --out (and --runs) to <out>/loss.png",
    "sample": "generate text from --init-from or <out>/ckpt.pt",
    "bench": "time training steps on random tokens (ms/step, tokens/s, MFU, memory)",
    "eval-tasks": "downstream eval of --init-from or <out>/ckpt.pt: comma list of lm-eval tasks or local .jsonl "
                  "multiple-choice files (bench.py)",
}


def build_parser(cfg_cls, actions, doc):
    p = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("actions")
    for name, help in {**STANDARD_ACTIONS, **{k: v[0] for k, v in actions.items()}}.items():
        kind = dict(metavar="TASKS") if name == "eval-tasks" else dict(action="store_true")
        g.add_argument(f"--{name}", help=help, **kind)
    g.add_argument("--preset", choices=sorted(cfg_cls.PRESETS), help="named config, applied before other flags")
    g.add_argument("--runs", nargs="*", default=[], help="more run directories: --plot compares their loss curves; a paper's action may read them too")
    g.add_argument("--prompt", default="\n", help="--sample: prompt text")
    g.add_argument("--max-new-tokens", type=int, default=200, help="--sample: tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="--sample: temperature")
    g.add_argument("--top-k", type=int, default=200, help="--sample: top-k")
    c = p.add_argument_group("config")
    defaults = cfg_cls.__dataclass_fields__
    for f in dataclasses.fields(cfg_cls):
        kw = dict(default=argparse.SUPPRESS, help=f"{f.metadata.get('help', '')} (default: {f.default!r})")
        if f.type in (bool, "bool"):
            c.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, **kw)
        else:
            c.add_argument(f"--{f.name.replace('_', '-')}", type=type(defaults[f.name].default), **kw)
    return p


def make_config(cfg_cls, args, base=None):
    """defaults <- preset <- base (a checkpoint's config) <- flags given on the command line."""
    names = field_names(cfg_cls)
    given = {k: v for k, v in vars(args).items() if k in names}
    merged = dict(cfg_cls.PRESETS.get(args.preset) or {})
    merged.update({k: v for k, v in (base or {}).items() if k in names})
    merged.update(given)
    return cfg_cls(**merged)


def main(argv=None, cfg_cls=Config, build_model=None, load_model=None, actions=None, doc=None):
    """The CLI shared by every script. load_model(path, device) reads our and the paper's checkpoints;
    actions: {name: (help, fn(cfg, args))} added to the standard ones."""
    build_model = build_model or GPT
    load_model = load_model or (lambda path, device="cpu": load_ours(path, cfg_cls, build_model, device))
    actions = actions or {}
    args = build_parser(cfg_cls, actions, doc or __doc__).parse_args(argv)
    chosen = [a for a in (*STANDARD_ACTIONS, *actions) if getattr(args, a.replace("-", "_"))]
    try:
        if not chosen:
            raise ConfigError(f"nothing to do: pass one of {', '.join('--' + a for a in (*STANDARD_ACTIONS, *actions))}")
        base, model = None, None
        if getattr(args, "resume", False):  # the run's own config; flags given now override it
            base = load_checkpoint(os.path.join(make_config(cfg_cls, args).out, "ckpt.pt"))["config"]
        elif getattr(args, "init_from", "") or args.eval or args.sample or args.eval_tasks:  # checkpoint's model
            model = checked_load(load_model, getattr(args, "init_from", "") or
                                 os.path.join(make_config(cfg_cls, args).out, "ckpt.pt"))
            base = {k: v for k, v in asdict(model.cfg).items() if k not in cfg_cls.RUN_FIELDS}
        cfg = make_config(cfg_cls, args, base)
        if not cfg.data and set(chosen) & {"train", "eval", "sample"}:
            cfg.data = default_dataset()
        if not cfg.vocab_size:  # the dataset's, padded to a multiple of 64; GPT-2's for a bench on random tokens
            cfg.vocab_size = 64 * math.ceil(TokenData(cfg.data).vocab_size / 64) if cfg.data else 50304
        for a in chosen:
            run_action(a, cfg, args, build_model, model, actions)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def checked_load(load_model, path):
    model = load_model(path, "cpu")
    if model is None:
        raise ConfigError(f"{path}: not a checkpoint this script can read")
    return model


def run_action(a, cfg, args, build_model, model, actions):
    device = resolve_device(cfg)
    if a == "train":
        train(cfg, build_model, model)
    elif a == "eval":
        data = TokenData(cfg.data)
        model.to(device)
        print(f"{'split':<6} {'tokens':>12} {'loss':>8} {'ppl':>9} {'bits/tok':>9} {'bpb':>7}")
        for split in [s for s in ("val", "test") if s in data.splits]:
            r = evaluate(model, data, cfg, device, split)
            bpb = f"{r['bpb']:.4f}" if "bpb" in r else "n/a"
            print(f"{split:<6} {r['tokens']:>12,} {r['loss']:>8.4f} {r['ppl']:>9.2f} {r['bits_per_token']:>9.4f} {bpb:>7}")
    elif a == "plot":
        runs = {os.path.basename(os.path.normpath(p)): p for p in [cfg.out, *args.runs]}
        print(plot_runs(runs, os.path.join(cfg.out, "loss.png"), title=cfg.variant))
    elif a == "sample":
        tok = get_tokenizer(TokenData(cfg.data).meta.get("tokenizer", "gpt2"))
        idx = torch.tensor([tok.encode(args.prompt)], device=device)
        torch.manual_seed(cfg.seed)
        print(tok.decode(model.to(device).generate(idx, args.max_new_tokens, args.temperature, args.top_k)[0].tolist()))
    elif a == "eval-tasks":
        import bench as bench_py  # lm-eval adapter and multiple-choice scorer
        bench_py.eval_tasks(cfg, args.eval_tasks, model)
    elif a == "bench":
        print(f"{cfg.variant or 'model'}: {bench_line(bench(cfg, build_model))}")
    else:
        actions[a][1](cfg, args)


if __name__ == "__main__":
    sys.exit(main())
