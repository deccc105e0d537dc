"""The streaming export (pipeline.export_model, weights.write_tensors) against the export it replaced:
a fresh fp32 load of the whole base, the trained weights and a merged LoRA put into it, then
safetensors' save_file / torch.save of the converted state dict. The files must hold the same
tensors, bit for bit, in the same order and with the same metadata; and writing must hold at most
one tensor (read, and its converted copy) beyond what the caller holds."""
import dataclasses
import json
import struct
import weakref
import zipfile

import pytest
import safetensors.torch
import torch

from helpers import perturb_
from minidb import weights
from minidb.config import tiny_config
from minidb.errors import CheckpointError
from minidb.lora import add_lora, save_lora
from minidb.pipeline import StableDiffusion, export_model
from minidb.weights import files


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base in both formats, with extras (an fp32 schedule buffer, an int64 counter), trained
    UNet and text-encoder weights, and a rank-2 LoRA file with non-zero up weights."""
    root = tmp_path_factory.mktemp("stream")
    base = StableDiffusion(tiny_config())
    for i, model in enumerate(base.models.values()):
        perturb_(model, seed=40 + i)
    base.extras = {"alphas_cumprod": torch.linspace(0.99, 0.01, 10), "model_ema.num_updates": torch.tensor(7)}
    for name in ("base.safetensors", "base.ckpt"):
        base.save(root / name)
    other = StableDiffusion(tiny_config())
    perturb_(other.unet, seed=50)
    perturb_(other.text_encoder, seed=51)
    trained = {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder")
               for k, v in getattr(other, name).state_dict().items()}
    torch.manual_seed(0)
    network = add_lora({"unet": base.unet, "text_encoder": base.text_encoder}, 2, 4.0)
    perturb_(network, seed=52)
    save_lora(root / "lora.safetensors", network)
    network.detach()
    return root, trained


def reference_export(base, trained: dict, path, dtype, lora=None):
    """The export as it was written before it streamed (minidb.pipeline at commit 50a0d9c)."""
    sd = StableDiffusion.from_checkpoint(base, device="cpu", dtype=torch.float32)
    for name, module in sd.models.items():
        part = {k[len(name) + 1:]: v for k, v in trained.items() if k.startswith(name + ".")}
        if part:
            full = module.state_dict()
            full.update({k: v.to("cpu", torch.float32) for k, v in part.items()})
            module.load_state_dict(full, strict=True)
    if lora is not None:
        sd.load_lora(lora)
        sd.merge_lora()
    tensors = dict(sd.extras)
    for name in ("unet", "vae", "text_encoder"):
        tensors.update({weights.PREFIXES[name] + k: t for k, t in getattr(sd, name).state_dict().items()})
    tensors = {k: t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
               for k, t in tensors.items()}
    config = dataclasses.asdict(sd.config)  # as save_model stores it: tuples stay tuples in a .ckpt
    if str(path).endswith(".safetensors"):
        safetensors.torch.save_file(tensors, path, {"format": "pt", "minidb_config": json.dumps(config)})
    else:
        torch.save({"state_dict": {k: t.clone() if t.untyped_storage().nbytes() != t.nbytes else t
                                   for k, t in tensors.items()}, "minidb_config": config}, path)


def safetensors_parts(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return header.pop("__metadata__"), list(header.items()), data[8 + n:]


def assert_same_file(got, want):
    if str(got).endswith(".safetensors"):
        (meta_a, tensors_a, data_a), (meta_b, tensors_b, data_b) = safetensors_parts(got), safetensors_parts(want)
        assert meta_a == meta_b
        assert tensors_a == tensors_b  # names, dtypes, shapes, byte ranges, in order
        assert data_a == data_b
        return
    a, b = zipfile.ZipFile(got), zipfile.ZipFile(want)
    records = lambda z: {n.partition("/")[2]: z.read(n) for n in z.namelist()  # noqa: E731
                         if not n.endswith("serialization_id")}  # a random id per file
    assert records(a) == records(b)  # the pickle (keys in order, metadata) and every tensor's bytes
    loaded = torch.load(got, weights_only=True)
    assert list(loaded["state_dict"]) == list(torch.load(want, weights_only=True)["state_dict"])


@pytest.mark.parametrize("source", ["base.safetensors", "base.ckpt"])
@pytest.mark.parametrize("out", ["model.safetensors", "model.ckpt"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_full_model_export_equals_the_loading_export(world, tmp_path, source, out, dtype):
    root, trained = world
    export_model(root / source, trained, tmp_path / out, dtype)
    reference_export(root / source, trained, tmp_path / ("ref-" + out), dtype)
    assert_same_file(tmp_path / out, tmp_path / ("ref-" + out))


@pytest.mark.parametrize("out", ["model.safetensors", "model.ckpt"])
def test_merged_lora_export_equals_the_loading_export(world, tmp_path, out):
    root, _ = world
    export_model(root / "base.safetensors", {}, tmp_path / out, torch.float16, lora=root / "lora.safetensors")
    reference_export(root / "base.safetensors", {}, tmp_path / ("ref-" + out), torch.float16, root / "lora.safetensors")
    assert_same_file(tmp_path / out, tmp_path / ("ref-" + out))
    plain = tmp_path / ("plain-" + out)  # the LoRA changed something: the test can fail
    export_model(root / "base.safetensors", {}, plain, torch.float16)
    assert plain.read_bytes() != (tmp_path / out).read_bytes()


def test_lora_run_file_is_unchanged(world, tmp_path):
    """A LoRA run's own file (lora.safetensors, save_lora) through export_state's path: what
    read_lora gives back is what was saved."""
    root, _ = world
    from minidb.lora import read_lora
    state = read_lora(root / "lora.safetensors")
    save_lora(tmp_path / "again.safetensors", state)
    assert safetensors_parts(tmp_path / "again.safetensors")[1:] == safetensors_parts(root / "lora.safetensors")[1:]


def test_stable_diffusion_save_streams_the_same_file(world, tmp_path):
    root, _ = world
    sd = StableDiffusion.from_checkpoint(root / "base.ckpt")
    sd.save(tmp_path / "copy.safetensors", dtype=torch.float16)
    reference_export(root / "base.ckpt", {}, tmp_path / "ref.safetensors", torch.float16)
    assert_same_file(tmp_path / "copy.safetensors", tmp_path / "ref.safetensors")


@pytest.mark.parametrize("out", ["model.safetensors", "model.ckpt"])
def test_export_holds_one_tensor_at_a_time(world, tmp_path, monkeypatch, out):
    """Every tensor read from the base and every converted copy is tracked: when the next one is read,
    none of the earlier ones is alive, so the export never holds more than one tensor of the model
    (read, converted) beyond the trained weights it was given."""
    root, trained = world
    live, peak = [], {"count": 0, "bytes": 0}

    def track(t):
        live.append(weakref.ref(t))
        alive = [r() for r in live if r() is not None]
        peak["count"] = max(peak["count"], len(alive))
        peak["bytes"] = max(peak["bytes"], sum(a.nbytes for a in alive))
        return t

    def checked(get):
        def wrapped(self, key, dtype=None):
            assert not [r for r in live if r() is not None], f"a tensor was still alive when {key} was read"
            return track(get(self, key, dtype))
        return wrapped

    for cls in (files.SafetensorsFile, files.TorchFile):
        monkeypatch.setattr(cls, "get", checked(cls.get))
    converted = files._converted
    monkeypatch.setattr(files, "_converted", lambda t, dtype: track(converted(t, dtype)))
    half = {k: v for k, v in trained.items() if k.startswith("unet.")}  # the text encoder comes from the file
    export_model(root / "base.safetensors", half, tmp_path / out, torch.float16)
    largest = max(shape.numel() for shape, _ in weights.open_checkpoint(root / "base.safetensors").shapes.values())
    assert peak["count"] <= 2  # one tensor read, and its fp16 copy
    assert peak["bytes"] <= largest * (4 + 2)
    assert len(live) > 100  # the tracking saw the export


def test_export_of_a_base_with_nan_names_the_tensor(world, tmp_path):
    root, trained = world
    sd = StableDiffusion.from_checkpoint(root / "base.safetensors")
    with torch.no_grad():
        sd.vae.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    sd.save(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="first_stage_model.encoder.conv_in.weight"):
        export_model(tmp_path / "bad.safetensors", trained, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
    assert not list(tmp_path.glob("*.tmp"))
