"""Throughput of the torchrun path with 1 and 2 processes on CPU (gloo), for `stats` and `evaluate`.

Each configuration runs the real command line (``python -m torch.distributed.run --nproc_per_node=N -m
rulewriter ...``) on the same deterministic sample of imagenet-samples photos, with the machine's threads
split between the processes (``OMP_NUM_THREADS = threads // N``) so that every configuration uses the same
cores. Start-up (interpreter, model load, process group) is measured by the same command on ``N`` photos
and subtracted, so the rates are the steady-state images per second; the end-to-end wall time is reported
too. The single-process command without torchrun is the reference. Results must agree: the statistics of
every configuration are compared with the reference's to fp64 tolerance.

Run: ``python benchmarks/scaling.py [--quick] [--images 640]``.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

NAME = "scaling"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(procs: int | None, args: list[str], threads: int) -> tuple[float, str]:
    """Wall seconds and stdout of one command; ``procs=None`` runs it without torchrun."""
    launcher = ([sys.executable] if procs is None else
                [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                 f"--master_port={free_port()}"])
    n = 1 if procs is None else procs
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // n))}
    t0 = time.perf_counter()
    r = subprocess.run([*launcher, "-m", "rulewriter", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return wall, r.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 16 photos")
    ap.add_argument("--images", type=int, default=None, help="photos (full 640, quick 16)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads shared by the processes")
    args = ap.parse_args(argv)
    shared = C.require_shared("data/imagenet-samples")
    data = shared / "data" / "imagenet-samples"
    n = args.images or (16 if args.quick else 640)
    configs: list[tuple[str, int | None]] = [("1 process, no torchrun", None), ("torchrun, 1 process", 1),
                                             ("torchrun, 2 processes", 2)]
    t_start = time.perf_counter()
    rows, results = [], []
    with tempfile.TemporaryDirectory() as tmp:
        from rulewriter.core.stats import SecondMoment

        ref_stats = None
        for label, procs in configs:
            r: dict[str, Any] = {"config": label, "processes": procs or 1}
            for cmd in ("stats", "evaluate"):
                def argv_for(count: int, tag: str) -> list[str]:
                    base = [cmd, "--model", "efficientnet-lite0", "--data", str(data), "--samples", str(count),
                            "--batch-size", "16", "--quiet", "--json", "--device", "cpu"]
                    if cmd == "stats":
                        return [*base, "--layer", "_blocks.15._project_conv", "--precision", "fp64", "--no-cache",
                                "--out", f"{tmp}/{tag}.safetensors"]
                    return [*base, "--out", f"{tmp}/{tag}"]

                k = procs or 1
                startup, _ = run(procs, argv_for(k, f"{cmd}-start-{k}-{procs}"), args.threads)
                wall, out = run(procs, argv_for(n, f"{cmd}-{k}-{procs}"), args.threads)
                # Start-up varies by a second or two; below 5 s of real work the difference is mostly noise.
                rate = (n - k) / (wall - startup) if wall - startup > 5.0 else float("nan")
                r[cmd] = {"wall_s": wall, "startup_s": startup, "images_per_s": rate, "end_to_end_images_per_s": n / wall}
                if cmd == "stats":
                    s = SecondMoment.load(f"{tmp}/{cmd}-{k}-{procs}.safetensors")
                    if ref_stats is None:
                        ref_stats = s
                    r["stats"]["max_rel_diff_vs_reference"] = float(
                        (s.moment() - ref_stats.moment()).abs().max() / ref_stats.moment().abs().max())
                print(f"  {label}: {cmd} {wall:.1f} s ({startup:.1f} s start-up) → {rate:.2f} img/s", flush=True)
            results.append(r)
    base = results[0]
    for r in results:
        rows.append([r["config"], f"{r['stats']['images_per_s']:.2f}",
                     f"{r['stats']['images_per_s'] / base['stats']['images_per_s']:.2f}×",
                     f"{r['evaluate']['images_per_s']:.2f}",
                     f"{r['evaluate']['images_per_s'] / base['evaluate']['images_per_s']:.2f}×",
                     f"{r['stats']['startup_s']:.1f}", f"{r['stats']['max_rel_diff_vs_reference']:.1e}"])
    total = time.perf_counter() - t_start
    md = "\n".join([
        f"# torchrun scaling on CPU ({args.threads} threads shared by the processes, gloo)", "",
        f"{n} imagenet-samples photos, EfficientNet-Lite0, batch 16; `stats` at `_blocks.15._project_conv` "
        "(fp64 products), `evaluate` without an edit. Steady-state images/s (start-up subtracted):", "",
        C.markdown_table(["configuration", "stats img/s", "vs 1 process", "evaluate img/s", "vs 1 process",
                          "stats start-up s", "C max rel. diff"], rows), "",
        f"Total run time {total / 60:.1f} min ({'quick' if args.quick else 'full'} mode).",
    ])
    print("\n" + md)
    C.write_results(NAME, {"images": n, "threads": args.threads, "results": results, "total_seconds": total}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
