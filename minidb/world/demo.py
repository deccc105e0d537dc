"""`minidb demo`: DreamBooth on the miniature world, end to end, in minutes on a CPU.

The subject is a red-and-yellow two-tone star (minidb/data/demo_subject/, five renders in
different places and on different backgrounds, each with a caption file in the world's words:
"a photo of a large sks star on a blue background, top left"). The shipped world model has never
seen a two-tone shape, so no prompt makes it draw this one. The demo runs the ordinary `minidb
train` on minidb/data/demo.toml (the captions, prior preservation with "a photo of a star"),
then samples the subject in new contexts before and after, and measures it as the paper does
(Ruiz et al. 2022, section 4.1, on the world's embedding, see minidb.world.metrics.subject_metrics):

    subject fidelity   mean cosine similarity of subject samples to the real subject images
    prompt fidelity    share of the subject prompts' background / position / size that are right
    PRES               similarity of plain "a photo of a star" samples to the subject (lower: the class
                       has not collapsed onto the subject)
    DIV                mean pairwise distance between samples of the same prompt
    subject shape      share of subject samples the reader reads as a two-tone star: the subject's form
                       and colors, not its colors alone (the base model: its share of stars with the
                       class noun in the same prompts)
    class stars        share of "a photo of a star" samples read as a star (64 per model by default):
                       what prior preservation keeps

    minidb demo                        # writes demo/before_after.png, demo/metrics.json
    minidb demo --ablation --seeds 3   # with and without prior preservation, 3 seeds each
"""
import json
import time
from pathlib import Path

import numpy as np

from minidb.world import Attributes, caption, render
from minidb.files import atomic_write, atomic_write_text

DATA = Path(__file__).parent.parent / "data"
DEMO_TOML = DATA / "demo.toml"
SUBJECT_DIR = DATA / "demo_subject"
SUBJECT = dict(shape="star", color="red", pattern="two-tone", color2="yellow")
# where the five instance images put the subject (size, position, background)
INSTANCES = [("large", "top left", "blue"), ("large", "bottom right", "white"), ("large", "center", "gray"),
             ("large", "top right", "green"), ("small", "bottom left", "black")]
# new contexts for the subject: combinations no instance image shows
CONTEXTS = [("large", "bottom right", "green"), ("large", "center", "black"), ("large", "top left", "white"),
            ("large", "center", "yellow"), ("large", "top right", "gray"), ("large", "bottom left", "blue")]
CLASS_PROMPTS = ["a photo of a star", "a photo of a red star on a white background"]
KEEP = ("shape", "size", "position", "background")


def subject_images() -> list:
    """The instance images, rendered (the files in demo_subject/ are exactly these)."""
    return [render(Attributes(size=z, position=p, background=b, **SUBJECT), seed=100 + i)
            for i, (z, p, b) in enumerate(INSTANCES)]


def subject_captions() -> list[str]:
    """Each instance image's caption, in the world's own words: "a photo of a large sks star on a
    blue background, top left" (shipped as sks_star_N.txt beside sks_star_N.png)."""
    return [caption(Attributes(size=z, position=p, background=b, **SUBJECT), KEEP, subject="sks")
            for z, p, b in INSTANCES]


def subject_prompts() -> list[tuple[Attributes, tuple]]:
    return [(Attributes(size=z, position=p, background=b, **SUBJECT), KEEP) for z, p, b in CONTEXTS]


def sample_all(sd, samples: int, steps: int, guidance: float, seed: int = 0):
    """{(attrs, keep): images} for the subject prompts and {prompt: images} for the class prompts."""
    size = sd.config.image_size
    subject = {}
    for a, keep in subject_prompts():
        text = caption(a, keep, subject="sks")
        subject[(a, keep)] = sd.generate([text] * samples, steps=steps, guidance=guidance, height=size, width=size,
                                         seed=seed, progress=False)
    classes = {p: sd.generate([p] * samples, steps=steps, guidance=guidance, height=size, width=size, seed=seed,
                              progress=False) for p in CLASS_PROMPTS}
    return subject, classes


def class_fidelity(sd, reader, samples, steps, guidance, seed=0) -> tuple[float, float]:
    """The base model on the subject prompts with the class noun instead of the identifier: its
    prompt fidelity (background, position, size), the bar the subject prompts are held to, and
    its share of samples read as the subject's shape."""
    checks, shapes = [], []
    size = sd.config.image_size
    for a, keep in subject_prompts():
        images = sd.generate([caption(Attributes(a.shape, "red", a.size, a.position, a.background), keep)] * samples,
                             steps=steps, guidance=guidance, height=size, width=size, seed=seed, progress=False)
        for r in reader.read_all(images):
            checks.append(np.mean([r[n] == getattr(a, n) for n in ("background", "position", "size")]))
            shapes.append(r["shape"] == a.shape)
    return float(np.mean(checks)), float(np.mean(shapes))


def class_stars(sd, reader, samples, steps, guidance, seed) -> float:
    """Share of "a photo of a star" samples (seeds seed..seed + samples - 1) read as a star."""
    size = sd.config.image_size
    images = []
    for start in range(0, samples, 32):  # batches of 32 keep the sampler's memory small
        count = min(32, samples - start)
        images += sd.generate([CLASS_PROMPTS[0]] * count, steps=steps, guidance=guidance, height=size, width=size,
                              seed=[seed + start + i for i in range(count)], progress=False)
    return read_share(reader, images, shape=SUBJECT["shape"])


def read_share(reader, images, **wanted) -> float:
    """Share of images whose reads match every one of `wanted` (shape="star", pattern="two-tone")."""
    return float(np.mean([all(r[k] == v for k, v in wanted.items()) for r in reader.read_all(list(images))]))


def before_after(base_samples, tuned_samples, path: Path, columns: int = 3, scale: int = 4) -> Path:
    """One row per prompt: `columns` base images, a gap, `columns` fine-tuned images, each shown
    `scale` times its size (nearest neighbour: a 64x64 sample is a thumbnail on a screen)."""
    from PIL import Image, ImageDraw
    rows = list(base_samples)
    columns = min(columns, *(len(v) for v in base_samples.values()))
    w = h = base_samples[rows[0]][0].size[0] * scale
    base_samples = {k: [im.resize((w, h), Image.NEAREST) for im in v[:columns]] for k, v in base_samples.items()}
    tuned_samples = {k: [im.resize((w, h), Image.NEAREST) for im in v[:columns]] for k, v in tuned_samples.items()}
    label = 360
    grid = Image.new("RGB", (label + w * (2 * columns) + 16, 20 + h * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label, 4), "before (base model)", fill="black")
    draw.text((label + w * columns + 16, 4), "after (DreamBooth)", fill="black")
    for i, key in enumerate(rows):
        text = caption(key[0], key[1], subject="sks") if isinstance(key, tuple) else key
        draw.text((4, 20 + i * h + h // 2 - 6), text, fill="black")
        for j in range(columns):
            grid.paste(base_samples[key][j], (label + j * w, 20 + i * h))
            grid.paste(tuned_samples[key][j], (label + (columns + j) * w + 16, 20 + i * h))
    with atomic_write(path) as tmp:
        grid.save(tmp, format="PNG")
    return path


def run_demo(out="demo", prior: bool = True, seed: int = 0, overrides=(), samples: int = 8, eval_steps: int = 20,
             guidance: float | None = None, grid: bool = True, progress: bool = True, eval_seed: int = 1000,
             star_samples: int = 64) -> dict:
    """Train per demo.toml into out/run (out/run-noprior without prior preservation), then
    measure base and fine-tuned models; returns {"base": metrics, "dreambooth": metrics, ...}.
    samples: images per prompt for the subject metrics; star_samples: "a photo of a star" images
    per model for the class-star share (a share of 8 moves in steps of 12.5%)."""
    from minidb.world.metrics import subject_metrics
    from minidb.world.reader import Reader
    from minidb.pipeline import StableDiffusion
    from minidb.dreambooth.train import train
    from minidb.dreambooth.train_config import load_config, resolved
    out = Path(out)
    t0 = time.perf_counter()
    run = out / (f"run-seed{seed}" if seed else "run") if prior else out / f"run-noprior-seed{seed}"
    sets = [f"train.output_dir={run}", f"train.seed={seed}"] + ([] if prior else ['prior.class_prompt=""'])
    cfg = load_config(DEMO_TOML, sets + list(overrides))
    result = train(cfg)
    if result.interrupted:  # the command line says "interrupted" and exits 130
        raise KeyboardInterrupt
    reader = Reader.load()
    real = subject_images()
    base = StableDiffusion.from_checkpoint(resolved(cfg).model.base)
    if result.model_path is not None:
        tuned = StableDiffusion.from_checkpoint(result.model_path)
    else:  # a LoRA run without lora_merge_export: the base with its lora.safetensors applied
        tuned = StableDiffusion.from_checkpoint(resolved(cfg).model.base)
        tuned.load_lora(result.lora_path)
    base_s, base_c = sample_all(base, samples, eval_steps, guidance, seed=eval_seed)
    tuned_s, tuned_c = sample_all(tuned, samples, eval_steps, guidance, seed=eval_seed)
    class_prompt_fidelity, class_noun_stars = class_fidelity(base, reader, samples, eval_steps, guidance,
                                                             seed=eval_seed)

    def subject_shape(subject):
        return read_share(reader, [im for v in subject.values() for im in v], shape=SUBJECT["shape"],
                          pattern=SUBJECT["pattern"])
    metrics = {"base": subject_metrics(reader, real, base_s, base_c),
               "dreambooth": subject_metrics(reader, real, tuned_s, tuned_c),
               "base_class_prompt_fidelity": class_prompt_fidelity,
               "subject_shape": {"base": subject_shape(base_s), "dreambooth": subject_shape(tuned_s),
                                 "base_with_class_noun": class_noun_stars},
               "class_stars": {"base": class_stars(base, reader, star_samples, eval_steps, guidance, eval_seed),
                               "dreambooth": class_stars(tuned, reader, star_samples, eval_steps, guidance, eval_seed)},
               "class_star_samples": star_samples,
               "prior_preservation": prior, "seed": seed, "steps": cfg.train.steps,
               "seconds": round(time.perf_counter() - t0, 1)}
    if grid:
        both = ({**base_s, **base_c}, {**tuned_s, **tuned_c})
        metrics["grid"] = str(before_after(*both, out / "before_after.png"))
        before_after(*both, out / "before_after_1x.png", scale=1)  # the samples as they are
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1))
    return metrics


def format_metrics(m: dict) -> str:
    lines = ["| model | subject fidelity | prompt fidelity | PRES | DIV |", "|---|---|---|---|---|"]
    for name in ("base", "dreambooth"):
        r = m[name]
        lines.append(f"| {name} | {r['subject_fidelity']:.3f} | {100 * r['prompt_fidelity']:.1f}% | "
                     f"{r['pres']:.3f} | {r['div']:.3f} |")
    lines.append(f"\nbase model's prompt fidelity on the same prompts with the class noun: "
                 f"{100 * m['base_class_prompt_fidelity']:.1f}%")
    shape, stars = m["subject_shape"], m["class_stars"]
    lines.append(f"subject samples read as a two-tone star: {100 * shape['base']:.1f}% (base) -> "
                 f"{100 * shape['dreambooth']:.1f}% (DreamBooth); the base model draws a star with the class noun "
                 f"{100 * shape['base_with_class_noun']:.1f}% of the time")
    lines.append(f'"{CLASS_PROMPTS[0]}" read as a star: {100 * stars["base"]:.1f}% (base) -> '
                 f'{100 * stars["dreambooth"]:.1f}% (DreamBooth), {m["class_star_samples"]} samples each')
    return "\n".join(lines)


def ablation(out="demo/ablation", seeds: int = 3, **kwargs) -> str:
    """With and without prior preservation, `seeds` seeds each: mean +- std of every metric."""
    rows = {True: [], False: []}
    for prior in (True, False):
        for seed in range(seeds):
            rows[prior].append(run_demo(out, prior=prior, seed=seed, grid=False, **kwargs))
    keys = ["subject_fidelity", "prompt_fidelity", "pres", "div", "subject_shape", "class_stars"]

    def values(r, model):
        return {**r[model], "subject_shape": r["subject_shape"][model], "class_stars": r["class_stars"][model]}
    lines = ["| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    base = values(rows[True][0], "base")
    lines.append("| base model | " + " | ".join(f"{base[k]:.3f}" for k in keys) + " |")
    for prior in (True, False):
        vals = {k: [values(r, "dreambooth")[k] for r in rows[prior]] for k in keys}
        name = "with prior preservation" if prior else "without prior preservation"
        lines.append(f"| {name} | " + " | ".join(f"{np.mean(v):.3f} ± {np.std(v):.3f}" for v in vals.values()) + " |")
    table = "\n".join(lines)
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out) / "ablation.json", json.dumps({str(k): v for k, v in rows.items()}, indent=1))
    atomic_write_text(Path(out) / "ablation.md", table + "\n")
    return table
