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
