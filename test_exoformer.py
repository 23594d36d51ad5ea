"""Tests of exoformer.py (CPU; the GPU-only ones skip without CUDA). `python -m pytest -q test_exoformer.py`"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import core
import exoformer as exo

HERE = os.path.dirname(os.path.abspath(__file__))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
VARIANTS = list(exo.VARIANT_FLAGS)
SEP, V = 7, 64  # a document separator inside the tiny vocabulary: document masking is on in these tests


def tiny(variant="dynamic_exoformer", **kw):
    return exo.ExoConfig(**{**dict(variant=variant, n_layer=3, n_head=4, n_embd=32, block_size=16, vocab_size=V,
                                   doc_sep=SEP, attn_impl="eager", device="cpu"), **kw})


def live(model, seed=0):
    """Give the zero-initialised matrices (c_proj, w_down, head, dynamic fc2) values, so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def tokens(B=2, T=16, seed=0, sep_at=()):
    idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    idx[idx == SEP] = SEP + 1
    for t in sep_at:
        idx[:, t] = SEP
    return idx


# ---------------------------------------------------------------------------------------------------------- model

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["scalar", "headwise", "elementwise"])
def test_forward_backward_every_variant(variant, mode):
    torch.manual_seed(0)
    model = live(exo.ExoGPT(tiny(variant, residual_mode=mode)))
    idx = tokens(sep_at=(9,))
    assert model(idx).shape == (2, 16, V)
    model(idx, idx).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"
    flags = exo.VARIANT_FLAGS[variant]
    lambdas = [n for n, _ in model.named_parameters() if ".lambda_" in n]
    layers_mixing = 3 if flags["anchor"] == "exo" else 2  # layer-0 anchors are not mixed into layer 0
    assert len(lambdas) == 2 * len(flags["mix"]) * layers_mixing
    assert hasattr(model, "anchor_proj") == (flags["anchor"] == "exo")


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_and_document_masking(variant):
    torch.manual_seed(0)
    model = live(exo.ExoGPT(tiny(variant)))
    idx = tokens(sep_at=(8,))  # documents [0, 8) and [8, 16)
    out = model(idx)
    future = idx.clone()
    future[:, 12:] = (future[:, 12:] + 1) % V
    future[future == SEP] = SEP + 2
    torch.testing.assert_close(model(future)[:, :12], out[:, :12])  # no position sees its future
    past_doc = idx.clone()
    past_doc[:, :8] = (past_doc[:, :8] + 3) % V
    past_doc[past_doc == SEP] = SEP + 3
    torch.testing.assert_close(model(past_doc)[:, 8:], out[:, 8:])  # nor the previous document
    assert not torch.allclose(model(past_doc)[:, :8], out[:, :8])


@pytest.fixture
def flex_cpu_grad(monkeypatch):
    """FlexAttention has no CPU backward; its dense reference math does, once the device check is bypassed."""
    import torch.nn.attention.flex_attention as fa
    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)


@pytest.mark.parametrize("variant", ["dynamic_exoformer", "nuresformer", "baseline"])
@pytest.mark.parametrize("impl,sep", [("sdpa", -1), ("flex", SEP)])
def test_fast_paths_match_eager(variant, impl, sep, flex_cpu_grad):
    idx = tokens(sep_at=(5, 11) if sep >= 0 else ())
    results = []
    for attn_impl in ("eager", impl):
        torch.manual_seed(0)
        model = live(exo.ExoGPT(tiny(variant, doc_sep=sep, attn_impl=attn_impl)))
        loss = model(idx, idx)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)


def test_dynamic_equals_static_exoformer_at_init():
    """Model4 doubles the lambdas because the zero-initialised dynamic MLP outputs sigmoid(0) = 0.5: at init the
    Dynamic ExoFormer computes exactly the static ExoFormer, whatever fc1 holds; a trained fc2 breaks the tie."""
    for mode in ("scalar", "headwise", "elementwise"):
        torch.manual_seed(0)
        dyn = exo.ExoGPT(tiny("dynamic_exoformer", residual_mode=mode))
        static = exo.ExoGPT(tiny("exoformer", residual_mode=mode))
        assert all(float(p.mean()) == 1.0 for n, p in dyn.named_parameters() if ".lambda_" in n)
        assert all(float(p.mean()) == 0.5 for n, p in static.named_parameters() if ".lambda_" in n)
        with torch.no_grad():
            for n, p in dyn.named_parameters():
                if ".lambda_" not in n and "dynamic_mixing.fc2" not in n:
                    p.copy_(p + 0.05 * torch.randn_like(p))  # trained-looking weights, fc2 still zero
        shared = {n: p for n, p in dyn.state_dict().items() if "dynamic_mixing" not in n and ".lambda_" not in n}
        static.load_state_dict(shared, strict=False)
        idx = tokens(sep_at=(6,))
        torch.testing.assert_close(dyn(idx), static(idx), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            dyn.transformer.h[1].attn.dynamic_mixing.fc2.bias.fill_(1.0)
        assert not torch.allclose(dyn(idx), static(idx), atol=1e-4)


def test_init_follows_the_paper():
    torch.manual_seed(0)
    model = exo.ExoGPT(tiny("dynamic_exoformer", n_embd=64, n_head=4))
    sd = model.state_dict()
    for n in ("lm_head.weight", "transformer.h.1.attn.c_proj.weight", "transformer.h.2.mlp.w_down.weight",
              "transformer.h.0.attn.dynamic_mixing.fc2.weight", "transformer.h.0.attn.dynamic_mixing.fc2.bias"):
        assert not sd[n].any(), n
    for n in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "anchor_proj.weight"):
        assert sd[n].abs().max() <= 0.06 and 0.015 < sd[n].std() < 0.02, n  # trunc normal(0.02, cutoff 3 std)
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (4 * 64, 64)  # q, k, v, gate
    assert sd["transformer.h.0.mlp.w_up.weight"].shape == (128, 64)  # SwiGLU width 2C
    assert model.cfg.norm_eps == 1e-6 and model.cfg.rope_theta == 500000.0
    assert exo.ExoConfig().eval_tokens == 3052 * 16 * 2048  # the paper's full validation pass
    torch.manual_seed(0)
    m = exo.ExoGPT(tiny("baseline"))
    assert math.isclose(m(tokens(), tokens()).item(), math.log(V), rel_tol=1e-5)  # zero head: uniform at init


def test_z_loss_only_while_training():
    torch.manual_seed(0)
    model = live(exo.ExoGPT(tiny("gated", z_loss=0.1)))
    idx = tokens()
    logits = model(idx)
    ce = F.cross_entropy(logits.view(-1, V), idx.view(-1))
    z = 0.1 * torch.logsumexp(logits.view(-1, V), -1).square().mean()
    torch.testing.assert_close(model.train()(idx, idx), ce + z)
    torch.testing.assert_close(model.eval()(idx, idx), ce)


def train_steps(model, cfg, steps, batch):
    opts = model.configure_optimizers(cfg, "cpu")
    losses = []
    for it in range(steps):
        for o in opts:
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * core.lr_mult(it, cfg)
        x, y = batch(it)
        loss = model(x, y)
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_falls(variant):
    """Muon + AdamW with the paper's schedule learn a periodic sequence with documents in every variant."""
    torch.manual_seed(0)
    cfg = tiny(variant, n_layer=2, max_iters=30, warmup_iters=3, lr=1e-2, muon_lr=0.02)
    model = exo.ExoGPT(cfg).train()
    seq = torch.tensor([SEP, 3, 14, 15, 9, 26, 5, 35] * 5)
    batch = lambda it: (torch.stack([seq[i:i + 16] for i in (it % 8, (it + 3) % 8)]),
                        torch.stack([seq[i + 1:i + 17] for i in (it % 8, (it + 3) % 8)]))
    losses = train_steps(model, cfg, 30, batch)
    assert losses[0] == pytest.approx(math.log(V), rel=1e-4)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------------------- Muon

REF_COEFFS = [(8.156554524902461, -22.48329292557795, 15.878769915207462),
              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)]


def ref_muon_step(p, grad, state, lr, wd, momentum, beta2=0.95):
    """One step of jon123boss/ExoFormer muon/muon.py (pytorch polar express, NorMuon, cautious decay), transcribed."""
    if not state:
        state["m"] = torch.zeros_like(p)
        state["v"] = torch.zeros(*p.shape[:-1], 1) if p.size(-2) >= p.size(-1) else torch.zeros(1, p.shape[-1])
    state["m"].lerp_(grad, 1 - momentum)
    update = grad.lerp(state["m"], momentum)
    X, transposed = update.bfloat16(), update.size(-2) > update.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * (1 + 2e-2) + 1e-6)
    for a, b, c in REF_COEFFS:
        X32 = X.float()
        A = X32 @ X32.mT
        X = (a * X32 + (b * A + c * (A @ A)) @ X32).to(torch.bfloat16)
    update = X.mT if transposed else X
    v_norm = update.norm(dim=(-2, -1), keepdim=True)
    v_mean = update.square().mean(dim=-1 if p.size(-2) >= p.size(-1) else -2, keepdim=True)
    state["v"].lerp_(v_mean.to(p.dtype), 1 - beta2)
    update = update * state["v"].clamp(min=1e-10).rsqrt()
    update = update * (v_norm / update.norm(dim=(-2, -1), keepdim=True).clamp(min=1e-10))
    update = update * max(1, p.size(-2) / p.size(-1)) ** 0.5
    p.addcmul_((update * p >= 0).to(p.dtype), p, value=-lr * wd)
    p.add_(update, alpha=-lr)


def test_muon_matches_the_published_rule():
    torch.manual_seed(0)
    params = [torch.randn(48, 16), torch.randn(16, 40), torch.randn(24, 24)]  # tall, wide, square
    ours = [p.clone().requires_grad_() for p in params]
    opt = exo.Muon(ours, lr=0.02, weight_decay=0.1, total_steps=1000)
    ref, states = [p.clone() for p in params], [{} for _ in params]
    for step in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(ours, grads):
            p.grad = g.clone()
        opt.step()
        for p, g, s in zip(ref, grads, states):
            ref_muon_step(p, g, s, lr=0.02, wd=0.1, momentum=0.85 + step / 100 * 0.1)
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.detach(), b, atol=1e-6, rtol=1e-6)
    assert [exo.muon_momentum(s, 1000) for s in (0, 50, 100, 500, 950, 1000)] == pytest.approx(
        [0.85, 0.90, 0.95, 0.95, 0.90, 0.85])


def test_polar_express_orthogonalises():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96)]:
        G = torch.randn(shape)
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        O = exo.polar_express(G).float()
        assert F.cosine_similarity(O.flatten(), (U @ Vh).flatten(), dim=0) > 0.99
        s = torch.linalg.svdvals(O)
        assert 0.7 < s.min() and s.max() < 1.2


def test_optimizer_groups():
    model = exo.ExoGPT(tiny("dynamic_exoformer"))
    muon, adamw = model.configure_optimizers(model.cfg, "cpu")
    ids = lambda opt: {id(p) for g in opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[i] for i in ids(muon)}
    assert "anchor_proj.weight" in in_muon and "transformer.h.0.attn.dynamic_mixing.fc1.weight" in in_muon
    assert all(n.startswith(("transformer.h.", "anchor_proj")) for n in in_muon)
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.h.0.attn.lambda_q1",
            "transformer.h.0.attn.dynamic_mixing.fc2.bias", "anchor_q_norm.weight"} <= {names[i] for i in ids(adamw)}
    assert len(ids(muon) | ids(adamw)) == len(list(model.parameters())) and not ids(muon) & ids(adamw)
    assert muon.param_groups[0]["base_lr"] == 0.01 and adamw.param_groups[0]["base_lr"] == 3e-3
    assert muon.param_groups[0]["weight_decay"] == 0.1 and adamw.param_groups[0]["weight_decay"] == 0.0


# ---------------------------------------------------------------------------------------------------------- checkpoints

def write_dataset(path, n_train=6000, n_val=1200, seed=0):
    rng = np.random.default_rng(seed)
    period = np.array([SEP, 3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 38, 4], dtype=np.uint16)
    for split, n in (("train", n_train), ("val", n_val)):
        toks = np.tile(period, n // 16 + 1)[:n].copy()
        toks[rng.random(n) < 0.05] = rng.integers(0, V, int((rng.random(n) < 0.05).sum()) or 1)[0]
        toks.tofile(os.path.join(path, f"{split}.bin"))
    json.dump(dict(tokenizer="gpt2", vocab_size=V, dtype="uint16", eot_token=SEP,
                   splits=dict(train=dict(tokens=n_train), val=dict(tokens=n_val))), open(os.path.join(path, "meta.json"), "w"))
    return str(path)


TINY_CLI = ["--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
            "--device", "cpu", "--doc-sep", str(SEP), "--eval-iters", "2", "--log-interval", "5", "--warmup-iters", "2"]


def test_checkpoint_round_trip_and_init_from(tmp_path, capsys):
    data = write_dataset(tmp_path)
    out = str(tmp_path / "run")
    assert exo.main(["--train", "--variant", "nuresformer", "--data", data, "--out", out, "--max-iters", "10",
                     "--eval-interval", "10", *TINY_CLI]) == 0
    ckpt = core.load_checkpoint(os.path.join(out, "ckpt.pt"))
    model = exo.load_model(os.path.join(out, "ckpt.pt"))
    assert model.cfg.variant == "nuresformer" and model.cfg.anchor_norm == "qkvg" and not model.training
    fresh = exo.ExoGPT(model.cfg)
    fresh.load_state_dict(ckpt["model"])
    idx = tokens(sep_at=(4,))
    torch.testing.assert_close(model(idx), fresh.eval()(idx))
    assert len(ckpt["optimizers"]) == 2 and ckpt["optimizers"][0]["param_groups"][0]["step"] == 10
    out2 = str(tmp_path / "run2")  # --init-from keeps the checkpoint's model, takes the run settings from flags
    assert exo.main(["--train", "--init-from", os.path.join(out, "ckpt.pt"), "--data", data, "--out", out2,
                     "--max-iters", "5", "--eval-interval", "5", *TINY_CLI]) == 0
    assert exo.load_model(os.path.join(out2, "ckpt.pt")).cfg.variant == "nuresformer"
    assert exo.main(["--eval", "--init-from", os.path.join(out2, "ckpt.pt"), "--data", data]) == 0
    assert "val" in capsys.readouterr().out


# A tiny independent reference of the official forward (official key names, the (B, H, T, D) layout of model*.py)

def ref_forward(sd, a, version, idx):
    C, H, L, eps = a["n_embd"], a["n_head"], a["n_layer"], a["rmsnorm_eps"]
    D, (B, T) = C // H, idx.shape
    w = lambda k: sd[k].float()
    rms = lambda x, k: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w(k)
    heads = lambda t: t.view(B, T, H, D).transpose(1, 2)
    inv = 1.0 / (a["rope_theta"] ** (torch.arange(0, D, 2).float() / D))
    emb = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, dim=-1)
    rope = lambda x: x * emb.cos() + torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1) * emb.sin()
    view = {"elementwise": lambda l: l.view(1, H, 1, D), "headwise": lambda l: l.view(1, H, 1, 1),
            "scalar": lambda l: l}[a["residual_mode"]]
    gated, exo_anchor = a["gated_attention_enabled"], "anchor_proj.weight" in sd
    n = 4 if gated else 3
    x = w("transformer.wte.weight")[idx]
    anc = None
    if exo_anchor:
        anc = [heads(t) for t in (x @ w("anchor_proj.weight").T).split(C, -1)]
        anc = [rms(t, f"anchor_{p}_norm.weight") if f"anchor_{p}_norm.weight" in sd else t for p, t in zip("qkvg", anc)]
    for i in range(L):
        pre = f"transformer.layers.{i}."
        h = rms(x, pre + "attn_norm.weight")
        qkvg = [heads(t) for t in (h @ w(pre + "attn.c_attn.weight").T).split(C, -1)]
        scale = [1.0] * 8
        if pre + "attn.dynamic_mixing.fc1.weight" in sd:
            s = torch.sigmoid(F.gelu(h @ w(pre + "attn.dynamic_mixing.fc1.weight").T)
                              @ w(pre + "attn.dynamic_mixing.fc2.weight").T + w(pre + "attn.dynamic_mixing.fc2.bias"))
            scale = [s[:, :, j].view(B, 1, T, 1) for j in range(s.size(-1))]
        for j, p in enumerate("qkvg"[:n]):
            if pre + f"attn.lambda_{p}1" in sd:
                qkvg[j] = (view(w(pre + f"attn.lambda_{p}1")) * scale[2 * j] * anc[j]
                           + view(w(pre + f"attn.lambda_{p}2")) * scale[2 * j + 1] * qkvg[j])
        q, k = rms(qkvg[0], pre + "attn.q_norm.weight"), rms(qkvg[1], pre + "attn.k_norm.weight")
        if i == 0 and not exo_anchor:  # internal anchors, as each model file takes them
            if version == "model1":
                anc = list(qkvg)
            elif version == "model2":
                anc = [q, k, rms(qkvg[2], pre + "attn.v_norm.weight")]
                anc += [rms(qkvg[3], pre + "attn.g_norm.weight")] if gated else []
            else:
                anc = [q if a["q_residual_norm_enabled"] else qkvg[0], k if a["k_residual_norm_enabled"] else qkvg[1]]
                anc += [rms(t, pre + f"attn.{p}_res_norm.weight") if pre + f"attn.{p}_res_norm.weight" in sd else t
                        for p, t in zip("vg", qkvg[2:])]
        q, k = rope(q), rope(k)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        att = att.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")).softmax(-1)
        y = att @ qkvg[2]  # (B, H, T, D)
        if gated:
            y = y * torch.sigmoid(qkvg[3])
        x = x + y.transpose(1, 2).reshape(B, T, C) @ w(pre + "attn.c_proj.weight").T
        u, g = (rms(x, pre + "mlp_norm.weight") @ w(pre + "mlp.fc1.weight").T).chunk(2, dim=-1)
        x = x + (F.silu(g) * u) @ w(pre + "mlp.fc2.weight").T
    return rms(x, "transformer.final_norm.weight") @ w("lm_head.weight").T


def published(version, mode="elementwise", gated=True, res="qkvg", decouple=False, norms=True, dynamic=False, L=3,
              C=32, H=4, V_=V, seed=0):
    """model_args and a random state dict with the official keys of one model file (weights bf16 as published)."""
    g = torch.Generator().manual_seed(seed)
    D, n = C // H, 4 if gated else 3
    a = dict(block_size=16, vocab_size=V_, n_layer=L, n_head=H, n_embd=C, mlp_hidden_dim=None, mlp_ratio=4.0,
             weight_tying=False, act_type="swiglu", rope_theta=500000.0, rmsnorm_eps=1e-6, rmsnorm_use_weight=True,
             rmsnorm_use_bias=False, norm_pos="before", qk_norm=True, clip_qkv=None, logit_soft_cap=None,
             smear_gate_enabled=False, per_layer_backout=False, residual_mode=mode, gated_attention_enabled=gated,
             query_res_enabled="q" in res, key_res_enabled="k" in res, value_res_enabled="v" in res,
             gate_res_enabled="g" in res, decouple_anchor=decouple, q_residual_norm_enabled=norms,
             k_residual_norm_enabled=norms, v_residual_norm_enabled=norms, g_residual_norm_enabled=norms,
             embedding_layer0_mix_enabled=False, dynamic_mixing_enabled=dynamic, dynamic_mixing_hidden_dim=16)
    if version != "model.py":
        a.update(anchor_delta_enabled=False, anchor_delta_init=0.0)
    mat = lambda *s: (0.2 * torch.randn(*s, generator=g) / math.sqrt(s[-1])).bfloat16()
    vec = lambda *s: 1 + 0.2 * torch.randn(*s, generator=g)
    lam = lambda: 0.2 + 0.8 * torch.rand({"elementwise": (H, D), "headwise": (H,), "scalar": ()}[mode], generator=g)
    sd = {"transformer.wte.weight": mat(V_, C), "transformer.final_norm.weight": vec(C), "lm_head.weight": mat(V_, C)}
    for i in range(L):
        pre = f"transformer.layers.{i}."
        sd.update({pre + "attn_norm.weight": vec(C), pre + "attn.c_attn.weight": mat(n * C, C),
                   pre + "attn.c_proj.weight": mat(C, C), pre + "attn.q_norm.weight": vec(D),
                   pre + "attn.k_norm.weight": vec(D), pre + "mlp_norm.weight": vec(C),
                   pre + "mlp.fc1.weight": mat(4 * C, C), pre + "mlp.fc2.weight": mat(C, 2 * C)})
        if version == "model2":
            sd.update({pre + "attn.v_norm.weight": vec(D), **({pre + "attn.g_norm.weight": vec(D)} if gated else {})})
        if version in ("model3", "model4", "model.py") and i == 0 and not decouple and norms:
            sd.update({pre + "attn.v_res_norm.weight": vec(D), **({pre + "attn.g_res_norm.weight": vec(D)} if gated else {})})
        if decouple or i > 0:
            for p in res:
                sd.update({pre + f"attn.lambda_{p}1": lam(), pre + f"attn.lambda_{p}2": lam()})
            if dynamic:
                sd.update({pre + "attn.dynamic_mixing.fc1.weight": mat(16, C),
                           pre + "attn.dynamic_mixing.fc2.weight": mat(2 * n, 16),
                           pre + "attn.dynamic_mixing.fc2.bias": 0.5 * torch.randn(2 * n, generator=g)})
    if decouple:
        sd["anchor_proj.weight"] = mat(n * C, C)
        sd.update({f"anchor_{p}_norm.weight": vec(D) for p in "qkvg"[:n] if norms})
    return a, sd


PUBLISHED = {  # name: (model file, published() arguments, our variant name)
    "baseline": ("model1", dict(gated=False, res=""), "baseline"),
    "gated": ("model1", dict(res=""), "gated"),
    "resformer": ("model1", dict(gated=False, res="v", mode="scalar"), "resformer"),
    "nkqr": ("model1", dict(res="vg"), "nuresformer_nkqr"),
    "oqkrn": ("model1", dict(res="qkvg", mode="headwise"), "nuresformer_oqkrn"),
    "nuresformer": ("model2", dict(), "nuresformer"),
    "internal-model3": ("model3", dict(mode="headwise"), "nuresformer"),
    "exoformer": ("model3", dict(decouple=True, mode="scalar"), "exoformer"),
    "dynamic": ("model4", dict(decouple=True, dynamic=True), "dynamic_exoformer"),
    "model.py": ("model.py", dict(decouple=True, dynamic=True, mode="headwise"), "dynamic_exoformer"),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_checkpoint_reproduces_reference(name, tmp_path):
    version, kw, variant = PUBLISHED[name]
    args, sd = published(version, **kw)
    path = str(tmp_path / "ckpt_step:38146.pt")
    torch.save(dict(step=38146, tokens_processed=10_000_000_000, model={"_orig_mod." + k: v for k, v in sd.items()},
                    config=dict(batch_size=16), model_args=args), path)
    model = exo.load_model(path)
    assert model.cfg.variant == variant
    idx = tokens(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref_forward(sd, args, version, idx), atol=2e-5, rtol=2e-5)


def test_published_checkpoint_with_unsupported_options(tmp_path):
    args, sd = published("model1")
    args["per_layer_backout"] = True
    path = str(tmp_path / "ckpt.pt")
    torch.save(dict(model=sd, model_args=args), path)
    with pytest.raises(core.ConfigError, match="per_layer_backout"):
        exo.load_model(path)
    torch.save(dict(model={"something": torch.zeros(1)}), path)
    assert exo.load_model(path) is None


# ---------------------------------------------------------------------------------------------------------- CLI

def test_cli_errors_are_one_line():
    for args, msg in ((["--train", "--variant", "nope"], "--variant must be one of"),
                      (["--train", "--family", "gpt2"], "--family must be llama"),
                      (["--train", "--gate", "off", "--mix", "qg", "--anchor", "exo"], "needs --gate on"),
                      (["--train", "--variant", "baseline", "--mix", "v"], "--mix and --anchor go together"),
                      (["--analyze", "--init-from", "missing.pt"], "checkpoint not found")):
        p = subprocess.run([sys.executable, os.path.join(HERE, "exoformer.py"), *args], capture_output=True,
                           text=True, cwd=HERE, timeout=300)
        assert p.returncode == 2 and msg in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_analyze_and_compare(tmp_path, capsys):
    data = write_dataset(tmp_path)
    ckpts = []
    for variant in ("baseline", "nuresformer", "dynamic_exoformer"):
        torch.manual_seed(0)
        model = live(exo.ExoGPT(tiny(variant, n_layer=2)))
        path = str(tmp_path / f"{variant}.pt")
        core.save_checkpoint(path, dict(format="attnlab", config=__import__("dataclasses").asdict(model.cfg),
                                        model=model.state_dict()))
        ckpts.append(path)
    out = str(tmp_path / "an")
    assert exo.main(["--analyze", "--init-from", ckpts[0], "--runs", *ckpts[1:], "--data", data, "--out", out,
                     "--device", "cpu"]) == 0
    res = json.load(open(os.path.join(out, "analysis.json")))
    assert os.path.getsize(os.path.join(out, "analysis.png")) > 10_000
    base, nu, dyn = (res[f"{v}.pt"] for v in ("baseline", "nuresformer", "dynamic_exoformer"))
    for r in (base, nu, dyn):
        att, hid = r["attention_layers"], r["hidden_layers"]
        assert len(att["sink"]) == 2 and all(0 < s <= 1 for s in att["sink"])
        assert all(0 <= e <= math.log(16) + 1e-4 for e in att["entropy"])
        assert len(hid["pca_core"]) == 3 and all(1 <= c <= 32 for c in hid["pca_core"])  # embedding + 2 layers
        assert hid["cos_to_embedding"][0] == pytest.approx(1.0) and len(r["layer_similarity"]) == 3
    assert "gate_mean" not in base["attention_layers"] and "ratio_v" not in base["attention_layers"]
    assert all(0 < g < 1 for g in dyn["attention_layers"]["gate_mean"])
    assert nu["attention_layers"]["ratio_q"][0] is None and nu["attention_layers"]["ratio_q"][1] == pytest.approx(1.0)
    assert len(dyn["lambdas"]["g"]) == 2 and len(dyn["lambdas"]["g"][0]["ratio"]) == 32  # elementwise H x D
    assert exo.main(["--compare", "--preset", "tiny", "--data", data, "--out", out, "--device", "cpu",
                     "--doc-sep", str(SEP)]) == 0
    bench = json.load(open(os.path.join(out, "compare.json")))["results"]
    assert list(bench) == ["baseline", *[v for v in VARIANTS if v != "baseline"]]
    assert bench["gated"]["params_m"] > bench["baseline"]["params_m"]
    assert "1.000x" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------- GPU

@cuda
@pytest.mark.parametrize("variant", ["dynamic_exoformer", "nuresformer", "gated"])
def test_cuda_compiled_flex_matches_eager(variant):
    """The training path (torch.compile, FlexAttention document masks, bf16) against the eager fp32 reference."""
    torch.manual_seed(0)
    cfg = exo.ExoConfig(variant=variant, n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=512,
                        doc_sep=SEP, attn_impl="auto")
    model = live(exo.ExoGPT(cfg)).cuda()
    idx = torch.randint(0, 512, (4, 256), device="cuda")
    idx[:, 100] = SEP
    with torch.no_grad():
        ref = model(idx, record=lambda layer, probs: None)  # recording forces the eager reference
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = torch.compile(model)(idx)
    assert (fast.float() - ref).abs().max() < 0.05 * ref.abs().max()
    grads = []
    for impl in ("eager", "auto"):
        model.cfg.attn_impl = impl
        model.zero_grad()
        model(idx, idx).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)
