"""The DreamBooth config: TOML + --set overrides into frozen dataclasses, clear errors, round trip."""
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from minidb.errors import ConfigError
from minidb.dreambooth.plan import make_plan, read_base, with_memory_switches
from minidb.dreambooth.train_config import (DreamBoothConfig, differences, dump_toml, explanations, from_dict, load_config,
                                 resolved, to_dict, validate)

EXAMPLE = Path(__file__).resolve().parents[1] / "minidb" / "data" / "dreambooth_example.toml"


def test_defaults_documented_values():
    cfg = DreamBoothConfig()
    assert cfg.optim.lr == 1e-6 and cfg.optim.lr_schedule == "constant"
    assert cfg.prior.loss_weight == 1.0 and cfg.model.train_text_encoder is True
    # the issue-15 options are off unless asked for (caption files only act where a .txt file is)
    assert cfg.model.lora_rank == 0 and not cfg.model.lora_merge_export and not cfg.optim.scale_lr
    assert cfg.train.min_snr_gamma == cfg.train.noise_offset == cfg.train.ema_decay == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


def test_example_config_loads_and_validates():
    cfg = load_config(EXAMPLE)
    validate(cfg)
    assert cfg.data.instance_prompt == "a photo of sks dog"
    assert cfg.prior.class_prompt == "a photo of a dog"
    assert len(cfg.validation.prompts) == 3


def test_overrides_typed(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[optim]\nlr = 3e-6\n[train]\nsteps = 10\n')
    cfg = load_config(path, ["steps=20", "optim.max_grad_norm=0", "center_crop=true",
                             "data.instance_prompt=a photo of sks dog", 'validation.prompts=["x", "y z"]'])
    assert cfg.optim.lr == 3e-6 and cfg.train.steps == 20
    assert cfg.optim.max_grad_norm == 0.0 and isinstance(cfg.optim.max_grad_norm, float)
    assert cfg.data.center_crop is True and cfg.data.instance_prompt == "a photo of sks dog"
    assert cfg.validation.prompts == ("x", "y z")
    assert load_config(None, ["validation.prompts=solo"]).validation.prompts == ("solo",)


@pytest.mark.parametrize("override, message", [
    ("lrr=1e-6", "did you mean optim.lr"),
    ("optim.lrr=1e-6", "did you mean optim.lr"),
    ("optimm.lr=1e-6", "did you mean optim"),
    ("seed=3", "train.seed, validation.seed"),
    ("steps=1.5", "must be an integer"),
    ("steps=true", "must be an integer"),
    ("optim.lr=fast", "must be a number"),
    ("center_crop=maybe", "true or false"),
    ("precision=fp8", "one of auto, fp32, fp16, bf16"),
    ("prior.sampler=euler", "one of ddim"),
    ("optimizer=adam", "one of adamw, adamw8bit"),
    ("fused_backward=yes", "one of off, exact, lagged"),
    ("steps", "expected key=value"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "a.toml").write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "a.toml")
    (tmp_path / "b.toml").write_text("[optimizer]\nlr = 1e-6\n")
    with pytest.raises(ConfigError, match=r"unknown section \[optimizer\].*did you mean optim"):
        load_config(tmp_path / "b.toml")
    (tmp_path / "c.toml").write_text("[train]\nbatchsize = 2\n")
    with pytest.raises(ConfigError, match="did you mean train.batch_size"):
        load_config(tmp_path / "c.toml")


def test_validate_names_every_problem():
    cfg = load_config(None, ["steps=0", "resolution=100", "optim.lr=-1", "adam_beta2=1.0", "lora_rank=-1",
                             "lora_alpha=-2", "min_snr_gamma=-5", "noise_offset=nan", "ema_decay=1.0"])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for part in ("model.base", "data.instance_dir", "instance_prompt", "train.steps", "multiple of 8",
                 "optim.lr", "optim.adam_beta2", "model.lora_rank", "model.lora_alpha", "train.min_snr_gamma",
                 "train.noise_offset", "train.ema_decay must be in [0, 1)"):
        assert part in str(e.value)


@pytest.mark.parametrize("sets, messages", [
    (["optim.master_weights=kahan"], ['model.precision = "bf16", got \'fp16\'', 'optim.optimizer = "adamw8bit"']),
    (["optim.master_weights=kahan", "model.precision=auto", "optim.optimizer=adamw8bit"], ["got 'auto'"]),
])
def test_kahan_needs_bf16_and_the_8bit_optimizer(sets, messages):
    cfg = load_config(EXAMPLE, sets)
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    for message in messages:
        assert message in str(e.value)
    for ok in (["optim.optimizer=adamw8bit"], ["train.low_memory=true"]):  # low_memory brings adamw8bit
        validate(load_config(EXAMPLE, ["optim.master_weights=kahan", "model.precision=bf16", *ok]))


def test_dump_round_trip_and_resolve(tmp_path):
    cfg = load_config(EXAMPLE, ['data.instance_prompt=a "quoted" prompt \\ with ünïcode 🐶\x7f',
                                "validation.prompts=[]", "optim.min_lr=1e-9"])
    r = resolved(cfg, cwd=str(tmp_path))
    assert Path(r.model.base).is_absolute() and r.model.base.startswith(str(tmp_path))
    assert r.prior.class_dir == str(tmp_path / "runs" / "sks-dog" / "class_images")
    back = from_dict(tomllib.loads(dump_toml(r)))
    assert back == r
    assert differences(r, back) == []
    other = dataclasses.replace(r, optim=dataclasses.replace(r.optim, lr=2e-6))
    assert differences(r, other) == ["optim.lr: 1e-06 -> 2e-06"]


def test_print_config_explains_every_option(capsys):
    """--print-config prints each option's comment from minidb/dreambooth/train_config.py, as TOML that reads
    back to the defaults."""
    from minidb.cli import main
    from minidb.dreambooth.train_config import SECTIONS
    assert main(["train", "--print-config", "--set", "optim.lr=2e-6"]) == 0
    out = capsys.readouterr().out
    assert from_dict(tomllib.loads(out)) == from_dict({"optim": {"lr": 2e-6}})
    lines = {line.split(" = ")[0]: line for line in out.splitlines() if " = " in line}
    assert "# optimizer steps" in lines["steps"]
    assert lines["lr"].startswith("lr = 2e-06 ") and "# the DreamBooth setting;" in lines["lr"]
    assert "0 = the base model's" in lines["resolution"]
    every = [key for cls in SECTIONS.values() for key in (f.name for f in dataclasses.fields(cls))]
    unexplained = [line for section in out.split("\n\n") for line in section.splitlines()[1:] if " # " not in line]
    assert len(every) == sum(1 for _ in out.splitlines() if " = " in _) and not unexplained


@pytest.mark.parametrize("sets, precision, world_size, expected", [
    ([], "fp32", 1, ("adamw", "off", False)),
    (["train.low_memory=true"], "fp32", 1, ("adamw8bit", "lagged", True)),
    (["train.low_memory=true"], "bf16", 1, ("adamw8bit", "lagged", True)),
    (["train.low_memory=true"], "fp16", 1, ("adamw8bit", "exact", True)),  # lagged cannot undo an overflow
    (["train.low_memory=true", "train.fused_backward=exact"], "fp32", 1, ("adamw8bit", "exact", True)),  # kept
    (["train.low_memory=true"], "fp32", 2, ("adamw8bit", "off", True)),     # DDP: no fused step
    (["train.low_memory=true", "train.grad_accum=4"], "fp32", 1, ("adamw8bit", "off", True)),
])
def test_low_memory_resolves_to_what_the_run_supports(sets, precision, world_size, expected):
    cfg = with_memory_switches(load_config(None, sets), precision, world_size)
    assert (cfg.optim.optimizer, cfg.train.fused_backward, cfg.model.gradient_checkpointing) == expected
    assert with_memory_switches(cfg, precision, world_size) == cfg  # a resume reads config.toml back: the same


def test_memory_options_documented():
    """The doc comments of the memory switches, continued over several lines, read as one; low_memory's
    points to where what it was measured to do is written (figures live in benchmarks/RESULTS.md only)."""
    doc = explanations()
    low_memory = doc[("train", "low_memory")]
    assert "fused_backward lagged (exact in fp16" in low_memory and "gradient_checkpointing on (memory" in low_memory
    assert low_memory.endswith("benchmarks/RESULTS.md)")
    assert doc[("model", "gradient_checkpointing")].startswith("recompute the UNet's and text encoder's")
    assert doc[("train", "fused_backward")].endswith("One process, grad_accum = 1 only")
    assert doc[("optim", "optimizer")].endswith("2 bytes of state per weight instead of 8)")


# ---- guidance: unset = the base model's own scale, filled in once, by the plan ------------------------

@pytest.fixture(scope="module")
def guided_world(tmp_path_factory):
    """A tiny random model whose file says guidance 2.5 (not SD v1's 7.5), and one instance photo."""
    import numpy as np
    from PIL import Image

    from minidb.config import tiny_config
    from minidb.pipeline import StableDiffusion
    root = tmp_path_factory.mktemp("guided")
    StableDiffusion(dataclasses.replace(tiny_config(), guidance=2.5)).save(root / "base.safetensors")
    (root / "instance").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
        root / "instance" / "0.png")
    return root


def guided(world, *sets):
    return load_config(None, [f"model.base={world / 'base.safetensors'}", f"data.instance_dir={world / 'instance'}",
                              "data.instance_prompt=a photo of sks dog", "model.device=cpu", *sets])


def test_unset_guidance_is_the_base_models_and_a_set_one_is_kept(guided_world):
    cfg = guided(guided_world)
    assert cfg.prior.guidance is None and cfg.validation.guidance is None  # unset until the plan
    plan = make_plan(cfg, world_size=1, local_rank=0)
    assert plan.base.guidance == 2.5
    assert plan.cfg.prior.guidance == plan.cfg.validation.guidance == 2.5
    plan = make_plan(guided(guided_world, "prior.guidance=4", "validation.guidance=1"), world_size=1, local_rank=0)
    assert (plan.cfg.prior.guidance, plan.cfg.validation.guidance) == (4.0, 1.0)
    assert isinstance(plan.cfg.validation.guidance, float)
    plan = make_plan(guided(guided_world, "prior.guidance=0"), world_size=1, local_rank=0)
    assert (plan.cfg.prior.guidance, plan.cfg.validation.guidance) == (0.0, 2.5)  # 0 is set, not unset


def test_a_run_writes_and_uses_the_resolved_guidance(guided_world, tmp_path):
    """config.toml holds the number that ran; the class images were drawn at it (their metadata)."""
    from PIL import Image

    from minidb.dreambooth.train import train
    cfg = guided(guided_world, f"train.output_dir={tmp_path / 'run'}", "train.steps=1", "optim.lr=1e-3",
                 "prior.class_prompt=a photo of a dog", "prior.num_class_images=1", "prior.sample_steps=2",
                 'validation.prompts=["a photo of sks dog"]', "validation.sample_steps=2")
    result = train(cfg)
    written = load_config(result.run_dir / "config.toml")
    assert written.prior.guidance == written.validation.guidance == 2.5
    with Image.open(tmp_path / "run" / "class_images" / "class-00000.png") as image:
        assert image.info["minidb.guidance"] == "2.5"
    assert (tmp_path / "run" / "samples" / "step_000001.png").is_file()


def test_unset_guidance_round_trips_through_toml_and_dict():
    """--print-config of a config the plan has not resolved: the unset keys are comments, and what
    dump_toml writes reads back to the same config (with and without the explanations)."""
    for cfg in (load_config(EXAMPLE), load_config(EXAMPLE, ["prior.guidance=3", "validation.guidance=0"])):
        for explain in (False, True):
            assert from_dict(tomllib.loads(dump_toml(cfg, explain=explain))) == cfg
        assert from_dict(to_dict(cfg)) == cfg  # a training state's copy of the config
    text = dump_toml(load_config(EXAMPLE, ["validation.guidance=3"]), explain=True)
    prior, validation = (part for part in text.split("\n\n") if part.startswith(("[prior]", "[validation]")))
    assert "\n# guidance = (unset) " in prior and "unset = the base model's own" in prior
    assert "\nguidance = 3.0 " in validation
    validate(load_config(EXAMPLE))  # unset passes validation: the base model's file is checked when read
    changed = dataclasses.replace(load_config(EXAMPLE), prior=dataclasses.replace(DreamBoothConfig().prior,
                                                                                 guidance=1.5))
    assert "prior.guidance: None -> 1.5" in differences(load_config(EXAMPLE), changed)


@pytest.mark.parametrize("sets, message", [
    (["prior.guidance=-1"], "prior.guidance must be a number >= 0 (1 = no guidance, 0 = unconditional), got -1.0"),
    (["validation.guidance=nan"], "validation.guidance must be a number >= 0"),
    (["validation.guidance=inf"], "validation.guidance must be a number >= 0"),
])
def test_a_bad_guidance_is_a_config_error(sets, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(load_config(EXAMPLE, sets))


@pytest.mark.parametrize("value", ["high", "true", '""', "[1.5]"])
def test_guidance_must_be_a_number(value):
    with pytest.raises(ConfigError, match="prior.guidance must be a number"):
        load_config(None, [f"prior.guidance={value}"])


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "minidb" / "data" / "world.safetensors").is_file(),
                    reason="the world model is not installed")
def test_the_demo_draws_class_images_at_the_world_models_scale():
    """demo.toml leaves prior.guidance unset: it follows the world model's file (1.5), not SD v1's 7.5."""
    from minidb.world.demo import DEMO_TOML
    assert "guidance" not in tomllib.loads(DEMO_TOML.read_text())["prior"]
    cfg, base = read_base(resolved(load_config(DEMO_TOML)))
    assert cfg.prior.guidance == base.guidance == 1.5
