"""Tests of attn_bias.py (Massive Activations sec. 5.2). CPU: `python -m pytest -q test_attn_bias.py`; the GPU-only
tests (private cuDNN / flash kernels, compiled FlexAttention, compiled model) skip without CUDA."""
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attn_bias as ab
import core

HERE = os.path.dirname(os.path.abspath(__file__))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tiny(**kw):
    return ab.AttnBiasConfig(**{**ab.AttnBiasConfig.PRESETS["tiny"], "vocab_size": 256, "device": "cpu", **kw})


@pytest.fixture
def flex_cpu_grad(monkeypatch):
    """FlexAttention has no CPU backward; its dense reference math does, once the device check is bypassed."""
    import torch.nn.attention.flex_attention as fa
    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    """Real text as bytes (90/10 split)."""
    path = str(tmp_path_factory.mktemp("tutorial"))
    b = open(os.path.join(HERE, "assets", "python_tutorial.txt"), "rb").read()
    n = int(len(b) * 0.9)
    np.frombuffer(b[:n], np.uint8).tofile(os.path.join(path, "train.bin"))
    np.frombuffer(b[n:], np.uint8).tofile(os.path.join(path, "val.bin"))
    json.dump(dict(tokenizer="bytes", vocab_size=256, dtype="uint8", eot_token=None,
                   splits=dict(train=dict(tokens=n, bytes=n), val=dict(tokens=len(b) - n, bytes=len(b) - n))),
              open(os.path.join(path, "meta.json"), "w"))
    return path


@pytest.fixture(scope="module")
def runs(tutorial, tmp_path_factory):
    """The three variants trained for 60 steps through the CLI."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for v in ab.AttnBiasConfig.VARIANTS:
        out[v] = str(root / v)
        assert ab.main(["--train", "--preset", "tiny", "--variant", v, "--data", tutorial, "--out", out[v],
                        "--max-iters", "60", "--eval-interval", "30", "--device", "cpu"]) == 0
    return out


# ----------------------------------------------------------------------------------------------------------------
# model

def test_variants_train_and_loss_falls(runs):
    for v, path in runs.items():
        log = core.read_log(path)
        assert log[-1]["loss"] < log[0]["loss"] - 1.0, v
        assert log[-1]["val_loss"] < 4.0, v  # uniform bytes: ln 256 = 5.55
        ckpt = core.load_checkpoint(os.path.join(path, "ckpt.pt"))
        assert ckpt["config"]["variant"] == v
        assert ("transformer.h.0.attn.k_bias" in ckpt["model"]) == (v == "attn_bias")
        assert ("reg_token" in ckpt["model"]) == (v == "sink")


def test_gpt2_small_parameter_counts():
    """Spec §1.3: 124,373,760 parameters, +768 (reg_token), +18,432 (k_bias, v_bias x 12 layers)."""
    counts = {}
    for v in ab.AttnBiasConfig.VARIANTS:
        cfg = ab.AttnBiasConfig(**{**ab.AttnBiasConfig.PRESETS["paper"], "vocab_size": 50304, "device": "cpu",
                                   "variant": v})
        with torch.device("meta"):
            counts[v] = sum(p.numel() for p in ab.build_model(cfg).parameters())
    assert counts == dict(default=124_373_760, sink=124_374_528, attn_bias=124_392_192)


def test_new_parameters_are_weight_decayed():
    """Spec §1.1/§7.9: k_bias, v_bias and reg_token are >= 2-D, so nanoGPT decays them; so do we."""
    for v, names in (("sink", {"reg_token"}), ("attn_bias", {"k_bias", "v_bias"})):
        model = ab.build_model(tiny(variant=v))
        decayed = {id(p) for p in model.configure_optimizers(model.cfg, "cpu")[0].param_groups[0]["params"]}
        extra = [p for n, p in model.named_parameters() if n.split(".")[-1] in names]
        assert extra and all(id(p) in decayed for p in extra)
        assert all(abs(p.std().item() - 0.02) < 0.01 for p in extra)  # N(0, 0.02²) survives the core's init


def test_default_config_trains_the_default_model():
    """§7.1: the original's default config builds the attn_bias model."""
    cfg = ab.AttnBiasConfig(device="cpu", vocab_size=256, n_layer=1, n_embd=32, n_head=2)
    assert cfg.variant == "default"
    assert type(ab.build_model(cfg)) is core.GPT
    assert not any(isinstance(m, ab.BiasAttention) for m in ab.build_model(cfg).modules())


# ----------------------------------------------------------------------------------------------------------------
# attention: reference and fast paths

def qkv_inputs(B=2, H=3, T=37, D=16, seed=0):
    """q, k, v as the model makes them (views of one (B, T, 3C) tensor), plus k', v'; all leaves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3 * H * D, generator=g).requires_grad_()
    kb, vb = (torch.randn(1, H, 1, D, generator=g).requires_grad_() for _ in range(2))
    return x, kb, vb


def run_attention(impl, x, kb, vb, H=3):
    attn = ab.BiasAttention(tiny(variant="attn_bias", n_head=H, n_embd=x.size(-1) // 3, attn_impl=impl), 0)
    with torch.no_grad():
        attn.k_bias.copy_(kb)
        attn.v_bias.copy_(vb)
    q, k, v = (core.split_heads(t, H) for t in x.chunk(3, dim=-1))
    ctx = core.Ctx(x0=x)
    y = attn.attend(q, k, v, ctx)
    grads = torch.autograd.grad(y.square().sum(), [x, attn.k_bias, attn.v_bias])
    return y.detach(), grads


def test_eager_is_the_papers_formula():
    """o_i = (Σ_{j<=i} e^{s_ij} v_j + e^{s_ib} v') / (Σ_{j<=i} e^{s_ij} + e^{s_ib}), spec §1.1, one query at a time."""
    x, kb, vb = qkv_inputs(T=9)
    y, _ = run_attention("eager", x, kb, vb)
    q, k, v = (core.split_heads(t, 3).detach().double() for t in x.chunk(3, dim=-1))
    kb, vb = kb.detach().double()[0, :, 0], vb.detach().double()[0, :, 0]  # (H, D)
    for b in range(2):
        for h in range(3):
            for i in range(9):
                s = q[b, h, i] @ k[b, h, :i + 1].T / 4.0  # √16
                sb = q[b, h, i] @ kb[h] / 4.0
                o = (s.exp() @ v[b, h, :i + 1] + sb.exp() * vb[h]) / (s.exp().sum() + sb.exp())
                assert torch.allclose(y[b, h, i].double(), o, atol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "flex", "cudnn", "flash"])
def test_fast_paths_match_eager(impl, flex_cpu_grad):
    """Outputs and the gradients of q, k, v (through the shared c_attn output), k' and v'. On CPU, cudnn and flash
    run the LSE merge with our backward on the CPU flash kernel; flex folds the bias through its lse."""
    x, kb, vb = qkv_inputs()
    y_ref, g_ref = run_attention("eager", x, kb, vb)
    y, g = run_attention(impl, x, kb, vb)
    assert torch.allclose(y, y_ref, atol=2e-6)
    for name, a, b in zip(("q/k/v", "k'", "v'"), g, g_ref):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (impl, name, (a - b).abs().max())


def test_prepending_with_top_left_causal_is_wrong():
    """Why the fast paths exist (§7.7): SDPA's is_causal on the prepended key drops each query's own key."""
    x, kb, vb = qkv_inputs()
    y_ref, _ = run_attention("eager", x, kb, vb)
    q, k, v = (core.split_heads(t, 3).detach() for t in x.chunk(3, dim=-1))
    k, v = ab.with_bias_key(k, v, kb.detach(), vb.detach())
    assert not torch.allclose(F.scaled_dot_product_attention(q, k, v, is_causal=True), y_ref, atol=1e-2)


def test_probe_accepts_a_correct_kernel_and_rejects_a_broken_one(monkeypatch, capsys):
    monkeypatch.setattr(ab, "KERNEL_OK", {})
    assert ab.probe_kernel("cpu", torch.device("cpu"), 16)
    fwd, bwd = ab.KERNELS["cpu"]
    monkeypatch.setitem(ab.KERNELS, "broken", (fwd, lambda *a, **k: [g * 0.5 for g in bwd(*a, **k)]))
    assert not ab.probe_kernel("broken", torch.device("cpu"), 16)
    assert "failed its parity check" in capsys.readouterr().err


@pytest.mark.parametrize("variant,impl", [("default", "sdpa"), ("sink", "sdpa"), ("sink", "eager"),
                                          ("attn_bias", "eager"), ("attn_bias", "sdpa"), ("attn_bias", "flex"),
                                          ("attn_bias", "cudnn")])
def test_causality(variant, impl):
    torch.manual_seed(0)
    model = ab.build_model(tiny(variant=variant, attn_impl=impl)).eval()
    idx = torch.randint(0, 256, (2, 40))
    t = 23
    idx2 = idx.clone()
    idx2[:, t:] = (idx[:, t:] + 7) % 256
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t], b[:, t])


def test_sink_never_reaches_the_logits():
    torch.manual_seed(0)
    model = ab.build_model(tiny(variant="sink")).eval()
    idx = torch.randint(0, 256, (2, 20))
    tr = model.transformer
    with torch.no_grad():
        logits = model(idx)
        assert logits.shape == (2, 20, 256)
        # by hand: sink first, blocks over 21 positions, final norm, drop the sink, tied head
        x = torch.cat((model.reg_token.expand(2, 1, -1), tr.wte(idx) + tr.wpe(torch.arange(20))), dim=1)
        ctx = core.Ctx(x0=x)
        for block in tr.h:
            x = block(x, ctx)
        assert torch.allclose(logits, tr.norm_f(x)[:, 1:] @ tr.wte.weight.T, atol=1e-5)
        y = torch.randint(0, 256, (2, 20))
        assert torch.allclose(model(idx, y), F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)), atol=1e-6)
        model.reg_token.mul_(50)  # the sink is used: it changes every position's logits
        assert not torch.allclose(model(idx), logits, atol=1e-3)
        assert model.generate(idx[:, :5], 3).shape == (2, 8)


# ----------------------------------------------------------------------------------------------------------------
# the paper's published checkpoints (spec §6)

def published(variant, L=2, H=2, C=32, V=256, Tb=16, prefix="", seed=0):
    """A checkpoint in the nanoGPT format of the published models, key names and shapes from the spec's table."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std
    wte = r(V, C)
    sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": r(Tb, C)}
    for i in range(L):
        h = f"transformer.h.{i}."
        sd.update({h + "ln_1.weight": 1 + r(C), h + "attn.c_attn.weight": r(3 * C, C), h + "attn.c_proj.weight": r(C, C),
                   h + "ln_2.weight": 1 + r(C), h + "mlp.c_fc.weight": r(4 * C, C), h + "mlp.c_proj.weight": r(C, 4 * C),
                   h + "attn.bias": torch.ones(1, 1, Tb, Tb).tril()})  # nanoGPT's mask buffer (torch < 2)
        if variant == "attn_bias":
            sd.update({h + "attn.k_bias": r(1, H, 1, C // H, std=1.0), h + "attn.v_bias": r(1, H, 1, C // H, std=1.0)})
    sd.update({"transformer.ln_f.weight": 1 + r(C), "lm_head.weight": wte})
    if variant == "sink":
        sd["reg_token"] = r(1, 1, C, std=1.0)
    sd = {prefix + k: v for k, v in sd.items()}
    args = dict(n_layer=L, n_head=H, n_embd=C, block_size=Tb, bias=False, vocab_size=V, dropout=0.0)
    return dict(model=sd, optimizer={"state": {}, "param_groups": []}, model_args=args, iter_num=50000,
                best_val_loss=torch.tensor(3.04), config={"model_type": f"gpt2_{variant}", "batch_size": 12})


def nanogpt_forward(sd, args, idx):
    """The nanoGPT models' math written out from their definition (pre-LN blocks, no biases, exact GELU)."""
    C, H, L = args["n_embd"], args["n_head"], args["n_layer"]
    ln = lambda x, w: F.layer_norm(x, (C,), w, None, 1e-5)  # noqa: E731
    B, T = idx.shape
    x = sd["transformer.wte.weight"][idx] + sd["transformer.wpe.weight"][:T]
    if "reg_token" in sd:
        x = torch.cat((sd["reg_token"].expand(B, 1, C), x), dim=1)
    S = x.size(1)
    for i in range(L):
        p = lambda n: sd[f"transformer.h.{i}.{n}"]  # noqa: E731
        q, k, v = (ln(x, p("ln_1.weight")) @ p("attn.c_attn.weight").T).split(C, dim=2)
        q, k, v = (t.view(B, S, H, C // H).transpose(1, 2) for t in (q, k, v))
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        if f"transformer.h.{i}.attn.k_bias" in sd:
            k = torch.cat((p("attn.k_bias").repeat(B, 1, 1, 1), k), dim=2)
            v = torch.cat((p("attn.v_bias").repeat(B, 1, 1, 1), v), dim=2)
            mask = torch.cat((torch.ones(S, 1, dtype=torch.bool), mask), dim=1)
        att = (q @ k.transpose(-2, -1) / math.sqrt(C // H)).masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(1, 2).reshape(B, S, C) @ p("attn.c_proj.weight").T
        x = x + F.gelu(ln(x, p("ln_2.weight")) @ p("mlp.c_fc.weight").T) @ p("mlp.c_proj.weight").T
    x = ln(x, sd["transformer.ln_f.weight"])
    return (x[:, 1:] if "reg_token" in sd else x) @ sd["lm_head.weight"].T


def test_published_key_counts():
    """Spec §6: 76, 77 and 100 keys for the 12-layer models (mask buffers aside)."""
    for v, n in (("default", 76), ("sink", 77), ("attn_bias", 100)):
        keys = [k for k in published(v, L=12, H=2, C=8, V=16, Tb=4)["model"] if not k.endswith(".attn.bias")]
        assert len(keys) == n, v


@pytest.mark.parametrize("variant", ["default", "sink", "attn_bias"])
@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_published_checkpoint_reproduces_nanogpt(variant, prefix, tmp_path):
    ckpt = published(variant, prefix=prefix)
    path = str(tmp_path / "ckpt_50000.pt")
    torch.save(ckpt, path)
    model = ab.load_model(path)
    assert model.cfg.variant == variant and not model.training
    idx = torch.randint(0, 256, (2, 16))
    ref = nanogpt_forward({k[len(prefix):]: v for k, v in ckpt["model"].items()}, ckpt["model_args"], idx)
    with torch.no_grad():
        assert torch.allclose(model(idx), ref, atol=1e-4)
        for impl in ("sdpa", "flex", "cudnn")[:3 if variant == "attn_bias" else 2]:
            model.cfg.attn_impl = impl
            assert torch.allclose(model(idx), ref, atol=1e-4), impl


def test_published_default_with_bias_keys_loads_as_attn_bias(tmp_path, capsys):
    """§7.1: the default train config trained attn_bias; the weights, not config['model_type'], decide."""
    ckpt = published("attn_bias")
    ckpt["config"]["model_type"] = "gpt2_default"
    torch.save(ckpt, tmp_path / "c.pt")
    assert ab.load_model(str(tmp_path / "c.pt")).cfg.variant == "attn_bias"
    assert "the weights are the attn_bias model" in capsys.readouterr().err


def test_cli_eval_published_and_user_mistakes(tutorial, tmp_path, capsys):
    torch.save(published("sink", Tb=64), tmp_path / "sink.pt")
    assert ab.main(["--eval", "--init-from", str(tmp_path / "sink.pt"), "--data", tutorial, "--device", "cpu",
                    "--eval-tokens", "2000"]) == 0
    out = capsys.readouterr().out
    assert "ppl" in out and "bits/tok" in out and out.splitlines()[1].startswith("val")
    loss, ppl, bits = map(float, out.splitlines()[1].split()[2:5])
    assert abs(ppl - math.exp(loss)) < 1e-2 * ppl and abs(bits - loss / math.log(2)) < 1e-3
    bad = dict(state=torch.zeros(1))
    torch.save(bad, tmp_path / "bad.pt")
    for args, msg in ((["--eval", "--init-from", str(tmp_path / "nope.pt")], "checkpoint not found"),
                      (["--eval", "--init-from", str(tmp_path / "bad.pt")], "not a checkpoint"),
                      (["--train", "--variant", "sinks"], "--variant must be one of"),
                      (["--train", "--attn-impl", "fast"], "--attn-impl must be one of")):
        assert ab.main(args + ["--data", tutorial, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err


def test_published_checkpoint_of_other_sizes_is_one_line_error(tmp_path, tutorial, capsys):
    ckpt = published("attn_bias")
    ckpt["model"]["transformer.h.0.attn.k_bias"] = torch.zeros(1, 4, 1, 8)  # 4 heads in a 2-head checkpoint
    torch.save(ckpt, tmp_path / "c.pt")
    assert ab.main(["--eval", "--init-from", str(tmp_path / "c.pt"), "--data", tutorial, "--device", "cpu"]) == 2
    assert "k_bias" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# analysis

def test_analyze_writes_json_and_plots(runs, tutorial, tmp_path):
    out = str(tmp_path / "ma")
    assert ab.main(["--analyze", "--runs", *runs.values(), "--data", tutorial, "--out", out, "--device", "cpu"]) == 0
    res = {r["variant"]: r for r in json.load(open(os.path.join(out, "analysis.json")))["results"]}
    for name in ("layerwise.png", "prompt_layer.png", "attention.png"):
        assert os.path.getsize(os.path.join(out, name)) > 10_000
    for v, r in res.items():
        lw = r["layerwise"]
        assert len(lw["top1"]) == 2 and all(a >= b >= c >= m for a, b, c, m in
                                            zip(lw["top1"], lw["top2"], lw["top3"], lw["median"]))
        assert all(0 < a < 1 for a in r["attention"]["key0"])
        n = len(ab.PROMPT.encode()) + (v == "sink")  # bytes tokenizer; the sink position is shown
        assert len(r["prompt"]["abs"]) == n and len(r["prompt"]["abs"][0]) == 64
        assert r["step_ms"] > 0
    assert res["sink"]["prompt"]["tokens"][0] == "<sink>" and res["default"]["x_default"] == 1.0
    # top-1 of the last block, recomputed: max |h| over the same windows (sink included), averaged
    model = ab.load_model(os.path.join(runs["sink"], "ckpt.pt"))
    data = core.TokenData(tutorial)
    top = 0.0
    for i in range(ab.N_WINDOWS):
        x, _ = data.batch("val", 1, model.cfg.block_size, model.cfg.seed, 0, i)
        with torch.no_grad():
            h = model.transformer.drop(model.embed(x, None))
            ctx = core.Ctx(x0=h)
            for block in model.transformer.h:
                h = block(h, ctx)
        top += h.abs().max().item() / ab.N_WINDOWS
    assert abs(res["sink"]["layerwise"]["top1"][-1] - top) < 1e-3 * top


# ----------------------------------------------------------------------------------------------------------------
# GPU: the private kernels, compiled FlexAttention, the compiled model

def gpu_case(T, H=12, D=64, B=2, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(B, T, 3 * H * D, device="cuda", generator=g)
    kb, vb = (torch.randn(1, H, 1, D, device="cuda", generator=g) for _ in range(2))
    return x, kb, vb


def gpu_grads(fn, x, kb, vb, dtype, H=12):
    x = x.to(dtype).requires_grad_()
    kb, vb = kb.clone().requires_grad_(), vb.clone().requires_grad_()
    q, k, v = (core.split_heads(t, H) for t in x.chunk(3, dim=-1))
    y = fn(q, k, v, kb, vb)
    y.float().square().sum().backward()
    return [y.float(), x.grad.float(), kb.grad, vb.grad]


def rel_errors(a, b):
    return [((u - w).norm() / w.norm()).item() for u, w in zip(a, b)]


@cuda
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("T", [37, 1024])
def test_gpu_private_kernels_match_eager(kernel, T):
    x, kb, vb = gpu_case(T)
    ref = gpu_grads(ab.masked_bias_attention, x, kb, vb, torch.float32)
    out = gpu_grads(lambda *a: ab.BiasKeyAttention.apply(*a, kernel), x, kb, vb, torch.bfloat16)
    assert max(rel_errors(out, ref)) < 2e-2, rel_errors(out, ref)


@cuda
def test_gpu_compiled_flex_matches_eager():
    """core.flex_attention compiles FlexAttention on CUDA; the merge's gradient flows through its lse."""
    from torch.nn.attention.flex_attention import create_block_mask
    x, kb, vb = gpu_case(1000)
    mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, 1000, 1000, device="cuda")
    ref = gpu_grads(ab.masked_bias_attention, x, kb, vb, torch.float32)
    out = gpu_grads(lambda *a: ab.flex_bias_attention(*a, mask), x, kb, vb, torch.bfloat16)
    assert max(rel_errors(out, ref)) < 2e-2, rel_errors(out, ref)


@cuda
def test_gpu_auto_picks_the_checked_cudnn_kernel():
    model = ab.build_model(ab.AttnBiasConfig(variant="attn_bias", n_layer=2, n_head=2, n_embd=128, vocab_size=256,
                                             device="cuda"))
    assert model.transformer.h[0].attn.impl(torch.device("cuda")) == "cudnn"
    assert ab.KERNEL_OK[("cudnn", 64)], "the cuDNN merge failed its parity probe: training falls back to flex"


@cuda
@pytest.mark.parametrize("impl", ["cudnn", "flex"])
def test_gpu_compiled_model_matches_eager(impl):
    """One bf16 training step of the compiled model vs the eager reference in fp32: loss and every gradient."""
    torch._dynamo.reset()
    cfg = dict(variant="attn_bias", n_layer=2, n_head=2, n_embd=128, block_size=256, vocab_size=256, device="cuda")
    torch.manual_seed(0)
    model = ab.build_model(ab.AttnBiasConfig(attn_impl=impl, **cfg)).cuda()
    ref_model = ab.build_model(ab.AttnBiasConfig(attn_impl="eager", **cfg)).cuda()
    ref_model.load_state_dict(model.state_dict())
    idx = torch.randint(0, 256, (4, 257), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        loss = torch.compile(model)(idx[:, :-1], idx[:, 1:])
    loss.backward()
    ref = ref_model(idx[:, :-1], idx[:, 1:])
    ref.backward()
    assert abs(loss.item() - ref.item()) < 2e-2
    for (n, p), r in zip(model.named_parameters(), ref_model.parameters()):
        assert ((p.grad - r.grad).norm() / r.grad.norm()).item() < 0.1, n  # bf16; a wrong formula gives ~1


@cuda
@pytest.mark.skipif(core.flash_attn_func is None, reason="flash-attn is not installed")
def test_gpu_flash_attn_package_bottom_right_causal_is_exact():
    x, kb, vb = gpu_case(1000)
    attn = ab.BiasAttention(ab.AttnBiasConfig(n_head=12, n_embd=768, attn_impl="flash", device="cuda"), 0).cuda()
    with torch.no_grad():
        attn.k_bias.copy_(kb)
        attn.v_bias.copy_(vb)
        q, k, v = (core.split_heads(t, 12) for t in x.chunk(3, dim=-1))
        ref = ab.masked_bias_attention(q, k, v, kb, vb)
        out = attn.attend_flash(q.bfloat16(), k.bfloat16(), v.bfloat16(), core.Ctx(x0=q))
    assert rel_errors([out.float()], [ref])[0] < 2e-2
