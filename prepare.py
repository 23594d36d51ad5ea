"""Prepare token datasets for attnlab: local text files, and the three corpora the papers train on.

  python prepare.py text --input A.txt[.xz] [B.txt ...] [--val V.txt[.xz] ...] --tokenizer gpt2|bytes --out data/NAME
  python prepare.py enwik8         [--out data/enwik8]                # sparse byte transformer
  python prepare.py openwebtext    [--out data/openwebtext]           # attention biases, reflex
  python prepare.py fineweb-edu10b [--out data/fineweb-edu10b] [--shards K] [--from-parquet]   # ExoFormer

Output (core's loader reads it): `<split>.bin` (uint16 GPT-2 ids / uint8 bytes) or llm.c shards `*<split>_NNNNNN.bin`
(256 int32 header: magic 20240520, version 1, token count; then uint16 tokens), and meta.json {tokenizer, vocab_size,
dtype, eot_token, splits: {split: {tokens, bytes}}, source}; bytes = UTF-8 bytes of the text (for bits per byte),
null for the FineWeb-Edu shards, whose text we never see.
- text: each input file is one document, read as UTF-8 with universal newlines (CRLF and CR become LF; bytes counts
  the text so read), GPT-2 appends EOT after each (bytes has none). Without --val the last 5% of the characters, cut at
  a line start, become val.
- enwik8: mattmahoney.net's enwik8.zip (sha256 checked); bytes [0, 90M) train, [90M, 95M) val, [95M, 100M) test.
- openwebtext: the corpus' own archive on Zenodo (12.9 GB, the file HF's `openwebtext` loader reads, sha256 checked),
  documents cleaned and ordered as that loader does, GPT-2 tokens with EOT after each; nanoGPT's split
  (HF train_test_split(test_size=0.0005, seed=2357)): numpy default_rng(2357).permutation of the documents, the first
  ceil(0.0005 N) to val, the rest to train, both in permuted order.
- fineweb-edu10b: modded-nanogpt's GPT-2 shards of HuggingFaceFW/fineweb-edu sample-10BT (kjj0/finewebedu10B-gpt2:
  val shard 0, then 99 train shards of 100M tokens); --from-parquet tokenizes the sample's parquet files as llm.c's
  fineweb.py does (EOT before each document, 100M-token shards, the first is val; needs pyarrow).
Downloads stream into FILE.part, resume by HTTP Range (within a run too when a connection drops), are checked against
the published sha256 (or Hugging Face's X-Linked-ETag, or the shard header) and only then renamed. meta.json is
written last: a re-run of a finished command says so and stops; an interrupted one continues where it stopped.
--base-url URL fetches each file from URL/FILE; env ATTNLAB_MIRROR=URL fetches from URL/<command>/FILE.
"""
import argparse
import contextlib
import errno
import hashlib
import io
import json
import lzma
import math
import multiprocessing as mp
import os
import re
import shutil
import signal
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import requests

import core

GPT2 = dict(tokenizer="gpt2", vocab_size=50257, dtype="uint16", eot_token=50256)
BYTES = dict(tokenizer="bytes", vocab_size=256, dtype="uint8", eot_token=None)
ENWIK8 = dict(url="http://mattmahoney.net/dc", file="enwik8.zip", size=100_000_000,
              sha256="547994d9980ebed1288380d652999f38a14fe291a6247c157c3d33d4932534bc")
OPENWEBTEXT = dict(url="https://zenodo.org/record/3834942/files", file="openwebtext.tar.xz", val_frac=0.0005,
                   seed=2357, sha256="9fe39d154c5bc67da8c359415372b79510eb1e2edb0d035fe4f7fc3a732b9336")
FINEWEB = dict(url="https://huggingface.co/datasets/kjj0/finewebedu10B-gpt2/resolve/main", prefix="finewebedu",
               shards=99, shard_tokens=100_000_000, parquet_files=14,
               parquet_url="https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/sample/10BT")
CHUNK_CHARS = 1 << 20   # text is tokenized in pieces of about this many characters, one per process task
RETRIES, TIMEOUT = 5, 60
FLAKY = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)   # worth a retry
# GPT-2's pre-tokenizer regex never puts a newline and a following non-space in one piece, nor (at the end of a
# piece) a newline and the non-space before it: cutting the text after such a newline leaves the tokens unchanged.
SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


class PrepareError(core.ConfigError):
    """A failure the user can act on: main (here or core's) prints it as one line and exits non-zero."""


class Progress:
    """done / total, rate and ETA on one stdout line: redrawn in place on a terminal, every 10 s otherwise."""

    def __init__(self, label, total=None, unit="B", done=0):
        self.label, self.total, self.unit, self.done, self.start = label, total, unit, done, done
        self.t0 = self.shown = time.time()
        self.tty = sys.stdout.isatty()

    def update(self, n):
        self.done += n
        if time.time() - self.shown >= (0.5 if self.tty else 10):
            self.show()

    def show(self, final=False):
        self.shown = time.time()
        rate = (self.done - self.start) / max(self.shown - self.t0, 1e-6)
        msg = f"{self.label}: {_fmt(self.done, self.unit)}"
        if self.total:
            msg += f" / {_fmt(self.total, self.unit)} ({100 * self.done / self.total:.0f}%)"
        msg += f", {_fmt(rate, self.unit)}/s"
        if self.total and rate > 0 and not final:
            msg += f", ETA {core.fmt_time((self.total - self.done) / rate)}"
        print("\r" + msg.ljust(79) if self.tty else msg, end="\n" if final or not self.tty else "", flush=True)


def _fmt(n, unit):
    for prefix in ("", "k", "M", "G", "T"):
        if abs(n) < 1000 or prefix == "T":
            return f"{n:.1f} {prefix}{unit}"
        n /= 1000


# ----------------------------------------------------------------------------- downloads

def mirror(args, default):
    """--base-url beats env ATTNLAB_MIRROR (URL/<command>) beats the source's own address."""
    env = os.environ.get("ATTNLAB_MIRROR", "").rstrip("/")
    return args.base_url.rstrip("/") if args.base_url else f"{env}/{args.cmd}" if env else default


def download(url, dest, sha256=None, check=None):
    """Fetch url into dest through dest.part: resumed from its current size, retried while a dropped connection
    still made progress, verified (sha256 given or advertised by the server, then check(path)), then renamed."""
    if dest.exists():   # whole and verified when it was renamed; check() is cheap, so a file copied in is checked too
        if check:
            try:
                check(dest)
            except PrepareError as e:
                raise PrepareError(f"{e}; delete it and run the same command again") from None
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(RETRIES + 1):
        have = part.stat().st_size if part.exists() else 0
        try:
            total, advertised = _get(url, part, have)
            break
        except requests.RequestException as e:
            got = part.stat().st_size if part.exists() else 0
            flaky = isinstance(e, FLAKY)
            if not flaky or got == have or attempt == RETRIES:   # no progress: report it
                raise PrepareError(f"{url}: {_why(e)}" + ("; run the same command again" if flaky else "")) from None
            print(f"connection lost after {_fmt(got, 'B')} of {dest.name}; resuming", flush=True)
            time.sleep(attempt)
    size = part.stat().st_size
    if total is not None and size < total:
        raise PrepareError(f"{dest.name}: got {size:,} of {total:,} bytes; run the same command again to resume")
    try:
        digest = sha256 or advertised
        if total is not None and size > total:
            raise PrepareError(f"{dest.name}: {size:,} bytes, larger than the server's {total:,}")
        if digest:
            print(f"checking sha256 of {dest.name}", flush=True)
            h = hashlib.sha256()
            with open(part, "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            if h.hexdigest() != digest:
                raise PrepareError(f"{dest.name}: sha256 differs from the published {digest[:12]}..., corrupt")
        if check:
            check(part)
    except PrepareError as e:
        part.unlink()
        raise PrepareError(f"{e}; deleted it, run the same command again to download it anew") from None
    part.rename(dest)


def _why(e):
    """A requests error in a few words, e.g. "HTTP 404 Not Found" or "Connection refused"."""
    if isinstance(e, requests.HTTPError):
        return f"HTTP {e.response.status_code} {e.response.reason}"
    m = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(e))
    if m or isinstance(e, requests.Timeout):
        return m.group(1) if m else "timed out"
    return "connection broken" if isinstance(e, requests.exceptions.ChunkedEncodingError) else str(e)


def _get(url, part, have):
    """One GET from byte `have` on, appended to part. Returns (full size or None, sha256 the server advertises)."""
    headers = {"Accept-Encoding": "identity", **({"Range": f"bytes={have}-"} if have else {})}
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT) as r:
        # Hugging Face sends the LFS sha256 of a file as X-Linked-ETag (on the redirect to its CDN).
        etags = [h.headers.get("X-Linked-ETag", "").strip('"') for h in (*r.history, r)]
        advertised = next((e for e in etags if re.fullmatch(r"[0-9a-f]{64}", e)), None)
        if r.status_code == 416:   # nothing past `have`: the part file is already whole
            return int(r.headers.get("Content-Range", f"*/{have}").split("/")[-1]), advertised
        r.raise_for_status()
        if r.status_code != 206:   # the server ignored the range: start over
            have = 0
        total = have + int(r.headers["Content-Length"]) if "Content-Length" in r.headers else None
        free = shutil.disk_usage(part.parent).free
        if total is not None and total - have > free:
            raise PrepareError(f"{part.parent}: {_fmt(total - have, 'B')} to download but {_fmt(free, 'B')} free")
        bar = Progress(f"download {part.name[:-5]}", total, done=have)
        try:
            with open(part, "ab" if have else "wb") as f:
                for chunk in r.iter_content(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
        finally:
            bar.show(final=True)
    return total, advertised


# ----------------------------------------------------------------------------- tokenizing in parallel

_TOK = None   # each worker process's tokenizer


def _init(name, worker=False):
    global _TOK
    if worker:   # Ctrl-C is handled once, by the main process
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _TOK = core.get_tokenizer(name)


def imap(fn, items, workers, tokenizer):
    """fn(item) for each item, in order, in `workers` processes that each hold the tokenizer; at most 2 * workers
    items in flight, so a huge input is never read ahead into memory."""
    _init(tokenizer)   # here first: a missing tokenizer fails in this process with a clear line, not in a worker
    if workers <= 1:
        yield from map(fn, items)
        return
    with mp.Pool(workers, _init, (tokenizer, True)) as pool:
        pending = []
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.pop(0).get()
        while pending:
            yield pending.pop(0).get()


def _encode_text(text):
    return np.array(_TOK.encode(text), np.uint8 if _TOK.n_vocab <= 256 else np.uint16)


def _encode_docs(texts):
    """llm.c's fineweb.py convention: EOT before each document."""
    ids = []
    for text in texts:
        ids.append(_TOK.eot_token)
        ids.extend(_TOK.encode(text))
    return np.array(ids, np.uint16)


def pieces(text, size):
    """Cut text into pieces of about `size` characters at SAFE_CUT newlines (GPT-2 tokens unchanged)."""
    i = 0
    while i < len(text):
        m = SAFE_CUT.search(text, i + size)
        j = m.end() if m else len(text)
        yield text[i:j]
        i = j


# ----------------------------------------------------------------------------- output folder and meta.json

def open_out(out, source):
    """Create --out; refuse a file or a folder holding another dataset. True when this dataset is already done."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a folder")
    if (out / "meta.json").exists():
        old = {}
        with contextlib.suppress(ValueError, LookupError, TypeError):
            old = json.loads((out / "meta.json").read_text())["source"]
        if old == source:
            print(f"{out} already holds the prepared {source['name']} dataset (meta.json): nothing to do")
            return True
        # another dataset, other input files or another tokenizer: refused (runs trained on it need it as it is);
        # the same inputs changed on disk, or more fineweb shards, are prepared again
        paths = lambda src: {s: [f[0] for f in fs] for s, fs in (src.get("files") or {}).items()}
        if [old.get(k) for k in ("name", "tokenizer")] != [source.get(k) for k in ("name", "tokenizer")] or \
                paths(old) != paths(source):
            files = [os.path.basename(p) for ps in paths(old).values() for p in ps]
            what = ", ".join(filter(None, [old.get("name", "unknown"), " ".join(files), old.get("tokenizer")]))
            raise PrepareError(f"--out {out} already holds another dataset ({what}); choose another folder (or "
                               "delete this one)")
        # prepared again: until the new files are whole the folder is no dataset (shards stay: a download skips them)
        for name in ("meta.json", "train.bin", "val.bin", "test.bin"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return False


def write_meta(out, vocab, splits, source):
    """meta.json, written last: its presence marks a finished dataset."""
    with core.atomic(out / "meta.json") as f:
        f.write(json.dumps({**vocab, "splits": splits, "source": source}, indent=1).encode())
    print(f"wrote {out}: " + ", ".join(f"{s} {v['tokens']:,} tokens" for s, v in splits.items()))


# ----------------------------------------------------------------------------- text

def read_text(path):
    try:
        with (lzma.open if path.suffix == ".xz" else open)(path, "rt", encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise PrepareError(f"{path} is not UTF-8 text") from None
    except (lzma.LZMAError, EOFError) as e:  # a truncated .xz ends in EOFError
        raise PrepareError(f"{path}: corrupt or truncated xz file ({e or type(e).__name__})") from None


def holdout(docs, frac):
    """Split docs so the last `frac` of all characters go to val, cut at a line start inside the document at the cut."""
    total = sum(map(len, docs))
    cut, seen, train, val = total - int(total * frac), 0, [], []
    for d in docs:
        if seen + len(d) <= cut:
            train.append(d)
        elif seen >= cut:
            val.append(d)
        else:
            i = d.find("\n", cut - seen) + 1
            if not 0 < i < len(d):   # no line start after the cut point: cut mid-line
                i = cut - seen
            train.append(d[:i])
            val.append(d[i:])
        seen += len(d)
    return train, val


def encode_docs(docs, tok, workers, dtype, label):
    """Token ids of docs with EOT (if the tokenizer has one) after each; documents are cut into pieces that are
    tokenized in parallel."""
    chunks, ends = [], set()
    for d in docs:
        chunks += list(pieces(d, CHUNK_CHARS)) or [""]
        ends.add(len(chunks) - 1)
    eot = np.array([] if tok.eot_token is None else [tok.eot_token], dtype)
    bar, parts = Progress(label, sum(map(len, chunks)), unit="char"), [np.array([], dtype)]
    for i, ids in enumerate(imap(_encode_text, chunks, min(workers, len(chunks)), tok.name)):
        parts += [ids, eot] if i in ends else [ids]
        bar.update(len(chunks[i]))
    bar.show(final=True)
    return np.concatenate(parts)


def prepare_text(inputs, out, tokenizer="gpt2", val=(), workers=None):
    """Tokenize local text files into out/train.bin, val.bin and meta.json: the `text` command (assets/tutorial, the
    embedded dataset, was made by it with --tokenizer bytes)."""
    files, out = {"train": [Path(p) for p in inputs], "val": [Path(p) for p in val]}, Path(out)
    for p in files["train"] + files["val"]:
        if not p.is_file():
            raise PrepareError(f"{p}: no such file")
    stamp = {s: [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in ps] for s, ps in files.items()}
    source = {"name": "text", "tokenizer": tokenizer, "files": stamp}
    if open_out(out, source):
        return
    tok = core.get_tokenizer(tokenizer)
    docs = {s: [read_text(p) for p in ps] for s, ps in files.items()}
    if not val:
        docs["train"], docs["val"] = holdout(docs["train"], 0.05)
    dtype = "uint8" if tok.n_vocab <= 256 else "uint16"
    empty = [split for split, ds in docs.items() if not any(ds)]
    if empty:  # before any file is written
        raise PrepareError(f"the {empty[0]} split is empty: give more text (or --val)")
    splits = {}
    for split, ds in docs.items():
        ids = encode_docs(ds, tok, workers or os.cpu_count(), np.dtype(dtype), f"tokenize {split}")
        with core.atomic(out / f"{split}.bin") as f:
            f.write(ids.tobytes())
        splits[split] = {"tokens": len(ids), "bytes": sum(len(d.encode()) for d in ds)}
    write_meta(out, dict(tokenizer=tokenizer, vocab_size=tok.n_vocab, dtype=dtype, eot_token=tok.eot_token), splits,
               source)


def cmd_text(args):
    prepare_text(args.input, args.out, args.tokenizer, args.val, args.workers)


# ----------------------------------------------------------------------------- enwik8

def cmd_enwik8(args):
    source = {"name": "enwik8"}
    if open_out(args.out, source):
        return
    path = args.out / "download" / ENWIK8["file"]

    def check(part):   # zipfile verifies each member's CRC-32 as it reads it
        try:
            with zipfile.ZipFile(part) as z:
                n = len(z.read("enwik8"))
        except (zipfile.BadZipFile, KeyError, EOFError, zlib.error) as e:
            raise PrepareError(f"{part.name[:-5]}: corrupt zip archive ({e})") from None
        if n != ENWIK8["size"]:
            raise PrepareError(f"{part.name[:-5]}: enwik8 holds {n:,} bytes, expected {ENWIK8['size']:,}")

    download(f"{mirror(args, ENWIK8['url'])}/{ENWIK8['file']}", path, ENWIK8["sha256"], check)
    with zipfile.ZipFile(path) as z:
        data = z.read("enwik8")
    a, b = len(data) * 90 // 100, len(data) * 95 // 100   # 90M / 5M / 5M, the standard enwik8 split
    splits = {}
    for split, chunk in (("train", data[:a]), ("val", data[a:b]), ("test", data[b:])):
        with core.atomic(args.out / f"{split}.bin") as f:
            f.write(chunk)
        splits[split] = {"tokens": len(chunk), "bytes": len(chunk)}
    write_meta(args.out, BYTES, splits, source)


# ----------------------------------------------------------------------------- openwebtext

def _encode_subset(item):
    """One OpenWebText subset (a tar.xz of .txt documents) as HF's loader reads it: documents sorted by file name,
    read as UTF-8 text (universal newlines), runs of 3+ newlines squeezed to 2, stripped. nanoGPT appends EOT."""
    name, blob = item
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:xz") as tar:
            members = sorted((m for m in tar if m.isfile() and m.name.endswith(".txt")), key=lambda m: m.name)
            texts = [re.sub("\n\n\n+", "\n\n", io.TextIOWrapper(tar.extractfile(m), encoding="utf-8").read()).strip()
                     for m in members]
    except (tarfile.TarError, lzma.LZMAError, EOFError, UnicodeDecodeError) as e:
        raise PrepareError(f"{name}: corrupt subset archive ({e})") from None
    ids = [_TOK.encode(t) + [_TOK.eot_token] for t in texts]
    flat = np.array([i for d in ids for i in d], np.uint16)
    return name, len(blob), flat, [len(d) for d in ids], [len(t.encode()) for t in texts]


def owt_subsets(archive, skip):
    """(name, bytes) of each subset archive inside openwebtext.tar.xz, in archive order, except those in skip."""
    try:
        with tarfile.open(archive, "r|xz") as tar:
            for m in tar:
                if m.isfile() and m.name.endswith(".xz") and m.name not in skip:
                    yield m.name, tar.extractfile(m).read()
    except (tarfile.TarError, lzma.LZMAError, EOFError) as e:
        raise PrepareError(f"{archive}: corrupt archive ({e}); delete it and run again") from None


def tokenize_openwebtext(archive, out, workers):
    """All documents' tokens into tokens.tmp, and one JSON line per subset (name, size, token and byte length of
    each document) into index.tmp. A re-run keeps the subsets already recorded and tokenizes the rest."""
    tokens, index = out / "tokens.tmp", out / "index.tmp"
    done = []
    for line in index.read_text().splitlines() if index.exists() else []:
        with contextlib.suppress(ValueError):   # a line cut short by a crash
            done.append(json.loads(line))
    kept = 2 * sum(sum(r["tokens"]) for r in done)
    if not tokens.exists() or tokens.stat().st_size < kept:
        done, kept = [], 0
    with core.atomic(index) as f:
        f.write("".join(json.dumps(r) + "\n" for r in done).encode())
    bar = Progress("tokenize openwebtext", archive.stat().st_size, done=sum(r["size"] for r in done))
    with open(tokens, "ab") as ft, open(index, "a") as fi:
        ft.truncate(kept)   # drop tokens written after the last recorded subset
        subsets = owt_subsets(archive, {r["name"] for r in done})
        for name, size, ids, n_tokens, n_bytes in imap(_encode_subset, subsets, workers, "gpt2"):
            ft.write(ids.tobytes())
            ft.flush()
            fi.write(json.dumps({"name": name, "size": size, "tokens": n_tokens, "bytes": n_bytes}) + "\n")
            fi.flush()
            bar.update(size)
    bar.show(final=True)
    records = [json.loads(line) for line in index.read_text().splitlines()]
    if not any(r["tokens"] for r in records):
        raise PrepareError(f"{archive}: no documents found in it")
    return records


def split_openwebtext(out, records):
    """nanoGPT's split over documents in HF order (subsets sorted by name): default_rng(seed).permutation, the
    first ceil(frac * N) to val, the rest to train, each written in permuted order."""
    starts = np.cumsum([0] + [sum(r["tokens"]) for r in records])   # where each subset sits in tokens.tmp
    order = sorted(range(len(records)), key=lambda i: records[i]["name"])
    n_tok = np.concatenate([np.array(records[i]["tokens"], np.int64) for i in order])
    n_bytes = np.concatenate([np.array(records[i]["bytes"], np.int64) for i in order])
    first = np.concatenate([starts[i] + np.cumsum([0] + records[i]["tokens"])[:-1] for i in order])
    perm = np.random.default_rng(OPENWEBTEXT["seed"]).permutation(len(n_tok))
    n_val = math.ceil(OPENWEBTEXT["val_frac"] * len(n_tok))
    data, splits = np.memmap(out / "tokens.tmp", np.uint16, "r"), {}
    for split, docs in (("val", perm[:n_val]), ("train", perm[n_val:])):
        bar = Progress(f"write {split}.bin", len(docs), unit="doc")
        with core.atomic(out / f"{split}.bin") as f:
            for d in docs:
                f.write(data[first[d]:first[d] + n_tok[d]])
                bar.update(1)
        bar.show(final=True)
        splits[split] = {"tokens": int(n_tok[docs].sum()), "bytes": int(n_bytes[docs].sum())}
    return splits


def cmd_openwebtext(args):
    source = {"name": "openwebtext"}
    if open_out(args.out, source):
        return
    archive = args.out / "download" / OPENWEBTEXT["file"]
    download(f"{mirror(args, OPENWEBTEXT['url'])}/{OPENWEBTEXT['file']}", archive, OPENWEBTEXT["sha256"])
    splits = split_openwebtext(args.out, tokenize_openwebtext(archive, args.out, args.workers))
    write_meta(args.out, GPT2, splits, source)
    for tmp in ("tokens.tmp", "index.tmp"):
        (args.out / tmp).unlink()


# ----------------------------------------------------------------------------- fineweb-edu10b

def check_shard(path):
    """An llm.c shard: magic, version, and a size that matches the token count in its header."""
    header = np.fromfile(path, np.int32, core.SHARD_HEADER)
    if len(header) < core.SHARD_HEADER or header[0] != core.SHARD_MAGIC or header[1] != core.SHARD_VERSION \
            or path.stat().st_size != 4 * core.SHARD_HEADER + 2 * int(header[2]):
        raise PrepareError(f"{path.name.removesuffix('.part')}: not a whole llm.c shard (bad header or size)")


def write_shard(out, index, ids):
    header = np.zeros(core.SHARD_HEADER, np.int32)
    header[:3] = core.SHARD_MAGIC, core.SHARD_VERSION, len(ids)
    with core.atomic(out / f"{FINEWEB['prefix']}_{'val' if index == 0 else 'train'}_{index:06d}.bin") as f:
        f.write(header.tobytes())
        f.write(ids.tobytes())


def write_shards(token_arrays, out, max_train):
    """Pack a stream of token arrays into shards of FINEWEB['shard_tokens']: shard 0 is val, then at most max_train
    train shards; the last partial shard is kept, as llm.c does."""
    size = FINEWEB["shard_tokens"]
    buf, n, shard = np.empty(size, np.uint16), 0, 0
    for ids in token_arrays:
        while len(ids):
            take = min(len(ids), size - n)
            buf[n:n + take], n, ids = ids[:take], n + take, ids[take:]
            if n == size:
                write_shard(out, shard, buf)
                shard, n = shard + 1, 0
                if shard > max_train:
                    return
    if n:
        write_shard(out, shard, buf[:n])


def fineweb_from_parquet(args):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError("--from-parquet needs pyarrow (pip install pyarrow); without the flag the ready "
                           "GPT-2 shards are downloaded instead") from None
    base = mirror(args, FINEWEB["parquet_url"])

    def texts():   # parquet files are fetched one at a time, only as many as the shards need
        for i in range(FINEWEB["parquet_files"]):
            path = args.out / "download" / f"{i:03d}_00000.parquet"
            download(f"{base}/{path.name}", path)
            try:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
                    yield batch.column("text").to_pylist()
            except Exception as e:   # pyarrow's errors (ArrowInvalid, OSError) for a damaged file
                raise PrepareError(f"{path}: unreadable parquet ({e}); delete it and run again") from None

    write_shards(imap(_encode_docs, texts(), args.workers, "gpt2"), args.out, args.shards)


def cmd_fineweb(args):
    if not 1 <= args.shards <= FINEWEB["shards"]:
        raise PrepareError(f"--shards must be between 1 and {FINEWEB['shards']}")
    source = {"name": "fineweb-edu10b", "shards": args.shards, "from_parquet": args.from_parquet}
    prefix = FINEWEB["prefix"]
    extra = sorted(args.out.glob(f"{prefix}_train_*.bin"))[args.shards:]
    if extra:   # the loader reads every shard in the folder: fewer would be a claim, not the dataset
        raise PrepareError(f"--out {args.out} holds {args.shards + len(extra)} train shards, more than --shards "
                           f"{args.shards}; pass --shards {args.shards + len(extra)} or another --out")
    if open_out(args.out, source):
        return
    if args.from_parquet:
        fineweb_from_parquet(args)
    else:
        names = [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, args.shards + 1)]
        for name in names:
            download(f"{mirror(args, FINEWEB['url'])}/{name}", args.out / name, check=check_shard)
    splits = {s: {"tokens": sum(int(np.fromfile(p, np.int32, 3)[2]) for p in args.out.glob(f"{prefix}_{s}_*.bin")),
                  "bytes": None} for s in ("train", "val")}
    write_meta(args.out, GPT2, splits, source)


# ----------------------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, not usage + error
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser():
    p = _Parser(prog="prepare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("text", help="tokenize local text files (plain or .xz)")
    t.add_argument("--input", nargs="+", type=Path, required=True, help="training text files (each one document)")
    t.add_argument("--val", nargs="+", type=Path, default=[], help="validation files (default: last 5%% of --input)")
    t.add_argument("--tokenizer", choices=("gpt2", "bytes"), default="gpt2")
    t.add_argument("--out", type=Path, required=True, help="output folder, e.g. data/docs")
    t.set_defaults(func=cmd_text)
    for name, func, about in (("enwik8", cmd_enwik8, "enwik8 bytes, 90M/5M/5M (36 MB download)"),
                              ("openwebtext", cmd_openwebtext, "OpenWebText, GPT-2 tokens (12.9 GB download)"),
                              ("fineweb-edu10b", cmd_fineweb, "FineWeb-Edu 10B, GPT-2 shards (~20 GB download)")):
        d = sub.add_parser(name, help=about)
        d.add_argument("--out", type=Path, default=Path("data") / name, help="output folder (default: %(default)s)")
        d.add_argument("--base-url", default="", help="fetch the files from this mirror folder (URL/FILE); "
                       "env ATTNLAB_MIRROR=URL does the same for every command with URL/<command>/FILE")
        d.set_defaults(func=func)
        if name == "fineweb-edu10b":
            d.add_argument("--shards", type=int, default=FINEWEB["shards"], help="train shards (100M tokens each)")
            d.add_argument("--from-parquet", action="store_true", help="tokenize the parquet files (needs pyarrow)")
    for s in sub.choices.values():
        s.add_argument("--workers", type=int, default=os.cpu_count(), help="tokenizer processes (default: all cores)")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    made = [d for d in (args.out / "download", args.out) if not d.exists()]
    try:
        if args.workers < 1:
            raise PrepareError("--workers must be at least 1")
        args.func(args)
        made = []
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to continue", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e}" + ("; free some space and run the same command again" if e.errno == errno.ENOSPC else ""),
              file=sys.stderr)
        return 1
    except core.ConfigError as e:   # PrepareError, or a tokenizer that cannot load
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:   # a failed command leaves no empty folder of its own behind
        for d in made:
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
