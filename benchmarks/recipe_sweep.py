"""Pretraining recipes for the world model side by side (issue #27's lever table): each variant is a
`python -m minidb.world.pretrain` process of its own, all at once on one machine, until they finish or
a deadline; then `minidb eval` on each finished model.

    python -m benchmarks.recipe_sweep --out /tmp/sweep --device cuda --deadline 480
    python -m benchmarks.recipe_sweep --out /tmp/sweep --variants u11,b11 --smoke   # a minute on a CPU

A variant differs from the recipe's defaults by its flags only (VARIANTS). Every variant continues
nothing: stage 2 from scratch, on the shipped VAE (--vae-from), so that the sweep compares the
UNet's recipe and not the VAE's. Its learning curve (`--curve-every`: tuning prompts, never the
evaluation's) is read from metrics.jsonl, so a run stopped at the deadline still says how far it got.
The data and noise are drawn on the CPU, so a variant is the same run on a GPU as on the 2-core
machine, up to rounding; the minutes it would take there are not measured here.
Writes OUT/summary.json and OUT/NAME_metrics.jsonl.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from minidb.files import atomic_write_text

BAND = ["--t-sampling", "logsnr", "--t-mean", "-1", "--t-std", "2", "--t-uniform", "0.3"]
VARIANTS = {
    # every timestep setting spelled out: the recipe's defaults may move
    "u11": ["--unet-steps", "11000", "--t-sampling", "uniform"],            # R7's UNet recipe
    "b11": ["--unet-steps", "11000", *BAND, "--t-sampling-from", "5500"],  # R8: the band once position is learned
    "u18": ["--unet-steps", "18000", "--t-sampling", "uniform"],
    "b18": ["--unet-steps", "18000", *BAND, "--t-sampling-from", "6000"],
    "b18z": ["--unet-steps", "18000", *BAND, "--t-sampling-from", "0"],    # the band from the first step
}
SHIPPED = "minidb/data/world.safetensors"


def curve(metrics: Path) -> list:
    """[{step, shape, class_shape, all, ...}] of the run's learning-curve points, and its last step."""
    points, last, t0 = [], 0, None
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the deadline's kill
                continue
            if r.get("stage") != "unet":
                continue
            t0 = t0 or r["time"]
            last = max(last, r["step"])
            if "curve" in r:
                points.append({"step": r["step"], "minutes": round((r["time"] - t0) / 60, 2), **r["curve"]})
    return points, last


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--deadline", type=float, default=480, help="seconds before the runs still going are stopped")
    p.add_argument("--threads", type=int, default=2, help="torch threads per run")
    p.add_argument("--curve-every", type=int, default=2000)
    p.add_argument("--smoke", action="store_true", help="every variant 4 steps on 64 images (checks the wiring)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    runs = {}
    for name in names:
        flags = list(VARIANTS[name])
        common = ["--vae-from", SHIPPED, "--device", args.device, "--threads", str(args.threads),
                  "--curve-every", str(args.curve_every), "--sample-every", "1000000", "--checkpoint-every", "1000"]
        if args.smoke:
            flags = [f if flags[i - 1] != "--unet-steps" else "4" for i, f in enumerate(flags)]
            flags = [f if flags[i - 1] != "--t-sampling-from" else "2" for i, f in enumerate(flags)]
            common += ["--pool", "64", "--curve-every", "4"]
        log = open(out / f"{name}.log", "w")
        cmd = [sys.executable, "-m", "minidb.world.pretrain", "--out", str(out / name), *common, *flags]
        runs[name] = {"proc": subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), "cmd": cmd,
                      "eval": None}
    summary = {}
    def busy(r, late):
        if r["proc"].poll() is None:
            return True
        if r["eval"] is None:  # an eval still to start
            return r["proc"].returncode == 0 and not late
        return r["eval"].poll() is None

    while any(busy(r, time.time() - t0 > args.deadline) for r in runs.values()):
        late = time.time() - t0 > args.deadline
        for name, r in runs.items():
            if r["proc"].poll() is None and late:
                r["proc"].terminate()
                r["proc"].wait()
            if r["proc"].poll() == 0 and r["eval"] is None and not late:
                r["eval"] = subprocess.Popen(
                    [sys.executable, "-m", "minidb", "eval", "--model", str(out / name / "model.safetensors"),
                     "--device", args.device, "--out", str(out / name / "eval.json"),
                     *(["--images", "4", "--per-shape", "1"] if args.smoke else [])],
                    stdout=open(out / f"{name}_eval.log", "w"), stderr=subprocess.STDOUT, env=env)
            if r["eval"] and r["eval"].poll() is None and time.time() - t0 > args.deadline + 90:
                r["eval"].terminate()
        time.sleep(2)
    for name, r in runs.items():
        points, last = curve(out / name / "metrics.jsonl")
        evaluated = out / name / "eval.json"
        summary[name] = {"flags": VARIANTS[name], "returncode": r["proc"].returncode, "last_step": last,
                         "curve": points,
                         "eval": json.loads(evaluated.read_text())["rows"][0] if evaluated.is_file() else None}
        if (out / name / "metrics.jsonl").is_file():
            atomic_write_text(out / f"{name}_metrics.jsonl", (out / name / "metrics.jsonl").read_text())
    summary["_seconds"] = round(time.time() - t0, 1)
    summary["_device"] = args.device
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    for name in names:
        s = summary[name]
        e = s["eval"]["fidelity"] if s["eval"] else {}
        print(f"{name}: rc {s['returncode']}, step {s['last_step']}, curve "
              + " ".join(f"{c['step']}:{c['shape']:.2f}/{c['class_shape']:.2f}" for c in s["curve"])
              + (f", eval shape {e.get('shape')}, class {e.get('class_shape')}, all {e.get('all')}" if e else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
