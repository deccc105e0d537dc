"""benchmarks/star_arms.py, the geometric second reader of issue #27: its point count on renders."""
import pytest

from benchmarks.star_arms import is_star, points
from minidb.world import SHAPES, Attributes, render

EXPECTED = {"circle": 0, "ring": 0, "triangle": 3, "square": 4, "star": 5}  # the heart: 2-3, never 5


@pytest.mark.parametrize("shape", SHAPES)
def test_points_of_rendered_shapes(shape):
    for size in ("small", "large"):
        for seed, background in ((0, "white"), (1, "green")) if size == "large" else ((2, "black"),):
            image = render(Attributes(shape, "red", size, "center", background), seed=seed)
            if shape in EXPECTED:
                assert points(image) == EXPECTED[shape], (shape, size, background)
            assert is_star(image) == (shape == "star")


def test_nothing_drawn_has_no_points():
    from PIL import Image
    assert points(Image.new("RGB", (64, 64), "white")) == 0
