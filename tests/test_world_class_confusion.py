"""benchmarks/world_class_confusion.py: its counts and its seeds, with a stand-in model and reader (the real
ones are measured in benchmarks/RESULTS.md, issue #27)."""
import json
from types import SimpleNamespace

from PIL import Image

import pytest
import torch

from benchmarks.world_class_confusion import GuidedIn, confusion, guided_in, main
from minidb.world import SHAPES


class FakeModel:
    """Draws each class prompt as its shape, but a square as a star; remembers the seeds it was given."""

    def __init__(self):
        self.config = SimpleNamespace(image_size=8)
        self.seeds = []

    def generate(self, prompts, steps, guidance, height, width, seed, progress):
        assert len(seed) == len(prompts) and steps == 20
        self.seeds += seed
        drawn = [p.split()[-1] for p in prompts]
        drawn = ["star" if s == "square" else s for s in drawn]
        return [Image.new("RGB", (width, height), (SHAPES.index(s), 0, 0)) for s in drawn]


class FakeReader:
    def read_all(self, images):
        return [{"shape": SHAPES[im.getpixel((0, 0))[0]]} for im in images]


def test_counts_and_seeds(tmp_path):
    sd = FakeModel()
    share, counts, images = confusion(sd, FakeReader(), guidance=1.5, per_shape=3, seed=700, batch=4)
    assert sd.seeds == list(range(700, 700 + 3 * len(SHAPES)))      # one seed per prompt, across batches
    assert counts["square"] == {"star": 3}
    assert all(counts[s] == {s: 3} for s in SHAPES if s != "square")
    assert abs(share - (len(SHAPES) - 1) / len(SHAPES)) < 1e-9
    json.dumps(counts)


def test_guided_in_leaves_only_the_conditional_outside_the_interval():
    def unet(x, t, context):          # a stand-in whose two halves differ: uncond = x, cond = x + context
        return x + context
    wrapped = GuidedIn(unet, lo=100, hi=500)
    x0 = torch.randn(2, 3)
    x = torch.cat([x0, x0])                                     # the guided batch repeats the latents
    context = torch.cat([torch.zeros(2, 3), torch.ones(2, 3)])   # [unconditional; conditional]
    for t, guided in ((501, False), (951, False), (500, True), (100, True), (99, False), (1, False)):
        out = wrapped(x, torch.full((4,), t), context)
        u, c = out.chunk(2)
        g = 1.5
        eps = u + g * (c - u)
        if guided:
            assert torch.equal(out, x + context)                      # untouched
            assert torch.allclose(eps, x0 + g)
        else:
            assert torch.equal(u, c) and torch.equal(c, x0 + 1)    # both halves the conditional
            assert torch.equal(eps, c)                                # so the guided eps is the conditional
    # guidance 1 runs the conditional batch alone: nothing to swap, so the UNet is left as it is
    assert guided_in(unet, [100, 500], 1.0) is unet and guided_in(unet, None, 1.5) is unet
    assert isinstance(guided_in(unet, [100, 500], 1.5), GuidedIn)


@pytest.mark.parametrize("flags", [["--scales", "1.5;2"], ["--per-shape", "0"], ["--guided", "500,100"], ["--guided", "a,b"], ["--guided", "550"]])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as e:
        main(flags + ["--out", str(tmp_path / "c.json")])
    assert e.value.code == 2
    assert f"error: {flags[0]}" in capsys.readouterr().err.strip().splitlines()[-1]   # one line naming the flag
    assert list(tmp_path.iterdir()) == []
