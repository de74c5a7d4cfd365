"""Tests for saferclip.losses: hand-computed values, gradient isolation, monotonicity, symmetry, registry."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from saferclip.losses import (
    REFERENCE_FIELDS, TRAINABLE_FIELDS, EmbeddingBatch, SafeCLIPWeights, SafeOnlyWeights, SaferCLIPWeights,
    clip_infonce, cosine_distance, l2_normalize, loss_for_method, relative_redirection_loss, safe_only_loss,
    safeclip_loss, saferclip_loss, weights_for_method,
)


def softplus(m: float) -> float:
    return math.log1p(math.exp(m))


def toy_batch(seed=0, B=4, D=6):
    """Random references; fine-tuned = reference + small noise; every tensor a leaf requiring grad."""
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.randn(B, D, generator=g)
    ref = {k: r() for k in REFERENCE_FIELDS}
    ft = {"txt_safe": ref["ref_txt_safe"] + 0.1 * r(), "txt_unsafe": ref["ref_txt_unsafe"] + 0.1 * r(),
          "img_safe": ref["ref_img_safe"] + 0.1 * r(), "img_unsafe": ref["ref_img_unsafe"] + 0.1 * r()}
    return EmbeddingBatch(**{k: v.clone().requires_grad_() for k, v in {**ft, **ref}.items()})


def swap_modalities(e: EmbeddingBatch) -> EmbeddingBatch:
    d = {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
    return EmbeddingBatch(**{k.replace("txt", "TMP").replace("img", "txt").replace("TMP", "img"): v for k, v in d.items()})


# ---------------------------------------------------------------- building blocks
def test_relative_hand_computed_2d():
    q = torch.tensor([[1., 0.], [0., 2.], [1., 1.]])
    u = torch.tensor([[3., 0.], [1., 0.], [1., 0.]])
    t = torch.tensor([[0., 1.], [0., 5.], [0., 1.]])
    # rows: margin +1, -1, 0
    assert relative_redirection_loss(q[:1], u[:1], t[:1]).item() == pytest.approx(softplus(1.0), abs=1e-6)
    assert relative_redirection_loss(q[1:2], u[1:2], t[1:2]).item() == pytest.approx(softplus(-1.0), abs=1e-6)
    expected = (softplus(1.0) + softplus(-1.0) + math.log(2.0)) / 3
    assert relative_redirection_loss(q, u, t).item() == pytest.approx(expected, abs=1e-6)


def test_relative_equals_reference_formula_random():
    g = torch.Generator().manual_seed(1)
    q, u, t = (torch.randn(7, 5, generator=g) for _ in range(3))
    cs = lambda a, b: F.cosine_similarity(a, b, dim=1)
    expected = torch.log1p(torch.exp(cs(q, u) - cs(q, t))).mean()
    assert relative_redirection_loss(q, u, t).item() == pytest.approx(expected.item(), abs=1e-6)


def test_cosine_distance_hand_computed():
    a = torch.tensor([[1., 0.], [0., 1.]])
    b = torch.tensor([[1., 0.], [1., 1.]])
    assert cosine_distance(a, b).item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2, abs=1e-6)
    assert cosine_distance(a, -a).item() == pytest.approx(2.0, abs=1e-6)


def manual_infonce(a, b, s):
    a = a / a.norm(dim=1, keepdim=True)
    b = b / b.norm(dim=1, keepdim=True)
    L = s * a @ b.T
    n = a.shape[0]
    rows = -sum(L[i, i] - torch.logsumexp(L[i, :], 0) for i in range(n)) / n
    cols = -sum(L[j, j] - torch.logsumexp(L[:, j], 0) for j in range(n)) / n
    return (rows + cols) / 2


def test_infonce_hand_written_cross_entropy():
    eye = torch.eye(2)
    assert clip_infonce(eye, eye, logit_scale=1.0).item() == pytest.approx(softplus(-1.0), abs=1e-6)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    for s in (1.0, 10.0, 100.0):
        assert clip_infonce(a, b, s).item() == pytest.approx(manual_infonce(a, b, s).item(), rel=1e-5, abs=1e-5)
    # default scale is Safe-CLIP's exp(4.6052) ~ 100
    assert clip_infonce(a, b).item() == pytest.approx(manual_infonce(a, b, math.exp(4.6052)).item(), rel=1e-3)


def test_softplus_stability_large_and_small_inputs():
    q = torch.tensor([[1., 0.], [0., 2.], [1., 1.]])
    u = torch.tensor([[3., 0.], [1., 0.], [1., 0.]])
    t = torch.tensor([[0., 1.], [0., 5.], [0., 1.]])
    ref = relative_redirection_loss(q, u, t)
    qq = (1e30 * q).requires_grad_()
    big = relative_redirection_loss(qq, 1e35 * u, 1e-30 * t)
    assert torch.isfinite(big)
    assert big.item() == pytest.approx(ref.item(), abs=1e-6)
    big.backward()
    assert torch.isfinite(qq.grad).all()
    # bf16 inputs are computed in float32
    assert relative_redirection_loss(q.bfloat16(), u.bfloat16(), t.bfloat16()).dtype == torch.float32
    assert torch.isfinite(l2_normalize(torch.zeros(2, 3))).all()


def test_bad_shapes_raise_named_errors():
    with pytest.raises(ValueError, match="target_ref"):
        relative_redirection_loss(torch.ones(3, 2), torch.ones(3, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="2-D"):
        relative_redirection_loss(torch.ones(2), torch.ones(2), torch.ones(2))
    with pytest.raises(ValueError, match="img_safe"):
        EmbeddingBatch(txt_safe=torch.ones(3, 2), img_safe=torch.ones(4, 2))


# ---------------------------------------------------------------- gradients
def test_relative_loss_detaches_refs():
    q, u, t = (torch.randn(3, 4).requires_grad_() for _ in range(3))
    relative_redirection_loss(q, u, t).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert u.grad is None and t.grad is None


@pytest.mark.parametrize("fn,trainable", [
    (safeclip_loss, TRAINABLE_FIELDS),
    (saferclip_loss, TRAINABLE_FIELDS),
    (lambda e: saferclip_loss(e, SaferCLIPWeights(cross_modal_preservation="relative")), TRAINABLE_FIELDS),
    (safe_only_loss, ("txt_safe", "img_safe")),
])
def test_gradient_only_into_finetuned_side(fn, trainable):
    e = toy_batch(3)
    total, terms = fn(e)
    total.backward()
    for k in REFERENCE_FIELDS:
        assert getattr(e, k).grad is None, f"frozen {k} received a gradient"
    for k in trainable:
        g = getattr(e, k).grad
        assert g is not None and g.abs().sum() > 0, f"trainable {k} received no gradient"


# ---------------------------------------------------------------- totals
def test_safeclip_total_is_hand_weighted_formula():
    e = toy_batch(4)
    total, terms = safeclip_loss(e)
    lam = [0.1, 0.1, 0.1, 0.2, 0.25, 0.25, 0.25, 0.5]
    L = [cosine_distance(e.txt_safe, e.ref_txt_safe), cosine_distance(e.txt_unsafe, e.ref_txt_safe),
         cosine_distance(e.img_safe, e.ref_img_safe), cosine_distance(e.img_unsafe, e.ref_img_safe),
         manual_infonce(e.txt_safe, e.ref_img_safe, 100.0), manual_infonce(e.txt_unsafe, e.ref_img_safe, 100.0),
         manual_infonce(e.ref_txt_safe, e.img_safe, 100.0), manual_infonce(e.ref_txt_safe, e.img_unsafe, 100.0)]
    expected = sum(l / sum(lam) * x.item() for l, x in zip(lam, L)) / 8
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert list(terms) == ["pres_txt", "redir_txt", "pres_img", "redir_img",
                           "pres_t2v", "redir_t2v", "pres_v2t", "redir_v2t"]
    for x, k in zip(L, terms):
        assert terms[k].item() == pytest.approx(x.item(), rel=1e-5, abs=1e-6), k


def test_saferclip_total_and_terms():
    e = toy_batch(5)
    total, terms = saferclip_loss(e)
    d = lambda n: getattr(e, n)
    expected_terms = {
        "pres_txt": cosine_distance(d("txt_safe"), d("ref_txt_safe")),
        "redir_txt": cosine_distance(d("txt_unsafe"), d("ref_txt_target")),
        "pres_img": cosine_distance(d("img_safe"), d("ref_img_safe")),
        "redir_img": cosine_distance(d("img_unsafe"), d("ref_img_target")),
        "pres_t2v": manual_infonce(d("txt_safe"), d("ref_img_safe"), 100.0),
        "redir_t2v": relative_redirection_loss(d("txt_unsafe"), d("ref_img_unsafe"), d("ref_img_target")),
        "pres_v2t": manual_infonce(d("ref_txt_safe"), d("img_safe"), 100.0),
        "redir_v2t": relative_redirection_loss(d("img_unsafe"), d("ref_txt_unsafe"), d("ref_txt_target")),
    }
    for k, v in expected_terms.items():
        assert terms[k].item() == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
    lam = dict(pres_txt=0.1, redir_txt=0.1, pres_img=0.1, redir_img=0.2,
               pres_t2v=0.25, redir_t2v=0.25, pres_v2t=0.25, redir_v2t=0.5)
    expected = sum(lam[k] / 1.75 * expected_terms[k].item() for k in lam) / 8
    assert total.item() == pytest.approx(expected, rel=1e-5)


def test_relative_combine_mean_and_weighted_differ_correctly():
    e = toy_batch(6)
    tw, terms = saferclip_loss(e, SaferCLIPWeights(relative_combine="weighted"))
    tm, _ = saferclip_loss(e, SaferCLIPWeights(relative_combine="mean"))
    diff = (0.25 - 0.375) * terms["redir_t2v"] + (0.5 - 0.375) * terms["redir_v2t"]
    assert (tw - tm).item() == pytest.approx((diff / 1.75 / 8).item(), abs=1e-6)


def test_relative_cross_modal_preservation_reading():
    e = toy_batch(7)
    _, terms = saferclip_loss(e, SaferCLIPWeights(cross_modal_preservation="relative"))
    assert terms["pres_t2v"].item() == pytest.approx(
        relative_redirection_loss(e.txt_safe, e.ref_img_unsafe, e.ref_img_safe).item(), abs=1e-7)
    assert terms["pres_v2t"].item() == pytest.approx(
        relative_redirection_loss(e.img_safe, e.ref_txt_unsafe, e.ref_txt_safe).item(), abs=1e-7)


def test_safe_only_total_and_needs_only_safe_half():
    full = toy_batch(8)
    e = EmbeddingBatch(txt_safe=full.txt_safe, img_safe=full.img_safe,
                       ref_txt_safe=full.ref_txt_safe, ref_img_safe=full.ref_img_safe)
    total, terms = safe_only_loss(e)
    _, sc = safeclip_loss(full)
    lam = dict(pres_txt=0.1, pres_img=0.1, pres_t2v=0.25, pres_v2t=0.25)
    assert set(terms) == set(lam)
    expected = sum(lam[k] / 0.7 * sc[k].item() for k in lam) / 4
    assert total.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="txt_unsafe"):
        safeclip_loss(e)


# ---------------------------------------------------------------- properties
def test_rigid_target_equals_safe_refs():
    e = toy_batch(9).with_rigid_targets()
    assert e.ref_txt_target is e.ref_txt_safe and e.ref_img_target is e.ref_img_safe
    _, tr = saferclip_loss(e)
    _, ts = safeclip_loss(e)
    for k in ("pres_txt", "redir_txt", "pres_img", "redir_img", "pres_t2v", "pres_v2t"):
        assert tr[k].item() == pytest.approx(ts[k].item(), abs=1e-6), k
    assert tr["redir_t2v"].item() == pytest.approx(
        relative_redirection_loss(e.txt_unsafe, e.ref_img_unsafe, e.ref_img_safe).item(), abs=1e-7)
    # and an explicit copy of the safe refs as targets gives the same numbers
    e2 = dataclasses.replace(toy_batch(9), ref_txt_target=toy_batch(9).ref_txt_safe.clone(),
                             ref_img_target=toy_batch(9).ref_img_safe.clone())
    t2, terms2 = saferclip_loss(e2)
    assert t2.item() == pytest.approx(saferclip_loss(e)[0].item(), abs=1e-7)


def test_symmetry_i2t_vs_t2i():
    e = toy_batch(10)
    # one function, roles swapped
    i2t = relative_redirection_loss(e.img_unsafe, e.ref_txt_unsafe, e.ref_txt_target)
    t2i_swapped = relative_redirection_loss(
        swap_modalities(e).txt_unsafe, swap_modalities(e).ref_img_unsafe, swap_modalities(e).ref_img_target)
    assert i2t.item() == pytest.approx(t2i_swapped.item(), abs=1e-7)
    for cmp in ("infonce", "relative"):
        w = SaferCLIPWeights(cross_modal_preservation=cmp)
        _, a = saferclip_loss(e, w)
        _, b = saferclip_loss(swap_modalities(e), w)
        for k1, k2 in (("redir_t2v", "redir_v2t"), ("pres_t2v", "pres_v2t"),
                       ("redir_txt", "redir_img"), ("pres_txt", "pres_img")):
            assert a[k1].item() == pytest.approx(b[k2].item(), abs=1e-6), (cmp, k1)
            assert a[k2].item() == pytest.approx(b[k1].item(), abs=1e-6), (cmp, k2)


def test_loss_decreases_as_unsafe_moves_toward_target():
    e = toy_batch(11)
    e = dataclasses.replace(e, ref_img_unsafe=e.ref_txt_unsafe, ref_img_target=e.ref_txt_target)  # aligned towers
    values, totals = [], []
    for a in torch.linspace(0, 1, 6):
        x = dataclasses.replace(e, img_unsafe=(1 - a) * e.ref_img_unsafe + a * e.ref_img_target,
                                txt_unsafe=(1 - a) * e.ref_txt_unsafe + a * e.ref_txt_target)
        total, terms = saferclip_loss(x)
        values.append(torch.stack([terms[k] for k in ("redir_txt", "redir_img", "redir_t2v", "redir_v2t")]))
        totals.append(total)
    values, totals = torch.stack(values), torch.stack(totals)
    assert (values.diff(dim=0) < 0).all(), values
    assert (totals.diff() < 0).all(), totals
    # and a gradient step on the unsafe query lowers the relative loss
    q = e.img_unsafe.detach().clone().requires_grad_()
    l0 = relative_redirection_loss(q, e.ref_txt_unsafe, e.ref_txt_target)
    l0.backward()
    with torch.no_grad():
        l1 = relative_redirection_loss(q - 0.5 * q.grad, e.ref_txt_unsafe, e.ref_txt_target)
    assert l1 < l0


# ---------------------------------------------------------------- configs and registry
def test_weights_defaults_and_normalisation():
    w = SafeCLIPWeights()
    assert list(w.term_weights().values()) == [0.1, 0.1, 0.1, 0.2, 0.25, 0.25, 0.25, 0.5]
    assert sum(w.normalised().values()) == pytest.approx(1 / 8)
    assert SaferCLIPWeights().term_weights() == w.term_weights()
    assert sum(SafeOnlyWeights().normalised().values()) == pytest.approx(1 / 4)
    assert sum(SafeCLIPWeights(divisor=1.0).normalised().values()) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [dict(redir_img=-0.1), dict(pres_txt=float("nan")),
                                 dict(pres_txt=0, redir_txt=0, pres_img=0, redir_img=0,
                                      pres_t2v=0, redir_t2v=0, pres_v2t=0, redir_v2t=0),
                                 dict(logit_scale=0.0), dict(cross_modal_preservation="cos"),
                                 dict(relative_combine="sum")])
def test_bad_weights_raise(bad):
    with pytest.raises(ValueError):
        SaferCLIPWeights(**bad)


def test_loss_for_method_registry():
    e = toy_batch(12)
    for m in ("saferclip", "relative", "relative+proximity"):
        assert loss_for_method(m)(e)[0].item() == pytest.approx(saferclip_loss(e)[0].item())
    assert loss_for_method("safeclip")(e)[0].item() == pytest.approx(safeclip_loss(e)[0].item())
    assert loss_for_method("safe-only")(e)[0].item() == pytest.approx(safe_only_loss(e)[0].item())
    custom = loss_for_method("saferclip", {"redir_v2t": 2.0, "cross_modal_preservation": "relative"})
    assert custom(e)[0].item() == pytest.approx(
        saferclip_loss(e, SaferCLIPWeights(redir_v2t=2.0, cross_modal_preservation="relative"))[0].item())
    assert isinstance(weights_for_method("safe-only"), SafeOnlyWeights)
    with pytest.raises(ValueError, match="saferclip"):
        loss_for_method("safe_clip")
    with pytest.raises(ValueError, match="valid keys"):
        loss_for_method("safe-only", {"redir_txt": 0.1})
    with pytest.raises(ValueError, match="SafeCLIPWeights"):
        weights_for_method("safeclip", SaferCLIPWeights())


def test_losses_run_in_full_precision_under_autocast():
    g = torch.Generator().manual_seed(13)
    x, y, z = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    ref_nce, ref_rel = clip_infonce(x, y), relative_redirection_loss(x, y, z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nce, rel = clip_infonce(x, y), relative_redirection_loss(x, y, z)
        unguarded = clip_infonce.__wrapped__(x, y)
    assert nce.dtype == torch.float32 and rel.dtype == torch.float32
    assert nce.item() == pytest.approx(ref_nce.item(), abs=1e-5)
    assert rel.item() == pytest.approx(ref_rel.item(), abs=1e-6)
    # the guard matters: the same computation with bf16 matmuls is visibly off
    assert abs(unguarded.item() - ref_nce.item()) > 1e-3
