"""The side-by-side benchmark against diffusers runs end to end (tiny model, one repeat): its table
has every task, positive times, and the CPU memory column from the child processes."""
import re

import pytest

from benchmarks import bench_vs_diffusers


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


def test_bench_train_quick_table(capsys):
    """The training-step benchmark end to end on the tiny model, each configuration in its own
    process: every row has a positive time and a peak that the breakdown adds up to."""
    from benchmarks import bench_train
    rows = bench_train.main(["--quick", "--steps", "1", "--configs",
                             "diffusers,minidb,low_memory,low_memory_exact,bf16_kahan"])
    assert [r["config"] for r in rows] == ["diffusers", "minidb", "low_memory", "low_memory_exact", "bf16_kahan"]
    for r in rows:
        assert r["step_s"] > 0 and r["peak"] > 0 and r["weights"] > 0 and r["grads"] > 0
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
