"""What train.token_rows adds to a step and what it takes away, at SD v1's table size (issue #31):

    python -m benchmarks.token_rows_step [--repeats 9]

- added: TokenRows.after_step, the table's decay and the rows written back (once per step);
- taken away: the table's share of a dense step: its gradient (zeroed, filled by the embedding's backward)
  and torch's fused AdamW over its 37.9M weights.
Medians over the repeats, in the same process; the ratio is what to read on a noisy machine.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from minidb.dreambooth.token_rows import TokenRows

VOCAB, WIDTH, TOKENS = 49408, 768, 77


def timed(fn, repeats):
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, TOKENS), generator=g)
    upstream = torch.randn(2, TOKENS, WIDTH, generator=g)

    table = torch.nn.Embedding(VOCAB, WIDTH)
    opt = torch.optim.AdamW(table.parameters(), lr=1e-6, weight_decay=1e-2, fused=True)

    def dense():  # the table's part of a dense step: backward into a full-size gradient, AdamW over it
        opt.zero_grad(set_to_none=True)
        table(ids).backward(upstream)
        opt.step()

    rows = TokenRows(torch.nn.Embedding(VOCAB, WIDTH), ids)
    rows_opt = torch.optim.AdamW([rows.rows], lr=1e-6, weight_decay=1e-2, fused=True)

    def sparse():  # the same with token rows: backward into the rows, AdamW over them, the table's decay
        rows_opt.zero_grad(set_to_none=True)
        F.embedding(rows.slot[ids], rows.rows).backward(upstream)
        rows_opt.step()
        rows.after_step(1e-6, 1e-2, rows.rows.detach())

    d, s = timed(dense, args.repeats), timed(sparse, args.repeats)
    print(f"threads {torch.get_num_threads()}; the table's part of a step: whole table {d * 1e3:.1f} ms, "
          f"token rows {s * 1e3:.1f} ms ({s / d:.2f}x)")


if __name__ == "__main__":
    main()
