"""StableDiffusion: the text encoder, UNet and VAE of SD v1 with their tokenizer and noise
schedule, loaded from and saved to original (CompVis-layout) checkpoints.

    sd = StableDiffusion.from_checkpoint("v1-5-pruned-emaonly.safetensors", device="cuda",
                                         dtype=torch.float16)
    images = sd.generate(["a photo of an astronaut riding a horse"], seed=0)
    sd.save("copy.safetensors")
    export_model("v1-5.safetensors", trained_weights, "tuned.safetensors")   # after fine-tuning

Models come back in eval mode with requires_grad off: inference is the default, and the
trainer turns on what it trains.
"""
import contextlib
import ctypes
import dataclasses
import functools
import gc
import mmap
import platform
from pathlib import Path

import torch

from minidb import weights
from minidb.clip import CLIPTextModel
from minidb.config import SDConfig
from minidb.errors import CheckpointError
from minidb.unet import UNetModel
from minidb.vae import AutoencoderKL


class StableDiffusion:
    def __init__(self, config: SDConfig | None = None):
        """Random weights (each module's default init), on the CPU, in float32."""
        self._build(config or SDConfig(), "cpu")

    def _build(self, config: SDConfig, device):
        self.config = config
        # "meta" builds shapes only, for a checkpoint to fill in: nothing to initialise
        with torch.device(device), (_no_init() if str(device) == "meta" else contextlib.nullcontext()):
            self.text_encoder = CLIPTextModel(config.clip)
            self.unet = UNetModel(config.unet)
            self.vae = AutoencoderKL(config.vae)
        self.extras = {}  # the checkpoint's non-model buffers, written back by save()
        self.loras = []  # LoRA networks applied by load_lora, not merged
        for model in self.models.values():
            model.eval().requires_grad_(False)

    @classmethod
    def from_checkpoint(cls, path, config: SDConfig | None = None, device="cpu",
                        dtype: torch.dtype = torch.float32, ema: bool = False) -> "StableDiffusion":
        """Load an original SD v1 .safetensors or .ckpt file (fp32 or fp16, with or without EMA).
        config=None: the config stored in the file by save(), else SD v1's. ema=True: take the
        UNet from the file's EMA weights (model_ema.*). Bad files raise CheckpointError."""
        with weights.open_checkpoint(path) as ckpt:
            sd = cls.__new__(cls)
            sd._build(config or _stored_config(ckpt), "meta")  # no memory until each tensor is loaded
            sd.extras = weights.load_models(ckpt, sd.models, dtype=dtype, device=device, ema=ema)
        for model in sd.models.values():
            model.eval().requires_grad_(False)  # assign=True brought back the meta params' flag
        return sd

    @classmethod
    def inspect_checkpoint(cls, path, config: SDConfig | None = None, ema: bool = False) -> SDConfig:
        """The config from_checkpoint would use, after every check it makes that needs no tensor
        (file format, model family, keys, shapes): to fail early and cheaply, before a long load
        or before anything is written. Bad files raise CheckpointError."""
        with weights.open_checkpoint(path) as ckpt:
            sd = cls.__new__(cls)
            sd._build(config or _stored_config(ckpt), "meta")
            weights.plan_load(ckpt, sd.models, ema)
        return sd.config

    @property
    def models(self) -> dict:
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder}

    def save(self, path, dtype: torch.dtype | None = None):
        """Write an original-layout SD v1 checkpoint (.safetensors or .ckpt, by the file name),
        atomically, with this model's config in its metadata. dtype=None keeps the current one."""
        weights.save_model(path, **{name: m.state_dict() for name, m in self.models.items()},
                                extras=self.extras, config=self.config, dtype=dtype)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "StableDiffusion":
        for model in list(self.models.values()) + self.loras:
            model.to(device=device, dtype=dtype)
        return self

    def load_lora(self, path, scale: float = 1.0):
        """Apply a LoRA file (kohya / AUTOMATIC1111 format, or diffusers') to the UNet and text
        encoder, unmerged, at strength `scale`: LoRAs stack, and unhook with .detach() on the returned
        network. A file that does not fit raises minidb.lora.LoRAError before anything changes."""
        from minidb.lora import load_lora
        network = load_lora(path, self.models, scale)
        self.loras.append(network)
        return network

    def merge_lora(self):
        """Fold the applied LoRAs into the base weights: sampling costs what it did without them, and
        save() writes the merged model."""
        for network in self.loras:
            network.merge_()
        self.loras = []

    @property
    def device(self) -> torch.device:
        """Where the UNet's weights are (the models move together, with to())."""
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def generate(self, *args, **kwargs):
        """Text to images: see minidb.sampling.generate."""
        from minidb.sampling import generate
        return generate(self, *args, **kwargs)

    @functools.cached_property
    def tokenizer(self):
        from minidb.tokenizer import CLIPTokenizer  # built on first use: it takes a second
        return CLIPTokenizer()

    @functools.cached_property
    def schedule(self):
        from minidb.schedule import NoiseSchedule
        return NoiseSchedule.from_config(self.config)

    def __repr__(self):
        params = sum(p.numel() for m in self.models.values() for p in m.parameters())
        return f"StableDiffusion({params / 1e6:.1f}M parameters, {self.device}, {self.dtype})"


def export_model(base, trained: dict, path, dtype=torch.float16, lora=None) -> Path:
    """A fine-tuned model as an original-layout SD v1 checkpoint: the trained weights ("unet.*",
    "text_encoder.*", fp32) over the base checkpoint, which supplies the frozen parts exactly as they
    were (not rounded through the training dtype). lora: a LoRA file merged in, as
    `sd.load_lora(lora); sd.merge_lora()` would.

    The file is written one tensor at a time (weights.write_tensors): each trained one from memory,
    each frozen one read from `base` for its turn, merged and converted on its way out; no copy of
    the model is made, so an export costs one tensor beyond what the caller already holds."""
    give_back_freed_memory()  # what training freed (its optimizer) leaves the process before the file is written
    with weights.open_checkpoint(base) as ckpt:
        sd = StableDiffusion.__new__(StableDiffusion)
        sd._build(_stored_config(ckpt), "meta")  # shapes only: the plan's checks, and LoRA's targets
        plan = weights.plan_load(ckpt, sd.models)
        for name, module in sd.models.items():
            unknown = sorted(k[len(name) + 1:] for k in trained if k.startswith(name + ".")
                             and k[len(name) + 1:] not in plan[name])
            if unknown:
                raise CheckpointError(f"trained weights not in the {name}: {unknown[:5]}")
        deltas = _lora_deltas(lora, sd.models) if lora is not None else {}
        loaded = {k for keys in plan.values() for k in keys.values()}
        # the order of StableDiffusion.save: extras, then the UNet, VAE and text encoder
        tensors = {k: weights.Deferred(*ckpt.shapes[k], functools.partial(ckpt.get, k))
                   for k in ckpt.shapes if k in weights.EXTRA_KEYS and k not in loaded}
        for name in ("unet", "vae", "text_encoder"):
            for key, file_key in plan[name].items():
                tensors[weights.PREFIXES[name] + key] = _deferred(ckpt, file_key, trained.get(f"{name}.{key}"),
                                                                  deltas.get((name, key)))
        weights.write_tensors(path, tensors, dataclasses.asdict(sd.config), dtype)
    return Path(path)


def give_back_freed_memory() -> None:
    """Collect garbage, then hand the allocator's free heap back to the system (glibc's malloc_trim):
    `minidb train` keeps freed memory for the next step (minidb.cli.keep_freed_memory), which a stage
    after the last step no longer needs."""
    gc.collect()
    if platform.libc_ver()[0] == "glibc":
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass


def release_mapped_pages(*modules: torch.nn.Module) -> int:
    """Hand back to the kernel the resident pages of frozen weights that are views of the mapped
    checkpoint file (a .safetensors load in the file's own dtype maps the file: minidb.weights). They
    were only read, so the kernel refills them from the file when they are next touched: the module
    keeps working, and costs no memory until it is used. Weights in memory of their own (converted to
    another dtype, or from a .ckpt) are left as they are. Returns the bytes handed back.

    Only for weights nothing has written to since they were loaded (a frozen model: requires_grad off
    is checked): the written pages of a private mapping would go back to the file's values."""
    if platform.system() != "Linux":
        return 0
    tensors = [t for m in modules for t in [*m.parameters(), *m.buffers()]]
    if any(t.requires_grad for t in tensors):
        raise ValueError("release_mapped_pages: a trainable weight (requires_grad) may have been written to")
    mapped = []  # (start, end) of the private mappings of regular files
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[1].endswith("p") and fields[4] != "0" and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                mapped.append((start, end))
    page, released = mmap.PAGESIZE, 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    for t in tensors:
        if t.device.type != "cpu" or t.nbytes == 0:
            continue
        first, last = t.data_ptr(), t.data_ptr() + t.nbytes
        if not any(start <= first and last <= end for start, end in mapped):
            continue
        start, end = -(-first // page) * page, last // page * page  # whole pages inside the tensor only
        if end > start and madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_DONTNEED) == 0:
            released += end - start
    return released


def _deferred(ckpt, file_key: str, trained: torch.Tensor | None, delta=None) -> weights.Deferred:
    """One tensor of the export, read when written: the trained value, else the base file's, as
    fp32 (what the export used to load) for a floating-point weight; plus a LoRA delta, merged in fp32."""
    shape, stored = ckpt.shapes[file_key]
    floating = stored.is_floating_point

    def read() -> torch.Tensor:
        if trained is not None:
            t = trained.detach().to("cpu", torch.float32)
        else:
            t = ckpt.get(file_key, torch.float32 if floating else None)
            if floating and not torch.isfinite(t).all():  # what the full load checked, tensor by tensor
                weights.check_finite(ckpt, [file_key], torch.float32)
        if delta is not None:  # LoRANetwork.merge_'s sum, on this one weight
            t = (t.float() + delta()).to(t.dtype)
        return t

    return weights.Deferred(shape, torch.float32 if floating or trained is not None else stored, read)


def _lora_deltas(path, meta_models: dict) -> dict:
    """{(model name, weight key): a function giving the LoRA file's fp32 update of that weight}: the
    adapters of `minidb.lora.load_lora` (which checks the file against the models) on the meta models."""
    from minidb.lora import load_lora
    network = load_lora(path, meta_models)
    paths = {id(module): (name, f"{module_path}.weight") for name, model in meta_models.items()
             for module_path, module in model.named_modules()}
    return {paths[id(network._bases[name])]: adapter.delta_weight for name, adapter in network.named_children()}


@contextlib.contextmanager
def _no_init():
    """Module constructors without their random init (torch.nn.init's in-place functions do nothing).
    Why: on the meta device nn.Embedding's normal_ runs through torch._refs, whose first call imports
    torch._dynamo: a slow import on every load (it showed in minidb sample's start-up), for values never used."""
    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    for n in names:
        setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


def _stored_config(ckpt) -> SDConfig:
    """The config minidb stored in the file (fields it lacks take their defaults: image_size 512 in
    files written before it existed); SD v1's for files from elsewhere."""
    return weights.config_from_dict(ckpt.config, ckpt.path) if ckpt.config is not None else SDConfig()
