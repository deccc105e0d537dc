"""minidb.vae.AutoencoderKL against diffusers' AutoencoderKL.

Our weights (perturbed, non-default) get the `first_stage_model.` prefix, go through diffusers'
own CompVis->diffusers converter (`convert_ldm_vae_checkpoint`) and load strictly into a diffusers
VAE built to match, so each comparison checks the key names and the maths at once.
Full size: `flock /tmp/minidb-bigmem.lock python -m pytest -m slow tests/test_vae.py`."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from helpers import perturb_, rel_err

import minidb.attention
from minidb.config import VAEConfig, tiny_config
from minidb.world.pretrain import WORLD_CONFIG
from minidb.errors import ConfigError, DataError
from minidb.vae import AutoencoderKL, Upsample

PREFIX = "first_stage_model."
TINY = tiny_config().vae                                              # 2 levels, 1 block per level
THREE_LEVEL = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)   # identity and 1x1 shortcuts


def diffusers_vae(cfg: VAEConfig) -> DiffusersAutoencoderKL:
    assert cfg.z_channels == cfg.embed_dim  # diffusers has one `latent_channels` for both
    n = len(cfg.ch_mult)
    return DiffusersAutoencoderKL(
        in_channels=cfg.in_channels, out_channels=cfg.out_ch, latent_channels=cfg.z_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.ch * m for m in cfg.ch_mult), layers_per_block=cfg.num_res_blocks,
        norm_num_groups=cfg.norm_groups)


def converted(ours: AutoencoderKL, theirs: DiffusersAutoencoderKL) -> dict:
    return convert_ldm_vae_checkpoint({PREFIX + k: v for k, v in ours.state_dict().items()}, theirs.config)


def pair(cfg: VAEConfig, seed: int = 0):
    ours = perturb_(AutoencoderKL(cfg), seed).eval()
    theirs = diffusers_vae(cfg).eval()
    theirs.load_state_dict(converted(ours, theirs), strict=True)
    return ours, theirs


def test_full_size_keys_and_shapes_match_sd_v1():
    with torch.device("meta"):
        ours, theirs = AutoencoderKL(VAEConfig()), diffusers_vae(VAEConfig())
    sd = ours.state_dict()
    assert len(sd) == 248
    assert sum(v.numel() for v in sd.values()) == 83_653_863
    assert ours.downsample_factor == 8
    # SD v1 has attn_resolutions=[]: attention only in the two mid blocks.
    assert {k.rsplit(".", 2)[0] for k in sd if ".attn" in k} == {"encoder.mid.attn_1", "decoder.mid.attn_1"}
    assert "encoder.down.0.downsample.conv.weight" in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert "decoder.up.3.upsample.conv.weight" in sd and "decoder.up.0.upsample.conv.weight" not in sd
    assert sd["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)  # lowest resolution, widest
    assert sd["decoder.up.0.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    theirs_sd = theirs.state_dict()
    conv = converted(ours, theirs)
    assert conv.keys() == theirs_sd.keys()
    assert all(conv[k].shape == theirs_sd[k].shape for k in conv)


@pytest.mark.parametrize("cfg", [TINY, THREE_LEVEL, WORLD_CONFIG.vae], ids=["tiny", "three_level", "world_8_groups"])
def test_matches_diffusers(cfg):
    ours, theirs = pair(cfg)
    f = ours.downsample_factor
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 6 * f, 10 * f, generator=g) * 2 - 1  # non-square
    z = torch.randn(2, cfg.embed_dim, 5, 3, generator=g)
    with torch.no_grad(), minidb.attention.use_backend("math"):
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
        out, ref_out = ours.decode(z), theirs.decode(z).sample
    assert post.mean.shape == (2, cfg.embed_dim, 6, 10) and out.shape == (2, 3, 5 * f, 3 * f)
    assert rel_err(post.mean, ref.mean) < 1e-5
    assert rel_err(post.logvar, ref.logvar) < 1e-5
    assert rel_err(post.std, ref.std) < 1e-5
    assert rel_err(out, ref_out) < 1e-5
    assert post.mode() is post.mean


def test_gradients_match_diffusers():
    """The in-place SiLU and residual adds must leave autograd intact."""
    ours, theirs = pair(TINY, seed=3)
    x = (torch.rand(1, 3, 8, 12) * 2 - 1).requires_grad_()
    z = torch.randn(1, 4, 3, 5).requires_grad_()
    ((ours.encode(x).mean ** 2).sum() + (ours.decode(z) ** 2).sum()).backward()
    mine_x, mine_z = x.grad, z.grad
    x.grad = z.grad = None
    ((theirs.encode(x).latent_dist.mean ** 2).sum() + (theirs.decode(z).sample ** 2).sum()).backward()
    assert rel_err(mine_x, x.grad) < 1e-5 and rel_err(mine_z, z.grad) < 1e-5
    # Our parameter gradients, renamed by the same converter, against diffusers' parameter by parameter.
    mine = convert_ldm_vae_checkpoint({PREFIX + k: p.grad for k, p in ours.named_parameters()}, theirs.config)
    ref = {k: p.grad for k, p in theirs.named_parameters()}
    assert mine.keys() == ref.keys()
    scale = torch.cat([g.flatten() for g in ref.values()]).norm()
    for k in ref:  # the absolute term: a conv bias feeding a per-channel GroupNorm has gradient 0 ± rounding
        assert (mine[k] - ref[k]).norm() <= 1e-4 * ref[k].norm() + 1e-6 * scale, k


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-13), (torch.float32, 3e-6)])
def test_upsample_equals_nearest_then_conv(dtype, tol):
    """Our Upsample folds nearest-×2 into four 2x2 convs; the reference is CompVis' two steps."""
    up = perturb_(Upsample(32), seed=6).to(dtype)
    x = torch.randn(2, 32, 5, 7, dtype=dtype)
    with torch.no_grad():
        ref = F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
        assert rel_err(up(x), ref) < tol
    x.requires_grad_()
    (up(x) * ref).sum().backward()
    fold_grad = x.grad
    x.grad = None
    (F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), up.conv.weight, up.conv.bias, padding=1)
     * ref).sum().backward()
    assert rel_err(fold_grad, x.grad) < tol


def test_logvar_clamped_like_compvis():
    vae = perturb_(AutoencoderKL(TINY))
    with torch.no_grad():  # logvar channels = constants -100, -31, 19, 100
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = torch.tensor([-100.0, -31.0, 19.0, 100.0])
        post = vae.encode(torch.zeros(1, 3, 4, 6))
    assert torch.equal(post.logvar[0, :, 0, 0], torch.tensor([-30.0, -30.0, 19.0, 20.0]))
    assert torch.allclose(post.std[0, :, 0, 0], torch.tensor([-15.0, -15.0, 9.5, 10.0]).exp())


def test_sample_reproducible_and_equal_to_mean_plus_std_noise():
    ours, theirs = pair(TINY, seed=5)
    x = torch.rand(2, 3, 8, 6) * 2 - 1
    with torch.no_grad():
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
    a = post.sample(torch.Generator().manual_seed(7))
    b = post.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, post.sample(torch.Generator().manual_seed(8)))
    noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, post.mean + post.std * noise, rtol=0, atol=1e-6)
    assert rel_err(a, ref.sample(torch.Generator().manual_seed(7))) < 1e-5
    assert post.sample().shape == post.mean.shape  # global RNG


def test_encode_and_decode_keep_the_default_memory_layout():
    """A contiguous batch in, contiguous (not channels-last) tensors out. The attention block once
    reshaped a transposed view into channels-last strides that every later layer kept: the
    latents, and so a whole training UNet, ran channels-last (on CPU each conv weight's gradient
    then came back channels-last and was copied: ~4 s of a 30 s SD-size step)."""
    vae = perturb_(AutoencoderKL(TINY)).eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        h = vae.encoder(x)
        z = vae.encode(x).mean
        image = vae.decode(torch.randn(2, TINY.embed_dim, 4, 6))
    for y in (h, image):
        assert y.is_contiguous(), y.stride()
    # the mean is a channel slice of the moments: its strides are ordered like a contiguous tensor's
    assert z.stride()[1] > z.stride()[2] > z.stride()[3] == 1, z.stride()


@pytest.mark.parametrize("cfg", [TINY, THREE_LEVEL], ids=["tiny", "three_level"])
def test_math_and_sdpa_backends_agree(cfg):
    vae = perturb_(AutoencoderKL(cfg), seed=2).eval()
    f = vae.downsample_factor
    x, z = torch.rand(1, 3, 4 * f, 7 * f) * 2 - 1, torch.randn(1, 4, 6, 5)
    results = {}
    for backend in ("math", "sdpa"):
        with torch.no_grad(), minidb.attention.use_backend(backend):
            results[backend] = vae.encode(x).mean, vae.decode(z)
    assert rel_err(results["sdpa"][0], results["math"][0]) < 1e-5
    assert rel_err(results["sdpa"][1], results["math"][1]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_close_to_fp32(dtype):
    vae = perturb_(AutoencoderKL(TINY), seed=4).eval()
    x, z = torch.rand(1, 3, 8, 12) * 2 - 1, torch.randn(1, 4, 4, 6)
    with torch.no_grad():
        mean32, out32 = vae.encode(x).mean, vae.decode(z)
        vae.to(dtype)
        post, out = vae.encode(x.to(dtype)), vae.decode(z.to(dtype))
    assert post.mean.dtype == out.dtype == post.sample(torch.Generator().manual_seed(0)).dtype == dtype
    tol = 5e-3 if dtype == torch.float16 else 3e-2
    assert rel_err(post.mean, mean32) < tol and rel_err(out, out32) < tol


def test_bad_inputs_raise_clear_errors():
    vae = AutoencoderKL(THREE_LEVEL)  # downsample factor 4
    with pytest.raises(DataError, match="multiples of 4"):
        vae.encode(torch.zeros(1, 3, 8, 10))
    with pytest.raises(DataError, match=r"\[B, 3, H, W\]"):
        vae.encode(torch.zeros(1, 4, 8, 8))
    with pytest.raises(DataError, match=r"\[B, 4, h, w\]"):
        vae.decode(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ConfigError, match="multiple of norm_groups=32"):
        AutoencoderKL(VAEConfig(ch=48))
    with pytest.raises(ConfigError, match="multiple of norm_groups=32"):
        AutoencoderKL(VAEConfig(ch=40, norm_groups=32))


@pytest.mark.slow
def test_full_size_matches_diffusers():
    cfg = VAEConfig()
    ours = perturb_(AutoencoderKL(cfg), seed=0).eval()
    with torch.device("meta"):
        theirs = diffusers_vae(cfg)
    theirs.load_state_dict(converted(ours, theirs), strict=True, assign=True)  # shares our tensors
    theirs.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        post, ref = ours.encode(x), theirs.encode(x).latent_dist
        out, ref_out = ours.decode(z), theirs.decode(z).sample
    print(f"full-size VAE rel err: mean {rel_err(post.mean, ref.mean):.2e}, "
          f"logvar {rel_err(post.logvar, ref.logvar):.2e}, decode {rel_err(out, ref_out):.2e}")
    assert rel_err(post.mean, ref.mean) < 1e-5
    assert rel_err(post.logvar, ref.logvar) < 1e-5
    assert rel_err(out, ref_out) < 1e-5
