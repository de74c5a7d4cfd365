"""Tests for saferclip.drift: drift curves, the summary table, per-layer relative deviation, proximity input."""
import json
import math

import numpy as np
import pytest

from saferclip.drift import (PAPER_DRIFT, drift_curves, drift_table, layer_deviation, layer_group, proximity_from_run,
                             write_drift_results)
from saferclip.retrieval import OURS


def fake_run(d, name, method, seed, scale, epochs=2):
    rd = d / name
    rd.mkdir(parents=True)
    tensors = {"transformer.resblocks.0.attn.in_proj_weight": (3.0, 10.0), "transformer.resblocks.0.mlp.c_fc.weight": (4.0, 10.0),
               "visual.transformer.resblocks.1.attn.out_proj.weight": (1.0, 5.0), "visual.conv1.weight": (2.0, 4.0),
               "logit_scale": (9.0, 1.0)}
    ep, dr = [], []
    for e in range(epochs + 1):
        ep.append({"epoch": e, "step": 10 * e, "drift_text": scale * e + 0.1 * seed * (e > 0),
                   "drift_vision": 2 * scale * e})
        for n, (dd, b) in tensors.items():
            tower = "other" if n == "logit_scale" else ("vision" if n.startswith("visual.") else "text")
            dr.append({"epoch": e, "name": n, "tower": tower, "diff_l2": scale * dd * e, "base_l2": b})
    (rd / "epochs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ep))
    (rd / "drift.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dr))
    return {"run": name, "method": method, "seed": seed, "run_dir": str(rd)}


@pytest.fixture
def runs(tmp_path):
    return [fake_run(tmp_path, f"{m}-s{s}", m, s, sc) for m, sc in (("safeclip", 1.0), ("saferclip", 0.5))
            for s in (0, 1)]


def test_drift_curves(runs):
    c = drift_curves(runs)
    assert len(c) == 4 * 3 * 2
    v = c[(c.run == "safeclip-s1") & (c.epoch == 2) & (c.tower == "text")].l2.iloc[0]
    assert v == pytest.approx(2.1)


def test_drift_table(runs):
    t = drift_table(drift_curves(runs))
    ours = t[t.source == OURS].set_index(["method", "tower"])
    assert ours.loc[("safeclip", "text"), "last epoch"] == pytest.approx(2.05)
    assert ours.loc[("safeclip", "text"), "last epoch std"] == pytest.approx(math.sqrt(0.005))
    assert ours.loc[("saferclip", "vision"), "ratio to Safe-CLIP (last epoch)"] == pytest.approx(0.5)
    paper = t[t.source != OURS].set_index(["method", "tower"])
    assert paper.loc[("saferclip", "vision"), "ratio to Safe-CLIP (last epoch)"] == pytest.approx(3.55 / 5.6)
    assert PAPER_DRIFT["safeclip"]["text"][9] == 8.6e-4


def test_layer_deviation(runs):
    ld = layer_deviation(runs)
    x = ld[ld.run == "safeclip-s0"].set_index(["tower", "layer"])
    # block 0 of the text tower: sqrt((3*2)^2 + (4*2)^2) / sqrt(10^2 + 10^2)
    assert x.loc[("text", "block 0"), "relative"] == pytest.approx(10.0 / math.sqrt(200))
    assert x.loc[("vision", "embed"), "relative"] == pytest.approx(4.0 / 4.0)
    assert "other" not in set(ld.tower)                       # logit_scale is not a tower
    e1 = layer_deviation(runs, epoch=1)
    assert (e1.epoch == 1).all()
    assert layer_group("visual.ln_post.weight") == "head" and layer_group("positional_embedding") == "embed"


def test_missing_logs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="epochs.jsonl"):
        drift_curves([{"run": "x", "method": "safeclip", "run_dir": str(tmp_path / "nope")}])
    with pytest.raises(FileNotFoundError, match="only proximity methods"):
        proximity_from_run(tmp_path)


def test_write_drift_results(runs, tmp_path):
    out = write_drift_results(runs, tmp_path / "res", tmp_path / "fig")
    md = (tmp_path / "res" / "drift.md").read_text()
    assert "per step, SafeR-CLIP moves less than Safe-CLIP" in md        # the same-steps comparison
    assert "by construction" in md                                      # and why the per-epoch one is not enough
    for f in ("drift.png", "drift.pdf", "drift_layers.png", "drift_layers.pdf"):
        assert (tmp_path / "fig" / f).is_file()


def test_truncated_log_is_named_with_line_and_cause(tmp_path):
    from saferclip.drift import read_jsonl
    log = tmp_path / "epochs.jsonl"
    log.write_text(json.dumps({"epoch": 0, "drift_text": 0.0}) + "\n" + '{"epoch": 1, "drift_te')
    with pytest.raises(ValueError, match=r"epochs\.jsonl: line 2 is not valid JSON \(unterminated JSON.*it is the last "
                                         r"line, so the file looks truncated"):
        read_jsonl(log)
    log.write_text(json.dumps({"epoch": 0}) + "\n\n" + json.dumps({"epoch": 1}) + "\n")
    assert read_jsonl(log) == [{"epoch": 0}, {"epoch": 1}]
