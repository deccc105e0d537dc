"""Samplers: turn noise into latents with a noise predictor `eps_fn(x, t: int) -> eps`.

Guidance, conditioning and dtypes stay out of here (see minidb.sampling): a sampler only sees a
function of (x, t). Latents are updated in the dtype they come in (float32 from sampling.py, so
fp16 UNets do not round the running latents); the schedule's coefficients are float64 Python numbers.

- `ddim`:     DDIM (Song et al. 2020, eq. 12) with CompVis' step choice (ldm/models/diffusion/ddim.py).
- `plms`:     CompVis' PLMS (ldm/models/diffusion/plms.py): pseudo improved Euler first, then
              Adams-Bashforth of order 2, 3, 4 on eps, each applied as a DDIM step.
- `dpmpp_2m`: DPM-Solver++(2M) (Lu et al. 2022, alg. 2), data prediction, multistep midpoint, as
              diffusers' DPMSolverMultistepScheduler does with its defaults: "linspace" timesteps,
              first order on the first step, the last step lands on sigma = 0 (its x0 prediction).
"""
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from minidb.config import SAMPLER_NAMES, check, eta_problem, steps_problem


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """CompVis make_ddim_timesteps("uniform"), highest first: range(0, T, T // steps) + 1.

    Like CompVis this can give more timesteps than `steps` when `steps` does not divide T
    (7 steps -> 8 timesteps), where diffusers' "leading" spacing keeps the first `steps` of them.
    CompVis would also index timestep T (= 1000) when (T - 1) is a multiple of T // steps
    (steps = 3, 9, 101..111, 501..1000, ...) and crash; that non-existent timestep is dropped."""
    check_steps(steps, num_train_timesteps)
    c = num_train_timesteps // steps
    return [t + 1 for t in range(0, num_train_timesteps, c) if t + 1 < num_train_timesteps][::-1]


def dpm_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """diffusers' default "linspace" spacing for DPM-Solver: steps + 1 points from 0 to T-1, rounded
    half to even, highest first, the 0 dropped (the solver's last step goes to sigma = 0 instead)."""
    check_steps(steps, num_train_timesteps)
    ts = np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    return sorted(set(ts.tolist()), reverse=True)  # > ~500 steps rounds two points to one: keep one


def check_steps(steps, num_train_timesteps):
    """A sampling step count against the model's timesteps (minidb.config.steps_problem)."""
    check(steps_problem("steps", steps, num_train_timesteps))


def check_eta(eta, sampler: str):
    """minidb.config.eta_problem: PLMS and DPM-Solver++ are deterministic (CompVis raises for eta != 0 too)."""
    check(eta_problem("eta", eta, sampler))


def ddim_step(x, eps, a_t: float, a_prev: float, sigma: float = 0.0, noise=None):
    """x_t -> x_prev (DDIM eq. 12): predict x0, then walk back along eps to noise level a_prev."""
    pred_x0 = (x - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)
    x_prev = math.sqrt(a_prev) * pred_x0 + math.sqrt(1.0 - a_prev - sigma ** 2) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev


def _noise_like(x, generators):
    """One N(0, 1) draw per image from that image's generator (so a seed gives the same image at
    any batch size), drawn on the generator's device in float32 and then moved to x."""
    if generators is None:
        return torch.randn_like(x)
    if len(generators) != x.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {x.shape[0]}")
    noise = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in generators]
    return torch.stack(noise).to(device=x.device, dtype=x.dtype)


def _bar(timesteps, progress, name):
    return tqdm(timesteps, desc=name, disable=not progress, leave=False)


@torch.no_grad()
def ddim(eps_fn, x, schedule, steps: int, eta: float = 0.0, generators=None, progress=False, timesteps=None):
    """DDIM from x at the top timestep down to data. eta = 0 is deterministic; eta = 1 is DDPM-like."""
    ac = schedule.alphas_cumprod.tolist()
    ts = timesteps or ddim_timesteps(steps, schedule.timesteps)
    for i, t in enumerate(_bar(ts, progress, "DDIM")):
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]  # CompVis: the last step ends at alphas_cumprod[0]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - ac[t]) * (1 - ac[t] / a_prev))
        noise = _noise_like(x, generators) if sigma > 0 else None
        x = ddim_step(x, eps_fn(x, t).to(x.dtype), ac[t], a_prev, sigma, noise)
    return x


def plms_eps(e_t, old_eps):
    """PLMS' eps for this step from the current eps and up to 3 previous ones (oldest first):
    Adams-Bashforth of order len(old_eps) + 1. The first step (no history) is handled by the caller."""
    if len(old_eps) == 1:
        return (3 * e_t - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


@torch.no_grad()
def plms(eps_fn, x, schedule, steps: int, eta: float = 0.0, generators=None, progress=False, timesteps=None):
    """CompVis PLMS. Deterministic (CompVis raises for eta != 0 too). The first step costs two
    eps evaluations: a DDIM step, then eps at its end averaged with eps at its start."""
    check_eta(eta, "plms")
    ac = schedule.alphas_cumprod.tolist()
    ts = timesteps or ddim_timesteps(steps, schedule.timesteps)
    old_eps = []
    for i, t in enumerate(_bar(ts, progress, "PLMS")):
        a_prev = ac[ts[i + 1]] if i + 1 < len(ts) else ac[0]
        e_t = eps_fn(x, t).to(x.dtype)
        if not old_eps:  # pseudo improved Euler; with one step CompVis evaluates the end at t again
            t_next = ts[min(i + 1, len(ts) - 1)]
            e_next = eps_fn(ddim_step(x, e_t, ac[t], a_prev), t_next).to(x.dtype)
            e_prime = (e_t + e_next) / 2
        else:
            e_prime = plms_eps(e_t, old_eps)
        x = ddim_step(x, e_prime, ac[t], a_prev)
        old_eps = (old_eps + [e_t])[-3:]
    return x


@torch.no_grad()
def dpmpp_2m(eps_fn, x, schedule, steps: int, eta: float = 0.0, generators=None, progress=False, timesteps=None):
    """DPM-Solver++(2M): exponential integrator on the data prediction x0 in lambda = log(alpha/sigma),
    with x0 extrapolated linearly (in lambda) from the last two evaluations. Deterministic."""
    check_eta(eta, "dpm++2m")
    ac = schedule.alphas_cumprod.tolist()
    ts = timesteps or dpm_timesteps(steps, schedule.timesteps)
    prev_x0, prev_h = None, None
    for i, t in enumerate(_bar(ts, progress, "DPM++ 2M")):
        alpha_s, sigma_s = math.sqrt(ac[t]), math.sqrt(1.0 - ac[t])
        x0 = (x - sigma_s * eps_fn(x, t).to(x.dtype)) / alpha_s
        if i + 1 == len(ts):  # the last step goes to sigma = 0, where the solution is x0 itself
            x = x0
            continue
        alpha_t, sigma_t = math.sqrt(ac[ts[i + 1]]), math.sqrt(1.0 - ac[ts[i + 1]])
        h = math.log(alpha_t / sigma_t) - math.log(alpha_s / sigma_s)
        d = x0 if prev_x0 is None else x0 + (x0 - prev_x0) * (h / (2 * prev_h))  # midpoint: r = prev_h / h
        x = (sigma_t / sigma_s) * x - (alpha_t * math.expm1(-h)) * d
        prev_x0, prev_h = x0, h
    return x


SAMPLERS = {"ddim": ddim, "plms": plms, "dpm++2m": dpmpp_2m}
assert SAMPLERS.keys() == SAMPLER_NAMES.keys()
