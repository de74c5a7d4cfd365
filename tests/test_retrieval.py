"""Tests for saferclip.retrieval: recall@K, ties, the retrieval table, unsafe top-1 rate, quadruplet evaluation."""
import pytest
import torch
import torch.nn.functional as F

from saferclip.core import encode_images, encode_texts

from saferclip.retrieval import (
    RETRIEVAL_PAIRS, embed_quadruplets, evaluate_quadruplets, gt_ranks, recall_at_k, retrieval_metrics,
    unsafe_top1_rate,
)


def brute_force_recall(q, g, gt, k):
    """Reference: full descending sort, stable by gallery index."""
    q, g = F.normalize(q.double(), dim=-1), F.normalize(g.double(), dim=-1)
    order = torch.argsort(-(q @ g.T), dim=1, stable=True)
    hits = [(order[i, :k] == gt[i]).any().item() for i in range(len(q))]
    return 100.0 * sum(hits) / len(hits)


def test_identity_gives_100():
    eye = torch.eye(7)
    assert recall_at_k(eye, eye) == {1: 100.0, 5: 100.0, 10: 100.0, 20: 100.0}
    # unnormalised input is normalised inside
    assert recall_at_k(3 * eye, 0.1 * eye, ks=(1,)) == {1: 100.0}


def test_known_permutation():
    eye = torch.eye(5)
    perm = torch.tensor([1, 2, 3, 4, 0])
    # gallery j = e_{perm[j]}: with the default gt the right item is orthogonal to the query (missed at K=1)
    assert recall_at_k(eye, eye[perm], ks=(1, 5)) == {1: 0.0, 5: 100.0}
    assert recall_at_k(eye, eye[perm], ks=(1,), gt=perm.argsort()) == {1: 100.0}
    gal = eye + 0.5 * eye[perm]          # row j = e_j + 0.5 e_{j+1}
    inv = perm.argsort()                 # query i's second-nearest gallery item is i-1
    assert gt_ranks(eye, gal, gt=inv).tolist() == [1] * 5
    assert recall_at_k(eye, gal, ks=(1, 2), gt=inv) == {1: 0.0, 2: 100.0}
    # mixed: queries 0,1 point at their nearest item, query 2 at an orthogonal one (3 orthogonal items tie),
    # queries 3,4 at their second-nearest
    gt = torch.tensor([0, 1, 4, 2, 3])
    assert gt_ranks(eye, gal, gt=gt, ties="optimistic").tolist() == [0, 0, 2, 1, 1]
    assert gt_ranks(eye, gal, gt=gt, ties="pessimistic").tolist() == [0, 0, 4, 1, 1]
    assert recall_at_k(eye, gal, ks=(1, 2, 3), gt=gt) == {1: 40.0, 2: 80.0, 3: 80.0}


def test_matches_brute_force_on_random_data():
    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(40, 8, generator=g), torch.randn(50, 8, generator=g)
    gt = torch.randint(0, 50, (40,), generator=g)
    r = recall_at_k(q, gal, ks=(1, 5, 10), gt=gt)
    for k in (1, 5, 10):
        assert r[k] == pytest.approx(brute_force_recall(q, gal, gt, k))
    # chunking does not change anything
    assert torch.equal(gt_ranks(q, gal, gt, chunk=7), gt_ranks(q, gal, gt))


def test_ties_are_deterministic():
    twins = torch.tensor([[1., 0.], [1., 0.], [0., 1.]])
    assert gt_ranks(twins[:2], twins, ties="pessimistic").tolist() == [1, 1]
    assert gt_ranks(twins[:2], twins, ties="optimistic").tolist() == [0, 0]
    assert gt_ranks(twins[:2], twins, ties="index").tolist() == [0, 1]
    # a collapsed model scores 0 at K=1 under the default rule, 100 at K = gallery size
    assert recall_at_k(torch.ones(4, 3), torch.ones(4, 3), ks=(1, 4)) == {1: 0.0, 4: 100.0}
    # repeated calls agree
    assert gt_ranks(twins[:2], twins).tolist() == gt_ranks(twins[:2], twins).tolist()
    with pytest.raises(ValueError, match="ties"):
        gt_ranks(twins, twins, ties="random")


def test_bad_inputs_raise():
    eye = torch.eye(3)
    with pytest.raises(ValueError, match="gt has 2"):
        recall_at_k(eye, eye, gt=[0, 1])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        recall_at_k(eye, eye, gt=[0, 1, 3])
    with pytest.raises(ValueError, match="non-finite"):
        recall_at_k(torch.tensor([[float("nan"), 0., 0.]]), eye)
    with pytest.raises(ValueError, match="dim"):
        recall_at_k(eye, torch.eye(4))
    with pytest.raises(ValueError, match="ks"):
        recall_at_k(eye, eye, ks=(0,))


def test_retrieval_metrics_columns():
    g = torch.Generator().manual_seed(1)
    t = F.normalize(torch.randn(10, 16, generator=g), dim=-1)
    v = F.normalize(t + 0.05 * torch.randn(10, 16, generator=g), dim=-1)
    # unsafe items point to an unrelated random direction: redirection near chance, unsafe<->unsafe perfect
    u = F.normalize(torch.randn(10, 16, generator=g), dim=-1)
    emb = {"t": t, "v": v, "t*": u, "v*": u.clone()}
    m = retrieval_metrics(emb, ks=(1, 10))
    assert len(m) == len(RETRIEVAL_PAIRS) * 2
    assert m["T->V@1"] == 100.0 and m["V->T@1"] == 100.0
    assert m["T*->V*@1"] == 100.0 and m["V*->T*@1"] == 100.0
    assert m["T*->V@10"] == 100.0
    assert m["T*->V@1"] == pytest.approx(recall_at_k(u, v, ks=(1,))[1])
    assert m["T*->V@1"] < 50.0
    # the ideal safe model: unsafe item = its safe partner
    ideal = {"t": t, "v": v, "t*": t.clone(), "v*": v.clone()}
    mi = retrieval_metrics(ideal, ks=(1,))
    assert mi["T*->V@1"] == 100.0 and mi["V*->T@1"] == 100.0
    with pytest.raises(ValueError, match="missing"):
        retrieval_metrics({"t": t, "v": v}, ks=(1,))
    with pytest.raises(ValueError, match="same shape"):
        retrieval_metrics({"t": t, "v": v, "t*": t[:5], "v*": v}, ks=(1,))


def test_unsafe_top1_rate_constructed():
    safe = torch.tensor([[1., 0.], [0., 1.]])
    unsafe = torch.tensor([[-1., 0.]])
    qs = torch.tensor([[1., 0.1], [-1., 0.2], [-1., -0.3], [0.2, 1.]])   # nearest: safe, unsafe, unsafe, safe
    assert unsafe_top1_rate(qs, safe, unsafe) == 50.0
    assert unsafe_top1_rate(qs[:1], safe, unsafe) == 0.0
    assert unsafe_top1_rate(qs[1:3], safe, unsafe) == 100.0
    assert unsafe_top1_rate(torch.tensor([[1., 0.]]), safe, torch.tensor([[5., 0.]])) == 100.0   # tie -> unsafe
    g = torch.Generator().manual_seed(2)
    q, s, u = torch.randn(30, 4, generator=g), torch.randn(20, 4, generator=g), torch.randn(25, 4, generator=g)
    pool = F.normalize(torch.cat([s, u]), dim=-1)
    top = (F.normalize(q, dim=-1) @ pool.T).argmax(1)
    assert unsafe_top1_rate(q, s, u) == pytest.approx(100.0 * (top >= 20).float().mean().item())


def test_evaluate_quadruplets_tiny(tiny_clip, quads):
    model, preprocess, tokenizer = tiny_clip
    model.train()
    try:
        res = evaluate_quadruplets(model, tokenizer, quads, ks=(1, 5), batch_size=5)
        assert model.training, "evaluation must restore the model's mode"
    finally:
        model.eval()
    e = embed_quadruplets(model, tokenizer, quads, batch_size=5)
    n = len(quads)
    assert set(e) == {"t", "t*", "v", "v*"} and all(x.shape[0] == n for x in e.values())
    assert all(torch.allclose(x.norm(dim=1), torch.ones(n), atol=1e-4) for x in e.values())
    # each key holds the right column of the quadruplets
    assert torch.allclose(e["t"], encode_texts(model, tokenizer, quads.safe_captions), atol=1e-5)
    assert torch.allclose(e["t*"], encode_texts(model, tokenizer, quads.unsafe_captions), atol=1e-5)
    assert torch.allclose(e["v"], encode_images(model, quads.safe_images), atol=1e-5)
    assert torch.allclose(e["v*"], encode_images(model, quads.unsafe_images), atol=1e-5)
    assert not torch.allclose(e["v"], e["v*"], atol=1e-3) and not torch.allclose(e["t"], e["t*"], atol=1e-3)
    expected = retrieval_metrics(e, ks=(1, 5))
    for k, v in expected.items():
        assert res[k] == pytest.approx(v), k
    assert res["unsafe_top1_T*->V"] == pytest.approx(unsafe_top1_rate(e["t*"], e["v"], e["v*"]))
    assert res["unsafe_top1_V*->T"] == pytest.approx(unsafe_top1_rate(e["v*"], e["t"], e["t*"]))


def test_run_manifest_and_records_readers_name_file_and_line(tmp_path):
    import json
    from saferclip.retrieval import read_manifest, read_records, write_records
    rec = {"run": "a", "method": "base", "seed": 0}
    p = write_records([rec, dict(rec, run="b")], tmp_path / "r.jsonl")
    assert [r["run"] for r in read_records(p)] == ["a", "b"]
    p.write_text(json.dumps(rec) + "\n" + json.dumps(dict(rec, run="b"))[:20] + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl: line 2 is not valid JSON \(unterminated JSON.*last line, so the "
                                         r"file looks truncated"):
        read_records(p)
    p.write_text(json.dumps(rec) + "\n" + json.dumps(["b", "base"]) + "\n")
    with pytest.raises(ValueError, match=r"record 1 is a list, expected an object with fields run, method"):
        read_records(p)
    p.write_bytes(b'{"run": "caf\xe9", "method": "base"}\n')
    with pytest.raises(ValueError, match=r"r\.jsonl is not UTF-8 text: byte 0xe9 at offset 12 \(line 1, column 13\)"):
        read_records(p)
    m = tmp_path / "manifest.json"
    m.write_text('{"runs": [{"run": "a", "method": "base", "checkpoint": "x.safetensors"}')
    with pytest.raises(ValueError, match=r"manifest\.json is not valid JSON \(unterminated JSON"):
        read_manifest(m)
    m.write_text('[{"run": "a"}]')
    with pytest.raises(ValueError, match=r"manifest\.json: a run manifest needs a 'runs' list"):
        read_manifest(m)
