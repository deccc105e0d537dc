"""minidb.dreambooth.train_options: min-SNR weights, offset noise, the fp32 EMA, caption files, lr scaling."""
import pytest
import torch

from minidb.errors import DataError
from minidb.schedule import NoiseSchedule
from minidb.dreambooth.train_options import EMA, caption_for, min_snr_weights, offset_noise, scaled_lr, weighted_mse


def test_min_snr_weights():
    schedule = NoiseSchedule()
    t = torch.tensor([0, 100, 500, 999])
    snr = schedule.snr(t)
    w = min_snr_weights(snr, gamma=5.0)
    assert w.dtype == torch.float32
    # low noise (SNR > 5): weight 5 / SNR < 1; high noise (SNR < 5): weight 1
    assert snr[0] > 5 and w[0] == pytest.approx(5.0 / snr[0].item(), rel=1e-6)
    assert snr[-1] < 5 and w[-1] == 1.0
    assert torch.all(w[:-1] <= w[1:])  # never more weight at less noise
    with pytest.raises(ValueError, match="gamma"):
        min_snr_weights(snr, 0.0)
    # v-prediction (Hang et al. 2023; diffusers' train scripts): min(SNR, gamma) / (SNR + 1)
    v = min_snr_weights(snr, gamma=5.0, parameterization="v")
    torch.testing.assert_close(v, (snr.clamp(max=5.0) / (snr + 1)).float())
    assert v[-1] == pytest.approx((snr[-1] / (snr[-1] + 1)).item(), rel=1e-6) and v[-1] < w[-1]
    with pytest.raises(ValueError, match="eps or v"):
        min_snr_weights(snr, 5.0, "x0")


def test_weighted_mse():
    pred, target = torch.zeros(2, 4, 3, 3), torch.ones(2, 4, 3, 3)
    target[1] *= 2  # per-example MSE 1 and 4
    assert weighted_mse(pred, target) == pytest.approx(2.5)
    assert weighted_mse(pred, target, torch.tensor([1.0, 0.5])) == pytest.approx((1 + 2) / 2)
    assert weighted_mse(pred, target, torch.ones(2)) == torch.nn.functional.mse_loss(pred, target)


def test_offset_noise_is_a_per_channel_constant():
    noise = torch.randn(3, 4, 8, 8)
    assert offset_noise(noise, 0.0) is noise
    out = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    offset = out - noise
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset))  # constant over h, w
    assert offset[:, :, 0, 0].abs().max() > 0 and offset[:, :, 0, 0].std() < 0.5
    again = offset_noise(noise, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_ema_fp32_average_moves_where_fp16_would_not():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    ema = EMA([("w", p)], decay=0.9999)
    assert ema.shadow["w"].dtype == torch.float32
    with torch.no_grad():
        p.fill_(2.0)
    for _ in range(10):
        ema.update([("w", p)])
    expected = 2 - 0.9999 ** 10  # 1 -> 2 at rate 1e-4 per step
    assert ema.shadow["w"][0].item() == pytest.approx(expected, rel=1e-6)
    # the same average kept in fp16 rounds back to 1 every step
    assert torch.tensor(1.0, dtype=torch.float16) * 0.9999 + torch.tensor(2.0, dtype=torch.float16) * 1e-4 == 1.0


def test_ema_state_dict_round_trip_and_cpu():
    p = torch.nn.Parameter(torch.randn(3))
    ema = EMA([("w", p)], decay=0.5, device="cpu")
    ema.update([("w", p * 0 + 1)])
    state = ema.state_dict()
    other = EMA([("w", torch.nn.Parameter(torch.zeros(3)))], decay=0.9)
    other.load_state_dict(state)
    assert other.decay == 0.5 and torch.equal(other.shadow["w"], ema.shadow["w"])
    other.load_state_dict({**state, "updates": 1})  # as saved before the unused count was dropped
    with pytest.raises(ValueError, match="missing"):
        EMA([("v", p)]).load_state_dict(state)
    with pytest.raises(ValueError, match="decay"):
        EMA([("w", p)], decay=1.0)


def test_caption_files(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_bytes(b"")
    (tmp_path / "b.txt").write_text("a photo of sks dog\n on  the beach\n", encoding="utf-8")
    assert caption_for(tmp_path / "a.png", "a photo of sks dog") == "a photo of sks dog"
    assert caption_for(tmp_path / "b.png", "ignored") == "a photo of sks dog on the beach"
    (tmp_path / "c.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="c.txt: empty caption"):
        caption_for(tmp_path / "c.png", "x")


def test_scaled_lr():
    assert scaled_lr(1e-6, batch_size=2, grad_accum=4, world_size=2) == pytest.approx(16e-6)
