"""minidb.clip.CLIPTextModel against transformers' CLIPTextModel loaded through diffusers' converter.

Route of the weights, as a user's SD v1 file would take it: our state dict -> original layout
{"cond_stage_model.transformer." + key} -> diffusers' convert_ldm_clip_checkpoint -> strict load
into transformers' CLIPTextModel (eager attention). transformers 5 dropped the `text_model.`
level of CLIPTextModel, so that prefix is removed after conversion, as diffusers' own
create_diffusers_clip_model_from_ldm does.

Tolerances: fp32 vs transformers rel. error < 1e-5 (measured 2.5e-7 tiny); backends "math" and
"sdpa" (and "triton" when available) agree with each other to < 1e-5; fp16 within 1e-2 and bf16
within 5e-2 of fp32 (their 11- and 8-bit mantissas; measured 9e-4 and 7e-3 tiny, 2 layers).
"""
import pytest
import torch

from helpers import perturb_, rel_err
from minidb import attention as attn
from minidb.clip import CLIPTextModel
from minidb.config import CLIPTextConfig
from minidb.tokenizer import CLIPTokenizer

PREFIX = "cond_stage_model.transformer."
PROMPTS = [
    "a photo of sks dog in a bucket, highly detailed, 8k",
    "",
    "A castle on a hill at sunset, oil painting by Monet. " * 10,  # truncated at 77
]
TINY = CLIPTextConfig(width=32, layers=2, heads=2)


def hf_config(cfg: CLIPTextConfig):
    """transformers' config for the same sizes (its defaults are ViT-B/32's, not SD v1's ViT-L/14)."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.CLIPTextConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.width, intermediate_size=4 * cfg.width,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_length, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        attention_dropout=0.0, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    hf_cfg._attn_implementation = "eager"  # the plain softmax path, independent of our SDPA use
    return hf_cfg


def reference_model(ours: CLIPTextModel):
    """transformers' CLIPTextModel with our weights, through the original checkpoint layout."""
    transformers = pytest.importorskip("transformers")
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    ref = transformers.CLIPTextModel(hf_config(ours.config))

    checkpoint = {PREFIX + k: v for k, v in ours.state_dict().items()}
    converted = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(ref, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    ref.load_state_dict(converted, strict=True)
    return ref.eval()


@pytest.fixture(scope="module")
def ids():
    return CLIPTokenizer()(PROMPTS)


@pytest.fixture(scope="module")
def tiny():
    return perturb_(CLIPTextModel(TINY), seed=1).eval()


def test_keys_match_sd_v1_checkpoint_layout():
    """Full size, on the meta device: the 196 tensors of an SD v1 file's text encoder, same names
    and shapes as transformers' CLIPTextModel (whose keys CompVis saved), no position_ids."""
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        ours = CLIPTextModel(CLIPTextConfig())
        ref = transformers.CLIPTextModel(hf_config(CLIPTextConfig()))
    ours_sd = ours.state_dict()
    ref_shapes = {k if k.startswith("text_model.") else "text_model." + k: tuple(v.shape)
                  for k, v in ref.state_dict().items()}
    assert len(ours_sd) == 196
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == ref_shapes
    assert not any("position_ids" in k for k in ours_sd)
    assert "text_model.encoder.layers.11.self_attn.q_proj.weight" in ours_sd


def test_matches_transformers_fp32(tiny, ids):
    ref = reference_model(tiny)
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
        got = tiny(ids)
    assert got.shape == (len(PROMPTS), 77, TINY.width)
    err = rel_err(got, expected)
    assert err < 1e-5, err
    for i in range(len(PROMPTS)):  # per prompt too, so a row-mixing bug cannot hide in the average
        assert rel_err(got[i], expected[i]) < 1e-5


def test_attention_backends_agree(tiny, ids):
    outputs = {}
    backends = ["math", "sdpa", "triton"]
    for backend in backends:
        if backend == "triton":
            try:
                from minidb.kernels import flash_attention, supports  # noqa: F401
            except ImportError:
                continue
            q = torch.zeros(1, TINY.heads, 77, TINY.width // TINY.heads)
            if supports(q, q, q) is not None:
                continue
        with attn.use_backend(backend), torch.no_grad():
            outputs[backend] = tiny(ids)
    assert {"math", "sdpa"} <= outputs.keys()
    for backend, out in outputs.items():
        assert rel_err(out, outputs["math"]) < 1e-5, backend


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_half_precision_close_to_fp32(tiny, ids, dtype, tol):
    with torch.no_grad():
        expected = tiny(ids)
        half = CLIPTextModel(TINY).to(dtype)
        half.load_state_dict(tiny.state_dict())  # casts to the half dtype
        got = half(ids)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert rel_err(got, expected) < tol


def test_bad_input(tiny):
    with pytest.raises(ValueError, match="input_ids must be"):
        tiny(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be"):
        tiny(torch.zeros(77, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        tiny(torch.zeros(1, 77))


@pytest.mark.slow
def test_full_size_matches_transformers(ids):
    """SD v1's text encoder (CLIPTextConfig() = ViT-L/14 text tower), random perturbed weights."""
    ours = perturb_(CLIPTextModel(CLIPTextConfig()), seed=2).eval()
    ref = reference_model(ours)
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
        got = ours(ids)
    assert got.shape == (len(PROMPTS), 77, 768)
    print(f"full-size CLIP rel err {rel_err(got, expected):.2e}")
    assert rel_err(got, expected) < 1e-5


def test_gradient_checkpointing_same_gradients(monkeypatch):
    """Checkpointed layers recompute the same forward in backward: the same gradients (bit for bit
    here: the very same operations on the same CPU), and one checkpoint per layer."""
    import minidb.clip
    ours = perturb_(CLIPTextModel(TINY)).train()
    ids = CLIPTokenizer()(PROMPTS[:2])
    target = torch.randn(2, ids.shape[1], TINY.width)

    def grads():
        ours.zero_grad()
        ((ours(ids) - target) ** 2).mean().backward()
        return [p.grad.clone() for p in ours.parameters()]

    calls = []
    real = minidb.clip.checkpoint
    monkeypatch.setattr(minidb.clip, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    plain = grads()
    assert not calls
    ours.gradient_checkpointing = True
    assert ours.text_model.encoder.gradient_checkpointing
    checkpointed = grads()
    assert len(calls) == TINY.layers
    for a, b in zip(checkpointed, plain):
        assert rel_err(a, b) < 1e-6, rel_err(a, b)
    with torch.no_grad():  # no gradients wanted: nothing to checkpoint
        ours(ids)
    assert len(calls) == TINY.layers
