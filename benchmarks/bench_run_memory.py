"""The memory of a whole DreamBooth run, start to exit, stage by stage: `minidb train` as a user runs
it, against a diffusers train_dreambooth.py-style run, in the same invocation.

    python -m benchmarks.bench_run_memory --tag after --write     # SD v1 size, 256x256, fp32, CPU
    python -m benchmarks.bench_run_memory --minidb-root /tmp/before --configs default,low_memory,lora --tag before
    python -m benchmarks.bench_run_memory --before-root /tmp/head --configs diffusers,default,default@before --tag x

Each configuration is one fresh process, sampled from outside: its resident memory (VmRSS of
/proc/PID/status) every 0.2 s. The run: a random-weight SD v1 base (fp32 .safetensors, built once in
--work), 1 instance image and 1 class image generated from the base (prior preservation), 256x256,
fp32, the UNet and the text encoder trained, 3 steps, one validation image at the end, the export.
  default     minidb train --config run.toml
  low_memory  ... --set train.low_memory=true
  lora        ... --set model.lora_rank=4 --set model.lora_text_encoder=true  (bench_train.py's LoRA)
  resume      the default run's last checkpoint (resume@before: default@before's) resumed for a 4th step
  diffusers   train_dreambooth.py's order: class images from a pipeline it then deletes, the models
              from_pretrained, the step of benchmarks.bench_train (VAE-encoded every step), a validation
              image from a pipeline around the trained models, and the export it writes
              (DiffusionPipeline.from_pretrained(base, unet=..., text_encoder=...).save_pretrained)
              with the allocator setting of minidb's default (minidb.cli.keep_freed_memory())

A configuration named NAME@before runs NAME on the checkout --before-root (e.g. a worktree of HEAD),
so that old and new code run in the same invocation; the time of each step after the first (from
metrics.jsonl) is recorded, and the ratio of the medians printed, for step time.

Stages come from the run's own output and files: minidb's log lines ("loading ...", the "class
images" and "caching latents" progress bars, the line describing the run, "done: ..."), the step
times in metrics.jsonl and the times the validation grid and checkpoint were written; diffusers'
child prints a line as it enters each stage. Writes run_memory_<tag>.json and run_memory_<tag>.png
(memory against time, one line per configuration, each stage's start marked) to benchmarks/, and
with --write the per-stage table to RESULTS.md.
"""
import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "RESULTS.md"
CONFIGS = {
    "diffusers": None,
    "default": [],
    "low_memory": ["train.low_memory=true"],
    "lora": ["model.lora_rank=4", "model.lora_text_encoder=true"],
    # the default run's last checkpoint resumed for one more step (resume@before: default@before's, on the
    # code before), into a folder of its own: the resume is its own stage
    "resume": ["train.steps=4"],
}
STAGES = ["start", "load", "class images", "resume", "latent caching", "steps", "validation", "checkpoint", "export", "exit"]
SAMPLE_STEPS = 4  # class and validation images: the stage's memory does not depend on the step count
RES, STEPS = 256, 3
QUICK_RES = 32  # --quick: the tiny model, to check this script in seconds
PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"
GIB = 2 ** 30


def prepare(work: Path, quick: bool) -> Path:
    """work/base.safetensors (SD v1, random seeded weights, fp32), its diffusers folder, 1 instance image."""
    if (work / "diffusers" / "model_index.json").is_file():
        return work
    import numpy as np
    import torch
    from PIL import Image

    from benchmarks.bench_train import build
    from benchmarks.reference import diffusers_pipeline
    work.mkdir(parents=True, exist_ok=True)
    (work / "instance").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (RES, RES, 3), dtype=np.uint8)).save(work / "instance" / "0.png")
    sd = build(quick)
    sd.save(work / "base.safetensors", dtype=torch.float32)
    (work / "tokenizer").mkdir(exist_ok=True)
    diffusers_pipeline(sd, work / "tokenizer").save_pretrained(work / "diffusers")
    return work


def run_toml(work: Path, out: Path) -> Path:
    text = f"""[model]
base = "{work / 'base.safetensors'}"
precision = "fp32"
device = "cpu"
[data]
instance_dir = "{work / 'instance'}"
instance_prompt = "{PROMPT}"
resolution = {RES}
[prior]
class_prompt = "{CLASS_PROMPT}"
class_dir = "{out / 'class'}"
num_class_images = 1
sample_steps = {SAMPLE_STEPS}
batch_size = 1
[train]
output_dir = "{out / 'run'}"
steps = {STEPS}
[validation]
prompts = ["{PROMPT}"]
every = {STEPS}
sample_steps = {SAMPLE_STEPS}
"""
    path = out / "run.toml"
    path.write_text(text)
    return path


def rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def sample(cmd, env, cwd) -> tuple[list, list, float, float]:
    """Run cmd; return ([(time, rss)] every 0.2 s, [(time, output line)], start, end). Output lines
    are split on \\r too, so progress bars show when they start."""
    lines, start = [], time.time()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def read():
        buffer = b""
        while chunk := proc.stdout.read1(4096):
            buffer += chunk
            *done, buffer = re.split(rb"[\r\n]", buffer)
            now = time.time()
            lines.extend((now, d.decode(errors="replace")) for d in done if d.strip())
            for d in done:
                if d.strip():
                    print("   ", d.decode(errors="replace")[:150], file=sys.stderr, flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    samples = []
    while proc.poll() is None:
        samples.append((time.time(), rss(proc.pid)))
        time.sleep(0.2)
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed with exit status {proc.returncode}")
    return samples, lines, start, time.time()


def first(lines, pattern):
    return next((t for t, line in lines if re.search(pattern, line)), None)


def minidb_marks(lines, out: Path, start: float) -> dict:
    run = out / "run"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    grid = max((run / "samples").glob("*.png")).stat().st_mtime
    ckpt = max((run / "checkpoints").glob("*.pt")).stat().st_mtime
    return {"start": start, "load": first(lines, r"^loading "), "class images": first(lines, r"class images"),
            "resume": first(lines, r"^restoring the training state"), "latent caching": first(lines, r"caching latents"), "steps": first(lines, r"run folder"),
            "validation": steps[-1]["time"], "checkpoint": grid, "export": ckpt, "exit": first(lines, r"^done: ")}


def latest_checkpoint(out: Path) -> Path:
    found = sorted((out / "run" / "checkpoints").glob("step_*.pt"))
    if not found:
        raise SystemExit(f"resume: no checkpoint in {out / 'run' / 'checkpoints'}: run that configuration first")
    return found[-1]


def base_name(name: str) -> str:
    """"default@before" -> "default": the configuration, run on --before-root's code."""
    return name.partition("@")[0]


def step_seconds(out: Path) -> list:
    """The time of each step after the first: the gaps between metrics.jsonl's lines."""
    times = [json.loads(line)["time"] for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [b - a for a, b in zip(times, times[1:])]


def run_config(name: str, args, work: Path) -> dict:
    out = args.work / "runs" / name
    before, name = name.endswith("@before"), base_name(name)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    out.mkdir(parents=True)
    # unbuffered: a progress bar's first line (ended by \r) shows when its stage starts, not when its line ends
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    if CONFIGS[name] is None:
        env["PYTHONPATH"] = str(ROOT)
        cmd = [sys.executable, "-m", "benchmarks.bench_run_memory", "--_diffusers", str(out), "--work", str(work)]
        cmd += ["--quick"] if args.quick else []
    else:
        env["PYTHONPATH"] = str(Path(args.before_root if before else args.minidb_root).resolve())
        cmd = [sys.executable, "-m", "minidb", "train", "--config", str(run_toml(work, out))]
        for s in CONFIGS[name]:
            cmd += ["--set", s]
        if name == "resume":
            cmd += ["--resume", str(latest_checkpoint(args.work / "runs" / ("default@before" if before else "default")))]
    print(f"{name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    samples, lines, start, end = sample(cmd, env, out)
    if CONFIGS[name] is None:
        marks = {"start": start, **{m: t for t, line in lines
                                    if (m := line.removeprefix("STAGE ")) in STAGES and line.startswith("STAGE ")}}
    else:
        marks = minidb_marks(lines, out, start)
    marks = {k: v - start for k, v in marks.items() if v is not None}
    return {"config": name + ("@before" if before else ""), "command": " ".join(cmd[1:]),
            "root": env.get("PYTHONPATH"), "samples": [(t - start, r) for t, r in samples], "marks": marks,
            "total_s": end - start, "step_s": step_seconds(out) if CONFIGS[name] is not None else None}


def stage_peaks(r: dict) -> dict:
    """Each marked stage's peak RSS: from its mark to the next stage's (the last one: to the end)."""
    marks = sorted(r["marks"].items(), key=lambda kv: kv[1])
    peaks = {}
    for i, (stage, t0) in enumerate(marks):
        t1 = marks[i + 1][1] if i + 1 < len(marks) else float("inf")
        inside = [m for t, m in r["samples"] if t0 <= t < t1]
        if inside:
            peaks[stage] = max(inside)
    return peaks


# ---- the diffusers side: train_dreambooth.py's order, in this child process -----------------------

def diffusers_run(out: Path, work: Path):
    from minidb.cli import keep_freed_memory
    keep_freed_memory()  # minidb's default setting, on both sides

    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from benchmarks.bench_train import PROMPTS, diffusers_step_fn
    from minidb.config import SDConfig, tiny_config
    from minidb.schedule import NoiseSchedule
    from minidb.tokenizer import CLIPTokenizer

    def stage(name):
        print(f"STAGE {name}", flush=True)

    base = str(work / "diffusers")
    none = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    stage("class images")  # train_dreambooth.py: a pipeline for the missing class images, deleted after
    pipeline = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, **none)
    image = pipeline(CLASS_PROMPT, num_inference_steps=SAMPLE_STEPS, height=RES, width=RES).images[0]
    image.save(out / "class.png")
    del pipeline
    stage("load")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    config = tiny_config() if RES == QUICK_RES else SDConfig()
    step, _, _, _ = diffusers_step_fn(vae, text_encoder, unet, NoiseSchedule.from_config(config), config,
                                      CLIPTokenizer()(PROMPTS), torch.device("cpu"))
    stage("steps")
    for k in range(STEPS):
        step(k, RES)
    stage("validation")  # log_validation: a pipeline around the trained models
    pipeline = StableDiffusionPipeline.from_pretrained(base, unet=unet, text_encoder=text_encoder,
                                                       torch_dtype=torch.float32, **none)
    with torch.no_grad():
        pipeline(PROMPT, num_inference_steps=SAMPLE_STEPS, height=RES, width=RES)
    del pipeline
    stage("export")  # the end of train_dreambooth.py (its optimizer still alive)
    pipeline = StableDiffusionPipeline.from_pretrained(base, unet=unet, text_encoder=text_encoder, **none)
    pipeline.save_pretrained(out / "model")
    stage("exit")


# ---- the picture and the table --------------------------------------------------------------------

COLOURS = {"diffusers": (214, 39, 40), "default": (31, 119, 180), "low_memory": (44, 160, 44), "lora": (148, 103, 189)}
LETTERS = {"load": "L", "class images": "C", "resume": "R", "latent caching": "K", "steps": "S", "validation": "V",
           "checkpoint": "P", "export": "E", "exit": "X"}


def colour_of(config: str) -> tuple:
    """The configuration's colour; its @before run's paler."""
    colour = COLOURS.get(base_name(config), (0, 0, 0))
    return tuple((c + 2 * 255) // 3 for c in colour) if config.endswith("@before") else colour


def plot(results: list, path: Path, title: str):
    """Memory against time with PIL: one line per configuration, a lettered dot where each stage starts."""
    from PIL import Image, ImageDraw, ImageFont
    W, H, left, right, top, bottom = 1200, 640, 70, 20, 50, 90
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    t_max = max(r["total_s"] for r in results)
    m_max = max(m for r in results for _, m in r["samples"]) / GIB
    m_top = 2 * int(m_max / 2 + 1)
    x = lambda t: left + (W - left - right) * t / t_max  # noqa: E731
    y = lambda m: H - bottom - (H - top - bottom) * m / m_top  # noqa: E731
    for g in range(0, m_top + 1, 2):
        draw.line([(left, y(g)), (W - right, y(g))], fill=(225, 225, 225))
        draw.text((left - 40, y(g) - 6), f"{g} GiB", fill="black", font=font)
    step = 60 if t_max > 300 else 30
    for s in range(0, int(t_max) + 1, step):
        draw.line([(x(s), H - bottom), (x(s), H - bottom + 5)], fill="black")
        draw.text((x(s) - 10, H - bottom + 8), f"{s} s", fill="black", font=font)
    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    draw.text((left, 15), title, fill="black", font=font)
    for r in results:
        colour = colour_of(r["config"])
        points = [(x(t), y(m / GIB)) for t, m in r["samples"]]
        draw.line(points, fill=colour, width=2)
        placed = []  # letters already drawn: a mark close to one of them is lifted above it
        for stage, t in sorted(r["marks"].items(), key=lambda kv: kv[1]):
            if stage in LETTERS:
                m = next((mm for tt, mm in r["samples"] if tt >= t), r["samples"][-1][1]) / GIB
                draw.ellipse([x(t) - 3, y(m) - 3, x(t) + 3, y(m) + 3], fill=colour)
                ty = y(m) - 14
                while any(abs(px - x(t)) < 9 and abs(py - ty) < 11 for px, py in placed):
                    ty -= 11
                placed.append((x(t), ty))
                draw.text((x(t) + 3, ty), LETTERS[stage], fill=colour, font=font)
    legend_y = H - bottom + 30
    cursor = left
    for r in results:
        colour = colour_of(r["config"])
        draw.line([(cursor, legend_y + 6), (cursor + 25, legend_y + 6)], fill=colour, width=3)
        draw.text((cursor + 30, legend_y), f"{r['config']} (peak {max(m for _, m in r['samples']) / GIB:.2f} GiB)",
                  fill="black", font=font)
        cursor += 230
    draw.text((left, legend_y + 22), "stage starts: " + ", ".join(f"{v} {k}" for k, v in LETTERS.items())
              + "; resident memory of the whole process, sampled every 0.2 s", fill="black", font=font)
    image.save(path)


def title(tag: str) -> str:
    return f"minidb train vs diffusers, whole run, SD v1, {RES}x{RES}, fp32, 1+1 images, {STEPS} steps ({tag})"


def table(results: list, tag: str) -> str:
    diff = next((r for r in results if r["config"] == "diffusers"), None)
    diff_peak = max(m for _, m in diff["samples"]) if diff else None
    shown = [s for s in STAGES if any(s in r["marks"] for r in results)]
    lines = [f"| configuration ({tag}) | " + " | ".join(shown) + " | whole run | x diffusers' run | wall time |",
             "|---" * (len(shown) + 4) + "|"]
    for r in results:
        peaks = stage_peaks(r)
        peak = max(m for _, m in r["samples"])
        cells = [f"{peaks[s] / GIB:.2f}" if s in peaks else "-" for s in shown]
        ratio = f"**{peak / diff_peak:.2f}**" if diff_peak else "-"
        lines.append(f"| {r['config']} | " + " | ".join(cells) + f" | **{peak / GIB:.2f}** | {ratio} | {r['total_s']:.0f} s |")
    return "\n".join(lines) + "\n"


TARGETS = {"default": 0.90, "low_memory": 0.45, "lora": 0.35}  # issue #31: the whole run's peak, x diffusers' run


def combined_table(tags: list) -> str:
    """One table from run_memory_<tag>.json of every tag: each configuration's rows side by side, ratios to
    the diffusers run of the last tag that has one, against the issue's targets."""
    runs = [(tag, r) for tag in tags for r in json.loads((HERE / f"run_memory_{tag}.json").read_text())]
    diff = next((r for tag, r in reversed(runs) if r["config"] == "diffusers"), None)
    diff_peak = max(m for _, m in diff["samples"]) if diff else None
    shown = [s for s in STAGES if any(s in stage_peaks(r) for _, r in runs)]  # a stage no run saw apart: left out
    lines = ["| configuration | run | " + " | ".join(shown) + " | whole run | x diffusers' run | target | wall time |",
             "|---" * (len(shown) + 6) + "|"]
    for name in CONFIGS:
        for tag, r in runs:
            if base_name(r["config"]) != name:
                continue
            peaks, peak = stage_peaks(r), max(m for _, m in r["samples"])
            cells = [f"{peaks[s] / GIB:.2f}" if s in peaks else "-" for s in shown]
            ratio = peak / diff_peak if diff_peak else None
            target = TARGETS.get(name)
            verdict = ("-" if target is None or ratio is None else
                       f"<= {target:.2f}x: {'reached' if round(ratio, 2) <= target else 'NOT reached'}")
            lines.append(f"| {r['config']} | {tag} | " + " | ".join(cells) + f" | **{peak / GIB:.2f}** | "
                         + (f"**{ratio:.2f}**" if ratio else "-") + f" | {verdict} | {r['total_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def step_time_ratios(results: list) -> str:
    """Median step time (the steps after the first) of each minidb run, and new / @before where both ran."""
    import statistics
    median = {r["config"]: statistics.median(r["step_s"]) for r in results if r.get("step_s")}
    lines = [f"- {c}: median step {m:.1f} s" + (f", {m / median[c + '@before']:.2f}x the @before code's"
                                                if c + "@before" in median else "") for c, m in median.items()]
    return "\nStep time (each step after the first, from metrics.jsonl):\n" + "\n".join(lines) + "\n" if lines else ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of: {', '.join(CONFIGS)}")
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_run_memory"),
                   help="the base checkpoint, its diffusers folder and the run folders (about 9 GB)")
    p.add_argument("--minidb-root", default=str(ROOT), help="the checkout whose minidb runs (e.g. a worktree of HEAD)")
    p.add_argument("--before-root", default=None, help="the checkout a configuration NAME@before runs (e.g. a worktree of HEAD)")
    p.add_argument("--tag", default="after",
                   help="names the output files: run_memory_<tag>.json/.png (merged with the configurations already there)")
    p.add_argument("--write", action="store_true", help=f"append the table to {RESULTS.name}")
    p.add_argument("--quick", action="store_true", help="the tiny model at 32x32 (checks the script; --work apart)")
    p.add_argument("--fresh", action="store_true",
                   help="drop the tag's earlier configurations (default: keep them, replacing only those run now)")
    p.add_argument("--_diffusers", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--redraw", action="store_true", help="only redraw run_memory_<tag>.png from its JSON")
    p.add_argument("--table", default=None, help="only print one table of these tags' JSON (e.g. before,after)")
    args = p.parse_args(argv)
    global RES
    RES = QUICK_RES if args.quick else RES
    if args.table:
        return print(combined_table(args.table.split(",")))
    if args.redraw:
        return plot(json.loads((HERE / f"run_memory_{args.tag}.json").read_text()), HERE / f"run_memory_{args.tag}.png",
                    title(args.tag))
    if args._diffusers is not None:
        return diffusers_run(args._diffusers, args.work)
    names = args.configs.split(",")
    unknown = [n for n in names if base_name(n) not in CONFIGS or (n != base_name(n) and (
        not n.endswith("@before") or CONFIGS[base_name(n)] is None or args.before_root is None))]
    if unknown:
        p.error(f"unknown configuration(s) {unknown}: choose from {', '.join(CONFIGS)} (NAME@before: minidb's, "
                "with --before-root)")
    work = prepare(args.work, args.quick)
    # the tag's earlier configurations are kept: a run of some configurations replaces their rows only,
    # and the JSON, plot and table hold every configuration measured under the tag (in CONFIGS' order)
    saved = HERE / f"run_memory_{args.tag}.json"
    results = json.loads(saved.read_text()) if saved.is_file() and not args.fresh else []
    for name in names:
        r = run_config(name, args, work)
        results = sorted([x for x in results if x["config"] != name] + [r],
                         key=lambda x: (list(CONFIGS).index(base_name(x["config"])), x["config"]))
        print(f"{name}: peak {max(m for _, m in r['samples']) / GIB:.2f} GiB, {r['total_s']:.0f} s, "
              f"stages {json.dumps({k: round(v / GIB, 2) for k, v in stage_peaks(r).items()})}", flush=True)
        saved.write_text(json.dumps(results))
        plot(results, HERE / f"run_memory_{args.tag}.png", title(args.tag))  # after each configuration: a long run shows as it goes
    from benchmarks.bench_vs_diffusers import machine
    text = (f"`python -m benchmarks.bench_run_memory {' '.join(argv if argv is not None else sys.argv[1:])}`  \n"
            f"Machine: {machine('cpu')}; {datetime.date.today()}; peak resident memory (VmRSS) of the whole process "
            "in GiB, per stage (from the stage's start to the next one's)\n\n" + table(results, args.tag))
    text += step_time_ratios(results)
    print("\n" + text)
    if args.write:
        with open(RESULTS, "a") as f:
            f.write("\n" + text)
    return results


if __name__ == "__main__":
    main()
