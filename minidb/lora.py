"""LoRA (Hu et al. 2021, arXiv:2106.09685): fine-tune a frozen linear layer W by a low-rank update,

    y = W x + multiplier · (alpha / rank) · up(down(x)),   down: in -> rank,  up: rank -> out,

`down` initialised like nn.Linear (kaiming-uniform), `up` at zero, so a fresh adapter changes
nothing. Only down and up train: rank·(in + out) numbers per layer instead of in·out.

Where: the attention projections of the UNet (to_q/to_k/to_v/to_out.0, diffusers' DreamBooth LoRA
default) and, optionally, the text encoder's attention and MLP (kohya's default). Any Linear or 1x1
conv inside a SpatialTransformer can be a target (kohya's LoRA also adapts proj_in/proj_out and ff).

How: each adapter is a forward hook on its base module, and the adapters live in a LoRANetwork
beside the model, not inside it. So the base models' state_dict() keys, and with them checkpoint
loading and saving, are unchanged; the network's own state_dict() *is* the LoRA file:

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight   [rank, in]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight     [out, rank]
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha              []
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight                   ...

That is kohya sd-scripts' format (networks/lora.py: prefix + module path, dots to underscores),
which AUTOMATIC1111, ComfyUI and diffusers' load_lora_weights read. kohya trains SD 1.x on a UNet
with *diffusers'* module names, so minidb's CompVis paths (input_blocks.1.1...) are renamed to
diffusers' (down_blocks.0.attentions.0...) by `diffusers_unet_path`; the text encoder's paths are
already transformers' names.

    network = add_lora(sd.models, rank=4, alpha=4, text_encoder_targets=TEXT_ENCODER_TARGETS)
    optimizer = torch.optim.AdamW(network.parameters())     # the base models stay frozen
    save_lora("lora.safetensors", network)
    sd.load_lora("lora.safetensors", scale=0.8); sd.merge_lora()
"""
import json
import math
import os
import re

import torch
from torch import nn

from minidb.config import SDConfig, UNetConfig
from minidb.errors import CheckpointError
from minidb.files import atomic_write

UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' train_dreambooth_lora.py
UNET_TRANSFORMER = UNET_ATTENTION + ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")  # kohya's LoRA
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # kohya's: CLIPAttention, CLIPMLP
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")


class LoRAError(CheckpointError):
    """A LoRA file that is unreadable, not a LoRA, or made for another model."""


class LoRAModule(nn.Module):
    """One adapter: multiplier · (alpha / rank) · up(down(x)), added to the output of an nn.Linear
    (down, up: Linear) or a 1x1 nn.Conv2d (down, up: 1x1 Conv2d), in the adapter's own dtype."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # nn.Linear's init, as loralib's
        nn.init.zeros_(self.lora_up.weight)
        alpha = float(alpha or rank)  # kohya and diffusers: no alpha (or 0) means alpha = rank, scale 1
        self.register_buffer("alpha", torch.tensor(alpha))  # a key of the file
        self.scale = alpha / rank  # the same, as a float: reading the buffer would sync with the GPU
        self.multiplier = 1.0  # the user's strength (load_lora's scale)

    def forward(self, x):
        w = self.lora_down.weight
        return self.lora_up(self.lora_down(x.to(w.dtype))) * (self.multiplier * self.scale)

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the base weight: scale · up @ down, in fp32, the base weight's shape."""
        up, down = self.lora_up.weight.float().flatten(1), self.lora_down.weight.float().flatten(1)
        delta = (self.multiplier * self.scale) * (up @ down)  # (out, in)
        return delta if self.lora_down.weight.ndim == 2 else delta[:, :, None, None]


class LoRANetwork(nn.Module):
    """The adapters of one LoRA, registered under their kohya names (so state_dict() is the file),
    each hooked onto its base module. The base modules are referenced, not registered."""

    def __init__(self, adapters: dict[str, tuple[nn.Module, LoRAModule]]):
        super().__init__()
        self._bases = {}
        self._hooks = {}
        for name, (base, adapter) in adapters.items():
            self.add_module(name, adapter)
            self._bases[name] = base
        self.attach()

    def attach(self):
        for name, adapter in self.named_children():
            if name not in self._hooks:
                self._hooks[name] = self._bases[name].register_forward_hook(
                    lambda module, args, out, adapter=adapter: out + adapter(args[0]).to(out.dtype))

    def detach(self):
        """Unhook every adapter: the base models compute as without this LoRA."""
        for hook in self._hooks.values():
            hook.remove()
        self._hooks.clear()

    def set_multiplier(self, multiplier: float):
        for adapter in self.children():
            adapter.multiplier = multiplier

    @torch.no_grad()
    def merge_(self):
        """Add each adapter's update into its base weight (computed in fp32), then unhook it: the same
        function at no extra cost per step, and a base state_dict that saves with the LoRA in it."""
        for name, adapter in self.named_children():
            weight = self._bases[name].weight
            weight.copy_((weight.float() + adapter.delta_weight().to(weight.device)).to(weight.dtype))
        self.detach()

    @property
    def rank(self) -> int:
        return max(adapter.lora_down.weight.shape[0] for adapter in self.children())


def diffusers_unet_path(path: str, cfg: UNetConfig) -> str:
    """minidb's (CompVis) path of a module inside a SpatialTransformer -> its diffusers path:
    input_blocks.{1 + level·(n+1) + i}.1 -> down_blocks.{level}.attentions.{i}, middle_block.1 ->
    mid_block.attentions.0, output_blocks.{level'·(n+1) + i}.1 -> up_blocks.{level'}.attentions.{i},
    where n = num_res_blocks (each level's last input block is its Downsample); the rest is equal."""
    per_level = cfg.num_res_blocks + 1
    if m := re.fullmatch(r"input_blocks\.(\d+)\.1\.(.+)", path):
        i = int(m[1]) - 1
        return f"down_blocks.{i // per_level}.attentions.{i % per_level}.{m[2]}"
    if m := re.fullmatch(r"middle_block\.1\.(.+)", path):
        return f"mid_block.attentions.0.{m[1]}"
    if m := re.fullmatch(r"output_blocks\.(\d+)\.1\.(.+)", path):
        i = int(m[1])
        return f"up_blocks.{i // per_level}.attentions.{i % per_level}.{m[2]}"
    raise ValueError(f"{path} is not inside a UNet SpatialTransformer")


def lora_targets(models: dict, unet_targets=UNET_TRANSFORMER, text_encoder_targets=TEXT_ENCODER_TARGETS) -> dict:
    """{kohya name: base module} for the modules whose path ends in one of the targets: the UNet's
    Linear and 1x1 convs inside SpatialTransformers, the text encoder's Linears in its layers.
    With the defaults: every module a LoRA for SD v1 may adapt."""
    found = {}
    unet, text_encoder = models.get("unet"), models.get("text_encoder")
    if unet is not None and unet_targets:
        for path, module in unet.named_modules():
            inside = ".transformer_blocks." in path or path.endswith((".proj_in", ".proj_out"))
            if _adaptable(module) and inside and path.endswith(tuple("." + t for t in unet_targets)):
                found[PREFIXES["unet"] + diffusers_unet_path(path, unet.cfg).replace(".", "_")] = module
    if text_encoder is not None and text_encoder_targets:
        for path, module in text_encoder.named_modules():
            wanted = path.endswith(tuple("." + t for t in text_encoder_targets))
            if _adaptable(module) and ".layers." in path and wanted:
                found[PREFIXES["text_encoder"] + path.replace(".", "_")] = module
    return found


def _adaptable(module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


def add_lora(models: dict, rank: int, alpha: float | None = None, unet_targets=UNET_ATTENTION,
             text_encoder_targets=(), dtype: torch.dtype | None = None) -> LoRANetwork:
    """New trainable adapters (up = 0: the models compute as before) on `models` ({"unet": ...,
    "text_encoder": ...}, e.g. sd.models), hooked on; alpha None = rank. Its parameters() are the
    only ones to train. dtype: the adapters' (default: each base weight's)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    adapters = {}
    for name, base in lora_targets(models, unet_targets, text_encoder_targets).items():
        adapters[name] = base, LoRAModule(base, rank, alpha).to(base.weight.device, dtype or base.weight.dtype)
    if not adapters:
        raise ValueError("no module matches the LoRA targets: "
                         f"UNet {list(unet_targets)}, text encoder {list(text_encoder_targets)}")
    return LoRANetwork(adapters)


def save_lora(path, network: "LoRANetwork | dict", dtype: torch.dtype | None = None, metadata: dict | None = None):
    """Write the network (or its state_dict: {kohya key: tensor}, alphas included) as a kohya-format
    .safetensors file, atomically (floats in dtype, default as they are), with kohya's ss_* metadata
    that AUTOMATIC1111 shows."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise LoRAError(f"{path}: a LoRA file name must end in .safetensors")
    state = network.state_dict() if isinstance(network, nn.Module) else network
    tensors = {k: t.detach().to("cpu", dtype or t.dtype).contiguous() for k, t in state.items()}
    alphas = {t.item() for k, t in tensors.items() if k.endswith(".alpha")}
    rank = max(t.shape[0] for k, t in tensors.items() if k.endswith(".lora_down.weight"))
    info = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": str(alphas.pop()) if len(alphas) == 1 else "Dynamic",
            "ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_output_name": "minidb"}
    info |= {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=info)


def with_alphas(weights: dict, alpha: float) -> dict:
    """A LoRA file's tensors from trained weights ({name.lora_down.weight, name.lora_up.weight}, as
    the parameters of a LoRANetwork are named): each module's alpha added, as add_lora sets it."""
    names = {key.partition(".")[0] for key in weights}
    return dict(weights) | {f"{name}.alpha": torch.tensor(float(alpha)) for name in sorted(names)}


def read_lora(path) -> dict:
    """The tensors of a LoRA .safetensors file in kohya's key format. diffusers' own format
    (unet.<path>.lora_A.weight / lora_B, as pytorch_lora_weights.safetensors) and kohya's SDXL
    spelling of the first text encoder (lora_te1_) are converted to it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise LoRAError(f"{path}: minidb reads LoRA files in .safetensors format")
    if not os.path.isfile(path):
        raise LoRAError(f"LoRA file not found: {path}")
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise LoRAError(f"{path}: not a readable .safetensors file ({e})") from None
    if any(".lora_A." in k or ".lora_B." in k for k in state):
        state = _from_diffusers(state)
    return {_kohya_name(k): t for k, t in state.items()}


def _kohya_name(key: str) -> str:
    """SD v1's one text encoder as kohya names it: lora_te_text_model_encoder_..., also when written
    as SDXL's first (lora_te1_) or from transformers >= 5.6, whose CLIPTextModel has no text_model."""
    if key.startswith("lora_te1_"):
        key = "lora_te_" + key.removeprefix("lora_te1_")
    if key.startswith("lora_te_encoder_"):
        key = "lora_te_text_model_" + key.removeprefix("lora_te_")
    return key


def _from_diffusers(state: dict) -> dict:
    """diffusers/peft keys -> kohya's: alpha = rank, diffusers' convention when the file has none."""
    out = {}
    for key, t in state.items():
        for part, kohya in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
            if key.endswith(part):
                component, _, path = key.removesuffix(part).partition(".")
                prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}.get(component, component + ".")
                name = prefix + path.replace(".", "_")
                out[name + kohya] = t
                if kohya == ".lora_down.weight":
                    out.setdefault(name + ".alpha", torch.tensor(float(t.shape[0])))
                break
        else:
            out[key] = t  # reported as not LoRA by load_lora
    return out


def load_lora(path, models: dict, multiplier: float = 1.0) -> LoRANetwork:
    """The LoRA in `path` on `models` (in their device and dtype), hooked on, frozen. Every check is
    made before any adapter is built: keys that are not LoRA or name no module of this model, ranks,
    and shapes against the base modules. Raises LoRAError naming what does not match."""
    state = read_lora(path)
    known = lora_targets(models)
    names = {}
    for key in state:
        name, _, part = key.partition(".")
        if part not in PARTS:
            raise LoRAError(f"{path}: {key} is not a LoRA tensor (.lora_down.weight, .lora_up.weight, .alpha); "
                            "minidb loads plain LoRA, not LoHa/LoKr/DoRA/LoCon extras")
        names.setdefault(name, set()).add(part)
    unknown = sorted(n for n in names if n not in known)
    if unknown:
        hint = ("; it is an SDXL LoRA (two text encoders)" if any(n.startswith("lora_te2_") for n in unknown)
                else "; this model has no such module: a LoRA for another model, or adapting layers "
                     "minidb does not (conv/ResBlock LoCon)")
        raise LoRAError(f"{path}: {len(unknown)} LoRA module(s) unknown to SD v1's UNet and text encoder: "
                        f"{', '.join(unknown[:3])}{' ...' if len(unknown) > 3 else ''}{hint}")
    problems = []
    for name, parts in sorted(names.items()):
        if {"lora_down.weight", "lora_up.weight"} - parts:
            problems.append(f"{name} lacks {' and '.join(sorted({'lora_down.weight', 'lora_up.weight'} - parts))}")
            continue
        base, down, up = known[name], state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"]
        want_down, want_up = _shapes(base, down.shape[0])
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            problems.append(f"{name}: lora_down {list(down.shape)}, lora_up {list(up.shape)} in the file; "
                            f"this model's module needs {list(want_down)} and {list(want_up)}")
    if problems:
        raise LoRAError(f"{path}: {len(problems)} LoRA module(s) do not fit this model (a LoRA for another "
                        f"base model?): " + "; ".join(problems[:3]) + (" ..." if len(problems) > 3 else ""))

    adapters = {}
    for name in sorted(names):
        base = known[name]
        down = state[f"{name}.lora_down.weight"]
        alpha = state.get(f"{name}.alpha")
        adapter = LoRAModule(base, down.shape[0], None if alpha is None else alpha.float().item())
        # a model on the meta device (the streaming export's): the adapters still hold the file's weights
        device = "cpu" if base.weight.is_meta else base.weight.device
        adapter = adapter.requires_grad_(False).to(device, base.weight.dtype)
        with torch.no_grad():
            adapter.lora_down.weight.copy_(down)
            adapter.lora_up.weight.copy_(state[f"{name}.lora_up.weight"])
        adapter.multiplier = multiplier
        adapters[name] = base, adapter
    return LoRANetwork(adapters)


def _shapes(base: nn.Module, rank: int) -> tuple[tuple, tuple]:
    """The lora_down and lora_up weight shapes of a rank-`rank` adapter on `base`."""
    if isinstance(base, nn.Linear):
        return (rank, base.in_features), (base.out_features, rank)
    return (rank, base.in_channels, 1, 1), (base.out_channels, rank, 1, 1)


def lora_numel(models: dict, rank: int, unet_targets=UNET_ATTENTION, text_encoder_targets=()) -> int:
    """Numbers in a LoRA file: rank·(in + out) + 1 (alpha) per adapted module."""
    modules = lora_targets(models, unet_targets, text_encoder_targets).values()
    return sum(math.prod(down) + math.prod(up) + 1 for down, up in (_shapes(m, rank) for m in modules))


def meta_models(config: SDConfig) -> dict:
    """SD's UNet and text encoder with shapes only (the meta device): for counting, no memory."""
    from minidb.clip import CLIPTextModel
    from minidb.unet import UNetModel
    with torch.device("meta"):
        return {"unet": UNetModel(config.unet), "text_encoder": CLIPTextModel(config.clip)}
