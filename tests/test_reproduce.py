"""Tests for saferclip.reproduce: the run plan, the CLI, the paper profile's fail-fast, provenance and timings."""
import json

import pytest

from saferclip.reproduce import (FULL_OUTPUTS, OUTPUTS, WORLD_OUTPUTS, ReproduceConfig, Timer, _auto_is_bf16, copy_run_meta, has_parameters_cell,
                                 missing_outputs, output_paths, parse_args, paper_problems, plan_runs,
                                 redirection_weights, reproduce, write_provenance, write_timings)


def test_plan_default_and_full():
    runs = plan_runs(ReproduceConfig())
    assert [r["method"] for r in runs] == ["safe-only", "safeclip", "saferclip"]
    assert all(r["params"]["pretrained"] == "world-base" and r["seed"] == 0 for r in runs)
    full = plan_runs(ReproduceConfig(full=True))
    main = [r for r in full if r["role"] == "main"]
    front = [r for r in full if r["role"] == "frontier"]
    assert len(main) == 15 and {r["seed"] for r in main} == {0, 1, 2}
    assert len(front) == 4 and {r["redirection_scale"] for r in front} == {0.5, 2.0}
    wide = plan_runs(ReproduceConfig(full=True, frontier_scales=(0.25, 0.5, 2.0, 4.0)))
    assert {r["redirection_scale"] for r in wide if r["role"] == "frontier"} == {0.25, 0.5, 2.0, 4.0}
    control = [r for r in full if r["role"] == "precision"]
    assert len(control) == int(_auto_is_bf16("auto"))          # one fp32 Safe-CLIP run where auto means bf16
    assert all(r["params"]["precision"] == "fp32" and r["method"] == "safeclip" for r in control)
    assert all(r["params"]["precision"] == "auto" for r in full if r["role"] != "precision")
    assert len({r["run"] for r in full}) == len(full)


def test_redirection_weights_scale_only_redirection():
    w = redirection_weights("saferclip", 2.0)
    assert set(w) == {"redir_txt", "redir_img", "redir_t2v", "redir_v2t"}
    assert w["redir_v2t"] == pytest.approx(1.0) and w["redir_txt"] == pytest.approx(0.2)


def test_cli_parsing():
    c = parse_args(["--profile", "world", "--full", "True"])
    assert c.full and c.seeds == (0, 1, 2)
    assert parse_args(["--full", "False", "--seeds", "3", "4"]).seeds == (3, 4)
    assert parse_args(["--frontier-scales", "0.25", "4"]).frontier_scales == (0.25, 4.0)
    assert parse_args(["--precision", "fp32"]).precision == "fp32"
    with pytest.raises(SystemExit):
        parse_args(["--profile", "laptop"])
    with pytest.raises(ValueError, match="unknown method"):
        ReproduceConfig(methods=("clip",))


def test_paper_profile_fails_fast_with_the_list(tmp_path):
    cfg = ReproduceConfig(profile="paper", root=str(tmp_path), data_root=str(tmp_path / "visu"))
    probs = paper_problems(cfg)
    assert any("does not exist" in p for p in probs) and any("NSFWCaps" in p or "nsfwcaps" in p for p in probs)
    with pytest.raises(SystemExit, match="cannot start"):
        reproduce(cfg)
    assert not (tmp_path / "results").exists()          # nothing was built


def test_outputs_lists():
    assert len(output_paths("r", full=True)) == len(output_paths("r")) + sum(len(v) for v in FULL_OUTPUTS.values())
    assert all(p.parts[0] in ("r",) for p in output_paths("r"))
    n_common, n_world = (sum(len(v) for v in g.values()) for g in (OUTPUTS, WORLD_OUTPUTS))
    assert len(missing_outputs("/nonexistent")) == n_common + n_world
    # the paper profile has no world generators: its runs are not asked for the world generation tables
    assert len(missing_outputs("/nonexistent", profile="paper")) == n_common
    assert not any("generation_t2i" in str(p) for p in output_paths("r", profile="paper"))


def test_has_parameters_cell(tmp_path):
    nb = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "x = 1"}]}
    (tmp_path / "a.ipynb").write_text(json.dumps(nb))
    (tmp_path / "b.ipynb").write_text(json.dumps({"cells": []}))
    assert has_parameters_cell(tmp_path / "a.ipynb") and not has_parameters_cell(tmp_path / "b.ipynb")


def test_timings_provenance_and_meta(tmp_path):
    t = Timer()
    with t("train:x"):
        pass
    p = write_timings(t, tmp_path / "timings.md", ReproduceConfig(), 1200)
    assert "train:x" in p.read_text() and "within" in p.read_text()
    rd = tmp_path / "runs" / "x"
    rd.mkdir(parents=True)
    (rd / "epochs.jsonl").write_text('{"epoch": 0}\n')
    (rd / "state.safetensors").write_text("big")
    man = {"runs": [{"run": "x", "method": "safeclip", "seed": 0, "checkpoint": str(rd / "final.safetensors"),
                     "run_dir": str(rd), "params": {"out_dir": str(rd), "lr": 1.0}}]}
    small = copy_run_meta(man, tmp_path / "results" / "runs_meta", tmp_path)
    assert small["runs"][0]["run_dir"] == "results/runs_meta/x"
    assert (tmp_path / "results/runs_meta/x/epochs.jsonl").is_file()
    assert not (tmp_path / "results/runs_meta/x/state.safetensors").exists()
    assert "out_dir" not in small["runs"][0]["params"]
    pv = write_provenance(tmp_path / "PROVENANCE.md", ReproduceConfig(root=str(tmp_path)), ["cmd"], man, {})
    text = pv.read_text()
    assert "git revision" in text and "| x | safeclip |" in text and "`results/retrieval_table1.csv`" in text
