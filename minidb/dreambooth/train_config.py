"""DreamBooth training options: a TOML file read into frozen dataclasses, one per [section].

    cfg = load_config("run.toml", overrides=["optim.lr=2e-6", "steps=400"])

Every field has a default (below, with what it means); a TOML file only names what differs.
`--set key=value` overrides any field, as `section.key` or as the bare `key` when only one section
has it; the value is read as a TOML value (`true`, `4`, `1e-6`, `["a", "b"]`), else as a string.
Unknown sections or keys are a ConfigError naming the closest matches. `dump_toml(cfg)` writes
the resolved config back out (into the run folder), paths made absolute.

A field typed `X | None` defaults to None, "unset": the run's plan fills it from the base model's
file (minidb.dreambooth.plan.read_base), so the run folder's config.toml holds the number that ran. A TOML
file leaves such a field unset by not naming it; dump_toml writes an unset one as a comment.
"""
import dataclasses
import difflib
import inspect
import io
import json
import math
import os
import re
import sys
import tokenize
import warnings
from dataclasses import dataclass, field
from types import UnionType

from minidb.config import DTYPES, SAMPLER_NAMES, guidance_problem, seed_problem, steps_problem
from minidb.errors import ConfigError, DataError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class ModelConfig:
    base: str = ""                    # the SD v1 checkpoint to fine-tune (.ckpt / .safetensors); required
    device: str = "auto"              # auto = cuda if there is one, else cpu; or "cpu", "cuda:1", ...
    precision: str = "auto"           # fp32 | fp16 | bf16; auto = fp16 on CUDA, fp32 on CPU
    train_text_encoder: bool = True   # the DreamBooth paper fine-tunes it too; false = UNet only (LoRA: see lora_text_encoder)
    gradient_checkpointing: bool = False  # recompute the UNet's and text encoder's activations in backward:
                                          # less memory, one more forward's time
    export_dtype: str = "fp16"        # dtype of the exported model.safetensors and lora.safetensors: fp16 | fp32
    lora_rank: int = 0                # 0 = full fine-tuning; N = train only rank-N LoRA adapters, write lora.safetensors
    lora_alpha: float = 0.0           # LoRA: the update is scaled by alpha / rank; 0 = rank (scale 1)
    lora_text_encoder: bool = False   # LoRA: adapters on the text encoder's attention and MLP too (else it is frozen)
    lora_targets: str = "attention"   # LoRA on the UNet: attention = to_q/k/v/out (diffusers' train_dreambooth_lora);
                                      # transformer = those + feed-forward and proj_in/out (kohya's LoRA)
    lora_merge_export: bool = False   # LoRA: also write model.safetensors, the base with lora.safetensors merged in


@dataclass(frozen=True)
class DataConfig:
    instance_dir: str = ""            # folder with the 3-5 photos of the subject; required
    instance_prompt: str = ""         # e.g. "a photo of sks dog"; required
    resolution: int = 0               # train at this size (shorter side resized, then cropped); 0 = the base model's
    center_crop: bool = False         # false = random crop
    hflip: bool = False               # random horizontal flip (off: subjects are often asymmetric)
    cache_latents: bool = True        # encode each image once, when the augmentation allows it
    captions: bool = True             # photo.png + photo.txt: that text replaces instance_prompt for that image


@dataclass(frozen=True)
class PriorConfig:
    class_prompt: str = ""            # e.g. "a photo of a dog"; empty = no prior preservation
    class_dir: str = ""               # empty = <output_dir>/class_images
    num_class_images: int = 100       # missing ones are generated from the base model before training
    loss_weight: float = 1.0          # loss = instance MSE + loss_weight * class MSE
    target: str = "images"            # what the class half is fitted to: "images", the noise (or v) of its class
                                      # image, as the paper; "base", the base model's own prediction at the same
                                      # noisy latent (a frozen copy of its UNet, one more UNet in memory): the
                                      # prior then keeps what the model does on the class prompt instead of
                                      # fitting its few class images, which it learns to reproduce and mix
    sample_steps: int = 50            # sampling steps per class image
    guidance: float | None = None     # classifier-free guidance scale of the class images; unset = the base
                                      # model's own (config.guidance in its file; 7.5 for files that store none)
    sampler: str = "ddim"             # ddim | plms | dpm++2m
    batch_size: int = 4               # class images generated per batch


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adamw"          # adamw (torch's) | adamw8bit (minidb.dreambooth.adamw8bit: the same update, its two
                                      # moments stored in 8 bits, 2 bytes of state per weight instead of 8)
    master_weights: str = "fp32"      # fp16/bf16 models: fp32 = fp32 master copies of the trained weights (4 bytes
                                      # each); kahan = none: adamw8bit steps the bf16 weights themselves, each with a
                                      # bf16 compensation for what rounding lost (2 bytes; minidb.dreambooth.adamw8bit). Needs
                                      # model.precision = "bf16" and optimizer adamw8bit (or train.low_memory)
    lr: float = 1e-6                  # the DreamBooth setting; the UNet forgets the class quickly above ~5e-6
    lr_schedule: str = "constant"     # constant | cosine (decays to min_lr at the last step)
    warmup_steps: int = 0             # linear warm-up from 0 before the schedule
    min_lr: float = 0.0               # where cosine ends
    adam_beta1: float = 0.9           # AdamW's decay rate of the gradient mean
    adam_beta2: float = 0.999         # AdamW's decay rate of the squared-gradient mean
    weight_decay: float = 1e-2        # AdamW's decoupled weight decay
    adam_eps: float = 1e-8            # AdamW's epsilon
    max_grad_norm: float = 1.0        # 0 = no clipping
    loss_scale_init: float = 65536.0  # fp16 only: the dynamic loss scaler (minidb.dreambooth.scaler)
    loss_scale_growth_interval: int = 2000  # fp16: clean steps before the loss scale doubles
    loss_scale_min: float = 1e-4      # fp16: below this the scaler gives up (minidb.dreambooth.scaler says why)
    scale_lr: bool = False            # lr and min_lr times the instance images per step (diffusers' --scale_lr)


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/dreambooth"   # the run folder: config, metrics, checkpoints, samples, model
    steps: int = 800                  # optimizer steps
    batch_size: int = 1               # instance images per micro-batch per process (+ as many class images)
    grad_accum: int = 1               # micro-batches per optimizer step
    seed: int = 0                     # data order, augmentation, noise and timesteps all derive from it
    checkpoint_every: int = 200       # steps between full-state checkpoints (one is always written at the end)
    keep_checkpoints: int = 2         # the newest this many are kept
    dist_timeout_s: int = 600         # multi-process runs: a peer silent this long ends the run
    fused_backward: str = "off"       # off | exact | lagged: step each weight inside backward once its gradient
                                      # is complete (minidb.dreambooth.fused_step), so no full set of gradients is held;
                                      # clipping by this step's norm (exact: two backward passes) or the last
                                      # step's (lagged: one; not with fp16). One process, grad_accum = 1 only
    low_memory: bool = False          # much less memory for slower steps: optimizer adamw8bit, fused_backward
                                      # lagged (exact in fp16; off where unsupported), gradient_checkpointing on
                                      # (memory and step time against the default and diffusers: benchmarks/RESULTS.md)
    min_snr_gamma: float = 0.0        # min-SNR loss weighting (Hang et al. 2023), 5 is typical; 0 = off
    noise_offset: float = 0.0         # offset noise: + this x a per-channel constant (learns brightness), ~0.05; 0 = off
    ema_decay: float = 0.0            # an fp32 moving average of the trained weights, e.g. 0.999; 0 = off
    ema_on_cpu: bool = False          # keep that average in CPU memory (one copy per step)
    export_ema: bool = True           # with ema_decay > 0: export the average in place of the raw weights
    token_rows: bool = True           # a trained text encoder's token embedding trains only the rows the run's
                                      # prompts use: dense AdamW's weights without the table's gradient and moments
                                      # (minidb.dreambooth.token_rows; where it is exact: adamw, fp32 weights or
                                      # masters, no EMA, no fused step). false: the whole table, as diffusers does


@dataclass(frozen=True)
class ValidationConfig:
    prompts: tuple[str, ...] = ()     # sampled into samples/step_XXXXXX.png every `every` steps and at the end
    every: int = 100                  # steps between validation grids
    sample_steps: int = 25            # sampler settings of the validation images
    guidance: float | None = None     # classifier-free guidance scale; unset = the base model's own, as for
                                      # prior.guidance
    sampler: str = "ddim"             # ddim | plms | dpm++2m
    seed: int = 0                     # image i uses seed + i: the same noise at every validation


@dataclass(frozen=True)
class DreamBoothConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(DreamBoothConfig)}
PATH_FIELDS = {("model", "base"), ("data", "instance_dir"), ("prior", "class_dir"), ("train", "output_dir")}
CHOICES = {
    ("model", "precision"): ("auto", *DTYPES),
    ("model", "export_dtype"): ("fp16", "fp32"),
    ("model", "lora_targets"): ("attention", "transformer"),
    ("optim", "lr_schedule"): ("constant", "cosine"),
    ("optim", "optimizer"): ("adamw", "adamw8bit"),
    ("optim", "master_weights"): ("fp32", "kahan"),
    ("train", "fused_backward"): ("off", "exact", "lagged"),
    ("prior", "sampler"): tuple(SAMPLER_NAMES),
    ("prior", "target"): ("images", "base"),
    ("validation", "sampler"): tuple(SAMPLER_NAMES),
}


# ---- reading -------------------------------------------------------------------------------------

def load_config(path=None, overrides=()) -> DreamBoothConfig:
    """Read a TOML file (or start from the defaults when path is None), apply `key=value` overrides,
    check every value. Raises ConfigError on anything wrong."""
    values = {}
    if path is not None:
        from minidb.files import read_text
        try:
            values = tomllib.loads(read_text(path, ConfigError))  # UTF-8, an editor's BOM dropped
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(values, overrides, source=str(path) if path else "config")


def from_dict(values: dict, overrides=(), source="config") -> DreamBoothConfig:
    sections = {}
    for name, body in values.items():
        if name not in SECTIONS:
            raise ConfigError(f"{source}: unknown section [{name}]{_did_you_mean(name, SECTIONS)}")
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: `{name}` must be a [{name}] section, not a value")
        for key, value in body.items():
            sections.setdefault(name, {})[key] = _check(name, key, value, source)
    for item in overrides:
        name, key, value = parse_override(item)
        sections.setdefault(name, {})[key] = _check(name, key, value, "--set")
    try:
        cfg = DreamBoothConfig(**{name: SECTIONS[name](**body) for name, body in sections.items()})
    except TypeError as e:  # pragma: no cover - _check has already named every field
        raise ConfigError(f"{source}: {e}") from None
    return cfg


def parse_override(item: str) -> tuple[str, str, object]:
    """"optim.lr=2e-6" or "lr=2e-6" -> ("optim", "lr", 2e-06)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=2e-6")
    key, text = (s.strip() for s in item.split("=", 1))
    if "." in key:
        name, key = key.split(".", 1)
        if name not in SECTIONS:
            raise ConfigError(f"--set {item!r}: unknown section {name!r}{_did_you_mean(name, SECTIONS)}")
    else:
        owners = [n for n, cls in SECTIONS.items() if key in _field_names(cls)]
        if len(owners) > 1:
            raise ConfigError(f"--set {item!r}: {key!r} is in several sections; write one of "
                              + ", ".join(f"{n}.{key}" for n in owners))
        if not owners:
            every = {f"{n}.{k}": k for n, cls in SECTIONS.items() for k in _field_names(cls)}
            close = difflib.get_close_matches(key, set(every.values()), n=3, cutoff=0.5)
            hint = [full for word in close for full, bare in every.items() if bare == word]  # closest first
            raise ConfigError(f"--set {item!r}: unknown option {key!r}"
                              + (f" (did you mean {' or '.join(hint)}?)" if hint else ""))
        name = owners[0]
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare string: --set data.instance_prompt=a photo of sks dog
    return name, key, value


def _check(section: str, key: str, value, source: str):
    """The value converted to the field's type, or a ConfigError saying what was expected."""
    cls = SECTIONS[section]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    where = f"{source}: {section}.{key}"
    if key not in types:
        raise ConfigError(f"{source}: unknown option {section}.{key}{_did_you_mean(key, types, section + '.')}")
    want = types[key]
    if isinstance(want, UnionType):  # X | None: None (what to_dict gives for unset) stays unset
        if value is None:
            return None
        want = next(t for t in want.__args__ if t is not type(None))
    if want is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            value = value.lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
    elif want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
    elif want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
    elif want is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        if (section, key) in CHOICES and value not in CHOICES[(section, key)]:
            raise ConfigError(f"{where} must be one of {', '.join(CHOICES[(section, key)])}, got {value!r}")
    else:  # tuple[str, ...]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        value = tuple(value)
    return value


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _did_you_mean(word: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.5)
    return f" (did you mean {' or '.join(prefix + c for c in close)}?)" if close else ""


# ---- checking and resolving ----------------------------------------------------------------------

def validate(cfg: DreamBoothConfig) -> None:
    """Checks that need several fields or a range; file-system checks happen in train()."""
    problems = []
    if not cfg.model.base:
        problems.append("model.base (the SD v1 checkpoint to fine-tune) is not set")
    if not cfg.data.instance_dir:
        problems.append("data.instance_dir (the folder with the subject's photos) is not set")
    if not cfg.data.instance_prompt.strip():
        problems.append('data.instance_prompt is not set (e.g. "a photo of sks dog")')
    for section, key, lowest in [("data", "resolution", 0), ("train", "steps", 1), ("train", "batch_size", 1),
                                 ("train", "grad_accum", 1), ("train", "checkpoint_every", 1),
                                 ("train", "keep_checkpoints", 1), ("validation", "every", 1),
                                 ("prior", "batch_size", 1), ("optim", "warmup_steps", 0),
                                 ("prior", "num_class_images", 0), ("optim", "loss_scale_growth_interval", 1),
                                 ("train", "dist_timeout_s", 1), ("model", "lora_rank", 0)]:
        value = getattr(getattr(cfg, section), key)
        if value < lowest:
            problems.append(f"{section}.{key} must be at least {lowest}, got {value}")
    if cfg.data.resolution % 8:
        problems.append(f"data.resolution must be a multiple of 8, got {cfg.data.resolution}")
    o = cfg.optim
    for key in ("lr", "min_lr", "weight_decay", "adam_eps", "max_grad_norm", "loss_scale_min"):
        value = getattr(o, key)
        if not math.isfinite(value) or value < 0:
            problems.append(f"optim.{key} must be a finite number >= 0, got {value}")
    if o.lr == 0:
        problems.append("optim.lr is 0: nothing would be learned")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(o, key) < 1:
            problems.append(f"optim.{key} must be in [0, 1), got {getattr(o, key)}")
    if not (math.isfinite(o.loss_scale_init) and o.loss_scale_init >= max(o.loss_scale_min, 1e-30)):
        problems.append(f"optim.loss_scale_init must be >= optim.loss_scale_min, got {o.loss_scale_init}")
    for section, key in (("model", "lora_alpha"), ("train", "min_snr_gamma"), ("train", "noise_offset")):
        value = getattr(getattr(cfg, section), key)
        if not (math.isfinite(value) and value >= 0):
            problems.append(f"{section}.{key} must be a finite number >= 0, got {value}")
    if not 0 <= cfg.train.ema_decay < 1:
        problems.append(f"train.ema_decay must be in [0, 1) (0 = no EMA), got {cfg.train.ema_decay}")
    for section in ("prior", "validation"):  # the sampler's arguments, by the rules generate() checks them with
        problems.append(steps_problem(f"{section}.sample_steps", getattr(cfg, section).sample_steps))
        guidance = getattr(cfg, section).guidance  # unset: the base model's, checked when its file is read
        problems.append(guidance_problem(f"{section}.guidance", guidance) if guidance is not None else None)
    if not (math.isfinite(cfg.prior.loss_weight) and cfg.prior.loss_weight >= 0):
        problems.append(f"prior.loss_weight must be a finite number >= 0, got {cfg.prior.loss_weight}")
    for section in ("train", "validation"):
        problem = seed_problem(f"{section}.seed", getattr(cfg, section).seed)
        if problem:
            problems.append(problem)
    if cfg.prior.class_prompt and cfg.prior.num_class_images < 1:
        problems.append("prior.num_class_images must be at least 1 with a class_prompt (or set class_prompt "
                        '= "" to train without prior preservation)')
    if o.master_weights == "kahan":
        if cfg.model.precision != "bf16":
            problems.append(f'optim.master_weights = "kahan" trains bf16 weights without fp32 copies: it needs '
                            f'model.precision = "bf16", got {cfg.model.precision!r}')
        if o.optimizer != "adamw8bit" and not cfg.train.low_memory:
            problems.append('optim.master_weights = "kahan" is done by minidb\'s 8-bit AdamW: set optim.optimizer = '
                            f'"adamw8bit" (or train.low_memory = true), got {o.optimizer!r}')
    problems = [p for p in problems if p]
    if problems:
        raise ConfigError("; ".join(problems))


# check_prompts: words that are neither the class noun nor an identifier: articles, prepositions, the medium.
FILLER = frozenset("a an the of in on at with and or for to by from my our your his her their its this that "
                   "some photo photograph picture image pic shot painting drawing rendering render portrait "
                   "close up closeup".split())


def _words(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def check_prompts(instance_prompt: str, class_prompt: str | None, identifier: str | None = None) -> None:
    """DataError for an empty instance prompt; a warning when it lacks the class word(s) (the class
    prompt's nouns, "dog" in "a photo of a dog") or any identifier: DreamBooth binds a rare token
    to the subject *within its class* ("a photo of sks dog"), which prior preservation then keeps
    apart from the class itself. identifier: the expected token; None: any word beyond the class
    prompt's words (and filler) counts."""
    if not instance_prompt or not instance_prompt.strip():
        raise DataError('the instance prompt is empty: give one like "a photo of sks dog"')
    words = set(_words(instance_prompt))
    class_prompt = class_prompt if class_prompt and class_prompt.strip() else None
    if class_prompt:
        class_words = [w for w in _words(class_prompt) if w not in FILLER]
        missing = [w for w in class_words if w not in words]
        if missing:
            warnings.warn(f"the instance prompt {instance_prompt!r} lacks the class word(s) {' '.join(missing)!r} "
                          f"of the class prompt {class_prompt!r}: DreamBooth expects the subject within its class, "
                          f'e.g. "a photo of sks dog" with "a photo of a dog"', stacklevel=2)
    if identifier:
        if not set(_words(identifier)) <= words:
            warnings.warn(f"the instance prompt {instance_prompt!r} does not contain the identifier {identifier!r}",
                          stacklevel=2)
    elif class_prompt:
        beyond = words - set(_words(class_prompt)) - FILLER
        if not beyond:
            warnings.warn(f"the instance prompt {instance_prompt!r} has no identifier beyond the words of the class "
                          f"prompt {class_prompt!r}: add a rare token, e.g. \"a photo of sks dog\", or training "
                          f"shifts the whole class towards your subject", stacklevel=2)


def resolved(cfg: DreamBoothConfig, cwd=None) -> DreamBoothConfig:
    """Paths made absolute and the empty class_dir filled in, so the config written into the run
    folder means the same thing from any working directory."""
    cwd = cwd or os.getcwd()

    def absolute(p):
        if p.startswith("minidb:"):  # a file shipped inside the package (the world model, the demo subject)
            package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # minidb/
            return os.path.join(package, "data", p[len("minidb:"):])
        return os.path.normpath(os.path.join(cwd, os.path.expanduser(p))) if p else p

    output_dir = absolute(cfg.train.output_dir)
    class_dir = absolute(cfg.prior.class_dir) or os.path.join(output_dir, "class_images")
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, base=absolute(cfg.model.base)),
        data=dataclasses.replace(cfg.data, instance_dir=absolute(cfg.data.instance_dir)),
        prior=dataclasses.replace(cfg.prior, class_dir=class_dir),
        train=dataclasses.replace(cfg.train, output_dir=output_dir),
    )


def to_dict(cfg: DreamBoothConfig) -> dict:
    return {name: {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(sub).items()}
            for name, sub in ((n, getattr(cfg, n)) for n in SECTIONS)}


def differences(old: DreamBoothConfig, new: DreamBoothConfig) -> list[str]:
    """["optim.lr: 1e-06 -> 2e-06", ...] for every field that differs."""
    a, b = to_dict(old), to_dict(new)
    return [f"{s}.{k}: {a[s][k]!r} -> {b[s][k]!r}" for s in a for k in a[s] if a[s][k] != b[s][k]]


# ---- writing -------------------------------------------------------------------------------------

def dump_toml(cfg: DreamBoothConfig, explain: bool = False) -> str:
    """The config as TOML that load_config reads back to an equal config (tomllib cannot write).
    explain: each option followed by its comment from the dataclasses above. An unset option (None,
    before the plan fills it in) is written as a comment, which reads back as unset."""
    comments = explanations() if explain else {}
    lines = []
    for name, body in to_dict(cfg).items():
        lines.append(f"[{name}]")
        for key, value in body.items():
            line = f"# {key} = (unset)" if value is None else f"{key} = {_toml_value(value)}"
            comment = comments.get((name, key))
            lines.append(f"{line:<38}  # {comment}" if comment else line)
        lines.append("")
    return "\n".join(lines)


def explanations() -> dict[tuple[str, str], str]:
    """{(section, key): the comment beside that field in the dataclasses above}: each option is
    explained once, in this file, and --print-config reads the words back from the source."""
    skip = (tokenize.INDENT, tokenize.DEDENT, tokenize.NEWLINE, tokenize.NL)
    found = {}
    for name, cls in SECTIONS.items():
        lines = {}
        for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
            if tok.type not in skip:
                lines.setdefault(tok.start[0], []).append(tok)
        key = None  # the field whose comment a comment-only line right below it continues
        for number, toks in sorted(lines.items()):  # a field's line: `key: type = default  # what it means`
            if (len(toks) > 2 and toks[0].string in _field_names(cls) and toks[1].string == ":"
                    and toks[-1].type == tokenize.COMMENT):
                key, last = toks[0].string, number
                found[(name, key)] = toks[-1].string.lstrip("#").strip()
            elif key is not None and number == last + 1 and len(toks) == 1 and toks[0].type == tokenize.COMMENT:
                last = number
                found[(name, key)] += " " + toks[0].string.lstrip("#").strip()
            else:
                key = None
    return found


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        # a JSON string is a TOML basic string, given raw non-ASCII (TOML has no surrogate escapes) and DEL escaped
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"
