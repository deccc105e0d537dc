"""The explicit fp16 machinery: dynamic loss scaler, found-inf flag, fp32 master weights, and
minidb.dreambooth.step.TrainStep.optimizer_step that strings them together, on small modules that run in fp16 on CPU."""
import copy

import pytest
import torch

from helpers import rel_err
from minidb.dreambooth.scaler import DynamicLossScaler, LossScaleCollapsed, found_inf, total_norm
from minidb.dreambooth.step import TrainStep
from minidb.dreambooth.train_config import OptimConfig, TrainConfig


def test_scaler_backoff_growth_and_state():
    s = DynamicLossScaler(init_scale=1024.0, growth_interval=3)
    s.update(found_inf=True)
    assert s.scale == 512.0 and s.skipped_steps == 1
    s.update(False), s.update(False)
    assert s.scale == 512.0 and s.clean_steps == 2
    s.update(False)
    assert s.scale == 1024.0 and s.clean_steps == 0
    s.update(False)
    t = DynamicLossScaler(init_scale=1.0, growth_interval=3)
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.clean_steps, t.skipped_steps) == (1024.0, 1, 1)
    assert s.scale_loss(torch.tensor(2.0)).item() == 2048.0


def test_scaler_floor_is_a_clear_error():
    s = DynamicLossScaler(init_scale=4.0, min_scale=1.0)
    s.update(True), s.update(True)
    assert s.scale == 1.0
    with pytest.raises(LossScaleCollapsed) as e:
        s.update(True)
    message = str(e.value)
    assert "floor 1 (optim.loss_scale_min) after 3 skipped steps" in message and "down to 1," in message
    # the real causes, and not "the initial scale was too large" (halving from any start finds a working one)
    assert "forward pass overflows" in message and "lower optim.loss_scale_min" in message
    assert "initial" not in message


def test_found_inf_flag():
    finite = [torch.ones(3), torch.full((2, 2), -5.0)]
    assert found_inf(finite).tolist() == [0.0]
    assert found_inf(finite + [torch.tensor([1.0, float("inf")])]).tolist() == [1.0]
    assert found_inf([torch.tensor([float("nan")])] + finite).tolist() == [1.0]
    # Large but finite fp16 gradients: their norm overflows fp16 (65504) but is computed in fp32.
    big = [torch.full((100,), 60000.0, dtype=torch.float16)]
    assert found_inf(big).tolist() == [0.0]
    assert total_norm(big).item() == pytest.approx(600000.0)
    flag = found_inf(finite)
    assert flag.dtype == torch.float32 and flag.shape == (1,)  # ready for all_reduce(MAX)


def _mlp(dtype, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    return m.to(dtype)


def _setup(dtype=torch.float16, lr=1e-3, init_scale=2.0 ** 16, max_grad_norm=1.0):
    """The model and the training step's parts: its masters, the step itself and its loss scaler (fp16)."""
    model = _mlp(dtype)
    step = TrainStep(list(model.named_parameters()), OptimConfig(lr=lr, loss_scale_init=init_scale,
                                                                  max_grad_norm=max_grad_norm), TrainConfig(),
                     precision="fp16" if dtype == torch.float16 else "fp32")
    return model, step.masters, step, step.scaler


def test_loss_scaling_rescues_fp16_gradients():
    """Gradients ~1e-9 underflow in fp16 unless the loss is scaled; the unscaled fp32 master grads
    then match a float64 reference."""
    x = torch.randn(8, 16)
    ref = _mlp(torch.float64)
    (1e-7 * ref(x.double()).square().sum()).backward()
    for scale, ok in ((2.0 ** 16, True), (1.0, False)):
        model, masters, _, _ = _setup()
        loss = 1e-7 * model(x.half()).float().square().sum()
        (loss * scale).backward()
        masters.grads_from_model(1.0 / scale)
        assert all(p.grad is None for p in model.parameters())  # fp16 grads freed
        errs = [rel_err(m.grad, r.grad) for m, r in zip(masters.params, ref.parameters())]
        assert (max(errs) < 2e-2) == ok, errs


def test_masters_keep_updates_fp16_would_round_away():
    """lr 1e-6 on weights in [0.5, 1), where fp16's spacing is 2**-11 ~ 5e-4: the fp16 weights
    cannot move, the fp32 masters accumulate the updates (and would cross a spacing eventually)."""
    model, masters, step, scaler = _setup(lr=1e-6)
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.0)
        masters.params[0].copy_(model[0].weight)
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 16).half()
    for _ in range(3):
        scaler.scale_loss(model(x).float().square().mean()).backward()
        stepped, norm = step.optimizer_step()
        assert stepped and norm > 0
    for m, p in zip(masters.params, model.parameters()):
        assert m.dtype == torch.float32 and p.dtype == torch.float16
        assert torch.equal(p, m.detach().half())  # the model holds the masters, rounded
    moved = (masters.params[0].detach() - before[0].float()).abs()
    assert moved.min() > 2e-6 and moved.max() < 4e-6   # Adam: ~lr per step, 3 steps
    assert torch.equal(model[0].weight, before[0])    # too small for fp16 to show, kept in the masters


def test_injected_inf_skips_step_halves_scale_changes_nothing():
    model, masters, step, scaler = _setup()
    opt = step.optimizer
    x = torch.randn(8, 16).half()
    scaler.scale_loss(model(x).float().square().mean()).backward()
    step.optimizer_step()  # one clean step: the optimizer has state
    weights = copy.deepcopy(model.state_dict())
    master_values = [m.detach().clone() for m in masters.params]
    opt_state = copy.deepcopy(opt.state_dict())
    scale = scaler.scale

    scaler.scale_loss(model(x).float().square().mean()).backward()
    model[2].bias.grad[1] = float("inf")  # the injected overflow
    stepped, norm = step.optimizer_step()
    assert not stepped and not torch.isfinite(torch.tensor(norm))
    assert scaler.scale == scale / 2 and scaler.clean_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights.values()))
    assert all(torch.equal(m, v) for m, v in zip(masters.params, master_values))
    assert all(m.grad is None for m in masters.params) and all(p.grad is None for p in model.parameters())
    assert all(torch.equal(opt.state_dict()["state"][i]["exp_avg"], opt_state["state"][i]["exp_avg"])
               for i in opt_state["state"])

    # the next clean step goes through at the lower scale
    scaler.scale_loss(model(x).float().square().mean()).backward()
    assert step.optimizer_step()[0]
    assert not torch.equal(model[2].bias, weights["2.bias"])


def test_fp32_step_equals_plain_torch_clip_and_adamw():
    x = torch.randn(8, 16)
    model, masters, step, scaler = _setup(torch.float32, max_grad_norm=0.5)
    assert not masters.separate and masters.params[0] is model[0].weight  # no copy in fp32
    ref = _mlp(torch.float32)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3)
    for _ in range(3):
        (100 * model(x).square().mean()).backward()
        step.optimizer_step()
        (100 * ref(x).square().mean()).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_master_state_dict_round_trip():
    model, masters, _, _ = _setup()
    state = {k: v.clone() + 1 for k, v in masters.state_dict().items()}
    masters.load_state_dict(state)
    assert torch.equal(model[0].weight, state["0.weight"].half())
    with pytest.raises(KeyError):
        masters.load_state_dict({"0.weight": state["0.weight"]})
