"""minidb explain: the attention probabilities against a float64 reference, recording that changes
no pixel, a color word's map on the object, the reading guide's file:line references, and the
command's one-line errors."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import perturb_
from minidb import attention
from minidb.attention import attention_probabilities, math_attention, record_attention, use_backend
from minidb.config import tiny_config
from minidb.explain import WORLD, explain, sheet, threshold, words_of
from minidb.pipeline import StableDiffusion

ROOT = Path(__file__).resolve().parent.parent


def test_probabilities_sum_to_one_and_match_float64():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (10, 77, 77))
    p = attention_probabilities(q, k)  # (B, H, N, M)
    assert p.shape == (2, 3, 10, 77)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 3, 10), rtol=0, atol=1e-6)
    scores = q.double() @ k.double().transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(p.double(), scores.softmax(-1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.double() @ v.double(), math_attention(q, k, v).double(), rtol=1e-5, atol=1e-6)
    causal = attention_probabilities(q[:, :, :10], q[:, :, :10], causal=True)
    assert torch.equal(causal.triu(1), torch.zeros_like(causal))  # no query sees a later key
    torch.testing.assert_close(causal.sum(-1), torch.ones(2, 3, 10), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    sd = StableDiffusion(tiny_config())
    for i, model in enumerate(sd.models.values()):
        perturb_(model, seed=i)  # fresh zero-initialised layers would make every map uniform
    return sd


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_recording_changes_no_pixel_and_removes_itself(tiny, backend):
    prompt = "a photo of a red star"
    with use_backend(backend):
        plain = tiny.generate([prompt], steps=3, seed=5, progress=False)[0]
        ex = explain(tiny, prompt, steps=3, seed=5, frames=2, guidance_frames=2, progress=False)
    assert np.array_equal(np.asarray(plain), np.asarray(ex.image))  # bit for bit
    assert attention._recording is None and not attention._recording_open
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny.unet.modules())
    assert ("recomputed" in ex.probabilities) == (backend == "sdpa")
    assert [w.text for w in ex.words] == ["a", "photo", "of", "a", "red", "star"]
    assert ex.heat.shape == (6, *ex.image.size[::-1]) and (ex.heat >= 0).all()
    assert ex.settings["unet_calls"] == 3 and len(ex.guidance) == 2
    sheet(ex)  # draws


def test_record_attention_sees_only_its_modules(tiny):
    seen = []
    layers = {n: m for n, m in tiny.unet.named_modules() if n.endswith("attn2")}
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, tiny.config.unet.context_dim)
    with record_attention(layers, lambda name, p, backend: seen.append((name, tuple(p.shape)))):
        tiny.unet(x, torch.tensor([10]), ctx)
        with pytest.raises(RuntimeError, match="do not nest"):
            with record_attention(layers, print):
                pass
    assert sorted({name for name, _ in seen}) == sorted(layers)  # cross-attention only, each once
    assert len(seen) == len(layers) and all(shape[-1] == 77 for _, shape in seen)


def test_words_group_bpe_tokens(tiny):
    words = words_of(tiny.tokenizer, "a photograph of unbelievably, top left")
    assert [w.text for w in words] == ["a", "photograph", "of", "unbelievably", ",", "top", "left"]
    flat = [p for w in words for p in w.positions]
    assert flat == list(range(1, tiny.tokenizer.num_tokens("a photograph of unbelievably, top left") + 1))


def test_threshold_is_daams():
    """DAAM scales each map to [0, 1] by its minimum and maximum, then keeps what is above 0.4."""
    m = torch.tensor([[0.0, 0.39], [0.41, 1.0]])
    assert threshold(m).tolist() == [[False, False], [True, True]]
    lifted = torch.tensor([[0.5, 0.69], [0.71, 1.0]])  # 0.4 of its maximum would keep all four
    assert threshold(lifted).tolist() == [[False, False], [True, True]]
    assert threshold(torch.stack([m, lifted])).tolist() == [[[False, False], [True, True]]] * 2


def test_localisation_measures():
    from benchmarks.explain_localisation import centre_region, iou
    a = torch.zeros(64, 64, dtype=torch.bool)
    a[:32, :32] = True
    b = torch.zeros_like(a)
    b[:32, 16:48] = True
    assert iou(a, b) == pytest.approx(512 / 1536) and iou(a, a) == 1.0
    assert centre_region(a.float()) == "top left" and centre_region(torch.ones(64, 64)) == "center"


def test_color_word_looks_at_the_object():
    """On the shipped world model, the color word's heat map puts more of its mass on the object
    than a uniform map would (mass share / area share), by a wide margin, on the mean of four captions
    (one caption's map varies with the model and seed: RESULTS.md, "R15_s1")."""
    from minidb.world.reader import largest_component, segment
    sd = StableDiffusion.from_checkpoint(WORLD)
    lifts = []
    for color, shape, background in [("red", "circle", "white"), ("blue", "square", "yellow"),
                                     ("green", "star", "black"), ("purple", "heart", "gray")]:
        ex = explain(sd, f"a photo of a {color} {shape} on a {background} background", seed=0, steps=20,
                     progress=False)
        mask = torch.from_numpy(largest_component(segment(ex.image)[1]))
        assert 0.02 < mask.float().mean() < 0.5, "no object drawn: the test needs one"
        heat = ex.heat[[w.text for w in ex.words].index(color)]
        lifts.append(float((heat * mask).sum() / heat.sum()) / float(mask.float().mean()))
    assert sum(lifts) / len(lifts) > 1.5, lifts  # 1.0 is a uniform map


REF = re.compile(r"`((?:minidb|benchmarks|tests|weights)/[\w/]+\.py):(\d+)-(\d+)` \(`([^`]+)`\)")


def test_reading_guide_references_hold():
    """Every `file:a-b` (`anchor`) in docs/READING.md names lines that contain its anchor."""
    text = (ROOT / "docs" / "READING.md").read_text(encoding="utf-8")
    refs = REF.findall(text)
    assert len(refs) >= 10, "the guide's references are written as `path:a-b` (`anchor`)"
    bad = []
    for path, a, b, anchor in refs:
        lines = (ROOT / path).read_text(encoding="utf-8").splitlines()
        a, b = int(a), int(b)
        if not (1 <= a <= b <= len(lines)) or anchor not in "\n".join(lines[a - 1:b]):
            where = [i + 1 for i, line in enumerate(lines) if anchor in line]
            bad.append(f"{path}:{a}-{b} lacks {anchor!r} (now at line {where})")
    assert not bad, "\n".join(bad)
    for picture in re.findall(r"\]\((explain[\w-]*\.png)\)", text):
        assert (ROOT / "docs" / picture).is_file(), picture


@pytest.mark.parametrize("args, says", [
    (["--prompt", " "], "--prompt is empty"),
    (["--prompt", "a star", "--ckpt", "missing.safetensors"], "--ckpt: not found"),
    (["--prompt", "a star", "--compare", "missing.safetensors"], "--compare: not found"),
    (["--prompt", "a star", "--steps", "0"], "--steps must be at least 1"),
    (["--prompt", "a star", "--scale", "nan"], "--scale must be a number"),
    (["--prompt", "a star", "--out", "sheet.jpg"], "--out must name a .png"),
    (["--prompt", "a star", "--lora", "missing.safetensors"], "LoRA file not found"),
])
def test_cli_errors_are_one_line(args, says, capsys):
    from minidb.cli import main
    assert main(["explain", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minidb explain: error: ") and says in lines[0], lines
