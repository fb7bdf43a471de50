"""Memory banks at scale: build and query caption indexes of 100k–10M entries, on real text.

    python benchmarks/bank_scale.py embed                 # real-text embeddings (cached)
    python benchmarks/bank_scale.py scale --sizes 100000 1000000 10000000
    python benchmarks/bank_scale.py fanin                 # videos --for-training encodes at 423k
    python benchmarks/bank_scale.py lazy                  # time to the first video, toy world
    python benchmarks/bank_scale.py sizes                 # bytes per video of an exported bank

Real text (``text_corpus.py``): 423k OpenVid-style captions from a caption grammar, VBench's and
PhyGenBench's 1,104 prompts and three paraphrases of each, embedded with all-MiniLM-L6-v2 (the
model the toy world ships, 384-d). Queries are *other* paraphrases: of every benchmark prompt
(1,104) and of 1,000 bank captions. Banks above the real part are filled with vectors drawn
around the real embeddings (a kernel density estimate: a real vector plus Gaussian noise,
renormalised, cosine 0.85 to its seed), so the added entries crowd the real neighbourhoods as a
bigger caption set would. Every bank is built with the package (``make_index`` in chunks, a
training sample, ``write_index_folder``) and opened and queried in a fresh process through
``Retriever`` (what ``MemoryBank`` uses), which reports its resident memory (VmHWM). Recall@5
is against exact search over the same vectors. Embeddings and banks live under
``benchmarks/.cache`` (gitignored); 10M vectors are a 15 GB memory map there.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
N_CAPTIONS = 423_000  # OpenVid-HD
COSINE = 0.85  # filler vector · its seed
CHUNK = 65536
sys.path.insert(0, str(HERE))


def _embedder():
    from dit_mem.retrieval.embedder import load_embedder

    return load_embedder()


def embed(args) -> None:
    """Embed the real text once (about 17 minutes on 2 CPU cores)."""
    from text_corpus import benchmark_prompts, grammar_captions, paraphrase

    CACHE.mkdir(exist_ok=True)
    emb = _embedder()
    caps = grammar_captions(N_CAPTIONS, seed=0)
    prompts = benchmark_prompts()
    rng = random.Random(1)
    bank_para = [paraphrase(p, rng) for p in prompts for _ in range(3)]
    rq = random.Random(2)
    queries = [paraphrase(p, rq) for p in prompts]
    queries += [paraphrase(c, rq) for c in rq.sample(caps, 1000)]
    texts = {"queries": queries, "prompts": prompts + bank_para, "captions": caps}
    for name, items in texts.items():
        path = CACHE / f"{name}.npy"
        if path.is_file():
            continue
        t = time.perf_counter()
        v = emb.encode(items, batch_size=256, progress=True)
        np.save(CACHE / f".tmp-{name}.npy", v)
        os.replace(CACHE / f".tmp-{name}.npy", path)
        (CACHE / f"{name}.json").write_text(json.dumps(items))
        print(f"{name}: {len(items)} texts in {time.perf_counter() - t:.0f} s", flush=True)


def real_vectors() -> np.ndarray:
    return np.concatenate([np.load(CACHE / "prompts.npy"), np.load(CACHE / "captions.npy")])


def bank_vectors(n: int) -> np.ndarray:
    """``n`` bank vectors: the real ones first, then filler, as a memory map (made once)."""
    real = real_vectors()
    if n <= len(real):
        return real[:n]
    path = CACHE / f"vectors-{n}.npy"
    if path.is_file():
        return np.load(path, mmap_mode="r")
    d = real.shape[1]
    sigma = np.sqrt((1 / COSINE**2 - 1) / d)
    tmp = CACHE / f".tmp-vectors-{n}.npy"
    out = np.lib.format.open_memmap(tmp, "w+", np.float32, (n, d))
    out[: len(real)] = real
    for j, start in enumerate(range(len(real), n, CHUNK)):
        m = min(CHUNK, n - start)
        rng = np.random.default_rng(1000 + j)
        x = real[rng.integers(0, len(real), m)] + sigma * rng.standard_normal((m, d), np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    os.replace(tmp, path)
    return np.load(path, mmap_mode="r")


def _rss_mb(key: str = "VmRSS") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return float("nan")


def build(n: int, kind: str, factory: str | None) -> Path:
    """A bank index folder of ``n`` entries (made once)."""
    import pandas as pd

    from dit_mem.retrieval.index import factory_string, make_index, write_index_folder

    vectors = bank_vectors(n)
    spec = factory or factory_string(kind, n, vectors.shape[1])
    folder = CACHE / f"index-{n}-{spec.replace(',', '_').replace('(', '-').replace(')', '')}"
    if (folder / "manifest.json").is_file():
        return folder
    t = time.perf_counter()
    index = make_index(vectors, kind, factory=spec, progress=True)
    seconds = time.perf_counter() - t
    ids = pd.Series(np.arange(n)).map("v{:08d}_0_0to1".format)
    table = pd.DataFrame({"id": ids, "caption": "", "video": ids + ".mp4"})
    manifest = {
        "model": "all-MiniLM-L6-v2",
        "dim": int(vectors.shape[1]),
        "pooling": "mean",
        "kind": kind,
        "factory": spec,
        "rows": n,
        "seconds": {"build": round(seconds, 1)},
    }
    rerank = vectors if kind == "pq" and factory is None else None
    write_index_folder(folder, index, table, manifest, rerank=rerank)
    print(f"built {folder.name}: {seconds:.0f} s", flush=True)
    return folder


def query(args) -> None:
    """In a fresh process: open the index with Retriever, report memory, latency, recall."""
    import faiss

    from dit_mem.retrieval import Retriever

    faiss.omp_set_num_threads(args.threads)
    rss0 = _rss_mb()
    t = time.perf_counter()
    r = Retriever(args.folder, nprobe=args.nprobe, ef_search=args.ef_search, k_factor=args.k_factor)
    t_open = time.perf_counter() - t
    q = np.load(CACHE / "queries.npy")
    truth = np.load(args.truth)
    t = time.perf_counter()
    found = [r.search(q[i : i + 64], 5) for i in range(0, len(q), 64)]
    batch_ms = (time.perf_counter() - t) / len(q) * 1000
    rows = [r.id_map.rows_of(hit.ids) for part in found for hit in part]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(truth.tolist(), rows, strict=True)])
    bench = np.mean(
        [len(set(a) & set(b)) / 5 for a, b in zip(truth[:1104].tolist(), rows[:1104], strict=True)]
    )
    single = []
    for i in range(200):
        t = time.perf_counter()
        r.search(q[i : i + 1], 5)
        single.append((time.perf_counter() - t) * 1000)
    print(
        json.dumps(
            {
                "open_s": round(t_open, 2),
                "rss_before_open_mb": round(rss0, 0),
                "rss_mb": round(_rss_mb(), 0),
                "rss_anon_mb": round(_rss_mb("RssAnon"), 0),
                "rss_file_mb": round(_rss_mb("RssFile"), 0),
                "peak_rss_mb": round(_rss_mb("VmHWM"), 0),
                "recall_at_5": round(float(recall), 4),
                "recall_at_5_benchmark_prompts": round(float(bench), 4),
                "ms_per_query_1": round(float(np.median(single)), 3),
                "ms_per_query_64": round(batch_ms, 3),
            }
        )
    )


def scale(args) -> None:
    from dit_mem.retrieval.index import exact_search

    results = []
    q = np.load(CACHE / "queries.npy")
    for n in args.sizes:
        vectors = bank_vectors(n)
        truth_path = CACHE / f"truth-{n}.npy"
        if not truth_path.is_file():
            t = time.perf_counter()
            np.save(truth_path, exact_search(vectors, q, 5)[1])
            print(f"exact top-5 over {n}: {time.perf_counter() - t:.0f} s", flush=True)
        for kind, factory, settings in _configs(n, args):
            folder = build(n, kind, factory)
            index_bytes = (folder / "index.faiss").stat().st_size
            build_s = json.loads((folder / "manifest.json").read_text())["seconds"]["build"]
            for setting in settings:
                cmd = [sys.executable, __file__, "query", str(folder), str(truth_path)]
                cmd += [f"--{k.replace('_', '-')}={v}" for k, v in setting.items()]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                row = {
                    "entries": n,
                    "index": factory or kind,
                    "factory": json.loads((folder / "manifest.json").read_text())["factory"],
                    **setting,
                    "index_mb": round(index_bytes / 1e6, 1),
                    "build_s": build_s,
                    **json.loads(out.strip().splitlines()[-1]),
                }
                results.append(row)
                print(json.dumps(row), flush=True)
                with (CACHE / "scale.jsonl").open("a") as f:
                    f.write(json.dumps(row) + "\n")
    _table(results)


def _configs(n: int, args):
    if args.kinds:
        return [(k, None, [{}]) for k in args.kinds]
    if n <= 500_000:
        return [
            ("flat", None, [{}]),
            ("hnsw", None, [{"ef_search": 64}, {"ef_search": 128}]),
            ("ivf", None, [{"nprobe": 16}, {"nprobe": 32}]),
        ]
    pq = [
        {"nprobe": 16, "k_factor": 4},
        {"nprobe": 32, "k_factor": 4},
        {"nprobe": 32, "k_factor": 8},
    ]
    return [("pq", None, pq)]


def _table(results) -> None:
    cols = ["entries", "factory", "nprobe", "ef_search", "k_factor", "index_mb", "build_s"]
    cols += ["peak_rss_mb", "ms_per_query_1", "ms_per_query_64", "recall_at_5"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


def fanin(args) -> None:
    """Videos that training reads: 10k training samples drawn from a 423k bank of real-text
    embeddings, each retrieving its top k with its own source left out (training's rule)."""
    import faiss

    from dit_mem.retrieval.index import exact_search

    caps = np.load(CACHE / "captions.npy")
    rng = np.random.default_rng(0)
    train = rng.choice(len(caps), args.samples, replace=False)
    faiss.omp_set_num_threads(2)
    _, rows = exact_search(caps, caps[train], args.k + 1)  # +1: the sample's own row
    keep = [
        [r for r in row if r != t][: args.k] for row, t in zip(rows.tolist(), train, strict=True)
    ]
    retrieved = {r for row in keep for r in row}
    union = retrieved | set(train.tolist())
    print(
        json.dumps(
            {
                "bank": len(caps),
                "training_samples": args.samples,
                "k": args.k,
                "retrieved_distinct": len(retrieved),
                "to_encode": len(union),
                "share_of_bank": round(len(union) / len(caps), 4),
            }
        )
    )


def lazy(args) -> None:
    """Time from a CSV + video folder to the first memory-guided video on the toy world: the
    shipped base model and encoder, the toy world's 576 bank clips as mp4 files; one process
    per command, as a user runs them (model loads included)."""
    import csv
    import shutil

    from dit_mem.evaluation.video_io import write_mp4
    from dit_mem.toyworld.memory_bank import BankStageConfig, bank_clips
    from dit_mem.toyworld.world import render

    assets = Path(__file__).resolve().parents[1] / "dit_mem" / "toyworld" / "assets"
    root = CACHE / "lazy"
    videos = root / "videos"
    if not (root / "bank.csv").is_file():
        videos.mkdir(parents=True, exist_ok=True)
        items = bank_clips(BankStageConfig())
        for c in items:
            write_mp4(videos / f"{c.id}.mp4", render(c))
        with (root / "bank.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["video", "caption"])
            w.writerows([f"{c.id}.mp4", c.caption] for c in items)
    cli = [sys.executable, "-m", "dit_mem.cli"]
    build = [*cli, "bank", "build", "--csv", str(root / "bank.csv"), "--videos", str(videos)]
    build += ["--base-model", str(assets / "base"), "--num-frames", "9", "--height", "32"]
    build += ["--width", "32", "--num-workers", "0"]
    report = {}
    for mode in ("eager", "lazy"):
        bank, out = root / f"bank-{mode}", root / f"out-{mode}"
        shutil.rmtree(bank, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        gen = [*cli, "generate", "--toyworld", "--prompt", "a magenta circle moving left"]
        gen += ["--out", str(out), f"bank={bank}", "progress=false"]
        times = {}
        for name, cmd in (
            ("build", [*build, "--bank", str(bank)] + (["--lazy"] if mode == "lazy" else [])),
            ("first_video", gen),
        ):
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            times[name] = round(time.perf_counter() - t, 1)
        times["total"] = round(times["build"] + times["first_video"], 1)
        times["latents_after"] = len(list((bank / "latents").glob("*.safetensors")))
        report[mode] = times
        print(mode, json.dumps(times), flush=True)
    # --for-training: one training clip per concept (72), k = 2 as the toy world trains
    train = root / "train.csv"
    with (root / "bank.csv").open() as f:
        rows = list(csv.DictReader(f))
    firsts = {}
    for r in rows:
        firsts.setdefault(r["caption"], r)
    with train.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["video", "caption"])
        w.writeheader()
        w.writerows(firsts.values())
    bank = root / "bank-training"
    shutil.rmtree(bank, ignore_errors=True)
    cmd = [*build, "--bank", str(bank), "--for-training", str(train), "-k", "2"]
    said = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    report["for_training"] = next(ln.strip() for ln in said.splitlines() if "for training" in ln)
    print(json.dumps({"clips": 576, **report}))


def sizes(args) -> None:
    """Bytes per video of an exported (token-only) bank at the paper's sizes: tokens G = 1 ×
    D = 1536 per branch in bf16 shards of 4,096 videos (the token cache's own writer), and a
    caption index of 768-d gte-base vectors (flat, as the paper) or IVF-PQ (``--kind pq``),
    with its id map of OpenVid-style ids, captions and paths; measured on 20,000 rows."""
    import tempfile

    import pandas as pd
    import torch

    from dit_mem.data.token_cache import _ShardWriter
    from dit_mem.retrieval.index import make_index, write_index_folder

    n, d = 20_000, 768
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    caps = json.loads((CACHE / "captions.json").read_text())[:n]
    ids = [f"{rng.integers(1 << 40):011x}_{i % 7}_{i}to{i + 90}" for i in range(n)]
    table = pd.DataFrame({"id": ids, "caption": caps, "video": [f"{v}.mp4" for v in ids]})
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = _ShardWriter(tmp, 0, 4096)
        for start in range(0, n, 1000):
            part = ids[start : start + 1000]
            t = torch.randn(len(part), 1, 1536)
            shards.add(part, t, t)
        shards.flush()
        out["tokens_bytes_per_video"] = round(
            sum(f.stat().st_size for f in tmp.glob("tokens-*")) / n, 1
        )
        for kind in ("flat", "pq"):
            folder = tmp / kind
            manifest = {"model": "gte-base-en-v1.5", "dim": d, "rows": n}
            index = make_index(x, kind, nlist=128)
            write_index_folder(folder, index, table, manifest, rerank=x if kind == "pq" else None)
            per = {f.name: round(f.stat().st_size / n, 1) for f in folder.iterdir()}
            out[f"index_{kind}_bytes_per_video"] = per
            total = sum(v for k, v in per.items() if k != "manifest.json")
            out[f"export_{kind}_bytes_per_video"] = round(total + out["tokens_bytes_per_video"], 1)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("embed").set_defaults(func=embed)
    s = sub.add_parser("scale")
    s.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    s.add_argument("--kinds", nargs="*", default=None)
    s.set_defaults(func=scale)
    q = sub.add_parser("query")
    q.add_argument("folder")
    q.add_argument("truth")
    q.add_argument("--nprobe", type=int, default=None)
    q.add_argument("--ef-search", type=int, default=None)
    q.add_argument("--k-factor", type=int, default=None)
    q.add_argument("--threads", type=int, default=2)
    q.set_defaults(func=query)
    f = sub.add_parser("fanin")
    f.add_argument("--samples", type=int, default=10_000)
    f.add_argument("-k", type=int, default=5)
    f.set_defaults(func=fanin)
    sub.add_parser("lazy").set_defaults(func=lazy)
    sub.add_parser("sizes").set_defaults(func=sizes)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
