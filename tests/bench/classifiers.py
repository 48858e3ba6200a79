"""Classifier benchmark: inference and Grad-CAM time, parameters and peak memory per architecture.

Run with ``.venv/bin/python -m tests.bench.classifiers [--small] [--size 224] [--arch NAME ...]``.
Each architecture is measured in its own subprocess so that peak memory (CPU:
the process's peak resident set; CUDA: ``max_memory_allocated``) belongs to it
alone. Prints ms per image at batch 1 and 16, Grad-CAM ms per image (batch 1),
parameter count and peak memory, with the papers' figures beside where they exist.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

#: Published figures (paper C on an RTX 2080 Ti; paper A: test-set time / test images).
PAPER = {
    "resnet50": "paper C: 1.11 ms inference, 16.37 ms Grad-CAM (RTX 2080 Ti)",
    "vgg16": "paper C: 1.79 ms inference, 13.73 ms Grad-CAM (RTX 2080 Ti)",
    "vit_ldh": "paper A: 106.65 s for 218 test images = 489 ms/image (hardware not stated)",
}


def measure(arch: str, small: bool, size: int, threads: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from models.gradcam import GradCamExplainer
    from models.registry import create_model

    torch.set_num_threads(threads)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kw = {"img_size": size} if arch == "vit_ldh" else {}
    if arch == "vit_ldh" and small:
        kw["img_size"] = size - size % 16
    model = create_model(arch, small=small, num_classes=3, **kw).eval().to(dev)
    params = sum(p.numel() for p in model.parameters())
    side = kw.get("img_size", size)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def timed(batch: int) -> float:
        x = torch.randn(batch, 1, side, side, device=dev)
        with torch.inference_mode(), torch.autocast("cuda", enabled=dev.type == "cuda"):
            model(x)  # warm-up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(repeats):
                model(x)
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return (time.perf_counter() - t) / repeats / batch * 1000

    b1, b16 = timed(1), timed(16)
    cam = GradCamExplainer(model, multilayer=arch == "vit_ldh")
    x = torch.randn(1, 1, side, side, device=dev)
    cam(x)
    t = time.perf_counter()
    for _ in range(repeats):
        heat = cam(x)
    cam_ms = (time.perf_counter() - t) / repeats * 1000
    assert heat.shape == (1, side, side) and np.isfinite(heat).all()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"arch": arch, "small": small, "input": side, "device": str(dev), "threads": threads,
            "params_m": params / 1e6, "ms_b1": b1, "ms_b16": b16, "gradcam_ms": cam_ms, "peak_mib": peak}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", nargs="*", default=None)
    ap.add_argument("--small", action="store_true", help="the reduced configurations (shipped demo models)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(measure(a.arch[0], a.small, a.size, a.threads, a.repeats)))
        return
    from models.registry import list_models

    print(f"{'architecture':20s} {'input':>5s} {'params':>9s} {'ms/img b1':>10s} {'ms/img b16':>11s} "
          f"{'Grad-CAM ms':>12s} {'peak MiB':>9s}  device / paper")
    for arch in a.arch or list_models():
        cmd = [sys.executable, "-m", "tests.bench.classifiers", "--worker", "--arch", arch, "--size", str(a.size),
               "--threads", str(a.threads), "--repeats", str(a.repeats)] + (["--small"] if a.small else [])
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(f"{arch:20s} failed: {res.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{arch:20s} {r['input']:5d} {r['params_m']:8.2f}M {r['ms_b1']:10.1f} {r['ms_b16']:11.1f} "
              f"{r['gradcam_ms']:12.1f} {r['peak_mib']:9.0f}  {r['device']} x{r['threads']}"
              + (f" | {PAPER[arch]}" if arch in PAPER else ""), flush=True)


if __name__ == "__main__":
    main()
