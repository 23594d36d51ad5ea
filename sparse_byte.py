"""Dense vs static-sparse byte-level transformers, attention-head metrics and head clustering.

Source: "Transformer Attention Analysis", a bachelor thesis (VU Amsterdam); no arXiv id. Official code:
github.com/thinhrick0101/vu_thesis_bachelor (sparse_transformer/sparse_attention.py, train_*.py,
pipeline/extract_head_metrics.py, pipeline/make_silhouette_plot_thesis.py). Sparse attention background:
Child et al. 2019, "Generating Long Sequences with Sparse Transformers", arXiv:1904.10509.

Method. A dense byte-level transformer (vocab 256, 12 layers, 8 heads, width 512) is trained on enwik8; each head is
described by three numbers measured on validation windows (entropy, sparsity, mean attention distance); clustering
the standardised numbers groups the heads (k = 4); each group becomes a static pattern, and a sparse model whose heads
use those patterns is trained and compared. The thesis's four patterns ("clusters", True = may attend, always
intersected with causality):
    0 focused-local  0 <= i-j <= 8        3 wider-local  0 <= i-j <= 16
    1 strided        0 <= i-j <= 32, or column j % 8 == 0
    2 global-anchor  column j % 16 == 0, or j in anchors(T) = {min(T-1, int(r (T-1)))},
                     r in 0, .1, .2, .3, .382, .5, .618, .7, .8, .9, 1 (anchors move with T, as in the thesis)
Heads are filled in the order 0, 3, 1, 2 with counts {0: 1, 3: 2, 1: 3, 2: 2} for 8 heads (tables for 6, 4, 2, 1).
The "strided" columns are absolute (Child's *fixed* pattern with c = 1), not Child's relative (i-j) % l == 0: the
code decides. Metrics (extract_head_metrics.py) per sequence and head, A = probs / (row sum + 1e-9) over all T x T:
entropy = mean_i -sum_j A ln(A + 1e-9); sparsity = mean_ij [A < 1e-4]; distance = sum A |i-j| / sum A; then the mean
over the first 10 non-overlapping val windows of 1024 bytes.

Fast path. Column patterns touch every key block, so a BlockMask over the plain keys would be dense. We attend over an
extended key sequence [K ; K at the j % 8 columns ; K at the global columns] (each region padded to 128): local heads
use the band of the first region, strided heads the band without its j % 8 columns plus the gathered columns, global
heads only their gathered columns. The softmax sees exactly the thesis's key set, and FlexAttention skips the empty
128 x 128 blocks: 0.45 / 0.17 / 0.12 of dense causal's blocks at T = 1024 / 4096 / 8192 (the allowed entries
are 0.097 / 0.071 / 0.067 of causal's). The GPU default (auto) is --attn-impl triton, a fused FlashAttention-2-style
kernel with arithmetic masks instead: per query block it visits the band's tiles and tiles of columns read in place
(K and V rows a stride apart, the anchors as a 16-row tile), so it touches no extended copy and evaluates no
per-element lookup: 3.4-4.5x faster than flex in fwd+bwd on an H100 (without Triton, auto falls back to flex). The
eager path (the spec) masks the full T x T scores.

Mask. The thesis's default SDPA path builds its mask as "True = mask out" and passes it to
F.scaled_dot_product_attention, which reads True as "attend" (sparse_attention.py:293, 320; its manual path, taken only
with need_weights, masks correctly): every head of its sparse model attends to all later positions (the byte it predicts
among them) and to exactly the earlier keys its pattern excludes; the band heads never see their own position or their
band. We implement the intended causal patterns; --inverted-mask computes the as-run inverse (sdpa and eager paths,
record mode included), and the thesis's sparse checkpoints load with it, so they evaluate as they were trained and
evaluated (--no-inverted-mask: the same weights under the intended mask).

Deviations. By default (--body ours) both variants share core's GPT-2 body (pre-norm LayerNorm, learned positions, GELU
MLP of 2048, tied head), so they differ only in attention. --body thesis (presets thesis-dense, thesis-sparse; the
thesis's checkpoints load into it) builds the thesis's own two models around the same attention modules: the sparse one
with sinusoidal positions, embeddings x sqrt(512), a ReLU MLP, no final norm and an output bias; the dense one with a
learned position scale and MLP, a SiLU MLP of 4096, residual gains, growing dropouts, stochastic depth and its init and
weight-decay groups (section "Checkpoints of the original code"). There, token dropout and stochastic depth draw from
torch's generator (seeded per step), not Python's; training is bf16 autocast, not fp16 with a GradScaler; there is no
gradient checkpointing (it saves memory, not math). Batches are random windows (core), not the thesis's fixed order, and
there is no early stopping; --num-epochs E sets max_iters = E * (train bytes // (batch_size * block_size)) // grad_accum
(the thesis's step count). min_lr 1e-9: the thesis passes min_lr=1e-5 as a ratio of lr 1e-4. The flex and triton paths
have no attention-probability dropout. The thesis splits enwik8 90/10 and reports loss; we use the standard 90M/5M/5M
split and bits per byte on val and test, following Child et al. 2019. k-means replaces the thesis plot's Ward
clustering, as asked. Head counts without a table use the intent of the thesis's fallback (one head per cluster in order
0, 1, 2, 3, then round-robin); its code crashes there.

    python prepare.py enwik8
    python sparse_byte.py --train --preset thesis --variant sparse --data data/enwik8 --num-epochs 20 --out runs/sparse
    python sparse_byte.py --eval --out runs/sparse --data data/enwik8              # bits per byte, val and test
    python sparse_byte.py --metrics --out runs/sparse --data data/enwik8           # runs/sparse/head_metrics.csv
    python sparse_byte.py --cluster --runs runs/dense runs/sparse --out runs/heads  # silhouettes, scatter
    python sparse_byte.py --kernel-bench --preset thesis --out runs/bench          # GPU: sparse vs dense attention
    python sparse_byte.py --eval --init-from models/sparse_seed_42.pt --data data/enwik8  # a thesis file, as run
    python sparse_byte.py --train --preset thesis-sparse --data data/enwik8 --out runs/thesis_sparse  # its own body
"""
import csv
import functools
import json
import math
import os
import re
import textwrap
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

import core
from core import triton, tl  # optional: without Triton the eager and flex paths still work


# ----------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class SparseByteConfig(core.Config):
    seq_length: int = core.opt(0, "thesis --seq_length: sets block_size (0: keep --block-size)")
    num_epochs: float = core.opt(0.0, "thesis --num_epochs: sets max_iters = epochs * (train tokens // (batch_size "
                                      "* block_size)) // (grad_accum * processes) (0: keep --max-iters)", True)
    mask_subset: str = core.opt("0123", "sparse: thesis clusters kept (0 local i-j <= 8, 3 local <= 16, 1 strided, "
                                        "2 global)")
    body: str = core.opt("ours", "ours (core GPT-2 body) or thesis (the thesis's own: dense EnhancedCharTransformer, "
                                 "sparse SparseByteTransformer; always with biases)")
    inverted_mask: bool = core.opt(False, "sparse: the thesis's as-run SDPA mask, the inverse of the pattern: the "
                                          "future and the past keys the pattern excludes (thesis checkpoints load "
                                          "with it)", override=True)
    token_dropout: float = core.opt(0.0, "thesis body: a dropped byte becomes byte 0 (dense) or a zero embedding "
                                         "(sparse)", True)
    drop_path: float = core.opt(0.0, "thesis dense body: stochastic depth, layer i skipped with p = drop_path * i / L",
                                True)

    PRESETS = {**core.Config.PRESETS,
               "thesis": dict(vocab_size=256, n_layer=12, n_head=8, n_embd=512, mlp_hidden=2048, bias=True,
                              block_size=1024, dropout=0.05, batch_size=32, grad_accum=4, lr=1e-4, min_lr=1e-9,
                              warmup_iters=1000, weight_decay=0.1, beta2=0.999, grad_clip=1.0)}
    PRESETS.update({  # the thesis's own models and their train scripts' dropouts (train_*_transformer.py)
        "thesis-dense": dict(PRESETS["thesis"], body="thesis", variant="dense", mlp_hidden=4096, dropout=0.1,
                             token_dropout=0.05, drop_path=0.1),
        "thesis-sparse": dict(PRESETS["thesis"], body="thesis", variant="sparse", token_dropout=0.02)})
    VARIANTS = {"sparse": "the thesis's four static per-head patterns (local, wider local, strided, global)",
                "dense": "full causal attention in every head (the thesis's baseline)"}
    ATTN_IMPLS = core.Config.ATTN_IMPLS + ("triton",)

    def __post_init__(self):
        if self.seq_length:  # the thesis's knobs are consumed: the saved config holds block_size / max_iters
            self.block_size, self.seq_length = self.seq_length, 0
        self.bias = self.bias or self.body == "thesis"  # every Linear and LayerNorm of the thesis's models has one
        super().__post_init__()
        if self.inverted_mask and self.variant != "sparse":
            raise core.ConfigError("--inverted-mask is the sparse variant's as-run mask")
        if self.variant == "sparse" and self.attn_impl not in (("auto", "eager", "sdpa") if self.inverted_mask else
                                                               ("auto", "eager", "flex", "triton")):
            raise core.ConfigError("the sparse variant runs --attn-impl auto, flex (block-sparse), triton (fused "
                                   "kernel) or eager (masked reference); with --inverted-mask auto, sdpa (dense, "
                                   f"masked) or eager, not {self.attn_impl!r}")
        if self.body not in ("ours", "thesis") or self.body == "thesis" and self.family != "gpt2":
            raise core.ConfigError(f"--body must be ours or thesis (which takes no --family), not {self.body!r}")
        if not (0 <= self.token_dropout < 1 and 0 <= self.drop_path < 1):
            raise core.ConfigError("--token-dropout and --drop-path must be in [0, 1)")
        if self.drop_path and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise core.ConfigError("--drop-path skips whole layers, which DDP refuses (unused parameters): one process")
        if self.variant == "dense" and self.attn_impl == "triton":
            raise core.ConfigError("--attn-impl triton is the sparse variant's kernel (dense: auto, sdpa, flex, ...)")
        if not self.mask_subset or set(self.mask_subset) - set("0123"):
            raise core.ConfigError(f"--mask-subset takes cluster ids 0-3 (e.g. 0123 or 03), not {self.mask_subset!r}")
        if not 0 <= self.num_epochs < math.inf:  # nan fails both
            raise core.ConfigError(f"--num-epochs must be a finite number >= 0, not {self.num_epochs}")
        if self.body == "thesis" and self.n_embd % 2:
            raise core.ConfigError("--body thesis needs an even --n-embd (its sinusoidal position table)")

    def fit_data(self, data):
        if self.num_epochs:  # consumed: the saved config holds max_iters
            batches = (data.tokens("train") - 1) // (self.batch_size * self.block_size)  # the thesis's create_batches
            world = int(os.environ.get("WORLD_SIZE", 1))  # DDP: each step reads grad_accum batches per process
            self.max_iters = max(1, int(self.num_epochs * batches) // (self.grad_accum * world))
            self.num_epochs = 0.0


# ----------------------------------------------------------------------------------------------------------------
# The paper's math: the thesis's static patterns (the spec), the attention, the models

LOCAL, STRIDED, GLOBAL, WIDE = 0, 1, 2, 3  # the thesis's cluster ids
HEAD_COUNTS = {8: {0: 1, 3: 2, 1: 3, 2: 2}, 6: {0: 1, 3: 1, 1: 2, 2: 2}, 4: {0: 1, 3: 1, 1: 1, 2: 1},
               2: {0: 1, 1: 1}, 1: {0: 1}}
REACH = {LOCAL: 8, WIDE: 16, STRIDED: 32, GLOBAL: -1}  # causal half of the local window (window // 2); -1: none
STRIDE = {STRIDED: 8, GLOBAL: 16}
ANCHORS = (0.0, 0.1, 0.2, 0.3, 0.382, 0.5, 0.618, 0.7, 0.8, 0.9, 1.0)


def head_clusters(n_head, subset="0123"):
    """Cluster id of each head, filled in the thesis's order; --mask-subset drops clusters and hands their heads
    round-robin to the kept ones (none kept: all heads focused-local)."""
    counts = HEAD_COUNTS.get(n_head)
    if counts is None:  # the intent of the thesis's fallback (its code crashes here)
        counts = dict.fromkeys((LOCAL, STRIDED, GLOBAL, WIDE), 0)
        for i in range(n_head):
            counts[i % 4] += 1
    kept = {c: n for c, n in counts.items() if str(c) in subset} or {LOCAL: 0}
    order = list(kept)
    for i in range(n_head - sum(kept.values())):
        kept[order[i % len(order)]] += 1
    return [c for c, n in kept.items() for _ in range(n)]


def columns(c, T):
    """Absolute key columns a strided / global head sees (then cut causally). The thesis skips the stride when
    T < stride; column 0 is then in the band (strided) or an anchor (global), so including it changes nothing."""
    cols = set(range(0, T, STRIDE[c]))
    if c == GLOBAL:
        cols |= {min(T - 1, int(r * (T - 1))) for r in ANCHORS}  # Python floats, as the thesis
    return sorted(cols)


def pattern_mask(clusters, T, device=None):
    """The spec: (H, T, T) bool, True = head h's query i may attend key j."""
    i, j = torch.arange(T, device=device)[:, None], torch.arange(T, device=device)[None, :]
    masks = []
    for c in clusters:
        m = i - j <= REACH[c]
        if c in STRIDE:
            m = m | torch.isin(j, torch.tensor(columns(c, T), device=device))
        masks.append(m & (j <= i))
    return torch.stack(masks)


def allowed_counts(c, T):
    """Keys per query row of cluster c, in closed form: the band plus the columns left of it. (T,) int64."""
    i, r = torch.arange(T), REACH[c]
    band = i.clamp(max=r) + 1 if r >= 0 else torch.zeros_like(i)
    if c not in STRIDE:
        return band
    return band + torch.searchsorted(torch.tensor(columns(c, T)), i - r)  # columns j < i - r


class SparseAttention(core.Attention):
    """The thesis's static per-head patterns: block-sparse FlexAttention, the fused Triton kernel, eager masked
    reference."""
    FAST, FAST_CPU = "triton", "eager"  # CPU FlexAttention has no backward

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.clusters = head_clusters(cfg.n_head, cfg.mask_subset)

    def attend(self, q, k, v, ctx):
        if ctx.doc is not None:
            raise core.ConfigError("the sparse variant has no document masking (the thesis reads one byte stream)")
        return super().attend(q, k, v, ctx)

    def impl(self, device):
        return "sdpa" if self.cfg.inverted_mask and self.cfg.attn_impl == "auto" else super().impl(device)

    def eager_mask(self, T, S, ctx, device):
        """(H, T, T), True = attend. --inverted-mask: its inverse, what the thesis's default path computes
        (sparse_attention.py:293 makes "True = mask out", which F.scaled_dot_product_attention reads as "attend")."""
        if ("mask", T) not in ctx.cache:  # one per forward, shared by the layers
            mask = pattern_mask(self.clusters, T, device)
            ctx.cache["mask", T] = ~mask if self.cfg.inverted_mask else mask
        return ctx.cache["mask", T]

    def attend_sdpa(self, q, k, v, ctx):
        """--inverted-mask: dense SDPA with the boolean mask, the thesis's own call (sparse_attention.py:320)."""
        mask = self.eager_mask(q.size(-2), k.size(-2), ctx, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)

    def block_mask(self, ctx, T, device):
        """(src, BlockMask) of the pattern at length T, built once per forward and shared by the layers."""
        key = ("sparse", tuple(self.clusters), T)
        if key not in ctx.cache:
            ctx.cache[key] = sparse_block_mask(*key[1:], device)
        return ctx.cache[key]

    def attend_flex(self, q, k, v, ctx):
        src, mask = self.block_mask(ctx, q.size(-2), q.device)  # SparseGPT.context built it before the layers
        k, v = extend(k, src), extend(v, src)  # (B, H, S, D)
        try:
            return core.flex_attention(q, k, v, block_mask=mask)
        except NotImplementedError as e:  # torch's own check: no FlexAttention backward on CPU
            raise core.ConfigError(f"{e} Train on CPU with --attn-impl eager (or auto).") from None

    def attend_triton(self, q, k, v, ctx):
        if not core.triton_ok(q):
            core.warn_once("the sparse Triton kernel cannot run here (no triton/GPU, or head dim not 16..128): flex")
            return self.attend_flex(q, k, v, ctx)
        key = ("sparse-triton", tuple(self.clusters), q.size(-2))
        if key not in ctx.cache:
            ctx.cache[key] = triton_pattern(self.clusters, q.size(-2), q.device)
        return sparse_attention_triton(q, k, v, *ctx.cache[key])


class SparseGPT(core.GPT):
    @property
    def length_free(self):
        """Not with global heads (their anchors move with T: padding moves them) nor --inverted-mask (later keys)."""
        attn = self.transformer.h[0].attn
        return not isinstance(attn, SparseAttention) or GLOBAL not in attn.clusters and not self.cfg.inverted_mask

    def context(self, idx, doc=None, record=None):
        ctx = super().context(idx, doc, record)
        attn = self.transformer.h[0].attn
        if isinstance(attn, SparseAttention) and attn.impl(idx.device) == "flex" and record is None:
            attn.block_mask(ctx, idx.size(1), idx.device)  # outside the layers: their compiled graphs have no break
        return ctx


# ----------------------------------------------------------------------------------------------------------------
# The thesis's own bodies (--body thesis)
#
# Both keep our attention modules (c_attn = [W_q; W_k; W_v]: record mode, pattern masks, fast paths) and the core
# GPT's forward; around them, sparse: sparse_byte_transformer.py, sparse_attention.py:391-419; dense:
# stable_char_transformer.py:120-437 (see the docstring's Deviations).


class ThesisPositions(nn.Module):
    """ImprovedPositionalEncoding of either model: pe[t, 2i] = sin(t w_i), pe[t, 2i + 1] = cos(t w_i)."""

    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        t = torch.arange(cfg.block_size, dtype=torch.float, device="cpu")[:, None]
        w = torch.exp(torch.arange(0, C, 2, device="cpu").float() * (-math.log(10000.0) / C))
        pe = torch.zeros(cfg.block_size, C, device="cpu")  # on the CPU with the thesis's ops: its very table
        pe[:, 0::2], pe[:, 1::2] = torch.sin(t * w), torch.cos(t * w)
        self.register_buffer("pe", pe, persistent=False)
        if cfg.variant == "dense":
            self.alpha, self.norm = nn.Parameter(torch.ones(1)), nn.LayerNorm(C)
            self.mlp = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(C, C),
                                     nn.Dropout(cfg.dropout))
            self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        pe = self.pe[:x.size(1)]  # (T, C)
        if not hasattr(self, "alpha"):
            return x + pe
        x = x + self.alpha * pe
        return x + self.drop(self.mlp(self.norm(x)))


class ThesisBlock(nn.Module):
    """One pre-norm layer of the thesis: x + drop(g1 attn(norm_1 x)), then x + drop(g2 mlp(norm_2 x))."""

    def __init__(self, cfg, attn, layer):
        super().__init__()
        C, p, self.layer, dense = cfg.n_embd, cfg.dropout, layer, cfg.variant == "dense"
        eps = 1e-6 if dense else 1e-5
        self.norm_1, self.attn, self.norm_2 = nn.LayerNorm(C, eps=eps), attn, nn.LayerNorm(C, eps=eps)
        p_out = min(p * (1 + 0.1 * layer), 0.5) if dense else p
        mlp = [nn.Linear(C, cfg.hidden), nn.SiLU() if dense else nn.ReLU(), nn.Dropout(p), nn.Linear(cfg.hidden, C)]
        self.mlp = nn.Sequential(*mlp, nn.Dropout(p_out)) if dense else nn.Sequential(*mlp)
        self.drop = nn.Dropout(p_out)
        if dense:
            self.gain_1, self.gain_2 = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
            attn.dropout = min(p * (1 + 0.05 * layer), 0.4)

    def forward(self, x, ctx):
        if ctx.cache.get("skip", {}).get(self.layer):  # stochastic depth (ThesisGPT.context)
            return x
        g1, g2 = (self.gain_1, self.gain_2) if hasattr(self, "gain_1") else (1.0, 1.0)
        x = x + self.drop(g1 * self.attn(self.norm_1(x), ctx))
        return x + self.drop(g2 * self.mlp(self.norm_2(x)))


class ThesisGPT(SparseGPT):
    """The thesis's own models around our attention modules (--body thesis)."""

    def __init__(self, cfg, make_attn):
        super().__init__(cfg, make_attn)
        t, C = self.transformer, cfg.n_embd
        del t["wpe"]
        t.pos = ThesisPositions(cfg)
        t.h = nn.ModuleList(ThesisBlock(cfg, block.attn, i) for i, block in enumerate(t.h))
        t.norm_f = nn.LayerNorm(C, eps=1e-6) if cfg.variant == "dense" else nn.Identity()
        self.lm_head = nn.Linear(C, cfg.vocab_size)  # with a bias; its weight tied to the embedding
        self.lm_head.weight = t.wte.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """PyTorch's defaults, which the sparse model keeps (its tied weight: the embedding's N(0, 1)); the dense model
        sets embedding N(0, 0.02), output bias 0, MLPs truncated N(0, 0.02) in +-0.04 and the position MLP N(0, 0.02)
        with zero biases, and nn.MultiheadAttention's xavier-uniform in_proj with zero biases."""
        if "pos" not in self.transformer:  # core.GPT.__init__'s call, before the thesis's modules exist
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                m.reset_parameters()
        t, dense = self.transformer, self.cfg.variant == "dense"
        nn.init.normal_(t.wte.weight, 0.0, std if dense else 1.0)
        if not dense:
            return
        for block in t.h:
            nn.init.xavier_uniform_(block.attn.c_attn.weight)
            for lin in (block.mlp[0], block.mlp[3]):
                nn.init.trunc_normal_(lin.weight, 0.0, std, -2 * std, 2 * std)
        for lin in (t.pos.mlp[0], t.pos.mlp[3]):
            nn.init.normal_(lin.weight, 0.0, std)
        for name, p in self.named_parameters():
            if name.endswith(".bias"):  # all of them start at 0 (the norms' by default)
                nn.init.zeros_(p)

    def context(self, idx, doc=None, record=None):
        ctx = super().context(idx, doc, record)
        if self.training and self.cfg.drop_path:  # layer i > 0 skipped with p = drop_path * i / L, drawn per forward
            L = self.cfg.n_layer
            p = torch.arange(L) * self.cfg.drop_path / L
            ctx.cache["skip"] = dict(enumerate((torch.rand(L) < p).tolist()))
        return ctx

    def embed(self, idx, ctx):
        p, dense = self.cfg.token_dropout if self.training else 0.0, self.cfg.variant == "dense"
        if p and dense:  # a dropped byte becomes byte 0
            idx = idx.masked_fill(torch.rand(idx.shape, device=idx.device) < p, 0)
        x = self.transformer.wte(idx) * math.sqrt(self.cfg.n_embd)  # (B, T, C)
        if p and not dense:  # a dropped byte's embedding becomes 0
            x = x.masked_fill((torch.rand(idx.shape, device=idx.device) < p)[..., None], 0.0)
        return self.transformer.drop(self.transformer.pos(x))

    def decays(self, name, p):
        """AdamW as the thesis groups it (stable_char_transformer.py:943): its no-decay names 'bias' and
        'LayerNorm.weight' match only biases (the norms are named norm*), so norm weights and gains decay too."""
        return "bias" not in name


ATTENTION = {"dense": core.Attention, "sparse": SparseAttention}


def build_model(cfg):
    model = (ThesisGPT if cfg.body == "thesis" else SparseGPT)(cfg, ATTENTION[cfg.variant])
    if cfg.variant == "sparse" and cfg.dropout and model.transformer.h[0].attn.impl(core.resolve_device(cfg)) in (
            "flex", "triton"):
        core.warn_once("the sparse flex and triton paths have no dropout on attention probabilities (the rest of the "
                       "model has)")
    return model


# ----------------------------------------------------------------------------------------------------------------
# The thesis's checkpoint files

# The thesis's files: {'model_state_dict', 'config', 'train_losses', 'val_losses', 'seed'} (train_*_transformer.py);
# extract_head_metrics.py also reads {'model': ...} and bare state_dicts. Key names -> ours, in order:
THESIS_KEYS = (
    (r"^(embedding|token_embedding)\.", "transformer.wte."), (r"^(output|output_projection)\.", "lm_head."),
    (r"^pos_encoder\.position_ff\.", "transformer.pos.mlp."), (r"^pos_encoder\.", "transformer.pos."),
    (r"^(transformer_blocks|transformer_encoder)\.", "transformer.h."), (r"^norm\.", "transformer.norm_f."),
    (r"\.self_attn\.in_proj_", ".attn.c_attn."), (r"\.self_attn\.out_proj\.", ".attn.c_proj."),
    (r"\.self_attn\.", ".attn."), (r"\.norm([12])\.", r".norm_\1."), (r"\.gamma([12])$", r".gain_\1"),
    (r"\.feed_forward\.", ".mlp."), (r"\.linear1\.", ".mlp.0."), (r"\.linear2\.", ".mlp.3."))


def from_thesis(ckpt, path, given=None):
    """A thesis checkpoint -> (SparseByteConfig with body 'thesis', our state_dict), None for another format. The
    dense model (EnhancedCharTransformer: nn.MultiheadAttention's in_proj is already c_attn) or the sparse one
    (SparseByteTransformer: q/k/v_proj stacked into c_attn), told apart by their keys. A sparse file loads with
    --inverted-mask, the mask its weights were trained and evaluated with (its default SDPA path)."""
    sd = ckpt.get("model_state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else None
    sd = core.strip_prefix(sd) if isinstance(sd, dict) else None  # a compiled model's keys
    first = {"dense": "transformer_blocks.0.self_attn.in_proj_weight",
             "sparse": "transformer_encoder.0.self_attn.q_proj.weight"}
    variant = next((v for v, k in first.items() if sd and k in sd), None)
    if variant is None:
        return None
    # files without a config: the train scripts' values (extract_head_metrics.py builds the dense model with nhead 8)
    p = SparseByteConfig.PRESETS["thesis-" + variant]
    conf = {"nhead": p["n_head"], "seq_length": p["block_size"], "dropout": p["dropout"],
            "token_dropout": p["token_dropout"], "stochastic_depth_prob": p.get("drop_path", 0.0),
            **(ckpt.get("config") or {})}
    state = {}
    for k, v in sd.items():
        for pattern, ours in THESIS_KEYS:
            k = re.sub(pattern, ours, k)
        state[k] = v
    for k in [k for k in state if k.endswith((".attn.q_proj.weight", ".attn.q_proj.bias"))]:
        qkv = [k.replace(".q_", f".{n}_") for n in "qkv"]
        if all(n in state for n in qkv):
            state[k.replace(".q_proj.", ".c_attn.")] = torch.cat([state.pop(n) for n in qkv])
    pe = state.pop("transformer.pos.pe", None)  # recomputed (ThesisPositions); the sparse model's is (1, T, C)
    if "transformer.wte.weight" not in state or "transformer.h.0.mlp.0.weight" not in state:
        raise core.ConfigError(f"{path}: a thesis {variant} model without its embedding or first MLP")
    if variant == "dense" and any(conf.get(k, conf["dropout"]) != conf["dropout"]
                                  for k in ("attention_dropout", "activation_dropout")):
        core.warn_once(f"{path}: attention and activation dropout differ from dropout; --body thesis uses dropout")
    V, C = state["transformer.wte.weight"].shape
    cfg = SparseByteConfig(
        body="thesis", variant=variant, vocab_size=V, n_embd=C, n_head=conf["nhead"], bias=True,
        n_layer=len({k.split(".")[2] for k in state if k.startswith("transformer.h.")}),
        mlp_hidden=state["transformer.h.0.mlp.0.weight"].shape[0], dropout=conf["dropout"],
        block_size=pe.shape[-2] if variant == "sparse" and pe is not None else conf["seq_length"],
        token_dropout=conf["token_dropout"], drop_path=conf["stochastic_depth_prob"] if variant == "dense" else 0.0,
        mask_subset=str(conf.get("mask_subset", "0123")), inverted_mask=variant == "sparse")
    return cfg, state


# ----------------------------------------------------------------------------------------------------------------
# FlexAttention fast path: the pattern's keys as one extended key sequence, block-sparse

BLOCK = 128            # FlexAttention's default block; every key region is padded to it
MAIN, PAD = -1, -2     # region ids of the extended keys (column regions use their cluster id)


def kv_layout(clusters, T, device=None):
    """The extended keys: src (S,) = source position of each key, region (S,) = MAIN, a column cluster or PAD."""
    src, region = [], []
    for reg, pos in [(MAIN, range(T))] + [(c, columns(c, T)) for c in (STRIDED, GLOBAL) if c in clusters]:
        pad = -len(pos) % BLOCK
        src += [*pos, *[0] * pad]
        region += [reg] * len(pos) + [PAD] * pad
    return torch.tensor(src, device=device), torch.tensor(region, device=device)


def sparse_mask_mod(clusters, src, region):
    """FlexAttention mask over (query, extended key): the thesis's key set, each key exactly once."""
    head_c = torch.tensor(clusters, device=src.device)
    reach = torch.tensor([REACH[c] for c in clusters], device=src.device)

    def mask_mod(b, h, q_idx, kv_idx):
        j, r, c = src[kv_idx], region[kv_idx], head_c[h]
        band = (r == MAIN) & (q_idx - j <= reach[h]) & ~((c == STRIDED) & (j % STRIDE[STRIDED] == 0))
        return (j <= q_idx) & (band | (r == c))
    return mask_mod


def extend(x, src):
    """(B, H, T, D) -> (B, H, S, D) keys or values in the extended layout. src[:T] is arange(T), so the first
    region is x itself: its backward is a slice, only the few gathered columns scatter-add."""
    return torch.cat([x, x.index_select(2, src[x.size(2):])], dim=2)


def computed_blocks(block_mask):
    """Tiles the flex kernel visits (partial + full)."""
    n = block_mask.kv_num_blocks.sum()
    return int(n + (block_mask.full_kv_num_blocks.sum() if block_mask.full_kv_num_blocks is not None else 0))


@torch.compiler.disable
@functools.cache
def sparse_block_mask(clusters, T, device):
    """(src, BlockMask) of one head assignment at length T. The pattern is static: built once per process,
    outside the model's compiled graph (traced inside it, it was rebuilt every step). On GPU the builder is compiled
    with dynamic shapes: it never materialises the (H, T, S) grid (eager: 9 GiB at T=8192), and a static compile
    (create_block_mask's _compile) spent minutes in ptxas at T=8192 on the H100."""
    src, region = kv_layout(clusters, T, device)
    return src, block_mask_builder(device)(sparse_mask_mod(clusters, src, region), None, len(clusters), T, len(src),
                                           device=device)


def block_mask_builder(device):
    """create_block_mask, compiled with dynamic shapes on GPU (see sparse_block_mask)."""
    return torch.compile(create_block_mask, dynamic=True) if device.type == "cuda" else create_block_mask


# ----------------------------------------------------------------------------------------------------------------
# The fused Triton kernel (FlashAttention-2 over the pattern's tiles only)
#
# Per query block [m0, m1) and head, three key ranges, masked arithmetically (d = i - j):
#   band     keys m0 - reach .. m1 - 1, entries 0 <= d <= reach
#   columns  keys stride * n for n < cdiv(m1, stride), loaded in place (rows of K and V stride apart), d > reach
#   anchors  the global head's anchors off its stride (<= 16 positions), d > reach
# d > reach is causal since reach >= -1, and a column within the band is counted by the band only: each key once.
# The backward's dK/dV programs own either a block of plain keys (its band queries; column keys are not stored)
# or a block of one head's columns (every query i >= j), so each row of dK and dV has one writer.

N_ANCHOR = 16  # anchor slots per head (11 ratios), one tile


def triton_pattern(clusters, T, device=None):
    """The kernel's per-head parameters: (H, 4 + N_ANCHOR) int32 rows [reach, stride, strided columns, anchors,
    anchor positions off the stride (padding T)], and the most columns of a head (the dK/dV grid)."""
    rows = []
    for c in clusters:
        s = STRIDE.get(c, 1)
        n_strided = -(-T // s) if c in STRIDE else 0
        anchors = [j for j in columns(c, T) if j % s] if c in STRIDE else []
        rows.append([REACH[c], s, n_strided, len(anchors), *anchors, *[T] * (N_ANCHOR - len(anchors))])
    return torch.tensor(rows, dtype=torch.int32, device=device), max(r[2] + r[3] for r in rows)


if triton is not None:
    # (BLOCK_M, BLOCK_N, warps, stages) candidates for sm_90 at D = 64; a forced sweep over the whole pattern
    # (BENCHMARKS.md) put 64 x 32 (fwd, dQ) and 64 x 64 (dK/dV) on 4 warps first, the autotuner picks by kernel time
    _FWD = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)]
    _DKDV = [(64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)]
    _DQ = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 4)]
    _KEY = ["T_BUCKET", "D"]

    @triton.jit
    def _keys(idx, hi, S, NS, anch_ptr, MODE: tl.constexpr):
        """Key positions of a tile of indices (valid: < hi). MODE 0: the band's own positions; 1: column n -> S * n;
        2: the same for n < NS, else the anchor n - NS. Mode 1 loads no index: the long column loops stay plain."""
        j = idx
        if MODE == 1:
            j = idx * S
        if MODE == 2:
            j = tl.where(idx < NS, idx * S, tl.load(anch_ptr + idx - NS, mask=(idx >= NS) & (idx < hi), other=0))
        return j, idx < hi

    @triton.jit
    def _mask(i, j, ok, R, MODE: tl.constexpr):
        """Allowed entries of queries i and keys j (broadcast against each other; ok: j in its range). The band:
        0 <= i - j <= R, one unsigned compare of the difference; its keys past the range lie past every stored
        query row, so ok is implied. The columns: i > j + R, one compare per entry against a per-key bound that no
        query passes for a key out of range."""
        if MODE == 0:
            keep = (i - j).to(tl.uint32, bitcast=True) <= R.to(tl.uint32, bitcast=True)  # R >= 0 where it runs
        else:
            keep = i > tl.where(ok, j + R, 2147483647)
        return keep

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, skt, svt, offs_m, lo, hi, R, S, NS, anch_ptr, qk_scale,
                   D: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_d = tl.arange(0, D)
        for start in range(lo, hi, BLOCK_N):
            j, ok = _keys(start + tl.arange(0, BLOCK_N), hi, S, NS, anch_ptr, MODE)
            kT = tl.load(k_ptr + j[None, :] * skt + offs_d[:, None], mask=ok[None, :], other=0.0)
            v = tl.load(v_ptr + j[:, None] * svt + offs_d[None, :], mask=ok[:, None], other=0.0)
            s = tl.dot(q, kT, input_precision=PREC)
            s = tl.where(_mask(offs_m[:, None], j[None, :], ok[None, :], R, MODE), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units; the scale joins the exponent's FMA
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s * qk_scale - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit
    def _ranges(PAT, spat, h, start_m, end_m):
        """A query block's three key ranges (band, strided columns, anchors) and the head's pattern."""
        p = PAT + h * spat
        R, S, NS, NA = tl.load(p), tl.load(p + 1), tl.load(p + 2), tl.load(p + 3)
        band_lo = tl.where(R >= 0, tl.maximum(start_m - R, 0), end_m)
        return R, S, NS, p + 4, band_lo, tl.minimum(NS, tl.cdiv(end_m, S)), NS + NA

    @core.triton_autotune(_FWD, (32, 16, 4, 1), _KEY)
    @triton.jit
    def _sparse_fwd(Q, K, V, O, LSE, PAT, spat, qk_scale, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                    H, T, T_BUCKET, D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # every head's last blocks (most columns) first
        bh = tl.program_id(0).to(tl.int64)
        b, h = bh // H, bh % H
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        end_m = tl.minimum(start_m + BLOCK_M, T)
        R, S, NS, anch, band_lo, cols_hi, anch_hi = _ranges(PAT, spat, h, start_m, end_m)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T,
                    other=0.0)
        m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a tile without keys for a row keeps alpha = 1, p = 0
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        args = (q, K + b * skb + h * skh, V + b * svb + h * svh, skt, svt, offs_m)
        pat = (R, S, NS, anch, qk_scale)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, *args, band_lo, end_m, *pat, D, 0, PREC, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, *args, 0, cols_hi, *pat, D, 1, PREC, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, *args, NS, anch_hi, *pat, D, 2, PREC, BLOCK_N)
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], (acc / l_i[:, None]).to(
            O.dtype.element_ty), mask=offs_m[:, None] < T)
        tl.store(LSE + bh * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)

    @triton.jit
    def _dkdv_inner(k, v, j, q_ptr, do_ptr, lse_ptr, delta_ptr, sqt, sdot, first, steps, step, T, R, qk_scale,
                    D: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        """dK, dV of keys j from the query tiles first, first + step, ... (steps of them)."""
        offs_d = tl.arange(0, D)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        for it in range(steps):
            offs_m = first + it * step + tl.arange(0, BLOCK_M)
            rows = offs_m < T
            qT = tl.load(q_ptr + offs_m[None, :] * sqt + offs_d[:, None], mask=rows[None, :], other=0.0)
            do = tl.load(do_ptr + offs_m[:, None] * sdot + offs_d[None, :], mask=rows[:, None], other=0.0)
            lse = tl.load(lse_ptr + offs_m, mask=rows, other=0.0)  # padded rows add nothing: their q and dO load as 0
            delta = tl.load(delta_ptr + offs_m, mask=rows, other=0.0)
            pT = tl.math.exp2(tl.dot(k, qT, input_precision=PREC) * qk_scale - lse[None, :])  # (N, M)
            pT = tl.where(_mask(offs_m[None, :], j[:, None], True, R, MODE), pT, 0.0)
            dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
            dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
            dk += tl.dot((pT * (dpT - delta[None, :])).to(qT.dtype), tl.trans(qT), input_precision=PREC)
        return dk, dv

    @core.triton_autotune(_DKDV, (16, 16, 4, 1), _KEY)
    @triton.jit
    def _sparse_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, PAT, spat, qk_scale, sm_scale, sqb, sqh, sqt, skb, skh,
                         skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, H, T, NCOL,
                         T_BUCKET, D: tl.constexpr, PREC: tl.constexpr, N_ANCH: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
        """The first n_col * B * H programs own BLOCK_N of a head's columns each (launched first: they run longest,
        over every later query; a head's column blocks side by side, all walking the queries down from the last tile,
        so each query tile is read once from memory for all of them). The others own a block of keys (band part)."""
        pid = tl.program_id(0)
        n_col = tl.cdiv(NCOL, BLOCK_N)
        BH = tl.num_programs(0) // (n_col + tl.cdiv(T, BLOCK_N))
        is_col = pid < n_col * BH
        blk = tl.where(is_col, pid % n_col, (pid - n_col * BH) // BH)
        bh = tl.where(is_col, pid // n_col, (pid - n_col * BH) % BH).to(tl.int64)
        b, h = bh // H, bh % H
        offs_d = tl.arange(0, D)
        R, S, NS, anch, _, _, anch_hi = _ranges(PAT, spat, h, 0, 0)
        if is_col:
            j, ok = _keys(blk * BLOCK_N + tl.arange(0, BLOCK_N), anch_hi, S, NS, anch, 2)
        else:
            j = blk * BLOCK_N + tl.arange(0, BLOCK_N)
            ok = j < T
        k = tl.load(K + b * skb + h * skh + j[:, None] * skt + offs_d[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + b * svb + h * svh + j[:, None] * svt + offs_d[None, :], mask=ok[:, None], other=0.0)
        args = (k, v, j, Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, LSE + bh * T, DELTA + bh * T, sqt, sdot)
        if is_col:  # every query i >= j, from the last tile down to the one holding the first key
            top, lo = (tl.cdiv(T, BLOCK_M) - 1) * BLOCK_M, tl.min(tl.where(ok, j, T))
            steps = tl.where(lo < T, top // BLOCK_M - lo // BLOCK_M + 1, 0)  # none for a head without columns
            dk, dv = _dkdv_inner(*args, top, steps, -BLOCK_M, T, -1, qk_scale, D, 2, PREC, BLOCK_M, BLOCK_N)
        else:  # queries j .. j + R; a column key's row is its column program's
            start_n = blk * BLOCK_N
            hi = tl.where(R >= 0, tl.minimum(start_n + BLOCK_N + R, T), start_n)
            dk, dv = _dkdv_inner(*args, start_n, tl.cdiv(hi - start_n, BLOCK_M), BLOCK_M, T, R, qk_scale, D, 0, PREC,
                                 BLOCK_M, BLOCK_N)
            anchors = tl.load(anch + tl.arange(0, N_ANCH))
            col = ((j % S == 0) & (NS > 0)) | (tl.sum((j[:, None] == anchors[None, :]).to(tl.int32), 1) > 0)
            ok = ok & ~col
        tl.store(DK + b * sdkb + h * sdkh + j[:, None] * sdkt + offs_d[None, :], (dk * sm_scale).to(
            DK.dtype.element_ty), mask=ok[:, None])
        tl.store(DV + b * sdvb + h * sdvh + j[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=ok[:, None])

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, skt, svt, offs_m, lo, hi, R, S, NS, anch_ptr, qk_scale,
                  D: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr):
        offs_d = tl.arange(0, D)
        for start in range(lo, hi, BLOCK_N):
            j, ok = _keys(start + tl.arange(0, BLOCK_N), hi, S, NS, anch_ptr, MODE)
            kT = tl.load(k_ptr + j[None, :] * skt + offs_d[:, None], mask=ok[None, :], other=0.0)
            vT = tl.load(v_ptr + j[None, :] * svt + offs_d[:, None], mask=ok[None, :], other=0.0)
            p = tl.math.exp2(tl.dot(q, kT, input_precision=PREC) * qk_scale - lse[:, None])
            p = tl.where(_mask(offs_m[:, None], j[None, :], ok[None, :], R, MODE), p, 0.0)
            ds = p * (tl.dot(do, vT, input_precision=PREC) - delta[:, None])
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC)
        return dq

    @core.triton_autotune(_DQ, (32, 16, 4, 1), _KEY)
    @triton.jit
    def _sparse_bwd_dq(Q, K, V, O, DO, DQ, LSE, DELTA, PAT, spat, qk_scale, sm_scale, sqb, sqh, sqt, skb, skh, skt,
                       svb, svh, svt, sob, soh, sot, sdob, sdoh, sdot, sdqb, sdqh, sdqt, H, T, T_BUCKET,
                       D: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """dQ of a query block; also FA2's preprocess D = rowsum(dO ⊙ O), stored for the dK/dV kernel after it."""
        start_m = (tl.num_programs(1) - 1 - tl.program_id(1)) * BLOCK_M  # every head's last blocks (most columns) first
        bh = tl.program_id(0).to(tl.int64)
        b, h = bh // H, bh % H
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        rows = offs_m[:, None] < T
        R, S, NS, anch, band_lo, cols_hi, anch_hi = _ranges(PAT, spat, h, start_m, tl.minimum(start_m + BLOCK_M, T))
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=rows, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=rows, other=0.0)
        lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=float("inf"))
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=rows, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + bh * T + offs_m, delta, mask=offs_m < T)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        args = (q, do, lse, delta, K + b * skb + h * skh, V + b * svb + h * svh, skt, svt, offs_m)
        pat = (R, S, NS, anch, qk_scale)
        dq = _dq_inner(dq, *args, band_lo, tl.minimum(start_m + BLOCK_M, T), *pat, D, 0, PREC, BLOCK_N)
        dq = _dq_inner(dq, *args, 0, cols_hi, *pat, D, 1, PREC, BLOCK_N)
        dq = _dq_inner(dq, *args, NS, anch_hi, *pat, D, 2, PREC, BLOCK_N)
        tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows)


@torch.library.custom_op("attnlab::sparse_attn_fwd", mutates_args=())
def sparse_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pat: torch.Tensor,
                    ncols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pattern's attention on (B, H, T, D) -> (O, log-sum-exp in log2 units of the scaled scores)."""
    B, H, T, D = q.shape
    q, k, v = core.unit_stride(q, k, v)
    o, lse = core.attn_outputs(q)
    grid = lambda meta: (B * H, triton.cdiv(T, meta["BLOCK_M"]))
    _sparse_fwd[grid](q, k, v, o, lse, pat, pat.stride(0), core.triton_scales(D)[0], *core.triton_strides(q, k, v, o),
                      H, T, core.triton_bucket(T), D=D, PREC=core.triton_prec(q))
    return o, lse


@sparse_attn_fwd.register_fake
def _(q, k, v, pat, ncols):
    return core.attn_outputs(q)


@torch.library.custom_op("attnlab::sparse_attn_bwd", mutates_args=())
def sparse_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                    lse: torch.Tensor, pat: torch.Tensor,
                    ncols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FA2's backward on the pattern's tiles, recomputing P from the LSE: dQ (and D = rowsum(dO ⊙ O)), then dK/dV."""
    B, H, T, D = q.shape
    q, k, v, do = core.unit_stride(q, k, v, do)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    scales, kw = core.triton_scales(D), dict(D=D, PREC=core.triton_prec(q))
    grid = lambda meta: (B * H, triton.cdiv(T, meta["BLOCK_M"]))
    _sparse_bwd_dq[grid](q, k, v, o, do, dq, lse, delta, pat, pat.stride(0), *scales,
                         *core.triton_strides(q, k, v, o, do, dq), H, T, core.triton_bucket(T), **kw)
    grid = lambda meta: (B * H * (triton.cdiv(ncols, meta["BLOCK_N"]) + triton.cdiv(T, meta["BLOCK_N"])),)
    _sparse_bwd_dkdv[grid](q, k, v, do, dk, dv, lse, delta, pat, pat.stride(0), *scales,
                           *core.triton_strides(q, k, v, do, dk, dv), H, T, ncols, core.triton_bucket(T),
                           N_ANCH=N_ANCHOR, **kw)
    return dq, dk, dv


@sparse_attn_bwd.register_fake
def _(do, q, k, v, o, lse, pat, ncols):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, pat, ncols = inputs
    ctx.ncols = ncols
    ctx.save_for_backward(q, k, v, *output, pat)


def _backward(ctx, do, dlse):
    return (*sparse_attn_bwd(do, *ctx.saved_tensors, ctx.ncols), None, None)


sparse_attn_fwd.register_autograd(_backward, setup_context=_setup)


def sparse_attention_triton(q, k, v, pat, ncols):
    """The thesis's patterns with the fused kernel; pat, ncols from triton_pattern. Saves only O and the LSE."""
    return sparse_attn_fwd(q, k, v, pat, ncols)[0]


# ----------------------------------------------------------------------------------------------------------------
# Eval: head metrics (thesis definitions)

METRICS = ("entropy", "sparsity", "distance")


def head_metrics(probs):
    """probs (B, H, T, S) -> (B, H, 3): entropy, sparsity, distance of each sequence and head."""
    A = probs.float()
    A = A / (A.sum(-1, keepdim=True) + 1e-9)
    entropy = -(A * (A + 1e-9).log()).sum(-1).mean(-1)
    sparsity = (A < 1e-4).float().mean((-2, -1))
    T, S = A.shape[-2:]
    dist = (torch.arange(T, device=A.device)[:, None] - torch.arange(S, device=A.device)[None, :]).abs().float()
    total = A.sum((-2, -1))
    distance = torch.where(total > 0, (A * dist).sum((-2, -1)) / total.clamp(min=1e-30), 0.0)
    return torch.stack((entropy, sparsity, distance), dim=-1)


@torch.no_grad()
def extract_metrics(model, data, n_seqs, batch_size, device):
    """(L, H, 3) means over the first n_seqs val windows; each layer's probabilities are reduced as they arrive."""
    model.eval().to(device)
    T, cfg = model.cfg.block_size, model.cfg
    windows = [w[:T] for w, _ in zip(data.windows("val", T), range(n_seqs))]
    if not windows:
        raise core.ConfigError(f"the val split is shorter than one window of {T + 1} tokens")
    sums = torch.zeros(cfg.n_layer, cfg.n_head, 3, dtype=torch.float64)

    def record(layer, probs):
        sums[layer] += head_metrics(probs).sum(0).double().cpu()
    for s in range(0, len(windows), batch_size):
        model(torch.stack(windows[s:s + batch_size]).to(device), record=record)  # float32, as the thesis
    return sums / len(windows), len(windows)


def write_metrics_csv(path, m):
    with core.atomic(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer", "head", *METRICS])
        for layer in range(m.shape[0]):
            for head in range(m.shape[1]):
                w.writerow([layer, head, *(repr(float(x)) for x in m[layer, head])])


def read_metrics_csv(path):
    """-> list of (layer, head), (N, 3) float array."""
    try:
        with open(path) as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error):  # e.g. a checkpoint given for a run folder
        rows = []
    try:
        if rows and all(c in rows[0] for c in ("layer", "head", *METRICS)):
            return ([(int(r["layer"]), int(r["head"])) for r in rows],
                    np.array([[float(r[c]) for c in METRICS] for r in rows]))
    except (TypeError, ValueError):  # a row cut short (a copy that stopped) or a value that is no number
        pass
    raise core.ConfigError(f"{path}: not a head_metrics.csv (columns layer,head,{','.join(METRICS)} of numbers)")


def metrics_action(cfg, args):
    if args.metric_seqs < 1:
        raise core.ConfigError("--metric-seqs must be >= 1")
    path = cfg.init_from or os.path.join(cfg.out, "ckpt.pt")
    data = core.TokenData(cfg.data)
    model = core.load_model(PAPER, path, given=vars(args), data=data)  # --[no-]inverted-mask applies
    m, n = extract_metrics(model, data, args.metric_seqs, cfg.batch_size, core.resolve_device(cfg))
    os.makedirs(cfg.out, exist_ok=True)
    out = os.path.join(cfg.out, "head_metrics.csv")
    write_metrics_csv(out, m.numpy())
    print(f"{model.cfg.variant} ({path}): metrics of {m.shape[0] * m.shape[1]} heads over {n} val windows of "
          f"{model.cfg.block_size} tokens of {cfg.data} -> {out}")
    for layer in range(m.shape[0]):
        print(f"layer {layer:2d} " + " ".join(f"{k} {m[layer, :, i].mean():8.3f}" for i, k in enumerate(METRICS)))


# ----------------------------------------------------------------------------------------------------------------
# Plots and analysis: clustering of heads

def standardize(X):
    """z-score per column (population std; constant columns -> 0), as scikit-learn's StandardScaler."""
    std = np.where(np.ptp(X, 0) > 0, X.std(0), 1.0)  # not std > 0: a constant column's rounded mean leaves ~1e-17
    return (X - X.mean(0)) / std


def kmeans(X, k, seed=0, n_init=10, iters=300):
    """Lloyd's k-means with k-means++ seeding; the best of n_init runs by inertia. -> labels (N,), centers (k, F)."""
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        centers = X[[rng.integers(len(X))]]
        while len(centers) < k:  # k-means++: next center drawn with probability ~ squared distance
            d2 = ((X[:, None] - centers[None]) ** 2).sum(-1).min(1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(X), 1 / len(X))
            centers = np.vstack([centers, X[rng.choice(len(X), p=p)]])
        for _ in range(iters):
            labels = ((X[:, None] - centers[None]) ** 2).sum(-1).argmin(1)
            new = np.array([X[labels == c].mean(0) if (labels == c).any() else centers[c] for c in range(k)])
            if np.allclose(new, centers):
                break
            centers = new
        inertia = ((X - centers[labels]) ** 2).sum()
        if best is None or inertia < best[0]:
            best = (inertia, labels, centers)
    return best[1], best[2]


def silhouette_samples(X, labels):
    """s_i = (b_i - a_i) / max(a_i, b_i); a: mean distance to its own cluster, b: to the nearest other; 0 if alone."""
    ids = np.unique(labels)
    if len(ids) < 2:
        return np.zeros(len(X))
    D = np.sqrt(((X[:, None] - X[None]) ** 2).sum(-1))
    onehot = (labels[:, None] == ids[None]).astype(float)  # (N, K)
    sums, sizes = D @ onehot, onehot.sum(0)
    own = np.searchsorted(ids, labels)
    a = sums[np.arange(len(X)), own] / np.maximum(sizes[own] - 1, 1)
    mean_other = np.where(onehot > 0, np.inf, sums / sizes)
    b = mean_other.min(1)
    s = (b - a) / np.maximum(np.maximum(a, b), 1e-300)
    return np.where(sizes[own] > 1, s, 0.0)


def run_variant(folder):
    try:
        return core.read_run(folder)["config"]["variant"]
    except (LookupError, TypeError):
        return os.path.basename(os.path.normpath(folder)) or "?"


def cluster_action(cfg, args):
    if args.cluster_k_max < 2 or args.cluster_k < 0:
        raise core.ConfigError("need --cluster-k-max >= 2 and --cluster-k >= 0")
    heads, rows, variants, sources, names = [], [], [], [], []
    for src in args.runs or [cfg.out]:
        path = src if os.path.isfile(src) else os.path.join(src, "head_metrics.csv")
        if not os.path.isfile(path):
            raise core.ConfigError(f"no head metrics at {path} (run --metrics first)")
        lh, m = read_metrics_csv(path)
        heads += lh
        rows.append(m)
        folder = os.path.dirname(path) or "."
        variants += [run_variant(folder)] * len(lh)
        sources += [path] * len(lh)
        base = os.path.basename(os.path.abspath(folder))
        names.append(base if base == variants[-1] else f"{base} ({variants[-1]})")  # no run.json: its folder's name
    raw = np.vstack(rows)
    X, variants = standardize(raw), np.array(variants)
    ks = list(range(2, min(args.cluster_k_max, len(X) - 1) + 1))
    if not ks:
        raise core.ConfigError(f"{len(X)} heads are too few to cluster (need at least 3)")
    labels = {k: kmeans(X, k, cfg.seed)[0] for k in ks}
    sil = {k: silhouette_samples(X, labels[k]) for k in ks}
    scores = {k: float(sil[k].mean()) for k in ks}
    best = max(ks, key=scores.get)
    shown = args.cluster_k or best
    if shown not in labels:
        raise core.ConfigError(f"--cluster-k must be in 2..{ks[-1]}")
    os.makedirs(cfg.out, exist_ok=True)
    with core.atomic(os.path.join(cfg.out, "clusters.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "layer", "head", *METRICS, *(f"k{k}" for k in ks), "run"])
        for i, (layer, head) in enumerate(heads):
            w.writerow([variants[i], layer, head, *raw[i], *(labels[k][i] for k in ks), sources[i]])
    with core.atomic(os.path.join(cfg.out, "silhouette.json"), "w") as f:
        json.dump(dict(silhouette=scores, best_k=best, shown_k=shown, heads=len(X), runs=list(dict.fromkeys(sources))),
                  f, indent=1)
    runs = f"{len(X)} heads of {', '.join(names)}"
    plot_clusters(cfg.out, raw, variants, labels, sil, scores, shown, runs)
    print(f"k-means of the {runs}")
    print("k      " + " ".join(f"{k:>6d}" for k in ks))
    print("silh.  " + " ".join(f"{scores[k]:6.3f}" for k in ks) + f"   best k={best}; plots in {cfg.out}")


AXES = {"entropy": "entropy (nats)", "sparsity": "sparsity (share of weights < 1e-4)",
        "distance": "distance (positions)"}


def plot_clusters(out, raw, variants, labels, sil, scores, shown, runs):
    """silhouette_k.png (score vs k), silhouette_samples.png (one panel per k), head_clusters.png (metric space)."""
    plt, ks = core.pyplot(), list(scores)
    wrapped = textwrap.fill(runs, 60, break_on_hyphens=False)  # the runs' names fit a narrow figure
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [scores[k] for k in ks], marker="o")
    ax.scatter([shown], [scores[shown]], color="red", s=90, zorder=3, label=f"k={shown}")
    ax.set(xlabel="number of clusters k", ylabel="mean silhouette", xticks=ks,
           title=f"k-means on standardised head metrics\n{wrapped}")
    ax.grid(alpha=0.3)
    ax.legend()
    core.layout(fig)
    fig.savefig(os.path.join(out, "silhouette_k.png"), dpi=120)
    cols = min(4, len(ks))
    fig, axes = plt.subplots(math.ceil(len(ks) / cols), cols, figsize=(3.5 * cols, 3.2 * math.ceil(len(ks) / cols)),
                             squeeze=False)
    for ax, k in zip(axes.flat, ks):
        y = 0
        for c in range(k):  # one sorted bar band per cluster
            s = np.sort(sil[k][labels[k] == c])
            ax.fill_betweenx(np.arange(y, y + len(s)), 0, s, color=plt.cm.tab10(c % 10))
            y += len(s) + 2
        ax.axvline(scores[k], color="red", ls="--")
        ax.set(title=f"k={k} (mean {scores[k]:.3f})", xlabel="silhouette", yticks=[])
    for ax in list(axes.flat)[len(ks):]:
        ax.axis("off")
    fig.suptitle(wrapped)
    core.layout(fig)
    fig.savefig(os.path.join(out, "silhouette_samples.png"), dpi=120)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    markers = {"dense": "o", "sparse": "^"}
    for ax, (a, b) in zip(axes, ((0, 2), (0, 1), (1, 2))):
        for v in np.unique(variants):
            sel = variants == v
            ax.scatter(raw[sel, a], raw[sel, b], c=[plt.cm.tab10(c % 10) for c in labels[shown][sel]],
                       marker=markers.get(v, "s"), s=30, edgecolors="k", linewidths=0.3)
        ax.set(xlabel=AXES[METRICS[a]], ylabel=AXES[METRICS[b]])
        ax.grid(alpha=0.3)
    axes[0].legend([plt.Line2D([], [], ls="", marker=markers.get(v, "s"), color="gray") for v in np.unique(variants)],
                   list(np.unique(variants)), title="marker")  # grey: the colours are the clusters
    fig.suptitle(f"{runs} in metric space, colour = k-means cluster (k={shown})")
    core.layout(fig)
    fig.savefig(os.path.join(out, "head_clusters.png"), dpi=120)
    plt.close("all")


# ----------------------------------------------------------------------------------------------------------------
# Kernel benchmark: sparse vs dense attention, forward + backward

def time_ms(fn, q, k, v, reps=10, warmup=3):
    """GPU kernel time of fn(q, k, v) forward + backward, ms per call: the sum of the kernels' device times (the
    profiler's), so the Python and launch overhead of an eager call, hidden inside a compiled model, is not counted."""
    from torch.profiler import ProfilerActivity, profile
    dy = torch.randn_like(q)
    for _ in range(warmup):  # the first call compiles
        torch.autograd.grad(fn(q, k, v), (q, k, v), dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            torch.autograd.grad(fn(q, k, v), (q, k, v), dy)
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time_total for e in kernels) / reps / 1e3


GOAL = 1.5  # the kernel's time at most 1.5x what its block density of the best dense kernel would take


def bench_attention(T, clusters, D, B, device, dtype=torch.bfloat16):
    H = len(clusters)
    src, sparse = sparse_block_mask(tuple(clusters), T, device)
    causal = block_mask_builder(device)(lambda b, h, q, kv: kv <= q, None, None, T, T, device=device)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    t_sdpa = time_ms(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v)
    t_flex = time_ms(lambda q, k, v: core.flex_attention(q, k, v, block_mask=causal), q, k, v)
    t_sparse = time_ms(lambda q, k, v: core.flex_attention(q, extend(k, src), extend(v, src), block_mask=sparse),
                       q, k, v)
    pat = triton_pattern(clusters, T, device)
    t_triton = time_ms(lambda q, k, v: sparse_attention_triton(q, k, v, *pat), q, k, v) if core.triton_ok(q) else None
    density = computed_blocks(sparse) / (H * computed_blocks(causal))
    elements = sum(allowed_counts(c, T).sum().item() for c in clusters) / (H * T * (T + 1) / 2)
    dense = min(t_sdpa, t_flex)
    return dict(T=T, B=B, H=H, D=D, block_density=density, element_density=elements, dense_sdpa_ms=t_sdpa,
                dense_flex_ms=t_flex, sparse_ms=t_sparse, ratio=t_sparse / (density * dense), triton_ms=t_triton,
                triton_ratio=t_triton and t_triton / (density * dense), goal=GOAL)


def kernel_bench_action(cfg, args):
    device = core.resolve_device(cfg)
    if device.type != "cuda":
        raise core.ConfigError("--kernel-bench needs a CUDA GPU (the fused FlexAttention kernel)")
    clusters = head_clusters(cfg.n_head, cfg.mask_subset)
    print(f"heads {clusters}, head dim {cfg.head_dim}, bf16, fwd+bwd, {torch.cuda.get_device_name(device)}")
    print(f"{'T':>6} {'B':>3} {'blocks':>7} {'elems':>7} {'sdpa ms':>8} {'flex ms':>8} {'sparse ms':>9} "
          f"{'sparse/(dens*dense)':>20} {'triton ms':>9} {'triton/(dens*dense)':>20}")
    rows = []
    for T in (1024, 4096, 8192):
        r = bench_attention(T, clusters, cfg.head_dim, max(1, 32768 // T), device)
        rows.append(r)
        triton_ms, triton_ratio = (("n/a", "n/a") if r["triton_ms"] is None else  # the kernel cannot run here
                                   (f"{r['triton_ms']:.3f}", f"{r['triton_ratio']:.2f}"))
        print(f"{T:>6} {r['B']:>3} {r['block_density']:>7.3f} {r['element_density']:>7.3f} {r['dense_sdpa_ms']:>8.3f} "
              f"{r['dense_flex_ms']:>8.3f} {r['sparse_ms']:>9.3f} {r['ratio']:>20.2f} {triton_ms:>9} "
              f"{triton_ratio:>20}")
    os.makedirs(cfg.out, exist_ok=True)
    json.dump(dict(device=torch.cuda.get_device_name(device), torch=torch.__version__,
                   triton=getattr(triton, "__version__", None), rows=rows),
              open(os.path.join(cfg.out, "kernel_bench.json"), "w"), indent=1)
    print(f"ratio = sparse (flex) or triton time / (flex block density x best dense time); goal <= {GOAL} at T >= 4096")


# ----------------------------------------------------------------------------------------------------------------

PAPER = core.Paper(
    "sparse_byte", SparseByteConfig, build_model, baseline="dense", doc=__doc__, convert=from_thesis,
    formats="the thesis's model files ({'model_state_dict', 'config', ...}, {'model': ...} or a bare state_dict)",
    published_tokenizer="bytes",
    actions={"metrics": ("head metrics (entropy, sparsity, distance) of --init-from or <out>/ckpt.pt on the first "
                         "--metric-seqs val windows of --data -> <out>/head_metrics.csv", metrics_action),
             "cluster": ("k-means of the head metrics of --runs (run dirs or CSVs; default --out): silhouettes, "
                         "plots, clusters.csv in --out", cluster_action),
             "kernel-bench": ("GPU: sparse (flex, triton) vs dense attention fwd+bwd at T = 1024, 4096, 8192",
                              kernel_bench_action)},
    flags={"--metric-seqs": dict(type=int, default=10, help="--metrics: the first N non-overlapping val windows"),
           "--cluster-k-max": dict(type=int, default=8, help="--cluster: k-means for k = 2 .. K"),
           "--cluster-k": dict(type=int, default=0, help="--cluster: k of the scatter plot (0: best silhouette)")})


def main(argv=None):
    return core.main(PAPER, argv)


if __name__ == "__main__":
    raise SystemExit(main())
