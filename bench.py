"""bench.py: every variant of every paper script on equal footing: speed, a training comparison, downstream scores.

Speed. One row per (script, variant, attention path, T): a fresh subprocess builds the model, checks the fast
attention path against its eager reference (same weights, same batch, same device: logits and every parameter
gradient, relative error against the fp32 eager result, tolerance by dtype), and only then times training steps with
core.bench (random tokens, bf16 autocast and torch.compile on GPU). A mismatch is reported as FAIL and not timed.
Columns: ms/step, tokens/s, x the paper's baseline variant, x the core GPT, MFU against the detected GPU's peak and
peak memory. Sizes: each script's 124m-class preset (core's `124m`; cogformer `141m-gpt2`; reflex `124m-8h`);
`tiny` on CPU. A fresh process per row matters: one long-lived process recompiling many models hits torch.compile's
recompile limits and runs up to 1.8x slower. `--jobs N` runs N row processes at once: they build, check, compile and
warm up together, then each is timed alone while the others wait (nothing compiles during a timing).

    python bench.py                                   # every variant of every script, T=1024, the GPU it finds
    python bench.py --papers core,cogformer --impl eager,auto --batch 8
    python bench.py --scaling                         # T = 1024 .. 8192 (OOM cells): core GPT + each main variant
    python bench.py --jobs 6                          # the same table, six rows compiling at once (an 80+ GiB GPU)
    python bench.py --compare --data data/docs        # train baseline + main variant of each paper, same tokens
    python bench.py --compare --data data/docs --jobs 4   # the same, four runs at once on four GPUs
    python bench.py --ddp 2                           # core baseline on 1 and 2 GPUs (torchrun): scaling efficiency

Downstream evaluation of any checkpoint of any script (lm-eval is optional: pip install lm-eval):

    python bench.py --eval-tasks hellaswag,arc_easy --ckpt runs/x/ckpt.pt    # lm-eval task names or .yaml files
    python bench.py --eval-tasks mc.jsonl --ckpt runs/x/ckpt.pt --data data/docs   # local multiple choice, no lm-eval
    python bench.py --lm-eval --model attnlab --model_args pretrained=runs/x/ckpt.pt --device cuda --tasks piqa

Multiple-choice JSONL: one {"context": str, "choices": [str, ...], "label": int} per line; each choice is appended to
the context as is (it carries its own leading space). The score of a choice is the summed log-likelihood of its
tokens given the context (the papers' zero-shot scorer, as in lm-eval, whose rule that trailing spaces of the context
are scored with the continuation we keep): acc takes the argmax of the scores, acc_norm the argmax of the score per
UTF-8 byte of the choice. The tokenizer is the one of the model's dataset (--data, else the dataset recorded in the
checkpoint).
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import itertools
import json
import math
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback

import torch
import torch.nn.functional as F

import core

HERE = os.path.dirname(os.path.abspath(__file__))
PAPERS = ("exoformer", "attn_bias", "cogformer", "sparse_byte", "reflex")
SCALING_T = (1024, 2048, 4096, 8192)
ROW_TIMEOUT = 900  # seconds for one row's process (compilation included)
TOL = {torch.float32: 2e-3, torch.bfloat16: 5e-2}  # fast vs fp32 eager reference; correct bf16 paths land near 1e-2

# ----------------------------------------------------------------------------------------------------------------
# Scripts: each exports PAPER = core.Paper(...), and that record is all bench.py reads of it


def scripts(with_core=True):
    """core, the five papers, then any other script beside bench.py that exports a PAPER (your own attention)."""
    extra = sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f[:-3] not in PAPERS + ("core",)
                   and "\nPAPER = core.Paper(" in open(os.path.join(HERE, f), encoding="utf-8").read())
    return [*(["core"] if with_core else []), *PAPERS, *extra]


@functools.cache
def script(name):
    """The Paper of a script: core, a script beside bench.py, or a path to a .py file."""
    if name == "core":
        return core.PAPER
    if name.endswith(".py"):
        if not os.path.isfile(name):
            raise core.ConfigError(f"script not found: {name}")
        spec = importlib.util.spec_from_file_location(os.path.basename(name)[:-3], name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    elif name in scripts():
        module = importlib.import_module(name)
    else:
        raise core.ConfigError(f"unknown script {name!r}: choose from {', '.join(scripts())} or a path to a .py file")
    if not isinstance(getattr(module, "PAPER", None), core.Paper):
        raise core.ConfigError(f"{name} exports no PAPER = core.Paper(...)")
    return module.PAPER


def row_names(s):
    """A script's rows: its variants, then its extra bench rows (e.g. reflex's other head splits)."""
    return [*s.variants, *s.bench_rows]


def make_cfg(s, variant, preset, **over):
    """The script's config: preset, then the row's variant (or bench row) and overrides (None = keep);
    random-token vocabulary if unset."""
    if preset not in s.config.PRESETS:
        raise core.ConfigError(f"{s.name} has no preset {preset!r} ({', '.join(sorted(s.config.PRESETS))})")
    kw = {**s.config.PRESETS[preset], **row_over(s, variant)}
    cfg = s.config(**{**kw, **{k: v for k, v in over.items() if v is not None}})
    cfg.vocab_size = cfg.vocab_size or core.RANDOM_VOCAB
    return cfg


def row_over(s, variant):
    """A row's config overrides: a bench row's, else its --variant."""
    return s.bench_rows.get(variant, {"variant": variant} if variant else {})


def preset_for(name, presets, gpu):
    """--preset: 'NAME' for every script and/or 'script=NAME' entries; default the 124m class (tiny on CPU)."""
    return presets.get(name) or presets.get("*") or ("tiny" if not gpu else script(name).size_preset)


def parse_presets(text):
    out = {}
    for item in filter(None, (text or "").split(",")):
        name, _, preset = item.rpartition("=")
        out[name or "*"] = preset
    return out


def row_flags(s, variant):
    """The command-line flags of a row: --variant, or a bench row's overrides."""
    return [x for k, v in row_over(s, variant).items() for x in (f"--{k.replace('_', '-')}", str(v))]


def row_label(s, variant, cfg):
    """A row's name: the model as its config names it (e.g. reflex's split), a bench row by its own name."""
    return f"{s.name}/{variant}" if variant in s.bench_rows else s.label(cfg)


def offers(names, values):
    """'core (124m, tiny), reflex (...)': what each script offers, for an error line. values: config -> names."""
    return ", ".join(f"{script(n).name} ({', '.join(values(script(n).config))})" for n in names)


def check_presets(presets, names):
    """--preset: each entry a preset of one of the scripts (script=NAME: of that script), not a skip of every row."""
    for who, preset in presets.items():
        if not any(who in ("*", n, script(n).name) and preset in script(n).config.PRESETS for n in names):
            raise core.ConfigError(f"--preset {'' if who == '*' else who + '='}{preset}: not a preset of "
                                   + offers(names, lambda c: sorted(c.PRESETS)))


def check_impls(which, names):
    """--impl: each name an attention path of one of the scripts (a typo dropped silently timed the others only)."""
    unknown = set(which.split(",")) - {"all"} - {i for n in names for i in script(n).config.ATTN_IMPLS}
    if unknown:
        raise core.ConfigError(f"--impl {','.join(sorted(unknown))}: not an attention path of "
                               + offers(names, lambda c: c.ATTN_IMPLS))


def check_variants(which, names):
    """--variants: each name a row of one of the scripts (all and main pick rows of each)."""
    if which in (None, "", "all", "main"):
        return
    known = [v for n in names for v in row_names(script(n)) if v]
    bad = [v for v in which.split(",") if v not in known]
    if bad:
        raise core.ConfigError(f"--variants {','.join(bad)}: not a row of {', '.join(script(n).name for n in names)} "
                               f"(theirs: {', '.join(dict.fromkeys(known)) or 'none'})")


def pick_variants(s, which):
    """all: the baseline first, then every other row; main: baseline and the paper's method; or a comma list."""
    if not s.config.VARIANTS and which != "all":  # core: its one model (all: and its bench rows)
        return [""]
    if which == "all":
        return list(dict.fromkeys([s.baseline or s.main, *row_names(s)]))
    if which == "main":
        return list(dict.fromkeys([s.baseline or s.main, s.main]))
    return [v for v in which.split(",") if v in row_names(s)]


# ----------------------------------------------------------------------------------------------------------------
# Parity: the fast path against its eager reference


def fwd_bwd(model, idx, amp):
    model.zero_grad(set_to_none=True)
    with amp:
        logits = model(idx[:, :-1])  # (B, T, V)
    F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten()).backward()
    return logits.detach().float(), {n: p.grad for n, p in model.named_parameters()}


def parity_error(out, ref):
    """Worst relative error over the logits and each parameter's gradient: (error, tensor name).
    A gradient's error is taken against max(its norm, 1e-3 x the largest gradient norm): near-zero gradients
    (e.g. K/V slots no later layer reads) cannot dominate."""
    (logits, grads), (ref_logits, ref_grads) = out, ref
    errs = {"logits": ((logits - ref_logits).norm() / ref_logits.norm().clamp_min(1e-30)).item()}
    scale = max((g.float().norm().item() for g in ref_grads.values() if g is not None), default=0.0)
    for name, g_ref in ref_grads.items():
        g = grads[name]
        if g is None and g_ref is None:
            continue
        g_ref = torch.zeros_like(g, dtype=torch.float32) if g_ref is None else g_ref.float()
        g = torch.zeros_like(g_ref) if g is None else g.float()
        errs[name] = ((g - g_ref).norm() / max(g_ref.norm().item(), 1e-3 * scale, 1e-30)).item()
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def check_parity(s, cfg, B=2, T=256):
    """Fast path (cfg.attn_impl, in the bench dtype) vs the eager reference in fp32: same weights (perturbed, so that
    zero-initialised projections cannot hide the attention), same batch, same device, training mode, no dropout.
    Tolerance: TOL of the dtype, or twice the error of the eager path in that dtype if larger.
    -> dict(status 'ok' | 'FAIL' | 'eager' (nothing to check), impls, err, tol, worst, floor (eager in the dtype))."""
    device = core.resolve_device(cfg)
    cfg = dataclasses.replace(cfg, dropout=0.0)
    fast = s.build_model(cfg).to(device)
    impls = fast.attn_impls(device)
    if impls == ["eager"]:
        return dict(status="eager", impls=impls)
    torch.manual_seed(cfg.seed)
    ref = s.build_model(dataclasses.replace(cfg, attn_impl="eager")).to(device)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    fast.load_state_dict(ref.state_dict())
    T = min(T, cfg.block_size)
    idx = torch.randint(0, cfg.vocab_size, (B, T + 1), device=device)
    amp = core.autocast(device, cfg)
    dtype = getattr(amp, "fast_dtype", torch.float32)  # autocast's dtype; a null context: float32
    want = fwd_bwd(ref, idx, contextlib.nullcontext())
    res = dict(impls=impls, tol=TOL[dtype])
    if dtype != torch.float32:  # the rounding of the dtype itself: the eager path in it (sign(s) of cog attention
        res["floor"] = parity_error(fwd_bwd(ref, idx, amp), want)[0]  # flips near s = 0, whatever the kernel)
        res["tol"] = max(res["tol"], 2 * res["floor"])
    res["err"], res["worst"] = parity_error(fwd_bwd(fast, idx, amp), want)
    return dict(res, status="ok" if res["err"] <= res["tol"] else "FAIL")


# ----------------------------------------------------------------------------------------------------------------
# Speed rows: one subprocess each


def measure(spec):
    """One row: config, parity check, then core.bench. Never raises: the outcome is the row's status."""
    row = dict(spec)
    gate = row.pop("gate", None)  # the turn files of --jobs: plumbing, not part of the row
    try:
        s = script(spec.get("source") or spec["script"])
        cfg = make_cfg(s, spec["variant"], spec["preset"], **spec["over"])
        device = core.resolve_device(cfg)
        row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        if spec.get("check", True):
            row["parity"] = check_parity(s, cfg)
            if row["parity"]["status"] == "FAIL":
                row["status"] = "FAIL"
                return row
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row.update(core.bench(cfg, s.build_model, spec.get("steps", 20), spec.get("warmup", 5),
                              ready=functools.partial(wait_turn, gate) if gate else None),
                   status="ok")
    except core.ConfigError as e:
        row["status"] = f"skip: {e}"
    except Exception as e:  # one broken variant must not stop the table; the traceback goes to the row's log
        traceback.print_exc()
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
        row["status"] = "OOM" if oom else f"error: {type(e).__name__}: {msg[:200]}"
    return row


def child(spec_json, out_path):
    """Entry of the row subprocess."""
    with open(out_path, "w") as f:
        json.dump(measure(json.loads(spec_json)), f)


def wait_turn(gate):
    """In the row process, warmed up: say so, then wait for the parent's go (its turn to be timed alone)."""
    open(os.path.join(gate, "ready"), "w").close()
    while not os.path.exists(os.path.join(gate, "go")):
        time.sleep(0.05)


def exit_line(code, log_path):
    """'exit CODE: ' and the last line a failed process wrote to its log (200 characters at most)."""
    last = [l for l in open(log_path).read().splitlines() if l.strip()][-1:] or [""]
    return f"exit {code}: {last[0][:200]}"


def child_env(extra=None):
    """A child process's environment: ours, `extra`, and this folder on PYTHONPATH (bench's rows import bench, a script
    outside the repo imports core); it runs in our working directory, where the command line's paths are."""
    return {**os.environ, **(extra or {}), "PYTHONPATH": os.pathsep.join(filter(None, (HERE, os.environ.get(
        "PYTHONPATH"))))}


def run_rows(specs, log_paths):
    """One process per row, all started at once; once every one is warmed up (or gone), each is timed alone in turn.
    A row not warmed up within ROW_TIMEOUT is stopped. -> the rows, in order."""
    gates, procs = [p + ".gate" for p in log_paths], []
    for spec, log_path, gate in zip(specs, log_paths, gates):
        shutil.rmtree(gate, ignore_errors=True)
        os.makedirs(gate)
        cmd = [sys.executable, "-c", "import sys, bench; bench.child(sys.argv[1], sys.argv[2])",
               json.dumps({**spec, "gate": gate}), log_path + ".json"]
        with open(log_path, "w") as log:
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env()))
    ready = lambda p, gate: p.poll() is not None or os.path.exists(os.path.join(gate, "ready"))
    deadline = time.time() + ROW_TIMEOUT
    while not all(map(ready, procs, gates)) and time.time() < deadline:
        time.sleep(0.1)
    rows = []
    for p, spec, log_path, gate in zip(procs, specs, log_paths, gates):
        try:
            if not ready(p, gate):
                raise subprocess.TimeoutExpired(p.args, ROW_TIMEOUT)
            open(os.path.join(gate, "go"), "w").close()
            code = p.wait(timeout=ROW_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            rows.append({**spec, "status": f"error: no result after {ROW_TIMEOUT} s (log: {log_path})"})
            continue
        finally:
            shutil.rmtree(gate, ignore_errors=True)
        out = log_path + ".json"
        if code == 0 and os.path.exists(out):
            rows.append(json.load(open(out)))
        elif code == -9:  # SIGKILL: on Linux the out-of-memory killer
            rows.append({**spec, "status": f"OOM: killed by the OS (out of memory?) (log: {log_path})"})
        else:
            rows.append({**spec, "status": f"error: {exit_line(code, log_path)} (log: {log_path})"})
    return rows


def speed_specs(args, gpu):
    """Rows to run; configs that the script refuses become 'skip' rows right away."""
    presets, seqs, specs = parse_presets(args.preset), seq_list(args, gpu), []
    names = papers(args.papers, with_core=True)
    check_variants(args.variants, names)
    check_presets(presets, names)
    check_impls(args.impl, names)
    for name in names:
        s = script(name)
        preset = preset_for(name, presets, gpu)
        impls = [i for i in s.config.ATTN_IMPLS if i != "auto"] if args.impl == "all" else args.impl.split(",")
        # scaling: the core GPT is the one baseline (every paper's baseline runs the same SDPA kernel)
        for variant in pick_variants(s, args.variants or (s.main if args.scaling else "all")):
            for impl in [i for i in impls if i in s.config.ATTN_IMPLS]:
                for T in seqs or [None]:
                    spec = dict(script=s.name, variant=variant, baseline=s.baseline, preset=preset, impl=impl,
                                steps=args.steps, warmup=args.warmup, **({"source": name} if name != s.name else {}))
                    try:
                        cfg0 = make_cfg(s, variant, preset, device=args.device)
                        T = T or cfg0.block_size
                        B = args.batch or max(1, cfg0.batch_size * cfg0.block_size // T)  # the preset's tokens/step
                        spec.update(T=T, B=B, over=dict(block_size=T, batch_size=B, attn_impl=impl, device=args.device,
                                                       dtype=args.dtype, compile=args.compile))
                        cfg = make_cfg(s, variant, preset, **spec["over"])
                        spec["label"] = row_label(s, variant, cfg)
                        if cfg.residual_dtype != "float32" and core.amp_dtype(core.resolve_device(cfg), cfg) == \
                                torch.float32:  # the same model as the core row: its time would be noise
                            raise core.ConfigError("--residual-dtype has no effect in a float32 run")
                    except core.ConfigError as e:
                        spec.update(T=T, B=args.batch or None, status=f"skip: {e}")
                    specs.append(spec)
    return specs


def int_list(text, flag, least=1):
    """"1024,2048" -> [1024, 2048], every one >= least; anything else is one line naming the flag."""
    if not all(t.isdigit() and int(t) >= least for t in text.split(",")):
        raise core.ConfigError(f"{flag} takes integers >= {least}, comma separated, not {text!r}")
    return [int(t) for t in text.split(",")]


def seq_list(args, gpu):
    if args.seq:
        return int_list(args.seq, "--block-size")
    return list(SCALING_T if gpu else (64, 128)) if args.scaling else []


def papers(text, with_core=False):
    """Script names (or paths to .py files) of --papers; default every script found."""
    names = text.split(",") if text else scripts(with_core)
    for n in names:
        script(n)  # an unknown name: one line
    return names


def add_ratios(rows):
    """x baseline: against the paper's baseline variant; x core: against the core GPT (same T, impl auto if any)."""
    def find(name, variant, T):
        cands = [r for r in rows if (r["script"], r["variant"], r.get("T")) == (name, variant, T) and r.get("tok_s")]
        return next((r for r in cands if r["impl"] == "auto"), cands[0] if cands else None)
    for r in rows:
        if r.get("tok_s"):
            base, gpt = find(r["script"], r["baseline"], r["T"]), find("core", "", r["T"])
            r["x_baseline"] = r["tok_s"] / base["tok_s"] if base else None
            r["x_core"] = r["tok_s"] / gpt["tok_s"] if gpt else None


def label(r):
    """'script/variant': a --compare run's model as its config names it (reflex's split), a speed row's variant."""
    return r.get("label") or f"{r['script']}" + (f"/{r['variant']}" if r["variant"] else "")


def impl_cell(r):
    """The asked path and, once checked, the kernels it ran: 'auto (sdpa)'; where timed batches had several documents,
    what ran them (FlexAttention, or the eager mask) and in what share of the batches."""
    impls, docs = r.get("parity", {}).get("impls", []), r.get("paths", {})
    share = docs.get("documents", 0) / sum(docs.values()) if docs else 0
    docs = f", {core.doc_path(impls)} in {100 * share:.0f}% of batches (documents)" if share else ""
    return r["impl"] + (f" ({'+'.join(impls)}{docs})" if r.get("parity") else "")


def check_cell(r):
    p = r.get("parity")
    if not p:
        return "-"
    if p["status"] == "eager":
        return "eager"
    floor = f", bf16 floor {p['floor']:.1e}" if "floor" in p else ""
    worst = f" at {p['worst']}" if p["status"] == "FAIL" else ""
    return f"{p['status']} {p['err']:.1e}{worst}{floor}"


def fmt(x, spec="", unit=""):
    """A table cell: '-' for None, a word as it is, a number with its format and unit."""
    return "-" if x is None else x if isinstance(x, str) else f"{x:{spec}}{unit}"


def md_table(head, rows):
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def speed_table(rows):
    head = ["script/variant", "impl", "T", "B", "check", "ms/step", "tokens/s", "x baseline", "x core", "MFU", "memory"]
    out = []
    for r in rows:
        impl = impl_cell(r) + ("" if r.get("over", {}).get("compile", True) else ", not compiled")
        ok = r["status"] == "ok"
        out.append([label(r), impl, fmt(r.get("T")), fmt(r.get("B")), check_cell(r),
                    fmt(r.get("ms"), ".1f") if ok else r["status"].split(":")[0],
                    fmt(r.get("tok_s") and r["tok_s"] / 1e3, ".1f", "k"), fmt(r.get("x_baseline"), ".2f", "x"),
                    fmt(r.get("x_core"), ".2f", "x"), fmt(r.get("mfu") and 100 * r["mfu"], ".1f", "%"),
                    fmt(r.get("mem_gb"), ".1f", " GiB")])
    return md_table(head, out)


def script_colors(rows):
    return {n: core.pyplot().cm.tab10(i % 10) for i, n in enumerate(dict.fromkeys(r["script"] for r in rows))}


def plot_speed(rows, png, title):
    """One T: tokens/s bars (x baseline written on each). Several T: tokens/s and memory against T."""
    pyplot = core.pyplot()
    colors = script_colors(rows)
    if len({r.get("T") for r in rows}) <= 1:
        fig, ax = pyplot.subplots(figsize=(9, 1 + 0.35 * len(rows)))
        names = [f"{label(r)} [{r['impl']}]" for r in rows]
        vals = [(r.get("tok_s") or 0) / 1e3 for r in rows]
        ax.barh(names, vals, color=[colors[r["script"]] for r in rows])
        for i, r in enumerate(rows):
            text = fmt(r.get("x_baseline"), ".2f", "x") if r["status"] == "ok" else r["status"].split(":")[0]
            ax.text(vals[i], i, f" {text}", va="center", fontsize=8, color="black" if r["status"] == "ok" else "red")
        ax.invert_yaxis()
        ax.set_xlim(0, 1.1 * max(vals, default=0) or 1)  # room for the labels
        ax.set_xlabel("training tokens/s (thousands)")
    else:
        fig, axes = pyplot.subplots(1, 2, figsize=(12, 4.5))
        for i, key in enumerate(dict.fromkeys((label(r), impl_cell(r)) for r in rows)):  # one line per kernel
            pts = [r for r in rows if (label(r), impl_cell(r)) == key and r.get("tok_s")]
            for ax, field, scale in ((axes[0], "tok_s", 1e-3), (axes[1], "mem_gb", 1)):
                ys = [(r["T"], r[field] * scale) for r in pts if r.get(field) is not None]
                if ys:
                    ax.plot(*zip(*ys), marker="o", label=f"{key[0]} [{key[1]}]", color=pyplot.cm.tab10(i % 10),
                            ls="-" if pts[0]["variant"] == pts[0]["baseline"] else "--")
        for ax, name in zip(axes, ("training tokens/s (thousands)", "peak memory (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
    ax = fig.axes[0]
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    pyplot.close(fig)


def speed(args, gpu):
    name = "scaling" if args.scaling else "bench"
    specs, rows, path = speed_specs(args, gpu), [], os.path.join(args.out, name + ".json")
    if not specs:
        raise core.ConfigError("no rows: --papers / --variants / --impl select nothing")
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    checked = {}  # (script, variant, impl) -> parity: checked at T = min(256, the row's T), 256 on GPU rows: once each
    key = lambda spec: (spec["script"], spec["variant"], spec["impl"])
    log = lambda spec: os.path.join(args.out, "logs", f"{label(spec).replace('/', '-').replace(' ', '_')}-"
                                                      f"{spec['impl']}-{spec['T']}-{spec['B']}.txt")
    for first in range(0, len(specs), args.jobs):  # --jobs rows compile at once, then are timed one by one
        group = specs[first:first + args.jobs]
        for spec in group:
            if key(spec) in checked:
                spec.update(check=False, parity=checked[key(spec)])
                if checked[key(spec)]["status"] == "FAIL":
                    spec["status"] = "FAIL"
        todo = [spec for spec in group if "status" not in spec]
        measured = iter(run_rows(todo, [log(spec) for spec in todo]))
        for i, spec in enumerate(group, first):
            if "status" not in spec:
                spec = next(measured)
                if spec.get("parity"):
                    checked.setdefault(key(spec), spec["parity"])
            rows.append(spec)
            print(f"[{i + 1}/{len(specs)}] {label(spec)} {spec['impl']} T={spec.get('T')}: {spec['status']}"
                  + (f", {spec['ms']:.1f} ms/step" if spec.get("ms") else ""), file=sys.stderr, flush=True)
            table, info = save_rows(path, rows, args.append)  # after every row: a run cut short keeps what it measured
    print(f"{info['device']}, torch {info['torch']}, CUDA {info['cuda']}, git {info['git']}\n")
    print(speed_table(table))
    png = os.path.join(args.out, name + ".png")
    plot_speed(table, png, f"{info['device']}, torch {info['torch']}")
    print(f"\n{path}, {png}", file=sys.stderr)
    return 1 if any(r["status"] == "FAIL" for r in table) else 0


def save_rows(path, rows, append):
    """Write <path> atomically: this run's rows (merged into the file's when appending; merging again is harmless,
    this run's rows replace their own earlier save) with ratios and the environment. -> (all rows, env)."""
    if append:
        rows = merge(path, "rows", rows, lambda r: (r["script"], r["variant"], r["impl"], r.get("T"), r.get("B")))
    add_ratios(rows)
    info = run_env(rows)
    with core.atomic(path, "w") as f:
        json.dump(dict(**info, rows=rows), f, indent=1)
    return rows, info


def merge(path, field, rows, key):
    """--append: an earlier run's rows, less those run again, plus the new ones: one table from several runs."""
    if not os.path.exists(path):
        return rows
    new = {key(r) for r in rows}
    rows = [r for r in json.load(open(path))[field] if key(r) not in new] + rows
    order = scripts()
    return sorted(rows, key=lambda r: order.index(r["script"]) if r["script"] in order else len(order))


def run_env(rows):
    """Device, torch, CUDA and git of the rows: a training run's own (its run.json: --compare may tabulate runs made
    on another machine), else this process's; argv and the device's peak."""
    recorded = next(filter(None, (core.read_run(r["out"]) for r in rows if r.get("out"))), {})
    here = core.run_info(core.Config(), torch.device("cpu"))
    device = next((r["device"] for r in rows if r.get("device")), None) or recorded.get("gpu") or "cpu"
    return dict(device=device, **{k: recorded.get(k) or here[k] for k in ("torch", "cuda", "git")}, argv=sys.argv,
                peak_tflops=next((v / 1e12 for k, v in core.PEAK_BF16.items() if k in device), None))


def run_machines(runs):
    """{(device, torch, git): [run names]} of the runs that recorded them (run.json), in the runs' order."""
    out = {}
    for r in runs:
        rec = core.read_run(r["out"])
        if rec:
            seed = f" seed {r['seed']}" if r.get("seed") is not None else ""
            out.setdefault((rec.get("gpu") or "cpu", rec.get("torch"), rec.get("git")), []).append(label(r) + seed)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The comparison: train baseline and main variant of each paper with identical flags, one table, one plot


def train_runs(todo, jobs, gpu, then=None):
    """Train the (run, command) pairs, `jobs` at once; on several GPUs each training process gets one of them (the
    i-th free slot: GPU i mod count). Sets each run's "error"; then(run, stop) after each run that trained, while the
    next run trains (one worker more than slots: a 124M run's whole-val score overlaps the next one's compilation).
    SIGTERM reaches the runs training (each saves a checkpoint at its next logged step and ends), sets stop (for a
    then() under way to end) and starts no other; -> whether it came."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = (visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]) if gpu else []
    slots, started = queue.Queue(), []
    for i in range(jobs):
        slots.put(i)

    def start(p):  # a process started as SIGTERM came gets it too
        started.append(p)
        if stop.is_set():
            p.send_signal(signal.SIGTERM)

    def train(item):
        run, cmd = item
        slot = slots.get()
        try:
            if stop.is_set():  # SIGTERM came: no other run starts
                return
            env = {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]} if len(gpus) > 1 else {}
            if env:
                print(f"{label(run)} seed {run['seed']}: GPU {env['CUDA_VISIBLE_DEVICES']}", file=sys.stderr,
                      flush=True)
            error = train_run(cmd, run["out"], env, start)
            run["error"] = None if stop.is_set() else error  # stopped: cut, its checkpoint kept
        finally:
            slots.put(slot)
        if then and not run["error"] and not stop.is_set():
            then(run, stop)

    def forward():  # a finished process ignores it
        for p in started:
            p.send_signal(signal.SIGTERM)
    with core.on_sigterm(forward) as stop, concurrent.futures.ThreadPoolExecutor(jobs + 1 if then else jobs) as pool:
        list(pool.map(train, todo))
    return stop.is_set()


def train_run(cmd, out, env=None, started=None):
    """Run one training command (with `env` added to the environment); its output goes to <out>/stdout.txt;
    started(process) once it runs. -> error line or None."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "stdout.txt"), "w") as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(env))
        if started:
            started(p)
        p.wait()
    if p.returncode:
        return exit_line(p.returncode, os.path.join(out, "stdout.txt"))
    return None


def summarize(log):
    """Final val loss, steady-state speed (the first logged interval holds the compilation), peak memory, and the
    training time per record (compilation and evaluation excluded: an interval over 3x the median step time holds a
    compilation, the first or FlexAttention's at a batch's first several documents, and counts at the median)."""
    steady = log[1:] or log
    med = lambda key: statistics.median(r[key] for r in steady) if steady[0].get(key) is not None else None
    ms = med("ms")
    t, prev, times = 0.0, 0, []
    for i, r in enumerate(log):
        t += (r["step"] - prev) * (ms if i == 0 or r["ms"] > 3 * ms else r["ms"]) / 1e3
        prev = r["step"]
        times.append(t)
    val = [(r["tokens"], times[i], r["val_loss"]) for i, r in enumerate(log) if r.get("val_loss") is not None]
    mem = [r["mem_gb"] for r in log if r.get("mem_gb") is not None]
    return dict(val_loss=val[-1][2] if val else None, tokens=log[-1]["tokens"], tok_s=med("tok_s"), mfu=med("mfu"),
                mem_gb=max(mem) if mem else None, train_s=times[-1], curve=val)


def whole_val(paper, out, data, stop=None):
    """The run's final loss on the whole val split (core.evaluate of its checkpoint), kept in <out>/eval.json: the
    log's val loss is the mean of eval_iters batches drawn with the run's seed. None where neither that file nor the
    checkpoint and the data are here (logs copied back; --report computes nothing), or where `stop` (SIGTERM) ended
    the score."""
    path, ckpt = os.path.join(out, "eval.json"), os.path.join(out, "ckpt.pt")
    if os.path.exists(path):
        return json.load(open(path))["loss"]
    if not (data and os.path.exists(ckpt)):
        return None
    model = core.load_model(paper, ckpt)
    device = core.resolve_device(model.cfg)
    res = core.evaluate(model.to(device), data, dataclasses.replace(model.cfg, eval_tokens=0), device, stop=stop)
    del model
    if device.type == "cuda":  # the next run trains in its own process: leave it the memory
        torch.cuda.empty_cache()
    if res is None:
        return None
    with core.atomic(path, "w") as f:
        json.dump(res, f)
    return res["loss"]


def compare(args, gpu):
    """Train each paper's baseline and main variant (or --variants) with identical flags, once per seed; one table,
    one plot. A comparison cut short continues when run again with the same flags: finished runs are reused, cut ones
    resumed from their checkpoints (bit for bit); a folder that holds a run with other flags is refused (--fresh).
    --jobs N trains N runs at once (one per GPU where there are several); each is scored on the whole val split as
    soon as it is trained."""
    # one line when it is missing; --report needs it only for runs that do not record their data's size
    data = None if args.report and not os.path.isdir(args.data) else core.TokenData(args.data)
    if args.evals < 1:
        raise core.ConfigError("--evals must be at least 1")
    if args.report and not os.path.isdir(args.out):
        raise core.ConfigError(f"--report: no runs in {args.out}")
    seeds = int_list(args.seeds, "--seeds", 0) if args.seeds else [args.seed]
    if args.seq and len(int_list(args.seq, "--block-size")) > 1:
        raise core.ConfigError("--compare trains at one --block-size")
    presets, runs, todo, paper_of, steps, plan = parse_presets(args.preset), [], [], {}, {}, []
    check_variants(args.variants, papers(args.papers))
    for name in papers(args.papers):
        s = script(name)
        path = name if name.endswith(".py") else os.path.join(HERE, f"{name}.py")
        for variant in pick_variants(s, args.variants or "main"):
            cmd, n, run_label = compare_cmd(args, s, path, variant, preset_for(name, presets, gpu))
            for seed in seeds:
                out = os.path.join(args.out, f"{s.name}-{variant}".replace(" ", "_") if variant else s.name)
                out += f"-seed{seed}" if args.seeds else ""  # --seeds: every run dir names its seed
                run_cmd = [*cmd, "--seed", str(seed), "--out", out]
                state = prior_run(out, run_cmd, n, args.fresh, args.report)
                if state != "done" and not args.report:  # its whole-split score is of another model
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(out, "eval.json"))
                shown = "not run" if args.report and state == "new" else state  # --report trains nothing
                plan.append(f"[{len(runs) + 1}] {shown}: {' '.join(run_cmd[1:])}")
                run = dict(script=s.name, variant=variant, label=run_label, baseline=s.baseline, seed=seed, out=out,
                           cmd=run_cmd[1:], data=args.data, error=None, missing=None)
                if args.report and state != "done":  # tabulate what is there, train nothing
                    run["missing"] = "not run" if state == "new" else f"cut at step {last_step(out)} of {n}"
                elif state != "done":
                    todo.append((run, run_cmd + ["--resume" if state == "resume" else "--overwrite"]))
                runs.append(run)
                paper_of[out], steps[out] = s, n
    if args.report and all(r["missing"] == "not run" for r in runs):  # a table of nothing would replace compare.json
        raise core.ConfigError(f"--report: none of these runs is in {args.out} ({', '.join(r['out'] for r in runs)}): "
                               "pass the comparison's own --papers, --variants and --seeds")
    print("\n".join(plan), file=sys.stderr, flush=True)
    lock = threading.Lock()

    scored = data if args.whole_val and not args.report else None  # None: only a score already in eval.json

    def score(run, stop):  # as soon as it is trained: a later run cut short leaves this one's score on disk
        with lock:
            whole_val(paper_of[run["out"]], run["out"], scored, stop)
    stopped = train_runs(todo, args.jobs, gpu, then=score)
    for run, _ in todo if stopped else ():  # SIGTERM: where each run got to (a cut one keeps its checkpoint)
        step, n = last_step(run["out"]), steps[run["out"]]
        run["missing"] = None if step >= n else f"cut at step {step} of {n}" if step else "not run"
    for run in runs:
        recorded = core.read_run(run["out"]).get("data") or {}  # path, tokenizer, vocabulary, train tokens
        run["tokenizer"] = recorded.get("tokenizer") or (data and data.tokenizer)
        log = core.read_log(run["out"]) if os.path.exists(os.path.join(run["out"], "log.jsonl")) else []
        if run["error"] or not log:  # failed, or not run (or killed before its first log line)
            continue
        summary = summarize(log)
        if run["missing"]:  # cut: its curve so far
            run["curve"] = summary["curve"]
            continue
        # after SIGTERM nothing new is scored: a trained run's score is left to the same command, as a cut run is
        run.update(summary, val_whole=whole_val(paper_of[run["out"]], run["out"], None if stopped else scored))
        train = recorded.get("train_tokens") or (data and data.tokens("train"))
        run["epochs"] = run["tokens"] / train if train else None
    if args.append:
        runs = merge(os.path.join(args.out, "compare.json"), "runs", runs,
                     lambda r: (r["script"], r["variant"], r.get("seed")))
    for r in runs:  # against the baseline run of the same seed (none for the baseline itself)
        base = next((b for b in runs if b is not r and (b["script"], b["variant"], b.get("seed")) == (
            r["script"], r["baseline"], r.get("seed"))), None)
        diff = lambda k: r[k] - base[k] if r.get(k) is not None and base and base.get(k) is not None else None
        r["d_val"], r["d_whole"] = diff("val_loss"), diff("val_whole")
        r["to_base"] = None  # the share of the baseline's tokens this run needed to reach its final val loss
        at = {tokens: loss for tokens, _, loss in base.get("curve") or ()} if base else {}
        r["d_curve"] = [(tokens, loss - at[tokens]) for tokens, _, loss in r.get("curve") or () if tokens in at]
        r["d_cut"] = None  # a cut run: (share of the baseline's tokens, difference) at its last evaluation
        if r.get("missing") and r["d_curve"] and base.get("tokens"):  # a finished baseline
            r["d_cut"] = (r["d_curve"][-1][0] / base["tokens"], r["d_curve"][-1][1])
        if base and r["variant"] != r["baseline"] and base.get("val_loss") and r.get("curve") and not r.get("missing"):
            reach = tokens_to(r["curve"], base["val_loss"])
            r["to_base"] = "not reached" if reach is None else reach / base["tokens"]
    whole = lambda r: fmt(r.get("val_whole"), ".4f") + (f" ({r['d_whole']:+.4f})" if r.get("d_whole") is not None
                                                            and r["variant"] != r["baseline"] else "")
    head = ["script/variant", "seed", "tokens", "epochs", "val loss", "vs baseline", "whole val split (vs baseline)",
            "tokens to baseline's loss", "tokens/s", "MFU", "memory", "train time"]
    table = [[label(r), r.get("seed", "-"), fmt(r.get("tokens"), ","), fmt(r.get("epochs"), ".2f"),
              "failed" if r["error"] else fmt(r.get("missing") or r.get("val_loss"), ".4f"),
              f"{r['d_cut'][1]:+.4f} at {r['d_cut'][0]:.0%} of the tokens" if r.get("d_cut") else
              fmt(r.get("d_val"), "+.4f"), whole(r), fmt(r.get("to_base"), ".2f", "x"),
              fmt(r.get("tok_s") and r["tok_s"] / 1e3, ".1f", "k"), fmt(r.get("mfu") and 100 * r["mfu"], ".1f", "%"),
              fmt(r.get("mem_gb"), ".1f", " GiB"), fmt(r.get("train_s"), ".0f", " s")] for r in runs]
    info, machines = run_env(runs), run_machines(runs)
    sets = {r["script"]: r.get("data") for r in runs}
    data_line = args.data if len(set(sets.values())) == 1 else "; ".join(f"{k} {v}" for k, v in sets.items())
    if len(machines) > 1:  # runs made on several machines or commits: each its own (compare.json: all of them)
        for i, key in enumerate(("device", "torch", "git")):
            info[key] = " / ".join(dict.fromkeys(str(m[i]) for m in machines))
        print(f"data {data_line}; the runs' machines:\n" + "\n".join(
            f"- {m[0]}, torch {m[1]}, git {m[2]}: {', '.join(names)}" for m, names in machines.items()) + "\n")
    else:
        print(f"data {data_line}, {info['device']}, torch {info['torch']}, git {info['git']}\n")
    print(md_table(head, table))
    summary = seed_summary(runs)
    if any(len(v["d_val"]) > 1 for v in summary.values()):
        print("\n" + md_table(["script/variant", "seeds", "mean val loss", "vs baseline (mean)", "spread of the "
                                                                                              "difference"],
                              [[k, len(v["d_val"]), f"{v['val_loss']:.4f}", fmt(v["mean"], "+.4f"),
                                fmt(v["spread"], ".4f")] for k, v in summary.items()]))
    with core.atomic(os.path.join(args.out, "compare.json"), "w") as f:
        json.dump(dict(info, runs=runs, summary=summary), f, indent=1)
    plot_compare(runs, os.path.join(args.out, "compare.png"), f"val loss, {info['device']}")
    for r in runs:  # a run cut or not run (--report) has no log here to name
        if r["error"]:
            print(f"error: {label(r)}: {r['error']} (log: {r['out']}/stdout.txt)", file=sys.stderr)
        elif r.get("missing"):
            seed = f", seed {r['seed']}" if r.get("seed") is not None else ""
            print(f"note: {label(r)}{seed}: {r['missing']}", file=sys.stderr)
    if stopped and any(r["missing"] or scored and not r["error"] and r.get("val_whole") is None for r, _ in todo):
        print("interrupted (SIGTERM): the same command continues, cut runs from their checkpoints", file=sys.stderr)
        return 130
    if stopped:  # during the last run's whole-val score: it finished, the table is whole
        print("SIGTERM came after the last run was trained and scored: nothing was cut", file=sys.stderr)
    return 1 if any(r["error"] for r in runs) else 0


def compare_cmd(args, s, path, variant, preset):
    """The training command of one --compare row (without seed and --out), its step count and its label (a variant as
    its config names it, e.g. reflex's split; a bench row by its name): --tokens sets the steps from the row's tokens
    per step; warm-up a tenth, an evaluation (each one a checkpoint) every steps // --evals steps."""
    over = dict(batch_size=args.batch or None, block_size=int(args.seq) if args.seq else None)
    cfg = make_cfg(s, variant, preset, **over)
    n = math.ceil(args.tokens / (cfg.batch_size * cfg.grad_accum * cfg.block_size)) if args.tokens else args.max_iters
    flags = ["--data", args.data, "--max-iters", n, "--warmup-iters", max(1, n // 10), "--eval-interval",
             max(1, n // args.evals), "--log-interval", max(1, min(25, n // 10))]
    for flag, value in (("--batch-size", args.batch), ("--block-size", args.seq), ("--attn-impl", args.impl),
                        ("--device", args.device), ("--dtype", args.dtype), ("--eval-iters", args.eval_iters)):
        flags += [flag, value] if value and value != "auto" else []
    flags += [] if args.compile else ["--no-compile"]
    return [sys.executable, path, "--train", "--preset", preset, *row_flags(s, variant), *map(str, flags)], n, \
        row_label(s, variant, cfg)


def tokens_to(curve, target):
    """Training tokens at which a val curve [(tokens, time, loss), ...] first reaches target, linear between its
    evaluations (the first evaluation's tokens, an upper bound, when it is already there); None if it never does."""
    prev = None
    for tokens, _, loss in curve:
        if loss <= target:
            if prev is None:
                return tokens
            return prev[0] + (tokens - prev[0]) * (prev[1] - target) / (prev[1] - loss)
        prev = tokens, loss
    return None


def prior_run(out, cmd, steps, fresh, report=False):
    """What --compare does with an --out: 'new' (nothing there, or --fresh), 'done' (its log reached the last step
    with these flags: its results are reused, also without its checkpoint, e.g. logs copied back from a GPU machine),
    'resume' (cut short with these flags, checkpoint kept) or 'cut' (cut short, no checkpoint: trained again)."""
    log = os.path.join(out, "log.jsonl")
    if fresh or not (os.path.exists(os.path.join(out, "ckpt.pt")) or os.path.exists(log)):
        return "new"
    def strip(argv):  # the flags that make the run; --out is only where it lies (a run folder may be moved)
        argv = [a for a in argv if a not in ("--resume", "--overwrite")]
        i = argv.index("--out") if "--out" in argv else len(argv)
        return argv[:i] + argv[i + 2:]
    before = core.read_run(out).get("argv", [])
    if strip(before[1:]) != strip(cmd[2:]):
        made = f"{out} holds a run made with other flags ({' '.join(strip(before[1:]))})"
        raise core.ConfigError(f"{made}: --report takes the comparison's own flags" if report else
                               f"{made}: --fresh starts the comparison over, or choose another --out")
    if last_step(out) >= steps:
        return "done"
    return "resume" if os.path.exists(os.path.join(out, "ckpt.pt")) else "cut"


def last_step(out):
    with contextlib.suppress(core.ConfigError, IndexError):
        return core.read_log(out)[-1]["step"]
    return 0


def seed_summary(runs):
    """Per script/variant over seeds: mean val loss, mean difference to the baseline and its spread (max - min)."""
    groups = {}
    for r in runs:
        if r.get("val_loss") is not None and r["variant"] != r["baseline"]:
            g = groups.setdefault(label(r), dict(val=[], d_val=[]))
            g["val"].append(r["val_loss"])
            if r.get("d_val") is not None:
                g["d_val"].append(r["d_val"])
    return {k: dict(val_loss=statistics.mean(g["val"]), d_val=g["d_val"],
                    mean=statistics.mean(g["d_val"]) if g["d_val"] else None,
                    spread=max(g["d_val"]) - min(g["d_val"]) if len(g["d_val"]) > 1 else None)
            for k, g in groups.items()}


def plot_compare(runs, png, title):
    """One column per script (each its own data and loss unit): val loss against training tokens (top), its
    difference to the baseline of the same seed at the same tokens (middle: the claims are differences of a few
    hundredths, invisible on the top row) and val loss against training time (bottom); baselines dashed, runs cut
    short dotted, one line per seed. Scripts with nothing to draw: none."""
    pyplot = core.pyplot()
    names = list(dict.fromkeys(r["script"] for r in runs if r.get("curve")))  # scripts with a run to draw
    if not names:
        return
    fig, axes = pyplot.subplots(3, len(names), figsize=(4.5 * len(names) + 1, 10), squeeze=False)
    seeds = sorted({r.get("seed") for r in runs}, key=str)
    marker = {seed: "os^vD"[i % 5] for i, seed in enumerate(seeds)}  # a variant's seeds share its colour
    for col, name in enumerate(names):
        mine = [r for r in runs if r["script"] == name]
        colors = {v: pyplot.cm.tab10(i % 10) for i, v in enumerate(dict.fromkeys(r["variant"] for r in mine))}
        late = [0.0]  # differences past a quarter of the tokens set the middle row's scale (early ones are large)
        for r in mine:
            if r.get("curve"):
                tokens, times, loss = zip(*r["curve"])
                seed = f" seed {r['seed']}" if len(seeds) > 1 else ""
                style = dict(color=colors[r["variant"]], marker=marker[r.get("seed")], ms=3, ls=":" if r.get("missing")
                             else "--" if r["variant"] == r["baseline"] else "-",
                             label=label(r).split("/", 1)[-1] + seed + (" (cut)" if r.get("missing") else ""))
                axes[0, col].plot(tokens, loss, **style)
                axes[2, col].plot(times, loss, **style)
                if r["d_curve"]:  # none for a baseline
                    axes[1, col].plot(*zip(*r["d_curve"]), **style)
                    late += [d for t, d in r["d_curve"] if t >= max(tokens) / 4]
        if any(r.get("d_curve") for r in mine):
            axes[1, col].axhline(0, color="gray", ls="--", lw=1)  # the baselines
            pad = 0.1 * (max(late) - min(late)) + 1e-3
            axes[1, col].set_ylim(min(late) - pad, max(late) + pad)
        else:  # its baseline alone so far
            axes[1, col].text(0.5, 0.5, "no variant to compare yet", ha="center", transform=axes[1, col].transAxes)
            axes[1, col].set_axis_off()
        axes[0, col].set_title(f"{name} ({os.path.basename(os.path.normpath(mine[0].get('data') or ''))})",
                               fontsize=9)
        unit = "byte" if mine[0].get("tokenizer") == "bytes" else "token"
        labels = ((f"val loss (nats per {unit})", "training tokens"), (f"val loss - baseline's (nats per {unit})",
                  "training tokens"), (f"val loss (nats per {unit})", "training time (s, compilation and evaluation "
                                                                        "excluded)"))
        for row, (y, x) in enumerate(labels):
            axes[row, col].set(xlabel=x, ylabel=y)
            axes[row, col].grid(alpha=0.3)
        axes[0, col].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    core.layout(fig)
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png, dpi=110)
    pyplot.close(fig)


def ddp(args, gpu):
    """The core baseline trained with identical flags on 1 process and under torchrun on N: tokens/s and
    efficiency = tokens/s(N) / (N x tokens/s(1)); each rank keeps the same micro-batch (weak scaling)."""
    n = args.ddp
    os.makedirs(args.out, exist_ok=True)
    flags = ["--train", "--preset", preset_for("core", parse_presets(args.preset), gpu), "--data", args.data,
             "--max-iters", args.max_iters, "--log-interval", max(1, args.max_iters // 6), "--eval-interval",
             args.max_iters, "--eval-iters", 1, "--warmup-iters", 1]
    flags += ["--batch-size", args.batch] if args.batch else []
    flags += ["--device", args.device] if args.device != "auto" else []
    rows = []
    for world in (1, n):
        out = os.path.join(args.out, f"ddp{world}")
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
        print(f"training on {world} process{'es' if world > 1 else ''}, {args.max_iters} steps (progress: "
              f"{out}/stdout.txt)", file=sys.stderr, flush=True)
        err = train_run([sys.executable, *launch, "core.py", *map(str, flags), "--out", out], out)
        if err:
            raise core.ConfigError(f"{world}-process run failed: {err} (log: {out}/stdout.txt)")
        rows.append(dict(world=world, out=out, **summarize(core.read_log(out))))
    eff = rows[1]["tok_s"] / (n * rows[0]["tok_s"])
    print(md_table(["processes", "tokens/s", "MFU"], [[r["world"], f"{r['tok_s'] / 1e3:.1f}k",
                                                      fmt(r["mfu"] and 100 * r["mfu"], ".1f", "%")] for r in rows]))
    print(f"\nscaling efficiency {n} vs 1: {100 * eff:.1f}%")
    with core.atomic(os.path.join(args.out, "ddp.json"), "w") as f:
        json.dump(dict(run_env(rows), runs=rows, efficiency=eff), f, indent=1)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Downstream evaluation: log-likelihood scorer, multiple choice on local JSONL, the lm-eval adapter


class Scorer:
    """Log-likelihoods and greedy continuations of one model (the engine of the MC scorer and of the adapter)."""

    def __init__(self, model, tok, prefix, batch_size=16, name=""):
        self.model, self.tok, self.prefix, self.batch_size = model.eval(), tok, prefix, batch_size
        self.name = name  # which model and dataset: the head of its scores table
        self.device = next(model.parameters()).device
        self.T = model.cfg.block_size

    def encode_pair(self, context, continuation):
        """lm-eval's split: trailing spaces of the context move to the continuation; the continuation's tokens are
        those of context + continuation after the context's (BPE merges across the boundary stay consistent)."""
        if not context:
            return [self.prefix], self.tok.encode(continuation)
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        ctx = self.tok.encode(context)
        return ctx, self.tok.encode(context + continuation)[len(ctx):]

    @torch.no_grad()
    def score_tokens(self, pairs):
        """[(context ids, continuation ids)] -> [(summed log-prob of the continuation, is it the greedy one)].
        Contexts are cut from the left to fit block_size; batches are right-padded (causal: padding is never seen), or
        hold rows of one length where the model's logits depend on the length (not model.length_free: sparse_byte)."""
        out = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        length = lambda i: min(len(pairs[i][0]) + len(pairs[i][1]), self.T + 1)
        key = (lambda i: 0) if self.model.length_free else length
        groups = [list(g) for _, g in itertools.groupby(order, key)]  # order is by length: a key's rows are adjacent
        for chunk in [g[b:b + self.batch_size] for g in groups for b in range(0, len(g), self.batch_size)]:
            seqs = [(pairs[i][0] + pairs[i][1])[-(self.T + 1):][:-1] for i in chunk]
            x = torch.zeros(len(chunk), max(map(len, seqs)), dtype=torch.long)
            for j, s in enumerate(seqs):
                x[j, :len(s)] = torch.tensor(s)
            with core.autocast(self.device, self.model.cfg):
                logits = self.model(x.to(self.device))  # (B, T, V)
            for j, i in enumerate(chunk):
                cont = pairs[i][1]
                if len(cont) > self.T:
                    raise core.ConfigError(f"a continuation of {len(cont)} tokens exceeds block_size {self.T}")
                lp = logits[j, len(seqs[j]) - len(cont):len(seqs[j])].float().log_softmax(-1)  # (n, V): predict cont
                target = torch.tensor(cont, device=lp.device)
                out[i] = (lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all()))
        return out

    def loglikelihood(self, requests):
        """[(context, continuation)] -> [(log-likelihood, is_greedy)]"""
        return self.score_tokens([self.encode_pair(c, x) for c, x in requests])

    def rolling(self, text):
        """Log-likelihood of the whole text after the prefix token, in windows of block_size predictions, each with
        as much context as fits (lm-eval's loglikelihood_rolling)."""
        seq = [self.prefix] + self.tok.encode(text)
        pairs = [(seq[max(0, b - 1 - self.T):a], seq[a:b])
                 for a, b in ((a, min(a + self.T, len(seq))) for a in range(1, len(seq), self.T))]
        return sum(ll for ll, _ in self.score_tokens(pairs))

    @torch.no_grad()
    def generate(self, context, until=(), max_gen_toks=256, do_sample=False, temperature=0.0, **_):
        """Greedy (or sampled) continuation, cut at the first stop string or the end-of-text token."""
        until = [until] if isinstance(until, str) else list(until)
        ids, new = self.tok.encode(context) or [self.prefix], []
        for _ in range(max_gen_toks):
            x = torch.tensor([(ids + new)[-self.T:]], device=self.device)
            with core.autocast(self.device, self.model.cfg):
                logits = self.model(x)[0, -1].float()
            nxt = (torch.multinomial((logits / temperature).softmax(-1), 1).item() if do_sample and temperature > 0
                   else logits.argmax().item())
            if nxt == self.tok.eot_token:
                break
            new.append(nxt)
            text = self.tok.decode(new)
            if any(u in text for u in until):
                break
        text = self.tok.decode(new)
        return text[:min([text.index(u) for u in until if u in text], default=len(text))]


def tokenizer_of(data):
    """(tokenizer, prefix token) of a dataset directory: the end-of-text token, or a newline without one."""
    meta_path = os.path.join(data or "", "meta.json")
    if not data or not os.path.exists(meta_path):
        raise core.ConfigError(f"no dataset meta.json at {data!r}: pass --data (the model's dataset) for its tokenizer")
    try:
        meta = json.load(open(meta_path))
        name = meta.get("tokenizer", "gpt2")
    except (ValueError, AttributeError) as e:
        raise core.ConfigError(f"{meta_path}: not a valid dataset description ({e})") from None
    tok = core.get_tokenizer(name)
    prefix = next((t for t in (meta.get("eot_token"), tok.eot_token) if t is not None), None)
    return tok, tok.encode("\n")[0] if prefix is None else prefix


def load_scorer(path, script_name=None, data=None, device="auto", batch_size=16):
    """A Scorer for a checkpoint of any script (the one recorded in it, or --script); the tokenizer is that of
    `data`, else of the model's own dataset."""
    ckpt = core.load_checkpoint(path)
    name = script_name or core.written_by(ckpt, path)
    if not name:
        raise core.ConfigError(f"cannot tell which script wrote {path}: pass --script NAME")
    s = script(name)
    src, state, info, _ = core.read_model(s, path, ckpt=ckpt)
    model = core.load_state(s.build_model(core.config_from_dict(s.config, src)), state, path)
    device = core.resolve_device(argparse.Namespace(device=device))
    data = data or (info or {}).get("path") or src.get("data")
    tok, prefix = tokenizer_of(data)
    if (info or {}).get("tokenizer") not in (None, tok.name):  # its ids would index another vocabulary
        raise core.ConfigError(f"{data} holds {tok.name} tokens; the model was trained on {info['tokenizer']}: pass "
                               "--data with its tokenizer")
    name = f"{s.label(model.cfg)} ({path}), {tok.name} tokens of {data}"
    return Scorer(model.to(device), tok, prefix, batch_size, name)


def read_mc(path):
    docs = []
    try:
        lines = open(path, encoding="utf-8").readlines()
    except UnicodeDecodeError:
        raise core.ConfigError(f"{path}: not UTF-8 text") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        d = None
        with contextlib.suppress(ValueError):
            d = json.loads(line)
        if not (isinstance(d, dict) and isinstance(d.get("context"), str) and isinstance(d.get("choices"), list)
                and d["choices"] and all(isinstance(c, str) for c in d["choices"])
                and isinstance(d.get("label"), int) and 0 <= d["label"] < len(d["choices"])):
            raise core.ConfigError(f"{path}, line {i}: needs context (str), choices (list of str), label (index)")
        docs.append(d)
    if not docs:
        raise core.ConfigError(f"{path}: no examples")
    return docs


def mc_score(scorer, path, limit=0):
    """Zero-shot multiple choice: -> dict(acc, acc_norm, their stderr, n, lls (per doc, per choice))."""
    docs = read_mc(path)[:limit or None]
    flat = [ll for ll, _ in scorer.loglikelihood([(d["context"], c) for d in docs for c in d["choices"]])]
    lls, hits, hits_norm = [], 0, 0
    for d in docs:
        s, flat = flat[:len(d["choices"])], flat[len(d["choices"]):]
        norm = [x / max(1, len(c.encode())) for x, c in zip(s, d["choices"])]
        hits += max(range(len(s)), key=s.__getitem__) == d["label"]
        hits_norm += max(range(len(s)), key=norm.__getitem__) == d["label"]
        lls.append(s)
    n = len(docs)
    se = lambda p: math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else None
    return dict(acc=hits / n, acc_stderr=se(hits / n), acc_norm=hits_norm / n, acc_norm_stderr=se(hits_norm / n),
                n=n, lls=lls)


@functools.cache
def lm_eval_adapter():
    """The lm-eval model class, registered as 'attnlab' (lm-eval is imported here: an optional dependency).
    model_args: pretrained=CKPT[,script=NAME][,data=DATASET_DIR][,device=cuda][,batch_size=16]."""
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError:
        raise core.ConfigError("lm-eval tasks need lm-eval: pip install lm-eval (local .jsonl tasks do not)") from None

    @register_model("attnlab")
    class AttnlabLM(LM):
        def __init__(self, pretrained=None, script=None, data=None, device=None, batch_size=None, scorer=None, **_):
            super().__init__()
            if scorer is None and not pretrained:
                raise core.ConfigError("the attnlab model needs model_args pretrained=CKPT")
            bs = int(batch_size) if str(batch_size).isdigit() else 16  # lm-eval may pass 'auto'
            self.scorer = scorer or load_scorer(pretrained, script, data, device or "auto", bs)
            self._device = self.scorer.device

        def loglikelihood(self, requests):
            return self.scorer.loglikelihood([r.args for r in requests])

        def loglikelihood_rolling(self, requests):
            return [self.scorer.rolling(r.args[0]) for r in requests]

        def generate_until(self, requests):
            return [self.scorer.generate(r.args[0], **r.args[1]) for r in requests]
    return AttnlabLM


def mc_task(path, name=None):
    """An lm-eval task config for a local multiple-choice JSONL (no network)."""
    return dict(task=name or os.path.splitext(os.path.basename(path))[0], dataset_path="json",
                dataset_kwargs=dict(data_files=dict(test=os.path.abspath(path))), test_split="test",
                output_type="multiple_choice", doc_to_text="{{context}}", doc_to_choice="{{choices}}",
                doc_to_target="{{label}}", target_delimiter="",
                metric_list=[dict(metric=m, aggregation="mean", higher_is_better=True) for m in ("acc", "acc_norm")])


def run_lm_eval(scorer, tasks, limit=0, **kw):
    """lm-eval's simple_evaluate on our model: tasks are names, .yaml files or config dicts. -> its result dict."""
    model = lm_eval_adapter()(scorer=scorer)
    import lm_eval
    from lm_eval.tasks import TaskManager
    manager = TaskManager(include_defaults=any(isinstance(t, str) and not t.endswith((".yaml", ".yml")) for t in tasks))
    try:
        return lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, limit=limit or None, **kw)
    except OSError as e:  # e.g. a task's data on the Hugging Face Hub, offline (ConnectionError)
        raise core.ConfigError(f"lm-eval could not load its task data: {e}".replace("\n", " ")) from None


def run_tasks(scorer, tasks, limit=0):
    """Comma list of tasks: local .jsonl files with our scorer, the rest with lm-eval; prints one table."""
    rows, names = [], [t for t in tasks.split(",") if t]
    for t in [t for t in names if t.endswith(".jsonl")]:
        if not os.path.isfile(t):
            raise core.ConfigError(f"task file not found: {t}")
        r = mc_score(scorer, t, limit)
        rows += [[os.path.basename(t), m, f"{r[m]:.4f}", fmt(r[m + "_stderr"], ".4f"), r["n"]]
                 for m in ("acc", "acc_norm")]
    others = [t for t in names if not t.endswith(".jsonl")]
    if others:
        res = run_lm_eval(scorer, others, limit)
        for task, metrics in res["results"].items():
            for key, value in metrics.items():
                metric, _, _ = key.partition(",")
                if isinstance(value, float) and not metric.endswith("_stderr"):
                    stderr = metrics.get(key.replace(metric, metric + "_stderr"))
                    stderr = stderr if isinstance(stderr, float) else None
                    n = res.get("n-samples", {}).get(task, {}).get("effective", "-")
                    rows.append([task, metric, f"{value:.4f}", fmt(stderr, ".4f"), n])
    print(md_table(["task", "metric", "value", "stderr", "n"], rows))
    return rows


def lm_eval_cli(argv):
    """lm-eval's own command line with the 'attnlab' model registered."""
    lm_eval_adapter()
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = core._Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--papers", default="", help="comma list of scripts (core, exoformer, ..., or a path to your own .py; "
                                   "default: every script found; --compare: the papers)")
    a("--variants", default="", help="all, main (baseline + main variant) or a comma list (default: all; --compare: "
                                     "main; --scaling: each paper's main variant, the core GPT as the baseline)")
    a("--preset", default="", help="preset for every script and/or script=preset entries, comma separated "
                                   "(default: the 124m class: 124m, cogformer=141m-gpt2, reflex=124m-8h; tiny on CPU)")
    a("--block-size", "--seq", dest="seq", default="", help="sequence length(s) T, comma list (default: the "
                                                            "preset's; --scaling 1024..8192)")
    a("--batch-size", "--batch", dest="batch", type=int, default=0, help="micro-batch size (default: the preset's "
                                                                       "tokens per step)")
    a("--impl", default="auto", help="attention path(s), comma list, or all (every fast path and eager)")
    a("--device", default="auto", help="auto, cpu or cuda")
    a("--dtype", default="auto", help="auto (bfloat16 on GPU), float32 or bfloat16")
    a("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile on GPU")
    a("--steps", type=int, default=20, help="timed steps per row (after --warmup)")
    a("--warmup", type=int, default=5, help="untimed steps per row (compilation)")
    a("--jobs", type=int, default=1, help="speed: rows compiling at once (each then timed alone; one GPU holds them "
                                          "all); --compare: runs training at once, one per GPU where there are several")
    a("--out", default="", help="output directory (default runs/bench, runs/compare, runs/ddp)")
    a("--append", action="store_true", help="merge into <out>'s bench.json / scaling.json / compare.json (rows run "
                                            "again are replaced) and redraw: one table from several runs")
    a("--scaling", action="store_true", help="time T = 1024, 2048, 4096, 8192 (tokens per step kept)")
    a("--compare", action="store_true", help="train baseline and main variant of each paper with identical flags")
    a("--ddp", type=int, default=0, help="train the core baseline on 1 and on N GPUs (torchrun): scaling efficiency")
    a("--data", default="", help="--compare / --ddp: dataset directory (default data/docs); --eval-tasks: the "
                                 "model's dataset, for its tokenizer (default: the one in the checkpoint)")
    a("--max-iters", type=int, default=300, help="--compare / --ddp: optimizer steps per run")
    a("--tokens", type=float, default=0, help="--compare: training tokens per run (sets the steps from each row's "
                                              "tokens per step; e.g. 1e8)")
    a("--seeds", default="", help="--compare: comma list of seeds, every variant trained once per seed (default: "
                                  "--seed)")
    a("--fresh", action="store_true", help="--compare: start every run over (default: reuse finished runs made with "
                                           "the same flags and resume cut ones)")
    a("--report", action="store_true", help="--compare: train nothing; tabulate and plot the runs already in --out "
                                            "(cut or missing ones are named)")
    a("--whole-val", action=argparse.BooleanOptionalAction, default=True, help="--compare: score each trained run "
                                                                            "on the whole val split (minutes on a CPU)")
    a("--eval-iters", type=int, default=None, help="--compare: val batches per evaluation (default: the preset's)")
    a("--evals", type=int, default=6, metavar="K",
      help="--compare: an evaluation (a checkpoint and a point of the curve) every steps // K steps and at the last "
           "step: K, or K + 1 where K does not divide the steps")
    a("--seed", type=int, default=1337, help="--compare: seed of every run")
    a("--eval-tasks", default="", help="downstream eval of --init-from: comma list of lm-eval tasks / .yaml / .jsonl "
                                       "files")
    a("--init-from", "--ckpt", dest="ckpt", default="", help="--eval-tasks: checkpoint of any script")
    a("--script", default="", help="--eval-tasks: the script that wrote --init-from (default: the one it records)")
    a("--limit", type=int, default=0, help="--eval-tasks: at most N examples per task")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["--lm-eval"]:
            return lm_eval_cli(argv[1:])
        args = build_parser().parse_args(argv)
        gpu = args.device != "cpu" and torch.cuda.is_available()
        if args.eval_tasks:
            if not args.ckpt:
                raise core.ConfigError("--eval-tasks needs --init-from (a checkpoint of any script)")
            if args.limit < 0:
                raise core.ConfigError("--limit must be >= 0 (0: every example)")
            scorer = load_scorer(args.ckpt, args.script, args.data, args.device, args.batch or 16)
            print(f"{scorer.name}:", flush=True)
            run_tasks(scorer, args.eval_tasks, args.limit)
            return 0
        if args.jobs < 1:
            raise core.ConfigError("--jobs must be at least 1")
        if args.batch < 0 or args.steps < 1 or args.warmup < 0:  # every row skipped, or a ZeroDivisionError row
            raise core.ConfigError("--batch-size must be >= 0 (0: the preset's), --steps >= 1, --warmup >= 0")
        if args.max_iters < 1 or not 0 <= args.tokens < math.inf:  # nan too: a traceback; 0 steps: a run of nothing
            raise core.ConfigError("--max-iters must be at least 1 and --tokens a number >= 0")
        if args.ddp < 0 or args.ddp == 1:  # --ddp 1 trained into ddp1 twice
            raise core.ConfigError("--ddp takes a number of processes >= 2")
        args.data = args.data or "data/docs"
        args.out = args.out or os.path.join("runs", "compare" if args.compare else "ddp" if args.ddp else "bench")
        if args.compare:
            return compare(args, gpu)
        if args.ddp:
            return ddp(args, gpu)
        return speed(args, gpu)
    except core.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
