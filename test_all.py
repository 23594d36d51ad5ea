"""attnlab tests. CPU suite: `python -m pytest -q test_all.py` (minutes). GPU-only tests skip without CUDA."""
import json
import lzma
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import core

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data")
TIKTOKEN = os.path.join(SHARED, "gpt2.tiktoken")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_cli(script, *args, env=None):
    """Run a script as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], capture_output=True,
                       text=True, cwd=HERE, env={**os.environ, **(env or {})}, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def flex_cpu_grad(monkeypatch):
    """FlexAttention has no CPU backward; its dense reference math does, once the device check is bypassed."""
    import torch.nn.attention.flex_attention as fa
    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)


def write_bytes_dataset(path, text, val_frac=0.1):
    os.makedirs(path, exist_ok=True)
    b = text.encode()
    n = int(len(b) * (1 - val_frac))
    np.frombuffer(b[:n], np.uint8).tofile(os.path.join(path, "train.bin"))
    np.frombuffer(b[n:], np.uint8).tofile(os.path.join(path, "val.bin"))
    meta = dict(tokenizer="bytes", vocab_size=256, dtype="uint8", eot_token=None,
                splits=dict(train=dict(tokens=n, bytes=n), val=dict(tokens=len(b) - n, bytes=len(b) - n)))
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    return path


@pytest.fixture(scope="session")
def tutorial(tmp_path_factory):
    """Real text, bytes: the embedded default dataset's source."""
    text = open(os.path.join(HERE, "assets", "python_tutorial.txt")).read()
    return write_bytes_dataset(str(tmp_path_factory.mktemp("tutorial")), text)


def tiny(family="gpt2", **kw):
    kw = {**core.Config.PRESETS["tiny"], "vocab_size": 256, "device": "cpu", "family": family, **kw}
    return core.Config(**kw)


# ----------------------------------------------------------------------------------------------------------------
# core: model

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_forward_backward_shapes(family):
    cfg = tiny(family)
    model = core.GPT(cfg)
    idx = torch.randint(0, 256, (3, 17))
    assert model(idx).shape == (3, 17, 256)
    loss = model(idx, torch.randint(0, 256, (3, 17)))
    loss.backward()
    assert abs(loss.item() - math.log(256)) < 0.5  # near-uniform at init
    assert all(p.grad is not None for p in model.parameters())
    if family == "gpt2":
        assert model.lm_head.weight is model.transformer.wte.weight
    else:
        assert model.lm_head.weight is not model.transformer.wte.weight and "wpe" not in model.transformer


def test_gpt2_small_parameter_count():
    cfg = core.Config(vocab_size=50304)
    with torch.device("meta"):
        model = core.GPT(cfg)
    assert model.num_params(compute_only=False) == 124_373_760  # nanoGPT GPT-2 small, bias=False
    assert model.num_params() == 124_373_760 - 1024 * 768      # wpe is a lookup, not compute
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 12 * 768 * 1024


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_causality(family, impl):
    torch.manual_seed(0)
    model = core.GPT(tiny(family, attn_impl=impl)).eval()
    idx = torch.randint(0, 256, (2, 32))
    t = 20
    idx2 = idx.clone()
    idx2[:, t] = (idx[:, t] + 1) % 256
    a, b = model(idx), model(idx2)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t], b[:, t])


def attn_grads(model, idx, doc=None):
    model.zero_grad()
    logits = model(idx, doc=doc)
    logits.square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_fast_paths_match_eager(family, flex_cpu_grad):
    """SDPA and FlexAttention (with and without document masks) equal the eager reference, outputs and grads."""
    torch.manual_seed(0)
    cfg = tiny(family)
    model = core.GPT(cfg)
    idx = torch.randint(0, 256, (2, 48))
    doc = torch.cumsum((torch.rand(2, 48) < 0.1).long(), dim=1)
    for d in (None, doc):
        ref = None
        for impl in ("eager", "sdpa", "flex"):
            for m in model.modules():
                if isinstance(m, core.Attention):
                    m.cfg = tiny(family, attn_impl=impl)
            out = attn_grads(model, idx, d)
            if ref is None:
                ref = out
                continue
            assert torch.allclose(out[0], ref[0], atol=1e-5), (impl, d is not None)
            for n, g in out[1].items():
                assert torch.allclose(g, ref[1][n], atol=1e-5, rtol=1e-4), (impl, n)


def test_document_mask_blocks_other_documents():
    torch.manual_seed(0)
    model = core.GPT(tiny("llama", attn_impl="eager")).eval()
    idx = torch.randint(0, 256, (1, 32))
    doc = torch.tensor([[0] * 16 + [1] * 16])
    idx2 = idx.clone()
    idx2[0, :16] = (idx[0, :16] + 7) % 256  # change the whole first document
    a, b = model(idx, doc=doc), model(idx2, doc=doc)
    assert torch.allclose(a[0, 16:], b[0, 16:], atol=1e-6)  # the second document never saw it


def test_flash_fallback_when_not_installed(monkeypatch, capsys):
    monkeypatch.setattr(core, "flash_attn_func", None)
    torch.manual_seed(0)
    model = core.GPT(tiny(attn_impl="flash")).eval()
    idx = torch.randint(0, 256, (2, 16))
    out = model(idx)
    assert "flash-attn is not installed" in capsys.readouterr().err
    for m in model.modules():
        if isinstance(m, core.Attention):
            m.cfg = tiny(attn_impl="eager")
    assert torch.allclose(out, model(idx), atol=1e-5)


def test_record_reports_probabilities():
    model = core.GPT(tiny()).eval()
    seen = []
    model(torch.randint(0, 256, (2, 10)), record=lambda layer, p: seen.append((layer, p.shape, p.sum(-1))))
    assert [s[0] for s in seen] == [0, 1]
    assert seen[0][1] == (2, 4, 10, 10) and torch.allclose(seen[0][2], torch.ones(2, 4, 10))


def test_rope_matches_complex_rotation():
    T, D = 7, 8
    x = torch.randn(1, 1, T, D)
    cos, sin = core.rope_tables(T, D, 10000.0, "cpu")
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * torch.polar(torch.ones(T, D // 2), torch.atan2(sin, cos))
    assert torch.allclose(core.apply_rope(x, cos, sin), torch.cat((z.real, z.imag), -1), atol=1e-6)


def test_lr_schedule():
    cfg = tiny(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert core.lr_mult(0, cfg) == pytest.approx(1 / 11)
    assert core.lr_mult(10, cfg) == pytest.approx(1.0)
    assert core.lr_mult(60, cfg) == pytest.approx(0.55)
    assert core.lr_mult(110, cfg) == pytest.approx(0.1)
    wsd = tiny(lr=1.0, min_lr=0.0, warmup_iters=0, max_iters=100, schedule="wsd", cooldown_frac=0.2)
    assert core.lr_mult(79, wsd) == 1.0 and core.lr_mult(90, wsd) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------
# core: data and tokenizer

def test_loader_reads_plain_and_llmc_shards(tmp_path):
    toks = np.arange(5000, dtype=np.uint16)
    header = np.zeros(256, np.int32)
    header[:3] = (core.SHARD_MAGIC, 1, len(toks))
    for split in ("train", "val"):
        for i in range(2):
            with open(tmp_path / f"fineweb_{split}_{i:06d}.bin", "wb") as f:
                f.write(header.tobytes())
                f.write((toks + i * 5000).tobytes())
    data = core.TokenData(str(tmp_path))
    assert data.tokens("train") == 10000 and len(data.splits["val"]) == 2
    x, y = data.batch("train", 8, 32, 0, 3)
    assert x.shape == (8, 32) and torch.equal(x[:, 1:], y[:, :-1]) and torch.all(y - x == 1)
    assert torch.equal(x, data.batch("train", 8, 32, 0, 3)[0])      # deterministic in (seed, step)
    assert not torch.equal(x, data.batch("train", 8, 32, 0, 4)[0])
    plain = tmp_path / "plain"
    plain.mkdir()
    for split in ("train", "val"):
        np.arange(300, dtype=np.uint8).astype(np.uint8).tofile(plain / f"{split}.bin")
    json.dump(dict(dtype="uint8", vocab_size=256), open(plain / "meta.json", "w"))
    x, _ = core.TokenData(str(plain)).batch("val", 4, 16, 1, 0)
    assert x.dtype == torch.int64 and int(x.max()) < 256
    with open(tmp_path / "fineweb_val_000001.bin", "r+b") as f:  # truncated shard
        f.truncate(1024 + 100)
    with pytest.raises(core.ConfigError, match="truncated"):
        core.TokenData(str(tmp_path))


def test_gpt2_tokenizer_offline(monkeypatch):
    if not os.path.exists(TIKTOKEN):
        pytest.skip("no ../shared/data/gpt2.tiktoken")
    monkeypatch.setenv("ATTNLAB_TIKTOKEN", TIKTOKEN)
    tok = core.get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995] and tok.eot_token == 50256
    assert tok.decode(tok.encode("attention is all")) == "attention is all"
    monkeypatch.setenv("ATTNLAB_TIKTOKEN", "/nonexistent/gpt2.tiktoken")
    with pytest.raises(core.ConfigError, match="not found"):
        core.get_tokenizer("gpt2")


# ----------------------------------------------------------------------------------------------------------------
# core: training

def train_tiny(data, out, **kw):
    cfg = tiny(data=data, out=str(out), **{"max_iters": 40, "eval_interval": 20, "log_interval": 5, **kw})
    model = core.train(cfg, core.GPT)
    return cfg, model, core.read_log(str(out))


def test_loss_falls_and_checkpoint_round_trip(tutorial, tmp_path):
    cfg, model, log = train_tiny(tutorial, tmp_path, max_iters=100, eval_interval=50)
    assert log[0]["loss"] > 4.5 and log[-1]["loss"] < 3.3 and log[-1]["val_loss"] < 3.5
    loaded = core.load_ours(str(tmp_path / "ckpt.pt"), core.Config, core.GPT)
    idx = torch.randint(0, 256, (2, 32))
    assert torch.equal(loaded(idx), model.eval()(idx))
    ckpt = core.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 100 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    r = core.evaluate(loaded, core.TokenData(tutorial), cfg, torch.device("cpu"))
    assert r["bpb"] == pytest.approx(r["loss"] / math.log(2)) and r["tokens"] > 10000


def test_resume_after_kill_is_exact(tutorial, tmp_path, monkeypatch):
    _, _, full = train_tiny(tutorial, tmp_path / "full", dropout=0.1)
    real = core.lr_mult

    def killed(it, cfg):  # dies mid-run, after the step-20 checkpoint
        if it == 27:
            raise KeyboardInterrupt
        return real(it, cfg)
    monkeypatch.setattr(core, "lr_mult", killed)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tutorial, tmp_path / "cut", dropout=0.1)
    monkeypatch.setattr(core, "lr_mult", real)
    assert core.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))["step"] == 20
    _, _, resumed = train_tiny(tutorial, tmp_path / "cut", dropout=0.1, resume=True)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        assert a["loss"] == b["loss"] and a.get("val_loss") == b.get("val_loss")


def test_nan_guard_keeps_last_good_checkpoint(tutorial, tmp_path):
    class Exploding(core.GPT):
        def loss_fn(self, logits, targets):
            loss = super().loss_fn(logits, targets)
            return loss * float("nan") if self.training and self.exploded else loss
    model = Exploding(tiny(data=tutorial))
    model.exploded = False
    cfg = tiny(data=tutorial, out=str(tmp_path), max_iters=40, eval_interval=10, log_interval=5)
    real = core.lr_mult
    core.lr_mult = lambda it, c: (setattr(model, "exploded", it >= 23), real(it, c))[1]
    try:
        with pytest.raises(core.ConfigError, match="diverged.*last good checkpoint"):
            core.train(cfg, core.GPT, model)
    finally:
        core.lr_mult = real
    ckpt = core.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 20 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_ddp_two_processes_match_one(tutorial, tmp_path):
    args = ["--preset", "tiny", "--device", "cpu", "--data", tutorial, "--max-iters", "8", "--log-interval", "2",
            "--eval-interval", "8", "--batch-size", "4"]
    rc, _, err = run_cli("core.py", "--train", *args, "--grad-accum", "2", "--out", tmp_path / "one")
    assert rc == 0, err
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "core.py"), "--train", *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, cwd=HERE, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-2000:]
    one, two = core.read_log(str(tmp_path / "one")), core.read_log(str(tmp_path / "two"))
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["tokens"] == b["tokens"]
    assert one[-1]["val_loss"] == pytest.approx(two[-1]["val_loss"], rel=1e-4)


# ----------------------------------------------------------------------------------------------------------------
# core: command line

def test_cli_help_lists_every_field():
    rc, out, _ = run_cli("core.py", "--help")
    assert rc == 0
    for f in core.field_names(core.Config):
        assert "--" + f.replace("_", "-") in out


@pytest.mark.parametrize("args,msg", [
    (["--train", "--n-embd", "100", "--n-head", "12"], "must be divisible"),
    (["--train", "--family", "bert"], "--family must be"),
    (["--train", "--data", "/nonexistent"], "dataset directory not found"),
    (["--eval", "--init-from", "/nonexistent.pt"], "checkpoint not found"),
    (["--train", "--max-iters", "ten"], "invalid int value"),
    ([], "nothing to do"),
])
def test_cli_user_mistakes_give_one_line(args, msg):
    rc, out, err = run_cli("core.py", *args, "--device", "cpu")
    assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, err


def test_cli_train_eval_sample_plot(tutorial, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = run_cli("core.py", "--train", "--preset", "tiny", "--device", "cpu", "--data", tutorial,
                              "--out", out, "--max-iters", "20", "--eval-interval", "10")
    assert rc == 0, err
    assert "tok/s" in stdout and "ETA" in stdout and "MFU n/a" in stdout
    rc, stdout, err = run_cli("core.py", "--eval", "--init-from", out / "ckpt.pt", "--data", tutorial)
    assert rc == 0 and "val" in stdout and "bpb" in stdout, err
    rc, stdout, err = run_cli("core.py", "--sample", "--out", out, "--data", tutorial, "--max-new-tokens", "20")
    assert rc == 0 and stdout.strip(), err
    rc, stdout, err = run_cli("core.py", "--plot", "--out", out, "--data", tutorial)
    assert rc == 0 and os.path.getsize(out / "loss.png") > 1000, err


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fast_paths_match_eager(dtype):
    """On the GPU: SDPA (flash/cuDNN), compiled FlexAttention (doc mask too) vs eager, outputs and input grads."""
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 300, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    doc = torch.cumsum((torch.rand(B, T, device="cuda") < 0.02).long(), 1)
    for d in (None, doc):
        ref_attn = core.Attention(tiny(attn_impl="eager", n_embd=256), 0)
        ctx = core.Ctx(x0=q, doc=d)
        ref = ref_attn.attend(q.double(), k.double(), v.double(), ctx)
        gref = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for impl in ("sdpa", "flex"):
            attn = core.Attention(tiny(attn_impl=impl, n_embd=256), 0)
            out = attn.attend(q, k, v, core.Ctx(x0=q, doc=d))
            g = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
            assert (out.double() - ref).norm() / ref.norm() < tol, impl
            for a, b in zip(g, gref):
                assert (a.double() - b).norm() / b.norm() < tol, impl
