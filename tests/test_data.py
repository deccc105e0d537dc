"""minidb.dreambooth.data: image loading (modes, EXIF, junk), prompt checks, the deterministic dataset,
and class-image generation (minidb.dreambooth.prior) (seed per index, resumable, atomic)."""
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from minidb.dreambooth.data import DreamBoothDataset, can_cache_latents, load_image_folder
from minidb.dreambooth.prior import ensure_class_images
from minidb.dreambooth.train_config import check_prompts
from minidb.errors import DataError

WHITE = (255, 255, 255)


def only_image(folder, **kw):
    (path, image), = load_image_folder(folder, **kw)
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def save(image, folder, name, **kw):
    folder.mkdir(exist_ok=True)
    image.save(folder / name, **kw)
    return folder / name


# ---- modes -------------------------------------------------------------------------------------

def test_cmyk_becomes_rgb(tmp_path):
    save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "tif", "c.tif")  # C=0 M=Y=1 K=0: red
    assert (only_image(tmp_path / "tif") == (255, 0, 0)).all()
    save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "jpg", "c.jpg", quality=95)
    assert np.abs(only_image(tmp_path / "jpg") - (255, 0, 0)).max() <= 8


def test_grayscale_modes_become_rgb(tmp_path):
    save(Image.new("L", (4, 4), 100), tmp_path / "l", "g.png")
    assert (only_image(tmp_path / "l") == 100).all()
    one = Image.new("1", (4, 4), 0)
    one.putpixel((1, 2), 1)
    save(one, tmp_path / "one", "b.png")
    expected = np.zeros((4, 4, 3), int)
    expected[2, 1] = 255
    assert (only_image(tmp_path / "one") == expected).all()
    # 16-bit: 0..65535 maps to 0..255 (Pillow's own convert would clip everything above 255 to white)
    a = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    save(Image.fromarray(a), tmp_path / "i16", "d.png")
    assert Image.open(tmp_path / "i16" / "d.png").mode == "I;16"
    assert (only_image(tmp_path / "i16")[0, :, 0] == [0, 64, 128, 255]).all()


def test_palette_and_alpha_composite_on_white(tmp_path):
    p = Image.new("P", (2, 1))
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 0), 1)
    save(p, tmp_path / "p", "p.png")
    assert (only_image(tmp_path / "p")[0] == [(10, 20, 30), (200, 100, 50)]).all()
    save(p, tmp_path / "pt", "p.png", transparency=0)  # colour 0 is transparent
    assert (only_image(tmp_path / "pt")[0] == [WHITE, (200, 100, 50)]).all()

    rgba = Image.new("RGBA", (3, 1))
    for x, px in enumerate([(0, 0, 0, 0), (40, 80, 120, 255), (0, 100, 200, 128)]):
        rgba.putpixel((x, 0), px)
    save(rgba, tmp_path / "rgba", "a.png")
    a = 128 / 255  # out = a * colour + (1 - a) * white
    half = [round(a * c + (1 - a) * 255) for c in (0, 100, 200)]
    got = only_image(tmp_path / "rgba")[0]
    assert (got[:2] == [WHITE, (40, 80, 120)]).all() and np.abs(got[2] - half).max() <= 1

    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (60, 255))
    save(la, tmp_path / "la", "la.png")
    assert (only_image(tmp_path / "la")[0] == [WHITE, (60, 60, 60)]).all()


QUADRANTS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # top-left, top-right, bottom-left, bottom-right


def quadrant_image(w, h):
    a = np.zeros((h, w, 3), np.uint8)
    a[:h // 2, :w // 2], a[:h // 2, w // 2:] = QUADRANTS[0], QUADRANTS[1]
    a[h // 2:, :w // 2], a[h // 2:, w // 2:] = QUADRANTS[2], QUADRANTS[3]
    return Image.fromarray(a)


@pytest.mark.parametrize("orientation, stored_as", [(6, Image.Transpose.ROTATE_90), (8, Image.Transpose.ROTATE_270)])
def test_exif_rotated_photo_comes_upright(tmp_path, orientation, stored_as):
    # EXIF 6: the stored 0th row is the visual right side (the camera turned 90 degrees): stored =
    # upright turned 90 degrees counter-clockwise. EXIF 8: the other way round.
    upright = quadrant_image(64, 40)
    exif = Image.Exif()
    exif[0x0112] = orientation
    save(upright.transpose(stored_as), tmp_path / "exif", "photo.jpg", exif=exif.tobytes(), quality=95)
    got = only_image(tmp_path / "exif")
    assert got.shape == (40, 64, 3)
    for (y, x), colour in zip([(10, 16), (10, 48), (30, 16), (30, 48)], QUADRANTS):
        assert np.abs(got[y, x] - colour).max() <= 10, (y, x, got[y, x], colour)


# ---- junk, folders, sizes -----------------------------------------------------------------------

def test_bad_files_are_named_and_skipped_when_a_good_one_remains(tmp_path):
    folder = tmp_path / "mixed"
    good = save(quadrant_image(16, 16), folder, "b_good.png")
    full = (folder / "b_good.png").read_bytes()
    (folder / "a_truncated.png").write_bytes(full[:len(full) // 2])
    (folder / "c_notes.jpg").write_text("not a photo")
    (folder / ".DS_Store").write_bytes(b"\0\1")     # hidden files are not candidates
    (folder / "sub").mkdir()                         # nor are subfolders
    with pytest.warns(UserWarning) as record:
        images = load_image_folder(folder)
    assert [p for p, _ in images] == [good]
    message = str(record[0].message)
    assert "a_truncated.png (corrupt" in message and "c_notes.jpg (not an image)" in message
    assert ".DS_Store" not in message

    os.remove(good)
    with pytest.raises(DataError, match="a_truncated.png.*c_notes.jpg"):
        load_image_folder(folder)


def test_caption_files_are_not_images(tmp_path):
    """photo.txt beside photo.png is a caption (minidb.dreambooth.train_options.caption_for), not a bad image;
    a .txt file without an image of its name is reported as what it is, an orphan caption file."""
    folder = tmp_path / "captioned"
    good = save(quadrant_image(16, 16), folder, "dog.png")
    (folder / "dog.txt").write_text("a photo of sks dog on a beach")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [p for p, _ in load_image_folder(folder)] == [good]
    (folder / "notes.txt").write_text("not a caption")
    (folder / "Cat.TXT").write_text("a caption whose image is missing")
    with pytest.warns(UserWarning, match=r"2 caption file\(s\) of .* without an image of the same name, ignored: "
                                         r"Cat.TXT, notes.txt$"):
        assert [p for p, _ in load_image_folder(folder)] == [good]


def test_missing_empty_and_non_folders(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_image_folder(tmp_path / "empty", "class")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        load_image_folder(tmp_path / "file.png")
    with pytest.raises(DataError, match="no folder"):
        load_image_folder("")


def test_sorted_by_name_recognised_by_content(tmp_path):
    folder = tmp_path / "imgs"
    names = ["b.png", "a.photo", "c"]  # extensions do not matter, content does
    for i, name in enumerate(names):
        save(Image.new("RGB", (4, 4), (i, 0, 0)), folder, name, format="PNG")
    images = load_image_folder(folder)
    assert [p.name for p, _ in images] == sorted(names)
    assert [im.getpixel((0, 0))[0] for _, im in images] == [1, 0, 2]


def test_small_images_warn_and_large_ones_shrink_at_load(tmp_path):
    folder = tmp_path / "sizes"
    save(quadrant_image(40, 30), folder, "small.png")
    gradient = np.linspace(0, 255, 4032, dtype=np.uint8)[None, :, None].repeat(3024, 0).repeat(3, 2)
    save(Image.fromarray(gradient), folder, "big.jpg", quality=90)  # a 12 MP photo
    with pytest.warns(UserWarning, match=r"64x64.*small.png \(40x30\)") as record:
        images = dict((p.name, im) for p, im in load_image_folder(folder, resolution=64))
    assert len(record) == 1 and "big.jpg" not in str(record[0].message)
    assert images["big.jpg"].size == (85, 64)       # shorter side 64, aspect 4:3 kept (4032 * 64 / 3024)
    assert images["small.png"].size == (40, 30)     # never enlarged at load
    # the dataset fits it (and does not warn twice); without resolution= at load, the dataset warns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DreamBoothDataset(list(images.items()), None, 64)
    with pytest.warns(UserWarning, match=r"small.png \(40x30\)"):
        DreamBoothDataset(load_image_folder(folder), None, 64)


# ---- prompts -----------------------------------------------------------------------------------

def test_check_prompts():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_prompts("a photo of sks dog", "a photo of a dog")
        check_prompts("A photo of SKS golden retriever", "a photo of a golden retriever", identifier="sks")
        check_prompts("sks", None)
    with pytest.warns(UserWarning, match="lacks the class word.*'dog'"):
        check_prompts("a photo of sks", "a photo of a dog")
    with pytest.warns(UserWarning, match="no identifier"):
        check_prompts("a photo of a dog", "a photo of a dog")
    with pytest.warns(UserWarning, match="identifier 'sks'"):
        check_prompts("a photo of xyz dog", "a photo of a dog", identifier="sks")
    for empty in ("", "   "):
        with pytest.raises(DataError, match="empty"):
            check_prompts(empty, "a photo of a dog")


# ---- the dataset -------------------------------------------------------------------------------

def columns_image(h, w):
    """Pixel value = column index (x 5) in every channel: a crop's left edge can be read off."""
    return Image.fromarray(np.repeat((np.arange(w) * 5)[None, :, None], h, 0).repeat(3, 2).astype(np.uint8))


def left_edge(x):
    return round((x[0, 0, 0].item() + 1) * 127.5 / 5)


def test_dataset_shapes_range_pairing_and_length():
    r = 16
    instance = [Image.new("RGB", (r, r), (i, 0, 255)) for i in range(3)]
    klass = [Image.new("RGB", (r, 2 * r), (0, 10 * i, 0)) for i in range(5)]
    ds = DreamBoothDataset(instance, klass, r, hflip=True, seed=3)
    assert len(ds) == 5  # max(3, 5)
    for index in range(5):
        e = ds.get(index, epoch=2)
        assert e["instance"].shape == e["class_"].shape == (3, r, r)
        assert e["instance"].dtype == torch.float32
        assert e["instance"][0, 0, 0].item() == pytest.approx((index % 3) / 127.5 - 1)  # instance index % 3
        assert e["instance"][1].eq(-1).all() and e["instance"][2].eq(1).all()          # 0 -> -1, 255 -> 1
        assert e["class_"][1, 0, 0].item() == pytest.approx(10 * index / 127.5 - 1)
    only = DreamBoothDataset(instance, None, r)
    assert len(only) == 3 and only.get(0)["class_"] is None
    with pytest.raises(IndexError):
        only.get(3)
    with pytest.raises(DataError):
        DreamBoothDataset([], None, r)
    with pytest.raises(DataError):
        DreamBoothDataset(instance, [], r)


def test_resize_is_shorter_side_lanczos_then_center_crop():
    image = quadrant_image(80, 32)
    ds = DreamBoothDataset([image], None, 16, center_crop=True)
    reference = np.asarray(image.resize((40, 16), Image.Resampling.LANCZOS))[:, 12:28]  # (40 - 16) / 2 = 12
    expected = torch.from_numpy(reference.copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(ds.get(0, 0)["instance"], expected)


def test_augmentation_is_a_function_of_seed_epoch_index():
    r = 16
    ds = DreamBoothDataset([columns_image(r, 40)], [columns_image(48, r)], r, hflip=True, seed=7)
    state = torch.get_rng_state()
    a = ds.get(0, epoch=4)
    torch.manual_seed(123)  # the global RNG plays no part
    b = DreamBoothDataset([columns_image(r, 40)], [columns_image(48, r)], r, hflip=True, seed=7).get(0, epoch=4)
    assert torch.equal(a["instance"], b["instance"]) and torch.equal(a["class_"], b["class_"])
    torch.set_rng_state(state)
    ds.get(0, epoch=5)
    assert torch.equal(torch.get_rng_state(), state)

    crops, flips = set(), set()
    for epoch in range(40):
        x = ds.get(0, epoch)["instance"]
        flipped = bool(x[0, 0, 0] > x[0, 0, -1])
        x = x.flip(-1) if flipped else x
        edge = left_edge(x)
        assert 0 <= edge <= 40 - r
        window = (torch.arange(edge, edge + r) * 5).float() / 127.5 - 1
        assert torch.equal(x, window.expand(3, r, r))  # a window of the image, not resampled
        crops.add(edge), flips.add(flipped)
    assert len(crops) >= 10 and flips == {False, True}
    other_seed = DreamBoothDataset([columns_image(r, 40)], None, r, hflip=True, seed=8)
    assert any(not torch.equal(other_seed.get(0, e)["instance"], ds.get(0, e)["instance"]) for e in range(3))

    # centre crop without flips: the same pixels every epoch, which is what lets latents be cached
    fixed = DreamBoothDataset([columns_image(r, 40)], None, r, center_crop=True)
    assert all(left_edge(fixed.get(0, e)["instance"]) == 12 for e in range(5))
    assert can_cache_latents(True, False) and not can_cache_latents(False, False)
    assert not can_cache_latents(True, True)
    # images that are all exactly R x R: a random crop is the whole image too, so latents can be cached
    assert not fixed.exact_size
    exact = DreamBoothDataset([columns_image(r, r), columns_image(r, r)], [columns_image(r, r)], r, seed=7)
    assert exact.exact_size and can_cache_latents(False, False, exact.exact_size)
    assert not can_cache_latents(False, True, exact.exact_size)
    assert all(torch.equal(exact.get(0, e)["instance"], exact.get(0, 0)["instance"]) for e in range(5))
    assert not DreamBoothDataset([columns_image(r, r)], [columns_image(r, r + 8)], r).exact_size


def test_epoch_order():
    ds = DreamBoothDataset([Image.new("RGB", (8, 8))] * 10, None, 8, seed=1)
    orders = [ds.epoch_order(e) for e in range(3)]
    assert all(sorted(o) == list(range(10)) for o in orders)
    assert orders[0] == ds.epoch_order(0) and orders[0] != orders[1]
    assert DreamBoothDataset([Image.new("RGB", (8, 8))] * 10, None, 8, seed=2).epoch_order(0) != orders[0]


# ---- class images ------------------------------------------------------------------------------

def drawn(seed, size):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


class FakeSD:
    """generate() draws image i from its seed alone, like minidb.sampling does."""

    def __init__(self, guidance=7.5):
        from minidb.config import SDConfig
        self.calls, self.scales, self.config = [], [], SDConfig(guidance=guidance)

    def generate(self, prompts, seed, steps, guidance, sampler, height, width, progress):
        assert len(prompts) == len(seed) and not progress
        self.calls.append(list(seed))
        self.scales.append(guidance)
        assert height == width
        return [Image.fromarray(drawn(s, height)) for s in seed]


def pixels(path):
    return np.asarray(Image.open(path))


def test_class_images_seed_per_index_whatever_batch_or_world_size(tmp_path):
    kw = dict(seed=10, resolution=8, progress=False)
    one = ensure_class_images(FakeSD(), "a photo of a dog", tmp_path / "one", 7, batch_size=3, **kw)
    assert [p.name for p in one] == [f"class-{i:05d}.png" for i in range(7)]
    for i, p in enumerate(one):
        assert (pixels(p) == drawn(10 + i, 8)).all()

    sds = [FakeSD(), FakeSD(), FakeSD()]
    lists = [ensure_class_images(sd, "a photo of a dog", tmp_path / "three", 7, batch_size=2, rank=rank,
                                 world_size=3, **kw) for rank, sd in enumerate(sds)]
    assert sds[1].calls == [[11, 14]] and [s for c in sds[0].calls for s in c] == [10, 13, 16]
    for paths in lists:
        assert [p.name for p in paths] == [p.name for p in one]
    assert all((pixels(a) == pixels(tmp_path / "three" / a.name)).all() for a in one)
    assert not [p for p in (tmp_path / "three").iterdir() if p.name.startswith(".")]  # no temp files left


def test_class_images_are_drawn_at_the_models_own_scale_unless_given(tmp_path):
    sd = FakeSD(guidance=1.5)
    one = ensure_class_images(sd, "a dog", tmp_path / "own", 2, resolution=8, progress=False)
    two = ensure_class_images(sd, "a dog", tmp_path / "given", 2, guidance=4.0, resolution=8, progress=False)
    assert sd.scales == [1.5, 4.0]
    assert Image.open(one[0]).info["minidb.guidance"] == "1.5" and Image.open(two[0]).info["minidb.guidance"] == "4.0"


def test_class_images_keep_existing_and_count_own(tmp_path):
    folder = tmp_path / "class"
    sd = FakeSD()
    ensure_class_images(sd, "a dog", folder, 4, progress=False)
    os.remove(folder / "class-00002.png")
    (folder / "class-00003.png").write_bytes(b"junk")  # unreadable: drawn again
    mtime = os.stat(folder / "class-00000.png").st_mtime_ns
    sd = FakeSD()
    ensure_class_images(sd, "a dog", folder, 4, seed=0, progress=False)
    assert sd.calls == [[2, 3]] and os.stat(folder / "class-00000.png").st_mtime_ns == mtime
    assert (pixels(folder / "class-00003.png") == drawn(3, 512)).all()

    Image.new("RGB", (8, 8)).save(folder / "my_dog.jpg")  # the user's own image counts first
    sd = FakeSD()
    paths = ensure_class_images(sd, "a dog", folder, 4, progress=False)
    assert sd.calls == [] and [p.name for p in paths] == ["class-00000.png", "class-00001.png", "class-00002.png",
                                                         "my_dog.jpg"]
    assert [p.name for p in ensure_class_images(sd, "a dog", folder, 1, progress=False)] == ["my_dog.jpg"]
    assert ensure_class_images(sd, "a dog", folder, 0, progress=False) == []
    with pytest.warns(UserWarning, match="another prompt"):
        ensure_class_images(sd, "a cat", folder, 4, progress=False)
    assert sd.calls == []


def test_class_image_write_is_atomic(tmp_path, monkeypatch):
    def crash(fd):
        raise OSError("disk full")
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        ensure_class_images(FakeSD(), "a dog", tmp_path / "c", 2, resolution=8, progress=False)
    assert list((tmp_path / "c").iterdir()) == []  # no half image, no temp file


def test_class_images_from_a_tiny_stable_diffusion(tmp_path):
    from helpers import assert_same_image_up_to_rounding, perturb_
    from minidb.config import tiny_config
    StableDiffusion = pytest.importorskip("minidb.pipeline", reason="the model files are not all there yet").StableDiffusion
    sd = StableDiffusion(tiny_config())
    for i, model in enumerate(sd.models.values()):
        perturb_(model, seed=i)
    kw = dict(steps=2, guidance=3.0, resolution=16, progress=False)
    paths = ensure_class_images(sd, "a photo of a dog", tmp_path / "c", 3, seed=5, batch_size=2, **kw)
    assert [p.name for p in paths] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    alone = sd.generate(["a photo of a dog"], seed=[6], steps=2, guidance=3.0, height=16, width=16, progress=False)
    assert_same_image_up_to_rounding(pixels(paths[1]), alone[0])  # drawn in a batch of 2, then alone
    assert Image.open(paths[1]).info["minidb.seed"] == "6"
    ds = DreamBoothDataset([quadrant_image(16, 16)], load_image_folder(tmp_path / "c", "class", 16), 16)
    assert len(ds) == 3


# ---- batches: offset noise and per-example prompts ---------------------------------------------

def test_offset_noise_is_the_last_draw_of_each_examples_generator():
    """Offset noise adds one per-(example, channel) constant drawn after the example's other draws,
    so t, the target noise under it and the posterior noise stay as without it, and an example's
    draws do not depend on which other positions a process takes (the same in 1 or N processes)."""
    from minidb.config import tiny_config
    from minidb.dreambooth.data import draw_noise, example_seed
    from minidb.dreambooth.train_options import offset_noise
    cfg = tiny_config()
    plain = draw_noise(7, 3, 1, range(2), True, cfg, 4)
    t, noise, eps = draw_noise(7, 3, 1, range(2), True, cfg, 4, noise_offset=0.1)
    assert torch.equal(t, plain[0]) and torch.equal(eps, plain[2])
    offset = noise - plain[1]  # rows [instance 0, instance 1, class 0, class 1]
    torch.testing.assert_close(offset, offset[:, :, :1, :1].expand_as(offset), rtol=0, atol=1e-6)
    assert 0 < offset[:, :, 0, 0].abs().max() < 1
    for j in range(2):  # by hand: the example's generator after its t, noise and eps draws
        g = torch.Generator().manual_seed(example_seed(7, 3, 1, j))
        torch.randint(0, cfg.timesteps, (2,), generator=g)
        n = torch.randn((2, cfg.unet.in_channels, 4, 4), generator=g)
        torch.randn((2, cfg.vae.embed_dim, 4, 4), generator=g)
        torch.testing.assert_close(offset_noise(n, 0.1, g), noise[[j, 2 + j]], rtol=0, atol=0)
    alone = draw_noise(7, 3, 1, [1], True, cfg, 4, noise_offset=0.1)[1]
    assert torch.equal(alone, noise[[1, 3]])


def test_batches_carry_each_examples_prompt_row():
    """prompt_rows[i]: the prompt-table row of instance image i (its caption); class examples take
    the row after the last; the default is one instance prompt (row 0) and the class prompt (row 1)."""
    from helpers import perturb_
    from minidb.config import tiny_config
    from minidb.dreambooth.data import Batches, next_items
    from minidb.dreambooth.distributed import Dist
    from minidb.pipeline import StableDiffusion
    sd = StableDiffusion(tiny_config())
    perturb_(sd.vae)
    instance = [quadrant_image(16, 16) for _ in range(3)]
    dataset = DreamBoothDataset(instance, [quadrant_image(16, 16)] * 2, 16, seed=4)
    rows = [0, 1, 0]  # images 0 and 2 share a prompt, image 1 has its own caption
    cursor = (0, 0)
    for step in range(3):  # crosses into epoch 1
        items, _ = next_items(dataset, cursor, 2)
        batch, cursor = Batches(dataset, sd, 2, Dist(), prompt_rows=rows).next(cursor, step, 0)
        assert batch.prompt.tolist() == [rows[i % 3] for _, i in items] + [2, 2]
        assert batch.prompt.dtype == torch.int64 and batch.latents.shape[0] == 4
    default, _ = Batches(dataset, sd, 2, Dist()).next((0, 0), 0, 0)
    assert default.prompt.tolist() == [0, 0, 1, 1]
    alone = DreamBoothDataset(instance, None, 16, seed=4)
    assert Batches(alone, sd, 2, Dist(), prompt_rows=rows).next((0, 0), 0, 0)[0].prompt.shape == (2,)
