"""minidb.dreambooth.step.TrainStep: its state_dict is the sum of its parts', and a step restored from it
continues as the original does, bit for bit (the whole runs: tests/test_train.py's resume tests)."""
import copy

import pytest
import torch

from minidb.dreambooth.step import TrainStep
from minidb.dreambooth.train_config import OptimConfig, TrainConfig


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)).to(dtype)


def _run(step, net, k0, k1):
    for k in range(k0, k1):
        g = torch.Generator().manual_seed(k)
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        step.begin(k)
        step.backward(lambda: (((net(x.to(next(net.parameters()).dtype)).float() - y) ** 2).mean(),))
        assert step.step()[0]


@pytest.mark.parametrize("sets, precision", [
    (dict(), "fp32"),
    (dict(optim=dict(optimizer="adamw8bit"), train=dict(fused_backward="lagged", ema_decay=0.9)), "fp32"),
    (dict(optim=dict(lr_schedule="cosine", warmup_steps=2), train=dict(ema_decay=0.5)), "fp16"),
])
def test_restored_step_continues_bit_for_bit(sets, precision):
    dtype = torch.float16 if precision == "fp16" else torch.float32
    optim = OptimConfig(lr=1e-2, max_grad_norm=0.5, **sets.get("optim", {}))
    train = TrainConfig(steps=6, **sets.get("train", {}))
    net_a, net_b = _net(dtype), _net(dtype)
    a = TrainStep(list(net_a.named_parameters()), optim, train, precision)
    _run(a, net_a, 0, 3)
    state = copy.deepcopy(a.state_dict())
    assert set(state) == {"weights", "optimizer", "scaler", "fused_step", "ema"}
    assert (state["scaler"] is not None) == (precision == "fp16")
    assert (state["fused_step"] is not None) == (train.fused_backward != "off")
    assert (state["ema"] is not None) == (train.ema_decay > 0)

    b = TrainStep(list(net_b.named_parameters()), optim, train, precision)
    b.load_state_dict(state)
    _run(a, net_a, 3, 6)
    _run(b, net_b, 3, 6)
    for (name, pa), pb in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(pa, pb), name
    for name, w in a.weights(ema=True).items():
        assert torch.equal(w, b.weights(ema=True)[name]), name


def test_a_state_without_ema_starts_the_average_at_its_weights():
    """A training state written without EMA (train.ema_decay was 0): the average starts at the
    restored weights, not at the weights the step was built with."""
    net = _net()
    plain = TrainStep(list(net.named_parameters()), OptimConfig(lr=1e-2), TrainConfig(steps=2))
    _run(plain, net, 0, 2)
    state = copy.deepcopy(plain.state_dict())
    fresh = _net()
    with_ema = TrainStep(list(fresh.named_parameters()), OptimConfig(lr=1e-2), TrainConfig(steps=2, ema_decay=0.9))
    with_ema.load_state_dict(state)
    for name, w in with_ema.weights(ema=True).items():
        assert torch.equal(w, state["weights"][name]), name
