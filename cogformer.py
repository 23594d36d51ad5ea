"""Cogformer: attention with signed weights (cog attention).

Paper: Ang Lv et al., "More Expressive Attention with Negative Weights", arXiv 2411.07176.
Official repo: https://github.com/trestad/CogAttn (inference and analysis code and two 141M checkpoints only).

Method (sec. 3, eq. 2): per head, s = (q/√d)·kᵀ; the causal (and same-document) mask goes on |s|, *after* the abs;
W = sign(s) ⊙ softmax(|s|) and o = W v. Rows satisfy Σ|W| = 1, and a negative weight subtracts a token's value.
The Cogformer keeps softmax attention in the first and the last layer and uses cog attention in between; the
baseline Transformer is the same Llama-style model (RMSNorm, SwiGLU, RoPE, untied head, no bias) with softmax only.

Attention paths (--attn-impl): eager (the spec, the reference), flex2x (FlexAttention over doubled keys [K;K] and
values [V;−V]) and triton (default on GPU): a FlashAttention-2-style kernel, forward with an online max
of |s| and signed numerator, backward dV = Wᵀ dO, dS = W ⊙ (σ ⊙ dW − D), D = rowsum(dO ⊙ O); it saves
only O and the log-sum-exp. Softmax layers use the core's fast path.

Deviations: the paper's data, optimiser and schedule are unpublished (we use the core's AdamW + cosine); our RoPE is
the half-split form, so loading the published checkpoints permutes the q/k columns of each head; exact
zeros s = 0 get weight 0 in every path, but flex2x also drops them from the denominator (measure zero).

    python cogformer.py --train --variant cogformer --preset 141m-gpt2 --data data/docs --out runs/cog
    python cogformer.py --plot --out runs/cog --runs runs/transformer         # both loss curves on one figure
    python cogformer.py --attn-grid --init-from runs/cog/ckpt.pt --data data/docs   # figs 9/10
    python cogformer.py --probe --init-from runs/cog/ckpt.pt --data data/docs       # fig 5
    python cogformer.py --neg-mass --init-from runs/cog/ckpt.pt --data data/docs    # negative attention mass
    python cogformer.py --kernel-bench                                               # GPU: triton vs flex vs SDPA
    python cogformer.py --eval --init-from cog_ckpt_100.00_Bi.pt --data <llama-2 tokenized data>
"""
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

import core
from core import triton, tl  # optional: without Triton the eager and flex2x paths still work

# ----------------------------------------------------------------------------------------------------------------
# Config


BODY_141M = dict(family="llama", n_layer=12, n_head=12, n_embd=768, mlp_hidden=2304, norm_eps=1e-6, block_size=1024,
                 batch_size=16)  # 12 x 12 heads x 768, FFN 2304 (the released 141M models)


@dataclass
class CogConfig(core.Config):
    family: str = core.opt("llama", "gpt2 or llama (the paper's backbone: RMSNorm, SwiGLU, RoPE, untied head)")
    cog_layers: str = core.opt("", "cogformer: comma list of cog layers ('' = all but the first and the last)")

    PRESETS = {**core.Config.PRESETS,
               "tiny": {**core.Config.PRESETS["tiny"], "n_layer": 3},  # 3 layers: one cog layer in the middle
               "141m": {**BODY_141M, "vocab_size": 32000},  # the paper's model (Llama-2 vocabulary, 141.2M params)
               "141m-gpt2": BODY_141M}  # the same body with the dataset's (GPT-2) vocabulary, for our runs
    VARIANTS = {"cogformer": "cog attention (signed weights) in every layer but the first and the last (the paper)",
                "transformer": "softmax attention in every layer (the paper's baseline)"}
    ATTN_IMPLS = ("auto", "eager", "flex2x", "triton")

    def __post_init__(self):
        super().__post_init__()
        try:
            layers = [int(i) for i in self.cog_layers.split(",")] if self.cog_layers else []
        except ValueError:
            raise core.ConfigError(f"--cog-layers must be a comma list of layer numbers, not {self.cog_layers!r}")
        if layers and self.variant != "cogformer":
            raise core.ConfigError("--cog-layers needs --variant cogformer")
        if any(not 0 <= i < self.n_layer for i in layers):
            raise core.ConfigError(f"--cog-layers must lie in 0..{self.n_layer - 1}, not {self.cog_layers!r}")
        if self.variant == "cogformer" and not cog_layer_ids(self):
            raise core.ConfigError("cogformer with n_layer < 3 has no middle layer: pass --cog-layers")
        if self.dropout and self.attn_impl != "eager":
            raise core.ConfigError("attention dropout exists only in --attn-impl eager")


def cog_layer_ids(cfg):
    if cfg.variant != "cogformer":
        return set()
    if cfg.cog_layers:
        return {int(i) for i in cfg.cog_layers.split(",")}
    return set(range(1, cfg.n_layer - 1))  # softmax in layer 0 and layer L-1 (the released code's attn_type 'np')


# ----------------------------------------------------------------------------------------------------------------
# The paper's math: cog weights (eager, the spec), flex2x, the attention and the model

def cog_weights(q, k, mask):
    """W = sign(s) ⊙ softmax(|s|) in fp32, (B, H, T, S); mask (bool, True = attend) goes on |s| (pitfall 1)."""
    s = ((q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)).float()  # scale on q after RoPE, as released
    return s.sign() * s.abs().masked_fill(~mask, float("-inf")).softmax(dim=-1)


LOG_HALF = -0.6931471805599453  # log(1/2)


def flex2x_mods(T, doc=None):
    """score_mod and mask_mod over the 2T keys [K;K] with values [V;−V]: copy 1 keeps s > 0, copy 2 keeps
    s < 0 as |s|; one softmax over the copies is then Σ sign(s)e^{|s|}v / Σ e^{|s|}. A score of exactly 0 (sign 0,
    but e^0 in the denominator) goes into both copies at half weight, log(1/2): +v/2 - v/2. Masks sit in mask_mod."""
    def score_mod(score, b, h, q_idx, kv_idx):
        keep = torch.where(kv_idx < T, score > 0, score < 0)
        return torch.where(keep, score.abs(), torch.where(score == 0, LOG_HALF, -float("inf")))

    def mask_mod(b, h, q_idx, kv_idx):
        j = kv_idx % T  # the key's own position
        keep = j <= q_idx
        return keep if doc is None else keep & (doc[b, q_idx] == doc[b, j])
    return score_mod, mask_mod


class CogAttention(core.Attention):
    """Cog attention (sec. 3): project as usual, attend with signed weights."""
    FAST, FAST_CPU = "triton", "eager"

    def attend_eager(self, q, k, v, ctx):
        w = cog_weights(q, k, self.eager_mask(q.size(-2), k.size(-2), ctx, q.device))  # (B, H, T, S)
        if ctx.record is not None:
            ctx.record(self.layer, w)
        w = F.dropout(w, self.dropout, self.training)
        return w.type_as(v) @ v

    def attend_flex2x(self, q, k, v, ctx):
        T = q.size(-2)
        score_mod, mask_mod = flex2x_mods(T, ctx.doc)
        mask = core.flex_block_mask(ctx, mask_mod, T, 2 * T, q.device, key="cog2x")
        try:
            return core.flex_attention(q, torch.cat([k, k], 2), torch.cat([v, -v], 2), score_mod=score_mod,
                                       block_mask=mask)
        except NotImplementedError as e:  # e.g. FlexAttention has no backward on CPU
            core.warn_once(f"flex2x: {e} Using eager cog attention.")
            return self.attend_eager(q, k, v, ctx)

    def attend_triton(self, q, k, v, ctx):
        if not triton_ok(q, k):
            core.warn_once("the cog Triton kernel cannot run here (no triton/GPU, or head dim not 16..128): flex2x")
            return self.attend_flex2x(q, k, v, ctx)
        return cog_attention_triton(q, k, v, ctx.doc)


class SoftmaxAttention(core.Attention):
    """The softmax layers: cog-only impl names (flex2x, triton) mean the core's own fast path."""

    def impl(self, device):
        impl = super().impl(device)
        return impl if impl in core.Config.ATTN_IMPLS else (self.FAST if device.type == "cuda" else self.FAST_CPU)


class CogGPT(core.GPT):
    def __init__(self, cfg):
        cog = cog_layer_ids(cfg)
        super().__init__(cfg, lambda c, i: (CogAttention if i in cog else SoftmaxAttention)(c, i))
        self.cog = sorted(cog)

    def flops_per_token(self):
        """The core's 6N + 12·L·C·T, with each cog layer's attention term set to what its path computes.
        One matmul over the causal half costs C·T per token. triton: 2 forward + 7 backward (S and dW are
        recomputed in both backward kernels) = 9·C·T; flex2x: the same over 2T keys = 18·C·T; eager: 6 matmuls
        over the full T×T square = 12·C·T (the core's convention, kept for the softmax layers)."""
        c = self.cfg
        impl = self.transformer.h[self.cog[0]].attn.impl(next(self.parameters()).device) if self.cog else "eager"
        per_layer = {"triton": 9, "flex2x": 18}.get(impl, 12) * c.n_embd * c.block_size
        return super().flops_per_token() + len(self.cog) * (per_layer - 12 * c.n_embd * c.block_size)


def build_model(cfg):
    return CogGPT(cfg)


# ----------------------------------------------------------------------------------------------------------------
# The paper's published checkpoints


def published_to_ours(ckpt, path=None, given=None):
    """The paper's checkpoint dict (vanilla_/cog_ckpt_100.00_Bi.pt) -> (CogConfig, our state_dict); None: another
    format."""
    if "model_cfg" not in ckpt or "model" not in ckpt:
        return None
    mc, sd = ckpt["model_cfg"], ckpt["model"]
    if mc.get("attn_type") not in ("np", "vanilla"):
        raise core.ConfigError(f"unknown attn_type {mc.get('attn_type')!r} in the published checkpoint")
    if mc["dim"] != mc["n_heads"] * mc["head_dim"]:
        raise core.ConfigError("published checkpoint: dim != n_heads * head_dim is not supported")
    cfg = CogConfig(family="llama", n_layer=mc["n_layers"], n_head=mc["n_heads"], n_embd=mc["dim"],
                    mlp_hidden=mc["hidden_dim"], vocab_size=mc["vocab_size"], norm_eps=mc.get("norm_eps", 1e-6),
                    block_size=mc["max_seq_length"], variant="cogformer" if mc["attn_type"] == "np" else "transformer")
    # interleaved RoPE pairs (2i, 2i+1) -> our half-split pairs (i, i + D/2): reorder q/k outputs in each head
    D = cfg.head_dim
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    perm = (torch.arange(cfg.n_head)[:, None] * D + perm).flatten()
    out = {"transformer.wte.weight": sd["embedding.weight"], "transformer.norm_f.weight": sd["norm.weight"],
           "lm_head.weight": sd["output.weight"]}
    for l in range(cfg.n_layer):
        p, o = f"layers.{l}.", f"transformer.h.{l}."
        att, ffn = p + "attention.", p + "ffn.shared_experts.0."
        out[o + "attn.c_attn.weight"] = torch.cat([sd[att + "qw"].t()[perm], sd[att + "kw"].t()[perm],
                                                   sd[att + "vw"].t()])  # weights stored [in, out]: transpose
        out[o + "attn.c_proj.weight"] = sd[att + "ow"].t()
        out[o + "norm_1.weight"], out[o + "norm_2.weight"] = sd[p + "attention_norm.weight"], sd[p + "ffn_norm.weight"]
        out[o + "mlp.w_gate.weight"] = sd[ffn + "pw"].t()  # pw is the SiLU branch
        out[o + "mlp.w_up.weight"], out[o + "mlp.w_down.weight"] = sd[ffn + "gw"].t(), sd[ffn + "ow"].t()
    return cfg, {k: v.float().contiguous() for k, v in out.items()}  # freqs_cis, shortcut_bar: dropped


# ----------------------------------------------------------------------------------------------------------------
# The fused Triton kernel (FlashAttention-2 style, signed weights): forward, dq, dk/dv, as custom ops

if triton is not None:
    # forward and dq need BLOCK_M % BLOCK_N == 0, dk/dv needs BLOCK_N % BLOCK_M == 0 (diagonal-block split)
    _FWD = [(128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3)]
    _DKDV = [(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3)]
    _DQ = [(128, 32, 4, 3), (128, 64, 8, 3), (64, 32, 4, 4), (64, 64, 4, 3)]
    _KEY = ["T_BUCKET", "D", "HAS_DOC"]

    @triton.jit
    def _fwd_inner(acc, l_i, m_i, q, k_ptr, v_ptr, skt, svt, doc_ptr, doc_q, offs_m, lo, hi, T, qk_scale,
                   D: tl.constexpr, HAS_DOC: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
                   BLOCK_N: tl.constexpr):
        offs_d = tl.arange(0, D)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if MASKED:  # only the diagonal blocks reach past T
                kT = tl.load(k_ptr + offs_n[None, :] * skt + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
                v = tl.load(v_ptr + offs_n[:, None] * svt + offs_d[None, :], mask=offs_n[:, None] < T, other=0.0)
            else:
                kT = tl.load(k_ptr + offs_n[None, :] * skt + offs_d[:, None])
                v = tl.load(v_ptr + offs_n[:, None] * svt + offs_d[None, :])
            s = tl.dot(q, kT, input_precision=PREC)  # (M, N) q·k in fp32; its sign is σ
            # |s| in log2 units (the cast: compile passes fp64 scalars); the mask goes on |s|
            a = (tl.abs(s) * qk_scale).to(tl.float32)
            if MASKED:
                a = tl.where(offs_m[:, None] >= offs_n[None, :], a, float("-inf"))
            if HAS_DOC:
                doc_k = tl.load(doc_ptr + offs_n, mask=offs_n < T, other=-1)
                a = tl.where(doc_q[:, None] == doc_k[None, :], a, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(a, 1))
            alpha = tl.math.exp2(m_i - m_new)
            e = tl.math.exp2(a - m_new[:, None])
            l_i = l_i * alpha + tl.sum(e, 1)
            w = tl.where(s > 0, e, tl.where(s < 0, -e, 0.0))  # the numerator carries σ = sign(s)
            acc = acc * alpha[:, None] + tl.dot(w.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        return acc, l_i, m_i

    @core.triton_autotune(_FWD, (32, 16, 4, 1), _KEY)
    @triton.jit
    def _cog_fwd(Q, K, V, O, LSE, DOC, qk_scale, sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                 H, T, T_BUCKET, D: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=offs_m[:, None] < T,
                    other=0.0)
        doc_q = offs_m
        if HAS_DOC:
            doc_q = tl.load(DOC + b * T + offs_m, mask=offs_m < T, other=-2)
        m_i = tl.zeros([BLOCK_M], tl.float32)  # |s| >= 0, so 0 is a safe start for the running max
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        args = (q, K + b * skb + h * skh, V + b * svb + h * svh, skt, svt, DOC + b * T, doc_q, offs_m)
        # key blocks left of the diagonal need no causal mask; the diagonal blocks do
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, *args, 0, start_m, T, qk_scale, D, HAS_DOC, False, PREC, BLOCK_N)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, *args, start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
                                   D, HAS_DOC, True, PREC, BLOCK_N)
        o = acc / l_i[:, None]  # l_i >= 1: the row's max term is exp2(0)
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], o.to(O.dtype.element_ty),
                 mask=offs_m[:, None] < T)
        tl.store(LSE + bh * T + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < T)

    @triton.jit
    def _cog_bwd_delta(O, DO, DELTA, sob, soh, sot, sdob, sdoh, sdot, H, T, D: tl.constexpr, BLOCK_M: tl.constexpr):
        """D = rowsum(dO ⊙ O) in fp32: FA2's preprocess, unchanged for cog attention."""
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_d = tl.arange(0, D)
        rows = offs_m[:, None] < T
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=rows, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=rows, other=0.0)
        tl.store(DELTA + bh * T + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < T)

    @triton.jit
    def _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, sqt, sdot, doc_ptr, doc_k, offs_n, lo, hi,
                    T, qk_scale, D: tl.constexpr, HAS_DOC: tl.constexpr, MASKED: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_M: tl.constexpr):
        offs_d = tl.arange(0, D)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            qT = tl.load(q_ptr + offs_m[None, :] * sqt + offs_d[:, None], mask=offs_m[None, :] < T, other=0.0)
            do = tl.load(do_ptr + offs_m[:, None] * sdot + offs_d[None, :], mask=offs_m[:, None] < T, other=0.0)
            lse = tl.load(lse_ptr + offs_m, mask=offs_m < T, other=float("inf"))  # padded rows: P = 0
            delta = tl.load(delta_ptr + offs_m, mask=offs_m < T, other=0.0)
            sT = tl.dot(k, qT, input_precision=PREC)  # (N, M)
            pT = tl.math.exp2((tl.abs(sT) * qk_scale).to(tl.float32) - lse[None, :])
            if MASKED:
                pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
            if HAS_DOC:
                doc_q = tl.load(doc_ptr + offs_m, mask=offs_m < T, other=-2)
                pT = tl.where(doc_q[None, :] == doc_k[:, None], pT, 0.0)
            wT = tl.where(sT > 0, pT, tl.where(sT < 0, -pT, 0.0))
            dv += tl.dot(wT.to(do.dtype), do, input_precision=PREC)  # dV = Wᵀ dO
            dwT = tl.dot(v, tl.trans(do), input_precision=PREC)  # (dO Vᵀ)ᵀ
            dsT = wT * (tl.where(sT < 0, -dwT, dwT) - delta[None, :])  # dS = W ⊙ (σ ⊙ dW − D)
            dk += tl.dot(dsT.to(qT.dtype), tl.trans(qT), input_precision=PREC)
        return dk, dv

    @core.triton_autotune(_DKDV, (16, 32, 4, 1), _KEY)
    @triton.jit
    def _cog_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, DOC, qk_scale, sm_scale, sqb, sqh, sqt, skb, skh, skt,
                      svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, H, T, T_BUCKET,
                      D: tl.constexpr, HAS_DOC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
        start_n = tl.program_id(0) * BLOCK_N
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skt + offs_d[None, :], mask=offs_n[:, None] < T,
                    other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svt + offs_d[None, :], mask=offs_n[:, None] < T,
                    other=0.0)
        doc_k = offs_n
        if HAS_DOC:
            doc_k = tl.load(DOC + b * T + offs_n, mask=offs_n < T, other=-1)
        dk = tl.zeros([BLOCK_N, D], tl.float32)
        dv = tl.zeros([BLOCK_N, D], tl.float32)
        args = (k, v, Q + b * sqb + h * sqh, DO + b * sdob + h * sdoh, LSE + bh * T, DELTA + bh * T, sqt, sdot,
                DOC + b * T, doc_k, offs_n)
        # query blocks on the diagonal need the causal mask; the ones below it do not
        dk, dv = _dkdv_inner(dk, dv, *args, start_n, start_n + BLOCK_N, T, qk_scale, D, HAS_DOC, True, PREC,
                             BLOCK_M)
        dk, dv = _dkdv_inner(dk, dv, *args, start_n + BLOCK_N, T, T, qk_scale, D, HAS_DOC, False, PREC, BLOCK_M)
        tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=offs_n[:, None] < T)
        tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvt + offs_d[None, :], dv.to(DV.dtype.element_ty),
                 mask=offs_n[:, None] < T)

    @triton.jit
    def _dq_inner(dq, q, do, lse, delta, k_ptr, v_ptr, skt, svt, doc_ptr, doc_q, offs_m, lo, hi, T, qk_scale,
                  D: tl.constexpr, HAS_DOC: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_N: tl.constexpr):
        offs_d = tl.arange(0, D)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            if MASKED:
                kT = tl.load(k_ptr + offs_n[None, :] * skt + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
                vT = tl.load(v_ptr + offs_n[None, :] * svt + offs_d[:, None], mask=offs_n[None, :] < T, other=0.0)
            else:
                kT = tl.load(k_ptr + offs_n[None, :] * skt + offs_d[:, None])
                vT = tl.load(v_ptr + offs_n[None, :] * svt + offs_d[:, None])
            s = tl.dot(q, kT, input_precision=PREC)
            p = tl.math.exp2((tl.abs(s) * qk_scale).to(tl.float32) - lse[:, None])
            if MASKED:
                p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
            if HAS_DOC:
                doc_k = tl.load(doc_ptr + offs_n, mask=offs_n < T, other=-1)
                p = tl.where(doc_q[:, None] == doc_k[None, :], p, 0.0)
            w = tl.where(s > 0, p, tl.where(s < 0, -p, 0.0))
            dw = tl.dot(do, vT, input_precision=PREC)
            ds = w * (tl.where(s < 0, -dw, dw) - delta[:, None])
            dq += tl.dot(ds.to(kT.dtype), tl.trans(kT), input_precision=PREC)
        return dq

    @core.triton_autotune(_DQ, (32, 16, 4, 1), _KEY)
    @triton.jit
    def _cog_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, DOC, qk_scale, sm_scale, sqb, sqh, sqt, skb, skh, skt,
                    svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt, H, T, T_BUCKET, D: tl.constexpr,
                    HAS_DOC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        start_m = tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        rows = offs_m[:, None] < T
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=rows, other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=rows, other=0.0)
        lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=float("inf"))
        delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
        doc_q = offs_m
        if HAS_DOC:
            doc_q = tl.load(DOC + b * T + offs_m, mask=offs_m < T, other=-2)
        dq = tl.zeros([BLOCK_M, D], tl.float32)
        args = (q, do, lse, delta, K + b * skb + h * skh, V + b * svb + h * svh, skt, svt, DOC + b * T, doc_q,
                offs_m)
        dq = _dq_inner(dq, *args, 0, start_m, T, qk_scale, D, HAS_DOC, False, PREC, BLOCK_N)
        dq = _dq_inner(dq, *args, start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, D, HAS_DOC, True, PREC,
                       BLOCK_N)
        tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows)


@torch.library.custom_op("attnlab::cog_attn_fwd", mutates_args=())
def cog_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 doc: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused causal cog attention on (B, H, T, D) -> (O, log-sum-exp in log2 units of the scaled |s|)."""
    B, H, T, D = q.shape
    q, k, v = core.unit_stride(q, k, v)
    o, lse = core.attn_outputs(q)
    docp = doc.to(torch.int32).contiguous() if doc is not None else lse  # a dummy pointer when unused
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _cog_fwd[grid](q, k, v, o, lse, docp, core.triton_scales(D)[0], *core.triton_strides(q, k, v, o), H, T,
                   core.triton_bucket(T), D=D, HAS_DOC=doc is not None, PREC=core.triton_prec(q))
    return o, lse


@cog_attn_fwd.register_fake
def _(q, k, v, doc):
    return core.attn_outputs(q)


@torch.library.custom_op("attnlab::cog_attn_bwd", mutates_args=())
def cog_attn_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                 lse: torch.Tensor, doc: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dV = Wᵀ dO, dS = W ⊙ (σ ⊙ dW − D) with D = rowsum(dO ⊙ O), recomputing W from Q, K and the LSE."""
    B, H, T, D = q.shape
    q, k, v, do = core.unit_stride(q, k, v, do)
    docp = doc.to(torch.int32).contiguous() if doc is not None else lse
    delta = torch.empty_like(lse)
    _cog_bwd_delta[(triton.cdiv(T, 64), B * H)](o, do, delta, *core.triton_strides(o, do), H, T, D=D, BLOCK_M=64)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scales = core.triton_scales(D)
    kw = dict(D=D, HAS_DOC=doc is not None, PREC=core.triton_prec(q))
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_N"]), B * H)
    _cog_bwd_dkdv[grid](q, k, v, do, dk, dv, lse, delta, docp, *scales, *core.triton_strides(q, k, v, do, dk, dv),
                        H, T, core.triton_bucket(T), **kw)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)
    _cog_bwd_dq[grid](q, k, v, do, dq, lse, delta, docp, *scales, *core.triton_strides(q, k, v, do, dq), H, T,
                      core.triton_bucket(T), **kw)
    return dq, dk, dv


@cog_attn_bwd.register_fake
def _(do, q, k, v, o, lse, doc):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, doc = inputs
    ctx.save_for_backward(q, k, v, *output, doc)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, doc = ctx.saved_tensors
    return (*cog_attn_bwd(do, q, k, v, o, lse, doc), None)


cog_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def cog_attention_triton(q, k, v, doc=None):
    """Cog attention with the fused Triton kernel: saves only O and the log-sum-exp for backward."""
    return cog_attn_fwd(q, k, v, doc)[0]


def triton_ok(q, k):
    """The kernel's domain: causal self-attention (as many keys as queries), see core.triton_ok."""
    return q.size(-2) == k.size(-2) and core.triton_ok(q)


# ----------------------------------------------------------------------------------------------------------------
# Analysis: signed attention grid (figs 9/10), representation-difference probe (fig 5), negative mass

ABSTRACT = ("The dominant sequence transduction models are based on complex recurrent or convolutional neural networks "
            "that include an encoder and a decoder. The best performing models also connect the encoder and decoder "
            "through an attention mechanism. We propose a new simple network architecture, the Transformer, based "
            "solely on attention mechanisms, dispensing with recurrence and convolutions entirely.")  # draw_attn.py
PROBES = {"count_ones": ("How many ones are in the following sequences?", lambda n: ("1" * n + "1", "1" * n)),
          "find_a_zero": ("Is there a zero in the following sequences?", lambda n: ("0" + "1" * n, "1" + "1" * n))}
PROBE_LENGTHS = (200, 400, 600, 800, 1000, 2000)


def model_and_tokenizer(cfg, args):
    """The model (--init-from or <out>/ckpt.pt), its device and the dataset's tokenizer."""
    data = core.TokenData(cfg.data)
    model = core.load_model(PAPER, checkpoint(cfg), given=vars(args), data=data)
    tok = core.get_tokenizer(data.tokenizer)
    device = core.resolve_device(cfg)
    return model.to(device), device, tok


def checkpoint(cfg):
    return cfg.init_from or os.path.join(cfg.out, "ckpt.pt")


def source(cfg, model):
    """Which model and data a figure is of: 'cogformer: runs/x/ckpt.pt, data docs', in lines that fit a title."""
    name = os.path.basename(os.path.normpath(cfg.data))
    return textwrap.fill(f"{model.cfg.variant}: {checkpoint(cfg)}, data {name}", 60, break_on_hyphens=False)


def _save(cfg, name, fig, result):
    os.makedirs(cfg.out, exist_ok=True)
    base = os.path.join(cfg.out, name)
    fig.savefig(base + ".png", dpi=120)
    with core.atomic(base + ".json", "w") as f:
        json.dump(dict(result, checkpoint=checkpoint(cfg), data=cfg.data), f)
    print(f"{result['variant']} ({checkpoint(cfg)}): wrote {base}.png and {base}.json")


@torch.no_grad()
def attn_grid(cfg, args):
    """Signed weights of the last query for every layer and head (figs 9/10); text from --prompt."""
    model, device, tok = model_and_tokenizer(cfg, args)
    text = ABSTRACT if args.prompt == "\n" else args.prompt
    if not tok.encode(text):
        raise core.ConfigError("--attn-grid needs a non-empty --prompt")
    idx = torch.tensor([tok.encode(text)[:model.cfg.block_size]], device=device)
    grid = {}
    model(idx, record=lambda layer, w: grid.__setitem__(layer, w[0, :, -1].float().cpu()))  # (H, T) each
    L, H, T = model.cfg.n_layer, model.cfg.n_head, idx.size(1)
    plt = core.pyplot()
    fig, axs = plt.subplots(L, H, figsize=(2.2 * H, 1.6 * L), squeeze=False)
    for l in range(L):
        for h in range(H):
            axs[l, h].bar(range(T), grid[l][h].numpy(), width=1.0, color="tab:red" if l in model.cog else "tab:blue")
            axs[l, h].set_title(f"L{l}H{h}", fontsize=7)
            axs[l, h].tick_params(labelsize=5)
    fig.suptitle(f"{source(cfg, model)}\nthe last query's weight on each of the {T} key positions (x)\nrows: layers, "
                 "columns: heads; red: cog layers (signed), blue: softmax", fontsize=8 + H // 2)
    core.layout(fig)
    _save(cfg, "attn_grid", fig, dict(variant=model.cfg.variant, cog_layers=model.cog, tokens=idx[0].tolist(),
                                      weights={l: grid[l].tolist() for l in range(L)}))
    plt.close(fig)


@torch.no_grad()
def probe(cfg, args):
    """Fig 5: L∞ distance of the final-norm output at the last position between two prompts differing in one
    digit, averaged over head-sized chunks, normalised by the shortest n. Digits are encoded one by one."""
    model, device, tok = model_and_tokenizer(cfg, args)
    digit = {d: tok.encode(d) for d in "01"}
    if any(len(ids) != 1 for ids in digit.values()):
        raise core.ConfigError(f"the {tok.name} tokenizer does not encode a digit as one token")
    hidden = []
    handle = model.transformer.norm_f.register_forward_hook(lambda m, i, out: hidden.append(out[0, -1].float()))
    result, plt = {}, core.pyplot()
    fig, axs = plt.subplots(1, len(PROBES), figsize=(5 * len(PROBES), 3.5), squeeze=False)
    for ax, (task, (prompt, pair)) in zip(axs[0], PROBES.items()):
        prefix = tok.encode(prompt)
        room = model.cfg.block_size - len(prefix) - 1
        if room < 1:
            raise core.ConfigError(f"--probe: the {task} prompt fills the model's {model.cfg.block_size} positions")
        lengths = [n for n in PROBE_LENGTHS if n <= room]
        if len(lengths) < 2:  # a short context: six lengths spread over what fits
            lengths = sorted({max(1, room * i // 6) for i in range(1, 7)})
        diffs = []
        for n in lengths:
            hidden.clear()
            for digits in pair(n):
                model(torch.tensor([prefix + [digit[d][0] for d in digits]], device=device))
            chunks = (hidden[0] - hidden[1]).view(model.cfg.n_head, -1)  # (H, D)
            diffs.append(chunks.abs().amax(-1).mean().item())
        rel = [d / diffs[0] if diffs[0] else float("nan") for d in diffs]
        result[task] = dict(n=lengths, diff=diffs, relative=rel)
        ax.bar([str(n) for n in lengths], rel, color="tab:red" if model.cog else "tab:blue", edgecolor="black")
        ax.set(title=task, xlabel="n", ylabel=f"representation difference / n={lengths[0]}")
    handle.remove()
    fig.suptitle(source(cfg, model))
    core.layout(fig)
    _save(cfg, "rep_diff", fig, dict(variant=model.cfg.variant, **result))
    plt.close(fig)


@torch.no_grad()
def neg_mass(cfg, args):
    """Share of the attention mass Σ|W| on negative weights, per layer, over eval_iters val batches."""
    model, device, _ = model_and_tokenizer(cfg, args)
    data = core.TokenData(cfg.data)
    T = min(cfg.block_size, model.cfg.block_size)
    mass = torch.zeros(model.cfg.n_layer)

    def record(layer, w):  # rows have Σ|W| = 1, so the negative part of a row is its share
        mass[layer] += (-w.clamp(max=0)).sum(-1).mean().item() / cfg.eval_iters
    for i in range(cfg.eval_iters):
        x, _ = data.batch("val", cfg.batch_size, T, cfg.seed, 0, i, device)  # the val batches of training
        with core.autocast(device, cfg):
            model(x, record=record)
    plt = core.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(range(len(mass)), mass.tolist(), color=["tab:red" if l in model.cog else "tab:blue"
                                                    for l in range(len(mass))])
    ax.set(xlabel="layer", ylabel="negative share of Σ|W|", title=source(cfg, model))
    ax.set_xticks(range(len(mass)))
    core.layout(fig)
    _save(cfg, "neg_mass", fig, dict(variant=model.cfg.variant, neg_mass=mass.tolist(), tokens_per_batch=T,
                                     batches=cfg.eval_iters, batch_size=cfg.batch_size))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Kernel benchmark (GPU)

BENCH_SHAPES = ((16, 12, 1024, 64), (8, 12, 2048, 64))  # (B, H, T, D)


def time_fwd_bwd(fn, inputs, iters=20):
    """Median ms of forward + backward and the peak memory it adds (GiB) on the current CUDA device."""
    g = torch.randn_like(fn(*inputs))
    for _ in range(3):  # compile, autotune, warm up
        torch.autograd.grad(fn(*inputs), inputs, g)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.autograd.grad(fn(*inputs), inputs, g)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], (torch.cuda.max_memory_allocated() - base) / 2**30


def kernel_bench(cfg, args):
    """fwd+bwd time and memory of one attention call: cog triton / flex2x / eager+compile vs SDPA-flash softmax."""
    if not torch.cuda.is_available():
        raise core.ConfigError("--kernel-bench needs a CUDA GPU")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    rows = []
    for B, H, T, D in BENCH_SHAPES:
        score_mod, mask_mod = flex2x_mods(T)
        block_mask = create_block_mask(mask_mod, None, None, T, 2 * T, device="cuda")
        mask = core.causal_mask(T, T, device="cuda")

        def sdpa(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        fns = {"sdpa_flash_softmax": sdpa, "cog_triton": cog_attention_triton,
               "cog_flex2x": lambda q, k, v: flex(q, torch.cat([k, k], 2), torch.cat([v, -v], 2),
                                                  score_mod=score_mod, block_mask=block_mask),
               "cog_eager_compile": torch.compile(lambda q, k, v: cog_weights(q, k, mask).type_as(v) @ v)}
        inputs = [torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
        res = {name: time_fwd_bwd(fn, inputs) for name, fn in fns.items()}
        ref, eager_ms = res["sdpa_flash_softmax"][0], res["cog_eager_compile"][0]
        for name, (ms, gib) in res.items():
            rows.append(dict(B=B, H=H, T=T, D=D, impl=name, ms=round(ms, 3), peak_gib=round(gib, 3),
                             x_sdpa=round(ms / ref, 2), eager_compile_over_this=round(eager_ms / ms, 2)))
            print(f"B={B:<3} T={T:<5} {name:<20} {ms:8.3f} ms  {gib:6.3f} GiB  {ms / ref:5.2f}x SDPA-flash")
    os.makedirs(cfg.out, exist_ok=True)
    path = os.path.join(cfg.out, "kernel_bench.json")
    with core.atomic(path, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       triton=getattr(triton, "__version__", None), dtype="bfloat16", rows=rows), f, indent=1)
    print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------------------------
# Command line

ACTIONS = {"attn-grid": ("signed attention of the last query, every layer and head (figs 9/10; text: --prompt)",
                         attn_grid),
           "probe": ("representation-difference probe on count_ones / find_a_zero (fig 5)", probe),
           "neg-mass": ("share of negative attention mass per layer over val batches", neg_mass),
           "kernel-bench": ("GPU: fwd+bwd time and memory of the cog kernels vs SDPA-flash softmax", kernel_bench)}


PAPER = core.Paper("cogformer", CogConfig, build_model, baseline="transformer", doc=__doc__, actions=ACTIONS,
                   convert=published_to_ours, formats="the paper's published checkpoints (cog_/vanilla_ckpt_*.pt)",
                   published_tokenizer="llama2", size_preset="141m-gpt2")


def main(argv=None):
    return core.main(PAPER, argv)


if __name__ == "__main__":
    sys.exit(main())
