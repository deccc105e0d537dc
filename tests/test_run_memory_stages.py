"""What a run frees between its stages (issue #31): the frozen VAE's mapped pages between the stages
that use it, which changes nothing that trains.
The memory itself is measured at SD size by benchmarks/bench_run_memory.py."""
import sys

import pytest
import torch
from safetensors.torch import save_file

import minidb.dreambooth.train
from minidb.pipeline import release_mapped_pages
from minidb.dreambooth.train import train
from minidb.dreambooth.train_config import load_config
from minidb.weights import open_checkpoint
from tests.helpers import dreambooth_world

MIB = 2 ** 20


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def _module(weight: torch.Tensor) -> torch.nn.Module:
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    return module


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/status and madvise: Linux")
def test_a_mapped_frozen_weight_is_handed_back_and_read_again_from_the_file(tmp_path):
    values = torch.randn(8 * MIB // 4, generator=torch.Generator().manual_seed(0))
    save_file({"w": values}, tmp_path / "w.safetensors")
    with open_checkpoint(tmp_path / "w.safetensors") as ckpt:
        module = _module(ckpt.get("w"))  # a view of the mapped file, as a model loaded in the file's dtype
    assert torch.equal(module.weight, values)  # every page touched: resident
    before = _rss_file()
    released = release_mapped_pages(module)
    assert released >= 8 * MIB - 2 * 4096
    assert before - _rss_file() >= 6 * MIB
    assert torch.equal(module.weight, values)  # read back from the file


def test_weights_in_memory_of_their_own_are_left_alone(tmp_path):
    values = torch.randn(MIB, generator=torch.Generator().manual_seed(0))
    module = _module(values.clone())
    assert release_mapped_pages(module) == 0
    assert torch.equal(module.weight, values)
    save_file({"w": values.half()}, tmp_path / "h.safetensors")  # converted on load: a copy, not the file
    with open_checkpoint(tmp_path / "h.safetensors") as ckpt:
        converted = _module(ckpt.get("w", torch.float32))
    assert release_mapped_pages(converted) == 0
    assert torch.equal(converted.weight, values.half().float())


def test_a_trainable_weight_is_refused():
    with pytest.raises(ValueError, match="requires_grad"):
        release_mapped_pages(torch.nn.Linear(4, 4))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return dreambooth_world(tmp_path_factory.mktemp("run_memory"))


def _train(world, out, *sets):
    return train(load_config(None, [
        f"model.base={world / 'base.safetensors'}", f"data.instance_dir={world / 'instance'}",
        "data.instance_prompt=a photo of sks dog", "data.resolution=32", f"train.output_dir={out}",
        "train.steps=2", "optim.lr=1e-3", 'validation.prompts=["a photo of sks dog"]', "validation.every=1",
        "validation.sample_steps=1", *sets]))


def _recording(monkeypatch) -> list:
    released = []

    def recording(*modules):
        released.append({type(m).__name__ for m in modules})
        return release_mapped_pages(*modules)

    monkeypatch.setattr(minidb.dreambooth.train, "release_mapped_pages", recording)
    return released


def test_a_run_releases_the_vae_between_its_stages_and_trains_the_same(world, tmp_path, monkeypatch):
    """center_crop=true: the 32x32 crops never change, the latents are cached, and the steps need no
    encoder: the whole VAE is released after the data set-up, its decoder again after each validation
    grid, which still draws. The trained model is the one a run releasing nothing writes."""
    released = _recording(monkeypatch)
    result = _train(world, tmp_path / "released", "data.center_crop=true")
    monkeypatch.setattr(minidb.dreambooth.train, "release_mapped_pages", lambda *modules: 0)
    kept = _train(world, tmp_path / "kept", "data.center_crop=true")

    assert released == [{"Encoder", "Decoder", "Conv2d"}] * 3  # after the set-up, after each of the two grids
    assert sorted(p.name for p in (result.run_dir / "samples").glob("*.png")) == ["step_000001.png", "step_000002.png"]
    with open_checkpoint(result.model_path) as a, open_checkpoint(kept.model_path) as b:
        assert a.shapes.keys() == b.shapes.keys()
        assert all(torch.equal(a.get(k), b.get(k)) for k in a.shapes)


def test_with_a_latent_cache_the_encoder_is_dropped(world, tmp_path, monkeypatch):
    """Once the latents are cached the encoder goes (meta device), whatever holds its weights (weights in
    memory of their own, on a GPU or from a .ckpt, have no file to be read back from); the decoder stays
    and draws the grids."""
    devices = []
    original = minidb.dreambooth.train.release_vae

    def recording(sd, keep_encoder):
        original(sd, keep_encoder)
        devices.append(({p.device.type for p in sd.vae.encoder.parameters()},
                        {p.device.type for p in sd.vae.decoder.parameters()}))

    monkeypatch.setattr(minidb.dreambooth.train, "release_vae", recording)
    result = _train(world, tmp_path / "run", "data.center_crop=true")
    assert devices == [({"meta"}, {"cpu"})] * 3
    assert len(list((result.run_dir / "samples").glob("*.png"))) == 2


def test_without_a_latent_cache_the_encoder_stays(world, tmp_path, monkeypatch):
    """Random crops (center_crop=false, images larger than the resolution) are encoded every step."""
    released = _recording(monkeypatch)
    _train(world, tmp_path / "run", "data.center_crop=false", "train.steps=1")
    assert released == [{"Decoder", "Conv2d"}] * 2


def test_load_checks_finiteness_without_copies_and_keeps_finite_weights_that_overflow_a_sum(tmp_path):
    """The load checks each weight through its sum (no float and bool copy of it, which fragmented the
    heap); finite weights whose sum overflows are read again and pass, a NaN is still named."""
    from minidb.config import tiny_config
    from minidb.errors import CheckpointError
    from minidb.pipeline import StableDiffusion
    sd = StableDiffusion(tiny_config())
    big = sd.unet.state_dict()["out.2.weight"]
    big.fill_(3e38)  # finite, and its sum is inf
    sd.save(tmp_path / "big.safetensors")
    assert torch.equal(StableDiffusion.from_checkpoint(tmp_path / "big.safetensors").unet.state_dict()["out.2.weight"],
                       big)
    big.view(-1)[0] = float("nan")
    sd.save(tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="out.2.weight"):
        StableDiffusion.from_checkpoint(tmp_path / "nan.safetensors")
