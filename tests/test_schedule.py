"""NoiseSchedule against diffusers' schedulers (SD v1 settings) and CompVis' numpy formulas."""
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from minidb.config import SDConfig
from minidb.schedule import NoiseSchedule


def diffusers_ddpm():
    return DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear")


def test_betas_and_alphas_cumprod_match_compvis_numpy():
    s = NoiseSchedule.from_config(SDConfig())
    # CompVis make_beta_schedule("linear") + LatentDiffusion.register_schedule, in numpy float64
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas, axis=0)
    assert s.timesteps == 1000
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float64
    assert s.alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(s.betas.numpy(), betas, rtol=1e-12)
    np.testing.assert_allclose(s.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-12)
    # the well-known end points of SD v1's schedule
    assert s.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-12)
    sigma_max = ((1 - s.alphas_cumprod[-1]) / s.alphas_cumprod[-1]).sqrt().item()
    assert sigma_max == pytest.approx(14.6146, abs=1e-4)  # k-diffusion's SD v1 sigma_max


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_matches_diffusers_scaled_linear(cls):
    ref = cls(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    s = NoiseSchedule(0.00085, 0.012, 1000)
    # diffusers builds them in float32: agreement to float32 precision
    torch.testing.assert_close(s.betas.float(), ref.betas, rtol=1e-5, atol=0)
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=0)


def test_add_noise_matches_diffusers_and_formula():
    s = NoiseSchedule.from_config(SDConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 4, 6, 7, generator=g)
    noise = torch.randn(5, 4, 6, 7, generator=g)
    t = torch.tensor([0, 1, 500, 998, 999])
    out = s.add_noise(x0, noise, t)
    assert out.dtype == torch.float32 and out.shape == x0.shape
    ref = diffusers_ddpm().add_noise(x0, noise, t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    # float64 against the closed form, per image (checks the broadcast over C, H, W)
    out64 = s.add_noise(x0.double(), noise.double(), t)
    assert out64.dtype == torch.float64
    alphas_cumprod = np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2)
    for i, ti in enumerate(t.tolist()):
        ac = float(alphas_cumprod[ti])
        expect = ac ** 0.5 * x0[i].double() + (1 - ac) ** 0.5 * noise[i].double()
        torch.testing.assert_close(out64[i], expect, rtol=1e-12, atol=1e-12)


def test_add_noise_keeps_half_dtype_and_accepts_int_timesteps():
    s = NoiseSchedule.from_config(SDConfig())
    x0 = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    noise = torch.randn(2, 4, 3, 3).to(torch.bfloat16)
    out = s.add_noise(x0, noise, torch.tensor([10, 900], dtype=torch.int32))
    assert out.dtype == torch.bfloat16
    ref = s.add_noise(x0.float(), noise.float(), torch.tensor([10, 900]))
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)


def test_velocity_and_its_inverse_match_diffusers_and_the_formula():
    cfg = SDConfig(linear_start=0.003, linear_end=0.02)
    s = NoiseSchedule.from_config(cfg)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.003, beta_end=0.02, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 5, 5, generator=g), torch.randn(4, 4, 5, 5, generator=g)
    t = torch.tensor([0, 300, 900, 999])
    v = s.velocity(x0, noise, t)
    torch.testing.assert_close(v, ref.get_velocity(x0, noise, t), rtol=1e-5, atol=1e-6)
    x_t = s.add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):  # v and x_t give back the noise: what a sampler needs
        torch.testing.assert_close(s.eps_from_v(x_t[i], v[i], ti), noise[i], rtol=1e-4, atol=1e-5)


def test_parameterization_is_eps_or_v():
    with pytest.raises(ValueError, match="parameterization"):
        SDConfig(parameterization="x0")
