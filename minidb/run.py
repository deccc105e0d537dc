"""The run folder of a fine-tuning run (train.output_dir), and what the user sees of it.

    config.toml            the resolved config (a second run into this folder must match it)
    metrics.jsonl          one JSON line per step: loss, lr, loss scale, grad norm, images/s
    checkpoints/step_N.pt  full training state (minidb.checkpoint), the newest keep_checkpoints
    samples/step_N.png     validation grids, one image per validation prompt, fixed seeds
    class_images/          generated class images (unless prior.class_dir points elsewhere)
    model.safetensors      the fine-tuned model, original SD v1 layout, for `minidb sample`
    lora.safetensors       LoRA runs (model.lora_rank > 0): the adapters in kohya's format, for --lora
    tensorboard/           when the tensorboard package is installed

Every process holds a Run; only rank 0 writes files and prints, the others wait at the barriers.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minidb.checkpoint import (checkpoint_path, latest_checkpoint, list_checkpoints, load_state, prune_checkpoints,
                               rng_state, save_state)
from minidb.distributed import Dist
from minidb.errors import CheckpointError, ConfigError
from minidb.train_config import differences, dump_toml, from_dict, load_config, resolved, to_dict
from minidb.weights import atomic_write

# Changing these between a checkpoint and its resume would not continue the same training.
MUST_MATCH_ON_RESUME = ("model.base", "model.train_text_encoder", "optim.optimizer", "model.lora_rank",
                        "model.lora_alpha", "model.lora_text_encoder", "model.lora_targets",
                        "optim.master_weights")


class Run:
    def __init__(self, cfg, dist: Dist | None = None):
        self.cfg, self.dist = cfg, dist or Dist()
        self.folder = Path(cfg.train.output_dir)
        self.checkpoints = self.folder / "checkpoints"
        self.model_path = self.folder / "model.safetensors"
        self.lora_path = self.folder / "lora.safetensors"
        self.metrics_file = self.tb = self.bar = None
        if self.folder.exists() and not self.folder.is_dir():
            raise ConfigError(f"train.output_dir: {self.folder} is a file, not a folder: choose another "
                              "train.output_dir")

    # ---- messages: rank 0 only, above the progress bar when there is one ------------------------

    def log(self, message: str) -> None:
        if self.dist.is_main:
            (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)

    def result(self, message: str) -> None:
        if self.dist.is_main:
            print(message, flush=True)

    # ---- resume ---------------------------------------------------------------------------------

    def find_state(self, resume) -> dict | None:
        """The training state to resume from: None (a new run), "latest" (the newest checkpoint of
        this folder) or a checkpoint path, or another run folder (its newest checkpoint)."""
        if resume is None:
            return None
        if resume == "latest":
            path = latest_checkpoint(self.checkpoints)
            if path is None:
                raise CheckpointError(f"--resume latest: no checkpoint in {self.checkpoints}")
        else:
            path = Path(resume)
            if path.is_dir():  # a run folder, or its checkpoints folder
                path = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
                if path is None:
                    raise CheckpointError(f"--resume {resume}: no checkpoint in that folder")
        state = load_state(path)
        state["path"] = path
        return state

    def finished_model(self, state) -> Path | None:
        """The run's model (a LoRA run's: its lora.safetensors) when a resume finds nothing left to do:
        the checkpoint is at (or past) train.steps and the model was written after it (else the export
        still has to happen)."""
        model = self.lora_path if self.cfg.model.lora_rank else self.model_path
        if state is None or state["step"] < self.cfg.train.steps or not model.is_file():
            return None
        return model if model.stat().st_mtime >= Path(state["path"]).stat().st_mtime else None

    def prepare(self, state) -> None:
        """Refuse a folder that holds another run (unless resuming), then write config.toml."""
        cfg, run, config_file = self.cfg, self.folder, self.folder / "config.toml"
        if state is not None:
            changed = differences(resolved(from_dict(state["config"])), cfg)
            fatal = [c for c in changed if c.split(":")[0] in MUST_MATCH_ON_RESUME]
            if fatal:
                raise ConfigError(f"cannot resume {state['path']} with a different " + "; ".join(fatal))
            if changed:
                self.log("resuming with changed settings: " + "; ".join(changed))
        elif config_file.is_file():
            changed = differences(load_config(config_file), cfg)
            found = list_checkpoints(self.checkpoints)
            if changed:
                raise ConfigError(f"{run} holds a different run ({'; '.join(changed[:4])}"
                                  f"{'; ...' if len(changed) > 4 else ''}): choose another train.output_dir, or "
                                  + ("continue that run with --resume latest" if found else
                                     "delete the folder (that run wrote no checkpoint)"))
            if found:
                raise ConfigError(f"{run} already holds this run, with checkpoints up to step {found[-1][0]}: "
                                  "continue it with --resume latest, or delete the folder to start over")
        elif any((run / name).exists() for name in ("checkpoints", "metrics.jsonl", "model.safetensors",
                                                    "lora.safetensors")):
            raise ConfigError(f"{run} holds files of a run without its config.toml: choose another train.output_dir")
        if self.dist.is_main:
            with atomic_write(config_file) as tmp:
                tmp.write_text(dump_toml(cfg), encoding="utf-8")
        self.dist.barrier()

    # ---- training-state files -------------------------------------------------------------------

    def latest_state(self) -> Path | None:
        return latest_checkpoint(self.checkpoints)

    def save_state(self, step: int, state: dict) -> Path:
        """Every rank hands in its RNG states; rank 0 writes step_N.pt atomically and prunes old ones."""
        rngs = self.dist.gather_object(rng_state())
        path = checkpoint_path(self.checkpoints, step)
        if self.dist.is_main:
            save_state(path, {"step": step, **state, "rng": rngs, "world_size": self.dist.world_size,
                              "config": to_dict(self.cfg)})
            prune_checkpoints(self.checkpoints, self.cfg.train.keep_checkpoints)
        self.dist.barrier()
        return path

    # ---- the loop's outputs: metrics.jsonl, TensorBoard, the progress bar, validation grids ------

    def open(self, step: int) -> "Run":
        """Start logging at `step`: metrics.jsonl loses the lines of steps past it (a resume)."""
        if self.dist.is_main:
            path = self.folder / "metrics.jsonl"
            if step == 0:
                path.unlink(missing_ok=True)
            elif path.is_file():
                kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                        if line.strip() and json.loads(line).get("step", 0) <= step]
                path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            self.metrics_file = open(path, "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.folder / "tensorboard"))
            except ImportError:  # tensorboard not installed: metrics.jsonl only
                pass
        self.bar = tqdm(total=self.cfg.train.steps, initial=step, desc="train", disable=not self.dist.is_main,
                        dynamic_ncols=True)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for thing in (self.bar, self.metrics_file, self.tb):
            if thing is not None:
                thing.close()
        self.metrics_file = self.tb = self.bar = None

    def log_metrics(self, metrics: dict) -> None:
        if not self.dist.is_main:
            return
        self.metrics_file.write(json.dumps(metrics) + "\n")
        self.metrics_file.flush()
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "time"):
                    self.tb.add_scalar(f"train/{key}", value, metrics["step"])
        postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}"}
        if metrics["loss_scale"] is not None:
            postfix["scale"] = f"{metrics['loss_scale']:g}" + (" skip" if metrics["skipped"] else "")
        postfix["img/s"] = f"{metrics['images_per_s']:.2f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    @torch.no_grad()
    def validation_grid(self, sd, step: int) -> Path | None:
        """samples/step_N.png: one image per validation prompt, the same seeds every time (rank 0)."""
        from minidb.sampling import image_grid
        if not self.dist.is_main:
            self.dist.barrier()
            return None
        v, size = self.cfg.validation, self.cfg.data.resolution
        training = {name: m.training for name, m in sd.models.items()}
        for m in sd.models.values():
            m.eval()
        try:
            images = sd.generate(list(v.prompts), steps=v.sample_steps, guidance=v.guidance, sampler=v.sampler,
                                 height=size, width=size, seed=v.seed, progress=False)
        finally:
            for name, m in sd.models.items():
                m.train(training[name])
        grid = image_grid(images, min(4, len(images)))
        path = self.folder / "samples" / f"step_{step:06d}.png"
        path.parent.mkdir(exist_ok=True)
        grid.save(path)
        if self.tb is not None:
            self.tb.add_image("validation", torch.from_numpy(np.array(grid)).permute(2, 0, 1), step)
        self.dist.barrier()
        return path
