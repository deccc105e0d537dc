"""The run folder of a fine-tuning run (train.output_dir), and what the user sees of it.

    config.toml            the resolved config (a second run into this folder must match it)
    metrics.jsonl          one JSON line per step: loss, lr, loss scale, grad norm, images/s
    checkpoints/step_N.pt  full training state (minidb.dreambooth.checkpoint), the newest keep_checkpoints
    samples/step_N.png     validation grids, one image per validation prompt, fixed seeds
    class_images/          generated class images (unless prior.class_dir points elsewhere)
    model.safetensors      the fine-tuned model, original SD v1 layout, for `minidb sample`
    lora.safetensors       LoRA runs (model.lora_rank > 0): the adapters in kohya's format, for --lora
    tensorboard/           when the tensorboard package is installed

Every process holds a Run; only rank 0 writes files and prints, the others wait at the barriers.

One writer at a time: rank 0 holds an advisory lock (flock) on `.lock` in the folder for the whole
run, and the kernel drops it when the process ends, however it ends. A second run into a live folder
is refused in one line naming the holder's process and host, before it touches anything. The lock's
holder sweeps the temporary files a killed writer left (minidb.files.atomic_write).

Branches: resuming from a state older than the folder's newest moves the newer states (and the model
and validation grids made after that step) into checkpoints/abandoned-<step>-<time>/, so nothing is
deleted and `--resume latest` follows the new branch.
"""
import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minidb.dreambooth.checkpoint import (checkpoint_path, latest_checkpoint, latest_state, list_checkpoints, load_state,
                               prune_checkpoints, rng_state, save_state)
from minidb.dreambooth.distributed import Dist
from minidb.errors import ConfigError, DiskFull, RunFolderBusy, StateError
from minidb.files import atomic_write, atomic_write_text, remove_temporaries
from minidb.dreambooth.train_config import differences, dump_toml, from_dict, load_config, resolved, to_dict

# Changing these between a checkpoint and its resume would not continue the same training.
MUST_MATCH_ON_RESUME = ("model.base", "model.train_text_encoder", "optim.optimizer", "model.lora_rank",
                        "model.lora_alpha", "model.lora_text_encoder", "model.lora_targets",
                        "optim.master_weights")


class Run:
    def __init__(self, cfg, dist: Dist | None = None, config_toml: str | None = None, config_record: dict | None = None):
        """config_toml, config_record: cfg as config.toml and the training states write it, when the
        run's plan holds them already (minidb.dreambooth.plan); else made from cfg."""
        self.cfg, self.dist = cfg, dist or Dist()
        self.config_toml, self.config_record = config_toml, config_record
        self.folder = Path(cfg.train.output_dir)
        self.checkpoints = self.folder / "checkpoints"
        self.model_path = self.folder / "model.safetensors"
        self.lora_path = self.folder / "lora.safetensors"
        self.metrics_file = self.tb = self.bar = None
        self._lock = None  # the file descriptor holding the folder's lock (rank 0)
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

    # ---- one writer per folder ------------------------------------------------------------------

    @contextlib.contextmanager
    def writer(self):
        """The run's lifetime: a folder that already exists is locked now, before anything is read
        for the resume; a new one in prepare(), once it is made. The lock is released at the end."""
        try:
            if self.folder.is_dir():
                self.lock()
            yield self
        finally:
            if self._lock is not None:
                os.close(self._lock)  # closing the descriptor releases the flock
                self._lock = None

    def lock(self) -> None:
        """Take the folder's lock (rank 0), or raise RunFolderBusy on every rank."""
        refusal = None
        if self.dist.is_main and self._lock is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 256).decode("utf-8", "replace").split()
                os.close(fd)
                who = f"process {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
                refusal = (f"{self.folder} is in use by another minidb train ({who}): wait for it to end or stop "
                           "it, or choose another train.output_dir")
            except OSError as e:  # a file system without locks (some network mounts): run, but say so
                os.close(fd)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                warnings.warn(f"{self.folder}: this file system cannot lock files ({e.strerror}): nothing stops a "
                              "second run from writing into the same folder", stacklevel=2)
            else:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                self._lock = fd
                for folder in (self.folder, self.checkpoints, self.folder / "samples"):
                    remove_temporaries(folder)  # of writers killed mid-write: this process owns the folder now
        refusal = self.dist.gather_object(refusal)[0]
        if refusal is not None:
            raise RunFolderBusy(refusal)

    # ---- resume ---------------------------------------------------------------------------------

    def find_state(self, resume) -> dict | None:
        """The training state to resume from: None (a new run), "latest" (the latest checkpoint of
        this folder, minidb.dreambooth.checkpoint.latest_state) or a checkpoint path, or another run folder (its
        latest checkpoint)."""
        if resume is None:
            return None
        remedy = "continue from it with --resume {good}"
        if resume == "latest":
            state = latest_state(self.checkpoints, remedy)
            if state is None and self.started_without_checkpoint():
                self.log(f"--resume latest: {self.folder} holds this run, stopped before its first checkpoint: "
                         "starting it from step 0")
            elif state is None:  # an empty or mistyped folder: say so rather than start a run there
                raise StateError(f"--resume latest: no checkpoint in {self.checkpoints}")
            return state
        path = Path(resume)
        if not path.is_dir():
            return {**load_state(path), "path": path}
        # a run folder, or its checkpoints folder
        state = latest_state(path / "checkpoints", remedy) or latest_state(path, remedy)
        if state is None:
            raise StateError(f"--resume {resume}: no checkpoint in that folder")
        return state

    def started_without_checkpoint(self) -> bool:
        """The folder holds this very run's config.toml and no training state: a run stopped (killed,
        interrupted) before it wrote its first checkpoint."""
        config_file = self.folder / "config.toml"
        return (config_file.is_file() and not list_checkpoints(self.checkpoints)
                and not differences(load_config(config_file), self.cfg))

    def finished_model(self, state) -> Path | None:
        """The run's model (a LoRA run's: its lora.safetensors) when a resume finds nothing left to do:
        the checkpoint is at (or past) train.steps and the model was written after it (else the export
        still has to happen)."""
        model = self.lora_path if self.cfg.model.lora_rank else self.model_path
        if state is None or state["step"] < self.cfg.train.steps or not model.is_file():
            return None
        return model if model.stat().st_mtime >= Path(state["path"]).stat().st_mtime else None

    def prepare(self, state) -> None:
        """Lock the folder, refuse it if it holds another run (unless resuming), set aside the states
        of an abandoned branch, then write config.toml."""
        cfg, run, config_file = self.cfg, self.folder, self.folder / "config.toml"
        self.lock()  # a new folder is made here; an existing one was locked when the run began (writer)
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
            if state is not None:
                self.set_aside_after(state["step"])
            atomic_write_text(config_file, self.config_toml or dump_toml(cfg))
        self.dist.barrier()

    def set_aside_after(self, step: int) -> Path | None:
        """Resuming from `step` when the folder holds later states starts a new branch: the later
        states, the model written at their end and the validation grids past `step` move into
        checkpoints/abandoned-<step>-<time>/ (nothing is deleted), and `latest` follows the new branch."""
        later = [path for s, path in list_checkpoints(self.checkpoints) if s > step]
        if not later:
            return None
        aside = self.checkpoints / f"abandoned-{step:06d}-{time.strftime('%Y%m%d-%H%M%S')}"
        aside.mkdir()
        grids = sorted((self.folder / "samples").glob("step_*.png"))
        moved = later + [p for p in (self.model_path, self.lora_path) if p.is_file()] + [
            p for p in grids if p.stem.removeprefix("step_").isdigit() and int(p.stem.removeprefix("step_")) > step]
        for path in moved:
            os.replace(path, aside / (path.name if path.parent != self.folder / "samples" else "samples-" + path.name))
        self.log(f"resuming from step {step}, before the folder's newest state (step {list_checkpoints(aside)[-1][0]}): "
                 f"a new branch; the later states, model and grids moved to {aside}")
        return aside

    # ---- training-state files -------------------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints)

    def resume_hint(self) -> str:
        """What to do after a lost peer (minidb.dreambooth.distributed's PeerLost says it)."""
        return f"continue the run with --resume latest (newest checkpoint: {self.latest_checkpoint() or 'none'})"

    def save_state(self, step: int, state: dict) -> Path:
        """Every rank hands in its RNG states; rank 0 writes step_N.pt atomically and prunes old ones."""
        rngs = self.dist.gather_object(rng_state())
        path = checkpoint_path(self.checkpoints, step)
        if self.dist.is_main:
            try:
                save_state(path, {"step": step, **state, "rng": rngs, "world_size": self.dist.world_size,
                                  "config": self.config_record or to_dict(self.cfg)})
            except DiskFull as e:
                newest = self.latest_checkpoint()
                raise DiskFull(f"{e}; the newest complete checkpoint is " + (
                    f"{newest}: free some space, then continue with --resume latest" if newest else "none")) from None
            prune_checkpoints(self.checkpoints, self.cfg.train.keep_checkpoints)
        self.dist.barrier()
        return path

    # ---- the loop's outputs: metrics.jsonl, TensorBoard, the progress bar, validation grids ------

    def open(self, step: int) -> "Run":
        """Start logging at `step`: metrics.jsonl loses the lines of steps past it (a resume)."""
        if self.dist.is_main:
            path = self.metrics_path = self.folder / "metrics.jsonl"
            if step == 0:
                path.unlink(missing_ok=True)
            elif path.is_file():
                atomic_write_text(path, "".join(line + "\n" for line in self.metrics_until(path, step)))
            self.metrics_file = open(path, "a", encoding="utf-8")
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.folder / "tensorboard"))
            except ImportError:  # tensorboard not installed: metrics.jsonl only
                pass
        self.bar = tqdm(total=self.cfg.train.steps, initial=step, desc="train", disable=not self.dist.is_main,
                        dynamic_ncols=True)
        return self

    def metrics_until(self, path: Path, step: int) -> list[str]:
        """The lines of metrics.jsonl up to `step`. A line a kill, power cut or full disk cut short
        (or any that is not a JSON object) is dropped, with a warning."""
        kept, torn = [], []
        for number, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError
            except ValueError:
                torn.append(number)
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        if torn:
            self.log(f"warning: {path}: dropped {len(torn)} unreadable line(s) ({', '.join(map(str, torn[:5]))}"
                     f"{', ...' if len(torn) > 5 else ''}), cut short by a kill, power cut or full disk")
        return kept

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for thing in (self.bar, self.metrics_file, self.tb):
            if thing is not None:
                try:
                    thing.close()
                except OSError:  # the full disk already reported; a torn last line is dropped on resume
                    if exc[0] is None:
                        raise
        self.metrics_file = self.tb = self.bar = None

    def log_metrics(self, metrics: dict) -> None:
        if not self.dist.is_main:
            return
        try:
            self.metrics_file.write(json.dumps(metrics) + "\n")
            self.metrics_file.flush()
        except OSError as e:  # a full disk: one line naming the file; a torn last line is dropped on resume
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise DiskFull(f"{self.metrics_path}: {e.strerror}; the lines of earlier steps are kept, the newest "
                           f"complete checkpoint is {self.latest_checkpoint()}") from None
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
        with atomic_write(path, hidden=True) as tmp:
            grid.save(tmp, format="PNG")
        if self.tb is not None:
            self.tb.add_image("validation", torch.from_numpy(np.array(grid)).permute(2, 0, 1), step)
        self.dist.barrier()
        return path
