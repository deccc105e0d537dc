"""minidb.weights: reading and writing SD v1 checkpoints, and every way a file can be wrong.

The file formats are checked against the `safetensors` package (both directions) and torch.save;
the layout against the key counts of SD v1 (686 UNet, 248 VAE, 196 text-encoder tensors).
"""
import json
import os
import struct
import sys
import types
import zipfile
from dataclasses import replace

import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import perturb_

from minidb.config import SDConfig, tiny_config
from minidb.errors import CheckpointError
from minidb.pipeline import StableDiffusion
from minidb.weights import (EXTRA_KEYS, PREFIXES, ema_key, load_models, open_checkpoint, save_model,
                            write_tensors)
from minidb.weights.sd1 import SCHEDULE_BUFFERS

POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def tiny_models(seed=0, config=None):
    sd = StableDiffusion(config or tiny_config())
    for i, model in enumerate(sd.models.values()):
        perturb_(model, seed + i)
    return sd


def usual_extras():
    """The non-model buffers of a CompVis SD v1 checkpoint."""
    extras = {name: torch.rand(1000, dtype=torch.float32) for name in SCHEDULE_BUFFERS}
    extras[POSITION_IDS] = torch.arange(77)[None]
    extras["model_ema.decay"] = torch.tensor(0.9999)
    extras["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    return extras


def sd_v1_layout(sd, extras=True, ema_seed=None) -> dict:
    """The tiny model's tensors under their checkpoint names (what CompVis' state_dict() gives)."""
    tensors = usual_extras() if extras else {}
    for name, model in sd.models.items():
        tensors.update({PREFIXES[name] + k: v for k, v in model.state_dict().items()})
    if ema_seed is not None:  # LitEma's copy of the UNet, with other values
        ema = perturb_(tiny_models(config=sd.config).unet, ema_seed).state_dict()
        tensors.update({ema_key(k): v for k, v in ema.items()})
    return tensors


def load_all(path, config=None, dtype=None, ema=False):
    """Load a file into meta-device models the way StableDiffusion.from_checkpoint does."""
    sd = StableDiffusion.__new__(StableDiffusion)
    sd._build(config or tiny_config(), "meta")
    with open_checkpoint(path) as ckpt:
        extras = load_models(ckpt, sd.models, dtype=dtype, ema=ema)
        keys = set(ckpt.shapes)
    return sd, extras, keys


def all_tensors(sd, extras) -> dict:
    return {**{f"{n}.{k}": v for n, m in sd.models.items() for k, v in m.state_dict().items()}, **extras}


# --- the file formats ------------------------------------------------------------------------

ODD_TENSORS = {"f32": torch.randn(3, 4), "f16": torch.randn(5).half(), "bf16": torch.randn(2, 2).bfloat16(),
               "f64": torch.randn(2).double(), "i64": torch.tensor(3), "i32": torch.arange(4, dtype=torch.int32),
               "empty": torch.zeros(0, 3), "bool": torch.tensor([True, False]), "u8": torch.arange(7, dtype=torch.uint8)}


def test_safetensors_written_by_the_reference_package_read_back_exactly(tmp_path):
    path = tmp_path / "ref.safetensors"
    safetensors.torch.save_file(ODD_TENSORS, path, metadata={"minidb_config": json.dumps({"a": [1, 2]})})
    with open_checkpoint(path) as ckpt:
        assert ckpt.config == {"a": [1, 2]}
        assert set(ckpt.shapes) == set(ODD_TENSORS)
        for k, t in ODD_TENSORS.items():
            got = ckpt.get(k)
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), k


def test_safetensors_we_write_are_read_exactly_by_the_reference_package(tmp_path):
    path = tmp_path / "ours.safetensors"
    write_tensors(path, ODD_TENSORS, config={"unet": {"channel_mult": (1, 2)}})
    loaded = safetensors.torch.load_file(path)
    assert set(loaded) == set(ODD_TENSORS)
    for k, t in ODD_TENSORS.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k
    with safetensors.safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["minidb_config"]) == {"unet": {"channel_mult": [1, 2]}}


def test_ckpt_written_by_torch_save_nested_or_flat(tmp_path):
    tensors = {"a": torch.randn(4, 3), "b": torch.arange(5)}
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": tensors}, tmp_path / "nested.ckpt")
    torch.save(tensors, tmp_path / "flat.ckpt")
    for name in ("nested.ckpt", "flat.ckpt"):
        with open_checkpoint(tmp_path / name) as ckpt:
            assert set(ckpt.shapes) == {"a", "b"}
            assert torch.equal(ckpt.get("a"), tensors["a"]) and torch.equal(ckpt.get("b"), tensors["b"])
            copy = ckpt.get("a")  # its own memory, not a view of the mapped file
            assert copy.untyped_storage().data_ptr() != ckpt._tensors["a"].untyped_storage().data_ptr()


def test_ckpt_with_lightning_callbacks_and_numpy_scalars_loads_without_running_them(tmp_path, monkeypatch):
    """Original SD .ckpt files pickle Lightning's ModelCheckpoint and numpy scalars beside the weights."""
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        def __init__(self):
            self.dirpath, self.best_model_score, self.kth_value = "/logs", torch.tensor(0.1), np.float64(2.0)

        def __setstate__(self, state):
            raise AssertionError("Lightning code ran during loading")

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    for name in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__):
        monkeypatch.setitem(sys.modules, name, module)
    torch.save({"epoch": 6, "global_step": np.int64(470000), "callbacks": {"cb": ModelCheckpoint()},
                "state_dict": {"w": torch.ones(3)}}, tmp_path / "lightning.ckpt")
    monkeypatch.delitem(sys.modules, module.__name__)  # unpickling must not need it
    with open_checkpoint(tmp_path / "lightning.ckpt") as ckpt:
        assert torch.equal(ckpt.get("w"), torch.ones(3))


class _RunsCode:
    def __init__(self, func, arg):
        self.func, self.arg = func, arg

    def __reduce__(self):
        return self.func, (self.arg,)


@pytest.mark.parametrize("func", [os.system, exec], ids=["os.system", "exec"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4])  # 4 imports the function with STACK_GLOBAL instead of GLOBAL
def test_ckpt_that_would_run_code_is_refused(tmp_path, func, protocol):
    marker = tmp_path / "ran"
    payload = f"touch {marker}" if func is os.system else f"open({str(marker)!r}, 'w')"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": _RunsCode(func, payload)}, tmp_path / "evil.ckpt",
               pickle_protocol=protocol)
    message = ("refused to unpickle: it asks for (posix.system|exec), which could run arbitrary code" if protocol == 2
               else "holds objects other than tensors and plain containers, which minidb does not unpickle")
    with pytest.raises(CheckpointError, match=message):
        open_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_write_is_atomic(tmp_path):
    path = tmp_path / "model.safetensors"
    write_tensors(path, {"w": torch.ones(2)})
    before = path.read_bytes()
    with pytest.raises(KeyError):  # complex numbers have no safetensors dtype: fails mid-write
        write_tensors(path, {"w": torch.zeros(2), "z": torch.zeros(2, dtype=torch.complex64)})
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temporary file left behind


# --- files that are not (SD v1) checkpoints ----------------------------------------------------

def _tiny_file(tmp_path, name="tiny.safetensors", edit=None, **kw):
    tensors = sd_v1_layout(tiny_models(), **kw)
    if edit:
        tensors = edit(tensors)
    write_tensors(tmp_path / name, tensors)
    return tmp_path / name


def _rename(old, new):
    return lambda ts: {k.replace(old, new): v for k, v in ts.items()}


def _set(key, value):
    return lambda ts: {**ts, key: value}


def _raw(name, data: bytes):
    def make(tmp_path):
        (tmp_path / name).write_bytes(data)
        return tmp_path / name
    return make


def _written(name, tensors):
    def make(tmp_path):
        write_tensors(tmp_path / name, tensors)
        return tmp_path / name
    return make


def _png(tmp_path):
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "image.safetensors", format="PNG")
    return tmp_path / "image.safetensors"


def _truncate(fraction, name):
    def make(tmp_path):
        path = _tiny_file(tmp_path, name)
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * fraction)])
        return path
    return make


def _corrupt_safetensors_header(tmp_path):
    path = _tiny_file(tmp_path)
    data = bytearray(path.read_bytes())
    data[9:30] = b"#" * 21  # inside the JSON header
    path.write_bytes(bytes(data))
    return path


def _corrupt_ckpt(tmp_path):
    path = _tiny_file(tmp_path, "tiny.ckpt")
    data = bytearray(path.read_bytes())
    data[-200:] = os.urandom(200)  # the zip's central directory
    path.write_bytes(bytes(data))
    return path


def _corrupt_ckpt_pickle(tmp_path):
    """A readable zip whose data.pkl is garbage (a bad download, a disk error)."""
    path = _tiny_file(tmp_path, "tiny.ckpt")
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)  # past the local header
    data[start:start + info.file_size] = b"\x00\xff" * (info.file_size // 2) + b"\x00" * (info.file_size % 2)
    path.write_bytes(bytes(data))
    return path


_INPAINT = "model.diffusion_model.input_blocks.0.0.weight"
_DIFFUSERS = {"conv_in.weight": torch.zeros(32, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(32, 32, 3, 3),
              "mid_block.attentions.0.proj_in.weight": torch.zeros(64, 64)}
_LORA = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
         "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4),
         "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0)}

# name -> (make(tmp_path) -> path, what the message must say)
BAD_FILES = {
    "missing": (lambda p: p / "nowhere.safetensors", "no such file"),
    "directory": (lambda p: p, "is a directory"),
    "empty": (_raw("e.ckpt", b""), "is empty"),
    "text": (_raw("t.ckpt", b"model: sd-v1-5\nsteps: 50\n"), "text file"),
    "png": (_png, "PNG image"),
    "random bytes": (_raw("r.ckpt", bytes(range(256)) * 40), "in no format minidb knows"),
    "git lfs pointer": (_raw("l.ckpt", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 4265380512\n"),
                        "Git LFS pointer"),
    "truncated safetensors header": (_truncate(0.00001, "tiny.safetensors"), "truncated"),
    "truncated safetensors data": (_truncate(0.7, "tiny.safetensors"), "truncated"),
    "corrupt safetensors header": (_corrupt_safetensors_header, "corrupt safetensors header"),
    "truncated ckpt": (_truncate(0.7, "tiny.ckpt"), "truncated or corrupt"),
    "corrupt ckpt": (_corrupt_ckpt, "truncated or corrupt"),
    "corrupt ckpt pickle": (_corrupt_ckpt_pickle, "is corrupt"),
    "a safetensors of something else": (
        _written("resnet.safetensors", {"fc.weight": torch.zeros(10, 5), "conv1.weight": torch.zeros(4, 3, 7, 7)}),
        "not a Stable Diffusion checkpoint.*conv1.weight, fc.weight"),
    "SD 2.x": (lambda p: _tiny_file(p, edit=_rename("cond_stage_model.transformer.", "cond_stage_model.model.")),
               "SD 2.x.*minidb loads Stable Diffusion 1.x"),
    "SDXL": (lambda p: _tiny_file(p, edit=_rename("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")),
             "SDXL.*minidb loads Stable Diffusion 1.x"),
    "inpainting": (lambda p: _tiny_file(p, edit=_set(_INPAINT, torch.zeros(32, 9, 3, 3))),
                   "inpainting UNet.*minidb loads Stable Diffusion 1.x"),
    "instruct-pix2pix": (lambda p: _tiny_file(p, edit=_set(_INPAINT, torch.zeros(32, 8, 3, 3))),
                         "InstructPix2Pix.*minidb loads Stable Diffusion 1.x"),
    "diffusers": (_written("d.safetensors", _DIFFUSERS), "diffusers-format state dict"),
    "LoRA": (_written("lora.safetensors", _LORA), "a LoRA file"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_a_clear_checkpoint_error(tmp_path, case):
    make, message = BAD_FILES[case]
    with pytest.raises(CheckpointError, match=message):
        load_all(make(tmp_path))


def test_sd2_is_named_by_its_context_width_too(tmp_path):
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(CheckpointError, match="SD 2.x.*context 1024"):
        load_all(_tiny_file(tmp_path, edit=_set(key, torch.zeros(32, 1024))))


def test_missing_keys_are_listed_with_a_count(tmp_path):
    def drop(ts):
        unet = sorted(k for k in ts if k.startswith("model.diffusion_model."))
        return {k: v for k, v in ts.items() if k not in unet[:11]}
    with pytest.raises(CheckpointError, match=r"lacks 11 tensors of the UNet: model\.diffusion_model\..*and 6 more.*another config") as e:
        load_all(_tiny_file(tmp_path, edit=drop))
    assert str(e.value).count("model.diffusion_model.") == 5  # the first 5 named


def test_a_whole_missing_model_is_named(tmp_path):
    path = _tiny_file(tmp_path, edit=lambda ts: {k: v for k, v in ts.items() if not k.startswith("first_stage_model.")})
    with pytest.raises(CheckpointError, match=r"has no VAE weights \(first_stage_model\.\*\)"):
        load_all(path)


def test_unexpected_keys_are_listed_with_a_count(tmp_path):
    extra = {f"model.diffusion_model.adapter.{i}.weight": torch.zeros(2) for i in range(12)}
    with pytest.raises(CheckpointError, match=r"has 13 tensors that SD v1 does not: .*cond_stage_model\.x.*and 8 more"):
        load_all(_tiny_file(tmp_path, edit=lambda ts: {**ts, **extra, "cond_stage_model.x": torch.zeros(1)}))


def test_shape_mismatch_names_the_key_both_shapes_and_the_config(tmp_path):
    path = _tiny_file(tmp_path)  # tiny_config() has model_channels=32
    other = replace(tiny_config(), unet=replace(tiny_config().unet, model_channels=64))
    with pytest.raises(CheckpointError, match=r"model\.diffusion_model\.input_blocks\.0\.0\.weight is \[32, 4, 3, 3\] "
                                              r"in the file, \[64, 4, 3, 3\] in the model.*another config, pass that config"):
        load_all(path, config=other)


def test_full_size_layout_key_counts():
    """At SD v1 size (built on the meta device: no memory) the models have exactly the
    checkpoint's tensors: 686 + 248 + 196, plus position_ids = the 1131 keys of an SD v1 file."""
    sd = StableDiffusion.__new__(StableDiffusion)
    sd._build(SDConfig(), "meta")
    counts = {name: len(m.state_dict()) for name, m in sd.models.items()}
    assert counts == {"unet": 686, "vae": 248, "text_encoder": 196}
    assert POSITION_IDS in EXTRA_KEYS


# --- EMA ----------------------------------------------------------------------------------------

def test_ema_key_is_the_unet_key_without_dots():
    assert ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    assert ema_key("out.2.bias") == "model_ema.diffusion_modelout2bias"


def test_ema_loads_the_ema_copy_into_the_unet(tmp_path):
    sd = tiny_models()
    path = tmp_path / "ema.safetensors"
    write_tensors(path, sd_v1_layout(sd, ema_seed=7))
    ema_unet = perturb_(tiny_models().unet, 7).state_dict()
    with_ema, _, _ = load_all(path, ema=True)
    without, _, _ = load_all(path, ema=False)
    for k, v in with_ema.unet.state_dict().items():
        assert torch.equal(v, ema_unet[k]), k
    for k, v in without.unet.state_dict().items():
        assert torch.equal(v, sd.unet.state_dict()[k]), k
    assert any(not torch.equal(v, ema_unet[k]) for k, v in without.unet.state_dict().items())
    for k, v in with_ema.vae.state_dict().items():  # EMA covers the UNet only
        assert torch.equal(v, sd.vae.state_dict()[k]), k


def test_ema_picks_the_tensors_diffusers_picks(tmp_path):
    """diffusers' convert_ldm_unet_checkpoint(extract_ema=True) is an independent reading of the
    model_ema.* names: converting the file with it, and converting our EMA-loaded UNet without it,
    must give the same tensors."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    sd = tiny_models()
    tensors = sd_v1_layout(sd, ema_seed=7)
    write_tensors(tmp_path / "ema.safetensors", tensors)
    loaded, _, _ = load_all(tmp_path / "ema.safetensors", ema=True)
    config = {"layers_per_block": sd.config.unet.num_res_blocks}
    theirs = convert_ldm_unet_checkpoint(tensors, config, extract_ema=True)
    ours = convert_ldm_unet_checkpoint({PREFIXES["unet"] + k: v for k, v in loaded.unet.state_dict().items()}, config)
    assert theirs.keys() == ours.keys() and len(ours) == len(loaded.unet.state_dict())
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k


def test_ema_asked_for_but_absent(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no EMA weights \(model_ema\.\*\)"):
        load_all(_tiny_file(tmp_path), ema=True)


def test_incomplete_ema_is_listed(tmp_path):
    path = _tiny_file(tmp_path, ema_seed=3, edit=lambda ts: {k: v for k, v in ts.items() if "modelout2" not in k})
    with pytest.raises(CheckpointError, match=r"lacks 2 tensors of the UNet: model_ema\.diffusion_modelout2bias, "
                                              r"model_ema\.diffusion_modelout2weight"):
        load_all(path, ema=True)


# --- round trip ---------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_load_save_load_round_trip(tmp_path, suffix, dtype):
    first = tmp_path / ("first" + suffix)
    write_tensors(first, sd_v1_layout(tiny_models()), dtype=dtype)
    sd, extras, keys = load_all(first)
    assert all(p.dtype == dtype for m in sd.models.values() for p in m.parameters())
    second = tmp_path / ("second" + suffix)
    save_model(second, **{n: m.state_dict() for n, m in sd.models.items()}, extras=extras)
    sd2, extras2, keys2 = load_all(second)
    assert keys2 == keys and len(keys) == sum(len(m.state_dict()) for m in sd.models.values()) + 15
    a, b = all_tensors(sd, extras), all_tensors(sd2, extras2)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_load_converts_dtype_tensor_by_tensor(tmp_path):
    path = _tiny_file(tmp_path)
    sd, extras, _ = load_all(path, dtype=torch.float16)
    assert all(p.dtype == torch.float16 for m in sd.models.values() for p in m.parameters())
    assert extras[POSITION_IDS].dtype == torch.int64  # integers are never converted
    assert extras["betas"].dtype == torch.float32    # extras stay as they were in the file


# --- full size, on demand -----------------------------------------------------------------------

@pytest.mark.slow
def test_full_size_fp16_load_peak_memory(tmp_path):
    """A random fp16 checkpoint with all of SD v1's tensors (2.1 GB) loads through
    from_checkpoint with peak RSS at most 1.3x the loaded tensors, from either format.
    Needs ~2.5 GB: run it as `flock /tmp/minidb-bigmem.lock python -m pytest -m slow tests/test_weights.py`."""
    from benchmarks import load_memory as bench
    tensors = bench.sd_v1_tensors()
    # 686 UNet + 248 VAE + 196 CLIP keys, 12 schedule buffers, position_ids, model_ema.decay/num_updates
    assert len(tensors) == 686 + 248 + 196 + 12 + 1 + 2
    for suffix in (".safetensors", ".ckpt"):
        write_tensors(tmp_path / ("sd" + suffix), tensors)
    size = sum(t.nbytes for t in tensors.values())
    del tensors
    for suffix in (".safetensors", ".ckpt"):
        result = bench.measure(str(tmp_path / ("sd" + suffix)), "float16")
        assert result["loaded"] == size
        assert result["ratio"] <= 1.3, (suffix, result)
