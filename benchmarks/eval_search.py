"""Exact-search benchmark, run in its own process so that its peak memory is its own.

    python -m benchmarks.eval_search --images 35504 --captions 177644 --queries 4096 --dim 512

I2T of the large-scale COCO protocol: image queries against a caption gallery, every image with
5 (a few with 6) captions. Embeddings are random unit vectors (search cost does not depend on
their values). Prints one JSON line: peak RSS after the first `query_ranks` call (before any
other timing runs), then `repeats` interleaved rounds of
  setup: query_ranks with one query (its per-call setup: normalising, id codes, sorting),
  floor: the bare `q_chunk @ g.T` products, chunked exactly as query_ranks chunks them,
  query_ranks: xbt_ray.eval.retrieval.query_ranks (normalise, score, ranks), ids as strings.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import numpy as np
import torch

from xbt_ray.eval.retrieval import chunk_rows, query_ranks


def rss_gib() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in GiB. The peak is /proc/self/status VmHWM, this
    process image's own high-water mark: `ru_maxrss` would also carry the peak of the process
    that forked this one (the benchmark), which hid the search's own peak before 2026-12-01."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    current = pages * resource.getpagesize() / 2**30
    with open("/proc/self/status") as f:
        peak_kib = next(float(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return current, peak_kib / 2**20


def unit_rows(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Random unit rows, normalised in blocks (no full-size temporary to inflate the peak)."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    for start in range(0, n, 8192):
        block = x[start:start + 8192]
        block /= np.sqrt(np.einsum("ij,ij->i", block, block))[:, None]
    return x


def matmul_floor(q: torch.Tensor, g: torch.Tensor, max_chunk_mib: float) -> None:
    step = chunk_rows(len(g), max_chunk_mib)
    for start in range(0, len(q), step):
        q[start:start + step] @ g.T


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=35_504)
    p.add_argument("--captions", type=int, default=177_644)
    p.add_argument("--queries", type=int, default=0, help="image queries timed (0: all)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--max-chunk-mib", type=float, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rss_imports, _ = rss_gib()
    rng = np.random.default_rng(0)
    n_queries = args.queries or args.images
    gallery = unit_rows(args.captions, args.dim, rng)
    gallery_ids = np.array([f"img-{i % args.images:06d}" for i in range(args.captions)])
    queries = unit_rows(n_queries, args.dim, rng)
    query_ids = np.array([f"img-{i:06d}" for i in range(n_queries)])
    rss_data, _ = rss_gib()

    # peak memory: data + one query_ranks call, nothing else has run yet
    start = time.perf_counter()
    ranks = query_ranks(queries, gallery, query_ids, gallery_ids, args.max_chunk_mib)
    first = time.perf_counter() - start
    _, peak = rss_gib()
    assert ranks.shape == (n_queries,)

    q, g = torch.from_numpy(queries), torch.from_numpy(gallery)
    def floor():
        matmul_floor(q, g, args.max_chunk_mib)

    def search():
        query_ranks(queries, gallery, query_ids, gallery_ids, args.max_chunk_mib)

    def setup():  # query_ranks' per-call setup: one query costs almost no search work
        query_ranks(queries[:1], gallery, query_ids[:1], gallery_ids, args.max_chunk_mib)

    times = {"floor": [], "search": [], "setup": []}
    cpu = {"floor": [], "search": []}
    for r in range(args.repeats):  # alternate the order so that drift in load cancels
        for name in ("setup", "floor", "search") if r % 2 == 0 else ("setup", "search", "floor"):
            wall0, cpu0 = time.perf_counter(), time.process_time()
            {"floor": floor, "search": search, "setup": setup}[name]()
            times[name].append(time.perf_counter() - wall0)
            if name in cpu:
                cpu[name].append(time.process_time() - cpu0)
    floor_s, search_s, setup_s = times["floor"], times["search"], times["setup"]
    fractions = [f / s for f, s in zip(floor_s, search_s)]
    cpu_fractions = [f / s for f, s in zip(cpu["floor"], cpu["search"])]
    flops = 2.0 * n_queries * args.captions * args.dim
    search, setup = statistics.median(search_s), statistics.median(setup_s)
    scale = args.images / n_queries
    full_search = setup + (search - setup) * scale
    full_floor = statistics.median(floor_s) * scale
    result = {
        "direction": "i2t", "images": args.images, "captions": args.captions,
        "queries_timed": n_queries, "dim": args.dim, "max_chunk_mib": args.max_chunk_mib,
        "queries_per_chunk": chunk_rows(args.captions, args.max_chunk_mib),
        "threads": torch.get_num_threads(), "repeats": args.repeats,
        "floor_s": floor_s, "query_ranks_s": search_s, "first_query_ranks_s": first,
        "fractions": fractions, "eval_fraction_of_matmul": statistics.median(fractions),
        # cross-checks that shrug off other processes: CPU time, and best-of (min) wall times
        "cpu_floor_s": cpu["floor"], "cpu_query_ranks_s": cpu["search"],
        "fraction_cpu_time": statistics.median(cpu_fractions),
        "fraction_best_of": min(floor_s) / min(search_s),
        "matmul_gflops": flops / statistics.median(floor_s) / 1e9,
        "queries_per_s": n_queries / search,
        "setup_s": setup_s,
        # full protocol: per-call setup once + the per-query cost scaled to every image query
        "full_protocol_s": full_search, "full_protocol_floor_s": full_floor,
        "full_protocol_fraction_of_matmul": full_floor / full_search,
        "extrapolated": n_queries < args.images,
        "rss_imports_gib": rss_imports, "rss_data_gib": rss_data, "peak_rss_gib": peak,
        "data_gib": (gallery.nbytes + queries.nbytes) / 2**30,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
