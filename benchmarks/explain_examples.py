"""The example sheets of docs/ (README, docs/READING.md), made by minidb explain on the world model.

    python -m benchmarks.explain_examples --demo demo     # after `minidb demo --out demo`

docs/explain_plain.png      "a photo of a star", the whole sheet (`minidb explain --prompt "a photo of a star"`)
docs/explain_full.png       a color, a shape, a background and a position, the whole sheet
docs/explain_dreambooth.png the subject prompt before and after DreamBooth (`--compare demo/run/model.safetensors`)
docs/explain_{words,levels,trajectory,guidance}.png   the parts of explain_full.png, one per stop of READING.md
"""
import argparse
from pathlib import Path

from minidb.explain import WORLD, explain, sheet, side_by_side
from minidb.pipeline import StableDiffusion

DOCS = Path(__file__).resolve().parent.parent / "docs"
PLAIN = "a photo of a star"
FULL = "a photo of a red star on a blue background, top left"
SUBJECT = "a photo of a large sks star on a green background, bottom right"  # one of the demo's new contexts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", help="a `minidb demo --out` folder, for the DreamBooth sheet")
    args = p.parse_args(argv)
    sd = StableDiffusion.from_checkpoint(WORLD)
    sheet(explain(sd, PLAIN, model=WORLD.name, progress=False)).save(DOCS / "explain_plain.png", optimize=True)
    full = explain(sd, FULL, model=WORLD.name, progress=False)
    sheet(full).save(DOCS / "explain_full.png", optimize=True)
    for part in ("words", "levels", "trajectory", "guidance"):
        sheet(full, parts=(part,)).save(DOCS / f"explain_{part}.png", optimize=True)
    if args.demo:
        tuned = StableDiffusion.from_checkpoint(Path(args.demo) / "run" / "model.safetensors")
        before = explain(sd, SUBJECT, model=WORLD.name, progress=False)
        after = explain(tuned, SUBJECT, model="after minidb demo (DreamBooth)", progress=False)
        side_by_side(sheet(before, parts=("trajectory", "words")), sheet(after, parts=("trajectory", "words")),
                     ("A: the world model (before)", "B: after DreamBooth on the two-tone star")
                     ).save(DOCS / "explain_dreambooth.png", optimize=True)


if __name__ == "__main__":
    main()
