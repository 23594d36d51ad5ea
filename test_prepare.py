"""prepare.py against a real HTTP server on 127.0.0.1 (Range support, dropped connections, 404s) serving small files
in each source's real format: an enwik8-style zip, llm.c shards, an OpenWebText tar.xz of tar.xz subsets."""
import hashlib
import http.server
import io
import json
import lzma
import math
import os
import socket
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent
for _p in (ROOT.parent / "shared" / "data" / "gpt2.tiktoken", ROOT / ".cache" / "shared" / "gpt2.tiktoken"):
    if "ATTNLAB_TIKTOKEN" not in os.environ and _p.exists():
        os.environ["ATTNLAB_TIKTOKEN"] = str(_p)

import core  # noqa: E402
import prepare  # noqa: E402

DOCS_VAL = ROOT.parent / "shared" / "data" / "docs_val.txt.xz"


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files` with Range support (unless `ranges` is off); `cut[path] = n` drops the connection after n body
    bytes, once; `seen` lists (path, Range header) of each request."""
    files, headers_for, cut, seen, ranges = {}, {}, {}, [], True

    def do_GET(self):
        self.seen.append((self.path, self.headers.get("Range")))
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
    for d in (Handler.files, Handler.headers_for, Handler.cut):
        d.clear()
    Handler.seen.clear()
    Handler.ranges = True


def gpt2():
    return core.get_tokenizer("gpt2")


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


# ----------------------------------------------------------------------------- text

def test_text_plain_and_xz_with_val(tmp_path):
    a, b, v = "Hello world.\nSecond line here.\n", "Ünïcode text\n\nwith a blank line.", "Validation text.\n"
    (tmp_path / "a.txt").write_text(a)
    with lzma.open(tmp_path / "b.txt.xz", "wt") as f:
        f.write(b)
    (tmp_path / "v.txt").write_text(v)
    out = tmp_path / "out"
    argv = ["text", "--input", tmp_path / "a.txt", tmp_path / "b.txt.xz", "--val", tmp_path / "v.txt",
            "--tokenizer", "gpt2", "--out", out, "--workers", "1"]
    assert prepare.main(list(map(str, argv))) == 0
    tok, eot = gpt2(), 50256
    train = np.fromfile(out / "train.bin", np.uint16).tolist()
    assert train == tok.encode(a) + [eot] + tok.encode(b) + [eot]   # one EOT after each input file
    assert np.fromfile(out / "val.bin", np.uint16).tolist() == tok.encode(v) + [eot]
    m = meta(out)
    assert {k: m[k] for k in ("tokenizer", "vocab_size", "dtype", "eot_token")} == GPT2_META
    assert m["splits"] == {"train": {"tokens": len(train), "bytes": len((a + b).encode())},
                           "val": {"tokens": len(tok.encode(v)) + 1, "bytes": len(v.encode())}}
    assert core.get_tokenizer("gpt2").decode(train[:3]) == "Hello world."
    data = core.TokenData(str(out))   # core's loader reads it
    assert data.tokens("train") == len(train) and data.vocab_size == 50257


GPT2_META = {"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", "eot_token": 50256}


def test_text_bytes_holds_out_last_5_percent(tmp_path, capsys):
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


@pytest.mark.skipif(not DOCS_VAL.exists(), reason="needs ../shared/data/docs_val.txt.xz")
def test_text_parallel_pieces_give_the_same_tokens(tmp_path, monkeypatch):
    """Real prose cut into ~20 kB pieces and tokenized by 2 processes equals one serial encode."""
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 20_000)
    out = tmp_path / "out"
    argv = ["text", "--input", str(DOCS_VAL), "--val", str(DOCS_VAL), "--out", str(out), "--workers", "2"]
    assert prepare.main(argv) == 0
    text = lzma.open(DOCS_VAL, "rt").read()
    assert len(list(prepare.pieces(text, 20_000))) > 50
    assert np.fromfile(out / "val.bin", np.uint16).tolist() == gpt2().encode(text) + [50256]


# ----------------------------------------------------------------------------- enwik8

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


def test_enwik8_dropped_connection_resumes_and_second_run_does_nothing(tmp_path, enwik8, capsys):
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
def test_enwik8_resumes_a_part_file_left_by_an_earlier_run(tmp_path, enwik8, ranges):
    """A server without Range support answers 200 with the whole file: the download starts over."""
    raw, blob = enwik8
    Handler.ranges = ranges
    out = tmp_path / "enwik8"
    (out / "download").mkdir(parents=True)
    (out / "download" / "enwik8.zip.part").write_bytes(blob[:1000])
    assert prepare.main(["enwik8", "--out", str(out)]) == 0
    assert Handler.seen == [("/enwik8/enwik8.zip", "bytes=1000-")]
    assert (out / "download" / "enwik8.zip").read_bytes() == blob


def test_enwik8_corrupt_download_is_rejected_and_removed(tmp_path, enwik8, capsys):
    raw, blob = enwik8
    Handler.files["/enwik8/enwik8.zip"] = blob[:100] + bytes([blob[100] ^ 1]) + blob[101:]
    out = tmp_path / "enwik8"
    assert prepare.main(["enwik8", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sha256" in err and "corrupt" in err
    assert looks_valid(out) == [] and not list(out.rglob("*.part"))


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path, enwik8, monkeypatch, capsys):
    monkeypatch.setattr(prepare.shutil, "disk_usage", lambda path: SimpleNamespace(total=100, used=90, free=10))
    out = tmp_path / "enwik8"
    assert prepare.main(["enwik8", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "free" in err
    assert looks_valid(out) == []


# ----------------------------------------------------------------------------- fineweb-edu10b

def shard(ids):
    header = np.zeros(256, np.int32)
    header[:3] = 20240520, 1, len(ids)
    return header.tobytes() + np.array(ids, np.uint16).tobytes()


def test_fineweb_shards_download_and_loader(tmp_path, server, capsys):
    rng = np.random.default_rng(0)
    shards = {f"finewebedu_val_{0:06d}.bin": rng.integers(0, 50257, 300),
              f"finewebedu_train_{1:06d}.bin": rng.integers(0, 50257, 500),
              f"finewebedu_train_{2:06d}.bin": rng.integers(0, 50257, 400)}
    for name, ids in shards.items():
        Handler.files[f"/fw/{name}"] = shard(ids)
        Handler.headers_for[f"/fw/{name}"] = {"X-Linked-ETag": f'"{hashlib.sha256(shard(ids)).hexdigest()}"'}
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


def test_fineweb_corrupt_shards_are_rejected(tmp_path, server, capsys):
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


def test_fineweb_from_parquet_without_pyarrow_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert prepare.main(["fineweb-edu10b", "--from-parquet", "--out", str(tmp_path / "fw")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install pyarrow" in err


def test_fineweb_from_parquet_tokenizes_like_llmc(tmp_path, server, monkeypatch):
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
    tok = gpt2()
    stream = [i for t in texts[0] + texts[1] for i in [50256] + tok.encode(t)]   # EOT before each document
    assert len(stream) > 600
    assert (out / "finewebedu_val_000000.bin").read_bytes() == shard(stream[:150])
    assert (out / "finewebedu_train_000002.bin").read_bytes() == shard(stream[300:450])
    assert not (out / "finewebedu_train_000003.bin").exists()   # --shards 2
    assert meta(out)["splits"]["train"]["tokens"] == 300


# ----------------------------------------------------------------------------- openwebtext

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


def test_openwebtext_download_tokenize_split(tmp_path, server, monkeypatch, capsys):
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
    tok = gpt2()
    perm = np.random.default_rng(2357).permutation(len(texts))
    n_val = math.ceil(0.2 * len(texts))
    for split, docs in (("val", perm[:n_val]), ("train", perm[n_val:])):
        expect = [i for d in docs for i in tok.encode(texts[d]) + [50256]]
        assert np.fromfile(out / f"{split}.bin", np.uint16).tolist() == expect
        assert meta(out)["splits"][split] == {"tokens": len(expect),
                                              "bytes": sum(len(texts[d].encode()) for d in docs)}
    assert not (out / "tokens.tmp").exists() and not (out / "index.tmp").exists()
    assert core.TokenData(str(out)).tokens("val") == meta(out)["splits"]["val"]["tokens"]


# ----------------------------------------------------------------------------- errors from the CLI

def test_http_404_is_one_line(tmp_path, server):
    code, out, err = run("enwik8", "--out", tmp_path / "e", "--base-url", f"{server}/nowhere")
    assert code == 1 and err.count("\n") == 1 and "HTTP 404" in err and "nowhere/enwik8.zip" in err
    assert looks_valid(tmp_path / "e") == []


def test_refused_connection_is_one_line(tmp_path):
    with socket.socket() as s:   # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run("fineweb-edu10b", "--out", tmp_path / "f", "--base-url", f"http://127.0.0.1:{port}")
    assert code == 1 and err.count("\n") == 1 and "Connection refused" in err


def test_wrong_out_is_one_line(tmp_path, server, capsys):
    (tmp_path / "file").write_text("x")
    assert prepare.main(["enwik8", "--out", str(tmp_path / "file")]) == 1
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "meta.json").write_text(json.dumps({"source": {"name": "openwebtext"}}))
    assert prepare.main(["enwik8", "--out", str(tmp_path / "other")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another dataset (openwebtext)" in err
