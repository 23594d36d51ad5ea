"""attnlab tests, one file. CPU suite: `python -m pytest -q test_all.py` (minutes); GPU-only tests skip without CUDA.

Sections: core, prepare, attn_bias, cogformer, exoformer, sparse_byte, reflex, bench. Every test name starts with its
subject, so `pytest -k reflex` runs reflex's tests; GPU tests are marked @gpu (they skip without CUDA) and named
test_<subject>_gpu_*, so `pytest -k gpu` runs them all. Helpers shared by several sections come first (one tiny config
builder, `tiny`; one dataset writer, `write_dataset`); a helper of one paper carries its prefix (ab_, cog_, ...)."""
import collections
import copy
import csv
import dataclasses
import errno
import hashlib
import http.server
import importlib.util
import io
import itertools
import json
import lzma
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
import types
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, create_mask

ROOT = Path(__file__).resolve().parent
for _p in (ROOT.parent / "shared" / "data" / "gpt2.tiktoken", ROOT / ".cache" / "shared" / "gpt2.tiktoken"):
    if "ATTNLAB_TIKTOKEN" not in os.environ and _p.exists():  # the offline GPT-2 BPE, if the user has not set one
        os.environ["ATTNLAB_TIKTOKEN"] = str(_p)

import attn_bias as ab  # noqa: E402
import bench  # noqa: E402
import cogformer as cg  # noqa: E402
import core  # noqa: E402
import exoformer as exo  # noqa: E402
import prepare  # noqa: E402
import reflex  # noqa: E402
import sparse_byte as sb  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "shared", "data")
TIKTOKEN = os.path.join(SHARED, "gpt2.tiktoken")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")  # and test_<subject>_gpu_*


def run_cli(script, *args, env=None):
    """Run a script as a user would; returns (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, os.path.join(HERE, script), *map(str, args)], capture_output=True,
                       text=True, cwd=HERE, env={**os.environ, **(env or {})}, timeout=600)
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(err, message):
    """A user mistake: one stderr line that names it."""
    err = err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.fixture
def flex_cpu_grad(monkeypatch):
    """FlexAttention has no CPU backward; its dense reference math does, once the device check is bypassed."""
    import torch.nn.attention.flex_attention as fa
    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure a script saves, as (file name, figure, savefig's keywords), for the test to read afterwards."""
    figure, figures = core.pyplot().Figure, []
    save = figure.savefig

    def savefig(fig, path, *args, **kw):
        figures.append((os.path.basename(path), fig, kw))
        return save(fig, path, *args, **kw)
    monkeypatch.setattr(figure, "savefig", savefig)
    return figures


def figure_text(fig, legends=False):
    """A figure's title, its panels' titles (and legends), whitespace removed: a wrapped title breaks where it must."""
    texts = [fig.get_suptitle(), *(a.get_title() for a in fig.axes)]
    texts += [t.get_text() for a in fig.axes if legends and a.get_legend() for t in a.get_legend().get_texts()]
    return "".join(" ".join(texts).split())


def renderer(fig):
    """A saved figure's renderer (closing it left a canvas without one)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    return FigureCanvasAgg(fig).get_renderer()


def inside(fig, texts):
    """Whether each matplotlib Text of `texts` lies within the figure's width."""
    r = renderer(fig)
    return all(0 <= t.get_window_extent(r).x0 and t.get_window_extent(r).x1 <= fig.bbox.width for t in texts)


def tiny(cls=core.Config, **kw):
    """The one tiny config of the tests: a script's `tiny` preset on the CPU with a byte vocabulary."""
    return cls(**{**cls.PRESETS["tiny"], "vocab_size": 256, "device": "cpu", **kw})


def tutorial_bytes():
    """Real text: the embedded dataset's Python tutorial, whole (its train.bin and val.bin are its UTF-8 bytes)."""
    return b"".join(open(os.path.join(core.DEFAULT_DATA, f"{s}.bin"), "rb").read() for s in ("train", "val"))


def write_dataset(path, splits, tokenizer="bytes", vocab_size=256, eot_token=None):
    """The one dataset writer of the tests, in prepare.py's format: {split: bytes (UTF-8 text) or token ids} ->
    <split>.bin and meta.json (bytes per split for bits per byte when the splits are text)."""
    os.makedirs(path, exist_ok=True)
    dtype = "uint8" if vocab_size <= 256 else "uint16"
    for split, data in splits.items():
        ids = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
        ids.astype(dtype).tofile(os.path.join(path, f"{split}.bin"))
    meta = dict(tokenizer=tokenizer, vocab_size=vocab_size, dtype=dtype, eot_token=eot_token,
                splits={k: dict(tokens=len(v), bytes=len(v) if isinstance(v, bytes) else None)
                        for k, v in splits.items()})
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    return str(path)


def text_splits(b, val, test=0):
    """The last `val` (+ `test`) bytes of b held out: {train, val[, test]}; fractions of len(b) when below 1."""
    val, test = (int(n * len(b)) if n < 1 else n for n in (val, test))
    cut = len(b) - val - test
    return {"train": b[:cut], "val": b[cut:cut + val], **({"test": b[-test:]} if test else {})}


@pytest.fixture(scope="session")
def tutorial(tmp_path_factory):
    """Real text, bytes: the embedded default dataset's source (90/10 split). Used by core, attn_bias, cogformer
    and reflex."""
    return write_dataset(tmp_path_factory.mktemp("tutorial"), text_splits(tutorial_bytes(), 0.1))


def tutorial_as(path, tokenizer):
    """The tutorial's bytes labelled as ids of another tokenizer (the tests' published models have 256 ids): data of
    a published model's tokenizer, which load_model and --init-from refuse any other data for."""
    return write_dataset(path, text_splits(tutorial_bytes(), 0.1), tokenizer)


def cli_runs(main, root, runs, *flags):
    """{name: out dir}: `main --train --preset tiny --device cpu *flags *runs[name] --out root/name`, each exiting 0
    (same seed, so every run sees the same batches)."""
    out = {}
    for name, run_flags in runs.items():
        out[name] = str(root / name)
        argv = ["--train", "--preset", "tiny", "--device", "cpu", *flags, *run_flags, "--out", out[name]]
        assert main(argv) == 0, name
    return out


# ================================================================================================================
# core
# ================================================================================================================



# ----------------------------------------------------------------------------------------------------------------
# core: model

@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_core_forward_backward_shapes(family):
    cfg = tiny(family=family)
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
    with pytest.raises(ValueError, match=r"^65 tokens are more than the model's block_size \(64\)$"):
        model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))  # a raw size mismatch or IndexError before


def test_core_gpt2_small_parameter_count():
    cfg = core.Config(vocab_size=50304)
    with torch.device("meta"):
        model = core.GPT(cfg)
    assert model.num_params(compute_only=False) == 124_373_760  # nanoGPT GPT-2 small, bias=False
    assert model.num_params() == 124_373_760 - 1024 * 768      # wpe is a lookup, not compute
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 12 * 768 * 1024


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_core_causality(family, impl):
    torch.manual_seed(0)
    model = core.GPT(tiny(family=family, attn_impl=impl)).eval()
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
def test_core_fast_paths_match_eager(family, flex_cpu_grad):
    """SDPA and FlexAttention (with and without document masks) equal the eager reference, outputs and grads."""
    torch.manual_seed(0)
    cfg = tiny(family=family)
    model = core.GPT(cfg)
    idx = torch.randint(0, 256, (2, 48))
    doc = torch.cumsum((torch.rand(2, 48) < 0.1).long(), dim=1)
    for d in (None, doc):
        ref = None
        for impl in ("eager", "sdpa", "flex"):
            for m in model.modules():
                if isinstance(m, core.Attention):
                    m.cfg = tiny(family=family, attn_impl=impl)
            out = attn_grads(model, idx, d)
            if ref is None:
                ref = out
                continue
            assert torch.allclose(out[0], ref[0], atol=1e-5), (impl, d is not None)
            for n, g in out[1].items():
                assert torch.allclose(g, ref[1][n], atol=1e-5, rtol=1e-4), (impl, n)


@pytest.fixture
def rms_norm_dtypes(monkeypatch):
    """The (input, weight) dtypes of every F.rms_norm call from here on."""
    pairs, rms_norm = [], F.rms_norm
    monkeypatch.setattr(F, "rms_norm", lambda x, shape, w, eps: pairs.append((x.dtype, w.dtype)) or
                        rms_norm(x, shape, w, eps))
    return pairs


def test_core_rms_norm_is_the_mixed_dtype_fallback_on_the_fused_kernel(rms_norm_dtypes):
    """A bf16 input and the fp32 weight, a pair the fused RMSNorm refuses (it falls back to unfused ops): core.RMSNorm
    gives the fallback's own result bit for bit, output and input gradient, with the fused kernel's dtypes."""
    torch.manual_seed(0)
    norm = core.RMSNorm(8, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(2, 5, 3, 8).bfloat16().requires_grad_()
    y = norm(x)
    (gx,) = torch.autograd.grad(y.float().square().sum(), x)
    assert rms_norm_dtypes == [(torch.float32, torch.float32)]
    with warnings.catch_warnings():  # the fallback's warning (once per process)
        warnings.simplefilter("ignore")
        ref = torch.nn.RMSNorm.forward(norm, x)  # the mixed-dtype fallback
    (g_ref,) = torch.autograd.grad(ref.float().square().sum(), x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref) and torch.equal(gx, g_ref)
    x32 = x.detach().float()  # fp32: the plain RMSNorm
    assert torch.equal(norm(x32), torch.nn.RMSNorm.forward(norm, x32))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_core_bf16_residual_stream_rounds_only_under_autocast(family, rms_norm_dtypes):
    """--residual-dtype bfloat16: under bf16 autocast every block reads and returns a bf16 stream and the model stays
    within bf16 rounding of the fp32 stream (logits and gradients); in fp32 the flag changes nothing, bit for bit.
    Llama's RMSNorms take the bf16 stream in fp32 (the fused kernel, not its mixed-dtype fallback)."""
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (2, 49))
    models = {r: core.GPT(tiny(family=family, residual_dtype=r)) for r in ("float32", "bfloat16")}
    models["bfloat16"].load_state_dict(models["float32"].state_dict())
    seen = {}

    def run(r, amp):
        model = models[r]
        model.zero_grad(set_to_none=True)
        hook = model.transformer.h[-1].register_forward_hook(lambda m, i, o: seen.update({r: (i[0].dtype, o.dtype)}))
        with torch.autocast("cpu", torch.bfloat16, enabled=amp):
            loss = model(idx[:, :-1], idx[:, 1:])
        hook.remove()
        loss.backward()
        return loss.detach().float(), [p.grad.clone() for p in model.parameters()]

    loss32, grads32 = run("float32", False)
    loss, grads = run("bfloat16", False)
    assert seen["bfloat16"] == (torch.float32, torch.float32) and torch.equal(loss, loss32)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads32))
    loss_amp, grads_amp = run("float32", True)
    loss, grads = run("bfloat16", True)
    assert seen == {"float32": (torch.float32, torch.float32), "bfloat16": (torch.bfloat16, torch.bfloat16)}
    assert abs(loss - loss_amp) < 2e-2 * loss_amp
    for g, h in zip(grads, grads_amp):
        assert (g - h).norm() <= 0.1 * h.norm() + 1e-6
    assert all(x == w for x, w in rms_norm_dtypes) and bool(rms_norm_dtypes) == (family == "llama")  # no fallback


def test_core_bench_times_the_bf16_residual_beside_the_core():
    s = bench.script("core")
    assert bench.pick_variants(s, "all") == ["", "bf16 residual"] and bench.pick_variants(s, "main") == [""]
    assert bench.row_flags(s, "bf16 residual") == ["--residual-dtype", "bfloat16"]
    assert bench.make_cfg(s, "bf16 residual", "tiny").residual_dtype == "bfloat16"


def test_core_document_mask_blocks_other_documents():
    torch.manual_seed(0)
    model = core.GPT(tiny(family="llama", attn_impl="eager")).eval()
    idx = torch.randint(0, 256, (1, 32))
    doc = torch.tensor([[0] * 16 + [1] * 16])
    idx2 = idx.clone()
    idx2[0, :16] = (idx[0, :16] + 7) % 256  # change the whole first document
    a, b = model(idx, doc=doc), model(idx2, doc=doc)
    assert torch.allclose(a[0, 16:], b[0, 16:], atol=1e-6)  # the second document never saw it

def test_core_causal_mask_and_mask_mod_follow_the_rule_and_a_block_mask_has_a_row_per_document_batch_row():
    """causal_mask against the rule written out: query i sees key j iff j <= i + S - T (bottom-right aligned), and with
    document ids only keys of its own document; FlexAttention's mask_mod is the same rule. The shared BlockMask has one
    row for every batch row when there are documents, one for all rows otherwise."""
    assert core.causal_mask(2, 4).tolist() == [[[[True, True, True, False], [True, True, True, True]]]]
    doc = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 2]])
    want = [[[j <= i and d[i] == d[j] for j in range(4)] for i in range(4)] for d in doc.tolist()]
    assert core.causal_mask(4, 4, doc)[:, 0].tolist() == want
    mods = core.doc_causal_mask_mod(core.Ctx(doc=doc)), core.doc_causal_mask_mod(core.Ctx())
    pos = lambda n: torch.tensor(n)
    assert [[[bool(mods[0](pos(b), 0, pos(i), pos(j))) for j in range(4)] for i in range(4)] for b in range(2)] == want
    assert [[bool(mods[1](pos(0), 0, pos(i), pos(j))) for j in range(4)] for i in range(4)] == \
        core.causal_mask(4, 4)[0, 0].tolist()
    ctx = core.Ctx(doc=torch.zeros(3, 256, dtype=torch.long))
    assert core.flex_block_mask(ctx, core.doc_causal_mask_mod(ctx), 256, 256, "cpu").shape[0] == 3
    ctx = core.Ctx()
    assert core.flex_block_mask(ctx, core.doc_causal_mask_mod(ctx), 256, 256, "cpu").shape[0] == 1


def test_core_document_block_mask_built_once_per_forward(monkeypatch):
    """Every layer reads one FlexAttention document mask; only the first request builds it (outside the graph)."""
    calls, build = [], core.build_block_mask
    monkeypatch.setattr(core, "build_block_mask", lambda *a: calls.append(a) or build(*a))
    model = core.GPT(tiny(family="llama", attn_impl="sdpa")).eval()
    idx, doc = torch.randint(0, 256, (2, 32)), torch.tensor([[0] * 16 + [1] * 16] * 2)
    with torch.no_grad():
        model(idx, doc=doc)
    assert len(calls) == 1 and model.cfg.n_layer > 1


def test_core_one_document_per_row_runs_the_plain_kernel(monkeypatch):
    """Document ids with one document in every row: no mask is built and SDPA runs (same logits); several documents:
    the FlexAttention document mask. The model counts the batches of each kind."""
    calls, build = [], core.build_block_mask
    monkeypatch.setattr(core, "build_block_mask", lambda *a: calls.append(a) or build(*a))
    torch.manual_seed(0)
    model = core.GPT(tiny(family="llama", attn_impl="sdpa")).eval()
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        one, plain = model(idx, doc=torch.full((2, 32), 3)), model(idx)
        several = model(idx, doc=torch.tensor([[0] * 16 + [1] * 16] * 2))
    assert torch.equal(one, plain) and not torch.allclose(several, plain, atol=1e-3) and len(calls) == 1
    assert model.paths == {"one document": 1, "documents": 1}
    exo_model = exo.ExoGPT(exo_tiny("baseline"))
    with torch.no_grad():
        exo_model(tokens(sep_at=(0,)))  # a separator at position 0 only: one document
        exo_model(tokens(sep_at=(0, 7)))
    assert exo_model.paths == {"one document": 1, "documents": 1}


def test_core_document_ids_are_checked_on_the_host_and_moved_to_the_device():
    """The train loop's batches come with document ids made on the host (host_batch), where the one-document check
    costs the GPU no sync; ids already on a device take the document path unchecked. ("meta" stands in for a GPU.)"""
    meta, paths = torch.device("meta"), collections.Counter()
    one, several = torch.full((2, 8), 3), torch.tensor([[0] * 4 + [1] * 4] * 2)
    assert core.documents(one, meta, paths) is None
    moved = core.documents(several, meta, paths)
    assert moved.device == meta and moved.shape == (2, 8)
    assert core.documents(one.to(meta), meta, paths).device == meta  # not checked there
    assert paths == {"one document": 1, "documents": 2}
    exo_model = exo.ExoGPT(exo_tiny("baseline"))
    idx = tokens(sep_at=(5,))
    x, y, doc = core.host_batch(exo_model, idx, idx, meta)
    assert x.device == y.device == meta and doc.device.type == "cpu"
    assert doc.tolist() == [[0] * 5 + [1] * (idx.size(1) - 5)] * idx.size(0)
    assert core.host_batch(core.GPT(tiny()), idx, idx, meta)[2] is None  # the core reads no documents from tokens

def test_core_host_batch_keeps_inputs_and_targets_apart_and_reads_documents_from_the_inputs():
    """host_batch returns x and y as given (not swapped) and the document ids of x, not of the shifted targets."""
    x, y = tokens(sep_at=(5,)), tokens(seed=1, sep_at=(2,))
    x2, y2, doc = core.host_batch(exo.ExoGPT(exo_tiny("baseline")), x, y, torch.device("cpu"))
    assert torch.equal(x2, x) and torch.equal(y2, y)
    assert doc.tolist() == [[0] * 5 + [1] * (x.size(1) - 5)] * x.size(0)


def test_core_doc_path_names_what_masks_documents_once_each_in_order():
    """SDPA and flash-attn hand documents to FlexAttention, eager applies its mask, a paper's kernel its own: each
    name once, sorted (the same text whatever the layers' order)."""
    assert core.doc_path(["triton", "sdpa", "flash", "eager", "sparse", "block", "sdpa"]) == \
        "block+eager mask+flex+sparse+triton"
    assert core.doc_path(["sdpa"]) == "flex" and core.doc_path([]) == ""


@gpu
def test_core_gpu_context_builds_the_document_mask_before_the_layers():
    model = core.GPT(tiny(family="llama", block_size=256)).cuda()
    idx, doc = torch.randint(0, 256, (2, 256), device="cuda"), torch.zeros(2, 256, dtype=torch.long, device="cuda")
    assert "causal" in model.context(idx, doc).cache and "causal" not in model.context(idx).cache


@gpu
def test_core_gpu_host_batch_does_not_wait_for_queued_kernels():
    """The batch goes through pinned memory: its copy is queued behind the GPU's work instead of waiting for it."""
    model, xy = core.GPT(tiny()).cuda(), torch.randint(0, 256, (16, 1025))
    core.host_batch(model, xy[:, :-1], xy[:, 1:], torch.device("cuda"))  # the pinned allocator's first cudaHostAlloc
    torch.cuda.synchronize()                                              # may synchronise; training reuses its blocks
    torch.cuda._sleep(2_000_000_000)  # ~1 s of GPU work queued (clock cycles)
    x, y, _ = core.host_batch(model, xy[:, :-1], xy[:, 1:], torch.device("cuda"))
    assert not torch.cuda.current_stream().query()  # the sleep still runs: the host did not wait for it
    assert torch.equal(x.cpu(), xy[:, :-1]) and torch.equal(y.cpu(), xy[:, 1:])


def test_core_flash_falls_back_when_not_installed_or_given_documents(monkeypatch, capsys):
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
    monkeypatch.setattr(core, "flash_attn_func", lambda *a, **kw: pytest.fail("flash-attn has no document mask"))
    attn = core.Attention(tiny(attn_impl="flash"), 0)
    q, k, v = torch.randn(3, 1, attn.n_head, 8, attn.head_dim, dtype=torch.bfloat16).unbind(0)
    ctx = core.Ctx(doc=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    torch.testing.assert_close(attn.attend_flash(q, k, v, ctx), attn.attend_eager(q, k, v, ctx), atol=1e-2, rtol=0)

def test_core_flash_runs_half_precision_inputs_without_documents_in_its_own_layout(monkeypatch, capsys):
    """With flash-attn there, bf16 q, k, v of one document per row go to flash_attn_func in its (B, T, H, D) layout,
    causal, with dropout only in training, and come back (B, H, T, D) equal to the eager path; fp32 inputs (no
    flash-attn kernel) take SDPA."""
    calls = []

    def flash(q, k, v, dropout_p, causal):
        calls.append((tuple(q.shape), dropout_p, causal))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
        return y.transpose(1, 2)
    monkeypatch.setattr(core, "flash_attn_func", flash)
    torch.manual_seed(0)
    attn = core.Attention(tiny(attn_impl="flash", dropout=0.25), 0).eval()
    q, k, v = torch.randn(3, 2, attn.n_head, 8, attn.head_dim, dtype=torch.bfloat16).unbind(0)  # (B, H, T, D), T != H
    y = attn.attend_flash(q, k, v, core.Ctx())
    assert calls == [((2, 8, attn.n_head, attn.head_dim), 0.0, True)]
    torch.testing.assert_close(y, attn.attend_eager(q, k, v, core.Ctx()), atol=2e-2, rtol=0)  # bf16: 1 ulp
    attn.train()
    attn.attend_flash(q, k, v, core.Ctx())
    assert calls[-1][1] == 0.25
    attn.eval()
    y = attn.attend_flash(q.float(), k.float(), v.float(), core.Ctx())
    assert len(calls) == 2 and y.dtype == torch.float32
    torch.testing.assert_close(y, attn.attend_eager(q.float(), k.float(), v.float(), core.Ctx()), atol=1e-5, rtol=0)


def test_core_triton_helpers_of_the_fused_kernels(monkeypatch):
    """The Python side of the papers' Triton kernels: the autotune bucket (a power of two, at least 16), the first three
    strides of each tensor, the softmax scale in log2 units and plain, the precision by dtype, a dense head dim, and
    empty outputs: O (B, H, T, D) laid out (B, T, H, D) in q's dtype, LSE (B, H, T) in float32."""
    monkeypatch.setattr(core, "triton", SimpleNamespace(next_power_of_2=lambda n: 1 << (n - 1).bit_length()))
    assert [core.triton_bucket(T) for T in (1, 16, 17, 100, 1024)] == [16, 16, 32, 128, 1024]
    a, b = torch.zeros(2, 3, 4, 5), torch.zeros(2, 4, 3, 5).transpose(1, 2)
    assert core.triton_strides(a, b) == [60, 20, 5, 60, 5, 15]
    log2_scale, scale = core.triton_scales(64)
    assert scale == 0.125 and log2_scale == pytest.approx(0.125 / math.log(2), rel=1e-12)
    assert [core.triton_prec(a.to(dt)) for dt in (torch.float32, torch.bfloat16, torch.float16)] == ["ieee", "tf32",
                                                                                                     "tf32"]
    t = torch.arange(40.0).view(2, 5, 4).transpose(-1, -2)  # head dim with stride 4
    dense, same = core.unit_stride(t, a)
    assert dense.stride(-1) == 1 and torch.equal(dense, t) and same is a
    o, lse = core.attn_outputs(torch.zeros(2, 3, 4, 8, dtype=torch.bfloat16))  # (B, H, T, D)
    assert o.shape == (2, 3, 4, 8) and o.dtype == torch.bfloat16 and o.transpose(1, 2).is_contiguous()
    assert lse.shape == (2, 3, 4) and lse.dtype == torch.float32


def test_core_auto_attention_path_is_fast_on_a_gpu_and_fast_cpu_on_the_cpu():
    """attn_impl auto picks the class's FAST path on a GPU and its FAST_CPU path on the CPU; a named path is kept."""
    class Paths(core.Attention):
        FAST, FAST_CPU = "flex", "eager"
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert (Paths(tiny(), 0).impl(cpu), Paths(tiny(), 0).impl(gpu)) == ("eager", "flex")
    assert (Paths(tiny(attn_impl="sdpa"), 0).impl(cpu), Paths(tiny(attn_impl="sdpa"), 0).impl(gpu)) == ("sdpa", "sdpa")
    model = exo.ExoGPT(exo_tiny("baseline", attn_impl="auto"))
    assert model.attn_impls(cpu) == ["eager"] and model.attn_impls(gpu) == ["sdpa"]


def test_core_attention_dropout_only_in_training_on_every_path():
    """Attention dropout (0.5) in eval mode: eager and SDPA agree and repeat exactly; in training each path drops
    (two forwards differ)."""
    torch.manual_seed(0)
    attn = core.Attention(tiny(dropout=0.5), 0)
    q, k, v = torch.randn(3, 2, attn.n_head, 8, attn.head_dim).unbind(0)
    attn.eval()
    ref = attn.attend_eager(q, k, v, core.Ctx())
    torch.testing.assert_close(attn.attend_sdpa(q, k, v, core.Ctx()), ref, atol=1e-5, rtol=0)
    assert torch.equal(attn.attend_eager(q, k, v, core.Ctx()), ref)
    attn.train()
    for path in (attn.attend_eager, attn.attend_sdpa):
        assert not torch.allclose(path(q, k, v, core.Ctx()), path(q, k, v, core.Ctx()))


def test_core_record_reports_probabilities():
    model = core.GPT(tiny()).eval()
    seen = []
    model(torch.randint(0, 256, (2, 10)), record=lambda layer, p: seen.append((layer, p.shape, p.sum(-1))))
    assert [s[0] for s in seen] == [0, 1]
    assert seen[0][1] == (2, 4, 10, 10) and torch.allclose(seen[0][2], torch.ones(2, 4, 10))


def test_core_rope_matches_complex_rotation():
    T, D = 7, 8
    x = torch.randn(1, 1, T, D)
    cos, sin = core.rope_tables(T, D, 10000.0, "cpu")
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * torch.polar(torch.ones(T, D // 2), torch.atan2(sin, cos))
    assert torch.allclose(core.apply_rope(x, cos, sin), torch.cat((z.real, z.imag), -1), atol=1e-6)


def test_core_init_scales_residual_projections_by_depth():
    """N(0, 0.02) everywhere, the residual stream's output projections N(0, 0.02 / sqrt(2L)) (GPT-2)."""
    torch.manual_seed(0)
    for family, res in (("gpt2", ("attn.c_proj.weight", "mlp.c_proj.weight")),
                        ("llama", ("attn.c_proj.weight", "mlp.w_down.weight"))):
        model = core.GPT(core.Config(family=family, n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=512))
        for n, p in model.named_parameters():
            if p.dim() >= 2:
                want = 0.02 / math.sqrt(2 * 8) if n.endswith(res) else 0.02
                assert abs(p.std().item() - want) < 5 * want / math.sqrt(2 * p.numel()), (n, p.std().item(), want)


def test_core_mlp_is_gelu_or_swiglu_as_written():
    """GPT-2's exact (erf) GELU, not the tanh approximation; Llama's SwiGLU w_down(silu(w_gate x) * w_up x)."""
    torch.manual_seed(0)
    x = 3 * torch.randn(2, 5, 64)
    mlp = core.MLP(tiny(family="gpt2"))
    h = mlp.c_fc(x)
    assert torch.allclose(mlp(x), mlp.c_proj(0.5 * h * (1 + torch.erf(h / math.sqrt(2)))), atol=1e-6)
    mlp = core.MLP(tiny(family="llama"))
    g = mlp.w_gate(x)
    assert torch.allclose(mlp(x), mlp.w_down(g * torch.sigmoid(g) * mlp.w_up(x)), atol=1e-6)


def test_core_adamw_takes_the_configs_betas():
    cfg = tiny(beta1=0.8, beta2=0.97)
    opt = core.GPT(cfg).configure_optimizers(cfg, "cpu")[0]
    assert all(g["betas"] == (0.8, 0.97) for g in opt.param_groups)


def test_core_rope_tables_are_made_once_and_equal_the_formula():
    """The llama body keeps RoPE's tables as (non-checkpointed) buffers, sliced to T: the same numbers as computing
    them in the forward, which the compiled step then recomputed in every layer."""
    model = core.GPT(tiny(family="llama"))
    cos, sin = model.context(torch.zeros(1, 40, dtype=torch.long)).rope
    want = core.rope_tables(40, model.cfg.head_dim, model.cfg.rope_theta, "cpu")
    assert torch.equal(cos, want[0]) and torch.equal(sin, want[1]) and cos.shape == (40, model.cfg.head_dim // 2)
    D = model.cfg.head_dim  # angle t * theta^(-2i/D) of pair i at position t
    angle = torch.arange(40.0, dtype=torch.float64)[:, None] * model.cfg.rope_theta ** (-torch.arange(0, D, 2) / D)
    assert torch.allclose(cos.double(), angle.cos(), atol=1e-5) and torch.allclose(sin.double(), angle.sin(), atol=1e-5)
    assert not any("rope" in k for k in model.state_dict())


def test_core_lr_schedule():
    cfg = tiny(lr=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    assert core.lr_mult(0, cfg) == pytest.approx(1 / 11)
    assert core.lr_mult(10, cfg) == pytest.approx(1.0)
    assert core.lr_mult(60, cfg) == pytest.approx(0.55)
    assert core.lr_mult(110, cfg) == pytest.approx(0.1)
    wsd = tiny(lr=1.0, min_lr=0.0, warmup_iters=0, max_iters=100, schedule="wsd", cooldown_frac=0.2)
    assert core.lr_mult(79, wsd) == 1.0 and core.lr_mult(90, wsd) == pytest.approx(0.5)


def test_core_lr_schedule_decay_horizon_and_floor():
    """--lr-decay-iters shorter than the run: cosine stays at min_lr after it (no rise back); WSD's cool-down is
    cooldown_frac of lr_decay_iters (not of max_iters) and ends at min_lr, linear from lr to min_lr."""
    cos = tiny(lr=1.0, min_lr=0.1, warmup_iters=0, max_iters=100, lr_decay_iters=50)
    assert [core.lr_mult(it, cos) for it in (50, 75, 99)] == pytest.approx([0.1, 0.1, 0.1])
    wsd = tiny(lr=1.0, min_lr=0.0, warmup_iters=0, max_iters=100, lr_decay_iters=50, schedule="wsd",
                 cooldown_frac=0.2)
    assert core.lr_mult(39, wsd) == 1.0 and core.lr_mult(45, wsd) == pytest.approx(0.5)
    assert core.lr_mult(60, wsd) == 0.0
    floor = tiny(lr=1.0, min_lr=0.1, warmup_iters=0, max_iters=100, schedule="wsd", cooldown_frac=0.2)
    assert [core.lr_mult(it, floor) for it in (79, 80, 90, 100)] == pytest.approx([1.0, 1.0, 0.55, 0.1])
    cos, wsd = (tiny(lr=2.0, min_lr=0.2, warmup_iters=0, max_iters=100, schedule=schedule, cooldown_frac=0.2)
                for schedule in ("cosine", "wsd"))  # the multiplier's floor is min_lr / lr: 0.1 here, not 0.2
    assert core.lr_mult(100, cos) == pytest.approx(0.1) and core.lr_mult(50, cos) == pytest.approx(0.55)
    assert core.lr_mult(100, wsd) == pytest.approx(0.1) and core.lr_mult(90, wsd) == pytest.approx(0.55)
    paper = tiny(lr=1.0, min_lr=0.1, warmup_iters=0, max_iters=38147, schedule="wsd", cooldown_frac=0.2)
    assert core.lr_mult(30517, paper) == core.lr_mult(30518, paper) == 1.0  # the cool-down: int(0.2 x 38147) = 7629
    assert core.lr_mult(38146, paper) == pytest.approx(0.1 + 0.9 / 7629, rel=1e-12)  # steps, as the ExoFormer's


def test_core_fmt_time_is_minutes_and_seconds_below_an_hour_then_hours_and_minutes():
    """The ETA of the training line and of evaluate's progress: 2-digit seconds (minutes) below an hour, from one hour
    on hours and 2-digit minutes."""
    assert [core.fmt_time(s) for s in (0, 5.9, 65, 3599.9)] == ["0m00s", "0m05s", "1m05s", "59m59s"]
    assert [core.fmt_time(s) for s in (3600, 3659, 7380, 36000 + 61)] == ["1h00m", "1h00m", "2h03m", "10h01m"]


# ----------------------------------------------------------------------------------------------------------------
# core: data and tokenizer

def test_core_loader_reads_plain_and_llmc_shards(tmp_path):
    toks = np.arange(5000, dtype=np.uint16)
    header = np.zeros(256, np.int32)
    header[:3] = (core.SHARD_MAGIC, 1, len(toks))
    for split in ("train", "val"):
        for i in range(2):
            with open(tmp_path / f"fineweb_{split}_{i:06d}.bin", "wb") as f:
                f.write(header.tobytes())
                f.write((toks + i * 5000).tobytes())
    (tmp_path / "fineweb_val_notes.bin").write_bytes(b"no shard")  # not *_val_NNNNNN.bin: not read
    empty = header.copy()
    empty[2] = 0
    (tmp_path / "fineweb_train_000002.bin").write_bytes(empty.tobytes())  # a shard of no tokens: its header only
    data = core.TokenData(str(tmp_path))
    assert data.tokens("train") == 10000 and len(data.splits["train"]) == 3 and len(data.splits["val"]) == 2
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
    windows = lambda n: [w.tolist() for w in core.TokenData(str(plain)).windows("val", 16, n)]
    assert windows(32) == [list(range(17)), list(range(16, 33))]  # 32 tokens: two windows of 16 targets, no third
    assert len(windows(33)) == 3 and len(windows(0)) == 18  # rounded up to whole windows; 0: all that fit in 300
    nanogpt = tmp_path / "nanogpt"  # nanoGPT's prepare.py writes no meta.json: uint16 GPT-2 ids
    nanogpt.mkdir()
    for split in ("train", "val"):
        np.arange(40000, 40300, dtype=np.uint16).tofile(nanogpt / f"{split}.bin")
    data = core.TokenData(str(nanogpt))
    assert (data.tokens("val"), data.tokenizer, data.vocab_size) == (300, "gpt2", 50257)
    assert int(data.batch("val", 4, 16, 1, 0)[0].min()) >= 40000
    with open(tmp_path / "fineweb_val_000001.bin", "r+b") as f:  # truncated shard
        f.truncate(1024 + 100)
    with pytest.raises(core.ConfigError, match="truncated"):
        core.TokenData(str(tmp_path))
    (tmp_path / "fineweb_val_000001.bin").write_bytes(header.tobytes() + toks.tobytes() + b"\0\0")  # one too many
    with pytest.raises(core.ConfigError, match="header says 5000 tokens, the file holds 5001"):
        core.TokenData(str(tmp_path))
    header[1] = 2
    (tmp_path / "fineweb_val_000001.bin").write_bytes(header.tobytes() + toks.tobytes())
    with pytest.raises(core.ConfigError, match="fineweb_val_000001.bin: unsupported shard version 2"):
        core.TokenData(str(tmp_path))
    for split in ("train", "val"):  # one split alone is not a dataset
        alone = tmp_path / f"only_{split}"
        alone.mkdir()
        np.arange(300, dtype=np.uint16).tofile(alone / f"{split}.bin")
        with pytest.raises(core.ConfigError, match="needs train and val token files"):
            core.TokenData(str(alone))


def test_core_embedded_default_dataset_trains_without_data(tmp_path, capsys):
    """No --data: the shipped Python tutorial, bytes (last 5% val, cut at a line start), and a run trains on it."""
    assert core.main(core.PAPER, ["--train", "--preset", "tiny", "--device", "cpu", "--max-iters", "2",
                                  "--eval-interval", "2", "--out", str(tmp_path / "run")]) == 0
    data = core.TokenData(core.DEFAULT_DATA)
    assert data.tokenizer == "bytes" and data.vocab_size == 256
    train, val = (bytes(data.splits[s][0]) for s in ("train", "val"))
    assert train.endswith(b"\n") and val.decode().startswith("") and 0.04 < len(val) / len(train + val) < 0.06
    assert core.read_log(str(tmp_path / "run"))[-1]["step"] == 2 and core.DEFAULT_DATA in capsys.readouterr().out


def test_core_bare_run_suits_the_machine(tmp_path, capsys, monkeypatch):
    """No --preset and no --data: tiny on a CPU; on a GPU the 124m class for ten passes over the embedded data."""
    assert cg.main(["--device", "cpu", "--max-iters", "3", "--out", str(tmp_path / "cog")]) == 0  # no action: train
    out = capsys.readouterr().out
    assert "no --preset or --data: preset tiny" in out and "cogformer/cogformer" in out
    assert core.load_checkpoint(str(tmp_path / "cog" / "ckpt.pt"))["config"]["n_embd"] == 64
    monkeypatch.setattr(core, "resolve_device", lambda cfg: torch.device("cuda"))
    for paper, preset in ((core.PAPER, "124m"), (reflex.PAPER, "124m-8h"), (cg.PAPER, "141m-gpt2")):
        args = core.build_parser(paper).parse_args([])
        cfg = core.configure(paper, args, ["train"])[0]
        assert (cfg.n_embd, cfg.max_iters) == (paper.config.PRESETS[preset]["n_embd"], 149)  # 10 x 243,540 / 16,384
        assert cfg.warmup_iters == 14 and cfg.eval_interval == 29


def test_core_gpt2_tokenizer_offline(monkeypatch):
    if not os.path.exists(TIKTOKEN):
        pytest.skip("no ../shared/data/gpt2.tiktoken")
    monkeypatch.setenv("ATTNLAB_TIKTOKEN", TIKTOKEN)
    tok = core.get_tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995] and tok.eot_token == 50256
    text = "It's 2024: we'll see  x\n\n <|endoftext|>"  # contractions, digits, spaces; the EOT's text is only text
    assert tok.encode(text) == [1026, 338, 48609, 25, 356, 1183, 766, 220, 2124, 628, 1279, 91, 437, 1659, 5239, 91, 29]
    assert tok.decode(tok.encode("attention is all")) == "attention is all"
    monkeypatch.setenv("ATTNLAB_TIKTOKEN", "/nonexistent/gpt2.tiktoken")
    with pytest.raises(core.ConfigError, match="not found"):
        core.get_tokenizer("gpt2")


def test_core_gpt2_vocabulary_file_damaged_or_cut_short_is_one_line(tmp_path, monkeypatch, capsys):
    """The file is checked against GPT-2's sha256: one cut at a line end would parse into a smaller vocabulary (other
    ids), a damaged one failed with a traceback."""
    if not os.path.exists(TIKTOKEN):
        pytest.skip("no ../shared/data/gpt2.tiktoken")
    good = Path(TIKTOKEN).read_bytes()
    (tmp_path / "cut.tiktoken").write_bytes(good[:good.index(b"\n", len(good) // 2) + 1])
    (tmp_path / "bad.tiktoken").write_bytes(b"garbage\n")
    (tmp_path / "a.txt").write_text("some text\n" * 100)
    for name in ("cut", "bad"):
        monkeypatch.setenv("ATTNLAB_TIKTOKEN", str(tmp_path / f"{name}.tiktoken"))
        assert prepare.main(["text", "--input", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")]) == 1
        assert_one_line_error(capsys.readouterr().err, f"{name}.tiktoken: not GPT-2's gpt2.tiktoken (sha256 differs)")


def test_core_loader_windows_shards_and_micro_batches(tmp_path):
    """Window starts are uniform over every position of the token files (shards weighted by their window starts, the
    last start included, a split of exactly T + 1 tokens read); micro-batches of one step are distinct draws."""
    T = 16
    long_, short = np.arange(0, 4000) % 200, 200 + np.arange(0, 416) % 50  # shards of 3984 and 400 window starts
    d = tmp_path / "d"
    d.mkdir()
    for i, ids in enumerate((long_, short)):
        ids.astype(np.uint8).tofile(d / f"x_train_{i:06d}.bin")
    np.arange(T + 1, dtype=np.uint8).tofile(d / "val.bin")  # one window exactly
    json.dump(dict(dtype="uint8", vocab_size=256, tokenizer="bytes"), open(d / "meta.json", "w"))
    data = core.TokenData(str(d))
    firsts = torch.cat([data.batch("train", 64, T, 0, s)[0][:, 0] for s in range(40)])
    share = (firsts >= 200).float().mean().item()
    assert share == pytest.approx(400 / 4384, abs=0.02)  # not 1/2: a shard counts by its window starts
    x, y = data.batch("val", 4, T, 0, 0)
    assert torch.equal(x[0], torch.arange(T)) and torch.equal(y[0], torch.arange(1, T + 1))
    with pytest.raises(core.ConfigError, match="shorter than one window of block_size \\+ 1 = 18 tokens"):
        data.batch("val", 4, T + 1, 0, 0)
    ids = bytes(np.arange(3000, dtype=np.uint8))  # train and val alike: each split draws its own windows
    same = core.TokenData(write_dataset(tmp_path / "same", {"train": ids, "val": ids}))
    assert not torch.equal(same.batch("train", 8, T, 0, 0)[0], same.batch("val", 8, T, 0, 0)[0])
    assert not torch.equal(data.batch("train", 8, T, 0, 3, index=0)[0], data.batch("train", 8, T, 0, 3, index=1)[0])


def greedy(model, idx, n):
    for _ in range(n):
        nxt = model(idx[:, -model.cfg.block_size:])[:, -1].argmax(-1, keepdim=True)
        idx = torch.cat((idx, nxt), 1)
    return idx


@torch.no_grad()
def test_core_generate_temperature_top_k_and_context_crop():
    """top_k=1 and a near-zero temperature are both greedy decoding; a context longer than block_size is cropped to its
    last block_size tokens (the next token follows from the most recent ones)."""
    torch.manual_seed(0)
    cfg = tiny(block_size=16)
    model = core.GPT(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(50)  # peaked logits: sampling at temperature 1 is far from greedy
    idx = torch.randint(0, 256, (2, 24))  # longer than block_size
    want = greedy(model, idx, 6)
    torch.manual_seed(1)
    assert torch.equal(model.generate(idx, 6, temperature=1.0, top_k=1), want)
    torch.manual_seed(2)
    assert torch.equal(model.generate(idx, 6, temperature=1e-4), want)


@torch.no_grad()
def test_core_generate_samples_softmax_over_temperature_of_the_top_k_from_the_cropped_context():
    """With fixed logits: token frequencies are softmax(logits / temperature) over the top k (top_k 0 or above the
    vocabulary: all); the model sees the last block_size tokens; max_new_tokens tokens are appended."""
    model = core.GPT(tiny(block_size=8))
    logits, seen = torch.tensor([0.0, 1.0, 2.0, 3.0, 2.99] + [-1.0] * 251), []
    model.forward = lambda idx: seen.append(idx) or logits.expand(*idx.shape, -1)
    torch.manual_seed(0)
    draws = model.generate(torch.zeros(20000, 1, dtype=torch.long), 1, temperature=2.0, top_k=3)[:, 1]
    freq = torch.bincount(draws, minlength=256) / 20000
    want = torch.zeros(256)
    want[[2, 3, 4]] = (logits[[2, 3, 4]] / 2).softmax(-1)
    assert torch.allclose(freq, want, atol=0.015) and freq[[0, 1, 5]].sum() == 0
    for top_k in (0, 1000):
        assert model.generate(torch.zeros(20000, 1, dtype=torch.long), 1, top_k=top_k).unique().numel() == 256
    assert (model.generate(torch.zeros(200, 1, dtype=torch.long), 1, temperature=1e-4)[:, 1] == 3).all()
    seen.clear()
    out = model.generate(torch.arange(5)[None], 6)
    assert out.shape == (1, 11) and [x.tolist() for x in seen] == [out[:, max(0, n - 8):n].tolist()
                                                                   for n in range(5, 11)]


# ----------------------------------------------------------------------------------------------------------------
# core: training

def train_tiny(data, out, **kw):
    cfg = tiny(data=data, out=str(out), **{"max_iters": 40, "eval_interval": 20, "log_interval": 5, **kw})
    model = core.train(core.PAPER, cfg, ckpt=core.load_checkpoint(str(out / "ckpt.pt")) if cfg.resume else None)
    return cfg, model, core.read_log(str(out))


def test_core_loss_falls_and_checkpoint_round_trip(tutorial, tmp_path):
    cfg, model, log = train_tiny(tutorial, tmp_path, max_iters=100, eval_interval=50)
    assert log[0]["loss"] > 4.5 and log[-1]["loss"] < 3.3 and log[-1]["val_loss"] < 3.5
    loaded = core.load_model(core.PAPER, str(tmp_path / "ckpt.pt"))
    assert not loaded.training  # eval mode: no dropout
    idx = torch.randint(0, 256, (2, 32))
    assert torch.equal(loaded(idx), model.eval()(idx))
    ckpt = core.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 100 and not any(k.startswith("_orig_mod.") for k in ckpt["model"])
    r = core.evaluate(loaded, core.TokenData(tutorial), cfg, torch.device("cpu"))
    assert r["bpb"] == pytest.approx(r["loss"] / math.log(2)) and r["tokens"] > 10000


def test_core_long_evaluation_shows_progress(tutorial, monkeypatch, capsys):
    clock = itertools.count(0, 11)  # every reading 11 s later: a line after each batch
    monkeypatch.setattr(core.time, "time", lambda: next(clock))
    cfg = tiny(data=tutorial, eval_tokens=64 * 8 * 3)
    r = core.evaluate(core.GPT(cfg), core.TokenData(tutorial), cfg, torch.device("cpu"))
    lines = capsys.readouterr().err.splitlines()
    assert r["tokens"] == 1536 and lines[-1].startswith("val: 1,536 of 1,536 tokens | ETA 0m00s") and len(lines) == 3


def test_core_resume_after_kill_is_exact(tutorial, tmp_path, monkeypatch):
    _, _, full = train_tiny(tutorial, tmp_path / "full", dropout=0.1)
    real = core.lr_mult

    def killed(it, cfg):  # dies mid-run, after the step-20 checkpoint
        if it == 27:
            raise KeyboardInterrupt
        return real(it, cfg)
    monkeypatch.setattr(core, "lr_mult", killed)
    with pytest.raises(KeyboardInterrupt, match="ckpt.pt holds step 20: --resume continues from there"):
        train_tiny(tutorial, tmp_path / "cut", dropout=0.1)
    monkeypatch.setattr(core, "lr_mult", real)
    assert core.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))["step"] == 20
    with open(tmp_path / "cut" / "log.jsonl", "a") as f:
        f.write('{"step": 26, "lo')  # the last line's write cut off by the kill
    _, _, resumed = train_tiny(tutorial, tmp_path / "cut", dropout=0.1, resume=True)
    assert [r["step"] for r in resumed] == [r["step"] for r in full]
    for a, b in zip(full, resumed):
        assert a["loss"] == b["loss"] and a.get("val_loss") == b.get("val_loss")


def test_core_resume_of_a_checkpoint_with_compiled_keys_is_the_same_run(tutorial, tmp_path):
    """A checkpoint whose weights carry torch.compile's '_orig_mod.' prefix (older runs saved the compiled model's
    keys): --resume reads it as the same state, and the resumed run is the one resumed from plain keys."""
    train_tiny(tutorial, tmp_path / "plain", max_iters=10, eval_interval=10)
    shutil.copytree(tmp_path / "plain", tmp_path / "compiled")
    ck = core.load_checkpoint(str(tmp_path / "compiled" / "ckpt.pt"))
    ck["model"] = {"_orig_mod." + k: v for k, v in ck.pop("model").items()}
    del ck["checksum"]
    core.save_checkpoint(str(tmp_path / "compiled" / "ckpt.pt"), ck)
    state = core.read_model(core.PAPER, str(tmp_path / "compiled" / "ckpt.pt"))[1]
    assert state.keys() == core.GPT(tiny()).state_dict().keys()
    logs = [train_tiny(tutorial, tmp_path / run, max_iters=20, eval_interval=10, resume=True)[2]
            for run in ("plain", "compiled")]
    assert logs[0][-1]["step"] == 20
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in logs[0]] == [
        (r["step"], r["loss"], r.get("val_loss")) for r in logs[1]]


SPARE_CHILDREN = """
import signal, sys
if sys.argv[1] == "blocked":  # started with SIGTERM blocked (and so every thread torch starts): only ours takes it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
import contextlib, os, subprocess, time
import core
with core.on_sigterm() as stop, contextlib.nullcontext() if sys.argv[1] == "plain" else core.sigterm_spares_children():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(1)
    os.killpg(0, signal.SIGTERM)
    for _ in range(50):
        time.sleep(0.1)
        if stop.is_set():
            break
    time.sleep(0.5)  # time for a killed child to be gone
    print(stop.is_set(), child.poll())
    child.kill()
"""


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_core_sigterm_to_the_process_group_spares_what_the_training_started():
    """torch.compile's workers, started in the first compiled step, must live through a SIGTERM sent to the whole
    process group (timeout's, a scheduler's), or the compilation under way never ends (GPU only; a sleeping child
    stands in here). The training's handler still gets the signal, even where every other thread blocks it."""
    def run(mode):
        p = subprocess.run([sys.executable, "-c", SPARE_CHILDREN, mode], cwd=ROOT, capture_output=True, text=True,
                           timeout=60, start_new_session=True)
        assert p.returncode == 0, p.stderr
        return p.stdout.split()
    assert run("plain") == ["True", str(-signal.SIGTERM)]  # the child dies with the group
    assert run("spare") == ["True", "None"]  # it lives; the handler ran all the same
    assert run("blocked") == ["True", "None"]


def test_core_on_sigterm_sets_its_event_calls_then_and_restores_the_handler():
    """In the main thread: a SIGTERM sets the event and calls then() (bench --compare forwards it to its runs), the
    process lives on, and the old handler is back afterwards; in another thread nothing is installed."""
    before, called = signal.getsignal(signal.SIGTERM), []
    with core.on_sigterm(lambda: called.append(1)) as stop:
        assert not stop.is_set()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # the handler runs in the main thread, between two bytecodes
            if stop.is_set():
                break
            time.sleep(0.01)
        assert stop.is_set() and called == [1]
    assert signal.getsignal(signal.SIGTERM) is before
    seen = []

    def other():
        with core.on_sigterm() as s:
            seen.append((s.is_set(), signal.getsignal(signal.SIGTERM)))
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [(False, before)]


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
def test_core_sigterm_spares_children_restores_the_threads_signal_mask():
    """SIGTERM is blocked in the main thread during the training only: afterwards its mask is what it was (a mask
    left blocking SIGTERM made the process deaf to it once the receiving thread had ended)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    for blocked in (False, True):  # a caller that blocks SIGTERM itself keeps it blocked
        signal.pthread_sigmask(signal.SIG_BLOCK if blocked else signal.SIG_UNBLOCK, {signal.SIGTERM})
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        try:
            with core.sigterm_spares_children():
                assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def test_core_sigterm_saves_at_the_next_logged_step_and_resume_is_exact(tutorial, tmp_path, monkeypatch):
    """A scheduler's or a time limit's SIGTERM mid-run: the step in flight finishes, the next logged step is
    checkpointed (no evaluation: its val_loss None), and the run ends as Ctrl-C does; resumed, it is the whole run."""
    _, _, full = train_tiny(tutorial, tmp_path / "full", dropout=0.1)
    real, before = core.lr_mult, signal.getsignal(signal.SIGTERM)

    def sigterm_at(n):
        def lr_mult(it, cfg):
            if it == n:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(it, cfg)
        return lr_mult
    monkeypatch.setattr(core, "lr_mult", sigterm_at(12))
    with pytest.raises(KeyboardInterrupt, match="ckpt.pt holds step 15: --resume continues from there"):
        train_tiny(tutorial, tmp_path / "cut", dropout=0.1)
    monkeypatch.setattr(core, "lr_mult", sigterm_at(39))  # during the last step: the run ends as it would
    train_tiny(tutorial, tmp_path / "late")
    assert core.load_checkpoint(str(tmp_path / "late" / "ckpt.pt"))["step"] == 40
    monkeypatch.setattr(core, "lr_mult", real)
    assert signal.getsignal(signal.SIGTERM) is before  # the process's own handler again
    ckpt = core.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))
    assert (ckpt["step"], ckpt["val_loss"]) == (15, None)
    assert core.read_log(str(tmp_path / "cut"))[-1]["step"] == 15
    _, _, resumed = train_tiny(tutorial, tmp_path / "cut", dropout=0.1, resume=True)
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in resumed] == [
        (r["step"], r["loss"], r.get("val_loss")) for r in full]


def test_core_read_log_skips_a_cut_last_line_and_refuses_damage(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 0, "loss": 5.5}\n\n{"step": 5, "loss": 4.0}\n{"step": 10, "lo')
    assert core.read_log(str(tmp_path)) == [{"step": 0, "loss": 5.5}, {"step": 5, "loss": 4.0}]
    log.write_text('{"step": 0, "loss": 5.5}\n{"step": 5, "lo\n{"step": 10, "loss": 3.0}\n')
    with pytest.raises(core.ConfigError, match="line 2 is not JSON"):
        core.read_log(str(log))
    (tmp_path / "ckpt.pt").write_bytes(b"\x80\x02binary")  # a checkpoint given where a run folder belongs
    with pytest.raises(core.ConfigError, match="no training log at .*ckpt.pt"):
        core.read_log(str(tmp_path / "ckpt.pt"))


def test_core_overwrite_starts_over_whatever_the_old_log_holds(tutorial, tmp_path):
    """--overwrite of a run whose log is damaged mid-file (not only cut at its end): the old log is not read, the new
    run's log holds its own steps only."""
    (tmp_path / "ckpt.pt").write_bytes(b"the old run")
    (tmp_path / "log.jsonl").write_text('{"step": 5, "loss": 4.0}\n{"step": 10, "lo\n{"step": 15, "loss": 3.0}\n')
    cfg = tiny(data=tutorial, out=str(tmp_path), max_iters=4, eval_interval=4, log_interval=2, eval_iters=1)
    core.train(core.PAPER, cfg, overwrite=True)
    assert [r["step"] for r in core.read_log(str(tmp_path))] == [2, 4]
    assert core.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 4


def test_core_resume_takes_the_optimizer_settings_of_the_flags(tutorial, tmp_path):
    """--resume keeps the moments and step counts; --lr and --weight-decay given now apply (they stayed the
    checkpoint's, while the log showed the new config)."""
    train_tiny(tutorial, tmp_path, max_iters=20, eval_interval=10)
    cfg, _, log = train_tiny(tutorial, tmp_path, max_iters=30, eval_interval=10, lr=2e-3, weight_decay=0.0,
                             resume=True)
    rec = next(r for r in log if r["step"] == 25)
    assert rec["lr"] == pytest.approx(2e-3 * core.lr_mult(24, cfg))  # step 25 is the update of iteration 24


def test_core_checkpoint_is_written_beside_training_and_holds_its_steps_state(tutorial, tmp_path, monkeypatch):
    """The state is copied to host memory at the evaluation and written by a thread while training goes on: the
    step-10 file holds the step-10 model even though training was further on when it was written."""
    _, at10, _ = train_tiny(tutorial, tmp_path / "ten", max_iters=10, lr_decay_iters=20, eval_interval=10)
    real_save, real_lr, now = core.save_checkpoint, core.lr_mult, []

    def slow_save(path, obj):
        time.sleep(1.0)
        real_save(path, obj)
        if obj["step"] == 10:
            now.append(it_seen[-1])
            shutil.copy(path, tmp_path / "step10.pt")
    it_seen = [0]
    monkeypatch.setattr(core, "lr_mult", lambda it, cfg: (it_seen.append(it), real_lr(it, cfg))[1])
    monkeypatch.setattr(core, "save_checkpoint", slow_save)
    train_tiny(tutorial, tmp_path / "twenty", max_iters=20, lr_decay_iters=20, eval_interval=10)
    assert now[0] > 10  # training had gone on while the step-10 checkpoint was written
    assert core.load_checkpoint(str(tmp_path / "twenty" / "ckpt.pt"))["step"] == 20  # on disk when train returned
    state = core.load_checkpoint(str(tmp_path / "step10.pt"))["model"]
    assert all(torch.equal(state[k], v) for k, v in at10.state_dict().items())


def test_core_ddp_two_processes_match_one(tutorial, tmp_path):
    """Two ranks of 2 micro-batches each = one process of 4 (the ranks read disjoint micro-batches); MFU is each
    process's model FLOPs over one device's peak (a stub peak: the CPU has none)."""
    script = tmp_path / "core_peak.py"
    script.write_text(f"import sys; sys.path.insert(0, {HERE!r}); import core\n"
                      "core.peak_flops = lambda device: 1e10\nsys.exit(core.main(core.PAPER))\n")
    args = [str(script), "--train", "--preset", "tiny", "--device", "cpu", "--data", tutorial, "--max-iters", "8",
            "--log-interval", "2", "--eval-interval", "8", "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd, accum, out in (([sys.executable], "4", "one"),
                            ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
                             "2", "two")):
        p = subprocess.run([*cmd, *args, "--grad-accum", accum, "--out", str(tmp_path / out)], capture_output=True,
                           text=True, cwd=HERE, timeout=600, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
    one, two = core.read_log(str(tmp_path / "one")), core.read_log(str(tmp_path / "two"))
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4) and a["tokens"] == b["tokens"]
    assert one[-1]["val_loss"] == pytest.approx(two[-1]["val_loss"], rel=1e-4)
    flops = core.GPT(tiny()).flops_per_token()
    for log, world in ((one, 1), (two, 2)):
        for r in log:
            assert r["mfu"] == pytest.approx(flops * r["tok_s"] / (1e10 * world), rel=1e-2), (world, r)


def test_core_evaluate_counts_no_tokens_for_a_header_only_shard(tmp_path, monkeypatch, capsys):
    """A val shard of no tokens (its header only, which the loader reads) scores none: the progress line's total was
    one window short ((0 - 1) // T counted -1 windows)."""
    header = np.zeros(256, np.int32)
    header[:3] = (core.SHARD_MAGIC, 1, 0)
    (tmp_path / "x_val_000000.bin").write_bytes(header.tobytes())
    for split, n in (("val", 300), ("train", 1000)):
        header[2] = n
        ids = (np.arange(n) % 250).astype(np.uint16)
        (tmp_path / f"x_{split}_000001.bin").write_bytes(header.tobytes() + ids.tobytes())
    json.dump(dict(dtype="uint8", vocab_size=256, tokenizer="bytes"), open(tmp_path / "meta.json", "w"))
    clock = itertools.count(0, 11)  # a progress line after each batch
    monkeypatch.setattr(core.time, "time", lambda: next(clock))
    cfg = tiny(data=str(tmp_path), block_size=16, batch_size=4)
    r = core.evaluate(core.GPT(cfg), core.TokenData(str(tmp_path)), cfg, torch.device("cpu"))
    assert r["tokens"] == 299 // 16 * 16 == 288
    assert capsys.readouterr().err.splitlines()[-1].startswith("val: 288 of 288 tokens | ETA 0m00s")


def test_core_val_loss_is_the_mean_over_fixed_val_batches(tmp_path):
    """The logged val loss reads val batches (train and val differ here), the same ones at every evaluation."""
    data = write_dataset(tmp_path / "d", {"train": bytes(range(97, 123)) * 400, "val": b"0123456789" * 1000})
    cfg = tiny(data=data, eval_iters=3)
    torch.manual_seed(0)
    model, d = core.GPT(cfg).eval(), core.TokenData(data)
    with torch.no_grad():
        want = sum(model(*d.batch("val", cfg.batch_size, cfg.block_size, cfg.seed, 0, i)).item() for i in range(3)) / 3
    assert core.estimate_loss(model, d, cfg, torch.device("cpu")) == pytest.approx(want, rel=1e-6)


def test_core_evaluate_scores_each_next_token_of_the_split_once(tmp_path):
    path = write_dataset(tmp_path / "d", text_splits(tutorial_bytes()[:20000], 0.2))
    cfg = tiny(data=path)
    torch.manual_seed(0)
    model, d = core.GPT(cfg).eval(), core.TokenData(path)
    r = core.evaluate(model, d, cfg, torch.device("cpu"))
    val, T = torch.from_numpy(np.asarray(d.splits["val"][0], dtype=np.int64)), cfg.block_size
    n, total = (len(val) - 1) // T, 0.0
    with torch.no_grad():
        for w in range(n):  # non-overlapping windows, each token predicted from the ones before it in its window
            x, y = val[w * T:(w + 1) * T], val[w * T + 1:(w + 1) * T + 1]
            total += F.cross_entropy(model(x[None])[0], y, reduction="sum").item()
    assert r["tokens"] == n * T and r["loss"] == pytest.approx(total / (n * T), rel=1e-5)


def test_core_bits_per_byte_of_a_bpe_dataset(tmp_path):
    """bits/byte = bits/token * tokens / bytes: a BPE split of 3.5 bytes a token (every other test's data has 1)."""
    ids = np.random.default_rng(0).integers(0, 256, 6000)
    path = write_dataset(tmp_path / "d", {"train": ids, "val": ids[:2000]}, tokenizer="gpt2")
    meta = json.load(open(os.path.join(path, "meta.json")))
    meta["splits"]["val"]["bytes"] = 7000
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    cfg = tiny(data=path)
    r = core.evaluate(core.GPT(cfg), core.TokenData(path), cfg, torch.device("cpu"))
    assert r["bpb"] == pytest.approx(r["bits_per_token"] * 2000 / 7000)


@pytest.mark.skipif(not os.path.exists(TIKTOKEN), reason="needs the offline gpt2.tiktoken")
def test_core_bits_per_byte_of_part_of_a_bpe_split(tmp_path, monkeypatch):
    """--eval-tokens: bits/byte took the whole split's bytes per token, not the scored tokens' (on docs' val split,
    the first 2,048 tokens hold 2.43 bytes a token, the split 2.87: bpb 15% too low)."""
    monkeypatch.setenv("ATTNLAB_TIKTOKEN", TIKTOKEN)
    tok = core.get_tokenizer("gpt2")
    ids = tok.encode(" a b" * 300) + [tok.eot_token] + tok.encode(" internationalization" * 300)
    text_bytes = len((" a b" * 300 + " internationalization" * 300).encode())
    path = write_dataset(tmp_path / "d", {"train": ids, "val": ids}, "gpt2", 50257, 50256)
    meta = json.load(open(os.path.join(path, "meta.json")))
    meta["splits"]["val"]["bytes"] = text_bytes
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    cfg = tiny(data=path, vocab_size=50304, eval_tokens=128)  # two windows of the short-token start
    r = core.evaluate(core.GPT(cfg), core.TokenData(path), cfg, torch.device("cpu"))
    T = cfg.block_size  # the scored targets: tokens 1..T of each window
    want = sum(len(tok.decode([i]).encode()) for w in range(128 // T) for i in ids[w * T + 1:(w + 1) * T + 1])
    assert r["tokens"] == 128 and r["bpb"] == pytest.approx(r["bits_per_token"] * 128 / want)
    cfg.eval_tokens = 0  # the whole split: the meta's bytes, as before
    r = core.evaluate(core.GPT(cfg), core.TokenData(path), cfg, torch.device("cpu"))
    assert r["bpb"] == pytest.approx(r["bits_per_token"] * len(ids) / text_bytes)


def test_core_evaluate_reaches_the_splits_last_token(tmp_path):
    """A split of exactly 3 windows + 1 tokens is scored whole: the last window's last target is the last token."""
    path = write_dataset(tmp_path / "d", {"train": tutorial_bytes()[:5000], "val": bytes(range(65, 129)) * 3 + b"!"})
    cfg, d = tiny(data=path), core.TokenData(path)
    windows = list(d.windows("val", 64))
    assert len(windows) == 3 and windows[-1][-1].item() == ord("!")
    assert [w[0].item() for w in windows] == [65, 65, 65]  # non-overlapping: each starts 64 tokens on
    assert core.evaluate(core.GPT(cfg), d, cfg, torch.device("cpu"))["tokens"] == 192


def test_core_eval_tokens_are_rounded_up_to_whole_windows(tutorial, monkeypatch, capsys):
    clock = itertools.count(0, 11)  # every reading 11 s later: a progress line after each batch
    monkeypatch.setattr(core.time, "time", lambda: next(clock))
    cfg = tiny(data=tutorial, eval_tokens=1500)  # 23.4 windows of 64: 24 are scored
    r = core.evaluate(core.GPT(cfg), core.TokenData(tutorial), cfg, torch.device("cpu"))
    lines = capsys.readouterr().err.splitlines()
    assert r["tokens"] == 1536 and lines[-1].startswith("val: 1,536 of 1,536 tokens | ETA 0m00s")


def test_core_bench_mfu_is_model_flops_over_the_peak(monkeypatch):
    monkeypatch.setattr(core, "peak_flops", lambda device: 1e10)
    cfg = tiny()
    r = core.bench(cfg, core.GPT, steps=2, warmup=1)
    assert r["mfu"] == pytest.approx(core.GPT(cfg).flops_per_token() * r["tok_s"] / 1e10)

def test_core_check_memory_refuses_a_config_over_one_and_a_half_times_the_memory(monkeypatch):
    """The estimate as documented, fp32 on the CPU: 16 bytes a parameter (wpe included), per token 17 x 4 bytes a layer
    and channel plus 12 bytes a vocabulary entry, and for the eager path 12 bytes a layer, row, head and T x T entry;
    a config is refused only above 1.5x the memory."""
    cpu = torch.device("cpu")
    for impl in ("eager", "sdpa"):
        cfg = tiny(attn_impl=impl)  # 2 layers, 4 heads, 64 channels, T 64, B 8, 256 ids
        model = core.GPT(cfg)
        need = (16 * model.num_params(False) + 8 * 64 * (17 * 4 * 2 * 64 + 12 * 256)
                + (impl == "eager") * 12 * 2 * 8 * 4 * 64 * 64)
        for have, refused in ((math.ceil(need / 1.5), False), (math.ceil(need / 1.5) - 1, True)):
            monkeypatch.setattr(core.os, "sysconf", lambda name, have=have: 1 if name == "SC_PAGE_SIZE" else have)
            if refused:
                with pytest.raises(core.ConfigError, match="needs about 0 GiB and the cpu has 0 GiB"):
                    core.check_memory(cfg, model, cpu)
            else:
                core.check_memory(cfg, model, cpu)
            monkeypatch.undo()


def test_core_device_dtype_and_the_peak_of_the_named_gpu(monkeypatch):
    """--device cuda or cuda:N without a GPU is one line, auto is the CPU; --dtype bfloat16 is bf16, auto fp32 on the
    CPU and bf16 on a GPU; the bf16 peak is that of the table's key in the GPU's name (None: unknown GPUs, the CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(core.ConfigError, match="no CUDA GPU is available"):
            core.resolve_device(tiny(device=device))
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert core.resolve_device(tiny(device="auto")) == cpu
    assert [core.amp_dtype(cpu, tiny(dtype=d)) for d in ("auto", "float32", "bfloat16")] == [torch.float32,
                                                                                              torch.float32,
                                                                                              torch.bfloat16]
    assert core.amp_dtype(gpu, tiny()) == torch.bfloat16
    for name, peak in (("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L4", 121e12),
                       ("Tesla T4", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert core.peak_flops(gpu) == peak, name
    assert core.peak_flops(cpu) is None


def test_core_bench_times_the_steps_after_the_warm_up_and_its_line(monkeypatch):
    """ms/step and tokens/s of the timed steps only (a clock read twice: 3 s for 3 steps), ready() between the warm-up
    and the timed steps, every parameter counted; the printed line of a CPU row and of a GPU row."""
    calls, clock = [], iter([10.0, 13.0])

    def build(cfg):
        model = core.GPT(cfg)
        model.register_forward_pre_hook(lambda *_: calls.append("step"))
        return model
    monkeypatch.setattr(core, "time", SimpleNamespace(time=lambda: next(clock)))
    r = core.bench(tiny(), build, steps=3, warmup=2, ready=lambda: calls.append("ready"))
    assert calls == ["step"] * 2 + ["ready"] + ["step"] * 3
    assert r["ms"] == pytest.approx(1000.0) and r["tok_s"] == pytest.approx(8 * 64)
    assert r["params_m"] == core.GPT(tiny()).num_params(False) / 1e6 and r["mfu"] is None and r["mem_gb"] is None
    assert core.bench_line(r) == "1000.0 ms/step, 0.5k tok/s, MFU n/a, peak n/a"
    assert (core.bench_line(dict(ms=41.94, tok_s=123456.0, mfu=0.4567, mem_gb=12.34))
            == "41.9 ms/step, 123.5k tok/s, MFU 45.7%, peak 12.3 GiB")


# ----------------------------------------------------------------------------------------------------------------
# core: a run is never silently wrong, and nothing is lost. Each case: exit code 2, one line, no file changed.

def quick(main, out, *flags, data=None):
    """A 4-step tiny run of a script's main (checkpoint at steps 2 and 4) -> its exit code."""
    return main(["--train", "--preset", "tiny", "--device", "cpu", "--max-iters", "4", "--eval-interval", "2",
                 "--eval-iters", "1", "--out", str(out), *(["--data", data] if data else []), *flags])


def fails_in_one_line(capsys, rc, message):
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err, message)


def digests(folder):
    return {f: hashlib.sha256(open(os.path.join(folder, f), "rb").read()).hexdigest() for f in os.listdir(folder)}


@pytest.fixture(scope="module")
def core_run(tmp_path_factory, tutorial):
    """A finished tiny core run on the tutorial bytes."""
    out = tmp_path_factory.mktemp("core_run") / "run"
    assert quick(lambda a: core.main(core.PAPER, a), out, data=tutorial) == 0
    return str(out)


def core_main(*args):
    return core.main(core.PAPER, [str(a) for a in args])


def test_core_checkpoint_names_its_script_and_other_scripts_refuse_it(core_run, tmp_path, capsys, tutorial):
    ckpt = core.load_checkpoint(os.path.join(core_run, "ckpt.pt"))
    assert (ckpt["script"], ckpt["variant"], ckpt["step"]) == ("core", "", 4)
    assert ckpt["data"] == dict(path=os.path.abspath(tutorial), tokenizer="bytes", vocab_size=256,
                                train_tokens=core.TokenData(tutorial).tokens("train"))
    before = digests(core_run)
    for main in (cg.main, reflex.main):
        fails_in_one_line(capsys, main(["--eval", "--init-from", os.path.join(core_run, "ckpt.pt")]),
                          "was written by core.py: use python core.py")
        fails_in_one_line(capsys, main(["--resume", "--out", core_run, "--max-iters", "6"]), "written by core.py")
    cog = tmp_path / "cog"
    assert quick(cg.main, cog, data=tutorial) == 0
    fails_in_one_line(capsys, core_main("--eval", "--init-from", cog / "ckpt.pt"),
                      "was written by cogformer.py: use python cogformer.py")
    fails_in_one_line(capsys, core_main("--resume", "--out", cog, "--max-iters", "6"), "was written by cogformer.py")
    assert digests(core_run) == before and core.read_log(str(cog))[-1]["step"] == 4


def test_core_run_json_records_the_script_command_config_and_dataset(core_run, tutorial):
    """run.json beside the checkpoint: the script, the model's label, the command line as given (written_by reads its
    first word for older checkpoints), the config and the dataset, as the checkpoint has them."""
    run, ckpt = core.read_run(core_run), core.load_checkpoint(os.path.join(core_run, "ckpt.pt"))
    assert (run["script"], run["label"], run["argv"]) == ("core", "core", sys.argv)
    assert run["config"] == ckpt["config"] and run["data"] == ckpt["data"] == core.TokenData(tutorial).info()
    assert run["torch"] == torch.__version__ and run["gpu"] is None


def test_core_eval_sample_and_init_from_use_the_checkpoints_dataset(core_run, tmp_path, capsys, tutorial):
    ckpt = os.path.join(core_run, "ckpt.pt")
    assert core_main("--eval", "--init-from", ckpt) == 0  # no --data: the run's dataset, named in the output
    out = capsys.readouterr().out
    assert f"core/gpt on {os.path.abspath(tutorial)}" in out
    assert core_main("--eval", "--init-from", ckpt, "--data", tutorial) == 0
    assert capsys.readouterr().out.splitlines()[2] == out.splitlines()[2]  # the same score
    assert core_main("--sample", "--init-from", ckpt, "--max-new-tokens", "5") == 0
    gpt2_ids = write_dataset(tmp_path / "gpt2", {"train": np.arange(500), "val": np.arange(300)}, tokenizer="gpt2",
                             vocab_size=50257, eot_token=50256)
    for action in ("--eval", "--sample", "--train"):
        fails_in_one_line(capsys, core_main(action, "--init-from", ckpt, "--data", gpt2_ids, "--out", tmp_path / "x"),
                          "holds gpt2 tokens (50257); the model was trained on bytes (256)")
    other = write_dataset(tmp_path / "other", text_splits(b"another text of bytes\n" * 400, 0.2))
    fails_in_one_line(capsys, core_main("--train", "--resume", "--out", core_run, "--data", other, "--max-iters", 6),
                      "is not the run's dataset")
    assert core_main("--train", "--init-from", ckpt, "--out", tmp_path / "ft", "--max-iters", "2",
                     "--eval-interval", "2", "--eval-iters", "1") == 0  # fine-tunes on the checkpoint's dataset
    assert core.load_checkpoint(str(tmp_path / "ft" / "ckpt.pt"))["data"]["path"] == os.path.abspath(tutorial)
    moved = tmp_path / "moved.pt"
    ck = core.load_checkpoint(ckpt)
    ck["data"]["path"] = str(tmp_path / "gone")
    del ck["checksum"]
    core.save_checkpoint(str(moved), ck)
    fails_in_one_line(capsys, core_main("--eval", "--init-from", moved), "which is not here: pass --data")


@torch.no_grad()
def test_core_sample_is_seeded_and_takes_top_k_and_max_new_tokens(core_run, capsys):
    ckpt = os.path.join(core_run, "ckpt.pt")
    texts = []
    for seed in ("1337", "1337", "1"):
        assert core_main("--sample", "--init-from", ckpt, "--max-new-tokens", "40", "--temperature", "2",
                         "--seed", seed) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] != texts[2]  # --seed, not whatever ran before, decides the draws
    model, tok = core.load_model(core.PAPER, ckpt), core.get_tokenizer("bytes")
    assert core_main("--sample", "--init-from", ckpt, "--prompt", "def ", "--max-new-tokens", "8", "--top-k", "1") == 0
    want = greedy(model, torch.tensor([tok.encode("def ")]), 8)[0].tolist()
    assert capsys.readouterr().out == tok.decode(want) + "\n"  # top-k 1 is greedy, whatever the temperature
    assert core_main("--sample", "--init-from", ckpt, "--prompt", "def ", "--max-new-tokens", "0") == 0
    assert capsys.readouterr().out == "def \n"
    for temperature in ("0", "nan"):  # nan: torch.multinomial's traceback
        fails_in_one_line(capsys, core_main("--sample", "--init-from", ckpt, "--temperature", temperature),
                          "--sample needs a non-empty --prompt, --max-new-tokens and --top-k >= 0, --temperature > 0")
    assert tok.decode([0xff, 65]) == "\ufffdA"  # a byte model may sample invalid UTF-8: printed, not raised


def test_core_train_never_overwrites_a_run(core_run, capsys, tutorial):
    before = digests(core_run)
    fails_in_one_line(capsys, quick(lambda a: core.main(core.PAPER, a), core_run, data=tutorial),
                      "already holds a run (ckpt.pt): --resume continues it, --overwrite starts over")
    assert digests(core_run) == before
    assert core.PAPER.default_out(core.Config()) == os.path.join("runs", "core")
    assert cg.PAPER.default_out(tiny(cg.CogConfig)) == os.path.join("runs", "cogformer", "cogformer")
    assert core_main("--train", "--resume", "--out", core_run, "--max-iters", "6", "--eval-interval", "2",
                     "--eval-iters", "1") == 0
    out = capsys.readouterr().out
    assert f"resumed from step 4 of {core_run}" in out and f"saving {core_run}/ckpt.pt" in out


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "foreign", "text"])
def test_core_corrupt_truncated_or_foreign_checkpoint_is_one_line(core_run, tmp_path, capsys, damage):
    data = open(os.path.join(core_run, "ckpt.pt"), "rb").read()
    path = tmp_path / "ckpt.pt"
    if damage == "flip":  # 64 bytes in the middle: tensor data, so only the checksum can tell
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
    path.write_bytes({"flip": data, "truncate": data[:len(data) // 2], "empty": b"", "text": b"hello\n"}.get(
        damage, b""))
    if damage == "foreign":
        torch.save({"state": torch.zeros(3)}, path)
    message = {"flip": f"{path}: ", "foreign": "not a checkpoint core.py reads"}.get(damage,
                                                                                    "not a readable checkpoint")
    for args in (["--eval", "--init-from", path], ["--sample", "--init-from", path]):
        fails_in_one_line(capsys, core_main(*args), message)
    if damage == "flip":
        with pytest.raises(core.ConfigError, match="checksum mismatch|not a readable checkpoint"):
            core.load_checkpoint(str(path))


class Payload:  # a hostile pickle: unpickling it calls exec, which writes the marker file
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


@pytest.mark.parametrize("zipped", [True, False])
def test_core_load_checkpoint_reads_older_pickles_and_never_runs_their_code(tmp_path, monkeypatch, zipped):
    Config = dataclasses.make_dataclass("Config", [("n_layer", int, 12)])
    Config.__module__ = "__main__"  # a notebook's own class, which the loading process lacks
    monkeypatch.setattr(sys.modules["__main__"], "Config", Config, raising=False)
    old = dict(model=collections.OrderedDict(w=torch.ones(2, dtype=torch.float16)), dtype=torch.bfloat16,
               step=np.int64(7), lr=np.float64(0.5), losses=np.array([2.5, 2.0]), config=Config(),
               best=torch.tensor(3.5), shape=torch.Size([2, 3]))
    torch.save(old, tmp_path / "old.pt", _use_new_zipfile_serialization=zipped)
    monkeypatch.delattr(sys.modules["__main__"], "Config")
    got = core.load_checkpoint(str(tmp_path / "old.pt"))
    assert isinstance(got["config"], core.StandIn) and got["config"].n_layer == 12
    assert got["step"] == 7 and type(got["step"]) is np.int64 and got["lr"] == 0.5 and got["dtype"] is torch.bfloat16
    assert got["losses"].tolist() == [2.5, 2.0] and got["shape"] == torch.Size([2, 3]) and got["best"].item() == 3.5
    assert got["model"]["w"].dtype == torch.float16 and type(got["model"]) is collections.OrderedDict
    marker = tmp_path / "pwned"
    torch.save({"model": {}, "config": Payload(str(marker))}, tmp_path / "bad.pt",
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(core.ConfigError, match="not a readable checkpoint"):
        core.load_checkpoint(str(tmp_path / "bad.pt"))
    assert not marker.exists()


def test_core_unwritable_or_full_output_is_refused_before_training(tmp_path, capsys, tutorial, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    fails_in_one_line(capsys, core_main("--train", "--preset", "tiny", "--device", "cpu", "--data", tutorial,
                                        "--out", tmp_path / "a_file" / "run"), "cannot write to --out")
    monkeypatch.setattr(core.shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 30, used=0, free=1 << 10))
    fails_in_one_line(capsys, quick(lambda a: core.main(core.PAPER, a), tmp_path / "full", data=tutorial),
                      "MiB free; saving this model's checkpoint atomically needs about")
    assert not os.path.exists(tmp_path / "full" / "log.jsonl")


def test_core_wandb_missing_is_refused_before_the_run_folder_is_touched(core_run, tmp_path, capsys, monkeypatch):
    """--overwrite --wandb without wandb: it emptied log.jsonl and replaced run.json beside the old ckpt.pt."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    run = shutil.copytree(core_run, tmp_path / "run")
    before = digests(run)
    fails_in_one_line(capsys, quick(lambda a: core.main(core.PAPER, a), run, "--overwrite", "--wandb"),
                      "--wandb needs the wandb package")
    assert digests(run) == before


def test_core_failed_save_keeps_the_last_good_checkpoint_and_leaves_no_tmp(tmp_path, capsys, tutorial, monkeypatch):
    real, saves = torch.save, []

    def disk_full_on_second_save(obj, f):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"half a checkpoint")
            raise OSError(28, "No space left on device")
        real(obj, f)
    monkeypatch.setattr(torch, "save", disk_full_on_second_save)
    fails_in_one_line(capsys, quick(lambda a: core.main(core.PAPER, a), tmp_path / "run", data=tutorial),
                      "could not save")
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt.pt", "log.jsonl", "run.json"]  # no .tmp
    assert core.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))["step"] == 2


def test_core_checks_come_before_training(core_run, tmp_path, capsys, tutorial):
    short_val = write_dataset(tmp_path / "short", {"train": tutorial_bytes()[:5000], "val": b"too short"})
    fails_in_one_line(capsys, core_main("--train", "--preset", "tiny", "--device", "cpu", "--data", short_val,
                                        "--out", tmp_path / "r1"), "the val split of")
    assert not os.path.exists(tmp_path / "r1" / "log.jsonl")
    fails_in_one_line(capsys, core_main("--train", "--preset", "tiny", "--device", "cpu", "--data", tutorial,
                                        "--attn-impl", "eager", "--block-size", "20000", "--batch-size", "256",
                                        "--out", tmp_path / "r2"), "GiB: lower --batch-size or --block-size")
    fails_in_one_line(capsys, core_main("--eval", "--init-from", os.path.join(core_run, "ckpt.pt"), "--block-size",
                                        "256"), "--block-size 256 contradicts")
    fails_in_one_line(capsys, core_main("--train", "--resume", "--out", core_run, "--block-size", "32"),
                      "--block-size 32 contradicts")
    fails_in_one_line(capsys, core_main("--eval", "--init-from", os.path.join(core_run, "ckpt.pt"), "--n-layer", "3"),
                      "--n-layer 3 contradicts")
    assert core_main("--eval", "--init-from", os.path.join(core_run, "ckpt.pt"), "--block-size", "32") == 0


@pytest.mark.parametrize("damage,message", [("empty", "is not a whole number of uint16 tokens"),
                                            ("odd", "is not a whole number of uint16 tokens"),
                                            ("meta", "not a valid dataset description"),
                                            ("meta-list", "not a valid dataset description")])
def test_core_damaged_dataset_files_are_one_line(tmp_path, capsys, damage, message):
    data = write_dataset(tmp_path / "d", {"train": np.arange(2000), "val": np.arange(900)}, tokenizer="gpt2",
                         vocab_size=50257)
    if damage.startswith("meta"):
        (tmp_path / "d" / "meta.json").write_text("{not json" if damage == "meta" else "[]")
    else:
        (tmp_path / "d" / "train.bin").write_bytes(b"" if damage == "empty" else b"\x00" * 2001)
    fails_in_one_line(capsys, core_main("--train", "--preset", "tiny", "--device", "cpu", "--data", data,
                                        "--out", tmp_path / "run"), message)


def test_core_divergence_without_a_checkpoint_says_so(tutorial, tmp_path):
    class Exploding(core.GPT):
        def loss_fn(self, logits, targets):
            return super().loss_fn(logits, targets) * float("nan")
    cfg = tiny(data=tutorial, out=str(tmp_path), max_iters=10, eval_interval=10, log_interval=5)
    with pytest.raises(core.ConfigError, match="diverged.*no checkpoint written"):
        core.train(core.PAPER, cfg, Exploding(cfg))
    assert not os.path.exists(tmp_path / "ckpt.pt")


def test_core_plot_of_a_damaged_log_or_an_unwritable_png_is_one_line(core_run, tmp_path, capsys):
    """Tracebacks before: UnicodeDecodeError, AttributeError ('list' has no .get), IsADirectoryError."""
    for name, text, message in (("binary", b"\xff\xfe\n", "not a training log (not UTF-8 text)"),
                                ("lists", b"[1]\n[2]\n", "line 1 is not a JSON object")):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "log.jsonl").write_bytes(text)
        fails_in_one_line(capsys, core_main("--plot", "--out", tmp_path / name), "log.jsonl: " + message)
    run = shutil.copytree(core_run, tmp_path / "run")
    os.makedirs(run / "loss.png")
    fails_in_one_line(capsys, core_main("--plot", "--out", run), "cannot write")


def test_core_run_dirs_name_each_run_once():
    """--out and --runs of a comparing action (--plot, attn_bias --trends, reflex --charts): --out first, none twice."""
    given = types.SimpleNamespace(out="runs/a", runs=["runs/b", "runs/a/", "./runs/b"])
    assert core.run_dirs(given, given) == ["runs/a", "runs/b"]


def test_core_plots_refuse_runs_of_different_tokenizers(core_run, tutorial, tmp_path, capsys):
    exo_run = tmp_path / "exo"
    assert exo.main(["--train", "--data", exo_dataset(tmp_path), "--out", str(exo_run), "--max-iters", "2",
                     "--eval-interval", "2", *TINY_CLI]) == 0
    fails_in_one_line(capsys, core_main("--plot", "--out", core_run, "--runs", exo_run),
                      "use different tokenizers")
    assert core_main("--plot", "--out", core_run) == 0
    assert os.path.getsize(os.path.join(core_run, "loss.png")) > 1000
    assert core.run_label(core_run) == (f"run (core, {os.path.basename(tutorial)})", "bytes")  # model and dataset

def test_core_plot_runs_draws_each_runs_train_and_val_loss_against_the_step(tmp_path, saved_figures):
    """One line a run in each panel: the train losses on the left, the val losses on the right, against the step,
    labelled by the run (its run.json's label, else script/variant, and its dataset); byte runs' unit is the byte."""
    log = [dict(step=0, tokens=0, loss=5.0), dict(step=10, tokens=5120, loss=4.0, val_loss=4.5),
           dict(step=20, tokens=10240, loss=3.0, val_loss=3.5)]
    runs = []
    for name, label in (("a", None), ("b", "core/custom")):
        d = tmp_path / name
        d.mkdir()
        (d / "log.jsonl").write_text("".join(json.dumps(dict(r, loss=r["loss"] + len(runs))) + "\n" for r in log))
        json.dump(dict(script="core", label=label, config=dict(variant=""),
                       data=dict(path="/data/tut", tokenizer="bytes")), open(d / "run.json", "w"))
        runs.append(str(d))
    core.plot_runs(runs, str(tmp_path / "loss.png"), "two runs")
    left, right = saved_figures[-1][1].axes
    assert [l.get_label() for l in left.lines] == [l.get_label() for l in right.lines] == ["a (core, tut)",
                                                                                           "b (core/custom, tut)"]
    assert [l.get_xydata().tolist() for l in left.lines] == [[[0, 5.0], [10, 4.0], [20, 3.0]],
                                                             [[0, 6.0], [10, 5.0], [20, 4.0]]]
    assert right.lines[0].get_xydata().tolist() == [[10, 4.5], [20, 3.5]]
    assert (left.get_ylabel(), right.get_ylabel()) == ("train loss (nats per byte)", "val loss (nats per byte)")


def test_core_decay_groups_are_matrices_and_embeddings_only():
    model = core.GPT(tiny(bias=True))
    decay, no_decay = model.configure_optimizers(model.cfg, "cpu")[0].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {n for n, p in model.named_parameters() if p.dim() >= 2}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.dim() < 2}
    assert "transformer.norm_f.weight" in {names[id(p)] for p in no_decay["params"]}


class SGDGPT(core.GPT):
    """Plain SGD: the update is lr x the (clipped) gradient, so clipping is visible in the weights (AdamW's first
    step is not)."""
    def configure_optimizers(self, cfg, device_type):
        opt = torch.optim.SGD(self.parameters(), lr=cfg.lr)
        opt.param_groups[0]["base_lr"] = cfg.lr
        return [opt]


def test_core_gradients_are_clipped_to_grad_clip_before_the_step(tutorial, tmp_path):
    torch.manual_seed(0)
    for clip in (1e-3, 0.0):
        cfg = tiny(data=tutorial, out=str(tmp_path / str(clip)), max_iters=1, warmup_iters=0, lr=1.0, min_lr=1.0,
                     grad_clip=clip, eval_interval=1, eval_iters=1)
        model = SGDGPT(cfg)
        before = [p.detach().clone() for p in model.parameters()]
        core.train(core.PAPER, cfg, model)
        moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]).norm().item()
        logged = core.read_log(cfg.out)[-1]["grad_norm"]  # the norm before clipping
        assert logged > 0.05
        assert moved == pytest.approx(clip if clip else logged, rel=1e-3)


def test_core_log_records_of_a_run_that_stops_between_intervals(tutorial, tmp_path):
    """max_iters 23 with log 5 / eval 10: the last step is evaluated and checkpointed, its loss is the mean of its 3
    steps; tokens count every micro-batch from step 0, also after a resume; tokens/s x ms/step = tokens per step."""
    kw = dict(lr=1e-7, min_lr=0.0, grad_accum=2, log_interval=5, eval_interval=10)
    train_tiny(tutorial, tmp_path, max_iters=13, **kw)
    _, _, log = train_tiny(tutorial, tmp_path, max_iters=23, resume=True, **kw)
    per_step = 8 * 2 * 64
    assert [r["step"] for r in log] == [5, 10, 13, 15, 20, 23]
    assert [r["tokens"] for r in log] == [r["step"] * per_step for r in log]
    assert log[-1].get("val_loss") is not None and core.load_checkpoint(str(tmp_path / "ckpt.pt"))["step"] == 23
    losses = [r["loss"] for r in log]  # lr ~0: every step's loss is about the same
    assert max(losses) / min(losses) < 1.05
    for r in log:
        assert r["tok_s"] * r["ms"] / 1e3 == pytest.approx(per_step, rel=0.02)


class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_core_nan_guard_keeps_last_good_checkpoint(tutorial, tmp_path, poison):
    """A NaN loss, or a finite loss with a NaN gradient (bf16 overflow), at the step before the step-20 evaluation:
    training stops before that evaluation writes anything, and the step-10 checkpoint stays."""
    class Exploding(core.GPT):
        def loss_fn(self, logits, targets):
            loss = super().loss_fn(logits, targets)
            if not (self.training and self.it == 19):
                return loss
            return loss * float("nan") if poison == "loss" else NanGrad.apply(loss)
    cfg = tiny(data=tutorial, out=str(tmp_path), max_iters=40, eval_interval=10, log_interval=5)
    model = Exploding(cfg)
    real = core.lr_mult
    core.lr_mult = lambda it, c: (setattr(model, "it", it), real(it, c))[1]
    try:
        with pytest.raises(core.ConfigError, match="diverged.*before step 20.*last good checkpoint.*step 10"):
            core.train(core.PAPER, cfg, model)
    finally:
        core.lr_mult = real
    ckpt = core.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert ckpt["step"] == 10 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_core_dropout_masks_change_every_step(tutorial, tmp_path):
    cfg = tiny(data=tutorial, out=str(tmp_path), max_iters=4, dropout=0.5, eval_interval=4, log_interval=4)
    model, masks = core.GPT(cfg), []
    model.transformer.drop.register_forward_hook(lambda m, i, o: masks.append(o == 0) if m.training else None)
    core.train(core.PAPER, cfg, model)
    assert len(masks) == 4 and 0.4 < masks[0].float().mean() < 0.6
    assert all(not torch.equal(a, b) for a, b in zip(masks, masks[1:]))


@torch.no_grad()
def test_core_dropout_on_embeddings_in_training_and_nowhere_in_eval():
    torch.manual_seed(0)
    model, plain = core.GPT(tiny(dropout=0.5)), core.GPT(tiny())
    plain.load_state_dict(model.state_dict())
    seen = []
    model.transformer.h[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    idx = torch.randint(0, 256, (4, 64))
    model.train()(idx)
    assert 0.45 < (seen[0] == 0).float().mean() < 0.55  # the block stack reads dropped embeddings
    model.eval()
    assert torch.equal(model(idx), plain.eval()(idx)) and torch.equal(model(idx, idx), plain(idx, idx))


def test_core_resume_applies_the_weight_decay_given_now(tutorial, tmp_path):
    train_tiny(tutorial, tmp_path, max_iters=10, eval_interval=10)
    train_tiny(tutorial, tmp_path, max_iters=20, eval_interval=10, weight_decay=0.0, resume=True)
    groups = core.load_checkpoint(str(tmp_path / "ckpt.pt"))["optimizers"][0]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]


def test_core_checksum_covers_each_tensors_dtype_and_shape(tmp_path):
    """The same bytes read as another shape or dtype are another checkpoint: load_checkpoint refuses the file."""
    path = str(tmp_path / "ckpt.pt")
    for change in (lambda w: w.view(3, 2), lambda w: w.view(torch.int32)):
        core.save_checkpoint(path, dict(format="attnlab", model={"w": torch.zeros(2, 3)}, step=1))
        obj = torch.load(path)
        obj["model"]["w"] = change(obj["model"]["w"])  # all-zero bytes either way
        torch.save(obj, path)
        with pytest.raises(core.ConfigError, match="checksum mismatch: the file is corrupt"):
            core.load_checkpoint(path)
    core.save_checkpoint(path, dict(format="attnlab", model={"w": torch.zeros(2, 3)}, step=1))
    assert core.load_checkpoint(path)["step"] == 1


def test_core_checksum_covers_every_key_list_item_and_value_in_any_order(tmp_path):
    """A renamed key, a changed value inside a list (the optimizers') or a changed number (the step) is another
    checkpoint: refused. The digest is of the contents, not of the order a dict was built in."""
    path = str(tmp_path / "ckpt.pt")

    def rename(o):
        o["model"] = {"v": o["model"].pop("w")}

    def lr(o):
        o["optimizers"][0]["lr"] = 2e-3

    def step(o):
        o["step"] = 2
    for change in (rename, lr, step):
        core.save_checkpoint(path, dict(format="attnlab", model={"w": torch.ones(2)}, step=1,
                                        optimizers=[dict(lr=1e-3, betas=(0.9, 0.95))]))
        obj = torch.load(path)
        change(obj)
        torch.save(obj, path)
        with pytest.raises(core.ConfigError, match="checksum mismatch: the file is corrupt"):
            core.load_checkpoint(path)
    assert core.digest({"a": 1, "b": torch.ones(2)}) == core.digest({"b": torch.ones(2), "a": 1})


def test_core_to_host_copies_every_tensor_of_nested_dicts_lists_and_tuples():
    """The checkpoint's snapshot: every tensor, at any depth, a copy that training's in-place updates leave alone;
    the containers keep their types and the other values stay as they are."""
    t = torch.zeros(3)
    h = core.to_host({"state": {0: {"exp_avg": t}}, "groups": [{"params": [0, 1]}, t], "pair": (t, 0.9), "lr": 1e-3})
    t.add_(1)
    assert type(h["groups"]) is list and type(h["pair"]) is tuple and h["lr"] == 1e-3 and h["pair"][1] == 0.9
    assert h["groups"][0] == {"params": [0, 1]}
    for copy_ in (h["state"][0]["exp_avg"], h["groups"][1], h["pair"][0]):
        assert torch.equal(copy_, torch.zeros(3))


def test_core_atomic_write_interrupted_keeps_the_old_file_and_no_tmp(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"the old checkpoint")
    with pytest.raises(KeyboardInterrupt):
        with core.atomic(path) as f:
            f.write(b"half a new one")
            raise KeyboardInterrupt  # Ctrl-C in the middle of the write
    assert path.read_bytes() == b"the old checkpoint" and os.listdir(tmp_path) == ["ckpt.pt"]


def test_core_checkpoint_writer_names_the_checkpoint_kept_after_a_failed_write(tmp_path, monkeypatch):
    path, real = str(tmp_path / "ckpt.pt"), core.save_checkpoint

    def save(p, obj):
        if obj["step"] == 6:
            raise OSError(28, "No space left on device")
        real(p, obj)
    monkeypatch.setattr(core, "save_checkpoint", save)
    with core.CheckpointWriter(path, 2) as writer:  # a run resumed from its step-2 checkpoint
        assert writer.wait() == 2
        writer.save(4, dict(step=4, model={"w": torch.ones(2)}))
        writer.save(6, dict(step=6))  # waits for the step-4 write first
        assert core.load_checkpoint(path)["step"] == 4
        with pytest.raises(core.ConfigError, match=r"could not save .*ckpt.pt \(No space left on device\); the last "
                                                   r"good one \(step 4\) is kept"):
            writer.wait()
    with core.CheckpointWriter(path, None) as writer:
        writer.save(6, dict(step=6))
        with pytest.raises(core.ConfigError, match="; none was written before"):
            writer.wait()
    assert core.load_checkpoint(path)["step"] == 4


def test_core_checkpoint_writer_finishes_its_write_whatever_ends_the_block(tmp_path, monkeypatch):
    """An error that ends the training while a checkpoint is being written (not Ctrl-C, not a failed save): the with
    block ends only once the file is on disk."""
    path, real = str(tmp_path / "ckpt.pt"), core.save_checkpoint

    def slow_save(p, obj):
        time.sleep(0.5)
        real(p, obj)
    monkeypatch.setattr(core, "save_checkpoint", slow_save)
    with pytest.raises(RuntimeError, match="out of memory"):
        with core.CheckpointWriter(path, None) as writer:
            writer.save(2, dict(step=2))
            raise RuntimeError("out of memory")
    assert core.load_checkpoint(path)["step"] == 2


def test_core_resume_interrupted_before_its_first_save_names_the_checkpoint_it_came_from(tutorial, tmp_path,
                                                                                         monkeypatch):
    train_tiny(tutorial, tmp_path, max_iters=10, eval_interval=10)
    real = core.lr_mult

    def killed(it, cfg):
        if it == 13:
            raise KeyboardInterrupt
        return real(it, cfg)
    monkeypatch.setattr(core, "lr_mult", killed)
    with pytest.raises(KeyboardInterrupt, match="ckpt.pt holds step 10: --resume continues from there"):
        train_tiny(tutorial, tmp_path, max_iters=20, eval_interval=10, resume=True)


def test_core_check_tokenizer_compares_the_tokenizer_and_its_vocabulary():
    data = SimpleNamespace(path="data/x", tokenizer="gpt2", vocab_size=50304)
    core.check_tokenizer(None, data)  # nothing recorded
    core.check_tokenizer(dict(tokenizer="gpt2"), data)  # a published file records its tokenizer alone
    core.check_tokenizer(dict(path="/elsewhere", tokenizer="gpt2", vocab_size=50304), data)
    with pytest.raises(core.ConfigError, match=r"^data/x holds gpt2 tokens \(50304\); the model was trained on gpt2 "
                                               r"\(50257\): pass --data"):
        core.check_tokenizer(dict(tokenizer="gpt2", vocab_size=50257), data)
    with pytest.raises(core.ConfigError, match=r"the model was trained on bytes: pass --data"):
        core.check_tokenizer(dict(tokenizer="bytes"), data)


def test_core_read_model_takes_the_script_from_the_checkpoint_or_its_run_json(tmp_path):
    cfg = tiny()
    ckpt = dict(format="attnlab", config=dataclasses.asdict(cfg), model=core.GPT(cfg).state_dict())  # no script
    path = str(tmp_path / "ckpt.pt")
    assert core.written_by(ckpt, path) is None
    assert core.read_model(core.PAPER, path, ckpt=ckpt)[0] == ckpt["config"]  # no script named: nothing to refuse
    json.dump(dict(argv=["/elsewhere/cogformer.py", "--train"]), open(tmp_path / "run.json", "w"))
    assert core.written_by(ckpt, path) == "cogformer"  # an older file: the run.json beside it
    with pytest.raises(core.ConfigError, match="was written by cogformer.py: use python cogformer.py"):
        core.read_model(core.PAPER, path, ckpt=ckpt)
    assert core.written_by({**ckpt, "script": "reflex"}, path) == "reflex"  # the checkpoint's own record first
    os.remove(tmp_path / "run.json")
    other = {**ckpt, "config": {**ckpt["config"], "variant": "cogformer"}}
    with pytest.raises(core.ConfigError, match="holds a 'cogformer' model, not one of core.py's"):
        core.read_model(core.PAPER, path, ckpt=other)


def test_core_read_run_of_a_missing_damaged_or_non_object_run_json_is_empty(tmp_path):
    """read_run: the run.json's object, or {} (no file, not JSON, JSON but no object); written_by then names none."""
    assert core.read_run(str(tmp_path)) == {}
    for text in ("{not json", "[1, 2]", '"core.py"'):
        (tmp_path / "run.json").write_text(text)
        assert core.read_run(str(tmp_path)) == {}, text
        assert core.written_by({}, str(tmp_path / "ckpt.pt")) is None
    (tmp_path / "run.json").write_text(json.dumps(dict(argv=["reflex.py"], config={})))
    assert core.read_run(str(tmp_path)) == dict(argv=["reflex.py"], config={})


def test_core_read_model_of_a_file_holding_no_dict_is_one_line(tmp_path):
    """A torch file of a bare tensor (no dict): each script says it reads no such file, in one line."""
    path = str(tmp_path / "w.pt")
    torch.save(torch.zeros(3), path)
    for paper in (core.PAPER, ab.PAPER, reflex.PAPER, exo.PAPER, cg.PAPER):
        with pytest.raises(core.ConfigError, match=f"w.pt: not a checkpoint {paper.name}.py reads"):
            core.read_model(paper, path)


def test_core_load_model_refuses_data_of_another_tokenizer(core_run, tutorial, tmp_path):
    """load_model(data=...) (the papers' analyses, sparse_byte's thesis eval): a model of bytes reads no gpt2 ids."""
    ckpt = os.path.join(core_run, "ckpt.pt")
    gpt2_ids = write_dataset(tmp_path / "gpt2", {"train": np.arange(500), "val": np.arange(300)}, tokenizer="gpt2",
                             vocab_size=50257)
    with pytest.raises(core.ConfigError, match=r"holds gpt2 tokens \(50257\); the model was trained on bytes \(256\)"):
        core.load_model(core.PAPER, ckpt, data=core.TokenData(gpt2_ids))
    assert core.load_model(core.PAPER, ckpt, data=core.TokenData(tutorial)).cfg.vocab_size == 256


def test_core_load_model_of_a_published_file_takes_its_papers_tokenizer(tmp_path, tutorial):
    """A published checkpoint records no dataset: its paper's tokenizer stands in (attn_bias's nanoGPT files read
    gpt2 ids), so load_model refuses data of bytes and takes the same ids labelled gpt2."""
    path = str(tmp_path / "c.pt")
    torch.save(ab_published("default"), path)
    assert core.read_model(ab.PAPER, path)[2] == {"tokenizer": "gpt2"}
    with pytest.raises(core.ConfigError, match=r"holds bytes tokens \(256\); the model was trained on gpt2: pass"):
        core.load_model(ab.PAPER, path, data=core.TokenData(tutorial))
    gpt2 = core.TokenData(tutorial_as(tmp_path / "gpt2", "gpt2"))
    assert core.load_model(ab.PAPER, path, data=gpt2).cfg.n_layer == 2


def test_core_out_needs_room_for_two_copies_of_the_checkpoint(tmp_path, monkeypatch):
    """An atomic save holds the old checkpoint and the new one at once: room for one copy is refused."""
    cfg = tiny(out=str(tmp_path / "run"))
    model = core.GPT(cfg)
    one = 12 * model.num_params(False)  # fp32 weights and two AdamW moments
    for free, ok in ((int(1.5 * one), False), (2 * one, True)):
        monkeypatch.setattr(core.shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 40, used=0, free=free))
        if ok:
            core.prepare_out(cfg, model, overwrite=False)
        else:
            with pytest.raises(core.ConfigError, match="MiB free; saving this model's checkpoint atomically needs"):
                core.prepare_out(cfg, model, overwrite=False)


def test_core_prepare_out_takes_a_folder_holding_a_run_only_to_resume_or_overwrite_it(tmp_path):
    """--out with a ckpt.pt: refused unless --resume or --overwrite; the write check leaves nothing behind."""
    (tmp_path / "ckpt.pt").write_bytes(b"a run")
    model = core.GPT(tiny())
    with pytest.raises(core.ConfigError, match="already holds a run"):
        core.prepare_out(tiny(out=str(tmp_path)), model, overwrite=False)
    core.prepare_out(tiny(out=str(tmp_path)), model, overwrite=True)
    core.prepare_out(tiny(out=str(tmp_path), resume=True), model, overwrite=False)
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_core_init_from_refuses_training_at_a_shorter_block_size(core_run, tmp_path, capsys):
    """Only --eval may shorten the windows: a model trained on from --init-from at a shorter --block-size saved
    that block_size with the checkpoint's longer position table, a file that neither --eval nor --resume could load."""
    ckpt = os.path.join(core_run, "ckpt.pt")
    fails_in_one_line(capsys, core_main("--train", "--init-from", ckpt, "--block-size", 32, "--out", tmp_path / "ft",
                                        "--max-iters", 2, "--eval-interval", 2, "--eval-iters", 1),
                      "--block-size 32 contradicts")
    assert not os.path.exists(tmp_path / "ft")
    assert core_main("--sample", "--init-from", ckpt, "--block-size", 32, "--max-new-tokens", 3) == 0


def test_core_eval_scores_the_test_split_beside_val(core_run, tmp_path, capsys):
    data = write_dataset(tmp_path / "d", text_splits(tutorial_bytes(), 0.05, 0.05))
    assert core_main("--eval", "--init-from", os.path.join(core_run, "ckpt.pt"), "--data", data, "--eval-tokens",
                     640) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[:2] for r in rows] == [["val", "640"], ["test", "640"]] and rows[0][2:] != rows[1][2:]


def test_core_resume_accepts_its_dataset_by_a_relative_path_and_notes_schedule_changes(core_run, tutorial, tmp_path,
                                                                                        capsys):
    out = shutil.copytree(core_run, tmp_path / "run")
    rel = os.path.relpath(tutorial)  # the same folder, named from the working directory
    assert not os.path.isabs(rel)
    assert core_main("--train", "--resume", "--out", out, "--data", rel, "--max-iters", 8, "--min-lr", 1e-5,
                     "--eval-interval", 2, "--eval-iters", 1) == 0
    assert re.search(r"^note: --max-iters, --min-lr differ from the run's: its learning-rate schedule changes from "
                     r"step \d+ on$", capsys.readouterr().err, re.M)
    assert core.read_log(str(out))[-1]["step"] == 8


def test_core_older_checkpoint_without_a_dataset_record_reads_its_configs_data(core_run, tutorial, tmp_path, capsys):
    ck = core.load_checkpoint(os.path.join(core_run, "ckpt.pt"))
    del ck["data"], ck["checksum"]  # written before checkpoints recorded their dataset
    assert ck["config"]["data"] == tutorial
    core.save_checkpoint(str(tmp_path / "old.pt"), ck)
    assert core_main("--eval", "--init-from", tmp_path / "old.pt") == 0, capsys.readouterr().err
    assert f"core/gpt on {tutorial}:" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# core: command line

def test_core_cli_help_lists_every_field():
    rc, out, _ = run_cli("core.py", "--help")
    assert rc == 0
    for f in core.field_names(core.Config):
        assert "--" + f.replace("_", "-") in out


@pytest.mark.parametrize("name", ["core", *bench.PAPERS])
def test_core_help_names_the_scripts_own_attention_paths(name):
    """--attn-impl's help lists the paths its script accepts (cogformer's said sdpa, flex, flash, which it refuses, and
    not flex2x or triton)."""
    paper = bench.script(name)
    text = " ".join(core.build_parser(paper).format_help().split())
    line = re.search(r"--attn-impl ATTN_IMPL attention path;.*?; one of (.*?) \(default", text).group(1)
    assert re.findall(r"\w+", line) == list(paper.config.ATTN_IMPLS), line


def readme_commands():
    """Every `python <script>.py ...` line of the README's bash blocks as (script, argv): `<script>` stands for each
    script, `[...]` (optional flags) and `<...>` (a value to fill in) are dropped or filled, shell loops unrolled."""
    text = Path(HERE, "README.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"python3? (\S+)\.py\b([^#]*)", line.split("; done")[0])
            if not m or "--lm-eval" in line:  # --lm-eval: the rest is lm-eval's own command line
                continue
            rest = re.sub(r"\[[^]]*\]", "", m.group(2)).replace("$v", "default").replace("{default,sink,attn_bias}", "")
            rest = re.sub(r"<[^>]*>", "X", rest)
            for s in (("core", *bench.PAPERS) if m.group(1) == "<script>" else (m.group(1),)):
                yield s, shlex.split(rest)


def test_core_readme_commands_parse():
    """The README's commands are ones the scripts accept: flags, presets, variants, papers and config values."""
    def check(s, argv):
        if s == "prepare":
            prepare.parser().parse_args(argv)
        elif s == "bench":
            args = bench.build_parser().parse_args(argv)
            names = bench.papers(args.papers, with_core=not args.compare)
            bench.check_variants(args.variants, names)
            presets = bench.parse_presets(args.preset)
            for n in names:
                bench.make_cfg(bench.script(n), "", bench.preset_for(n, presets, gpu=True))
        else:
            paper = bench.script(s)
            args = core.build_parser(paper).parse_args(argv)
            given = {k: v for k, v in vars(args).items() if k in core.field_names(paper.config)}
            paper.config(**{**paper.config.PRESETS.get(args.preset, {}), **given})  # its checks of the values

    seen = set()
    for s, argv in readme_commands():
        seen.add(s)
        try:
            check(s, argv)
        except (SystemExit, core.ConfigError) as e:  # argparse exits; the config's checks raise
            pytest.fail(f"README: {s}.py {' '.join(argv)}: {e}")
    assert seen == {"core", "prepare", "bench", *bench.PAPERS}


def test_core_help_examples_are_one_command_a_line_on_folders_prepare_writes():
    """The examples of every script's --help: each line one command (attn_bias's backslash ran two lines into one, a
    gap of spaces between them), and --data names a folder the README's prepare.py commands write (reflex's: owt)."""
    made = {str(prepare.parser().parse_args(argv).out) for s, argv in readme_commands() if s == "prepare"}
    lines = [(n, line) for n in ("core", *bench.PAPERS) for line in bench.script(n).doc.splitlines()]
    for name, line in lines + [("bench", line) for line in bench.__doc__.splitlines()]:
        cmd = line.split("#")[0].rstrip()
        if "python " in cmd:
            assert not re.search(r"\S {3,}-", cmd), f"{name}: {line}"
            assert set(re.findall(r"--data (data/\S+)", cmd)) <= made, f"{name}: {line}"


@pytest.mark.parametrize("args,msg", [
    (["--train", "--n-embd", "100", "--n-head", "12"], "must be divisible"),
    (["--train", "--family", "bert"], "--family must be"),
    (["--train", "--residual-dtype", "float16"], "--residual-dtype must be"),
    (["--train", "--mlp-hidden", "-1"], "--mlp-hidden must be >= 0"),
    (["--train", "--cooldown-frac", "1.5"], "--cooldown-frac must be in"),
    (["--train", "--variant", "foo"], "--variant 'foo': this model has no variants"),
    (["--train", "--data", "/nonexistent"], "dataset directory not found"),
    (["--eval", "--init-from", "/nonexistent.pt"], "checkpoint not found"),
    (["--train", "--max-iters", "ten"], "invalid int value"),
    (["--train", "--seed", "-1"], "--seed must be in [0, 2**63)"),  # numpy's and torch's tracebacks
    (["--train", "--beta2", "1.5"], "--beta1 and --beta2 must be in [0, 1)"),  # AdamW's
    (["--train", "--norm-eps", "-1"], "--norm-eps and --rope-theta must be > 0"),  # it said: training diverged
    (["--eval", "--out", "/nonexistent"], "checkpoint not found"),
    (["--train", "--max-iters", "0"], "--max-iters 0: nothing to train"),  # it exited 0 with an empty run folder
    (["--train", "--resume", "--overwrite", "--out", "/nonexistent"], "--overwrite starts a new one"),  # ignored
    (["--train", "--resume", "--init-from", "x.pt", "--out", "/nonexistent"], "--init-from starts a new one"),
])
def test_core_cli_user_mistakes_give_one_line(args, msg):
    rc, out, err = run_cli("core.py", *args, "--device", "cpu")
    assert rc == 2
    assert_one_line_error(err, msg)


def tiny_run(paper, data, run):
    """A run folder holding an untrained tiny model of paper on data (its ckpt.pt alone) -> the model."""
    torch.manual_seed(0)
    model = paper.build_model(tiny(paper.config, data=data))
    os.makedirs(run)
    core.save_checkpoint(str(run / "ckpt.pt"), dict(format="attnlab", script=paper.name, model=model.state_dict(),
                                                   config=dataclasses.asdict(model.cfg),
                                                   data=core.TokenData(data).info()))
    return model


@pytest.mark.parametrize("paper, action, reads", [
    (ab.PAPER, "--analyze", "--runs"), (cg.PAPER, "--attn-grid", "--init-from"), (cg.PAPER, "--probe", "--init-from"),
    (cg.PAPER, "--neg-mass", "--init-from"), (sb.PAPER, "--metrics", "--init-from"), (sb.PAPER, "--cluster", "--runs"),
    (exo.PAPER, "--analyze", "--init-from")], ids=lambda x: getattr(x, "name", None))
def test_core_paper_action_into_an_out_that_is_a_file_is_one_line(paper, action, reads, tutorial, tmp_path, capsys):
    """A paper's action reading a run, with --out naming a file (or a path below one): one line before any work, the
    file kept (it was a FileExistsError or NotADirectoryError traceback, after the work)."""
    run = tmp_path / "run"
    tiny_run(paper, tutorial, run)
    sb.write_metrics_csv(str(run / "head_metrics.csv"), np.ones((2, 4, 3)))  # what --cluster reads
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "an"):
        src = run / "ckpt.pt" if reads == "--init-from" else run
        argv = [action, reads, src, "--data", tutorial, "--out", out, "--device", "cpu"]
        assert core.main(paper, [str(a) for a in argv]) == 2
        assert_one_line_error(capsys.readouterr().err, f"cannot write to --out {out}: {tmp_path / 'notes.txt'} is "
                                                       "a file")
    assert (tmp_path / "notes.txt").read_text() == "mine" and sorted(os.listdir(run)) == ["ckpt.pt",
                                                                                         "head_metrics.csv"]


@pytest.mark.parametrize("paper, action", [(ab.PAPER, "--analyze"), (cg.PAPER, "--neg-mass"), (sb.PAPER, "--metrics"),
                                           (exo.PAPER, "--analyze")], ids=lambda x: getattr(x, "name", None))
def test_core_paper_action_reading_out_refuses_a_model_flag_that_contradicts_it(paper, action, tutorial, tmp_path,
                                                                                capsys):
    """A paper action reading <out>/ckpt.pt refuses model flags that contradict it, as --init-from does (it ran the
    checkpoint's model under the flags' name)."""
    run = tmp_path / "run"
    model = tiny_run(paper, tutorial, run)
    argv = [action, "--out", str(run), "--data", tutorial, "--device", "cpu", "--n-layer", "5"]
    assert core.main(paper, argv) == 2
    assert_one_line_error(capsys.readouterr().err, f"--n-layer 5 contradicts {run / 'ckpt.pt'} (n_layer "
                                                   f"{model.cfg.n_layer})")
    assert os.listdir(run) == ["ckpt.pt"]


def test_core_cli_bench_without_preset_is_tiny_on_cpu():
    """--help's promise: with neither --preset nor --data, tiny on a CPU (it timed the 124m model: minutes a step)."""
    rc, out, err = run_cli("core.py", "--bench", "--device", "cpu")
    assert rc == 0, err
    assert "timing 5 + 20 training steps of 8 x 64 random tokens" in out and "ms/step" in out
    assert "embedded Python tutorial" not in out  # the note of a bare --train: --bench reads no dataset


def test_core_cli_torch_limits_give_one_line(tmp_path):
    rc, _, err = run_cli("core.py", "--train", "--attn-impl", "flex", "--max-iters", "2", "--device", "cpu", "--out",
                         tmp_path / "run")
    assert rc == 2
    assert_one_line_error(err, "FlexAttention does not support backward on CPU")  # torch's NotImplementedError


def test_core_cli_train_eval_sample_plot(tutorial, tmp_path):
    out = tmp_path / "run"
    rc, stdout, err = run_cli("core.py", "--train", "--preset", "tiny", "--device", "cpu", "--data", tutorial,
                              "--out", out, "--max-iters", "20", "--eval-interval", "10")
    assert rc == 0, err
    assert "tok/s" in stdout and "ETA" in stdout and "MFU n/a" in stdout
    rc, stdout, err = run_cli("core.py", "--eval", "--init-from", out / "ckpt.pt", "--data", tutorial)
    assert rc == 0 and "val" in stdout and "bpb" in stdout, err
    rc, stdout, err = run_cli("core.py", "--sample", "--out", out, "--data", tutorial, "--max-new-tokens", "20")
    assert rc == 0 and stdout.strip(), err
    for mistake in (["--prompt", ""], ["--top-k", "-1"]):
        rc, _, err = run_cli("core.py", "--sample", "--out", out, "--data", tutorial, *mistake)
        assert rc == 2
        assert_one_line_error(err, "--sample needs a non-empty --prompt")
    rc, stdout, err = run_cli("core.py", "--plot", "--out", out, "--data", tutorial)
    assert rc == 0 and os.path.getsize(out / "loss.png") > 1000, err
    log = (out / "log.jsonl").read_text()
    rc, stdout, err = run_cli("core.py", "--train", "--resume", "--out", out)  # finished: its files stay
    assert rc == 0 and "is trained to step 20 of 20: nothing to do" in stdout and (out / "log.jsonl").read_text() == log
    rc, stdout, err = run_cli("core.py", "--train", "--resume", "--out", out, "--max-iters", "24")
    assert rc == 0, err
    assert "note: --max-iters differs from the run's: its learning-rate schedule changes from step 20" in err
    assert core.read_log(str(out))[-1]["step"] == 24


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_core_gpu_fast_paths_match_eager(dtype):
    """On the GPU: SDPA (flash/cuDNN), compiled FlexAttention (doc mask too) vs eager, outputs and input grads."""
    torch.manual_seed(0)
    B, H, T, D = 2, 4, 300, 64
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    doc = torch.cumsum((torch.rand(B, T, device="cuda") < 0.02).long(), 1)
    for d in (None, doc):
        ref_attn = core.Attention(tiny(attn_impl="eager", n_embd=256), 0)
        ctx = core.Ctx(doc=d)
        ref = ref_attn.attend(q.double(), k.double(), v.double(), ctx)
        gref = torch.autograd.grad(ref.square().sum(), (q, k, v))
        for impl in ("sdpa", "flex"):
            attn = core.Attention(tiny(attn_impl=impl, n_embd=256), 0)
            out = attn.attend(q, k, v, core.Ctx(doc=d))
            g = torch.autograd.grad(out.float().square().sum(), (q, k, v))
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
            assert (out.double() - ref).norm() / ref.norm() < tol, impl
            for a, b in zip(g, gref):
                assert (a.double() - b).norm() / b.norm() < tol, impl


# ================================================================================================================
# prepare
# prepare.py against a real HTTP server on 127.0.0.1 (Range support, dropped connections, 404s) serving small files
# in each source's real format: an enwik8-style zip, llm.c shards, an OpenWebText tar.xz of tar.xz subsets.
# ================================================================================================================

DOCS_VAL = ROOT.parent / "shared" / "data" / "docs_val.txt.xz"


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` with Range support (unless `ranges` is off); `cut[path] = n` drops the connection after n body
    bytes, once; `moved[path] = target` redirects (302 with path's headers_for, as Hugging Face's redirect to its CDN);
    `seen` lists (path, Range header) of each request."""
    files, headers_for, cut, moved, seen, ranges = {}, {}, {}, {}, [], True

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Range")))
        if self.path in self.moved:
            self.send_response(302)
            self.send_header("Location", self.moved[self.path])
            self.send_header("Content-Length", "0")
            for k, v in self.headers_for.get(self.path, {}).items():
                self.send_header(k, v)
            return self.end_headers()
        data = self.files.get(self.path)
        if data is None:
            return self.send_error(404)
        start = int(self.headers["Range"][6:].split("-")[0]) if self.headers.get("Range") and self.ranges else 0
        if start >= len(data):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in self.headers_for.get(self.path, {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data[start:start + self.cut.pop(self.path, len(data))])

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture(autouse=True)
def clean_server():
    for d in (Handler.files, Handler.headers_for, Handler.cut, Handler.moved):
        d.clear()
    Handler.seen.clear()
    Handler.ranges = True


def gpt2():
    """GPT-2's BPE (tiktoken's download, or $ATTNLAB_TIKTOKEN): a test that needs it skips when it cannot be had."""
    try:
        return core.get_tokenizer("gpt2")
    except core.ConfigError as e:
        pytest.skip(f"no GPT-2 vocabulary here: {e}")


def run(*argv):
    """The CLI in a subprocess: (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, str(ROOT / "prepare.py"), *map(str, argv)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "ATTNLAB_MIRROR": ""})
    return p.returncode, p.stdout, p.stderr


def meta(out):
    return json.loads((out / "meta.json").read_text())


def looks_valid(out):
    """Anything a loader could mistake for data: meta.json, .bin files or a finished download."""
    return sorted(p.name for p in out.rglob("*") if p.suffix in (".json", ".bin", ".zip", ".xz", ".parquet"))


# ----------------------------------------------------------------------------- prepare: text

def test_prepare_text_plain_and_xz_with_val(tmp_path):
    tok = gpt2()  # skips without the vocabulary
    a, b, v = "Hello world.\nSecond line here.\n", "Ünïcode text\n\nwith a blank line.", "Validation text.\n"
    (tmp_path / "a.txt").write_text(a)
    with lzma.open(tmp_path / "b.txt.xz", "wt") as f:
        f.write(b)
    (tmp_path / "v.txt").write_text(v)
    out = tmp_path / "out"
    argv = ["text", "--input", tmp_path / "a.txt", tmp_path / "b.txt.xz", "--val", tmp_path / "v.txt",
            "--tokenizer", "gpt2", "--out", out, "--workers", "1"]
    assert prepare.main(list(map(str, argv))) == 0
    eot = 50256
    train = np.fromfile(out / "train.bin", np.uint16).tolist()
    assert train == tok.encode(a) + [eot] + tok.encode(b) + [eot]   # one EOT after each input file
    assert np.fromfile(out / "val.bin", np.uint16).tolist() == tok.encode(v) + [eot]
    m = meta(out)
    assert {k: m[k] for k in ("tokenizer", "vocab_size", "dtype", "eot_token")} == GPT2_META
    assert m["splits"] == {"train": {"tokens": len(train), "bytes": len((a + b).encode())},
                           "val": {"tokens": len(tok.encode(v)) + 1, "bytes": len(v.encode())}}
    assert tok.decode(train[:3]) == "Hello world."
    data = core.TokenData(str(out))   # core's loader reads it
    assert data.tokens("train") == len(train) and data.vocab_size == 50257


GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256}


def test_prepare_text_bytes_holds_out_last_5_percent(tmp_path, capsys):
    lines = [f"line {i} of the corpus, some words\n" for i in range(300)]
    with lzma.open(tmp_path / "a.txt.xz", "wt") as f:
        f.write("".join(lines))
    out = tmp_path / "out"
    prepare.prepare_text([str(tmp_path / "a.txt.xz")], str(out), tokenizer="bytes")   # as core calls it
    train, val = (np.fromfile(out / f"{s}.bin", np.uint8).tobytes() for s in ("train", "val"))
    assert train + val == "".join(lines).encode()    # no EOT for bytes, nothing lost
    assert val.startswith(b"line ") and train.endswith(b"\n")   # cut at a line start
    assert 0.04 < len(val) / (len(train) + len(val)) < 0.06
    m = meta(out)
    assert (m["tokenizer"], m["vocab_size"], m["dtype"], m["eot_token"]) == ("bytes", 256, "uint8", None)
    assert m["splits"]["val"] == {"tokens": len(val), "bytes": len(val)}
    capsys.readouterr()
    argv = ["text", "--input", str(tmp_path / "a.txt.xz"), "--tokenizer", "bytes", "--out", str(out)]
    assert prepare.main(argv) == 0 and "nothing to do" in capsys.readouterr().out   # unchanged inputs: no work
    x, y = core.TokenData(str(out)).batch("val", 2, 16, 0, 0)
    assert bytes(x[0].tolist()) in val
    (tmp_path / "b.txt").write_text("".join(lines))
    for other in (argv[:4] + ["gpt2"] + argv[5:], argv[:2] + [str(tmp_path / "b.txt")] + argv[3:]):
        assert prepare.main(other) == 1  # another tokenizer, another file: the dataset stays as it is
        assert_one_line_error(capsys.readouterr().err, "already holds another dataset (text, a.txt.xz, bytes)")
    assert meta(out) == m
    os.utime(tmp_path / "a.txt.xz", ns=(0, 0))  # the same size, another time: changed, prepared again
    assert prepare.main(argv) == 0 and "nothing to do" not in capsys.readouterr().out
    with lzma.open(tmp_path / "a.txt.xz", "wt") as f:  # the same input, changed: prepared again
        f.write("".join(lines[:200]))
    assert prepare.main(argv) == 0 and meta(out)["splits"] != m["splits"]
    with lzma.open(tmp_path / "a.txt.xz", "wt") as f:  # changed again, and it fails: no dataset is left half-made
        f.write("")
    assert prepare.main(argv) == 1 and not (out / "meta.json").exists()
    with pytest.raises(core.ConfigError, match="needs train and val token files"):
        core.TokenData(str(out))


@pytest.mark.skipif(not DOCS_VAL.exists(), reason="needs ../shared/data/docs_val.txt.xz")
def test_prepare_text_parallel_pieces_give_the_same_tokens(tmp_path, monkeypatch):
    """Real prose cut into ~20 kB pieces and tokenized by 2 processes equals one serial encode."""
    tok = gpt2()  # skips without the vocabulary
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 20_000)
    out = tmp_path / "out"
    argv = ["text", "--input", str(DOCS_VAL), "--val", str(DOCS_VAL), "--out", str(out), "--workers", "2"]
    assert prepare.main(argv) == 0
    text = lzma.open(DOCS_VAL, "rt").read()
    assert len(list(prepare.pieces(text, 20_000))) > 50
    assert np.fromfile(out / "val.bin", np.uint16).tolist() == tok.encode(text) + [50256]


# ----------------------------------------------------------------------------- prepare: enwik8

def enwik8_zip(n=200_000):
    raw = np.random.default_rng(0).integers(32, 127, n, np.uint8).tobytes()   # incompressible: a 200 kB zip
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", raw)
    return raw, buf.getvalue()


@pytest.fixture
def enwik8(server, monkeypatch):
    raw, blob = enwik8_zip()
    monkeypatch.setitem(prepare.ENWIK8, "size", len(raw))
    monkeypatch.setitem(prepare.ENWIK8, "sha256", hashlib.sha256(blob).hexdigest())
    Handler.files["/enwik8/enwik8.zip"] = blob
    monkeypatch.setenv("ATTNLAB_MIRROR", server)   # env mirror: URL/<command>/FILE
    return raw, blob


def test_prepare_enwik8_dropped_connection_resumes_and_second_run_does_nothing(tmp_path, enwik8, capsys):
    raw, blob = enwik8
    Handler.cut["/enwik8/enwik8.zip"] = len(blob) // 2
    out = tmp_path / "enwik8"
    assert prepare.main(["enwik8", "--out", str(out)]) == 0
    (_, first), (_, second) = Handler.seen   # the second request resumes where the kept bytes end
    assert first is None and 0 < int(second[6:-1]) <= len(blob) // 2
    assert "resuming" in capsys.readouterr().out
    parts = [np.fromfile(out / f"{s}.bin", np.uint8).tobytes() for s in ("train", "val", "test")]
    assert parts == [raw[:180_000], raw[180_000:190_000], raw[190_000:]]   # 90% / 5% / 5%
    m = meta(out)
    assert (m["tokenizer"], m["vocab_size"], m["dtype"], m["eot_token"]) == ("bytes", 256, "uint8", None)
    assert m["splits"] == {s: {"tokens": len(p), "bytes": len(p)} for s, p in zip(("train", "val", "test"), parts)}
    assert core.TokenData(str(out)).tokens("test") == 10_000
    Handler.seen.clear()
    assert prepare.main(["enwik8", "--out", str(out)]) == 0
    assert Handler.seen == [] and "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("ranges", [True, False])
def test_prepare_enwik8_resumes_a_part_file_left_by_an_earlier_run(tmp_path, enwik8, ranges):
    """A server without Range support answers 200 with the whole file: the download starts over."""
    raw, blob = enwik8
    Handler.ranges = ranges
    out = tmp_path / "enwik8"
    (out / "download").mkdir(parents=True)
    (out / "download" / "enwik8.zip.part").write_bytes(blob[:1000])
    assert prepare.main(["enwik8", "--out", str(out)]) == 0
    assert Handler.seen == [("/enwik8/enwik8.zip", "bytes=1000-")]
    assert (out / "download" / "enwik8.zip").read_bytes() == blob


def test_prepare_enwik8_corrupt_download_is_rejected_and_removed(tmp_path, enwik8, capsys):
    raw, blob = enwik8
    Handler.files["/enwik8/enwik8.zip"] = blob[:100] + bytes([blob[100] ^ 1]) + blob[101:]
    out = tmp_path / "enwik8"
    assert prepare.main(["enwik8", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256" in err and "corrupt" in err
    assert looks_valid(out) == [] and not list(out.rglob("*.part"))


def test_prepare_full_disk_is_one_line_and_leaves_nothing(tmp_path, enwik8, monkeypatch, capsys):
    raw, blob = enwik8
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda path: SimpleNamespace(total=100, used=90, free=10))
    out = tmp_path / "enwik8"
    assert prepare.main(["enwik8", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "free" in err
    assert not out.exists()
    (out / "download").mkdir(parents=True)
    (out / "download" / "enwik8.zip.part").write_bytes(blob[:-10])   # a resume needs room for the rest only
    assert prepare.main(["enwik8", "--out", str(out)]) == 0


def test_prepare_disk_full_while_writing_is_one_line(tmp_path, monkeypatch, capsys):
    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(prepare, "encode_docs", full)
    (tmp_path / "a.txt").write_text("some text\n" * 100)
    assert prepare.main(["text", "--input", str(tmp_path / "a.txt"), "--tokenizer", "bytes", "--out",
                         str(tmp_path / "out")]) == 1
    assert_one_line_error(capsys.readouterr().err, "No space left on device; free some space and run the same "
                                                   "command again")


# ----------------------------------------------------------------------------- prepare: fineweb-edu10b

def shard(ids):
    header = np.zeros(256, np.int32)
    header[:3] = 20240520, 1, len(ids)
    return header.tobytes() + np.array(ids, np.uint16).tobytes()


def test_prepare_fineweb_shards_download_and_loader(tmp_path, server, capsys):
    rng = np.random.default_rng(0)
    shards = {f"finewebedu_val_{0:06d}.bin": rng.integers(0, 50257, 300),
              f"finewebedu_train_{1:06d}.bin": rng.integers(0, 50257, 500),
              f"finewebedu_train_{2:06d}.bin": rng.integers(0, 50257, 400)}
    for name, ids in shards.items():
        Handler.files[f"/fw/{name}"] = shard(ids)
        Handler.headers_for[f"/fw/{name}"] = {"X-Linked-ETag": f'"{hashlib.sha256(shard(ids)).hexdigest()}"'}
    Handler.headers_for["/fw/finewebedu_train_000002.bin"] = {"X-Linked-ETag": '"' + "e" * 40 + '"'}  # no sha256
    out = tmp_path / "fw"
    argv = ["fineweb-edu10b", "--out", str(out), "--shards", "2", "--base-url", f"{server}/fw"]
    assert prepare.main(argv) == 0
    for name, ids in shards.items():
        assert (out / name).read_bytes() == shard(ids)
    m = meta(out)
    assert {k: m[k] for k in GPT2_META} == GPT2_META
    assert m["splits"] == {"train": {"tokens": 900, "bytes": None}, "val": {"tokens": 300, "bytes": None}}
    data = core.TokenData(str(out))
    assert data.tokens("train") == 900 and len(data.splits["train"]) == 2
    assert prepare.main(argv) == 0 and "nothing to do" in capsys.readouterr().out


def test_prepare_fineweb_corrupt_shards_are_rejected(tmp_path, server, capsys):
    good = shard(range(100))
    Handler.files["/fw/finewebedu_val_000000.bin"] = good[:-2]                       # header says 100 tokens
    out = tmp_path / "fw"
    argv = ["fineweb-edu10b", "--out", str(out), "--shards", "1", "--base-url", f"{server}/fw"]
    assert prepare.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "llm.c shard" in err and looks_valid(out) == []
    Handler.files["/fw/finewebedu_val_000000.bin"] = good                            # whole, but not what HF hashed
    Handler.headers_for["/fw/finewebedu_val_000000.bin"] = {"X-Linked-ETag": '"' + "0" * 64 + '"'}
    assert prepare.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256" in err and looks_valid(out) == []
    Handler.files["/cdn/val"] = Handler.files.pop("/fw/finewebedu_val_000000.bin")   # the hash sent on the redirect
    Handler.moved["/fw/finewebedu_val_000000.bin"] = "/cdn/val"
    assert prepare.main(argv) == 1 and "sha256 differs" in capsys.readouterr().err and looks_valid(out) == []


def test_prepare_fineweb_fewer_shards_than_the_folder_holds_or_a_cut_shard_is_refused(tmp_path, server, capsys):
    for name, n in (("val_000000", 300), ("train_000001", 500), ("train_000002", 400)):
        Handler.files[f"/fw/finewebedu_{name}.bin"] = shard(range(n))
    out = tmp_path / "fw"
    argv = ["fineweb-edu10b", "--out", str(out), "--base-url", f"{server}/fw", "--shards"]
    assert prepare.main(argv + ["2"]) == 0 and meta(out)["splits"]["train"]["tokens"] == 900
    capsys.readouterr()
    assert prepare.main(argv + ["1"]) == 1   # the loader would read both shards: meta would claim 500 tokens
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds 2 train shards" in err and "--shards 2" in err
    assert meta(out)["source"]["shards"] == 2   # the dataset is left as it was
    shutil.rmtree(out)
    out.mkdir()
    (out / "finewebedu_val_000000.bin").write_bytes(shard(range(300))[:-2])   # a cut shard copied in by hand
    assert prepare.main(argv + ["2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "finewebedu_val_000000.bin: not a whole llm.c shard" in err and "delete it" in err


def test_prepare_fineweb_from_parquet_without_pyarrow_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert prepare.main(["fineweb-edu10b", "--from-parquet", "--out", str(tmp_path / "fw")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install pyarrow" in err


def test_prepare_fineweb_from_parquet_tokenizes_like_llmc(tmp_path, server, monkeypatch):
    tok = gpt2()  # skips without the vocabulary
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    texts = [[f"Document {f}.{i}: some educational text on physics and history." for i in range(30)] for f in range(2)]
    for f, t in enumerate(texts):
        buf = io.BytesIO()
        pq.write_table(pa.table({"text": t, "id": [str(i) for i in range(len(t))]}), buf)
        Handler.files[f"/pq/{f:03d}_00000.parquet"] = buf.getvalue()
    monkeypatch.setitem(prepare.FINEWEB, "parquet_files", 2)
    monkeypatch.setitem(prepare.FINEWEB, "shard_tokens", 150)
    out = tmp_path / "fw"
    assert prepare.main(["fineweb-edu10b", "--from-parquet", "--out", str(out), "--shards", "2", "--workers", "2",
                         "--base-url", f"{server}/pq"]) == 0
    stream = [i for t in texts[0] + texts[1] for i in [50256] + tok.encode(t)]   # EOT before each document
    assert len(stream) > 600
    assert (out / "finewebedu_val_000000.bin").read_bytes() == shard(stream[:150])
    assert (out / "finewebedu_train_000002.bin").read_bytes() == shard(stream[300:450])
    assert not (out / "finewebedu_train_000003.bin").exists()   # --shards 2
    assert meta(out)["splits"]["train"]["tokens"] == 300


# ----------------------------------------------------------------------------- prepare: openwebtext

def tar_xz(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def openwebtext_archive():
    """openwebtext/urlsf_subsetNN-M_data.xz (each a tar.xz of .txt documents), stored out of name order."""
    subsets, docs = [], {}
    for s in (2, 1):
        files = [(f"{s:04d}{i:03d}-x.txt", f"Subset {s} doc {i}.\r\n\n\n\nIt ends here.  \n") for i in (9, 3, 5)]
        docs[s] = [t for _, t in sorted(files)]
        subsets.append((f"openwebtext/urlsf_subset00-{s}_data.xz", tar_xz([(n, t.encode()) for n, t in files])))
    # HF's loader: subsets and documents in name order, universal newlines, 3+ newlines squeezed to 2, stripped
    expected = [t.replace("\r\n", "\n").replace("\n\n\n\n", "\n\n").strip() for s in (1, 2) for t in docs[s]]
    return tar_xz(subsets), expected


def test_prepare_openwebtext_download_tokenize_split(tmp_path, server, monkeypatch, capsys):
    tok = gpt2()  # skips without the vocabulary
    blob, texts = openwebtext_archive()
    Handler.files["/owt/openwebtext.tar.xz"] = blob
    monkeypatch.setitem(prepare.OPENWEBTEXT, "sha256", hashlib.sha256(blob).hexdigest())
    monkeypatch.setitem(prepare.OPENWEBTEXT, "val_frac", 0.2)   # 2 of 6 documents to val
    out = tmp_path / "owt"
    # An interrupted tokenization: the run stops after the first subset and the re-run tokenizes only the second.
    calls, encode = [], prepare._encode_subset

    def encode_then_stop(item):
        calls.append(item[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(item)
    monkeypatch.setattr(prepare, "_encode_subset", encode_then_stop)
    argv = ["openwebtext", "--out", str(out), "--base-url", f"{server}/owt", "--workers", "1"]
    assert prepare.main(argv) == 130 and looks_valid(out) == ["openwebtext.tar.xz"]
    assert prepare.main(argv) == 0
    assert calls == ["openwebtext/urlsf_subset00-2_data.xz", "openwebtext/urlsf_subset00-1_data.xz",
                     "openwebtext/urlsf_subset00-1_data.xz"]
    perm = np.random.default_rng(2357).permutation(len(texts))
    n_val = math.ceil(0.2 * len(texts))
    for split, docs in (("val", perm[:n_val]), ("train", perm[n_val:])):
        expect = [i for d in docs for i in tok.encode(texts[d]) + [50256]]
        assert np.fromfile(out / f"{split}.bin", np.uint16).tolist() == expect
        assert meta(out)["splits"][split] == {"tokens": len(expect),
                                              "bytes": sum(len(texts[d].encode()) for d in docs)}
    assert not (out / "tokens.tmp").exists() and not (out / "index.tmp").exists()
    assert core.TokenData(str(out)).tokens("val") == meta(out)["splits"]["val"]["tokens"]


# ----------------------------------------------------------------------------- prepare: errors from the CLI

def test_prepare_http_404_is_one_line_and_leaves_no_empty_folder(tmp_path, server):
    code, out, err = run("enwik8", "--out", tmp_path / "e", "--base-url", f"{server}/nowhere")
    assert code == 1 and err.count("\n") == 1 and "HTTP 404" in err and "nowhere/enwik8.zip" in err
    assert not (tmp_path / "e").exists()
    (tmp_path / "e").mkdir()   # a folder the user made stays, an empty download folder of ours goes
    assert run("enwik8", "--out", tmp_path / "e", "--base-url", f"{server}/nowhere")[0] == 1
    assert os.listdir(tmp_path / "e") == []


def test_prepare_refused_connection_is_one_line(tmp_path):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run("fineweb-edu10b", "--out", tmp_path / "f", "--base-url", f"http://127.0.0.1:{port}")
    assert code == 1 and err.count("\n") == 1 and "Connection refused" in err


def test_prepare_wrong_out_is_one_line(tmp_path, server, capsys):
    (tmp_path / "file").write_text("x")
    assert prepare.main(["enwik8", "--out", str(tmp_path / "file")]) == 1
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text(json.dumps({"source": {"name": "openwebtext"}}))
    assert prepare.main(["enwik8", "--out", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another dataset (openwebtext)" in err


def test_prepare_truncated_xz_is_one_line(tmp_path, capsys):
    with lzma.open(tmp_path / "a.txt.xz", "wt") as f:
        f.write("some text\n" * 5000)
    data = (tmp_path / "a.txt.xz").read_bytes()
    (tmp_path / "a.txt.xz").write_bytes(data[:len(data) // 2])
    assert prepare.main(["text", "--input", str(tmp_path / "a.txt.xz"), "--tokenizer", "bytes", "--out",
                         str(tmp_path / "out"), "--workers", "1"]) == 1
    assert_one_line_error(capsys.readouterr().err, "corrupt or truncated xz file")
    assert not os.path.exists(tmp_path / "out" / "meta.json")


def test_prepare_text_too_short_for_a_val_split_writes_nothing(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("ten chars.")  # its last 5% is no character: no val split
    assert prepare.main(["text", "--input", str(tmp_path / "a.txt"), "--tokenizer", "bytes", "--out",
                         str(tmp_path / "out"), "--workers", "1"]) == 1
    assert_one_line_error(capsys.readouterr().err, "the val split is empty: give more text (or --val)")
    assert not (tmp_path / "out").exists()  # no train.bin that looks like a dataset's


def test_prepare_text_holdout_cuts_at_the_next_line_start_inside_the_document_at_the_cut():
    a = "aaaa\n"
    assert prepare.holdout([a, "bbbb\n"], 0.5) == ([a], ["bbbb\n"])  # documents ending or starting at the cut: whole
    assert prepare.holdout([a, "bb\nbb\n", "cccc\n"], 0.55) == ([a, "bb\n"], ["bb\n", "cccc\n"])
    assert prepare.holdout([a, "bbbbb\n"], 0.3) == ([a, "bbb"], ["bb\n"])  # no line start after the cut: mid-line


def test_prepare_text_pieces_end_after_a_newline_between_two_non_spaces():
    assert list(prepare.pieces("aa\nbb\ncc\ndd", 4)) == ["aa\nbb\n", "cc\ndd"]  # the first such newline past 4
    assert list(prepare.pieces("a\n\nb c\n d", 1)) == ["a\n\nb c\n d"]  # none: GPT-2 may join around it


def test_prepare_text_eot_ends_each_document_an_empty_one_too(monkeypatch):
    tok = gpt2()  # skips without the vocabulary
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 4)  # the first document in two pieces
    ids = prepare.encode_docs(["aa\nbb\ncc", "", "dd"], tok, 1, np.dtype(np.uint16), "tokenize")
    assert ids.tolist() == tok.encode("aa\nbb\ncc") + [50256, 50256] + tok.encode("dd") + [50256]


def test_prepare_download_retries_only_while_a_dropped_connection_makes_progress(tmp_path, monkeypatch):
    """Each retry resumes the .part file, which a run that gives up keeps; a drop that added no bytes, the sixth drop,
    or an HTTP error is reported at once."""
    calls, naps = [], []
    monkeypatch.setattr(prepare.time, "sleep", naps.append)

    def dropping(step, error):   # _get: appends `step` bytes, then fails
        def get(url, part, have):
            calls.append(have)
            with open(part, "ab") as f:
                f.write(b"x" * step)
            raise error
        return get
    http_503 = requests.HTTPError(response=SimpleNamespace(status_code=503, reason="Service Unavailable"))
    for step, error, have, why in (
            (10, requests.exceptions.ChunkedEncodingError(), [0, 10, 20, 30, 40, 50], "connection broken; run the "
             "same command again"),
            (0, requests.ConnectionError("[Errno 111] Connection refused"), [60], "Connection refused; run the same "
             "command again"),
            (10, http_503, [60], "HTTP 503 Service Unavailable")):
        calls.clear()
        monkeypatch.setattr(prepare, "_get", dropping(step, error))
        with pytest.raises(prepare.PrepareError) as e:
            prepare.download("http://host/f.bin", tmp_path / "f.bin")
        assert str(e.value) == f"http://host/f.bin: {why}" and calls == have
    assert naps == [0, 1, 2, 3, 4] and (tmp_path / "f.bin.part").stat().st_size == 70
    assert prepare._why(requests.ReadTimeout("Read timed out. (read timeout=60)")) == "timed out"


def test_prepare_download_shorter_than_the_server_said_is_kept_to_resume(tmp_path, monkeypatch):
    """A body that ends early without an error (urllib3 1.x does not check Content-Length)."""
    monkeypatch.setattr(prepare, "_get", lambda url, part, have: (part.write_bytes(b"abc"), (5, None))[1])
    with pytest.raises(prepare.PrepareError, match="^f.bin: got 3 of 5 bytes; run the same command again to resume$"):
        prepare.download("http://host/f.bin", tmp_path / "f.bin")
    assert (tmp_path / "f.bin.part").read_bytes() == b"abc" and not (tmp_path / "f.bin").exists()


@pytest.mark.parametrize("extra", [0, 5])
def test_prepare_enwik8_part_file_already_whole_is_kept_and_a_longer_one_deleted(tmp_path, enwik8, capsys, extra):
    """The server answers 416 (nothing past the part's end): a whole part is checked and renamed, one longer than
    the file deleted."""
    raw, blob = enwik8
    out = tmp_path / "enwik8"
    part = out / "download" / "enwik8.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(blob + b"x" * extra)
    assert prepare.main(["enwik8", "--out", str(out)]) == (1 if extra else 0)
    assert Handler.seen == [("/enwik8/enwik8.zip", f"bytes={len(blob) + extra}-")] and not part.exists()
    if extra:
        assert_one_line_error(capsys.readouterr().err, f"enwik8.zip: {len(blob) + 5:,} bytes, larger than the "
                              f"server's {len(blob):,}; deleted it, run the same command again to download it anew")
    else:
        assert (out / "download" / "enwik8.zip").read_bytes() == blob and core.TokenData(str(out)).tokens("val")


def test_prepare_fineweb_write_shards_keeps_the_last_partial_shard_and_stops_after_max_train(tmp_path, monkeypatch):
    monkeypatch.setitem(prepare.FINEWEB, "shard_tokens", 4)
    for max_train, names in ((9, ["val_000000", "train_000001", "train_000002", "train_000003", "train_000004"]),
                             (1, ["val_000000", "train_000001"])):
        out = tmp_path / str(max_train)
        out.mkdir()
        prepare.write_shards((np.arange(a, b, dtype=np.uint16) for a, b in ((0, 10), (10, 19))), out, max_train)
        assert sorted(p.name for p in out.iterdir()) == sorted(f"finewebedu_{n}.bin" for n in names)
        for i, n in enumerate(names):
            assert (out / f"finewebedu_{n}.bin").read_bytes() == shard(range(4 * i, min(4 * i + 4, 19)))
            prepare.check_shard(out / f"finewebedu_{n}.bin")
    for at, bad in ((0, 20240521), (1, 2)):   # another magic, another version
        blob = bytearray(shard(range(4)))
        blob[4 * at:4 * at + 4] = np.int32(bad).tobytes()
        (tmp_path / "x.bin.part").write_bytes(blob)
        with pytest.raises(prepare.PrepareError, match=r"^x.bin: not a whole llm.c shard \(bad header or size\)$"):
            prepare.check_shard(tmp_path / "x.bin.part")


def test_prepare_openwebtext_archive_without_documents_is_one_line(tmp_path, capsys):
    gpt2()  # skips without the vocabulary
    archive = tmp_path / "owt" / "download" / "openwebtext.tar.xz"
    archive.parent.mkdir(parents=True)
    archive.write_bytes(tar_xz([]))   # downloaded already: not fetched again
    assert prepare.main(["openwebtext", "--out", str(tmp_path / "owt"), "--workers", "1"]) == 1
    assert_one_line_error(capsys.readouterr().err, "openwebtext.tar.xz: no documents found in it")


@pytest.mark.parametrize("argv,message", [
    (["text", "--input", "missing.txt", "--out", "o"], "error: missing.txt: no such file"),
    (["text", "--input", "a.txt", "--out", "o", "--workers", "0"], "error: --workers must be at least 1"),
    (["fineweb-edu10b", "--out", "o", "--shards", "0"], "error: --shards must be between 1 and 99"),
])
def test_prepare_cli_mistakes_are_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTNLAB_MIRROR", "http://127.0.0.1:9")  # nothing is fetched, even where a check is missing
    assert prepare.main(argv) == 1
    assert_one_line_error(capsys.readouterr().err, message)
    assert os.listdir(tmp_path) == []


# ================================================================================================================
# attn_bias
# Tests of attn_bias.py (Massive Activations sec. 5.2). The GPU-only tests (private cuDNN / flash kernels,
# compiled FlexAttention, compiled model) skip without CUDA.
# ================================================================================================================

@pytest.fixture(scope="module")
def ab_runs(tutorial, tmp_path_factory):
    """The three variants trained for 60 steps through the CLI."""
    return cli_runs(ab.main, tmp_path_factory.mktemp("runs"), {v: ["--variant", v] for v in ab.AttnBiasConfig.VARIANTS},
                    "--data", tutorial, "--max-iters", "60", "--eval-interval", "30")


# ----------------------------------------------------------------------------------------------------------------
# attn_bias: model

def test_attn_bias_variants_train_and_loss_falls(ab_runs):
    for v, path in ab_runs.items():
        log = core.read_log(path)
        assert log[-1]["loss"] < log[0]["loss"] - 1.0, v
        assert log[-1]["val_loss"] < 4.0, v  # uniform bytes: ln 256 = 5.55
        ckpt = core.load_checkpoint(os.path.join(path, "ckpt.pt"))
        assert ckpt["config"]["variant"] == v
        assert ("transformer.h.0.attn.k_bias" in ckpt["model"]) == (v == "attn_bias")
        assert ("reg_token" in ckpt["model"]) == (v == "sink")


def test_attn_bias_training_logs_massive_activation_trends(ab_runs, tutorial, tmp_path, capsys):
    """Every evaluation logs the layerwise top-1 / median |h| and the attention to key 0 of one val window (the same
    numbers as --analyze's layer_stats on that window); --trends plots them against tokens."""
    for v, path in ab_runs.items():
        recs = [r for r in core.read_log(path) if "val_loss" in r]
        assert [r["step"] for r in recs] == [30, 60] and all(len(r["top1"]) == len(r["median"]) == 2 for r in recs)
        assert all(a > m > 0 for a, m in zip(recs[-1]["top1"], recs[-1]["median"]))
        assert all(0 < k < 1 for k in recs[-1]["key0"])
        model = core.load_model(ab.PAPER, os.path.join(path, "ckpt.pt"))
        again = ab.layer_stats(model, [core.TokenData(tutorial).batch("val", 1, 64, model.cfg.seed, 0, 0)])
        assert again["layerwise"]["top1"] == pytest.approx(recs[-1]["top1"], rel=1e-3), v
    assert ab.main(["--trends", "--out", ab_runs["default"], "--runs", ab_runs["sink"], ab_runs["attn_bias"]]) == 0
    assert "top-1 / median" in capsys.readouterr().out
    assert os.path.getsize(os.path.join(ab_runs["default"], "trends.png")) > 10_000
    assert ab.main(["--trends", "--out", str(tmp_path)]) == 2  # no log: one line


def test_attn_bias_gpt2_small_parameter_counts():
    """Spec §1.3: 124,373,760 parameters, +768 (reg_token), +18,432 (k_bias, v_bias x 12 layers)."""
    counts = {}
    for v in ab.AttnBiasConfig.VARIANTS:
        cfg = ab.AttnBiasConfig(**{**ab.AttnBiasConfig.PRESETS["paper"], "vocab_size": 50304, "device": "cpu",
                                   "variant": v})
        with torch.device("meta"):
            counts[v] = sum(p.numel() for p in ab.build_model(cfg).parameters())
    assert counts == dict(default=124_373_760, sink=124_374_528, attn_bias=124_392_192)


def test_attn_bias_new_parameters_are_weight_decayed():
    """Spec §1.1/§7.9: k_bias, v_bias and reg_token are >= 2-D, so nanoGPT decays them; so do we."""
    for v, names in (("sink", {"reg_token"}), ("attn_bias", {"k_bias", "v_bias"})):
        model = ab.build_model(tiny(ab.AttnBiasConfig, variant=v))
        decayed = {id(p) for p in model.configure_optimizers(model.cfg, "cpu")[0].param_groups[0]["params"]}
        extra = [p for n, p in model.named_parameters() if n.split(".")[-1] in names]
        assert extra and all(id(p) in decayed for p in extra)
        assert all(abs(p.std().item() - 0.02) < 0.01 for p in extra)  # N(0, 0.02²) survives the core's init


def test_attn_bias_default_config_trains_the_attn_bias_model():
    """As the original's default config: the paper's method, the attn_bias model."""
    cfg = ab.AttnBiasConfig(device="cpu", vocab_size=256, n_layer=1, n_embd=32, n_head=2)
    assert cfg.variant == "attn_bias"
    assert all(isinstance(b.attn, ab.BiasAttention) for b in ab.build_model(cfg).transformer.h)


# ----------------------------------------------------------------------------------------------------------------
# attn_bias: attention: reference and fast paths

def qkv_inputs(B=2, H=3, T=37, D=16, seed=0):
    """q, k, v as the model makes them (views of one (B, T, 3C) tensor), plus k', v'; all leaves."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, 3 * H * D, generator=g).requires_grad_()
    kb, vb = (torch.randn(1, H, 1, D, generator=g).requires_grad_() for _ in range(2))
    return x, kb, vb


def run_attention(impl, x, kb, vb, H=3):
    attn = ab.BiasAttention(tiny(ab.AttnBiasConfig, n_head=H, n_embd=x.size(-1) // 3, attn_impl=impl), 0)
    with torch.no_grad():
        attn.k_bias.copy_(kb)
        attn.v_bias.copy_(vb)
    q, k, v = (core.split_heads(t, H) for t in x.chunk(3, dim=-1))
    ctx = core.Ctx()
    y = attn.attend(q, k, v, ctx)
    grads = torch.autograd.grad(y.square().sum(), [x, attn.k_bias, attn.v_bias])
    return y.detach(), grads


def test_attn_bias_eager_is_the_papers_formula():
    """Spec §1.1, query by query: o_i = (Σ_{j<=i} e^{s_ij} v_j + e^{s_ib} v') / (Σ_{j<=i} e^{s_ij} + e^{s_ib})."""
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
def test_attn_bias_fast_paths_match_eager(impl, flex_cpu_grad):
    """Outputs and the gradients of q, k, v (through the shared c_attn output), k' and v'. On CPU, cudnn and flash
    run the LSE merge with our backward on the CPU flash kernel; flex folds the bias through its lse."""
    x, kb, vb = qkv_inputs()
    y_ref, g_ref = run_attention("eager", x, kb, vb)
    y, g = run_attention(impl, x, kb, vb)
    assert torch.allclose(y, y_ref, atol=2e-6)
    for name, a, b in zip(("q/k/v", "k'", "v'"), g, g_ref):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-4), (impl, name, (a - b).abs().max())


@pytest.mark.parametrize("variant", ["sink", "attn_bias"])
@pytest.mark.parametrize("impl", ["eager", "sdpa", "flex"])
def test_attn_bias_sink_and_bias_refuse_documents_in_one_line_and_run_one_document_per_row(variant, impl):
    """The sink and k' are positions every document would see: several documents are refused, before the layers (the
    sink's were a size mismatch or an IndexError); one document per row runs the plain model."""
    model = ab.build_model(tiny(ab.AttnBiasConfig, variant=variant, attn_impl=impl)).eval()
    idx = torch.randint(0, 256, (2, 16))
    with torch.no_grad(), pytest.raises(core.ConfigError, match=f"the {variant} variant does not support document"):
        model(idx, doc=torch.tensor([[0] * 8 + [1] * 8, [0] * 16]))
    with torch.no_grad():  # no FlexAttention backward on CPU
        assert torch.equal(model(idx, doc=torch.zeros(2, 16, dtype=torch.long)), model(idx))


def test_attn_bias_prepending_with_top_left_causal_is_wrong():
    """Why the fast paths exist (§7.7): SDPA's is_causal on the prepended key drops each query's own key."""
    x, kb, vb = qkv_inputs()
    y_ref, _ = run_attention("eager", x, kb, vb)
    q, k, v = (core.split_heads(t, 3).detach() for t in x.chunk(3, dim=-1))
    k, v = ab.with_bias_key(k, v, kb.detach(), vb.detach())
    assert not torch.allclose(F.scaled_dot_product_attention(q, k, v, is_causal=True), y_ref, atol=1e-2)


def test_attn_bias_probe_accepts_a_correct_kernel_and_rejects_a_broken_one(monkeypatch, capsys):
    ab.probe_kernel.cache_clear()
    assert ab.probe_kernel("cpu", "cpu", 16)
    fwd, bwd = ab.KERNELS["cpu"]
    monkeypatch.setitem(ab.KERNELS, "broken", (fwd, lambda *a, **k: [g * 0.5 for g in bwd(*a, **k)]))
    assert not ab.probe_kernel("broken", "cpu", 16)
    ab.probe_kernel.cache_clear()
    assert "failed its parity check" in capsys.readouterr().err


@pytest.mark.parametrize("variant,impl", [("default", "sdpa"), ("sink", "sdpa"), ("sink", "eager"),
                                          ("attn_bias", "eager"), ("attn_bias", "sdpa"), ("attn_bias", "flex"),
                                          ("attn_bias", "cudnn")])
def test_attn_bias_causality(variant, impl):
    torch.manual_seed(0)
    model = ab.build_model(tiny(ab.AttnBiasConfig, variant=variant, attn_impl=impl)).eval()
    idx = torch.randint(0, 256, (2, 40))
    t = 23
    idx2 = idx.clone()
    idx2[:, t:] = (idx[:, t:] + 7) % 256
    with torch.no_grad():
        a, b = model(idx), model(idx2)
    assert torch.allclose(a[:, :t], b[:, :t], atol=1e-6)
    assert not torch.allclose(a[:, t], b[:, t])


def test_attn_bias_sink_never_reaches_the_logits():
    torch.manual_seed(0)
    model = ab.build_model(tiny(ab.AttnBiasConfig, variant="sink")).eval()
    idx = torch.randint(0, 256, (2, 20))
    tr = model.transformer
    with torch.no_grad():
        logits = model(idx)
        assert logits.shape == (2, 20, 256)
        # by hand: sink first, blocks over 21 positions, final norm, drop the sink, tied head
        x = torch.cat((model.reg_token.expand(2, 1, -1), tr.wte(idx) + tr.wpe(torch.arange(20))), dim=1)
        ctx = core.Ctx()
        for block in tr.h:
            x = block(x, ctx)
        assert torch.allclose(logits, tr.norm_f(x)[:, 1:] @ tr.wte.weight.T, atol=1e-5)
        y = torch.randint(0, 256, (2, 20))
        assert torch.allclose(model(idx, y), F.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)), atol=1e-6)
        model.reg_token.mul_(50)  # the sink is used: it changes every position's logits
        assert not torch.allclose(model(idx), logits, atol=1e-3)
        assert model.generate(idx[:, :5], 3).shape == (2, 8)


# ----------------------------------------------------------------------------------------------------------------
# attn_bias: the paper's published checkpoints (spec §6)

def ab_published(variant, L=2, H=2, C=32, V=256, Tb=16, prefix="", seed=0):
    """A checkpoint in the nanoGPT format of the published models, key names and shapes from the spec's table."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std
    wte = r(V, C)
    sd = {"transformer.wte.weight": wte, "transformer.wpe.weight": r(Tb, C)}
    for i in range(L):
        h = f"transformer.h.{i}."
        sd.update({h + "ln_1.weight": 1 + r(C), h + "attn.c_attn.weight": r(3 * C, C),
                   h + "attn.c_proj.weight": r(C, C), h + "ln_2.weight": 1 + r(C),
                   h + "mlp.c_fc.weight": r(4 * C, C), h + "mlp.c_proj.weight": r(C, 4 * C),
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


def test_attn_bias_published_key_counts():
    """Spec §6: 76, 77 and 100 keys for the 12-layer models (mask buffers aside)."""
    for v, n in (("default", 76), ("sink", 77), ("attn_bias", 100)):
        keys = [k for k in ab_published(v, L=12, H=2, C=8, V=16, Tb=4)["model"] if not k.endswith(".attn.bias")]
        assert len(keys) == n, v


@pytest.mark.parametrize("variant", ["default", "sink", "attn_bias"])
@pytest.mark.parametrize("prefix", ["", "_orig_mod."])
def test_attn_bias_published_checkpoint_reproduces_nanogpt(variant, prefix, tmp_path):
    ckpt = ab_published(variant, prefix=prefix)
    path = str(tmp_path / "ckpt_50000.pt")
    torch.save(ckpt, path)
    model = core.load_model(ab.PAPER, path)
    assert model.cfg.variant == variant and not model.training
    idx = torch.randint(0, 256, (2, 16))
    ref = nanogpt_forward({k[len(prefix):]: v for k, v in ckpt["model"].items()}, ckpt["model_args"], idx)
    with torch.no_grad():
        assert torch.allclose(model(idx), ref, atol=1e-4)
        for impl in ("sdpa", "flex", "cudnn")[:3 if variant == "attn_bias" else 2]:
            model.cfg.attn_impl = impl
            assert torch.allclose(model(idx), ref, atol=1e-4), impl


def test_attn_bias_published_checkpoint_takes_its_biases_and_dropout_and_ties_a_missing_head(tmp_path):
    ckpt = ab_published("default")
    ckpt["model_args"].update(bias=True, dropout=0.1)
    sd = ckpt["model"]
    for k in [k for k in sd if k.endswith(".weight") and k.startswith(("transformer.h.", "transformer.ln_f."))]:
        sd[k[:-len("weight")] + "bias"] = torch.randn(len(sd[k]))
    del sd["lm_head.weight"]  # tied: the head is wte
    torch.save(ckpt, tmp_path / "c.pt")
    model = core.load_model(ab.PAPER, str(tmp_path / "c.pt"))
    assert (model.cfg.bias, model.cfg.dropout) == (True, 0.1)
    h = model.transformer.h[1]
    assert torch.equal(h.mlp.c_fc.bias, sd["transformer.h.1.mlp.c_fc.bias"])
    assert torch.equal(h.norm_1.bias, sd["transformer.h.1.ln_1.bias"])
    assert torch.equal(model.lm_head.weight, sd["transformer.wte.weight"])


def test_attn_bias_published_default_with_bias_keys_loads_as_attn_bias(tmp_path, capsys):
    """§7.1: the default train config trained attn_bias; the weights, not config['model_type'], decide."""
    ckpt = ab_published("attn_bias")
    ckpt["config"]["model_type"] = "gpt2_default"
    torch.save(ckpt, tmp_path / "c.pt")
    assert core.load_model(ab.PAPER, str(tmp_path / "c.pt")).cfg.variant == "attn_bias"
    assert "the weights are the attn_bias model" in capsys.readouterr().err


def test_attn_bias_cli_eval_published_and_user_mistakes(tutorial, tmp_path, capsys):
    torch.save(ab_published("sink", Tb=64), tmp_path / "sink.pt")
    argv = ["--eval", "--init-from", str(tmp_path / "sink.pt"), "--device", "cpu", "--eval-tokens", "2000"]
    assert ab.main(argv + ["--data", tutorial]) == 2   # the paper's models read GPT-2 tokens, not bytes
    assert_one_line_error(capsys.readouterr().err, "holds bytes tokens (256); the model was trained on gpt2:")
    gpt2 = tutorial_as(tmp_path / "gpt2", "gpt2")
    assert ab.main(argv + ["--data", gpt2]) == 0
    out = capsys.readouterr().out
    assert "ppl" in out and "bits/tok" in out and out.startswith(f"attn_bias/sink on {gpt2}")
    loss, ppl, bits = map(float, out.splitlines()[2].split()[2:5])
    assert abs(ppl - math.exp(loss)) < 1e-2 * ppl and abs(bits - loss / math.log(2)) < 1e-3
    bad = dict(state=torch.zeros(1))
    torch.save(bad, tmp_path / "bad.pt")
    for args, msg in ((["--eval", "--init-from", str(tmp_path / "nope.pt")], "checkpoint not found"),
                      (["--eval", "--init-from", str(tmp_path / "bad.pt")], "not a checkpoint"),
                      (["--train", "--variant", "sinks"], "invalid choice"),
                      (["--train", "--attn-impl", "fast"], "--attn-impl must be one of")):
        assert ab.main(args + ["--data", tutorial, "--device", "cpu"]) == 2
        assert_one_line_error(capsys.readouterr().err, msg)


def test_attn_bias_published_checkpoint_of_other_sizes_is_one_line_error(tmp_path, tutorial, capsys):
    ckpt = ab_published("attn_bias")
    ckpt["model"]["transformer.h.0.attn.k_bias"] = torch.zeros(1, 4, 1, 8)  # 4 heads in a 2-head checkpoint
    torch.save(ckpt, tmp_path / "c.pt")
    assert ab.main(["--eval", "--init-from", str(tmp_path / "c.pt"), "--data", tutorial, "--device", "cpu"]) == 2
    assert "k_bias" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# attn_bias: analysis

def test_attn_bias_paper_preset_is_the_repositorys_recipe():
    c = ab.AttnBiasConfig(**ab.AttnBiasConfig.PRESETS["paper"], vocab_size=50304, device="cpu")
    assert c.batch_size * c.grad_accum * c.block_size == 491_520  # 12 x 1024 x 40
    assert (c.max_iters, c.lr_decay_iters, c.warmup_iters, c.lr, c.min_lr) == (50000, 600000, 2000, 6e-4, 6e-5)
    assert c.lr * core.lr_mult(c.max_iters - 1, c) == pytest.approx(5.91e-4, rel=2e-3)  # never annealed (spec)


def test_attn_bias_short_preset_is_a_full_cosine_over_800_steps():
    """The docstring's one-GPU minute: 124M at T=1024, 12,288 tokens a step, a full cosine over 800 steps."""
    c = ab.AttnBiasConfig(**ab.AttnBiasConfig.PRESETS["short"], device="cpu")
    assert c.batch_size * c.grad_accum * c.block_size == 12_288 and (c.max_iters, c.warmup_iters) == (800, 100)
    assert core.lr_mult(799, c) > 0.1 + 1e-6 and core.lr_mult(800, c) == pytest.approx(0.1)


def test_attn_bias_layer_stats_are_the_direct_statistics():
    """Over two windows: the means of top-1/2/3, mean and median |h| of each block's output, of the attention of
    queries 1..T-1 to key 0 and to the first real token (key 1 when a sink or bias key comes first), from the recorded
    probabilities, and of the loss; four significant digits; in eval mode, the model's own mode restored."""
    for v in ("default", "sink", "attn_bias"):
        torch.manual_seed(0)
        model = ab.build_model(tiny(ab.AttnBiasConfig, variant=v, dropout=0.2))  # measured without dropout
        windows = [(torch.randint(0, 256, (1, 4)), torch.randint(0, 256, (1, 4))) for _ in range(2)]  # 256 |h| each
        s = ab.layer_stats(model, windows)
        assert model.training
        ab.layer_stats(model.eval(), windows[:1])
        assert not model.training
        want = collections.defaultdict(lambda: np.zeros(model.cfg.n_layer))
        first, loss = 0 if v == "default" else 1, 0.0
        for x, y in windows:
            outs, probs = [], {}
            hooks = [b.register_forward_hook(lambda m, a, o: outs.append(o)) for b in model.transformer.h]
            with torch.no_grad():
                loss += model.eval()(x, y, record=lambda layer, p: probs.__setitem__(layer, p)).item() / 2
            for h in hooks:
                h.remove()
            for layer, h in enumerate(outs):
                a = np.sort(h.abs().flatten().numpy())[::-1]
                for k, value in zip(("top1", "top2", "top3", "mean", "median"),
                                    (a[0], a[1], a[2], a.mean(), np.sort(a)[(len(a) - 1) // 2])):
                    want[k][layer] += value / 2
                want["key0"][layer] += probs[layer][:, :, 1:, 0].mean().item() / 2
                want["first_token"][layer] += probs[layer][:, :, 1:, first].mean().item() / 2
        for k in ("top1", "top2", "top3", "mean", "median"):
            assert s["layerwise"][k] == pytest.approx(list(want[k]), rel=1e-3), (v, k)
        for k in ("key0", "first_token"):
            assert s["attention"][k] == pytest.approx(list(want[k]), rel=1e-3), (v, k)
        assert s["loss"] == pytest.approx(loss, rel=1e-5)
        assert all(x == float(f"{x:.4g}") for k in ("top1", "mean") for x in s["layerwise"][k])  # 4 digits
        assert any(x != float(f"{x:.3g}") for x in s["layerwise"]["top1"] + s["attention"]["key0"])


def ab_saved_run(tmp_path, data, variant="sink", n_layer=7, ms=(900.0, 10.0, 30.0, 20.0)):
    """A tiny model of n_layer blocks saved as a run folder (ckpt.pt) whose log holds step times `ms` (the first
    compiles) and a last val loss of 2.5."""
    torch.manual_seed(0)
    model = ab.build_model(tiny(ab.AttnBiasConfig, variant=variant, n_layer=n_layer, data=data))
    run = tmp_path / f"{variant}-{n_layer}"
    os.makedirs(run)
    core.save_checkpoint(str(run / "ckpt.pt"), dict(format="attnlab", script="attn_bias", model=model.state_dict(),
                                                   config=dataclasses.asdict(model.cfg),
                                                   data=core.TokenData(data).info()))
    (run / "log.jsonl").write_text("".join(json.dumps(dict(step=10 * (i + 1), ms=t, val_loss=2.5 if i == 1 else None))
                                           + "\n" for i, t in enumerate(ms)))
    return str(run), model.eval()


def test_attn_bias_analyze_model_of_a_deep_model_and_its_log(tmp_path, tutorial):
    """analyze_model: the prompt's block is the 6th (index 5) of a 7-block model, |h| of its output over the prompt's
    positions (the sink first); the step time is the median of the logged steps after the first (which compiles);
    the window loss the mean over the N_WINDOWS val windows; the run's last logged val loss."""
    run, model = ab_saved_run(tmp_path, tutorial)
    data, tok = core.TokenData(tutorial), core.get_tokenizer("bytes")
    r = ab.analyze_model(os.path.join(run, "ckpt.pt"), data, tok, 1337, torch.device("cpu"))
    assert r["step_ms"] == 20.0 and r["val_loss_log"] == 2.5 and r["n_layer"] == 7 and r["windows"] == ab.N_WINDOWS
    out = []
    hook = model.transformer.h[5].register_forward_hook(lambda m, a, o: out.append(o))
    with torch.no_grad():
        model(torch.tensor([list(ab.PROMPT.encode())]))
    hook.remove()
    assert r["prompt"]["layer"] == 5 and r["prompt"]["tokens"] == ["<sink>", *ab.PROMPT]
    assert np.allclose(r["prompt"]["abs"], out[0][0].abs().numpy(), rtol=1e-3, atol=1e-6)
    loss = 0.0
    for i in range(ab.N_WINDOWS):
        x, y = data.batch("val", 1, 64, 1337, 0, i)
        with torch.no_grad():
            loss += model(x, y).item() / ab.N_WINDOWS
    assert r["window_loss"] == pytest.approx(loss, rel=1e-3)
    assert r["measured_on"] == dict(name=os.path.basename(tutorial), tokenizer="bytes",
                                    val_tokens=len(open(os.path.join(tutorial, "val.bin"), "rb").read()), seed=1337)


def ab_result(variant, n_layer, top1, median, key0, step_ms, val_loss_log, window_loss=3.0):
    """A hand-made analyze_model result (what a run folder keeps in activations.json)."""
    L = n_layer
    return dict(source=f"runs/{variant}/ckpt.pt", variant=variant, n_layer=L, window_loss=window_loss, windows=10,
                val_loss_log=val_loss_log, step_ms=step_ms, measured_on=None,
                layerwise=dict(top1=top1, top2=top1, top3=top1, mean=median, median=median),
                attention=dict(key0=key0, first_token=[k / 2 for k in key0]),
                prompt=dict(layer=0, tokens=["a"], abs=[[1.0, 2.0]]))


def test_attn_bias_analyze_table_is_the_json_and_x_default_the_step_time_ratio(tmp_path, tutorial, capsys):
    """The printed table of kept results: the run's last logged val loss (else the windows' loss), the largest top-1
    over the layers, its layer (from 1), the median there, their ratio, the attention to key 0 averaged over the
    layers, the step time and its ratio to the default run's; each row names the run folder given (its result was
    measured where it trained: runs/...)."""
    data = core.TokenData(tutorial)
    kept = {"sink": ab_result("sink", 4, [5.0, 80.0, 60.0, 40.0], [1.0, 2.0, 4.0, 0.5], [0.2, 0.5, 0.6, 0.9], 30.0,
                              2.5),
            "default": ab_result("default", 3, [3.0, 7.0, 9.0], [1.0, 0.25, 3.0], [0.1, 0.2, 0.6], 20.0, None, 3.25)}
    for v, r in kept.items():
        os.makedirs(tmp_path / v)
        r["measured_on"] = ab.measured_on(data, 1337)
        json.dump(r, open(tmp_path / v / "activations.json", "w"))
        (tmp_path / v / "log.jsonl").write_text(json.dumps(dict(step=1, val_loss=r["val_loss_log"])) + "\n")
    capsys.readouterr()
    assert ab.main(["--analyze", "--runs", str(tmp_path / "sink"), str(tmp_path / "default"), "--data", tutorial,
                    "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0
    rows = [row.split() for row in capsys.readouterr().out.splitlines()[2:4]]
    assert rows == [["sink", "2.5000", "80.0", "2", "2.000", "40.0", "0.550", "30.0", "1.50", f"{tmp_path}/sink"],
                    ["default", "3.2500", "9.0", "3", "3.000", "3.0", "0.300", "20.0", "1.00", f"{tmp_path}/default"]]
    res = json.load(open(tmp_path / "o" / "analysis.json"))["results"]
    assert [r["x_default"] for r in res] == [1.5, 1.0]


def test_attn_bias_plot_analysis_draws_the_json(tmp_path, saved_figures):
    """plot_analysis from hand-made results: top-1/2/3 and median against layers 1..L, the prompt's block named from
    1, attention to key 0 of each run and to the first real token where a sink or bias key comes first."""
    on = dict(name="d", seed=1)
    res = [dict(variant=v, n_layer=L, source=f"runs/{v}/ckpt.pt", windows=10, measured_on=on,
                layerwise={k: [float(10 * i + j) for j in range(L)] for i, k in enumerate(
                    ("top1", "top2", "top3", "mean", "median"))},
                attention=dict(key0=[0.1 * (j + 1) for j in range(L)], first_token=[0.01 * (j + 1) for j in range(L)]),
                prompt=dict(layer=L - 1, tokens=list("ab"), abs=[[1.0, 2.0], [3.0, 4.0]]))
           for v, L in (("default", 3), ("attn_bias", 4))]
    ab.plot_analysis(res, str(tmp_path))
    figs = {name: fig for name, fig, _ in saved_figures}
    for ax, r in zip(figs["layerwise.png"].axes, res):
        L = r["n_layer"]
        assert [list(line.get_xdata()) for line in ax.lines] == [list(range(1, L + 1))] * 4
        assert [list(line.get_ydata()) for line in ax.lines] == [r["layerwise"][k] for k in
                                                                 ("top1", "top2", "top3", "median")]
        assert list(ax.get_xticks()) == ab.layer_ticks(L)
    assert [a.get_title() for a in figs["prompt_layer.png"].axes] == ["GPT-2 Default\nblock 3 output",
                                                                       "GPT-2 with Attention Bias\nblock 4 output"]
    ax = figs["attention.png"].axes[0]
    assert [line.get_label() for line in ax.lines] == ["default: first token", "attn_bias: bias key k'",
                                                       "attn_bias: first token"]
    assert [list(line.get_ydata()) for line in ax.lines] == [res[0]["attention"]["key0"], res[1]["attention"]["key0"],
                                                             res[1]["attention"]["first_token"]]
    assert list(ax.lines[2].get_xdata()) == [1, 2, 3, 4] and ab.layer_ticks(12) == [1, 3, 6, 9, 12]
    assert ab.layer_ticks(7) == [1, 3, 6, 7]


def test_attn_bias_trends_are_the_logged_top1_ratio_and_key0_attention(tmp_path, capsys, saved_figures):
    """--trends: per evaluation the largest top-1 over the layers, the largest top-1 / median ratio and the mean
    attention to key 0, against training tokens (the first two on log axes); the printed line is of the last
    evaluation, with the largest top-1 the run reached."""
    logs = {"a": [dict(step=1, tokens=1000, top1=[4.0, 30.0], median=[1.0, 2.0], key0=[0.2, 0.4]),
                  dict(step=2, tokens=2000, top1=[50.0, 9.0], median=[2.0, 3.0], key0=[0.1, 0.6]),
                  dict(step=3, tokens=2500, loss=3.0),
                  dict(step=4, tokens=3000, top1=[20.0, 10.0], median=[2.0, 1.0], key0=[0.5, 0.5])],
            "b": [dict(step=1, tokens=500, top1=[6.0, 2.0], median=[3.0, 0.5], key0=[0.3, 0.0])]}
    for name, recs in logs.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    capsys.readouterr()
    assert ab.main(["--trends", "--out", str(tmp_path / "a"), "--runs", str(tmp_path / "b")]) == 0
    printed = capsys.readouterr().out
    assert "a: 3,000 tokens, top-1 20.0 (largest 50.0), top-1 / median 10.0x, attention to key 0 0.500\n" in printed
    assert "b: 500 tokens, top-1 6.0 (largest 6.0), top-1 / median 4.0x, attention to key 0 0.150\n" in printed
    fig = saved_figures[0][1]
    top1, ratio, key0 = fig.axes
    assert [line.get_xydata().tolist() for line in top1.lines] == [[[1000, 30], [2000, 50], [3000, 20]], [[500, 6]]]
    assert [line.get_xydata().tolist() for line in ratio.lines] == [[[1000, 15], [2000, 25], [3000, 10]], [[500, 4]]]
    assert [line.get_xydata().tolist() for line in key0.lines] == [
        [[1000, pytest.approx(0.3)], [2000, 0.35], [3000, 0.5]], [[500, 0.15]]]
    assert (top1.get_yscale(), ratio.get_yscale(), key0.get_yscale()) == ("log", "log", "linear")


def test_attn_bias_analyze_writes_json_and_plots(ab_runs, tutorial, tmp_path):
    out = str(tmp_path / "ma")
    assert ab.main(["--analyze", "--runs", *ab_runs.values(), "--data", tutorial, "--out", out, "--device", "cpu"]) == 0
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
    assert res["sink"]["x_default"] == pytest.approx(res["sink"]["step_ms"] / res["default"]["step_ms"], abs=1e-3)
    # top-1 of the last block, recomputed: max |h| over the same windows (sink included), averaged
    model = core.load_model(ab.PAPER, os.path.join(ab_runs["sink"], "ckpt.pt"))
    data = core.TokenData(tutorial)
    top = 0.0
    for i in range(ab.N_WINDOWS):
        x, _ = data.batch("val", 1, model.cfg.block_size, model.cfg.seed, 0, i)
        with torch.no_grad():
            h = model.transformer.drop(model.embed(x, None))
            ctx = core.Ctx()
            for block in model.transformer.h:
                h = block(h, ctx)
        top += h.abs().max().item() / ab.N_WINDOWS
    assert abs(res["sink"]["layerwise"]["top1"][-1] - top) < 1e-3 * top


def test_attn_bias_analyze_names_its_data_and_tells_runs_of_one_variant_apart(ab_runs, tutorial, tmp_path, capsys,
                                                                              saved_figures):
    """The figures name the val windows they average; two runs of one variant are told apart by their folders in the
    panels (inside them) and the legend, by their checkpoints in the table (both were 'GPT-2 Default', 'default')."""
    twin = str(shutil.copytree(ab_runs["default"], tmp_path / "a_long_folder_name_for_the_second_run_of_default"))
    assert ab.main(["--analyze", "--runs", ab_runs["default"], twin, "--data", tutorial, "--out", str(tmp_path / "o"),
                    "--device", "cpu"]) == 0
    texts = {name: figure_text(fig, legends=True) for name, fig, _ in saved_figures}
    for name, fig, _ in saved_figures:  # the panels' titles inside the figure, apart
        titles = [a.title for a in fig.axes if a.get_title()]
        boxes = [t.get_window_extent(renderer(fig)) for t in titles]
        assert inside(fig, titles) and not any(t.overlaps(u) for i, t in enumerate(boxes) for u in boxes[i + 1:]), name
    where = "".join(f"{ab.N_WINDOWS} val windows of {os.path.basename(tutorial)} (--seed 1337)".split())
    assert where in texts["layerwise.png"] and where in texts["attention.png"]
    twin_name = os.path.basename(twin)
    assert "default(default):firsttoken" in texts["attention.png"]  # the legend: each run's folder
    assert f"default({twin_name}):firsttoken" in texts["attention.png"] and len(texts) == 3
    assert all(f"GPT-2Default{twin_name}" in texts[f] for f in ("layerwise.png", "prompt_layer.png"))  # the panels
    a, b = (os.path.join(run, "ckpt.pt") for run in (ab_runs["default"], twin))
    rows = capsys.readouterr().out.splitlines()[2:4]  # the table: each run's checkpoint
    assert rows[0].startswith("default") and rows[0].endswith(a) and rows[1].endswith(b)


def test_attn_bias_analyze_keeps_each_runs_result_for_runs_without_a_checkpoint(ab_runs, tutorial, tmp_path, capsys):
    """Each run trained in its own GPU lease: its result kept in its folder draws the three-model figure later."""
    runs = {v: shutil.copytree(p, tmp_path / v) for v, p in ab_runs.items()}
    analyze = lambda out: ab.main(["--analyze", "--runs", *map(str, runs.values()), "--data", tutorial, "--out",
                                   str(tmp_path / out), "--device", "cpu"])
    assert analyze("first") == 0
    first = json.load(open(tmp_path / "first" / "analysis.json"))["results"]
    for v, run in runs.items():
        kept = json.load(open(run / "activations.json"))
        assert kept == {k: x for k, x in next(r for r in first if r["variant"] == v).items() if k != "x_default"}
        (run / "ckpt.pt").unlink()  # the logs and the kept results came back, the checkpoints did not
    assert analyze("again") == 0
    again = json.load(open(tmp_path / "again" / "analysis.json"))["results"]
    assert [r["source"] for r in again] == [str(run) for run in runs.values()]  # each run's folder, as named here
    assert [dict(r, source=None) for r in again] == [dict(r, source=None) for r in first]
    assert os.path.getsize(tmp_path / "again" / "layerwise.png") > 10_000
    log = runs["sink"] / "log.jsonl"  # the run was trained again: its kept result is of an earlier model
    logged, recs = log.read_text(), core.read_log(str(log))
    recs[-1]["val_loss"] += 0.5
    log.write_text("".join(json.dumps(r) + "\n" for r in recs))
    capsys.readouterr()
    assert analyze("stale") == 2
    assert_one_line_error(capsys.readouterr().err, "earlier model than the run's log")
    log.write_text(logged)
    other = write_dataset(tmp_path / "other", text_splits(tutorial_bytes(), 0.2))  # other val windows
    assert ab.main(["--analyze", "--runs", str(runs["sink"]), "--data", other, "--out", str(tmp_path / "o"),
                    "--device", "cpu"]) == 2
    assert_one_line_error(capsys.readouterr().err, "activations.json was measured on tutorial")
    (runs["sink"] / "activations.json").unlink()
    assert analyze("none") == 2
    assert_one_line_error(capsys.readouterr().err, "checkpoint not found")



def test_attn_bias_analyze_of_a_damaged_kept_result_is_one_line(tutorial, tmp_path, capsys):
    """A run folder without its checkpoint whose activations.json was cut short (a copy that stopped) or holds no
    result: one line (it was a JSONDecodeError or AttributeError traceback), nothing written."""
    run = tmp_path / "sink"
    os.makedirs(run)
    (run / "log.jsonl").write_text(json.dumps(dict(step=1, val_loss=2.5)) + "\n")
    kept = json.dumps(ab_result("sink", 2, [1.0, 2.0], [1.0, 1.0], [0.1, 0.2], 3.0, 2.5))
    for text in (kept[:100], "[1, 2]"):
        (run / "activations.json").write_text(text)
        assert ab.main(["--analyze", "--runs", str(run), "--data", tutorial, "--out", str(tmp_path / "o"),
                        "--device", "cpu"]) == 2
        assert_one_line_error(capsys.readouterr().err, f"{run / 'activations.json'}: not a result of --analyze")
    assert not (tmp_path / "o").exists()

# ----------------------------------------------------------------------------------------------------------------
# attn_bias: GPU: the private kernels, compiled FlexAttention, the compiled model

def gpu_case(T, H=12, D=64, B=2, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    x = torch.randn(B, T, 3 * H * D, device="cuda", generator=g)
    kb, vb = (torch.randn(1, H, 1, D, device="cuda", generator=g) for _ in range(2))
    return x, kb, vb


def gpu_grads(fn, x, kb, vb, dtype, H=12):
    x = x.detach().to(dtype).requires_grad_()  # a fresh leaf per call
    kb, vb = kb.detach().clone().requires_grad_(), vb.detach().clone().requires_grad_()
    q, k, v = (core.split_heads(t, H) for t in x.chunk(3, dim=-1))
    y = fn(q, k, v, kb, vb)
    y.float().square().sum().backward()
    return [y.float(), x.grad.float(), kb.grad, vb.grad]


def rel_errors(a, b):
    return [((u - w).norm() / w.norm()).item() for u, w in zip(a, b)]


@gpu
@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
@pytest.mark.parametrize("T", [37, 1024])
def test_attn_bias_gpu_private_kernels_match_eager(kernel, T):
    x, kb, vb = gpu_case(T)
    ref = gpu_grads(ab.masked_bias_attention, x, kb, vb, torch.float32)
    out = gpu_grads(lambda *a: ab.BiasKeyAttention.apply(*a, kernel), x, kb, vb, torch.bfloat16)
    assert max(rel_errors(out, ref)) < 2e-2, rel_errors(out, ref)


@gpu
def test_attn_bias_gpu_compiled_flex_matches_eager():
    """core.flex_attention compiles FlexAttention on CUDA; the merge's gradient flows through its lse."""
    from torch.nn.attention.flex_attention import create_block_mask
    x, kb, vb = gpu_case(1000)
    mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, 1000, 1000, device="cuda")
    ref = gpu_grads(ab.masked_bias_attention, x, kb, vb, torch.float32)
    out = gpu_grads(lambda *a: ab.flex_bias_attention(*a, mask), x, kb, vb, torch.bfloat16)
    assert max(rel_errors(out, ref)) < 2e-2, rel_errors(out, ref)


@gpu
def test_attn_bias_gpu_auto_picks_the_checked_cudnn_kernel():
    model = ab.build_model(ab.AttnBiasConfig(variant="attn_bias", n_layer=2, n_head=2, n_embd=128, vocab_size=256,
                                             device="cuda"))
    assert model.transformer.h[0].attn.impl(torch.device("cuda")) == "cudnn"
    assert model.transformer.h[1].attn.kernel_ok["cudnn", 64], "the cuDNN merge failed its parity probe: flex"


@gpu
@pytest.mark.parametrize("impl", ["cudnn", "flex"])
def test_attn_bias_gpu_compiled_model_matches_eager(impl):
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


@gpu
@pytest.mark.skipif(core.flash_attn_func is None, reason="flash-attn is not installed")
def test_attn_bias_gpu_flash_attn_package_bottom_right_causal_is_exact():
    x, kb, vb = gpu_case(1000)
    attn = ab.BiasAttention(ab.AttnBiasConfig(n_head=12, n_embd=768, attn_impl="flash", device="cuda"), 0).cuda()
    with torch.no_grad():
        attn.k_bias.copy_(kb)
        attn.v_bias.copy_(vb)
        q, k, v = (core.split_heads(t, 12) for t in x.chunk(3, dim=-1))
        ref = ab.masked_bias_attention(q, k, v, kb, vb)
        out = attn.attend_flash(q.bfloat16(), k.bfloat16(), v.bfloat16(), core.Ctx())
    assert rel_errors([out.float()], [ref])[0] < 2e-2


# ================================================================================================================
# cogformer
# cogformer tests. test_cogformer_triton_kernel_matches_eager_in_interpreter loads this file in a subprocess for
# rand_qkv, rand_doc, attend, cog_grads and tiny: keep module-level code free of side effects.
# ================================================================================================================

def rand_qkv(B, H, T, D, seed=0, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [(scale * torch.randn(B, H, T, D, generator=g)).to(device, dtype).requires_grad_() for _ in range(3)]


def rand_doc(B, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.cumsum((torch.rand(B, T, generator=g) < 0.08).long(), dim=1)  # (B, T) document ids


def attend(impl, q, k, v, doc=None, record=None):
    attn = cg.CogAttention(tiny(cg.CogConfig), 1)
    return getattr(attn, "attend_" + impl)(q, k, v, core.Ctx(doc=doc, record=record))


def cog_grads(y, inputs, seed=1):
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    return torch.autograd.grad(y, inputs, g)


# ----------------------------------------------------------------------------------------------------------------
# cogformer: the math


@pytest.mark.parametrize("with_doc", [False, True])
def test_cogformer_flex2x_matches_eager_outputs_and_grads(flex_cpu_grad, with_doc):
    q, k, v = rand_qkv(2, 2, 100, 16, scale=2.0)  # T = 100: not a multiple of flex's 128 blocks
    doc = rand_doc(2, 100) if with_doc else None
    ye, yf = attend("eager", q, k, v, doc), attend("flex2x", q, k, v, doc)
    torch.testing.assert_close(yf, ye, atol=2e-5, rtol=1e-5)
    for gf, ge in zip(cog_grads(yf, (q, k, v)), cog_grads(ye, (q, k, v))):
        torch.testing.assert_close(gf, ge, atol=5e-5, rtol=1e-4)


def test_cogformer_flex2x_matches_eager_where_scores_are_exactly_zero(flex_cpu_grad):
    """A score of exactly 0 has sign 0 but e^0 in the denominator (eager, Triton): flex2x counts it too. Here a key
    of zeros scores 0 for every query, and a query of zeros scores 0 against every key."""
    q, k, v = rand_qkv(1, 2, 20, 16)
    zero_k, zero_q = torch.ones(1, 1, 20, 1), torch.ones(1, 1, 20, 1)
    zero_k[:, :, 3], zero_q[:, :, 7] = 0, 0
    ye, yf = (attend(impl, q * zero_q, k * zero_k, v) for impl in ("eager", "flex2x"))
    torch.testing.assert_close(yf, ye, atol=2e-5, rtol=1e-5)
    for gf, ge in zip(cog_grads(yf, (q, k, v)), cog_grads(ye, (q, k, v))):
        torch.testing.assert_close(gf, ge, atol=5e-5, rtol=1e-4)


def test_cogformer_masked_keys_get_zero_weight_even_with_huge_negative_scores():
    """Pitfall 1: masking s to -inf before the abs would give masked (future) keys the largest weight."""
    T, D = 12, 16
    q = torch.ones(1, 1, T, D)
    k = torch.ones(1, 1, T, D) * torch.where(torch.arange(T) < 4, 0.5, -5.0)[:, None]  # s = 2, later keys s = -20
    doc = torch.tensor([[0] * 6 + [1] * 6])
    seen = {}
    y = attend("eager", q, k, torch.randn(1, 1, T, D), doc, record=lambda layer, w: seen.setdefault("w", w))
    w = seen["w"][0, 0]
    allowed = core.causal_mask(T, T, doc)[0, 0]
    assert (w[~allowed] == 0).all() and torch.isfinite(y).all()
    assert (w[allowed] != 0).all()
    torch.testing.assert_close(w[5, 4:6], torch.tensor([-0.5, -0.5]))  # strongly negative scores dominate the row


def test_cogformer_rows_have_unit_absolute_mass_and_signed_weights():
    q, k, v = rand_qkv(2, 3, 40, 16, scale=1.5)
    seen = {}
    attend("eager", q, k, v, rand_doc(2, 40), record=lambda layer, w: seen.setdefault("w", w))
    w = seen["w"]
    torch.testing.assert_close(w.abs().sum(-1), torch.ones(2, 3, 40))
    assert (w < 0).any() and (w > 0).any()
    assert (w.sum(-1).abs() <= 1 + 1e-6).all()


def test_cogformer_model_layers_and_flops():
    m = cg.CogGPT(tiny(cg.CogConfig, n_layer=5))
    assert m.cog == [1, 2, 3]
    assert [type(b.attn).__name__ for b in m.transformer.h] == ["SoftmaxAttention"] + ["CogAttention"] * 3 + \
        ["SoftmaxAttention"]
    assert cg.CogGPT(tiny(cg.CogConfig, n_layer=5, cog_layers="0,4")).cog == [0, 4]
    assert cg.CogGPT(tiny(cg.CogConfig, variant="transformer")).cog == []
    with torch.device("meta"):
        paper = cg.CogGPT(cg.CogConfig(**cg.CogConfig.PRESETS["141m"], variant="cogformer"))
    assert sum(p.numel() for p in paper.parameters()) == 141_183_744 and paper.cog == list(range(1, 11))
    C, T = 64, 64
    base = cg.CogGPT(tiny(cg.CogConfig, n_layer=5, variant="transformer")).flops_per_token()
    for impl, units in (("eager", 12), ("triton", 9), ("flex2x", 18)):
        got = cg.CogGPT(tiny(cg.CogConfig, n_layer=5, attn_impl=impl)).flops_per_token()
        assert got - base == 3 * (units - 12) * C * T


# ----------------------------------------------------------------------------------------------------------------
# cogformer: the Triton kernel in Triton's CPU interpreter

INTERPRETER_PRELUDE = r"""
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import numpy as np
import triton.runtime.interpreter as interp
_patch = interp._patch_lang_tensor
def _patch_index(tensor, scope):  # numpy >= 2.4 refuses int() of a 1-element array, which the interpreter does
    _patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
interp._patch_lang_tensor = _patch_index
import importlib.util, torch
sys.path.insert(0, os.path.dirname(sys.argv[1]))
spec = importlib.util.spec_from_file_location("tests", sys.argv[1])  # this test file: its helpers
t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
"""

INTERPRETER_CHECK = INTERPRETER_PRELUDE + r"""
import cogformer as cg, core
for B, H, T, D, with_doc in [(2, 2, 50, 64, False), (1, 2, 37, 64, True), (1, 1, 1, 64, False), (1, 1, 20, 128, False)]:
    q, k, v = t.rand_qkv(B, H, T, D, seed=T, scale=1.5)
    doc = t.rand_doc(B, T) if with_doc else None
    assert cg.triton_ok(q, k)
    yt, ye = t.attend("triton", q, k, v, doc), t.attend("eager", q, k, v, doc)
    torch.testing.assert_close(yt, ye, atol=1e-5, rtol=1e-5)
    for name, gt, ge in zip("qkv", t.cog_grads(yt, (q, k, v)), t.cog_grads(ye, (q, k, v))):
        torch.testing.assert_close(gt, ge, atol=2e-5, rtol=1e-5, msg=lambda m: f"d{name} T={T}: {m}")
# the whole model: strided q/k/v views from the core's projection, RoPE, softmax layers around
x = torch.randint(0, 256, (2, 40))
t.assert_triton_model_matches_eager(lambda impl: cg.CogGPT(t.tiny(cg.CogConfig, attn_impl=impl)), x, x)
print("OK")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_cogformer_triton_kernel_matches_eager_in_interpreter():
    """Forward, dq, dk, dv at ragged T (not a multiple of the blocks), head dims 64 and 128, with documents."""
    run_in_interpreter(INTERPRETER_CHECK)


def assert_triton_model_matches_eager(build, x, y):
    """build(impl) -> model, same seed for both: the triton model's loss and every parameter gradient equal the eager
    model's (fp32). Run inside the interpreter checks."""
    losses, grads = [], []
    for impl in ("triton", "eager"):
        torch.manual_seed(0)
        model = build(impl)
        loss = model(x, y)
        losses.append(loss.detach())
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def run_in_interpreter(check):
    """Runs a check script (INTERPRETER_PRELUDE + its body, which prints OK) in a fresh process."""
    p = subprocess.run([sys.executable, "-c", check, os.path.abspath(__file__)], capture_output=True,
                       text=True, cwd=HERE, timeout=300)
    assert p.returncode == 0 and "OK" in p.stdout, p.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------------
# cogformer: the published checkpoint format (spec §6)


def published_ckpt(attn_type, V=256, L=3, C=64, H=4, hidden=96, seq=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, std=0.15: std * torch.randn(*shape, generator=g)
    sd = {"embedding.weight": r(V, C, std=1.0), "norm.weight": 1 + r(C), "output.weight": r(V, C)}
    for l in range(L):
        p = f"layers.{l}."
        for name in ("qw", "kw", "vw", "ow"):
            sd[p + "attention." + name] = r(C, C, std=0.3)  # [in, out], used as x @ W
        sd[p + "attention_norm.weight"], sd[p + "ffn_norm.weight"] = 1 + r(C), 1 + r(C)
        for name, shape in (("gw", (C, hidden)), ("pw", (C, hidden)), ("ow", (hidden, C))):
            sd[p + "ffn.shared_experts.0." + name] = r(*shape)
    D = C // H
    freqs = torch.outer(torch.arange(2 * seq).float(), 1.0 / 10000 ** (torch.arange(0, D, 2).float() / D))
    sd["freqs_cis"] = torch.polar(torch.ones_like(freqs), freqs)
    sd["shortcut_bar"] = torch.zeros(4095)
    cfg = dict(vocab_size=V, n_layers=L, max_seq_length=seq, dim=C, n_heads=H, head_dim=D, hidden_dim=hidden,
               norm_eps=1e-6, attn_type=attn_type, shared_expert_recipe=1)
    return dict(model_cfg=cfg, model=sd, global_step=7, accumulated_FLOPs=1.0)


def reference_forward(ckpt, tokens):
    """The released model written from the spec: x @ W, interleaved complex RoPE, cog in the middle layers
    when attn_type is 'np', SiLU on the pw branch, fp32 RMSNorm."""
    mc, sd = ckpt["model_cfg"], ckpt["model"]
    B, T = tokens.shape
    H, D, L = mc["n_heads"], mc["head_dim"], mc["n_layers"]
    cis = sd["freqs_cis"][:T]  # (T, D/2) complex

    def norm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + mc["norm_eps"]) * w

    def rope(x):  # (B, T, H, D), pairs (2i, 2i+1) as complex numbers
        xc = torch.view_as_complex(x.reshape(B, T, H, D // 2, 2))
        return torch.view_as_real(xc * cis[None, :, None, :]).flatten(3)

    mask = torch.ones(T, T, dtype=torch.bool).tril()
    h = sd["embedding.weight"][tokens]
    for l in range(L):
        p = f"layers.{l}."
        x = norm(h, sd[p + "attention_norm.weight"])
        q, k, v = (x @ sd[p + "attention." + n] for n in ("qw", "kw", "vw"))
        q, k = rope(q.view(B, T, H, D)), rope(k.view(B, T, H, D))
        q, k, v = q.transpose(1, 2) / math.sqrt(D), k.transpose(1, 2), v.view(B, T, H, D).transpose(1, 2)
        s = q @ k.transpose(-2, -1)
        if mc["attn_type"] == "np" and 0 < l < L - 1:
            w = s.sign() * s.abs().masked_fill(~mask, float("-inf")).softmax(-1)
        else:
            w = s.masked_fill(~mask, float("-inf")).softmax(-1)
        h = h + (w @ v).transpose(1, 2).reshape(B, T, H * D) @ sd[p + "attention.ow"]
        x = norm(h, sd[p + "ffn_norm.weight"])
        f = p + "ffn.shared_experts.0."
        h = h + ((x @ sd[f + "gw"]) * F.silu(x @ sd[f + "pw"])) @ sd[f + "ow"]
    return norm(h, sd["norm.weight"]) @ sd["output.weight"].t()


@pytest.mark.parametrize("attn_type", ["np", "vanilla"])
def test_cogformer_published_checkpoint_reproduces_reference_logits(tmp_path, attn_type):
    ckpt = published_ckpt(attn_type)
    path = str(tmp_path / f"{'cog' if attn_type == 'np' else 'vanilla'}_ckpt_100.00_Bi.pt")
    torch.save(ckpt, path)
    model = core.load_model(cg.PAPER, path)
    assert model.cog == ([1] if attn_type == "np" else [])
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    ref = reference_forward(ckpt, tokens)
    assert ref.std() > 0.5  # attention and RoPE matter at this scale
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref, atol=2e-4, rtol=1e-4)
    del ckpt["model_cfg"]["head_dim"]  # a damaged file: one line naming what it lacks
    torch.save(ckpt, path)
    with pytest.raises(core.ConfigError, match="published checkpoints .* without 'head_dim'"):
        core.load_model(cg.PAPER, path)


def test_cogformer_published_checkpoint_without_norm_eps_takes_the_class_default():
    """Spec: RMSNorm eps = the checkpoint config's norm_eps, else the released class default 1e-6."""
    ckpt = published_ckpt("np")
    del ckpt["model_cfg"]["norm_eps"]
    cfg, _ = cg.published_to_ours(ckpt)
    assert cfg.norm_eps == 1e-6
    model = cg.build_model(cfg)
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.RMSNorm))


def test_cogformer_published_checkpoint_of_an_unknown_attention_type_is_refused():
    ckpt = published_ckpt("np")
    for attn_type in (None, "linear"):
        ckpt["model_cfg"]["attn_type"] = attn_type
        with pytest.raises(core.ConfigError, match=f"unknown attn_type {attn_type!r} in the published checkpoint"):
            cg.published_to_ours(ckpt)


def test_cogformer_init_from_published_then_our_checkpoint_round_trip(tmp_path, tutorial, capsys):
    path = str(tmp_path / "cog_ckpt_100.00_Bi.pt")
    torch.save(published_ckpt("np"), path)
    out = str(tmp_path / "ft")
    argv = ["--train", "--init-from", path, "--out", out, "--device", "cpu", "--max-iters", "2", "--batch-size", "2",
            "--eval-iters", "1", "--log-interval", "1"]
    assert cg.main(argv + ["--data", tutorial]) == 2   # its ids are Llama-2's, not bytes
    assert_one_line_error(capsys.readouterr().err, "the model was trained on llama2")
    assert cg.main(argv + ["--data", tutorial_as(tmp_path / "llama2", "llama2")]) == 0
    model = core.load_model(cg.PAPER, os.path.join(out, "ckpt.pt"))
    assert model.cog == [1] and model.cfg.n_embd == 64 and model.cfg.block_size == 32
    ref = core.load_model(cg.PAPER, path)
    moved = [(a - b).abs().max().item() for a, b in zip(model.parameters(), ref.parameters())]
    assert 0 < max(moved) < 0.1  # fine-tuned from the published weights, not re-initialised


# ----------------------------------------------------------------------------------------------------------------
# cogformer: command line


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tutorial):
    """Both variants trained briefly with identical seeds and data order."""
    return cli_runs(cg.main, tmp_path_factory.mktemp("runs"), {v: ["--variant", v] for v in cg.CogConfig.VARIANTS},
                    "--max-iters", "20", "--batch-size", "4", "--data", tutorial)


def test_cogformer_train_both_variants_loss_falls(trained):
    for variant, out in trained.items():
        log = core.read_log(out)
        assert log[-1]["loss"] < log[0]["loss"] - 0.3 and math.isfinite(log[-1]["val_loss"])
        model = core.load_model(cg.PAPER, os.path.join(out, "ckpt.pt"))
        assert model.cfg.variant == variant and model.cog == ([1] if variant == "cogformer" else [])
    assert core.read_log(trained["cogformer"])[-1]["loss"] != core.read_log(trained["transformer"])[-1]["loss"]


def test_cogformer_analysis_commands(trained, tutorial, tmp_path, capsys):
    ckpt = os.path.join(trained["cogformer"], "ckpt.pt")
    out = str(tmp_path)
    common = ["--init-from", ckpt, "--data", tutorial, "--out", out, "--device", "cpu"]
    assert cg.main(["--attn-grid", *common]) == 0
    grid = json.load(open(os.path.join(out, "attn_grid.json")))
    w = {int(l): torch.tensor(x) for l, x in grid["weights"].items()}  # (H, T) per layer
    assert (w[0] >= 0).all() and (w[2] >= 0).all() and (w[1] < 0).any()
    torch.testing.assert_close(w[1].abs().sum(-1), torch.ones(4))
    assert cg.main(["--probe", *common]) == 0
    rep = json.load(open(os.path.join(out, "rep_diff.json")))
    assert rep["count_ones"]["relative"][0] == 1.0 and len(rep["find_a_zero"]["n"]) >= 2
    assert cg.main(["--neg-mass", *common, "--eval-iters", "2", "--batch-size", "2"]) == 0
    neg = json.load(open(os.path.join(out, "neg_mass.json")))["neg_mass"]
    assert neg[0] == 0 and neg[2] == 0 and 0 < neg[1] < 1
    for name in ("attn_grid", "rep_diff", "neg_mass"):
        assert os.path.getsize(os.path.join(out, name + ".png")) > 1000
    assert cg.main(["--plot", "--out", trained["cogformer"], "--runs", trained["transformer"]]) == 0
    assert os.path.exists(os.path.join(trained["cogformer"], "loss.png"))
    fails_in_one_line(capsys, cg.main(["--attn-grid", *common, "--prompt", ""]), "needs a non-empty --prompt")
    args = core.build_parser(cg.PAPER).parse_args(["--neg-mass", "--init-from", os.path.join(trained["transformer"],
                                                                                          "ckpt.pt")])
    assert core.configure(cg.PAPER, args, ["neg-mass"])[0].out == os.path.join("runs", "cogformer", "transformer")
    args = core.build_parser(cg.PAPER).parse_args(["--neg-mass", "--out", trained["cogformer"]])
    assert core.configure(cg.PAPER, args, ["neg-mass"])[0].data == os.path.abspath(tutorial)  # the run's own data
    fails_in_one_line(capsys, cg.main(["--neg-mass", "--out", trained["cogformer"], "--data",
                                       exo_dataset(tmp_path / "gpt2"), "--device", "cpu"]),
                      "the model was trained on bytes (256)")  # a model's numbers on another tokenizer's data


def test_cogformer_analysis_names_the_checkpoint_and_data_of_each_figure(trained, tutorial, tmp_path, capsys,
                                                                        saved_figures, monkeypatch):
    """Every figure's title, JSON and printed line name the checkpoint and data it is of (rep_diff.png named nothing,
    the others the variant only), inside the figure, also a full 60-character line (one run's, whose neg-mass title
    ran past the figure's edge at 12 points); PNGs at 120 dpi (at 80, the grid's 5-point ticks were 6 pixels tall)."""
    for variant, out in trained.items():
        ckpt = os.path.join(out, "ckpt.pt")
        for action, name in (("--attn-grid", "attn_grid"), ("--probe", "rep_diff"), ("--neg-mass", "neg_mass")):
            assert cg.main([action, "--init-from", ckpt, "--data", tutorial, "--out", str(tmp_path), "--device", "cpu",
                            "--eval-iters", "1", "--batch-size", "2"]) == 0
            assert f"{variant} ({ckpt}): wrote {tmp_path / name}.png" in capsys.readouterr().out
            saved = json.load(open(tmp_path / f"{name}.json"))
            assert (saved["variant"], saved["checkpoint"], saved["data"]) == (variant, ckpt, tutorial)
            _, fig, kw = saved_figures.pop()
            assert "".join(f"{variant}: {ckpt}, data {os.path.basename(tutorial)}".split()) in figure_text(fig)
            assert inside(fig, [*fig.texts, *(a.title for a in fig.axes)]) and kw["dpi"] >= 120
    wide = "transformer: /tmp/mutwork/bt/runs0/transformer/ckpt.pt, data\ntutorial0"
    monkeypatch.setattr(cg, "source", lambda cfg, model: wide)
    for action in ("--attn-grid", "--probe", "--neg-mass"):
        assert cg.main([action, "--init-from", ckpt, "--data", tutorial, "--out", str(tmp_path), "--device", "cpu",
                        "--eval-iters", "1", "--batch-size", "2"]) == 0
        fig = saved_figures.pop()[1]
        assert wide.split()[1] in figure_text(fig) and inside(fig, [*fig.texts, *(a.title for a in fig.axes)])


def test_cogformer_analysis_numbers_are_the_direct_computation(tmp_path, tutorial, saved_figures, capsys):
    """--attn-grid: the last query's signed weights over the first 64 tokens of the abstract; --neg-mass: the mean
    negative mass per row over the val batches; --probe: the L-inf of the final hidden state's difference within each
    head's chunk, averaged over heads, at each n and relative to the first; the figures' bars are these numbers, red
    in the cog layer."""
    from matplotlib.colors import to_rgba
    torch.manual_seed(0)
    model = cg.CogGPT(tiny(cg.CogConfig))
    path = str(tmp_path / "m.pt")
    core.save_checkpoint(path, dict(format="attnlab", script="cogformer", config=dataclasses.asdict(model.cfg),
                                    model=model.state_dict(), data=core.TokenData(tutorial).info()))
    model.eval()
    common = ["--init-from", path, "--data", tutorial, "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert cg.main(["--attn-grid", *common]) == 0
    grid, seen = json.load(open(tmp_path / "o" / "attn_grid.json")), {}
    with torch.no_grad():
        model(torch.tensor([grid["tokens"]]), record=lambda layer, w: seen.__setitem__(layer, w[0, :, -1]))
    for layer, w in seen.items():
        torch.testing.assert_close(torch.tensor(grid["weights"][str(layer)]), w, atol=1e-6, rtol=1e-5)
    assert grid["tokens"] == list(cg.ABSTRACT.encode()[:64]) and grid["cog_layers"] == [1] and len(seen) == 3
    assert "the last query's weight on each of the 64 key positions" in saved_figures[-1][1].get_suptitle()
    bars = lambda ax: [p.get_height() for p in ax.patches]
    fig = saved_figures[-1][1]  # L x H panels, row-major
    for n, ax in enumerate(fig.axes):
        layer, head = divmod(n, model.cfg.n_head)
        assert bars(ax) == pytest.approx(seen[layer][head].tolist(), abs=1e-6), ax.get_title()
        assert ax.patches[0].get_facecolor() == to_rgba("tab:red" if layer == 1 else "tab:blue")
    assert cg.main(["--neg-mass", *common, "--eval-iters", "3", "--batch-size", "2", "--block-size", "32"]) == 0
    saved = json.load(open(tmp_path / "o" / "neg_mass.json"))  # --block-size: shorter windows of the model
    neg = saved["neg_mass"]
    assert (saved["tokens_per_batch"], saved["batches"], saved["batch_size"]) == (32, 3, 2)
    data, want = core.TokenData(tutorial), torch.zeros(model.cfg.n_layer)
    for i in range(3):
        x, _ = data.batch("val", 2, 32, model.cfg.seed, 0, i)
        add = lambda layer, w: want.__setitem__(layer, want[layer] + (-w.clamp(max=0)).sum(-1).mean() / 3)
        with torch.no_grad():
            model(x, record=add)
    assert neg == pytest.approx(want.tolist(), rel=1e-5, abs=1e-7) and neg[1] > 0
    assert bars(saved_figures[-1][1].axes[0]) == pytest.approx(neg)
    assert [p.get_facecolor() for p in saved_figures[-1][1].axes[0].patches] == [
        to_rgba(c) for c in ("tab:blue", "tab:red", "tab:blue")]
    assert cg.main(["--probe", *common]) == 0
    rep = json.load(open(tmp_path / "o" / "rep_diff.json"))
    # 64 positions: six lengths spread over the room after the prompt (45 and 43 bytes) and the extra digit
    assert rep["count_ones"]["n"] == [3, 6, 9, 12, 15, 18] and rep["find_a_zero"]["n"] == [3, 6, 10, 13, 16, 20]
    for task, (prompt, pair) in cg.PROBES.items():
        want = [cog_probe_diff(model, prompt, pair(n)) for n in rep[task]["n"]]
        assert rep[task]["diff"] == pytest.approx(want, rel=1e-5), task
        assert rep[task]["relative"] == pytest.approx([d / want[0] for d in want], rel=1e-5), task
        assert len(set(rep[task]["diff"])) == 6
    for ax, task in zip(saved_figures[-1][1].axes, cg.PROBES):
        assert bars(ax) == pytest.approx(rep[task]["relative"]) and ax.get_ylabel().endswith("/ n=3")
    # room for n = 400 exactly after the 45-byte prompt: the paper's lengths up to it; one of them: six over the
    # room; a room below 6: from 1; no room: one line
    for T, n in ((446, [200, 400]), (300, [42, 84, 127, 169, 211, 254]), (51, [1, 2, 3, 4, 5]), (46, None)):
        other = cg.CogGPT(tiny(cg.CogConfig, block_size=T))
        core.save_checkpoint(path, dict(format="attnlab", script="cogformer", config=dataclasses.asdict(other.cfg),
                                        model=other.state_dict(), data=core.TokenData(tutorial).info()))
        if n is None:
            fails_in_one_line(capsys, cg.main(["--probe", *common]), "the count_ones prompt fills the model's 46")
            continue
        assert cg.main(["--probe", *common]) == 0
        assert json.load(open(tmp_path / "o" / "rep_diff.json"))["count_ones"]["n"] == n


def cog_probe_diff(model, prompt, pair):
    """--probe's number for one pair of digit strings: the L-inf of the difference of the final hidden states at the
    last position within each head's chunk, averaged over the heads."""
    hs = []
    with torch.no_grad():
        for digits in pair:
            out = []
            hook = model.transformer.norm_f.register_forward_hook(lambda m, a, o: out.append(o[0, -1]))
            model(torch.tensor([list(prompt.encode()) + list(digits.encode())]))
            hook.remove()
            hs.append(out[0])
    return (hs[0] - hs[1]).view(model.cfg.n_head, -1).abs().amax(-1).mean().item()


@pytest.mark.parametrize("flags, message", [
    (["--cog-layers", "7"], "--cog-layers must lie in 0..2"),
    (["--cog-layers", "1", "--variant", "transformer"], "--cog-layers needs --variant cogformer"),
    (["--n-layer", "2"], "no middle layer"),
    (["--attn-impl", "sdpa"], "--attn-impl must be one of"),
])
def test_cogformer_cli_errors_are_one_line(flags, message, capsys):
    assert cg.main(["--train", "--preset", "tiny", "--device", "cpu", "--variant", "cogformer", *flags]) == 2
    assert_one_line_error(capsys.readouterr().err, message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cogformer_kernel_bench_refused_on_cpu(capsys):
    assert cg.main(["--kernel-bench", "--device", "cpu"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# cogformer: GPU


def max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def no_tf32(monkeypatch):
    """fp32 references in full precision (core.train switches TF32 on for the whole process)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 100, 1024, 2048, 4096])
def test_cogformer_gpu_triton_matches_eager(T, dtype, no_tf32):
    """fp32: direct comparison. bf16: the kernel's error against the fp32 reference is at most twice eager
    bf16's (FlashAttention's criterion), outputs and dq, dk, dv."""
    q, k, v = rand_qkv(2, 2, T, 64, seed=T, dtype=dtype, device="cuda", scale=1.5)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    yt = attend("triton", q, k, v)
    yr = attend("eager", *ref_in)
    got, ref = [yt, *cog_grads(yt, (q, k, v))], [yr, *cog_grads(yr, ref_in)]
    if dtype == torch.float32:
        for name, a, b in zip(("o", "dq", "dk", "dv"), got, ref):
            assert max_err(a, b) < 1e-4, name
    else:
        ye = attend("eager", q, k, v)
        base = [ye, *cog_grads(ye, (q, k, v))]
        for name, a, e, b in zip(("o", "dq", "dk", "dv"), got, base, ref):
            assert max_err(a, b) <= 2 * max_err(e, b) + 1e-3, (name, max_err(a, b), max_err(e, b))


@gpu
@pytest.mark.parametrize("D", [64, 128])
def test_cogformer_gpu_triton_and_flex2x_match_eager_with_documents(D, no_tf32):
    q, k, v = rand_qkv(2, 3, 1000, D, seed=D, device="cuda", scale=1.5)
    doc = rand_doc(2, 1000).cuda()
    ye = attend("eager", q, k, v, doc)
    ge = cog_grads(ye, (q, k, v))
    for impl in ("triton", "flex2x"):
        y = attend(impl, q, k, v, doc)
        assert max_err(y, ye) < 1e-4, impl
        for a, b in zip(cog_grads(y, (q, k, v)), ge):
            assert max_err(a, b) < 2e-4, impl


@gpu
def test_cogformer_gpu_compiled_model_with_triton_kernel():
    """torch.compile calls the kernels as custom ops inside the whole-model graph. Against the fp32 eager model, the
    compiled bf16 Triton model is as close as the bf16 eager model is (bf16 moves s across 0 and flips signs)."""
    cfg = tiny(cg.CogConfig, n_layer=3, n_head=2, n_embd=128, block_size=256, device="cuda")
    x = torch.randint(0, 256, (4, 256), device="cuda")
    out = {}
    for impl, bf16 in (("eager", False), ("eager", True), ("triton", True)):
        torch.manual_seed(0)
        m = cg.CogGPT(cg.CogConfig(**{**vars(cfg), "attn_impl": impl})).cuda()
        fast = torch.compile(m) if impl == "triton" else m
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = fast(x, x)
        loss.backward()
        out[impl, bf16] = (loss.item(), m.transformer.h[1].attn.c_attn.weight.grad.float())
    ref_loss, ref = out["eager", False]
    err = {key: ((g - ref).norm() / ref.norm()).item() for key, (_, g) in out.items()}
    assert abs(out["triton", True][0] - ref_loss) < 2e-2
    assert err["triton", True] <= 2 * err["eager", True] + 1e-3, err


# ================================================================================================================
# exoformer
# Tests of exoformer.py. Every test uses exo_one_thread (torch on one thread).
# ================================================================================================================

VARIANTS = list(exo.VARIANT_FLAGS)
SEP, V = 7, 64  # a document separator inside the tiny vocabulary: document masking is on in these tests


@pytest.fixture
def exo_one_thread():
    """Tiny models run far faster on one thread, above all on a shared 2-core machine. Every exoformer test uses it
    (as the whole module did when this section was its own file); the other sections keep torch's thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def exo_tiny(variant="dynamic_exoformer", **kw):
    """A tiny exoformer with the paper's optimiser settings (ExoConfig's defaults, not the tiny preset's)."""
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


# ----------------------------------------------------------------------------------------------------------------
# exoformer: model

@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["scalar", "headwise", "elementwise"])
@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_forward_backward_every_variant(variant, mode):
    torch.manual_seed(0)
    model = live(exo.ExoGPT(exo_tiny(variant, residual_mode=mode)))
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
@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_causal_and_document_masking(variant):
    torch.manual_seed(0)
    model = live(exo.ExoGPT(exo_tiny(variant)))
    idx = tokens(sep_at=(8,))  # documents [0, 8) and [8, 16)
    out = model(idx)
    change = lambda t, s: torch.where((t + s) % V == SEP, SEP + 1, (t + s) % V)  # new tokens, no new separator
    future = idx.clone()
    future[:, 12:] = change(idx[:, 12:], 1)
    torch.testing.assert_close(model(future)[:, :12], out[:, :12])  # no position sees its future
    past_doc = idx.clone()
    past_doc[:, :8] = change(idx[:, :8], 3)
    torch.testing.assert_close(model(past_doc)[:, 8:], out[:, 8:])  # nor the previous document
    assert not torch.allclose(model(past_doc)[:, :8], out[:, :8])


def test_exoformer_doc_sep_is_any_id_of_the_vocabulary_or_off():
    idx = torch.tensor([[5, 0, 7, 0, 9]])
    assert exo.ExoGPT(exo_tiny(doc_sep=0)).doc_ids(idx).tolist() == [[0, 1, 1, 2, 2]]  # id 0 too
    assert [exo.ExoGPT(exo_tiny(doc_sep=sep)).doc_ids(idx) for sep in (-1, V)] == [None, None]


@pytest.mark.parametrize("variant", ["dynamic_exoformer", "nuresformer", "baseline"])
@pytest.mark.parametrize("impl,sep", [("sdpa", -1), ("flex", SEP)])
@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_fast_paths_match_eager(variant, impl, sep, flex_cpu_grad):
    idx = tokens(sep_at=(5, 11) if sep >= 0 else ())
    results = []
    for attn_impl in ("eager", impl):
        torch.manual_seed(0)
        model = live(exo.ExoGPT(exo_tiny(variant, doc_sep=sep, attn_impl=attn_impl)))
        loss = model(idx, idx)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("variant", ["dynamic_exoformer", "nuresformer"])  # exogenous / layer-0 anchors, all normed
@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_head_norms_take_bf16_projections_without_the_unfused_fallback(variant, rms_norm_dtypes):
    """Under bf16 autocast the QK-norm and the anchors' norms get bf16 projections and fp32 weights: every RMSNorm of
    the model gets an input of its weight's dtype (core.RMSNorm)."""
    pairs = rms_norm_dtypes
    model = live(exo.ExoGPT(exo_tiny(variant)))
    idx = tokens(sep_at=(9,))
    with torch.autocast("cpu", torch.bfloat16):
        model(idx, idx).backward()
    assert pairs and all(x == w for x, w in pairs), pairs


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_dynamic_equals_static_exoformer_at_init():
    """Model4 doubles the lambdas because the dynamic MLP outputs about sigmoid(0) = 0.5 at init: with fc2 = 0 the
    Dynamic ExoFormer computes exactly the static ExoFormer, whatever fc1 holds; a trained fc2 breaks the tie."""
    for mode in ("scalar", "headwise", "elementwise"):
        torch.manual_seed(0)
        dyn = exo.ExoGPT(exo_tiny("dynamic_exoformer", residual_mode=mode))
        static = exo.ExoGPT(exo_tiny("exoformer", residual_mode=mode))
        assert all(float(p.detach().mean()) == 1.0 for n, p in dyn.named_parameters() if ".lambda_" in n)
        assert all(float(p.detach().mean()) == 0.5 for n, p in static.named_parameters() if ".lambda_" in n)
        with torch.no_grad():
            for n, p in dyn.named_parameters():
                if "dynamic_mixing.fc2" in n:
                    p.zero_()
                elif ".lambda_" not in n:
                    p.copy_(p + 0.05 * torch.randn_like(p))  # trained-looking weights, fc2 zero
        shared = {n: p for n, p in dyn.state_dict().items() if "dynamic_mixing" not in n and ".lambda_" not in n}
        static.load_state_dict(shared, strict=False)
        idx = tokens(sep_at=(6,))
        torch.testing.assert_close(dyn(idx), static(idx), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            dyn.transformer.h[1].attn.dynamic_mixing.fc2.bias.fill_(1.0)
        assert not torch.allclose(dyn(idx), static(idx), atol=1e-4)


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_init_follows_the_paper():
    torch.manual_seed(0)
    model = exo.ExoGPT(exo_tiny("dynamic_exoformer", n_embd=64, n_head=4))
    sd = model.state_dict()
    for n in ("lm_head.weight", "transformer.h.1.attn.c_proj.weight", "transformer.h.2.mlp.w_down.weight",
              "transformer.h.0.attn.dynamic_mixing.fc2.bias"):
        assert not sd[n].any(), n
    dyn = torch.cat([sd[f"transformer.h.{i}.attn.dynamic_mixing.fc{j}.weight"].flatten() for i in range(3)
                     for j in (1, 2)])  # drawn like every Linear (OBPM's apply), not PyTorch's default or zero
    sigma = 0.02 * math.sqrt(1 - 6 * math.exp(-4.5) / math.sqrt(2 * math.pi) / math.erf(3 / math.sqrt(2)))
    for n, w in [(n, sd[n]) for n in ("transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
                                      "anchor_proj.weight")] + [("dynamic mixing", dyn)]:
        # trunc normal(0.02, cutoff 3 std): its std sigma = 0.01973, within 4 standard errors
        assert w.abs().max() <= 0.06 and abs(w.std() - sigma) < 4 * sigma / math.sqrt(2 * w.numel()), n
    assert sd["transformer.h.0.attn.c_attn.weight"].shape == (4 * 64, 64)  # q, k, v, gate
    assert sd["transformer.h.0.mlp.w_up.weight"].shape == (128, 64)  # SwiGLU width 2C
    assert model.cfg.norm_eps == 1e-6 and model.cfg.rope_theta == 500000.0
    assert exo.ExoConfig().eval_tokens == 3052 * 16 * 2048  # the paper's full validation pass
    torch.manual_seed(0)
    m = exo.ExoGPT(exo_tiny("baseline"))
    assert math.isclose(m.eval()(tokens(), tokens()).item(), math.log(V), rel_tol=1e-6)  # zero head: uniform


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_z_loss_only_while_training():
    torch.manual_seed(0)
    model = live(exo.ExoGPT(exo_tiny("gated", z_loss=0.1)))
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
@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_loss_falls(variant):
    """Muon + AdamW with the paper's schedule learn a periodic sequence with documents in every variant."""
    torch.manual_seed(0)
    cfg = exo_tiny(variant, n_layer=2, max_iters=30, warmup_iters=3, lr=1e-2, muon_lr=0.02)
    model = exo.ExoGPT(cfg).train()
    seq = torch.tensor([SEP, 3, 14, 15, 9, 26, 5, 35] * 5)
    batch = lambda it: (torch.stack([seq[i:i + 16] for i in (it % 8, (it + 3) % 8)]),
                        torch.stack([seq[i + 1:i + 17] for i in (it % 8, (it + 3) % 8)]))
    losses = train_steps(model, cfg, 30, batch)
    assert losses[0] == pytest.approx(math.log(V), rel=1e-4)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses


# ----------------------------------------------------------------------------------------------------------------
# exoformer: Muon

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


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_muon_matches_the_published_rule():
    torch.manual_seed(0)
    params = [torch.randn(48, 16), torch.randn(16, 40), torch.randn(24, 24), torch.randn(48, 16)]  # tall, wide,
    # square, and a second tall one of the same shape: updated in one batch with the first
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


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_muon_updates_the_swiglu_pair_as_the_official_fc1():
    """w_up and w_gate (a unit) move as one matrix [w_up; w_gate], the official fc1: orthogonalised, normalised and
    scaled together. The model's optimizer pairs them."""
    torch.manual_seed(0)
    up, gate = torch.randn(24, 16), torch.randn(24, 16)
    ours = (up.clone().requires_grad_(), gate.clone().requires_grad_())
    opt = exo.Muon([ours, torch.randn(8, 8, requires_grad=True)], lr=0.02, weight_decay=0.1, total_steps=1000)
    fc1, state = torch.cat([up, gate]), {}
    for step in range(3):
        g = torch.randn(48, 16)
        ours[0].grad, ours[1].grad = g[:24].clone(), g[24:].clone()
        opt.step()
        ref_muon_step(fc1, g, state, lr=0.02, wd=0.1, momentum=0.85 + step / 100 * 0.1)
        torch.testing.assert_close(torch.cat(ours).detach(), fc1, atol=1e-6, rtol=1e-6)
    model = exo.ExoGPT(exo_tiny("baseline"))
    muon = model.configure_optimizers(model.cfg, "cpu")[0]
    mlp = model.transformer.h[0].mlp
    assert any(len(u) == 2 and u[0] is mlp.w_up.weight and u[1] is mlp.w_gate.weight for u in muon.units)


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_muon_state_dict_resumes_exactly():
    """Stopping after 2 of 4 steps, saving the optimizer state and loading it into a fresh Muon changes nothing."""
    torch.manual_seed(0)
    start = [torch.randn(32, 16), torch.randn(32, 16), torch.randn(16, 24)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(4)]

    def run(params, opt, steps):
        for gs in steps:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    full = [p.clone().requires_grad_() for p in start]
    run(full, exo.Muon(full, lr=0.02, weight_decay=0.1, total_steps=150), grads)
    cut = [p.clone().requires_grad_() for p in start]
    opt = exo.Muon(cut, lr=0.02, weight_decay=0.1, total_steps=150)
    run(cut, opt, grads[:2])
    saved = copy.deepcopy(opt.state_dict())
    opt = exo.Muon(cut, lr=0.02, weight_decay=0.1, total_steps=150)
    opt.load_state_dict(saved)
    assert opt.param_groups[0]["step"] == 2
    run(cut, opt, grads[2:])
    for a, b in zip(full, cut):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_polar_express_orthogonalises():
    torch.manual_seed(0)
    for shape in [(64, 32), (32, 96)]:
        G = torch.randn(shape)
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        O = exo.polar_express(G).float()
        assert F.cosine_similarity(O.flatten(), (U @ Vh).flatten(), dim=0) > 0.99
        s = torch.linalg.svdvals(O)
        assert 0.7 < s.min() and s.max() < 1.2


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_optimizer_groups():
    model = exo.ExoGPT(exo_tiny("dynamic_exoformer"))
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


# ----------------------------------------------------------------------------------------------------------------
# exoformer: checkpoints

def exo_dataset(path, n_train=6000, n_val=1200, seed=0):
    """GPT-2-style token ids: a period of 16 with the separator, 5% noise."""
    rng = np.random.default_rng(seed)
    period = np.array([SEP, 3, 14, 15, 9, 26, 5, 35, 8, 9, 7, 9, 3, 2, 38, 4], dtype=np.uint16)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        toks = splits[split] = np.tile(period, n // 16 + 1)[:n].copy()
        noise = rng.random(n) < 0.05
        toks[noise] = rng.integers(0, V, int(noise.sum()))
    return write_dataset(path, splits, tokenizer="gpt2", vocab_size=V, eot_token=SEP)


TINY_CLI = ["--n-layer", "2", "--n-head", "4", "--n-embd", "32", "--block-size", "16", "--batch-size", "4",
            "--device", "cpu", "--doc-sep", str(SEP), "--eval-iters", "2", "--log-interval", "5", "--warmup-iters", "2"]


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_checkpoint_round_trip_and_init_from(tmp_path, capsys):
    data = exo_dataset(tmp_path)
    out = str(tmp_path / "run")
    assert exo.main(["--train", "--variant", "nuresformer", "--data", data, "--out", out, "--max-iters", "10",
                     "--eval-interval", "10", *TINY_CLI]) == 0
    ckpt = core.load_checkpoint(os.path.join(out, "ckpt.pt"))
    model = core.load_model(exo.PAPER, os.path.join(out, "ckpt.pt"))
    assert model.cfg.variant == "nuresformer" and model.cfg.anchor_norm == "qkvg" and not model.training
    fresh = exo.ExoGPT(model.cfg)
    fresh.load_state_dict(ckpt["model"])
    idx = tokens(sep_at=(4,))
    torch.testing.assert_close(model(idx), fresh.eval()(idx))
    assert len(ckpt["optimizers"]) == 2 and ckpt["optimizers"][0]["param_groups"][0]["step"] == 10
    out2 = str(tmp_path / "run2")  # --init-from keeps the checkpoint's model, takes the run settings from flags
    assert exo.main(["--train", "--init-from", os.path.join(out, "ckpt.pt"), "--data", data, "--out", out2,
                     "--max-iters", "5", "--eval-interval", "5", "--lr", "1e-3", "--warmup-iters", "0", *TINY_CLI]) == 0
    assert core.load_model(exo.PAPER, os.path.join(out2, "ckpt.pt")).cfg.variant == "nuresformer"
    assert exo.main(["--eval", "--init-from", os.path.join(out2, "ckpt.pt"), "--data", data,
                     "--eval-tokens", "512"]) == 0  # run settings: not the checkpoint's to fix
    out = capsys.readouterr().out
    assert "val" in out and "| eager mask in " in out  # the progress line says what the attention ran (CPU: eager)
    assert 0 < core.read_log(out2)[-1]["doc_batches"] <= 1


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


def exo_published(version, mode="elementwise", gated=True, res="qkvg", decouple=False, norms=True, dynamic=False, L=3,
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
            sd.update({pre + f"attn.{p}_norm.weight": vec(D) for p in "vg"[:2 if gated else 1]})
        if version in ("model3", "model4", "model.py") and i == 0 and not decouple and norms:
            sd.update({pre + f"attn.{p}_res_norm.weight": vec(D) for p in "vg"[:2 if gated else 1]})
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


PUBLISHED = {  # name: (model file, exo_published() arguments, our variant name)
    "baseline": ("model1", dict(gated=False, res=""), "baseline"),
    "gated": ("model1", dict(res=""), "gated"),
    "resformer": ("model1", dict(gated=False, res="v", mode="scalar"), "resformer"),
    "nkqr": ("model1", dict(res="vg"), "nuresformer_nkqr"),
    "oqkrn": ("model1", dict(res="qkvg", mode="headwise"), "nuresformer_oqkrn"),
    "nuresformer": ("model2", dict(), "nuresformer"),
    "internal-model3": ("model3", dict(mode="headwise"), "nuresformer"),
    "exoformer": ("model3", dict(decouple=True, mode="scalar"), "exoformer"),
    "exoformer-unnormed": ("model3", dict(decouple=True, norms=False, mode="scalar"), "exoformer"),
    "dynamic": ("model4", dict(decouple=True, dynamic=True), "dynamic_exoformer"),
    "model.py": ("model.py", dict(decouple=True, dynamic=True, mode="headwise"), "dynamic_exoformer"),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_published_checkpoint_reproduces_reference(name, tmp_path):
    version, kw, variant = PUBLISHED[name]
    args, sd = exo_published(version, **kw)
    path = str(tmp_path / "ckpt_step:38146.pt")
    torch.save(dict(step=38146, tokens_processed=10_000_000_000, model={"_orig_mod." + k: v for k, v in sd.items()},
                    config=dict(batch_size=16), model_args=args), path)
    model = core.load_model(exo.PAPER, path)
    assert model.cfg.variant == variant
    idx = tokens(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref_forward(sd, args, version, idx), atol=2e-5, rtol=2e-5)


def test_exoformer_published_model4_without_its_hidden_size_takes_the_official_default(tmp_path):
    """model_args of a dynamic model without dynamic_mixing_hidden_dim: the official default, 16."""
    args, sd = exo_published("model4", decouple=True, dynamic=True)
    del args["dynamic_mixing_hidden_dim"]
    path = str(tmp_path / "ckpt_step:38146.pt")
    torch.save(dict(step=38146, model=sd, config=dict(batch_size=16), model_args=args), path)
    model = core.load_model(exo.PAPER, path)
    assert model.cfg.dynamic_hidden == 16 and model.transformer.h[1].attn.dynamic_mixing.fc1.weight.shape[0] == 16


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_published_checkpoint_takes_its_rope_theta_norm_eps_and_mlp_width(tmp_path):
    """model_args the other tests leave at their defaults; gate_res_enabled without the gate is moot (the official
    model mixes no gate it does not have)."""
    args, sd = exo_published("model1", gated=False, res="v", mode="scalar")
    args.update(rope_theta=10000.0, rmsnorm_eps=1e-3, mlp_hidden_dim=96, gate_res_enabled=True)  # fc1: x, gate halves
    for k in sd:
        if k.endswith("mlp.fc1.weight"):
            sd[k] = sd[k][:96]
        elif k.endswith("mlp.fc2.weight"):
            sd[k] = sd[k][:, :48]
    path = str(tmp_path / "ckpt.pt")
    torch.save(dict(model=sd, model_args=args), path)
    model = core.load_model(exo.PAPER, path)
    assert (model.cfg.variant, model.cfg.mix, model.cfg.mlp_hidden) == ("resformer", "v", 48)
    idx = tokens(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref_forward(sd, args, "model1", idx), atol=2e-5, rtol=2e-5)


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_published_checkpoint_with_unsupported_options(tmp_path):
    args, sd = exo_published("model1")
    for option, value in (("per_layer_backout", True), ("qk_norm", False), ("weight_tying", True),
                          ("logit_soft_cap", 30.0), ("act_type", "relu2"), ("norm_pos", "after")):
        with pytest.raises(core.ConfigError, match=f"^p.pt: the published model uses {option}, which exoformer.py"):
            exo.from_published(dict(model=sd, model_args={**args, option: value}), "p.pt")
    path = str(tmp_path / "ckpt.pt")
    torch.save(dict(model={"something": torch.zeros(1)}), path)
    with pytest.raises(core.ConfigError, match="not a checkpoint exoformer.py reads .*train.py checkpoints"):
        core.load_model(exo.PAPER, path)


# ----------------------------------------------------------------------------------------------------------------
# exoformer: CLI

@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_label_names_the_model_the_axes_make():
    assert exo.PAPER.label(exo.ExoConfig(variant="resformer")) == "exoformer/resformer"
    assert exo.ExoConfig(variant="baseline", gate="on").label() == "gated"  # numbers printed under its real name
    assert exo.ExoConfig(variant="baseline", gate="on", mix="g", anchor="layer0").label() == \
        "baseline with gate=on, mix=g, anchor=layer0"
    assert exo.ExoConfig(variant="resformer", gate="on", mix="gv").label() == "nuresformer_nkqr"  # any letter order


def test_exoformer_cli_errors_are_one_line(capsys):
    for args, msg in ((["--train", "--variant", "nope"], "invalid choice"),
                      (["--train", "--family", "gpt2"], "--family must be llama"),
                      (["--train", "--gate", "off", "--mix", "qg", "--anchor", "exo"], "needs --gate on"),
                      (["--train", "--variant", "baseline", "--mix", "v"], "--mix and --anchor go together"),
                      (["--train", "--variant", "baseline", "--anchor-norm", "qkvg"], "--anchor-norm needs an anchor"),
                      (["--train", "--doc-sep", "-5"], "--doc-sep must be a token id, or -1 for off"),
                      (["--analyze", "--init-from", "missing.pt"], "checkpoint not found")):
        assert exo.main(args) == 2
        assert_one_line_error(capsys.readouterr().err, msg)
    p = subprocess.run([sys.executable, os.path.join(HERE, "exoformer.py"), "--train", "--residual-mode", "rowwise"],
                       capture_output=True, text=True, cwd=HERE, timeout=300)  # as a user runs it: no traceback
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "error: --residual-mode must be scalar, headwise or elementwise, not 'rowwise'"]


@torch.no_grad()
def test_exoformer_nuresformer_normalises_every_layer0_anchor(monkeypatch):
    """NuResFormer (official model2): layer 0's q, k, v and g anchors are all RMS-normalised (q/k by its QK-norm,
    v/g by v_res_norm / g_res_norm; weights 1 at init): unit RMS per head vector. nuresformer_oqkrn normalises none."""
    seen = []
    real = exo.ExoAttention.layer0_anchor
    monkeypatch.setattr(exo.ExoAttention, "layer0_anchor", lambda self, *a: seen.append(real(self, *a)) or seen[-1])
    for variant, normed in (("nuresformer", True), ("nuresformer_oqkrn", False)):
        seen.clear()
        model = live(exo.ExoGPT(exo_tiny(variant, n_layer=2)))
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", "norm_1.weight", "norm_2.weight")):
                p.fill_(1.0)
        model(tokens())
        rms = seen[0].float().pow(2).mean(-1).sqrt()  # (B, T, P, H)
        assert rms.shape[2] == 4 and torch.allclose(rms, torch.ones_like(rms), atol=1e-3) == normed


def test_exoformer_paper_recipe_and_schedule():
    c = exo.ExoConfig(**exo.ExoConfig.PRESETS["paper"], device="cpu")
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (29, 16, 1024, 2048, 57601)
    assert c.batch_size * c.grad_accum * c.block_size == 262_144 and c.max_iters == 38147
    assert (c.lr, c.muon_lr, c.warmup_iters, c.schedule, c.cooldown_frac, c.z_loss) == (
        3e-3, 0.01, 1000, "wsd", 0.2, 1e-5)
    assert core.lr_mult(c.max_iters, c) == pytest.approx(0.1)  # the warm-down ends at 0.1x, Muon and AdamW alike


def test_exoformer_recorder_on_hand_made_attention_and_gates():
    rec, n = exo.Recorder(), 8
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    rec(0, ((j <= i).float() / (i + 1))[None, None])  # causal uniform: query i gives 1 / (i + 1) to the first key
    assert rec.layers[0]["sink"] == pytest.approx((1 / (torch.arange(n) + 1.0)).mean().item(), rel=1e-6)
    assert rec.layers[0]["entropy"] == pytest.approx(torch.log(torch.arange(n) + 1.0).mean().item(), rel=1e-5)
    rec.stat(1, "gate", torch.tensor([0.1, 0.19, 0.3, 0.9]))
    assert rec.layers[1]["gate_sparsity"] == 0.5 and rec.layers[1]["gate_mean"] == pytest.approx(0.3725)


def exo_drawn_lambdas(variant):
    """A 2-layer tiny ExoGPT whose mixing lambdas are drawn from U(0.2, 1) (their init makes every ratio 1)."""
    torch.manual_seed(0)
    model = live(exo.ExoGPT(exo_tiny(variant, n_layer=2)))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lambda_" in n:
                p.uniform_(0.2, 1.0)
    return model


def test_exoformer_measure_pca_core_and_lambda_ratios():
    """PCA core: components for 99% of the hidden states' variance (an eigendecomposition here); lambda ratio
    lambda1 / lambda2 per pathway."""
    model = exo_drawn_lambdas("nuresformer")
    idx = tokens(B=4, seed=3)
    r = exo.measure(model, idx)
    h = model.transformer.wte(idx).detach().double().reshape(-1, model.cfg.n_embd)
    c = h - h.mean(0)
    eig = torch.linalg.eigvalsh(c.T @ c).flip(0).clamp(min=0)
    assert r["hidden_layers"]["pca_core"][0] == int((eig.cumsum(0) / eig.sum() < 0.99).sum()) + 1
    a = model.transformer.h[1].attn
    assert r["lambdas"]["q"][0]["ratio"] == pytest.approx((a.lambda_q1 / a.lambda_q2).flatten().tolist())


@pytest.mark.parametrize("variant", ["exoformer", "nuresformer_nkqr"])
@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_measure_is_the_direct_computation(variant):
    """Each per-layer number of --analyze from the model's own probabilities, gates and hidden states: sink (the mean
    weight on key 0), entropy, gate mean and share below 0.2, the effective lambdas of each mixed pathway (static:
    their means) and their ratio, max |h|, token-token cosine of distinct pairs (mean, std), cosine to the embedding,
    layer-to-layer cosine. nuresformer_nkqr mixes v and g only, from layer 1 on."""
    model = exo_drawn_lambdas(variant)
    idx = tokens(B=2, seed=5)
    r = exo.measure(model, idx)
    probs, gates, hidden = {}, {}, []

    class Record:  # what the eager attention and ExoAttention hand to --analyze's Recorder
        def __call__(self, layer, p):
            probs[layer] = p

        def stat(self, layer, name, t):
            gates.update({layer: t} if name == "gate" else {})
    hooks = [m.register_forward_hook(lambda m, a, o: hidden.append(o)) for m in [model.transformer.wte,
                                                                                  *model.transformer.h]]
    with torch.no_grad():
        model(idx, doc=torch.zeros_like(idx), record=Record())
    for h in hooks:
        h.remove()
    att, hid = r["attention_layers"], r["hidden_layers"]
    for layer in range(2):
        p, g, a = probs[layer], gates[layer], model.transformer.h[layer].attn
        assert att["sink"][layer] == pytest.approx(p[..., 0].mean().item(), rel=1e-5)
        assert att["entropy"][layer] == pytest.approx(torch.special.entr(p).sum(-1).mean().item(), rel=1e-5)
        assert att["gate_mean"][layer] == pytest.approx(g.mean().item(), rel=1e-5)
        assert att["gate_sparsity"][layer] == pytest.approx((g < 0.2).float().mean().item())
        for q in "qkvg":
            if q not in a.mix:
                assert att.get(f"ratio_{q}", [None, None])[layer] is None
                continue
            l1, l2 = (getattr(a, f"lambda_{q}{i}").mean().item() for i in "12")
            assert (att[f"lam_{q}1"][layer], att[f"lam_{q}2"][layer]) == pytest.approx((l1, l2), rel=1e-5)
            assert att[f"ratio_{q}"][layer] == pytest.approx(l1 / l2, rel=1e-5)
            learned = next(x for x in r["lambdas"][q] if x["layer"] == layer)  # the static_lambdas of the heatmaps
            assert (learned["lam1"], learned["lam2"]) == pytest.approx((l1, l2), rel=1e-6)
    T = idx.size(1)
    i, j = torch.triu_indices(T, T, 1)
    for n, h in enumerate(hidden):
        u = h / h.norm(dim=-1, keepdim=True)
        sims = (u[:, i] * u[:, j]).sum(-1)  # (B, pairs)
        assert hid["max_act"][n] == pytest.approx(h.abs().max().item(), rel=1e-6)
        assert (hid["token_sim"][n], hid["token_sim_std"][n]) == pytest.approx((sims.mean().item(),
                                                                                sims.std().item()), rel=1e-4)
        cos = [(hidden[0][b] * h[b]).sum() / (hidden[0][b].norm() * h[b].norm()) for b in range(len(h))]
        assert hid["cos_to_embedding"][n] == pytest.approx(torch.stack(cos).mean().item(), rel=1e-5)
        for m, other in enumerate(hidden):
            want = F.cosine_similarity(h, other, dim=-1).mean().item()
            assert r["layer_similarity"][n][m] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert len(hidden) == len(hid["max_act"]) == 3


@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_analyze(tmp_path, capsys, saved_figures):
    data = exo_dataset(tmp_path)
    ckpts = []
    for variant in ("baseline", "nuresformer", "dynamic_exoformer"):
        torch.manual_seed(0)
        model = live(exo.ExoGPT(exo_tiny(variant, n_layer=2)))
        path = str(tmp_path / f"{variant}.pt")
        core.save_checkpoint(path, dict(format="attnlab", config=dataclasses.asdict(model.cfg),
                                        model=model.state_dict()))
        ckpts.append(path)
    short = live(exo.ExoGPT(exo_tiny("baseline", n_layer=2, block_size=8)))  # fewer positions than the others
    core.save_checkpoint(str(tmp_path / "short.pt"), dict(format="attnlab", config=dataclasses.asdict(short.cfg),
                                                         model=short.state_dict()))
    out = str(tmp_path / "an")
    assert exo.main(["--analyze", "--init-from", ckpts[0], "--runs", *ckpts[1:], str(tmp_path / "short.pt"),
                     "--data", data, "--out", out, "--device", "cpu"]) == 0
    res = json.load(open(os.path.join(out, "analysis.json")))
    printed = capsys.readouterr().out  # each run's numbers name its model and data, as the figure and JSON do
    assert f"nuresformer.pt (nuresformer, 4 x 16 val tokens of {data}), means over the layers: sink" in printed
    assert f"short.pt (baseline, 4 x 8 val tokens of {data})" in printed
    assert [fig.get_suptitle() for _, fig, _ in saved_figures] == [
        f"the first val windows of {os.path.basename(data)} (one batch of each model's length)"]
    assert res["short.pt"]["data"] == data and res["short.pt"]["windows"] == [4, 8]
    assert exo.main(["--analyze", "--init-from", ckpts[0], "--data", data, "--out", str(tmp_path / "b8"), "--device",
                     "cpu", "--block-size", "8"]) == 0  # windows of --block-size, shorter than the model's
    assert json.load(open(tmp_path / "b8" / "analysis.json"))["baseline.pt"]["windows"] == [4, 8]
    assert all(e <= math.log(8) + 1e-4 for e in res["short.pt"]["attention_layers"]["entropy"])  # its 8 positions
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
    mean = lambda xs: sum(xs) / len(xs)
    for name, r in res.items():  # the printed means over the layers are the JSON's
        att, hid = r["attention_layers"], r["hidden_layers"]
        gate = f"{mean(att['gate_mean']):.3f}" if "gate_mean" in att else "n/a"
        assert (f"{name} (" in printed and f"means over the layers: sink {mean(att['sink']):.4f} | entropy "
                f"{mean(att['entropy']):.3f} | gate {gate} | and the embedding: token sim {mean(hid['token_sim']):.3f}"
                f" | PCA core {mean(hid['pca_core']):.1f}\n" in printed), name
    val = np.fromfile(os.path.join(data, "val.bin"), np.uint8).astype(np.int64)  # the first 4 windows of 16 tokens
    model = core.load_model(exo.PAPER, ckpts[0])
    want = exo.measure(model, torch.from_numpy(val[:64].reshape(4, 16)))
    assert base["hidden_layers"]["max_act"] == pytest.approx(want["hidden_layers"]["max_act"], rel=1e-6)
    assert base["attention_layers"]["sink"] == pytest.approx(want["attention_layers"]["sink"], rel=1e-6)
    panels = {a.get_title(): a for a in saved_figures[0][1].axes}  # hidden measures start at the embedding (-1)
    for title, key in (("max |activation|", "max_act"), ("attention entropy", "entropy")):
        x, y = panels[title].lines[0].get_data()
        assert list(x) == list(range(-1 if key in exo.HIDDEN_KEYS else 0, 2)) and list(y) == pytest.approx(
            (base["hidden_layers"] if key in exo.HIDDEN_KEYS else base["attention_layers"])[key])


# ----------------------------------------------------------------------------------------------------------------
# exoformer: GPU

@gpu
@pytest.mark.parametrize("variant", ["dynamic_exoformer", "nuresformer"])
@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_gpu_compiled_flex_matches_eager(variant):
    """The training path (torch.compile, FlexAttention document masks, bf16) against the eager fp32 reference."""
    torch.manual_seed(0)
    cfg = exo.ExoConfig(variant=variant, n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=512,
                        doc_sep=SEP, attn_impl="auto")
    model = live(exo.ExoGPT(cfg)).cuda()
    idx = torch.randint(0, 512, (4, 256), device="cuda")
    idx[idx == SEP] = SEP + 1
    idx[:, 100] = SEP
    close = lambda a, b, tol: (a.float() - b).abs().max() <= tol * b.abs().max() + 1e-6
    with torch.no_grad():
        ref = model(idx, record=lambda layer, probs: None)  # recording forces the eager reference
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert close(torch.compile(model)(idx), ref, 0.05)
    grads = []
    for impl in ("eager", "auto"):  # fp32 FlexAttention kernel vs the reference, forward and backward
        model.cfg.attn_impl = impl
        model.zero_grad()
        model(idx, idx).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(close(b, a, 5e-3) for a, b in zip(*grads))


@gpu
@pytest.mark.usefixtures("exo_one_thread")
def test_exoformer_gpu_host_document_ids_run_sdpa_compiled_and_match_flex():
    """The train loop's way (host_batch): a batch without a separator is checked on the host and runs SDPA through
    the compiled model; the same batch with ids made on the GPU takes FlexAttention. Same loss and gradients."""
    torch.manual_seed(0)
    cfg = exo.ExoConfig(variant="exoformer", n_layer=2, n_head=4, n_embd=128, block_size=128, vocab_size=512,
                        doc_sep=SEP, attn_impl="auto")
    model, cuda = live(exo.ExoGPT(cfg)).cuda(), torch.device("cuda")
    idx = torch.randint(0, 512, (2, 128))
    idx[idx == SEP] = SEP + 1
    fast, grads = torch.compile(model), []
    for host in (True, False):
        x, y, doc = core.host_batch(model, idx, idx, cuda) if host else (idx.cuda(), idx.cuda(), None)
        assert host == (doc is not None and doc.device.type == "cpu")
        model.zero_grad()
        fast(x, y, doc=doc).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert model.paths == {"one document": 1, "documents": 1}
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-3) for a, b in zip(*grads))


@gpu
def test_exoformer_gpu_polar_express_matches_the_fp32_fallback():
    """The CUDA path (bf16 products, fp32 accumulation, batched) against the published PyTorch fallback (fp32)."""
    torch.manual_seed(0)
    for shape in [(3, 256, 64), (2, 96, 384)]:
        G = torch.randn(shape, device="cuda")
        fast, ref = exo.polar_express(G).float(), exo.polar_express(G.cpu()).float()
        assert fast.shape == shape
        assert F.cosine_similarity(fast.flatten(1).cpu(), ref.flatten(1), dim=1).min() > 0.99


# ================================================================================================================
# sparse_byte
# Tests of sparse_byte.py: the thesis's patterns, the block-sparse flex path vs the masked eager reference,
# head metrics on hand-made attention, k-means / silhouette, the command line.
# ================================================================================================================

SUBSETS = ["0", "3", "1", "2", "0123"]  # each pattern alone on every head, then the thesis's mix


def row_sets(c, T):
    """The thesis's key set of each query, with Python sets (a third spelling of the patterns)."""
    window = {0: 16, 3: 32, 1: 64}.get(c)
    anchors = {min(T - 1, int(r * (T - 1))) for r in (0.0, 0.1, 0.2, 0.3, 0.382, 0.5, 0.618, 0.7, 0.8, 0.9, 1.0)}
    rows = []
    for i in range(T):
        keys = set(range(max(0, i - window // 2), min(T, i + window // 2 + 1))) if window else set()
        if c == 1 and T >= 8:
            keys |= set(range(0, T, 8))
        if c == 2:
            keys |= (set(range(0, T, 16)) if T >= 16 else set()) | anchors
        rows.append({j for j in keys if j <= i})
    return rows


def test_sparse_byte_head_assignment_follows_the_thesis():
    assert sb.head_clusters(8) == [0, 3, 3, 1, 1, 1, 2, 2]
    assert sb.head_clusters(6) == [0, 3, 1, 1, 2, 2]
    assert sb.head_clusters(4) == [0, 3, 1, 2]
    assert sb.head_clusters(8, "13") == [3, 3, 3, 3, 1, 1, 1, 1]  # dropped heads go round-robin to the kept
    assert sb.head_clusters(8, "2") == [2] * 8
    assert sb.head_clusters(2, "3") == [0, 0]  # no kept cluster in the table: all focused-local
    assert sb.head_clusters(5) == [0, 0, 1, 2, 3]  # the fallback's intent


@pytest.mark.parametrize("T", [7, 40, 200])
def test_sparse_byte_pattern_mask_matches_the_definition(T):
    for c in (0, 1, 2, 3):
        ref = torch.zeros(T, T, dtype=torch.bool)
        for i, keys in enumerate(row_sets(c, T)):
            ref[i, list(keys)] = True
        mask = sb.pattern_mask([c], T)[0]
        assert torch.equal(mask, ref)
        assert not mask.triu(1).any()  # causal
        assert mask.diagonal().all() == (c != 2 or T < 8)  # global heads see themselves only on their columns
        assert torch.equal(mask.sum(1), sb.allowed_counts(c, T))  # the closed-form density


@pytest.mark.parametrize("T", [5, 128, 300])
def test_sparse_byte_extended_layout_holds_each_key_once(T):
    """The flex mask over the extended keys, folded back onto positions, is the spec with no key counted twice."""
    clusters = sb.head_clusters(8)
    src, region = sb.kv_layout(clusters, T)
    assert len(src) % sb.BLOCK == 0
    m = create_mask(sb.sparse_mask_mod(clusters, src, region), 1, 8, T, len(src), device="cpu")[0]  # (H, T, S)
    folded = torch.zeros(8, T, T, dtype=torch.long).index_add_(2, src, m.long())
    assert folded.max() <= 1
    assert torch.equal(folded.bool(), sb.pattern_mask(clusters, T))


def test_sparse_byte_block_mask_is_block_sparse():
    """What FlexAttention computes: the BlockMask's tiles are exactly the non-empty tiles, far fewer than causal."""
    T, clusters = 2048, sb.head_clusters(8)
    src, region = sb.kv_layout(clusters, T)
    mod = sb.sparse_mask_mod(clusters, src, region)
    bm = create_block_mask(mod, None, 8, T, len(src), device="cpu")
    dense = create_mask(mod, 1, 8, T, len(src), device="cpu")[0]
    tiles = dense.view(8, T // 128, 128, len(src) // 128, 128).any(4).any(2)
    assert torch.equal(bm.to_dense()[0].bool(), tiles)
    causal = create_block_mask(lambda b, h, q, kv: kv <= q, None, None, T, T, device="cpu")
    density = sb.computed_blocks(bm) / (8 * sb.computed_blocks(causal))
    assert 0.2 < density < 0.3  # 0.27 at T = 2048 (0.45 at 1024, 0.17 at 4096)
    elements = sum(sb.allowed_counts(c, T).sum().item() for c in clusters) / (8 * T * (T + 1) / 2)
    assert elements < density


def attention(subset, impl, T=200, n_head=8, D=16):
    cfg = sb.SparseByteConfig(variant="sparse", n_head=n_head, n_embd=n_head * D, block_size=T, mask_subset=subset,
                              attn_impl=impl)
    return sb.SparseAttention(cfg, 0)


def qkv(B, H, T, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("subset", SUBSETS)
def test_sparse_byte_flex_matches_eager_forward_and_gradients(subset, flex_cpu_grad):
    att, T = attention(subset, "flex"), 200  # not a multiple of the block: padded regions
    res = []
    for fn in (att.attend_eager, att.attend_flex):
        q, k, v = qkv(2, 8, T, 16)
        y = fn(q, k, v, core.Ctx())
        y.pow(2).sum().backward()  # gradients flow through the gather of the extended keys too
        res.append((y, q.grad, k.grad, v.grad))
    for a, b in zip(res[1], res[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_sparse_byte_triton_pattern_lists_each_column_once():
    """The kernel's per-head rows: the strided columns S * n plus the anchors off the stride are columns(c, T)."""
    for T in (5, 13, 200, 4096):
        clusters = sb.head_clusters(8)
        pat, ncols = sb.triton_pattern(clusters, T)
        assert pat.shape == (8, 4 + sb.N_ANCHOR) and pat.dtype == torch.int32
        for c, (reach, s, ns, na, *anchors) in zip(clusters, pat.tolist()):
            strided = [s * n for n in range(ns)]
            assert reach == sb.REACH[c] and len(set(strided) | set(anchors[:na])) == ns + na
            assert sorted(strided + anchors[:na]) == (sb.columns(c, T) if c in sb.STRIDE else [])
            assert anchors[na:] == [T] * (sb.N_ANCHOR - na)  # padding: past every query
        assert ncols == max(len(sb.columns(c, T)) for c in clusters if c in sb.STRIDE)


SPARSE_INTERPRETER_CHECK = INTERPRETER_PRELUDE + r"""
import core, sparse_byte as sb
# ragged T (200, 40: not multiples of the 16/32 tiles), T < 16 and T < 8 (degenerate columns), each pattern alone
for B, T, D, subset in [(2, 200, 32, "0123"), (1, 40, 16, "0123"), (1, 13, 16, "0123"), (1, 5, 16, "0123"),
                        (1, 200, 16, "0"), (1, 200, 16, "2"), (1, 72, 16, "1"), (1, 72, 16, "3")]:
    att = t.attention(subset, "triton", T=T, D=D)
    res = []
    for fn in (att.attend_eager, att.attend_triton):
        q, k, v = t.qkv(B, 8, T, D, seed=T)
        assert core.triton_ok(q)
        y = fn(q, k, v, core.Ctx())
        y.pow(2).sum().backward()
        res.append((y, q.grad, k.grad, v.grad))
    for name, a, b in zip(("y", "dq", "dk", "dv"), res[1], res[0]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name} T={T} {subset}: {m}")
# the whole model: q/k/v are strided views of the core's projection
x = torch.randint(0, 256, (2, 41))
cfg = dict(variant="sparse", vocab_size=256, n_layer=2, n_head=8, n_embd=128, block_size=40)
build = lambda impl: sb.build_model(sb.SparseByteConfig(**cfg, attn_impl=impl))
t.assert_triton_model_matches_eager(build, x[:, :-1], x[:, 1:])
print("OK")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_sparse_byte_triton_kernel_matches_eager_in_interpreter():
    """Forward, dq, dk, dv of the fused kernel vs the masked reference, in Triton's CPU interpreter (fp32)."""
    run_in_interpreter(SPARSE_INTERPRETER_CHECK)


def test_sparse_byte_cpu_flex_training_is_refused():
    att = attention("0123", "flex")
    q, k, v = qkv(1, 8, 64, 16)
    with pytest.raises(core.ConfigError, match="backward on CPU"):
        att.attend_flex(q, k, v, core.Ctx())


def test_sparse_byte_auto_picks_the_triton_kernel_on_gpu_and_falls_back_to_flex(capsys, monkeypatch):
    core.warn_once.cache_clear()
    att = attention("0123", "auto")
    assert att.impl(torch.device("cuda")) == "triton" and att.impl(torch.device("cpu")) == "eager"
    q, k, v = (t.detach() for t in qkv(1, 8, 64, 16))  # CPU, no interpreter: outside the kernel's domain
    with torch.no_grad():
        y = attention("0123", "triton").attend_triton(q, k, v, core.Ctx())
    assert "sparse Triton kernel cannot run here" in capsys.readouterr().err
    ref = att.attend_eager(q, k, v, core.Ctx())
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-4)  # flex's forward runs on CPU


def test_sparse_byte_block_mask_is_built_once_before_the_layers_which_trace_in_one_graph():
    """GPU training path: the static block mask is built once per length, eagerly, in the model's context; the
    layers then only read it and compile without a graph break (the 'eager' backend runs that check on CPU)."""
    cfg = sb.SparseByteConfig(variant="sparse", vocab_size=256, n_layer=2, n_head=8, n_embd=64, block_size=160,
                              attn_impl="flex")
    model = sb.build_model(cfg).eval()
    x = torch.randint(0, 256, (1, 160))
    key = ("sparse", tuple(sb.head_clusters(8)), 160)
    ctx = model.context(x)
    assert ctx.cache[key] is model.context(x).cache[key] is sb.sparse_block_mask(*key[1:], x.device)

    def layers(idx, ctx):
        h = ctx.x0 = model.embed(idx, ctx)
        for block in model.transformer.h:
            h = block(h, ctx)
        return model.lm_head(model.final(h, ctx))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layers, backend="eager", fullgraph=True)(x, ctx), model(x))
    assert not model.context(x, record=lambda *a: None).cache  # recording runs the eager reference: no mask


def test_sparse_byte_model_is_causal_and_records_masked_probabilities():
    cfg = sb.SparseByteConfig(variant="sparse", vocab_size=256, n_layer=2, n_head=8, n_embd=64, block_size=96)
    model = sb.build_model(cfg).eval()
    idx = torch.randint(0, 256, (1, 96))
    seen = {}
    with torch.no_grad():
        a = model(idx, record=lambda layer, p: seen.setdefault(layer, p))
        idx2 = idx.clone()
        idx2[0, 50] = (idx2[0, 50] + 1) % 256
        b = model(idx2)
    torch.testing.assert_close(a[0, :50], b[0, :50])  # the future does not leak (T fixed: anchors depend on T)
    assert sorted(seen) == [0, 1]
    allowed = sb.pattern_mask(sb.head_clusters(8), 96)
    assert (seen[0][0][~allowed] == 0).all() and torch.allclose(seen[0][0].sum(-1), torch.ones(8, 96))


# ---- sparse_byte: head metrics on hand-made attention

def test_sparse_byte_metrics_on_hand_made_attention():
    T = 64
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    uniform = (j <= i).float() / (i + 1).float()  # causal uniform
    w = 5
    local = ((j <= i) & (i - j <= w)).float()
    local = local / local.sum(1, keepdim=True)  # uniform over the last w + 1 keys
    eye = torch.eye(T)
    first = (j == 0).float().expand(T, T)  # every query on key 0
    m = sb.head_metrics(torch.stack([uniform, local, eye, first])[None]).double()[0]  # (4, 3)
    r = torch.arange(T).double()
    lower = T * (T + 1) / 2
    expect = [
        [torch.log(r + 1).mean(), 1 - lower / T**2, (T - 1) / 4],
        [torch.log(r.clamp(max=w) + 1).mean(), 1 - local.gt(0).sum().item() / T**2, (r.clamp(max=w) / 2).mean()],
        [0.0, 1 - 1 / T, 0.0],
        [0.0, 1 - 1 / T, (T - 1) / 2],
    ]
    torch.testing.assert_close(m, torch.tensor([[float(x) for x in row] for row in expect], dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)


def test_sparse_byte_head_counts_without_a_table_fill_clusters_in_id_order():
    """n_head without a thesis table: heads dealt to the clusters in id order (local, strided, global, wide, ...)."""
    assert sb.head_clusters(7) == [0, 0, 1, 1, 2, 2, 3]


def test_sparse_byte_metrics_threshold_and_renormalisation():
    """Entries below 1e-4 count as sparse; rows are renormalised (a scaled matrix gives the same numbers)."""
    p = torch.tensor([[1.0, 0.0], [0.99995, 0.00005]])
    m = sb.head_metrics(p[None, None])[0, 0]
    assert m[1].item() == pytest.approx(0.5)  # 0.0 and 5e-5 are sparse
    p = torch.tensor([[1 - 5.5e-4, 5e-4, 5e-5, 0.0]])
    assert sb.head_metrics(p[None, None])[0, 0, 1].item() == pytest.approx(0.5)  # 5e-4 is not below 1e-4
    torch.testing.assert_close(sb.head_metrics(3 * p[None, None]), sb.head_metrics(p[None, None]))
    p = torch.tensor([[1 - 1e-4, 1e-4, 0.0, 0.0]])
    assert sb.head_metrics(p[None, None])[0, 0, 1].item() == 0.5  # exactly 1e-4 is not below it
    p = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])  # a query with no weight at all
    assert sb.head_metrics(p[None, None])[0, 0, 2].item() == pytest.approx(0.5 / 2)  # sum A |i - j| / sum A


def test_sparse_byte_extracted_metrics_are_means_over_windows(tmp_path):
    data = tmp_path / "d"
    write_dataset(data, text_splits(tutorial_bytes(), 3000))
    cfg = sb.SparseByteConfig(variant="sparse", vocab_size=256, n_layer=2, n_head=4, n_embd=32, block_size=64)
    model = sb.build_model(cfg)
    m, n = sb.extract_metrics(model, core.TokenData(str(data)), 5, 2, torch.device("cpu"))
    assert n == 5 and m.shape == (2, 4, 3)
    probs = {}
    val = np.fromfile(data / "val.bin", np.uint8).astype(np.int64)
    x = torch.from_numpy(val[:5 * 64].reshape(5, 64))  # the first 5 non-overlapping windows
    with torch.no_grad():
        model(x, record=lambda layer, p: probs.__setitem__(layer, p))
    want = torch.stack([sb.head_metrics(probs[layer]).mean(0) for layer in range(2)]).double()
    torch.testing.assert_close(m, want, atol=1e-6, rtol=1e-5)  # float64 sums vs a float32 mean
    write_dataset(tmp_path / "short", {"train": val[:1000].astype(np.uint8).tobytes(),
                                       "val": val[:200].astype(np.uint8).tobytes()})  # three windows of 65
    m3, n = sb.extract_metrics(model, core.TokenData(str(tmp_path / "short")), 5, 2, torch.device("cpu"))
    with torch.no_grad():
        model(x[:3], record=lambda layer, p: probs.__setitem__(layer, p))
    want = torch.stack([sb.head_metrics(probs[layer]).mean(0) for layer in range(2)]).double()
    assert n == 3 and torch.allclose(m3, want, atol=1e-6, rtol=1e-5)  # the mean of the windows there are


# ---- sparse_byte: clustering

def test_sparse_byte_standardize_matches_population_zscore():
    X = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    Z = sb.standardize(X)
    np.testing.assert_allclose(Z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(Z[:, [0, 2]].std(0), 1)
    assert (Z[:, 1] == 0).all()
    Z = sb.standardize(np.array([[0.1, 1.0], [0.1, 2.0], [0.1, 4.0]]))  # the mean of three 0.1 is not 0.1
    assert np.abs(Z[:, 0]).max() < 1e-12  # constant: ~0 as StandardScaler, not (0.1 - mean) / 1e-17 = -1


def test_sparse_byte_kmeans_recovers_planted_clusters():
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 25)
    centers = np.array([[0, 0, 0], [6, 0, 0], [0, 6, 0], [0, 0, 6]], float)
    X = centers[truth] + rng.normal(0, 0.5, (100, 3))
    labels, found = sb.kmeans(X, 4, seed=1)
    for t in range(4):  # one label per planted cluster, all different
        assert len(set(labels[truth == t])) == 1
    assert len(set(labels)) == 4
    scores = {k: sb.silhouette_samples(X, sb.kmeans(X, k)[0]).mean() for k in range(2, 7)}
    assert max(scores, key=scores.get) == 4


def test_sparse_byte_silhouette_matches_direct_computation():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(30, 3))
    labels = rng.integers(0, 4, 30)
    labels[7] = 9  # a singleton cluster: silhouette 0
    s = sb.silhouette_samples(X, labels)
    d = lambda a, b: math.sqrt(((X[a] - X[b]) ** 2).sum())
    for i in range(30):
        same = [j for j in range(30) if labels[j] == labels[i] and j != i]
        if not same:
            assert s[i] == 0
            continue
        a = sum(d(i, j) for j in same) / len(same)
        b = min(np.mean([d(i, j) for j in range(30) if labels[j] == c]) for c in set(labels) - {labels[i]})
        assert s[i] == pytest.approx((b - a) / max(a, b), rel=1e-10)
    assert (sb.silhouette_samples(X, np.full(30, 4)) == 0).all()  # one cluster: no silhouette


def inertia(X, labels):
    return sum(((X[labels == c] - X[labels == c].mean(0)) ** 2).sum() for c in np.unique(labels))


def test_sparse_byte_kmeans_plus_plus_seeding_and_best_of_n_init():
    """k-means++ seeds one center per far-apart cluster (one init suffices; uniform seeding puts two in one cluster
    and Lloyd keeps them there); of n_init runs the one of least inertia is returned."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(8), 10)
    Y = 1000 * np.eye(8)[truth] + rng.normal(0, 1, (80, 8))
    for s in range(5):
        assert len(set(zip(truth, sb.kmeans(Y, 8, s, n_init=1)[0]))) == 8
    truth = np.repeat(np.arange(8), 20)
    X = rng.uniform(0, 10, (8, 2))[truth] + rng.normal(0, 0.8, (160, 2))
    best, first = zip(*[(inertia(X, sb.kmeans(X, 8, s)[0]), inertia(X, sb.kmeans(X, 8, s, n_init=1)[0]))
                        for s in range(5)])
    assert all(b <= f + 1e-9 for b, f in zip(best, first)) and sum(best) < sum(first) - 1


def test_sparse_byte_kmeans_plus_plus_draws_the_first_center_uniformly_then_by_squared_distance():
    """Three points 0, 1, 10 as three clusters: each is its own center and its label tells the order of the draws. The
    first is any point; after 0 the next is 1 with probability 1 / 101 (d^2; 1 / 11 by d), after 10 it is 0 or 1
    (55% / 45%: drawn, not the farthest)."""
    X = np.array([[0.0], [1.0], [10.0]])
    draws = collections.Counter(tuple(np.argsort(sb.kmeans(X, 3, seed, n_init=1)[0])[:2]) for seed in range(300))
    assert {first for first, _ in draws} == {0, 1, 2}
    assert draws[2, 0] > 30 and draws[2, 1] > 30
    assert draws[0, 1] + draws[1, 0] <= 4 and draws[0, 2] + draws[1, 2] > 150


def test_sparse_byte_kmeans_returns_a_lloyd_fixed_point():
    """Points without clusters (Lloyd needs several steps): each head's label is its nearest center, each center the
    mean of its heads."""
    X = np.random.default_rng(0).uniform(0, 1, (60, 2))
    for seed in range(3):
        labels, centers = sb.kmeans(X, 4, seed)
        assert (((X[:, None] - centers[None]) ** 2).sum(-1).argmin(1) == labels).all()
        assert np.allclose(centers, [X[labels == c].mean(0) for c in range(4)], rtol=0, atol=1e-9)


def test_sparse_byte_distance_is_absolute_under_the_inverted_mask():
    """The thesis's as-run sparse models attend to later keys (--inverted-mask): distance = sum A |i - j| / sum A
    is a distance there too (each query on the next key: 1, not -1)."""
    T = 16
    nxt = torch.zeros(T, T)
    nxt[torch.arange(T - 1), torch.arange(1, T)] = 1.0
    nxt[T - 1, T - 2] = 1.0
    m = sb.head_metrics(nxt[None, None])[0, 0]
    assert m[2].item() == pytest.approx(1.0)


# ---- sparse_byte: command line

def test_sparse_byte_thesis_knobs_map_onto_core(tmp_path):
    write_dataset(tmp_path / "d", text_splits(tutorial_bytes(), 5000))
    n = core.TokenData(str(tmp_path / "d")).tokens("train")
    cfg = sb.SparseByteConfig(seq_length=128, batch_size=4, grad_accum=2, num_epochs=3, max_iters=7)
    assert cfg.block_size == 128 and cfg.max_iters == 7  # epochs count once the dataset is known
    cfg.fit_data(core.TokenData(str(tmp_path / "d")))
    assert cfg.max_iters == 3 * ((n - 1) // (4 * 128)) // 2
    assert cfg.seq_length == 0 and cfg.num_epochs == 0  # consumed: a saved config does not re-map
    out = str(tmp_path / "run")  # through the CLI: the epochs of the dataset trained on, not of the default one
    assert sb.main(["--train", "--preset", "tiny", "--data", str(tmp_path / "d"), "--out", out, "--batch-size", "4",
                    "--num-epochs", "0.05", "--eval-interval", "1000"]) == 0
    assert core.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == int(0.05 * ((n - 1) // (4 * 64)))
    thesis = sb.SparseByteConfig(**sb.SparseByteConfig.PRESETS["thesis"])
    assert (thesis.n_layer, thesis.n_head, thesis.n_embd, thesis.hidden, thesis.block_size) == (12, 8, 512, 2048, 1024)


def test_sparse_byte_cli_train_eval_metrics_cluster(tmp_path, capsys, saved_figures):
    data = str(tmp_path / "d")
    write_dataset(data, text_splits(tutorial_bytes(), 6000, 3000))
    common = ["--preset", "tiny", "--data", data, "--n-head", "8", "--n-embd", "64", "--max-iters", "20",
              "--eval-interval", "20", "--lr", "3e-3"]
    for variant in ("dense", "sparse"):
        out = str(tmp_path / variant)
        assert sb.main(["--train", "--variant", variant, "--out", out, *common]) == 0
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        assert log[-1]["loss"] < log[0]["loss"] - 0.5  # learns bytes
        assert sb.main(["--eval", "--out", out, "--data", data]) == 0
        text = capsys.readouterr().out
        assert "val" in text and "test" in text
        fails_in_one_line(capsys, sb.main(["--eval", "--out", out, "--data", data, "--seq-length", "128"]),
                          "--block-size 128 contradicts")  # the model's 64 positions
        assert sb.main(["--metrics", "--out", out, "--data", data, "--metric-seqs", "4"]) == 0
        printed = capsys.readouterr().out
        assert (f"{variant} ({out}/ckpt.pt): metrics of 16 heads over 4 val windows of 64 tokens of {data} -> "
                in printed)  # which model, which data
        rows = list(csv.reader(open(os.path.join(out, "head_metrics.csv"))))
        assert rows[0] == ["layer", "head", "entropy", "sparsity", "distance"] and len(rows) == 1 + 2 * 8
        for layer in range(2):  # each layer's means over its heads
            m = np.array([[float(x) for x in r[2:]] for r in rows[1:] if r[0] == str(layer)]).mean(0)
            assert f"layer {layer:2d} entropy {m[0]:8.3f} sparsity {m[1]:8.3f} distance {m[2]:8.3f}" in printed
    sp = {(int(r["layer"]), int(r["head"])): float(r["sparsity"])
          for r in csv.DictReader(open(tmp_path / "sparse" / "head_metrics.csv"))}
    assert sp[(0, 0)] > 1 - 9 / 64  # a focused-local head attends at most 9 keys per row
    res = str(tmp_path / "heads")
    assert sb.main(["--cluster", "--runs", str(tmp_path / "dense"), str(tmp_path / "sparse"), "--out", res,
                    "--cluster-k-max", "5"]) == 0
    assert "k-means of the 32 heads of dense, sparse\n" in capsys.readouterr().out  # folders named as their variants
    titles = [figure_text(fig) for _, fig, _ in saved_figures]  # the figures name the runs whose heads they show
    assert len(titles) == 3 and all("32headsofdense,sparse" in t for t in titles)
    assert saved_figures[2][1].axes[0].get_xlabel() == "entropy (nats)"  # the axes their units
    for f in ("silhouette_k.png", "silhouette_samples.png", "head_clusters.png", "clusters.csv", "silhouette.json"):
        assert os.path.getsize(os.path.join(res, f)) > 0
    clusters = list(csv.DictReader(open(os.path.join(res, "clusters.csv"))))
    assert {r["variant"] for r in clusters} == {"dense", "sparse"} and len(clusters) == 32
    metrics = [os.path.join(tmp_path, v, "head_metrics.csv") for v in ("dense", "sparse")]
    assert [r["run"] for r in clusters] == [metrics[0]] * 16 + [metrics[1]] * 16  # runs of one variant apart
    kept = json.load(open(os.path.join(res, "silhouette.json")))
    assert set(kept["silhouette"]) == {"2", "3", "4", "5"} and kept["runs"] == metrics


@pytest.mark.parametrize("argv, message", [
    (["--train", "--variant", "sparse", "--attn-impl", "sdpa"], "sparse variant runs"),
    (["--train", "--variant", "dense", "--attn-impl", "triton"], "sparse variant's kernel"),
    (["--train", "--mask-subset", "05"], "--mask-subset"),
    (["--train", "--variant", "banded"], "invalid choice"),
    (["--metrics", "--out", "/nonexistent/run"], "checkpoint not found"),
    (["--cluster", "--runs", "/nonexistent/run"], "no head metrics"),
    (["--cluster", "--runs", "/nonexistent/run", "--cluster-k-max", "1"], "need --cluster-k-max >= 2"),
])
def test_sparse_byte_cli_mistakes_give_one_line(argv, message, capsys):
    assert sb.main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, message)


def test_sparse_byte_cluster_figures_fit_long_run_names(tmp_path, saved_figures):
    """The runs named in the figures' titles stay inside the figures (two seeds' folder names ran off the silhouette
    plot, and off the 3.5-inch samples figure of --cluster-k-max 2); a folder without run.json is named once."""
    rng, runs = np.random.default_rng(0), []
    for name in ("sparse_byte-dense-seed1337", "sparse_byte-sparse-seed1338"):
        os.makedirs(tmp_path / name)
        sb.write_metrics_csv(str(tmp_path / name / "head_metrics.csv"), rng.uniform(0.1, 4, (2, 4, 3)))
        runs.append(str(tmp_path / name))
    for k_max in ("3", "2"):
        saved_figures.clear()
        assert sb.main(["--cluster", "--runs", *runs, "--out", str(tmp_path / "heads"), "--cluster-k-max", k_max]) == 0
        named = [(fig, t) for _, fig, _ in saved_figures for t in fig.findobj(core.pyplot().Text)
                 if t.get_visible() and "16 heads of" in t.get_text()]
        assert len(named) == 3 and all(inside(fig, [t]) for fig, t in named), [t.get_text() for _, t in named]
        assert "sparse_byte-dense-seed1337, sparse_byte-sparse-seed1338" in named[-1][1].get_text()


def silhouette_direct(X, labels):
    """Mean silhouette, one head at a time (sklearn's definition; a head alone in its cluster scores 0)."""
    s = []
    for i in range(len(X)):
        d = np.sqrt(((X - X[i]) ** 2).sum(1))
        own = (labels == labels[i]) & (np.arange(len(X)) != i)
        if not own.any():
            s.append(0.0)
            continue
        b = min(d[labels == c].mean() for c in set(labels) - {labels[i]})
        s.append((b - d[own].mean()) / max(b, d[own].mean()))
    return float(np.mean(s))


def test_sparse_byte_cluster_outputs_are_the_direct_computation(tmp_path, capsys):
    """--cluster on planted heads: two groups apart in entropy and sparsity, a distance of large units with no
    groups: k-means on the standardised metrics finds the groups (on the raw ones, the distance splits them);
    silhouette.json holds the mean silhouette of each k's labels in clusters.csv, the best k and the shown one;
    clusters.csv the raw metrics; the printed line the scores."""
    rng, runs, groups = np.random.default_rng(0), [], []
    for name in ("r1", "r2"):
        g = rng.integers(0, 2, 15)
        m = np.stack([0.1 + 0.8 * g, 0.2 + 0.6 * g, 500 + rng.uniform(-5, 5, 15)], 1) + rng.normal(0, 0.01, (15, 3))
        os.makedirs(tmp_path / name)
        sb.write_metrics_csv(str(tmp_path / name / "head_metrics.csv"), m.reshape(3, 5, 3))
        runs.append(str(tmp_path / name))
        groups.append(g)
    raw, groups = np.concatenate([sb.read_metrics_csv(os.path.join(r, "head_metrics.csv"))[1] for r in runs]), \
        np.concatenate(groups)
    Z = (raw - raw.mean(0)) / raw.std(0)
    for shown in (0, 2):
        out = tmp_path / f"heads{shown}"
        capsys.readouterr()
        assert sb.main(["--cluster", "--runs", *runs, "--out", str(out), "--cluster-k-max", "5",
                        "--cluster-k", str(shown)]) == 0
        rows = list(csv.DictReader(open(out / "clusters.csv")))
        kept = json.load(open(out / "silhouette.json"))
        assert np.array([[float(r[m]) for m in sb.METRICS] for r in rows]).tolist() == raw.tolist()
        labels = {k: np.array([int(r[f"k{k}"]) for r in rows]) for k in range(2, 6)}
        assert len(set(zip(labels[2], groups))) == 2  # the planted groups, one label each
        want = {k: silhouette_direct(Z, labels[k]) for k in range(2, 6)}
        best = max(want, key=want.get)
        assert {int(k): v for k, v in kept["silhouette"].items()} == pytest.approx(want, rel=1e-9)
        assert kept["best_k"] == best != 2 and kept["shown_k"] == (shown or best) and kept["heads"] == 30
        assert f"silh.  {' '.join(f'{want[k]:6.3f}' for k in range(2, 6))}   best k={best};" in capsys.readouterr().out
    sb.write_metrics_csv(str(tmp_path / "r1" / "head_metrics.csv"), raw[:4].reshape(1, 4, 3))
    assert sb.main(["--cluster", "--runs", runs[0], "--out", str(tmp_path / "four"), "--cluster-k-max", "5"]) == 0
    assert set(json.load(open(tmp_path / "four" / "silhouette.json"))["silhouette"]) == {"2", "3"}  # k < heads


def test_sparse_byte_cluster_of_a_checkpoint_gives_one_line(tmp_path, capsys):
    """--cluster --runs given a checkpoint instead of a run folder or its CSV: one line (it was a UnicodeDecodeError
    traceback), nothing written."""
    torch.save({"model": torch.arange(300)}, tmp_path / "ckpt.pt")
    assert sb.main(["--cluster", "--runs", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "heads")]) == 2
    assert_one_line_error(capsys.readouterr().err, f"{tmp_path / 'ckpt.pt'}: not a head_metrics.csv")
    assert not (tmp_path / "heads").exists()


def test_sparse_byte_cluster_of_a_cut_or_edited_metrics_file_gives_one_line(tmp_path, capsys):
    """A head_metrics.csv cut inside a row (a copy that stopped) or with a value that is no number: one line naming
    the file (it was a TypeError or ValueError traceback), nothing written."""
    path = tmp_path / "run" / "head_metrics.csv"
    os.makedirs(path.parent)
    sb.write_metrics_csv(str(path), np.ones((2, 4, 3)))
    whole = path.read_text()
    for text in (whole[:-10], whole.replace("1.0", "x", 1)):
        path.write_text(text)
        assert sb.main(["--cluster", "--runs", str(path.parent), "--out", str(tmp_path / "heads")]) == 2
        assert_one_line_error(capsys.readouterr().err, f"{path}: not a head_metrics.csv")
    assert not (tmp_path / "heads").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_sparse_byte_kernel_bench_refused_on_cpu(capsys):
    assert sb.main(["--kernel-bench", "--device", "cpu"]) == 2
    assert "CUDA" in capsys.readouterr().err


# ---- sparse_byte: thesis bodies
# Minimal re-statements of the thesis's two models: EnhancedCharTransformer (dense_transformer/
# stable_char_transformer.py: nn.MultiheadAttention, position MLP, gains, final norm) and SparseByteTransformer
# (sparse_byte_transformer.py with sparse_attention.py's layer and both of its attention paths), with random weights,
# saved as train_*_transformer.py saves them.

THESIS_HEADS = [0, 3, 3, 1, 1, 1, 2, 2]  # 8 heads: counts {0: 1, 3: 2, 1: 3, 2: 2} in that order


def thesis_pe(max_len, C):
    pe = torch.zeros(max_len, C)
    position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, C, 2).float() * (-math.log(10000.0) / C))
    pe[:, 0::2], pe[:, 1::2] = torch.sin(position * div_term), torch.cos(position * div_term)
    return pe


class ThesisSparseAttention(torch.nn.Module):
    def __init__(self, C, H):
        super().__init__()
        self.H = H
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (torch.nn.Linear(C, C) for _ in range(4))

    def forward(self, x, need_weights=False):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.H, C // self.H).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        allowed = torch.zeros(self.H, T, T, dtype=torch.bool)  # pattern & causal (row_sets: the thesis's key sets)
        for h, c in enumerate(THESIS_HEADS):
            for i, keys in enumerate(row_sets(c, T)):
                allowed[h, i, sorted(keys)] = True
        masked = ~allowed.unsqueeze(0)  # "True means MASK OUT"
        if not need_weights:  # the default path: that mask handed to SDPA, which reads True as "attend"
            y, probs = F.scaled_dot_product_attention(q, k, v, attn_mask=masked), None
        else:  # the manual path
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.H)
            probs = scores.masked_fill(masked, torch.finfo(scores.dtype).min).softmax(-1)
            y = probs @ v
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C)), probs


class ThesisSparseByteTransformer(torch.nn.Module):
    def __init__(self, V, C, H, L, ff, T):
        super().__init__()
        nn = torch.nn
        self.token_embedding, self.pos_encoder = nn.Embedding(V, C), nn.Module()
        self.pos_encoder.register_buffer("pe", thesis_pe(T, C).unsqueeze(0))
        self.transformer_encoder = nn.ModuleList()
        for _ in range(L):
            layer = nn.Module()
            layer.self_attn = ThesisSparseAttention(C, H)
            layer.linear1, layer.linear2 = nn.Linear(C, ff), nn.Linear(ff, C)
            layer.norm1, layer.norm2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.transformer_encoder.append(layer)
        self.output_projection = nn.Linear(C, V)
        self.output_projection.weight = self.token_embedding.weight
        randomize(self)

    def forward(self, idx, need_weights=False):
        x = self.token_embedding(idx) * math.sqrt(self.token_embedding.embedding_dim)
        x, probs = x + self.pos_encoder.pe[:, :idx.size(1)], []
        for layer in self.transformer_encoder:
            y, p = layer.self_attn(layer.norm1(x), need_weights)
            x = x + y
            x = x + layer.linear2(F.relu(layer.linear1(layer.norm2(x))))
            probs.append(p)
        return self.output_projection(x), probs


class ThesisDenseTransformer(torch.nn.Module):
    def __init__(self, V, C, H, L, ff):
        super().__init__()
        nn = torch.nn
        self.embedding, self.pos_encoder = nn.Embedding(V, C), nn.Module()
        self.pos_encoder.register_buffer("pe", thesis_pe(5000, C))
        self.pos_encoder.alpha, self.pos_encoder.norm = nn.Parameter(torch.ones(1)), nn.LayerNorm(C)
        self.pos_encoder.position_ff = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.Dropout(), nn.Linear(C, C),
                                                     nn.Dropout())
        self.transformer_blocks = nn.ModuleList()
        for _ in range(L):
            block = nn.Module()
            block.self_attn = nn.MultiheadAttention(C, H, dropout=0.1, batch_first=True)
            block.feed_forward = nn.Sequential(nn.Linear(C, 2 * ff), nn.SiLU(), nn.Dropout(), nn.Linear(2 * ff, C),
                                               nn.Dropout())
            block.norm1, block.norm2 = nn.LayerNorm(C, eps=1e-6), nn.LayerNorm(C, eps=1e-6)
            block.gamma1, block.gamma2 = nn.Parameter(torch.ones(1)), nn.Parameter(torch.ones(1))
            self.transformer_blocks.append(block)
        self.norm, self.output = nn.LayerNorm(C, eps=1e-6), nn.Linear(C, V)
        self.output.weight = self.embedding.weight
        randomize(self, 0.3)

    def forward(self, idx):
        T, pos = idx.size(1), self.pos_encoder
        mask = ~(torch.triu(torch.ones(T, T)) == 1).transpose(0, 1)  # True = masked
        x = self.embedding(idx) * math.sqrt(self.embedding.embedding_dim)
        x = x + pos.alpha * pos.pe[:T].unsqueeze(0)
        x, probs = x + pos.position_ff(pos.norm(x)), []
        for b in self.transformer_blocks:
            y, p = b.self_attn(*[b.norm1(x)] * 3, attn_mask=mask, need_weights=True, average_attn_weights=False)
            x = x + b.gamma1 * y
            x = x + b.gamma2 * b.feed_forward(b.norm2(x))
            probs.append(p)
        return self.output(self.norm(x)), probs


def randomize(model, std=0.1):
    with torch.no_grad():
        for p in model.parameters():  # every parameter random, norms, gains and biases included (logits O(1-10))
            p.normal_(0.0, std)


def thesis_file(tmp_path, variant, L=2, C=64, ff=48, T=64):
    """A model of the thesis with random weights, saved as its train script saves it -> (model, path)."""
    torch.manual_seed(0)
    conf = dict(vocab_size=256, d_model=C, nhead=8, num_layers=L, dim_feedforward=ff, seed=42, num_epochs=20)
    if variant == "dense":
        model = ThesisDenseTransformer(256, C, 8, L, ff).eval()
        conf.update(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, token_dropout=0.05,
                    use_checkpoint=True, stochastic_depth_prob=0.1)
    else:
        model = ThesisSparseByteTransformer(256, C, 8, L, ff, T).eval()
        conf.update(dropout=0.05, attention_dropout=0.1, activation_dropout=0.05, token_dropout=0.02,
                    use_checkpoint=True, stochastic_depth_prob=0.1, seq_length=T, mask_subset="0123")
    path = tmp_path / "models" / f"{variant}_seed_42.pt"
    os.makedirs(path.parent, exist_ok=True)
    torch.save(dict(model_state_dict=model.state_dict(), train_losses=[2.0], val_losses=[2.1], config=conf, seed=42),
               path)
    return model, str(path)


def test_sparse_byte_thesis_dense_file_reproduces_logits_and_probabilities(tmp_path):
    ref, path = thesis_file(tmp_path, "dense")
    idx = torch.randint(0, 256, (2, 64))
    for ckpt in (None, "model", "bare", "compiled"):  # the train script's dict; extract_head_metrics.py's other two
        if ckpt:                                          # forms; a compiled model's (keys under _orig_mod.)
            sd = torch.load(path)["model_state_dict"]
            sd = {"_orig_mod." + k: v for k, v in sd.items()} if ckpt == "compiled" else sd
            torch.save(dict(model=sd) if ckpt == "model" else sd, tmp_path / f"{ckpt}.pt")
        model = core.load_model(sb.PAPER, str(tmp_path / f"{ckpt}.pt") if ckpt else path)
        cfg = model.cfg
        assert (cfg.body, cfg.variant, cfg.n_layer, cfg.n_head, cfg.hidden, cfg.block_size) == ("thesis", "dense", 2,
                                                                                                  8, 96, 1024)
        assert (cfg.dropout, cfg.token_dropout, cfg.drop_path, cfg.inverted_mask) == (0.1, 0.05, 0.1, False)
        seen = {}
        with torch.no_grad():
            logits, probs = ref(idx)
            torch.testing.assert_close(model(idx), logits, atol=1e-5, rtol=1e-5)
            model(idx, record=lambda layer, p: seen.setdefault(layer, p))  # what --metrics reads
        for layer, p in enumerate(probs):
            torch.testing.assert_close(seen[layer], p, atol=1e-6, rtol=1e-5)


def test_sparse_byte_thesis_sparse_file_reproduces_both_attention_paths(tmp_path):
    ref, path = thesis_file(tmp_path, "sparse")
    idx = torch.randint(0, 256, (2, 64))
    as_run = core.load_model(sb.PAPER, path)  # the mask its weights were trained with: the default SDPA path's
    cfg = as_run.cfg
    assert (cfg.body, cfg.variant, cfg.n_layer, cfg.hidden, cfg.block_size, cfg.inverted_mask) == ("thesis", "sparse",
                                                                                                   2, 48, 64, True)
    assert (cfg.dropout, cfg.token_dropout, cfg.drop_path, cfg.mask_subset) == (0.05, 0.02, 0.0, "0123")
    intended = core.load_model(sb.PAPER, path, given={"inverted_mask": False})  # the manual path's (need_weights)
    seen = {}
    with torch.no_grad():
        torch.testing.assert_close(as_run(idx), ref(idx)[0], atol=1e-5, rtol=1e-5)
        logits, probs = ref(idx, need_weights=True)
        torch.testing.assert_close(intended(idx, record=lambda layer, p: seen.setdefault(layer, p)), logits,
                                   atol=1e-5, rtol=1e-5)
        for layer, p in enumerate(probs):
            torch.testing.assert_close(seen[layer], p, atol=1e-6, rtol=1e-5)
        later = idx.clone()
        later[:, 40] = (later[:, 40] + 1) % 256
        assert not torch.allclose(as_run(later)[:, :40], as_run(idx)[:, :40])  # as run, it reads the future
        torch.testing.assert_close(intended(later)[:, :40], intended(idx)[:, :40])
        short = idx[:, :16]  # rows the inverted mask leaves without a key: zero weights in every path, as SDPA's
        torch.testing.assert_close(as_run(short, record=lambda layer, p: None), as_run(short), atol=1e-5, rtol=1e-5)


def test_sparse_byte_thesis_file_settings_block_size_from_positions_mask_subset_and_other_dropouts(tmp_path, capsys):
    _, path = thesis_file(tmp_path, "sparse")
    ckpt = torch.load(path)
    assert sb.from_thesis(dict(model=ckpt["model_state_dict"]), path)[0].block_size == 64  # no config: its pe's
    ckpt["config"]["mask_subset"] = "13"  # patterns 1 and 3 only
    assert sb.from_thesis(ckpt, path)[0].mask_subset == "13"
    _, path = thesis_file(tmp_path, "dense")
    ckpt = torch.load(path)
    ckpt["config"]["attention_dropout"] = 0.2
    assert sb.from_thesis(ckpt, path)[0].dropout == 0.1
    assert "attention and activation dropout differ from dropout; --body thesis uses dropout" in capsys.readouterr().err


def test_sparse_byte_thesis_files_of_other_kinds_are_one_line(tmp_path):
    _, path = thesis_file(tmp_path, "sparse")
    ckpt = torch.load(path)
    del ckpt["model_state_dict"]["transformer_encoder.1.self_attn.k_proj.weight"]
    torch.save(ckpt, tmp_path / "broken.pt")
    with pytest.raises(core.ConfigError, match="missing transformer.h.1.attn.c_attn.weight, unexpected transformer.h.1"
                                               ".attn.q_proj.weight"):
        core.load_model(sb.PAPER, str(tmp_path / "broken.pt"))
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(core.ConfigError, match="not a checkpoint sparse_byte.py reads .*the thesis's model files"):
        core.load_model(sb.PAPER, str(tmp_path / "other.pt"))
    with pytest.raises(core.ConfigError, match="--inverted-mask is the sparse variant's"):
        core.load_model(sb.PAPER, thesis_file(tmp_path, "dense")[1], given={"inverted_mask": True})


def test_sparse_byte_thesis_preset_is_the_train_scripts_recipe():
    p = sb.SparseByteConfig.PRESETS["thesis"]
    assert {k: p[k] for k in ("lr", "min_lr", "warmup_iters", "weight_decay", "beta2", "grad_clip", "batch_size",
                              "grad_accum", "dropout")} == dict(lr=1e-4, min_lr=1e-9, warmup_iters=1000,
                                                                weight_decay=0.1, beta2=0.999, grad_clip=1.0,
                                                                batch_size=32, grad_accum=4, dropout=0.05)


def test_sparse_byte_thesis_stochastic_depth_and_token_dropout_rates():
    """Layer i skipped with p = drop_path * i / L per forward; each byte replaced by byte 0 with p = token_dropout."""
    cfg = sb.SparseByteConfig(**{**sb.SparseByteConfig.PRESETS["thesis-dense"], "n_layer": 4, "n_embd": 64,
                                 "mlp_hidden": 64, "block_size": 64, "drop_path": 0.4, "token_dropout": 0.25})
    model = sb.build_model(cfg).train()
    idx = torch.randint(1, 256, (64, 64))
    torch.manual_seed(0)
    skips = torch.tensor([[model.context(idx[:1]).cache["skip"][i] for i in range(4)] for _ in range(2000)])
    torch.testing.assert_close(skips.float().mean(0), torch.arange(4) * 0.4 / 4, atol=0.03, rtol=0)
    seen = []
    hook = model.transformer.wte.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    model.embed(idx, None)
    hook.remove()
    assert abs((seen[0] == 0).float().mean().item() - 0.25) < 0.03


def test_sparse_byte_num_epochs_counts_the_thesis_batches(tmp_path):
    """create_batches: (train tokens - 1) // (batch_size x seq_length) batches per epoch (inputs and targets
    shifted by one), then // grad_accum."""
    path = write_dataset(tmp_path / "d", {"train": bytes(10 * 4 * 16), "val": bytes(100)})
    for epochs, accum, want in ((1, 1, 9), (2, 1, 18), (2, 2, 9)):
        cfg = sb.SparseByteConfig(vocab_size=256, batch_size=4, block_size=16, grad_accum=accum, num_epochs=epochs)
        cfg.fit_data(core.TokenData(path))
        assert cfg.max_iters == want


def test_sparse_byte_thesis_init_and_weight_decay_groups():
    cfg = sb.SparseByteConfig(**{**sb.SparseByteConfig.PRESETS["thesis-dense"], "n_layer": 2, "n_embd": 64,
                                 "mlp_hidden": 512})
    model = sb.build_model(cfg)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert all((p == 0).all() for n, p in model.named_parameters() if n.endswith(".bias"))
    assert model.transformer.h[1].mlp[0].weight.abs().max() <= 0.04
    assert (model.transformer.h[1].attn.dropout, model.transformer.h[1].drop.p) == pytest.approx((0.105, 0.11))
    decayed, plain = (g["params"] for g in model.configure_optimizers(cfg, "cpu")[0].param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in plain} == {n for n in names.values() if n.endswith(".bias")}
    assert {"transformer.h.0.gain_1", "transformer.h.0.norm_1.weight", "transformer.pos.alpha"} <= \
        {names[id(p)] for p in decayed}
    sparse = sb.build_model(dataclasses.replace(cfg, variant="sparse", drop_path=0.0))
    assert sparse.transformer.wte.weight.std().item() == pytest.approx(1.0, rel=0.1)  # nn.Embedding's default
    assert isinstance(sparse.transformer.norm_f, torch.nn.Identity) and sparse.lm_head.bias.abs().max() > 0


@pytest.mark.parametrize("argv, message", [
    (["--train", "--variant", "dense", "--inverted-mask"], "sparse variant's as-run mask"),
    (["--train", "--variant", "sparse", "--inverted-mask", "--attn-impl", "triton"], "with --inverted-mask auto, sdpa"),
    (["--train", "--body", "theirs"], "--body must be ours or thesis"),
    (["--train", "--body", "thesis", "--family", "llama"], "--body must be ours or thesis"),
    (["--train", "--drop-path", "1.5"], "--drop-path must be in [0, 1)"),
    (["--train", "--body", "thesis", "--n-head", "1", "--n-embd", "63"], "needs an even --n-embd"),
    (["--train", "--num-epochs", "inf"], "--num-epochs must be a finite number >= 0"),  # were Overflow-
    (["--train", "--num-epochs", "nan"], "--num-epochs must be a finite number >= 0"),  # and ValueError tracebacks
])
def test_sparse_byte_thesis_flag_mistakes_give_one_line(argv, message, capsys):
    assert sb.main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, message)


def test_sparse_byte_thesis_cli_eval_metrics_and_training(tmp_path, capsys):
    data = str(tmp_path / "d")
    write_dataset(data, text_splits(tutorial_bytes(), 3000, 1000))
    _, path = thesis_file(tmp_path, "sparse")
    assert sb.main(["--eval", "--init-from", path, "--data", data]) == 0
    assert "test" in capsys.readouterr().out
    for mask in ("--inverted-mask", "--no-inverted-mask"):
        out = str(tmp_path / mask)
        assert sb.main(["--metrics", "--init-from", path, "--data", data, "--out", out, "--metric-seqs", "2",
                        mask]) == 0
        sparsity = [float(r["sparsity"]) for r in csv.DictReader(open(os.path.join(out, "head_metrics.csv")))]
        assert len(sparsity) == 16
        assert (sparsity[0] > 1 - 9 / 64) == (mask == "--no-inverted-mask")  # the focused-local head: <= 9 keys a row
    common = ["--preset", "tiny", "--device", "cpu", "--data", data, "--n-head", "8", "--max-iters", "3",
              "--eval-interval", "3", "--eval-iters", "1", "--batch-size", "2", "--dropout", "0.1", "--token-dropout",
              "0.1"]
    for variant, extra in (("dense", ["--drop-path", "0.5"]), ("sparse", []), ("sparse", ["--inverted-mask"])):
        out = str(tmp_path / f"train-{variant}{extra}")
        assert sb.main(["--train", "--body", "thesis", "--variant", variant, "--out", out, *common, *extra]) == 0
        assert math.isfinite(core.read_log(out)[-1]["val_loss"])
        model = core.load_model(sb.PAPER, os.path.join(out, "ckpt.pt"))
        assert isinstance(model, sb.ThesisGPT) and model.cfg.inverted_mask == bool(extra and variant == "sparse")
    out = str(tmp_path / "continued")  # train the thesis's own model on, then evaluate our checkpoint of it
    assert sb.main(["--train", "--init-from", path, "--data", data, "--device", "cpu", "--max-iters", "2",
                    "--eval-interval", "2", "--eval-iters", "1", "--batch-size", "2", "--out", out]) == 0
    assert core.load_model(sb.PAPER, os.path.join(out, "ckpt.pt")).cfg.inverted_mask
    assert sb.main(["--eval", "--out", out, "--data", data]) == 0


# ---- sparse_byte: GPU

@gpu
@pytest.mark.parametrize("T", [300, 1024])
def test_sparse_byte_gpu_compiled_flex_matches_eager(T):
    att = attention("0123", "flex", T=T, D=64).cuda()
    res = []
    for fn in (att.attend_eager, att.attend_flex):
        q, k, v = (t.detach().cuda().requires_grad_() for t in qkv(2, 8, T, 64))
        y = fn(q, k, v, core.Ctx())
        y.pow(2).sum().backward()
        res.append((y, q.grad, k.grad, v.grad))
    for a, b in zip(res[1], res[0]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@gpu
@pytest.mark.parametrize("T", [300, 1024, 4096])
def test_sparse_byte_gpu_triton_matches_eager(T):
    """The fused kernel in bf16 (autotuned tiles) vs the masked reference in fp32."""
    att = attention("0123", "triton", T=T, D=64).cuda()
    res = []
    for fn, dtype in ((att.attend_eager, torch.float32), (att.attend_triton, torch.bfloat16)):
        q, k, v = (t.detach().cuda().to(dtype).requires_grad_() for t in qkv(2, 8, T, 64))
        y = fn(q, k, v, core.Ctx())
        y.float().pow(2).sum().backward()
        res.append([t.float() for t in (y, q.grad, k.grad, v.grad)])
    assert max(rel_errors(res[1], res[0])) < 2e-2


@gpu
def test_sparse_byte_gpu_compiled_sparse_model_matches_eager_reference():
    """The training path end to end: inductor-compiled model with block-sparse flex vs the masked eager model."""
    kw = dict(variant="sparse", vocab_size=256, n_layer=2, n_head=8, n_embd=128, block_size=256)
    torch.manual_seed(0)
    fast = sb.build_model(sb.SparseByteConfig(**kw, attn_impl="flex")).cuda()
    ref = sb.build_model(sb.SparseByteConfig(**kw, attn_impl="eager")).cuda()
    ref.load_state_dict(fast.state_dict())
    x = torch.randint(0, 256, (4, 257), device="cuda")
    res = []
    for model, run in ((fast, torch.compile(fast)), (ref, ref)):
        loss = run(x[:, :-1], x[:, 1:])
        loss.backward()
        res.append((loss.detach(), model.transformer.h[0].attn.c_attn.weight.grad))
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@gpu
def test_sparse_byte_gpu_kernel_bench_runs():
    r = sb.bench_attention(1024, sb.head_clusters(8), 64, 4, torch.device("cuda"))
    assert 0.4 < r["block_density"] < 0.5 and r["sparse_ms"] > 0 and r["dense_sdpa_ms"] > 0 and r["triton_ms"] > 0


# ================================================================================================================
# reflex
# Tests of reflex.py.
# ================================================================================================================

def eager_and_fused(heads, **kw):
    """Two reflex models with the same weights: the per-group eager reference and the fused SDPA path."""
    torch.manual_seed(0)
    eager = reflex.build_model(tiny(reflex.ReflexConfig, heads=heads, attn_impl="eager", **kw))
    fused = reflex.build_model(tiny(reflex.ReflexConfig, heads=heads, attn_impl="sdpa", **kw))
    fused.load_state_dict(eager.state_dict())
    return eager, fused


def reflex_grads(model, idx):
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
def test_reflex_matches_the_original_forward(heads, scheme):
    torch.manual_seed(0)
    model = reflex.build_model(tiny(reflex.ReflexConfig, heads=heads, n_layer=6)).eval()
    idx = torch.randint(0, 256, (2, 40))
    assert torch.allclose(model(idx), original_forward(model, idx, scheme), atol=1e-5)


def test_reflex_s00_equals_baseline_exactly():
    torch.manual_seed(0)
    base = reflex.build_model(tiny(reflex.ReflexConfig, variant="baseline"))
    rx = reflex.build_model(tiny(reflex.ReflexConfig, heads="8-0-0"))
    assert list(base.state_dict()) == list(rx.state_dict())
    rx.load_state_dict(base.state_dict())
    idx = torch.randint(0, 256, (2, 48))
    (lb, gb), (lr, gr) = reflex_grads(base, idx), reflex_grads(rx, idx)
    assert torch.equal(lb, lr)
    assert all(torch.equal(gb[n], gr[n]) for n in gb)


@pytest.mark.parametrize("heads, family", [("5-2-1", "gpt2"), ("4-2-2", "gpt2"), ("all", "gpt2"), ("0-5-3", "gpt2"),
                                           ("5-2-1", "llama"), ("all", "llama")])
def test_reflex_fused_matches_per_group_reference(heads, family):
    """One fused SDPA call on gathered K/V == one eager call per head group: logits and every gradient, including
    the earlier layers' c_attn (their K/V projections receive gradient through later cross heads). The llama body:
    the reference rotates the cross heads' keys too (RoPE), as the fused path does."""
    eager, fused = eager_and_fused(heads, family=family)
    idx = torch.randint(0, 256, (2, 48))
    (le, ge), (lf, gf) = reflex_grads(eager, idx), reflex_grads(fused, idx)
    assert torch.allclose(lf, le, atol=1e-5)
    for n in ge:
        assert torch.allclose(gf[n], ge[n], atol=1e-6, rtol=1e-4), n


def test_reflex_presets_are_the_originals_recipe():
    """The original notebook's runs: 6 layers x 8 heads, batch 32, AdamW (0.9, 0.98), eps 1e-6, 5000 iterations."""
    for name, (C, T) in {"e512-t256": (512, 256), "e512-t1024": (512, 1024), "e768-t1024": (768, 1024)}.items():
        c = reflex.ReflexConfig(**reflex.ReflexConfig.PRESETS[name], vocab_size=50304, device="cpu")
        assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.batch_size, c.bias, c.dropout) == (
            6, 8, C, T, 32, False, 0.0), name
        assert (c.lr, c.min_lr, c.warmup_iters, c.max_iters, c.beta1, c.beta2, c.norm_eps) == (
            1e-3, 1e-5, 400, 5000, 0.9, 0.98, 1e-6), name


def test_reflex_rope_on_gathered_keys_equals_gathering_rotated_keys():
    """llama family: the fast path rotates the gathered head columns; RoPE depends on the position only, so that
    equals slicing the rotated keys of the layer they come from."""
    cfg = tiny(reflex.ReflexConfig, family="llama")
    model, att = reflex.build_model(cfg), reflex.ReflexAttention(cfg, 2)
    idx = torch.randint(0, 256, (2, 24))
    ctx, D = model.context(idx), cfg.head_dim
    qkv = torch.randn(2, 24, 3 * cfg.n_embd)
    _, k, v = att.split_qkv(qkv, ctx)  # every head rotated
    kc, vc = (t[..., 5 * D:7 * D] for t in qkv.chunk(3, dim=-1)[1:])
    k2, v2 = att.kv_heads(kc, vc, ctx)
    assert ctx.rope is not None and not torch.allclose(k2, core.split_heads(kc, 2))
    torch.testing.assert_close(k2, k[:, 5:7])
    torch.testing.assert_close(v2, v[:, 5:7])


def test_reflex_cross_heads_backprop_into_earlier_layers_same_slots():
    """5-2-1 over 4 layers: a K/V head slot gets gradient iff some head reads it (not detached, same slots)."""
    torch.manual_seed(0)
    model = reflex.build_model(tiny(reflex.ReflexConfig, heads="5-2-1"))
    _, g = reflex_grads(model, torch.randint(0, 256, (2, 32)))
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
def test_reflex_causal(heads, impl):
    torch.manual_seed(0)
    model = reflex.build_model(tiny(reflex.ReflexConfig, heads=heads, attn_impl=impl)).eval()
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
    (["--n-head", "12"], "sums to 8, but n_head is 12"),
])
def test_reflex_invalid_heads_one_line(args, msg, tutorial, capsys):
    rc, _, err = cli(capsys, "--train", "--device", "cpu", "--data", tutorial, *args)
    assert rc == 2
    assert_one_line_error(err, msg)


def test_reflex_cli_process_invalid_split_exits_nonzero(tutorial):
    rc, _, err = run_cli("reflex.py", "--train", "--device", "cpu", "--data", tutorial, "--heads", "4-2-1")
    assert rc == 2 and err.strip() == "error: --heads 4-2-1 sums to 7, but n_head is 8", err


@pytest.fixture(scope="module")
def reflex_runs(tutorial, tmp_path_factory):
    """CLI training runs of the baseline and three splits on the same batches (tiny, real text)."""
    splits = {"base": ["--variant", "baseline"], "521": ["--heads", "5-2-1"], "422": ["--heads", "4-2-2"],
              "all": ["--heads", "all"]}
    return cli_runs(reflex.main, tmp_path_factory.mktemp("reflex_runs"), splits, "--data", tutorial,
                    "--max-iters", "60", "--eval-interval", "30")


def test_reflex_cli_smoke_runs_learn(reflex_runs):
    for name, path in reflex_runs.items():
        log = core.read_log(path)
        cfg = json.load(open(os.path.join(path, "run.json")))["config"]
        assert cfg["variant"] == ("baseline" if name == "base" else "reflex")
        assert core.run_label(path)[0].startswith(f"{os.path.basename(path)} (reflex/" + ("baseline" if name == "base"
                                                  else f"reflex {cfg['heads']}"))  # runs of two splits told apart
        assert log[0]["loss"] > 4.5 and log[-1]["val_loss"] < 3.6, (name, log[-1])
    model = core.load_model(reflex.PAPER, os.path.join(reflex_runs["all"], "ckpt.pt"))
    assert model.cfg.heads == "all" and isinstance(model.transformer.h[1].attn, reflex.ReflexAttention)


def test_reflex_cli_charts(reflex_runs, tutorial, tmp_path, capsys):
    rc, stdout, err = cli(capsys, "--charts", "--out", reflex_runs["base"], "--data", tutorial,
                          "--runs", reflex_runs["521"], reflex_runs["422"], reflex_runs["all"])
    assert rc == 0, err
    for png in ("loss.png", "speed.png"):
        assert os.path.getsize(os.path.join(reflex_runs["base"], png)) > 5000
    assert "tok/s" in stdout and "MFU n/a" in stdout and "521 (reflex/reflex 5-2-1, " in stdout  # each run named
    (tmp_path / "log.jsonl").write_text("")  # a run killed before its first log line
    assert cli(capsys, "--charts", "--out", reflex_runs["base"], "--runs", tmp_path)[0] == 2


def test_reflex_charts_refused_for_a_run_without_steps_writes_no_figure(tmp_path, capsys):
    """--charts with a run killed before its first log line: one line, and --out keeps no new loss.png (it was written
    before the refusal)."""
    os.makedirs(tmp_path / "a")
    (tmp_path / "a" / "log.jsonl").write_text(json.dumps(dict(step=1, loss=5.0, tok_s=1000.0, mfu=None)) + "\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "log.jsonl").write_text("")
    rc, _, err = cli(capsys, "--charts", "--out", tmp_path / "a", "--runs", tmp_path / "b")
    assert rc == 2
    assert_one_line_error(err, f"{tmp_path / 'b'}: no training step logged yet")
    assert sorted(os.listdir(tmp_path / "a")) == ["log.jsonl"]

def test_reflex_speed_skips_the_first_logged_interval():
    log = [dict(tok_s=1.0, mfu=0.01), dict(tok_s=100.0, mfu=0.5), dict(tok_s=110.0, mfu=0.6)]
    assert reflex.speed_of(log) == (105.0, pytest.approx(0.55))
    assert reflex.speed_of([dict(tok_s=7.0, mfu=None)]) == (7.0, None)  # one step: that one; no known peak: None


def test_reflex_charts_numbers_are_the_logs_medians(tmp_path, capsys, saved_figures):
    """--charts from hand-made logs: per run the median tokens/s and MFU of the logged steps after the first (a run of
    one step: that step), in k tokens/s and % (bars and printed lines); evaluation records carry no speed; runs
    without an MFU read n/a, and the MFU panel says so only when no run has one."""
    logs = {"a": [dict(step=1, loss=5.0, tok_s=1000.0, mfu=0.01), dict(step=2, loss=4.0, tok_s=30000.0, mfu=0.2),
                  dict(step=3, loss=3.9, tok_s=50000.0, mfu=0.3), dict(step=4, val_loss=3.8),
                  dict(step=4, loss=3.8, tok_s=70000.0, mfu=0.7), dict(step=5, loss=3.7, tok_s=20000.0, mfu=None)],
            "b": [dict(step=1, loss=5.0, tok_s=5000.0, mfu=None), dict(step=1, val_loss=4.5)]}
    for name, recs in logs.items():
        os.makedirs(tmp_path / name)
        (tmp_path / name / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rc, out, err = cli(capsys, "--charts", "--out", tmp_path / "a", "--runs", tmp_path / "b")
    assert rc == 0, err
    lines = out.splitlines()
    assert "a: 40.0k tok/s, MFU 30.0%" in lines and "b: 5.0k tok/s, MFU n/a" in lines
    speed, mfu = saved_figures[-1][1].axes
    assert [p.get_height() for p in speed.patches] == [40.0, 5.0]
    assert [p.get_height() for p in mfu.patches] == pytest.approx([30.0, 0.0]) and not mfu.texts
    assert cli(capsys, "--charts", "--out", tmp_path / "b")[0] == 0
    assert [t.get_text() for t in saved_figures[-1][1].axes[1].texts] == ["n/a: no known GPU peak"]


def test_reflex_bench_rows_are_every_split():
    """bench.py times the baseline, 5-2-1 and the other head splits (reflex's bench rows) as separate rows."""
    s = bench.script("reflex")
    assert bench.pick_variants(s, "all") == ["baseline", "reflex", "reflex 4-2-2", "reflex all"]
    assert bench.make_cfg(s, "reflex all", "tiny").heads == "all"
    assert bench.row_flags(s, "reflex 4-2-2") == ["--variant", "reflex", "--heads", "4-2-2"]


@gpu
@pytest.mark.parametrize("heads", ["5-2-1", "4-2-2", "all"])
def test_reflex_gpu_fused_matches_reference_bf16(heads):
    """On the GPU the fused call runs flash/cuDNN SDPA in bf16; compare with the per-group fp32 eager reference."""
    eager, fused = (m.cuda() for m in eager_and_fused(heads, n_embd=512, n_layer=6, block_size=256))
    idx = torch.randint(0, 256, (4, 256), device="cuda")
    le, ge = reflex_grads(eager, idx)
    with torch.autocast("cuda", torch.bfloat16):
        lf, gf = reflex_grads(fused, idx)
    assert (lf.float() - le).abs().max() < 0.05 * le.abs().max()
    for n in ge:
        err = (gf[n].float() - ge[n]).norm() / ge[n].norm().clamp_min(1e-12)
        assert err < 0.05, (n, err.item())


# ----------------------------------------------------------------------------------------------------------------
# reflex: original checkpoints
# A minimal re-statement of the original model.py (nanoGPT with LayerNorm eps 1e-6, GELU MLP, tied head; separate
# query/key/value Linears as in commit 05cfd6c, or one c_attn as at HEAD; a `prevs` list of (k, v); one causal SDPA
# call per head group), and its checkpoints written as model_experiments.ipynb writes them.

class OrigReflexAttention(torch.nn.Module):
    def __init__(self, C, H, bias, scheme, fused):
        super().__init__()
        self.H, self.scheme, self.fused = H, scheme, fused
        Linear = torch.nn.Linear
        if fused:
            self.c_attn = Linear(C, 3 * C, bias=bias)
        else:
            self.query, self.key, self.value = Linear(C, C, bias=bias), Linear(C, C, bias=bias), Linear(C, C, bias=bias)
        self.c_proj = Linear(C, C, bias=bias)

    def forward(self, x, prevs):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2) if self.fused else (self.query(x), self.key(x), self.value(x))
        q, k, v = (t.view(B, T, self.H, C // self.H).transpose(1, 2) for t in (q, k, v))

        def sdpa(h0, h1, kv):  # an empty head group: no call (torch 2.11's CPU SDPA dies on zero heads)
            if h1 == h0:
                return q[:, h0:h1]
            return F.scaled_dot_product_attention(q[:, h0:h1], kv[0][:, h0:h1], kv[1][:, h0:h1], is_causal=True)
        if self.scheme == "all" and len(prevs) > 0:  # the commented-out code, with the guard len(prevs) == 0
            sa = self.H - len(prevs)
            y = torch.cat([sdpa(0, sa, (k, v))] + [sdpa(sa + i, sa + i + 1, p) for i, p in enumerate(prevs)], dim=1)
        elif self.scheme not in ("all", "original") and len(prevs) > 1:
            s, a, _ = self.scheme
            y = torch.cat([sdpa(0, s, (k, v)), sdpa(s, s + a, prevs[1]), sdpa(s + a, self.H, prevs[0])], dim=1)
        else:
            y = sdpa(0, self.H, (k, v))
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)), (k, v)


class OrigReflexGPT(torch.nn.Module):
    def __init__(self, V, T, L, H, C, bias, scheme, fused):
        super().__init__()
        nn = torch.nn
        self.scheme = scheme
        blocks = nn.ModuleList()
        for _ in range(L):
            block = nn.Module()
            block.ln_1, block.ln_2 = nn.LayerNorm(C, eps=1e-6, bias=bias), nn.LayerNorm(C, eps=1e-6, bias=bias)
            block.attn, block.mlp = OrigReflexAttention(C, H, bias, scheme, fused), nn.Module()
            block.mlp.c_fc, block.mlp.c_proj = nn.Linear(C, 4 * C, bias=bias), nn.Linear(4 * C, C, bias=bias)
            blocks.append(block)
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(V, C), wpe=nn.Embedding(T, C), h=blocks,
                                              ln_f=nn.LayerNorm(C, eps=1e-6, bias=bias)))
        self.lm_head = nn.Linear(C, V, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        with torch.no_grad():
            for p in self.parameters():  # random weights, norms and biases included
                p.normal_(0.0, 0.3)

    def forward(self, idx):
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.size(1)))
        prevs = []
        for i, block in enumerate(tr.h):
            y, prev = block.attn(block.ln_1(x), prevs)
            x = x + y
            x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x))))
            if self.scheme != "original":
                if self.scheme != "all" and i >= 2:
                    prevs.pop(0)
                prevs.append(prev)
        return self.lm_head(tr.ln_f(x))  # every position (the targets path of model.py)


def save_original(model, path, monkeypatch, model_type="reflex", **args):
    """ckpt.pt as the notebook saves it: '_orig_mod.' keys, the optimizer, and its own __main__.GPTConfig."""
    fields = dict(batch_size=32, **args, model_type=model_type)
    GPTConfig = dataclasses.make_dataclass("GPTConfig", [(k, type(v), v) for k, v in fields.items()])
    GPTConfig.__module__ = "__main__"
    monkeypatch.setattr(sys.modules["__main__"], "GPTConfig", GPTConfig, raising=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(dict(model={"_orig_mod." + k: v for k, v in model.state_dict().items()}, model_args=args,
                    optimizer=torch.optim.AdamW(model.parameters()).state_dict(), iter_num=250,
                    best_val_loss=torch.tensor(3.5), config=GPTConfig()), path)
    monkeypatch.delattr(sys.modules["__main__"], "GPTConfig")  # the loading process has no such class
    return str(path)


def original_run(tmp_path, monkeypatch, run, scheme, fused=False, bias=False, model_type="reflex", L=4, **extra):
    torch.manual_seed(0)
    args = dict(n_layer=L, n_head=8, n_embd=64, block_size=32, bias=bias, vocab_size=256, dropout=0.0, **extra)
    ref = OrigReflexGPT(256, 32, L, 8, 64, bias, scheme, fused).eval()
    return ref, save_original(ref, tmp_path / run / "ckpt.pt", monkeypatch, model_type, **args)


def load_original(path, heads=None):
    """core.load_model of reflex, with --heads given (or not) on the command line."""
    return core.load_model(reflex.PAPER, path, given={"heads": heads} if heads else {})


@pytest.mark.parametrize("run,scheme,fused,bias,model_type,heads", [
    ("mini-gpt-5-2-1", (5, 2, 1), True, False, "reflex", None),    # HEAD's model.py, the notebook's out_dir
    ("reflex_4_2_2", (4, 2, 2), False, True, "reflex", None),      # query/key/value Linears, biases
    ("mini-gpt-all", "all", False, False, "reflex", None),         # all-layer
    ("mini-gpt-5-2-1", "original", True, False, "original", None),  # the baseline (model_type 'original')
    ("mini-gpt-5-2-1", (3, 3, 2), False, False, "reflex", "3-3-2"),  # the name is stale: --heads decides
    ("run-2024-11-18", (0, 5, 3), False, False, "reflex", "0-5-3"),  # no split in the name (a date is none)
])
def test_reflex_original_checkpoint_reproduces_logits(tmp_path, monkeypatch, run, scheme, fused, bias, model_type,
                                                      heads):
    ref, path = original_run(tmp_path, monkeypatch, run, scheme, fused, bias, model_type)
    model = load_original(path, heads)
    assert model.cfg.variant == ("baseline" if model_type == "original" else "reflex")
    if model_type != "original":
        assert model.cfg.heads == (scheme if scheme == "all" else "-".join(map(str, scheme)))
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-5)


def test_reflex_split_in_a_run_name():
    split = lambda name: reflex.split_in_name(f"/runs/{name}/ckpt.pt", 8)
    names = ("mini-gpt-5-2-1", "v1-5-2-1", "reflex-1024-4_2_2", "e768-t1024-4-2-2", "ab_all",
             "5-2-1-reflex-1024-False-768-0.0")  # the notebook's out_dir and wandb name among them
    assert [split(n) for n in names] == ["5-2-1", "5-2-1", "4-2-2", "4-2-2", "all", "5-2-1"]
    assert [split(n) for n in ("1-5-2-1", "2024-01-05", "mini-gpt")] == [None, None, None]  # ambiguous, a date, none


def test_reflex_original_split_from_config_and_user_mistakes(tmp_path, monkeypatch, capsys):
    ref, path = original_run(tmp_path, monkeypatch, "fork", (4, 2, 2), heads="4-2-2")  # a fork saving its split
    assert load_original(path).cfg.heads == "4-2-2"
    with pytest.raises(core.ConfigError, match="config says --heads 4-2-2, not 5-2-1"):
        load_original(path, "5-2-1")
    _, path = original_run(tmp_path, monkeypatch, "run-2024-11-18", (5, 2, 1))
    with pytest.raises(core.ConfigError, match="pass --heads s-a-b or --heads all"):
        load_original(path)
    with pytest.raises(core.ConfigError, match="sums to 7, but n_head is 8"):
        load_original(path, "4-2-1")
    _, path = original_run(tmp_path, monkeypatch, "big-all", "all", L=9)
    with pytest.raises(core.ConfigError, match="needs n_layer <= n_head"):
        load_original(path)
    ckpt = core.load_checkpoint(path)
    ckpt["config"] = vars(ckpt["config"])  # a stand-in for the notebook's class: its attributes
    ckpt["model"]["_orig_mod.transformer.h.1.mlp.c_fc.weight"] = torch.zeros(3, 64)
    torch.save(ckpt, tmp_path / "mini-gpt-5-2-1.pt")
    with pytest.raises(core.ConfigError, match=r"h.1.mlp.c_fc.weight is \(3, 64\), not \(256, 64\)"):
        load_original(str(tmp_path / "mini-gpt-5-2-1.pt"))
    del ckpt["model"]["_orig_mod.transformer.h.0.attn.key.weight"]
    torch.save(ckpt, tmp_path / "mini-gpt-5-2-1.pt")
    with pytest.raises(core.ConfigError, match="missing transformer.h.0.attn.c_attn.weight, unexpected transformer"
                                               ".h.0.attn.query.weight, unexpected transformer.h.0.attn.value.weight"):
        load_original(str(tmp_path / "mini-gpt-5-2-1.pt"))
    for other in ({"state": {}}, {"model": torch.zeros(2), "model_args": ckpt["model_args"]}):  # a whole model saved
        torch.save(other, tmp_path / "other.pt")
        with pytest.raises(core.ConfigError, match="not a checkpoint reflex.py reads .*original notebook's"):
            load_original(str(tmp_path / "other.pt"))


def test_reflex_original_checkpoint_reads_dropout_sizes_and_a_forks_bias_from_its_config(tmp_path, monkeypatch):
    ref, path = original_run(tmp_path, monkeypatch, "mini-gpt-4-2-2", (4, 2, 2), bias=True)
    ckpt = core.load_checkpoint(path)
    ckpt["config"] = vars(ckpt["config"])  # a fork's model_args without bias: the config's
    ckpt["model_args"]["dropout"] = 0.1
    del ckpt["model_args"]["bias"]
    torch.save(ckpt, tmp_path / "fork.pt")
    model = load_original(str(tmp_path / "fork.pt"), "4-2-2")
    assert (model.cfg.bias, model.cfg.dropout) == (True, 0.1)
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), ref(idx), atol=1e-5, rtol=1e-5)
    del ckpt["model_args"]["n_embd"], ckpt["config"]["n_embd"]
    torch.save(ckpt, tmp_path / "fork.pt")
    with pytest.raises(core.ConfigError, match="fork.pt: model_args lacks n_embd$"):
        load_original(str(tmp_path / "fork.pt"), "4-2-2")


def test_reflex_original_checkpoint_cli_round_trip(tmp_path, monkeypatch, tutorial, capsys):
    _, path = original_run(tmp_path, monkeypatch, "mini-gpt-run", (4, 2, 2))
    common = ["--data", tutorial_as(tmp_path / "gpt2", "gpt2"), "--device", "cpu", "--eval-tokens", "512",
              "--batch-size", "4"]
    rc, out, err = run_cli("reflex.py", "--eval", "--init-from", path, "--heads", "4-2-2", *common)
    assert rc == 0 and "val" in out, err
    rc, out, err = cli(capsys, "--eval", "--init-from", path, *common)  # no split anywhere
    assert rc == 2
    assert_one_line_error(err, "pass --heads s-a-b or --heads all")
    ours = tmp_path / "ours"
    rc, _, err = cli(capsys, "--train", "--init-from", path, "--heads", "4-2-2", "--max-iters", "2", "--eval-interval",
                     "2", "--out", ours, *common)
    assert rc == 0, err
    model = load_original(str(ours / "ckpt.pt"))
    assert (model.cfg.heads, model.cfg.n_embd, model.cfg.norm_eps) == ("4-2-2", 64, 1e-6)
    assert cli(capsys, "--eval", "--out", ours, *common)[0] == 0


# ================================================================================================================
# bench
# bench.py tests (CPU): the speed table and its parity gate, the multiple-choice scorer, the lm-eval adapter (skipped
# without lm-eval), --eval-tasks of any checkpoint, and --compare.
# ================================================================================================================

NEWLINE = 10  # the prefix token of a byte-level model (no end-of-text token)


def bench_run_cli(*args, cwd=HERE):
    """Like run_cli, but the script path stays as given (relative: sys.argv[0], which bench.json and run.json
    record) and the environment is inherited as is."""
    p = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def bytes_data(tmp_path_factory):
    """The embedded tutorial as a byte-level dataset."""
    return write_dataset(tmp_path_factory.mktemp("tutorial"), text_splits(tutorial_bytes()[:200_000], 0.1))


@pytest.fixture(scope="module")
def scorer():
    torch.manual_seed(0)
    return bench.Scorer(core.GPT(tiny()), core.get_tokenizer("bytes"), NEWLINE, batch_size=3)


MC = [dict(context="The cat sat on the", choices=[" mat", " hat and a coat", "x"], label=0),
      dict(context="x" * 100 + " is longer than block_size", choices=[" a", " bb"], label=1),
      dict(context="", choices=["hello", "world!"], label=1),
      dict(context="a trailing space ", choices=["a", "bcd"], label=0)]


@pytest.fixture
def mc_file(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in MC))
    return str(path)


def direct_loglik(model, context, choice, T=64):
    """log p(choice | context) of a byte-level model, one sequence at a time (no batching, no padding); trailing
    spaces of the context are scored with the choice (lm-eval's rule)."""
    ctx = list(context.rstrip().encode()) or [NEWLINE]
    cont = list((context[len(context.rstrip()):] + choice).encode())
    ids = (ctx + cont)[-(T + 1):]
    with torch.no_grad():
        logp = model(torch.tensor([ids[:-1]])).float().log_softmax(-1)[0]  # (len - 1, V)
    return sum(logp[len(ids) - 1 - len(cont) + i, c].item() for i, c in enumerate(cont))


# ----------------------------------------------------------------------------------------------------------------
# bench: speed: table, bench.json, chart; parity gate

def test_bench_speed_table_core_and_a_paper(tmp_path, monkeypatch):
    """Six rows, three processes at a time (--jobs 3): all of a group warm up, then each is timed alone. Run from
    another folder with a relative --out (the rows' processes ran in the repo: they found no such folder); each row
    named as --compare names it (reflex's split)."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = bench_run_cli(os.path.join(HERE, "bench.py"), "--papers", "core,reflex", "--device", "cpu",
                                 "--steps", 2, "--warmup", 1, "--jobs", 3, "--out", "out", cwd=tmp_path)
    assert rc == 0, err
    tmp_path = tmp_path / "out"
    assert not [p for p in os.listdir(tmp_path / "logs") if p.endswith(".gate")]  # the turn files are gone
    lines = [l for l in out.splitlines() if l.startswith("| ")]
    assert [l.split(" | ")[0] for l in lines[1:]] == ["| core", "| core/bf16 residual", "| reflex/baseline",
                                                      "| reflex/reflex 5-2-1", "| reflex/reflex 4-2-2",
                                                      "| reflex/reflex all"]
    res = json.load(open(tmp_path / "bench.json"))
    assert res["device"] == "cpu" and res["torch"] == torch.__version__ and "git" in res
    rows = {bench.label(r): r for r in res["rows"]}
    # in fp32 (CPU) the bf16 residual row would time the core's model again: no number for it
    assert rows.pop("core/bf16 residual")["status"] == "skip: --residual-dtype has no effect in a float32 run"
    for r in rows.values():
        assert r["status"] == "ok" and r["T"] == 64 and r["tok_s"] > 0 and r["ms"] > 0 and "gate" not in r
        assert r["parity"]["status"] == "ok" and r["parity"]["err"] < 1e-4 and r["parity"]["impls"] == ["sdpa"]
    assert rows["reflex/baseline"]["x_baseline"] == 1.0 and rows["core"]["x_core"] == 1.0
    r = rows["reflex/reflex 5-2-1"]
    assert r["x_core"] == pytest.approx(r["tok_s"] / rows["core"]["tok_s"])
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def not_causal(self, q, k, v, ctx):
    return F.scaled_dot_product_attention(q, k, v)  # a broken fast path: attends to the future


def test_bench_parity_passes_and_flags_a_broken_fast_path(monkeypatch):
    s = bench.script("core")
    cfg = bench.make_cfg(s, "", "tiny", device="cpu")
    good = bench.check_parity(s, cfg)
    assert good["status"] == "ok" and good["err"] < 1e-4 and good["impls"] == ["sdpa"]
    assert bench.check_parity(s, dataclasses.replace(cfg, attn_impl="eager"))["status"] == "eager"
    monkeypatch.setattr(core.Attention, "attend_sdpa", not_causal)
    bad = bench.check_parity(s, cfg)
    assert bad["status"] == "FAIL" and bad["err"] > 0.1
    # a paper's row built on the same kernel: marked FAIL and not timed
    spec = dict(script="reflex", variant="reflex", baseline="baseline", preset="tiny", impl="auto",
                over=dict(device="cpu"), steps=1, warmup=1)
    row = bench.measure(spec)
    assert row["status"] == "FAIL" and "ms" not in row and "tok_s" not in row
    assert "FAIL" in bench.speed_table([row])

def test_bench_parity_error_is_the_worst_relative_error_and_names_its_tensor():
    """The logits' relative error and each gradient's, a gradient's against max(its norm, 1e-3 x the largest gradient
    norm); a gradient missing on one side counts as zeros, missing on both is skipped; the worst one and its name."""
    ref = torch.tensor([3.0, 4.0]), {"w": torch.tensor([0.0, 10.0]), "b": torch.tensor([1e-6, 0.0]), "none": None}
    out = torch.tensor([3.0, 4.5]), {"w": torch.tensor([0.0, 13.0]), "b": torch.tensor([0.0, 0.0]), "none": None}
    assert bench.parity_error(out, ref) == pytest.approx((0.3, "w"))  # logits 0.1, b 1e-6 / 1e-2 = 1e-4
    out[1]["w"] = torch.tensor([0.0, 10.1])
    assert bench.parity_error(out, ref) == pytest.approx((0.1, "logits"))
    ref[1]["none"], out[1]["none"] = None, torch.tensor([0.05])  # against 1e-3 x 10
    assert bench.parity_error(out, ref) == pytest.approx((5.0, "none"))


def test_bench_parity_status_is_ok_up_to_the_tolerance_and_a_bf16_floor_widens_it(monkeypatch):
    """A row passes at err <= tol (fp32: 2e-3) and fails above; in bf16 the tolerance is twice the eager path's own bf16
    error where that exceeds 5e-2. The check runs without dropout, whatever the row's, on perturbed weights (a
    zero-initialised projection cannot hide a wrong gradient)."""
    s = bench.script("core")
    cfg = bench.make_cfg(s, "", "tiny", device="cpu")
    assert bench.check_parity(s, dataclasses.replace(cfg, dropout=0.5))["status"] == "ok"

    def zeroed(cfg):  # attention's output projections initialised to zero, as some papers do
        model = core.GPT(cfg)
        for block in model.transformer.h:
            torch.nn.init.zeros_(block.attn.c_proj.weight)
        return model
    monkeypatch.setattr(core.Attention, "attend_sdpa", lambda self, q, k, v, ctx: F.scaled_dot_product_attention(
        q.detach(), k, v, is_causal=True))  # the right values, no gradient to q: the perturbed weights reveal it
    assert bench.check_parity(SimpleNamespace(build_model=zeroed), cfg)["status"] == "FAIL"
    monkeypatch.undo()
    errs = []
    monkeypatch.setattr(bench, "parity_error", lambda out, ref: (errs.pop(0), "logits"))
    errs[:] = [2e-3]
    assert bench.check_parity(s, cfg)["status"] == "ok"
    errs[:] = [2.1e-3]
    assert bench.check_parity(s, cfg)["status"] == "FAIL"
    errs[:] = [0.04, 0.07]  # the eager path's bf16 floor, then the fast path's error
    r = bench.check_parity(s, dataclasses.replace(cfg, dtype="bfloat16"))
    assert (r["status"], r["floor"], r["tol"], r["err"]) == ("ok", 0.04, 0.08, 0.07)


def test_bench_measure_reports_oom_and_refused_configs(monkeypatch):
    spec = dict(script="core", variant="", baseline="", preset="tiny", impl="auto", over=dict(device="cpu"),
                check=False)
    def oom(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
    monkeypatch.setattr(core, "bench", oom)
    assert bench.measure(spec)["status"] == "OOM"
    assert bench.measure({**spec, "preset": "nope"})["status"].startswith("skip: core has no preset 'nope'")
    huge = {**spec, "over": dict(device="cpu", block_size=20000, batch_size=4096, attn_impl="eager")}
    monkeypatch.undo()
    assert bench.measure(huge)["status"].startswith("skip: this config needs about")  # refused before it starts


def test_bench_row_killed_by_the_os_is_oom(tmp_path, monkeypatch):
    killed = SimpleNamespace(poll=lambda: -9, wait=lambda timeout=None: -9, args=[])
    monkeypatch.setattr(bench.subprocess, "Popen", lambda *a, **k: killed)
    rows = bench.run_rows([dict(script="core", variant="")], [str(tmp_path / "log.txt")])
    assert rows[0]["status"].startswith("OOM: killed by the OS")

def test_bench_measure_passes_its_steps_and_names_an_error(monkeypatch):
    """A row's steps and warm-up go to core.bench as given (ready only with a gate); an exception is the row's status:
    'error: <type>: <first line>', or OOM when its message says out of memory, in any case."""
    seen = []
    monkeypatch.setattr(core, "bench", lambda cfg, build, steps, warmup, ready=None: seen.append(
        (cfg.block_size, steps, warmup, ready)) or dict(ms=1.0))
    spec = dict(script="core", variant="", baseline="", preset="tiny", impl="auto", over=dict(device="cpu",
                block_size=32), check=False, steps=3, warmup=1)
    assert bench.measure(spec) == dict(spec, device="cpu", ms=1.0, status="ok") and seen == [(32, 3, 1, None)]

    def fails(message):
        def bench_(*a, **k):
            raise RuntimeError(message)
        return bench_
    monkeypatch.setattr(core, "bench", fails("shapes do not match\nsecond line"))
    assert bench.measure(spec)["status"] == "error: RuntimeError: shapes do not match"
    monkeypatch.setattr(core, "bench", fails("CUDA error: Out Of Memory"))
    assert bench.measure(spec)["status"] == "OOM"


def test_bench_exit_line_and_a_row_whose_process_failed(tmp_path, monkeypatch):
    """exit_line: the exit code and the last non-blank line of the log, cut at 200 characters. A row process that
    exits non-zero is an error row with that line, even if it wrote a result first."""
    log = tmp_path / "log.txt"
    log.write_text("Traceback\n  ...\nValueError: " + "x" * 300 + "\n\n   \n")
    assert bench.exit_line(1, str(log)) == "exit 1: ValueError: " + "x" * 188
    (tmp_path / "empty.txt").write_text("")
    assert bench.exit_line(-11, str(tmp_path / "empty.txt")) == "exit -11: "

    def popen(cmd, **kw):
        kw["stdout"].write("RuntimeError: boom\n")
        open(cmd[-1], "w").write(json.dumps(dict(status="ok")))  # the result file, then a failure
        return SimpleNamespace(poll=lambda: 1, wait=lambda timeout=None: 1, args=cmd)
    monkeypatch.setattr(bench.subprocess, "Popen", popen)
    rows = bench.run_rows([dict(script="core", variant="")], [str(log)])
    assert rows == [dict(script="core", variant="", status=f"error: exit 1: RuntimeError: boom (log: {log})")]


def test_bench_row_selection_and_scaling_batches():
    args = bench.build_parser().parse_args(["--papers", "core,reflex", "--scaling", "--seq", "32,128",
                                            "--preset", "tiny"])
    specs = bench.speed_specs(args, gpu=False)
    got = [(bench.label(s), s["T"], s["B"]) for s in specs]
    assert got == [("core", 32, 16), ("core", 128, 4), ("reflex/reflex 5-2-1", 32, 16),
                   ("reflex/reflex 5-2-1", 128, 4)]  # the core GPT is the baseline; tokens per step kept at 8 x 64
    args = bench.build_parser().parse_args(["--papers", "reflex", "--preset", "tiny", "--impl", "eager,flash"])
    specs = bench.speed_specs(args, gpu=True)
    assert [(bench.label(s), s["impl"], s.get("status", "run")[:4]) for s in specs] == [
        ("reflex/baseline", "eager", "run"), ("reflex/baseline", "flash", "run"),
        ("reflex/reflex 5-2-1", "eager", "run"), ("reflex/reflex 5-2-1", "flash", "run"),
        ("reflex/reflex 4-2-2", "eager", "run"), ("reflex/reflex 4-2-2", "flash", "run"),
        ("reflex/reflex all", "eager", "run"), ("reflex/reflex all", "flash", "run")]
    args = bench.build_parser().parse_args(["--papers", "attn_bias", "--preset", "tiny", "--impl", "cudnn"])
    assert [(bench.label(s), s.get("status", "run")[:4]) for s in bench.speed_specs(args, gpu=True)] == [
        ("attn_bias/default", "skip"), ("attn_bias/attn_bias", "run"), ("attn_bias/sink", "skip")]  # refused
    args = bench.build_parser().parse_args(["--papers", "core,reflex", "--variants", "reflex"])
    assert [bench.label(s) for s in bench.speed_specs(args, gpu=False)] == ["core", "reflex/reflex 5-2-1"]
    args = bench.build_parser().parse_args(["--papers", "core,reflex", "--variants", "reflex,nope"])
    with pytest.raises(core.ConfigError, match="--variants nope: not a row of core, reflex"):
        bench.speed_specs(args, gpu=False)  # a mistyped row is named, not dropped
    rows = [dict(s, status="ok", tok_s=1000.0 * s["B"], mem_gb=0.1 * s["T"]) for s in specs[:2]]
    bench.add_ratios(rows)
    assert [r["x_baseline"] for r in rows] == [1.0, 1.0]  # no auto row: each impl against the first baseline row


def test_bench_scaling_checks_each_variant_once_and_skips_after_a_fail(tmp_path, monkeypatch):
    ran = []
    def fake_row(spec, log):
        ran.append((bench.label(spec), spec["T"], spec.get("check", True)))
        status = "FAIL" if spec["script"] == "reflex" else "ok"
        parity = dict(status=status, err=0.5 if status == "FAIL" else 1e-3, impls=["sdpa"], worst="logits")
        return dict(spec, status=status, **({"parity": parity} if spec.get("check", True) else {}),
                    **(dict(ms=1.0, tok_s=1e3 * spec["B"]) if status == "ok" else {}))
    monkeypatch.setattr(bench, "run_rows", lambda specs, logs: list(map(fake_row, specs, logs)))
    args = bench.build_parser().parse_args(["--papers", "core,reflex", "--scaling", "--seq", "32,64,128",
                                            "--device", "cpu", "--out", str(tmp_path)])
    assert bench.speed(args, gpu=False) == 1  # a FAIL row: non-zero exit
    assert ran == [("core", 32, True), ("core", 64, False), ("core", 128, False), ("reflex/reflex 5-2-1", 32, True)]
    rows = json.load(open(tmp_path / "scaling.json"))["rows"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "FAIL", "FAIL", "FAIL"]
    assert all(r["parity"]["status"] == ("FAIL" if r["script"] == "reflex" else "ok") for r in rows)
    def cut(spec, log):  # the run is killed at its third row: the rows measured before are on disk
        if len(ran) == 6:
            raise KeyboardInterrupt
        return fake_row(spec, log)
    monkeypatch.setattr(bench, "run_rows", lambda specs, logs: list(map(cut, specs, logs)))
    args.papers, args.out = "core", str(tmp_path / "cut")
    with pytest.raises(KeyboardInterrupt):
        bench.speed(args, gpu=False)
    assert [r["T"] for r in json.load(open(tmp_path / "cut" / "scaling.json"))["rows"]] == [32, 64]

def test_bench_plot_speed_bars_of_one_T_and_lines_of_several(tmp_path, saved_figures):
    """One T: a bar of thousands of tokens/s a row, each labelled with its x baseline (a failed row: its status).
    Several T: a line a kernel of tokens/s (thousands) and of memory (GiB) against T, dashed for a paper's variant."""
    row = lambda variant, T, tok_s, **kw: dict(script="reflex", variant=variant, baseline="baseline", impl="auto", T=T,
                                               status="ok", tok_s=tok_s, **kw)
    rows = [row("baseline", 64, 2000.0, x_baseline=1.0), row("reflex", 64, 1500.0, x_baseline=0.75, x_core=0.5),
            dict(row("reflex all", 64, None), status="OOM")]
    bench.plot_speed(rows, str(tmp_path / "bench.png"), "cpu")
    ax = saved_figures[-1][1].axes[0]
    assert [p.get_width() for p in ax.patches] == [2.0, 1.5, 0.0]
    assert [t.get_text() for t in ax.texts] == [" 1.00x", " 0.75x", " OOM"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["reflex/baseline [auto]", "reflex/reflex [auto]",
                                                            "reflex/reflex all [auto]"]
    rows = [row(v, T, tok_s, mem_gb=mem) for v, T, tok_s, mem in (("baseline", 64, 2000.0, 0.5), ("reflex", 64, 1500.0,
            0.75), ("baseline", 128, 1000.0, 1.0), ("reflex", 128, 500.0, 1.5))]
    bench.plot_speed(rows, str(tmp_path / "scaling.png"), "cpu")
    left, right = saved_figures[-1][1].axes
    assert [l.get_xydata().tolist() for l in left.lines] == [[[64, 2.0], [128, 1.0]], [[64, 1.5], [128, 0.5]]]
    assert [l.get_xydata().tolist() for l in right.lines] == [[[64, 0.5], [128, 1.0]], [[64, 0.75], [128, 1.5]]]
    assert [l.get_linestyle() for l in left.lines] == ["-", "--"]
    assert [l.get_label() for l in left.lines] == ["reflex/baseline [auto]", "reflex/reflex [auto]"]


def test_bench_speed_times_jobs_rows_a_group_and_specs_of_every_path(tmp_path, monkeypatch):
    """--jobs 2: the rows go to run_rows two at a time, a later group's row reuses the first check of its variant, and
    each variant is checked; --append adds a later run's rows to the file. --impl all: every path but auto; a row
    refused at once keeps the --batch asked; a script given by its file is named by its script and keeps its source."""
    groups = []
    monkeypatch.setattr(bench, "run_rows", lambda specs, logs: groups.append(len(specs)) or [
        dict(s, status="ok", ms=1.0, tok_s=1e3, parity=s.get("parity") or dict(status="ok", err=s["T"] * 1e-6,
                                                                                impls=["sdpa"])) for s in specs])
    args = bench.build_parser().parse_args(["--papers", "core", "--scaling", "--seq", "32,64,128", "--device", "cpu",
                                            "--jobs", "2", "--out", str(tmp_path)])
    assert bench.speed(args, gpu=False) == 0 and groups == [2, 1]
    rows = json.load(open(tmp_path / "scaling.json"))["rows"]  # both rows of the first group were checked
    assert [r["parity"]["err"] for r in rows] == [32e-6, 64e-6, 32e-6]  # a later row reuses the first check
    args.seq, args.append = "256", True  # a later run's row joins the file's
    assert bench.speed(args, gpu=False) == 0 and groups == [2, 1, 1]
    assert [r["T"] for r in json.load(open(tmp_path / "scaling.json"))["rows"]] == [32, 64, 128, 256]
    args = bench.build_parser().parse_args(["--papers", "reflex", "--variants", "baseline,reflex", "--device", "cpu",
                                            "--out", str(tmp_path / "two")])
    assert bench.speed(args, gpu=False) == 0  # each variant its own check
    assert [(bench.label(r), r.get("check", True)) for r in json.load(open(tmp_path / "two" / "bench.json"))["rows"]] \
        == [("reflex/baseline", True), ("reflex/reflex 5-2-1", True)]
    args = bench.build_parser().parse_args(["--papers", "core", "--impl", "all", "--batch", "3", "--device", "cpu"])
    specs = bench.speed_specs(args, gpu=False)
    assert [(bench.label(s), s["impl"], s["B"], s.get("status", "run")[:4]) for s in specs] == [
        ("core", i, 3, "run") for i in ("eager", "sdpa", "flex", "flash")] + [
        ("core/bf16 residual", i, 3, "skip") for i in ("eager", "sdpa", "flex", "flash")]
    path = os.path.join(bench.HERE, "reflex.py")
    args = bench.build_parser().parse_args(["--papers", f"core,{path}", "--variants", "baseline", "--device", "cpu"])
    assert [(bench.label(s), s.get("source")) for s in bench.speed_specs(args, gpu=False)] == [
        ("core", None), ("reflex/baseline", path)]


def test_bench_impl_cell_names_the_kernels_and_the_document_path():
    checked = lambda *impls: dict(status="ok", err=0.0, impls=list(impls))
    assert bench.impl_cell(dict(impl="sdpa")) == "sdpa"  # not checked (yet): the asked path only
    assert bench.impl_cell(dict(impl="auto", parity=checked("eager", "sdpa"))) == "auto (eager+sdpa)"
    assert (bench.impl_cell(dict(impl="auto", parity=checked("sdpa"), paths={"documents": 1, "one document": 3}))
            == "auto (sdpa, flex in 25% of batches (documents))")
    assert (bench.impl_cell(dict(impl="auto", parity=checked("eager"), paths={"documents": 1, "one document": 1}))
            == "auto (eager, eager mask in 50% of batches (documents))")
    assert bench.impl_cell(dict(impl="auto", parity=checked("sdpa"), paths={"one document": 2})) == "auto (sdpa)"
    assert (bench.impl_cell(dict(impl="auto", parity=checked("triton"), paths={"documents": 2}))  # its own doc mask
            == "auto (triton, triton in 100% of batches (documents))")
    assert (bench.impl_cell(dict(impl="auto", parity=checked("eager", "flash", "sdpa"), paths={"documents": 1}))
            == "auto (eager+flash+sdpa, eager mask+flex in 100% of batches (documents))")  # each layer's, once


def test_bench_append_replaces_rows_run_again(tmp_path):
    row = lambda script, variant, ms: dict(script=script, variant=variant, impl="auto", T=64, B=8, ms=ms)
    path = str(tmp_path / "bench.json")
    json.dump(dict(rows=[row("reflex", "reflex", 1.0), row("core", "", 2.0)]), open(path, "w"))
    key = lambda r: (r["script"], r["variant"], r["impl"], r["T"], r["B"])
    merged = bench.merge(path, "rows", [row("core", "", 3.0), row("attn_bias", "sink", 4.0)], key)
    assert [(r["script"], r["ms"]) for r in merged] == [("core", 3.0), ("attn_bias", 4.0), ("reflex", 1.0)]
    assert bench.merge(str(tmp_path / "none.json"), "rows", merged, key) == merged


def test_bench_variant_roles_of_every_paper():
    roles = {n: (bench.script(n).baseline, bench.script(n).main) for n in bench.PAPERS}
    assert roles == {"exoformer": ("baseline", "dynamic_exoformer"), "attn_bias": ("default", "attn_bias"),
                     "cogformer": ("transformer", "cogformer"), "sparse_byte": ("dense", "sparse"),
                     "reflex": ("baseline", "reflex")}
    for n in bench.PAPERS:  # every script's 124m-class preset builds every variant (fields only, no weights)
        s = bench.script(n)
        for v in s.variants:
            assert bench.make_cfg(s, v, bench.preset_for(n, {}, gpu=True)).n_embd >= 768


def test_bench_cli_errors(capsys, tmp_path):
    assert bench.main(["--papers", "nope", "--device", "cpu"]) == 2
    assert bench.main(["--compare", "--data", "/nonexistent/dir"]) == 2
    assert bench.main(["--eval-tasks", "mc.jsonl"]) == 2
    assert bench.main(["--papers", "core", "--seq", "1k", "--device", "cpu"]) == 2
    capsys.readouterr()
    assert bench.main(["--papers", "core,reflex", "--variants", "baseline,bogus", "--device", "cpu"]) == 2
    assert_one_line_error(capsys.readouterr().err, "--variants bogus: not a row of core, reflex (theirs: bf16 residual")
    for flags, message in ((["--seeds", "1,x"], "--seeds takes integers >= 0"),
                           (["--block-size", "64,128"], "one --block-size"),
                           (["--papers", "reflex", "--variants", "typo"], "--variants typo: not a row of reflex"),
                           (["--report", "--out", "/nonexistent/dir"], "--report: no runs in /nonexistent/dir")):
        assert bench.main(["--compare", "--data", core.DEFAULT_DATA, "--device", "cpu", *flags]) == 2
        assert_one_line_error(capsys.readouterr().err, message)
    for flags, message in ((["--compare", "--tokens", "nan"], "--tokens a number >= 0"),  # a ValueError traceback
                           (["--compare", "--tokens", "-1"], "--max-iters must be at least 1"),  # trained 0 steps, rc 0
                           (["--compare", "--max-iters", "0"], "--max-iters must be at least 1"),
                           (["--ddp", "1"], "--ddp takes a number of processes >= 2")):
        assert bench.main(["--data", core.DEFAULT_DATA, "--device", "cpu", "--out", str(tmp_path), *flags]) == 2
        assert_one_line_error(capsys.readouterr().err, message)
    assert os.listdir(tmp_path) == []
    assert bench.main(["--compare", "--data", core.DEFAULT_DATA, "--evals", "0", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == "error: --evals must be at least 1\n"
    for action in ([], ["--compare", "--data", core.DEFAULT_DATA]):
        assert bench.main([*action, "--papers", "core", "--jobs", "0", "--device", "cpu"]) == 2
        assert capsys.readouterr().err == "error: --jobs must be at least 1\n"



def test_bench_speed_flag_mistakes_are_one_line_before_any_row(tmp_path, capsys):
    """Each skipped every row (or timed 0 steps: a ZeroDivisionError row, a negative time and a traceback) and
    exited 0, replacing <out>'s bench.json with that table."""
    for flags, message in ((["--preset", "tinny"], "--preset tinny: not a preset of core (124m, tiny)"),
                           (["--preset", "cor=tiny"], "--preset cor=tiny: not a preset of core"),
                           (["--batch-size", "-1"], "--batch-size must be >= 0"),
                           (["--steps", "0"], "--steps >= 1"), (["--warmup", "-1"], "--warmup >= 0"),
                           (["--impl", "sdpa,flexx"], "--impl flexx: not an attention path of core (auto, ")):
        fails_in_one_line(capsys, bench.main(["--papers", "core", "--device", "cpu", "--out", str(tmp_path), *flags]),
                          message)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------------------
# bench: downstream: multiple choice, rolling log-likelihood, generation

def test_bench_mc_scorer_matches_direct_computation(scorer, mc_file):
    res = bench.mc_score(scorer, mc_file)
    direct = [[direct_loglik(scorer.model, d["context"], c) for c in d["choices"]] for d in MC]
    assert np.allclose(np.array(sum(res["lls"], [])), np.array(sum(direct, [])), atol=1e-4)
    argmax = lambda xs: max(range(len(xs)), key=xs.__getitem__)
    acc = np.mean([argmax(s) == d["label"] for s, d in zip(direct, MC)])
    acc_norm = np.mean([argmax([x / len(c.encode()) for x, c in zip(s, d["choices"])]) == d["label"]
                        for s, d in zip(direct, MC)])
    assert res["n"] == 4 and res["acc"] == acc and res["acc_norm"] == acc_norm
    assert bench.mc_score(scorer, mc_file, limit=2)["n"] == 2
    ctx = list(b"The cat sat")  # is_greedy (lm-eval's second answer): every token of the continuation the argmax
    with torch.no_grad():
        g1 = scorer.model(torch.tensor([ctx]))[0, -1].argmax().item()
        g2 = scorer.model(torch.tensor([ctx + [g1]]))[0, -1].argmax().item()
    (_, both), (_, half) = scorer.score_tokens([(ctx, [g1, g2]), (ctx, [g1, (g2 + 1) % 256])])
    assert both and not half


def test_bench_mc_score_arithmetic_on_given_log_likelihoods(tmp_path):
    """mc_score from a scorer's log-likelihoods (a stub here): each document's choices in order (2, 3, 2, 2 of them),
    acc by the largest log-likelihood, acc_norm by it per UTF-8 byte of the choice ('é' is two bytes), their
    standard errors sqrt(p (1 - p) / (n - 1)), --limit the first documents."""
    docs = [dict(context="c1", choices=["a", "bbbb"], label=1), dict(context="c2", choices=["é", "xy", "z"], label=0),
            dict(context="c3", choices=["p", "q"], label=0), dict(context="c4", choices=["m", "n"], label=0)]
    lls = {"a": -2.0, "bbbb": -4.0, "é": -2.2, "xy": -2.6, "z": -2.9, "p": -1.0, "q": -0.5, "m": -3.0, "n": -1.0}
    stub = SimpleNamespace(loglikelihood=lambda requests: [(lls[c], False) for _, c in requests])
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    res = bench.mc_score(stub, str(path))
    assert res["lls"] == [[-2.0, -4.0], [-2.2, -2.6, -2.9], [-1.0, -0.5], [-3.0, -1.0]] and res["n"] == 4
    assert (res["acc"], res["acc_norm"]) == (0.25, 0.5)
    assert (res["acc_stderr"], res["acc_norm_stderr"]) == pytest.approx((math.sqrt(0.25 * 0.75 / 3),
                                                                         math.sqrt(0.5 * 0.5 / 3)))
    assert bench.run_tasks(stub, str(path)) == [["mc.jsonl", "acc", "0.2500", "0.2500", 4],  # --eval-tasks' table
                                                ["mc.jsonl", "acc_norm", "0.5000", "0.2887", 4]]
    one = bench.mc_score(stub, str(path), limit=1)
    assert (one["n"], one["acc"], one["acc_norm"], one["acc_stderr"]) == (1, 0.0, 1.0, None)
    assert bench.mc_score(stub, str(path), limit=2)["lls"] == res["lls"][:2]


def test_bench_mc_scorer_prefers_the_learned_continuation(tmp_path):
    """A model trained on one sentence must pick its continuation over a same-length wrong one."""
    torch.manual_seed(0)
    model = core.GPT(tiny())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.tensor([list(b"the quick brown fox jumps over the lazy dog. the quick brown fox")])  # 64 bytes
    for _ in range(60):
        opt.zero_grad()
        model(ids[:, :-1], ids[:, 1:]).backward()
        opt.step()
    path = tmp_path / "fox.jsonl"
    path.write_text(json.dumps(dict(context="the quick brown", choices=[" cat", " fox"], label=1)) + "\n")
    res = bench.mc_score(bench.Scorer(model, core.get_tokenizer("bytes"), NEWLINE), str(path))
    assert res["acc"] == 1.0 and res["lls"][0][1] > res["lls"][0][0] + 1


def test_bench_bad_mc_file_is_one_clear_error(scorer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(dict(context="a", choices=["b"], label=3)) + "\n")
    with pytest.raises(core.ConfigError, match="line 1"):
        bench.mc_score(scorer, str(path))
    path.write_text(json.dumps(dict(context="a", choices=["b"], label=0)) + "\n\n[1]\n")  # not an object
    with pytest.raises(core.ConfigError, match="line 3"):
        bench.mc_score(scorer, str(path))
    for choices in ("bc", [1, 2]):  # a string scored as its letters; numbers: a TypeError traceback
        path.write_text(json.dumps(dict(context="a", choices=choices, label=1)) + "\n")
        with pytest.raises(core.ConfigError, match=r"line 1: needs context \(str\), choices \(list of str\)"):
            bench.mc_score(scorer, str(path))
    path.write_bytes(b"\xff\xfe\n")  # a UnicodeDecodeError traceback
    with pytest.raises(core.ConfigError, match="bad.jsonl: not UTF-8 text"):
        bench.mc_score(scorer, str(path))


@pytest.mark.skipif(not os.path.exists(TIKTOKEN), reason="needs the offline gpt2.tiktoken")
@pytest.mark.parametrize("over, free", [({"variant": "dense"}, True), ({"variant": "sparse"}, False),
                                        ({"variant": "sparse", "mask_subset": "013"}, True),
                                        ({"variant": "sparse", "inverted_mask": True}, False)])
def test_bench_scorer_scores_a_row_alone_or_in_a_batch_of_longer_rows_alike(over, free):
    """Right padding is never seen by a causal model; sparse_byte's global heads place their anchors by the length
    (and --inverted-mask sees later keys): such a model's rows are batched only with rows of their own length."""
    torch.manual_seed(0)
    model = sb.build_model(tiny(sb.SparseByteConfig, **over))
    assert model.length_free == free
    requests = [("The cat sat on the", " mat"), ("A much longer context, wider than the other one by far", " indeed")]
    tok = core.get_tokenizer("bytes")
    alone = [bench.Scorer(model, tok, 10, batch_size=1).loglikelihood([r])[0] for r in requests]
    together = bench.Scorer(model, tok, 10, batch_size=16).loglikelihood(requests * 2)
    assert together == alone * 2


def test_bench_bpe_pair_split_moves_the_trailing_space(monkeypatch):
    monkeypatch.setenv("ATTNLAB_TIKTOKEN", TIKTOKEN)
    tok = core.get_tokenizer("gpt2")
    s = bench.Scorer(core.GPT(tiny(vocab_size=50304)), tok, tok.eot_token)
    assert s.encode_pair("Hello ", "world") == (tok.encode("Hello"), tok.encode(" world"))
    assert s.encode_pair("", "Hello") == ([tok.eot_token], tok.encode("Hello"))


def rolling_direct(model, toks, T=64):
    """lm-eval's windows, written out: the first predicts T tokens after the prefix; each next one predicts up to T
    further tokens with a full T-token input ending just before its last prediction."""
    total, done = 0.0, 0
    with torch.no_grad():
        while done < len(toks):
            n = min(T, len(toks) - done)
            inp = ([NEWLINE] + toks[:n - 1]) if done == 0 else toks[done + n - T - 1:done + n - 1]
            logp = model(torch.tensor([inp])).float().log_softmax(-1)[0]
            total += sum(logp[len(inp) - n + i, t].item() for i, t in enumerate(toks[done:done + n]))
            done += n
    return total


def test_bench_rolling_loglikelihood_and_greedy_generation(scorer):
    text = "".join(chr(97 + (i * 7) % 26) for i in range(150))
    assert scorer.rolling(text) == pytest.approx(rolling_direct(scorer.model, list(text.encode())), abs=1e-3)
    assert scorer.rolling("short") == pytest.approx(rolling_direct(scorer.model, list(b"short")), abs=1e-4)
    ids = list(b"def f(x):")
    with torch.no_grad():
        for _ in range(12):
            ids.append(scorer.model(torch.tensor([ids[-64:]]))[0, -1].argmax().item())
    greedy = bytes(ids[9:]).decode(errors="replace")
    assert scorer.generate("def f(x):", until=[], max_gen_toks=12) == greedy
    stop = greedy[3:5]
    assert scorer.generate("def f(x):", until=[stop], max_gen_toks=12) == greedy[:greedy.index(stop)]


# ----------------------------------------------------------------------------------------------------------------
# bench: lm-eval adapter (optional dependency) and --eval-tasks

def test_bench_lm_eval_adapter_matches_direct_scores(scorer, mc_file, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.api.instance import Instance
    from lm_eval.api.registry import get_model
    cls = bench.lm_eval_adapter()
    assert get_model("attnlab") is cls
    res = bench.run_lm_eval(scorer, [bench.mc_task(mc_file, "mc")], log_samples=True, bootstrap_iters=0)
    ours = bench.mc_score(scorer, mc_file)
    assert res["results"]["mc"]["acc,none"] == ours["acc"] and res["results"]["mc"]["acc_norm,none"] == ours["acc_norm"]
    for sample in res["samples"]["mc"]:
        d = sample["doc"]
        want = [direct_loglik(scorer.model, d["context"], c) for c in d["choices"]]
        assert np.allclose([ll for ll, _ in sample["filtered_resps"]], want, atol=1e-4)
    lm = cls(scorer=scorer)
    text = "".join(chr(97 + (i * 5) % 26) for i in range(140))
    from lm_eval.utils import get_rolling_token_windows  # lm-eval's own windows, scored directly
    windows = get_rolling_token_windows(list(text.encode()), NEWLINE, 64, 1)
    want = 0.0
    with torch.no_grad():
        for inp, pred in windows:
            logp = scorer.model(torch.tensor([inp])).float().log_softmax(-1)[0, -len(pred):]
            want += logp.gather(1, torch.tensor(pred)[:, None]).sum().item()
    req = Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=0)
    assert lm.loglikelihood_rolling([req])[0] == pytest.approx(want, abs=1e-3)
    gen = Instance(request_type="generate_until", doc={}, arguments=("abc", dict(until=["\n"], max_gen_toks=5)), idx=0)
    assert lm.generate_until([gen]) == [scorer.generate("abc", until=["\n"], max_gen_toks=5)]


def test_bench_lm_eval_task_data_offline_is_one_line(scorer, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")  # the task's data cannot be fetched
    with pytest.raises(core.ConfigError, match="lm-eval could not load its task data: .*on the Hub"):
        bench.run_lm_eval(scorer, ["arc_easy"], limit=2)


@pytest.fixture
def tiny_ckpt(tmp_path, bytes_data):
    torch.manual_seed(0)
    cfg = tiny(data=bytes_data)
    model = core.GPT(cfg)
    path = str(tmp_path / "ckpt.pt")
    core.save_checkpoint(path, dict(format="attnlab", script="core", config=dataclasses.asdict(cfg),
                                    data=core.TokenData(bytes_data).info(), model=model.state_dict()))
    return path, model


def test_bench_eval_tasks_of_a_checkpoint(tiny_ckpt, mc_file, capsys):
    path, model = tiny_ckpt
    want = bench.mc_score(bench.Scorer(model, core.get_tokenizer("bytes"), NEWLINE), mc_file)
    rc, out, err = bench_run_cli("bench.py", "--eval-tasks", mc_file, "--init-from", path, "--device", "cpu")
    assert rc == 0, err  # the checkpoint names its script and its dataset (the tokenizer)
    assert f"| mc.jsonl | acc | {want['acc']:.4f} |" in out and f"| acc_norm | {want['acc_norm']:.4f} |" in out
    assert bench.main(["--eval-tasks", mc_file, "--ckpt", path, "--device", "cpu"]) == 0  # the older spelling
    assert f"| mc.jsonl | acc | {want['acc']:.4f} |" in capsys.readouterr().out


def test_bench_eval_tasks_table_names_its_model_and_dataset(tiny_ckpt, mc_file, bytes_data, capsys):
    """The scores table printed only task, metric and value: nothing said which checkpoint or dataset they were of."""
    path, _ = tiny_ckpt
    assert bench.main(["--eval-tasks", mc_file, "--init-from", path, "--device", "cpu"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    assert head.startswith("core") and path in head and "bytes tokens of" in head and bytes_data in head, head


@pytest.mark.skipif(not os.path.exists(TIKTOKEN), reason="needs the offline gpt2.tiktoken")
def test_bench_eval_tasks_data_of_another_tokenizer_or_negative_limit_is_one_line(tiny_ckpt, mc_file, tmp_path,
                                                                                   monkeypatch, capsys):
    """A byte model given GPT-2 data: ids past its vocabulary raised an IndexError traceback (or, below 256, scored
    the other tokenizer's ids); --limit -1 divided by zero."""
    monkeypatch.setenv("ATTNLAB_TIKTOKEN", TIKTOKEN)
    gpt2 = write_dataset(tmp_path / "gpt2", {"train": np.arange(200), "val": np.arange(200)}, "gpt2", 50257, 50256)
    fails_in_one_line(capsys, bench.main(["--eval-tasks", mc_file, "--ckpt", tiny_ckpt[0], "--device", "cpu",
                                          "--data", gpt2]), "holds gpt2 tokens; the model was trained on bytes")
    fails_in_one_line(capsys, bench.main(["--eval-tasks", mc_file, "--ckpt", tiny_ckpt[0], "--device", "cpu",
                                          "--limit", "-1"]), "--limit must be >= 0")


def test_bench_lm_eval_missing_is_one_line(tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.api", None)
    monkeypatch.setitem(sys.modules, "lm_eval.api.model", None)
    bench.lm_eval_adapter.cache_clear()
    try:
        assert bench.main(["--eval-tasks", "hellaswag", "--ckpt", tiny_ckpt[0], "--device", "cpu"]) == 2
    finally:
        bench.lm_eval_adapter.cache_clear()
    assert "pip install lm-eval" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------
# bench: --compare

def test_bench_compare_trains_both_variants_on_equal_terms(tmp_path, bytes_data, monkeypatch):
    """Both runs train at once (--jobs 2) with identical flags; each is scored on the whole val split. Run from
    another folder with a relative --data (the runs' processes ran in the repo: they found no such dataset)."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = bench_run_cli(os.path.join(HERE, "bench.py"), "--compare", "--papers", "reflex", "--preset", "tiny",
                                 "--device", "cpu", "--data", os.path.relpath(bytes_data), "--max-iters", 4, "--evals",
                                 2, "--jobs", 2, "--out", tmp_path, cwd=tmp_path)
    assert rc == 0, err
    runs = json.load(open(tmp_path / "compare.json"))["runs"]
    assert [bench.label(r) for r in runs] == ["reflex/baseline", "reflex/reflex 5-2-1"]
    assert runs[0]["tokens"] == runs[1]["tokens"] == 4 * 8 * 64
    for r in runs:
        assert not r["error"] and math.isfinite(r["val_loss"]) and r["tok_s"] > 0
        assert [t for t, _, _ in r["curve"]] == [2 * 8 * 64, 4 * 8 * 64]  # --evals 2: evaluations at steps 2 and 4
        assert "mem_gb" in core.read_log(r["out"])[-1]
    reach = bench.tokens_to(runs[1]["curve"], runs[0]["val_loss"])
    assert runs[1]["to_base"] == ("not reached" if reach is None else reach / runs[0]["tokens"])
    assert runs[0]["to_base"] is runs[0]["d_val"] is runs[0]["d_whole"] is None  # the baseline itself
    strip = lambda cmd: [a for a in cmd if a not in ("baseline", "reflex") and not a.startswith(str(tmp_path))]
    assert strip(runs[0]["cmd"]) == strip(runs[1]["cmd"])  # identical flags but the variant and out dir
    assert runs[1]["d_val"] == pytest.approx(runs[1]["val_loss"] - runs[0]["val_loss"])
    assert "| reflex/reflex 5-2-1 | 1337 | 2,048 | 0.01 |" in out  # epochs of the 200k-byte train split
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    for r in runs:  # the whole val split, scored from the final checkpoint and kept beside it
        model = core.load_model(reflex.PAPER, os.path.join(r["out"], "ckpt.pt"))
        want = core.evaluate(model, core.TokenData(bytes_data), dataclasses.replace(model.cfg, eval_tokens=0),
                              torch.device("cpu"))
        assert r["val_whole"] == pytest.approx(want["loss"])
        assert json.load(open(os.path.join(r["out"], "eval.json")))["tokens"] == want["tokens"] > 8 * 64 * 4
    assert runs[1]["d_whole"] == pytest.approx(runs[1]["val_whole"] - runs[0]["val_whole"])
    assert f"| {runs[1]['val_whole']:.4f} ({runs[1]['d_whole']:+.4f}) |" in out


def test_bench_compare_jobs_train_side_by_side_one_run_per_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    lock, busy, most = threading.Lock(), {}, []

    def train_run(cmd, out, env, started):
        gpu = env["CUDA_VISIBLE_DEVICES"]
        with lock:
            assert gpu not in busy.values()  # two runs at once never share a GPU
            busy[out] = gpu
            most.append(len(busy))
        time.sleep(0.2)
        with lock:
            del busy[out]
        return "exit 1: out of memory" if out == "c" else None
    monkeypatch.setattr(bench, "train_run", train_run)
    runs = [dict(script="reflex", variant="reflex", seed=1, out=out) for out in "abc"]
    scored = []
    bench.train_runs([(r, ["train"]) for r in runs], jobs=2, gpu=True, then=lambda r, _: scored.append(r["out"]))
    assert max(most) == 2 and [r["error"] for r in runs] == [None, None, "exit 1: out of memory"]
    assert sorted(scored) == ["a", "b"]  # each trained run is scored as soon as it is done
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")  # the GPUs the user gave us, not 0 and 1
    seen = []
    monkeypatch.setattr(bench, "train_run", lambda cmd, out, env, started: seen.append(env["CUDA_VISIBLE_DEVICES"]))
    bench.train_runs([(r, ["train"]) for r in runs], jobs=2, gpu=True)
    assert set(seen) == {"5", "7"}


def test_bench_compare_scores_a_run_while_the_next_one_trains(monkeypatch):
    started = {out: threading.Event() for out in "ab"}
    monkeypatch.setattr(bench, "train_run", lambda cmd, out, env, _: started[out].set())
    overlapped = []

    def score(run, _):  # run a's score waits (up to 5 s) for run b's training to start
        if run["out"] == "a":
            overlapped.append(started["b"].wait(timeout=5))
    runs = [dict(script="reflex", variant="reflex", seed=1, out=out) for out in "ab"]
    bench.train_runs([(r, ["train"]) for r in runs], jobs=1, gpu=False, then=score)
    assert overlapped == [True] and [r["error"] for r in runs] == [None, None]


def test_bench_compare_table_names_the_runs_own_machine(tmp_path):
    """Runs tabulated elsewhere (--report) keep the device, torch and git they ran with (run_machines: grouped, of the
    runs that recorded them); speed rows are this process's."""
    recorded = dict(gpu="NVIDIA H200", torch="2.11.0+cu130", cuda="13.0", git="abc1234")
    (tmp_path / "run.json").write_text(json.dumps(recorded))
    env = bench.run_env([dict(out=str(tmp_path))])
    assert (env["device"], env["torch"], env["cuda"], env["git"]) == ("NVIDIA H200", "2.11.0+cu130", "13.0", "abc1234")
    assert env["peak_tflops"] == 989
    assert bench.run_env([dict(device="cpu")])["torch"] == torch.__version__
    runs = [dict(script="reflex", variant="baseline", seed=1, out=str(tmp_path)),
            dict(script="reflex", variant="baseline", seed=2, out=str(tmp_path / "not-run"))]  # no run.json: unnamed
    assert bench.run_machines(runs) == {("NVIDIA H200", "2.11.0+cu130", "abc1234"): ["reflex/baseline seed 1"]}


def test_bench_tokens_to_a_loss_interpolates_between_evaluations():
    curve = [(10, 1.0, 3.0), (20, 2.0, 2.0), (30, 3.0, 1.5)]
    assert bench.tokens_to(curve, 2.5) == 15 and bench.tokens_to(curve, 1.75) == 25
    assert bench.tokens_to(curve, 2.8) == pytest.approx(12)  # off the midpoint: linear from the first evaluation
    assert bench.tokens_to(curve, 3.5) == 10  # already there at the first evaluation
    assert bench.tokens_to(curve, 1.0) is None
    assert bench.tokens_to(curve, 1.5) == 30  # reached exactly at the last evaluation


def test_bench_seed_summary_means_and_spread():
    runs = [dict(script="r", variant="v", baseline="b", val_loss=x, d_val=d)
            for x, d in ((2.0, -0.1), (2.4, -0.3), (2.3, 0.1))]
    s = bench.seed_summary(runs)["r/v"]
    assert (s["val_loss"], s["mean"], s["spread"]) == pytest.approx((6.7 / 3, -0.1, 0.4))
    runs[2]["d_val"], runs[2]["val_loss"] = 0.7, 2.9  # skewed: means, not medians
    s = bench.seed_summary(runs)["r/v"]
    assert (s["val_loss"], s["mean"], s["spread"]) == pytest.approx((7.3 / 3, 0.1, 1.0))


def log_record(step, val_loss):
    """One record of a stubbed training's log.jsonl (tiny preset: 512 tokens a step)."""
    return dict(step=step, tokens=step * 512, ms=10.0, tok_s=51200, mfu=None, mem_gb=None, loss=3.0, val_loss=val_loss)


def test_bench_compare_seeds_are_compared_with_the_baseline_of_their_seed(tmp_path, bytes_data, monkeypatch):
    """--seeds: each run's difference is to the baseline trained with the same seed; epochs are of one run; the
    schedule is a tenth warm-up and --evals evaluations (trainings stubbed: logs written directly)."""
    val = {("baseline", "1"): 3.0, ("baseline", "2"): 2.0, ("reflex", "1"): 2.9, ("reflex", "2"): 1.95}
    cmds = {}

    def fake(cmd, out, env=None, started=None):
        os.makedirs(out, exist_ok=True)
        n, seed = int(cmd[cmd.index("--max-iters") + 1]), cmd[cmd.index("--seed") + 1]
        variant = "reflex" if "reflex-reflex" in out else "baseline"
        cmds[variant, seed] = cmd
        recs = [log_record(s, val[variant, seed] + (0.5 if s < n else 0)) for s in (n // 2, n)]
        open(os.path.join(out, "log.jsonl"), "w").writelines(json.dumps(r) + "\n" for r in recs)
    monkeypatch.setattr(bench, "train_run", fake)
    args = bench.build_parser().parse_args(["--compare", "--papers", "reflex", "--preset", "tiny", "--device", "cpu",
                                            "--data", bytes_data, "--max-iters", "40", "--evals", "2", "--seeds",
                                            "1,2", "--out", str(tmp_path)])
    assert bench.compare(args, gpu=False) == 0
    runs = {(r["variant"], r["seed"]): r for r in json.load(open(tmp_path / "compare.json"))["runs"]}
    assert runs["reflex", 1]["d_val"] == pytest.approx(-0.1) and runs["reflex", 2]["d_val"] == pytest.approx(-0.05)
    train = core.TokenData(bytes_data).tokens("train")
    assert runs["reflex", 2]["epochs"] == pytest.approx(40 * 512 / train)
    cmd = cmds["reflex", "1"]
    assert [cmd[cmd.index(f) + 1] for f in ("--warmup-iters", "--eval-interval")] == ["4", "20"]


def test_bench_compare_differences_to_the_baseline_and_the_table(tmp_path, bytes_data, monkeypatch, capsys):
    """d_val, d_whole: the run's loss minus its baseline's of the same seed (last logged val loss; whole val split,
    eval.json); to_base: the training tokens at which the run's val curve, linear between evaluations, reaches the
    baseline's final loss, over the baseline's tokens ('not reached' where it never does; seed 2's run trains twice
    the tokens a step); a run cut short (--report) is compared at its last evaluation, at its share of the baseline's
    tokens; the table shows each (trainings stubbed)."""
    base = [3.0, 2.6, 2.4, 2.2]
    val = {"1": [2.8, 2.3, 2.0, 1.9], "2": [2.9, 2.5, 2.0, 1.9], "3": [3.5, 3.4, 3.3, 3.2]}
    whole = {"1": 2.15, "2": 2.05, "3": 3.0}

    def fake(cmd, out, env=None, started=None):
        os.makedirs(out, exist_ok=True)
        seed, reflex_run = cmd[cmd.index("--seed") + 1], "reflex-reflex" in out
        recs = [dict(log_record(s, v), tokens=s * (1024 if reflex_run and seed == "2" else 512))
                for s, v in zip((10, 20, 30, 40), val[seed] if reflex_run else base)]
        open(os.path.join(out, "log.jsonl"), "w").writelines(json.dumps(r) + "\n" for r in recs)
        json.dump(dict(argv=cmd[1:]), open(os.path.join(out, "run.json"), "w"))
        json.dump(dict(loss=whole[seed] if reflex_run else 2.3), open(os.path.join(out, "eval.json"), "w"))
    monkeypatch.setattr(bench, "train_run", fake)
    argv = ["--compare", "--papers", "reflex", "--preset", "tiny", "--device", "cpu", "--data", bytes_data,
            "--max-iters", "40", "--evals", "4", "--seeds", "1,2,3", "--out", str(tmp_path)]
    assert bench.compare(bench.build_parser().parse_args(argv), gpu=False) == 0
    runs = {(r["variant"], r["seed"]): r for r in json.load(open(tmp_path / "compare.json"))["runs"]}
    one, two, three = (runs["reflex", seed] for seed in (1, 2, 3))
    assert (one["d_val"], one["d_whole"]) == (pytest.approx(-0.3), pytest.approx(-0.15))
    assert one["to_base"] == pytest.approx((20 + 10 * 0.1 / 0.3) / 40) and three["to_base"] == "not reached"
    assert two["to_base"] == pytest.approx((20 + 10 * 0.3 / 0.5) * 1024 / (40 * 512))
    assert three["d_val"] == pytest.approx(1.0)
    assert runs["baseline", 1]["d_val"] is runs["baseline", 1]["to_base"] is None  # no baseline of its own
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[5:9]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| reflex/") and line.count("|") == 13}
    assert rows["reflex/reflex 5-2-1", "1"] == ["1.9000", "-0.3000", "2.1500 (-0.1500)", "0.58x"]
    assert rows["reflex/reflex 5-2-1", "2"] == ["1.9000", "-0.3000", "2.0500 (-0.2500)", "1.30x"]
    assert rows["reflex/reflex 5-2-1", "3"] == ["3.2000", "+1.0000", "3.0000 (+0.7000)", "not reached"]
    assert rows["reflex/baseline", "1"] == ["2.2000", "-", "2.3000", "-"]
    log = tmp_path / "reflex-reflex-seed1" / "log.jsonl"  # cut after its second evaluation
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:2]))
    assert bench.compare(bench.build_parser().parse_args([*argv, "--report"]), gpu=False) == 0
    cut = next(r for r in json.load(open(tmp_path / "compare.json"))["runs"] if r["variant"] == "reflex"
               and r["seed"] == 1)
    assert cut["d_cut"] == [0.5, pytest.approx(-0.3)] and cut["to_base"] is None
    assert "| -0.3000 at 50% of the tokens |" in capsys.readouterr().out


def test_bench_speed_ratios_prefer_the_baselines_auto_row():
    rows = [dict(script="reflex", variant="baseline", baseline="baseline", T=64, impl="eager", tok_s=50.0),
            dict(script="reflex", variant="baseline", baseline="baseline", T=64, impl="auto", tok_s=100.0),
            dict(script="reflex", variant="reflex", baseline="baseline", T=64, impl="auto", tok_s=80.0),
            dict(script="core", variant="", baseline="", T=64, impl="eager", tok_s=40.0),
            dict(script="core", variant="", baseline="", T=64, impl="auto", tok_s=160.0)]
    bench.add_ratios(rows)
    assert rows[2]["x_baseline"] == pytest.approx(0.8) and rows[2]["x_core"] == pytest.approx(0.5)


def test_bench_summarize_counts_the_first_interval_at_the_median_step():
    """The first logged interval holds the compilation (and warm-up): counted at the median step time even when it
    is not 3x slower."""
    log = [dict(step=s, tokens=s, ms=ms, tok_s=1.0) for s, ms in ((5, 25.0), (10, 10.0), (15, 10.0), (20, 10.0))]
    assert bench.summarize(log)["train_s"] == pytest.approx(20 * 10 / 1e3)


def test_bench_summarize_counts_an_interval_at_its_own_time_up_to_3x_the_median():
    """An interval of up to 3x the median step time (2.5x, exactly 3x) is training, counted at its own time; above it,
    a compilation, counted at the median. tok/s and MFU: medians of the steady records."""
    rec = lambda step, ms, mfu: dict(step=step, ms=ms, tok_s=1000 / ms, tokens=100 * step, mfu=mfu)
    log = [rec(10, 900.0, 0.01), rec(20, 10.0, 0.3), rec(30, 30.0, 0.1), rec(40, 10.0, 0.3), rec(50, 25.0, 0.12),
           rec(60, 10.0, 0.3), rec(70, 31.0, 0.1), rec(80, 10.0, 0.25)]
    s = bench.summarize(log)  # median of the steady 10, 30, 10, 25, 10, 31, 10: 10
    assert s["train_s"] == pytest.approx(10 * (10 + 10 + 30 + 10 + 25 + 10 + 10 + 10) / 1e3)
    assert s["mfu"] == pytest.approx(0.25) and s["tok_s"] == pytest.approx(100.0)


def test_bench_parity_flags_a_slightly_wrong_fp32_fast_path(monkeypatch):
    """fp32 tolerance 2e-3: a fast path whose softmax scale is 20% off (a 1.4e-2 error) is a FAIL, not ok."""
    s = bench.script("core")
    cfg = bench.make_cfg(s, "", "tiny", device="cpu")
    monkeypatch.setattr(core.Attention, "attend_sdpa", lambda self, q, k, v, ctx: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=1.2 / math.sqrt(q.size(-1))))
    r = bench.check_parity(s, cfg)
    assert r["tol"] == 2e-3 and 5e-3 < r["err"] < 0.1 and r["status"] == "FAIL"


def test_bench_compare_token_budget_counts_grad_accum():
    """--tokens counts every micro-batch: the attn_bias paper preset's 12 x 1024 x 40 tokens a step."""
    args = bench.build_parser().parse_args(["--compare", "--papers", "attn_bias", "--preset", "paper", "--tokens",
                                            str(491_520 * 3), "--data", "x"])
    assert bench.compare_cmd(args, bench.script("attn_bias"), "attn_bias.py", "attn_bias", "paper")[1] == 3


def test_bench_compare_labels_a_variant_as_its_config_names_it_and_a_bench_row_by_its_name():
    args = bench.build_parser().parse_args(["--compare", "--max-iters", "4", "--data", "d", "--device", "cpu"])
    label = lambda name, variant: bench.compare_cmd(args, bench.script(name), f"{name}.py", variant, "tiny")[2]
    assert [label("reflex", v) for v in ("baseline", "reflex", "reflex 4-2-2", "reflex all")] == [
        "reflex/baseline", "reflex/reflex 5-2-1", "reflex/reflex 4-2-2", "reflex/reflex all"]
    core_rows = bench.pick_variants(bench.script("core"), "all")
    assert [label("core", v) for v in core_rows] == ["core", "core/bf16 residual"]  # two runs, two names


def test_bench_compare_token_budget_seeds_and_reuse(tmp_path, bytes_data):
    args = ["bench.py", "--compare", "--papers", "reflex", "--preset", "tiny", "--device", "cpu", "--data", bytes_data,
            "--tokens", 2048, "--seeds", "1,2", "--out", tmp_path]
    rc, out, err = bench_run_cli(*args)
    assert rc == 0, err
    res = json.load(open(tmp_path / "compare.json"))
    assert [(bench.label(r), r["seed"], r["tokens"]) for r in res["runs"]] == [
        ("reflex/baseline", 1, 2048), ("reflex/baseline", 2, 2048),
        ("reflex/reflex 5-2-1", 1, 2048), ("reflex/reflex 5-2-1", 2, 2048)]
    d = [r["d_val"] for r in res["runs"] if r["variant"] == "reflex"]
    assert res["summary"]["reflex/reflex 5-2-1"]["spread"] == pytest.approx(max(d) - min(d))
    assert "spread of the difference" in out
    logs = {r["out"]: open(os.path.join(r["out"], "log.jsonl")).read() for r in res["runs"]}
    rc, out, err = bench_run_cli(*args)  # the same command again: every run is finished, none is trained again
    assert rc == 0 and err.count("] done: ") == 4, err
    assert logs == {r: open(os.path.join(r, "log.jsonl")).read() for r in logs}
    rc, _, err = bench_run_cli(*args[:-2], "--tokens", 4096, "--out", tmp_path)  # other flags into the same folders
    assert rc == 2 and "holds a run made with other flags (" in err and "--max-iters 4 " in err and ": --fresh" in err
    rc, _, err = bench_run_cli(*args[:-2], "--tokens", 4096, "--out", tmp_path, "--report")
    assert rc == 2 and "--report takes the comparison's own flags" in err and "--fresh" not in err
    first = res["runs"][0]["out"]
    json.dump(dict(loss=99.0), open(os.path.join(first, "eval.json"), "w"))  # a score of the run about to be replaced
    rc, _, err = bench_run_cli(*args[:-4], "--seeds", "1", "--fresh", "--out", tmp_path)
    assert rc == 0, err
    assert json.load(open(os.path.join(first, "eval.json")))["loss"] < 99  # scored again, the new model
    rc, _, err = bench_run_cli(*args[:-4], "--seeds", "1", "--fresh", "--no-whole-val", "--out", tmp_path)
    assert rc == 0, err  # no whole-split score, and none of the replaced model left behind
    assert not os.path.exists(os.path.join(first, "eval.json"))
    assert [r["val_whole"] for r in json.load(open(tmp_path / "compare.json"))["runs"]] == [None, None]


def test_bench_compare_resumes_a_run_cut_short(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cmd = [sys.executable, "reflex.py", "--train", "--max-iters", "8", "--out", str(out)]
    json.dump(dict(argv=["reflex.py", *cmd[2:], "--resume"]), open(out / "run.json", "w"))
    (out / "ckpt.pt").write_bytes(b"")
    (out / "log.jsonl").write_text(json.dumps(dict(step=4)) + "\n")
    assert bench.prior_run(str(out), cmd, 8, fresh=False) == "resume"
    json.dump(dict(argv=["reflex.py", *cmd[2:], "--overwrite"]), open(out / "run.json", "w"))  # not a flag of the run
    assert bench.prior_run(str(out), cmd, 8, fresh=False) == "resume"
    (out / "log.jsonl").write_text(json.dumps(dict(step=8)) + "\n")
    assert bench.prior_run(str(out), cmd, 8, fresh=False) == "done"
    assert bench.prior_run(str(out), cmd, 8, fresh=True) == "new"
    assert bench.prior_run(str(tmp_path / "none"), cmd, 8, fresh=False) == "new"
    (out / "ckpt.pt").unlink()  # logs copied back from a GPU machine, without the checkpoint
    assert bench.prior_run(str(out), cmd, 8, fresh=False) == "done"
    (out / "log.jsonl").write_text(json.dumps(dict(step=4)) + "\n")
    assert bench.prior_run(str(out), cmd, 8, fresh=False) == "cut"  # nothing to resume from: trained again
    assert bench.prior_run(str(out), [*cmd[:-1], "moved/run"], 8, fresh=False) == "cut"  # --out: where, not how


def test_bench_last_step_is_the_logs_last_whole_record(tmp_path):
    assert bench.last_step(str(tmp_path)) == 0  # no log
    (tmp_path / "log.jsonl").write_text('{"step": 2}\n{"step": 4}\n{"step": 6, "lo')  # the last write cut off
    assert bench.last_step(str(tmp_path)) == 4
    (tmp_path / "log.jsonl").write_text('{"step": 0, "lo')
    assert bench.last_step(str(tmp_path)) == 0


def test_bench_compare_resumes_a_cut_run_from_its_checkpoint_and_trains_one_without_it_again(tmp_path, bytes_data,
                                                                                            monkeypatch):
    args = bench.build_parser().parse_args(["--compare", "--papers", "reflex", "--preset", "tiny", "--device", "cpu",
                                            "--data", bytes_data, "--max-iters", "4", "--evals", "2", "--out",
                                            str(tmp_path)])
    rec = lambda step: json.dumps(log_record(step, 3.0 - 0.1 * step)) + "\n"
    for variant, ckpt in (("baseline", True), ("reflex", False)):  # both cut at step 2 of 4, one kept its checkpoint
        out = tmp_path / f"reflex-{variant}"
        out.mkdir()
        cmd = bench.compare_cmd(args, bench.script("reflex"), os.path.join(bench.HERE, "reflex.py"), variant, "tiny")[0]
        argv = [*cmd[1:], "--seed", "1337", "--out", str(out), "--overwrite"]  # as the cut run recorded it
        json.dump(dict(argv=argv), open(out / "run.json", "w"))
        (out / "log.jsonl").write_text(rec(2))
        if ckpt:
            (out / "ckpt.pt").write_bytes(b"")
    cmds = {}

    def fake(cmd, out, env=None, started=None):
        cmds[os.path.basename(out)] = cmd
        open(os.path.join(out, "log.jsonl"), "a").write(rec(4))
    monkeypatch.setattr(bench, "train_run", fake)
    monkeypatch.setattr(bench, "whole_val", lambda paper, out, data, stop=None: None)
    assert bench.compare(args, gpu=False) == 0
    assert cmds["reflex-baseline"][-1] == "--resume" and cmds["reflex-reflex"][-1] == "--overwrite"


def test_bench_compare_append_keeps_the_runs_of_other_seeds(tmp_path, bytes_data, monkeypatch):
    """--append of another seed's runs: compare.json then holds both seeds of each variant (trainings stubbed)."""
    def fake(cmd, out, env=None, started=None):
        os.makedirs(out, exist_ok=True)
        n, seed = int(cmd[cmd.index("--max-iters") + 1]), int(cmd[cmd.index("--seed") + 1])
        open(os.path.join(out, "log.jsonl"), "w").write(json.dumps(log_record(n, 3.0 - seed)) + "\n")
    monkeypatch.setattr(bench, "train_run", fake)
    for seed in ("1", "2"):
        args = bench.build_parser().parse_args(["--compare", "--papers", "reflex", "--preset", "tiny", "--device",
                                                "cpu", "--data", bytes_data, "--max-iters", "4", "--evals", "2",
                                                "--seeds", seed, "--append", "--out", str(tmp_path)])
        assert bench.compare(args, gpu=False) == 0
    runs = json.load(open(tmp_path / "compare.json"))["runs"]
    assert sorted((r["variant"], r["seed"], r["val_loss"]) for r in runs) == [
        ("baseline", 1, 2.0), ("baseline", 2, 1.0), ("reflex", 1, 2.0), ("reflex", 2, 1.0)]


def test_bench_compare_cmd_of_a_short_run_and_its_eval_iters():
    """More --evals than steps: an evaluation at every step, never an interval of 0; --eval-iters is passed on;
    'auto' values are left to the script."""
    args = bench.build_parser().parse_args(["--compare", "--max-iters", "4", "--evals", "6", "--eval-iters", "3",
                                            "--data", "d", "--device", "cpu"])
    cmd, n, _ = bench.compare_cmd(args, bench.script("reflex"), "reflex.py", "reflex", "tiny")
    value = lambda flag: cmd[cmd.index(flag) + 1]
    assert n == 4 and [value(f) for f in ("--max-iters", "--warmup-iters", "--eval-interval", "--log-interval",
                                          "--eval-iters", "--device")] == ["4", "1", "1", "1", "3", "cpu"]
    assert "--attn-impl" not in cmd and "--dtype" not in cmd

def test_bench_train_run_reports_a_failed_or_killed_command_by_its_last_line(tmp_path, monkeypatch):
    """A training command runs with the environment given and the repo first on PYTHONPATH, its output in
    <out>/stdout.txt; a non-zero exit, a signal's too, is 'exit CODE: last line', a clean one None."""
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    started = []
    show = "import os; print(os.environ['PYTHONPATH'], os.environ['FLAG'])"
    assert bench.train_run([sys.executable, "-c", show], str(tmp_path / "a"), {"FLAG": "on"}, started.append) is None
    assert (tmp_path / "a" / "stdout.txt").read_text() == f"{bench.HERE}{os.pathsep}/elsewhere on\n"
    assert len(started) == 1 and started[0].returncode == 0
    kill = "import os, signal; print('stopping', flush=True); os.kill(os.getpid(), signal.SIGKILL)"
    assert bench.train_run([sys.executable, "-c", kill], str(tmp_path / "b")) == "exit -9: stopping"
    fail = "import sys; print('bad flag'); sys.exit(3)"
    assert bench.train_run([sys.executable, "-c", fail], str(tmp_path / "c")) == "exit 3: bad flag"


def test_bench_compare_cmd_of_a_long_run_from_a_token_budget():
    """--tokens sets the steps, rounded up, from the row's tokens per step; warm-up a tenth of them, --evals
    evaluations, a log line every 25 steps at most; --no-compile unless --compile; the row's batch and block size."""
    parse = lambda *flags: bench.build_parser().parse_args(["--compare", "--tokens", "1e6", "--data", "d", "--device",
                                                            "cpu", "--batch-size", "4", "--block-size", "32", *flags])
    cmd, n, _ = bench.compare_cmd(parse("--no-compile"), bench.script("reflex"), "reflex.py", "reflex", "tiny")
    value = lambda flag: cmd[cmd.index(flag) + 1]
    assert n == 7813  # 1e6 / (4 x 32) = 7812.5
    assert [value(f) for f in ("--max-iters", "--warmup-iters", "--eval-interval", "--log-interval", "--batch-size",
                               "--block-size")] == ["7813", "781", "1302", "25", "4", "32"]
    assert "--no-compile" in cmd
    assert "--no-compile" not in bench.compare_cmd(parse("--compile"), bench.script("reflex"), "reflex.py", "reflex",
                                                   "tiny")[0]


def test_bench_summarize_peak_memory_is_the_largest_record():
    rec = lambda step, mem: dict(step=step, ms=10.0, tok_s=100.0, tokens=100 * step, mem_gb=mem)
    assert bench.summarize([rec(10, 1.0), rec(20, 3.5), rec(30, 2.0)])["mem_gb"] == 3.5
    assert bench.summarize([rec(10, None), rec(20, None)])["mem_gb"] is None


def test_bench_whole_val_reuses_its_kept_score_and_needs_the_checkpoint(tmp_path, bytes_data):
    json.dump(dict(loss=2.5, tokens=1000), open(tmp_path / "eval.json", "w"))
    assert bench.whole_val(reflex.PAPER, str(tmp_path), None) == 2.5  # kept: neither data nor checkpoint needed
    os.remove(tmp_path / "eval.json")
    assert bench.whole_val(reflex.PAPER, str(tmp_path), core.TokenData(bytes_data)) is None  # logs copied back alone
    assert not os.path.exists(tmp_path / "eval.json")


def test_bench_seed_summary_leaves_out_baselines_and_the_spread_of_one_seed():
    runs = [dict(script="r", variant="b", baseline="b", val_loss=3.0, d_val=None),
            dict(script="r", variant="v", baseline="b", val_loss=2.9, d_val=-0.1)]
    assert bench.seed_summary(runs) == {"r/v": dict(val_loss=2.9, d_val=[-0.1], mean=-0.1, spread=None)}


def test_bench_append_computes_ratios_against_the_rows_in_the_file(tmp_path):
    """--append of one variant's row: its x baseline is against the baseline row already in bench.json; a row of
    another batch size is another row, not a replacement."""
    row = lambda script, variant, tok_s, B=8: dict(script=script, variant=variant, baseline=variant and "baseline",
                                                   impl="auto", T=64, B=B, tok_s=tok_s, status="ok")
    path = str(tmp_path / "bench.json")
    bench.save_rows(path, [row("core", "", 200.0), row("reflex", "baseline", 100.0)], append=False)
    rows, _ = bench.save_rows(path, [row("reflex", "reflex", 80.0), row("core", "", 400.0, B=16)], append=True)
    assert [(r["script"], r["variant"], r["B"]) for r in rows] == [("core", "", 8), ("core", "", 16),
                                                                   ("reflex", "baseline", 8), ("reflex", "reflex", 8)]
    saved = json.load(open(path))["rows"]
    assert saved[3]["x_baseline"] == pytest.approx(0.8) and saved[3]["x_core"] == pytest.approx(0.4)


def test_bench_summarize_counts_compilations_at_the_median_step_time():
    rec = lambda step, ms, **kw: dict(step=step, ms=ms, tok_s=1000 / ms, tokens=100 * step, **kw)
    log = [rec(10, 900.0), rec(20, 10.0), rec(30, 400.0, val_loss=3.0), rec(40, 12.0), rec(50, 10.0, val_loss=2.0)]
    s = bench.summarize(log)  # the first interval compiled, the third recompiled (FlexAttention's first documents)
    median = 11.0  # of the steady records' 10, 400, 12, 10 ms
    assert s["train_s"] == pytest.approx((10 * median + 10 * 10.0 + 10 * median + 10 * 12.0 + 10 * 10.0) / 1e3)
    assert s["curve"] == [(3000, pytest.approx(0.32), 3.0), (5000, pytest.approx(0.54), 2.0)]
    assert s["val_loss"] == 2.0 and s["tok_s"] == pytest.approx((1000 / 12 + 100) / 2)


def test_bench_compare_report_tabulates_what_is_there_and_trains_nothing(tmp_path, bytes_data):
    """--report tabulates runs from their logs (copied back without checkpoints or data): cut runs named, nothing
    trained, and the machine of each run named where they differ."""
    data = shutil.copytree(bytes_data, tmp_path / "data")
    args = ["bench.py", "--compare", "--papers", "reflex", "--preset", "tiny", "--device", "cpu", "--data", data,
            "--max-iters", 4, "--out", tmp_path]
    assert bench_run_cli(*args)[0] == 0
    b, v = json.load(open(tmp_path / "compare.json"))["runs"]  # the plot's middle row: v's curve minus b's
    assert b["d_curve"] == [] and len(v["curve"]) == 4 and v["d_curve"] == [
        [t, pytest.approx(loss - base)] for (t, _, loss), (_, _, base) in zip(v["curve"], b["curve"])]
    shutil.rmtree(data)  # the logs copied back from a GPU machine, without the data: run.json records its size
    base, var = tmp_path / "reflex-baseline", tmp_path / "reflex-reflex"
    (base / "ckpt.pt").unlink()
    (var / "ckpt.pt").unlink()
    (var / "log.jsonl").write_text(open(var / "log.jsonl").readline())  # cut after its first record
    before = {p: p.read_text() for p in (base / "log.jsonl", var / "log.jsonl")}
    rc, out, err = bench_run_cli(*args, "--report")
    assert rc == 0, err
    assert "| reflex/baseline | 1337 | 2,048 | 0.01 |" in out and "| cut at step 1 of 4 |" in out
    at = lambda run: next(r["val_loss"] for r in core.read_log(run) if r["step"] == 1)
    assert f"| {at(var) - at(base):+.4f} at 25% of the tokens | - | - |" in out  # the baseline where it was cut
    assert "note: reflex/reflex 5-2-1, seed 1337: cut at step 1 of 4" in err
    assert "stdout.txt" not in err  # no log of it here
    assert {p: p.read_text() for p in before} == before and not (var / "ckpt.pt").exists()  # nothing trained
    run = json.load(open(var / "run.json"))  # the variant trained on another machine: each run's named
    (var / "run.json").write_text(json.dumps(dict(run, gpu="NVIDIA H100 80GB HBM3")))
    code = f"torch {run['torch']}, git {run['git']}"
    assert (f"; the runs' machines:\n- cpu, {code}: reflex/baseline seed 1337\n- NVIDIA H100 80GB HBM3, {code}: "
            "reflex/reflex 5-2-1 seed 1337\n") in bench_run_cli(*args, "--report")[1]
    assert json.load(open(tmp_path / "compare.json"))["device"] == "cpu / NVIDIA H100 80GB HBM3"
    (base / "log.jsonl").write_text(open(base / "log.jsonl").readline())  # the baseline cut as well
    (var / "log.jsonl").write_text('{"step": 0, "lo')  # killed before its first whole record
    rc, out, err = bench_run_cli(*args, "--report")
    assert rc == 0, err
    assert "note: reflex/baseline, seed 1337: cut at step 1 of 4" in err
    assert "reflex/reflex 5-2-1, seed 1337: cut" in err


def test_bench_compare_sigterm_stops_the_run_training_at_a_checkpoint_and_starts_no_other(tmp_path, bytes_data):
    """SIGTERM to bench.py alone (a scheduler's or a time limit's notice): the run training gets it and saves a
    checkpoint at its next logged step, the next run does not start, the table names both, exit 130; the same
    command then resumes the cut run."""
    args = ["bench.py", "--compare", "--papers", "reflex", "--preset", "tiny", "--device", "cpu", "--data", bytes_data,
            "--max-iters", 4000, "--no-whole-val", "--out", tmp_path]
    p = subprocess.Popen([sys.executable, *map(str, args)], cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    log, deadline = tmp_path / "reflex-baseline" / "log.jsonl", time.time() + 120
    while not (log.exists() and log.read_text().endswith("\n")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    step = core.read_log(str(log))[-1]["step"]
    assert 0 < step < 4000 and core.load_checkpoint(str(log.parent / "ckpt.pt"))["step"] == step
    assert f"note: reflex/baseline, seed 1337: cut at step {step} of 4000" in err
    assert "note: reflex/reflex 5-2-1, seed 1337: not run" in err and not (tmp_path / "reflex-reflex").exists()
    assert "interrupted (SIGTERM): the same command continues" in err
    assert f"| reflex/baseline | 1337 | - | - | cut at step {step} of 4000 |" in out
    assert "[1] resume:" in bench_run_cli(*args, "--report")[2]


def test_bench_compare_sigterm_after_the_last_run_trained_cuts_nothing(tmp_path, bytes_data, monkeypatch, capsys):
    """A SIGTERM that comes while the last run's whole-val score finishes (session 21's time limit did): every run is
    done, so the table is whole and the exit is the normal one, not "interrupted ... cut runs" and 130. One that comes
    before a trained run was scored, or during its score, leaves the score to the same command: nothing new starts
    after SIGTERM, and a score under way ends."""
    real = bench.train_runs
    args = lambda out: ["--compare", "--papers", "reflex", "--preset", "tiny", "--device", "cpu", "--data", bytes_data,
                        "--max-iters", "4", "--out", str(tmp_path / out)]
    scores = lambda out: [(tmp_path / out / f"reflex-{v}" / "eval.json").exists() for v in ("baseline", "reflex")]
    monkeypatch.setattr(bench, "train_runs", lambda *a, **kw: real(*a, **kw) or True)  # trained and scored, then it
    rc = bench.main(args("late"))
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "SIGTERM came after the last run was trained and scored: nothing was cut" in err and "interrupted" not in err
    assert "| reflex/baseline | 1337 | 2,048 |" in out and "| cut at" not in out and scores("late") == [True, True]
    monkeypatch.setattr(bench, "train_runs", lambda todo, jobs, gpu, then: real(todo, jobs, gpu) or True)
    assert bench.main(args("early")) == 130  # trained, then the signal before any score
    assert "interrupted (SIGTERM): the same command continues" in capsys.readouterr()[1]
    assert scores("early") == [False, False]
    monkeypatch.setattr(bench, "train_runs", real)
    assert bench.main(args("early")) == 0 and scores("early") == [True, True]  # the same command scores them
    def during(todo, jobs, gpu, then):  # the signal while the first score runs: it ends there
        return real(todo, jobs, gpu, lambda run, stop: (stop.set(), then(run, stop))) or True
    monkeypatch.setattr(bench, "train_runs", during)
    assert bench.main(args("during")) == 130 and scores("during") == [False, False]
    assert "interrupted (SIGTERM): the same command continues" in capsys.readouterr()[1]


def test_bench_compare_plot_keeps_each_panels_labels_off_its_neighbours(tmp_path, saved_figures):
    """compare.png: no panel's tick labels or axis label reach into another panel (a middle-row label ran into the
    panel to its left: the layout was computed for the ticks the axes had before it resized them); a variant's seeds
    share its colour and are told apart by their markers; a script with its baseline alone says so in the middle
    row."""
    def run(script, variant, baseline, losses, d=(), seed=1337):
        tokens = (5120, 10240, 15360)
        return dict(script=script, variant=variant, baseline=baseline, seed=seed, data="data/docs", tokenizer="gpt2",
                    curve=[(t, 5.0 * i, loss) for i, (t, loss) in enumerate(zip(tokens, losses))],
                    d_curve=list(zip(tokens, d)))
    runs = [run("cogformer", "transformer", "transformer", (10.376, 9.927, 9.771)),
            run("cogformer", "cogformer", "transformer", (10.4, 9.96, 9.804), (0.0237, 0.0327, 0.0333)),
            run("cogformer", "cogformer", "transformer", (10.3, 9.9, 9.8), seed=1338),
            run("reflex", "baseline", "baseline", (10.317, 9.876, 9.718)),
            run("reflex", "reflex", "baseline", (10.322, 9.89, 9.733), (0.0053, 0.0139, 0.0152)),
            run("attn_bias", "default", "default", (10.3, 9.9, 9.7))]  # its baseline alone
    bench.plot_compare(runs, str(tmp_path / "compare.png"), "val loss, cpu")
    [(_, fig, _)] = saved_figures
    middle = fig.axes[3 + 2]  # row-major, a column per script: attn_bias's difference panel
    assert not middle.axison and [t.get_text() for t in middle.texts] == ["no variant to compare yet"]
    assert fig.axes[3 + 1].axison and not fig.axes[3 + 1].texts  # reflex's
    r = renderer(fig)
    assert not [(i, j) for i, a in enumerate(fig.axes) for j, b in enumerate(fig.axes)
                if i != j and a.get_tightbbox(r).overlaps(b.bbox)]
    lines = {line.get_label(): (line.get_color(), line.get_marker()) for line in fig.axes[0].lines}
    assert lines["cogformer seed 1337"][0] == lines["cogformer seed 1338"][0] != lines["transformer seed 1337"][0]
    assert lines["cogformer seed 1337"][1] != lines["cogformer seed 1338"][1]


def test_bench_compare_report_of_runs_not_in_out_changes_nothing(tmp_path, capsys):
    """--report with the flags of no run in --out (another paper, a typo) is one line and leaves compare.json as it
    was (it was replaced by a table of "not run" rows, exit 0)."""
    (tmp_path / "compare.json").write_text("{}")
    (tmp_path / "cogformer-transformer").mkdir()  # another comparison's run
    assert bench.main(["--compare", "--report", "--papers", "reflex", "--device", "cpu", "--data", str(tmp_path / "d"),
                       "--out", str(tmp_path)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"--report: none of these runs is in {tmp_path} (")
    assert (tmp_path / "compare.json").read_text() == "{}" and sorted(os.listdir(tmp_path)) == [
        "cogformer-transformer", "compare.json"]


def test_bench_readme_results_are_the_runs_own_numbers():
    """Every number in the README's claims table is what bench.py makes of the run named beside it: results/claims'
    compare.json (the last --report) against each row and seed, and compare.json against the run's own log."""
    runs = {Path(r["out"]).name: r for r in json.load(open(ROOT / "results/claims/compare.json"))["runs"]}
    for name, r in runs.items():
        s = bench.summarize(core.read_log(ROOT / "results/claims" / name))
        if r["missing"]:  # cut: its curve so far
            assert r["curve"] == [list(point) for point in s["curve"]] and r["missing"].startswith("cut at step")
            continue
        assert (s["val_loss"], s["tokens"], s["train_s"]) == (r["val_loss"], r["tokens"], pytest.approx(r["train_s"]))
    text = (ROOT / "README.md").read_text().split("### The papers' claims")[1].split("\n## ")[0]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in bench.PAPERS and line.split("|")[3].strip()]
    assert len(rows) == 15  # a paper not run yet has a row without seeds
    names = {"reflex (5-2-1)": "reflex", "reflex 4-2-2": "reflex_4-2-2", "reflex all": "reflex_all"}
    minus = lambda x: x.replace("−", "-").replace("*", "")
    for paper, run, seeds, tokens, epochs, val, d_val, to_base, wall, mfu, _ in rows:
        for i, seed in enumerate(seeds.split(" / ")):
            r = runs[f"{paper}-{names.get(run, run)}-seed{seed}"]
            cell = lambda c: minus(c.split(" (")[0]).split(" / ")[i if " / " in c else 0].rstrip("x%s ")
            got = [f"{r['tokens'] / 1e6:.1f}M", f"{r['epochs']:.2f}", f"{r['val_loss']:.4f}", f"{r['train_s']:.0f}",
                   f"{100 * r['mfu']:.1f}"]
            assert [tokens, epochs, cell(val), cell(wall), cell(mfu)] == got, (paper, run, seed)
            if r["d_val"] is not None:
                assert cell(d_val) == f"{r['d_val']:+.3f}", (paper, run, seed)
                assert cell(to_base) == (r["to_base"] if isinstance(r["to_base"], str) else f"{r['to_base']:.2f}")

def test_bench_ddp_scaling_efficiency_on_two_cpu_processes(tmp_path, bytes_data):
    rc, out, err = bench_run_cli("bench.py", "--ddp", 2, "--device", "cpu", "--preset", "tiny", "--data", bytes_data,
                           "--max-iters", 6, "--out", tmp_path)
    assert rc == 0, err
    res = json.load(open(tmp_path / "ddp.json"))
    one, two = res["runs"]
    assert (one["world"], two["world"]) == (1, 2) and two["tokens"] == 2 * one["tokens"]  # same micro-batch per rank
    assert res["efficiency"] == pytest.approx(two["tok_s"] / (2 * one["tok_s"]))
    assert f"scaling efficiency 2 vs 1: {100 * res['efficiency']:.1f}%" in out


# ----------------------------------------------------------------------------------------------------------------
# core + bench: a new paper script, as the README's "Add your own attention" writes it

def readme_window_script(path):
    """The README's example script, written to path (so the README's code is what this test runs)."""
    text = open(os.path.join(HERE, "README.md")).read()
    code = text[text.index("## Add your own attention"):].split("```python\n", 1)[1].split("```", 1)[0]
    path.write_text(code)
    return str(path)


def test_new_paper_script_through_core_and_bench(tmp_path, tutorial, flex_cpu_grad, monkeypatch):
    script = readme_window_script(tmp_path / "window.py")
    env = {"PYTHONPATH": HERE}
    common = ["--preset", "tiny", "--device", "cpu", "--data", tutorial, "--window", "16"]
    rc, out, err = run_cli(script, "--train", *common, "--max-iters", "40", "--eval-interval", "20",
                           "--out", tmp_path / "run", env=env)
    assert rc == 0, err
    log = core.read_log(str(tmp_path / "run"))
    assert log[-1]["loss"] < log[0]["loss"] - 1 and "window/window" in out
    rc, out, err = run_cli(script, "--eval", "--out", tmp_path / "run", env=env)
    assert rc == 0 and "window/window on" in out and "\nval " in out, err
    rc, out, err = run_cli(script, "--help", env=env)
    assert rc == 0 and "--window" in out and "full causal attention" in out
    # bench.py: its rows (baseline first), each checked then timed; the parity check also fails a broken path
    rc, out, err = bench_run_cli("bench.py", "--papers", script, "--device", "cpu", "--steps", 1, "--warmup", 0,
                                 "--out", tmp_path / "bench")
    assert rc == 0, err
    rows = json.load(open(tmp_path / "bench" / "bench.json"))["rows"]
    assert [bench.label(r) for r in rows] == ["window/baseline", "window/window"]
    assert all(r["status"] == "ok" for r in rows) and rows[0]["x_baseline"] == 1.0
    s = bench.script(script)
    cfg = bench.make_cfg(s, "window", "tiny", device="cpu", attn_impl="flex", window=16)
    assert bench.check_parity(s, cfg)["status"] == "ok"
    monkeypatch.setattr(sys.modules["window"].WindowAttention, "attend_flex", core.Attention.attend_flex)  # no band
    assert bench.check_parity(s, cfg)["status"] == "FAIL"
    rc, out, err = bench_run_cli("bench.py", "--compare", "--papers", script, "--preset", "tiny", "--device", "cpu",
                                 "--data", tutorial, "--max-iters", 4, "--out", tmp_path / "compare")
    assert rc == 0, err
    runs = json.load(open(tmp_path / "compare" / "compare.json"))["runs"]
    assert [bench.label(r) for r in runs] == ["window/baseline", "window/window"] and not any(r["error"] for r in runs)


# ----------------------------------------------------------------------------------------------------------------
# bench: GPU (H100): every fast path of every variant against its eager reference in bf16, then one compiled row

@gpu
@pytest.mark.parametrize("name", bench.scripts())
def test_bench_gpu_parity_of_every_variant(name):
    s = bench.script(name)
    for variant in bench.pick_variants(s, "all"):
        res = bench.check_parity(s, bench.make_cfg(s, variant, "tiny", device="cuda"))
        assert res["status"] == "ok", (variant, res)
        assert res["floor"] > 0 and "eager" not in res["impls"]  # checked in bf16, on a fast path


@gpu
def test_bench_gpu_compiled_row(tmp_path):
    rc, out, err = bench_run_cli("bench.py", "--papers", "core", "--preset", "tiny", "--steps", 3, "--out", tmp_path)
    assert rc == 0, err
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    assert [r["variant"] for r in rows] == ["", "bf16 residual"]  # the core and its bench_rows
    for row in rows:
        assert row["status"] == "ok" and row["mfu"] > 0 and row["mem_gb"] > 0 and row["parity"]["floor"] > 0
