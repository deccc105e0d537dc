"""Training checkpoints: atomic writes (a failure or a kill mid-write leaves the previous one as the
latest, loadable), pruning, RNG state round trips, clear errors on foreign files."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from minidb.dreambooth import checkpoint as ck
from minidb.errors import CheckpointError, DiskFull


def _state(step, n=1000):
    g = torch.Generator().manual_seed(step)
    return {"step": step, "weights": {"unet.w": torch.randn(n, generator=g)}, "rng": [ck.rng_state()]}


def test_round_trip_and_latest(tmp_path):
    for step in (5, 10, 7):
        ck.save_state(ck.checkpoint_path(tmp_path, step), _state(step))
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [5, 7, 10]
    assert ck.latest_checkpoint(tmp_path).name == "step_000010.pt"
    state = ck.load_state(ck.latest_checkpoint(tmp_path))
    assert state["step"] == 10 and torch.equal(state["weights"]["unet.w"], _state(10)["weights"]["unet.w"])
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_a_state_is_mapped_and_its_copied_weights_handed_back(tmp_path):
    """load_state maps the file (a resume holds no second copy of weights and moments); once the weights
    are copied into the model, train() drops them and hands their pages back, the values staying readable."""
    from minidb.dreambooth.train import hand_back_copied
    path = ck.checkpoint_path(tmp_path, 3)
    ck.save_state(path, _state(3, n=1 << 20))
    state = ck.load_state(path)
    w = state["weights"]["unet.w"]
    with open("/proc/self/maps") as f:
        mapped = [line for line in f if line.rstrip().endswith(path.name)]
    spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in mapped]
    assert any(a <= w.data_ptr() and w.data_ptr() + w.nbytes <= b for a, b in spans)  # a view of the file
    copy = w.clone()
    hand_back_copied(state)
    assert "weights" not in state and state["step"] == 3
    assert torch.equal(w, copy)  # handed-back pages of a file mapping refill from the file


def test_prune_keeps_newest(tmp_path):
    for step in range(1, 6):
        ck.save_state(ck.checkpoint_path(tmp_path, step), _state(step, 10))
    (tmp_path / "step_000009.pt.tmp").write_bytes(b"half")
    removed = ck.prune_checkpoints(tmp_path, keep=2)
    assert len(removed) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004.pt", "step_000005.pt"]


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    ck.save_state(tmp_path / "s.pt", {"rng": ck.rng_state()})
    expected = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    ck.set_rng_state(ck.load_state(tmp_path / "s.pt")["rng"])
    again = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_error_inside_write_keeps_previous(tmp_path, monkeypatch):
    good = ck.save_state(ck.checkpoint_path(tmp_path, 1), _state(1))
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)  # half the bytes are out ...
        raise OSError(28, "No space left on device")  # ... when the disk fills up

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(DiskFull, match="step_000002.pt: No space left on device; no step_000002.pt was written"):
        ck.save_state(ck.checkpoint_path(tmp_path, 2), _state(2))
    monkeypatch.undo()
    assert ck.latest_checkpoint(tmp_path) == good
    assert ck.load_state(good)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001.pt"]


def test_process_killed_mid_write_keeps_previous(tmp_path):
    """A real SIGKILL while the second checkpoint's bytes are being made durable (fsync blocks)."""
    script = textwrap.dedent(f"""
        import os, time, torch
        from minidb.dreambooth import checkpoint as ck
        folder = {str(tmp_path)!r}
        ck.save_state(ck.checkpoint_path(folder, 1), {{"step": 1, "w": torch.ones(10)}})
        def stuck(fd):
            open(os.path.join(folder, "writing"), "w").close()
            time.sleep(60)
        os.fsync = stuck
        ck.save_state(ck.checkpoint_path(folder, 2), {{"step": 2, "w": torch.zeros(200000)}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "writing").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "writer ended early"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    half, = tmp_path.glob("step_000002.pt.*.tmp")                      # a uniquely named temporary file
    assert half.stat().st_size > 800000                                 # the half-made file exists ...
    assert ck.latest_checkpoint(tmp_path).name == "step_000001.pt"     # ... but is not the latest
    assert ck.load_state(ck.latest_checkpoint(tmp_path))["step"] == 1
    ck.prune_checkpoints(tmp_path, keep=1)
    assert not half.exists()


def test_foreign_and_broken_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        ck.load_state(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder: pass one of the step_N.pt files"):
        ck.load_state(tmp_path)
    torch.save({"state_dict": {}}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match="not a minidb training checkpoint"):
        ck.load_state(tmp_path / "model.ckpt")
    good = ck.save_state(tmp_path / "step_000001.pt", _state(1))
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="not a readable"):
        ck.load_state(tmp_path / "cut.pt")
