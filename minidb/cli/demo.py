"""DreamBooth on the shipped miniature world, end to end: train, sample, measure (see minidb.world.demo).

    minidb demo                          # minutes on a CPU (benchmarks/RESULTS.md); writes demo/before_after.png
    minidb demo --out elsewhere --seed 1
    minidb demo --ablation --seeds 3     # with and without prior preservation, 3 seeds each
    minidb demo --ablation --star-samples 256   # the class prior read on more samples (a finer share)

The training run is `minidb train --config minidb/data/demo.toml` (the same file), into
OUT/run; the metrics are the paper's (Ruiz et al. 2022), on the world's embedding.
"""
import argparse
import sys
import time


def add_arguments(p):
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--out", default="demo", help="output folder (default demo)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--no-prior", action="store_true", help="train without prior preservation")
    p.add_argument("--ablation", action="store_true", help="with and without prior preservation, --seeds each")
    p.add_argument("--seeds", type=int, default=3, help="with --ablation: seeds per arm (default 3)")
    p.add_argument("--star-samples", type=int, default=64,
                   help='"a photo of a star" samples per model for the class-star share (default 64)')
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a training option of demo.toml, e.g. --set train.steps=100")


def run(args) -> int:
    from minidb.world.demo import ablation, format_metrics, run_demo
    from minidb.errors import MinidbError
    if args.seeds < 1:
        raise MinidbError(f"--seeds must be at least 1, got {args.seeds}")
    if args.star_samples < 1:
        raise MinidbError(f"--star-samples must be at least 1, got {args.star_samples}")
    t0 = time.perf_counter()
    if args.ablation:
        print(ablation(f"{args.out}/ablation", seeds=args.seeds, overrides=args.set, star_samples=args.star_samples))
        print(f"ablation done in {(time.perf_counter() - t0) / 60:.1f} min: {args.out}/ablation/ablation.md",
              file=sys.stderr)
        return 0
    m = run_demo(args.out, prior=not args.no_prior, seed=args.seed, overrides=args.set,
                 star_samples=args.star_samples)
    print(format_metrics(m))
    print(f"demo done in {(time.perf_counter() - t0) / 60:.1f} min: grid {m['grid']}, metrics {args.out}/metrics.json, "
          f"model {args.out}/run/model.safetensors (try: minidb sample --ckpt {args.out}/run/model.safetensors "
          f"--prompt \"a photo of a large sks star on a green background, bottom right\")", file=sys.stderr)
    return 0
