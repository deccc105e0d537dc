"""The miniature world: its images, its attribute reader, the shipped model, and that the model
has learned (its images follow their prompts far better than an untrained model's)."""
import dataclasses

import numpy as np
import pytest
import torch

from minidb.world.eval import Reader, crop, measure, prompt_fidelity, reader_accuracy
from minidb.world.metrics import confusions
from minidb.world.pretrain import SHIPPED, WORLD_CONFIG
from minidb.world import (ATTRIBUTES, BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Attributes, World, caption,
                          combinations, held_out, render)

shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason="the world model is not installed")


def test_world_is_deterministic_per_seed():
    a, b, c = World(seed=3), World(seed=3), World(seed=4)
    images_a, captions_a = a.batch(10, 6)
    images_b, captions_b = b.batch(10, 6)
    images_c, captions_c = c.batch(10, 6)
    assert np.array_equal(images_a, images_b) and captions_a == captions_b  # the very same computation
    assert not np.array_equal(images_a, images_c)
    assert images_a.shape == (6, 64, 64, 3) and images_a.dtype == np.uint8
    # item i does not depend on what was drawn before it
    assert np.array_equal(World(seed=3).batch(12, 1)[0][0], images_a[2])


def test_world_has_the_promised_variety_and_never_draws_held_out_combinations():
    assert len(SHAPES) >= 6 and len(COLORS) >= 8 and len(SIZES) == 2 and len(POSITIONS) >= 5 and len(BACKGROUNDS) >= 6
    world = World(seed=0)
    drawn = [world.attributes(i)[0] for i in range(3000)]
    assert not any(held_out(a) for a in drawn)
    assert {a.shape for a in drawn} == set(SHAPES) and {a.color for a in drawn} == set(COLORS)
    held = combinations(held=True)
    assert 0.05 < len(held) / len(combinations()) < 0.15
    # variation: two renders of the same attributes differ, and are still the same attributes
    a = Attributes("star", "red", "small", "top left", "blue")
    assert not np.array_equal(np.asarray(render(a, seed=1)), np.asarray(render(a, seed=2)))


def test_captions_use_single_clip_tokens():
    from minidb.tokenizer import CLIPTokenizer
    tok = CLIPTokenizer()
    words = set(SHAPES) | set(COLORS) | set(BACKGROUNDS) | set(SIZES) | {w for p in POSITIONS for w in p.split()}
    for w in words:
        assert len(tok.encode(w)) == 3, w  # BOS, the word, EOS
    a = Attributes("star", "red", "small", "top left", "blue")
    assert caption(a) == "a photo of a small red star on a blue background, top left"
    assert caption(a, keep=("shape",)) == "a photo of a star"
    assert caption(Attributes("ring", "orange"), keep=("shape", "color")) == "a photo of an orange ring"
    assert caption(a, keep=("shape", "background"), subject="sks") == "a photo of sks star on a blue background"


def test_measured_attributes_follow_the_pixels():
    """The measured attributes come from the image: change one attribute, the reading follows."""
    base = Attributes("square", "red", "large", "center", "white")
    for change in [dict(color="green"), dict(background="black"), dict(position="top right"), dict(size="small")]:
        a = Attributes(**{**base.__dict__, **change})
        m = measure(render(a, seed=5))
        for key, value in change.items():
            if key != "size":
                assert m[key] == value, (key, m[key])
    blank = measure(render(base, seed=0).point(lambda v: 128))  # a flat gray image: no shape
    assert blank["area"] == 0 and blank["color"] is None
    assert crop(render(base, seed=0)).shape == (3, 32, 32)


@pytest.mark.skipif(not (SHIPPED.parent / "world_reader.safetensors").is_file(), reason="no reader shipped")
def test_reader_is_accurate_on_fresh_renders():
    """>= 98% per attribute on renders it never saw (with blur and noise of the kind generated
    images have). 240 images: one error in 240 is 0.4%, so the bound is not on a knife edge.
    The world VAE's reconstructions of the same renders are what a generated image is at best;
    there the reader, trained on such reconstructions and cropping the largest connected blob,
    reads shape and size within a few errors in 100 (benchmarks/RESULTS.md, "The world reader on
    VAE round trips"). >= 0.9 leaves several times the errors measured here, yet fails the
    previous reader with its previous crop (well under 0.9 on these images)."""
    from minidb.world.eval import world_vae
    acc = reader_accuracy(Reader.load(), n=240, seed=777, vae=world_vae())
    for name in ATTRIBUTES:
        assert acc[name] >= 0.98, (name, acc)
    assert acc["pattern"] >= 0.85, acc
    assert acc["decoded"]["shape"] >= 0.9 and acc["decoded"]["size"] >= 0.9, acc
    assert acc["decoded"]["color"] >= 0.95, acc


@shipped
def test_shipped_model_loads_strictly_and_round_trips(tmp_path):
    from minidb.pipeline import StableDiffusion
    from minidb.weights import open_checkpoint
    assert SHIPPED.stat().st_size <= 25 * 10 ** 6
    sd = StableDiffusion.from_checkpoint(SHIPPED)  # strict: every key, every shape
    # everything WORLD_CONFIG says (architecture, schedule, v-parameterization, 64x64), and the
    # scale factor pretraining measured
    assert dataclasses.replace(sd.config, scale_factor=WORLD_CONFIG.scale_factor) == WORLD_CONFIG
    assert sd.config.image_size == 64 and sd.config.parameterization == "v" and sd.config.scale_factor != 0.18215
    with open_checkpoint(SHIPPED) as f:
        assert all(dtype == torch.float16 for _, dtype in f.shapes.values() if dtype.is_floating_point)
    copy = tmp_path / "copy.safetensors"
    sd.save(copy, dtype=torch.float16)
    again = StableDiffusion.from_checkpoint(copy)
    for name, model in sd.models.items():
        other = again.models[name].state_dict()
        for k, v in model.state_dict().items():
            assert torch.equal(v, other[k]), (name, k)  # fp16 -> fp32 -> fp16 is exact
    assert again.config == sd.config


@shipped
def test_shipped_model_follows_prompts_far_better_than_an_untrained_one():
    """A short sampling run at the model's own guidance scale: 16 held-out prompts and 2 class-only
    prompts per shape ("a photo of a star"), 8 DDIM steps. The shipped model draws shape, color,
    position and background; an untrained UNet and text encoder with the same VAE are near chance
    (1 in 6 shapes, 8 colors, 5 positions, 6 backgrounds). What these settings measured is in
    benchmarks/RESULTS.md (issue #27): the bounds leave room for another machine's rounding without
    letting a model that draws blobs of the right color pass."""
    from minidb.world.metrics import evaluate_model
    from minidb.pipeline import StableDiffusion
    reader = Reader.load()
    sd = StableDiffusion.from_checkpoint(SHIPPED)
    torch.manual_seed(0)
    untrained = StableDiffusion(sd.config)
    untrained.vae.load_state_dict(sd.vae.state_dict())
    kwargs = dict(n=16, steps=8, reader=reader, progress=False, per_shape=2)
    trained = evaluate_model(sd, **kwargs)["fidelity"]
    random = evaluate_model(untrained, **kwargs)["fidelity"]
    for name in ("shape", "color", "position", "background"):
        assert trained[name] >= 11 / 16, (name, trained)
    assert trained["class_shape"] >= 8 / 12, trained
    assert trained["color"] >= random["color"] + 8 / 16, (trained, random)
    assert trained["shape"] >= random["shape"] + 5 / 16, (trained, random)


class _Drawer:
    """A stand-in model that draws what a prompt names: held-out captions exactly, class-only
    prompts as the named shape, or every shape as `always` when set."""

    def __init__(self, always=None):
        from minidb.config import SDConfig
        self.config, self.always = SDConfig(image_size=64), always

    def generate(self, prompts, seed=0, **kwargs):
        from minidb.world.eval import held_out_prompts
        wanted = {caption(a): a for a in held_out_prompts(40)}
        out = []
        for i, p in enumerate(prompts):
            a = wanted.get(p) or Attributes(p.split()[-1], "red", "large", "center", "white")
            out.append(render(dataclasses.replace(a, shape=self.always or a.shape), seed=seed + i))
        return out


def test_class_prompts_are_scored_by_the_shape_they_name():
    """minidb eval's class-prompt column: "a photo of a star" per shape, read as the named shape. A
    model that draws what it is asked scores 1 (the reader reads renders of these at >= 99%); one that
    always draws circles scores 1/6."""
    from minidb.world.eval import class_prompts, evaluate_model, format_table
    prompts, shapes = class_prompts(2)
    assert prompts[:2] == ["a photo of a circle"] * 2 and shapes == [s for s in SHAPES for _ in range(2)]
    reader = Reader.load()
    right = evaluate_model(_Drawer(), n=4, per_shape=2, reader=reader, batch=5, progress=False)
    circles = evaluate_model(_Drawer("circle"), n=4, per_shape=2, reader=reader, batch=5, progress=False)
    assert right["fidelity"]["class_shape"] == 1.0 and right["fidelity"]["shape"] == 1.0
    assert circles["fidelity"]["class_shape"] == pytest.approx(1 / 6)
    assert len(right["images"]) == 4 and len(right["class_images"]) == 12
    assert "class prompts: shape" in format_table({"m": right["fidelity"]})
    assert "class" not in format_table({"m": evaluate_model(_Drawer(), n=2, reader=reader, progress=False)["fidelity"]})


def test_prompt_fidelity_counts_per_attribute():
    a = Attributes("star", "red", "small", "top left", "blue")
    reads = [dict(a.__dict__), dict(a.__dict__, color="green"), dict(a.__dict__, shape=None)]
    f = prompt_fidelity(reads, [a, a, a])
    assert f["color"] == pytest.approx(2 / 3) and f["shape"] == pytest.approx(2 / 3) and f["size"] == 1.0
    assert f["all"] == pytest.approx(1 / 3)


def test_confusions_count_what_is_read_for_what_is_asked():
    left = Attributes("star", "red", "small", "top left", "blue")
    right = Attributes("star", "red", "small", "top right", "blue")
    reads = [dict(left.__dict__), dict(left.__dict__, position="top right"), dict(right.__dict__, position="top left"),
             dict(left.__dict__, position="top right"), dict(left.__dict__, position=None)]
    assert confusions(reads, [left, left, right, left, left], "position") == {  # None: no shape found
        ("top left", None): 1, ("top left", "top left"): 1, ("top left", "top right"): 2, ("top right", "top left"): 1}
