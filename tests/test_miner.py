"""Tests of saferclip.miner: exact torch search (== faiss IndexFlatIP, ties included), approximate recall, exclusion,
cache, curriculum, report."""
import heapq

import numpy as np
import pytest
import torch

import saferclip.miner as miner
from saferclip.miner import (EMBED_FIELDS, MinedTargets, MinerConfig, build_index, chunk_rows, curriculum_schedule,
                             duplicate_pairs, embed_quadruplets, exact_topk, mine_for_quadruplets, mine_targets,
                             plot_proximity, proximity_report, query_matrices, recall_vs_exact, sample_topk,
                             torch_search_settings)


def _brute(q, p, k):
    s = torch.nn.functional.normalize(torch.as_tensor(q, dtype=torch.float32), dim=1) @ \
        torch.nn.functional.normalize(torch.as_tensor(p, dtype=torch.float32), dim=1).T
    v, i = s.topk(k, dim=1)
    return i.numpy(), v.numpy()


def _clustered(n, d=128, centers=50, spread=1.0, seed=0):
    r = np.random.default_rng(seed)
    c = r.normal(size=(centers, d))
    return (c[r.integers(0, centers, n)] + spread * r.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("k", [1, 7])
def test_exact_matches_torch_topk(k):
    g = torch.Generator().manual_seed(1)
    q, p = torch.randn(200, 24, generator=g) * 3, torch.randn(1500, 24, generator=g)
    idx, sim = mine_targets(q, p, k=k)
    ref_i, ref_s = _brute(q, p, k)
    assert idx.shape == (200, k) and idx.dtype == np.int64 and sim.dtype == np.float32
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(sim, ref_s, atol=1e-5)
    assert (np.diff(sim, axis=1) <= 0).all()


def test_public_signature_and_determinism():
    r = np.random.default_rng(0)
    q, p = r.normal(size=(50, 16)), r.normal(size=(300, 16))  # float64 numpy input
    a = mine_targets(q, p, 3, True)
    b = mine_targets(q, p, k=3, exact=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], _brute(q, p, 3)[0])


def test_ties_break_to_smaller_index():
    p = np.array([[1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    idx, sim = mine_targets(np.array([[1, 0]], np.float32), p, k=3)
    assert idx.tolist() == [[0, 2, 3]]
    np.testing.assert_allclose(sim, 1.0, atol=1e-6)


# ---- exact torch search == faiss IndexFlatIP, ties included ----

def _tie_data(nq=300, n_pool=3000, seed=0):
    """Sign vectors +-1/8 in 64-d (exact similarities, 65 possible values), duplicated pool rows, queries with twins."""
    r = np.random.default_rng(seed)
    pool = np.sign(r.standard_normal((n_pool, 64))).astype(np.float32) / 8
    pool[r.integers(0, n_pool, n_pool // 3)] = pool[r.integers(0, n_pool, n_pool // 3)]
    q = np.sign(r.standard_normal((nq, 64))).astype(np.float32) / 8
    q[: nq // 3] = pool[r.integers(0, n_pool, nq // 3)]
    return q, pool


def _faiss_heap_reference(scores, k):
    """faiss' HeapBlockResultHandler for inner product, literally: a min-heap on (score, index), pool scanned in
    index order; an item enters only if strictly better than the top, and the top (lowest score, then lowest index)
    leaves."""
    heap = [(-np.inf, -1)] * k
    for j, x in enumerate(scores):
        if x > heap[0][0]:
            heapq.heapreplace(heap, (x, j))
    return sorted(j for _, j in heap)


def test_heap_mask_is_faiss_heap_rule():
    r = np.random.default_rng(3)
    for _ in range(60):
        n_pool, k = int(r.integers(1, 60)), 0
        k = int(r.integers(1, n_pool + 1))
        s = r.integers(0, 4, (5, n_pool)).astype(np.float32)       # few values: ties everywhere
        m = miner._faiss_heap_mask(torch.from_numpy(s), k).numpy()
        assert (m.sum(1) == k).all()
        for row in range(5):
            assert np.flatnonzero(m[row]).tolist() == _faiss_heap_reference(s[row], k)


def test_hand_made_ties_follow_faiss_not_lowest_index():
    sgn = np.sign(np.random.default_rng(0).standard_normal(64)).astype(np.float32) / 8
    row = lambda m: np.concatenate([-sgn[:m], sgn[m:]])          # similarity 1 - m/32
    pool = np.stack([row(m) for m in (2, 2, 2, 2, 0, 2, 2)])      # rows 0-3, 5-6 tie at 0.9375, row 4 is 1
    for k, want in ((1, [4]), (3, [4, 1, 2]), (7, [4, 0, 1, 2, 3, 5, 6])):
        f = mine_targets(sgn[None], pool, k=k, exact_backend="faiss")
        t = mine_targets(sgn[None], pool, k=k)
        assert f[0][0].tolist() == want and t[0][0].tolist() == want
        np.testing.assert_array_equal(t[1], f[1])
    # k = 1 with an excluded better item that comes after the ties: faiss (kk = 2) returns the *second* tied row
    pool2 = np.stack([row(2), row(2), row(0)])
    for backend in ("faiss", "torch"):
        assert mine_targets(sgn[None], pool2, k=1, exclude=[(0, 2)], exact_backend=backend)[0].tolist() == [[1]]


@pytest.mark.parametrize("k", [1, 3, 7, 40])
@pytest.mark.parametrize("nq", [5, 300])   # faiss: < 20 queries -> SIMD loop, >= 20 -> BLAS path
def test_torch_equals_faiss_exact_with_ties(k, nq):
    q, p = _tie_data()
    q = q[:nq]
    rows = np.repeat(np.arange(0, nq, 3), 4)                      # every third query excludes 4 pool items
    excl = np.stack([rows, np.random.default_rng(1).integers(0, 3000, len(rows))], 1)
    for ex in (None, excl):
        f_i, f_s = mine_targets(q, p, k=k, exclude=ex, exact_backend="faiss")
        for chunk_mb in (256, 0.5):
            t_i, t_s = mine_targets(q, p, k=k, exclude=ex, chunk_mb=chunk_mb)
            np.testing.assert_array_equal(t_i, f_i)
            np.testing.assert_array_equal(t_s, f_s)


def test_tie_data_separates_the_rules():
    # the equality above means something: "lowest index first" and torch.topk's own choice both disagree with faiss
    q, p = _tie_data()
    s = q @ p.T
    lowest = np.lexsort((np.broadcast_to(np.arange(p.shape[0]), s.shape), -s), axis=-1)[:, :7]
    f = mine_targets(q, p, k=7, exact_backend="faiss")[0]
    assert (f != lowest).any(1).mean() > 0.2
    plain = torch.from_numpy(s).topk(7, dim=1).indices.sort(1).values.numpy()
    assert (np.sort(f, 1) != plain).any(1).mean() > 0.2


@pytest.mark.parametrize("k", [1, 5])
def test_torch_equals_faiss_exact_on_random_data(k):
    g = torch.Generator().manual_seed(5)
    q, p = torch.randn(400, 768, generator=g), torch.randn(3000, 768, generator=g)
    f_i, f_s = mine_targets(q, p, k=k, exact_backend="faiss")
    t_i, t_s = mine_targets(q, p, k=k, chunk_mb=1)
    np.testing.assert_array_equal(t_i, f_i)
    np.testing.assert_allclose(t_s, f_s, atol=1e-5)


def test_exact_topk_blocks_and_settings():
    assert chunk_rows(150_000, 256) == 447      # a 150k pool: 447 query rows (256 MiB of similarities) per block
    assert chunk_rows(10, 1e-9) == 1
    r = np.random.default_rng(0)
    q, p = r.integers(-3, 4, (50, 16)).astype(np.float32), r.integers(-3, 4, (200, 16)).astype(np.float32)  # exact sums
    a = exact_topk(q, p, 4)
    b = exact_topk(q, p, 4, chunk_mb=4 * 200 * 3 / 2**20)   # 3 rows per block
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="between 1 and the pool size"):
        exact_topk(q, p, 201)
    prev = torch.get_num_threads()
    with torch_search_settings(torch.device("cpu"), threads=1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == prev
    with pytest.raises(ValueError, match="'torch', 'faiss'"):
        mine_targets(q, p, exact_backend="numpy")


def test_reservoir_threshold_is_the_documented_one():
    # the tie equality holds while k + exclusions < faiss' reservoir threshold; flag a faiss that moves it
    import faiss
    assert faiss.cvar.distance_compute_min_k_reservoir == miner.FAISS_RESERVOIR_K


def test_approximate_defaults_are_the_measured_ones():
    p = miner.l2_normalize(np.random.default_rng(0).standard_normal((300, 8)))
    ix = build_index(p, exact=False, index="hnsw")
    assert (ix.hnsw.efConstruction, ix.hnsw.efSearch) == (60, 96)
    assert ix.hnsw.nb_neighbors(1) == 24          # M links per node on the upper layers (2M on layer 0)


def test_bad_inputs():
    q, p = np.ones((3, 4), np.float32), np.eye(4, dtype=np.float32) + 0.1
    with pytest.raises(ValueError, match="larger than the pool"):
        mine_targets(q, p, k=5)
    with pytest.raises(ValueError, match="k must be >= 1"):
        mine_targets(q, p, k=0)
    with pytest.raises(ValueError, match="dimension"):
        mine_targets(q, p[:, :3])
    with pytest.raises(ValueError, match="zero norm"):
        mine_targets(np.zeros((2, 4)), p)
    with pytest.raises(ValueError, match="non-finite"):
        mine_targets(np.full((2, 4), np.nan), p)
    with pytest.raises(ValueError, match="'hnsw', 'ivf'"):
        mine_targets(q, p, exact=False, index="annoy")


@pytest.mark.parametrize("index", ["hnsw", "ivf"])
def test_approximate_recall_on_clustered_data(index):
    both = _clustered(6000)
    pool, queries = both[:5000], both[5000:]
    exact_i, exact_s = mine_targets(queries, pool)
    approx_i, approx_s = mine_targets(queries, pool, exact=False, index=index)
    assert recall_vs_exact(approx_i, exact_i) >= 0.9
    assert (approx_s[:, 0] <= exact_s[:, 0] + 1e-5).all()
    again_i, _ = mine_targets(queries, pool, exact=False, index=index)
    np.testing.assert_array_equal(again_i, approx_i)


def test_recall_sees_a_starved_index():
    both = _clustered(6000, spread=2.0)
    pool, queries = both[:5000], both[5000:]
    exact_i, _ = mine_targets(queries, pool)
    good = recall_vs_exact(mine_targets(queries, pool, exact=False, index="ivf")[0], exact_i)
    starved = recall_vs_exact(mine_targets(queries, pool, exact=False, index="ivf", nprobe=1)[0], exact_i)
    assert starved < good and starved < 0.9


def test_recall_vs_exact():
    assert recall_vs_exact(np.array([[1, 2], [3, 4]]), np.array([1, 4])) == 0.5
    with pytest.raises(ValueError):
        recall_vs_exact(np.array([1, 2]), np.array([1, 2, 3]))


def test_exclusion_pairs_mask_and_planted_twins():
    r = np.random.default_rng(1)
    pool = r.normal(size=(400, 32)).astype(np.float32)
    planted = r.permutation(400)[:40]
    queries = pool[planted] + 0.05 * r.normal(size=(40, 32)).astype(np.float32)
    idx, _ = mine_targets(queries, pool, k=2)
    np.testing.assert_array_equal(idx[:, 0], planted)
    pairs = np.stack([np.arange(40), planted], 1)
    mask = np.zeros((40, 400), bool)
    mask[np.arange(40), planted] = True
    for excl in (pairs, mask, torch.from_numpy(mask), pairs.tolist()):
        ix, _ = mine_targets(queries, pool, k=1, exclude=excl)
        np.testing.assert_array_equal(ix[:, 0], idx[:, 1])
    for index in ("hnsw", "ivf"):
        ix, _ = mine_targets(queries, pool, k=1, exact=False, index=index, exclude=pairs)
        assert (ix[:, 0] != planted).all()


def test_exclusion_errors():
    p = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match="fewer than k=2"):
        mine_targets(p[:1], p[:2], k=2, exclude=[(0, 1)])
    with pytest.raises(ValueError, match="out of range"):
        mine_targets(p, p, exclude=[(0, 7)])
    with pytest.raises(ValueError, match="expected shape"):
        mine_targets(p, p, exclude=np.zeros((2, 3), bool))


def test_exclusion_fallback_when_approx_returns_too_few():
    # every query excludes all but the last pool item: the approximate candidates run out, the exact re-search fills in
    r = np.random.default_rng(2)
    pool, q = r.normal(size=(60, 8)).astype(np.float32), r.normal(size=(5, 8)).astype(np.float32)
    pairs = np.array([(i, j) for i in range(5) for j in range(59)])
    idx, sim = mine_targets(q, pool, exact=False, index="hnsw", ef_search=16, exclude=pairs)
    assert idx[:, 0].tolist() == [59] * 5
    np.testing.assert_allclose(sim[:, 0], _brute(q, pool[59:], 1)[1][:, 0], atol=1e-5)


def test_sample_topk():
    ix = np.arange(30).reshape(6, 5)
    np.testing.assert_array_equal(sample_topk(ix[:, :1], None), ix[:, 0])
    a = sample_topk(ix, ix.astype(np.float32), seed=4)
    np.testing.assert_array_equal(a, sample_topk(ix, ix.astype(np.float32), seed=4))
    assert all(a[r] in ix[r] for r in range(6))
    draws = np.stack([sample_topk(ix, seed=s) for s in range(100)])
    assert all(len(set(draws[:, r])) == 5 for r in range(6))
    with pytest.raises(ValueError):
        sample_topk(ix, np.zeros((6, 4)))


def test_miner_config_validation():
    with pytest.raises(ValueError, match="'text', 'image', 'both'"):
        MinerConfig(query="audio")
    with pytest.raises(ValueError, match="'hnsw', 'ivf'"):
        MinerConfig(index="lsh")
    with pytest.raises(ValueError, match="positive integer"):
        MinerConfig(k=0)
    with pytest.raises(ValueError, match="'torch', 'faiss'"):
        MinerConfig(exact_backend="numpy")
    for bad in (dict(hnsw_m=0), dict(hnsw_ef_construction=-1), dict(hnsw_ef_search=2.0), dict(ivf_nlist=0),
                dict(ivf_nprobe=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MinerConfig(**bad)
    c = MinerConfig()
    assert (c.exact_backend, c.hnsw_m, c.hnsw_ef_construction, c.hnsw_ef_search, c.ivf_nlist, c.ivf_nprobe) == \
        ("torch", 24, 60, 96, None, None)


def test_miner_config_reaches_the_search(tiny, monkeypatch):
    model, tok = tiny
    seen = {}
    real = miner.mine_targets

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)

    monkeypatch.setattr(miner, "mine_targets", spy)
    cfg = MinerConfig(exact=False, index="ivf", hnsw_m=8, hnsw_ef_construction=20, hnsw_ef_search=30, ivf_nlist=2,
                      ivf_nprobe=2, exact_backend="faiss")
    mine_for_quadruplets(model, tok, _quads(), cfg)
    assert {k: seen[k] for k in ("exact", "index", "hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe",
                                 "exact_backend")} == dict(exact=False, index="ivf", hnsw_m=8, ef_construction=20,
                                                           ef_search=30, nlist=2, nprobe=2, exact_backend="faiss")
    assert seen["device"].type == "cpu"


def test_duplicate_pairs():
    assert duplicate_pairs(["a", "b", "c"], ["c", "b", "a", "a"]).tolist() == [[0, 2], [0, 3], [2, 0]]
    assert duplicate_pairs(["a", "b"], ["a", "b"], keep_own=False).tolist() == [[0, 0], [1, 1]]
    assert duplicate_pairs(["a"], ["b"]).shape == (0, 2)


def test_curriculum_nested_and_complete():
    s = np.random.default_rng(0).uniform(0, 1, 100)
    st = curriculum_schedule(s, epochs=6)
    assert [len(x) for x in st] == [33, 67, 100, 100, 100, 100]
    assert set(st[0]) < set(st[1]) < set(st[2])
    for e in range(2, 6):
        np.testing.assert_array_equal(st[e], np.arange(100))
    assert s[st[0]].min() >= np.delete(s, st[0]).max()  # easy = highest target similarity
    assert s[st[1]].min() >= np.delete(s, st[1]).max()
    assert all(len(x) == 100 for x in curriculum_schedule(s, 3, mode="none"))
    assert [len(x) for x in curriculum_schedule(s, 2, boundaries=(0.25,))] == [25, 100]
    assert [len(x) for x in curriculum_schedule(torch.tensor(s), 1)] == [33]


def test_curriculum_bad_values():
    s = np.linspace(0, 1, 10)
    with pytest.raises(ValueError, match="'none', 'terciles'"):
        curriculum_schedule(s, 3, mode="linear")
    with pytest.raises(ValueError, match="increasing"):
        curriculum_schedule(s, 3, boundaries=(0.6, 0.3))
    with pytest.raises(ValueError, match="epochs"):
        curriculum_schedule(s, 0)
    with pytest.raises(ValueError, match="non-finite"):
        curriculum_schedule([0.1, float("nan")], 2)


# ---- model-level: tiny random open_clip model and a hand-made Quadruplets ----

@pytest.fixture(scope="module")
def tiny():
    from saferclip.core import TINY_ARCH, load_clip, seed_everything
    seed_everything(0)
    model, _, tok = load_clip(TINY_ARCH)
    return model, tok


def _quads(n=20, seed=0):
    from saferclip.data import Quadruplets
    g = torch.Generator().manual_seed(seed)
    objs = ["cat", "dog", "car", "tree", "boat", "cake", "child", "horse", "chair", "lamp"]
    safe = [f"a photo of a {objs[i % 10]} number {i}" for i in range(n)]
    unsafe = [f"a violent photo of a {objs[(i * 3) % 10]} with blood {i}" for i in range(n)]
    unsafe[3] = safe[11]           # exact duplicate of another row's safe caption
    unsafe[5] = safe[5]            # identical to its own pair: never excluded
    si = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)
    ui = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8, generator=g)
    ui[7] = si[15]                 # unsafe image of row 7 == safe image of row 15
    return Quadruplets(ids=[f"r{i}" for i in range(n)], safe_captions=safe, unsafe_captions=unsafe,
                       safe_images=si, unsafe_images=ui, tags=["violence"] * n, name="toy")


def test_known_structure_and_duplicate_exclusion(tiny):
    model, tok = tiny
    q = _quads()
    off = mine_for_quadruplets(model, tok, q, MinerConfig(exclude_duplicates=False))
    assert off.target_index[3] == 11 and abs(off.target_sim[3] - 1) < 1e-4
    on = mine_for_quadruplets(model, tok, q)
    assert on.target_index[3] != 11 and on.n_excluded == 1
    assert on.target_index[5] == 5 and abs(on.rigid_sim[5] - 1) < 1e-4   # own identical pair kept
    assert isinstance(on, MinedTargets) and len(on) == 20 and on.target_index.dtype == np.int64
    assert (on.target_sim >= on.rigid_sim - 1e-5).all()
    # target_sim really is cos(T0(t*_i), T0(t_target)): recompute with the encoder
    emb = embed_quadruplets(model, tok, q)
    ref = (emb["unsafe_text"] * emb["safe_text"][torch.as_tensor(on.target_index)]).sum(1).numpy()
    np.testing.assert_allclose(on.target_sim, ref, atol=1e-5)
    img = mine_for_quadruplets(model, tok, q, MinerConfig(query="image"))
    assert img.target_index[7] == 15 and abs(img.query_sim[7] - 1) < 1e-4
    assert img.target_sim[7] < 0.999   # reported similarity stays text-text


def test_both_query_is_mean_of_cosines(tiny):
    model, tok = tiny
    emb = embed_quadruplets(model, tok, _quads(), EMBED_FIELDS)
    q, p = query_matrices(emb, "both")
    ref = (emb["unsafe_text"] @ emb["safe_text"].T + emb["unsafe_image"] @ emb["safe_image"].T) / 2
    np.testing.assert_allclose(q @ p.T, ref.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="'text', 'image', 'both'"):
        query_matrices(emb, "audio")


def test_cache_hit_avoids_reencoding(tiny, tmp_path, monkeypatch):
    model, tok = tiny
    calls = {"text": 0, "image": 0}
    enc_t, enc_i = miner.encode_texts, miner.encode_images

    def count_t(*a, **kw):
        calls["text"] += 1
        return enc_t(*a, **kw)

    def count_i(*a, **kw):
        calls["image"] += 1
        return enc_i(*a, **kw)

    monkeypatch.setattr(miner, "encode_texts", count_t)
    monkeypatch.setattr(miner, "encode_images", count_i)
    q = _quads()
    cfg = MinerConfig(query="both")
    m1 = mine_for_quadruplets(model, tok, q, cfg, cache_dir=tmp_path, model_id="tiny-test")
    assert calls == {"text": 2, "image": 2}
    m2 = mine_for_quadruplets(model, tok, q, cfg, cache_dir=tmp_path, model_id="tiny-test")
    assert calls == {"text": 2, "image": 2}
    np.testing.assert_array_equal(m1.target_index, m2.target_index)
    np.testing.assert_array_equal(m1.target_sim, m2.target_sim)
    mine_for_quadruplets(model, tok, q, MinerConfig(), cache_dir=tmp_path, model_id="tiny-test")
    assert calls == {"text": 2, "image": 2}             # text-only mining reuses the text cache
    mine_for_quadruplets(model, tok, q, cfg, cache_dir=tmp_path, model_id="another-model")
    assert calls == {"text": 4, "image": 4}             # other model -> other key
    mine_for_quadruplets(model, tok, q.subset(list(range(12))), MinerConfig(), cache_dir=tmp_path, model_id="tiny-test")
    assert calls["text"] == 6                           # other data -> other key
    # a corrupted cache file is re-encoded (with a warning), never trusted
    victim = tmp_path / f"miner-emb-{miner._cache_key('tiny-test', tok, q.fingerprint())}-safe_text.safetensors"
    assert victim.exists()
    victim.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable"):
        again = embed_quadruplets(model, tok, q, ("safe_text",), cache_dir=tmp_path, model_id="tiny-test")
    assert calls["text"] == 7
    np.testing.assert_allclose(again["safe_text"].numpy(), enc_t(model, tok, q.safe_captions).numpy(), atol=1e-6)
    embed_quadruplets(model, tok, q, ("safe_text",), cache_dir=tmp_path, model_id="tiny-test")
    assert calls["text"] == 7                           # rewritten file is a hit again


def test_cache_without_model_id_uses_weights(tiny, tmp_path):
    model, tok = tiny
    fp = miner.model_fingerprint(model)
    assert fp == miner.model_fingerprint(model)
    import copy
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    assert miner.model_fingerprint(other) != fp
    a = embed_quadruplets(model, tok, _quads(), cache_dir=tmp_path)
    b = embed_quadruplets(other, tok, _quads(), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    assert not torch.allclose(a["safe_text"], b["safe_text"]) or not torch.allclose(a["unsafe_text"], b["unsafe_text"])


def test_report_and_plot(tiny, tmp_path):
    model, tok = tiny
    m = mine_for_quadruplets(model, tok, _quads())
    rep = proximity_report(m)
    assert rep["n"] == 20 and rep["query"] == "text"
    assert rep["proximal_mean"] >= rep["rigid_mean"] and rep["share_worse"] == 0
    assert abs(rep["share_own_pair"] + rep["share_improved"] - 1) < 1e-9
    np.testing.assert_allclose(rep["rigid_mean"], m.rigid_sim.mean(), atol=1e-6)
    assert 1 <= rep["unique_targets"] <= 20 and rep["max_reuse"] >= 1
    fig = plot_proximity(m, tmp_path / "fig" / "proximity.png")
    assert (tmp_path / "fig" / "proximity.png").stat().st_size > 1000
    assert (tmp_path / "fig" / "proximity.pdf").stat().st_size > 1000
    assert fig.axes[0].get_xlabel() and len(fig.axes[0].patches) > 0
    import matplotlib.pyplot as plt
    plt.close(fig)
