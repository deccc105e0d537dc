"""minidb.dreambooth.fused_step against the plain step (backward, then clip + optimizer step over all grads:
minidb.dreambooth.step.TrainStep), on a small model. On one CPU the same operations repeat
exactly, so "the same" is bit-equal weights here, not a tolerance."""
import pytest
import torch

from minidb.dreambooth.adamw8bit import AdamW8bit
from minidb.errors import ConfigError
from minidb.dreambooth.fused_step import FusedBackwardStep, check_supported
from minidb.dreambooth.scaler import DynamicLossScaler, MasterWeights
from minidb.dreambooth.step import TrainStep
from minidb.dreambooth.train_config import OptimConfig, TrainConfig


class Net(torch.nn.Sequential):
    def __init__(self):
        super().__init__(torch.nn.Linear(8, 64), torch.nn.GELU(), torch.nn.Linear(64, 64), torch.nn.GELU(),
                         torch.nn.Linear(64, 4))
        self.unused = torch.nn.Linear(2, 2)  # the loss never reaches it: no hook fires, never stepped

    def forward(self, x):
        for layer in list(self)[:5]:
            x = layer(x)
        return x


def model(dtype=torch.float32):
    torch.manual_seed(0)
    return Net().to(dtype)


def batches(n=4, scale=1.0):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 8, generator=g), scale * torch.randn(16, 4, generator=g)) for _ in range(n)]


def loss_of(net, x, y):
    return ((net(x.to(next(net.parameters()).dtype)).float() - y) ** 2).mean()


def plain(net, max_grad_norm, optimizer="adamw8bit", precision="fp32", loss_scale_init=65536.0) -> TrainStep:
    """The plain step over net's parameters, lr 1e-2."""
    return TrainStep(list(net.named_parameters()), OptimConfig(optimizer=optimizer, lr=1e-2, max_grad_norm=max_grad_norm,
                                                               loss_scale_init=loss_scale_init), TrainConfig(),
                     precision=precision)


def plain_step(step: TrainStep, net, x, y, clip_norm=None):
    """Backward, then the optimizer step over all gradients; clip_norm: clip by this norm instead of
    this step's (what the fused step's lagged clipping does)."""
    step.backward(lambda: (loss_of(net, x, y),))
    return step.optimizer_step(clip_norm)


def assert_same(net_a, net_b):
    for (name, a), b in zip(net_a.named_parameters(), net_b.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.2])
def test_fused_equals_plain_adamw8bit(max_grad_norm):
    """Clipping off: one backward. On (0.2 is below the norms here, so it clips): measure, then step."""
    net_a, net_b = model(), model()
    step_a, masters_b = plain(net_a, max_grad_norm), MasterWeights(list(net_b.named_parameters()))
    opt_b = AdamW8bit(masters_b.params, lr=1e-2, min_8bit_size=1024)  # 8-bit moments for the same tensors as step_a's
    alive = []  # how many gradients exist when a parameter is stepped

    def step_fn(m):
        alive.append(sum(p.grad is not None for p in net_b.parameters()))
        opt_b.step_param(m)

    fused = FusedBackwardStep(masters_b, step_fn, max_grad_norm=max_grad_norm)
    calls = [0]

    def counted_loss(x, y):
        calls[0] += 1
        return loss_of(net_b, x, y)

    for x, y in batches():
        ok_a, norm_a = plain_step(step_a, net_a, x, y)
        ok_b, norm_b = fused.step(lambda: counted_loss(x, y))
        assert ok_a and ok_b and norm_a == norm_b
        assert_same(net_a, net_b)
        if max_grad_norm:
            assert norm_a > max_grad_norm  # the clipping was active
    assert calls[0] == 4 * (2 if max_grad_norm else 1)
    assert max(alive) == 1  # only the gradient being used: the model's gradients never coexist
    assert all(p.grad is None for p in net_b.parameters())
    assert net_b.unused.weight not in opt_b.state


def test_fused_with_per_parameter_torch_adamw():
    """Any optimizer works through step_fn: here one torch AdamW per parameter, against one for all."""
    net_a, net_b = model(), model()
    step_a, masters_b = plain(net_a, 0.2, optimizer="adamw"), MasterWeights(list(net_b.named_parameters()))
    step_a.optimizer = torch.optim.AdamW(step_a.masters.params, lr=1e-2, foreach=False)  # as per_param's, bit for bit
    per_param = {m: torch.optim.AdamW([m], lr=1e-2, foreach=False) for m in masters_b.params}
    fused = FusedBackwardStep(masters_b, lambda m: per_param[m].step(), max_grad_norm=0.2)
    for x, y in batches():
        plain_step(step_a, net_a, x, y)
        fused.step(lambda: loss_of(net_b, x, y))
        assert_same(net_a, net_b)


def test_fused_fp16_loss_scaler_skips_leave_every_weight_unchanged():
    """fp16 model, fp32 masters, a loss scale so large that the first steps overflow: those steps
    are skipped by both (no weight, master or optimizer state changes), the scale halves the same
    way, and once it fits the fused step equals the plain one."""
    net_a, net_b = model(torch.float16), model(torch.float16)
    step_a = plain(net_a, 1.0, precision="fp16", loss_scale_init=2.0 ** 30)
    masters_a, scaler_a, masters_b = step_a.masters, step_a.scaler, MasterWeights(list(net_b.named_parameters()))
    assert masters_b.separate
    opt_b = AdamW8bit(masters_b.params, lr=1e-2, min_8bit_size=1024)
    scaler_b = DynamicLossScaler(2.0 ** 30)
    fused = FusedBackwardStep(masters_b, opt_b.step_param, max_grad_norm=1.0, scaler=scaler_b)
    skipped = 0
    for x, y in batches(20):
        before = [p.clone() for p in net_b.parameters()] + [m.clone() for m in masters_b.params]
        ok_a, norm_a = plain_step(step_a, net_a, x, y)
        ok_b, norm_b = fused.step(lambda: loss_of(net_b, x, y))
        assert ok_a == ok_b and scaler_a.scale == scaler_b.scale
        if not ok_b:
            skipped += 1
            after = [p for p in net_b.parameters()] + list(masters_b.params)
            assert all(torch.equal(a, b) for a, b in zip(before, after))
            if skipped == 1:
                assert not opt_b.state  # nothing was stepped, not even once
        else:
            assert norm_a == norm_b
        assert_same(net_a, net_b)
        for a, b in zip(masters_a.params, masters_b.params):
            assert torch.equal(a, b)
        assert all(p.grad is None for p in net_b.parameters()) and all(m.grad is None for m in masters_b.params)
    assert 0 < skipped < 20 and scaler_b.skipped_steps == skipped


def test_lagged_clipping_uses_the_previous_norm():
    """clip='lagged': one backward per step; step k is clipped by the norm step k-1 measured
    (the first step measures first, so it equals the exact step)."""
    net_a, net_b = model(), model()
    step_a, masters_b = plain(net_a, 0.5), MasterWeights(list(net_b.named_parameters()))
    opt_b = AdamW8bit(masters_b.params, lr=1e-2, min_8bit_size=1024)
    fused = FusedBackwardStep(masters_b, opt_b.step_param, max_grad_norm=0.5, clip="lagged")
    calls, previous = [0], None

    def counted_loss(x, y):
        calls[0] += 1
        return loss_of(net_b, x, y)

    for x, y in batches():
        _, norm_a = plain_step(step_a, net_a, x, y, clip_norm=None if previous is None else torch.tensor(previous))
        _, norm_b = fused.step(lambda: counted_loss(x, y))
        assert norm_a == norm_b
        assert_same(net_a, net_b)
        previous = norm_b
    assert calls[0] == 4 + 1  # one backward per step, plus the first step's measuring pass


def test_hooks_idle_outside_step_and_removable():
    net = model()
    masters = MasterWeights(list(net.named_parameters()))
    fused = FusedBackwardStep(masters, AdamW8bit(masters.params).step_param)
    x, y = batches(1)[0]
    w = net[0].weight.clone()
    loss_of(net, x, y).backward()  # not inside fused.step: a normal backward, nothing stepped
    assert net[0].weight.grad is not None and torch.equal(net[0].weight, w)
    net.zero_grad()
    fused.remove()
    assert not fused.handles


def test_refusals_say_why():
    with pytest.raises(ConfigError, match="DDP"):
        check_supported(world_size=2)
    with pytest.raises(ConfigError, match="grad_accum"):
        check_supported(grad_accum=4)
    with pytest.raises(ConfigError, match="loss scaler"):
        check_supported(scaler=DynamicLossScaler(), clip="lagged")
    with pytest.raises(ConfigError, match="clip"):
        check_supported(clip="sometimes")
