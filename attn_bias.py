"""Explicit attention biases and the attention-sink baseline (Massive Activations, sec. 5.2).

Paper: Mingjie Sun, Xinlei Chen, J. Zico Kolter, Zhuang Liu, "Massive Activations in Large Language Models",
arXiv 2402.17762 (COLM 2024). Official repo: https://github.com/locuslab/massive-activations (gpt-2/, on nanoGPT).

Method. Massive activations act as an input-independent attention bias: they pull attention onto their token and add
a near-constant term to the attention output. Give the model that bias explicitly and they are no longer needed.
Three GPT-2 small models (sec. 5.2 and the repository's gpt-2/ code):
- default: nanoGPT GPT-2 (no biases, exact GELU, tied head);
- sink: one learned vector `reg_token` (1, 1, C) is prepended before the blocks (no position embedding) and dropped
  after the final norm, in training, eval and generation alike;
- attn_bias: per layer and head a learned key k' and value v' (`k_bias`, `v_bias`, each (1, H, 1, D)) that every
  query attends to: softmax(q [Kᵀ k'] / √D) [V; v'ᵀ]. Both start at N(0, 0.02²) and are weight-decayed, like
  reg_token.

Attention paths of attn_bias (--attn-impl): eager (prepend k', v' and mask with the T×(T+1) lower-right causal mask:
the paper's math, the reference), sdpa (the same mask through SDPA: the paper's code, ×1.20 a plain step),
flex (FlexAttention over the T real keys, then the bias key folded in through the log-sum-exp),
cudnn (default on GPU; the same merge on PyTorch's private cuDNN kernel with our own backward, checked against the
masked reference once per process before use, else FlexAttention) and flash (flash-attn's bottom-right causal mask
when installed, else the merge on the private flash kernel). On CPU, cudnn and flash use the CPU flash kernel.
Never prepend k' and call SDPA with is_causal=True: its mask is top-left aligned and drops each query's own key.

Deviations: none in the models (the default variant, attn_bias, is also what the original's default config trains,
though its model_type says default); we compile the model on GPU; --eval scores the whole split in non-overlapping
windows (test.py draws 500 random batches); --analyze averages 10 val windows (analyze.py: 3) and labels the sink
position in the 3-D plot (analyze.py's labels crash on it); our GPU runs use data/docs, not OpenWebText.

    python attn_bias.py --train --preset paper --variant attn_bias --data data/openwebtext --out runs/owt_bias
    python attn_bias.py --train --preset short --variant sink --data data/docs --out runs/docs_sink
    python attn_bias.py --eval --init-from pretrained/attn_bias/ckpt_50000.pt --data data/openwebtext
    python attn_bias.py --analyze --runs runs/docs_default runs/docs_sink runs/docs_attn_bias --data data/docs \\
        --out runs/docs_analysis
    python attn_bias.py --bench --preset 124m --batch-size 12 --variant attn_bias
"""
import functools
import json
import os
import sys
import textwrap
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import core

try:  # torch >= 2.9 spells the log-sum-exp request return_aux=AuxRequest(lse=True); older: return_lse=True
    from torch.nn.attention.flex_attention import AuxRequest
except ImportError:
    AuxRequest = None

# ----------------------------------------------------------------------------------------------------------------
# Config

RECIPE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=False, dropout=0.0, batch_size=12,
             grad_accum=40, max_iters=50000, lr=6e-4, min_lr=6e-5, warmup_iters=2000, lr_decay_iters=600000,
             weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, eval_interval=1000, eval_iters=200,
             log_interval=10)  # the repository's config: 491,520 tokens/step; cosine over 600k, published at 50k


@dataclass
class AttnBiasConfig(core.Config):
    PRESETS = {**core.Config.PRESETS,
               "paper": RECIPE,
               # one GPU, about a minute: 124M at T=1024, 12k tokens/step, a full cosine over 800 steps
               "short": {**RECIPE, "grad_accum": 1, "max_iters": 800, "warmup_iters": 100, "lr_decay_iters": 0,
                         "eval_interval": 400, "eval_iters": 20, "log_interval": 50}}
    VARIANTS = {"attn_bias": "a learned key k' and value v' per layer and head that every query attends to (sec. 5.2)",
                "default": "GPT-2 as in nanoGPT: no explicit bias (grows massive activations)",
                "sink": "one learned sink token prepended before the blocks, dropped before the head"}
    ATTN_IMPLS = ("auto", "eager", "sdpa", "flex", "cudnn", "flash")

    def __post_init__(self):
        super().__post_init__()
        if self.family != "gpt2":
            raise core.ConfigError("attn_bias.py trains the paper's GPT-2 models: --family must be gpt2")
        if self.attn_impl == "cudnn" and self.variant != "attn_bias":
            raise core.ConfigError("--attn-impl cudnn is the attn_bias path; the other variants use sdpa (which "
                                   "picks cuDNN itself), flex or flash")


# ----------------------------------------------------------------------------------------------------------------
# The paper's math: the bias key and value (eager, the spec), the attention with its paths, the models

def with_bias_key(k, v, k_bias, v_bias):
    """Prepend k', v' as key 0: (B, H, T, D) -> (B, H, T+1, D)."""
    B = k.size(0)
    return (torch.cat((k_bias.expand(B, -1, -1, -1).to(k.dtype), k), dim=2),
            torch.cat((v_bias.expand(B, -1, -1, -1).to(v.dtype), v), dim=2))


def masked_bias_attention(q, k, v, k_bias, v_bias, dropout_p=0.0):
    """The paper's code: query i sees key j <= i+1 of [k'; K], the T×(T+1) causal mask aligned lower right."""
    T = q.size(-2)
    k, v = with_bias_key(k, v, k_bias, v_bias)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=core.causal_mask(T, T + 1, device=q.device),
                                          dropout_p=dropout_p)


class BiasAttention(core.Attention):
    """Attention with a learned bias key k' and value v' per head (sec. 5.2)."""
    FAST, FAST_CPU = "cudnn", "sdpa"

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        shape = (1, cfg.n_head, 1, cfg.head_dim)  # names and shapes as in the published checkpoints
        self.k_bias = nn.Parameter(torch.randn(shape) * 0.02)
        self.v_bias = nn.Parameter(torch.randn(shape) * 0.02)
        self.kernel_ok = {}  # (kernel, head dim) -> probe verdict, read under torch.compile (build_model fills it)

    def attend(self, q, k, v, ctx):
        if self.dropout and self.training and ctx.record is None:  # only SDPA drops attention weights
            return self.attend_sdpa(q, k, v, ctx)
        return super().attend(q, k, v, ctx)

    def attend_eager(self, q, k, v, ctx):
        # the core's reference with S = T+1 keys applies exactly the paper's lower-right T×(T+1) mask
        return super().attend_eager(q, *with_bias_key(k, v, self.k_bias, self.v_bias), ctx)

    def attend_sdpa(self, q, k, v, ctx):
        drop = self.dropout if self.training else 0.0
        return masked_bias_attention(q, k, v, self.k_bias, self.v_bias, drop)

    def attend_flex(self, q, k, v, ctx):
        T = q.size(-2)
        mask = core.flex_block_mask(ctx, core.doc_causal_mask_mod(ctx), T, T, q.device)
        return flex_bias_attention(q, k, v, self.k_bias, self.v_bias, mask)

    def attend_cudnn(self, q, k, v, ctx):
        return self.attend_kernel("cudnn" if q.is_cuda else "cpu", q, k, v, ctx)

    def attend_flash(self, q, k, v, ctx):
        if core.flash_attn_func is not None and q.is_cuda and q.dtype != torch.float32:
            k, v = with_bias_key(k, v, self.k_bias, self.v_bias)  # flash-attn aligns causal lower right: exact
            y = core.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
            return y.transpose(1, 2)  # (B, T, H, D) -> (B, H, T, D)
        return self.attend_kernel("flash" if q.is_cuda else "cpu", q, k, v, ctx)

    def attend_kernel(self, kernel, q, k, v, ctx):
        ok = kernel == "cpu"
        if not ok and q.dtype in (torch.bfloat16, torch.float16):
            key = (kernel, q.size(-1))  # probed at build time; under compile only the verdict is read
            if key not in self.kernel_ok and not torch.compiler.is_compiling():
                self.kernel_ok[key] = probe_kernel(kernel, str(q.device), key[1])
            ok = self.kernel_ok.get(key, False)
        if not ok:
            core.warn_once(f"attn_bias: the {kernel} kernel is not usable for {q.dtype} here: using FlexAttention")
            return self.attend_flex(q, k, v, ctx)
        return BiasKeyAttention.apply(q, k, v, self.k_bias, self.v_bias, kernel)


class MassiveGPT(core.GPT):
    """The GPT-2 model that logs, at every evaluation, its massive-activation statistics on one val window (the top-1
    and median |h| of each block's output, the attention to key 0): --trends plots them against tokens."""

    def context(self, idx, doc=None, record=None):
        ctx = super().context(idx, doc, record)
        if ctx.doc is not None and self.cfg.variant != "default":  # k' and the sink: positions every document sees
            raise core.ConfigError(f"the {self.cfg.variant} variant does not support document masks")
        return ctx

    def track(self, x, y):
        s = layer_stats(self, [(x, y)])
        return dict(top1=s["layerwise"]["top1"], median=s["layerwise"]["median"], key0=s["attention"]["key0"])


class SinkGPT(MassiveGPT):
    """One learned sink token before the sequence (sec. 5.2's sink baseline); every token sees it, it never reaches
    the logits."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.reg_token = nn.Parameter(torch.randn(1, 1, cfg.n_embd) * 0.02)  # (1, 1, C), the published name

    def embed(self, idx, ctx):
        B, T = idx.shape
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        x = torch.cat((self.reg_token.expand(B, -1, -1), x), dim=1)  # (B, T+1, C); the sink has no position
        return self.transformer.drop(x)

    def final(self, x, ctx):
        return self.transformer.norm_f(x)[:, 1:]  # (B, T, C): drop the sink after the final norm


def build_model(cfg):
    if cfg.variant == "sink":
        return SinkGPT(cfg)
    if cfg.variant == "default":
        return MassiveGPT(cfg)
    model = MassiveGPT(cfg, BiasAttention)
    device = core.resolve_device(cfg)
    impl = model.transformer.h[0].attn.impl(device)
    if device.type == "cuda" and (impl == "cudnn" or impl == "flash" and core.flash_attn_func is None):
        ok = probe_kernel(impl, str(device), cfg.head_dim)  # eagerly, before torch.compile traces the model
        for block in model.transformer.h:
            block.attn.kernel_ok[impl, cfg.head_dim] = ok
    return model


# ----------------------------------------------------------------------------------------------------------------
# The paper's published checkpoints



def from_published(ckpt, path, given=None):
    """The paper's nanoGPT checkpoints -> (config, state_dict), None for another format: state_dict under 'model',
    sizes under 'model_args'; the variant is read from the keys (k_bias: attn_bias, reg_token: sink), which outrank
    config['model_type'] (the released attn_bias file says gpt2_default)."""
    if "model" not in ckpt or "model_args" not in ckpt:
        return None
    state = core.from_nanogpt(ckpt["model"])
    variant = ("attn_bias" if any(k.endswith(".attn.k_bias") for k in state) else
               "sink" if "reg_token" in state else "default")
    declared = (ckpt.get("config") or {}).get("model_type")
    if declared and declared != "gpt2_" + variant:
        core.warn_once(f"{path}: config says model_type {declared}, the weights are the {variant} model")
    a = ckpt["model_args"]
    cfg = AttnBiasConfig(variant=variant, n_layer=a["n_layer"], n_head=a["n_head"], n_embd=a["n_embd"],
                         block_size=a["block_size"], bias=a["bias"], vocab_size=a["vocab_size"],
                         dropout=a.get("dropout", 0.0))
    return cfg, state


# ----------------------------------------------------------------------------------------------------------------
# The fast paths' kernels: the bias key folded into a stock causal kernel through its log-sum-exp

def merge_bias_key(o, lse, q, k_bias, v_bias):
    """Fold one unmasked key into a causal result (o, lse) over the T real keys:
    s = q·k'/√D, L' = logaddexp(L, s), p = e^(s − L'), out = o + p (v' − o). Returns out, L', p."""
    s = (q.float() * k_bias.float()).sum(-1) * q.size(-1) ** -0.5  # (B, H, T) logit of the bias key
    lse_b = torch.logaddexp(lse.float().reshape(s.shape), s)      # log-sum-exp over all T+1 keys
    p = torch.exp(s - lse_b).unsqueeze(-1)                         # (B, H, T, 1) weight of v'
    return torch.lerp(o.float(), v_bias.float(), p).to(o.dtype), lse_b, p


def flex_bias_attention(q, k, v, k_bias, v_bias, block_mask):
    """The merge on FlexAttention's causal result over the T real keys (public API; autograd flows through lse)."""
    if AuxRequest is None:
        o, lse = core.flex_attention(q, k, v, block_mask=block_mask, return_lse=True)
    else:
        o, aux = core.flex_attention(q, k, v, block_mask=block_mask, return_aux=AuxRequest(lse=True))
        lse = aux.lse
    return merge_bias_key(o, lse, q, k_bias, v_bias)[0]


# Private SDPA kernels: forward -> (out, lse, tensors for backward, ints for backward); backward -> dq, dk, dv.
# Causal over T real keys only (square, so top-left and bottom-right alignment agree).
aten = torch.ops.aten


def _cudnn_fwd(q, k, v, scale):
    out, lse, cq, ck, mq, mk, seed, off, _ = aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False, scale=scale)
    return out, lse, (cq, ck, seed, off), (mq, mk)


def _cudnn_bwd(dout, q, k, v, out, lse, t, i, scale):
    cq, ck, seed, off = t
    return aten._scaled_dot_product_cudnn_attention_backward(dout, q, k, v, out, lse, seed, off, None, cq, ck, *i,
                                                             0.0, True, scale=scale)


def _flash_fwd(q, k, v, scale):
    out, lse, cq, ck, mq, mk, seed, off, _ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False,
                                                                                      scale=scale)
    return out, lse, (cq, ck, seed, off), (mq, mk)


def _flash_bwd(dout, q, k, v, out, lse, t, i, scale):
    cq, ck, seed, off = t
    return aten._scaled_dot_product_flash_attention_backward(dout, q, k, v, out, lse, cq, ck, *i, 0.0, True, seed,
                                                             off, scale=scale)


def _cpu_fwd(q, k, v, scale):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse, (), ()


def _cpu_bwd(dout, q, k, v, out, lse, t, i, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, True, scale=scale)


KERNELS = {"cudnn": (_cudnn_fwd, _cudnn_bwd), "flash": (_flash_fwd, _flash_bwd), "cpu": (_cpu_fwd, _cpu_bwd)}


class BiasKeyAttention(torch.autograd.Function):
    """Causal attention over [k'; K] on a stock kernel that only sees the T real keys.

    Backward: the kernel's own backward, given out and L' instead of its forward's output and lse, recomputes the
    (T+1)-key probabilities e^(s_ij − L') and Δ = rowsum(dO∘out), so it returns the exact dq, dk, dv for the real
    keys. The bias key adds ds = p (dO·v' − Δ): dq += ds k'/√D, dk' = Σ ds q/√D, dv' = Σ p dO."""

    @staticmethod
    def forward(ctx, q, k, v, k_bias, v_bias, kernel):
        scale = q.size(-1) ** -0.5
        o, lse, tensors, ints = KERNELS[kernel][0](q, k, v, scale)
        out, lse_b, p = merge_bias_key(o, lse, q, k_bias, v_bias)
        lse_b = torch.empty_like(lse).copy_(lse_b.view(lse.shape))  # the kernel's own lse shape and strides
        ctx.save_for_backward(q, k, v, k_bias, v_bias, out, lse_b, p, *tensors)
        ctx.kernel, ctx.ints, ctx.scale = kernel, ints, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, k_bias, v_bias, out, lse_b, p, *tensors = ctx.saved_tensors
        if dout.stride() != out.stride():  # the kernels expect dO laid out like O
            dout = torch.empty_like(out).copy_(dout)
        dq, dk, dv = KERNELS[ctx.kernel][1](dout, q, k, v, out, lse_b, tensors, ctx.ints, ctx.scale)
        do = dout.float()
        delta = (do * out.float()).sum(-1, keepdim=True)               # (B, H, T, 1)
        ds = p * ((do * v_bias.float()).sum(-1, keepdim=True) - delta)  # grad of the bias logit s
        dq = dq + (ds * k_bias.float() * ctx.scale).to(dq.dtype)
        dk_bias = (ds * q.float()).sum((0, 2), keepdim=True) * ctx.scale
        dv_bias = (p * do).sum((0, 2), keepdim=True)
        return dq, dk, dv, dk_bias.to(k_bias.dtype), dv_bias.to(v_bias.dtype), None


@functools.cache  # once per process, kernel and head dim
def probe_kernel(kernel, device, D):
    """Outputs and gradients of the merge on a private kernel vs the masked reference: the private ops change
    between torch versions, so a kernel that fails here is never used."""
    device = torch.device(device)
    try:
        with torch.enable_grad(), torch.autocast(device.type, enabled=False):
            g = torch.Generator(device).manual_seed(0)
            B, H, T = 2, 2, 100
            qkv = torch.randn(B, T, 3 * H * D, device=device, generator=g)  # the model's layout: views of c_attn(x)
            kv_bias = torch.randn(2, 1, H, 1, D, device=device, generator=g)
            results = []
            for dtype, fn in ((torch.bfloat16, lambda *a: BiasKeyAttention.apply(*a, kernel)),
                              (torch.float32, masked_bias_attention)):
                x = qkv.to(dtype).requires_grad_()
                kb, vb = (t.clone().requires_grad_() for t in kv_bias)
                q, k, v = (core.split_heads(t, H) for t in x.chunk(3, dim=-1))
                out = fn(q, k, v, kb, vb)
                out.float().square().sum().backward()
                results.append([out, x.grad, kb.grad, vb.grad])
        errs = [((a.float() - b).norm() / b.norm()).item() for a, b in zip(*results)]
        ok, reason = max(errs) < 3e-2, f"relative errors {', '.join(f'{e:.1e}' for e in errs)}"
    except (RuntimeError, TypeError, AttributeError, NotImplementedError) as e:
        ok, reason = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not ok:
        core.warn_once(f"attn_bias: the private {kernel} kernel failed its parity check ({reason}); "
                       "using FlexAttention")
    return ok


# ----------------------------------------------------------------------------------------------------------------
# Eval and analysis (--eval is the core's: val loss in nats, perplexity, bits per token)

TITLES = {"default": "GPT-2 Default", "sink": "GPT-2 with Sink Token", "attn_bias": "GPT-2 with Attention Bias"}
PROMPT = "Summer is warm. Winter is cold."  # analyze.py's 3-D plot; block index 5 (the 6th block's output)
N_WINDOWS = 10


def sig(x, digits=4):
    return [sig(v, digits) for v in x] if isinstance(x, (list, tuple)) else float(f"{x:.{digits}g}")


@torch.no_grad()
def layer_stats(model, windows):
    """Over (x, y) windows, in eval mode: top-1/2/3, mean and median |h| of every block's output (the sink position
    included, as in analyze.py), the attention each layer pays to key 0 (first token / sink / k') and to the first real
    token, and the mean loss."""
    L, was = model.cfg.n_layer, model.training
    outs, attn, stats, loss = [None] * L, torch.zeros(L, 2), torch.zeros(5, L), 0.0
    first = 0 if model.cfg.variant == "default" else 1  # key index of the first real token

    def record(layer, probs):  # (B, H, T, S); query 0 (the sink, or the trivial first row) left out
        attn[layer] += torch.stack((probs[:, :, 1:, 0].mean(), probs[:, :, 1:, first].mean())).cpu() / len(windows)
    hooks = [b.register_forward_hook(lambda m, a, o, l=l: outs.__setitem__(l, o)) for l, b in
             enumerate(model.transformer.h)]
    model.eval()
    try:
        for x, y in windows:
            loss += model(x, y, record=record).item() / len(windows)
            for l, h in enumerate(outs):
                a = h.float().abs().flatten()
                stats[:3, l] += a.topk(3).values.cpu() / len(windows)
                stats[3:, l] += torch.stack((a.mean(), a.median())).cpu() / len(windows)
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return dict(loss=loss, layerwise={k: sig(stats[j].tolist()) for j, k in enumerate(("top1", "top2", "top3", "mean",
                                                                                      "median"))},
                attention=dict(key0=sig(attn[:, 0].tolist()), first_token=sig(attn[:, 1].tolist())))


def last_val_loss(log):
    """The last val loss of a training log (None before the first evaluation): which model a result is of."""
    return next((r["val_loss"] for r in reversed(log) if r.get("val_loss") is not None), None)


def analyze_model(path, data, tok, seed, device, given=None):
    """layer_stats over N_WINDOWS val windows, and |h| of one block over positions × channels for PROMPT. given: the
    command line's flags (a model flag that contradicts the checkpoint is refused)."""
    model = core.load_model(PAPER, path, device, given, data).float()
    cfg, L = model.cfg, model.cfg.n_layer
    s = layer_stats(model, [data.batch("val", 1, cfg.block_size, seed, 0, i, device) for i in range(N_WINDOWS)])
    ids, layer, out = tok.encode(PROMPT)[:cfg.block_size], min(5, L - 1), []  # a model of few positions: its share
    hook = model.transformer.h[layer].register_forward_hook(lambda m, a, o: out.append(o))
    with torch.no_grad():
        model(torch.tensor([ids], device=device))
    hook.remove()
    grid = out[0][0].abs().cpu()  # (positions, C)
    run = os.path.dirname(path)
    log = core.read_log(run) if os.path.exists(os.path.join(run, "log.jsonl")) else []
    ms = sorted(r["ms"] for r in log[1:] if r.get("ms"))  # the first record includes compilation
    return dict(source=path, variant=cfg.variant, n_layer=L, window_loss=sig(s["loss"]), windows=N_WINDOWS,
                measured_on=measured_on(data, seed), val_loss_log=last_val_loss(log),
                step_ms=ms[len(ms) // 2] if ms else None,
                layerwise=s["layerwise"], attention=s["attention"],
                prompt=dict(layer=layer, tokens=["<sink>"] * (cfg.variant == "sink") + [tok.decode([t]) for t in ids],
                            abs=[sig(r) for r in grid.tolist()]))


def analyze_source(source, data, tok, seed, device, given=None):
    """analyze_model of a checkpoint; a run folder's result is kept in it (activations.json), so that the figure of
    several runs can be drawn where their checkpoints are gone (logs copied back from a GPU machine, each run
    trained in its own lease) as long as the kept result is of the run's final model (its log's last val loss)."""
    if not os.path.isdir(source):
        return analyze_model(source, data, tok, seed, device, given)
    ckpt, kept = os.path.join(source, "ckpt.pt"), os.path.join(source, "activations.json")
    if os.path.exists(ckpt) or not os.path.exists(kept):
        res = analyze_model(ckpt, data, tok, seed, device, given)  # no checkpoint, nothing kept: its one-line error
        with core.atomic(kept, "w") as f:
            json.dump(res, f)
        return res
    try:
        res = json.load(open(kept))
    except ValueError:  # cut short, e.g. a copy that stopped
        res = None
    if not isinstance(res, dict):
        raise core.ConfigError(f"{kept}: not a result of --analyze (damaged?): analyze its checkpoint again")
    if res.get("val_loss_log") != last_val_loss(core.read_log(source)):
        raise core.ConfigError(f"{kept} is of an earlier model than the run's log: analyze its checkpoint again")
    if res.get("measured_on") != measured_on(data, seed):
        was = res.get("measured_on")
        was = f"{was['name']} (val {was['val_tokens']} tokens, --seed {was['seed']})" if was else "unrecorded data"
        raise core.ConfigError(f"{kept} was measured on {was}, not on {data.path} with --seed {seed}: pass those, or "
                               "analyze its checkpoint again")
    return dict(res, source=os.path.normpath(source))  # the run as named here (it was measured where it trained)


def measured_on(data, seed):
    """Which val windows a kept result read: the dataset (its name and size, as paths differ between machines) and
    the seed that drew them."""
    return dict(name=os.path.basename(os.path.normpath(data.path)), tokenizer=data.tokenizer,
                val_tokens=data.tokens("val"), seed=seed)


def analyze(cfg, args):
    device = core.resolve_device(cfg)
    data = core.TokenData(cfg.data)
    tok = core.get_tokenizer(data.tokenizer)
    sources = args.runs or [cfg.init_from or cfg.out]
    results = [analyze_source(s, data, tok, cfg.seed, device, vars(args)) for s in sources]
    base = next((r["step_ms"] for r in results if r["variant"] == "default" and r["step_ms"]), None)
    for r in results:
        r["x_default"] = round(r["step_ms"] / base, 3) if base and r["step_ms"] else None
    os.makedirs(cfg.out, exist_ok=True)
    with core.atomic(os.path.join(cfg.out, "analysis.json"), "w") as f:
        json.dump(dict(results=results), f)
    print(f"{N_WINDOWS} val windows of {data.path} (--seed {cfg.seed}); val loss: the run's last logged, else of "
          "these windows")
    print(f"{'variant':<10} {'val loss':>8} {'top-1':>8} {'layer':>5} {'median':>7} {'ratio':>7} {'key0 attn':>9} "
          f"{'ms/step':>8} {'x default':>9}  model")
    for r in results:
        top1, median = r["layerwise"]["top1"], r["layerwise"]["median"]
        peak = max(range(r["n_layer"]), key=top1.__getitem__)
        ms = f"{r['step_ms']:.1f}" if r["step_ms"] else "n/a"
        x = f"{r['x_default']:.2f}" if r["x_default"] else "n/a"
        key0 = sum(r["attention"]["key0"]) / r["n_layer"]
        print(f"{r['variant']:<10} {r['val_loss_log'] or r['window_loss']:>8.4f} {top1[peak]:>8.1f} {peak + 1:>5} "
              f"{median[peak]:>7.3f} {top1[peak] / median[peak]:>7.1f} {key0:>9.3f} {ms:>8} {x:>9}  {r['source']}")
    for p in [os.path.join(cfg.out, "analysis.json"), *plot_analysis(results, cfg.out)]:
        print(p)


def plot_analysis(results, out):
    """Three PNGs rebuilt from the analysis JSON: layerwise magnitudes, one block over the prompt, attention."""
    plt = core.pyplot()
    n, paths, on = len(results), [], results[0]["measured_on"]
    alike = len({r["variant"] for r in results}) < n  # a model twice: which run each is (its folder, else its file)
    runs = [os.path.basename(os.path.dirname(p) if os.path.basename(p) == "ckpt.pt" else p) for p in
            (r["source"] for r in results)]
    runs = runs if len(set(runs)) == n else [r["source"] for r in results]
    names = [r["variant"] + (f" ({run})" if alike else "") for r, run in zip(results, runs)]
    titles = [TITLES[r["variant"]] + (f"\n{textwrap.fill(run, 36)}" if alike else "") for r, run in zip(results, runs)]
    where = f"{results[0]['windows']} val windows of {on['name']} (--seed {on['seed']})"
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 4), squeeze=False)
    for ax, r, title in zip(axes[0], results, titles):
        x = range(1, r["n_layer"] + 1)
        for k in ("top1", "top2", "top3"):
            ax.plot(x, r["layerwise"][k], marker="o", mfc="none", label=f"Top {k[-1]}")
        ax.plot(x, r["layerwise"]["median"], ls="--", color="gray", label="Median")
        ax.set(title=title, xlabel="Layers", ylabel="Magnitudes", xticks=layer_ticks(r["n_layer"]))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"|block output| over {where}")
    paths.append(save(fig, out, "layerwise.png"))
    fig = plt.figure(figsize=(5 * n, 4.5))
    for i, (r, title) in enumerate(zip(results, titles)):
        ax = fig.add_subplot(1, n, i + 1, projection="3d")
        z = torch.tensor(r["prompt"]["abs"])  # (positions, C)
        xs, ys = torch.meshgrid(torch.arange(z.size(0)), torch.arange(z.size(1)), indexing="ij")
        ax.plot_wireframe(xs.numpy(), ys.numpy(), z.numpy(), rstride=1, cstride=0, linewidth=0.8)
        ax.set_xticks(range(z.size(0)), r["prompt"]["tokens"], fontsize=7)
        ax.set(title=f"{title}\nblock {r['prompt']['layer'] + 1} output", ylabel="channel", zlabel="|activation|")
    paths.append(save(fig, out, "prompt_layer.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    key0 = {"default": "first token", "sink": "sink token", "attn_bias": "bias key k'"}
    for r, name in zip(results, names):
        x = range(1, r["n_layer"] + 1)
        line, = ax.plot(x, r["attention"]["key0"], marker="o", label=f"{name}: {key0[r['variant']]}")
        if r["variant"] != "default":
            ax.plot(x, r["attention"]["first_token"], ls="--", color=line.get_color(), label=f"{name}: first token")
    ax.set(xlabel="Layers", ylabel="mean attention weight", title=f"Attention to key 0 (queries 1..T-1)\n{where}",
           xticks=layer_ticks(max(r["n_layer"] for r in results)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(save(fig, out, "attention.png"))
    return paths


def layer_ticks(L):
    return sorted({1, L, *range(3, L + 1, 3)})  # 1, 3, 6, 9, 12 as in analyze.py


def save(fig, out, name):
    plt = core.pyplot()
    path = os.path.join(out, name)
    core.layout(fig)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def trends(cfg, args):
    """The logged statistics of --out and --runs against training tokens: the largest top-1 |h| over the layers (the
    paper's "magnitudes"), the largest top-1 / median ratio, and the mean attention to key 0 (<out>/trends.png)."""
    plt = core.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for path in core.run_dirs(cfg, args):
        recs = [r for r in core.read_log(path) if r.get("top1")]
        if not recs:
            raise core.ConfigError(f"{path}: its log has no activation statistics (a run of this version's --train)")
        tokens = [r["tokens"] for r in recs]
        top1 = [max(r["top1"]) for r in recs]
        ratio = [max(a / m for a, m in zip(r["top1"], r["median"])) for r in recs]
        key0 = [sum(r["key0"]) / len(r["key0"]) for r in recs]
        label = core.run_label(path)[0]
        for ax, y in zip(axes, (top1, ratio, key0)):
            ax.plot(tokens, y, marker="o", ms=3, label=label)
        print(f"{label}: {tokens[-1]:,} tokens, top-1 {top1[-1]:.1f} (largest {max(top1):.1f}), top-1 / median "
              f"{ratio[-1]:.1f}x, attention to key 0 {key0[-1]:.3f}")
    for ax, name in zip(axes, ("largest top-1 |h| over the layers", "largest top-1 / median |h| over the layers",
                               "mean attention to key 0")):
        ax.set(xlabel="training tokens", ylabel=name)
        ax.set_yscale("linear" if ax is axes[2] else "log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    os.makedirs(cfg.out, exist_ok=True)
    print(save(fig, cfg.out, "trends.png"))


# ----------------------------------------------------------------------------------------------------------------

ACTIONS = {"analyze": ("massive activations of --runs (run dirs or checkpoints, else --init-from or <out>): "
                       "layerwise top-1/2/3, one block over a prompt, attention to key 0 (PNG + JSON in --out)",
                       analyze),
           "trends": ("massive-activation statistics logged while training (--out and --runs) against tokens: "
                      "<out>/trends.png", trends)}


PAPER = core.Paper("attn_bias", AttnBiasConfig, build_model, baseline="default", doc=__doc__, actions=ACTIONS,
                   convert=from_published, formats="the paper's nanoGPT checkpoints (ckpt_50000.pt)")


def main(argv=None):
    return core.main(PAPER, argv)


if __name__ == "__main__":
    sys.exit(main())
