"""Tests for the result-table builders of saferclip.retrieval (synthetic metric records with known values)."""
import math

import numpy as np
import pandas as pd
import pytest

from saferclip.retrieval import (ABLATION_METHODS, OURS, PAPER_SOURCE, PAPER_TABLE1, POOL_KEYS, POOL_LABELS,
                                 TABLE1_KEYS, ablation_table, aggregate, compare_methods, format_cell, long_table,
                                 markdown_table, merge_records, nsfw_pool_table, read_records, read_table, table1,
                                 tables_match, write_records, write_retrieval_results, write_table)

VALUES = {"base": 1.0, "safe-only": 30.0, "safeclip": 40.0, "relative": 42.0, "relative+proximity": 44.0,
          "saferclip": 45.0}


def records(seeds=(0, 1, 2), values=VALUES, spread=0.5):
    out = []
    for m, v in values.items():
        for s in seeds:
            r = {"run": f"{m}-s{s}", "method": m, "seed": s}
            r.update({k: v + (s - 1) * spread for k in TABLE1_KEYS})
            for split in ("visu-test", "nsfwcaps"):
                for k in POOL_KEYS:
                    r[f"{split}/{k}"] = 100.0 - v
                for p in ("T->V", "V->T", "T*->V", "V*->T", "T->V*", "V->T*", "T*->V*", "V*->T*"):
                    for K in (1, 5, 10, 20):
                        r.setdefault(f"{split}/{p}@{K}", v + K)
            out.append(r)
    return out


def test_aggregate_mean_std():
    agg = aggregate(records(), ["visu-test/T->V@1"])
    assert agg.loc["safeclip", "visu-test/T->V@1"] == pytest.approx(40.0)
    assert agg.loc["safeclip", "visu-test/T->V@1 std"] == pytest.approx(0.5)
    assert agg.loc["safeclip", "seeds"] == 3


def test_aggregate_single_seed_has_no_std():
    agg = aggregate(records(seeds=(0,)), ["visu-test/T->V@1"])
    assert math.isnan(agg.loc["saferclip", "visu-test/T->V@1 std"])


def test_records_need_unique_runs():
    r = records(seeds=(0,))
    with pytest.raises(ValueError, match="duplicate run"):
        aggregate(r + r[:1], ["zeroshot/mean"])
    with pytest.raises(ValueError, match="no 'method'"):
        aggregate([{"run": "x"}], ["zeroshot/mean"])


def test_merge_records_by_run():
    a = [{"run": "x", "method": "base", "visu-test/T->V@1": 3.0}]
    b = [{"run": "x", "method": "base", "zeroshot/mean": 70.0}]
    m = merge_records(a, b)
    assert len(m) == 1 and m[0]["zeroshot/mean"] == 70.0 and m[0]["visu-test/T->V@1"] == 3.0


def test_table1_layout_and_paper_rows():
    t = table1(records())
    ours = t[t.source == OURS]
    assert list(ours.method) == ["base", "safe-only", "safeclip", "saferclip"]
    assert ours.set_index("method").loc["saferclip", "nsfwcaps/V*->T@1"] == pytest.approx(45.0)
    paper = t[t.source == PAPER_SOURCE].set_index("model")
    assert list(paper.index) == list(PAPER_TABLE1)
    assert paper.loc["Safe-CLIP", "visu-test/T*->V@1"] == 14.5
    assert paper.loc["SafeR-CLIP", "zeroshot/mean"] == 60.2
    assert math.isnan(paper.loc["DataComp-1B", "zeroshot/mean"])


def test_compare_methods_verdicts():
    cmp = compare_methods(records()).set_index("key")
    assert (cmp["verdict (ours)"] == "better").all()
    assert cmp.loc["visu-test/T->V@1", "difference"] == pytest.approx(5.0)
    assert cmp.loc["nsfwcaps/T*->V@1", "paper difference"] == pytest.approx(79.5 - 35.4)
    # SafeR-CLIP below Safe-CLIP on one metric -> 'worse'; a gap inside the seed noise -> 'within seed noise'
    vals = dict(VALUES, saferclip=40.4)
    cmp2 = compare_methods(records(values=vals)).set_index("key")
    assert (cmp2["verdict (ours)"] == "within seed noise").all()
    vals = dict(VALUES, saferclip=30.0)
    assert (compare_methods(records(values=vals))["verdict (ours)"] == "worse").all()
    with pytest.raises(ValueError, match="needs records of both"):
        compare_methods([r for r in records() if r["method"] != "safeclip"])


def test_long_table_rows_and_values():
    lt = long_table(records(seeds=(0,)))
    assert len(lt) == len(VALUES) * 2 * 8
    row = lt[(lt.method == "safeclip") & (lt.split == "NSFWCaps") & (lt["query->gallery"] == "T*→V*")].iloc[0]
    assert row["R@1"] == pytest.approx(41.0) and row["R@20"] == pytest.approx(60.0)


def test_nsfw_pool_table():
    pt = nsfw_pool_table(records())
    ours = pt[pt.source == OURS]
    v = ours[(ours.method == "saferclip") & (ours.queries == "ViSU")][POOL_LABELS["unsafe_top1_T*->V"]].iloc[0]
    assert v == pytest.approx(55.0)
    paper = pt[pt.source == PAPER_SOURCE]
    assert len(paper) == 15
    assert paper[(paper.model == "SafeR-CLIP") & (paper.queries == "real NSFW: SMID")][
        POOL_LABELS["unsafe_top1_V*->T"]].iloc[0] == 3.1


def test_ablation_steps_and_direction():
    ab = ablation_table(records())
    assert list(ab.method) == ["base", "safe-only", *ABLATION_METHODS]
    assert list(ab.step) == ["reference", "reference", "0", "1", "2", "3"]
    note = ab.set_index("method").loc["relative", "improves vs previous step"]
    # every R@1 went up and the unsafe top-1 rate went down: all improvements, nothing worse
    assert note.startswith("better: ") and note.endswith("worse: —")
    bad = [dict(r, **{"visu-test/T->V@1": 0.0}) if r["method"] == "saferclip" else r for r in records()]
    note = ablation_table(bad).set_index("method").loc["saferclip", "improves vs previous step"]
    assert "worse: ViSU T→V" in note


def test_markdown_and_roundtrip(tmp_path):
    t = table1(records())
    csv, md = write_table(t, tmp_path / "t1", "T1", "n")
    text = md.read_text()
    assert "45.0 ± 0.5" in text and "| 14.5 |" in text and text.startswith("# T1")
    assert tables_match(table1(records()), read_table(csv))
    assert not tables_match(table1(records(values=dict(VALUES, saferclip=46.0))), read_table(csv))
    assert format_cell(float("nan")) == "—" and format_cell(2.0) == "2.0"
    assert "| a |" in markdown_table(pd.DataFrame({"a": [1.0]}), drop=())
    # settings columns print exactly (α = 0.25 must not read 0.2); metrics keep the fixed digits
    md = markdown_table(pd.DataFrame({"redirection_scale": [0.25, 4.0], "zeroshot/mean": [61.25, 61.0]}))
    assert "| 0.25 | 61.2 |" in md and "| 4 | 61.0 |" in md


def test_records_roundtrip(tmp_path):
    r = records(seeds=(0,))
    p = write_records(r, tmp_path / "r.jsonl")
    assert read_records(p) == r


def test_write_retrieval_results(tmp_path):
    out = write_retrieval_results(records(), tmp_path / "res", tmp_path / "fig", provenance="synthetic")
    for name in ("retrieval_table1", "retrieval_long", "retrieval_nsfw_pool", "ablation", "safer_vs_safe"):
        assert (tmp_path / "res" / f"{name}.csv").is_file() and (tmp_path / "res" / f"{name}.md").is_file()
    assert (tmp_path / "fig" / "retrieval_table1.png").is_file() and (tmp_path / "fig" / "retrieval_table1.pdf").is_file()
    assert "synthetic" in (tmp_path / "res" / "ablation.md").read_text()
