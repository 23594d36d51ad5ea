"""Reflex attention: heads that attend to the keys and values of earlier layers.

Source: no paper and no arXiv id; the method is defined by its repository,
https://github.com/KornilovaK/reflex_attention
(README.md, model.py; nanoGPT on OpenWebText). Its README motivates it with the over-squashing of long contexts into
one hidden state (arXiv:2406.04267): a deep layer that only self-attends has lost part of what earlier layers saw.

Method (model.py, README "Idea of Reflex attention"):
  - Every attention layer computes its own per-head K and V (B, H, T, D) from its own normalised input, as usual.
  - `--heads s-a-b` ("2 layer reflex attention"; the README's 4-2-2 and 5-2-1, the code's hard-coded 5-2-1):
    layers 0 and 1 are plain self-attention; from layer 2 on, heads [0, s) self-attend, heads [s, s+a) attend with
    this layer's queries to the SAME head slots of the previous layer's K and V, and heads [s+a, H) to the same slots
    of the layer before that. The three groups' outputs are concatenated along heads, in that order, then c_proj.
  - `--heads all` ("all layer reflex attention"): the layer with i earlier layers keeps H - i self heads, and head
    H - i + j reads earlier layer j's K/V at that slot (j = 0: the first layer), as in the repository's commented-out
    code. Ambiguity: that code sits behind the guard `len(prevs) <= 1` (plain attention), which would also leave the
    second layer plain; the README's scheme (SA_1 (8); SA_2 (7) + CA_1 (1); ...; SA_6 (3) + 5 CA) and the guard's
    commented alternative `len(prevs) == 0` give the second layer one cross head. We follow the README there, and
    the code's slot order (the README writes the cross heads nearest layer first, the code oldest first). It needs
    n_layer <= n_head (the last layer keeps at least one self head).
  - Cross heads are causal like self heads (is_causal=True with T == S): query t sees positions <= t of the earlier
    layer's K/V. Those K/V are not detached: gradients flow from a later layer's cross heads into the earlier layer's
    key/value projection. As in the original, K/V slots that no later layer reads (e.g. slots [s, H) of the last
    layer) get no gradient.
  - `--variant baseline` is the same model with plain causal attention everywhere (the repository's 'original').
    `--heads s-0-0` is exactly the baseline (tested bit for bit).

Fast path: each layer gathers one K and one V by taking head columns from this and earlier layers' K/V, kept as
(B, T, C) views of their c_attn outputs (by reference, no copies until the single cat), and makes ONE fused causal
attention call (SDPA: flash/cuDNN on GPU) over all heads; T x T is never materialised. The gather cuts contiguous
column ranges in c_attn's own layout, so the backward assembles each c_attn gradient from column ranges: a plain copy
(H100: 0.98x the baseline's tokens/s; the same cat along the head dim of (B, H, T, D) views ran at 0.94x, its inductor
kernel indexing heads with div/mod at a quarter of HBM bandwidth). RoPE (llama family) is applied after the gather:
it depends on the position only, so rotating the gathered keys equals gathering rotated keys. FLOPs equal the
baseline's (reflex changes which K/V a head reads, not how much work it does), so MFU uses the core's 6N + attention
count. `--attn-impl eager` runs the reference: one eager attention call per head group against its own layer's K/V,
as the original does.

Deviations from the original (its model.py at HEAD has one fused c_attn, as here; separate query/key/value Linears
existed only between commits 05cfd6c and ef15ae3, and from_original reads both):
  - The original's LayerNorm eps 1e-6 is kept as this script's default --norm-eps (the core default is 1e-5).
  - The core model has no residual dropout after c_proj (the original's resid_dropout); its experiments use dropout 0.
  - Training uses the core loop: its warm-up is (it+1)/(warmup+1) (nanoGPT: it/warmup), batches are a pure function
    of (seed, step) so every variant sees identical data, and MFU is against the detected GPU's peak (not the A100's).
  - The repository publishes no weights; --init-from / --eval also read checkpoints of its training notebook
    (from_original): nanoGPT's dict with '_orig_mod.' keys, fused c_attn or separate query/key/value Linears. The
    split is read from the checkpoint's config if a fork saved one there, else --heads, else the run's name
    (mini-gpt-5-2-1, 4_2_2, ..._all); config model_type 'original' loads as the baseline. An all-layer run made
    with the code's guard as committed (second layer plain) is not this model (see above).


Usage:
    python reflex.py --train --preset tiny --device cpu --heads 5-2-1 --out runs/rx_521
    python reflex.py --train --preset e768-t1024 --data data/openwebtext --heads all --out runs/rx_all
    python reflex.py --train --preset e512-t256 --data data/docs --variant baseline --out runs/rx_base
    python bench.py --papers reflex                # tokens/s of 5-2-1, 4-2-2, all vs baseline (124m-8h on a GPU)
    python reflex.py --charts --out runs/rx_base --runs runs/rx_521 runs/rx_all  # loss + speed figures
    python reflex.py --eval --init-from mini-gpt-5-2-1/ckpt.pt --data data/openwebtext  # the notebook's checkpoint
"""
import os
import re
import statistics
from dataclasses import dataclass

import torch

import core

# ----------------------------------------------------------------------------------------------------------------
# Config

# The original's recipe (README "Experiments", model_expiriements.ipynb): 6 layers, 8 heads, batch 32, bias False,
# dropout 0, lr 1e-3 with 400 warm-up steps and cosine decay to 1e-5 over 5000 steps, AdamW betas (0.9, 0.98).
RECIPE = dict(n_layer=6, n_head=8, batch_size=32, max_iters=5000, lr=1e-3, min_lr=1e-5, warmup_iters=400,
              beta2=0.98, weight_decay=0.1, grad_clip=1.0, bias=False, dropout=0.0, eval_interval=250,
              eval_iters=200, log_interval=10)


@dataclass
class ReflexConfig(core.Config):
    n_layer: int = core.opt(6, "number of transformer blocks (the original: 6)")
    n_head: int = core.opt(8, "attention heads per block (the original: 8)")
    norm_eps: float = core.opt(1e-6, "LayerNorm epsilon (the original: 1e-6)")
    heads: str = core.opt("5-2-1", "reflex head split: s-a-b (self, previous layer, the layer before; sums to "
                                   "n_head) or 'all' (layer i: n_head - i self heads + one per earlier layer)")

    PRESETS = {
        **core.Config.PRESETS,
        "tiny": {**core.Config.PRESETS["tiny"], "n_layer": 4, "n_head": 8},  # 8 heads so 5-2-1 and 4-2-2 apply
        # the original's experiments (README 1-4)
        "e512-t256": dict(RECIPE, n_embd=512, block_size=256),
        "e512-t1024": dict(RECIPE, n_embd=512, block_size=1024),
        "e768-t1024": dict(RECIPE, n_embd=768, block_size=1024),
    }
    # 124M-class with the original's 8 heads and n_layer <= n_head, so 5-2-1, 4-2-2 and all are all valid; the
    # shared name 124m means this shape here (the core's 12 heads do not split 5-2-1)
    PRESETS["124m"] = PRESETS["124m-8h"] = dict(n_layer=8, n_head=8, n_embd=896, block_size=1024, batch_size=16)
    VARIANTS = {"reflex": "heads split by --heads between this layer and the two before (the method)",
                "baseline": "plain causal self-attention in every layer (the repository's 'original')"}

    def __post_init__(self):
        super().__post_init__()
        if self.variant == "reflex":
            parse_heads(self.heads, self.n_head, self.n_layer)

    def label(self):
        return f"reflex {self.heads}" if self.variant == "reflex" else self.variant  # runs of two splits told apart


def parse_heads(heads, n_head, n_layer):
    """'s-a-b' -> (s, a, b); 'all' -> 'all'. A malformed or impossible split raises one clear ConfigError line."""
    if heads == "all":
        if n_layer > n_head:
            raise core.ConfigError(f"--heads all needs n_layer <= n_head (layer i keeps n_head - i self heads), "
                                   f"got n_layer {n_layer} and n_head {n_head}")
        return heads
    if not re.fullmatch(r"\d+-\d+-\d+", heads):
        raise core.ConfigError(f"--heads must be 'all' or three non-negative integers s-a-b (e.g. 5-2-1), "
                               f"not {heads!r}")
    split = tuple(int(n) for n in heads.split("-"))
    if sum(split) != n_head:
        raise core.ConfigError(f"--heads {heads} sums to {sum(split)}, but n_head is {n_head}")
    return split


def head_groups(cfg, layer):
    """[(back, h0, h1)]: heads [h0, h1) of `layer` read layer (layer - back)'s K/V at the same head slots."""
    H = cfg.n_head
    split = parse_heads(cfg.heads, H, cfg.n_layer)
    if split == "all":  # README: H - i self heads, then head H - i + j reads earlier layer j (oldest first)
        return [(0, 0, H - layer)] + [(layer - j, H - layer + j, H - layer + j + 1) for j in range(layer)]
    if layer < 2:  # the original: plain attention until two earlier layers exist
        return [(0, 0, H)]
    s, a, _ = split
    return [g for g in ((0, 0, s), (1, s, s + a), (2, s + a, H)) if g[2] > g[1]]


# ----------------------------------------------------------------------------------------------------------------
# Attention

class ReflexAttention(core.Attention):
    """Self heads plus heads whose keys and values come from earlier layers (same head slots, causal)."""

    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.groups = head_groups(cfg, layer)

    def project(self, x, ctx):
        qkv = self.c_attn(x)
        # layer i's K, V as (B, T, C) views of its c_attn output, before RoPE, in ctx.layers[i]; kept by reference and
        # not detached: later cross heads backprop into them
        ctx.layers.append(qkv.chunk(3, dim=-1)[1:])
        return self.split_qkv(qkv, ctx)

    def attend(self, q, k, v, ctx):
        if self.groups == [(0, 0, self.n_head)]:  # a plain layer
            return super().attend(q, k, v, ctx)
        D = self.head_dim
        src = [[t[..., h0 * D:h1 * D] for t in ctx.layers[self.layer - back]] for back, h0, h1 in self.groups]
        if ctx.record is None and self.impl(q.device) == "eager":
            # the reference, as the original computes it: one causal attention per head group, outputs concatenated
            return torch.cat([self.attend_eager(q[:, h0:h1], *self.kv_heads(ks, vs, ctx), ctx)
                              for (ks, vs), (_, h0, h1) in zip(src, self.groups)], dim=1)  # (B, H, T, D)
        # fast path: one cat of the groups' head columns (B, T, C), then one fused call over all heads
        return super().attend(q, *self.kv_heads(*(torch.cat(t, dim=-1) for t in zip(*src)), ctx), ctx)

    def kv_heads(self, k, v, ctx):
        """Head columns (B, T, h D) of K and V -> (B, h, T, D) each, RoPE on the keys (llama family)."""
        k, v = (core.split_heads(t, t.size(-1) // self.head_dim) for t in (k, v))
        return (core.apply_rope(k, *ctx.rope) if ctx.rope is not None else k), v


# ----------------------------------------------------------------------------------------------------------------
# Model + VARIANTS

ATTENTION = {"reflex": ReflexAttention, "baseline": core.Attention}


def build_model(cfg):
    return core.GPT(cfg, ATTENTION[cfg.variant])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints of the original code
#
# model_experiments.ipynb saves nanoGPT's dict {'model', 'optimizer', 'model_args', 'iter_num', 'best_val_loss',
# 'config'}: 'model' is the state_dict of the torch.compile'd model ('_orig_mod.' keys), 'config' the notebook's own
# __main__.GPTConfig (sizes and model_type 'reflex' / 'original', not the split: model.py hard-codes it). The split
# lives in the run's name: out_dir 'mini-gpt-5-2-1', wandb name '5-2-1-reflex-1024-False-768-0.0' (cell 5).

def split_in_name(path, n_head):
    """The split a run's file or directory name spells in parts between - or _ (mini-gpt-5-2-1, reflex-1024-4_2_2,
    ..._all), or None: three numeric parts in a row that sum to n_head (not v1-5-2 of v1-5-2-1, not a date), and
    only one such triple (1-5-2-1 could be either)."""
    for name in (os.path.splitext(os.path.basename(path))[0], os.path.basename(os.path.dirname(os.path.abspath(path)))):
        parts = re.split(r"[-_]", name)
        if "all" in map(str.lower, parts):
            return "all"
        found = {"-".join(t) for t in zip(parts, parts[1:], parts[2:])
                 if all(p.isdigit() for p in t) and sum(map(int, t)) == n_head}
        if len(found) == 1:
            return found.pop()
    return None


def from_original(ckpt, path, given=None):
    """A checkpoint of the original code -> (ReflexConfig, our state_dict), None for another format. The split
    comes from the checkpoint's
    config or model_args ('heads', if a fork added it), else from heads (the user's --heads), else from the run's
    name; config model_type 'original' is our baseline. Both attention layouts of model.py's history load: one fused
    c_attn (HEAD) or separate query/key/value Linears (commit 05cfd6c), whose rows c_attn stacks as [W_q; W_k; W_v]."""
    if not isinstance(ckpt.get("model"), dict) or "model_args" not in ckpt:
        return None
    heads = (given or {}).get("heads")
    conf = ckpt.get("config") or {}
    conf, args = conf if isinstance(conf, dict) else vars(conf), ckpt["model_args"]  # vars: the notebook's GPTConfig
    sizes = {k: args.get(k, conf.get(k)) for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")}
    if None in sizes.values():
        raise core.ConfigError(f"{path}: model_args lacks {', '.join(k for k, v in sizes.items() if v is None)}")
    declared = args.get("heads", conf.get("heads"))
    if declared and heads and declared != heads:
        raise core.ConfigError(f"{path}: the checkpoint's config says --heads {declared}, not {heads}")
    variant = "baseline" if conf.get("model_type") == "original" else "reflex"
    split = declared or heads
    if split is None and variant == "reflex":
        # --heads outranks the name: the notebook writes '5-2-1' into out_dir and the run name whatever model.py runs
        split = split_in_name(path, sizes["n_head"])
        if split is None:
            raise core.ConfigError(f"{path}: the head split is neither in the checkpoint nor in the run's name "
                                   "(e.g. mini-gpt-5-2-1): pass --heads s-a-b or --heads all")
        core.warn_once(f"{path}: head split {split} read from the run's name (--heads overrides it)")
    cfg = ReflexConfig(variant=variant, heads=split or ReflexConfig.heads, dropout=args.get("dropout", 0.0),
                       bias=bool(args.get("bias", conf.get("bias"))), **sizes)
    state = core.from_nanogpt(ckpt["model"])
    for k in [k for k in state if ".attn.query." in k]:
        qkv = [k.replace(".query.", f".{n}.") for n in ("query", "key", "value")]
        if all(n in state for n in qkv):
            state[k.replace(".query.", ".c_attn.")] = torch.cat([state.pop(n) for n in qkv])
    return cfg, state


# ----------------------------------------------------------------------------------------------------------------
# Plots: the original's charts (train/val loss of every run on one figure, MFU per run), from log.jsonl

def speed_of(log):
    """Median tokens/s and MFU of a run's logged steps, skipping the first record (compilation, warm-up)."""
    recs = log[1:] or log
    mfus = [r["mfu"] for r in recs if r.get("mfu") is not None]
    return statistics.median(r["tok_s"] for r in recs), statistics.median(mfus) if mfus else None


def charts(cfg, args):
    plt = core.pyplot()
    paths = core.run_dirs(cfg, args)
    labels = [core.run_label(p)[0] for p in paths]  # 'dir (script/variant split, data)'
    runs = dict(zip(labels if len(set(labels)) == len(paths) else paths, paths))  # alike labels: their paths
    speed = {}
    for label, path in runs.items():  # before any figure: a refused command leaves --out as it was
        log = [r for r in core.read_log(path) if r.get("tok_s")]
        if not log:
            raise core.ConfigError(f"{path}: no training step logged yet")
        speed[label] = speed_of(log)
    print(core.plot_runs(paths, os.path.join(cfg.out, "loss.png"), title="reflex attention: loss"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = list(speed)
    axes[0].bar(labels, [speed[k][0] / 1e3 for k in labels])
    axes[0].set_ylabel("k tokens/s (median of logged steps)")
    mfu = [100 * (speed[k][1] or 0) for k in labels]
    axes[1].bar(labels, mfu)
    axes[1].set_ylabel("MFU % of the GPU's bf16 peak")
    if not any(mfu):
        axes[1].text(0.5, 0.5, "n/a: no known GPU peak", ha="center", transform=axes[1].transAxes)
        axes[1].set_yticks([])
    for ax in axes:
        ax.tick_params(axis="x", rotation=20)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle("reflex attention: training speed per run")
    fig.tight_layout()
    out = os.path.join(cfg.out, "speed.png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    for k in labels:
        mfu = f"{100 * speed[k][1]:.1f}%" if speed[k][1] else "n/a"
        print(f"{k}: {speed[k][0] / 1e3:.1f}k tok/s, MFU {mfu}")
    print(out)


# ----------------------------------------------------------------------------------------------------------------

PAPER = core.Paper(
    "reflex", ReflexConfig, build_model, baseline="baseline", doc=__doc__, size_preset="124m-8h",
    convert=from_original, formats="the original notebook's nanoGPT checkpoints (the split from --heads or the "
                                   "run's name)",
    bench_rows={f"reflex {h}": dict(variant="reflex", heads=h) for h in ("4-2-2", "all")},
    actions={"charts": ("<out>/loss.png (train/val loss of --out and --runs) and <out>/speed.png (tokens/s, MFU per "
                        "run)", charts)})


def main(argv=None):
    return core.main(PAPER, argv)


if __name__ == "__main__":
    raise SystemExit(main())
