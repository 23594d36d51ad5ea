"""attnlab core: one fast GPT that every paper script builds on.

Config (a dataclass whose fields generate the CLI), the GPT model in two families (GPT-2: LayerNorm, GELU, learned
positions, tied head; Llama: RMSNorm, SwiGLU, RoPE, untied head), the Attention base class (project -> attend ->
output projection) with an eager reference and fast paths (SDPA, FlexAttention, flash-attn), the data loader, the
train loop (bf16, torch.compile, DDP, grad accumulation, atomic checksummed checkpoints, bit-exact resume), eval,
sampling, MFU accounting, loss plots and the command line shared by all scripts.

A script plugs in by exporting one `Paper` record (see `Paper`); core imports no script.

    python core.py --train --preset tiny --device cpu --max-iters 50      # baseline GPT on the embedded dataset
    torchrun --nproc_per_node=2 core.py --train --preset 124m --data data/docs
"""
import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import gc
import glob
import hashlib
import itertools
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
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
DEFAULT_DATA = os.path.join(HERE, "assets", "tutorial")  # embedded dataset: the Python tutorial as bytes (PSF licence)
RANDOM_VOCAB = 50304  # a bench on random tokens: GPT-2's 50257, padded to a multiple of 64


class ConfigError(ValueError):
    """A user mistake: reported as one line and a non-zero exit, never a traceback."""


def opt(default, help, run=False, override=False):
    """A config field. run=True: it describes the run (data, optimisation, paths), not the model's weights; the
    other fields come from a checkpoint when one is loaded, and a flag that contradicts them is refused, unless
    override=True: how the weights are used, which a flag may change (e.g. the mask of sparse_byte's thesis files)."""
    return field(default=default, metadata={"help": help, "run": run, "override": override})


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
    norm_eps: float = opt(1e-5, "epsilon of LayerNorm / RMSNorm")
    rope_theta: float = opt(10000.0, "RoPE base (llama family)")
    variant: str = opt("", "model variant (a paper script lists its own at the end of --help)")
    # run
    attn_impl: str = opt("auto", "attention path; auto: the fastest available, eager: the reference", True)
    dropout: float = opt(0.0, "dropout probability", True)
    data: str = opt("", "dataset directory made by prepare.py ('' = the checkpoint's, else the embedded Python "
                        "tutorial, bytes)", True)
    out: str = opt("", "output directory: ckpt.pt, log.jsonl, run.json, plots ('' = runs/<script>/<variant>)", True)
    device: str = opt("auto", "auto, cpu or cuda", True)
    dtype: str = opt("auto", "auto (bfloat16 on GPU, float32 on CPU), float32 or bfloat16", True)
    residual_dtype: str = opt("float32", "the residual stream's dtype under bf16 autocast: float32, or bfloat16 "
                                         "(faster; every block's add rounds to bf16; no effect in float32 runs)", True)
    compile: bool = opt(True, "torch.compile the model (GPU only)", True)
    seed: int = opt(1337, "seed for init, data order and dropout", True)
    batch_size: int = opt(16, "micro-batch size per process", True)
    grad_accum: int = opt(1, "micro-batches per optimizer step (per process)", True)
    max_iters: int = opt(5000, "optimizer steps", True)
    lr: float = opt(6e-4, "peak learning rate", True)
    min_lr: float = opt(6e-5, "final learning rate", True)
    warmup_iters: int = opt(200, "linear warm-up steps", True)
    lr_decay_iters: int = opt(0, "steps of the decay (0: max_iters); training may stop before the end", True)
    schedule: str = opt("cosine", "cosine (warm-up then cosine) or wsd (warm-up, constant, linear cool-down)", True)
    cooldown_frac: float = opt(0.2, "wsd: fraction of lr_decay_iters spent cooling down", True)
    weight_decay: float = opt(0.1, "AdamW weight decay (matrices and embeddings only)", True)
    beta1: float = opt(0.9, "AdamW beta1", True)
    beta2: float = opt(0.95, "AdamW beta2", True)
    grad_clip: float = opt(1.0, "clip gradients to this global norm (0: off)", True)
    eval_interval: int = opt(250, "evaluate and checkpoint every N steps", True)
    eval_iters: int = opt(20, "val batches per evaluation", True)
    eval_tokens: int = opt(0, "--eval: val tokens to score (0: the whole split)", True)
    log_interval: int = opt(10, "print and log every N steps", True)
    resume: bool = opt(False, "continue the run in --out from its ckpt.pt", True)
    init_from: str = opt("", "start from a checkpoint (ours or the paper's published format)", True)
    wandb: bool = opt(False, "log to Weights & Biases (if installed)", True)

    PRESETS = {
        "tiny": dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=8, max_iters=100, lr=1e-3,
                     min_lr=1e-4, warmup_iters=10, eval_interval=50, eval_iters=4, log_interval=10),
        "124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16),
    }
    VARIANTS = {}  # {name: one line}; the first is the default (a paper's own method)
    ATTN_IMPLS = ("auto", "eager", "sdpa", "flex", "flash")

    def __post_init__(self):
        def check(ok, msg):
            if not ok:
                raise ConfigError(msg)
        check(self.family in ("gpt2", "llama"), f"--family must be gpt2 or llama, not {self.family!r}")
        for name in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval",
                     "eval_iters", "log_interval"):
            check(getattr(self, name) > 0, f"--{name.replace('_', '-')} must be positive")
        for name in ("max_iters", "vocab_size", "mlp_hidden", "lr_decay_iters", "eval_tokens"):  # 0: a default
            check(getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be >= 0")
        check(0 <= self.cooldown_frac <= 1, "--cooldown-frac must be in [0, 1]")
        check(self.n_embd % self.n_head == 0, f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        check(self.family == "gpt2" or (self.n_embd // self.n_head) % 2 == 0, "RoPE needs an even head dim")
        check(self.residual_dtype in ("float32", "bfloat16"),
              f"--residual-dtype must be float32 or bfloat16, not {self.residual_dtype!r}")
        check(self.attn_impl in self.ATTN_IMPLS,
              f"--attn-impl must be one of {', '.join(self.ATTN_IMPLS)}, not {self.attn_impl!r}")
        variants = list(self.VARIANTS) or [""]  # a config without VARIANTS has one, ""
        self.variant = self.variant or variants[0]
        check(self.variant in variants,
              f"--variant must be one of {', '.join(self.VARIANTS)}, not {self.variant!r}" if self.VARIANTS else
              f"--variant {self.variant!r}: this model has no variants (the paper scripts have)")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
              f"--device must be auto, cpu or cuda, not {self.device!r}")
        check(self.dtype in ("auto", "float32", "bfloat16"), "--dtype must be auto, float32 or bfloat16")
        check(self.schedule in ("cosine", "wsd"), "--schedule must be cosine or wsd")
        check(0 <= self.dropout < 1, "--dropout must be in [0, 1)")
        check(self.lr > 0 and 0 <= self.min_lr <= self.lr, "need 0 < lr and 0 <= min_lr <= lr")
        check(self.warmup_iters >= 0 and self.weight_decay >= 0 and self.grad_clip >= 0,
              "--warmup-iters, --weight-decay and --grad-clip must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "--beta1 and --beta2 must be in [0, 1)")
        check(0 <= self.seed < 2**63, "--seed must be in [0, 2**63)")  # numpy's and torch's seeds (seed + step)
        check(self.norm_eps > 0 and self.rope_theta > 0, "--norm-eps and --rope-theta must be > 0")

    def label(self):
        """The model as output names it: its variant, and a paper's knob that tells its runs apart (reflex's split)."""
        return self.variant

    def fit_data(self, data):
        """Settings that depend on the dataset (TokenData), set once it is known: a paper's knob may count epochs."""

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def hidden(self):
        if self.mlp_hidden:
            return self.mlp_hidden
        return 4 * self.n_embd if self.family == "gpt2" else 64 * math.ceil(8 * self.n_embd / 3 / 64)


def field_names(cfg_cls, run=None, override=None):
    """Config field names; run / override True or False: only the fields with that metadata."""
    return {f.name for f in dataclasses.fields(cfg_cls) if (run is None or f.metadata.get("run", False) == run)
            and (override is None or f.metadata.get("override", False) == override)}


@dataclass(frozen=True)
class Paper:
    """What a script exports as `PAPER`: core.main, bench.py and the tests read a script only through this.

    Variants live in config.VARIANTS ({name: one line}, the paper's own method first: the default); build_model maps
    a config (its variant included) to a model; load_model below reads our checkpoints of this script and, through
    `convert`, the paper's published formats."""
    name: str                  # the script's file name without .py; every checkpoint records it
    config: type               # a Config subclass: fields (the CLI), PRESETS, VARIANTS
    build_model: object        # cfg -> model (a GPT)
    baseline: str = ""         # the variant with plain attention: bench.py's "x baseline" and --compare's reference
    doc: str = ""              # the script's docstring: --help
    actions: dict = field(default_factory=dict)  # {name: (help, fn(cfg, args))}, beside train/eval/plot/sample/bench
    flags: dict = field(default_factory=dict)    # action-only flags {"--name": argparse kwargs}: not saved in runs
    convert: object = None     # (ckpt, path, given flags) -> (cfg, state_dict) of a published format, or None
    formats: str = ""          # what convert reads, named in load_model's error
    published_tokenizer: str = "gpt2"  # the tokens the published checkpoints read: their data is refused otherwise
    size_preset: str = "124m"  # the 124m-class preset: bench.py and a GPU's default run
    bench_rows: dict = field(default_factory=dict)  # bench.py rows beside the variants {label: config overrides}

    @property
    def main(self):
        return self.variants[0]

    @property
    def variants(self):
        return list(self.config.VARIANTS) or [""]

    def label(self, cfg):
        """'script/variant ...': the model a printed number belongs to."""
        return "/".join(filter(None, (self.name, cfg.label())))

    def default_out(self, cfg):
        return os.path.join("runs", self.name, *([cfg.variant] if cfg.variant else []))


# ----------------------------------------------------------------------------------------------------------------
# Attention

@dataclass
class Ctx:
    """What crosses layers in one forward (no globals)."""
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
    """Half-split (rotate_half) RoPE; pairs are (i, i + D/2). x (B, H, T, D) with cos, sin (T, D/2), or (B, T, H, D)
    with (T, 1, D/2)."""
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


def flex_block_mask(ctx, mask_mod, T, S, device, key="causal"):
    """A FlexAttention BlockMask built once per forward and shared by every layer (and heads); one for every row
    unless the batch has documents. The document mask is built in GPT.context, before the layers: a layer then only
    reads it, and its compiled graph has no break in it."""
    if key not in ctx.cache:
        B = None if ctx.doc is None else ctx.doc.size(0)
        ctx.cache[key] = build_block_mask(mask_mod, B, None, T, S, device)
    return ctx.cache[key]


@torch.compiler.disable  # built eagerly, outside the compiled graph: masks built inside it crashed on the H200
def build_block_mask(mask_mod, B, H, T, S, device):
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(mask_mod, B, H, T, S, device=device)


@functools.cache
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as flex
    return torch.compile(flex, dynamic=False)


def flex_attention(q, k, v, **kw):
    """FlexAttention, compiled: called eagerly, the uncompiled op would materialise the T x T scores."""
    from torch.nn.attention.flex_attention import flex_attention as flex
    if q.device.type != "cuda" or torch.compiler.is_compiling():
        return flex(q, k, v, **kw)
    return compiled_flex()(q, k, v, **kw)


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
        """c_attn's output (B, T, 3C) -> q, k, v (B, H, T, D) each, RoPE on q and k (llama family). RoPE runs in
        c_attn's (B, T, H, D) layout, before the transpose: the backward then writes c_attn's gradient in its own
        layout (rotated in (B, H, T, D), the step's slowest inductor kernel assembled it transposed)."""
        B, T, _ = qkv.shape
        q, k, v = qkv.view(B, T, 3, self.n_head, self.head_dim).unbind(2)  # (B, T, H, D) each
        if ctx.rope is not None:
            cos, sin = (t[:, None] for t in ctx.rope)  # (T, 1, D/2): broadcast over heads
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)

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
        mask = self.eager_mask(T, S, ctx, q.device)
        att = att.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        att = att.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # a row without a key: zeros, as SDPA's (not NaN)
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
        T = q.size(-2)
        mask = flex_block_mask(ctx, doc_causal_mask_mod(ctx), T, T, q.device)
        return flex_attention(q, k, v, block_mask=mask)

    def attend_flash(self, q, k, v, ctx):
        if flash_attn_func is None or ctx.doc is not None or q.dtype == torch.float32:
            warn_once("flash-attn is not installed (or cannot run this input): using SDPA instead")
            return self.attend_sdpa(q, k, v, ctx)
        drop = self.dropout if self.training else 0.0
        y = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=drop, causal=True)
        return y.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)


@functools.cache  # once per message and process
def warn_once(msg):
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


class RMSNorm(nn.RMSNorm):
    """RMSNorm in fp32, returned in its input's dtype. A bf16 input (the bf16 residual stream, a head's projection
    under autocast) and the fp32 weight are a pair the fused kernel refuses (its fallback warns and runs unfused):
    the input goes in as fp32, which is the fallback's own math, on the fused kernel."""

    def forward(self, x):
        return super().forward(x.float()).type_as(x)


def make_norm(cfg):
    if cfg.family == "llama":
        return RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg, attn):
        super().__init__()
        self.norm_1, self.attn, self.norm_2, self.mlp = make_norm(cfg), attn, make_norm(cfg), MLP(cfg)

    def forward(self, x, ctx):
        x = x + self.attn(self.norm_1(x), ctx)
        return x + self.mlp(self.norm_2(x))


def doc_path(impls):
    """What attends a batch with several documents under the attention paths `impls`: 'flex', 'eager mask+flex', ...
    (SDPA and flash-attn have no document mask; a kernel of a paper's own applies it itself)."""
    return "+".join(sorted({{"sdpa": "flex", "flash": "flex", "eager": "eager mask"}.get(i, i) for i in impls}))


@torch.compiler.disable  # a data-dependent choice, made outside the compiled graph
def documents(doc, device, paths):
    """Document ids (B, T) on `device`, or None when every row holds one document: then the plain causal kernel
    (SDPA) runs, not FlexAttention with a document mask. The check is free where the ids are on the host: the train
    loop, estimate_loss and bench derive them from the batch's CPU copy (host_batch). Ids already on a GPU always take
    the document path: checking there waits for the device every forward (H200: exoformer's 124m step 43 -> 55 ms).
    paths counts the batches of each kind (progress line, bench.py)."""
    several = doc.device.type != "cpu" or bool((doc[:, 1:] != doc[:, :1]).any())
    paths["documents" if several else "one document"] += 1
    return doc.to(device, non_blocking=True) if several else None


def host_batch(model, x, y, device):
    """A batch made on the CPU -> (x, y) on `device` and the model's document ids of x, still on the host (see
    documents). To a GPU through pinned memory: a copy from pageable memory waits for every kernel queued before it,
    so the host could never run ahead of the GPU (the next step's Python and launches would leave it idle)."""
    if device.type == "cuda":
        x, y = x.contiguous().pin_memory(), y.contiguous().pin_memory()
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True), model.doc_ids(x)


class GPT(nn.Module):
    """GPT-2 or Llama family decoder. make_attn(cfg, layer) picks each layer's attention module."""
    length_free = True  # a position's logits depend on no later token: right-padded rows score as alone (bench)

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
        else:  # RoPE's cos and sin tables, made once: computed inside the compiled step, inductor recomputed
            # pow, sin and cos of an arange in every layer's forward and backward kernels (~10 ms per 124m step)
            cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_theta, "cpu")
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D/2), fp32, not in checkpoints
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        if cfg.family == "gpt2":
            self.lm_head.weight = self.transformer.wte.weight  # tied
        self.paths = collections.Counter()  # batches with and without several documents (see documents)
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

    def doc_ids(self, idx):
        """(B, T) document ids of a batch (attention stays inside a document), or None: one document per row. The
        core reads none from the tokens; exoformer's --doc-sep does."""
        return None

    def context(self, idx, doc=None, record=None):
        doc = self.doc_ids(idx) if doc is None else doc
        ctx = Ctx(doc=None if doc is None else documents(doc, idx.device, self.paths), record=record)
        T = idx.size(1)
        if T > self.cfg.block_size:  # RoPE's tables and wpe stop there (it was a raw size mismatch or IndexError)
            raise ValueError(f"{T} tokens are more than the model's block_size ({self.cfg.block_size})")
        if ctx.doc is not None and idx.is_cuda and self.cfg.attn_impl != "eager":  # the fast paths' document mask
            flex_block_mask(ctx, doc_causal_mask_mod(ctx), T, T, idx.device)
        if self.cfg.family == "llama":
            ctx.rope = self.rope_cos[:T], self.rope_sin[:T]
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
        x = self.embed(idx, ctx)
        dev = x.device.type
        if self.cfg.residual_dtype == "bfloat16" and torch.is_autocast_enabled(dev):  # the stream in autocast's dtype
            x = x.to(torch.get_autocast_dtype(dev))
        for block in self.transformer.h:
            x = block(x, ctx)
        logits = self.lm_head(self.final(x, ctx))
        return logits if targets is None else self.loss_fn(logits, targets)

    def track(self, x, y):
        """What a paper logs at every evaluation, measured on one fixed val window (x, y): {} here."""
        return {}

    def attn_impls(self, device):
        """The attention paths the layers run on device, e.g. ['sdpa'] or ['eager', 'flex']."""
        return sorted({m.impl(device) for m in self.modules() if isinstance(m, Attention)})

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

    def decays(self, name, p):
        """AdamW's decay groups: matrices and embeddings (dim >= 2) decay, gains and biases do not."""
        return p.dim() >= 2

    def configure_optimizers(self, cfg, device_type):
        """AdamW with the decay groups of `decays`. Groups carry base_lr."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        groups = [dict(params=[p for n, p in named if self.decays(n, p)], weight_decay=cfg.weight_decay),
                  dict(params=[p for n, p in named if not self.decays(n, p)], weight_decay=0.0)]
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
# Tokenizer and data (prepare.py writes what TokenData reads)

GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # r50k_base
R50K_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER = 20240520, 1, 256  # llm.c: 256 int32 (magic, version, count), uint16 ids


@dataclass
class Tokenizer:
    name: str
    encode: object  # str -> list[int] (no special tokens)
    decode: object  # list[int] -> str
    eot_token: int
    n_vocab: int
    token_bytes: object = None  # int -> bytes of that token's text (GPT-2; None: one byte per token)


def get_tokenizer(name):
    """'bytes' or GPT-2 BPE: tiktoken's 'gpt2', or offline from a gpt2.tiktoken file ($ATTNLAB_TIKTOKEN)."""
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
    path = os.environ.get("ATTNLAB_TIKTOKEN")
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"GPT-2 vocabulary file not found: {path}")
        with open(path, "rb") as f:  # a damaged file, one cut short (it would parse), or another vocabulary
            if hashlib.sha256(f.read()).hexdigest() != GPT2_TIKTOKEN_SHA256:
                raise ConfigError(f"{path}: not GPT-2's gpt2.tiktoken (sha256 differs)")
        ranks = tiktoken.load.load_tiktoken_bpe(path)
        enc = tiktoken.Encoding(name="gpt2", pat_str=R50K_PATTERN, mergeable_ranks=ranks,
                                special_tokens={"<|endoftext|>": 50256})
    else:
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # no network and no cache
            raise ConfigError(f"cannot load tiktoken's gpt2 vocabulary ({type(e).__name__}); offline, set "
                              "ATTNLAB_TIKTOKEN=/path/to/gpt2.tiktoken") from None
    return Tokenizer("gpt2", enc.encode_ordinary, enc.decode, enc.eot_token, enc.n_vocab, enc.decode_single_token_bytes)


def read_tokens(path, dtype):
    """Memory-map one token file: llm.c shard (detected by its magic) or plain .bin of `dtype`."""
    size = os.path.getsize(path)
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER) if size >= 4 * SHARD_HEADER else None
    if header is not None and header[0] == SHARD_MAGIC:
        if header[1] != SHARD_VERSION:
            raise ConfigError(f"{path}: unsupported shard version {header[1]}")
        if size != 4 * SHARD_HEADER + 2 * int(header[2]):
            raise ConfigError(f"{path}: header says {header[2]} tokens, the file holds "
                              f"{(size - 4 * SHARD_HEADER) // 2} (truncated?)")
        return np.memmap(path, dtype=np.uint16, mode="r", offset=4 * SHARD_HEADER)
    if size == 0 or size % dtype.itemsize:
        raise ConfigError(f"{path}: {size} bytes is not a whole number of {dtype} tokens (empty or truncated?)")
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
        try:
            self.meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
            dtype = np.dtype(self.meta.get("dtype", "uint16"))
        except (ValueError, TypeError, AttributeError) as e:  # AttributeError: JSON, but not an object
            raise ConfigError(f"{meta_path}: not a valid dataset description ({e})") from None
        self.splits = {}
        for split in ("train", "val", "test"):
            files = sorted(set(glob.glob(os.path.join(path, f"{split}.bin")) +
                               glob.glob(os.path.join(path, f"*{split}_[0-9]*.bin"))))
            if files:
                self.splits[split] = [read_tokens(f, dtype) for f in files]
        if "train" not in self.splits or "val" not in self.splits:
            raise ConfigError(f"{path} needs train and val token files (train.bin/val.bin or *_train_/*_val_ shards): "
                              "prepare.py makes them (run its command again if it stopped)")
        self.vocab_size = self.meta.get("vocab_size") or 50257
        self.tokenizer = self.meta.get("tokenizer", "gpt2")
        self.path = path

    def info(self):
        """What a checkpoint and run.json record of the dataset: loading it elsewhere refuses another tokenizer; the
        train split's size gives a run's epochs where the data is not at hand (bench.py --compare --report)."""
        return dict(path=os.path.abspath(self.path), tokenizer=self.tokenizer, vocab_size=self.vocab_size,
                    train_tokens=self.tokens("train"))

    def tokens(self, split):
        return sum(len(s) for s in self.splits[split])

    def require(self, T, splits=("train", "val")):
        for split in splits:
            if max(len(s) for s in self.splits[split]) < T + 1:
                raise ConfigError(f"the {split} split of {self.path} ({self.tokens(split):,} tokens) is shorter than "
                                  f"one window of block_size + 1 = {T + 1} tokens: lower --block-size")

    def batch(self, split, B, T, seed, step, index=0, device="cpu"):
        self.require(T, [split])
        shards = self.splits[split]
        room = np.array([max(len(s) - T, 0) for s in shards], dtype=np.float64)  # window starts per shard
        rng = np.random.default_rng([seed, ("train", "val", "test").index(split), step, index])
        which = rng.choice(len(room), size=B, p=room / room.sum())
        starts = [rng.integers(0, room[i]) for i in which]
        xy = torch.from_numpy(np.stack([shards[i][s:s + T + 1].astype(np.int64) for i, s in zip(which, starts)]))
        xy = xy.to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def windows(self, split, T, max_tokens=0):
        """Non-overlapping (T+1)-token windows covering the split in order (for --eval)."""
        seen = 0
        for shard in self.splits[split]:
            for s in range(0, len(shard) - T, T):  # windows of T + 1 tokens that fit
                if max_tokens and seen >= max_tokens:
                    return
                yield torch.from_numpy(shard[s:s + T + 1].astype(np.int64))
                seen += T


# ----------------------------------------------------------------------------------------------------------------
# Devices, MFU, memory, checkpoints

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


def amp_dtype(device, cfg):
    """The dtype the run computes in: --dtype, where auto is bf16 on a GPU and fp32 on a CPU."""
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
            "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]


def autocast(device, cfg):
    dtype = amp_dtype(device, cfg)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def check_memory(cfg, model, device):
    """Refuse before the first step a config far beyond the device's memory (the OS would kill it, or it would hang):
    16 bytes per parameter (fp32 weight, gradient, two AdamW moments), activations of about 34 bytes per token, layer
    and channel at 16 bits (Korthikanti et al. 2022), the logits, and the eager path's T x T probabilities. A rough
    estimate, so only a config over 1.5x the device's memory is refused."""
    width = 2 if device.type == "cuda" and cfg.dtype != "float32" else 4  # bytes per activation
    B, T, L = cfg.batch_size, cfg.block_size, cfg.n_layer
    eager = "eager" in model.attn_impls(device)
    need = (16 * model.num_params(False) + B * T * (17 * width * L * cfg.n_embd + (width + 8) * cfg.vocab_size)
            + eager * 12 * L * B * cfg.n_head * T * T)
    have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if need > 1.5 * have:
        raise ConfigError(f"this config needs about {need / 2**30:.0f} GiB and the {device.type} has "
                          f"{have / 2**30:.0f} GiB: lower --batch-size or --block-size")


@contextlib.contextmanager
def atomic(path, mode="wb", **kw):
    """Write path.tmp and rename it over path only when the block completes: a crash or a full disk never leaves a
    valid-looking file, removes the .tmp, and keeps the old file."""
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, mode, **kw) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def digest(obj, h=None):
    """sha256 of a checkpoint's contents in a fixed order, tensors by their bytes: one flipped bit changes it."""
    h = h or hashlib.sha256()
    if isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            digest(v, h)
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(obj.shape)}".encode())
        h.update(t.view(torch.uint8).numpy())
    else:
        h.update(repr(obj).encode())
    return h.hexdigest()


def save_checkpoint(path, obj):
    """Atomic, with a checksum of everything in it."""
    obj["checksum"] = digest(obj)
    with atomic(path) as f:
        torch.save(obj, f)


def to_host(obj):
    """obj with every tensor copied to host memory: a snapshot whose originals training may go on changing."""
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map(to_host, obj))
    return obj.detach().to("cpu", copy=True) if isinstance(obj, torch.Tensor) else obj


class CheckpointWriter:
    """Checkpoints written beside the training: save() copies the state to host memory and returns; a thread makes
    its checksum and writes the file (atomically, one at a time). `saved` is the step of the last checkpoint on disk;
    a failed write raises at the next save, wait() or the end of the with block, naming the checkpoint kept."""

    def __init__(self, path, saved):
        self.path, self.saved, self.pending = path, saved, None
        self.pool = concurrent.futures.ThreadPoolExecutor(1)

    def save(self, step, obj):
        self.wait()
        self.pending = step, self.pool.submit(save_checkpoint, self.path, to_host(obj))

    def wait(self):
        if self.pending:
            (step, job), self.pending = self.pending, None
            try:
                job.result()
            except OSError as e:
                kept = f"the last good one (step {self.saved}) is kept" if self.saved else "none was written before"
                raise ConfigError(f"could not save {self.path} ({e.strerror or e}); {kept}") from None
            self.saved = step
        return self.saved

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, _):
        self.pool.shutdown(wait=True)  # whatever ends the training, the file is whole (or the old one) by now
        if kind is None:
            self.wait()
        elif kind is KeyboardInterrupt:  # Ctrl-C: say what is kept (core.main prints it)
            with contextlib.suppress(ConfigError):
                self.wait()
            exc.args = (f"{self.path} holds step {self.saved}: --resume continues from there" if self.saved else
                        "no checkpoint was written yet",)


@contextlib.contextmanager
def on_sigterm(then=None):
    """SIGTERM (a job scheduler's notice, a time limit's) sets the event this yields and calls then() instead of ending
    the process, so that the work stops where it can keep its state; the old handler is back afterwards. In a thread
    other than the main one (no signal arrives there) the event only stays unset."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(*_):
        stop.set()
        if then:
            then()
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def sigterm_spares_children():
    """SIGTERM blocked in this thread, and so in the processes it starts (a signal mask survives fork and exec): the
    compile workers torch.compile starts in the first compiled step live through a SIGTERM sent to the whole process
    group (timeout, a job scheduler). Killed, they left the compilation under way waiting forever, and the run lost
    its SIGTERM checkpoint to the SIGKILL that followed (two H100 runs did). One thread keeps SIGTERM unblocked, so
    the signal still comes in: its handler runs in the main thread as before."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    done = threading.Event()

    def receiver():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        done.wait()
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    thread = threading.Thread(target=receiver, name="sigterm", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class StandIn:
    """An unpickled object of a class not on SAFE_GLOBALS (a notebook's __main__.GPTConfig): its attributes only.
    Called with arguments it fails, so a file cannot run code through a global it names (os.system, exec)."""


SAFE_GLOBALS = {  # what older pickles need beyond weights_only's set: containers, tensors, numpy scalars and arrays
    "collections": {"OrderedDict"}, "builtins": {"set", "frozenset", "complex", "slice", "bytearray"},
    "_codecs": {"encode"}, "copyreg": {"_reconstructor"},
    "torch._utils": {"_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"},
    "numpy": {"dtype", "ndarray"}, "numpy.core.multiarray": {"scalar", "_reconstruct"},
    "numpy._core.multiarray": {"scalar", "_reconstruct"}}


def safe_global(module, name):
    if module == "torch":  # torch.float16 pickles as a global; Size, device and the storage types
        return name in ("Size", "device") or name.endswith("Storage") or isinstance(getattr(torch, name, None),
                                                                                   torch.dtype)
    return name in SAFE_GLOBALS.get(module, ()) or module == "numpy.dtypes" and name.endswith("DType")


class LenientUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if safe_global(module, name):
            try:
                return super().find_class(module, name)
            except (AttributeError, ImportError):
                pass
        return type(name, (StandIn,), {"__module__": module})


class lenient_pickle:  # torch.load's pickle_module: pickle, with LenientUnpickler
    Unpickler, load = LenientUnpickler, staticmethod(pickle.load)


def load_checkpoint(path):
    """The file's object, on the CPU. Missing, truncated, corrupt (checksum) or unreadable: one line."""
    if not os.path.isfile(path):
        raise ConfigError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        try:  # older pickles (numpy scalars, a notebook's own config class): pickle, globals allow-listed
            ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=lenient_pickle)
        except Exception as e:
            raise ConfigError(f"{path}: not a readable checkpoint, truncated or corrupt ({type(e).__name__})") from None
    if isinstance(ckpt, dict) and "checksum" in ckpt:
        if digest({k: v for k, v in ckpt.items() if k != "checksum"}) != ckpt["checksum"]:
            raise ConfigError(f"{path}: checksum mismatch: the file is corrupt")
    return ckpt


def strip_prefix(state, prefix="_orig_mod."):
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


NANOGPT_NAMES = ((".ln_1.", ".norm_1."), (".ln_2.", ".norm_2."), ("transformer.ln_f.", "transformer.norm_f."))


def from_nanogpt(sd):
    """A nanoGPT state_dict (compiled '_orig_mod.' keys too) in our names: ln_* -> norm_*, its causal-mask buffers
    (.attn.bias, torch < 2, not parameters) dropped, the tied head filled in (attn_bias's and reflex's originals)."""
    state = {}
    for k, v in strip_prefix(sd).items():
        if not k.endswith(".attn.bias"):
            for old, new in NANOGPT_NAMES:
                k = k.replace(old, new)
            state[k] = v
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    return state


def config_from_dict(cfg_cls, d, **overrides):
    names = field_names(cfg_cls)
    return cfg_cls(**{**{k: v for k, v in d.items() if k in names}, **overrides})


def read_run(folder):
    """A training run's run.json (argv, config, machine, dataset), or {} where there is none to read."""
    with contextlib.suppress(OSError, ValueError):
        run = json.load(open(os.path.join(folder, "run.json")))
        return run if isinstance(run, dict) else {}
    return {}


def written_by(ckpt, path):
    """The script that wrote one of our checkpoints: recorded in it, or (older files) in the run.json beside it."""
    with contextlib.suppress(LookupError, TypeError, AttributeError):
        return ckpt.get("script") or os.path.splitext(os.path.basename(read_run(os.path.dirname(path))["argv"][0]))[0]
    return None


def read_model(paper, path, given=None, ckpt=None):
    """A checkpoint for `paper` -> (its config dict, state_dict, its dataset (a published file: its tokenizer) or
    None, the file's object). Ours must come from this script; another format goes through paper.convert; anything
    else is one line naming what this script reads."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt  # a caller that read it already
    if isinstance(ckpt, dict) and ckpt.get("format") == "attnlab":
        script, variant = written_by(ckpt, path), ckpt["config"].get("variant", "")
        if script and script != paper.name:
            raise ConfigError(f"{path} was written by {script}.py: use python {script}.py")
        if variant not in paper.variants:
            raise ConfigError(f"{path} holds a {variant or 'core'!r} model, not one of {paper.name}.py's")
        return ckpt["config"], strip_prefix(ckpt["model"]), ckpt.get("data"), ckpt
    try:
        got = paper.convert(ckpt, path, given or {}) if paper.convert and isinstance(ckpt, dict) else None
    except KeyError as e:  # a published format's file without a key its reader needs: damaged, or another format
        raise ConfigError(f"{path}: a file of {paper.formats or 'a published format'} without {e}") from None
    if got is None:
        raise ConfigError(f"{path}: not a checkpoint {paper.name}.py reads (it reads attnlab checkpoints of "
                          f"{paper.name}.py{', ' + paper.formats if paper.formats else ''})")
    return asdict(got[0]), got[1], {"tokenizer": paper.published_tokenizer}, ckpt


def load_state(model, state, path):
    """model.load_state_dict(state), strict; missing, unexpected or mis-shaped keys: one line naming the first few."""
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    why = [f"missing {k}" for k in want if k not in got] + [f"unexpected {k}" for k in got if k not in want]
    why += [f"{k} is {got[k]}, not {want[k]}" for k in want if k in got and got[k] != want[k]]
    if why:
        c = model.cfg
        raise ConfigError(f"{path}: does not fit a {c.variant or 'core'} model with n_layer {c.n_layer}, n_head "
                          f"{c.n_head}, n_embd {c.n_embd}: {', '.join(why[:3])}{', ...' if len(why) > 3 else ''}")
    model.load_state_dict(state)
    return model


def check_tokenizer(info, data):
    """Refuse data (TokenData) of another tokenizer than the model's; info: what its checkpoint records of its data
    (None: nothing; a published file: its tokenizer alone)."""
    if info and (info["tokenizer"], info.get("vocab_size", data.vocab_size)) != (data.tokenizer, data.vocab_size):
        vocab = f" ({info['vocab_size']})" if "vocab_size" in info else ""
        raise ConfigError(f"{data.path} holds {data.tokenizer} tokens ({data.vocab_size}); the model was trained on "
                          f"{info['tokenizer']}{vocab}: pass --data with its tokenizer")


def refuse_contradictions(paper, src, given, path, training=False):
    """A model flag given (e.g. --n-layer) that differs from the checkpoint's config src is refused: the model's
    settings come from its checkpoint. A shorter --block-size is allowed (eval windows) unless training, where the
    model would save the flag's block_size with its weights. -> the config as saved."""
    mine = config_from_dict(paper.config, src)  # as saved, normalised
    wanted = config_from_dict(paper.config, src, **{k: v for k, v in given.items() if k in field_names(
        paper.config, run=False)})
    for k in sorted(field_names(paper.config, run=False, override=False)):
        shorter = k == "block_size" and wanted.block_size < mine.block_size and not training
        if getattr(wanted, k) != getattr(mine, k) and not shorter:
            raise ConfigError(f"--{k.replace('_', '-')} {getattr(wanted, k)} contradicts {path} ({k} "
                              f"{getattr(mine, k)}): the model's settings come from its checkpoint")
    return mine


def load_model(paper, path, device="cpu", given=None, data=None):
    """A checkpoint -> the model it holds, in eval mode; one line when this script cannot read it. given: flags of
    the command line (read by paper.convert; override fields among them apply; model flags that contradict the
    checkpoint are refused). data: the TokenData the model will read; a checkpoint that records another tokenizer is
    refused."""
    src, state, info, _ = read_model(paper, path, given)
    if given:
        refuse_contradictions(paper, src, given, path)
    if data:
        check_tokenizer(info, data)
    over = {k: v for k, v in (given or {}).items() if k in field_names(paper.config, override=True)}
    return load_state(paper.build_model(config_from_dict(paper.config, src, **over)), state, path).to(device).eval()


def run_info(cfg, device, paper=None, data=None):
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        git = ""
    return dict(script=paper and paper.name, label=paper and paper.label(cfg), argv=sys.argv, config=asdict(cfg),
                data=data and data.info(), git=git,
                torch=torch.__version__, cuda=torch.version.cuda,
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
        cool = int(cfg.cooldown_frac * decay)  # whole steps, as the ExoFormer's train.py (warmdown_steps)
        return 1.0 if it < decay - cool else max(floor, floor + (1 - floor) * (decay - it) / max(cool, 1))
    progress = min(1.0, (it - cfg.warmup_iters) / max(1, decay - cfg.warmup_iters))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def estimate_loss(model, data, cfg, device, rank=0, world=1):
    """Mean loss over eval_iters fixed val batches (the same batches at every evaluation)."""
    model.eval()
    losses = torch.zeros((), device=device)
    for i in range(rank, cfg.eval_iters, world):
        x, y, doc = host_batch(model, *data.batch("val", cfg.batch_size, cfg.block_size, cfg.seed, 0, i), device)
        with autocast(device, cfg):
            losses += model(x, y, doc=doc).float()
    if world > 1:
        torch.distributed.all_reduce(losses)
    model.train()
    return losses.item() / cfg.eval_iters


def prepare_out(cfg, model, overwrite):
    """Before the first step: --out holds no other run, is writable, and has room for an atomic save."""
    if os.path.exists(os.path.join(cfg.out, "ckpt.pt")) and not (cfg.resume or overwrite):
        raise ConfigError(f"{cfg.out} already holds a run (ckpt.pt): --resume continues it, --overwrite starts over, "
                          "or choose another --out")
    try:
        os.makedirs(cfg.out, exist_ok=True)
        with atomic(os.path.join(cfg.out, ".write_check")):
            pass
        os.remove(os.path.join(cfg.out, ".write_check"))
    except OSError as e:
        raise ConfigError(f"cannot write to --out {cfg.out}: {e.strerror or e}") from None
    need, free = 2 * 12 * model.num_params(False), shutil.disk_usage(cfg.out).free  # weights + 2 moments, twice
    if free < need:
        raise ConfigError(f"--out {cfg.out} has {free / 2**20:,.0f} MiB free; saving this model's checkpoint "
                          f"atomically needs about {need / 2**20:,.0f} MiB")


def check_out(out):
    """A paper's action, before any work and creating nothing: --out is a folder, or a path where one can be made."""
    p = os.path.abspath(out)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise ConfigError(f"cannot write to --out {out}: {p} is a file")


def train(paper, cfg, model=None, ckpt=None, overwrite=False):
    """The loop: eval/checkpoint block, micro-steps, clip, step, log. model: start from these weights (--init-from);
    ckpt: the run's checkpoint (--resume)."""
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
    data.require(cfg.block_size)
    ckpt_path = os.path.join(cfg.out, "ckpt.pt")
    model = (model or paper.build_model(cfg)).to(device).train()
    check_memory(cfg, model, device)
    optimizers = model.configure_optimizers(cfg, device.type)
    start = 0
    if ckpt is not None:
        load_state(model, strip_prefix(ckpt["model"]), ckpt_path)
        for o, s in zip(optimizers, ckpt["optimizers"]):
            flags = [{k: v for k, v in g.items() if k not in ("params", "step", "lr")} for g in o.param_groups]
            o.load_state_dict(s)  # the moments and step counts; the hyperparameters stay those of the flags now
            for g, f in zip(o.param_groups, flags):
                g.update(f)
        start = ckpt["step"]
    if ckpt is not None and start >= cfg.max_iters:  # a finished run: its files stay as they are
        if master:
            print(f"{cfg.out} is trained to step {start} of {cfg.max_iters}: nothing to do (a larger --max-iters "
                  "trains on)", flush=True)
        if ddp:
            torch.distributed.destroy_process_group()
        return model
    if cfg.wandb and master:  # before --out is written to
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb needs the wandb package: pip install wandb")
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * cfg.block_size
    if master:
        prepare_out(cfg, model, overwrite)
        with atomic(os.path.join(cfg.out, "run.json"), "w") as f:
            json.dump(run_info(cfg, device, paper, data), f, indent=1)
        log_path = os.path.join(cfg.out, "log.jsonl")
        kept = read_log(log_path) if ckpt is not None and os.path.exists(log_path) else []
        with open(log_path, "w") as f:  # drop what came after the checkpoint
            f.writelines(json.dumps(r) + "\n" for r in kept if r["step"] <= start)
        impls = model.attn_impls(device)
        epochs = (cfg.max_iters - start) * tokens_per_step / data.tokens("train")
        print(f"{paper.label(cfg)}: {model.num_params() / 1e6:.2f}M parameters "
              f"(compute), attention {'+'.join(impls)}, on {device}\ndata {data.path} ({data.tokenizer}, "
              f"{data.tokens('train'):,} train tokens): {cfg.max_iters - start} steps x {tokens_per_step:,} tokens "
              f"= {epochs:.3g} epochs" + (f"\nresumed from step {start} of {cfg.out}" if ckpt else ""), flush=True)
    wandb_run = wandb.init(project="attnlab", config=asdict(cfg)) if cfg.wandb and master else None

    compiled = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    fast = compiled
    if ddp:
        # no device_ids: the batch is already on the device, and DDP would move the host's document ids there too;
        # no buffer broadcast: the RoPE tables are the same everywhere
        fast = nn.parallel.DistributedDataParallel(compiled, broadcast_buffers=False)
    peak = peak_flops(device)
    flops_per_token = model.flops_per_token()
    t_last, it_last, loss_sum = time.time(), start, torch.zeros((), device=device)
    # SIGTERM: a checkpoint at the next logged step, then the end of Ctrl-C (the message names it, exit code 130)
    with CheckpointWriter(ckpt_path, start or None) as writer, on_sigterm() as sigterm, sigterm_spares_children():
        for it in range(start, cfg.max_iters):
            mult = lr_mult(it, cfg)
            for o in optimizers:
                for g in o.param_groups:
                    g["lr"] = g["base_lr"] * mult
            torch.manual_seed(cfg.seed + it)  # dropout masks depend on the step only: resume is exact
            for micro in range(cfg.grad_accum):
                x, y, doc = host_batch(model, *data.batch("train", cfg.batch_size, cfg.block_size, cfg.seed, it,
                                                          micro * world + rank), device)
                sync = not ddp or micro == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync else fast.no_sync()), autocast(device, cfg):
                    loss = fast(x, y, doc=doc) / cfg.grad_accum
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
            stopping = sigterm.is_set()
            if ddp:  # the mean loss, and every rank stops at the same step
                torch.distributed.all_reduce(loss_sum, op=torch.distributed.ReduceOp.AVG)
                flag = torch.tensor(float(stopping), device=device)
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                stopping = flag.item() > 0
            loss_val, norm_val = loss_sum.item() / (step - it_last), norm.item()
            if not (math.isfinite(loss_val) and math.isfinite(norm_val)):
                saved = writer.wait()
                kept = (f"the last good checkpoint ({ckpt_path}, step {saved}) is kept" if saved
                        else "no checkpoint written")
                raise ConfigError(f"training diverged: loss {loss_val} / grad norm {norm_val} before step {step}; "
                                  f"stopped, {kept}")
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.time() - t_last) / (step - it_last)
            rec = dict(step=step, loss=round(loss_val, 5), lr=optimizers[0].param_groups[0]["lr"],
                       tokens=step * tokens_per_step, tok_s=round(tokens_per_step / dt), ms=round(dt * 1e3, 2),
                       mfu=round(flops_per_token * tokens_per_step / dt / (peak * world), 4) if peak else None,
                       grad_norm=round(norm_val, 4), time=round(time.time(), 2),
                       mem_gb=round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
                       else None)
            if evaluate_now:
                rec["val_loss"] = round(estimate_loss(compiled, data, cfg, device, rank, world), 5)
                if master:  # only the master logs
                    with autocast(device, cfg):
                        rec.update(model.track(*data.batch("val", 1, cfg.block_size, cfg.seed, 0, 0, device)))
            if master:
                mfu = f"{100 * rec['mfu']:.1f}%" if peak else "n/a"
                val = f" | val {rec['val_loss']:.4f}" if evaluate_now else ""
                line = (f"step {step}/{cfg.max_iters} | loss {loss_val:.4f}{val} | {rec['tok_s'] / 1e3:.1f}k tok/s | "
                        f"MFU {mfu} | {rec['ms']:.1f} ms/step | ETA {fmt_time(dt * (cfg.max_iters - step))}")
                if model.paths:  # what the attention ran for batches with several documents, and how often
                    rec["doc_batches"] = share = round(model.paths["documents"] / sum(model.paths.values()), 3)
                    if share:
                        line += f" | {doc_path(impls)} in {100 * share:.0f}% of batches (documents)"
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if wandb_run:
                    wandb_run.log(rec, step=step)
                if evaluate_now or stopping:
                    writer.save(step, dict(format="attnlab", script=paper.name, variant=cfg.variant, config=asdict(cfg),
                                           data=data.info(), model=model.state_dict(), step=step,
                                           val_loss=rec.get("val_loss"),  # None: a SIGTERM's checkpoint
                                           optimizers=[o.state_dict() for o in optimizers]))
                    line += f" | saving {ckpt_path}"
                print(line, flush=True)
            if stopping and step < cfg.max_iters:
                raise KeyboardInterrupt("SIGTERM")
            loss_sum.zero_()
            t_last, it_last = time.time(), step  # eval and checkpoint time stay out of tokens/s
    if ddp:  # leave together: a rank tearing down while rank 0 still writes its checkpoint hung gloo
        # DDP's reducer first, while the world still holds the process group: freed (under the GIL) as the group's
        # last owner, it ran the group's destructor, which joined a gloo thread waiting for the GIL (a rare hang)
        del fast
        gc.collect()
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Eval, sampling, speed, loss plots

@torch.no_grad()
def evaluate(model, data, cfg, device, split="val", stop=None):
    """Loss over the whole split (or eval_tokens of it) in non-overlapping windows: nats, perplexity, bits. None if the
    event `stop` is set before the end (a SIGTERM: bench.py --compare scores the run when it is run again)."""
    model.eval()
    T = cfg.block_size
    total, count, windows = 0.0, 0, data.windows(split, T, cfg.eval_tokens)
    # tokens to score; a shard of no tokens (its header only) scores none, not (0 - 1) // T = -1 windows
    whole = sum(max(len(shard) - 1, 0) // T for shard in data.splits[split]) * T
    n = min(whole, -(-cfg.eval_tokens // T) * T) if cfg.eval_tokens else whole
    info = data.meta.get("splits", {}).get(split, {})
    lens, nbytes = None, 0  # a part of a BPE split: its bytes per token are not the split's, count the scored ones
    if n < whole and data.tokenizer != "bytes" and info.get("bytes"):
        try:
            tok = get_tokenizer(data.tokenizer)
            lens = np.array([0 if i == tok.eot_token else len(tok.token_bytes(i)) for i in range(tok.n_vocab)])
        except ConfigError:  # no tokenizer here (offline): no bits per byte rather than the split's ratio
            pass
    t0 = shown = time.time()
    while batch := list(itertools.islice(windows, cfg.batch_size)):
        if stop is not None and stop.is_set():
            return None
        xy = torch.stack(batch)  # (B, T + 1), on the host
        x, y, doc = host_batch(model, xy[:, :-1], xy[:, 1:], device)
        with autocast(device, cfg):
            total += model(x, y, doc=doc).item() * y.numel()
        count += y.numel()
        nbytes += int(lens[xy[:, 1:].numpy()].sum()) if lens is not None else 0
        if time.time() - shown > 10:  # long evaluations show progress
            shown, dt = time.time(), time.time() - t0
            print(f"{split}: {count:,} of {n:,} tokens | ETA {fmt_time(dt * (n - count) / count)}", file=sys.stderr,
                  flush=True)
    if not count:
        raise ConfigError(f"the {split} split is shorter than one window of {cfg.block_size + 1} tokens")
    loss = total / count
    res = dict(split=split, tokens=count, loss=loss, ppl=math.exp(min(loss, 50)), bits_per_token=loss / math.log(2))
    if data.tokenizer == "bytes":
        res["bpb"] = res["bits_per_token"]
    elif n < whole:  # --eval-tokens: bits per byte of the scored text
        if lens is not None and nbytes:
            res["bpb"] = res["bits_per_token"] * count / nbytes
    elif info.get("bytes") and info.get("tokens"):  # bits per byte of the scored text
        res["bpb"] = res["bits_per_token"] * info["tokens"] / info["bytes"]
    return res


def bench(cfg, build_model, steps=20, warmup=5, ready=None):
    """Train-step timing on random tokens: ms/step, tokens/s, MFU, peak memory. ready(), if given, is called between
    the warm-up and the timed steps (bench.py --jobs: wait for this row's turn)."""
    device = resolve_device(cfg)
    torch._dynamo.reset()  # a fresh compile cache: earlier models in this process must not eat the recompile limits
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    check_memory(cfg, model, device)
    fast = torch.compile(model) if cfg.compile and device.type == "cuda" else model
    optimizers = model.configure_optimizers(cfg, device.type)
    x = torch.randint(0, cfg.vocab_size, (cfg.batch_size, cfg.block_size + 1))
    x, y, doc = host_batch(model, x[:, :-1], x[:, 1:], device)  # document ids as in training (a separator or not)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with autocast(device, cfg):
            loss = fast(x, y, doc=doc)
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    if ready:
        ready()
    t0 = time.time()
    for _ in range(steps):
        step()
    sync()
    dt = (time.time() - t0) / steps
    tok_s = cfg.batch_size * cfg.block_size / dt
    peak = peak_flops(device)
    return dict(ms=dt * 1e3, tok_s=tok_s, mfu=model.flops_per_token() * tok_s / peak if peak else None,
                mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                params_m=model.num_params(False) / 1e6, paths=dict(model.paths))


def bench_line(r):
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
    mem = f"{r['mem_gb']:.1f} GiB" if r["mem_gb"] else "n/a"
    return f"{r['ms']:.1f} ms/step, {r['tok_s'] / 1e3:.1f}k tok/s, MFU {mfu}, peak {mem}"


def pyplot():
    """matplotlib's pyplot on the Agg backend (files, no display), imported only when a plot is made."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot
    return matplotlib.pyplot


def layout(fig):
    """tight_layout, then every title that runs past the figure's left or right edge (a long checkpoint path above a
    narrow figure) shrunk until it fits, and the layout redone: for the smaller titles, and because the first pass
    resizes the axes, so their ticks' and labels' widths change."""
    fig.tight_layout()
    r = fig.canvas.get_renderer()

    def outside(t):
        box = t.get_window_extent(r)
        return box.x0 < 0 or box.x1 > fig.bbox.width
    for t in [*fig.texts, *(ax.title for ax in fig.axes)]:
        while outside(t) and t.get_fontsize() > 4:
            t.set_fontsize(0.9 * t.get_fontsize())
    fig.tight_layout()


def read_log(path):
    path = os.path.join(path, "log.jsonl") if os.path.isdir(path) else path
    if not os.path.exists(path) or not path.endswith(".jsonl"):  # e.g. a checkpoint given for a run folder
        raise ConfigError(f"no training log at {path}")
    try:
        lines = [l for l in open(path, encoding="utf-8") if l.strip()]
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a training log (not UTF-8 text)") from None
    recs = []
    for i, l in enumerate(lines):
        try:
            recs.append(json.loads(l))
        except json.JSONDecodeError:
            if i < len(lines) - 1:  # a cut last line is a write the run did not finish; anything else is damage
                raise ConfigError(f"{path}: line {i + 1} is not JSON") from None
            continue
        if not isinstance(recs[-1], dict):
            raise ConfigError(f"{path}: line {i + 1} is not a JSON object (not a training log)")
    return recs


def run_dirs(cfg, args):
    """--out, then --runs: the runs an action compares, each once."""
    return list(dict.fromkeys(os.path.normpath(p) for p in [cfg.out, *args.runs]))


def run_label(path):
    """'dir (script/variant, dataset)' and the run's tokenizer, from its run.json (older runs: the directory name
    only)."""
    with contextlib.suppress(LookupError, TypeError, AttributeError):
        run = read_run(path)
        data = run.get("data") or {}
        model = run.get("label") or "/".join(filter(None, (run.get("script"), run["config"].get("variant"))))
        name = ", ".join(filter(None, (model, os.path.basename(data.get("path") or ""))))  # the model, its dataset
        return f"{os.path.basename(os.path.normpath(path))} ({name})", data.get("tokenizer")
    return os.path.basename(os.path.normpath(path)), None


def plot_runs(paths, out_png, title=""):
    """Train and val loss of several run directories side by side, from their log.jsonl. Losses per token of
    different tokenizers are not comparable: such a mix is refused."""
    plt = pyplot()
    runs = {p: run_label(p) for p in paths}
    toks = {tok for _, tok in runs.values() if tok}
    if len(toks) > 1:
        raise ConfigError("these runs use different tokenizers (" + ", ".join(f"{label}: {tok}" for label, tok in
                          runs.values()) + "): their losses are not comparable")
    unit = "byte" if toks == {"bytes"} else "token"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for path, (label, _) in runs.items():
        log = read_log(path)
        for ax, key in zip(axes, ("loss", "val_loss")):
            pts = [(r["step"], r[key]) for r in log if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label, marker="o" if key == "val_loss" else None, ms=3)
    for ax, name in zip(axes, ("train loss", "val loss")):
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} (nats per {unit})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    layout(fig)
    try:
        os.makedirs(os.path.dirname(out_png) or ".", exist_ok=True)
        fig.savefig(out_png, dpi=120)
    except OSError as e:
        raise ConfigError(f"cannot write {out_png}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------------------------------------------
# Command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


STANDARD_ACTIONS = {
    "train": "train a model (from scratch, --resume, or --init-from); the action when none is given",
    "eval": "score the whole val (and test) split with --init-from or <out>/ckpt.pt",
    "plot": "plot loss curves of --out (and --runs) to <out>/loss.png",
    "sample": "generate text from --init-from or <out>/ckpt.pt",
    "bench": "time training steps on random tokens (ms/step, tokens/s, MFU, memory)",
}


def build_parser(paper):
    cfg_cls = paper.config
    variants = "".join(f"\n  {k:<20} {v}" for k, v in cfg_cls.VARIANTS.items())
    p = _Parser(description=paper.doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"variants (--variant; the first is the default):{variants}" if variants else None)
    g = p.add_argument_group("actions")
    for name, help in {**STANDARD_ACTIONS, **{k: v[0] for k, v in paper.actions.items()}}.items():
        g.add_argument(f"--{name}", action="store_true", help=help)
    g.add_argument("--preset", choices=sorted(cfg_cls.PRESETS), help="named config, applied before other flags "
                   f"(with neither --preset nor --data: tiny on CPU, {paper.size_preset} on a GPU)")
    g.add_argument("--overwrite", action="store_true", help="--train into an --out that holds a run: start over")
    g.add_argument("--runs", nargs="*", default=[], help="more run directories: --plot compares their loss curves; "
                                                         "a paper's action may read them too")
    g.add_argument("--prompt", default="\n", help="--sample: prompt text")
    g.add_argument("--max-new-tokens", type=int, default=200, help="--sample: tokens to generate")
    g.add_argument("--temperature", type=float, default=0.8, help="--sample: temperature")
    g.add_argument("--top-k", type=int, default=200, help="--sample: top-k")
    for flag, kw in paper.flags.items():
        g.add_argument(flag, **kw)
    c = p.add_argument_group("config")
    for f in dataclasses.fields(cfg_cls):
        text = f.metadata.get("help", "")
        if f.name == "attn_impl":  # this script's paths (a paper's differ from the core's)
            text += f"; one of {', '.join(cfg_cls.ATTN_IMPLS)}"
        kw = dict(default=argparse.SUPPRESS, help=f"{text} (default: {f.default!r})")
        if f.type in (bool, "bool"):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = type(f.default)
        if f.name == "variant" and cfg_cls.VARIANTS:
            kw.update(choices=list(cfg_cls.VARIANTS), help=f"the model (default: {paper.main}; see below)")
        c.add_argument(f"--{f.name.replace('_', '-')}", **kw)
    return p


def configure(paper, args, chosen):
    """defaults <- preset <- the checkpoint's config (--resume: the run's; --init-from, --eval, --sample: its model)
    <- flags given now. -> (cfg, model or None, the run's checkpoint when resuming). A flag that contradicts the
    checkpoint's model, or a dataset of another tokenizer, is refused here, before any work."""
    given = {k: v for k, v in vars(args).items() if k in field_names(paper.config)}
    preset = args.preset
    bare = not (preset or {"data", "resume", "init_from"} & set(given)) and chosen in (["train"], ["bench"])
    gpu = bare and resolve_device(paper.config(**given)).type == "cuda"
    if bare:  # what suits the machine: tiny on a CPU; on a GPU the 124m class, ten passes over the embedded data
        preset = paper.size_preset if gpu else "tiny"
        if chosen == ["train"]:
            print(f"no --preset or --data: preset {preset} on the embedded Python tutorial; for a real run, prepare a "
                  "dataset (prepare.py text ...) and pass --data", flush=True)
    cfg = paper.config(**{**paper.config.PRESETS.get(preset, {}), **given})
    if gpu and chosen == ["train"] and "max_iters" not in given:
        steps = math.ceil(10 * TokenData(DEFAULT_DATA).tokens("train") / (cfg.batch_size * cfg.block_size))
        cfg = dataclasses.replace(cfg, max_iters=steps, warmup_iters=min(cfg.warmup_iters, steps // 10),
                                  eval_interval=min(cfg.eval_interval, steps // 5))
    cfg.out = cfg.out or paper.default_out(cfg)
    if cfg.resume and (args.overwrite or cfg.init_from):
        new = "--overwrite" if args.overwrite else "--init-from"
        raise ConfigError(f"--resume continues the run in {cfg.out}; {new} starts a new one: pass one of them")
    if "train" in chosen and not cfg.max_iters:
        raise ConfigError("--max-iters 0: nothing to train")
    info = model = ckpt = None
    schedule = []  # --resume: schedule flags that differ from the run's
    if cfg.resume or cfg.init_from or {"eval", "sample"} & set(chosen):
        path = os.path.join(cfg.out, "ckpt.pt") if cfg.resume or not cfg.init_from else cfg.init_from
        src, state, info, ckpt = read_model(paper, path, given)
        mine = refuse_contradictions(paper, src, given, path, training=cfg.resume or "train" in chosen)
        base = src if cfg.resume else {**paper.config.PRESETS.get(preset, {}), **{
            k: getattr(mine, k) for k in field_names(paper.config, run=False)}}
        cfg = config_from_dict(paper.config, base, **{**given, "out": cfg.out})
        if cfg.init_from and "out" not in given:  # the default folder of the model read, not of the flags' variant
            cfg.out = paper.default_out(cfg)
        schedule = [k for k in ("max_iters", "lr_decay_iters", "warmup_iters", "cooldown_frac", "schedule", "lr",
                                "min_lr") if cfg.resume and k in given and given[k] != src.get(k)]
        recorded = (info or {}).get("path") or src.get("data", "")  # older checkpoints: the config's data
        if cfg.resume and given.get("data") and recorded and os.path.abspath(given["data"]) != recorded:
            raise ConfigError(f"--data {given['data']} is not the run's dataset ({recorded}): --resume continues "
                              "the same run (--init-from starts a new one on other data)")
        cfg.data = cfg.data or recorded or ""
        if not cfg.data and set(chosen) - {"bench", "plot"}:
            raise ConfigError(f"the dataset of {path} is not recorded in it: pass --data")
        if cfg.data and not os.path.isdir(cfg.data):
            raise ConfigError(f"{path} was trained on {cfg.data}, which is not here: pass --data (a dataset with "
                              f"its tokenizer, {(info or {}).get('tokenizer', 'unknown')})")
        if "train" in chosen and not cfg.resume or {"eval", "sample"} & set(chosen):
            model_cfg = config_from_dict(paper.config, asdict(cfg), block_size=mine.block_size)
            model = load_state(paper.build_model(model_cfg), state, path)
    if not cfg.data and set(chosen) - set(STANDARD_ACTIONS):
        # a paper's action on trained models: the data they record (load_model refuses a model of another tokenizer)
        runs = [os.path.dirname(cfg.init_from) if cfg.init_from else cfg.out] + [
            r if os.path.isdir(r) else os.path.dirname(r) for r in args.runs]
        cfg.data = next((d for d in ((read_run(r).get("data") or {}).get("path") for r in runs)
                         if d and os.path.isdir(d)), "")
    if set(chosen) - {"bench", "plot"}:
        cfg.data = cfg.data or DEFAULT_DATA
        data = TokenData(cfg.data)
        cfg.fit_data(data)
        check_tokenizer(info, data)
        cfg.vocab_size = cfg.vocab_size or 64 * math.ceil(data.vocab_size / 64)  # padded to a multiple of 64
        if data.vocab_size > cfg.vocab_size:
            raise ConfigError(f"{cfg.data} has {data.vocab_size} token ids, more than the model's vocabulary "
                              f"({cfg.vocab_size})")
    cfg.vocab_size = cfg.vocab_size or RANDOM_VOCAB
    if schedule:  # after every check: a refused command stays one line
        print(f"note: {', '.join('--' + k.replace('_', '-') for k in schedule)} "
              f"{'differs' if len(schedule) == 1 else 'differ'} from the run's: its "
              f"learning-rate schedule changes from step {ckpt['step']} on", file=sys.stderr, flush=True)
    return cfg, model, (ckpt if cfg.resume else None)


def main(paper, argv=None):
    """The command line of every script: its PAPER's config fields as flags, the standard and the paper's actions."""
    try:
        args = build_parser(paper).parse_args(argv)
    except SystemExit as e:  # --help, or argparse's one-line error
        return e.code
    chosen = [a for a in (*STANDARD_ACTIONS, *paper.actions) if getattr(args, a.replace("-", "_"))] or ["train"]
    try:
        cfg, model, ckpt = configure(paper, args, chosen)
        for a in chosen:
            run_action(paper, a, cfg, args, model, ckpt)
    except (ConfigError, NotImplementedError) as e:  # NotImplementedError: torch's own, e.g. no flex backward on CPU
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print("interrupted" + (f": {e}" if e.args else ""), file=sys.stderr)
        return 130
    return 0


def run_action(paper, a, cfg, args, model, ckpt=None):
    device = resolve_device(cfg)
    if a == "train":
        train(paper, cfg, model, ckpt, args.overwrite)
    elif a == "eval":
        data = TokenData(cfg.data)
        model.to(device)
        print(f"{paper.name}/{model.cfg.label() or 'gpt'} on {cfg.data}:\n"
              f"{'split':<6} {'tokens':>12} {'loss':>8} {'ppl':>9} {'bits/tok':>9} {'bpb':>7}")
        for split in [s for s in ("val", "test") if s in data.splits]:
            r = evaluate(model, data, cfg, device, split)
            bpb = f"{r['bpb']:.4f}" if "bpb" in r else "n/a"
            print(f"{split:<6} {r['tokens']:>12,} {r['loss']:>8.4f} {r['ppl']:>9.2f} {r['bits_per_token']:>9.4f} "
                  f"{bpb:>7}")
    elif a == "plot":
        print(plot_runs(run_dirs(cfg, args), os.path.join(cfg.out, "loss.png"), title=f"{paper.name}: loss"))
    elif a == "sample":
        tok = get_tokenizer(TokenData(cfg.data).tokenizer)
        ids = tok.encode(args.prompt)
        if not ids or args.max_new_tokens < 0 or args.top_k < 0 or not args.temperature > 0:  # nan too
            raise ConfigError("--sample needs a non-empty --prompt, --max-new-tokens and --top-k >= 0, "
                              "--temperature > 0")
        idx = torch.tensor([ids], device=device)
        torch.manual_seed(cfg.seed)
        print(tok.decode(model.to(device).generate(idx, args.max_new_tokens, args.temperature, args.top_k)[0].tolist()))
    elif a == "bench":
        label = paper.label(cfg)
        print(f"{label}: timing 5 + 20 training steps of {cfg.batch_size} x {cfg.block_size} random tokens (vocabulary "
              f"{cfg.vocab_size:,}) on {device}", flush=True)
        print(f"{label}: {bench_line(bench(cfg, paper.build_model))}")
    else:
        check_out(cfg.out)
        paper.actions[a][1](cfg, args)


PAPER = Paper("core", Config, GPT, doc=__doc__, bench_rows={"bf16 residual": dict(residual_dtype="bfloat16")})

if __name__ == "__main__":
    sys.exit(main(PAPER))
