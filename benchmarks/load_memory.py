"""Peak memory of loading a full-size SD v1 checkpoint, as .safetensors and as .ckpt.

    flock /tmp/minidb-bigmem.lock python benchmarks/load_memory.py

Writes a random fp16 checkpoint with every tensor an SD v1 file has (the 1131 model keys plus the
usual non-model buffers, about 2.1 GB) to a temporary folder (deleted after), loads it in a fresh
subprocess with `StableDiffusion.from_checkpoint(path, dtype=...)`, and reports the peak RSS the
load added (ru_maxrss minus the RSS after imports) against the byte size of the loaded tensors.
For comparison, one row loads the same .safetensors with `safetensors.torch.load_file`.
Appends a table to benchmarks/RESULTS.md. `--fp32` adds rows loading into float32. Needs ~2.5 GB of RAM (4.5 GB with --fp32) and 4.5 GB
of disk under $TMPDIR.
"""
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(path: str, dtype: str, how: str):
    """Runs in a fresh interpreter: imports everything, then loads once and reports."""
    import safetensors.torch

    from minidb.pipeline import StableDiffusion
    base = rss_bytes()
    start = time.perf_counter()
    if how == "minidb":
        sd = StableDiffusion.from_checkpoint(path, dtype=getattr(torch, dtype))
        tensors = [*sd.extras.values(), *(t for m in sd.models.values() for t in m.state_dict().values())]
    else:
        tensors = list(safetensors.torch.load_file(path).values())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"loaded": sum(t.nbytes for t in tensors), "added": peak - base, "seconds": seconds}))


def measure(path: str, dtype: str = "float16", how: str = "minidb") -> dict:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", path, dtype, how],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["ratio"] = result["added"] / result["loaded"]
    return result


def sd_v1_tensors(seed: int = 0) -> dict:
    """Random fp16 tensors under every name and shape of an SD v1 checkpoint."""
    from minidb.config import SDConfig
    from minidb.pipeline import StableDiffusion
    from minidb.weights import PREFIXES
    from minidb.weights.sd1 import SCHEDULE_BUFFERS
    sd = StableDiffusion.__new__(StableDiffusion)
    sd._build(SDConfig(), "meta")  # shapes only
    g = torch.Generator().manual_seed(seed)
    tensors = {name: torch.rand(1000, generator=g) for name in SCHEDULE_BUFFERS}
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    for name, model in sd.models.items():
        for key, t in model.state_dict().items():
            tensors[PREFIXES[name] + key] = torch.randn(t.shape, generator=g, dtype=torch.float16)
    return tensors


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    ram = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    return (f"{cpu}, {os.cpu_count()} cores, {ram:.1f} GiB RAM, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def main():
    if sys.argv[1:2] == ["--child"]:  # internal: the measured subprocess
        return child(*sys.argv[2:5])
    fp32 = "--fp32" in sys.argv[1:]  # also load the fp16 files into float32 models

    with tempfile.TemporaryDirectory(prefix="minidb-load-memory-") as folder:
        from minidb.weights import write_tensors
        tensors = sd_v1_tensors()
        n_keys, size = len(tensors), sum(t.nbytes for t in tensors.values())
        paths = {}
        for suffix in (".safetensors", ".ckpt"):
            paths[suffix] = os.path.join(folder, "sd-v1-random-fp16" + suffix)
            write_tensors(paths[suffix], tensors)
        del tensors
        runs = [(".safetensors", "float16", "minidb"), (".ckpt", "float16", "minidb")]
        if fp32:
            runs += [(".safetensors", "float32", "minidb"), (".ckpt", "float32", "minidb")]
        runs.append((".safetensors", "float16", "safetensors.torch.load_file"))
        rows = []
        for suffix, dtype, how in runs:
            r = measure(paths[suffix], dtype, how)
            rows.append(f"| {suffix} | {how} | {dtype} | {r['loaded'] / 1e9:.3f} GB | {r['added'] / 1e9:.3f} GB "
                        f"| **{r['ratio']:.3f}** | {r['seconds']:.1f} s |")
            print(rows[-1], flush=True)

    command = "flock /tmp/minidb-bigmem.lock python benchmarks/load_memory.py" + (" --fp32" if fp32 else "")
    table = "\n".join([
        f"\n## Checkpoint load peak memory ({datetime.date.today()})\n",
        f"`{command}`  ",
        f"Machine: {machine()}  ",
        f"File: random fp16, SD v1 shapes, {n_keys} tensors, {size / 1e9:.3f} GB of tensors. Peak RSS added = "
        "ru_maxrss after loading minus the RSS after imports, in a fresh process; ratio = that / loaded tensor bytes.\n",
        "| file | loaded by | as | loaded tensors | peak RSS added | ratio | time |",
        "|---|---|---|---|---|---|---|",
        *rows, ""])
    with open(RESULTS, "a") as f:
        f.write(table)
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
