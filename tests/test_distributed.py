"""Multi-process DreamBooth training (DDP, gloo, 2 CPU processes, tiny SD at 32x32).

Launched the way users launch it: `python -m torch.distributed.run --nproc_per_node 2 ...`, once
through the real command line (`-m minidb train --config run.toml`) and otherwise through a small
driver script (below) that calls minidb.dreambooth.train.train with a callback recording, on every rank, a
hash of that rank's own weights after every step. The failure tests start the two ranks as plain
subprocesses instead (torchrun's agent would kill the survivor itself, proving nothing about minidb).

Runs are shared between tests (module fixtures) to keep the file near a minute and a half:
  two_procs   torchrun -m minidb train: 2 x batch 1 x grad_accum 2, 3 steps, a checkpoint every step
  stop_resume driver: the same run, SIGTERM on rank 1 at step 2, then resume="latest" to step 3;
              it runs first and generates the class images (split across the ranks) all runs use
  fp16        driver: fp16 + gradient checkpointing, an inf injected into rank 1's gradient at step 2
"""
import hashlib
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# Every test here starts two training processes, the slowest part of the suite: outside the
# README's command, which stays fast; `.ci/run` runs them with `-m slow`.
pytestmark = pytest.mark.slow

from helpers import assert_same_image_up_to_rounding, dreambooth_world
from minidb.dreambooth import checkpoint as ck
from minidb.dreambooth.train import train
from minidb.dreambooth.train_config import dump_toml, load_config

REPO = Path(__file__).resolve().parents[1]
# One thread per process: 2 ranks on 2 cores. No inherited RANK/WORLD_SIZE/MASTER_*: each launch sets its own.
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                        "MASTER_PORT", "LOCAL_WORLD_SIZE")}
ENV.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
STEPS = 3


def digest(weights: dict) -> str:
    """sha256 over the names and exact bytes of a {name: tensor} dict: equal iff bit-identical."""
    h = hashlib.sha256()
    for name, t in weights.items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


DRIVER = '''"""train() on one rank, recording what the tests check: argv[1] is a JSON spec."""
import hashlib, json, os, signal, sys, time
import torch
import minidb.pipeline
import minidb.dreambooth.step as S
import minidb.dreambooth.train as T
from minidb.dreambooth.train_config import load_config

spec = json.loads(sys.argv[1])
rank = int(os.environ.get("RANK", "0"))
seen = {"steps": 0, "seeds": []}
actions = spec.get("at", {})  # "rank/step": "exit" | "hang" | "sigterm"; "rank/opt": step to inject an inf at

real_step = S.TrainStep.optimizer_step
def optimizer_step(self, *args, **kwargs):
    masters = seen["masters"] = self.masters
    seen["steps"] += 1
    if actions.get(f"{rank}/inf") == seen["steps"]:  # gradients are all-reduced by now: only this rank sees it
        next(p for p in masters.model_params if p.grad is not None).grad.view(-1)[0] = float("inf")
    return real_step(self, *args, **kwargs)
S.TrainStep.optimizer_step = optimizer_step

real_generate = minidb.pipeline.StableDiffusion.generate
def generate(self, prompts, *args, seed=None, **kwargs):  # which class images this rank drew
    seen["seeds"] += list(seed)
    return real_generate(self, prompts, *args, seed=seed, **kwargs)
minidb.pipeline.StableDiffusion.generate = generate

DIGEST

records = []
def callback(step, metrics):
    m = seen["masters"]
    records.append({"step": step, "masters": digest(m.state_dict()),
                    "model": digest(dict(zip(m.names, m.model_params))),
                    **{k: metrics[k] for k in ("loss", "skipped", "loss_scale")}})
    action = actions.get(f"{rank}/{step}")
    if action == "exit":
        os._exit(1)
    elif action == "sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "hang":
        with open(os.path.join(spec["out"], f"hang{rank}"), "w") as f:
            f.write(repr(time.time()))
        while True:  # silent, alive, never reaching the next collective
            time.sleep(1)

result = T.train(load_config(None, spec["sets"]), resume=spec.get("resume"), callback=callback)
with open(os.path.join(spec["out"], f"rank{rank}.json"), "w") as f:
    json.dump({"records": records, "step": result.step, "interrupted": result.interrupted,
               "seeds": seen["seeds"]}, f)
'''.replace("DIGEST", inspect.getsource(digest))


# ---- set-up and launching ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A perturbed tiny SD saved as the base checkpoint, 3 instance photos, the driver script."""
    root = dreambooth_world(tmp_path_factory.mktemp("distributed"))
    (root / "driver.py").write_text(DRIVER)
    return root


def settings(world, out, *sets):
    """The shared run. Class images: 3, generated into one folder by the first run that needs them
    (2 denoising steps, batches of 2, so the 2-process split [0, 2] | [1] batches differently from
    one process's [0, 1] | [2]). adam_eps=1e-4: some gradients are zero in exact arithmetic (a conv
    bias just before a GroupNorm) and ~1e-10 in fp32; with the default 1e-8 Adam would turn that
    rounding noise into +-lr steps whose sign differs between 1 and 2 processes."""
    return [f"model.base={world / 'base.safetensors'}", f"data.instance_dir={world / 'instance'}",
            "data.instance_prompt=a photo of sks dog", "prior.class_prompt=a photo of a dog",
            f"prior.class_dir={world / 'class'}", "prior.num_class_images=3", "prior.sample_steps=2",
            "prior.batch_size=2", "data.resolution=32", f"train.output_dir={out}", f"train.steps={STEPS}",
            "train.checkpoint_every=1", "train.keep_checkpoints=10", "train.grad_accum=2", "optim.lr=1e-3",
            "optim.adam_eps=1e-4", "data.hflip=true", "train.dist_timeout_s=60", *sets]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def communicate(proc, timeout):
    """(stdout, stderr) of proc; a hang past timeout kills its whole process group and fails the test."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s: {proc.args}\n{err[-3000:]}")


def torchrun(*args, timeout=180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), *map(str, args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO,
                            start_new_session=True)
    out, err = communicate(proc, timeout)
    assert proc.returncode == 0, err[-5000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def driver(world, out: Path, sets, **spec) -> tuple[dict, dict, subprocess.CompletedProcess]:
    """A torchrun launch of the driver: (rank 0's record, rank 1's record, the process)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("rank*.json"):
        f.unlink()
    done = torchrun(world / "driver.py", json.dumps({"out": str(out), "sets": sets, **spec}))
    return (*(json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)), done)


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def weights(run: Path, step: int) -> dict:
    return ck.load_state(ck.checkpoint_path(run / "checkpoints", step))["weights"]


# ---- the shared runs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stop_resume(world, tmp_path_factory):
    """2 processes: SIGTERM to rank 1 alone during step 2 (both must stop, checkpoint at 2), then resume."""
    out = tmp_path_factory.mktemp("stop_resume")
    sets = settings(world, out / "run")
    stopped = driver(world, out, sets, at={"1/2": "sigterm"})
    resumed = driver(world, out, sets, resume="latest")
    return out / "run", stopped, resumed


@pytest.fixture(scope="module")
def two_procs(world, stop_resume, tmp_path_factory):
    """The real command line under torchrun, uninterrupted (the class images exist by now)."""
    out = tmp_path_factory.mktemp("two_procs")
    (out / "run.toml").write_text(dump_toml(load_config(None, settings(world, out / "run"))))
    done = torchrun("-m", "minidb", "train", "--config", out / "run.toml")
    assert "2 process(es) x 2 accumulation = 4 instance images per step" in done.stderr
    return out / "run"


@pytest.fixture(scope="module")
def one_proc(world, stop_resume, tmp_path_factory):
    """The same global batch in this process: batch 2 x grad_accum 2."""
    out = tmp_path_factory.mktemp("one_proc") / "run"
    result = train(load_config(None, settings(world, out, "train.batch_size=2")))
    assert result.step == STEPS
    return out


# ---- 1. N processes = 1 process with the same global batch -------------------------------------------

def test_two_processes_match_one_process_with_the_same_global_batch(two_procs, one_proc):
    """Not bit-exact: DDP averages the two ranks' gradients (each the mean over its own examples)
    where one process backpropagates the mean over both, the convolutions see batches of 1 vs 2
    and the processes run 1 vs 2 threads, so sums are ordered differently: fp32 rounding, measured
    max |diff| 1.2e-7 (one ulp near 1) on ~15% of the weights. Tolerance 1e-5 (80x that, for other
    CPUs' kernels); steps 2-3 alone move the weights by 2e-3, and a wrong data split, noise draw or
    gradient average shows as a loss difference of ~1e-2 (tried)."""
    m2, m1 = metrics(two_procs), metrics(one_proc)
    assert [m["step"] for m in m2] == [m["step"] for m in m1] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([m["loss"] for m in m2], [m["loss"] for m in m1], rtol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in m2], [m["grad_norm"] for m in m1], rtol=1e-5)
    base = {k: v.clone() for k, v in weights(one_proc, 1).items()}  # reference for "the weights moved"
    for step in range(1, STEPS + 1):
        a, b = weights(two_procs, step), weights(one_proc, step)
        assert a.keys() == b.keys()
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-5, f"step {step}: max |2 procs - 1 proc| = {worst:.3g}"
    last = weights(one_proc, STEPS)
    moved = max((last[k] - base[k]).abs().max().item() for k in base)
    assert moved > 1e-3  # steps 2-3 moved the weights far beyond the tolerance
    a, b = (ck.load_state(ck.checkpoint_path(r / "checkpoints", STEPS)) for r in (two_procs, one_proc))
    assert a["data"] == b["data"]  # both consumed the same examples of the same order
    assert a["world_size"] == 2 and b["world_size"] == 1 and len(a["rng"]) == 2


# ---- 2. the replicas stay identical -------------------------------------------------------------------

def test_replicas_hold_identical_weights_at_every_checkpoint(stop_resume):
    """Bit-identical: every rank applies the same all-reduced gradient with the same optimizer."""
    run, (r0, r1, _), (q0, q1, _) = stop_resume
    recs = [r0["records"] + q0["records"], r1["records"] + q1["records"]]
    assert [r["step"] for r in recs[0]] == [r["step"] for r in recs[1]] == list(range(1, STEPS + 1))
    for a, b in zip(*recs):
        assert a["masters"] == b["masters"] and a["model"] == b["model"], f"step {a['step']}: replicas differ"
        assert a["masters"] == digest(weights(run, a["step"])), f"step {a['step']}: rank 0's file differs"
    assert len({r["masters"] for r in recs[0]}) == STEPS  # every step changed the weights


# ---- 3. an overflow on one rank skips the step on all ------------------------------------------------

@pytest.fixture(scope="module")
def fp16(world, stop_resume, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    sets = settings(world, out / "run", "model.precision=fp16", "model.gradient_checkpointing=true",
                    "train.grad_accum=1", "optim.loss_scale_init=1024")
    r0, r1, _ = driver(world, out, sets, at={"1/inf": 2})
    return out / "run", r0, r1


def test_fp16_inf_on_one_rank_skips_the_step_on_both(fp16):
    run, r0, r1 = fp16
    for records in (r0["records"], r1["records"]):
        assert [r["skipped"] for r in records] == [False, True, False]
        assert [r["loss_scale"] for r in records] == [1024.0, 512.0, 512.0]
        assert records[0]["masters"] == records[1]["masters"] != records[2]["masters"]  # step 2 changed nothing
    for a, b in zip(r0["records"], r1["records"]):
        assert a["masters"] == b["masters"] and a["model"] == b["model"]
    assert [m["skipped"] for m in metrics(run)] == [False, True, False]
    assert ck.load_state(ck.checkpoint_path(run / "checkpoints", 2))["scaler"]["scale"] == 512.0


# ---- 4. resume under 2 processes ----------------------------------------------------------------------

def test_two_process_resume_matches_an_uninterrupted_run(stop_resume, two_procs):
    """Bit-exact: the same code on the same 2 x 1 threads, a per-example noise seed and a data cursor."""
    run, (r0, r1, stopped), (q0, q1, resumed) = stop_resume
    assert r0["interrupted"] and r1["interrupted"] and r0["step"] == r1["step"] == 2  # rank 1's SIGTERM stopped both
    assert "stopped by another process at step 2" in stopped.stderr                   # said by rank 0
    assert "resumed from" in resumed.stderr and q0["step"] == q1["step"] == STEPS
    a, b = (ck.load_state(ck.checkpoint_path(r / "checkpoints", STEPS)) for r in (two_procs, run))
    for k in a["weights"]:
        assert torch.equal(a["weights"][k], b["weights"][k]), k
    for i, s in a["optimizer"]["state"].items():
        assert all(torch.equal(s[key], b["optimizer"]["state"][i][key]) for key in s)
    assert a["data"] == b["data"]
    assert [m["loss"] for m in metrics(two_procs)] == [m["loss"] for m in metrics(run)]


def test_resume_with_another_world_size_and_the_same_global_batch(world, stop_resume, one_proc, tmp_path):
    """The 2-process checkpoint of step 2, continued by 1 process with batch 2: the data cursor and the
    per-example noise seeds are global, so this is the 1-process run's step 3 (within fp32 rounding, as
    in the first test)."""
    run, _, _ = stop_resume
    cfg = load_config(None, settings(world, tmp_path / "run", "train.batch_size=2"))
    result = train(cfg, resume=str(ck.checkpoint_path(run / "checkpoints", 2)))
    assert result.step == STEPS and [m["step"] for m in metrics(tmp_path / "run")] == [STEPS]
    a, b = weights(tmp_path / "run", STEPS), weights(one_proc, STEPS)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    assert metrics(tmp_path / "run")[0]["loss"] == pytest.approx(metrics(one_proc)[-1]["loss"], rel=1e-5)


# ---- 4b. LoRA under DDP ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_runs(world, stop_resume, tmp_path_factory):
    """LoRA on the UNet and the text encoder: 2 processes x batch 1 (the driver), 1 process x batch 2."""
    out = tmp_path_factory.mktemp("lora")
    lora = ("model.lora_rank=2", "model.lora_text_encoder=true")
    r0, r1, _ = driver(world, out, settings(world, out / "two", *lora))
    train(load_config(None, settings(world, out / "one", "train.batch_size=2", *lora)))
    return out, r0, r1


def test_lora_under_ddp_matches_one_process_and_the_replicas_agree(lora_runs):
    """The models are frozen and the adapters hook onto them from outside, so DDP wraps each model
    together with its adapters (Dist.wrap(model, adapters)) and all-reduces the adapters' gradients:
    the replicas stay bit-identical, and 2 processes compute what 1 does (to fp32 rounding, as above)."""
    out, r0, r1 = lora_runs
    assert [r["step"] for r in r0["records"]] == list(range(1, STEPS + 1))
    for a, b in zip(r0["records"], r1["records"]):
        assert a["masters"] == b["masters"] and a["model"] == b["model"], f"step {a['step']}: replicas differ"
    assert len({r["masters"] for r in r0["records"]}) == STEPS
    np.testing.assert_allclose([m["loss"] for m in metrics(out / "two")], [m["loss"] for m in metrics(out / "one")],
                               rtol=1e-5)
    for step in range(1, STEPS + 1):
        a, b = weights(out / "two", step), weights(out / "one", step)
        assert a.keys() == b.keys() and all(k.startswith(("lora_unet_", "lora_te_")) for k in a)
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
        assert worst <= 1e-5, f"step {step}: max |2 procs - 1 proc| = {worst:.3g}"
    assert max(v.abs().max().item() for k, v in a.items() if k.endswith("lora_up.weight")) > 1e-3  # trained


# ---- 5. a dead or silent rank ends the run ------------------------------------------------------------

def _two_ranks(world, tmp_path, victim: int, action: str, timeout_s: int):
    """Both ranks started by hand (no torchrun agent to clean up): the victim runs the driver and
    dies or hangs at step 2, the survivor runs `minidb train`. Returns (survivor, its stderr, the
    time it exited, the victim's output folder)."""
    sets = settings(world, tmp_path / "run", f"train.dist_timeout_s={timeout_s}", "train.steps=4")
    (tmp_path / "run.toml").write_text(dump_toml(load_config(None, sets)))
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2")
    spec = json.dumps({"out": str(tmp_path), "sets": sets, "at": {f"{victim}/2": action}})
    procs = {}
    try:
        for rank in (0, 1):
            cmd = ([sys.executable, str(world / "driver.py"), spec] if rank == victim else
                   [sys.executable, "-m", "minidb", "train", "--config", str(tmp_path / "run.toml")])
            procs[rank] = subprocess.Popen(cmd, env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)), cwd=REPO,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                           start_new_session=True)
        survivor = procs[1 - victim]
        _, err = communicate(survivor, timeout_s + 120)
        return survivor, err, time.time()
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.communicate()


@pytest.mark.parametrize("victim", [1, 0])  # 0 also hosts the rendezvous store
def test_a_killed_rank_ends_the_other_with_a_clear_error(world, stop_resume, tmp_path, victim):
    timeout_s = 30
    t0 = time.time()
    survivor, err, t_end = _two_ranks(world, tmp_path, victim, "exit", timeout_s)
    assert survivor.returncode == 2, err[-3000:]
    assert t_end - t0 < timeout_s  # startup, 2 steps, then a closed connection: no need to wait out the timeout
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        f"minidb train: error: process {1 - victim} of 2 lost contact with the others (")
    assert "--resume latest (newest checkpoint: " in err and "step_000001.pt" in err


def test_a_silent_rank_ends_the_other_after_the_timeout(world, stop_resume, tmp_path):
    timeout_s = 6
    survivor, err, t_end = _two_ranks(world, tmp_path, 1, "hang", timeout_s)
    assert survivor.returncode == 2, err[-3000:]
    waited = t_end - float((tmp_path / "hang1").read_text())
    assert timeout_s - 1 <= waited <= timeout_s + 20, waited
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("minidb train: error: process 0 of 2 lost contact with the others (")
    assert "Timed out" in last and f"silent for over {timeout_s} s (train.dist_timeout_s)" in last


# ---- 7. class images split across ranks ---------------------------------------------------------------

def test_class_images_split_across_ranks_match_one_process(world, stop_resume, tmp_path):
    """Rank 0 drew images 0 and 2 (one batch), rank 1 image 1; one process draws 0, 1 | 2. Not
    bit-exact: the sampler's convolutions and attention see batches of other sizes on 1 vs 2
    threads, so the float images differ by rounding and a value that sits next to a uint8 rounding
    boundary can land on the other side (measured: 1-2 of 3072 values per image, by 1/255)."""
    from minidb.dreambooth.prior import ensure_class_images
    from minidb.pipeline import StableDiffusion
    _, (r0, r1, _), (q0, q1, _) = stop_resume
    assert sorted(r0["seeds"]) == [0, 2] and r1["seeds"] == [1]  # the split (seed = train.seed + index)
    assert q0["seeds"] == q1["seeds"] == []                      # the resumed run found them all
    cfg = load_config(None, settings(world, tmp_path / "run"))
    sd = StableDiffusion.from_checkpoint(cfg.model.base)
    p = cfg.prior
    one = ensure_class_images(sd, p.class_prompt, tmp_path / "class", p.num_class_images, seed=cfg.train.seed,
                              batch_size=p.batch_size, steps=p.sample_steps, guidance=p.guidance, sampler=p.sampler,
                              resolution=cfg.data.resolution, progress=False)
    two = sorted((world / "class").iterdir())
    assert [f.name for f in one] == [f.name for f in two] == [f"class-{i:05d}.png" for i in range(3)]
    pixels = [[np.asarray(Image.open(f), dtype=np.int16) for f in files] for files in (one, two)]
    for a, b in zip(*pixels):
        assert_same_image_up_to_rounding(a, b)
    assert np.abs(pixels[1][0] - pixels[1][1]).max() > 10  # different seeds: different images
