"""The SD v1 denoiser: CompVis' `openaimodel.UNetModel` with `attention.SpatialTransformer`
(github.com/CompVis/stable-diffusion, ldm/modules/diffusionmodules/openaimodel.py and
ldm/modules/attention.py), reduced to what SD v1 uses.

Module paths are the checkpoint keys minus `model.diffusion_model.` (686 tensors at SD v1
size), so an original checkpoint loads strictly with no key table. CompVis' `nn.Sequential`s
keep their `Dropout(0)` (ResBlock `out_layers.2`, `ff.net.1`, `to_out.1`): it holds no weights, but keeps the
indices of the layers after it equal to the checkpoint's.

    unet = UNetModel(UNetConfig())
    eps = unet(x, t, context)   # x [B,4,h,w], t [B] (or a scalar), context [B,77,768]
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from minidb.attention import attention
from minidb.config import UNetConfig
from minidb.errors import ConfigError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of per-sample timesteps t [B] (int or float), in fp32."""
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=t.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)  # (dim/2,) from 1 down to ~1/max_period
    args = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


def zero_(module: nn.Module) -> nn.Module:
    """CompVis zero-initialises the last layer of each residual branch, so a fresh block is the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm over 32 groups computed in fp32 and cast back (CompVis' GroupNorm32): in fp16
    the variance of large activations overflows."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(32, channels, eps=eps)

    def forward(self, x):
        y = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(channels), nn.SiLU(), conv3x3(channels, out_channels))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0),
                                        zero_(conv3x3(out_channels, out_channels)))
        # Identity (no weights, no key) when the channel count is kept.
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.in_layers(x)  # (B, out, h, w)
        h = h + self.emb_layers(emb)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = conv3x3(channels, channels, stride=2)

    def forward(self, x):
        return self.op(x)  # (B, C, h/2, w/2)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv3x3(channels, channels)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2h, 2w)


class CrossAttention(nn.Module):
    """Multi-head attention of x [B,N,query_dim] over context [B,M,context_dim] (itself when None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, H, N|M, D)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v).transpose(1, 2).flatten(2)  # (B, N, H*D)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Dropout(0.0), nn.Linear(mult * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Attention over the h*w positions of a feature map, with 1x1 convs in and out (SD v1)."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int):
        super().__init__()
        dim_head = channels // heads
        inner = heads * dim_head
        self.norm = GroupNorm32(channels, eps=1e-6)  # CompVis: plain GroupNorm; fp32 is only safer
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim) for _ in range(depth))
        self.proj_out = zero_(nn.Conv2d(inner, channels, 1))

    def forward(self, x, context):
        _, _, h, w = x.shape
        y = self.proj_in(self.norm(x))  # (B, inner, h, w)
        y = y.flatten(2).transpose(1, 2).contiguous()  # (B, h*w, inner)
        for block in self.transformer_blocks:
            y = block(y, context)
        # contiguous, both ways: a transposed view made every LayerNorm copy, and the channels-last
        # strides it hands proj_out made that conv (and the residual after it) convert layouts
        y = y.transpose(1, 2).unflatten(2, (h, w)).contiguous()  # (B, inner, h, w)
        return x + self.proj_out(y)


class TimestepEmbedSequential(nn.Sequential):
    """One UNet block: ResBlocks also get the time embedding, transformers the text context."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        mc = cfg.model_channels
        widths = [mc * m for m in cfg.channel_mult]
        for width in widths:
            if width % cfg.norm_groups or width % cfg.num_heads:
                raise ConfigError(f"UNet width {width} must be a multiple of norm_groups={cfg.norm_groups} "
                                  f"and of num_heads={cfg.num_heads}")
        self.cfg = cfg
        self.gradient_checkpointing = False
        emb_dim = 4 * mc

        def transformer(ch):
            return SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, cfg.context_dim)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # Down path: remember each block's output width, since the up path concatenates them.
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv3x3(cfg.in_channels, mc))])
        skip_widths, ch, ds = [mc], mc, 1  # ds: downsampling factor of the current level
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, emb_dim, width)]
                ch = width
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_widths.append(ch)
            if level != len(widths) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_widths.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch), transformer(ch), ResBlock(ch, emb_dim, ch))

        # Up path: one more ResBlock per level than on the way down (it eats the Downsample's skip).
        self.output_blocks = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_widths.pop(), emb_dim, width)]
                ch = width
                if ds in cfg.attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), zero_(conv3x3(ch, cfg.out_channels)))
        # SD's 32 groups at 320+ channels; at 32 channels that would be one channel per group, which
        # erases each channel's mean (a flat background's color), so small models set fewer groups
        for m in self.modules():
            if isinstance(m, nn.GroupNorm):
                m.num_groups = cfg.norm_groups

    def _block(self, block, h, emb, context, recompute: bool = True):
        if recompute and self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, use_reentrant=False)  # recompute in backward
        return block(h, emb, context)

    def _check_inputs(self, x, t, context):
        cfg, factor = self.cfg, self.cfg.downsample_factor
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet input must be [B, {cfg.in_channels}, h, w], got {list(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"UNet input height and width must be multiples of {factor}, got {list(x.shape[2:])}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.context_dim:
            raise ValueError(f"context must be [{x.shape[0]}, L, {cfg.context_dim}], got {list(context.shape)}")
        if t.ndim > 1 or t.numel() not in (1, x.shape[0]):
            raise ValueError(f"timesteps must be a scalar or [{x.shape[0]}], got shape {list(t.shape)}")

    def forward(self, x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        """x [B,in,h,w], t [B] or scalar, context [B,L,context_dim] -> [B,out,h,w]."""
        t = torch.as_tensor(t, device=x.device)
        self._check_inputs(x, t, context)
        t = t.reshape(-1).expand(x.shape[0])  # a scalar t serves the whole batch
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))  # (B, 4*mc)
        context = context.to(x.dtype)

        skips, h = [], x
        for block in self.input_blocks:
            h = self._block(block, h, emb, context)
            skips.append(h)
        h = self._block(self.middle_block, h, emb, context)  # (B, C, h/f, w/f)
        for i, block in enumerate(self.output_blocks):
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, h', w')
            # backward starts with the last block: recomputing it would rebuild its activations at
            # the moment they could simply have been kept (as torch's checkpoint_sequential does)
            h = self._block(block, h, emb, context, recompute=i < len(self.output_blocks) - 1)
        return self.out(h)  # (B, out, h, w)
