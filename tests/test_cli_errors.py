"""Every way a user can get the command line wrong ends in one line on stderr, `minidb CMD: error:
...`, exit status 2, before anything is loaded or written. Run as subprocesses, as typed."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from helpers import dreambooth_world
from minidb.dreambooth.train_config import dump_toml, load_config


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return dreambooth_world(tmp_path_factory.mktemp("cli_errors"))


def minidb(*args, cwd=None, **env):
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    environ.pop("MINIDB_CKPT", None)
    return subprocess.run([sys.executable, "-m", "minidb", *map(str, args)], capture_output=True, text=True,
                          env=environ, cwd=cwd, timeout=120)


def one_line_error(proc, command: str) -> str:
    """The single line of stderr (exit status 2, no traceback), without its `minidb CMD: error: ` prefix."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"minidb {command}: error: "), proc.stderr
    return lines[0].removeprefix(f"minidb {command}: error: ")


def run_toml(world, tmp_path, **changes) -> str:
    """A run's config file: the tiny world, 1 step, and `changes` ({"train.output_dir": ...})."""
    sets = [f"model.base={world / 'base.safetensors'}", f"data.instance_dir={world / 'instance'}",
            "data.instance_prompt=a photo of sks dog", f"train.output_dir={tmp_path / 'run'}", "train.steps=1"]
    sets += [f"{k}={v}" for k, v in changes.items()]
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(load_config(None, sets)))
    return path


# ---- minidb sample ---------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--scale", "nan"], "--scale must be a number >= 0 (1 = no guidance, 0 = unconditional), got nan"),
    (["--scale", "-3"], "--scale must be a number >= 0 (1 = no guidance, 0 = unconditional), got -3.0: a negative "
                        "scale steers away from the prompt"),
    (["--eta", "nan"], "--eta must be >= 0"),
    (["--device", "bogus"], "--device 'bogus' is not a device"),
])
def test_sample_bad_arguments(world, tmp_path, args, message):
    proc = minidb("sample", "--ckpt", world / "base.safetensors", "--prompt", "x", "--outdir", tmp_path / "o", *args)
    assert message in one_line_error(proc, "sample")
    assert not (tmp_path / "o").exists()


def test_argument_syntax_errors_are_one_line_too():
    error = one_line_error(minidb("sample", "--prompt", "x", "--steps", "many"), "sample")
    assert error == "argument --steps: invalid int value: 'many' (see minidb sample --help)"
    assert one_line_error(minidb("train", "--frobnicate"), "train") == ("unrecognized arguments: --frobnicate "
                                                                        "(see minidb train --help)")


def test_world_commands_on_a_device_that_is_not_one(tmp_path):
    """minidb eval and the world's pretraining check --device before they load or write anything."""
    proc = minidb("eval", "--device", "gpu0", "--out", tmp_path / "eval.json")
    assert one_line_error(proc, "eval") == "--device 'gpu0' is not a device (cpu, cuda, cuda:1, mps, ...)"
    proc = subprocess.run([sys.executable, "-m", "minidb.world.pretrain", "--out", tmp_path / "run", "--device", "gpu0"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "python -m minidb.world.pretrain: error: --device 'gpu0' is not a device (cpu, cuda, cuda:1, mps, ...)"]
    assert list(tmp_path.iterdir()) == []


def test_sample_on_a_missing_cuda_device(world, tmp_path):
    # without CUDA (CI): "cuda" itself; with it, a device index past the last one
    device = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    proc = minidb("sample", "--ckpt", world / "base.safetensors", "--prompt", "x", "--device", device,
                  "--outdir", tmp_path / "o")
    error = one_line_error(proc, "sample")
    assert error.startswith(f"--device {device}: ") and ("--device cpu" in error or "CUDA device(s)" in error)


def test_sample_steps_past_the_schedule_fail_before_loading(world, tmp_path):
    proc = minidb("sample", "--ckpt", world / "base.safetensors", "--prompt", "x", "--steps", "2000",
                  "--outdir", tmp_path / "o")
    assert one_line_error(proc, "sample") == ("--steps must be an integer from 1 to 1000 (the model's timesteps), "
                                              "got 2000")
    assert not (tmp_path / "o").exists()  # and no "loading ..." line: one_line_error saw one line only


def test_sample_ckpt_that_is_a_folder(tmp_path):
    (tmp_path / "models").mkdir()
    proc = minidb("sample", "--ckpt", tmp_path / "models", "--prompt", "x")
    assert one_line_error(proc, "sample") == (f"{tmp_path / 'models'} is a folder: pass the checkpoint file in it "
                                              "(.safetensors or .ckpt)")


def test_unknown_attention_backend(world, tmp_path):
    proc = minidb("sample", "--ckpt", world / "base.safetensors", "--prompt", "x", "--outdir", tmp_path / "o",
                  MINIDB_ATTENTION="bogus")
    assert one_line_error(proc, "sample") == ("MINIDB_ATTENTION='bogus' is not an attention backend: set it to one "
                                              "of auto, sdpa, math, triton, or unset it (auto)")


def test_file_system_errors_are_one_line(world, tmp_path):
    """An OSError about the user's files is one line (here the output folder's parent is a file,
    which the file system reports when the samples folder is made)."""
    (tmp_path / "notes.txt").write_text("not a folder")
    proc = minidb("sample", "--ckpt", world / "base.safetensors", "--prompt", "x", "--outdir",
                  tmp_path / "notes.txt" / "o", "--steps", "1", "--no-progress")
    error = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert error == f"minidb sample: error: {tmp_path / 'notes.txt' / 'o' / 'samples'}: Not a directory"


# ---- minidb train ----------------------------------------------------------------------------------

def test_train_output_dir_that_is_a_file(world, tmp_path):
    (tmp_path / "notes.txt").write_text("not a folder")
    proc = minidb("train", "--config", run_toml(world, tmp_path, **{"train.output_dir": tmp_path / "notes.txt"}))
    assert one_line_error(proc, "train") == (f"train.output_dir: {tmp_path / 'notes.txt'} is a file, not a folder: "
                                             "choose another train.output_dir")


@pytest.mark.slow  # two `minidb train` processes: .ci/run runs it
def test_train_bad_base_writes_nothing_so_the_retry_works(world, tmp_path):
    """The base file is opened and identified before the run folder is written: fixing the path and
    running the same command again is not refused as "holds a different run"."""
    (tmp_path / "base.safetensors").write_text("<!doctype html> a failed download")
    toml = run_toml(world, tmp_path, **{"model.base": tmp_path / "base.safetensors"})
    proc = minidb("train", "--config", toml)
    assert "is an HTML page" in one_line_error(proc, "train")
    assert not (tmp_path / "run").exists()
    wrong_size = run_toml(world, tmp_path, **{"data.resolution": 36})
    assert "data.resolution must be a multiple of 8" in one_line_error(minidb("train", "--config", wrong_size), "train")
    assert not (tmp_path / "run").exists()


def test_train_unknown_lora_targets(world, tmp_path):
    proc = minidb("train", "--config", run_toml(world, tmp_path), "--set", "model.lora_rank=4",
                  "--set", "model.lora_targets=mlp")
    assert "model.lora_targets must be one of attention, transformer, got 'mlp'" in one_line_error(proc, "train")
    assert not (tmp_path / "run").exists()


def test_train_kahan_without_bf16(world, tmp_path):
    """No fp32 masters asked for a run whose precision is not bf16 (here "auto"), and an unknown value."""
    proc = minidb("train", "--config", run_toml(world, tmp_path), "--set", "optim.master_weights=kahan",
                  "--set", "optim.optimizer=adamw8bit")
    assert 'optim.master_weights = "kahan"' in one_line_error(proc, "train")
    assert 'model.precision = "bf16"' in one_line_error(proc, "train")
    assert not (tmp_path / "run").exists()
    proc = minidb("train", "--config", run_toml(world, tmp_path), "--set", "optim.master_weights=fp64")
    assert "optim.master_weights must be one of fp32, kahan, got 'fp64'" in one_line_error(proc, "train")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # `minidb train` processes end to end: .ci/run runs it
def test_train_resume_of_a_missing_folder(tmp_path):
    proc = minidb("train", "--resume", tmp_path / "nope")
    assert one_line_error(proc, "train") == f"--resume {tmp_path / 'nope'}: no such run folder or checkpoint file"
    (tmp_path / "empty").mkdir()
    assert "not a run folder (it has no config.toml)" in one_line_error(minidb("train", "--resume", tmp_path / "empty"),
                                                                          "train")



def test_eval_negative_per_shape(tmp_path):
    proc = minidb("eval", "--per-shape", "-1", "--out", tmp_path / "eval.json")
    assert one_line_error(proc, "eval") == "--images must be >= 1 and --per-shape >= 0"
    assert not (tmp_path / "eval.json").exists()

FAULTS = """
import resource, sys, torch
import minidb, minidb.pipeline, minidb.cli
if sys.argv[1] != "import":
    try:
        minidb.cli.main([sys.argv[1], "--help"] if sys.argv[1] != "cli" else ["--help"])
    except SystemExit:
        pass
def faults():  # pages the kernel maps for one 64 MiB tensor, written once and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(2 ** 24).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[faults() for _ in range(24)])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize("how, opt_out, kept", [("cli", None, True), ("sample", None, True), ("cli", "0", False),
                                                ("import", None, False), ("train", None, False)])
def test_the_command_keeps_freed_memory_for_the_next_step(how, opt_out, kept):
    """`minidb ...` keeps memory the process frees for its next allocations (mallopt), so a training
    step stops re-faulting the pages the last one freed; MINIDB_KEEP_FREED_MEMORY=0 opts out,
    `import minidb` alone changes nothing, and `minidb train` decides only once it has its config
    (bounded in the low-memory modes, minidb.dreambooth.plan.bounded_allocator). Measured as page faults of a 64 MiB tensor made and freed
    24 times: at least 32 every time (2 MiB pages) or 16384 (4 KiB) when freed memory goes back to the
    kernel; none once the heap has grown to hold it when kept (measured: 5 to 8 times 16384, then 0:
    torch's aligned blocks need a few sizes of free heap before one fits again)."""
    env = {k: v for k, v in os.environ.items() if k != "MINIDB_KEEP_FREED_MEMORY"}
    if opt_out is not None:
        env["MINIDB_KEEP_FREED_MEMORY"] = opt_out
    out = subprocess.run([sys.executable, "-c", FAULTS, how], capture_output=True, text=True, env=env, check=True)
    last = [int(n) for n in out.stdout.splitlines()[-1].split()][-4:]  # after --help's text
    if kept:
        assert max(last) < 8, last
    else:
        assert min(last) >= 32, last


BOUNDED = """
import resource, sys, torch
from minidb.dreambooth.allocator import keep_freed_memory
assert keep_freed_memory(bounded=sys.argv[1] == "bounded")
def faults(n, k=1):  # pages the kernel maps for k tensors of n floats, written, then all freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(n).fill_(1.0) for _ in range(k)]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[faults(2 ** 24, 3) for _ in range(24)])  # three 64 MiB blocks at once
print(*[faults(2 ** 26) for _ in range(16)])     # one 256 MiB block
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
@pytest.mark.parametrize("how", ["bounded", "full"])
def test_the_bounded_setting_keeps_only_blocks_under_256_mib(how):
    """The low-memory modes' setting keeps blocks under 256 MiB for reuse (three 64 MiB blocks made and
    freed together: no faults once the heap holds them) but hands a 256 MiB block back to the kernel
    each time (faulted in again: 65536 pages of 4 KiB), where the full setting keeps it too."""
    env = {k: v for k, v in os.environ.items() if k != "MINIDB_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", BOUNDED, how], capture_output=True, text=True, env=env, check=True)
    small, big = ([int(n) for n in line.split()][-4:] for line in out.stdout.splitlines()[-2:])
    assert max(small) < 8, small
    if how == "bounded":
        assert min(big) >= 32, big
    else:
        assert max(big) < 8, big


@pytest.mark.parametrize("sets, expected", [((), False), (("train.low_memory=true",), True),
                                            (("train.fused_backward=lagged",), True),
                                            (("optim.optimizer=adamw8bit", "model.gradient_checkpointing=true"), False)])
def test_train_bounds_the_kept_memory_in_the_low_memory_modes(sets, expected):
    """`minidb train` keeps freed memory fully for the default step and bounded where the fused step
    runs (train.low_memory, train.fused_backward): there a never-trimmed heap fragmented."""
    from minidb.dreambooth.plan import bounded_allocator
    assert bounded_allocator(load_config(None, list(sets))) is expected
