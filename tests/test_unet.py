"""minidb.unet.UNetModel against diffusers' UNet2DConditionModel.

Our weights (perturbed, non-default) go through diffusers' own CompVis->diffusers converter
(`convert_ldm_unet_checkpoint`) and load strictly into a diffusers UNet built to match, so the
test checks the key names and the maths at once. Full size: `python -m pytest -m slow tests/test_unet.py`
(under `flock /tmp/minidb-bigmem.lock`; 4.5 GB peak, 47 s: the diffusers model shares our tensors)."""
import copy

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from helpers import perturb_, rel_err

import minidb.attention
import minidb.unet
from minidb.config import UNetConfig, tiny_config
from minidb.world.pretrain import WORLD_CONFIG
from minidb.errors import ConfigError
from minidb.unet import UNetModel

PREFIX = "model.diffusion_model."
# Three levels, attention only in the middle one, two transformer layers, context_dim != width.
THREE_LEVEL = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(2,),
                         num_heads=2, transformer_depth=2, context_dim=48)


def diffusers_unet(cfg: UNetConfig) -> UNet2DConditionModel:
    attn = [2 ** level in cfg.attention_resolutions for level in range(len(cfg.channel_mult))]
    return UNet2DConditionModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks, cross_attention_dim=cfg.context_dim,
        attention_head_dim=cfg.num_heads,  # diffusers' historic name: it is the number of heads
        transformer_layers_per_block=cfg.transformer_depth, norm_num_groups=cfg.norm_groups, norm_eps=1e-5,
        use_linear_projection=False, flip_sin_to_cos=True, freq_shift=0)


def to_diffusers(ours: UNetModel, theirs: UNet2DConditionModel, assign=False) -> dict[str, str]:
    """Our state dict, in checkpoint layout, through diffusers' converter into a strict load.
    Returns {our key: diffusers key}."""
    ckpt = {PREFIX + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_unet_checkpoint(ckpt, theirs.config)
    # Every one of our tensors is used exactly once (the converter silently drops unknown keys).
    assert sorted(id(v) for v in converted.values()) == sorted(id(v) for v in ckpt.values())
    theirs.load_state_dict(converted, strict=True, assign=assign)
    ours_by_id = {id(v): k.removeprefix(PREFIX) for k, v in ckpt.items()}
    return {ours_by_id[id(v)]: k for k, v in converted.items()}


def make_pair(cfg, seed=0):
    ours = perturb_(UNetModel(cfg), seed).eval()
    theirs = diffusers_unet(cfg).eval()
    to_diffusers(ours, theirs)
    return ours, theirs


def inputs(cfg, b=3, h=16, w=24, length=77, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cfg.in_channels, h, w, generator=g)
    context = torch.randn(b, length, cfg.context_dim, generator=g)
    t = torch.tensor([0, 999, 421, 17][:b])
    return x, t, context


def test_sd_v1_keys_match_checkpoint_and_diffusers():
    """Full-size layout on the meta device (no memory): 686 tensors, all consumed by the
    converter, strict load with matching shapes into diffusers' SD v1 UNet."""
    cfg = UNetConfig()
    with torch.device("meta"):
        ours = UNetModel(cfg)
        theirs = diffusers_unet(cfg)
    sd = ours.state_dict()
    assert len(sd) == 686
    assert sum(v.numel() for v in sd.values()) == 859_520_964
    for key in ["time_embed.2.weight", "input_blocks.0.0.weight", "input_blocks.3.0.op.weight",
                "input_blocks.4.0.skip_connection.weight", "input_blocks.4.1.proj_in.weight",
                "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight",
                "input_blocks.1.1.transformer_blocks.0.ff.net.2.bias",
                "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
                "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.bias",
                "middle_block.1.norm.weight", "middle_block.2.out_layers.3.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                "output_blocks.11.1.transformer_blocks.0.norm3.bias",
                "out.0.weight", "out.2.bias"]:
        assert key in sd, key
    assert sd["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 768)
    assert "input_blocks.1.1.transformer_blocks.0.attn1.to_q.bias" not in sd
    assert "input_blocks.1.0.skip_connection.weight" not in sd
    key_map = to_diffusers(ours, theirs, assign=True)
    # Norm epsilons do not show in the keys and barely in the outputs (a 1e-5 instead of 1e-6
    # moves the tiny-model output by ~2e-6): compare each norm with its diffusers counterpart.
    norms = [(n, m) for n, m in ours.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))]
    assert len(norms) == 22 * 2 + 16 * (1 + 3) + 1  # ResBlocks, SpatialTransformers, out.0
    for name, module in norms:
        twin = theirs.get_submodule(key_map[name + ".weight"].removesuffix(".weight"))
        kind = torch.nn.GroupNorm if isinstance(module, torch.nn.GroupNorm) else torch.nn.LayerNorm
        assert isinstance(twin, kind) and twin.eps == module.eps, name


@pytest.mark.parametrize("cfg,hw", [(tiny_config().unet, (16, 24)), (THREE_LEVEL, (12, 20)),
                                    (WORLD_CONFIG.unet, (16, 16))], ids=["tiny", "three_level", "world_8_groups"])
def test_matches_diffusers(cfg, hw):
    ours, theirs = make_pair(cfg)
    x, t, context = inputs(cfg, h=hw[0], w=hw[1])
    with torch.no_grad():
        for timesteps in (t, t.float() + 0.5):  # integer and fractional per-sample timesteps
            want = theirs(x, timesteps, encoder_hidden_states=context).sample
            got = ours(x, timesteps, context)
            assert got.shape == (3, cfg.out_channels, *hw)
            assert rel_err(got, want) < 1e-5
        # Per-sample timesteps really are per sample: sample 1 alone gives the same answer,
        # and a different timestep for it a different one.
        batched = ours(x, t, context)[1]
        assert rel_err(ours(x[1:2], t[1:2], context[1:2])[0], batched) < 1e-5
        assert rel_err(ours(x, t.roll(1), context)[1], batched) > 1e-3


def test_scalar_timestep_broadcasts():
    cfg = tiny_config().unet
    ours = perturb_(UNetModel(cfg)).eval()
    x, _, context = inputs(cfg, h=8, w=8, length=5)
    with torch.no_grad():
        want = ours(x, torch.full((3,), 250), context)
        for t in (250, torch.tensor(250), torch.tensor([250])):
            assert torch.equal(ours(x, t, context), want)


def test_training_keeps_the_default_memory_layout():
    """Contiguous in, contiguous out, and every weight gradient contiguous as the weight is: a
    channels-last activation anywhere (a transposed view reshaped) makes the convs after it run
    channels-last and hand back channels-last weight gradients that autograd then copies."""
    cfg = THREE_LEVEL
    unet = perturb_(UNetModel(cfg)).train()
    x, t, context = inputs(cfg, b=2, h=12, w=20)
    out = unet(x, t, context)
    assert out.is_contiguous(), out.stride()
    grad_strides = {}
    for name, p in unet.named_parameters():  # the gradient as backward produced it, before any copy
        p.register_hook(lambda g, name=name: grad_strides.__setitem__(name, g.is_contiguous()))
    out.square().mean().backward()
    assert grad_strides and all(grad_strides.values()), [n for n, c in grad_strides.items() if not c][:5]


def test_gradient_checkpointing_same_gradients(monkeypatch):
    cfg = THREE_LEVEL
    ours = perturb_(UNetModel(cfg)).train()
    x, t, context = inputs(cfg, b=2, h=8, w=12, length=7)
    target = torch.randn(2, cfg.out_channels, 8, 12)

    def grads():
        ours.zero_grad()
        xg = x.clone().requires_grad_()
        ((ours(xg, t, context) - target) ** 2).mean().backward()
        return [xg.grad] + [p.grad.clone() for p in ours.parameters()]

    calls = []
    real = minidb.unet.checkpoint
    monkeypatch.setattr(minidb.unet, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = grads()
    assert not calls
    ours.gradient_checkpointing = True
    checkpointed = grads()
    # every block but the last output block, which backward runs first (nothing to gain by recomputing it)
    assert len(calls) == len(ours.input_blocks) + 1 + len(ours.output_blocks) - 1
    assert rel_err(torch.cat([g.flatten() for g in checkpointed]), torch.cat([g.flatten() for g in plain])) < 1e-5
    for a, b in zip(checkpointed, plain):
        assert rel_err(a, b) < 1e-5


def test_attention_backends_agree(monkeypatch):
    """Every attention goes through minidb.attention.attention, and math vs sdpa agree."""
    cfg = THREE_LEVEL
    ours = perturb_(UNetModel(cfg)).eval()
    x, t, context = inputs(cfg, b=2, h=8, w=12)
    calls = []
    real = minidb.unet.attention
    monkeypatch.setattr(minidb.unet, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs = {}
    with torch.no_grad():
        for backend in ("math", "sdpa"):
            with minidb.attention.use_backend(backend):
                outs[backend] = ours(x, t, context)
    # 2 attentions per transformer layer; transformers at level 1 (2 down, 3 up) and the middle.
    assert len(calls) == 2 * 2 * cfg.transformer_depth * (2 + 3 + 1)
    assert rel_err(outs["math"], outs["sdpa"]) < 1e-5


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 4e-2), (torch.float16, 5e-3)])
def test_low_precision_close_to_fp32(dtype, tol):
    """Half precision (GroupNorm and timestep embedding in fp32), loose: measured 1.3e-2 bf16,
    1.6e-3 fp16; an 8-bit mantissa gives ~4e-3 per op."""
    cfg = tiny_config().unet
    ours = perturb_(UNetModel(cfg)).eval()
    half = copy.deepcopy(ours).to(dtype)
    x, t, context = inputs(cfg, h=8, w=16)
    with torch.no_grad():
        want = ours(x, t, context)
        got = half(x.to(dtype), t, context.to(dtype))
    assert got.dtype == dtype
    assert rel_err(got, want) < tol


def test_bad_inputs_raise_clear_errors():
    cfg = THREE_LEVEL
    ours = UNetModel(cfg)
    x, t, context = inputs(cfg, b=2, h=8, w=8)
    with pytest.raises(ValueError, match="multiples of 4"):
        ours(torch.randn(2, 4, 8, 6), t, context)
    with pytest.raises(ValueError, match="context"):
        ours(x, t, torch.randn(2, 77, 32))
    with pytest.raises(ValueError, match="timesteps"):
        ours(x, torch.tensor([1, 2, 3]), context)
    with pytest.raises(ValueError, match=r"\[B, 4, h, w\]"):
        ours(torch.randn(2, 3, 8, 8), t, context)
    with pytest.raises(ConfigError, match="num_heads"):
        UNetModel(UNetConfig(model_channels=32, num_heads=3))


@pytest.mark.slow
def test_sd_v1_full_size_matches_diffusers():
    """SD v1 size, random perturbed weights, batch 1 at 32x32 latents, 77 tokens."""
    cfg = UNetConfig()
    ours = perturb_(UNetModel(cfg)).eval()
    with torch.device("meta"):
        theirs = diffusers_unet(cfg)
    to_diffusers(ours, theirs, assign=True)  # shares our tensors: no second copy
    theirs.eval()
    x, _, context = inputs(cfg, b=1, h=32, w=32)
    t = torch.tensor([999])
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=context).sample
        got = ours(x, t, context)
    err = rel_err(got, want)
    print(f"full-size rel err {err:.2e}")
    assert err < 1e-5
