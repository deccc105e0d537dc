"""CLIP ViT-L/14's text tower (Radford et al. 2021), the frozen text encoder of SD v1.

SD v1 conditions the UNet on `last_hidden_state`: the 77 token vectors after the final LayerNorm
(no pooling, no projection). Module paths are the checkpoint's keys under
`cond_stage_model.transformer.` (CompVis saved transformers' CLIPTextModel), so an SD v1 file
loads strictly once that prefix is cut; `position_ids`, a buffer there, is not a weight here.

A pre-LN causal transformer: token + learned position embedding, then per layer
x += attn(LN(x)); x += mlp(LN(x)) with quick-GELU, then a final LayerNorm.
"""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from minidb.attention import attention
from minidb.config import CLIPTextConfig

LAYER_NORM_EPS = 1e-5


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; the weights were trained with it, not exact GELU."""
    return x * torch.sigmoid(1.702 * x)


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"CLIP width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        # (B, N, C) -> (B, H, N, C/H)
        q, k, v = (p(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=True)  # a token sees itself and what comes before it
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm2 = nn.LayerNorm(width, eps=LAYER_NORM_EPS)
        self.mlp = CLIPMLP(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg.width, cfg.heads) for _ in range(cfg.layers))
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)  # keep only each layer's input; recompute in backward
            else:
                x = layer(x)
        return x


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding.weight[:n]  # (B, N, C)


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=LAYER_NORM_EPS)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.final_layer_norm(self.encoder(self.embeddings(input_ids)))


class CLIPTextModel(nn.Module):
    """`forward(input_ids [B, N<=77]) -> last_hidden_state [B, N, width]`, the UNet's context."""

    def __init__(self, cfg: CLIPTextConfig = CLIPTextConfig()):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)

    @property
    def gradient_checkpointing(self) -> bool:
        """As UNetModel's: when training, recompute each layer's activations in backward."""
        return self.text_model.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.text_model.encoder.gradient_checkpointing = on

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.ndim != 2 or input_ids.shape[1] > self.config.max_length:
            raise ValueError(f"input_ids must be [batch, <= {self.config.max_length}] token ids "
                             f"(minidb.tokenizer.CLIPTokenizer makes them), got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point():
            raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        return self.text_model(input_ids)
