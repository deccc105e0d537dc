"""The world's pretraining script on a few steps: it runs end to end, logs, and a run interrupted in
either stage resumes to exactly the weights of an uninterrupted one (same process, same threads)."""
import dataclasses
import json

import pytest
import torch

from minidb.world import pretrain
from minidb.errors import ConfigError
from minidb.pipeline import StableDiffusion

TINY = pretrain.PretrainConfig(vae_steps=4, vae_batch=2, pool=8, unet_steps=4, unet_batch=2, warmup=2,
                               checkpoint_every=2, sample_every=1000)


def _weights(path):
    sd = StableDiffusion.from_checkpoint(path)
    return {f"{name}.{k}": v for name, m in sd.models.items() for k, v in m.state_dict().items()}


@pytest.mark.slow  # two tiny pretraining runs each: .ci/run runs it
@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_interrupted_pretraining_resumes_to_the_same_model(tmp_path, monkeypatch, stage):
    whole = _weights(pretrain.pretrain(tmp_path / "whole", TINY))

    log = pretrain.Stage.log

    def crash_after_step_3(self, step, **values):
        log(self, step, **values)
        if self.name == stage and step == 3:
            raise KeyboardInterrupt
    monkeypatch.setattr(pretrain.Stage, "log", crash_after_step_3)
    with pytest.raises(KeyboardInterrupt):
        pretrain.pretrain(tmp_path / "cut", TINY)
    monkeypatch.setattr(pretrain.Stage, "log", log)
    resumed = _weights(pretrain.pretrain(tmp_path / "cut", TINY))  # picks up at its step-2 checkpoint

    assert resumed.keys() == whole.keys()
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    rows = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["stage"] == stage] == [1, 2, 3, 3, 4]  # step 3 ran again
    assert (tmp_path / "cut" / "loss.png").is_file() and (tmp_path / "cut" / "samples").is_dir()


def test_pretraining_refuses_a_folder_of_other_settings(tmp_path):
    (tmp_path / "pretrain.json").write_text(json.dumps({"seed": 1}))
    with pytest.raises(ConfigError, match="other settings"):
        pretrain.pretrain(tmp_path, TINY)
    for torn in ('{"seed": 0, "vae_st', "[1, 2]", "\udcff"):  # cut short, not a dict, not UTF-8
        (tmp_path / "pretrain.json").write_bytes(torn.encode("utf-8", "surrogateescape"))
        with pytest.raises(ConfigError, match="pretrain.json"):
            pretrain.pretrain(tmp_path, TINY)


def test_the_command_refuses_a_torn_run_folder_in_one_line(tmp_path, capsys):
    """`python -m minidb.world.pretrain --out F` where F's pretrain.json was cut short: exit 2, one line that
    names the file, and the file left as it was."""
    from minidb.cli.pretrain import main
    (tmp_path / "pretrain.json").write_text('{"seed": 0, "vae_st')
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "pretrain.json is unreadable" in err[0]
    assert (tmp_path / "pretrain.json").read_text() == '{"seed": 0, "vae_st'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pretrain.json"]


@pytest.mark.parametrize("flags, words", [(["--class-share", "25"], "from 0 to 1"),
                                          (["--class-share", "0.25", "--unet-steps", "100",
                                            "--class-share-from", "100"], "never be drawn")])
def test_the_command_refuses_a_class_share_it_cannot_draw_in_one_line(tmp_path, capsys, flags, words):
    """A share above 1 (a percentage typed as one), or a tail that starts at or after the last step: exit 2,
    one line, and no run folder written."""
    from minidb.cli.pretrain import main
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["--out", str(out), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and words in err[0]
    assert not out.exists()


def test_timestep_weights_move_the_samples_to_the_middle_noise_levels():
    from minidb.schedule import NoiseSchedule
    schedule = NoiseSchedule(0.003, 0.02)
    uniform = pretrain.timestep_weights(schedule, pretrain.PretrainConfig(t_sampling="uniform"))
    assert torch.allclose(uniform, torch.full((1000,), 1e-3, dtype=torch.float64))
    cfg = pretrain.PretrainConfig(t_sampling="logsnr", t_mean=-2.0, t_std=1.0, t_uniform=0.1)
    w = pretrain.timestep_weights(schedule, cfg)
    a = schedule.alphas_cumprod
    lam = (a / (1 - a)).log()
    assert abs(float(w.sum()) - 1) < 1e-9 and bool((w > 0).all())
    band = (lam > -4) & (lam < 0)  # two standard deviations either side of the mean
    assert float(w[band].sum()) > 0.8 > float(uniform[band].sum())
    with pytest.raises(ValueError, match="t_sampling"):
        pretrain.timestep_weights(schedule, pretrain.PretrainConfig(t_sampling="lognormal"))


def test_learning_curve_is_drawn_from_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    point = {"shape": 0.2, "color": 0.9, "size": 0.7, "position": 0.5, "background": 1.0, "all": 0.1, "class_shape": 0.3}
    rows = [{"stage": "unet", "step": s, "loss": 0.1, "time": 100.0 + s} for s in (1, 2, 3, 4)]
    rows += [{"stage": "unet", "step": s, "curve": point, "time": 100.0 + s} for s in (2, 4)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pretrain.plot_curve(metrics, tmp_path / "curve.png").stat().st_size > 0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    assert pretrain.plot_curve(metrics, tmp_path / "none.png") is None


def test_the_band_applies_from_t_sampling_from(tmp_path, monkeypatch):
    """Uniform timesteps before step t_sampling_from, the log-SNR band from it on (R8's lever); a folder
    whose pretrain.json predates a setting reads it as its default, so an older run still resumes. (Its
    tiny run also shows stage 1's VAE check logged.)"""
    drawn = []
    multinomial = torch.multinomial

    def recording(weights, *args, **kwargs):
        if weights.numel() == 1000:  # the timestep draw
            drawn.append(bool(torch.allclose(weights, torch.full_like(weights, 1e-3))))
        return multinomial(weights, *args, **kwargs)

    monkeypatch.setattr(torch, "multinomial", recording)
    cfg = pretrain.PretrainConfig(vae_steps=1, vae_batch=2, pool=4, unet_steps=3, unet_batch=2, warmup=1,
                                  checkpoint_every=100, sample_every=1000, t_sampling="logsnr", t_sampling_from=2)
    pretrain.pretrain(tmp_path, cfg)
    assert drawn == [True, True, False]  # steps 0 and 1 uniform, step 2 the band
    checks = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    checks = [r["check"] for r in checks if r["stage"] == "vae-check"]  # stage 1's check, logged once
    assert len(checks) == 1 and {"background", "color", "wrong"} <= checks[0].keys()
    settings = json.loads((tmp_path / "pretrain.json").read_text())
    del settings["t_sampling_from"]
    (tmp_path / "pretrain.json").write_text(json.dumps(settings))
    pretrain.pretrain(tmp_path, dataclasses.replace(cfg, t_sampling_from=0))  # finished: nothing to do but save


def test_class_share_names_the_shape_alone_and_leaves_the_other_captions_as_they_were():
    """class_share draws from a stream of its own: a caption it does not pick is the one the runs
    before it drew, and one it picks is the class prompt ("a photo of a star") or stays empty."""
    from minidb.world import World, caption, combinations
    world = World(pretrain.PretrainConfig().seed + 2)
    items = [combinations(held=False)[k] for k in range(0, 640, 5)]
    base = pretrain.PretrainConfig()
    for step in (0, 7, 5500):
        before = pretrain.step_captions(base, world, items, step)
        some = pretrain.step_captions(dataclasses.replace(base, class_share=0.25), world, items, step)
        every = pretrain.step_captions(dataclasses.replace(base, class_share=1.0), world, items, step)
        alone = [caption(a, ("shape",)) for a in items]
        assert all(e in ("", c) for e, c in zip(every, alone))
        assert [e == "" for e in every] == [b == "" for b in before]
        changed = [k for k in range(len(items)) if some[k] != before[k]]
        assert changed and all(some[k] == alone[k] for k in changed)
        assert len(changed) < len(items) // 2


class _RoundTrip(torch.nn.Module):
    """A stand-in VAE whose round trip is x * gain: 1 keeps every render, 0.3 darkens every color."""

    def __init__(self, gain):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(float(gain)))

    def encode(self, x):
        return type("Posterior", (), {"mean": x})()

    def decode(self, z):
        return (z + 1) * self.gain - 1  # [-1, 1] -> pixels scaled by gain


def test_the_vae_check_reads_each_background_and_color_and_warns_on_a_lossy_round_trip(capsys):
    """R11's seed-0 VAE drew the green background black (benchmarks/RESULTS.md): the check after stage 1
    reads the round trips of fresh renders, so such a VAE is named before stage 2 trains on it."""
    exact = pretrain.check_vae(_RoundTrip(1.0), seed=0, n=60)
    assert exact["background"] >= 0.95 and exact["color"] >= 0.95  # the renders themselves: the reader's own errors
    assert not pretrain.warn_if_vae_is_wrong(exact)
    dark = pretrain.check_vae(_RoundTrip(0.3), seed=0, n=60)
    assert dark["background"] < 0.6 and sum(dark["wrong"]["background"].values()) == round((1 - dark["background"]) * 60)
    assert any(k.endswith("-> black") for k in dark["wrong"]["background"])
    assert pretrain.warn_if_vae_is_wrong(dark)
    assert "background" in capsys.readouterr().err


class _Blocky(_RoundTrip):
    """A stand-in VAE that keeps every pixel's color but draws the image in 8x8 blocks: no outline survives."""

    def decode(self, z):
        return torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(z, 8), scale_factor=8.0)


def test_the_vae_check_reads_the_shape_too(capsys):
    """A VAE of too few steps keeps colors and blurs outlines (RESULTS.md, "stage 1's warm-up"): the check
    reads the shape with the world's reader, not only the pixels' colors."""
    blocky = pretrain.check_vae(_Blocky(1.0), seed=0, n=60)
    assert blocky["background"] >= 0.95 and blocky["shape"] < 0.6
    assert pretrain.warn_if_vae_is_wrong(blocky)
    assert "keep the shape of" in capsys.readouterr().err


def test_stage_one_warms_up_on_its_own_schedule_not_the_unets(tmp_path):
    """Stage 1 once read the UNet's warm-up: R11's 3000 kept the VAE's steps in warm-up to the end, never
    annealed (benchmarks/RESULTS.md, "stage 1's warm-up"). Each stage now has its own, logged per step."""
    cfg = pretrain.PretrainConfig(vae_steps=4, vae_batch=2, pool=4, unet_steps=2, unet_batch=2, warmup=50,
                                  vae_warmup=1, checkpoint_every=100, sample_every=1000)
    pretrain.pretrain(tmp_path, cfg)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    vae = [r["lr"] for r in rows if r["stage"] == "vae"]
    unet = [r["lr"] for r in rows if r["stage"] == "unet" and "lr" in r]
    assert vae[0] == vae[1] == cfg.vae_lr > vae[2] > vae[3] >= cfg.min_lr  # the peak at once, then the cosine
    assert unet == [cfg.lr / 50, 2 * cfg.lr / 50]  # the UNet's own warm-up of 50


def test_class_share_applies_from_class_share_from():
    """A tail of class prompts: before class_share_from the captions are those of class_share 0, from it on
    those of class_share itself; so a run forked before that step is the one command's run."""
    from minidb.world import World, combinations
    world = World(pretrain.PretrainConfig().seed + 2)
    items = [combinations(held=False)[k] for k in range(0, 640, 5)]
    base = pretrain.PretrainConfig()
    tail = dataclasses.replace(base, class_share=0.25, class_share_from=9000)
    every = dataclasses.replace(base, class_share=0.25)
    for step in (0, 8999):
        assert pretrain.step_captions(tail, world, items, step) == pretrain.step_captions(base, world, items, step)
    for step in (9000, 10999):
        got = pretrain.step_captions(tail, world, items, step)
        assert got == pretrain.step_captions(every, world, items, step)
        assert got != pretrain.step_captions(base, world, items, step)


def test_a_run_folder_older_than_a_setting_reads_it_as_that_run_did(tmp_path):
    """A pretrain.json written before vae_warmup existed: its VAE warmed up over its `warmup`, so it resumes
    with that value and is refused, naming the difference, with today's default."""
    r11 = dataclasses.replace(pretrain.PretrainConfig(), warmup=3000)
    old = dataclasses.asdict(r11)
    del old["vae_warmup"], old["class_share"], old["class_share_from"]
    assert pretrain.as_run_did(old) == dataclasses.asdict(dataclasses.replace(r11, vae_warmup=3000))
    (tmp_path / "pretrain.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"vae_warmup: 3000 there, 100 here"):
        pretrain.pretrain(tmp_path, r11)
