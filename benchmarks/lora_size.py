"""LoRA file sizes for SD v1 (UNet + text encoder) at several ranks, without any weights.

    python benchmarks/lora_size.py [--ranks 4 16] [--append]

Builds SD v1's UNet and text encoder on the meta device, puts adapters on the attention
projections of the UNet (to_q/to_k/to_v/to_out.0) and on the text encoder's attention and MLP
(minidb's LoRA targets with model.lora_text_encoder on), writes a kohya-format file of zeros with
exactly those keys and shapes through minidb.lora.save_lora, and reports its size next to the
formula numel = sum over adapted modules of rank·(in + out) + 1. Also the kohya-default UNet
targets (adding proj_in/proj_out and the feed-forward). `--append` adds the table to RESULTS.md.
"""
import argparse
import datetime
import os
import tempfile

import torch

from minidb import lora
from minidb.config import SDConfig

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")
SETS = {"attention + text encoder": (lora.UNET_ATTENTION, lora.TEXT_ENCODER_TARGETS),
        "attention only (UNet)": (lora.UNET_ATTENTION, ()),
        "kohya default (UNet transformers + text encoder)": (lora.UNET_TRANSFORMER, lora.TEXT_ENCODER_TARGETS)}


def file_bytes(models, rank, unet_targets, te_targets, dtype) -> tuple[int, int, int]:
    """(file size, numel, adapted modules) of the LoRA file save_lora writes."""
    network = lora.add_lora(models, rank, unet_targets=unet_targets, text_encoder_targets=te_targets)
    zeros = {k: torch.zeros(t.shape) for k, t in network.state_dict().items()}  # meta -> real, same keys
    network.load_state_dict(zeros, assign=True)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "lora.safetensors")
        lora.save_lora(path, network, dtype=dtype)
        size = os.path.getsize(path)
    return size, lora.lora_numel(models, rank, unet_targets, te_targets), len(list(network.children()))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    p.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = p.parse_args()
    models = lora.meta_models(SDConfig())
    rows = ["| targets | rank | modules | numbers | fp16 file | fp32 file | header (fp16) |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for label, (unet_targets, te_targets) in SETS.items():
        for rank in args.ranks:
            half, numel, n = file_bytes(models, rank, unet_targets, te_targets, torch.float16)
            full, _, _ = file_bytes(models, rank, unet_targets, te_targets, torch.float32)
            assert half > 8 + 2 * numel and full > 8 + 4 * numel  # the rest: 8 bytes of length, the header
            rows.append(f"| {label} | {rank} | {n} | {numel:,} | {half:,} B ({half / 2**20:.2f} MiB) "
                        f"| {full:,} B ({full / 2**20:.2f} MiB) | {half - 8 - 2 * numel:,} B |")
    table = "\n".join(rows)
    print(table)
    if args.append:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(f"\n## LoRA file size, SD v1 ({datetime.date.today()})\n\n"
                    "`python benchmarks/lora_size.py --append`: files minidb.lora.save_lora writes for SD v1's "
                    "shapes (built on the meta device, zeros for values), kohya key format. "
                    "numbers = sum over adapted modules of rank·(in + out) + 1 (alpha); the file adds 8 "
                    "bytes and a JSON header (key names, shapes, ss_* metadata).\n\n" + table + "\n")


if __name__ == "__main__":
    main()
