"""The forward (noising) process of DDPM as SD v1 configures it: "scaled linear" betas, i.e.
linear in sqrt(beta) from sqrt(linear_start) to sqrt(linear_end) over `timesteps` steps
(CompVis ldm/modules/diffusionmodules/util.py make_beta_schedule("linear")).

    x_t = sqrt(alphas_cumprod[t]) * x_0 + sqrt(1 - alphas_cumprod[t]) * noise

Everything is kept in float64 and cast only when applied to a tensor, so samplers and
training see the same numbers CompVis computes (it builds them in float64 with numpy).
"""
import torch


class NoiseSchedule:
    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000):
        self.timesteps = timesteps
        self.betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # [T], float64

    @classmethod
    def from_config(cls, sd_cfg) -> "NoiseSchedule":
        return cls(sd_cfg.linear_start, sd_cfg.linear_end, sd_cfg.timesteps)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): x0, noise [B, ...], t [B] integer timesteps in [0, T). Result in x0's dtype."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).long().reshape(-1).cpu()
        a = self.alphas_cumprod[t]                                    # [B] float64
        shape = (-1,) + (1,) * (x0.ndim - 1)                          # broadcast over C, H, W
        dtype = torch.promote_types(x0.dtype, torch.float32)         # fp16/bf16 mix in fp32
        sqrt_a = a.sqrt().to(device=x0.device, dtype=dtype).reshape(shape)
        sqrt_1ma = (1.0 - a).sqrt().to(device=x0.device, dtype=dtype).reshape(shape)
        out = sqrt_a * x0.to(dtype) + sqrt_1ma * noise.to(device=x0.device, dtype=dtype)
        return out.to(x0.dtype)

    def __repr__(self):
        return f"NoiseSchedule(timesteps={self.timesteps}, betas={self.betas[0]:.5f}..{self.betas[-1]:.5f})"
