"""The run folder survives what users and machines do to it: two writers at once, a resume from an
older step, torn files, a full disk, text in foreign encodings, hostile training states, and a
SIGKILL at any moment. User errors are typed as a user would (subprocesses) and end in one line,
exit status 2, nothing written."""
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from helpers import dreambooth_world
from minidb.dreambooth import checkpoint as ck
from minidb.errors import DataError
from minidb.files import atomic_write, atomic_write_text, read_text
from minidb.dreambooth.train import train, warn_long_prompts
from minidb.dreambooth.train_config import dump_toml, load_config
from minidb.dreambooth.train_options import caption_for
from minidb.weights import write_tensors


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return dreambooth_world(tmp_path_factory.mktemp("run_folder"))


def sets(world, out, *more):
    return [f"model.base={world / 'base.safetensors'}", f"data.instance_dir={world / 'instance'}",
            "data.instance_prompt=a photo of sks dog", "data.resolution=32", f"train.output_dir={out}",
            "train.steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=10", "optim.lr=1e-3",
            "model.train_text_encoder=false", *more]


def config(world, out, *more):
    return load_config(None, sets(world, out, *more))


def toml(world, tmp_path, out, *more) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(dump_toml(config(world, out, *more)), encoding="utf-8")
    return path


def minidb(*args, env=None, timeout=300):
    """The command line as a user types it; bytes arguments pass through as they are."""
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1", **(env or {}))
    environ.pop("MINIDB_CKPT", None)
    argv = [sys.executable, "-m", "minidb", *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, env=environ, timeout=timeout)


def one_line_error(proc, command: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith(f"minidb {command}: error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[-1].removeprefix(f"minidb {command}: error: ")


def snapshot(folder: Path) -> dict:
    """Every file under folder with its size, mode and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*.tmp")]


def same_model(a: Path, b: Path) -> bool:
    """Bit-identical tensors and equal metadata (safetensors orders its header's keys as it likes)."""
    from safetensors import safe_open
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        return (fa.metadata() == fb.metadata() and set(fa.keys()) == set(fb.keys())
                and all(torch.equal(fa.get_tensor(k).view(torch.uint8), fb.get_tensor(k).view(torch.uint8))
                        for k in fa.keys()))


def metric_steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ---- 1. one writer per run folder --------------------------------------------------------------

HELD = """
import sys, time
from pathlib import Path
from minidb.dreambooth import run as run_module
from minidb.dreambooth.train import train
from minidb.dreambooth.train_config import load_config
go, sets = Path(sys.argv[1]), sys.argv[2:]
log_metrics = run_module.Run.log_metrics
def held(self, metrics):  # the first run stops after step 2 until the test says go
    log_metrics(self, metrics)
    if metrics["step"] == 2:
        (go.parent / "at_step_2").touch()
        while not go.exists():
            time.sleep(0.05)
run_module.Run.log_metrics = held
train(load_config(None, sets))
"""


@pytest.mark.slow  # two training processes: .ci/run runs it
def test_two_writers_second_is_refused_and_first_is_unharmed(world, tmp_path):
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    (tmp_path / "alone_go").mkdir()  # the run alone, in the same kind of process (threads change the rounding)
    (tmp_path / "alone_go" / "go").touch()
    subprocess.run([sys.executable, "-c", HELD, str(tmp_path / "alone_go" / "go"), *sets(world, alone)], env=env,
                   check=True, capture_output=True)
    first = subprocess.Popen([sys.executable, "-c", HELD, str(tmp_path / "go"), *sets(world, shared)], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "at_step_2").exists():
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else "slow"
            time.sleep(0.1)
        before = snapshot(shared)
        for args in (["--config", toml(world, tmp_path, shared)], ["--resume", shared]):  # a requeue, a resume
            error = one_line_error(minidb("train", *args), "train")
            assert error == (f"{shared} is in use by another minidb train (process {first.pid} on "
                             f"{socket.gethostname()}): wait for it to end or stop it, or choose another "
                             "train.output_dir")
            assert snapshot(shared) == before  # touched nothing
        (tmp_path / "go").touch()
        assert first.wait(timeout=240) == 0, first.stderr.read()
    finally:
        first.kill()
        first.wait()
    assert same_model(shared / "model.safetensors", alone / "model.safetensors")
    assert metric_steps(shared) == [1, 2, 3, 4]
    assert not temporaries(shared)
    # the lock went with the process: the folder is free again
    proc = minidb("train", "--resume", shared)
    assert proc.returncode == 0 and "already finished" in proc.stdout, proc.stderr


def test_temporary_names_are_unique_and_dead_writers_are_swept(world, tmp_path):
    with atomic_write(tmp_path / "a.pt") as one, atomic_write(tmp_path / "a.pt") as two:
        assert one != two and one.name.startswith("a.pt.") and one.name.endswith(".tmp")
        one.write_bytes(b"1")
        two.write_bytes(b"2")
    out = tmp_path / "run"
    train(config(world, out, "train.steps=1"))
    (out / "checkpoints" / "step_000002.pt.999-abcdef.tmp").write_bytes(b"half")  # writers killed mid-write
    (out / ".model.safetensors.998-012345.tmp").write_bytes(b"half")
    (out / "samples").mkdir()
    (out / "samples" / ".step_000002.png.997-fedcba.tmp").write_bytes(b"half")
    train(config(world, out, "train.steps=2"), resume="latest")
    assert not temporaries(out)


# ---- 2. branches -----------------------------------------------------------------------------------

def test_resume_from_an_older_step_sets_the_newer_branch_aside(world, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(world, out, "train.steps=6"))
    old_six = (out / "checkpoints" / "step_000006.pt").read_bytes()
    old_model = (out / "model.safetensors").read_bytes()
    capsys.readouterr()
    cfg = config(world, out, "train.steps=6", "optim.lr=1e-5")
    train(cfg, resume=str(out / "checkpoints" / "step_000004.pt"))
    said = [line for line in capsys.readouterr().err.splitlines() if "new branch" in line]
    aside, = (out / "checkpoints").glob("abandoned-000004-*")
    assert said == [f"resuming from step 4, before the folder's newest state (step 6): a new branch; the later "
                    f"states, model and grids moved to {aside}"]
    assert sorted(p.name for p in aside.iterdir()) == ["model.safetensors", "step_000005.pt", "step_000006.pt"]
    assert (aside / "step_000006.pt").read_bytes() == old_six and (aside / "model.safetensors").read_bytes() == old_model
    new_six = ck.load_state(ck.latest_checkpoint(out / "checkpoints"))  # latest follows the new branch
    assert new_six["step"] == 6 and new_six["config"]["optim"]["lr"] == 1e-5
    assert metric_steps(out) == [1, 2, 3, 4, 5, 6]


# ---- 3. torn files -----------------------------------------------------------------------------------

def test_a_torn_metrics_line_is_dropped_with_one_warning(world, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(world, out, "train.steps=2"))
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.1')  # a kill or a full disk mid-line
    capsys.readouterr()
    train(config(world, out, "train.steps=4"), resume="latest")
    warned = [line for line in capsys.readouterr().err.splitlines() if "unreadable line" in line]
    assert warned == [f"warning: {out / 'metrics.jsonl'}: dropped 1 unreadable line(s) (3), cut short by a kill, "
                      "power cut or full disk"]
    assert metric_steps(out) == [1, 2, 3, 4]


def test_a_corrupt_newest_state_names_itself_and_the_newest_good_one(world, tmp_path):
    out = tmp_path / "run"
    train(config(world, out, "train.steps=3"))
    newest = out / "checkpoints" / "step_000003.pt"
    newest.write_bytes(newest.read_bytes()[:5000])  # torn by a power cut on a file system without ordering
    for how in (["--resume", out], ["--config", toml(world, tmp_path, out), "--resume", "latest"]):
        error = one_line_error(minidb("train", *how), "train")
        assert error.startswith(f"{newest}: not a readable training checkpoint (")
        good = out / "checkpoints" / "step_000002.pt"
        assert error.endswith(f"; the newest readable checkpoint is {good}: continue from it with --resume {good}")


# ---- 4. full disk: every kind of write --------------------------------------------------------------

FULL = """
import errno, sys
import PIL.Image, safetensors.torch, torch
from minidb.dreambooth import run as run_module
from minidb.cli import main
what, argv = sys.argv[1], sys.argv[2:]
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
if what == "state":      # torch's zip writer wraps the OSError into a RuntimeError: the real thing
    real = torch.save
    def save(obj, f, *a, **k):
        if hasattr(f, "write") and "step_000002" in str(getattr(f, "name", "")):
            class Full:
                def write(self, b): raise OSError(errno.ENOSPC, "No space left on device")
                def flush(self): pass
            return real(obj, Full(), *a, **k)
        return real(obj, f, *a, **k)
    torch.save = save
elif what == "export":
    import minidb.weights.files as weights_files
    def write_safetensors(tmp, *a, **k):  # the disk fills up part-way through the tensors
        with open(tmp, "wb") as f:
            f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    weights_files._write_safetensors = write_safetensors
elif what == "metrics":
    open_ = run_module.Run.open
    def opened(self, step):
        open_(self, step)
        real_write = self.metrics_file.write
        def write(text):
            if '"step": 3' in text: raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(text)
        self.metrics_file.write = write
        return self
    run_module.Run.open = opened
elif what in ("png", "grid"):
    real_save = PIL.Image.Image.save
    def save(self, fp, *a, **k):
        real_save(self, fp, *a, **k)
        with open(fp, "r+b") as f:
            f.truncate(0)  # nothing got onto the disk
        raise OSError(errno.ENOSPC, "No space left on device")
    PIL.Image.Image.save = save
sys.exit(main(argv))
"""


def full_disk(what, *argv):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", FULL, what, *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.parametrize("what", ["state", "export", "metrics", "grid"])
def test_a_full_disk_during_training_is_one_line_and_leaves_no_partial_file(world, tmp_path, what):
    out = tmp_path / "run"
    more = ["validation.prompts=['a photo of sks dog']", "validation.every=2", "validation.sample_steps=2"] \
        if what == "grid" else []
    proc = full_disk(what, "train", "--config", toml(world, tmp_path, out, *more))
    error = one_line_error(proc, "train")
    expected = {
        "state": f"{out / 'checkpoints' / 'step_000002.pt'}: No space left on device; no step_000002.pt was written, "
                 f"and no partial file left; the newest complete checkpoint is {out / 'checkpoints' / 'step_000001.pt'}"
                 ": free some space, then continue with --resume latest",
        "export": f"{out / 'model.safetensors'}: No space left on device; no model.safetensors was written, and no "
                  "partial file left",
        "metrics": f"{out / 'metrics.jsonl'}: No space left on device; the lines of earlier steps are kept, the newest "
                   f"complete checkpoint is {out / 'checkpoints' / 'step_000002.pt'}",
        "grid": f"{out / 'samples' / 'step_000002.png'}: No space left on device; no step_000002.png was written, and "
                "no partial file left",
    }[what]
    assert error == expected
    assert not temporaries(out)
    assert not [p for p in out.rglob("*") if p.is_file() and p.stat().st_size == 0 and p.name != ".lock"]
    assert metric_steps(out)  # what was kept stays readable


def test_a_full_disk_while_sampling_leaves_no_empty_png(world, tmp_path):
    proc = full_disk("png", "sample", "--ckpt", world / "base.safetensors", "--prompt", "a dog", "--steps", "1",
                     "--outdir", tmp_path / "o", "--no-progress", "--seed", "0")
    assert one_line_error(proc, "sample") == (f"{tmp_path / 'o' / 'samples' / '00000.png'}: No space left on device; "
                                              "no 00000.png was written, and no partial file left")
    assert [p.name for p in (tmp_path / "o").rglob("*") if p.is_file()] == []


def test_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        write_tensors(tmp_path / "model.safetensors", {"w": torch.ones(2)})
        ck.save_state(tmp_path / "step_000001.pt", {"step": 1})
        atomic_write_text(tmp_path / "result.json", "{}")
    finally:
        os.umask(old)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {
        "model.safetensors": "0o644", "step_000001.pt": "0o644", "result.json": "0o644"}


# ---- 5. encodings --------------------------------------------------------------------------------

def test_text_files_are_utf8_with_an_optional_bom(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufeffa photo of sks dog, café".encode("utf-8"))
    assert read_text(tmp_path / "a.txt") == "a photo of sks dog, café"
    (tmp_path / "b.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"b.txt: is not UTF-8 text \(byte 0xe9 at offset 3, perhaps Latin-1 or "
                                        r"another legacy encoding\): save it as UTF-8$"):
        read_text(tmp_path / "b.txt", DataError)
    (tmp_path / "c.txt").write_text("a dog", encoding="utf-16")
    with pytest.raises(DataError, match="c.txt: is UTF-16 text; minidb reads UTF-8: save it as UTF-8"):
        read_text(tmp_path / "c.txt", DataError)


def test_a_bom_in_a_caption_no_longer_reaches_the_tokens(tmp_path):
    from minidb.tokenizer import CLIPTokenizer
    (tmp_path / "a.txt").write_bytes(b"\xef\xbb\xbfa photo of sks dog")
    caption = caption_for(tmp_path / "a.png", "unused")
    assert caption == "a photo of sks dog"
    assert CLIPTokenizer()([caption])[0, :2].tolist() == [49406, 320]  # "a", not the BOM's bytes


def test_caption_files_match_case_insensitively(tmp_path):
    (tmp_path / "a.TXT").write_text("a photo of sks dog on a beach")
    assert caption_for(tmp_path / "a.png", "default") == "a photo of sks dog on a beach"


def test_bad_encodings_from_the_command_line(world, tmp_path):
    latin = world.parent / f"{world.name}_latin"
    instance = latin / "instance"
    instance.mkdir(parents=True)
    for p in (world / "instance").iterdir():
        (instance / p.name).write_bytes(p.read_bytes())
    (instance / "0.txt").write_bytes("a photo of sks dog in a café".encode("latin-1"))
    out = tmp_path / "run"
    proc = minidb("train", "--config", toml(world, tmp_path, out, f"data.instance_dir={instance}"))
    assert one_line_error(proc, "train") == (f"{instance / '0.txt'}: is not UTF-8 text (byte 0xe9 at offset 27, "
                                             "perhaps Latin-1 or another legacy encoding): save it as UTF-8")
    assert not out.exists()
    config_file = toml(world, tmp_path, out)
    config_file.write_text(config_file.read_text(), encoding="utf-16")
    assert one_line_error(minidb("train", "--config", config_file), "train") == (
        f"{config_file}: is UTF-16 text; minidb reads UTF-8: save it as UTF-8")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a dog in a café\n".encode("cp1252"))
    proc = minidb("sample", "--ckpt", world / "base.safetensors", "--from-file", prompts, "--outdir", tmp_path / "o")
    assert one_line_error(proc, "sample").startswith(f"{prompts}: is not UTF-8 text (byte 0xe9 at offset 14")
    proc = minidb("sample", "--ckpt", world / "base.safetensors", "--prompt", b"a dog in a caf\xe9", "--outdir",
                  tmp_path / "o")
    assert one_line_error(proc, "sample") == ("--prompt 'a dog in a caf\ufffd' holds bytes that are not UTF-8 text "
                                              "(position 14): pass it as UTF-8")
    assert not (tmp_path / "o").exists()


def test_a_bom_in_the_config_file_is_read_past(world, tmp_path):
    path = toml(world, tmp_path, tmp_path / "run")
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_config(path).data.instance_prompt == "a photo of sks dog"


# ---- 6. hostile training states -------------------------------------------------------------------

class _RunsCode:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_state_with_a_pickle_payload_is_refused_in_one_line(world, tmp_path, protocol):
    out = tmp_path / "run"
    marker = tmp_path / "ran"
    (out / "checkpoints").mkdir(parents=True)
    evil = out / "checkpoints" / "step_000001.pt"
    torch.save({"format": "minidb-dreambooth-state", "version": 1, "x": _RunsCode(marker)}, evil,
               pickle_protocol=protocol)
    error = one_line_error(minidb("train", "--resume", evil), "train")
    assert error.startswith(f"{evil}: ")
    assert ("refused to unpickle: it asks for posix.system, which could run arbitrary code" in error if protocol == 2
            else "holds objects other than tensors and plain containers, which minidb does not unpickle" in error)
    assert "weights_only" not in error and not marker.exists()


# ---- 7. validation --------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, message", [
    ("prior.loss_weight=nan", "prior.loss_weight must be a finite number >= 0, got nan"),
    ("prior.loss_weight=-1", "prior.loss_weight must be a finite number >= 0, got -1.0"),
    ("train.seed=-1", "train.seed must be an integer from 0 to 2147483647, got -1"),
    ("validation.seed=18446744073709551616", "validation.seed must be an integer from 0 to 2147483647, got "
                                             "18446744073709551616"),
])
def test_bad_numbers_are_one_line(world, tmp_path, setting, message):
    out = tmp_path / "run"
    proc = minidb("train", "--config", toml(world, tmp_path, out, "prior.class_prompt=a photo of a dog"),
                  "--set", setting)
    assert one_line_error(proc, "train") == message
    assert not out.exists()


def test_sample_seed_out_of_range(world, tmp_path):
    for seed in ("-1", str(2 ** 64)):
        proc = minidb("sample", "--ckpt", world / "base.safetensors", "--prompt", "x", "--seed", seed, "--outdir",
                      tmp_path / "o")
        assert one_line_error(proc, "sample") == f"--seed must be an integer from 0 to 2147483647, got {seed}"
    assert not (tmp_path / "o").exists()


# ---- 9. long prompts in training ---------------------------------------------------------------------

def test_training_prompts_over_77_tokens_warn_naming_their_source(world, tmp_path):
    long = " ".join(["a photo of sks dog"] * 20)
    (tmp_path / "0.png").touch()
    (tmp_path / "0.txt").write_text(long)
    cfg = config(world, tmp_path / "run", f"validation.prompts=['{long} on the moon']")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warn_long_prompts(cfg, [(tmp_path / "0.png", None)])
    said = [str(w.message) for w in seen]
    assert len(said) == 2
    assert said[0].startswith(f"caption file {tmp_path / '0.txt'}: prompt truncated to CLIP's 77 tokens (102 with "
                              "start and end), the rest is ignored: 'a photo of sks dog")
    assert said[1].startswith("validation.prompts: prompt truncated")


# ---- the kill-anywhere test -------------------------------------------------------------------------

def owner_started(proc, folder: Path, timeout=240) -> bool:
    """Wait until `proc` holds the run folder's lock (its pid in .lock); False if it ended first."""
    lock, deadline = folder / ".lock", time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the run did not start"
        try:
            if lock.read_text().split()[:1] == [str(proc.pid)]:
                return True
        except OSError:
            pass
        time.sleep(0.005)
    return False


@pytest.mark.slow
def test_killed_anywhere_the_run_ends_as_if_never_killed(world, tmp_path):
    """SIGKILL at >= 20 pseudo-random moments of runs with a checkpoint every step (during steps,
    state writes and the export), `--resume latest` after each, until the run ends by itself: its
    exported model is bit-identical to an uninterrupted run's, metrics.jsonl has one line per step,
    no temporary file remains. When a run ends before 20 kills, another episode starts in a fresh folder."""
    steps = 8
    more = [f"train.steps={steps}", "train.keep_checkpoints=2"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), OMP_NUM_THREADS="1")

    def start(folder, resume):
        args = ["--config", toml(world, tmp_path, folder, *more)] + (["--resume", "latest"] if resume else [])
        return subprocess.Popen([sys.executable, "-m", "minidb", "train", *map(str, args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    alone = tmp_path / "alone"
    proc = start(alone, False)
    assert owner_started(proc, alone)
    began = time.monotonic()
    assert proc.wait(timeout=600) == 0, proc.stderr.read()
    window = time.monotonic() - began  # from taking the folder to the end: load, steps, writes, export

    rng = random.Random(0)
    kills, runs, episodes, moments = 0, 0, 0, []
    while kills < 20:
        folder = tmp_path / f"killed{episodes}"
        episodes += 1
        while True:
            proc = start(folder, (folder / "checkpoints").is_dir())
            runs += 1
            if owner_started(proc, folder):
                delay = rng.uniform(0, window)
                time.sleep(delay)
                if proc.poll() is None:
                    writing = sorted(p.name for p in folder.rglob("*.tmp"))
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    moments.append((round(delay, 2), len(metric_steps(folder)) if (folder / "metrics.jsonl").is_file()
                                    else 0, writing))
                    continue
            _, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, err
            break
        assert same_model(folder / "model.safetensors", alone / "model.safetensors")
        assert metric_steps(folder) == list(range(1, steps + 1))
        assert not temporaries(folder)
    print(f"{kills} kills in {runs} runs, {episodes} episode(s); at each kill (delay s, metrics lines, temporary "
          f"files being written): {moments}")
