"""Malformed model files are refused before they are used, each in one line naming what is wrong: a
weight of the wrong dtype (in the load plan, before a tensor is read), a stored config with a bad
field, a .ckpt key that is not a name, NaN or infinite weights (by name, before any sampling or
training). Image sizes that cannot fit in memory are refused before loading, and unreadable images
in the user's class folder are named and skipped. CLI cases are typed as a user would (subprocesses)."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from helpers import dreambooth_world
from minidb.config import SDConfig, tiny_config
from minidb.errors import CheckpointError, MinidbError
from minidb.pipeline import StableDiffusion
from minidb.sampling import check_memory, memory_floor
from minidb.dreambooth.train import train
from minidb.dreambooth.train_config import dump_toml, load_config
from minidb.weights import config_from_dict, open_checkpoint

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
CONV_OUT = "first_stage_model.decoder.conv_out.bias"
SHIPPED = Path(__file__).resolve().parent.parent / "minidb" / "data" / "world.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return dreambooth_world(tmp_path_factory.mktemp("model_files"))


def edited(world, path, tensors=None, **config_changes) -> Path:
    """The world's base model saved to `path` with `tensors` replaced and stored-config fields changed
    ({"unet.num_heads": 0}); a .ckpt path is written by torch.save, as other tools write them."""
    source = world / "base.safetensors"
    with safe_open(source, "pt") as f:
        config = json.loads(f.metadata()["minidb_config"])
    for key, value in config_changes.items():
        *parents, name = key.split(".")
        table = config
        for parent in parents:
            table = table[parent]
        table[name] = value
    all_tensors = {**load_file(source), **(tensors or {})}
    if str(path).endswith(".ckpt"):
        torch.save({"state_dict": all_tensors, "minidb_config": config}, path)
    else:
        save_file(all_tensors, path, {"format": "pt", "minidb_config": json.dumps(config)})
    return path


def minidb(*args, timeout=300):
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    environ.pop("MINIDB_CKPT", None)
    return subprocess.run([sys.executable, "-m", "minidb", *map(str, args)], capture_output=True, text=True,
                          env=environ, timeout=timeout)


def one_line_error(proc, command: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"minidb {command}: error: "), proc.stderr
    return lines[0].removeprefix(f"minidb {command}: error: ")


def sample(ckpt, outdir, *more):
    return minidb("sample", "--ckpt", ckpt, "--prompt", "a photo of a dog", "--steps", 1, "--outdir", outdir, *more)


def train_toml(world, tmp_path, base, *more) -> Path:
    sets = [f"model.base={base}", f"data.instance_dir={world / 'instance'}", "data.instance_prompt=a photo of sks dog",
            f"train.output_dir={tmp_path / 'run'}", "train.steps=1", "validation.prompts=[]", *more]
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(load_config(None, sets)), encoding="utf-8")
    return path


# ---- dtypes: refused in the load plan, before any tensor is read ----------------------------------

@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool])
def test_a_weight_of_the_wrong_dtype_is_refused_by_the_load_plan(world, tmp_path, dtype):
    path = edited(world, tmp_path / "m.safetensors", {CONV_IN: torch.ones(32, 4, 3, 3, dtype=dtype)})
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=rf"1 tensor of the wrong dtype: {CONV_IN} is {name}; model weights "
                                              r"are floating point"):
        StableDiffusion.inspect_checkpoint(path)  # the shapes-only check: nothing loaded


def test_half_precision_and_bf16_files_still_load(world, tmp_path):
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(world / "base.safetensors").items()}
    sd = StableDiffusion.from_checkpoint(edited(world, tmp_path / "bf16.safetensors", tensors))
    assert sd.dtype == torch.float32


def test_cli_wrong_dtype_is_one_line_and_writes_nothing(world, tmp_path):
    path = edited(world, tmp_path / "m.safetensors", {CONV_IN: torch.ones(32, 4, 3, 3, dtype=torch.int32)})
    error = one_line_error(sample(path, tmp_path / "out"), "sample")
    assert error.startswith(f"{path}: 1 tensor of the wrong dtype: {CONV_IN} is int32")
    assert not (tmp_path / "out").exists()
    # training: refused before config.toml is written, so the corrected command simply runs
    error = one_line_error(minidb("train", "--config", train_toml(world, tmp_path, path)), "train")
    assert f"{CONV_IN} is int32" in error
    assert not (tmp_path / "run").exists()


# ---- the stored config, field by field --------------------------------------------------------------

BAD_CONFIGS = [
    ({"unet.channel_mult": "ab"}, "unet.channel_mult must be 1 to 8 integers, each from 1 to 256, got 'ab'"),
    ({"unet.channel_mult": []}, "unet.channel_mult must be 1 to 8 integers, each from 1 to 256, got []"),
    ({"vae.ch_mult": [1, 0]}, "vae.ch_mult must be 1 to 8 integers, each from 1 to 256, got [1, 0]"),
    ({"unet.attention_resolutions": ["1"]}, "unet.attention_resolutions must be a list of integers, each from 1 to 256, got ['1']"),
    ({"unet.num_heads": 0}, "unet.num_heads must be an integer from 1 to 65536, got 0"),
    ({"unet.num_heads": 3}, "the UNet width unet.model_channels x 1 = 32 must be a multiple of unet.norm_groups (32) and "
                            "unet.num_heads (3)"),
    ({"unet.model_channels": 32.0}, "unet.model_channels must be an integer from 1 to 65536, got 32.0"),
    ({"unet.num_res_blocks": True}, "unet.num_res_blocks must be an integer from 1 to 256, got True"),
    ({"unet.num_res_blocks": 10 ** 9}, "unet.num_res_blocks must be an integer from 1 to 256, got 1000000000"),
    ({"vae.norm_groups": 0}, "vae.norm_groups must be an integer from 1 to 65536, got 0"),
    ({"vae.norm_groups": 3}, "vae.ch (32) must be a multiple of vae.norm_groups (3)"),
    ({"clip.heads": 3}, "clip.width (32) must be a multiple of clip.heads (3)"),
    ({"clip.layers": None}, "clip.layers must be an integer from 1 to 256, got None"),
    ({"image_size": 1048576}, "image_size must be an integer from 8 to 16384, got 1048576"),
    ({"image_size": 36}, "image_size must be a multiple of 8, got 36"),
    ({"timesteps": 10 ** 12}, "timesteps must be an integer from 2 to 1048576, got 1000000000000"),
    ({"scale_factor": 0}, "scale_factor must be a number above 0, got 0"),
    ({"scale_factor": float("nan")}, "scale_factor must be a number above 0, got nan"),
    ({"linear_end": 1.5}, "linear_end must be a number between 0 and 1, exclusive, got 1.5"),
    ({"linear_start": 0.5}, "linear_start (0.5) must not exceed linear_end (0.012)"),
    ({"parameterization": "x0"}, "parameterization must be one of 'eps', 'v', got 'x0'"),
    ({"unet.bogus": 1}, "unet.bogus: no such field"),
    ({"unet": "big"}, "unet must be a table of fields, got 'big'"),
]


@pytest.mark.parametrize("changes, message", BAD_CONFIGS, ids=[next(iter(c)) + "=" + repr(next(iter(c.values())))
                                                               for c, _ in BAD_CONFIGS])
def test_a_bad_stored_config_field_is_named(world, tmp_path, changes, message):
    path = edited(world, tmp_path / "m.safetensors", **changes)
    with pytest.raises(CheckpointError) as e:
        StableDiffusion.inspect_checkpoint(path)
    assert str(e.value) == f"{path}: the minidb config stored in the file is invalid: {message}"


def test_good_configs_pass_the_field_checks_unchanged():
    with open_checkpoint(SHIPPED) as ckpt:  # the shipped miniature world: a v-model, 3 levels, 8 groups
        shipped = ckpt.config
    for values in (shipped, dataclasses.asdict(SDConfig()), dataclasses.asdict(tiny_config())):
        config = config_from_dict(json.loads(json.dumps(values)))  # lists, as JSON gives them back
        assert json.loads(json.dumps(dataclasses.asdict(config))) == json.loads(json.dumps(values))
    assert config_from_dict({}) == SDConfig()  # fields a file lacks take their defaults
    assert config_from_dict({"image_size": 64}).image_size == 64


def test_a_config_that_is_not_a_table_is_named(tmp_path, world):
    path = tmp_path / "m.safetensors"
    save_file(load_file(world / "base.safetensors"), path, {"format": "pt", "minidb_config": "[1, 2]"})
    with pytest.raises(CheckpointError, match=r"config stored in the file is invalid: it must be a table of fields"):
        StableDiffusion.inspect_checkpoint(path)


@pytest.mark.parametrize("changes, message", [
    ({"unet.channel_mult": "ab"}, "unet.channel_mult must be 1 to 8 integers, each from 1 to 256, got 'ab'"),
    ({"unet.num_heads": 0}, "unet.num_heads must be an integer from 1 to 65536, got 0"),
    ({"image_size": 1048576}, "image_size must be an integer from 8 to 16384, got 1048576"),
])
def test_cli_bad_stored_config_is_one_line_naming_the_field(world, tmp_path, changes, message):
    path = edited(world, tmp_path / "m.safetensors", **changes)
    assert one_line_error(sample(path, tmp_path / "out"), "sample") == (
        f"{path}: the minidb config stored in the file is invalid: {message}")
    assert not (tmp_path / "out").exists()


# ---- .ckpt keys that are not names -------------------------------------------------------------------

def test_a_ckpt_key_that_is_not_a_name(world, tmp_path):
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": {**load_file(world / "base.safetensors"), 7: torch.zeros(2)}}, path)
    message = (f"{path}: holds tensors under keys that are not names (1, e.g. 7 of type int); a checkpoint maps "
               "tensor names to tensors")
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(path)
    assert str(e.value) == message
    assert one_line_error(sample(path, tmp_path / "out"), "sample") == message


def test_a_ckpt_with_its_config_loads(world, tmp_path):
    sd = StableDiffusion.from_checkpoint(edited(world, tmp_path / "m.ckpt"))
    assert sd.config == tiny_config()


# ---- NaN and infinite weights: named, before any sampling or training ----------------------------

def nan_model(world, path):
    conv_in = load_file(world / "base.safetensors")[CONV_IN].clone()
    conv_in[0, 0, 0, 0] = float("nan")
    return edited(world, path, {CONV_IN: conv_in, CONV_OUT: torch.tensor([0.0, float("inf"), 0.0])})


def test_nan_and_inf_weights_are_named(world, tmp_path):
    path = nan_model(world, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError) as e:
        StableDiffusion.from_checkpoint(path)
    assert str(e.value) == (f"{path}: NaN or infinite values in 2 tensors: {CONV_OUT}, {CONV_IN}; the file is "
                            "damaged, or was saved from a training run that diverged")


def test_weights_beyond_float16_are_told_apart_from_a_damaged_file(world, tmp_path):
    conv_in = load_file(world / "base.safetensors")[CONV_IN].clone()
    conv_in[0, 0, 0, 0] = 1e6  # finite in float32, inf in float16
    path = edited(world, tmp_path / "big.safetensors", {CONV_IN: conv_in})
    assert StableDiffusion.from_checkpoint(path).unet.input_blocks[0][0].weight[0, 0, 0, 0] == 1e6
    with pytest.raises(CheckpointError, match=rf"NaN or infinite values in 1 tensor: {CONV_IN}; they are finite in "
                                              r"the file but exceed float16's range: load it in float32"):
        StableDiffusion.from_checkpoint(path, dtype=torch.float16)


def test_cli_nan_weights_sample_nothing_and_train_nothing(world, tmp_path):
    path = nan_model(world, tmp_path / "nan.safetensors")
    proc = sample(path, tmp_path / "out")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        f"minidb sample: error: {path}: NaN or infinite values in 2 tensors: {CONV_OUT}, {CONV_IN}; the file is "
        "damaged, or was saved from a training run that diverged")
    assert "Traceback" not in proc.stderr and not list((tmp_path / "out").rglob("*.png"))  # no black image

    toml = train_toml(world, tmp_path, path)
    proc = minidb("train", "--config", toml)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        f"minidb train: error: {path}: NaN or infinite values in 2 tensors")
    assert "Traceback" not in proc.stderr
    run = tmp_path / "run"
    assert not (run / "config.toml").exists() and not (run / "checkpoints").exists()
    # the corrected command runs: the folder holds no run that a good base would differ from
    result = train(load_config(toml, [f"model.base={world / 'base.safetensors'}"]))
    assert result.step == 1 and result.model_path.is_file()


# ---- image sizes against a memory estimate --------------------------------------------------------

def test_memory_floor_accepts_usual_sizes_and_refuses_absurd_ones(monkeypatch):
    import minidb.sampling
    monkeypatch.setattr(minidb.sampling, "machine_memory", lambda device=None: (16 << 30, "RAM"))
    for size in (512, 768, 1024):
        for itemsize in (2, 4):
            check_memory(SDConfig(), size, size, 4, itemsize)
    check_memory(SDConfig(), 768, 1024)
    assert memory_floor(SDConfig(), 1024, 1024) < memory_floor(SDConfig(), 1048576, 512)  # grows with the area
    with pytest.raises(MinidbError, match=r"^512x1048576 needs at least 1.0 TiB of memory for its activations "
                                          r"alone, more than the 16.0 GiB of RAM here: choose a smaller size$"):
        check_memory(SDConfig(), 1048576, 512)
    with pytest.raises(MinidbError, match=r"^512x512 x 100000 images needs at least .* or fewer images at once$"):
        check_memory(SDConfig(), 512, 512, 100000)


def test_the_library_checks_the_size_before_allocating(world):
    sd = StableDiffusion.from_checkpoint(world / "base.safetensors")
    with pytest.raises(MinidbError, match=r"^1048576x1048576 needs at least 512.0 TiB of memory"):
        sd.generate("a photo of a dog", height=1048576, width=1048576, steps=1)


@pytest.mark.parametrize("size", [["--H", 1048576, "--W", 1048576], ["--W", 1048576, "--H", 65536]])
def test_cli_sample_refuses_a_size_that_cannot_fit_before_loading(world, tmp_path, size):
    error = one_line_error(sample(world / "base.safetensors", tmp_path / "out", *size), "sample")
    assert error.startswith("--H/--W: ") and "of memory for its activations alone, more than the" in error
    assert error.endswith("here: choose a smaller size")
    assert not (tmp_path / "out").exists()


def test_cli_sample_usual_sizes_pass_the_memory_check(world, tmp_path):
    proc = sample(world / "base.safetensors", tmp_path / "out", "--H", 64, "--W", 48, "--seed", 0, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "out" / "samples" / "00000.png").size == (48, 64)


# ---- the user's class folder: unreadable images named and skipped ------------------------------------

def test_a_truncated_jpeg_in_the_class_folder_is_named_and_skipped(tmp_path):
    world = dreambooth_world(tmp_path, class_images=2)
    jpeg = world / "class" / "broken.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(jpeg, quality=95)
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    toml = train_toml(world, tmp_path, world / "base.safetensors", "data.resolution=32",
                      "prior.class_prompt=a photo of a dog", f"prior.class_dir={world / 'class'}",
                      "prior.num_class_images=3")
    proc = minidb("train", "--config", toml)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "broken.jpg" in line]
    assert len(warned) == 1, proc.stderr
    assert f"class images: skipping 1 file(s) of {world / 'class'} that are not readable images: broken.jpg" in warned[0]
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "run" / "model.safetensors").is_file()
