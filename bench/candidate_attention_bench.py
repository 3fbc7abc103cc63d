"""Candidate attention on a GPU: where `rank` spends its time, and the attention variants (issue 12).

Ranking C candidates over a cached history of L actions should cost a fraction of encoding
the history (candidate tokens are C, not L, and attend to L keys each, not causally), yet on
the H200 `rank` took longer than `encode_history`. This bench times, under CUDA graphs, at
batch 1, 8, 64 (L=2048, C=256, d=256, 4 heads, 4 layers, bf16):

- encode_history and rank of the model as it is;
- rank's attention alone per variant: `cat_mask` (the model before: [history; candidates] keys, a bool
  mask, SDPA), `split_flash` (flash attention over the history, the candidate's own key merged
  by its log-sum-exp; full histories only), `split_cudnn` (the same with cuDNN), `split_cudnn_bias`
  (cuDNN with a key-padding bias, any lengths: what the model does now in bf16),
  `split_efficient` (the memory-efficient kernel with the bias: the model's fp32 path on CUDA),
  `split_flash_varlen` (flash over the padded cache with per-row key counts);
- the largest difference of each variant's output from `cat_mask`;
- with `--splits`, instead of the variants: the model's `rank` with its history attention in
  1, 2, 4, ... chunks of keys side by side (`attention.history_splits`, "auto" its choice), each
  against one chunk, and `--timeline` the kernels of one rank replay in order.

    python bench/candidate_attention_bench.py [--batch 1 8 64] [--layers 4] [--splits [--timeline]]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_profile as gp  # noqa: E402  (also puts src/ on the path)


def timed_ms(fn):
    """Median ms of fn's replays under a CUDA graph; on CPU (a smoke run) one eager call."""
    from unipinrec.serving.graphs import _Graph

    if not torch.cuda.is_available():
        import time
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000
    return gp.events_ms(_Graph(fn).replay)


def merge_self(out_h, lse, q, k, v):
    """History attention (out_h, its log-sum-exp) and each query's own key/value -> softmax over both."""
    s_self = (q.float() * k.float()).sum(-1) / q.shape[-1] ** 0.5  # (B, H, C)
    lse = lse[..., :q.shape[2]].float()
    m = torch.maximum(lse, s_self)
    w_h, w_s = torch.exp(lse - m)[..., None], torch.exp(s_self - m)[..., None]
    return ((w_h * out_h.float() + w_s * v.float()) / (w_h + w_s)).to(q.dtype)


def variants(B, H, C, Wt, Dh, lengths, dev):
    g = torch.Generator(device=dev).manual_seed(0)
    r = lambda *s: torch.randn(*s, device=dev, generator=g, dtype=torch.bfloat16)  # noqa: E731
    # laid out as the model makes them: (B, N, H, Dh) memory seen as (B, H, N, Dh)
    q, k, v = (r(B, C, H, Dh).transpose(1, 2) for _ in range(3))
    pk, pv = (r(B, Wt, H, Dh).transpose(1, 2) for _ in range(2))
    valid = torch.arange(Wt, device=dev)[None] < lengths[:, None]  # (B, Wt)
    eye = torch.eye(C, dtype=torch.bool, device=dev)
    mask = torch.cat([valid[:, None, :].expand(B, C, Wt), eye[None].expand(B, -1, -1)], dim=2)[:, None]
    bias = torch.zeros(B, 1, 1, Wt, device=dev, dtype=torch.bfloat16).masked_fill(~valid[:, None, None], float("-inf"))
    ops = torch.ops.aten

    def cat_mask():
        return F.scaled_dot_product_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=mask)

    def split_flash():
        o, lse = ops._scaled_dot_product_flash_attention(q, pk, pv, 0.0, False, False)[:2]
        return merge_self(o, lse, q, k, v)

    def split_efficient():
        o, lse = ops._scaled_dot_product_efficient_attention(q, pk, pv, bias.expand(B, H, C, Wt), True)[:2]
        return merge_self(o, lse, q, k, v)

    def split_cudnn():
        o, lse = ops._scaled_dot_product_cudnn_attention(q, pk, pv, None, True, 0.0, False, False)[:2]
        return merge_self(o, lse.reshape(B, H, C), q, k, v)

    def split_cudnn_bias():
        o, lse = ops._scaled_dot_product_cudnn_attention(q, pk, pv, bias.expand(B, H, C, Wt), True, 0.0, False, False)[:2]
        return merge_self(o, lse.reshape(B, H, C), q, k, v)

    cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32) * C
    cu_k = torch.arange(B + 1, device=dev, dtype=torch.int32) * Wt
    used = lengths.to(torch.int32)

    def split_flash_varlen():
        o, lse = ops._flash_attention_forward(
            q.transpose(1, 2).reshape(B * C, H, Dh), pk.transpose(1, 2).reshape(B * Wt, H, Dh),
            pv.transpose(1, 2).reshape(B * Wt, H, Dh), cu_q, cu_k, C, Wt, 0.0, False, False, seqused_k=used)[:2]
        # o (B*C, H, Dh); lse (H, B*C) for varlen
        lse = lse.view(H, B, C).transpose(0, 1) if lse.dim() == 2 else lse.reshape(B, H, C)
        return merge_self(o.view(B, C, H, Dh).transpose(1, 2), lse, q, k, v)

    full = bool((lengths == Wt).all())
    out = {"cat_mask": cat_mask, "split_efficient": split_efficient, "split_cudnn_bias": split_cudnn_bias,
           "split_flash_varlen": split_flash_varlen}
    if full:
        out.update(split_flash=split_flash, split_cudnn=split_cudnn)
    return out


def splits_rows(model, kv, cand, B: int, L: int) -> None:
    """rank's replay ms per key-chunk count, and its largest difference from one chunk."""
    from unipinrec.attention import history_splits

    auto = history_splits(B, model.config.n_heads, cand.shape[1], L, cand.device)
    model.attention_splits = 1
    ref, base = model.rank(cand, kv).float(), timed_ms(lambda: model.rank(cand, kv))
    for s in [1, 2, 4, 8, 16, 32]:
        if L % s or L // s < 64:
            continue
        model.attention_splits = s
        ms = timed_ms(lambda: model.rank(cand, kv))
        diff = float((model.rank(cand, kv).float() - ref).abs().max())
        print(f"| {B} | {s}{' (auto)' if s == auto else ''} | {ms:.3f} | {base / ms:.2f}x | {diff:.2e} |")
    model.attention_splits = None


def timeline(fn, title: str) -> None:
    """Each kernel of one replay of fn's graph, in launch order, with its device time."""
    from torch.profiler import ProfilerActivity, profile
    from unipinrec.serving.graphs import _Graph

    g = _Graph(fn)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        g.replay()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    print(f"\n## timeline: {title} ({len(ev)} kernels)")
    t0 = ev[0].time_range.start if ev else 0
    for e in ev:
        print(f"{(e.time_range.start - t0) / 1000:8.3f} ms {e.time_range.elapsed_us():7.1f} us  {e.name[:90]}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--C", type=int, default=256)
    p.add_argument("--profile", action="store_true", help="print rank's and encode's kernels at the last batch")
    p.add_argument("--splits", action="store_true", help="rank per key-chunk count instead of the variants")
    p.add_argument("--timeline", action="store_true", help="with --splits: one rank replay's kernels in order")
    a = p.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from unipinrec.sequences import Actions, History
    from unipinrec.serving.synthetic import make_model_dir, random_history
    from unipinrec.checkpoint import load_model
    from unipinrec.attention import history_splits

    work = Path(tempfile.mkdtemp())
    make_model_dir(work / "m", kind="unified", seed=0, num_items=20_000, d_model=256, n_layers=a.layers,
                   n_heads=4, max_history=a.L)
    loaded = load_model(work / "m")
    model = loaded.model.to(dev, torch.bfloat16).eval()
    if a.splits:
        print("| batch | key chunks | rank ms | vs 1 chunk | max |diff| vs 1 chunk |\n|---|---|---|---|---|")
    else:
        print("| batch | encode ms | rank ms | rank attention: variant | ms (all layers) | max |diff| vs cat_mask |")
        print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for B in a.batch:
            hs = [History.from_actions(random_history(rng, a.L, 20_000)) for _ in range(B)]
            h = Actions.from_histories(hs, [1_800_000_000] * B, vocab=loaded.vocab, device=dev)
            cand = torch.randint(1, 20_001, (B, a.C), device=dev)
            kv = model.encode_history(h)[1]
            if a.splits:
                splits_rows(model, kv, cand, B, a.L)
                if a.timeline and torch.cuda.is_available():
                    for s in sorted({1, history_splits(B, model.config.n_heads, a.C, a.L, dev)}):
                        model.attention_splits = s
                        timeline(lambda: model.rank(cand, kv), f"rank, batch {B}, {s} key chunks")
                    model.attention_splits = None
                continue
            enc = timed_ms(lambda: model.encode_history(h))
            rnk = timed_ms(lambda: model.rank(cand, kv))
            for lengths_kind, lengths in (("full", torch.full((B,), a.L, device=dev)),
                                          ("ragged", torch.randint(a.L // 2, a.L + 1, (B,), device=dev))):
                fns = variants(B, 4, a.C, a.L, 64, lengths, dev)
                ref = fns["cat_mask"]().float()
                for name, fn in fns.items():
                    try:
                        ms = timed_ms(lambda: [fn() for _ in range(a.layers)])
                        diff = float((fn().float() - ref).abs().max())
                    except Exception as e:  # a kernel refusing this shape is a result too
                        ms, diff = float("nan"), f"{type(e).__name__}: {str(e)[:160]}"
                    print(f"| {B} | {enc:.3f} | {rnk:.3f} | {name} ({lengths_kind}) | {ms:.3f} | {diff} |")
        if a.profile:  # eager calls
            gp.kernels(lambda: model.rank(cand, kv), f"rank, batch {B}", rows=25)
            gp.kernels(lambda: model.encode_history(h), f"encode_history, batch {B}", rows=25)


if __name__ == "__main__":
    main()
