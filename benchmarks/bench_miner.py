"""Proximity-target mining at ViSU scale: exact torch (the miner's default) vs faiss exact vs faiss approximate.

N unsafe queries against a pool of N safe items at dim 768 (ViT-L-14's embedding size), two data kinds:
- random:    i.i.d. Gaussian directions (the hardest case for approximate search: no structure);
- clustered: 1,000 Gaussian clusters; query i is a perturbed copy of pool item i (an unsafe caption near its safe one).

Methods (main table), all on the same normalised float32 matrices and the same sampled queries:
- exact torch: `saferclip.miner.exact_topk` (blocked matmul, through numpy's BLAS on CPU, + torch top-k with faiss'
  tie rule), what `mine_targets(exact=True)` runs by default;
- torch argmax: the bare chunked torch matmul + argmax (torch's own BLAS, no tie rule);
- faiss exact: `IndexFlatIP` (`mine_targets(exact=True, exact_backend="faiss")`, the previous default);
- approximate defaults: HNSW with the miner's defaults (M=24, efConstruction=60, efSearch=96) and IVF with its
  default nlist / nprobe (`--old-hnsw` adds the previous HNSW default M=32 / 200 / 128).

Brute force costs O(N² d), so at N > 10k every *search* runs on a seeded sample of `--queries` queries and its time
is scaled by N / queries (search time is linear in the number of queries; the sample is stated in the table).
Index *builds* (HNSW insertion, IVF k-means + assignment) always run on the full pool and are never scaled.
"× vs exact torch" is exact torch's scaled time over the method's total. Recall@1 = share of sampled queries whose
top-1 equals exact torch's (for faiss exact: agreement of the two exact backends). Memory: peak resident set size
above the pre-stage level, sampled every 10 ms from /proc/self/status (faiss allocates outside Python, so
tracemalloc would miss it), plus the process peak from resource.getrusage.

    python benchmarks/bench_miner.py [--quick] [--sizes 10000 50000 150000] [--queries 2000] [--out table.md]
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

from saferclip.miner import (HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH, HNSW_M, build_index, exact_topk, l2_normalize,
                             mine_targets, recall_vs_exact)


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


def torch_top1(queries: np.ndarray, pool: np.ndarray, chunk: int = 447) -> np.ndarray:
    """Bare chunked matmul + argmax over already-normalised arrays (torch, all threads): no tie rule."""
    q, p = torch.from_numpy(queries), torch.from_numpy(pool)
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


def bench_one(kind: str, n: int, d: int, n_queries: int, old_hnsw: bool = False) -> list[dict]:
    """All methods on one (kind, N)."""
    queries, pool = make_data(kind, n, d)
    qsub, scale = sample_queries(queries, n_queries)
    pn, qn = l2_normalize(pool, "pool"), l2_normalize(qsub, "queries")
    rows = []
    (ex, _), t_ex, m_ex = timed(lambda: exact_topk(qn, pn, 1))
    ex, base_total = ex[:, 0], t_ex * scale
    rows.append(dict(method="exact torch (exact_topk: numpy-BLAS blocks + torch top-k, faiss ties)", build=0.0,
                     search=base_total, mem=m_ex.extra, recall=1.0))
    am, t_am, m_am = timed(lambda: torch_top1(qn, pn))
    rows.append(dict(method="torch argmax (torch matmul blocks, no tie rule)", build=0.0, search=t_am * scale,
                     mem=m_am.extra, recall=recall_vs_exact(am, ex)))
    variants = [("faiss exact (IndexFlatIP)", True, "hnsw", {}),
                (f"faiss hnsw default M={HNSW_M} efC={HNSW_EF_CONSTRUCTION} efS={HNSW_EF_SEARCH}", False, "hnsw", {}),
                ("faiss ivf default", False, "ivf", {})]
    if old_hnsw:
        variants.append(("faiss hnsw old default M=32 efC=200 efS=128", False, "hnsw",
                         dict(hnsw_m=32, ef_construction=200, ef_search=128)))
    with faiss_threads_all():
        for name, exact, index, kw in variants:
            ix, t_b, m_b = timed(lambda: build_index(pn, exact=exact, index=index, **kw))
            (sims, idx), t_s, m_s = timed(lambda: ix.search(qn, 1))
            if index == "ivf" and not exact:
                name += f" nlist={ix.nlist} nprobe={ix.nprobe}"
            rows.append(dict(method=name, build=t_b, search=t_s * scale, mem=max(m_b.extra, m_b.extra + m_s.extra),
                             recall=recall_vs_exact(idx[:, 0], ex)))
            del ix
    # the public entry point end to end on the sample (normalisation, exclusion bookkeeping), unscaled
    for name, kw in (("mine_targets(exact=True) end to end", {}),
                     ("mine_targets(exact=False, hnsw) end to end", dict(exact=False, index="hnsw"))):
        api, t_api, _ = timed(lambda: mine_targets(qsub, pool, k=1, threads=THREADS, **kw)[0][:, 0])
        rows.append(dict(method=name, recall=recall_vs_exact(api, ex), api_seconds=t_api, api_queries=len(qsub)))
    for r in rows:
        r.update(kind=kind, n=n, queries=len(qsub))
        if "api_seconds" not in r:
            r["total"] = r["build"] + r["search"]
            r["speedup"] = base_total / r["total"]
    return rows


def sweep_hnsw(kind: str, n: int, d: int, n_queries: int, grid=((16, 40), (16, 100), (32, 80)),
               ef_searches=(64, 128, 256)) -> list[dict]:
    """HNSW (M, efConstruction) x efSearch on one (kind, N): build once per (M, efC), search each efS.

    Ground truth = exact torch search on the sampled queries; its time scaled to N queries is the denominator of the
    speed-up, as in the main table."""
    queries, pool = make_data(kind, n, d)
    qsub, scale = sample_queries(queries, n_queries)
    pn, qn = l2_normalize(pool, "pool"), l2_normalize(qsub, "queries")
    (truth, _), t_t, _ = timed(lambda: exact_topk(qn, pn, 1))
    truth, base_total = truth[:, 0], t_t * scale
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


THREADS = max(1, len(os.sched_getaffinity(0)))   # torch and faiss threads (--threads; default: every core)


class faiss_threads_all:
    """faiss on THREADS OpenMP threads (every available core unless --threads says otherwise)."""

    def __enter__(self):
        self.prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(THREADS)

    def __exit__(self, *exc):
        faiss.omp_set_num_threads(self.prev)


def table(rows: list[dict]) -> str:
    """The main table as markdown."""
    out = ["| data | N | queries searched | method | build s | search s (for N queries) | total s | "
           "× vs exact torch | recall@1 vs exact torch | peak RSS +MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "api_seconds" in r:
            out.append(f"| {r['kind']} | {r['n']:,} | {r['api_queries']:,} | {r['method']} | – | – | "
                       f"{r['api_seconds']:.1f} (unscaled: {r['api_queries']:,} queries) | – | {r['recall']:.4f} | – |")
        else:
            out.append(f"| {r['kind']} | {r['n']:,} | {r['queries']:,} | {r['method']} | {r['build']:.1f} | "
                       f"{r['search']:.1f} | {r['total']:.1f} | {r['speedup']:.2f} | {r['recall']:.4f} | {r['mem']:.0f} |")
    return "\n".join(out)


def headline(rows: list[dict], kinds: list[str]) -> str:
    """One line: at the largest N, exact torch vs faiss exact, and the approximate default vs exact torch."""
    big, parts = max(r["n"] for r in rows), []
    for kind in kinds:
        at = {r["method"]: r for r in rows if r["n"] == big and r["kind"] == kind and "api_seconds" not in r}
        tor = next(r for m, r in at.items() if m.startswith("exact torch"))
        fx = next(r for m, r in at.items() if m.startswith("faiss exact"))
        hn = next(r for m, r in at.items() if m.startswith("faiss hnsw default"))
        parts.append(f"{kind}: exact torch {tor['total']:.0f} s vs faiss exact {fx['total']:.0f} s (faiss time / torch "
                     f"time {fx['total'] / tor['total']:.2f}, top-1 agreement {fx['recall']:.4f}); HNSW default "
                     f"{hn['speedup']:.1f}x faster than exact torch at recall@1 {hn['recall']:.3f}")
    return f"HEADLINE miner N={big:,}: " + "; ".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="N = 10k and 50k, 1000 sampled queries")
    ap.add_argument("--sizes", type=int, nargs="+", default=None)
    ap.add_argument("--kinds", nargs="+", default=["clustered", "random"])
    ap.add_argument("--queries", type=int, default=None, help="queries actually searched at N > 10k")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--old-hnsw", action="store_true", help="also the previous HNSW default (M=32, efC=200, efS=128)")
    ap.add_argument("--out", default=None, help="also write the table and headline to this markdown file")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and faiss threads (default: every core; 1 avoids OpenMP stalls on a shared machine)")
    ap.add_argument("--sweep", action="store_true",
                    help="only the HNSW parameter sweep (M, efConstruction, efSearch) at the largest N")
    a = ap.parse_args()
    global THREADS
    THREADS = a.threads or THREADS
    sizes = a.sizes or ([10_000, 50_000] if a.quick else [10_000, 50_000, 150_000])
    nq = a.queries or (1000 if a.quick else 2000)
    torch.set_num_threads(THREADS)
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
    head = (f"bench_miner: faiss {faiss.__version__} ({THREADS} threads), torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), "
            f"{os.cpu_count()} cores, {platform.machine()}, dim {a.dim}, {nq:,} sampled queries at N > 10k, "
            f"start {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()}")
    print(head, flush=True)
    rows = []
    for n in sizes:
        for kind in a.kinds:
            t0 = time.perf_counter()
            rows += bench_one(kind, n, a.dim, nq if n > 10_000 else n, old_hnsw=a.old_hnsw)
            print(f"  {kind} N={n}: {time.perf_counter() - t0:.0f}s wall, load average {os.getloadavg()}", flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tail = (f"process peak RSS (getrusage): {peak:.0f} MiB; end {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, "
            f"load average {os.getloadavg()}")
    text = "\n".join([head, "", table(rows), "", tail, headline(rows, a.kinds)])
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
