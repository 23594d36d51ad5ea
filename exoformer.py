"""ExoFormer: attention projection mixing with exogenous anchors, and the baselines it is compared with.

Paper: Jonathan Su, "Attention Projection Mixing and Exogenous Anchors" (also "... with Exogenous Anchors"),
arXiv 2601.08131. Official repo: https://github.com/jon123boss/ExoFormer (model.py, oldmodels/model1-4.py, train.py,
muon/muon.py, analysis.py); checkpoints `ckpt_step:38146.pt` on the Hugging Face hub user Jonnester.

Method. Every layer re-mixes its attention projections with an anchor, p <- lam1 * anchor_p + lam2 * p for
p in {q, k, v, g} (g = the logits of a sigmoid output gate, y <- y * sigmoid(g)), before QK-norm and RoPE; lam is a
scalar, one per head, or one per head dimension (--residual-mode) and starts at 0.5. ResFormer-style models take the
anchor from layer 0's projections; NuResFormer RMS-normalises those anchors; ExoFormer learns dedicated exogenous
anchor projections of the token embedding outside the layer stack (anchor_proj + per-head RMSNorms) and mixes them in
every layer; the dynamic ExoFormer scales each coefficient per token by sigmoid(MLP(x)) (C -> 16 -> 8; coefficients
start at 2 x 0.5 against sigmoid(~0) = 0.5: near the static ExoFormer at init, exactly with fc2 = 0, which model.py
means but does not get: its init draws fc2 like every Linear, see ExoGPT.init_weights).

  --variant           gate  mixed  anchor            anchor norm  (official model file)
  baseline            -     -      -                 -            model1
  gated               yes   -      -                 -            model1
  resformer           -     v      layer 0           -            model1
  nuresformer_nkqr    yes   v g    layer 0           -            model1 (no key/query residual)
  nuresformer_oqkrn   yes   qkvg   layer 0           -            model1 (only q/k normalised, by QK-norm after mixing)
  nuresformer         yes   qkvg   layer 0           qkvg         model2
  exoformer           yes   qkvg   exogenous         qkvg         model3
  dynamic_exoformer   yes   qkvg   exogenous + MLP   qkvg         model4 = model.py (the default)
The axes are also separate knobs (--gate, --mix, --anchor, --anchor-norm, --dynamic) for ablations.

Model and recipe (train.py): Llama-style pre-norm (RMSNorm eps 1e-6), QK-norm, RoPE base 500000, SwiGLU of width 2C,
untied head, no biases, trunc-normal(0.02, +-3 sigma) init with zero-initialised c_proj, w_down and head, document
masking at token 50256 (--doc-sep), cross-entropy + 1e-5 z-loss; Muon (lr 0.01, cautious weight decay 0.1, momentum
0.85 -> 0.95 over 100 steps and back over the last 100) for the block matrices and anchor_proj, AdamW (lr 0.003,
betas 0.9/0.95, no decay) for the rest; 1000 warm-up steps, constant, linear warm-down over the last 20% to 0.1x.
Paper model: 29 layers x 16 heads x 1024 (--preset paper), 16 x 2048 x 8 tokens per step, 38,147 steps.

Fast path: one attention kernel per layer (SDPA/cuDNN, or FlexAttention with document masks); the mixing, norms and
gates are elementwise work around it that torch.compile fuses; no T x T tensor outside the eager reference.

Deviations: fp32 master weights under bf16 autocast (the paper casts the weights themselves to bf16); fp32 RoPE tables;
warm-up (it+1)/(W+1) (core's schedule) instead of (it+1)/W; the reported val loss is plain cross-entropy (the paper's
printed val loss includes the z-term, about 1e-5 x lse^2); FlexAttention instead of flash-attn varlen for document masks
(same math). Ambiguity: model3.py (the static ExoFormer) doubles its lambda init when its config's
dynamic_mixing_enabled is on, and that flag defaults to on in model3's config and train.py although model3 has no
dynamic module; whether the paper's static runs switched it off is not recorded. Ours starts at 0.5 (--lambda-init 1.0
gives model3's default; published files carry their own lambdas). Our Muon is the published rule (muon/muon.py: Polar
Express, NorMuon second moment, cautious weight decay) in plain PyTorch ops; torch.optim.Muon (torch >= 2.9) is not used
because it runs Newton-Schulz with one fixed coefficient triple, plain decoupled decay and no second moment, a different
update. The paper text was not available here: the variant definitions above follow the official code and README;
ResFormer is taken ungated as in Zhou et al. Downstream tasks (run_eval.py) go through bench.py --eval-tasks (not
checked here). Not reproduced: options off in the paper runs (smear gate, per-layer backout, anchor delta, YaRN,
SkyLadder): such checkpoints are refused.

    python exoformer.py --train --preset small --data data/docs --out runs/exo_dyn           # Dynamic E-ExoFormer
    python exoformer.py --train --preset small --data data/docs --variant resformer --out runs/exo_res
    python exoformer.py --plot --out runs/exo_dyn --runs runs/exo_res                        # val curves, one plot
    python bench.py --papers exoformer                              # tokens/s of every variant vs baseline
    python exoformer.py --eval --init-from 'ckpt_step:38146.pt' --data data/fineweb-edu10b   # published checkpoint
    python exoformer.py --analyze --init-from 'ckpt_step:38146.pt' --runs runs/exo_dyn --data data/docs --out runs/an
"""
import json
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import core
from core import opt

# ----------------------------------------------------------------------------------------------------------------
# Config

PATHS = "qkvg"  # the mixed pathways, in the order of c_attn's blocks and of the dynamic module's outputs
VARIANT_FLAGS = {
    "dynamic_exoformer": dict(gate="on", mix="qkvg", anchor="exo", anchor_norm="qkvg", dynamic="on"),
    "baseline": dict(gate="off", mix="", anchor="none", anchor_norm="", dynamic="off"),
    "gated": dict(gate="on", mix="", anchor="none", anchor_norm="", dynamic="off"),
    "resformer": dict(gate="off", mix="v", anchor="layer0", anchor_norm="", dynamic="off"),
    "nuresformer_nkqr": dict(gate="on", mix="vg", anchor="layer0", anchor_norm="", dynamic="off"),
    "nuresformer_oqkrn": dict(gate="on", mix="qkvg", anchor="layer0", anchor_norm="", dynamic="off"),
    "nuresformer": dict(gate="on", mix="qkvg", anchor="layer0", anchor_norm="qkvg", dynamic="off"),
    "exoformer": dict(gate="on", mix="qkvg", anchor="exo", anchor_norm="qkvg", dynamic="off"),
}


def describe(f):
    """One --help line of a variant from its flags."""
    anchor = dict(layer0="layer 0", exo="exogenous").get(f["anchor"])
    mix = f"{f['mix']} mixed with {anchor} anchors" if f["mix"] else "no mixing"
    return ", ".join(filter(None, ("gated" if f["gate"] == "on" else "ungated", mix,
                                   f"anchors normed {f['anchor_norm']}" if f["anchor_norm"] else "",
                                   "per-token dynamic scales" if f["dynamic"] == "on" else "")))


RECIPE = dict(n_layer=29, n_head=16, n_embd=1024, block_size=2048, vocab_size=57601, batch_size=16, grad_accum=8,
             max_iters=38147, eval_interval=100, eval_iters=10)  # train.py and analysis.py's fallback config


@dataclass
class ExoConfig(core.Config):
    family: str = opt("llama", "llama only: the paper's model (RMSNorm, SwiGLU, RoPE, untied head)")
    norm_eps: float = opt(1e-6, "epsilon of every RMSNorm")
    rope_theta: float = opt(500000.0, "RoPE base")
    mlp_hidden: int = opt(0, "SwiGLU hidden width (0: 2C, the paper's mlp_ratio 4 halved by the gate)")
    lr: float = opt(3e-3, "AdamW peak learning rate (embeddings, head, norms, mixing coefficients)", True)
    min_lr: float = opt(3e-4, "AdamW final learning rate; Muon ends at the same fraction of --muon-lr (0.1)", True)
    warmup_iters: int = opt(1000, "linear warm-up steps", True)
    schedule: str = opt("wsd", "wsd (the paper: constant, then linear warm-down) or cosine", True)
    weight_decay: float = opt(0.0, "AdamW weight decay (the paper: 0)", True)
    eval_tokens: int = opt(100_007_936, "--eval: val tokens to score (paper: 3052 x 16 x 2048; 0 = whole split)",
                           True)
    gate: str = opt("auto", "sigmoid output gate per head dimension: on, off, auto (from --variant)")
    mix: str = opt("auto", "pathways mixed with the anchor, a subset of qkvg ('' none; auto: from --variant)")
    anchor: str = opt("auto", "anchor source: none, layer0 (first layer's projections), exo (exogenous), auto")
    anchor_norm: str = opt("auto", "pathways whose anchor is RMS-normalised, a subset of qkvg, or auto")
    dynamic: str = opt("auto", "per-token dynamic mixing scales: on, off, auto (from --variant)")
    residual_mode: str = opt("elementwise", "granularity of the mixing coefficients: scalar, headwise, elementwise")
    lambda_init: float = opt(0.5, "initial lam1 = lam2 (times 2 with --dynamic on, halved by sigmoid(0))")
    dynamic_hidden: int = opt(16, "hidden width of the dynamic mixing MLP")
    z_loss: float = opt(1e-5, "weight of the z-loss mean(logsumexp(logits)^2), training only", True)
    doc_sep: int = opt(50256, "document separator token: attention stays inside documents (-1: off)")
    muon_lr: float = opt(0.01, "Muon peak learning rate (block matrices and anchor_proj)", True)
    muon_wd: float = opt(0.1, "Muon (cautious) weight decay", True)

    PRESETS = {**core.Config.PRESETS,
               "small": dict(n_layer=4, n_head=12, n_embd=768, block_size=1024, batch_size=16, max_iters=600,
                             warmup_iters=50, eval_interval=100, eval_iters=20, log_interval=25),  # GPU comparisons
               "paper": RECIPE}
    VARIANTS = {v: describe(f) for v, f in VARIANT_FLAGS.items()}

    def label(self):
        """The variant these axes make (--variant baseline --gate on is the gated model; a published file's name says
        nothing), or the variant and the axes set apart from it."""
        axes = {k: getattr(self, k) for k in VARIANT_FLAGS[self.variant]}
        own = VARIANT_FLAGS[self.variant]
        return next((v for v in [self.variant, *VARIANT_FLAGS] if VARIANT_FLAGS[v] == axes), None) or \
            self.variant + " with " + ", ".join(f"{k}={v or 'none'}" for k, v in axes.items() if v != own[k])

    def __post_init__(self):
        super().__post_init__()

        def check(ok, msg):
            if not ok:
                raise core.ConfigError(msg)
        check(self.family == "llama", "exoformer.py builds the paper's Llama-style model: --family must be llama")
        check(self.doc_sep >= -1, f"--doc-sep must be a token id, or -1 for off, not {self.doc_sep}")
        for name, value in VARIANT_FLAGS[self.variant].items():
            if getattr(self, name) == "auto":
                setattr(self, name, value)
        self.mlp_hidden = self.mlp_hidden or 2 * self.n_embd
        check(self.gate in ("on", "off") and self.dynamic in ("on", "off"), "--gate and --dynamic take on or off")
        check(self.anchor in ("none", "layer0", "exo"), f"--anchor must be none, layer0 or exo, not {self.anchor!r}")
        check(set(self.mix) <= set(PATHS) and set(self.anchor_norm) <= set(PATHS),
              "--mix and --anchor-norm take a subset of the letters qkvg")
        # in PATHS order, each letter once: --mix gv is nuresformer_nkqr's vg (its label, the saved config)
        self.mix, self.anchor_norm = ("".join(p for p in PATHS if p in s) for s in (self.mix, self.anchor_norm))
        check(self.anchor != "none" or not self.anchor_norm, "--anchor-norm needs an anchor (--anchor layer0 or exo)")
        check("g" not in self.mix or self.gate == "on", "mixing the gate (--mix with g) needs --gate on")
        check(bool(self.mix) == (self.anchor != "none"), "--mix and --anchor go together: both set or both none")
        check(self.dynamic == "off" or set(self.mix) == set(PATHS[:4 if self.gate == "on" else 3]),
              "--dynamic on mixes every pathway: --mix qkvg (qkv with --gate off)")
        check(self.residual_mode in ("scalar", "headwise", "elementwise"),
              f"--residual-mode must be scalar, headwise or elementwise, not {self.residual_mode!r}")
        check(self.muon_lr > 0 and self.z_loss >= 0 and self.dynamic_hidden > 0,
              "need --muon-lr > 0, --z-loss >= 0, --dynamic-hidden > 0")


# ----------------------------------------------------------------------------------------------------------------
# Attention

def span(mix):
    """(i0, i1): the pathways from the first to the last mixed one, in c_attn's block order; mixing runs on that
    slice of the (B, T, P, H, D) projections at once."""
    idx = [PATHS.index(p) for p in mix] or [0]
    return min(idx), max(idx) + 1


class DynamicMixing(nn.Module):
    """Per-token scales sigmoid(fc2(GELU(fc1 x))) of (q1, q2, k1, k2, v1, v2[, g1, g2]) (init: ExoGPT.init_weights)."""

    def __init__(self, C, hidden, n_out):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, hidden, bias=False), nn.Linear(hidden, n_out, bias=True)

    def forward(self, x):
        return torch.sigmoid(self.fc2(F.gelu(self.fc1(x))))  # (B, T, n_out)


class ExoAttention(core.Attention):
    """One attention for every variant: c_attn -> mix with the anchor -> QK-norm -> RoPE -> attend -> gate -> c_proj."""
    FAST_CPU = "eager"  # FlexAttention (document masks) has no CPU backward

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        C, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
        self.gated = cfg.gate == "on"
        self.c_attn = nn.Linear(C, (4 if self.gated else 3) * C, bias=False)  # q, k, v[, g] blocks
        self.c_proj = nn.Linear(C, C, bias=False)
        self.q_norm, self.k_norm = core.RMSNorm(D, eps=cfg.norm_eps), core.RMSNorm(D, eps=cfg.norm_eps)
        # exogenous anchors exist before layer 0 and are mixed everywhere; layer 0's own projections only later
        self.mix = cfg.mix if cfg.anchor == "exo" or layer > 0 else ""
        self.span = span(cfg.mix)
        self.makes_anchor = cfg.anchor == "layer0" and layer == 0
        shape = {"scalar": (), "headwise": (H,), "elementwise": (H, D)}[cfg.residual_mode]
        lam = cfg.lambda_init * (2.0 if cfg.dynamic == "on" else 1.0)
        for p in self.mix:
            for i in "12":
                setattr(self, f"lambda_{p}{i}", nn.Parameter(torch.full(shape, lam)))
        if self.makes_anchor:  # q/k anchors are normalised by this layer's QK-norm, v/g by their own
            for p in "vg"[:2 if self.gated else 1]:
                if p in cfg.anchor_norm:
                    setattr(self, f"{p}_res_norm", core.RMSNorm(D, eps=cfg.norm_eps))
        if cfg.dynamic == "on" and self.mix:
            self.dynamic_mixing = DynamicMixing(C, cfg.dynamic_hidden, 2 * (4 if self.gated else 3))

    def coefficients(self, dtype):
        """lam1, lam2 of the pathways in self.span, stacked: (P', H|1, D|1); lam1 = 0, lam2 = 1 for a pathway inside
        the span that --mix leaves out."""
        ref = getattr(self, f"lambda_{self.mix[0]}1")
        const = lambda i: ref.new_full(ref.shape, float(i == "2"))
        lam = lambda p, i: getattr(self, f"lambda_{p}{i}") if p in self.mix else const(i)
        l1, l2 = (torch.stack([lam(p, i) for p in PATHS[slice(*self.span)]]).to(dtype) for i in "12")
        while l1.dim() < 3:  # scalar (P',) and headwise (P', H) -> broadcastable over (P', H, D)
            l1, l2 = l1[..., None], l2[..., None]
        return l1, l2

    def forward(self, x, ctx):
        B, T, C = x.shape
        proj = self.c_attn(x).view(B, T, -1, self.n_head, self.head_dim)  # (B, T, P, H, D): q, k, v[, g]
        if self.mix:
            proj = self.mix_anchor(proj, x, ctx)
        q, k = self.q_norm(proj[:, :, 0]), self.k_norm(proj[:, :, 1])
        if self.makes_anchor:
            ctx.cache["anchor"] = self.layer0_anchor(proj, q, k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, proj[:, :, 2]))  # (B, H, T, D)
        q, k = core.apply_rope(q, *ctx.rope), core.apply_rope(k, *ctx.rope)
        y = self.attend(q, k, v, ctx).transpose(1, 2)  # (B, T, H, D)
        if self.gated:
            gate = torch.sigmoid(proj[:, :, 3])
            if stat := getattr(ctx.record, "stat", None):  # analysis hook (see Recorder)
                stat(self.layer, "gate", gate)
            y = y * gate
        return self.c_proj(y.reshape(B, T, C))

    def mix_anchor(self, proj, x, ctx):
        """p <- lam1 * anchor_p + lam2 * p, for all pathways of self.span in one elementwise op (in the projections'
        dtype, bf16 under autocast); the dynamic variant scales lam1, lam2 of each pathway per token."""
        i0, i1 = self.span
        l1, l2 = self.coefficients(proj.dtype)
        if hasattr(self, "dynamic_mixing"):  # (B, T, P, 2): (lam1, lam2) scales of each pathway
            s = self.dynamic_mixing(x).view(*x.shape[:2], -1, 2)[..., None, None]
            l1, l2 = l1 * s[:, :, :, 0], l2 * s[:, :, :, 1]
        if stat := getattr(ctx.record, "stat", None):
            for p in self.mix:
                i = PATHS.index(p) - i0
                stat(self.layer, f"lam_{p}", torch.stack([l[..., i, :, :].float().mean() for l in (l1, l2)]))
        mixed = l1 * ctx.cache["anchor"] + l2 * proj[:, :, i0:i1]
        return torch.cat([proj[:, :, :i0], mixed, proj[:, :, i1:]], dim=2)

    def layer0_anchor(self, proj, q, k):
        """ResFormer family: layer 0's pre-RoPE projections of the span, RMS-normalised where --anchor-norm asks
        (NuResFormer; q and k by this layer's QK-norm). (B, T, P', H, D)"""
        norm = self.cfg.anchor_norm
        parts = {"q": q if "q" in norm else proj[:, :, 0], "k": k if "k" in norm else proj[:, :, 1]}
        for i, p in enumerate("vg"[:2 if self.gated else 1], start=2):
            res_norm = getattr(self, f"{p}_res_norm", None)
            parts[p] = res_norm(proj[:, :, i]) if res_norm else proj[:, :, i]
        return torch.stack([parts[p] for p in PATHS[slice(*span(self.cfg.mix))]], dim=2)


# ----------------------------------------------------------------------------------------------------------------
# Model, optimizer and VARIANTS (VARIANT_FLAGS above)

class ExoGPT(core.GPT):
    def __init__(self, cfg):
        super().__init__(cfg, ExoAttention)
        if cfg.anchor == "exo":  # exogenous anchors: projections of the token embedding, outside the layer stack
            C, D = cfg.n_embd, cfg.head_dim
            self.anchor_proj = nn.Linear(C, (4 if cfg.gate == "on" else 3) * C, bias=False)
            for p in PATHS[:4 if cfg.gate == "on" else 3]:
                if p in cfg.anchor_norm:
                    setattr(self, f"anchor_{p}_norm", core.RMSNorm(D, eps=cfg.norm_eps))
            self.init_weights()

    def init_weights(self, std=0.02):
        """Truncated normal (cutoff 3 std) for every Linear and embedding; zero output projections and head. The
        dynamic MLP's fc1 and fc2 weights too: model.py's DynamicMixingModule zeroes fc2, but OBPM's
        self.apply(_init_weights) then reaches fc1 and fc2 as Linears and draws them; only fc2's bias stays 0."""
        for name, m in self.named_modules():
            if name.endswith(("attn.c_proj", "mlp.w_down")) or name == "lm_head":
                nn.init.zeros_(m.weight)
            elif isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, 0.0, std, -3 * std, 3 * std)
                if name.endswith("dynamic_mixing.fc2"):
                    nn.init.zeros_(m.bias)

    def doc_ids(self, idx):
        if 0 <= self.cfg.doc_sep < self.cfg.vocab_size:  # the separator opens the next document
            return (idx == self.cfg.doc_sep).cumsum(1)
        return None

    def embed(self, idx, ctx):
        x = super().embed(idx, ctx)
        if self.cfg.anchor == "exo":
            B, T, C = x.shape
            a = self.anchor_proj(x).view(B, T, -1, self.cfg.n_head, self.cfg.head_dim)  # (B, T, P, H, D)
            norm = lambda p, t: getattr(self, f"anchor_{p}_norm")(t) if hasattr(self, f"anchor_{p}_norm") else t
            i0, i1 = span(self.cfg.mix)
            ctx.cache["anchor"] = torch.stack([norm(p, a[:, :, i]) for i, p in enumerate(PATHS[i0:i1], i0)],
                                              dim=2)  # (B, T, P', H, D)
        return x

    def loss_fn(self, logits, targets):
        """Cross-entropy; while training plus z_loss * mean(logsumexp^2) over the scored tokens (criterion.py)."""
        logits, targets = logits.float().view(-1, logits.size(-1)), targets.reshape(-1)
        keep = (targets != -1).float()
        lse = torch.logsumexp(logits, dim=-1)
        nll = lse - logits.gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
        if self.training and self.cfg.z_loss:
            nll = nll + self.cfg.z_loss * lse.square()
        return (nll * keep).sum() / keep.sum()

    def configure_optimizers(self, cfg, device_type):
        """Muon for the block matrices and anchor_proj, AdamW for embeddings, head, norms, biases and lambdas."""
        named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        is_matrix = lambda n, p: (p.dim() >= 2 and "lambda_" not in n  # elementwise lambdas are (H, D): AdamW
                                  and not n.startswith(("transformer.wte", "lm_head")))
        mats = {n: p for n, p in named if is_matrix(n, p)}
        # the official SwiGLU's fc1 is one matrix [w_up; w_gate]: Muon orthogonalises and scales the pair as one
        units = [(p, mats[n.replace("w_up", "w_gate")]) if n.endswith("mlp.w_up.weight") else p
                 for n, p in mats.items() if not n.endswith("mlp.w_gate.weight")]
        muon = Muon(units, cfg.muon_lr, cfg.muon_wd, cfg.max_iters)
        adamw = torch.optim.AdamW([p for n, p in named if not is_matrix(n, p)], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay, fused=device_type == "cuda")
        for o, lr in ((muon, cfg.muon_lr), (adamw, cfg.lr)):
            for g in o.param_groups:
                g["base_lr"] = lr
        return [muon, adamw]


POLAR_EXPRESS = ((8.156554524902461, -22.48329292557795, 15.878769915207462),  # arXiv 2505.16932, 5 steps
                 (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                 (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                 (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                 (2.3465413258596377, -1.7097828382687081, 0.42323551169305323))
MUON_MOMENTUM, MUON_MOMENTUM_STEPS, MUON_BETA2 = (0.85, 0.95), 100, 0.95


def polar_express(G):
    """~U V^T of G = U S V^T (one matrix or a (N, rows, cols) batch): X <- a X + (b A + c A^2) X with A = X X^T,
    X in bf16 between steps. On CUDA the matmuls run in bf16 with fp32 accumulation, as the published Triton kernels
    (its default path) do; elsewhere in fp32, as its PyTorch fallback does."""
    X = G.bfloat16()
    wide = G.size(-2) <= G.size(-1)
    X = X if wide else X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * 1.02 + 1e-6)  # spectral norm <= 1
    mm_add = torch.baddbmm if X.dim() == 3 else torch.addmm  # beta * input + alpha * (m1 @ m2)
    for a, b, c in POLAR_EXPRESS:
        if X.is_cuda:
            A = X @ X.mT
            X = mm_add(X, mm_add(A, A, A, beta=b, alpha=c), X, beta=a)
        else:
            Xf = X.float()
            A = Xf @ Xf.mT
            X = (a * Xf + (b * A + c * (A @ A)) @ Xf).bfloat16()
    return X if wide else X.mT


def muon_momentum(step, total):
    lo, hi = MUON_MOMENTUM
    if step < MUON_MOMENTUM_STEPS:
        return lo + step / MUON_MOMENTUM_STEPS * (hi - lo)
    if step > total - MUON_MOMENTUM_STEPS:
        return hi - (step - (total - MUON_MOMENTUM_STEPS)) / MUON_MOMENTUM_STEPS * (hi - lo)
    return hi


class Muon(torch.optim.Optimizer):
    """The paper's Muon (muon/muon.py): Nesterov momentum, Polar Express, NorMuon second moment, shape scaling,
    cautious weight decay (decay only where update and weight agree in sign). Momentum follows muon_momentum.
    params: matrices, or tuples of matrices updated as one matrix, their rows stacked (SwiGLU's [w_up; w_gate])."""

    def __init__(self, params, lr, weight_decay, total_steps):
        self.units = [tuple(u) if isinstance(u, (tuple, list)) else (u,) for u in params]
        super().__init__([p for u in self.units for p in u],
                         dict(lr=lr, weight_decay=weight_decay, total_steps=total_steps, step=0))

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        m, lr, wd = muon_momentum(group["step"], group["total_steps"]), group["lr"], group["weight_decay"]
        group["step"] += 1
        shapes = {}
        for unit in self.units:
            if unit[0].grad is not None:
                shapes.setdefault(tuple(p.shape for p in unit), []).append(unit)
        for units in shapes.values():  # one batched update per shape: few kernel launches per step
            self.update(units, m, lr, wd)

    def update(self, units, m, lr, wd):
        parts = [p.size(0) for p in units[0]]
        rows, cols = sum(parts), units[0][0].size(1)
        tall = rows >= cols
        for unit in units:
            if not self.state[unit[0]]:  # the unit's row (or column) second moment lives with its first matrix
                self.state[unit[0]]["variance_buffer"] = unit[0].new_zeros((rows, 1) if tall else (1, cols))
                for p in unit:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        params = [p for unit in units for p in unit]
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        vbufs = [self.state[unit[0]]["variance_buffer"] for unit in units]
        torch._foreach_lerp_(bufs, [p.grad for p in params], 1 - m)
        stack = lambda ts: torch.stack(ts if len(parts) == 1 else  # a unit's matrices, rows stacked
                                       [torch.cat(ts[i:i + len(parts)]) for i in range(0, len(ts), len(parts))])
        u = polar_express(stack([p.grad for p in params]).lerp_(stack(bufs), m))  # Nesterov; (N, rows, cols)
        norm = u.norm(dim=(-2, -1), keepdim=True)
        v = torch.stack(vbufs).lerp_(u.square().mean(dim=-1 if tall else -2, keepdim=True).to(vbufs[0].dtype),
                                     1 - MUON_BETA2)
        torch._foreach_copy_(vbufs, v.unbind(0))
        u = u * v.clamp(min=1e-10).rsqrt()  # per-row (or column) second-moment normalisation
        u = u * (norm / u.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-10))  # keep the orthogonal norm
        u = (u * max(1.0, rows / cols) ** 0.5).to(params[0].dtype)
        u = [piece for x in u for piece in x.split(parts)]  # back to each parameter's rows
        if wd:  # cautious: decay only where update and weight agree in sign
            torch._foreach_addcmul_(params, [(d * p >= 0).to(d.dtype) for d, p in zip(u, params)], params,
                                    value=-lr * wd)
        torch._foreach_add_(params, u, alpha=-lr)


# ----------------------------------------------------------------------------------------------------------------
# The paper's published checkpoints (any of the four official model files)

UNSUPPORTED = dict(smear_gate_enabled=False, per_layer_backout=False, embedding_layer0_mix_enabled=False,
                   anchor_delta_enabled=False, weight_tying=False, logit_soft_cap=None, clip_qkv=None,
                   yarn_enabled=False, rmsnorm_use_bias=False, rmsnorm_use_weight=True, qk_norm=True,
                   act_type="swiglu", norm_pos="before")
RENAMES = (("transformer.layers.", "transformer.h."), (".attn_norm.", ".norm_1."), (".mlp_norm.", ".norm_2."),
           ("transformer.final_norm.", "transformer.norm_f."), (".mlp.fc2.", ".mlp.w_down."),
           (".attn.v_norm.", ".attn.v_res_norm."), (".attn.g_norm.", ".attn.g_res_norm."))


def from_published(ckpt, path, given=None):
    """(config, state_dict) of a train.py checkpoint (compiled `_orig_mod.` keys too), None for another format.
    The model file is recognised from the keys (the model_args fields of model1-3 are identical): dynamic_mixing ->
    model4, anchor_proj -> model3/4 exogenous, attn.v_norm in every layer -> model2, *_res_norm -> model3/4 internal,
    else model1 (raw layer-0 anchors)."""
    if "model_args" not in ckpt or "model" not in ckpt:
        return None
    args, sd = ckpt["model_args"], core.strip_prefix(ckpt["model"])
    bad = [k for k, ok in UNSUPPORTED.items() if args.get(k, ok) != ok]
    if bad:
        raise core.ConfigError(f"{path}: the published model uses {', '.join(bad)}, which exoformer.py does not build")
    gated, has = args["gated_attention_enabled"], lambda s: any(s in k for k in sd)
    enabled = ("query_res_enabled", "key_res_enabled", "value_res_enabled", "gate_res_enabled")
    mix = "".join(p for p, f in zip(PATHS, enabled) if args.get(f) and (p != "g" or gated))
    by_flags = "".join(p for p in PATHS if args.get(f"{p}_residual_norm_enabled"))
    if has("anchor_proj"):
        anchor, anchor_norm = "exo", by_flags
    elif not mix:
        anchor, anchor_norm = "none", ""
    elif has(".attn.v_norm."):  # model2: all layer-0 anchors normalised; v_norm/g_norm of layers > 0 are unused
        anchor, anchor_norm = "layer0", "qkvg"
        sd = {k: v for k, v in sd.items() if not (".v_norm." in k or ".g_norm." in k) or ".layers.0." in k}
    else:
        anchor, anchor_norm = "layer0", by_flags if has("_res_norm") else ""
    flags = dict(gate="on" if gated else "off", mix=mix, anchor=anchor, anchor_norm=anchor_norm,
                 dynamic="on" if has("dynamic_mixing") else "off")
    fallback = {"none": "gated" if gated else "baseline", "layer0": "nuresformer",
                "exo": "dynamic_exoformer" if flags["dynamic"] == "on" else "exoformer"}[anchor]
    variant = next((v for v, f in VARIANT_FLAGS.items() if f == flags), fallback)
    hidden = (args.get("mlp_hidden_dim") or int(args["n_embd"] * args["mlp_ratio"])) // 2
    cfg = ExoConfig(variant=variant, n_layer=args["n_layer"], n_head=args["n_head"], n_embd=args["n_embd"],
                    block_size=args["block_size"], vocab_size=args["vocab_size"], mlp_hidden=hidden,
                    rope_theta=args["rope_theta"], norm_eps=args["rmsnorm_eps"], residual_mode=args["residual_mode"],
                    dynamic_hidden=args.get("dynamic_mixing_hidden_dim", 16), **flags)
    out = {}
    for k, v in sd.items():
        for old, new in RENAMES:
            k = k.replace(old, new)
        if k.endswith("mlp.fc1.weight"):  # SwiGLU: x, gate = fc1(x).chunk(2); silu(gate) * x
            out[k.replace("fc1", "w_up")], out[k.replace("fc1", "w_gate")] = v.float().chunk(2)
        else:
            out[k] = v.float()
    return cfg, out


# ----------------------------------------------------------------------------------------------------------------
# Analysis (analysis.py): mixing coefficients, gates, attention sink, representation measures, per layer

class Recorder:
    """record(layer, probs) from eager attention, stat(layer, name, tensor) from ExoAttention: per-layer means."""

    def __init__(self):
        self.layers = {}

    def put(self, layer, **kv):
        self.layers.setdefault(layer, {}).update({k: float(v) for k, v in kv.items()})

    def __call__(self, layer, probs):  # (B, H, T, S)
        p = probs.clamp(min=1e-10)
        self.put(layer, sink=probs[..., 0].mean(), entropy=-(p * p.log()).sum(-1).mean())

    def stat(self, layer, name, t):
        if name == "gate":
            self.put(layer, gate_mean=t.float().mean(), gate_sparsity=(t < 0.2).float().mean())
        else:  # lam_p: effective (lam1, lam2) means, per-token dynamic scales included
            self.put(layer, **{f"{name}1": t[0], f"{name}2": t[1], f"ratio_{name[-1]}": t[0] / t[1]})


@torch.no_grad()
def measure(model, idx):
    """Per-layer measures on one batch; hidden states = [embedding, block outputs]; plain causal attention."""
    rec, hidden = Recorder(), []
    hooks = [m.register_forward_hook(lambda m, i, o: hidden.append(o.float()))
             for m in [model.transformer.wte, *model.transformer.h]]
    model(idx, doc=torch.zeros_like(idx), record=rec)  # analysis.py's output_attentions path has no doc mask
    for h in hooks:
        h.remove()
    keys = dict.fromkeys(k for r in rec.layers.values() for k in r)
    per_layer = {k: [rec.layers[i].get(k) for i in sorted(rec.layers)] for k in keys}
    units = [F.normalize(h, dim=-1) for h in hidden]  # (B, T, C) each
    T = idx.size(1)
    upper = torch.triu(torch.ones(T, T, dtype=torch.bool, device=idx.device), diagonal=1)
    rep = dict(max_act=[], token_sim=[], token_sim_std=[], cos_to_embedding=[], pca_core=[])
    for h, u in zip(hidden, units):
        sim = (u @ u.mT)[:, upper]  # token-to-token cosine, distinct pairs (over-smoothing)
        x = h.reshape(-1, h.size(-1)).double()
        eig = torch.linalg.eigvalsh((x - x.mean(0)).mT @ (x - x.mean(0))).flip(0).clamp(min=0)
        rep["max_act"].append(h.abs().max().item())
        rep["token_sim"].append(sim.mean().item())
        rep["token_sim_std"].append(sim.std().item())
        rep["cos_to_embedding"].append(F.cosine_similarity(hidden[0].flatten(1), h.flatten(1)).mean().item())
        rep["pca_core"].append(int((eig.cumsum(0) / eig.sum() < 0.99).sum()) + 1)  # PCs for 99% of the variance
    layer_sim = [[(a * b).sum(-1).mean().item() for b in units] for a in units]
    return dict(attention_layers=per_layer, hidden_layers=rep, layer_similarity=layer_sim,
                lambdas=static_lambdas(model))


def static_lambdas(model):
    """Learned lam1/lam2 per layer and pathway: means, and the elementwise ratio map (analysis.py's heatmaps)."""
    out = {}
    for i, block in enumerate(model.transformer.h):
        for p in block.attn.mix:
            l1, l2 = (getattr(block.attn, f"lambda_{p}{j}").detach().float().cpu() for j in "12")
            out.setdefault(p, []).append(dict(layer=i, lam1=l1.mean().item(), lam2=l2.mean().item(),
                                              ratio=(l1 / l2).flatten().tolist()))
    return out


def analyze(cfg, args):
    """Every checkpoint of --init-from and --runs (run dirs or .pt files) on the first val batch of --data."""
    paths = list(dict.fromkeys(p for p in [cfg.init_from, *args.runs] if p)) or [cfg.out]
    paths = [os.path.join(p, "ckpt.pt") if os.path.isdir(p) else p for p in paths]
    names = [os.path.basename(os.path.dirname(p)) if p.endswith("ckpt.pt") else os.path.basename(p) for p in paths]
    names = names if len(set(names)) == len(names) else paths  # alike names (published files): their paths
    device = core.resolve_device(cfg)
    data = core.TokenData(cfg.data)
    results = {}
    mean = lambda xs: (sum(x for x in xs if x is not None) / sum(x is not None for x in xs)
                       if any(x is not None for x in xs) else None)
    for name, path in zip(names, paths):
        model = core.load_model(PAPER, path, device, given=vars(args), data=data)
        T = min(cfg.block_size, model.cfg.block_size)  # the model's own positions at most
        windows = list(data.windows("val", T, 4 * T))[:4]
        if not windows:
            raise core.ConfigError(f"the val split of {cfg.data} is shorter than one window of {T + 1} tokens")
        idx = torch.stack(windows)[:, :-1].to(device)  # (4, T)
        if int(idx.max()) >= model.cfg.vocab_size:
            raise core.ConfigError(f"{path}: --data has tokens beyond the model's vocabulary ({model.cfg.vocab_size})")
        with core.autocast(device, cfg):
            r = results[name] = dict(path=path, variant=model.cfg.variant, data=cfg.data, windows=list(idx.shape),
                                     **measure(model, idx))
        gate = mean(r["attention_layers"].get("gate_mean", [None]))
        print(f"{name} ({model.cfg.label()}, {len(idx)} x {T} val tokens of {cfg.data}), means over the layers: sink "
              f"{mean(r['attention_layers']['sink']):.4f} | entropy "
              f"{mean(r['attention_layers']['entropy']):.3f} | gate {'n/a' if gate is None else f'{gate:.3f}'} | "
              f"and the embedding: token sim {mean(r['hidden_layers']['token_sim']):.3f} | PCA core "
              f"{mean(r['hidden_layers']['pca_core']):.1f}")
    os.makedirs(cfg.out, exist_ok=True)
    with core.atomic(os.path.join(cfg.out, "analysis.json"), "w") as f:
        json.dump(results, f)
    print(plot_analysis(results, os.path.join(cfg.out, "analysis.png")))


PANELS = [("ratio_q", "query lam1/lam2"), ("ratio_k", "key lam1/lam2"), ("ratio_v", "value lam1/lam2"),
          ("ratio_g", "gate lam1/lam2"), ("gate_mean", "mean gate score"), ("gate_sparsity", "gate sparsity (< 0.2)"),
          ("sink", "attention to the first token"), ("entropy", "attention entropy"), ("max_act", "max |activation|"),
          ("token_sim", "token-token cosine (mean)"), ("cos_to_embedding", "cosine to the embedding"),
          ("pca_core", "PCA core features (99%)")]
HIDDEN_KEYS = ("max_act", "token_sim", "cos_to_embedding", "pca_core")  # measured on [embedding, layer outputs]


def plot_analysis(results, png):
    plt = core.pyplot()
    import matplotlib.ticker
    fig, axes = plt.subplots(3, 4, figsize=(18, 11))
    color = {name: f"C{i}" for i, name in enumerate(results)}  # a run keeps its colour in panels it is missing from
    for ax, (key, title) in zip(axes.flat, PANELS):
        for name, r in results.items():
            ys = r["attention_layers"].get(key) or r["hidden_layers"].get(key)
            if ys and any(y is not None for y in ys):
                x0 = -1 if key in HIDDEN_KEYS else 0
                ax.plot(range(x0, x0 + len(ys)), [float("nan") if y is None else y for y in ys], marker="o",
                        ms=3, color=color[name])
        ax.set_title(title)
        ax.set_xlabel("layer (-1: the embedding)" if key in HIDDEN_KEYS else "layer")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_yscale("log" if key == "max_act" else "linear")
        ax.grid(alpha=0.3)
    fig.legend([plt.Line2D([], [], color=c, marker="o", ms=3) for c in color.values()], list(color),
               loc="lower center", ncol=min(len(color), 6))  # every run, once
    data = dict.fromkeys(os.path.basename(os.path.normpath(r["data"])) for r in results.values() if r.get("data"))
    fig.suptitle(f"the first val windows of {', '.join(data) or 'unrecorded data'} (one batch of each model's length)")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


# ----------------------------------------------------------------------------------------------------------------
# Command line

def build_model(cfg):
    return ExoGPT(cfg)


PAPER = core.Paper(
    "exoformer", ExoConfig, build_model, baseline="baseline", doc=__doc__, convert=from_published,
    formats="the paper's train.py checkpoints (ckpt_step:*.pt, any of the four model files)",
    actions={"analyze": ("per-layer mixing coefficients, gate statistics, attention sink and representation measures "
                         "of --init-from and --runs checkpoints on the val split (<out>/analysis.json, analysis.png)",
                         analyze)})


def main(argv=None):
    return core.main(PAPER, argv)


if __name__ == "__main__":
    sys.exit(main())
