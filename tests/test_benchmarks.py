"""The side-by-side benchmark against diffusers runs end to end (tiny model, one repeat): its table
has every task, positive times, and the CPU memory column from the child processes."""
import re

import pytest
import torch

from benchmarks import bench_vs_diffusers

CUDA = torch.cuda.is_available()


@pytest.mark.slow  # each configuration in its own process: `.ci/run` runs it with `-m slow`
def test_bench_vs_diffusers_tiny_table(capsys):
    bench_vs_diffusers.main(["--size", "tiny", "--res", "16", "--steps", "1", "--repeats", "1", "--device", "cpu",
                             "--memory"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| (text encoder|UNet step|VAE decode|txt2img \(1 steps\)) \| ([\d.]+) ms \| ([\d.]+) ms \| "
                      r"\*\*([\d.]+)\*\* \| (\S+)(?: MiB)? \| (\S+)(?: MiB)? \|$", out, flags=re.M)
    assert [r[0] for r in rows] == ["text encoder", "UNet step", "VAE decode", "txt2img (1 steps)"], out
    for _, ours, theirs, ratio, *_ in rows:
        assert float(ours) > 0 and float(theirs) > 0
        assert float(ratio) > 0
    assert rows[-1][4].isdigit() and rows[-1][5].isdigit()  # peak RSS of each side, from its own process


def test_bench_vs_diffusers_rejects_bad_res(capsys):
    with pytest.raises(SystemExit) as e:
        bench_vs_diffusers.main(["--size", "tiny", "--res", "20", "--device", "cpu"])
    assert e.value.code == 2 and "multiple of 8" in capsys.readouterr().err


@pytest.mark.slow  # each configuration in its own process: `.ci/run` runs it with `-m slow`
def test_bench_train_quick_table(capsys):
    """The training-step benchmark end to end on the tiny model, each configuration in its own
    process: every row has a positive time and a peak that the breakdown adds up to."""
    from benchmarks import bench_train
    rows = bench_train.main(["--quick", "--steps", "1", "--configs",
                             "diffusers,minidb,low_memory,low_memory_exact,bf16_kahan"])
    assert [r["config"] for r in rows] == ["diffusers", "minidb", "low_memory", "low_memory_exact", "bf16_kahan"]
    for r in rows:
        assert r["step_s"] > 0 and r["peak"] > 0 and r["weights"] > 0 and r["grads"] > 0
        assert CUDA or 0 < r["optimizer_s"] < r["step_s"]  # the update is part of the step
        assert r["weights"] + r["grads"] + r["state"] + r["rest"] == r["peak"]
    diffusers, minidb, low, kahan = rows[0], rows[1], rows[2], rows[4]
    assert minidb["weights"] == pytest.approx(diffusers["weights"], rel=0.01)  # the same models (+ a few buffers)
    assert low["state"] < 0.5 * minidb["state"]        # 8-bit moments (tiny: many tensors stay fp32)
    assert low["grads"] < minidb["grads"]              # fused: one tensor's gradient at a time
    assert kahan["weights"] == pytest.approx(minidb["weights"] / 2, rel=0.01)  # bf16, and no fp32 masters
    out = capsys.readouterr().out
    assert "| low_memory_exact |" in out and "DreamBooth training step" in out


def test_bench_train_rejects_unknown_config(capsys):
    from benchmarks import bench_train
    with pytest.raises(SystemExit) as e:
        bench_train.main(["--quick", "--configs", "minidb,fast"])
    assert e.value.code == 2 and "unknown configuration" in capsys.readouterr().err


def test_bench_optimizer_quick_table(capsys):
    """The optimizer benchmark end to end on the tiny model's weights: every configuration that can run
    here has a positive time and the state it should (8 bytes per weight for AdamW, about 2 for the
    8-bit one); the kernel row says why it did not run on a CPU, the C loop's why not on a GPU."""
    from benchmarks import bench_optimizer
    from minidb.kernels import adamw8bit_cpu
    rows = bench_optimizer.main(["--quick", "--steps", "1"])
    by = {r["config"]: r for r in rows}
    c_loop = {"adamw8bit_c"} if adamw8bit_cpu.unavailable() is None else set()
    assert set(by) == ({"adamw", "adamw_fused", "adamw8bit", "adamw8bit_kernel"} if CUDA else
                       {"adamw", "adamw_fused", "adamw8bit"} | c_loop)
    for r in rows:
        assert r["seconds"] > 0 and r["finite"]
    assert by["adamw"]["state_bytes"] == pytest.approx(8 * by["adamw"]["weights"], rel=1e-3)  # + a step per tensor
    assert 2.0 < by["adamw8bit"]["state_bytes"] / by["adamw8bit"]["weights"] < 4.0  # tiny: many small fp32 tensors
    out = capsys.readouterr().out
    assert "| adamw8bit |" in out and "Optimizer step" in out
    if not CUDA:
        assert "| adamw8bit_kernel | not run: CUDA only" in out
    else:
        assert "| adamw8bit_c | not run: fp32 CPU tensors only" in out
    if c_loop:
        assert by["adamw8bit_c"]["state_bytes"] == by["adamw8bit"]["state_bytes"]
    with pytest.raises(SystemExit) as e:
        bench_optimizer.main(["--quick", "--configs", "adamw,sgd"])
    assert e.value.code == 2 and "unknown" in capsys.readouterr().err
