"""End-to-end wall time of the default `make reproduce` (embedded world, CPU) from a clean data/checkpoint cache.

It runs `python -m saferclip.reproduce --profile world --full False` in a scratch root (a copy of nbs/ and the
package's notebooks' inputs) with a fresh, empty cache (`--cache-dir` and SAFERCLIP_CACHE both point into the
scratch folder), so the world is generated from scratch (the base is the shipped `saferclip/weights/world-base`,
never pretrained by `make reproduce`; `make base` times pretraining) and the repository's own
results/, figures/, runs/ and data/ are never touched. The per-stage table is the one `saferclip.reproduce` writes
(results/timings.md of the scratch root); this script prints it, the load average before/after, and last the
headline total.

    python benchmarks/bench_e2e.py                 # the real run (about 20+ minutes on 2 cores)
    python benchmarks/bench_e2e.py --from FILE     # only print an existing timings.md (e.g. results/timings.md)
    python benchmarks/bench_e2e.py --keep DIR      # run in DIR and keep it
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_timings(text: str) -> tuple[list[tuple[str, float]], float | None]:
    """(stage, seconds) rows and the total from a timings.md written by saferclip.reproduce."""
    rows, total = [], None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2:
            continue
        m = re.match(r"\**([\d.]+)\**", cells[1])
        if not m:
            continue
        if cells[0].strip("*").lower() == "total":
            total = float(m.group(1))
        else:
            rows.append((cells[0], float(m.group(1))))
    return rows, total


def run(scratch: Path) -> tuple[Path, float, int]:
    """Run the default reproduce in `scratch` with an empty cache; (timings.md, wall seconds, return code)."""
    shutil.copytree(ROOT / "nbs", scratch / "nbs", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    cache = scratch / "cache"
    cache.mkdir()
    env = dict(os.environ, SAFERCLIP_CACHE=str(cache))
    cmd = [sys.executable, "-m", "saferclip.reproduce", "--profile", "world", "--full", "False",
           "--root", str(scratch), "--cache-dir", str(cache)]
    print("running:", " ".join(cmd), flush=True)
    t0 = time.time()
    with open(scratch / "reproduce.log", "w") as log:
        rc = subprocess.call(cmd, cwd=scratch, env=env, stdout=log, stderr=subprocess.STDOUT)
    return scratch / "results" / "timings.md", time.time() - t0, rc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--from", dest="src", default=None, help="print this timings.md instead of running")
    ap.add_argument("--keep", default=None, help="scratch folder to run in and keep")
    a = ap.parse_args()
    load0 = os.getloadavg()
    wall, rc = None, 0
    if a.src:
        timings = Path(a.src)
    else:
        scratch = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="saferclip-e2e-"))
        scratch.mkdir(parents=True, exist_ok=True)
        try:
            timings, wall, rc = run(scratch)
            text = timings.read_text() if timings.is_file() else None
        finally:
            if not a.keep:
                log = (scratch / "reproduce.log").read_text()[-3000:] if (scratch / "reproduce.log").exists() else ""
                shutil.rmtree(scratch, ignore_errors=True)
        if rc != 0 or text is None:
            print(f"reproduce failed (rc {rc}); last log lines:\n{log if not a.keep else ''}")
            print(f"HEADLINE e2e: make reproduce FAILED after {wall:.0f}s")
            sys.exit(1)
        timings = None
    text = Path(a.src).read_text() if a.src else text
    rows, total = parse_timings(text)
    print(f"load average before {load0}, after {os.getloadavg()}; {os.cpu_count()} cores")
    print("\n| stage | seconds | share |\n|---|---|---|")
    tot = total if total is not None else sum(s for _, s in rows)
    for name, s in rows:
        print(f"| {name} | {s:.1f} | {100 * s / tot:.0f}% |")
    print(f"| **total** | **{tot:.1f}** | |")
    if wall is not None:
        print(f"\nprocess wall time (including Python start-up and notebook kernels): {wall:.1f}s")
    print(f"HEADLINE e2e: default make reproduce from a clean cache = {tot / 60:.1f} min "
          f"({'measured here' if a.src is None else 'read from ' + str(a.src)}; budget 20 min: "
          f"{'within' if tot <= 1200 else 'OVER'})")


if __name__ == "__main__":
    main()
