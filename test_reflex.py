"""reflex.py tests (CPU; GPU-only tests skip without CUDA). `python -m pytest -q test_reflex.py`"""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import core
import reflex
from test_all import cuda, run_cli, tutorial  # noqa: F401  (tutorial is a fixture)


def rcfg(**kw):
    return reflex.ReflexConfig(**{**reflex.ReflexConfig.PRESETS["tiny"], "vocab_size": 256, "device": "cpu", **kw})


def eager_and_fused(heads, **kw):
    """Two reflex models with the same weights: the per-group eager reference and the fused SDPA path."""
    torch.manual_seed(0)
    eager = reflex.build_model(rcfg(heads=heads, attn_impl="eager", **kw))
    fused = reflex.build_model(rcfg(heads=heads, attn_impl="sdpa", **kw))
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def grads(model, idx):
    model.zero_grad()
    logits = model(idx)
    F.cross_entropy(logits.flatten(0, 1), idx.roll(-1, 1).flatten()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def original_forward(model, idx, scheme):
    """The repository's forward written out on our weights: a `prevs` list of (k, v), one SDPA call per head group."""
    H, tr = model.cfg.n_head, model.transformer
    x = tr.wte(idx) + tr.wpe(torch.arange(idx.size(1)))
    prevs = []
    for i, block in enumerate(tr.h):
        q, k, v = (core.split_heads(t, H) for t in block.attn.c_attn(block.norm_1(x)).chunk(3, -1))

        def sdpa(h0, h1, kv):
            return F.scaled_dot_product_attention(q[:, h0:h1], kv[0][:, h0:h1], kv[1][:, h0:h1], is_causal=True)
        if scheme == "all" and prevs:  # the README's all-layer scheme (commented-out code with len(prevs) == 0)
            sa = H - len(prevs)
            ys = [sdpa(0, sa, (k, v))] + [sdpa(sa + j, sa + j + 1, kv) for j, kv in enumerate(prevs)]
        elif scheme != "all" and len(prevs) > 1:
            s, a, _ = scheme
            ys = [sdpa(0, s, (k, v)), sdpa(s, s + a, prevs[1]), sdpa(s + a, H, prevs[0])]
        else:
            ys = [sdpa(0, H, (k, v))]
        x = x + block.attn.c_proj(core.merge_heads(torch.cat(ys, dim=1)))
        x = x + block.mlp(block.norm_2(x))
        if scheme != "all" and i >= 2:
            prevs.pop(0)
        prevs.append((k, v))
    return model.lm_head(tr.norm_f(x))


@pytest.mark.parametrize("heads,scheme", [("5-2-1", (5, 2, 1)), ("4-2-2", (4, 2, 2)), ("all", "all")])
def test_matches_the_original_forward(heads, scheme):
    torch.manual_seed(0)
    model = reflex.build_model(rcfg(heads=heads, n_layer=6)).eval()
    idx = torch.randint(0, 256, (2, 40))
    assert torch.allclose(model(idx), original_forward(model, idx, scheme), atol=1e-5)


def test_s00_equals_baseline_exactly():
    torch.manual_seed(0)
    base = reflex.build_model(rcfg(variant="baseline"))
    rx = reflex.build_model(rcfg(heads="8-0-0"))
    assert list(base.state_dict()) == list(rx.state_dict())
    rx.load_state_dict(base.state_dict())
    idx = torch.randint(0, 256, (2, 48))
    (lb, gb), (lr, gr) = grads(base, idx), grads(rx, idx)
    assert torch.equal(lb, lr)
    assert all(torch.equal(gb[n], gr[n]) for n in gb)


@pytest.mark.parametrize("heads", ["5-2-1", "4-2-2", "all", "0-5-3"])
def test_fused_matches_per_group_reference(heads):
    """One fused SDPA call on gathered K/V == one eager call per head group: logits and every gradient, including
    the earlier layers' c_attn (their K/V projections receive gradient through later cross heads)."""
    eager, fused = eager_and_fused(heads)
    idx = torch.randint(0, 256, (2, 48))
    (le, ge), (lf, gf) = grads(eager, idx), grads(fused, idx)
    assert torch.allclose(lf, le, atol=1e-5)
    for n in ge:
        assert torch.allclose(gf[n], ge[n], atol=1e-6, rtol=1e-4), n


def test_cross_heads_backprop_into_earlier_layers_same_slots():
    """5-2-1 over 4 layers: a K/V head slot gets gradient iff some head reads it (not detached, same slots)."""
    torch.manual_seed(0)
    model = reflex.build_model(rcfg(heads="5-2-1"))
    _, g = grads(model, torch.randint(0, 256, (2, 32)))
    C, D = model.cfg.n_embd, model.cfg.head_dim

    def kv_grad(layer, h):  # |grad| of head h's rows in the K and V blocks of c_attn (rows: q, k, v)
        w = g[f"transformer.h.{layer}.attn.c_attn.weight"]
        return sum(w[blk * C + h * D: blk * C + (h + 1) * D].abs().sum().item() for blk in (1, 2))
    assert all(kv_grad(3, h) == 0 for h in (5, 6, 7))  # the last layer's cross slots: nobody reads them
    assert kv_grad(2, 7) == 0                          # would be read by a fifth layer
    assert all(kv_grad(2, h) > 0 for h in (5, 6))      # read only by layer 3's previous-layer heads
    assert all(kv_grad(1, h) > 0 for h in (5, 6, 7))   # read by layer 2 (slots 5, 6) and layer 3 (slot 7)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("heads", ["5-2-1", "all"])
def test_causal(heads, impl):
    torch.manual_seed(0)
    model = reflex.build_model(rcfg(heads=heads, attn_impl=impl)).eval()
    idx = torch.randint(0, 256, (2, 32))
    t = 20
    idx2 = idx.clone()
    idx2[:, t] = (idx[:, t] + 1) % 256
    a, b = model(idx), model(idx2)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6) and not torch.allclose(a[:, t], b[:, t])


def cli(capsys, *args):
    """reflex.main in this process (a subprocess per call costs seconds of imports): (exit code, stdout, stderr)."""
    try:
        rc = reflex.main([str(a) for a in args])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("args,msg", [
    (["--heads", "6-3--1"], "three non-negative integers"),
    (["--heads=-1-6-3"], "three non-negative integers"),
    (["--heads", "five-2-1"], "three non-negative integers"),
    (["--heads", "5-3"], "three non-negative integers"),
    (["--heads", "all", "--n-layer", "9"], "needs n_layer <= n_head"),
    (["--preset", "124m"], "sums to 8, but n_head is 12"),
])
def test_invalid_heads_one_line(args, msg, tutorial, capsys):
    rc, _, err = cli(capsys, "--train", "--device", "cpu", "--data", tutorial, *args)
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_cli_process_invalid_split_exits_nonzero(tutorial):
    rc, _, err = run_cli("reflex.py", "--train", "--device", "cpu", "--data", tutorial, "--heads", "4-2-1")
    assert rc == 2 and err.strip() == "error: --heads 4-2-1 sums to 7, but n_head is 8", err


@pytest.fixture(scope="module")
def runs(tutorial, tmp_path_factory):
    """CLI training runs of the baseline and three splits on the same batches (tiny, real text)."""
    root = tmp_path_factory.mktemp("reflex_runs")
    out = {}
    for name, flags in [("base", ["--variant", "baseline"]), ("521", ["--heads", "5-2-1"]),
                        ("422", ["--heads", "4-2-2"]), ("all", ["--heads", "all"])]:
        out[name] = root / name
        rc = reflex.main(["--train", "--preset", "tiny", "--device", "cpu", "--data", tutorial, "--max-iters", "60",
                          "--eval-interval", "30", "--out", str(out[name]), *flags])
        assert rc == 0, name
    return out


def test_cli_smoke_runs_learn(runs):
    for name, path in runs.items():
        log = core.read_log(str(path))
        cfg = json.load(open(path / "run.json"))["config"]
        assert cfg["variant"] == ("baseline" if name == "base" else "reflex")
        assert log[0]["loss"] > 4.5 and log[-1]["val_loss"] < 3.6, (name, log[-1])
    model = reflex.load_model(str(runs["all"] / "ckpt.pt"))
    assert model.cfg.heads == "all" and isinstance(model.transformer.h[1].attn, reflex.ReflexAttention)


def test_cli_charts(runs, tutorial, capsys):
    rc, stdout, err = cli(capsys, "--charts", "--out", runs["base"], "--data", tutorial,
                          "--runs", runs["521"], runs["422"], runs["all"])
    assert rc == 0, err
    for png in ("loss.png", "speed.png"):
        assert os.path.getsize(runs["base"] / png) > 5000
    assert "tok/s" in stdout and "MFU n/a" in stdout


def test_cli_compare(tutorial, tmp_path, capsys):
    rc, stdout, err = cli(capsys, "--compare", "--preset", "tiny", "--device", "cpu", "--data", tutorial,
                          "--n-layer", "3", "--n-embd", "32", "--batch-size", "2", "--block-size", "32",
                          "--bench-splits", "5-2-1,all", "--out", tmp_path)
    assert rc == 0, err
    res = json.load(open(tmp_path / "compare.json"))["results"]
    assert [r["heads"] for r in res] == ["baseline", "5-2-1", "all"] and all(r["tok_s"] > 0 for r in res)
    assert "x baseline" in stdout


@cuda
@pytest.mark.parametrize("heads", ["5-2-1", "4-2-2", "all"])
def test_gpu_fused_matches_reference_bf16(heads):
    """On the GPU the fused call runs flash/cuDNN SDPA in bf16; compare with the per-group fp32 eager reference."""
    eager, fused = (m.cuda() for m in eager_and_fused(heads, n_embd=512, n_layer=6, block_size=256))
    idx = torch.randint(0, 256, (4, 256), device="cuda")
    le, ge = grads(eager, idx)
    with torch.autocast("cuda", torch.bfloat16):
        lf, gf = grads(fused, idx)
    assert (lf.float() - le).abs().max() < 0.05 * le.abs().max()
    for n in ge:
        err = (gf[n].float() - ge[n]).norm() / ge[n].norm().clamp_min(1e-12)
        assert err < 0.05, (n, err.item())
