"""The trained model's export: an original-layout SD v1 .safetensors that diffusers' own single-file
converters accept (strict loads into diffusers' UNet/VAE and transformers' CLIP), holding the trained
weights for the parts that trained and the base checkpoint's tensors, untouched, for the rest."""
import pytest
import safetensors.torch
import torch

from helpers import perturb_, rel_err
from minidb.config import tiny_config
from minidb.pipeline import StableDiffusion, export_model
from benchmarks.reference import diffusers_pipeline


@pytest.fixture(scope="module")
def base_and_trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = StableDiffusion(tiny_config())
    for i, model in enumerate(base.models.values()):
        perturb_(model, seed=20 + i)
    base.save(root / "base.safetensors")
    # "trained": other weights for the UNet and the text encoder (as training writes them: fp32, prefixed)
    trained_sd = StableDiffusion(tiny_config())
    perturb_(trained_sd.unet, seed=30)
    perturb_(trained_sd.text_encoder, seed=31)
    trained = {f"{name}.{k}": v.clone() for name in ("unet", "text_encoder")
               for k, v in getattr(trained_sd, name).state_dict().items()}
    return root, base, trained_sd, trained


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_export_holds_trained_parts_and_base_vae(base_and_trained, tmp_path, dtype):
    root, base, trained_sd, trained = base_and_trained
    path = export_model(root / "base.safetensors", trained, tmp_path / "model.safetensors", dtype)
    exported = StableDiffusion.from_checkpoint(path)
    for name, want in (("unet", trained_sd.unet), ("text_encoder", trained_sd.text_encoder), ("vae", base.vae)):
        got = getattr(exported, name).state_dict()
        for k, v in want.state_dict().items():
            expect = v.to(dtype).float() if v.is_floating_point() else v
            assert torch.equal(got[k], expect), (name, k)
    raw = safetensors.torch.load_file(path)
    assert {t.dtype for t in raw.values() if t.is_floating_point()} == {dtype}


def test_export_is_accepted_by_diffusers_single_file_converters(base_and_trained, tmp_path):
    """diffusers' converters read the exported file into its models (strict), which then compute
    what minidb computes with the trained weights: relative error < 1e-5 in fp32."""
    root, base, trained_sd, trained = base_and_trained
    path = export_model(root / "base.safetensors", trained, tmp_path / "model.safetensors", torch.float32)
    pipe = diffusers_pipeline(trained_sd, tmp_path, ckpt=safetensors.torch.load_file(path))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])
    ids = trained_sd.tokenizer(["a photo of sks dog", "a dog"])
    with torch.no_grad():
        context = trained_sd.text_encoder(ids)
        ref_context = pipe.text_encoder(ids).last_hidden_state
        assert rel_err(context, ref_context) < 1e-5
        assert rel_err(trained_sd.unet(x, t, context), pipe.unet(x, t, context).sample) < 1e-5
        image = torch.randn(1, 3, 32, 32, generator=g)
        assert rel_err(base.vae.encode(image).mean, pipe.vae.encode(image).latent_dist.mean) < 1e-5
