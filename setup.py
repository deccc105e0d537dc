"""minidb: a small, exact PyTorch reimplementation of Stable Diffusion v1 and DreamBooth.

`kernels/` and `weights/` live at the top of the repository for readers, but are installed
as `minidb.kernels` and `minidb.weights` so nothing named `kernels` lands in site-packages.
"""
from setuptools import setup

# Not a hard dependency: PyTorch's CUDA builds bring their own Triton (which minidb's kernels then
# use), and a CPU-only install would carry ~1 GB it cannot run. The test extra needs it: the kernel
# tests run in Triton's interpreter on the CPU.
TRITON = 'triton; platform_system == "Linux"'

setup(
    name="minidb",
    version="0.1.0",
    description="Stable Diffusion v1 and DreamBooth, from scratch, in plain PyTorch",
    license="MIT",
    packages=["minidb", "minidb.cli", "minidb.dreambooth", "minidb.world", "minidb.kernels", "minidb.weights"],
    package_dir={"minidb": "minidb", "minidb.kernels": "kernels", "minidb.weights": "weights"},
    # kernels/adamw8bit_cpu.c: AdamW8bit's CPU loop, compiled on first use (minidb/kernels/adamw8bit_cpu.py).
    package_data={"minidb": ["data/*", "data/demo_subject/*"], "minidb.kernels": ["*.c"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy",
        "safetensors",
        "tokenizers",
        "pillow",
        # tqdm: a progress bar is exactly the well-kept small library worth not rewriting.
        "tqdm",
        'tomli; python_version < "3.11"',
    ],
    extras_require={
        "triton": [TRITON],
        # Reference implementations for the equivalence tests (the runtime never imports them), and Triton.
        # Pinned to the versions the suite passes with, so a fresh machine tests against what we did:
        # transformers 5.24 asks for peft >= 0.22 in add_adapter, and no such peft is released yet.
        "test": ["pytest", "diffusers==0.42.1", "transformers==5.23.0", "peft==0.21.2", TRITON],
    },
    entry_points={"console_scripts": ["minidb=minidb.cli:main"]},
)
