"""See inside one sample: the denoising trajectory, where each word looks, and what guidance adds.

    sd = StableDiffusion.from_checkpoint(WORLD)
    ex = explain(sd, "a photo of a red star on a blue background, top left", seed=0)
    sheet(ex).save("sheet.png");  json.dumps(ex.summary())
    minidb explain --prompt "a photo of a red star" --compare demo/run/model.safetensors

Nothing in the models changes. The sample is sample_latents' own, while two sets of hooks listen:
- on the UNet: its input and output at every call, from which the predicted clean image
  x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) is decoded (the trajectory), and the conditional and
  unconditional halves of the guided batch are kept apart (the guidance);
- on every cross-attention (attn2), through minidb.attention.record_attention: the softmax weights
  of each image position over the 77 text tokens.

Heat maps follow DAAM (Tang et al. 2022, arXiv 2210.04885, and github.com/castorini/daam): the
conditional half only, averaged over heads and UNet calls; each layer's map upsampled bicubically
to the image and clamped at 0, then averaged over layers; a word's map is the mean of its BPE
tokens' maps. To segment, a map is scaled to [0, 1] by its minimum and maximum and thresholded
above TAU (DAAM's own default: daam/utils.py expand_image without `absolute`, tau 0.4).
The start token, end token and padding are left out of the word maps: the start token draws
most of the attention of every position (an "attention sink") and would drown the words.
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from minidb.attention import RETURNS_PROBABILITIES, record_attention
from minidb.errors import MinidbError

WORLD = Path(__file__).parent / "data" / "world.safetensors"
TAU = 0.4  # DAAM's threshold on the map scaled to [0, 1]


@dataclass
class Word:
    text: str
    positions: list[int]  # its BPE tokens' positions in the 77-token context (BOS is position 0)


def words_of(tokenizer, prompt: str) -> list[Word]:
    """The prompt's BPE tokens grouped back into words: a token ending in "</w>" ends a word.
    Punctuation is a word of its own, as CLIP's tokenizer splits it off."""
    ids = tokenizer.encode(prompt)[1:-1]
    words, current = [], []
    for position, i in enumerate(ids, start=1):
        current.append(position)
        piece = tokenizer._tok.id_to_token(i)
        if piece.endswith("</w>"):
            words.append(Word(tokenizer.decode([ids[p - 1] for p in current]), current))
            current = []
    if current:
        words.append(Word(tokenizer.decode([ids[p - 1] for p in current]), current))
    return words


def level_of(name: str, n: int, latent: tuple[int, int]) -> str:
    """"down 16x16" for a layer in input_blocks whose n queries are a 16x16 map."""
    part = {"input_blocks": "down", "middle_block": "middle", "output_blocks": "up"}[name.split(".")[0]]
    factor = round(math.sqrt(latent[0] * latent[1] / n))
    return f"{part} {latent[0] // factor}x{latent[1] // factor}"


def threshold(heat: torch.Tensor, tau: float = TAU) -> torch.Tensor:
    """DAAM's segmentation of a heat map [..., H, W]: the map scaled to [0, 1] by its own minimum
    and maximum, then the pixels above tau. (Without the minimum, a word that draws a little
    attention everywhere would segment the whole image.)"""
    low, high = heat.flatten(-2).amin(-1)[..., None, None], heat.flatten(-2).amax(-1)[..., None, None]
    return (heat - low) / (high - low + 1e-8) > tau


@dataclass
class Explanation:
    prompt: str
    settings: dict                 # seed, steps, scale, sampler, model
    image: Image.Image             # the sample, as generate() draws it
    timesteps: list[int]           # per UNet call
    noise: list[float]             # sqrt(1 - a_t) per UNet call: the share of noise in x_t's amplitude
    x0: dict[int, Image.Image]     # UNet call -> its predicted clean image, decoded (the calls shown)
    words: list[Word]
    levels: dict[str, torch.Tensor]  # level -> [words, h, w]: attention probability, at the level's size
    heat: torch.Tensor             # [words, H, W] DAAM's aggregate at image size
    special_share: dict[str, float]  # mean attention probability on BOS, on EOS + padding
    guidance: list[dict] = field(default_factory=list)  # {call, t, cond, uncond, delta [H, W], guided}
    probabilities: str = ""        # how the attention weights were obtained
    seconds: float = 0.0

    def summary(self) -> dict:
        """Everything but the pictures, for JSON: per word its mean probability per level and its
        DAAM map at image size; per UNet call its timestep and noise level."""
        return {
            "prompt": self.prompt, **self.settings, "seconds": round(self.seconds, 2),
            "attention_probabilities": self.probabilities,
            "left_out": "start token (BOS), end token (EOS) and the EOS padding after it",
            "special_tokens_share": {k: round(v, 4) for k, v in self.special_share.items()},
            "steps_taken": [{"call": i, "timestep": t, "noise_level": round(s, 4)}
                            for i, (t, s) in enumerate(zip(self.timesteps, self.noise))],
            "words": [{"word": w.text, "positions": w.positions,
                       "mean_probability": {lv: round(float(m[i].mean()), 4) for lv, m in self.levels.items()},
                       "heat_map": np.round(self.heat[i].numpy(), 4).tolist()}
                      for i, w in enumerate(self.words)],
            "guidance": [{"call": g["call"], "timestep": g["t"], "mean_abs_difference": round(float(g["delta"].mean()), 4)}
                         for g in self.guidance],
        }


def check_prompt(tokenizer, prompt) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise MinidbError("the prompt is empty: give the words whose maps to draw")
    if tokenizer.num_tokens(prompt) > 75:
        raise MinidbError(f"the prompt has {tokenizer.num_tokens(prompt)} BPE tokens, more than CLIP's 75: "
                          "shorten it (the words past 75 would have no map)")


def _cross_attention(unet) -> dict:
    return {name: m for name, m in unet.named_modules() if name.endswith("attn2")}


@torch.no_grad()
def explain(sd, prompt: str, seed: int = 0, steps: int = 50, scale: float | None = None, sampler: str = "ddim",
            frames: int = 8, guidance_frames: int = 4, model: str = "", progress: bool = True) -> Explanation:
    """Sample `prompt` as generate() does (same image, bit for bit) and record what happens inside.
    scale: None = the model's own guidance scale (sd.config.guidance)."""
    from minidb.sampling import decode, sample_latents
    t0 = time.perf_counter()
    scale = sd.config.guidance_or(scale)
    check_prompt(sd.tokenizer, prompt)
    guided = scale != 1.0
    latent = (sd.config.image_size // sd.config.latent_factor,) * 2
    calls = []                         # per UNet call: (x_t [1, 4, h, w], t, out [1 or 2, 4, h, w])
    sums, counts, backends = {}, {}, set()

    def on_unet(module, args, out):
        x_in, t_in = args[0], args[1]
        calls.append((x_in[:1].float().clone(), int(t_in.reshape(-1)[0]), out.float().clone()))

    def on_probs(name, probs, backend):
        p = probs[-1].mean(0)          # (N, 77): the conditional half (last), mean over heads
        sums[name] = sums.get(name, 0) + p
        counts[name] = counts.get(name, 0) + 1
        backends.add(backend)

    handle = sd.unet.register_forward_hook(on_unet)
    try:
        with record_attention(_cross_attention(sd.unet), on_probs):
            z = sample_latents(sd, [prompt], steps=steps, guidance=scale, sampler=sampler, seed=seed,
                               progress=progress)
    finally:
        handle.remove()
    image = decode(sd, z)[0]

    schedule = sd.schedule
    ac = schedule.alphas_cumprod

    def x0_of(x, out, t):
        eps = schedule.eps_from_v(x, out, t) if sd.config.parameterization == "v" else out
        a = float(ac[t])
        return (x - math.sqrt(1 - a) * eps) / math.sqrt(a), eps

    def guided_out(out):
        if not guided:
            return out
        u, c = out.chunk(2)
        return u + scale * (c - u)

    timesteps = [t for _, t, _ in calls]
    noise = [math.sqrt(1 - float(ac[t])) for t in timesteps]
    shown = sorted(set(np.linspace(0, len(calls) - 1, min(frames, len(calls))).round().astype(int).tolist()))
    x0 = {i: decode(sd, x0_of(calls[i][0], guided_out(calls[i][2]), calls[i][1])[0])[0] for i in shown}

    guidance = []
    if guided:
        for i in sorted(set(np.linspace(0, len(calls) - 1, min(guidance_frames, len(calls))).round().astype(int))):
            x, t, out = calls[i]
            (x0_u, eps_u), (x0_c, eps_c) = (x0_of(x, o, t) for o in out.chunk(2))
            delta = (eps_c - eps_u).abs().mean(1, keepdim=True)  # (1, 1, h, w): how far the prompt moves eps
            delta = F.interpolate(delta, size=image.size[::-1], mode="nearest")[0, 0]
            guidance.append({"call": int(i), "t": t, "cond": decode(sd, x0_c)[0], "uncond": decode(sd, x0_u)[0],
                             "delta": delta, "guided": x0[i] if i in x0 else decode(sd, x0_of(x, guided_out(out), t)[0])[0]})

    words = words_of(sd.tokenizer, prompt)
    n_tokens = sd.tokenizer.num_tokens(prompt)
    size = image.size[::-1]            # (H, W)
    levels, upsampled, bos, eos = {}, [], [], []
    for name, total in sums.items():
        p = total / counts[name]       # (N, 77)
        bos.append(float(p[:, 0].mean()))
        eos.append(float(p[:, n_tokens + 1:].sum(-1).mean()))
        lv = level_of(name, p.shape[0], latent)
        h, w = (int(s) for s in lv.split()[1].split("x"))
        maps = torch.stack([p[:, w_.positions].mean(-1) for w_ in words]).view(len(words), h, w)  # (words, h, w)
        levels.setdefault(lv, []).append(maps)
        upsampled.append(F.interpolate(maps[None], size=size, mode="bicubic", align_corners=False)[0].clamp(min=0))
    levels = {lv: torch.stack(maps).mean(0) for lv, maps in levels.items()}  # in call order: down, middle, up
    heat = torch.stack(upsampled).mean(0)  # (words, H, W)

    ran = ", ".join(sorted(backends))
    if backends <= set(RETURNS_PROBABILITIES):
        how = f"the {ran} backend's own softmax weights"
    else:
        how = (f"recomputed the plain way, softmax(q k^T / sqrt(d)) in fp32, for the recorded layers: the "
               f"{ran} backend is a fused kernel that never forms them (the image is the kernel's own)")
    settings = {"seed": seed, "steps": steps, "scale": scale, "sampler": sampler, "model": model,
                "unet_calls": len(calls)}
    return Explanation(prompt, settings, image, timesteps, noise, x0, words, levels, heat,
                       {"bos": float(np.mean(bos)), "eos_and_padding": float(np.mean(eos))}, guidance, how,
                       time.perf_counter() - t0)


# ---- the sheet -------------------------------------------------------------------------------------

CELL = 128        # every picture is drawn at this size (the world's 64x64 images at 2x, nearest)
PAD = 6
INK, GREY, PAPER = (20, 20, 20), (90, 90, 90), (255, 255, 255)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


FONT, SMALL, BIG = _font(14), _font(12), _font(20)


def heat_colors(m: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, dark blue (0) through green and yellow to red (1)."""
    stops = np.array([[0, 0, 130], [0, 90, 255], [0, 220, 160], [250, 230, 0], [235, 30, 0]], np.float32)
    x = np.clip(m, 0, 1) * (len(stops) - 1)
    i = np.minimum(x.astype(int), len(stops) - 2)
    f = (x - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


def overlay(image: Image.Image, heat: torch.Tensor, alpha: float = 0.6) -> Image.Image:
    """The heat map (scaled to its own maximum) blended over the image."""
    m = heat.numpy()
    m = m / m.max() if m.max() > 0 else m
    base = np.asarray(image.convert("RGB"), np.float32)
    if base.shape[:2] != m.shape:
        base = np.asarray(image.convert("RGB").resize(m.shape[::-1], Image.BILINEAR), np.float32)
    out = (1 - alpha) * base + alpha * heat_colors(m)
    return Image.fromarray(out.round().astype(np.uint8))


def _cell(image: Image.Image) -> Image.Image:
    return image.convert("RGB").resize((CELL, CELL), Image.NEAREST)


class _Canvas:
    """Rows of labelled pictures on white, stacked top to bottom; grows as it goes."""

    def __init__(self, width: int):
        self.width, self.parts, self.y = width, [], PAD

    def text(self, s: str, font=FONT, fill=INK):
        for line in _wrap(s, font, self.width - 2 * PAD):
            self.parts.append(("text", self.y, line, font, fill))
            self.y += font.size + 4

    def row(self, pictures: list[tuple[Image.Image, str]]):
        self.parts.append(("row", self.y, pictures))
        self.y += CELL + 2 * (SMALL.size + 3) + PAD

    def gap(self, h=PAD * 2):
        self.y += h

    def render(self) -> Image.Image:
        out = Image.new("RGB", (self.width, self.y + PAD), PAPER)
        d = ImageDraw.Draw(out)
        for part in self.parts:
            if part[0] == "text":
                _, y, line, font, fill = part
                d.text((PAD, y), line, font=font, fill=fill)
            else:
                _, y, pictures = part
                for j, (picture, label) in enumerate(pictures):
                    x = PAD + j * (CELL + PAD)
                    out.paste(_cell(picture), (x, y))
                    for k, line in enumerate(label.split("\n")[:2]):
                        d.text((x, y + CELL + 2 + k * (SMALL.size + 3)), line, font=SMALL, fill=GREY if k else INK)
        return out


def _wrap(s: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in s.split(" "):
        trial = f"{line} {word}".strip()
        if font.getlength(trial) <= width or not line:
            line = trial
        else:
            lines.append(line)
            line = word
    return lines + [line]


PARTS = ("trajectory", "words", "levels", "guidance")


def sheet(ex: Explanation, title: str = "", parts=PARTS) -> Image.Image:
    """One picture of everything in `ex` (or of `parts` of it), every picture labelled and every
    number explained."""
    columns = max(len(ex.words) + 1, len(ex.x0), 5) if {"words", "levels"} & set(parts) else max(len(ex.x0), 4)
    c = _Canvas(PAD + columns * (CELL + PAD))
    s = ex.settings
    c.text(title or f"minidb explain: \"{ex.prompt}\"", BIG)
    c.text(f"model {s['model'] or '?'}; seed {s['seed']}, {s['sampler']} with {s['steps']} steps, guidance scale "
           f"{s['scale']:g}; {s['unet_calls']} UNet calls; {ex.seconds:.1f} s.", SMALL, GREY)
    c.gap()
    if "trajectory" in parts:
        _trajectory(c, ex)
    if "words" in parts:
        _words(c, ex)
    if "levels" in parts:
        _levels(c, ex)
    if "guidance" in parts and ex.guidance:
        _guidance(c, ex)
    return c.render()


def _trajectory(c: _Canvas, ex: Explanation):
    c.text("1. The trajectory: at every step the UNet predicts the clean image x0 from the noisy latent x_t; "
           "here is that prediction, decoded by the VAE, from the first step (left) to the last.")
    c.text("Under each: the UNet call, its timestep t (999 = pure noise, 0 = clean) and the noise level "
           "sqrt(1 - a_t), the share of noise in the latent's amplitude (1 = all noise, 0 = none).", SMALL, GREY)
    c.row([(ex.x0[i], f"call {i}, t={ex.timesteps[i]}\nnoise {ex.noise[i]:.3f}") for i in ex.x0])
    c.gap()


def _words(c: _Canvas, ex: Explanation):
    c.text("2. Where each word looks: for every pixel, the cross-attention probability of each word's tokens, "
           "averaged over heads and over the UNet calls, and over layers as DAAM does; overlaid on the final "
           "image (each map scaled to its own maximum: red = where that word is looked at most).")
    c.text(f"Under each map: the word and its mean attention probability over the image (1.0 would be all of "
           f"the attention). Left out: the start token, which alone takes {ex.special_share['bos']:.0%} of the "
           f"attention (a sink that would drown the words), and the end token with its padding "
           f"({ex.special_share['eos_and_padding']:.0%}). Probabilities: {ex.probabilities}.", SMALL, GREY)
    c.row([(ex.image, "the sample\n(final image)")]
          + [(overlay(ex.image, ex.heat[i]), f"\"{w.text}\"\n{float(ex.heat[i].mean()):.3f}")
             for i, w in enumerate(ex.words)])


def _levels(c: _Canvas, ex: Explanation):
    c.text("Per UNet level (down the encoder, the middle, up the decoder; the size is the level's attention "
           "map, upsampled here): the same maps before averaging over levels, scaled to their own maximum; "
           "the number is the level's mean probability for that word.", SMALL, GREY)
    for lv, maps in ex.levels.items():
        big = F.interpolate(maps[None], size=ex.image.size[::-1], mode="nearest")[0]
        c.row([(ex.image, f"level {lv}\n(the sample)")]
              + [(overlay(ex.image, big[i]), f"\"{w.text}\"\n{float(maps[i].mean()):.3f}")
                 for i, w in enumerate(ex.words)])
    c.gap()


def _guidance(c: _Canvas, ex: Explanation):
    s = ex.settings
    c.text(f"3. Guidance: the UNet sees the prompt (conditional) and the empty prompt (unconditional) at once; "
           f"the step uses eps_u + {s['scale']:g} * (eps_c - eps_u). At a few calls: x0 as each half alone "
           f"predicts it, where they differ, and the guided x0 the sampler followed.")
    c.text("The difference map is mean |eps_c - eps_u| over the latent channels, scaled to its maximum; the "
           "number is its mean over the image (in units of the noise's standard deviation).", SMALL, GREY)
    for g in ex.guidance:
        c.row([(g["uncond"], f"call {g['call']}, t={g['t']}\nunconditional x0"),
               (g["cond"], "conditional x0\n(the prompt)"),
               (overlay(g["cond"], g["delta"], alpha=1.0), f"|eps_c - eps_u|\nmean {float(g['delta'].mean()):.3f}"),
               (g["guided"], "guided x0\n(what is followed)")])


def side_by_side(left: Image.Image, right: Image.Image, titles: tuple[str, str]) -> Image.Image:
    """Two sheets next to each other under their titles (--compare, --lora)."""
    head = BIG.size + 2 * PAD
    out = Image.new("RGB", (left.width + right.width + 3 * PAD, max(left.height, right.height) + head), PAPER)
    d = ImageDraw.Draw(out)
    for x, picture, title in ((0, left, titles[0]), (left.width + 3 * PAD, right, titles[1])):
        d.text((x + PAD, PAD), title, font=BIG, fill=INK)
        out.paste(picture, (x, head))
    d.line([(left.width + PAD, head), (left.width + PAD, out.height)], fill=GREY, width=2)
    return out
