"""Exact top-K on a GPU at small batches (issue 12): `torch.topk` over a row of N scores runs in
one thread block per row, so at batch 1 a top-256 of 20,000 items took ~70 us of the fused
graph's ~850. This bench times, under CUDA graphs, `torch.topk` against a two-stage top-K (the
row in P parts side by side, then the top K of their P * K winners) per batch and part count,
and checks that both return the same scores. On the H200 the two-stage form was slower at every
batch and part count (docs/serving.md), so the engine keeps `torch.topk`.

    python bench/topk_bench.py [--batch 1 8 64] [--items 20000] [--k 256]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from candidate_attention_bench import timed_ms  # noqa: E402  (graph replays' median; also puts src/ on the path)


def two_stage_topk(scores, k: int, parts: int):
    """Each row's top k as the top k of its `parts` parts' top k each (exact: a row's top k lie
    among its parts' winners) -> (scores, positions), sorted."""
    import torch.nn.functional as F

    Q, N = scores.shape
    width = -(-N // parts)
    padded = F.pad(scores, (0, parts * width - N), value=float("-inf")).view(Q * parts, width)
    top, pos = padded.topk(min(k, width), dim=1)  # (Q * parts, k) each part's winners
    pos = pos + (torch.arange(parts, device=scores.device) * width).repeat(Q)[:, None]
    top, at = top.view(Q, -1).topk(k, dim=1)
    return top, pos.view(Q, -1).gather(1, at)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--k", type=int, default=256)
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"top-{a.k} of {a.items:,} fp32 scores on {dev}\n| batch | parts | ms | vs torch.topk | same scores |")
    print("|---|---|---|---|---|")
    for B in a.batch:
        s = torch.randn(B, a.items, device=dev)
        ref = torch.topk(s, a.k, dim=1)
        base = timed_ms(lambda: torch.topk(s, a.k, dim=1))
        print(f"| {B} | 1 (torch.topk) | {base:.4f} | 1.00x | yes |")
        for parts in [2, 4, 8, 16, 32, 64]:
            if a.items // parts < a.k:
                continue
            ms = timed_ms(lambda: two_stage_topk(s, a.k, parts))
            top, pos = two_stage_topk(s, a.k, parts)
            same = torch.equal(top, ref.values) and torch.equal(s.gather(1, pos), ref.values)
            print(f"| {B} | {parts} | {ms:.4f} | {base / ms:.2f}x | "
                  f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
