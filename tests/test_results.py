"""The committed results: every listed table and figure exists, and rebuilding the tables from the committed
metric records / training logs (results/runs_meta/) reproduces the committed CSVs."""
import json
from pathlib import Path

import pandas as pd
import pytest

from saferclip.drift import drift_table, drift_curves
from saferclip.reproduce import OUTPUTS, missing_outputs, output_paths
from saferclip.retrieval import (ablation_table, long_table, nsfw_pool_table, read_records, read_table, table1,
                                 tables_match)
from saferclip.zeroshot import frontier_table, zeroshot_table

ROOT = Path(__file__).resolve().parents[1]
META = ROOT / "results" / "runs_meta"


def test_every_listed_output_exists():
    missing = missing_outputs(ROOT)
    assert not missing, (f"{len(missing)} of {len(output_paths(ROOT))} outputs listed in saferclip.reproduce.OUTPUTS "
                         f"are missing; run `make reproduce`: {[str(p.relative_to(ROOT)) for p in missing]}")


def test_readme_lists_only_existing_outputs():
    """Every results/… or figures/… path the README mentions exists (when the README exists)."""
    import re
    readme = ROOT / "README.md"
    if not readme.is_file():
        pytest.skip("README.md not generated yet (nbdev_readme)")
    paths = set(re.findall(r"\b((?:results|figures)/[\w./-]+\.(?:csv|md|png|pdf))", readme.read_text()))
    missing = sorted(p for p in paths if not (ROOT / p).is_file())
    assert not missing, f"README references missing outputs: {missing}"


@pytest.mark.parametrize("builder,records,table", [
    (table1, "retrieval_records.jsonl", "retrieval_table1.csv"),
    (long_table, "retrieval_records.jsonl", "retrieval_long.csv"),
    (nsfw_pool_table, "retrieval_records.jsonl", "retrieval_nsfw_pool.csv"),
    (ablation_table, "retrieval_records.jsonl", "ablation.csv"),
    (zeroshot_table, "zeroshot_records.jsonl", "zeroshot.csv"),
])
def test_committed_tables_rebuild_from_committed_records(builder, records, table):
    rebuilt = builder(read_records(META / records))
    committed = read_table(ROOT / "results" / table)
    assert tables_match(rebuilt, committed), f"rebuilding results/{table} from runs_meta/{records} differs"


def test_committed_frontier_rebuilds_from_committed_records():
    """The FULL-mode outputs are committed too: the frontier table is what its records give."""
    missing = missing_outputs(ROOT, full=True)
    assert not missing, f"FULL-mode outputs missing; run `make reproduce FULL=True`: {[str(p) for p in missing]}"
    rebuilt = frontier_table(read_records(META / "frontier_records.jsonl"))
    assert tables_match(rebuilt, read_table(ROOT / "results" / "frontier.csv"))
    from saferclip.reproduce import FRONTIER_SCALES
    assert {float(a) for a in rebuilt.redirection_scale} >= {1.0, *FRONTIER_SCALES}, "the sweep needs α = 1 and the default scales"


def test_committed_drift_table_rebuilds_from_committed_logs():
    man = json.loads((META / "manifest.json").read_text())
    runs = [dict(r, run_dir=str(ROOT / r["run_dir"])) for r in man["runs"]
            if r.get("run_dir") and r.get("role", "main") == "main"]
    assert runs, "the committed manifest lists no training runs"
    rebuilt = drift_table(drift_curves(runs))
    assert tables_match(rebuilt, read_table(ROOT / "results" / "drift.csv"))


def test_committed_records_match_committed_manifest():
    man = json.loads((META / "manifest.json").read_text())
    main = {r["run"] for r in man["runs"] if r.get("role", "main") == "main"}
    assert {r["run"] for r in read_records(META / "retrieval_records.jsonl")} == main
    assert {r["run"] for r in read_records(META / "zeroshot_records.jsonl")} == main


def test_readme_is_rendered_from_the_index_notebook():
    """README.md is what `make readme` makes of nbs/index.ipynb and the committed results (never edited by hand)."""
    from saferclip.reproduce import render_readme
    assert (ROOT / "README.md").read_text() == render_readme(ROOT), "README.md is stale: run `make readme`"


@pytest.mark.parametrize("kind", ["t2i", "i2t"])
def test_committed_generation_tables_rebuild_from_committed_records(kind):
    """results/generation_{t2i,i2t}.csv are what the per-run generation records give (one record per main run of
    base, CLIP†, Safe-CLIP and SafeR-CLIP in the committed manifest)."""
    from saferclip.worldgen import GEN_METHODS, generation_table
    recs = read_records(META / "generation_records.jsonl")
    assert tables_match(generation_table(recs, kind), read_table(ROOT / "results" / f"generation_{kind}.csv"))
    man = json.loads((META / "manifest.json").read_text())
    want = {r["run"] for r in man["runs"] if r.get("role", "main") == "main" and r["method"] in GEN_METHODS}
    assert {r["run"] for r in recs} == want
