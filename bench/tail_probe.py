"""The fused graph's work beside the model's blocks (retrieval's mask and top-K, the response's
order and packing), variant by variant, each whole `serve_fn` captured as a CUDA graph and
replayed: which form of the tail costs the device least (issue 12, the b8 limit gap).

    python bench/tail_probe.py [--batch 1 8 64]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import serving_bench as sb  # noqa: E402

from unipinrec.serving import fused  # noqa: E402
from unipinrec.serving.graphs import _Graph  # noqa: E402


def head(model, index, row_to_pos, pos_to_row, acts, seen, cands):
    """Encode, retrieval (mask, top-K), ranking, as serve_fn: -> what every tail variant starts from."""
    _, kv = model.encode_history(acts)
    top, pos = fused.retrieve_top(kv, acts, seen, index, row_to_pos, cands)
    gaps = model.default_candidate_gaps(acts.lengths, kv.last_ts(), acts.request_ts)
    probs = torch.sigmoid(model.rank(pos_to_row[pos], kv, gaps).float())
    return kv, top, pos, probs


def tail_sorted(index, weights, seen, top, pos, probs):
    """The tail before the places: a stable sort on the device, then a gather per output."""
    found = torch.isfinite(top) & (torch.arange(top.shape[1], device=top.device) < seen[:, 1:2])
    utility, order = torch.where(found, probs @ weights, float("-inf")).sort(dim=1, descending=True, stable=True)
    probs, top, pos, found = (probs.gather(1, order[..., None].expand_as(probs)), top.gather(1, order),
                              pos.gather(1, order), found.gather(1, order))
    floats = torch.cat([probs, utility[..., None], top.float()[..., None]], dim=-1)
    ids = torch.where(found, index._ids_t[pos], -1)
    return torch.cat([floats.view(torch.int32).long(), ids[..., None]], dim=-1)


def variants(e):
    m, r = e.ret.model, e.retriever
    idx, w = r.index, e.ranker.weights
    args = (m, idx, r._row_to_pos, r._pos_to_row)

    def current(acts, seen, C):
        return fused.serve_fn(m, None, idx, r._row_to_pos, r._pos_to_row, w, acts, seen, C)[1]

    def no_tail(acts, seen, C):
        return head(*args, acts, seen, C)[1:]

    def sorted_tail(acts, seen, C):
        _, top, pos, probs = head(*args, acts, seen, C)
        return tail_sorted(idx, w, seen, top, pos, probs)

    def no_sort(acts, seen, C):  # the tail without the response's order: what ordering costs
        _, top, pos, probs = head(*args, acts, seen, C)
        return fused.pack_candidates(probs, top, pos, seen, w, idx)[0]

    def limit(acts, seen, C):  # the blocks alone (the bench's `la`), on the same batch
        _, kv = m.encode_history(acts)
        cand = acts.items[:, :C].clamp(min=1)
        return m.rank(cand, kv)

    return {"limit (blocks)": limit, "encode+top-K+rank, no tail": no_tail, "tail: no sort": no_sort,
            "tail: device sort (before)": sorted_tail, "tail: current serve_fn": current}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--L", type=int, default=2048)
    p.add_argument("--C", type=int, default=256)
    a = p.parse_args()
    ns = argparse.Namespace(d_model=256, layers=4, heads=4, items=20_000)
    paths = sb.make_models(Path(tempfile.mkdtemp()), a.L, ns)
    warm = tuple((B, a.L, a.C) for B in a.batch)
    e = sb.engines(paths, None, device="cuda", torch_index=True, graph_warmup=warm)["a"]
    print("| batch (graph rows) | variant | replay ms | vs current |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for B in a.batch:
            rows = max(k[0] for k in e.fused.graphs if k[0] <= B and not k[-1])  # batch 64: chunks of 32
            st_acts, st_seen, _, _ = next(v for k, v in e.fused.graphs.items() if k[0] == rows and not k[-1])
            times = {}
            for name, fn in variants(e).items():
                g = _Graph(lambda fn=fn: fn(st_acts, st_seen, a.C))
                times[name] = sb.events_ms(g.replay, 100)
            cur = times["tail: current serve_fn"]
            for name, ms in times.items():
                print(f"| {B} ({rows}) | {name} | {ms:.4f} | {ms - cur:+.4f} |", flush=True)


if __name__ == "__main__":
    main()
