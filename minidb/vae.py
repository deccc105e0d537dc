"""The SD v1 autoencoder: CompVis' `AutoencoderKL` (github.com/CompVis/stable-diffusion,
ldm/models/autoencoder.py) with the `Encoder`/`Decoder` of ldm/modules/diffusionmodules/model.py,
reduced to what SD v1 uses (no timestep embedding, dropout 0, attention only in the middle).

Module paths are the checkpoint keys minus `first_stage_model.` (248 tensors at SD v1 size), so
an original checkpoint loads strictly with no key table. SD v1 has `attn_resolutions: []`, so the
per-level `attn` lists CompVis builds are empty, hold no weights, and are left out here.

    vae = AutoencoderKL(VAEConfig())
    z = vae.encode(x).sample(generator)   # x [B,3,H,W] in [-1, 1] -> z [B,4,H/8,W/8]
    x = vae.decode(z)                     # unscaled latents: the 0.18215 factor is the pipeline's

Memory: the decoder at full resolution is the largest activation user in SD, so the forward
keeps no intermediates (CompVis' encoder holds every level's output in a list it never reads),
applies SiLU and the residual adds in place on freshly made tensors, and runs GroupNorm in the
input dtype: PyTorch's kernels accumulate half-precision statistics in fp32 already (measured:
same error as an fp32 upcast), and an upcast would cost an fp32 copy of every normalized map.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from minidb.attention import attention
from minidb.config import VAEConfig
from minidb.errors import ConfigError, DataError


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


def conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = Normalize(cin), conv3x3(cin, cout)
        self.norm2, self.conv2 = Normalize(cout), conv3x3(cout, cout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        # In-place SiLU and add are autograd-safe here: GroupNorm's and the convs' backward read
        # their inputs, never their outputs, and each overwritten tensor was just made.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))  # (B, cout, H, W)
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the H·W positions, q/k/v/proj_out as 1x1 convs."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        # contiguous: reshaping the transposed view gives channels-last strides, which proj_out, the
        # residual and every layer after them would keep (the encoder's latents, then a whole UNet)
        h = attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W).contiguous()
        return self.proj_out(h).add_(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # CompVis pads right and bottom only, then convolves unpadded: torch has no asymmetric padding.
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


def fold_taps(w: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
    """The 3 taps of w along dim as 2 taps on the un-upsampled input: after nearest ×2, output
    row 2i sees input rows (i-1, i, i) and row 2i+1 sees (i, i, i+1)."""
    t0, t1, t2 = w.unbind(dim)
    return torch.stack((t0, t1 + t2) if phase == 0 else (t0 + t1, t2), dim)


class Upsample(nn.Module):
    """Nearest ×2, then a 3x3 conv: CompVis' `conv(interpolate(x))`, computed as four 2x2 convs of
    x, one per output phase, written straight into the output. Same maths (to rounding), 2.25×
    fewer FLOPs, and no 4×-size upsampled copy: a faster decode with a lower peak."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x):
        B, C, H, W = x.shape
        w = self.conv.weight
        w = w.to(torch.promote_types(w.dtype, torch.float32))  # half-precision taps summed in fp32
        xp = F.pad(x, (1, 1, 1, 1))  # (B, C, H+2, W+2)
        out = x.new_empty(B, w.shape[0], 2 * H, 2 * W)  # (B, C, 2H, 2W)
        for a in range(2):
            for b in range(2):
                k = fold_taps(fold_taps(w, 2, a), 3, b).to(x.dtype)  # (C, C, 2, 2)
                out[:, :, a::2, b::2] = F.conv2d(xp[:, :, a:a + H + 1, b:b + W + 1], k, self.conv.bias)
        return out


class Level(nn.Module):
    """One resolution level: `block.{j}` ResnetBlocks, then `downsample` or `upsample` if any."""

    def __init__(self, cin: int, cout: int, num_blocks: int, resample: type[nn.Module] | None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if j == 0 else cout, cout) for j in range(num_blocks))
        if resample is Downsample:
            self.downsample = Downsample(cout)
        elif resample is Upsample:
            self.upsample = Upsample(cout)

    def forward(self, x):
        for block in self.block:
            x = block(x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Mid(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels = [cfg.ch * m for m in cfg.ch_mult]
        last = len(channels) - 1
        self.conv_in = conv3x3(cfg.in_channels, cfg.ch)
        self.down = nn.ModuleList(
            Level(cfg.ch if i == 0 else channels[i - 1], c, cfg.num_res_blocks, Downsample if i < last else None)
            for i, c in enumerate(channels))
        self.mid = Mid(channels[-1])
        self.norm_out = Normalize(channels[-1])
        self.conv_out = conv3x3(channels[-1], 2 * cfg.z_channels)  # mean and log-variance

    def forward(self, x):
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.down:
            h = level(h)  # (B, ch·ch_mult[i], H/2^i, W/2^i), halved after every level but the last
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # (B, 2·z_channels, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        channels = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = conv3x3(cfg.z_channels, channels[-1])
        self.mid = Mid(channels[-1])
        # up.{i} is indexed by resolution level like down.{i} (CompVis builds it from the lowest
        # resolution and prepends), so the forward walks it in reverse.
        self.up = nn.ModuleList(
            Level(channels[min(i + 1, len(channels) - 1)], c, cfg.num_res_blocks + 1, Upsample if i > 0 else None)
            for i, c in enumerate(channels))
        self.norm_out = Normalize(channels[0])
        self.conv_out = conv3x3(channels[0], cfg.out_ch)

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # (B, ch·ch_mult[-1], h, w)
        for level in reversed(self.up):
            h = level(h)  # (B, ch·ch_mult[i], ...), doubled after every level but level 0
        return self.conv_out(F.silu(self.norm_out(h), inplace=True))  # (B, out_ch, H, W)


class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) per latent element."""

    def __init__(self, moments: torch.Tensor):  # (B, 2·embed_dim, h, w)
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, embed_dim, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # as CompVis: keeps exp() finite

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std·ε, ε drawn from `generator` (on its device, then moved to the mean's)."""
        device = self.mean.device if generator is None else generator.device
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if cfg.ch % cfg.norm_groups:
            raise ConfigError(f"VAE ch={cfg.ch} must be a multiple of norm_groups={cfg.norm_groups}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        for m in self.modules():  # as in the UNet: fewer groups for narrow models
            if isinstance(m, nn.GroupNorm):
                m.num_groups = cfg.norm_groups

    @property
    def downsample_factor(self) -> int:
        return self.cfg.downsample_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Images x [B, in_channels, H, W] in [-1, 1], H and W multiples of downsample_factor."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise DataError(f"VAE encode expects images [B, {self.cfg.in_channels}, H, W] with H and W "
                            f"multiples of {f}; got shape {tuple(x.shape)}")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # (B, 2·embed_dim, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents z [B, embed_dim, h, w] -> images [B, out_ch, h·f, w·f], roughly in [-1, 1]."""
        if z.ndim != 4 or z.shape[1] != self.cfg.embed_dim:
            raise DataError(f"VAE decode expects latents [B, {self.cfg.embed_dim}, h, w]; got shape {tuple(z.shape)}")
        return self.decoder(self.post_quant_conv(z))
