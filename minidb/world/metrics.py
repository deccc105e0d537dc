"""What the reader's readings of generated images add up to (minidb.world.reader reads them).

    prompt_fidelity(reader.read_all(images), attributes)   # share of images right, per attribute
    confusions(reads, attributes, "position")               # which value is drawn for which
    evaluate_model(sd, n=200)                               # that, on held-out prompts: `minidb eval`
    subject_metrics(reader, photos, subject_samples, class_samples)   # DreamBooth's four, for `minidb demo`
"""
import numpy as np
import torch

from minidb.world.reader import Reader
from minidb.world import ATTRIBUTES, SHAPES, Attributes, caption, combinations, world_seed


def prompt_fidelity(reads: list[dict], wanted: list[Attributes], keep=ATTRIBUTES) -> dict:
    """Share of images whose read attribute equals the prompt's, for each attribute in keep,
    and "all" for images right in every one of them."""
    result = {name: float(np.mean([r[name] == getattr(a, name) for r, a in zip(reads, wanted)])) for name in keep}
    result["all"] = float(np.mean([all(r[n] == getattr(a, n) for n in keep) for r, a in zip(reads, wanted)]))
    return result


def confusions(reads: list[dict], wanted: list[Attributes], name: str) -> dict:
    """{(asked, read): count} for one attribute: which values the model draws for which (read None:
    the reader found no shape)."""
    counts: dict = {}
    for r, a in zip(reads, wanted):
        key = (getattr(a, name), r[name])
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: tuple(str(v) for v in kv[0])))


# ---- evaluating a model --------------------------------------------------------------------------

def held_out_prompts(n: int, seed: int = 0) -> list[Attributes]:
    """n combinations never drawn in pretraining (cycling through them in a seeded order)."""
    held = combinations(held=True)
    order = np.random.default_rng(world_seed("eval-order", seed)).permutation(len(held))
    return [held[order[i % len(held)]] for i in range(n)]


def class_prompts(per_shape: int) -> tuple[list[str], list[str]]:
    """("a photo of a star", ...) per_shape times for each shape, and the shape each one names."""
    shapes = [s for s in SHAPES for _ in range(per_shape)]
    return [caption(Attributes(s, "red"), keep=("shape",)) for s in shapes], shapes


def evaluate_model(sd, n: int = 200, steps: int = 20, guidance: float | None = None, seed: int = 0, reader=None,
                   batch: int = 50, progress: bool = True, per_shape: int = 0) -> dict:
    """Prompt fidelity of `sd` on n held-out full captions (image i: seed + i) and, with
    per_shape, the share of class-only prompts ("a photo of a star") read as the named shape
    ("class_shape"; image j of those: seed + n + j). guidance None: the model's own (config.guidance)."""
    from tqdm.auto import tqdm
    guidance = sd.config.guidance_or(guidance)
    reader = reader or Reader.load()
    wanted = held_out_prompts(n, seed)
    classes, shapes = class_prompts(per_shape)
    prompts = [caption(a) for a in wanted] + classes
    images = []
    size = sd.config.image_size
    for s in tqdm(range(0, len(prompts), batch), desc=f"sampling (guidance {guidance:g})", disable=not progress,
                  leave=False):
        images += sd.generate(prompts[s:s + batch], steps=steps, guidance=guidance, height=size, width=size,
                              seed=seed + s, progress=False)
    reads = reader.read_all(images)
    fidelity = prompt_fidelity(reads[:n], wanted)
    if per_shape:
        fidelity["class_shape"] = float(np.mean([r["shape"] == s for r, s in zip(reads[n:], shapes)]))
    return {"fidelity": fidelity, "images": images[:n], "prompts": prompts[:n], "class_images": images[n:],
            "reads": reads[:n]}


def format_table(rows: dict) -> str:
    cols = list(ATTRIBUTES) + ["all"] + (["class_shape"] if any("class_shape" in f for f in rows.values()) else [])
    head = [c if c != "class_shape" else "class prompts: shape" for c in cols]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(cols)]
    for name, f in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * f[c]:.1f}%" if c in f else "" for c in cols) + " |")
    return "\n".join(lines)


# ---- DreamBooth's metrics (Ruiz et al. 2022, section 4.1), on the reader's embedding ------------

def mean_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of rows of a and b (unit vectors)."""
    return float((a @ b.T).mean())


def diversity(groups: list[torch.Tensor]) -> float:
    """DIV: mean pairwise embedding distance (1 - cosine) between samples of the same prompt,
    averaged over prompts: the analog of the paper's LPIPS diversity."""
    values = []
    for e in groups:
        n = len(e)
        if n > 1:
            sim = e @ e.T
            values.append(float((1 - sim)[~torch.eye(n, dtype=torch.bool)].mean()))
    return float(np.mean(values))


def subject_metrics(reader: Reader, subject_images, subject_samples: dict, class_samples: dict) -> dict:
    """subject_samples {Attributes of the prompt: [images]} (prompts with the identifier),
    class_samples {prompt: [images]} (the plain class prompt(s)). Returns
    subject_fidelity (DINO / CLIP-I analog), prompt_fidelity (the context attributes of the subject
    prompts, CLIP-T analog), pres (class samples vs the subject: lower = less collapse), div."""
    real = reader.embed(list(subject_images))
    groups = [reader.embed(images) for images in subject_samples.values()]
    generated = torch.cat(groups)
    reads, wanted, keys = [], [], []
    for (a, keep), images in subject_samples.items():
        reads += reader.read_all(images)
        wanted += [a] * len(images)
        keys.append(keep)
    context = [n for n in ("background", "position", "size") if any(n in k for k in keys)]
    checks = [[r[n] == getattr(a, n) for n in context if n in k] for r, a, k in
              zip(reads, wanted, [k for (a, k), ims in subject_samples.items() for _ in ims])]
    class_embeddings = reader.embed([im for images in class_samples.values() for im in images])
    return {"subject_fidelity": mean_similarity(generated, real),
            "prompt_fidelity": float(np.mean([np.mean(c) for c in checks])),
            "pres": mean_similarity(class_embeddings, real),
            "div": diversity(groups)}
