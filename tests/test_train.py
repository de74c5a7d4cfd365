"""saferclip.train: config validation, resume equivalence, checkpoints loadable by stock open_clip, NaN guard."""
import json

import numpy as np
import open_clip
import pytest
import torch

import saferclip.train as T
from saferclip.core import TINY_ARCH, load_state_dict, read_meta
from conftest import make_quadruplets


@pytest.fixture
def toy_data(monkeypatch):
    """Replace the world with 48 random training rows and 16 validation rows."""
    train, val = make_quadruplets(48, seed=1, name="train"), make_quadruplets(16, seed=2, name="val")
    monkeypatch.setattr(T, "load_training_data", lambda cfg: (train, val, {"source": "toy", "skipped": 0}))
    return train, val


def _cfg(tmp_path, name, **kw):
    base = dict(pretrained=None, epochs=2, batch_size=16, lr=1e-3, out_dir=str(tmp_path / name),
                cache_dir=str(tmp_path / "cache"), progress=False, save_every=1, lora_rank=4, lora_alpha=4.0)
    return T.TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("bad,msg", [
    (dict(method="safer-clip"), "saferclip"), (dict(data="coco"), "world"), (dict(epochs=0), "epochs"),
    (dict(precision="int8"), "bf16"), (dict(loss_weights={"redir": 1.0}), "redir_img"),
    (dict(miner_query="audio"), "text"), (dict(data="visu"), "data_root"), (dict(lr=-1.0), "lr"),
])
def test_bad_parameters_fail_with_choices(bad, msg):
    with pytest.raises(ValueError, match=msg):
        T.TrainConfig(**bad)


def test_unknown_parameter_names_listed():
    with pytest.raises(ValueError, match="valid parameters"):
        T.TrainConfig.from_params(epochz=3)


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
    assert calls["n"] == 1  # once per run, not once per step


def test_resume_is_exact(tmp_path, toy_data):
    full = T.train(_cfg(tmp_path, "full", method="saferclip", epochs=2, lora_dropout=0.1))
    # interrupted after 2 optimizer steps (mid-epoch 2 of 3 batches), then resumed
    T.train(_cfg(tmp_path, "cut", method="saferclip", epochs=2, lora_dropout=0.1, max_steps=2))
    assert not (tmp_path / "cut" / "final.safetensors").exists() or T.read_jsonl(tmp_path / "cut" / "epochs.jsonl")
    resumed = T.train(_cfg(tmp_path, "cut", method="saferclip", epochs=2, lora_dropout=0.1, resume=True))
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
                                        ({"epochz": 3}, "unknown parameter")])
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
