"""Training-step cost: SafeR-CLIP's step with cached frozen targets vs a step that re-runs the frozen encoders.

Same model, same batch, same device, same loss (`loss_for_method("saferclip")`) and the same peft LoRA model
(`saferclip.train.build_trainable`); only where the frozen reference embeddings come from differs:

- ours:     `saferclip.train.batch_embeddings` reads T0(t), T0(t*), T0(t̂), V0(v), V0(v*), V0(v̂) from the cache that
            `saferclip.miner.embed_quadruplets` builds once per run (its one-off cost is reported separately);
- baseline: the Safe-CLIP way: the frozen model runs forward (under no_grad) on t, t*, t̂, v, v*, v̂ every step.
            It reuses the trainable pass's preprocessed pixels and tokens for t, t*, v, v* (favourable to it).
- safeclip-min (extra row, not the headline): re-running only what Safe-CLIP's own 8-term loss needs, T0(t) and
            V0(v), with the Safe-CLIP loss: the literal cost of the public baseline code's frozen passes.

Protocol: warm-up steps excluded; runs interleaved A B A B …; each run = `--steps` optimizer steps; median of
`--runs` runs; per-sample time = run time / (steps × batch). Prints a table and, last, the headline ratio.

    python benchmarks/bench_step.py [--quick] [--runs 7] [--archs saferclip-tiny ViT-B-32]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

import saferclip  # noqa: F401  (registers saferclip-tiny)
from saferclip.core import TINY_ARCH, freeze, load_clip, seed_everything
from saferclip.data import Quadruplets, image_batch
from saferclip.losses import EmbeddingBatch, loss_for_method
from saferclip.miner import EMBED_FIELDS, embed_quadruplets, mine_targets
from saferclip.train import DualEncoder, TrainConfig, batch_embeddings, build_trainable, trainable_parameters


def random_quadruplets(n: int, size: int, seed: int = 0) -> Quadruplets:
    """n random rows at the model's resolution with varied captions."""
    g = torch.Generator().manual_seed(seed)
    img = lambda: torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    colours = ["red", "blue", "green", "yellow", "purple", "white", "black", "grey"]
    things = ["shirt", "sneaker", "bag", "dress", "coat", "sandal", "trouser", "boot"]
    safe = [f"a {colours[i % 8]} {things[(i // 8) % 8]} on a beach at noon, photo number {i}" for i in range(n)]
    unsafe = [f"a {colours[i % 8]} {things[(i // 8) % 8]} on a beach next to a bloody knife, photo {i}"
              for i in range(n)]
    return Quadruplets([f"r{i}" for i in range(n)], safe, unsafe, img(), img(), ["weapon"] * n, name="bench")


class Setup:
    """One model + data + optimizer, with the two step functions."""

    def __init__(self, arch: str, batch: int, n_rows: int, lora_rank: int = 16, seed: int = 0):
        seed_everything(seed)
        self.device = torch.device("cpu")
        base, _, self.tok = load_clip(arch, None)
        self.base = freeze(base)
        size = self.base.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        self.quads = random_quadruplets(n_rows, size, seed)
        t0 = time.perf_counter()
        self.ref = embed_quadruplets(self.base, self.tok, self.quads, EMBED_FIELDS)      # the one-off cache
        idx, _ = mine_targets(self.ref["unsafe_text"], self.ref["safe_text"], k=1, exact=True)
        self.cache_seconds = time.perf_counter() - t0
        self.targets = idx[:, 0]
        cfg = TrainConfig(pretrained=None, lora_rank=lora_rank, lora_alpha=float(lora_rank))
        self.model = build_trainable(self.base, cfg).to(self.device)
        self.model.train()
        self.step_model = DualEncoder(self.model)
        self.params = list(trainable_parameters(self.model).values())
        self.opt = torch.optim.AdamW(self.params, lr=1e-5)
        self.loss_safer = loss_for_method("saferclip")
        self.loss_safe = loss_for_method("safeclip")
        self.batch, self.n_rows = batch, n_rows
        self.rng = np.random.default_rng(seed)
        self.n_trainable = sum(p.numel() for p in self.params)

    def batches(self, k: int) -> list[np.ndarray]:
        """k batches of row indices (the same list is given to both methods)."""
        return [np.sort(self.rng.choice(self.n_rows, self.batch, replace=False)) for _ in range(k)]

    def _update(self, loss: torch.Tensor) -> None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def step_ours(self, idx: np.ndarray) -> float:
        """SafeR-CLIP step: frozen targets read from the cache."""
        emb = batch_embeddings(self.step_model, self.tok, self.quads, idx, self.ref, self.targets, True, self.base,
                               self.device)
        loss, _ = self.loss_safer(emb)
        self._update(loss)
        return float(loss.detach())

    def _trainable(self, idx: np.ndarray):
        q = self.quads
        texts = [q.safe_captions[i] for i in idx] + [q.unsafe_captions[i] for i in idx]
        imgs = torch.cat([image_batch(q.safe_images, idx, model=self.base),
                          image_batch(q.unsafe_images, idx, model=self.base)])
        tokens = self.tok(texts)
        img, txt = self.step_model(imgs, tokens)
        return imgs, tokens, img, txt

    def step_baseline(self, idx: np.ndarray) -> float:
        """Safe-CLIP-style step: the frozen encoders re-run on t, t*, t̂, v, v*, v̂ (no_grad), same loss."""
        n, q, tgt = len(idx), self.quads, self.targets[idx]
        imgs, tokens, img, txt = self._trainable(idx)
        with torch.no_grad():
            img_hat = image_batch(q.safe_images, tgt, model=self.base)
            tok_hat = self.tok([q.safe_captions[j] for j in tgt])
            r_img = F.normalize(self.base.encode_image(torch.cat([imgs, img_hat])).float(), dim=-1)
            r_txt = F.normalize(self.base.encode_text(torch.cat([tokens, tok_hat])).float(), dim=-1)
        emb = EmbeddingBatch(txt_safe=txt[:n], txt_unsafe=txt[n:], img_safe=img[:n], img_unsafe=img[n:],
                             ref_txt_safe=r_txt[:n], ref_txt_unsafe=r_txt[n:2 * n], ref_txt_target=r_txt[2 * n:],
                             ref_img_safe=r_img[:n], ref_img_unsafe=r_img[n:2 * n], ref_img_target=r_img[2 * n:])
        loss, _ = self.loss_safer(emb)
        self._update(loss)
        return float(loss.detach())

    def step_safeclip_min(self, idx: np.ndarray) -> float:
        """Safe-CLIP's own need: T0(t), V0(v) re-run each step, the 8-term Safe-CLIP loss."""
        n = len(idx)
        imgs, tokens, img, txt = self._trainable(idx)
        with torch.no_grad():
            r_img = F.normalize(self.base.encode_image(imgs[:n]).float(), dim=-1)
            r_txt = F.normalize(self.base.encode_text(tokens[:n]).float(), dim=-1)
        emb = EmbeddingBatch(txt_safe=txt[:n], txt_unsafe=txt[n:], img_safe=img[:n], img_unsafe=img[n:],
                             ref_txt_safe=r_txt, ref_img_safe=r_img)
        loss, _ = self.loss_safe(emb)
        self._update(loss)
        return float(loss.detach())


def bench(arch: str, batch: int, n_rows: int, steps: int, runs: int, warmup: int) -> list[dict]:
    """Interleaved timing of the three step kinds for one architecture."""
    s = Setup(arch, batch, n_rows)
    kinds = {"ours (cached T0/V0)": s.step_ours, "baseline (re-run T0/V0 ×6)": s.step_baseline,
             "safeclip-min (re-run T0(t),V0(v))": s.step_safeclip_min}
    for fn in kinds.values():                    # warm-up, excluded
        for idx in s.batches(warmup):
            fn(idx)
    times = {k: [] for k in kinds}
    for r in range(runs):
        bs = s.batches(steps)                    # the same batches for every kind in this round
        order = list(kinds) if r % 2 == 0 else list(kinds)[::-1]
        for k in order:
            t0 = time.perf_counter()
            for idx in bs:
                kinds[k](idx)
            times[k].append(time.perf_counter() - t0)
    rows = []
    base_ps = statistics.median(times["baseline (re-run T0/V0 ×6)"]) / (steps * batch)
    amort = s.cache_seconds / n_rows  # one-off cache + mining, per row (paid once per run, not per epoch)
    for k, ts in times.items():
        ps = statistics.median(ts) / (steps * batch)
        rows.append({"arch": arch, "batch": batch, "step": k, "ms_per_sample": 1e3 * ps,
                     "iqr_ms": 1e3 * (np.percentile(ts, 75) - np.percentile(ts, 25)) / (steps * batch),
                     "ratio_vs_baseline": ps / base_ps, "runs": runs, "cache_ms_per_row": 1e3 * amort,
                     "trainable": s.n_trainable})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny arch only, 5 runs")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--archs", nargs="+", default=None)
    a = ap.parse_args()
    plans = {TINY_ARCH: dict(batch=32, n_rows=512, steps=1, warmup=1),
             "ViT-B-32": dict(batch=4, n_rows=64, steps=1, warmup=1)}
    archs = a.archs or ([TINY_ARCH] if a.quick else [TINY_ARCH, "ViT-B-32"])
    runs = 5 if a.quick else max(5, a.runs)
    print(f"bench_step: torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()}")
    rows = []
    for arch in archs:
        t0 = time.perf_counter()
        new = bench(arch, runs=runs, **plans[arch])
        rows += new
        print(f"  {arch}: {time.perf_counter() - t0:.0f}s, load average now {os.getloadavg()}; "
              + "; ".join(f"{r['step']} {r['ms_per_sample']:.1f} ms/sample" for r in new), flush=True)
    print("\n| arch | batch | step | ms / sample (median) | IQR ms | × baseline | one-off cache+mining ms / row |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['batch']} | {r['step']} | {r['ms_per_sample']:.2f} | {r['iqr_ms']:.2f} | "
              f"{r['ratio_vs_baseline']:.3f} | {r['cache_ms_per_row']:.2f} |")
    print(f"\n(median of {runs} interleaved runs each, warm-up excluded; LoRA r=16 on "
          f"{', '.join('%s: %s' % (r['arch'], format(r['trainable'], ',')) for r in rows[::3])} trainable parameters; "
          f"load average {os.getloadavg()})")
    heads = [f"{r['arch']} {r['ratio_vs_baseline']:.2f}x" for r in rows if r["step"].startswith("ours")]
    worst = max(r["ratio_vs_baseline"] for r in rows if r["step"].startswith("ours"))
    print(f"HEADLINE step: ours / baseline per-sample time = {', '.join(heads)} "
          f"(goal <= 0.60x: {'met' if worst <= 0.6 else 'NOT met'})")


if __name__ == "__main__":
    main()
