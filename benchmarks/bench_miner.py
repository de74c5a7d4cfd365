"""Proximity-target mining at ViSU scale: faiss exact / HNSW / IVF (`saferclip.miner.mine_targets`) vs torch brute force.

N unsafe queries against a pool of N safe items at dim 768 (ViT-L-14's embedding size), two data kinds:
- random:    i.i.d. Gaussian directions (the hardest case for approximate search: no structure);
- clustered: 1,000 Gaussian clusters; query i is a perturbed copy of pool item i (an unsafe caption near its safe one).

Brute force costs O(N² d), so at large N the exact methods and every *search* run on a sample of `--queries` queries
and their time is scaled by N / queries (search time is linear in the number of queries; the sample is stated in
the table). Index *builds* (HNSW insertion, IVF k-means + assignment) always run on the full pool and are never
scaled. Recall@1 = share of sampled queries whose top-1 equals faiss exact's top-1. Memory: peak resident set size
above the pre-stage level, sampled every 10 ms from /proc/self/status (faiss allocates outside Python, so
tracemalloc would miss it), plus the process peak from resource.getrusage.

    python benchmarks/bench_miner.py [--quick] [--sizes 10000 50000 150000] [--queries 2000]
    python benchmarks/bench_miner.py --sweep [--kinds clustered]   # HNSW (M, efC, efS) grid at N = 150k
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import threading
import time

import faiss
import numpy as np
import torch

from saferclip.miner import build_index, l2_normalize, mine_targets, recall_vs_exact


def rss_mb() -> float:
    """Current resident set size in MiB (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


class PeakRSS:
    """Context manager: peak RSS above the level at entry, sampled by a thread."""

    def __enter__(self):
        self.start, self.peak, self._stop = rss_mb(), rss_mb(), False

        def poll():
            while not self._stop:
                self.peak = max(self.peak, rss_mb())
                time.sleep(0.01)
        self._t = threading.Thread(target=poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, rss_mb())
        self.extra = self.peak - self.start
        return False


def make_data(kind: str, n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(queries, pool), float32 [n, d], unnormalised."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return (rng.standard_normal((n, d), dtype=np.float32), rng.standard_normal((n, d), dtype=np.float32))
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    pool = centres[rng.integers(0, 1000, n)] + 0.6 * rng.standard_normal((n, d), dtype=np.float32)
    queries = pool + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    return queries, pool


def sample_queries(queries: np.ndarray, n_queries: int) -> tuple[np.ndarray, float]:
    """(the searched sample of `queries`, N / sample size): all of them when n_queries >= N, else a seeded sample."""
    n = len(queries)
    qs = np.random.default_rng(1).choice(n, n_queries, replace=False) if n_queries < n else np.arange(n)
    return np.ascontiguousarray(queries[qs]), n / len(qs)


def torch_top1(queries: np.ndarray, pool: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """The baseline: L2-normalise, chunked matmul, argmax (torch, all threads)."""
    q = torch.nn.functional.normalize(torch.from_numpy(queries), dim=-1)
    p = torch.nn.functional.normalize(torch.from_numpy(pool), dim=-1)
    out = torch.empty(len(q), dtype=torch.long)
    for i in range(0, len(q), chunk):
        out[i:i + chunk] = (q[i:i + chunk] @ p.T).argmax(dim=1)
    return out.numpy()


def timed(fn):
    """(result, seconds, PeakRSS)."""
    with PeakRSS() as m:
        t0 = time.perf_counter()
        r = fn()
        dt = time.perf_counter() - t0
    return r, dt, m


def bench_one(kind: str, n: int, d: int, n_queries: int) -> list[dict]:
    """All methods on one (kind, N)."""
    queries, pool = make_data(kind, n, d)
    qsub, scale = sample_queries(queries, n_queries)
    rows = []
    ex, t_ex, m_ex = timed(lambda: mine_targets(qsub, pool, k=1, exact=True)[0][:, 0])
    rows.append(dict(method="faiss exact (IndexFlatIP)", build=0.0, search=t_ex * scale, mem=m_ex.extra, recall=1.0))
    tt, t_t, m_t = timed(lambda: torch_top1(qsub, pool))
    base_total = t_t * scale
    rows.append(dict(method="torch brute force (chunked matmul)", build=0.0, search=base_total, mem=m_t.extra,
                     recall=recall_vs_exact(tt, ex)))
    pn = l2_normalize(pool, "pool")
    qn = l2_normalize(qsub, "queries")
    with faiss_threads_all():
        variants = [("hnsw", {}), ("hnsw", dict(hnsw_m=16, ef_construction=40, ef_search=64)), ("ivf", {})]
        for index, kw in variants:
            ix, t_b, m_b = timed(lambda: build_index(pn, exact=False, index=index, **kw))
            (sims, idx), t_s, m_s = timed(lambda: ix.search(qn, 1))
            extra = ""
            if index == "ivf":
                extra = f" nlist={ix.nlist} nprobe={ix.nprobe}"
            else:
                extra = f" M={kw.get('hnsw_m', 32)} efC={ix.hnsw.efConstruction} efS={ix.hnsw.efSearch}"
            rows.append(dict(method=f"faiss {index}{extra}", build=t_b, search=t_s * scale,
                             mem=max(m_b.extra, m_b.extra + m_s.extra), recall=recall_vs_exact(idx[:, 0], ex)))
            del ix
    # the public entry point end to end on the sample (same index, plus normalisation and the exclusion logic)
    ap_idx, t_api, _ = timed(lambda: mine_targets(qsub, pool, k=1, exact=False, index="hnsw")[0][:, 0])
    rows.append(dict(method="mine_targets(exact=False, hnsw) end to end", build=float("nan"), search=float("nan"),
                     total_override=None, mem=float("nan"), recall=recall_vs_exact(ap_idx, ex),
                     api_seconds=t_api, api_queries=len(qsub)))
    for r in rows:
        r.update(kind=kind, n=n, queries=len(qsub))
        if "api_seconds" not in r:
            r["total"] = r["build"] + r["search"]
            r["speedup"] = base_total / r["total"]
    return rows


def sweep_hnsw(kind: str, n: int, d: int, n_queries: int, grid=((16, 40), (16, 100), (32, 80)),
               ef_searches=(64, 128, 256)) -> list[dict]:
    """HNSW (M, efConstruction) x efSearch on one (kind, N): build once per (M, efC), search each efS.

    Ground truth = torch brute force on the sampled queries (the baseline's own answer); its time scaled to N queries
    is the denominator of the speed-up, as in the main table."""
    queries, pool = make_data(kind, n, d)
    qsub, scale = sample_queries(queries, n_queries)
    truth, t_t, _ = timed(lambda: torch_top1(qsub, pool))
    base_total = t_t * scale
    pn, qn = l2_normalize(pool, "pool"), l2_normalize(qsub, "queries")
    rows = []
    with faiss_threads_all():
        for m, efc in grid:
            ix, t_b, _ = timed(lambda: build_index(pn, exact=False, index="hnsw", hnsw_m=m, ef_construction=efc))
            for efs in ef_searches:
                ix.hnsw.efSearch = int(efs)
                (_, idx), t_s, _ = timed(lambda: ix.search(qn, 1))
                total = t_b + t_s * scale
                rows.append(dict(kind=kind, n=n, queries=len(qsub), M=m, efC=efc, efS=efs, build=t_b,
                                 search=t_s * scale, total=total, torch=base_total, speedup=base_total / total,
                                 recall=recall_vs_exact(idx[:, 0], truth)))
            del ix
    return rows


def print_sweep(rows: list[dict]) -> None:
    """The sweep table and its best setting at recall@1 >= 0.99."""
    print("\n| data | N | queries searched | M | efC | efS | build s | search s (for N queries) | total s | "
          "torch s | × faster than torch | recall@1 vs torch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['n']:,} | {r['queries']:,} | {r['M']} | {r['efC']} | {r['efS']} | {r['build']:.1f} | "
              f"{r['search']:.1f} | {r['total']:.1f} | {r['torch']:.1f} | {r['speedup']:.1f} | {r['recall']:.4f} |")
    for kind in sorted({r["kind"] for r in rows}):
        ok = [r for r in rows if r["kind"] == kind and r["recall"] >= 0.99]
        best = max(ok, key=lambda r: r["speedup"]) if ok else None
        print(f"HEADLINE miner sweep {kind} N={rows[0]['n']:,}: " + (
            f"best HNSW at recall >= 0.99: M={best['M']} efC={best['efC']} efS={best['efS']} "
            f"{best['speedup']:.1f}x (recall {best['recall']:.3f}; goal >= 5x: {'met' if best['speedup'] >= 5 else 'NOT met'})"
            if best else "no HNSW setting reached recall 0.99"))


class faiss_threads_all:
    """faiss on every available core (what mine_targets does by default)."""

    def __enter__(self):
        self.prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(max(1, len(os.sched_getaffinity(0))))

    def __exit__(self, *exc):
        faiss.omp_set_num_threads(self.prev)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 10k and 50k, 1000 sampled queries")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--kinds", nargs="+", default=["clustered", "random"])
    ap.add_argument("--queries", type=int, default=None, help="queries actually searched at large N")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--sweep", action="store_true",
                    help="only the HNSW parameter sweep (M, efConstruction, efSearch) at the largest N")
    a = ap.parse_args()
    sizes = a.sizes or ([10_000, 50_000] if a.quick else [10_000, 50_000, 150_000])
    nq = a.queries or (1000 if a.quick else 2000)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    if a.sweep:
        big = max(a.sizes or [150_000])
        print(f"bench_miner --sweep: N={big:,}, {a.queries or 2000} sampled queries, load average {os.getloadavg()}",
              flush=True)
        rows = []
        for kind in a.kinds:
            rows += sweep_hnsw(kind, big, a.dim, a.queries or 2000)
        print_sweep(rows)
        print(f"load average at the end {os.getloadavg()}")
        return
    print(f"bench_miner: faiss {faiss.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"{os.cpu_count()} cores, {platform.machine()}, dim {a.dim}, load average {os.getloadavg()}", flush=True)
    rows = []
    for n in sizes:
        for kind in a.kinds:
            t0 = time.perf_counter()
            rows += bench_one(kind, n, a.dim, nq if n > 10_000 else n)
            print(f"  {kind} N={n}: {time.perf_counter() - t0:.0f}s wall, load average {os.getloadavg()}", flush=True)
    print("\n| data | N | queries searched | method | build s | search s (for N queries) | total s | "
          "× faster than torch | recall@1 vs exact | peak RSS +MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "api_seconds" in r:
            print(f"| {r['kind']} | {r['n']:,} | {r['api_queries']:,} | {r['method']} | – | – | "
                  f"{r['api_seconds']:.1f} (unscaled, build + {r['api_queries']} queries) | – | {r['recall']:.4f} | – |")
            continue
        print(f"| {r['kind']} | {r['n']:,} | {r['queries']:,} | {r['method']} | {r['build']:.1f} | {r['search']:.1f} | "
              f"{r['total']:.1f} | {r['speedup']:.1f} | {r['recall']:.4f} | {r['mem']:.0f} |")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nprocess peak RSS (getrusage): {peak:.0f} MiB; load average at the end {os.getloadavg()}")
    big = max(sizes)
    heads, met = [], True
    for kind in a.kinds:
        best = [r for r in rows if r["n"] == big and r["kind"] == kind and "api_seconds" not in r
                and r["method"].startswith(("faiss hnsw", "faiss ivf"))]
        ok = [r for r in best if r["recall"] >= 0.99]
        if ok:
            r = max(ok, key=lambda r: r["speedup"])
            heads.append(f"{kind}: {r['method'][6:]} {r['speedup']:.1f}x at recall {r['recall']:.3f}")
            met &= r["speedup"] >= 5
        else:
            r = max(best, key=lambda r: r["recall"])
            heads.append(f"{kind}: no approximate index reached recall 0.99 (best {r['method'].split()[1]} "
                         f"{r['recall']:.3f}, {r['speedup']:.1f}x)")
            met = False
    print(f"HEADLINE miner N={big:,}: approximate vs torch brute force: {'; '.join(heads)} "
          f"(goal >= 5x at recall@1 >= 0.99: {'met' if met else 'NOT met'})")


if __name__ == "__main__":
    main()
