"""saferclip.train: config validation, resume equivalence, checkpoints loadable by stock open_clip, NaN guard."""
import json

import numpy as np
import open_clip
import pytest
import torch

import saferclip.train as T
from safetensors.torch import load_file

from saferclip.core import TINY_ARCH, load_state_dict, read_meta
from conftest import make_quadruplets

ROOT_TESTS = __import__("pathlib").Path(__file__).resolve().parent


@pytest.fixture
def toy_data(monkeypatch):
    """Replace the world with 48 random training rows and 16 validation rows."""
    train, val = make_quadruplets(48, seed=1, name="train"), make_quadruplets(16, seed=2, name="val")
    monkeypatch.setattr(T, "load_training_data", lambda cfg: (train, val, {"source": "toy", "skipped": 0}))
    return train, val


def _cfg(tmp_path, name, **kw):
    base = dict(pretrained=None, epochs=2, batch_size=16, lr=1e-3, out_dir=str(tmp_path / name),
                cache_dir=str(tmp_path / "cache"), progress=False, save_every=1, lora_rank=4, lora_alpha=4.0,
                precision="fp32")  # exact comparisons below; "auto" would pick bf16 on a CPU that has it
    return T.TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("bad,msg", [
    (dict(method="safer-clip"), "saferclip"), (dict(data="coco"), "world"), (dict(epochs=0), "epochs"),
    (dict(precision="int8"), "bf16"), (dict(loss_weights={"redir": 1.0}), "redir_img"),
    (dict(miner_query="audio"), "text"), (dict(data="visu"), "data_root"), (dict(lr=-1.0), "lr"),
])
def test_bad_parameters_fail_with_choices(bad, msg):
    with pytest.raises(ValueError, match=msg):
        T.TrainConfig(**bad)


@pytest.mark.parametrize("bad,exc,msg", [
    (dict(arch="ViT-Nope-1"), ValueError, r"arch='ViT-Nope-1' is not an open_clip architecture.*'ViT-B-32'"),
    (dict(arch="ViT-B-33"), ValueError, r"did you mean \[.*'ViT-B-32'"),
    (dict(pretrained="/no/such/weights.safetensors"), FileNotFoundError,
     r"pretrained='/no/such/weights.safetensors': no such weights file"),
    (dict(arch="ViT-B-32", pretrained="laion9000"), ValueError, r"pretrained='laion9000' is neither .*'openai'"),
    (dict(data="visu", data_root="/no/such/visu", pretrained=None), FileNotFoundError,
     r"data_root='/no/such/visu': no such folder"),
    (dict(lora_dropout=1.5), ValueError, r"lora_dropout must be in \[0, 1\), got 1.5"),
    (dict(lora_dropout=1.0), ValueError, r"lora_dropout must be in \[0, 1\), got 1.0"),
    (dict(max_train_rows=-1), ValueError, r"max_train_rows must be None or an integer >= 1, got -1"),
    (dict(max_val_rows=0), ValueError, r"max_val_rows must be None or an integer >= 1, got 0"),
    (dict(max_steps=0), ValueError, r"max_steps must be None or an integer >= 1, got 0"),
    (dict(curriculum_boundaries=(0.9, 0.1)), ValueError, r"curriculum_boundaries must be strictly increasing .*0\.9"),
    (dict(curriculum_boundaries=(0.5, 1.0)), ValueError, r"curriculum_boundaries must be strictly increasing"),
    (dict(resume="yes"), ValueError, r"resume must be True or False, got 'yes'"),
])
def test_bad_values_fail_at_construction_naming_them(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        T.TrainConfig(**bad)


def test_good_sources_accepted(tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")  # existence is all the config checks; loading it is train's job
    assert T.TrainConfig(pretrained=weights).pretrained == str(weights)  # a Path is stored as a string
    assert T.TrainConfig(arch="ViT-B-32", pretrained="openai").pretrained == "openai"  # a tag: no download here
    assert T.TrainConfig(data="visu", data_root=str(tmp_path), pretrained=None).data_root == str(tmp_path)
    assert T.TrainConfig(curriculum_boundaries=[0.25, 0.5]).curriculum_boundaries == (0.25, 0.5)


def test_num_workers_is_gone():
    """It was accepted and never used: now an unknown parameter, named."""
    with pytest.raises(ValueError, match=r"unknown training parameter\(s\) \['num_workers'\]"):
        T.TrainConfig.from_params(num_workers=4)


def test_unknown_parameter_names_listed():
    with pytest.raises(ValueError, match="valid parameters"):
        T.TrainConfig.from_params(epochz=3)


def test_command_line_parses_every_field():
    cfg = T.parse_cli(["--pretrained", "None", "--lr", "1e-4", "--lora-rank", "8", "--lora_alpha", "8",
                       "--curriculum-boundaries", "(0.25, 0.5)", "--resume", "False", "--out-dir", "runs/x"])
    assert (cfg.pretrained, cfg.lr, cfg.lora_rank, cfg.lora_alpha, cfg.curriculum_boundaries, cfg.out_dir) == (
        None, 1e-4, 8, 8, (0.25, 0.5), "runs/x")
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        T.parse_cli(["--lora-dropout", "1.5"])
    with pytest.raises(SystemExit):
        T.parse_cli(["--epochz", "3"])


def test_schedule_helpers():
    assert T.lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert T.lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert T.lr_factor(100, 100, 10) == pytest.approx(0.0)
    rows = np.arange(10)
    assert np.array_equal(T.epoch_order(rows, 0, 1), T.epoch_order(rows, 0, 1))
    assert not np.array_equal(T.epoch_order(rows, 0, 1), T.epoch_order(rows, 0, 2))


def test_weight_drift_per_tower():
    base = {"visual.w": torch.zeros(2), "t.w": torch.zeros(3), "logit_scale": torch.zeros(())}
    new = {"visual.w": torch.tensor([3.0, 4.0]), "t.w": torch.zeros(3), "logit_scale": torch.ones(())}
    drift, rows = T.weight_drift(new, base)
    assert drift == {"drift_text": 0.0, "drift_vision": 5.0}
    assert {r["name"] for r in rows} == set(base)


def test_train_writes_loadable_merged_checkpoint(tmp_path, toy_data):
    ckpt = T.train(_cfg(tmp_path, "run", method="saferclip", epochs=3))
    assert ckpt.name == "final.safetensors" and ckpt.exists()
    model, _, _ = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(ckpt))
    sd = load_state_dict(ckpt)
    assert set(sd) == set(model.state_dict())  # plain open_clip keys, LoRA merged
    meta = read_meta(ckpt)
    assert meta["arch"] == TINY_ARCH and "val_rsum" in meta["metrics"]
    epochs = T.read_jsonl(tmp_path / "run" / "epochs.jsonl")
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]
    # curriculum: epoch 1 on a third of the rows, epoch 2 on two thirds, then all
    assert [e["rows"] for e in epochs[1:]] == [16, 32, 48]
    assert epochs[-1]["drift_text"] > 0 and epochs[-1]["drift_vision"] > 0
    tgt = np.load(tmp_path / "run" / "targets.npz")
    assert tgt["target_index"].shape == (48,) and (tgt["target_sim"] >= tgt["rigid_sim"] - 1e-5).all()
    steps = T.read_jsonl(tmp_path / "run" / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, len(steps) + 1))
    assert {"redir_v2t", "redir_t2v", "pres_txt"} <= set(steps[0])


def test_frozen_reference_cached_not_recomputed(tmp_path, toy_data, monkeypatch):
    calls = {"n": 0}
    real = T.embed_quadruplets

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(T, "embed_quadruplets", counting)
    T.train(_cfg(tmp_path, "run", method="safeclip", epochs=2))
    assert calls["n"] == 2  # once per run (training rows, validation rows), not once per step


def test_resume_is_exact(tmp_path, toy_data):
    full = T.train(_cfg(tmp_path, "full", method="saferclip", epochs=2, lora_dropout=0.1))
    # curriculum: epoch 1 has 1 batch (16 rows), epoch 2 has 2 (32 rows); max_steps=2 stops after batch 1 of epoch 2
    T.train(_cfg(tmp_path, "cut", method="saferclip", epochs=2, lora_dropout=0.1, max_steps=2))
    cut = tmp_path / "cut"
    assert [(s["step"], s["epoch"]) for s in T.read_jsonl(cut / "steps.jsonl")] == [(1, 1), (2, 2)]
    assert [e["epoch"] for e in T.read_jsonl(cut / "epochs.jsonl")] == [0, 1]  # no record of the unfinished epoch 2
    prog = T.read_state_meta(cut / "state.safetensors")["progress"]
    assert (prog["epoch"], prog["batch"], prog["global_step"]) == (1, 1, 2)    # 1 of epoch 2's 2 batches done
    # resumed with fields that say where / how long, not what (RESUME_MAY_DIFFER): max_steps, save_every, device, ...
    resumed = T.train(_cfg(tmp_path, "cut", method="saferclip", epochs=2, lora_dropout=0.1, resume=True, save_every=7,
                           device="cpu", cache_dir=str(tmp_path / "cache2")))
    assert {"max_steps", "save_every", "device", "cache_dir", "out_dir", "progress", "resume"} <= set(T.RESUME_MAY_DIFFER)
    a, b = load_state_dict(full), load_state_dict(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = [s["loss"] for s in T.read_jsonl(tmp_path / "full" / "steps.jsonl")]
    sb = [s["loss"] for s in T.read_jsonl(tmp_path / "cut" / "steps.jsonl")]
    assert sa == sb


def test_full_finetuning_and_safe_only(tmp_path, toy_data):
    ckpt = T.train(_cfg(tmp_path, "full_ft", method="safe-only", lora_rank=0, epochs=1))
    steps = T.read_jsonl(tmp_path / "full_ft" / "steps.jsonl")
    assert set(steps[0]) >= {"pres_txt", "pres_img", "pres_t2v", "pres_v2t"}
    assert "redir_txt" not in steps[0]
    assert read_meta(ckpt)["config"]["lora_rank"] == 0
    full = T.trainable_parameters(T.build_trainable(open_clip.create_model(TINY_ARCH), _cfg(tmp_path, "x", lora_rank=0)))
    assert "logit_scale" not in full and "visual.conv1.weight" in full and "token_embedding.weight" in full


def test_nan_loss_stops_and_writes_nothing(tmp_path, toy_data, monkeypatch):
    real = T.loss_for_method

    def poisoned(method, weights=None):
        fn = real(method, weights)

        def loss(emb):
            total, terms = fn(emb)
            terms = dict(terms, redir_img=terms["redir_img"] * float("nan"))
            return total * float("nan"), terms
        return loss
    monkeypatch.setattr(T, "loss_for_method", poisoned)
    with pytest.raises(FloatingPointError, match=r"step 1 .*redir_img"):
        T.train(_cfg(tmp_path, "nan", method="saferclip"))
    assert not (tmp_path / "nan" / "final.safetensors").exists()
    assert not (tmp_path / "nan" / "state.safetensors").exists()


def _flat_validation(monkeypatch, scores=None, key="val_loss"):
    """Validation that runs for real but reports `key` from `scores` (call by call, epoch 0 first; default: 1.0)."""
    real, calls = T.validate, iter(scores or [])
    monkeypatch.setattr(T, "validate", lambda *a, **k: dict(real(*a, **k), **{key: float(next(calls, 1.0))}))


def test_resume_refuses_a_changed_config_naming_it(tmp_path, toy_data, monkeypatch):
    T.train(_cfg(tmp_path, "cut", method="safeclip", max_steps=1))     # 3 batches an epoch: stops mid-epoch 1
    state = tmp_path / "cut" / "state.safetensors"
    before = state.read_bytes()
    for change, msg in [(dict(lora_rank=8, lora_alpha=8.0), r"lora_rank: 4 → 8"), (dict(lr=2e-3), r"lr: 0.001 → 0.002"),
                        (dict(batch_size=8), r"batch_size: 16 → 8"), (dict(method="saferclip"), r"method: 'safeclip'")]:
        with pytest.raises(ValueError, match=f"cannot resume .*{msg}"):
            T.train(_cfg(tmp_path, "cut", **{"method": "safeclip", "resume": True, **change}))
    assert state.read_bytes() == before                                   # refused before anything was touched
    other = make_quadruplets(48, seed=7, name="train")
    monkeypatch.setattr(T, "load_training_data", lambda cfg: (other, toy_data[1], {"source": "toy", "skipped": 0}))
    with pytest.raises(ValueError, match="the training data changed"):
        T.train(_cfg(tmp_path, "cut", method="safeclip", resume=True))
    assert state.read_bytes() == before


def test_resume_without_a_state_fails(tmp_path, toy_data):
    with pytest.raises(FileNotFoundError, match=r"resume=True but there is no training state .*fresh"):
        T.train(_cfg(tmp_path, "fresh", resume=True))
    assert not (tmp_path / "fresh").exists()                              # nothing was started


def test_grad_accum_equals_the_bigger_batch(tmp_path, monkeypatch):
    """batch 8 x grad_accum 2 = batch 16: 40 rows give 5 micro-batches, so the epoch's last step has only one."""
    train, val = make_quadruplets(40, seed=1, name="train"), make_quadruplets(16, seed=2, name="val")
    monkeypatch.setattr(T, "load_training_data", lambda cfg: (train, val, {"source": "toy", "skipped": 0}))
    # per-row losses only (no in-batch InfoNCE negatives), so the two are the same objective
    kw = dict(method="saferclip", curriculum="none", epochs=1, clip_grad=0.0,
              loss_weights={"cross_modal_preservation": "relative"})
    T.train(_cfg(tmp_path, "big", **kw))
    T.train(_cfg(tmp_path, "accum", batch_size=8, grad_accum=2, **kw))
    big, acc = T.read_jsonl(tmp_path / "big" / "steps.jsonl"), T.read_jsonl(tmp_path / "accum" / "steps.jsonl")
    assert [s["step"] for s in big] == [s["step"] for s in acc] == [1, 2, 3]   # optimizer steps, not micro-batches
    assert [s["lr"] for s in big] == [s["lr"] for s in acc]
    pa, pb = (load_file(str(tmp_path / n / "state.safetensors")) for n in ("big", "accum"))
    keys = [k for k in pa if k.startswith("param/")]
    # float summation order only (two 8-row passes vs one 16-row pass): measured 2e-6; scaling the one-micro-batch
    # last step by 1/grad_accum (the old behaviour) gives 7e-3
    l2 = sum(float((pa[k] - pb[k]).pow(2).sum()) for k in keys) ** 0.5
    assert l2 < 1e-4, l2


def test_default_keeps_the_last_epoch_even_when_recall_falls(tmp_path, toy_data, monkeypatch):
    _flat_validation(monkeypatch, scores=[9, 5, 4, 3], key="val_rsum")  # the base wins on recall: the old rule's epoch 1
    ckpt = T.train(_cfg(tmp_path, "run", method="safeclip", epochs=3))
    meta = read_meta(ckpt)
    assert (meta["epoch"], meta["epochs"], meta["selected"]) == (3, 3, T.SELECTIONS["last"])
    last = load_state_dict(tmp_path / "run" / "last.safetensors")
    assert all(torch.equal(v, last[k]) for k, v in load_state_dict(ckpt).items())    # final is the last epoch
    assert [e["final"] for e in T.read_jsonl(tmp_path / "run" / "epochs.jsonl")[1:]] == [True, True, True]


def test_select_val_loss_keeps_the_lowest_own_validation_loss(tmp_path, toy_data, monkeypatch):
    _flat_validation(monkeypatch, scores=[9.0, 5.0, 3.0, 4.0])  # epoch 0 (base), 1, 2, 3: epoch 2 is lowest
    ckpt = T.train(_cfg(tmp_path, "run", method="safeclip", epochs=3, select="val_loss"))
    epochs = T.read_jsonl(tmp_path / "run" / "epochs.jsonl")
    assert [e["val_loss"] for e in epochs] == [9.0, 5.0, 3.0, 4.0]
    assert [e["final"] for e in epochs[1:]] == [True, True, False]
    assert read_meta(ckpt)["epoch"] == 2 and read_meta(ckpt)["selected"] == T.SELECTIONS["val_loss"]


def test_validation_loss_is_the_methods_own_objective(tmp_path, toy_data):
    """val_loss of epoch 0 (the base) recomputed here from the base's embeddings and the method's loss."""
    from saferclip.retrieval import embed_quadruplets
    tr = T.Trainer(_cfg(tmp_path, "run", method="saferclip", epochs=1))
    rec = T.read_jsonl(tmp_path / "run" / "epochs.jsonl")[0]
    e = embed_quadruplets(tr.frozen.model, tr.frozen.tokenizer, toy_data[1])
    idx = np.arange(len(toy_data[1]))       # 16 rows: one batch of 16
    emb = T.EmbeddingBatch(txt_safe=e["t"], txt_unsafe=e["t*"], img_safe=e["v"], img_unsafe=e["v*"],
                           **T.frozen_rows(tr.frozen.val.ref, idx, tr.frozen.val.targets, True, torch.device("cpu")))
    assert rec["val_loss"] == pytest.approx(float(tr.loss_fn(emb)[0]), rel=1e-5)
    assert tr.frozen.val.targets is not None and len(tr.frozen.val.targets) == 16   # mined within validation


def test_patience_stops_early_and_says_so(tmp_path, toy_data, monkeypatch, capsys):
    _flat_validation(monkeypatch)  # never better than epoch 1
    ckpt = T.train(_cfg(tmp_path, "run", method="safeclip", epochs=5, select="val_loss", patience=2))
    epochs = T.read_jsonl(tmp_path / "run" / "epochs.jsonl")
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]                   # 5 configured, stopped after 3
    assert "early_stop" not in epochs[2] and "patience" in epochs[3]["early_stop"]
    assert "stopped after epoch 3 of 5" in capsys.readouterr().out
    assert max(s["epoch"] for s in T.read_jsonl(tmp_path / "run" / "steps.jsonl")) == 3
    assert read_meta(ckpt)["epoch"] == 1                                  # the best epoch, not the last
    T.train(_cfg(tmp_path, "run", method="safeclip", epochs=5, select="val_loss", patience=2, resume=True))  # stays stopped
    assert [e["epoch"] for e in T.read_jsonl(tmp_path / "run" / "epochs.jsonl")] == [0, 1, 2, 3]


def test_bf16_autocast_on_cpu_close_to_fp32(tmp_path, toy_data):
    kw = dict(method="saferclip", curriculum="none", epochs=1)
    T.train(_cfg(tmp_path, "fp32", precision="fp32", **kw))
    T.train(_cfg(tmp_path, "bf16", precision="bf16", **kw))
    s32, s16 = (T.read_jsonl(tmp_path / n / "steps.jsonl") for n in ("fp32", "bf16"))
    l32, l16 = [s["loss"] for s in s32], [s["loss"] for s in s16]
    assert all(np.isfinite(l16)) and len(l16) == len(l32) == 3
    assert l16 != l32                                  # bf16 really ran (identical losses: autocast ignored)
    # bf16 keeps 8 mantissa bits (~0.4% per rounding): measured <= 0.9% on the step losses, 0.1% on the drift
    assert l16 == pytest.approx(l32, rel=3e-2)
    e32, e16 = (T.read_jsonl(tmp_path / n / "epochs.jsonl")[-1] for n in ("fp32", "bf16"))
    for tower in ("drift_text", "drift_vision"):
        assert e16[tower] == pytest.approx(e32[tower], rel=5e-2)


VISU = ROOT_TESTS / "fixtures" / "visu"   # real ViSU layout: manifests/, coco/train2017, unsafe_images/


def test_max_train_rows_samples_rows_but_loads_every_row():
    cfg = dict(data="visu", data_root=str(VISU), pretrained=None)
    full, val, _ = T.load_training_data(T.TrainConfig(**cfg, max_val_rows=None))
    same, val1, _ = T.load_training_data(T.TrainConfig(**cfg, max_train_rows=3, max_val_rows=1))
    assert (len(full), len(val), len(same), len(val1)) == (4, 2, 4, 1)   # the pool is never cut
    rows = T.training_rows(T.TrainConfig(**cfg, max_train_rows=3), len(full))
    assert len(rows) == 3 and set(rows) < set(range(4))
    assert T.training_rows(T.TrainConfig(**cfg, max_train_rows=3), 4).tolist() == rows.tolist()  # pure in the seed


def test_visu_end_to_end_through_the_real_loader(tmp_path):
    """data='visu' with nothing replaced: manifests → validated image files → mining → training → checkpoint."""
    before = sorted(p.relative_to(VISU) for p in VISU.rglob("*"))
    ckpt = T.train(T.TrainConfig(data="visu", data_root=str(VISU), pretrained=None, method="saferclip", epochs=2,
                                 batch_size=2, max_train_rows=3, lr=1e-3, lora_rank=4, lora_alpha=4.0,
                                 out_dir=str(tmp_path / "run"), cache_dir=str(tmp_path / "cache"), progress=False))
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (meta["data"]["source"], meta["n_train"], meta["n_pool"], meta["n_val"]) == (str(VISU), 3, 4, 2)
    epochs = T.read_jsonl(tmp_path / "run" / "epochs.jsonl")
    assert [e["epoch"] for e in epochs] == [0, 1, 2] and [e["rows"] for e in epochs[1:]] == [1, 2]  # curriculum
    assert all(np.isfinite(s["loss"]) for s in T.read_jsonl(tmp_path / "run" / "steps.jsonl"))
    assert np.load(tmp_path / "run" / "targets.npz")["target_index"].shape == (4,)   # mined over every row
    open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(ckpt))
    assert sorted(p.relative_to(VISU) for p in VISU.rglob("*")) == before  # the dataset folder is read-only to us


def _parameters_cell():
    nb = json.loads((ROOT / "nbs" / "02_train.ipynb").read_text())
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    i = next(i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    return i, "".join(cells[i]["source"])


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_parameters_cell_mirrors_train_config():
    i, src = _parameters_cell()
    assert i <= 2, "the parameters cell must come first"
    ns = {}
    exec(src, ns)
    defaults = T.TrainConfig()
    for f in __import__("dataclasses").fields(T.TrainConfig):
        assert f.name in ns, f"parameters cell lacks {f.name}"
        assert ns[f.name] == getattr(defaults, f.name) or (
            isinstance(ns[f.name], tuple) and tuple(ns[f.name]) == getattr(defaults, f.name)), f.name


@pytest.mark.parametrize("params,msg", [({"method": "nope"}, "method='nope' is not valid"),
                                        ({"epochz": 3}, "unknown parameter"),
                                        ({"resume": True, "out_dir": "/nonexistent/saferclip-run"},
                                         "no training state")])
def test_papermill_bad_parameters_fail_in_first_cells(tmp_path, params, msg):
    papermill = pytest.importorskip("papermill")
    with pytest.raises(papermill.PapermillExecutionError) as e:
        papermill.execute_notebook(str(ROOT / "nbs" / "02_train.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters=params, cwd=str(ROOT / "nbs"), progress_bar=False)
    assert msg in str(e.value.evalue)
    out = json.loads((tmp_path / "out.ipynb").read_text())
    code = [c for c in out["cells"] if c["cell_type"] == "code"]
    failed = next(i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", [])))
    assert failed <= 4, f"failed in code cell {failed}, not in the first cells"


def test_miner_settings_reach_the_miner():
    cfg = T.TrainConfig(pretrained=None, miner_exact=False, miner_exact_backend="faiss", miner_hnsw_m=16,
                      miner_hnsw_ef_construction=40, miner_hnsw_ef_search=64, seed=3)
    m = cfg.miner_config()
    assert (m.exact, m.exact_backend, m.hnsw_m, m.hnsw_ef_construction, m.hnsw_ef_search, m.seed) == \
        (False, "faiss", 16, 40, 64, 3)
    with pytest.raises(ValueError, match="hnsw_ef_search"):
        T.TrainConfig(pretrained=None, miner_hnsw_ef_search=0)


def test_merged_checkpoint_reproduces_the_trained_peft_model(tmp_path, toy_data):
    """final.safetensors (LoRA merged, stock open_clip) gives the embeddings of the trained peft model (fp32)."""
    tr = T.Trainer(_cfg(tmp_path, "run", method="saferclip", epochs=2, precision="fp32"))
    ckpt = tr.fit()
    merged, _, tok = open_clip.create_model_and_transforms(TINY_ARCH, pretrained=str(ckpt))[0], None, tr.frozen.tokenizer
    merged.eval(); tr.model.eval()
    q = toy_data[1]
    imgs, texts = T.image_batch(q.safe_images, np.arange(len(q)), model=merged), tok(list(q.safe_captions))
    with torch.no_grad():
        d_img = (merged.encode_image(imgs) - tr.model.encode_image(imgs)).abs().max().item()
        d_txt = (merged.encode_text(texts) - tr.model.encode_text(texts)).abs().max().item()
        moved = (tr.model.encode_text(texts) - tr.frozen.model.encode_text(texts)).abs().max().item()
    assert d_img <= 1e-4 and d_txt <= 1e-4, (d_img, d_txt)
    assert moved > 1e-3                                   # and training did move the model: the check is not vacuous


def test_frozen_reference_is_bit_identical_after_training(tmp_path, toy_data):
    """The reference T0/V0 (weights and the cached embeddings) does not move while the LoRA copy trains."""
    tr = T.Trainer(_cfg(tmp_path, "run", method="saferclip", epochs=2))
    before = {k: v.clone() for k, v in tr.frozen.model.state_dict().items()}
    ref_before = {k: v.clone() for k, v in tr.frozen.ref.items()}
    tr.fit()
    after = tr.frozen.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(ref_before[k], tr.frozen.ref[k]) for k in ref_before)
    assert not any(p.requires_grad for p in tr.frozen.model.parameters())
    drift = T.read_jsonl(tmp_path / "run" / "epochs.jsonl")[-1]["drift_text"]
    assert drift > 0                                      # the trained copy did move


def test_proximity_targets_are_mined_over_every_row_not_the_sample(tmp_path, toy_data):
    tr = T.Trainer(_cfg(tmp_path, "run", method="saferclip", epochs=1, max_train_rows=12))
    assert len(tr.rows) == 12 and len(tr.frozen.mined.target_index) == 48
    outside = np.setdiff1d(tr.frozen.mined.target_index, tr.rows)
    assert len(outside) > 0                               # some targets are rows the run does not train on
    assert set(np.concatenate(tr.schedule)) <= set(tr.rows)


def test_infonce_uses_the_models_own_logit_scale(tmp_path, toy_data):
    tr = T.Trainer(_cfg(tmp_path, "run", method="safeclip", epochs=1))
    own = float(tr.frozen.model.logit_scale.exp())
    assert tr.loss_fn.weights.logit_scale == pytest.approx(own) and json.loads(
        (tmp_path / "run" / "config.json").read_text())["infonce_logit_scale"] == pytest.approx(own)
    tr2 = T.Trainer(_cfg(tmp_path, "run2", method="safeclip", epochs=1, logit_scale=100.0))
    assert tr2.loss_fn.weights.logit_scale == 100.0


def test_per_term_gradient_norms_are_logged(tmp_path, toy_data):
    T.train(_cfg(tmp_path, "run", method="safeclip", epochs=2, diag_every=2))   # 3 steps an epoch: steps 2, 4, 6
    g = T.read_jsonl(tmp_path / "run" / "grads.jsonl")
    assert [r["step"] for r in g] == [2, 4, 6]
    terms = {f"gn_{k}" for k in T.weights_for_method("safeclip").TERMS}
    assert set(g[0]) - {"step", "epoch"} == terms and all(r[k] > 0 for r in g for k in terms)
