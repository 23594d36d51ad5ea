"""Tests of sparse_byte.py: the thesis's patterns, the block-sparse flex path vs the masked eager reference, head
metrics on hand-made attention, k-means / silhouette, and the command line. CPU: `python -m pytest -q test_sparse_byte.py`."""
import csv
import json
import math
import os

import numpy as np
import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask, create_mask

import core
import sparse_byte as sb

HERE = os.path.dirname(os.path.abspath(__file__))
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SUBSETS = ["0", "3", "1", "2", "0123"]  # each pattern alone on every head, then the thesis's mix


@pytest.fixture
def flex_cpu_grad(monkeypatch):
    """FlexAttention has no CPU backward; its dense reference math does, once the device check is bypassed."""
    import torch.nn.attention.flex_attention as fa
    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)


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


def test_head_assignment_follows_the_thesis():
    assert sb.head_clusters(8) == [0, 3, 3, 1, 1, 1, 2, 2]
    assert sb.head_clusters(6) == [0, 3, 1, 1, 2, 2]
    assert sb.head_clusters(4) == [0, 3, 1, 2]
    assert sb.head_clusters(8, "13") == [3, 3, 3, 3, 1, 1, 1, 1]  # dropped heads go round-robin to the kept
    assert sb.head_clusters(8, "2") == [2] * 8
    assert sb.head_clusters(2, "3") == [0, 0]  # no kept cluster in the table: all focused-local
    assert sb.head_clusters(5) == [0, 0, 1, 2, 3]  # the fallback's intent


@pytest.mark.parametrize("T", [7, 40, 200])
def test_pattern_mask_matches_the_definition(T):
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
def test_extended_layout_holds_each_key_once(T):
    """The flex mask over the extended keys, folded back onto positions, is the spec with no key counted twice."""
    clusters = sb.head_clusters(8)
    src, region = sb.kv_layout(clusters, T)
    assert len(src) % sb.BLOCK == 0
    m = create_mask(sb.sparse_mask_mod(clusters, src, region), 1, 8, T, len(src))[0]  # (H, T, S)
    folded = torch.zeros(8, T, T, dtype=torch.long).index_add_(2, src, m.long())
    assert folded.max() <= 1
    assert torch.equal(folded.bool(), sb.pattern_mask(clusters, T))


def test_block_mask_is_block_sparse():
    """What FlexAttention computes: the BlockMask's tiles are exactly the non-empty tiles, far fewer than causal."""
    T, clusters = 2048, sb.head_clusters(8)
    src, region = sb.kv_layout(clusters, T)
    mod = sb.sparse_mask_mod(clusters, src, region)
    bm = create_block_mask(mod, None, 8, T, len(src), device="cpu")
    dense = create_mask(mod, 1, 8, T, len(src))[0]
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
def test_flex_matches_eager_forward_and_gradients(subset, flex_cpu_grad):
    att = attention(subset, "flex")
    for T in (200, 256):
        res = []
        for fn in (att.attend_eager, att.attend_flex):
            q, k, v = qkv(2, 8, T, 16)
            y = fn(q, k, v, core.Ctx(x0=torch.zeros(2, T, 1)))
            y.pow(2).sum().backward()  # gradients flow through the gather of the extended keys too
            res.append((y, q.grad, k.grad, v.grad))
        for a, b in zip(res[1], res[0]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_cpu_flex_training_is_refused():
    att = attention("0123", "flex")
    q, k, v = qkv(1, 8, 64, 16)
    with pytest.raises(core.ConfigError, match="backward on CPU"):
        att.attend_flex(q, k, v, core.Ctx(x0=torch.zeros(1, 64, 1)))


def test_sparse_model_is_causal_and_records_masked_probabilities():
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


# ---- head metrics on hand-made attention

def test_metrics_on_hand_made_attention():
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


def test_metrics_threshold_and_renormalisation():
    """Entries below 1e-4 count as sparse; rows are renormalised (a scaled matrix gives the same numbers)."""
    p = torch.tensor([[1.0, 0.0], [0.99995, 0.00005]])
    m = sb.head_metrics(p[None, None])[0, 0]
    assert m[1].item() == pytest.approx(0.5)  # 0.0 and 5e-5 are sparse
    torch.testing.assert_close(sb.head_metrics(3 * p[None, None]), sb.head_metrics(p[None, None]))


def test_extracted_metrics_are_means_over_windows(tmp_path):
    data = tmp_path / "d"
    make_bytes_dataset(data, 3000)
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


# ---- clustering

def test_standardize_matches_population_zscore():
    X = np.array([[1.0, 5.0, 2.0], [3.0, 5.0, 4.0], [5.0, 5.0, 9.0]])
    Z = sb.standardize(X)
    np.testing.assert_allclose(Z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(Z[:, [0, 2]].std(0), 1)
    assert (Z[:, 1] == 0).all()


def test_kmeans_recovers_planted_clusters():
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


def test_silhouette_matches_direct_computation():
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


# ---- command line

def make_bytes_dataset(path, n_val, n_test=0):
    text = open(os.path.join(HERE, "assets", "python_tutorial.txt"), "rb").read()
    os.makedirs(path, exist_ok=True)
    splits = {"train": text[:-(n_val + n_test)], "val": text[-(n_val + n_test):len(text) - n_test]}
    if n_test:
        splits["test"] = text[-n_test:]
    for s, b in splits.items():
        np.frombuffer(b, np.uint8).tofile(os.path.join(path, f"{s}.bin"))
    json.dump(dict(tokenizer="bytes", vocab_size=256, dtype="uint8", eot_token=None,
                   splits={s: dict(tokens=len(b), bytes=len(b)) for s, b in splits.items()}),
              open(os.path.join(path, "meta.json"), "w"))


def test_thesis_knobs_map_onto_core(tmp_path):
    make_bytes_dataset(tmp_path / "d", 5000)
    n = core.TokenData(str(tmp_path / "d")).tokens("train")
    cfg = sb.SparseByteConfig(data=str(tmp_path / "d"), seq_length=128, batch_size=4, grad_accum=2, num_epochs=3)
    assert cfg.block_size == 128 and cfg.max_iters == 3 * ((n - 1) // (4 * 128)) // 2
    assert cfg.seq_length == 0 and cfg.num_epochs == 0  # consumed: a saved config does not re-map
    thesis = sb.SparseByteConfig(**sb.SparseByteConfig.PRESETS["thesis"])
    assert (thesis.n_layer, thesis.n_head, thesis.n_embd, thesis.hidden, thesis.block_size) == (12, 8, 512, 2048, 1024)


def test_cli_train_eval_metrics_cluster(tmp_path, capsys):
    data = str(tmp_path / "d")
    make_bytes_dataset(data, 6000, 3000)
    common = ["--preset", "tiny", "--data", data, "--n-head", "8", "--n-embd", "64", "--max-iters", "30",
              "--eval-interval", "30", "--lr", "3e-3", "--metric-seqs", "4"]
    for variant in ("dense", "sparse"):
        out = str(tmp_path / variant)
        assert sb.main(["--train", "--variant", variant, "--out", out, *common]) == 0
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        assert log[-1]["loss"] < log[0]["loss"] - 0.5  # learns bytes
        assert sb.main(["--eval", "--out", out, "--data", data]) == 0
        text = capsys.readouterr().out
        assert "val" in text and "test" in text
        assert sb.main(["--metrics", "--out", out, "--data", data, "--metric-seqs", "4"]) == 0
        rows = list(csv.reader(open(os.path.join(out, "head_metrics.csv"))))
        assert rows[0] == ["layer", "head", "entropy", "sparsity", "distance"] and len(rows) == 1 + 2 * 8
    sp = {(int(r["layer"]), int(r["head"])): float(r["sparsity"])
          for r in csv.DictReader(open(tmp_path / "sparse" / "head_metrics.csv"))}
    assert sp[(0, 0)] > 1 - 9 / 64  # a focused-local head attends at most 9 keys per row
    res = str(tmp_path / "heads")
    assert sb.main(["--cluster", "--runs", str(tmp_path / "dense"), str(tmp_path / "sparse"), "--out", res,
                    "--cluster-k-max", "5"]) == 0
    for f in ("silhouette_k.png", "silhouette_samples.png", "head_clusters.png", "clusters.csv", "silhouette.json"):
        assert os.path.getsize(os.path.join(res, f)) > 0
    clusters = list(csv.DictReader(open(os.path.join(res, "clusters.csv"))))
    assert {r["variant"] for r in clusters} == {"dense", "sparse"} and len(clusters) == 32
    assert set(json.load(open(os.path.join(res, "silhouette.json")))["silhouette"]) == {"2", "3", "4", "5"}


@pytest.mark.parametrize("argv, message", [
    (["--train", "--variant", "sparse", "--attn-impl", "sdpa"], "sparse variant runs"),
    (["--train", "--mask-subset", "05"], "--mask-subset"),
    (["--train", "--variant", "banded"], "--variant must be"),
    (["--metrics", "--out", "/nonexistent/run"], "checkpoint not found"),
    (["--cluster", "--runs", "/nonexistent/run"], "no head metrics"),
])
def test_cli_mistakes_give_one_line(argv, message, capsys):
    assert sb.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_kernel_bench_needs_a_gpu(capsys):
    assert sb.main(["--kernel-bench", "--device", "cpu"]) == 2
    assert "CUDA" in capsys.readouterr().err


# ---- GPU

@cuda
@pytest.mark.parametrize("T", [300, 1024])
def test_compiled_flex_matches_eager_on_gpu(T):
    att = attention("0123", "flex", T=T, D=64).cuda()
    res = []
    for fn in (att.attend_eager, att.attend_flex):
        q, k, v = (t.detach().cuda().requires_grad_() for t in qkv(2, 8, T, 64))
        y = fn(q, k, v, core.Ctx(x0=torch.zeros(2, T, 1, device="cuda")))
        y.pow(2).sum().backward()
        res.append((y, q.grad, k.grad, v.grad))
    for a, b in zip(res[1], res[0]):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


@cuda
def test_kernel_bench_runs_on_gpu():
    r = sb.bench_attention(1024, sb.head_clusters(8), 64, 4, torch.device("cuda"))
    assert 0.4 < r["block_density"] < 0.5 and r["sparse_ms"] > 0 and r["dense_sdpa_ms"] > 0
