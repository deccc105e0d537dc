"""DreamBooth training on a tiny random SD (minidb.config.tiny_config) on the CPU at 32x32:
the loss, what trains and what stays frozen, explicit fp16, exact resume, export, bad input,
and a CLI smoke run (class images, checkpoint, resume, export, sample)."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import dreambooth_world, perturb_
from minidb.dreambooth import checkpoint as ck
from minidb.dreambooth import train as train_module
from minidb.config import tiny_config
from minidb.errors import CheckpointError, ConfigError, DataError, MinidbError, StateError
from minidb.dreambooth.checkpoint import export_state
from minidb.dreambooth.step import TrainStep
from minidb.dreambooth.train import TrainingDiverged, add_adapters, micro_batch_loss, set_trainable, train
from minidb.dreambooth.train_config import ModelConfig, load_config
from minidb.weights import open_checkpoint

REPO = Path(__file__).resolve().parents[1]
DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A perturbed tiny SD saved as the base checkpoint, 3 instance photos, 2 class images."""
    return dreambooth_world(tmp_path_factory.mktemp("dreambooth"), class_images=2)


def config(world, out, *sets):
    return load_config(None, [
        f"model.base={world / 'base.safetensors'}", f"data.instance_dir={world / 'instance'}",
        "data.instance_prompt=a photo of sks dog", "prior.class_prompt=a photo of a dog",
        f"prior.class_dir={world / 'class'}", "prior.num_class_images=2", "data.resolution=32",
        f"train.output_dir={out}", "train.steps=4", "train.checkpoint_every=2", "optim.lr=1e-3",
        "train.keep_checkpoints=5", *sets])


def tiny_sd(seed=0):
    from minidb.pipeline import StableDiffusion
    sd = StableDiffusion(tiny_config())
    for i, model in enumerate(sd.models.values()):
        perturb_(model, seed=seed + i)
    return sd


def saved_weights(path):
    return ck.load_state(path)["weights"]


# ---- the loss and what trains --------------------------------------------------------------------

def test_prior_loss_is_instance_plus_weighted_class_half():
    sd = tiny_sd()
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999, 0])
    context = torch.randn(4, 77, 32, generator=g)
    loss, inst, cls = micro_batch_loss(sd.unet, sd.schedule, latents, noise, t, context, 2, 0.7)
    # each half on its own, in its own forward pass, MSE by hand
    halves = []
    for rows in (slice(0, 2), slice(2, 4)):
        x_t = sd.schedule.add_noise(latents[rows], noise[rows], t[rows])
        halves.append((sd.unet(x_t, t[rows], context[rows]) - noise[rows]).square().mean())
    torch.testing.assert_close(inst, halves[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(cls, halves[1], rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, halves[0] + 0.7 * halves[1], rtol=1e-5, atol=0)
    assert abs(loss - (halves[0] + halves[1]) / 2) > 1e-3  # not the mean over the whole batch
    only, inst_only, none = micro_batch_loss(sd.unet, sd.schedule, latents[:2], noise[:2], t[:2], context[:2], 2, 0.7)
    assert none is None and torch.equal(only, inst_only)



def test_a_v_model_is_fitted_to_v():
    sd = tiny_sd()
    g = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t, context = torch.tensor([50, 950]), torch.randn(2, 77, 32, generator=g)
    loss, _, _ = micro_batch_loss(sd.unet, sd.schedule, latents, noise, t, context, 2, 1.0, parameterization="v")
    pred = sd.unet(sd.schedule.add_noise(latents, noise, t), t, context)
    a = sd.schedule.alphas_cumprod[t].float()[:, None, None, None]
    v = a.sqrt() * noise - (1 - a).sqrt() * latents
    torch.testing.assert_close(loss, (pred - v).square().mean(), rtol=1e-5, atol=0)
    eps_loss, _, _ = micro_batch_loss(sd.unet, sd.schedule, latents, noise, t, context, 2, 1.0)
    assert abs(eps_loss - loss) > 1e-3

@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_min_snr_weights_each_examples_mse(parameterization):
    """train.min_snr_gamma: each example's MSE times min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v),
    then the mean of each half, as without it."""
    sd = tiny_sd()
    g = torch.Generator().manual_seed(2)
    latents, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t, context = torch.tensor([5, 400, 800, 990]), torch.randn(4, 77, 32, generator=g)
    loss, inst, cls = micro_batch_loss(sd.unet, sd.schedule, latents, noise, t, context, 2, 0.5,
                                       parameterization=parameterization, min_snr_gamma=5.0)
    pred = sd.unet(sd.schedule.add_noise(latents, noise, t), t, context)
    target = noise if parameterization == "eps" else sd.schedule.velocity(latents, noise, t)
    a = sd.schedule.alphas_cumprod[t]
    snr = a / (1 - a)  # t = 5: ~1e3 (weight << 1); t = 990: ~5e-3
    w = (snr.clamp(max=5.0) / (snr if parameterization == "eps" else snr + 1)).float()
    per_example = (pred - target).square().mean((1, 2, 3))
    torch.testing.assert_close(inst, (w[:2] * per_example[:2]).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(cls, (w[2:] * per_example[2:]).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(loss, inst + 0.5 * cls, rtol=1e-6, atol=0)
    plain, _, _ = micro_batch_loss(sd.unet, sd.schedule, latents, noise, t, context, 2, 0.5,
                                   parameterization=parameterization)
    assert abs(plain - loss) > 1e-3


def test_lora_gradients_reach_only_the_adapters():
    """With LoRA every model is frozen: only the adapters are trainable (kohya names), and only they
    get gradients; adapters built from the same seed are the same on every rank."""
    sd = tiny_sd()
    lora = add_adapters(sd, ModelConfig(lora_rank=2, lora_text_encoder=True), seed=3)
    assert set(lora) == {"unet", "text_encoder"}
    trainable = set_trainable(sd, True, lora)
    assert [n for n, _ in trainable] == [n for net in lora.values() for n, _ in net.named_parameters()]
    assert {n.split("_")[1] for n, _ in trainable} == {"unet", "te"}
    assert not any(p.requires_grad for m in sd.models.values() for p in m.parameters())
    assert sd.unet.training and sd.text_encoder.training and not sd.vae.training
    context = sd.text_encoder(sd.tokenizer(["a photo of sks dog", "a photo of a dog"]))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    loss, _, _ = micro_batch_loss(sd.unet, sd.schedule, latents, torch.randn_like(latents), torch.tensor([3, 700]),
                                  context, 1, 1.0)
    loss.backward()
    assert all(p.grad is None for m in sd.models.values() for p in m.parameters())
    assert all(p.grad is not None for _, p in trainable)
    ups = [p.grad for n, p in trainable if n.endswith("lora_up.weight")]
    assert all(g.abs().max() > 0 for g in ups)  # up starts at 0, so it is what moves first

    same = add_adapters(tiny_sd(), ModelConfig(lora_rank=2, lora_text_encoder=True), seed=3)
    other = add_adapters(tiny_sd(), ModelConfig(lora_rank=2), seed=4)
    for name, p in lora["unet"].named_parameters():
        assert torch.equal(p, same["unet"].get_parameter(name))
    down = next(n for n in lora["unet"].state_dict() if n.endswith("lora_down.weight"))
    assert not torch.equal(lora["unet"].state_dict()[down], other["unet"].state_dict()[down])
    assert set(other) == {"unet"}


def test_lora_targets_choose_the_unet_modules():
    """model.lora_targets: "attention" adapts only to_q/k/v/out (diffusers'); "transformer" also the
    feed-forward and proj_in/out (kohya's), in the file's kohya names."""
    def suffixes(targets):
        net = add_adapters(tiny_sd(), ModelConfig(lora_rank=2, lora_targets=targets), seed=0)["unet"]
        kinds = ("to_q", "to_k", "to_v", "to_out_0", "ff_net_0_proj", "ff_net_2", "proj_in", "proj_out")
        return {kind for name, _ in net.named_children() for kind in kinds if name.endswith("_" + kind)}
    assert suffixes("attention") == {"to_q", "to_k", "to_v", "to_out_0"}
    assert suffixes("transformer") == {"to_q", "to_k", "to_v", "to_out_0", "ff_net_0_proj", "ff_net_2",
                                       "proj_in", "proj_out"}


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_only_trainable_parts_get_gradients(train_text_encoder):
    sd = tiny_sd()
    trainable = set_trainable(sd, train_text_encoder)
    names = {n.split(".")[0] for n, _ in trainable}
    assert names == ({"unet", "text_encoder"} if train_text_encoder else {"unet"})
    assert len(trainable) == len(list(sd.unet.parameters())) + train_text_encoder * len(list(sd.text_encoder.parameters()))
    assert not sd.vae.training and sd.unet.training and sd.text_encoder.training == train_text_encoder
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = sd.vae.encode(pixels).sample() * sd.config.scale_factor
    context = sd.text_encoder(sd.tokenizer(["a photo of sks dog", "a photo of a dog"]))
    loss, _, _ = micro_batch_loss(sd.unet, sd.schedule, latents, torch.randn_like(latents), torch.tensor([3, 700]),
                                  context, 1, 1.0)
    loss.backward()
    assert all(p.grad is None for p in sd.vae.parameters())
    assert all(p.grad is not None for p in sd.unet.parameters())
    assert all((p.grad is not None) == train_text_encoder for p in sd.text_encoder.parameters())


def test_frozen_parts_unchanged_trained_parts_changed(world, tmp_path):
    from minidb.pipeline import StableDiffusion
    result = train(config(world, tmp_path / "run", "model.train_text_encoder=false", "train.steps=2",
                          "model.export_dtype=fp32"))
    state = ck.load_state(result.state_path)
    assert {k.split(".")[0] for k in state["weights"]} == {"unet"}
    assert len(state["optimizer"]["state"]) == len(state["weights"])  # only trainable params in the optimizer
    base = StableDiffusion.from_checkpoint(world / "base.safetensors")
    tuned = StableDiffusion.from_checkpoint(result.model_path)
    for name in ("vae", "text_encoder"):
        for (k, a), b in zip(base.models[name].state_dict().items(), tuned.models[name].state_dict().values()):
            assert torch.equal(a, b), f"{name}.{k} changed"
    changed = [not torch.equal(a, b) for a, b in zip(base.unet.parameters(), tuned.unet.parameters())]
    assert sum(changed) > 0.9 * len(changed)
    for k, v in tuned.unet.state_dict().items():  # the export holds exactly the trained fp32 masters
        assert torch.equal(v, state["weights"]["unet." + k])
    again = export_state(result.state_path, tmp_path / "again.safetensors", torch.float16)
    with open_checkpoint(again) as f:
        assert f.shapes["model.diffusion_model.out.2.weight"][1] == torch.float16
        assert torch.equal(f.get("model.diffusion_model.out.2.weight"), tuned.unet.out[2].weight.half())


# ---- exact resume ---------------------------------------------------------------------------------

def _sigterm_at(step):
    def callback(s, metrics):
        if s == step:
            os.kill(os.getpid(), signal.SIGTERM)
    return callback


@pytest.mark.parametrize("sets", [
    ("data.hflip=true", "train.grad_accum=2"),                      # random crops and flips, accumulation
    ("data.center_crop=true", "train.batch_size=2", "optim.lr_schedule=cosine", "optim.warmup_steps=2"),  # cached latents
    ("optim.optimizer=adamw8bit",),                                 # 8-bit moments: codes and absmax resume
    ("model.precision=bf16",),                                      # fp32 masters, and the token rows' fp32 table
    ("train.low_memory=true", "data.hflip=true"),                   # + the fused step: step 4 clipped by step 3's norm
    ("model.lora_rank=2", "train.low_memory=true"),                 # adapters through 8-bit moments and the fused step
    ("model.lora_rank=2", "model.lora_text_encoder=true", "train.ema_decay=0.9", "train.noise_offset=0.1",
     "train.min_snr_gamma=5", "optim.scale_lr=true", "train.grad_accum=2",
     "model.precision=bf16"),  # LoRA (bf16 adapters, fp32 masters), EMA and the loss options
    ("model.precision=bf16", "optim.master_weights=kahan", "train.low_memory=true", "train.ema_decay=0.9"),  # bf16
    # weights without fp32 masters: the Kahan compensation is optimizer state; through the fused step
    ("prior.target=base", "model.precision=bf16"),  # the class half's target from the base model: after a resume
    # too, not from the resumed weights (the text encoder trains: its base output kept as well)
])
def test_resume_is_bit_exact(world, tmp_path, sets):
    full = train(config(world, tmp_path / "full", *sets))
    assert full.step == 4 and not full.interrupted

    cfg = config(world, tmp_path / "split", *sets)
    stopped = train(cfg, callback=_sigterm_at(3))  # SIGTERM during step 3: checkpoint at 3, exit
    assert stopped.interrupted and stopped.step == 3 and stopped.model_path is None
    assert stopped.state_path == ck.checkpoint_path(tmp_path / "split" / "checkpoints", 3)
    with pytest.raises(ConfigError, match="--resume latest"):  # same folder, no --resume: refused
        train(cfg)
    resumed = train(cfg, resume="latest")
    assert resumed.step == 4

    # bit-exact: the very same computation repeated (this process, its thread count, the same batch shapes)
    a, b = ck.load_state(full.state_path), ck.load_state(resumed.state_path)
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for i, s in a["optimizer"]["state"].items():  # AdamW8bit's step is an int, the rest tensors
        assert all(torch.equal(torch.as_tensor(s[key]), torch.as_tensor(b["optimizer"]["state"][i][key])) for key in s)
    assert a["data"] == b["data"]
    assert ("token_rows" in a) == ("token_rows" in b)
    if "token_rows" in a:  # the table, decayed since the base, and its trained rows
        assert torch.equal(a["token_rows"]["table"], b["token_rows"]["table"])
    if "train.low_memory=true" in sets:  # lagged clipping's state: the norm of the step before
        assert a["fused_step"]["last_norm"] is not None
        assert torch.equal(a["fused_step"]["last_norm"], b["fused_step"]["last_norm"])
    else:
        assert a["fused_step"] is None and b["fused_step"] is None
    assert (a["ema"] is None) == ("train.ema_decay=0.9" not in sets)
    if a["ema"] is not None:
        for k in a["ema"]["shadow"]:
            assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    lines = [[json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for r in (full, resumed)]
    assert [m["step"] for m in lines[1]] == [1, 2, 3, 4]
    assert [m["loss"] for m in lines[0]] == [m["loss"] for m in lines[1]]


def test_prior_target_base_fits_the_class_half_to_the_base_models_prediction(world, tmp_path, capsys):
    """prior.target = "base": the class half's target is the frozen base model's prediction at the same noisy
    latent, so before the first update its loss is zero (the model is the base), and after updates it is the
    distance from the base; the instance half is the paper's loss either way."""
    sets = ("train.steps=3", "train.checkpoint_every=3", "optim.lr=3e-3")
    runs = {t: train(config(world, tmp_path / t, f"prior.target={t}", *sets)) for t in ("images", "base")}
    assert "2 class images (their targets the base model's predictions" in capsys.readouterr().err
    lines = {t: [json.loads(x) for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for t, r in runs.items()}
    first_images, first_base = lines["images"][0], lines["base"][0]
    assert first_base["loss_class"] < 1e-10 < 1e-3 < first_images["loss_class"]
    assert first_base["loss_instance"] == first_images["loss_instance"]  # the same step-1 batch and model
    assert all(m["loss_class"] > 1e-8 for m in lines["base"][1:])  # the model moved away from the base
    with pytest.raises(ConfigError, match=r"prior\.target.* must be one of images, base"):
        config(world, tmp_path / "bad", "prior.target=teacher")


# ---- memory options -------------------------------------------------------------------------------

@pytest.mark.parametrize("precision, tol", [("fp32", 1e-6), ("bf16", 1e-4)])
def test_token_rows_train_the_weights_of_the_whole_table(world, tmp_path, capsys, precision, tol):
    """train.token_rows (the default): only the rows the prompts use train, the table takes dense AdamW's
    weight decay; the trained weights equal the run that trains the whole table, to rounding (the gradient
    norm sums in another order; in bf16 the table's rows are rounded from its fp32 copy, as the masters
    are), and no step holds a gradient or moments of the table's size."""
    from safetensors.torch import load_file
    sets = ("optim.weight_decay=0.3", "train.steps=3", "train.checkpoint_every=3", "model.export_dtype=fp32",
            f"model.precision={precision}")
    dense = train(config(world, tmp_path / "dense", "train.token_rows=false", *sets))
    rows = train(config(world, tmp_path / "rows", *sets))
    assert "rows the prompts use: train.token_rows" in capsys.readouterr().err  # the line saying what trains
    a, b = ck.load_state(dense.state_path), ck.load_state(rows.state_path)
    key = "text_encoder.text_model.embeddings.token_embedding"
    table = a["weights"][f"{key}.weight"]  # fp32: the weights, or a 16-bit model's masters
    assert f"{key}.weight" not in b["weights"] and b["weights"][f"{key}.rows"].shape[0] < table.shape[0] // 100
    assert max(s["exp_avg"].numel() for s in b["optimizer"]["state"].values()) < table.numel()
    ids = b["token_rows"]["ids"]
    assert b["token_rows"]["table"].dtype == torch.float32
    torch.testing.assert_close(b["token_rows"]["table"], table, rtol=1e-5, atol=tol)
    torch.testing.assert_close(b["weights"][f"{key}.rows"], table[ids], rtol=1e-5, atol=tol)
    for k in a["weights"]:
        if k != f"{key}.weight":
            torch.testing.assert_close(b["weights"][k], a["weights"][k], rtol=1e-5, atol=tol, msg=k)
    base = load_file(world / "base.safetensors")
    base_table = next(v for k, v in base.items() if k.endswith("token_embedding.weight")).to(DTYPE[precision]).float()
    unused = torch.ones(len(table), dtype=torch.bool)
    unused[ids] = False
    shrink = (1 - 1e-3 * 0.3) ** 3  # three steps of the decay alone, at the constant lr
    torch.testing.assert_close(table[unused], base_table[unused] * shrink, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b["token_rows"]["table"][unused], table[unused], rtol=1e-6, atol=1e-7)
    assert (table[ids] - base_table[ids] * shrink).abs().max() > 10 * tol  # the used rows learned (3 steps of lr 1e-3)
    x, y = load_file(dense.model_path), load_file(rows.model_path)
    assert x.keys() == y.keys()
    for k in x:
        torch.testing.assert_close(y[k], x[k], rtol=1e-5, atol=tol, msg=k)


def test_token_rows_refuse_a_resume_with_other_prompts(world, tmp_path):
    """The rows a state trained are those of its prompts: a resume with a new word in the instance prompt
    is refused in one line that says what to do, and writes no checkpoint."""
    cfg = config(world, tmp_path / "run", "train.steps=2", "train.checkpoint_every=2")
    train(cfg)
    again = config(world, tmp_path / "run", "train.steps=3", "data.instance_prompt=a photo of zwx dog")
    with pytest.raises(StateError, match="other token rows.*resume with the prompts it was trained with") as e:
        train(again, resume="latest")
    assert "\n" not in str(e.value)
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "run" / "checkpoints")] == [2]


@pytest.mark.parametrize("sets, applies", [
    ((), True), (("train.token_rows=false",), False), (("model.train_text_encoder=false",), False),
    (("train.ema_decay=0.9",), False), (("optim.optimizer=adamw8bit",), False), (("train.low_memory=true",), False),
    (("model.precision=bf16",), True), (("model.precision=fp16",), True),
    (("model.lora_rank=2", "model.lora_text_encoder=true"), False)])
def test_token_rows_apply_where_they_are_exact(world, tmp_path, sets, applies):
    from minidb.dreambooth.plan import make_plan
    assert make_plan(config(world, tmp_path / "run", *sets)).token_rows is applies



@pytest.mark.parametrize("sets, forwards, eight_bit, checkpointing", [
    (("optim.optimizer=adamw8bit",), 3, True, False),
    (("train.fused_backward=exact",), 6, False, False),           # measure, then step: two passes a step
    (("train.fused_backward=lagged",), 4, False, False),          # one pass a step, two for the first
    (("model.gradient_checkpointing=true",), 3, False, True),
    (("train.low_memory=true",), 4, True, True),                  # 8-bit + lagged + checkpointing
])
def test_memory_options_train(world, tmp_path, monkeypatch, sets, forwards, eight_bit, checkpointing):
    """Each switch through train(): the optimizer, the step and the checkpointing it names are the
    ones that run (counted), the loss is finite, the weights move, and the metrics are the usual."""
    import minidb.clip
    import minidb.unet
    counts = {"forward": 0, "unet": 0, "clip": 0}

    def counting(key, real):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(train_module, "micro_batch_loss", counting("forward", train_module.micro_batch_loss))
    monkeypatch.setattr(minidb.unet, "checkpoint", counting("unet", minidb.unet.checkpoint))
    monkeypatch.setattr(minidb.clip, "checkpoint", counting("clip", minidb.clip.checkpoint))
    result = train(config(world, tmp_path / "run", "train.steps=3", "train.checkpoint_every=3", *sets))

    assert counts["forward"] == forwards
    assert (counts["unet"] > 0) == (counts["clip"] > 0) == checkpointing  # both models recompute, or neither
    state = ck.load_state(result.state_path)
    moments = list(state["optimizer"]["state"].values())
    assert len(moments) == len(state["weights"])
    if eight_bit:  # AdamW8bit: the large tensors' moments as uint8 codes + an fp32 absmax per block
        quantized = [m for m in moments if "exp_avg_codes" in m]
        assert quantized and all(m["exp_avg_codes"].dtype == m["exp_avg_sq_codes"].dtype == torch.uint8 and
                                 m["exp_avg_absmax"].dtype == torch.float32 and m["step"] == 3 for m in quantized)
    else:
        assert all(m["exp_avg"].dtype == torch.float32 for m in moments)
    assert (state["fused_step"] is not None) == (forwards != 3)  # the fused step: more forwards than steps
    metrics = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["skipped"] is False for m in metrics)
    with open_checkpoint(world / "base.safetensors") as f:
        before = f.get("model.diffusion_model.out.2.weight")
    assert not torch.equal(state["weights"]["unet.out.2.weight"], before)
    written = load_config(result.run_dir / "config.toml")
    if "train.low_memory=true" in sets:  # spelled out in the run's config
        assert (written.optim.optimizer, written.train.fused_backward, written.model.gradient_checkpointing) == (
            "adamw8bit", "lagged", True)


@pytest.mark.parametrize("sets, message", [
    (("train.fused_backward=exact", "train.grad_accum=2"), "train.grad_accum = 2 has nothing to accumulate into"),
    (("train.fused_backward=lagged", "model.precision=fp16"), "cannot honour fp16's loss scaler"),
    (("train.fused_backward=exact", "model.precision=fp16", "train.low_memory=true", "2 processes"),
     "does not work with 2 processes: DDP"),
])
def test_fused_step_refusals_fail_before_training(world, tmp_path, monkeypatch, sets, message):
    if "2 processes" in sets:  # the plan's check comes before any collective: torchrun's WORLD_SIZE will do
        monkeypatch.setenv("WORLD_SIZE", "2")
        sets = sets[:-1]
    with pytest.raises(ConfigError, match=message):
        train(config(world, tmp_path / "run", *sets))
    assert not (tmp_path / "run").exists()


def test_low_memory_leaves_out_what_the_run_cannot_do(world, tmp_path):
    """low_memory with grad_accum = 2: 8-bit AdamW and checkpointing, no fused step (not an error)."""
    result = train(config(world, tmp_path / "run", "train.low_memory=true", "train.grad_accum=2", "train.steps=1"))
    written = load_config(result.run_dir / "config.toml")
    assert (written.optim.optimizer, written.train.fused_backward, written.model.gradient_checkpointing) == (
        "adamw8bit", "off", True)
    with pytest.raises(ConfigError, match="cannot resume .* different optim.optimizer"):
        train(config(world, tmp_path / "run", "train.grad_accum=2", "train.steps=2"), resume="latest")


# ---- LoRA, EMA, captions and the small options, through train() ---------------------------------------

def test_lora_run_trains_adapters_only_and_writes_a_kohya_file(world, tmp_path, capsys):
    from minidb.lora import read_lora
    from minidb.pipeline import StableDiffusion
    base = world / "base.safetensors"
    result = train(config(world, tmp_path / "run", "model.lora_rank=4", "model.lora_alpha=2",
                          "model.lora_text_encoder=true", "model.lora_merge_export=true", "model.export_dtype=fp32",
                          "train.steps=2"))
    state = ck.load_state(result.state_path)
    weights = state["weights"]  # the checkpoint: adapters and their optimizer state, nothing of the base
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight"))
               for k in weights)
    assert {k.split("_")[1] for k in weights} == {"unet", "te"}
    assert len(state["optimizer"]["state"]) == len(weights)
    assert any(v.abs().max() > 0 for k, v in weights.items() if k.endswith(".lora_up.weight"))  # trained

    assert result.lora_path == tmp_path / "run" / "lora.safetensors" and result.model_path.is_file()
    file = read_lora(result.lora_path)  # kohya keys: the trained fp32 weights and every module's alpha
    assert file.keys() == set(weights) | {k.split(".")[0] + ".alpha" for k in weights}
    assert all(torch.equal(file[k], v) for k, v in weights.items())
    assert {v.item() for k, v in file.items() if k.endswith(".alpha")} == {2.0}

    # the merged model is the base with that file merged in; the VAE is the base's
    merged = StableDiffusion.from_checkpoint(result.model_path)
    expect = StableDiffusion.from_checkpoint(base)
    expect.load_lora(result.lora_path)
    expect.merge_lora()
    original = StableDiffusion.from_checkpoint(base)
    for name in ("unet", "text_encoder", "vae"):
        for (k, a), b in zip(expect.models[name].state_dict().items(), merged.models[name].state_dict().values()):
            assert torch.equal(a, b), (name, k)
    changed = [k for k, v in merged.unet.state_dict().items() if not torch.equal(v, original.unet.state_dict()[k])]
    assert changed and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight"))
                           for k in changed)

    out = capsys.readouterr().out
    assert f"LoRA: {result.lora_path} (rank 4, fp32, " in out and f"merged model: {result.model_path}" in out
    assert f"try: minidb sample --ckpt {base} --lora {result.lora_path} --prompt" in out
    again = export_state(result.state_path, dtype=torch.float32)  # --export of a LoRA checkpoint
    assert again == tmp_path / "run" / "lora-step_000002.safetensors"
    assert all(torch.equal(t, file[k]) for k, t in read_lora(again).items()) and read_lora(again).keys() == file.keys()
    done = train(config(world, tmp_path / "run", "model.lora_rank=4", "model.lora_alpha=2",
                        "model.lora_text_encoder=true", "model.lora_merge_export=true", "model.export_dtype=fp32",
                        "train.steps=2"), resume="latest")
    assert done.lora_path == result.lora_path and done.model_path is None
    assert f"LoRA: {result.lora_path}. To train on" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="different model.lora_rank"):
        train(config(world, tmp_path / "run", "train.steps=3"), resume="latest")


def test_ema_is_the_average_of_each_steps_weights_and_is_exported(world, tmp_path):
    from minidb.pipeline import StableDiffusion
    d = 0.5
    result = train(config(world, tmp_path / "run", "model.train_text_encoder=false", "train.steps=2",
                          "train.checkpoint_every=1", f"train.ema_decay={d}", "train.ema_on_cpu=true",
                          "model.export_dtype=fp32"))
    w0 = {f"unet.{k}": v for k, v in StableDiffusion.from_checkpoint(world / "base.safetensors").unet.state_dict().items()}
    w1, w2 = (saved_weights(ck.checkpoint_path(result.run_dir / "checkpoints", s)) for s in (1, 2))
    ema = ck.load_state(result.state_path)["ema"]
    assert ema["decay"] == d and ema["shadow"].keys() == w2.keys()
    for k, shadow in ema["shadow"].items():
        expected = d * d * w0[k] + d * (1 - d) * w1[k] + (1 - d) * w2[k]
        torch.testing.assert_close(shadow, expected, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(ema["shadow"][k], w2[k]) for k in w2)
    tuned = StableDiffusion.from_checkpoint(result.model_path)  # train.export_ema (the default): the average
    for k, v in tuned.unet.state_dict().items():
        assert torch.equal(v, ema["shadow"]["unet." + k]), k
    again = StableDiffusion.from_checkpoint(export_state(result.state_path, tmp_path / "a.safetensors",
                                                              torch.float32))
    assert all(torch.equal(v, ema["shadow"]["unet." + k]) for k, v in again.unet.state_dict().items())


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_caption_files_give_their_images_their_prompts(world, tmp_path, monkeypatch, train_text_encoder):
    """photo.txt replaces the instance prompt for photo.png. Each example's context is the text
    encoder's output for its own prompt; a frozen encoder encodes each distinct prompt once."""
    from minidb.dreambooth.data import DreamBoothDataset
    from minidb.tokenizer import CLIPTokenizer
    folder = tmp_path / "captioned"
    shutil.copytree(world / "instance", folder)
    (folder / "0.txt").write_text("a photo of sks dog on a beach\n")
    (folder / "2.txt").write_text("a photo of sks dog in the snow")
    prompts = ["a photo of sks dog on a beach", "a photo of sks dog", "a photo of sks dog in the snow",
               "a photo of a dog"]  # images 0, 1, 2, then the class prompt
    seen = []
    real = train_module.prompt_context
    expected_ids = CLIPTokenizer()(prompts)

    def spy(text_encoder, prompt_ids, fixed_context, rows):
        context = real(text_encoder, prompt_ids, fixed_context, rows)
        with torch.no_grad():
            alone = torch.cat([text_encoder(prompt_ids[r:r + 1]) for r in rows.tolist()])
        torch.testing.assert_close(context, alone, rtol=1e-5, atol=1e-5)
        assert torch.equal(prompt_ids.cpu(), expected_ids)
        seen.append((rows.tolist(), fixed_context))
        return context

    monkeypatch.setattr(train_module, "prompt_context", spy)
    train(config(world, tmp_path / "run", f"data.instance_dir={folder}", "train.steps=3",
                 f"model.train_text_encoder={str(train_text_encoder).lower()}"))
    order = _epoch_order(world, folder)
    assert [rows for rows, _ in seen] == [[order[s] % 3, 3] for s in range(3)]  # row = image index here
    if train_text_encoder:
        assert all(fixed is None for _, fixed in seen)
    else:  # computed once, before the loop: the same tensor at every step
        assert seen[0][1].shape[0] == 4 and all(fixed is seen[0][1] for _, fixed in seen)


def _epoch_order(world, folder):
    """Epoch 0's example order of the test runs (3 instance, 2 class images, seed 0)."""
    from minidb.dreambooth.data import DreamBoothDataset, load_image_folder
    images = load_image_folder(folder, "instance", 32)
    classes = load_image_folder(world / "class", "class", 32)
    return DreamBoothDataset(images, classes, 32, seed=0).epoch_order(0)


def test_small_options_reach_the_step(world, tmp_path, monkeypatch, capsys):
    """optim.scale_lr multiplies the lr by the instance images per step; train.noise_offset reaches
    the noise draws and train.min_snr_gamma the loss (their effects: the tests above and test_data)."""
    import minidb.dreambooth.data
    offsets, gammas = [], []
    real_draw, real_loss = minidb.dreambooth.data.draw_noise, train_module.micro_batch_loss
    monkeypatch.setattr(minidb.dreambooth.data, "draw_noise", lambda *a: offsets.append(a[-1]) or real_draw(*a))
    monkeypatch.setattr(train_module, "micro_batch_loss",
                        lambda *a, **k: gammas.append(k["min_snr_gamma"]) or real_loss(*a, **k))
    result = train(config(world, tmp_path / "run", "optim.scale_lr=true", "train.batch_size=2", "train.grad_accum=2",
                          "train.steps=1", "optim.lr=1e-4", "train.noise_offset=0.05", "train.min_snr_gamma=5"))
    assert json.loads((result.run_dir / "metrics.jsonl").read_text())["lr"] == pytest.approx(4e-4, rel=1e-12)
    assert "lr x 4 (optim.scale_lr)" in capsys.readouterr().err
    assert offsets == [0.05, 0.05] and gammas == [5.0, 5.0]  # two micro-batches


def test_cached_latents_match_encoding_every_step(world, tmp_path):
    from minidb.dreambooth.data import DreamBoothDataset, load_image_folder
    from minidb.dreambooth.distributed import Dist
    from minidb.dreambooth.data import cache_latents, encode_batch
    sd = tiny_sd()
    images = load_image_folder(world / "instance", "instance", 32)
    classes = load_image_folder(world / "class", "class", 32)
    dataset = DreamBoothDataset(images, classes, 32, center_crop=True, hflip=False, seed=0)
    cache = cache_latents(sd, dataset, True, Dist())
    for epoch in (0, 3):  # without augmentation every epoch sees the same latents
        items = [(epoch, i) for i in range(len(dataset))]
        mean, std = encode_batch(sd, dataset, items, prior=True)
        cached_mean, cached_std = encode_batch(sd, dataset, items, prior=True, latent_cache=cache)
        torch.testing.assert_close(cached_mean, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached_std, std, rtol=1e-5, atol=1e-5)
    # and whole runs agree: the same loss at every step, the same weights within fp32 rounding. Not
    # bit-exact: the VAE sees batches of another size. adam_eps=1e-4: some gradients are zero in exact
    # arithmetic (a conv bias just before a GroupNorm) and ~1e-10 in fp32; with the default eps, Adam
    # would turn that rounding noise into full +-lr steps whose sign differs between the runs.
    runs = [train(config(world, tmp_path / f"run{c}", "data.center_crop=true", "train.steps=2", "optim.adam_eps=1e-4",
                         f"data.cache_latents={c}")) for c in ("true", "false")]
    losses = [[json.loads(x)["loss"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines()] for r in runs]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    a, b = (saved_weights(r.state_path) for r in runs)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


# ---- explicit fp16 --------------------------------------------------------------------------------

def test_fp16_injected_inf_skips_step_and_halves_scale(world, tmp_path, monkeypatch):
    calls = []
    real_step = TrainStep.optimizer_step

    def poisoned(step, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # step 2: one UNet gradient element overflows
            next(p for p in step.masters.model_params if p.grad is not None).grad.view(-1)[0] = float("inf")
        return real_step(step, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "optimizer_step", poisoned)
    result = train(config(world, tmp_path / "run", "model.precision=fp16", "train.steps=3",
                          "train.checkpoint_every=1", "optim.loss_scale_init=1024"))
    metrics = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in metrics] == [False, True, False]
    assert [m["loss_scale"] for m in metrics] == [1024.0, 512.0, 512.0]
    w1, w2, w3 = (saved_weights(ck.checkpoint_path(result.run_dir / "checkpoints", s)) for s in (1, 2, 3))
    assert all(v.dtype == torch.float32 for v in w1.values())  # fp32 masters
    assert all(torch.equal(w1[k], w2[k]) for k in w1)           # the skipped step changed nothing
    assert sum(not torch.equal(w2[k], w3[k]) for k in w2) > 0.9 * len(w2)
    assert ck.load_state(ck.checkpoint_path(result.run_dir / "checkpoints", 2))["scaler"]["scale"] == 512.0


def test_bf16_trains_with_fp32_masters(world, tmp_path):
    result = train(config(world, tmp_path / "run", "model.precision=bf16", "train.steps=2"))
    weights = saved_weights(result.state_path)
    assert all(v.dtype == torch.float32 for v in weights.values())
    assert ck.load_state(result.state_path)["scaler"] is None and np.isfinite(result.loss)


def test_bf16_kahan_trains_without_fp32_masters(world, tmp_path, capsys):
    """optim.master_weights = "kahan": the checkpoint's weights are the bf16 weights themselves, and
    each 8-bit-AdamW state holds its bf16 compensation; the plain (not fused) step."""
    result = train(config(world, tmp_path / "run", "model.precision=bf16", "optim.master_weights=kahan",
                          "optim.optimizer=adamw8bit", "train.steps=2"))
    state = ck.load_state(result.state_path)
    assert all(v.dtype == torch.bfloat16 for v in state["weights"].values())
    compensations = [s["kahan"] for s in state["optimizer"]["state"].values()]
    assert len(compensations) == len(state["weights"])
    assert all(c.dtype == torch.bfloat16 for c in compensations) and any(c.abs().max() > 0 for c in compensations)
    assert np.isfinite(result.loss)
    assert "Kahan-compensated weights (no fp32 masters)" in capsys.readouterr().err  # the run's description


def test_tensorboard_gets_the_metrics_when_installed(world, tmp_path, monkeypatch):
    import types
    calls = []

    class SummaryWriter:  # stands in for tensorboard, which this environment does not install
        def __init__(self, logdir):
            calls.append(("init", logdir))

        def add_scalar(self, tag, value, step):
            calls.append((tag, step))

        def add_image(self, tag, image, step):
            calls.append((tag, tuple(image.shape), step))

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    train(config(world, tmp_path / "run", "train.steps=1", 'validation.prompts=["a photo of sks dog"]',
                 "validation.sample_steps=1"))
    assert calls[0] == ("init", str(tmp_path / "run" / "tensorboard")) and calls[-1] == ("close",)
    assert ("train/loss", 1) in calls and ("train/lr", 1) in calls and ("validation", (3, 32, 32), 1) in calls


# ---- bad input ------------------------------------------------------------------------------------

def test_nan_loss_stops_and_keeps_last_good_checkpoint(world, tmp_path):
    cfg = config(world, tmp_path / "run", "optim.lr=1e30", "train.checkpoint_every=1", "train.steps=6",
                 "optim.max_grad_norm=0")
    with pytest.raises(TrainingDiverged) as e:
        train(cfg)
    found = ck.list_checkpoints(tmp_path / "run" / "checkpoints")
    assert found and f"last good checkpoint is {found[-1][1]}" in str(e.value)
    assert f"at step {found[-1][0] + 1} " in str(e.value)
    assert all(torch.isfinite(v).all() for v in saved_weights(found[-1][1]).values())


def test_bad_inputs_fail_before_training(world, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataError):
        train(config(world, out, f"data.instance_dir={tmp_path / 'missing'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        train(config(world, out, f"data.instance_dir={tmp_path / 'empty'}"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.jpg").write_text("not a photo")
    with pytest.raises(DataError, match="notes.jpg"):
        train(config(world, out, f"data.instance_dir={tmp_path / 'junk'}"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        train(config(world, out, f"model.base={tmp_path / 'nope.safetensors'}"))
    with pytest.raises(MinidbError, match="multiple of"):
        train(config(world, out, "data.resolution=36"))
    with pytest.raises(ConfigError, match="instance_prompt"):
        train(config(world, out, "data.instance_prompt="))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        train(config(world, out), resume="latest")
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_resume_latest_of_a_run_stopped_before_its_first_checkpoint_starts_it_over(world, tmp_path, capsys):
    """A run killed after it wrote config.toml and before its first checkpoint: `--resume latest`
    starts it from step 0 with a note (an empty or mistyped folder is still refused, above), and the
    run then ends as an uninterrupted one does: its model, one metrics line per step."""
    out = tmp_path / "run"
    train(config(world, out, "train.steps=2"))
    for path in (out / "checkpoints").glob("step_*.pt"):
        path.unlink()
    (out / "model.safetensors").unlink()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # a step the killed run logged
    capsys.readouterr()
    result = train(config(world, out, "train.steps=2"), resume="latest")
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert result.step == 2 and (out / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    with pytest.raises(CheckpointError, match="no checkpoint"):  # not when the folder holds another run
        for path in (out / "checkpoints").glob("step_*.pt"):
            path.unlink()
        train(config(world, out, "train.steps=3"), resume="latest")


def test_resolution_defaults_to_the_base_models_and_exact_size_images_cache_latents(world, tmp_path, monkeypatch,
                                                                                     capsys):
    """data.resolution = 0: the base model's image_size (32 for the tiny model), written into the run's
    config.toml. Instance images of exactly that size: a random crop changes nothing, so the latents
    are cached even with center_crop = false."""
    (tmp_path / "exact").mkdir()
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            tmp_path / "exact" / f"{i}.png")
    cached = []
    real_cache = train_module.cache_latents
    monkeypatch.setattr(train_module, "cache_latents", lambda *a: cached.append(1) or real_cache(*a))
    cfg = load_config(None, [f"model.base={world / 'base.safetensors'}", f"data.instance_dir={tmp_path / 'exact'}",
                             "data.instance_prompt=a photo of sks dog", f"train.output_dir={tmp_path / 'run'}",
                             "train.steps=1", "data.center_crop=false"])
    assert cfg.data.resolution == 0
    result = train(cfg)
    assert load_config(result.run_dir / "config.toml").data.resolution == 32
    assert cached == [1]
    out, err = capsys.readouterr()
    assert "2 instance images at 32x32 (the base model's image size); 1 step of" in err
    assert "accumulation = 1 instance image per step" in err
    assert out.startswith("done: 1 step, loss ") and "not caching" not in err


def test_prompt_without_identifier_warns(world, tmp_path):
    with pytest.warns(UserWarning, match="dog"):
        train(config(world, tmp_path / "run", "data.instance_prompt=a photo of sks", "train.steps=1"))


def test_run_folder_of_another_run_is_refused(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, "train.steps=2"))
    with pytest.raises(ConfigError, match=r"holds a different run \(optim.lr"):
        train(config(world, out, "train.steps=2", "optim.lr=2e-3"))
    other_base = tmp_path / "other.safetensors"
    other_base.write_bytes((world / "base.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="cannot resume .* different model.base"):
        train(config(world, out, f"model.base={other_base}"), resume="latest")
    # resuming with more steps continues the run
    more = train(config(world, out, "train.steps=3"), resume="latest")
    assert more.step == 3


# ---- the command line -----------------------------------------------------------------------------

def _minidb(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run([sys.executable, "-m", "minidb", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120, **kwargs)


@pytest.mark.slow  # five commands end to end, each its own process: .ci/run runs it
def test_cli_smoke_generate_train_resume_export_sample(world, tmp_path):
    run = tmp_path / "run"
    toml = tmp_path / "run.toml"
    toml.write_text(f"""
[model]
base = "{world / 'base.safetensors'}"
[data]
instance_dir = "{world / 'instance'}"
instance_prompt = "a photo of sks dog"
resolution = 32
[prior]
class_prompt = "a photo of a dog"
num_class_images = 3
sample_steps = 2
batch_size = 2
[train]
output_dir = "{run}"
steps = 2
[validation]
prompts = ["a photo of sks dog on the moon", "a photo of a dog"]
every = 2
sample_steps = 2
""")
    first = _minidb("train", "--config", toml)
    assert first.returncode == 0, first.stderr
    assert len(list((run / "class_images").glob("*.png"))) == 3  # generated from the base model
    assert (run / "checkpoints" / "step_000002.pt").is_file() and (run / "samples" / "step_000002.png").is_file()
    assert Image.open(run / "samples" / "step_000002.png").size == (64, 32)

    second = _minidb("train", "--resume", run, "--set", "train.steps=4")
    assert second.returncode == 0, second.stderr
    assert "resumed from" in second.stderr and "train.steps: 2 -> 4" in second.stderr
    assert "model: " + str(run / "model.safetensors") in second.stdout
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    done = _minidb("train", "--config", toml, "--resume", "latest")  # nothing left to do: said, nothing written
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"{run} is already finished: step 4 of train.steps = 2; model: "
                                   f"{run / 'model.safetensors'}. To train on, resume with a larger train.steps "
                                   "(--set train.steps=N)")
    assert "loss nan" not in done.stdout + done.stderr
    assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    # --H/--W default to the model's own size, which the exported file stores (32 for the tiny model)
    sample = _minidb("sample", "--ckpt", run / "model.safetensors", "--prompt", "a photo of sks dog",
                     "--steps", 2, "--outdir", tmp_path / "out", "--seed", 0)
    assert sample.returncode == 0, sample.stderr
    assert Image.open(tmp_path / "out" / "samples" / "00000.png").size == (32, 32)
    assert "1 image of 'a photo of sks dog'" in sample.stderr

    bad = _minidb("train", "--config", toml, "--set", "optim.lrr=1")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "minidb train: error: --set: unknown option optim.lrr (did you mean optim.lr?)"]


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])  # 128 + the signal
def test_cli_ctrl_c_or_sigterm_writes_checkpoint_and_says_how_to_resume(world, tmp_path, sig, status):
    run = tmp_path / "run"
    args = ["train", "--config", REPO / "minidb" / "data" / "dreambooth_example.toml",
            "--set", f"model.base={world / 'base.safetensors'}", "--set", f"data.instance_dir={world / 'instance'}",
            "--set", f"prior.class_dir={world / 'class'}", "--set", "prior.num_class_images=2",
            "--set", "data.resolution=32", "--set", f"train.output_dir={run}", "--set", "validation.prompts=[]",
            "--set", "model.precision=fp32"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-m", "minidb", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        metrics = run / "metrics.jsonl"
        import time
        deadline = time.monotonic() + 90
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
            time.sleep(0.05)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status, err
    assert err.count(f"continue with: minidb train --resume {run}") == 1 and "interrupted" not in err  # said once
    assert f"stopped by {sig.name} at step" in err
    step, path = ck.list_checkpoints(run / "checkpoints")[-1]
    assert step >= 2 and ck.load_state(path)["step"] == step
