"""StableDiffusion.save / from_checkpoint on tiny random models: what goes in comes back out."""
import dataclasses

import pytest
import safetensors.torch
import torch
from helpers import perturb_
from test_weights import BAD_FILES, _RunsCode, sd_v1_layout, tiny_models

import minidb.sampling
from minidb.config import tiny_config
from minidb.errors import CheckpointError
from minidb.pipeline import StableDiffusion
from minidb.weights import write_tensors


def outputs(sd: StableDiffusion) -> dict:
    """Every model's output on fixed inputs (in the models' dtype, computed on the CPU)."""
    g = torch.Generator().manual_seed(1)
    cfg = sd.config
    ids = torch.randint(0, cfg.clip.vocab_size, (2, cfg.clip.max_length), generator=g)
    x = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    with torch.no_grad():
        context = sd.text_encoder(ids)
        return {"text": context,
                "eps": sd.unet(x.to(sd.dtype), torch.tensor([10, 900]), context),
                "mean": sd.vae.encode(image.to(sd.dtype)).mean,
                "image": sd.vae.decode(x[:1].to(sd.dtype))}


def assert_same_outputs(a: dict, b: dict):
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_saved_model_reloads_with_identical_outputs(tmp_path, suffix):
    sd = tiny_models()
    sd.save(tmp_path / ("tiny" + suffix))
    loaded = StableDiffusion.from_checkpoint(tmp_path / ("tiny" + suffix))  # config from the file
    assert loaded.config == sd.config == tiny_config()
    assert_same_outputs(outputs(sd), outputs(loaded))


def test_fp16_file_into_fp32_model(tmp_path):
    sd = tiny_models()
    sd.save(tmp_path / "half.safetensors", dtype=torch.float16)
    loaded = StableDiffusion.from_checkpoint(tmp_path / "half.safetensors", dtype=torch.float32)
    for name, model in sd.models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.models[name].state_dict()[key], value.half().float()), key


def test_loaded_models_are_ready_for_inference(tmp_path):
    tiny_models().save(tmp_path / "tiny.ckpt")
    sd = StableDiffusion.from_checkpoint(tmp_path / "tiny.ckpt", dtype=torch.float16)
    assert sd.dtype == torch.float16 and sd.device == torch.device("cpu")
    for model in sd.models.values():
        assert not model.training
        for p in model.parameters():
            assert p.dtype == torch.float16 and not p.requires_grad and p.device.type == "cpu"
    assert sd.to(dtype=torch.float32) is sd and sd.dtype == torch.float32
    assert all(p.dtype == torch.float32 for m in sd.models.values() for p in m.parameters())
    assert sd.tokenizer("a photo").shape == (1, 77)
    assert sd.schedule.alphas_cumprod.shape == (1000,)


def test_random_init_and_generate_delegates(monkeypatch):
    sd = StableDiffusion(tiny_config())
    assert sd.config == tiny_config() and sd.device == torch.device("cpu") and sd.dtype == torch.float32
    assert not any(p.requires_grad for m in sd.models.values() for p in m.parameters())
    calls = []
    monkeypatch.setattr(minidb.sampling, "generate", lambda *a, **k: calls.append((a, k)) or ["image"])
    assert sd.generate(["a cat"], steps=3) == ["image"]
    assert calls == [((sd, ["a cat"]), {"steps": 3})]


def test_file_without_our_config_means_sd_v1(tmp_path):
    """A file without minidb's metadata (say, one from another tool) is read as SD v1, so a
    tiny one does not fit unless told its config."""
    path = tmp_path / "other_tool.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd_v1_layout(tiny_models()).items()}, path)
    with pytest.raises(CheckpointError, match="another config, pass that config"):
        StableDiffusion.from_checkpoint(path)
    assert StableDiffusion.from_checkpoint(path, config=tiny_config()).config == tiny_config()


def test_extras_are_written_back(tmp_path):
    sd = tiny_models()
    write_tensors(tmp_path / "orig.safetensors", sd_v1_layout(sd))
    StableDiffusion.from_checkpoint(tmp_path / "orig.safetensors", config=tiny_config()).save(tmp_path / "copy.ckpt")
    saved = torch.load(tmp_path / "copy.ckpt", weights_only=True)["state_dict"]
    original = safetensors.torch.load_file(tmp_path / "orig.safetensors")
    assert saved.keys() == original.keys()
    for key in original:
        assert torch.equal(saved[key], original[key]), key


def test_ema_weights_give_the_ema_model(tmp_path):
    sd = tiny_models()
    write_tensors(tmp_path / "ema.ckpt", sd_v1_layout(sd, ema_seed=5), config=None)
    ema_model = tiny_models()
    perturb_(ema_model.unet, 5)  # the UNet that sd_v1_layout stored as model_ema.*
    loaded = StableDiffusion.from_checkpoint(tmp_path / "ema.ckpt", config=tiny_config(), ema=True)
    assert_same_outputs(outputs(ema_model), outputs(loaded))
    plain = StableDiffusion.from_checkpoint(tmp_path / "ema.ckpt", config=tiny_config())
    assert_same_outputs(outputs(sd), outputs(plain))
    assert not torch.equal(outputs(plain)["eps"], outputs(loaded)["eps"])


@pytest.mark.parametrize("case", list(BAD_FILES) + ["code-running pickle"])
def test_from_checkpoint_raises_checkpoint_error_on_bad_files(tmp_path, case):
    if case == "code-running pickle":
        torch.save({"state_dict": {}, "x": _RunsCode(print, "ran")}, tmp_path / "evil.ckpt")
        path = tmp_path / "evil.ckpt"
    else:
        path = BAD_FILES[case][0](tmp_path)
    with pytest.raises(CheckpointError):
        StableDiffusion.from_checkpoint(path)


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_inspect_checkpoint_refuses_what_from_checkpoint_refuses(tmp_path, case):
    path = BAD_FILES[case][0](tmp_path)
    with pytest.raises(CheckpointError, match=BAD_FILES[case][1]):
        StableDiffusion.inspect_checkpoint(path)


def test_inspect_checkpoint_reads_the_config_and_checks_shapes_without_reading_tensors(tmp_path, monkeypatch):
    sd = tiny_models()
    sd.save(tmp_path / "tiny.safetensors")
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd_v1_layout(sd).items()}, tmp_path / "other.safetensors")
    from minidb.weights.files import SafetensorsFile

    def no_reading(*args):
        raise AssertionError("a tensor was read")
    monkeypatch.setattr(SafetensorsFile, "get", no_reading)
    assert StableDiffusion.inspect_checkpoint(tmp_path / "tiny.safetensors") == tiny_config()
    with pytest.raises(CheckpointError, match="lacks 520 tensors of the UNet"):  # no stored config: SD v1
        StableDiffusion.inspect_checkpoint(tmp_path / "other.safetensors")


def test_image_size_is_stored_and_older_files_without_it_load_as_512(tmp_path):
    """SDConfig.image_size: the default size for sampling and fine-tuning, stored in the file's
    metadata. Files minidb wrote before the field existed lack it and mean SD v1's 512."""
    sd = tiny_models()
    assert sd.config.image_size == 32
    sd.save(tmp_path / "tiny.safetensors")
    assert StableDiffusion.from_checkpoint(tmp_path / "tiny.safetensors").config.image_size == 32
    older = dataclasses.asdict(tiny_config())
    del older["image_size"]
    write_tensors(tmp_path / "older.safetensors", sd_v1_layout(sd), config=older)
    loaded = StableDiffusion.from_checkpoint(tmp_path / "older.safetensors")
    assert loaded.config == dataclasses.replace(tiny_config(), image_size=512)


def test_sampling_defaults_to_the_models_image_size():
    sd = tiny_models()
    assert minidb.sampling.sample_latents(sd, "a cat", steps=1, seed=0, progress=False).shape == (1, 4, 16, 16)
    small = StableDiffusion.__new__(StableDiffusion)
    small.__dict__.update(sd.__dict__, config=dataclasses.replace(sd.config, image_size=16))
    assert small.generate("a cat", steps=1, seed=0, progress=False)[0].size == (16, 16)
    assert sd.generate("a cat", steps=1, seed=0, height=16, width=24, progress=False)[0].size == (24, 16)
