"""LoRA on tiny random models: files in kohya's format that diffusers (through peft) loads with the
same outputs, files written by diffusers/peft that minidb loads with the same outputs, merged equal
to unmerged, the base checkpoint keys untouched, and a clear error for each kind of bad file."""
import struct

import pytest
import safetensors.torch
import torch
from helpers import rel_err
from test_weights import tiny_models

from minidb import lora
from minidb.cli import main
from minidb.config import SDConfig, UNetConfig, tiny_config
from minidb.lora import LoRAError
from minidb.pipeline import StableDiffusion

ALL_TARGETS = dict(unet_targets=lora.UNET_TRANSFORMER, text_encoder_targets=lora.TEXT_ENCODER_TARGETS)


def random_lora(sd, rank=4, alpha=8.0, seed=0, **targets) -> lora.LoRANetwork:
    """A LoRA with random up and down (a fresh one has up = 0 and changes nothing)."""
    network = lora.add_lora(sd.models, rank, alpha, **(targets or ALL_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return network


def inputs(cfg=None):
    cfg = cfg or tiny_config()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.clip.vocab_size, (2, cfg.clip.max_length), generator=g)
    x = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g)
    return ids, x, torch.tensor([10, 900])


@torch.no_grad()
def minidb_outputs(sd):
    ids, x, t = inputs(sd.config)
    context = sd.text_encoder(ids)
    return context, sd.unet(x, t, context)


@torch.no_grad()
def diffusers_outputs(pipe, context):
    """The text encoder's output, and the UNet's on minidb's context (each model compared alone)."""
    ids, x, t = inputs()
    return pipe.text_encoder(ids)[0], pipe.unet(x, t, context).sample


def test_adapters_leave_base_keys_and_outputs_alone():
    sd = tiny_models()
    keys = {name: list(m.state_dict()) for name, m in sd.models.items()}
    before = minidb_outputs(sd)
    network = lora.add_lora(sd.models, rank=4, **ALL_TARGETS)  # up = 0: no change yet
    assert {name: list(m.state_dict()) for name, m in sd.models.items()} == keys
    assert all(torch.equal(a, b) for a, b in zip(minidb_outputs(sd), before))
    params = list(network.parameters())
    assert params and all(p.requires_grad for p in params)
    assert not any(p.requires_grad for m in sd.models.values() for p in m.parameters())
    # tiny UNet: 4 transformers x (2 attn x 4 + 2 ff + proj_in/out) = 48; CLIP: 2 layers x 6 = 12
    assert len(list(network.children())) == 60
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in network.state_dict()
    assert network.state_dict()["lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight"].shape == (32, 4)


def test_gradients_reach_only_the_adapters():
    sd = tiny_models()
    network = random_lora(sd)
    ids, x, t = inputs()
    sd.unet(x, t, sd.text_encoder(ids)).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())


@pytest.mark.parametrize("cfg", [tiny_config(), SDConfig()], ids=["tiny", "sd-v1"])
def test_unet_names_are_diffusers_paths(cfg):
    """Each adaptable module's diffusers path (kohya's SD 1.x names) exists in diffusers' UNet with
    the same shape: checked on the meta device, SD v1 size included."""
    from benchmarks.reference import diffusers_unet
    with torch.device("meta"):
        theirs = dict(diffusers_unet(cfg.unet).named_modules())
    models = lora.meta_models(cfg)
    for path, module in models["unet"].named_modules():
        if lora._adaptable(module) and (".transformer_blocks." in path or path.endswith(("proj_in", "proj_out"))):
            twin = theirs[lora.diffusers_unet_path(path, cfg.unet)]
            assert twin.weight.shape == module.weight.shape, path
    n_unet = len(lora.lora_targets(models, lora.UNET_ATTENTION, ()))
    assert n_unet == {tiny_config(): 4, SDConfig(): 16}[cfg] * 8  # 2 attention layers x 4 projections each


@pytest.mark.parametrize("targets,rank,alpha,scale", [
    (dict(unet_targets=lora.UNET_ATTENTION), 4, 8.0, 1.0),
    (ALL_TARGETS, 2, 1.0, 0.7),
], ids=["attention", "kohya-all"])
def test_diffusers_loads_minidb_lora(tmp_path, targets, rank, alpha, scale):
    pytest.importorskip("peft")  # diffusers' load_lora_weights needs it
    from benchmarks.reference import diffusers_pipeline
    sd = tiny_models()
    pipe = diffusers_pipeline(sd, tmp_path)  # the same base weights: adapters are not in state_dict()
    network = random_lora(sd, rank, alpha, **targets)
    network.set_multiplier(scale)
    lora.save_lora(tmp_path / "lora.safetensors", network)
    pipe.load_lora_weights(str(tmp_path / "lora.safetensors"), adapter_name="minidb")
    pipe.set_adapters(["minidb"], adapter_weights=[scale])
    context, eps = minidb_outputs(sd)
    text, eps_diffusers = diffusers_outputs(pipe, context)
    if "text_encoder_targets" in targets:
        assert rel_err(context, text) <= 1e-5
    assert rel_err(eps, eps_diffusers) <= 1e-5
    network.detach()  # the LoRA mattered: without it, far from diffusers' outputs
    assert rel_err(minidb_outputs(sd)[1], eps_diffusers) > 1e-2


@pytest.mark.parametrize("writer", ["kohya", "diffusers"])
def test_minidb_loads_lora_written_by_diffusers(tmp_path, writer):
    """peft adapters on diffusers' models, saved by diffusers as kohya's format
    (convert_state_dict_to_kohya) or as its own (save_lora_weights): minidb computes what they do."""
    pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from benchmarks.reference import diffusers_pipeline

    sd = tiny_models()
    pipe = diffusers_pipeline(sd, tmp_path)
    # diffusers' convention is lora_alpha = r: its files carry no alpha, or alpha = rank
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]))
    unet_layers, te_layers = get_peft_model_state_dict(pipe.unet), get_peft_model_state_dict(pipe.text_encoder)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    if writer == "kohya":
        state = {"unet." + k: v for k, v in unet_layers.items()}
        state |= {"text_encoder." + k: v for k, v in te_layers.items()}
        kohya = convert_state_dict_to_kohya(state)
        assert any(k.startswith("lora_te1_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
        safetensors.torch.save_file(kohya, path)
    else:
        StableDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=unet_layers,
                                                  text_encoder_lora_layers=te_layers, safe_serialization=True)
    sd.load_lora(path)
    context, eps = minidb_outputs(sd)
    text, eps_diffusers = diffusers_outputs(pipe, context)
    assert rel_err(context, text) <= 1e-5
    assert rel_err(eps, eps_diffusers) <= 1e-5


def test_merged_equals_unmerged_and_saves_merged(tmp_path):
    sd = tiny_models()
    base = minidb_outputs(sd)
    for seed, targets in ((1, ALL_TARGETS), (2, dict(unet_targets=lora.UNET_ATTENTION))):
        network = random_lora(sd, seed=seed, **targets)
        lora.save_lora(tmp_path / f"{seed}.safetensors", network)
        network.detach()
    assert all(torch.equal(a, b) for a, b in zip(minidb_outputs(sd), base))  # detached: the base again

    sd.load_lora(tmp_path / "1.safetensors", scale=0.8)
    sd.load_lora(tmp_path / "2.safetensors", scale=-0.5)  # stacked
    unmerged = minidb_outputs(sd)
    assert rel_err(unmerged[1], base[1]) > 1e-2
    sd.merge_lora()
    assert sd.loras == []
    merged = minidb_outputs(sd)
    for a, b in zip(merged, unmerged):
        assert rel_err(a, b) <= 1e-5
    sd.save(tmp_path / "merged.safetensors")  # the base keys, with the LoRAs in the weights
    again = minidb_outputs(StableDiffusion.from_checkpoint(tmp_path / "merged.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(again, merged))


def test_scale_zero_is_the_base_and_fp16_file(tmp_path):
    sd = tiny_models()
    base = minidb_outputs(sd)
    network = random_lora(sd)
    lora.save_lora(tmp_path / "half.safetensors", network, dtype=torch.float16)
    network.detach()
    half = safetensors.torch.load_file(tmp_path / "half.safetensors")
    assert {t.dtype for t in half.values()} == {torch.float16}
    sd.load_lora(tmp_path / "half.safetensors", scale=0.0)
    assert all(torch.equal(a, b) for a, b in zip(minidb_outputs(sd), base))
    sd.loras[0].set_multiplier(1.0)
    assert rel_err(minidb_outputs(sd)[1], base[1]) > 1e-2


def test_file_size_formula_and_metadata(tmp_path):
    """size = 8 + header + numel x bytes, numel = sum over adapted modules of rank(in + out) + 1."""
    sd = tiny_models()
    network = lora.add_lora(sd.models, rank=4, alpha=2, **ALL_TARGETS)
    path = tmp_path / "lora.safetensors"
    lora.save_lora(path, network, dtype=torch.float16)
    data = path.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    numel = lora.lora_numel(sd.models, 4, **ALL_TARGETS)
    assert numel == sum(t.numel() for t in network.state_dict().values())
    assert len(data) == 8 + header + 2 * numel
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"


def write(path, tensors):
    safetensors.torch.save_file(tensors, path)
    return path


@pytest.fixture
def good(tmp_path):
    """A valid LoRA's tensors for the tiny models."""
    sd = tiny_models()
    network = random_lora(sd)
    network.detach()
    return sd, {k: v.clone() for k, v in network.state_dict().items()}


def test_unknown_modules_are_named(tmp_path, good):
    sd, state = good
    state["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"] = torch.zeros(4, 32, 3, 3)
    state["lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight"] = torch.zeros(32, 4, 1, 1)
    with pytest.raises(LoRAError, match="1 LoRA module.* unknown .*lora_unet_down_blocks_0_resnets_0_conv1"):
        sd.load_lora(write(tmp_path / "locon.safetensors", state))
    assert sd.loras == []


def test_sdxl_lora_is_recognised(tmp_path, good):
    sd, state = good
    state["lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(4, 1280)
    with pytest.raises(LoRAError, match="SDXL"):
        sd.load_lora(write(tmp_path / "xl.safetensors", state))


def test_wrong_shapes_are_named(tmp_path, good):
    sd, state = good
    name = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"
    state[f"{name}.lora_down.weight"] = torch.zeros(4, 1024)  # cross-attention to SD 2's 1024-wide text
    with pytest.raises(LoRAError, match=rf"{name}: lora_down \[4, 1024\].*needs \[4, 32\]"):
        sd.load_lora(write(tmp_path / "sd2.safetensors", state))


def test_lora_for_another_width_is_refused(tmp_path):
    """A whole LoRA made on a wider model: every module's shapes are wrong, the error says so."""
    wide = tiny_models(config=SDConfig(**{**tiny_config().__dict__, "unet": UNetConfig(
        model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
        context_dim=32)}))
    lora.save_lora(tmp_path / "wide.safetensors", random_lora(wide, unet_targets=lora.UNET_ATTENTION))
    with pytest.raises(LoRAError, match=r"32 LoRA module\(s\) do not fit this model"):
        tiny_models().load_lora(tmp_path / "wide.safetensors")


def test_missing_halves_and_foreign_tensors(tmp_path, good):
    sd, state = good
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    half = dict(state)
    del half[f"{name}.lora_up.weight"]
    with pytest.raises(LoRAError, match=f"{name} lacks lora_up.weight"):
        sd.load_lora(write(tmp_path / "half.safetensors", half))
    dora = dict(state) | {f"{name}.dora_scale": torch.ones(1, 32)}
    with pytest.raises(LoRAError, match=rf"{name}.dora_scale is not a LoRA tensor"):
        sd.load_lora(write(tmp_path / "dora.safetensors", dora))


def test_unreadable_files(tmp_path):
    sd = tiny_models()
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoRAError, match="not a readable .safetensors"):
        sd.load_lora(tmp_path / "junk.safetensors")
    with pytest.raises(LoRAError, match="not found"):
        sd.load_lora(tmp_path / "absent.safetensors")
    with pytest.raises(LoRAError, match=".safetensors format"):
        sd.load_lora(tmp_path / "lora.pt")


def test_sample_cli_applies_loras(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    sd = tiny_models()
    sd.save(tmp_path / "base.safetensors")
    lora.save_lora(tmp_path / "a.safetensors", random_lora(sd))
    common = ["sample", "--ckpt", "base.safetensors", "--prompt", "sks", "--steps", "2", "--seed", "0",
              "--no-progress"]
    assert main(common + ["--outdir", "plain"]) == 0
    assert main(common + ["--outdir", "lora", "--lora", "a.safetensors:0.5", "--lora", "a.safetensors"]) == 0
    from PIL import Image
    plain, with_lora = Image.open("plain/samples/00000.png"), Image.open("lora/samples/00000.png")
    assert with_lora.text["loras"] == "a.safetensors:0.5, a.safetensors:1"
    assert list(plain.getdata()) != list(with_lora.getdata())

    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    capsys.readouterr()
    assert main(common + ["--lora", "bad.safetensors"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bad.safetensors: not a readable" in err
    assert main(common + ["--lora", "missing.safetensors:0.5"]) == 2
    assert "LoRA file not found: missing.safetensors" in capsys.readouterr().err
