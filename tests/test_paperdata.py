"""saferclip.paperdata on the real-format fixtures in tests/fixtures/{visu,nsfwcaps} (make_fixtures.py)."""
import csv
import json
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="saferclip.paperdata reads HF dataset files with `datasets` (paper extra)")

from saferclip.data import Quadruplets  # noqa: E402
from saferclip.paperdata import (BadRowsError, NO_UNSAFE_SUFFIX, canonical_split, check_paper_inputs,  # noqa: E402
                                 has_unsafe_images, load_nsfwcaps, load_visu, load_visu_text, loader_throughput,
                                 make_loader, read_manifest, resolve_image_path)

FIX = Path(__file__).parent / "fixtures"
V, N = FIX / "visu", FIX / "nsfwcaps"
BAD = dict(coco_root=V / "coco", unsafe_root=V / "unsafe_images")
BAD_IDS = {"missing-file", "corrupt-image", "empty-caption", "ok-1", "no-image"}


def test_fixtures_are_tiny():
    total = sum(f.stat().st_size for f in FIX.rglob("*") if f.is_file())
    assert total < 200_000, total


@pytest.mark.parametrize("src", ["visu_text", "visu_text_json", "visu_text_disk"])
@pytest.mark.parametrize("split,n", [("train", 4), ("validation", 2), ("val", 2), ("test", 1)])
def test_visu_text_formats(src, split, n):
    rows = load_visu_text(V / src, split)
    assert len(rows) == n and set(rows[0]) == {"safe", "nsfw", "tag"}
    assert all(r["safe"] and r["nsfw"] for r in rows)


def test_visu_text_single_file_and_bad_split():
    rows = load_visu_text(V / "visu_text_json" / "train.jsonl", "train")
    assert rows[2]["tag"] == "blood"
    with pytest.raises(ValueError, match="unknown split"):
        load_visu_text(V / "visu_text", "trian")


def test_load_visu_manifest_train():
    q, skipped = load_visu(V, "train")
    assert isinstance(q, Quadruplets) and len(q) == 4 and skipped == []
    assert q.ids == ["train/0", "train/1", "train/2", "train/3"] and q.name == "visu-train"
    assert Path(q.safe_images[0]) == V / "coco" / "train2017" / "000000000009.jpg"
    assert q.safe_images[0] == q.safe_images[1]                       # two captions of one COCO image
    # absolute cluster paths in the manifest are re-rooted under unsafe_root
    assert Path(q.unsafe_images[3]) == V / "unsafe_images" / "train" / "3.jpg"
    assert q.tags == ["violence", "drug use", "blood", "illegal activity"]


def test_load_visu_validation_dict_manifest_and_val2017():
    q, _ = load_visu(V, "validation")
    assert Path(q.safe_images[0]).parent.name == "val2017" and Path(q.safe_images[1]).parent.name == "train2017"
    assert Path(q.unsafe_images[1]) == V / "unsafe_images" / "validation" / "1.jpg"


def test_load_visu_joined_visu_text_matches_manifest():
    q, _ = load_visu(V, "train")
    qj, _ = load_visu(V, "train", source="visu-text", text_source=V / "visu_text_joined")
    assert qj.safe_captions == q.safe_captions and qj.unsafe_captions == q.unsafe_captions
    assert qj.safe_images == q.safe_images and qj.unsafe_images == q.unsafe_images


@pytest.mark.parametrize("src", ["visu_text", "visu_text_json", "visu_text_disk"])
def test_text_only_visu_text_is_refused_with_reason(src):
    with pytest.raises(ValueError, match="text only"):
        load_visu(V, "train", source="visu-text", text_source=V / src)


def test_missing_data_root_fails_fast(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ViSU manifest"):
        load_visu(tmp_path, "train")


def test_bad_rows_error_lists_every_case():
    with pytest.raises(BadRowsError) as ei:
        load_visu(V / "bad", "train", **BAD)
    bad = ei.value.bad_rows
    assert {b["id"] for b in bad} == BAD_IDS and len(bad) == 5
    msg = str(ei.value)
    assert "000000000999.jpg" in msg and "000000000077.jpg" in msg and "visu_bad_train.jsonl" in msg
    assert "5 bad row(s) of 7" in msg


def test_bad_rows_error_truncates_listing():
    with pytest.raises(BadRowsError) as ei:
        load_visu(V / "bad", "train", max_listed=2, **BAD)
    assert "and 3 more" in str(ei.value) and len(ei.value.bad_rows) == 5


@pytest.mark.parametrize("suffix", [".csv", ".json"])
def test_bad_rows_skip_reports(tmp_path, capsys, suffix):
    rep_path = tmp_path / f"skipped{suffix}"
    q, rep = load_visu(V / "bad", "train", on_bad_row="skip", report_path=rep_path, **BAD)
    assert q.ids == ["ok-1", "ok-2"] and q.safe_captions[0] == "A shelf with a vase."  # first ok-1 kept
    reasons = {r["id"]: r["reason"] for r in rep}
    assert reasons["missing-file"] == "missing file"
    assert reasons["corrupt-image"].startswith("unreadable image")
    assert reasons["empty-caption"] == "empty unsafe caption"
    assert reasons["ok-1"].startswith("duplicate id")
    assert "without an unsafe image" in reasons["no-image"]
    assert "skipped 5 bad row(s) of 7" in capsys.readouterr().out
    if suffix == ".csv":
        rows = list(csv.DictReader(open(rep_path)))
    else:
        rows = json.loads(rep_path.read_text())
    assert {r["id"] for r in rows} == BAD_IDS and all(r["reason"] for r in rows)


def test_row_without_safe_image_and_empty_safe_caption(tmp_path):
    man = tmp_path / "manifests" / "train" / "m.json"
    man.parent.mkdir(parents=True)
    man.write_text(json.dumps({"0": dict(coco_id=9, safe="ok", nsfw="ok!", tag="x", nsfw_im_path="train/0.jpg"),
                               "1": dict(safe="no id", nsfw="no id!", tag="x", nsfw_im_path="train/0.jpg"),
                               "2": dict(coco_id=9, safe="", nsfw="x", tag="x", nsfw_im_path="train/0.jpg")}))
    q, rep = load_visu(tmp_path, "train", on_bad_row="skip", **BAD)
    assert q.ids == ["train/0"]
    assert {r["id"]: r["reason"] for r in rep} == {"train/1": "row without a safe image (no coco_id)",
                                                   "train/2": "empty safe caption"}


def test_duplicate_keys_in_dict_manifest_are_not_silently_merged(tmp_path):
    man = tmp_path / "manifests" / "train" / "m.json"
    man.parent.mkdir(parents=True)
    rec = '{"coco_id": 9, "safe": "a", "nsfw": "b", "tag": "x", "nsfw_im_path": "train/0.jpg"}'
    man.write_text('{"data": {"7": %s, "7": %s}}' % (rec, rec))
    assert len(read_manifest(man)) == 2
    with pytest.raises(BadRowsError, match="duplicate id"):
        load_visu(tmp_path, "train", **BAD)


def test_resolve_image_path(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.jpg").write_bytes(b"")
    assert resolve_image_path("/elsewhere/deep/a/b/x.jpg", tmp_path) == tmp_path / "a" / "b" / "x.jpg"
    assert resolve_image_path("a/b/x.jpg", tmp_path) == tmp_path / "a" / "b" / "x.jpg"
    assert canonical_split("dev") == "validation"


@pytest.mark.parametrize("src", ["hf", "nsfwcaps.jsonl", "disk"])
def test_nsfwcaps_hf_formats(src):
    q = load_nsfwcaps(N / src, image_root=N / "images")
    assert len(q) == 3 and q.ids == ["nsfwcaps/0", "nsfwcaps/1", "nsfwcaps/2"]
    assert q.safe_captions[0].startswith("A vase") and "handgun" in q.unsafe_captions[0]
    assert q.tags == ["illegal activity", "hate", "violence"]
    assert Path(q.safe_images[2]) == N / "images" / "004c5ac2d5a5a2b8.jpg"
    assert not has_unsafe_images(q) and q.name.endswith(NO_UNSAFE_SUFFIX) and q.unsafe_images == q.safe_images


def test_nsfwcaps_unsafe_image_root_and_error_policy():
    q = load_nsfwcaps(N / "hf", image_root=N / "images", unsafe_image_root=N / "unsafe")
    assert has_unsafe_images(q) and Path(q.unsafe_images[0]) == N / "unsafe" / "0013ea2087020901.jpg"
    with pytest.raises(BadRowsError, match="missing_unsafe"):
        load_nsfwcaps(N / "hf", image_root=N / "images", missing_unsafe="error")


def test_nsfwcaps_manifest_formats():
    q = load_nsfwcaps(N / "manifest.jsonl")
    assert q.ids == ["nc-0", "nc-1", "nc-2"] and has_unsafe_images(q) and q.name == "nsfwcaps"
    t = load_nsfwcaps(N / "manifest_text_only.jsonl")
    assert not has_unsafe_images(t)


def test_nsfwcaps_bad_rows_both_policies(tmp_path):
    with pytest.raises(BadRowsError) as ei:
        load_nsfwcaps(N / "bad_manifest.jsonl")
    assert {b["id"] for b in ei.value.bad_rows} == {"nc-1", "nc-2"}
    q = load_nsfwcaps(N / "bad_manifest.jsonl", on_bad_row="skip", report_path=tmp_path / "r.json")
    assert q.ids == ["nc-0"]
    reasons = {r["id"]: r["reason"] for r in json.loads((tmp_path / "r.json").read_text())}
    assert reasons == {"nc-1": "missing file", "nc-2": "empty unsafe caption"}


def test_nsfwcaps_wrong_table_is_refused():
    with pytest.raises(ValueError, match="neither the NSFWCaps release"):
        load_nsfwcaps(V / "visu_text_json" / "train.jsonl")


def test_make_loader_batches_and_workers():
    import open_clip
    pre = open_clip.image_transform(32, is_train=False)
    q, _ = load_visu(V, "train")
    for workers in (0, 2):
        batches = list(make_loader(q, pre, batch_size=3, num_workers=workers))
        assert [len(b["index"]) for b in batches] == [3, 1]
        assert batches[0]["safe"].shape == (3, 3, 32, 32) and batches[0]["unsafe"].shape == (3, 3, 32, 32)
    b0 = batches[0]
    assert not (b0["safe"][0] == b0["unsafe"][0]).all()
    assert (b0["safe"][0] == b0["safe"][1]).all()          # rows 0 and 1 share a COCO image
    r = loader_throughput(make_loader(q, pre, batch_size=2, num_workers=0))
    assert r["images"] == 8 and r["images_per_s"] > 0


def test_loader_refuses_tensor_images():
    import torch
    q = Quadruplets(["a"], ["s"], ["u"], torch.zeros(1, 3, 8, 8, dtype=torch.uint8),
                    torch.zeros(1, 3, 8, 8, dtype=torch.uint8), ["t"])
    with pytest.raises(TypeError, match="image_batch"):
        make_loader(q, lambda x: x)


def test_check_paper_inputs(tmp_path):
    assert check_paper_inputs(V) == []
    assert check_paper_inputs(V, nsfwcaps=N / "hf", nsfwcaps_image_root=N / "images") == []
    assert check_paper_inputs(None)[0].startswith("data_root is not set")
    assert check_paper_inputs(tmp_path / "nope") == [f"data_root {tmp_path / 'nope'} does not exist"]
    probs = check_paper_inputs(tmp_path, nsfwcaps=tmp_path / "nc")
    assert len(probs) == 5
    assert any("COCO 2017 folder" in p for p in probs) and any("unsafe-image folder" in p for p in probs)
    assert any("'train'" in p for p in probs) and any("'validation'" in p for p in probs)
    probs = check_paper_inputs(V / "bad", splits=("train",), **BAD)
    assert probs == ["train: 1 of 7 safe (COCO) image files missing, e.g. "
                     f"{V / 'coco' / 'train2017' / '000000000999.jpg'}",
                     "train: 1 of 7 manifest records have no coco_id or nsfw_im_path"]
    probs = check_paper_inputs(V, nsfwcaps=N / "bad_manifest.jsonl")
    assert len(probs) == 1 and "NSFWCaps: 2 bad rows" in probs[0]


# ---------------------------------------------------------------- bad input fails naming file, line and record
REC = dict(coco_id=9, safe="A bowl of fruit.", nsfw="A bowl of fruit and a knife.", tag="violence",
           nsfw_im_path="train/0.jpg")


def _manifest(root: Path, name: str, text: str | bytes) -> Path:
    m = root / "manifests" / "train" / name
    m.parent.mkdir(parents=True, exist_ok=True)
    m.write_bytes(text if isinstance(text, bytes) else text.encode())
    return m


def test_coco_int_accepts_whole_numbers_only():
    from saferclip.paperdata import coco_int, coco_path
    assert [coco_int(x) for x in (25, 25.0, "25", " 000025 ")] == [25, 25, 25, 25]
    for bad in (25.9, "25.9", True, "", "abc", None, float("nan"), [25]):
        with pytest.raises(ValueError, match=r"coco_id .* is not an integer"):
            coco_int(bad)
    with pytest.raises(ValueError, match="coco_id -3 is negative"):
        coco_int(-3)
    with pytest.raises(ValueError, match="coco_id 25.9 is not an integer"):
        coco_path(V / "coco", 25.9)  # was silently image 25


def test_non_integral_coco_id_is_a_bad_row_naming_file_and_record(tmp_path):
    m = _manifest(tmp_path, "m.jsonl", json.dumps(dict(REC, id="ok")) + "\n" +
                  json.dumps(dict(REC, id="frac", coco_id=25.9)) + "\n")
    with pytest.raises(BadRowsError) as ei:
        load_visu(tmp_path, "train", **BAD)
    (b,) = ei.value.bad_rows
    assert b["id"] == "frac" and b["source"] == str(m) and '"coco_id": 25.9' in b["record"]
    assert b["reason"] == "row without a safe image (coco_id 25.9 is not an integer)"
    assert f"id='frac' file=- reason=row without a safe image (coco_id 25.9 is not an integer) source={m}" in str(ei.value)


@pytest.mark.parametrize("name,text", [
    ("m.json", json.dumps({"0": REC, "1": dict(REC, safe="Caf\u00e9 table.")}, ensure_ascii=False)),
    ("m.jsonl", json.dumps(REC) + "\n" + json.dumps(dict(REC, safe="Caf\u00e9 table."), ensure_ascii=False) + "\n"),
])
def test_latin1_manifest_names_file_offset_and_line(tmp_path, name, text):
    _manifest(tmp_path, name, text.encode("latin-1"))
    line = 1 if name == "m.json" else 2
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text: byte 0xe9 at offset \d+ \(line {line}, column "
                                         r"\d+\) .*latin-1 / cp1252.*Re-encode it as UTF-8, e\.g\. iconv -f latin1"):
        load_visu(tmp_path, "train", **BAD)
    probs = check_paper_inputs(tmp_path, splits=("train",), **BAD)  # listed as a problem, not raised
    assert len(probs) == 1 and f"{name} is not UTF-8 text: byte 0xe9" in probs[0], probs
    # the same text in UTF-8 loads
    _manifest(tmp_path, name, text.encode("utf-8"))
    q, _ = load_visu(tmp_path, "train", on_bad_row="skip", **BAD)
    assert q.safe_captions[1] == "Caf\u00e9 table."


def test_truncated_manifests_name_line_and_cause(tmp_path):
    line = json.dumps(REC)
    _manifest(tmp_path / "jl", "m.jsonl", line + "\n" + line + "\n" + line[:30])
    with pytest.raises(ValueError, match=r"m\.jsonl: line 3 is not valid JSON \(unterminated JSON: the text ends inside "
                                         r"a value; it is the last line, so the file looks truncated \(an interrupted "
                                         r"copy or download\?\)\): Unterminated string"):
        load_visu(tmp_path / "jl", "train", **BAD)
    text = json.dumps({"data": {"0": REC, "1": REC}}, indent=1)
    _manifest(tmp_path / "js", "m.json", text[: len(text) - 20])
    with pytest.raises(ValueError, match=r"m\.json is not valid JSON \(unterminated JSON: the text ends inside a value "
                                         r"\(the file looks truncated: an interrupted copy or download\?\)\): .* at line "
                                         r"\d+, column \d+"):
        load_visu(tmp_path / "js", "train", **BAD)


NSFWCAPS_HEADER = "image_coco_url,caption,nsfw_caption,chosen_category\n"
NSFWCAPS_ROW = "https://x/nocaps/val/0013ea2087020901.jpg,A vase.,A vase and a gun.,violence\n"


@pytest.mark.parametrize("tail,match", [
    ("https://x/nocaps/val/00223fe9e5af2c1c.jpg,A dog", r"nc\.csv: line 3 has 2 fields, fewer than the header's 4 "
                                                        r".*it is the last line, so the file looks truncated"),
    ('https://x/nocaps/val/00223fe9e5af2c1c.jpg,"A dog\nrunning', r"nc\.csv: line 3: unexpected end of data \(a quoted "
                                                                  r"field runs to the end of the file, so the file "
                                                                  r"looks truncated"),
])
def test_truncated_csv_table_names_line_and_cause(tmp_path, tail, match):
    p = tmp_path / "nc.csv"
    p.write_text(NSFWCAPS_HEADER + NSFWCAPS_ROW + tail)
    with pytest.raises(ValueError, match=match):
        load_nsfwcaps(p, image_root=N / "images", progress=False)
    p.write_text(NSFWCAPS_HEADER + NSFWCAPS_ROW)  # the intact file loads
    assert load_nsfwcaps(p, image_root=N / "images", progress=False).ids == ["nsfwcaps/0"]


def test_latin1_and_truncated_hf_json_tables_named(tmp_path):
    from saferclip.paperdata import read_hf_rows
    p = tmp_path / "train.jsonl"
    p.write_bytes(b'{"safe": "a", "nsfw": "b"}\n{"safe": "caf\xe9", "nsfw": "b"}\n')
    with pytest.raises(ValueError, match=r"train\.jsonl is not UTF-8 text: byte 0xe9 at offset 40 \(line 2, column 14\)"):
        read_hf_rows(p)
    j = tmp_path / "rows.json"  # the hub's .json files are often JSON lines: judged line by line
    j.write_text('{"safe": "a", "nsfw": "b"}\n{"safe": "a", "ns')
    with pytest.raises(ValueError, match=r"rows\.json: line 2 is not valid JSON \(unterminated JSON.*last line"):
        read_hf_rows(j)
    j.write_text('[{"safe": "a", "nsfw": "b"}, {"safe": "a", "ns')
    with pytest.raises(ValueError, match=r"rows\.json is not valid JSON \(unterminated JSON"):
        read_hf_rows(j)


def test_record_that_is_a_list_is_named_not_called_an_empty_caption(tmp_path):
    m = _manifest(tmp_path / "jl", "m.jsonl", json.dumps(REC) + "\n\n" + json.dumps(list(REC.values())) + "\n")
    with pytest.raises(BadRowsError) as ei:
        load_visu(tmp_path / "jl", "train", **BAD)
    assert [b["reason"] for b in ei.value.bad_rows] == [
        f"the record at line 3 of {m} is a list, expected an object with fields coco_id, nsfw_im_path, safe, nsfw, tag"]
    d = _manifest(tmp_path / "js", "m.json", json.dumps({"data": {"a": REC, "b": "just a string"}}))
    _, rep = load_visu(tmp_path / "js", "train", on_bad_row="skip", **BAD)
    assert [r["reason"] for r in rep] == [f"the record at key 'b' of {d} is a string, expected an object with fields "
                                          "coco_id, nsfw_im_path, safe, nsfw, tag"]
    n = tmp_path / "nc.jsonl"
    n.write_text(json.dumps(dict(id="nc-0", safe="A vase.", unsafe="A vase and a gun.", tag="violence",
                                 safe_image=str(N / "images" / "0013ea2087020901.jpg"))) + "\n\n" + "[1, 2]\n")
    with pytest.raises(BadRowsError) as ei:
        load_nsfwcaps(n, progress=False)
    assert [b["reason"] for b in ei.value.bad_rows] == [  # line 3: blank lines count
        f"the record at line 3 of {n} is a list, expected an object with fields id, safe, unsafe, tag, safe_image, "
        "unsafe_image"]


def test_file_dataset_scales_16bit_greyscale(tmp_path):
    import numpy as np
    import torch
    from PIL import Image
    from saferclip.paperdata import QuadrupletImages
    grey8 = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (16, 1))
    Image.fromarray((grey8.astype(np.uint32) * 257).astype(np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    q = Quadruplets(["a"], ["s"], ["u"], [str(tmp_path / "g16.png")], [str(tmp_path / "g8.png")], ["t"])
    item = QuadrupletImages(q, lambda im: torch.from_numpy(np.asarray(im).copy()))[0]
    assert torch.equal(item["safe"], item["unsafe"]) and item["safe"].shape == (16, 32, 3)
