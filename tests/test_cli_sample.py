"""`minidb sample` end to end on a tiny checkpoint: files, sizes, PNG metadata, grids, seeds,
checkpoint discovery, and a clear one-line error (exit 2, no traceback) for each bad input."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import assert_same_image_up_to_rounding, perturb_
from minidb.cli import main
from minidb.config import tiny_config
from minidb.pipeline import StableDiffusion

TINY_ARGS = ["--steps", "3", "--H", "32", "--W", "48", "--no-progress"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    sd = StableDiffusion(tiny_config())
    for i, model in enumerate(sd.models.values()):
        perturb_(model, seed=20 + i)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    sd.save(path)
    return path


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder with no $MINIDB_CKPT, so nothing is found by accident."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MINIDB_CKPT", raising=False)
    return tmp_path


def sha10(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:10]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)


def test_sample_writes_images_metadata_and_grid(ckpt, in_tmp, capsys):
    out = in_tmp / "out"
    rc = main(["sample", "--ckpt", str(ckpt), "--prompt", "a photo of sks dog", "--negative-prompt", "blurry",
               "--n-samples", "2", "--n-iter", "2", "--seed", "42", "--scale", "5", "--outdir", str(out), *TINY_ARGS])
    assert rc == 0
    files = sorted((out / "samples").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    for i, f in enumerate(files):
        image = Image.open(f)
        assert image.size == (48, 32) and image.mode == "RGB"
        text = image.text
        assert text["parameters"] == (
            "a photo of sks dog\nNegative prompt: blurry\n"
            f"Steps: 3, Sampler: DDIM, CFG scale: 5, Seed: {42 + i}, Size: 48x32, "
            f"Model hash: {sha10(ckpt)}, Model: tiny.safetensors")
        assert text["prompt"] == "a photo of sks dog" and text["negative_prompt"] == "blurry"
        assert text["seed"] == str(42 + i) and text["sampler"] == "ddim"
        assert text["steps"] == "3" and text["scale"] == "5" and text["checkpoint_hash"] == sha10(ckpt)
    grid = Image.open(out / "grid-0000.png")
    assert grid.size == (2 * 48, 2 * 32)  # one row per --n-iter, --n-samples columns
    g = np.asarray(grid.convert("RGB"), dtype=int)
    assert np.array_equal(g[32:, 48:], pixels(files[3]))  # row 2 (second batch), column 2
    assert not np.array_equal(pixels(files[0]), pixels(files[1]))
    assert "Traceback" not in capsys.readouterr().err

    # the same seed gives the same image in a batch of 1 (up to rounding); numbering continues after the last run
    assert main(["sample", "--ckpt", str(ckpt), "--prompt", "a photo of sks dog", "--negative-prompt", "blurry",
                 "--seed", "43", "--scale", "5", "--outdir", str(out), *TINY_ARGS]) == 0
    assert_same_image_up_to_rounding(pixels(out / "samples" / "00004.png"), pixels(files[1]))
    assert (out / "grid-0001.png").exists()


def test_without_scale_the_models_own_guidance_is_used(in_tmp):
    """No --scale: the guidance scale stored in the model's file (config.guidance), said in the PNG."""
    import dataclasses
    sd = StableDiffusion(dataclasses.replace(tiny_config(), guidance=2.5))
    path = in_tmp / "own.safetensors"
    sd.save(path)
    assert main(["sample", "--ckpt", str(path), "--prompt", "a dog", "--seed", "1", "--outdir", "o", *TINY_ARGS]) == 0
    text = Image.open(in_tmp / "o" / "samples" / "00000.png").text
    assert text["scale"] == "2.5" and "CFG scale: 2.5," in text["parameters"]


def test_from_file_sampler_and_checkpoint_discovery_as_subprocess(ckpt, in_tmp):
    """`python -m minidb sample` with no --ckpt finds the one file in ./checkpoints/."""
    (in_tmp / "checkpoints").mkdir()
    os.link(ckpt, in_tmp / "checkpoints" / "model.safetensors")
    (in_tmp / "prompts.txt").write_text("a red cube\n\n  a blue sphere  \n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "MINIDB_CKPT"}
    proc = subprocess.run([sys.executable, "-m", "minidb", "sample", "--from-file", "prompts.txt", "--sampler",
                           "dpm++2m", "--precision", "fp32", "--device", "cpu", "--seed", "7", "--outdir", "o",
                           *TINY_ARGS], cwd=in_tmp, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    samples = sorted((in_tmp / "o" / "samples").glob("*.png"))
    assert len(samples) == 2 and len(list((in_tmp / "o").glob("grid-*.png"))) == 2
    texts = [Image.open(f).text for f in samples]
    assert [t["prompt"] for t in texts] == ["a red cube", "a blue sphere"]
    assert [t["seed"] for t in texts] == ["7", "8"]
    assert "Sampler: DPM++ 2M" in texts[0]["parameters"] and "Negative prompt" not in texts[0]["parameters"]
    assert texts[0]["checkpoint"] == "model.safetensors"


def run_error(args, capsys):
    rc = main(["sample", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("minidb sample: error:")
    return err


def test_no_checkpoint_falls_back_to_the_world_model_and_says_so(in_tmp, monkeypatch, capsys):
    from minidb.cli import sample
    world = sample.find_checkpoint(None)
    assert world.name == "world.safetensors" and world.is_file()
    said = capsys.readouterr().err
    assert "miniature-world model" in said and "not Stable Diffusion" in said
    # without the shipped file: the old message says where a checkpoint goes
    monkeypatch.setattr(sample.Path, "is_file", lambda self: False)
    err = run_error(["--prompt", "x", *TINY_ARGS], capsys)
    assert "--ckpt" in err and "MINIDB_CKPT" in err and "checkpoints" in err


def test_env_checkpoint_and_several_in_folder(ckpt, in_tmp, monkeypatch, capsys):
    (in_tmp / "checkpoints").mkdir()
    for name in ("a.safetensors", "b.ckpt"):
        (in_tmp / "checkpoints" / name).write_bytes(b"x")
    assert "choose one with --ckpt" in run_error(["--prompt", "x", *TINY_ARGS], capsys)
    monkeypatch.setenv("MINIDB_CKPT", str(ckpt))
    assert main(["sample", "--prompt", "x", "--outdir", "o", *TINY_ARGS]) == 0
    assert Image.open(in_tmp / "o" / "samples" / "00000.png").text["checkpoint"] == "tiny.safetensors"


@pytest.mark.parametrize("args,message", [
    (["--H", "36"], "multiple of 8"),
    (["--W", "20"], "multiple of 8"),
    (["--steps", "0"], "--steps"),
    (["--sampler", "plms", "--eta", "0.5"], "eta"),
    (["--n-samples", "0"], "--n-samples"),
])
def test_bad_arguments(ckpt, in_tmp, capsys, args, message):
    assert message in run_error(["--ckpt", str(ckpt), "--prompt", "x", *TINY_ARGS, *args], capsys)
    assert not (in_tmp / "outputs").exists()


def test_bad_checkpoint_and_missing_files(in_tmp, capsys):
    (in_tmp / "bad.safetensors").write_bytes(b"not a checkpoint at all")
    run_error(["--ckpt", "bad.safetensors", "--prompt", "x", *TINY_ARGS], capsys)
    assert "not found" in run_error(["--ckpt", "missing.ckpt", "--prompt", "x", *TINY_ARGS], capsys)
    assert "prompts" in run_error(["--ckpt", "bad.safetensors", "--from-file", "nope.txt", *TINY_ARGS], capsys)


def test_long_prompt_warns_and_goes_on(ckpt, in_tmp, capsys):
    prompt = "a very detailed painting of a castle " * 12  # ~84 tokens
    assert main(["sample", "--ckpt", str(ckpt), "--prompt", prompt, "--outdir", "o", *TINY_ARGS]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "77" in err and "Traceback" not in err
    assert (in_tmp / "o" / "samples" / "00000.png").exists()


def test_help_keeps_the_examples_as_written(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert '    minidb sample --prompt "a photo of an astronaut riding a horse" --n-samples 4 --seed 42' in lines
    assert "    minidb sample --from-file prompts.txt --sampler dpm++2m --steps 20 --precision fp16" in lines
    assert "the model's image size" in " ".join(out.split())  # --H/--W's default
