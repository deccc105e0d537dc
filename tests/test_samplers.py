"""Samplers against diffusers' schedulers, both driven by the same deterministic fake denoiser.

- DDIM vs DDIMScheduler configured the CompVis way (steps_offset=1, set_alpha_to_one=False,
  clip_sample=False, scaled_linear betas, "leading" spacing), eta 0 and eta > 0 with the same noise.
- PLMS vs PNDMScheduler(skip_prk_steps=True). Its skip-PRK schedule runs the same pseudo improved
  Euler first step as CompVis (t_N, then t_{N-1} twice); they differ by design only for 1 step,
  where CompVis still evaluates eps twice and diffusers takes a single plain DDIM step.
- DPM-Solver++(2M) vs DPMSolverMultistepScheduler with its defaults.
- Designed difference in the timesteps: CompVis' range(0, 1000, 1000 // steps) + 1 gives more
  timesteps than `steps` when steps does not divide 1000 (7 -> 8); diffusers' "leading" keeps the
  first `steps`. The tests check both lists, then drive diffusers with CompVis' list.

Float64 runs swap diffusers' float32 alphas for float64 ones (their rounding is not the algorithm)
and must agree to 1e-10; float32 runs use diffusers untouched and must agree to 1e-4.
"""
import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from helpers import rel_err
from minidb.config import SDConfig
from minidb.errors import MinidbError
from minidb.samplers import ddim, ddim_timesteps, dpm_timesteps, dpmpp_2m, plms, plms_eps
from minidb.schedule import NoiseSchedule

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SCHEDULE = NoiseSchedule.from_config(SDConfig())
AC64 = torch.from_numpy(np.cumprod(1.0 - np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2))
SHAPE = (2, 4, 5, 6)


class FakeDenoiser:
    """eps(x, t): the exact denoiser for Gaussian data of variance 0.5, plus a fixed random linear
    map of x and a t-dependent pattern, so every step matters and the outputs stay O(1).
    Counts its calls and records the timesteps it is asked about."""

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.1
        self.pattern = torch.randn(1, 4, 5, 6, generator=g, dtype=torch.float64)
        self.calls = []

    def __call__(self, x, t):
        t = int(t)
        self.calls.append(t)
        a = AC64[t].item()
        exact = math.sqrt(1 - a) * x / (a * 0.5 + 1 - a)
        mixed = torch.einsum("ij,bjhw->bihw", self.mix.to(x.dtype), x)
        return exact + mixed + 0.1 * math.sin(t / 100) * self.pattern.to(x.dtype)


def start_noise(dtype):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def run_diffusers(sched, x, timesteps, eps_fn, eta=0.0, noise_fn=None):
    for t in timesteps:
        kwargs = {}
        if isinstance(sched, DDIMScheduler):
            kwargs = dict(eta=eta, variance_noise=noise_fn(x) if eta > 0 else None)
        x = sched.step(eps_fn(x, int(t)), int(t), x, **kwargs).prev_sample
    return x


def float64_(sched):
    """Give a diffusers scheduler CompVis' float64 alphas (it builds float32 ones)."""
    sched.alphas_cumprod = AC64.clone()
    sched.final_alpha_cumprod = AC64[0].clone()
    return sched


def per_image_noise(seed, dtype):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(SHAPE[0])]
    return lambda x: torch.stack([torch.randn(SHAPE[1:], generator=g) for g in gens]).to(dtype)


# --- timesteps ---------------------------------------------------------------------------------

def test_ddim_timesteps_compvis_choice_and_designed_difference_with_leading():
    assert ddim_timesteps(50) == list(range(981, 0, -20))
    assert ddim_timesteps(1) == [1]
    assert ddim_timesteps(7) == [995, 853, 711, 569, 427, 285, 143, 1]  # 8: CompVis' range overshoots
    assert ddim_timesteps(3) == [667, 334, 1]      # CompVis would also ask for t=1000: dropped
    assert len(ddim_timesteps(1000)) == 999 and ddim_timesteps(1000)[0] == 999
    for n in [1, 2, 3, 7, 10, 20, 30, 42, 50, 250, 500]:
        ref = DDIMScheduler(**SD, steps_offset=1, timestep_spacing="leading")
        ref.set_timesteps(n)
        ours = ddim_timesteps(n)
        # diffusers' "leading" list is the tail of CompVis' list: the first n timesteps from the bottom
        assert ours[len(ours) - n:] == ref.timesteps.tolist(), n
        assert len(ours) == len(range(0, 1000, 1000 // n)) - (999 % (1000 // n) == 0)


def test_dpm_timesteps_match_diffusers_default_linspace():
    for n in [1, 2, 7, 10, 15, 20, 25, 50, 999]:
        ref = DPMSolverMultistepScheduler(**SD)
        ref.set_timesteps(n)
        assert dpm_timesteps(n) == ref.timesteps.tolist(), n


@pytest.mark.parametrize("bad", [0, -1, 1001, 2.5])
def test_bad_step_counts_are_clear_errors(bad):
    for fn in (ddim_timesteps, dpm_timesteps):
        with pytest.raises(MinidbError, match="steps"):
            fn(bad)


# --- DDIM --------------------------------------------------------------------------------------

def ddim_reference(n, dtype):
    ref = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                        timestep_spacing="leading")
    ref.set_timesteps(n)
    ref.timesteps = torch.tensor(ddim_timesteps(n))  # CompVis' list (the designed difference, above)
    return float64_(ref) if dtype == torch.float64 else ref


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 10, 50])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers(n, eta, dtype, tol):
    eps = FakeDenoiser()
    ours = ddim(eps, start_noise(dtype), SCHEDULE, n, eta=eta,
                generators=[torch.Generator().manual_seed(10 + i) for i in range(SHAPE[0])])
    assert ours.dtype == dtype
    assert eps.calls == ddim_timesteps(n)                 # one eps per timestep, top first
    ref = run_diffusers(ddim_reference(n, dtype), start_noise(dtype), ddim_timesteps(n), FakeDenoiser(),
                        eta=eta, noise_fn=per_image_noise(10, dtype))
    assert rel_err(ours, ref) < tol
    assert ours.abs().max() < 10 and ours.std() > 0.1   # a sensible O(1) result, not blown up or zero


def test_ddim_eta_noise_is_per_image():
    """Image 1 of a batch of 2 equals image 0 of a batch of 1 with the same generator seed."""
    x = start_noise(torch.float32)
    both = ddim(FakeDenoiser(), x, SCHEDULE, 5, eta=1.0,
                generators=[torch.Generator().manual_seed(s) for s in (3, 4)])
    second = ddim(FakeDenoiser(), x[1:], SCHEDULE, 5, eta=1.0, generators=[torch.Generator().manual_seed(4)])
    torch.testing.assert_close(both[1:], second)
    first = ddim(FakeDenoiser(), x[:1], SCHEDULE, 5, eta=1.0, generators=[torch.Generator().manual_seed(4)])
    assert rel_err(first, both[:1]) > 1e-3  # a different seed does change it


# --- PLMS --------------------------------------------------------------------------------------

def pndm_reference(n, dtype):
    ref = PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
                        timestep_spacing="leading")
    ref.set_timesteps(n)
    # diffusers' skip-PRK list built from CompVis' timesteps: t_N, t_{N-1}, t_{N-1}, t_{N-2}, ..., t_1
    up = ddim_timesteps(n)[::-1]
    ref.timesteps = torch.tensor((up[:-1] + up[-2:-1] + up[-1:])[::-1])
    return float64_(ref) if dtype == torch.float64 else ref


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("n", [2, 3, 7, 10, 50])
def test_plms_matches_diffusers_pndm_skip_prk(n, dtype, tol):
    eps = FakeDenoiser()
    ours = plms(eps, start_noise(dtype), SCHEDULE, n)
    ts = ddim_timesteps(n)
    assert eps.calls == [ts[0], ts[1]] + ts[1:]          # the first step evaluates eps twice
    ref_sched = pndm_reference(n, dtype)
    assert ref_sched.timesteps.tolist() == eps.calls
    ref = run_diffusers(ref_sched, start_noise(dtype), ref_sched.timesteps, FakeDenoiser())
    assert rel_err(ours, ref) < tol


def test_plms_single_step_designed_difference():
    """With 1 step CompVis (and minidb) still run the pseudo improved Euler step (2 evaluations,
    both at t=1); diffusers' PNDM takes one plain DDIM step. Check each against its own definition."""
    x = start_noise(torch.float64)
    eps = FakeDenoiser()
    ours = plms(eps, x, SCHEDULE, 1)
    assert eps.calls == [1, 1]
    ddim_ref = ddim_reference(1, torch.float64)
    e0 = FakeDenoiser()(x, 1)
    x_euler = ddim_ref.step(e0, 1, x).prev_sample
    improved = ddim_ref.step((e0 + FakeDenoiser()(x_euler, 1)) / 2, 1, x).prev_sample
    assert rel_err(ours, improved) < 1e-12
    pndm = pndm_reference(1, torch.float64)
    plain = run_diffusers(pndm, x, pndm.timesteps, FakeDenoiser())
    assert rel_err(plain, x_euler) < 1e-12                 # diffusers: plain DDIM step
    assert rel_err(ours, plain) > 1e-8   # ...which is not what CompVis does (t=1 -> 0 is a small step)


def test_plms_multistep_update_matches_pndm_given_the_same_eps_history():
    """One PLMS step (Adams-Bashforth of order 2, 3, 4 on eps, applied as a DDIM step) equals
    diffusers' PNDMScheduler.step_plms fed the same eps history."""
    from minidb.samplers import ddim_step
    g = torch.Generator().manual_seed(5)
    x, e_t = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(2))
    history = [torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3)]
    t, t_prev = 481, 461   # 50 steps: spacing 20
    for k in (1, 2, 3):
        ref = pndm_reference(50, torch.float64)
        ref.counter, ref.ets = 2 + k, list(history[-k:])   # past the improved-Euler start
        expect = ref.step(e_t, t, x).prev_sample
        ours = ddim_step(x, plms_eps(e_t, history[-k:]), AC64[t].item(), AC64[t_prev].item())
        assert rel_err(ours, expect) < 1e-12, k
    with pytest.raises(MinidbError, match="eta"):
        plms(FakeDenoiser(), start_noise(torch.float32), SCHEDULE, 5, eta=0.5)


# --- DPM-Solver++(2M) --------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 7, 10, 20, 50])
def test_dpmpp_2m_matches_diffusers_fp32(n):
    eps = FakeDenoiser()
    ours = dpmpp_2m(eps, start_noise(torch.float32), SCHEDULE, n)
    assert eps.calls == dpm_timesteps(n)
    ref = DPMSolverMultistepScheduler(**SD)
    assert (ref.config.algorithm_type, ref.config.solver_order, ref.config.solver_type) == ("dpmsolver++", 2, "midpoint")
    assert ref.config.final_sigmas_type == "zero" and ref.config.lower_order_final
    ref.set_timesteps(n)
    expect = run_diffusers(ref, start_noise(torch.float32), ref.timesteps, FakeDenoiser())
    assert rel_err(ours, expect) < 1e-4


def k_diffusion_dpmpp_2m(x, timesteps, eps_fn):
    """float64 reference in k-diffusion's form (sample_dpmpp_2m): variance-exploding x / alpha,
    sigma = sqrt((1 - a) / a), time -log(sigma), sigmas ending at 0. diffusers steps in float32."""
    sig = lambda t: math.sqrt((1 - AC64[t].item()) / AC64[t].item())  # noqa: E731
    sigmas = [sig(t) for t in timesteps] + [0.0]
    x = x * math.sqrt(1 + sigmas[0] ** 2)
    old = None
    for i, t in enumerate(timesteps):
        s, s_next = sigmas[i], sigmas[i + 1]
        denoised = x - s * eps_fn(x / math.sqrt(1 + s * s), t)     # the model sees x_vp = x / sqrt(1 + s^2)
        if s_next == 0:
            x = denoised
            break
        h = -math.log(s_next) + math.log(s)
        if old is None:
            d = denoised
        else:
            r = (-math.log(s) + math.log(sigmas[i - 1])) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (s_next / s) * x - math.expm1(-h) * d
        old = denoised
    return x


@pytest.mark.parametrize("n", [1, 2, 7, 20])
def test_dpmpp_2m_matches_k_diffusion_form_fp64(n):
    x = start_noise(torch.float64)
    ours = dpmpp_2m(FakeDenoiser(), x, SCHEDULE, n)
    assert rel_err(ours, k_diffusion_dpmpp_2m(x, dpm_timesteps(n), FakeDenoiser())) < 1e-10


def test_dpmpp_2m_is_a_better_integrator_than_ddim_at_20_steps():
    """Both solve the same probability-flow ODE; against a 500-step DDIM solution, DPM++(2M) at
    20 steps is closer than DDIM at 20 steps (what it is for)."""
    x = start_noise(torch.float64)
    fine = ddim(FakeDenoiser(), x, SCHEDULE, 500)
    e_ddim = rel_err(ddim(FakeDenoiser(), x, SCHEDULE, 20), fine)
    e_dpm = rel_err(dpmpp_2m(FakeDenoiser(), x, SCHEDULE, 20), fine)
    assert e_dpm < e_ddim
