"""ViT-L-14 LoRA training-step throughput on one GPU in bf16: samples/s, peak memory, model FLOPs utilisation.

The SafeR-CLIP step as trained at paper scale (cached frozen targets, LoRA r=16 on both towers via
`saferclip.train.build_trainable`, `loss_for_method("saferclip")`, AdamW, bf16 autocast), randomly initialised
ViT-L-14 (no download), synthetic 224×224 images and 77-token captions. MFU = achieved model FLOPs / peak bf16 FLOPs
of the device (`--peak-tflops`, default: looked up for H100/H200/A100). Model FLOPs per step = 3 × forward FLOPs of
the trainable passes (v, v*, t, t*) — the usual 6·N·tokens convention, which over-counts LoRA's backward (no weight
gradients for frozen weights), so the MFU printed is an upper-bound style figure.

Only runs where CUDA is available; elsewhere it prints "skipped: no CUDA" and exits 0.

    python benchmarks/bench_gpu.py [--batch 48] [--steps 20] [--warmup 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def forward_flops(model, batch: int) -> float:
    """Forward FLOPs of encode_image on `batch` images plus encode_text on `batch` captions (2·params·tokens)."""
    v = model.visual
    vis_params = sum(p.numel() for n, p in v.named_parameters() if "transformer" in n)
    size = v.image_size[0] if isinstance(v.image_size, (tuple, list)) else v.image_size
    patch = v.patch_size[0] if isinstance(v.patch_size, (tuple, list)) else v.patch_size
    vis_tokens = (size // patch) ** 2 + 1
    txt_params = sum(p.numel() for n, p in model.transformer.named_parameters())
    txt_tokens = model.context_length
    return 2.0 * batch * (vis_params * vis_tokens + txt_params * txt_tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="ViT-L-14")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: skipped: no CUDA device on this machine (nothing measured)")
        print("HEADLINE gpu: skipped: no CUDA")
        return
    import numpy as np
    from saferclip.core import freeze, load_clip, seed_everything
    from saferclip.data import Quadruplets
    from saferclip.miner import EMBED_FIELDS, embed_quadruplets
    from saferclip.losses import loss_for_method
    from saferclip.train import DualEncoder, TrainConfig, batch_embeddings, build_trainable, trainable_parameters

    seed_everything(0)
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    peak = a.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    base, _, tok = load_clip(a.arch, None, device=dev)
    base = freeze(base)
    n = a.batch * 4
    g = torch.Generator().manual_seed(0)
    img = lambda: torch.randint(0, 256, (n, 3, 224, 224), dtype=torch.uint8, generator=g)
    quads = Quadruplets([f"r{i}" for i in range(n)], [f"a red shirt on a beach, photo {i}" for i in range(n)],
                        [f"a red shirt on a beach next to a knife, photo {i}" for i in range(n)], img(), img(),
                        ["weapon"] * n)
    ref = embed_quadruplets(base, tok, quads, EMBED_FIELDS, device=dev, batch_size=64)
    targets = np.random.default_rng(0).permutation(n)
    model = build_trainable(base, TrainConfig(pretrained=None, lora_rank=16, lora_alpha=16.0)).to(dev)
    model.train()
    step_model = DualEncoder(model)
    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-4)
    loss_fn = loss_for_method("saferclip")
    rng = np.random.default_rng(0)

    def step():
        idx = np.sort(rng.choice(n, a.batch, replace=False))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            emb = batch_embeddings(step_model, tok, quads, idx, ref, targets, True, base, dev)
            loss, _ = loss_fn(emb)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    flops = 3 * forward_flops(base, 2 * a.batch)  # v, v* images and t, t* captions
    achieved = flops / med / 1e12
    mem = torch.cuda.max_memory_allocated() / 2**30
    print(f"bench_gpu: {name}, torch {torch.__version__}, {a.arch} LoRA r=16, bf16 autocast, batch {a.batch}")
    print("\n| metric | value |\n|---|---|")
    print(f"| step time (median of {a.steps}) | {med * 1e3:.1f} ms |")
    print(f"| throughput | {a.batch / med:.1f} quadruplets/s |")
    print(f"| peak memory allocated | {mem:.2f} GiB |")
    print(f"| model TFLOP/s (3 × forward) | {achieved:.1f} |")
    mfu = f"{100 * achieved / peak:.1f}% of {peak:.0f} TFLOP/s bf16" if peak else "unknown peak (pass --peak-tflops)"
    print(f"| MFU | {mfu} |")
    print(f"HEADLINE gpu: {a.arch} LoRA bf16 {a.batch / med:.1f} quadruplets/s, peak {mem:.1f} GiB, MFU {mfu}")


if __name__ == "__main__":
    main()
