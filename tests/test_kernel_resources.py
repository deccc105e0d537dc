"""The Triton kernels compile for A100 (sm_80), L4/RTX 4090 (sm_89) and H100 (sm_90), fit their
shared memory and do not spill: on the CPU, with no GPU and no interpreter.

benchmarks/kernel_resources.py plans every attention launch of SD v1 with minidb's own host code,
compiles each ahead of time for each target with Triton's bundled ptxas, and takes the config the
launch would run there (the first that fits the target's shared memory). This test runs it in a
fresh process (this one has TRITON_INTERPRET=1, and interpreted kernels cannot be compiled),
prints its table and checks every row. The interpreter tests (test_kernels.py) check the arithmetic.
Marked slow (about 3.5 CPU-minutes of compiling: ~100 s on 2 cores); .ci/run runs it after the suite.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.kernel_resources import OPTIMIZER, OPTIMIZER_VARIANTS, TARGETS, spills_in_loops

ROOT = Path(__file__).resolve().parent.parent
# Spills allowed, per thread: none inside a loop, where each iteration would pay them, and at most
# this many bytes outside. There ptxas parks a few values that live across the loop (addresses,
# row masks) in local memory: a store before the loop and a load after it, once per program,
# served by L1, next to a loop that streams tiles of tens of KB per iteration.
SPILL_BYTES = 32


def ptxas_missing() -> str | None:
    """Why the kernels cannot be compiled here, or None."""
    try:
        from triton import knobs
    except ImportError as e:
        return f"triton not installed ({e})"
    for name in ("ptxas", "ptxas_blackwell"):   # sm_80, sm_89; sm_90 (triton/backends/nvidia/compiler.py)
        try:
            getattr(knobs.nvidia, name)             # its path, or RuntimeError("Cannot find ptxas")
        except RuntimeError:
            setting = type(knobs.nvidia).__dict__[name]
            return f"triton's bundled {setting.binary} is missing ({setting.default_path}; or set {setting.key})"
    return None


def kernel_resources(*args) -> tuple[str, list[dict]]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--json", *args], cwd=ROOT,
                         env=env, capture_output=True, text=True, check=True).stdout.splitlines()
    return out[0], [json.loads(line) for line in out[1:]]


@pytest.mark.slow
@pytest.mark.skipif(ptxas_missing() is not None, reason=str(ptxas_missing()))
def test_every_sd_launch_compiles_fits_and_does_not_spill(capsys):
    from benchmarks.kernel_resources import optimizer_table, table
    versions, rows = kernel_resources()
    optimizer = [r for r in rows if r["kernel"] == OPTIMIZER]
    rows = [r for r in rows if r["kernel"] != OPTIMIZER]
    with capsys.disabled():
        print(f"\n{versions}\n" + "\n".join(table(rows) + optimizer_table(optimizer)))
    # 3 targets x fp16, bf16 x 9 SD shapes x (forward, preprocess, dK/dV, dQ)
    assert len(rows) == len(TARGETS) * 2 * 9 * 4
    # and the fused 8-bit AdamW step: 3 targets x (fp32, bf16 with and without compensation); no loop
    assert len(optimizer) == len(TARGETS) * len(OPTIMIZER_VARIANTS)
    for r in optimizer:
        where = f"{r['target']} adamw8bit {r['dtype']}"
        assert "error" not in r, f"{where}: {r.get('error')}"
        assert r["shared"] <= r["limit"] and r["spill_stores"] + r["spill_loads"] == 0, where
    for r in rows:
        where = f"{r['target']} {r['dtype']} {r['shape']} {r['kernel']} {r['config']}"
        assert "error" not in r, f"{where}: {r.get('error')}"
        assert r["shared"] <= r["limit"], where
        spilled = f"{where}: spills {r['spill_stores']}/{r['spill_loads']} B, {r['spills_in_loops']} in a loop"
        assert r["spills_in_loops"] == 0, spilled
        assert r["spill_stores"] <= SPILL_BYTES and r["spill_loads"] <= SPILL_BYTES, spilled
    # flash._first_fit remembers the row that fitted per (kernel, head-dim block, dtype, device),
    # across shapes: that is only right if every shape sharing the key fits at the same row.
    chosen = {}
    for r in rows:
        chosen.setdefault((r["target"], r["dtype"], r["remember"]), set()).add(r["row"])
    assert all(len(v) == 1 for v in chosen.values()), {k: v for k, v in chosen.items() if len(v) > 1}


def test_spills_in_loops_counts_only_inside_a_loop():
    sass = "\n".join(["Function:k", "--:-:-:-:1\tSTL [R1+0x8], R4;", "LBB1:", "--:-:-:-:1\tLDL R2, [R1+0x8];",
                      "--:-:-:-:1\tHMMA.16816.F32 R8, R12, R14, R8;", "--:-:-:-:5\t@!P5 BRA LBB1;",
                      "--:-:-:-:1\tLDL.LU.64 R2, [R1];", "--:-:-:-:5\t@P0 BRA LBB2;", "LBB2:", "EXIT;"])
    assert spills_in_loops(sass) == 1   # the LDL between LBB1 and the branch back to it
    assert spills_in_loops(sass.replace("BRA LBB1", "BRA LBB2")) == 0   # a forward branch is no loop
