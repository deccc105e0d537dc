"""diffusers' twin of a minidb model: the reference the benchmarks and the equivalence tests share
(here, with the benchmarks: what measures minidb against diffusers does not reach into the tests).

    from benchmarks.reference import diffusers_pipeline, scheduler   # repository root on sys.path

Our weights go, in the original checkpoint layout, through diffusers' single-file converters into
diffusers' UNet, VAE and transformers' CLIP text model; the tokenizer is transformers'
CLIPTokenizer built from the vocabulary minidb ships. Schedulers are configured the CompVis way.
"""
import json

from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)

from minidb.pipeline import StableDiffusion
from minidb.tokenizer import build_vocab, load_merges

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def scheduler(sampler, config=None):
    """diffusers' scheduler for `sampler`, configured as CompVis samples `config` (default SD v1)."""
    sd = SD if config is None else dict(SD, beta_start=config.linear_start, beta_end=config.linear_end,
                                           num_train_timesteps=config.timesteps)
    sd = dict(sd, prediction_type="v_prediction" if config is not None and config.parameterization == "v" else "epsilon")
    compvis = dict(steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading")
    if sampler == "ddim":
        return DDIMScheduler(**sd, clip_sample=False, **compvis)
    if sampler == "plms":
        return PNDMScheduler(**sd, skip_prk_steps=True, **compvis)
    return DPMSolverMultistepScheduler(**sd)


def diffusers_unet(u) -> UNet2DConditionModel:
    """diffusers' UNet for a minidb UNetConfig, with its default (random) weights."""
    attn = [2 ** level in u.attention_resolutions for level in range(len(u.channel_mult))]
    return UNet2DConditionModel(
        in_channels=u.in_channels, out_channels=u.out_channels,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(u.model_channels * m for m in u.channel_mult), layers_per_block=u.num_res_blocks,
        cross_attention_dim=u.context_dim, attention_head_dim=u.num_heads,
        transformer_layers_per_block=u.transformer_depth, norm_num_groups=u.norm_groups)


def diffusers_pipeline(sd: StableDiffusion, folder, ckpt: dict | None = None) -> StableDiffusionPipeline:
    """diffusers' pipeline for sd's config, its weights from sd, or from ckpt: a dict in the
    original checkpoint layout (what minidb's export writes), through diffusers' own converters."""
    import transformers

    cfg = sd.config
    if ckpt is None:
        ckpt = {"model.diffusion_model." + k: v for k, v in sd.unet.state_dict().items()}
        ckpt |= {"first_stage_model." + k: v for k, v in sd.vae.state_dict().items()}
        ckpt |= {"cond_stage_model.transformer." + k: v for k, v in sd.text_encoder.state_dict().items()}

    unet = diffusers_unet(cfg.unet)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, unet.config), strict=True)

    v = cfg.vae
    vae = AutoencoderKL(in_channels=v.in_channels, out_channels=v.out_ch, latent_channels=v.z_channels,
                        down_block_types=("DownEncoderBlock2D",) * len(v.ch_mult),
                        up_block_types=("UpDecoderBlock2D",) * len(v.ch_mult),
                        block_out_channels=tuple(v.ch * m for m in v.ch_mult), layers_per_block=v.num_res_blocks,
                        scaling_factor=cfg.scale_factor)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, vae.config), strict=True)

    c = cfg.clip
    clip_cfg = transformers.CLIPTextConfig(
        vocab_size=c.vocab_size, hidden_size=c.width, intermediate_size=4 * c.width, num_hidden_layers=c.layers,
        num_attention_heads=c.heads, max_position_embeddings=c.max_length, hidden_act="quick_gelu",
        layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    text_encoder = transformers.CLIPTextModel(clip_cfg)
    converted = convert_ldm_clip_checkpoint(ckpt)
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): t for k, t in converted.items()}
    text_encoder.load_state_dict(converted, strict=True)

    merges = load_merges()
    (folder / "vocab.json").write_text(json.dumps(build_vocab(merges)), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)

    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=scheduler("ddim"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
