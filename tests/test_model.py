"""Exactness of the model: the cached serving path equals the training forward and a full
recompute; MAM and attention-mask properties."""
from __future__ import annotations

import pytest
import torch

from unipinrec.model import KINDS, KVCache, ModelConfig, UniPinRec, time_bucket
from unipinrec.batches import TrainBatch
from unipinrec.config import TrainConfig
from unipinrec.losses import UniPinRecLoss, full_softmax_loss
from unipinrec.sequences import Actions


def hist(items, actions, ts, surfaces, lengths, request_ts) -> Actions:
    return Actions(items=items, actions=actions, ts=ts, surfaces=surfaces, lengths=lengths, request_ts=request_ts)

TOL = 1e-5
N_ITEMS, N_ACTIONS, N_TASKS, L = 40, 5, 3, 12


def make_model(kind="unified", time_gap="previous", seed=0, dropout=0.1, **kw) -> UniPinRec:
    torch.manual_seed(seed)
    cfg = ModelConfig(num_items=N_ITEMS, num_actions=N_ACTIONS, num_tasks=N_TASKS, d_model=32, n_layers=2,
                      n_heads=4, max_history=L, dropout=dropout, kind=kind, time_gap=time_gap, use_surface=True, **kw)
    m = UniPinRec(cfg).double().eval()  # float64 makes "equal" a sharp test; fp32 is checked separately
    return m


def make_history(lengths, seed=1, width=None) -> Actions:
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    W = width or max(max(lengths), 1)
    lengths_t = torch.tensor(lengths)
    valid = torch.arange(W)[None] < lengths_t[:, None]
    items = torch.randint(1, N_ITEMS + 1, (B, W), generator=g) * valid
    actions = torch.randint(0, N_ACTIONS, (B, W), generator=g) * valid
    ts = torch.cumsum(torch.randint(0, 100_000, (B, W), generator=g), dim=1) + 1_700_000_000
    surfaces = torch.randint(0, 3, (B, W), generator=g) * valid
    request_ts = ts.max(dim=1).values + torch.randint(1, 5000, (B,), generator=g)
    return hist(items, actions, ts, surfaces, lengths_t, request_ts)


def row(h: Actions, b: int, n: int | None = None) -> Actions:
    n = int(h.lengths[b]) if n is None else n
    return hist(h.items[b:b + 1, :max(n, 1)], h.actions[b:b + 1, :max(n, 1)], h.ts[b:b + 1, :max(n, 1)],
                        h.surfaces[b:b + 1, :max(n, 1)], torch.tensor([n]), h.request_ts[b:b + 1])


def candidates(B, C, seed=2):
    return torch.randint(1, N_ITEMS + 1, (B, C), generator=torch.Generator().manual_seed(seed))


def next_item_targets(h: Actions) -> torch.Tensor:
    """(B, W) the next history item at each position, 0 at the last real one and on padding."""
    W = h.items.shape[1]
    return torch.where(torch.arange(W)[None] < (h.lengths - 1)[:, None], torch.roll(h.items, -1, 1), 0)


def train_batch(h: Actions, targets: torch.Tensor) -> TrainBatch:
    """A training batch over `h` with random task labels and a 3 x 4 slate at positions 0..3."""
    B, W = h.items.shape
    return TrainBatch(history=h, history_labels=torch.rand(B, W, N_TASKS).round(), targets=targets,
                      slate_items=candidates(3, 4), slate_labels=torch.rand(3, 4, N_TASKS).round(),
                      slate_valid=torch.ones(3, 4, dtype=torch.bool), slate_actions=torch.zeros(3, 4, dtype=torch.long),
                      slate_positions=torch.arange(4).repeat(3, 1))


def head_logits(m, slate_hidden, h, cand):
    """The ranking head over slate outputs (B, C, D), written out: rank_head, plus with
    rank_similarity w * cos(user vector of h, item vector) / temperature."""
    logits = m.rank_head(slate_hidden)
    if m.rank_sim_weight is None:
        return logits
    cos = (m.encode_history(h)[0][:, None, :] * m.item_vectors()[cand]).sum(-1, keepdim=True)
    return logits + m.rank_sim_weight * cos / m.config.temperature


def assert_scores_equal_training_forward_and_recompute(m, h, cand, scores):
    """Cached-KV scores (B, C, T) equal the training forward with `cand` as the slate, and a full
    recompute with each candidate alone appended to its user's history (at position len)."""
    blended = head_logits(m, m.blended_forward(h, slate_items=cand).slate_hidden, h, cand)
    assert (scores - blended).abs().max() < TOL
    B, C = cand.shape
    for b in range(B):
        hb = row(h, b)
        for c in range(C):
            one = cand[b:b + 1, c:c + 1]
            single = m.blended_forward(hb, slate_items=one)
            assert (head_logits(m, single.slate_hidden, hb, one)[0, 0] - scores[b, c]).abs().max() < TOL


@pytest.mark.parametrize("kind", ["unified", "ranking_only", "interleaved"])
@pytest.mark.parametrize("time_gap", ["previous", "request"])
def test_rank_over_cache_equals_training_forward_and_full_recompute(kind, time_gap):
    m = make_model(kind, time_gap)
    h = make_history([7, 12, 1, 4])
    cand = candidates(4, 6)
    with torch.no_grad():
        _, cache = m.encode_history(h)
        scores = m.rank(cand, cache)  # (B, C, T)
        assert scores.shape == (4, 6, N_TASKS)
        assert_scores_equal_training_forward_and_recompute(m, h, cand, scores)


def test_fp32_cached_rank_matches_within_1e5():
    torch.manual_seed(0)
    m = make_model().float()
    h = make_history([12, 5, 9])
    cand = candidates(3, 50)
    with torch.no_grad():
        _, cache = m.encode_history(h)
        scores = m.rank(cand, cache)
        blended = m.rank_head(m.blended_forward(h, slate_items=cand).slate_hidden)
    assert (scores - blended).abs().max() <= 1e-5


def test_rank_is_independent_of_the_other_candidates_and_of_padding():
    m = make_model()
    h = make_history([5, 9])
    cand = candidates(2, 8)
    with torch.no_grad():
        _, cache = m.encode_history(h)
        full = m.rank(cand, cache)
        part = m.rank(cand[:, 3:5], cache)
        # extra right padding in the history changes nothing
        pad = lambda t: torch.nn.functional.pad(t, (0, 3))  # noqa: E731
        wide_h = hist(pad(h.items), pad(h.actions), pad(h.ts), pad(h.surfaces), h.lengths, h.request_ts)
        _, cache_wide = m.encode_history(wide_h)
        wide = m.rank(cand, cache_wide)
    assert (full[:, 3:5] - part).abs().max() < TOL
    assert (full - wide).abs().max() < TOL


@pytest.mark.parametrize("kind", ["unified", "interleaved", "retrieval_only"])
@pytest.mark.parametrize("time_gap", ["previous", "request"])
def test_extend_history_equals_full_encode(kind, time_gap):
    m = make_model(kind, time_gap)
    # split each row: the first old_len actions cached, the rest appended later
    full = make_history([9, 8, 4, 5], seed=3)
    old_len = torch.tensor([5, 8, 0, 2])
    new_len = full.lengths - old_len
    W = full.items.shape[1]

    def part(start, n):
        idx = (start[:, None] + torch.arange(W)[None]).clamp(max=W - 1)
        pick = lambda t: torch.gather(t, 1, idx) * (torch.arange(W)[None] < n[:, None])  # noqa: E731
        return hist(pick(full.items), pick(full.actions), pick(full.ts), pick(full.surfaces), n, full.request_ts)

    old = part(torch.zeros_like(old_len), old_len)
    old.request_ts = old.request_ts - 10
    new = part(old_len, new_len)
    with torch.no_grad():
        u_ref, ref = m.encode_history(full)
        _, cache = m.encode_history(old)
        u, ext = m.extend_history(cache, new)
        assert (u - u_ref).abs().max() < TOL
        assert torch.equal(ext.lengths, ref.lengths)
        valid = ref.padding_mask
        for k, k_ref in zip(ext.keys, ref.keys):
            assert (k.transpose(1, 2)[valid] - k_ref.transpose(1, 2)[valid]).abs().max() < TOL
        if kind != "retrieval_only":
            cand = candidates(4, 5)
            assert (m.rank(cand, ext) - m.rank(cand, ref)).abs().max() < TOL


def test_extend_past_max_history_reencodes_the_last_L():
    m = make_model()
    long = make_history([L + 5], seed=4, width=L + 5)
    first = hist(long.items[:, :L], long.actions[:, :L], long.ts[:, :L], long.surfaces[:, :L],
                         torch.tensor([L]), long.request_ts)
    new = hist(long.items[:, L:], long.actions[:, L:], long.ts[:, L:], long.surfaces[:, L:],
                       torch.tensor([5]), long.request_ts)
    last = hist(long.items[:, 5:], long.actions[:, 5:], long.ts[:, 5:], long.surfaces[:, 5:],
                        torch.tensor([L]), long.request_ts)
    with torch.no_grad():
        _, cache = m.encode_history(first)
        u, ext = m.extend_history(cache, new)
        u_ref, _ = m.encode_history(last)
    assert ext.keys[0].shape[2] == L
    assert (u - u_ref).abs().max() < TOL


def test_encoded_length_is_L_with_mam_and_2L_interleaved():
    h = make_history([L, 3])
    with torch.no_grad():
        _, c_uni = make_model("unified").encode_history(h)
        _, c_int = make_model("interleaved").encode_history(h)
    assert c_uni.keys[0].shape[2] == L and c_uni.values[-1].shape[2] == L
    assert c_int.keys[0].shape[2] == 2 * L
    assert c_int.padding_mask.sum(1).tolist() == [2 * L, 6]


def test_masked_token_cannot_see_its_own_action():
    m = make_model()
    h = make_history([8, 8])
    mam = torch.zeros_like(h.items, dtype=torch.bool)
    mam[:, 4] = True
    h2 = hist(h.items, h.actions.clone(), h.ts, h.surfaces, h.lengths, h.request_ts)
    h2.actions[:, 4] = (h.actions[:, 4] + 1) % N_ACTIONS
    with torch.no_grad():
        a = m.blended_forward(h, mam_mask=mam).ranking_hidden
        b = m.blended_forward(h2, mam_mask=mam).ranking_hidden
        c = m.blended_forward(h2).ranking_hidden  # unmasked: the action is visible
    assert (a - b).abs().max() < TOL  # the masked action is hidden from its token (and all others)
    assert (c[:, 4] - a[:, 4]).abs().max() > 1e-4  # unmasked, the same change is visible


def test_history_cannot_see_the_slate_and_slate_tokens_cannot_see_each_other():
    m = make_model()
    h = make_history([6, 3])
    s1 = candidates(2, 5, seed=7)
    s2 = s1.clone()
    s2[:, 1:] = (s1[:, 1:] % N_ITEMS) + 1  # change every slate item but the first
    with torch.no_grad():
        o1 = m.blended_forward(h, slate_items=s1)
        o2 = m.blended_forward(h, slate_items=s2)
        plain = m.blended_forward(h)
    assert (o1.retrieval_hidden - o2.retrieval_hidden).abs().max() < TOL
    assert (o1.retrieval_hidden - plain.retrieval_hidden).abs().max() < TOL
    assert (o1.slate_hidden[:, 0] - o2.slate_hidden[:, 0]).abs().max() < TOL
    assert (o1.slate_hidden[:, 1:] - o2.slate_hidden[:, 1:]).abs().max() > 1e-4


def test_history_is_causal_and_padding_invisible():
    m = make_model()
    h = make_history([8])
    h2 = hist(h.items.clone(), h.actions, h.ts, h.surfaces, h.lengths, h.request_ts)
    h2.items[0, 6] = h.items[0, 6] % N_ITEMS + 1
    with torch.no_grad():
        a = m.blended_forward(h).retrieval_hidden
        b = m.blended_forward(h2).retrieval_hidden
        u_short, _ = m.encode_history(row(h, 0, 6))
        u_long, _ = m.encode_history(hist(h.items, h.actions, h.ts, h.surfaces, torch.tensor([6]), h.request_ts))
    assert (a[:, :6] - b[:, :6]).abs().max() < TOL
    assert (a[:, 6] - b[:, 6]).abs().max() > 1e-4
    assert (u_short - u_long).abs().max() < TOL


def test_user_and_item_vectors_are_normalised_and_empty_history_is_zero():
    m = make_model()
    with torch.no_grad():
        u, cache = m.encode_history(make_history([4, 0]))
        v = m.item_vectors()
    assert torch.allclose(u[0].norm(), torch.tensor(1.0, dtype=u.dtype))
    assert u[1].abs().max() == 0
    assert v.shape == (N_ITEMS + 1, 32)
    assert v[0].abs().max() == 0 and torch.allclose(v[1:].norm(dim=1), torch.ones(N_ITEMS, dtype=v.dtype))


def test_retrieval_only_has_no_rank():
    m = make_model("retrieval_only")
    with torch.no_grad():
        _, cache = m.encode_history(make_history([3]))
    with pytest.raises(RuntimeError, match="retrieval_only"):
        m.rank(candidates(1, 2), cache)


def test_kv_cache_rows_select_and_cat():
    m = make_model()
    h = make_history([3, 9, 5])
    cand = candidates(3, 4)
    with torch.no_grad():
        _, cache = m.encode_history(h)
        ref = m.rank(cand, cache)
        sub = cache.index_select(torch.tensor([2, 0]))
        assert (m.rank(cand[[2, 0]], sub) - ref[[2, 0]]).abs().max() < TOL
        _, c_short = m.encode_history(row(h, 0))  # width 3
        _, c_long = m.encode_history(row(h, 1))  # width 9
        both = KVCache.cat([c_short, c_long])
        assert (m.rank(cand[:2], both) - ref[:2]).abs().max() < TOL
        assert (m.rank(cand[1:2], cache[1]) - ref[1:2]).abs().max() < TOL


def test_same_size_across_kinds():
    sizes = {k: make_model(k).num_parameters() for k in KINDS}
    assert len(set(sizes.values())) == 1, sizes


def train_loss(m: UniPinRec, batch: TrainBatch, **train) -> tuple[torch.Tensor, dict]:
    """A training step's (loss, stats) as the trainer computes them, under TrainConfig(**train)."""
    tc = TrainConfig(**train)
    return UniPinRecLoss.from_config(tc)(m, m(batch, mam_rate=tc.mam_rate), batch)


def test_training_forward_losses_and_backward():
    torch.manual_seed(0)
    for kind in KINDS:
        m = make_model(kind).float().train()
        h = make_history([8, 5, 12])
        batch = train_batch(h, next_item_targets(h))
        loss, stats = train_loss(m, batch, alpha=0.5, num_uniform_negatives=16, num_inbatch_negatives=8)
        assert torch.isfinite(loss)
        loss.backward()
        assert ("retrieval_loss" in stats) == (kind != "ranking_only")
        assert ("ranking_loss" in stats) == (kind != "retrieval_only")
        assert m.item_emb.weight.grad is not None


def test_forward_returns_the_masks_the_losses_need():
    """MAM only in training, only for the kinds that use it, at the rate the trainer passes; the
    ranking loss reads the MAM tokens, or every real item token of the interleaved ablation."""
    h = make_history([8, 5, 12])
    batch = train_batch(h, next_item_targets(h))
    valid = torch.arange(h.items.shape[1])[None] < h.lengths[:, None]
    torch.manual_seed(0)
    out = make_model("unified").train()(batch, mam_rate=0.5)
    assert out.mam_mask.any() and not (out.mam_mask & ~valid).any() and torch.equal(out.rank_mask, out.mam_mask)
    assert make_model("unified").train()(batch).mam_mask is None  # mam_rate 0: no masking
    assert make_model("unified").eval()(batch, mam_rate=0.5).mam_mask is None
    inter = make_model("interleaved").train()(batch, mam_rate=0.5)
    assert inter.mam_mask is None and torch.equal(inter.rank_mask, valid)
    ret = make_model("retrieval_only").train()(batch, mam_rate=0.5)
    assert ret.mam_mask is None and ret.rank_mask is None and ret.slate_hidden is None
    assert make_model("ranking_only").train()(batch, mam_rate=0.5).slate_hidden.shape[:2] == (3, 4)


def test_time_buckets_and_row_helpers():
    b = time_bucket(torch.tensor([-5, 0, 1, 3, 10**12]), 64)
    assert b.tolist()[:3] == [0, 0, 2] and b[-1] == 63
    x = torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]])
    a = hist(x, x + 10, x * 100, x * 0, torch.tensor([3, 1]), torch.tensor([5, 6]))
    last = a.keep_last(2)
    assert last.items.tolist() == [[2, 3], [4, 0]] and last.ts.tolist() == [[200, 300], [400, 0]]
    assert last.lengths.tolist() == [2, 1]
    y = torch.tensor([[7, 8], [9, 0]])
    b = hist(y, y + 10, y * 100, y * 0, torch.tensor([2, 1]), torch.tensor([7, 8]))
    joined = a.append(b)
    assert joined.items.tolist() == [[1, 2, 3, 7, 8], [4, 9, 0, 0, 0]]
    assert joined.actions.tolist() == [[11, 12, 13, 17, 18], [14, 19, 0, 0, 0]]
    assert joined.lengths.tolist() == [5, 2] and joined.request_ts.tolist() == [7, 8]
    both = Actions.cat([a.trim(), b])  # widths 3 and 2 -> padded to 3
    assert both.items.tolist() == [[1, 2, 3], [4, 0, 0], [7, 8, 0], [9, 0, 0]]
    assert both.index_select([3, 0]).lengths.tolist() == [1, 3] and both.row(1).items.tolist() == [[4]]


def test_slate_positions_reach_rank_and_training_forward_alike():
    m = make_model(slate_positions=4)
    h = make_history([6, 9])
    cand = candidates(2, 5)
    pos = torch.tensor([[0, 1, 2, 3, 9], [3, 2, 1, 0, 0]])
    with torch.no_grad():
        _, cache = m.encode_history(h)
        at = m.rank(cand, cache, slate_positions=pos)
        blended = m.rank_head(m.blended_forward(h, slate_items=cand, slate_positions=pos).slate_hidden)
        default = m.rank(cand, cache)
    assert (at - blended).abs().max() < TOL
    assert (default[1, 3:] - at[1, 3:]).abs().max() < TOL  # the default position is 0
    assert (default[0, 1:] - at[0, 1:]).abs().max() > 1e-4
    with torch.no_grad():  # position 9 clips to the last embedding (3)
        clipped = m.rank(cand[:1, 4:], cache[0], slate_positions=torch.tensor([[3]]))
    assert (clipped[0, 0] - at[0, 4]).abs().max() < TOL


def test_full_softmax_loss_is_exact_cross_entropy_over_every_item():
    m = make_model().float().train()
    h = make_history([8, 5, 12])
    B, W = h.items.shape
    targets = next_item_targets(h)
    hidden = torch.randn(B, W, m.config.d_model)
    loss = full_softmax_loss(m, hidden, targets)
    # by hand: every one of the N items is a class (padding row 0 never is), no logQ term
    sel = targets > 0
    u = torch.nn.functional.normalize(m.retrieval_proj(hidden[sel]), dim=-1)
    v = m.item_vectors()[1:]
    logits = u @ v.T / m.config.temperature
    assert logits.shape == (int(sel.sum()), N_ITEMS)
    expected = -torch.log_softmax(logits, dim=1).gather(1, (targets[sel] - 1)[:, None]).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    # the loss moves when a single non-target item's vector moves: the whole catalog is in it
    never = sorted(set(range(1, N_ITEMS + 1)) - set(targets[sel].tolist()))[0]
    with torch.no_grad():
        m.item_emb.weight[never] = m.retrieval_proj(hidden[sel]).mean(0) * 10
    assert full_softmax_loss(m, hidden, targets) > loss + 1e-3
    # no targets -> zero loss that still backpropagates
    assert full_softmax_loss(m, hidden, torch.zeros_like(targets)).item() == 0.0


def test_training_forward_with_full_softmax():
    for kind in ("unified", "retrieval_only", "interleaved"):
        m = make_model(kind).float().train()
        h = make_history([8, 5, 12])
        batch = train_batch(h, next_item_targets(h))
        loss, stats = train_loss(m, batch, full_softmax=True, num_uniform_negatives=0, num_inbatch_negatives=0)
        assert torch.isfinite(loss) and stats["retrieval_loss"] > 0
        loss.backward()
        assert m.item_emb.weight.grad[1:].abs().sum(1).gt(0).all()  # every item gets a gradient


# --- item categories (use_category) -----------------------------------------------------------

N_CATS = 4


def make_category_model(kind="unified", time_gap="previous", seed=0) -> UniPinRec:
    m = make_model(kind, time_gap, seed=seed, use_category=True, num_categories=N_CATS)
    with torch.no_grad():  # a visible category signal (the init is small, std 0.02)
        m.category_emb.weight[1:].normal_(0, 1.0)
    m.set_item_categories(torch.arange(N_ITEMS) % N_CATS)
    return m


def test_category_changes_tokens_item_vectors_and_scores():
    m = make_category_model()
    h = make_history([7, 12, 3])
    cand = candidates(3, 5)
    with torch.no_grad():
        u1, c1 = m.encode_history(h)
        s1, v1 = m.rank(cand, c1), m.item_vectors()
        cats = m.item_category.clone()
        m.set_item_categories((torch.arange(N_ITEMS) + 1) % N_CATS)  # every item moves to another category
        u2, c2 = m.encode_history(h)
        s2, v2 = m.rank(cand, c2), m.item_vectors()
    assert cats[0] == 0 and cats[1:].tolist() == [c % N_CATS + 1 for c in range(N_ITEMS)]  # row 0 = padding
    assert (u1 - u2).abs().max() > 1e-3 and (s1 - s2).abs().max() > 1e-3
    assert (v1[1:] - v2[1:]).abs().max() > 1e-3  # retrieval item vectors carry the category too
    assert v2[0].abs().max() == 0 and torch.allclose(v2[1:].norm(dim=1), torch.ones(N_ITEMS, dtype=v2.dtype))
    # the item vectors are item + category embeddings, normalised
    expected = torch.nn.functional.normalize(m.item_emb.weight[1:] + m.category_emb(m.item_category[1:]), dim=-1)
    assert (v2[1:] - expected).abs().max() < TOL
    # items of one category share its embedding: the category is a real input of the same model
    off = make_model(seed=0)
    with torch.no_grad():
        assert (off.encode_history(h)[0] - u1).abs().max() > 1e-3


def test_unknown_category_is_the_padding_row_and_bad_input_is_refused():
    m = make_category_model()
    m.set_item_categories(torch.tensor([-1] * N_ITEMS))
    assert m.item_category.abs().max() == 0
    with pytest.raises(ValueError, match="out of range"):
        m.set_item_categories(torch.full((N_ITEMS,), N_CATS))
    with pytest.raises(ValueError, match="item categories"):
        m.set_item_categories(torch.zeros(N_ITEMS - 1))
    with pytest.raises(ValueError, match="num_categories"):
        UniPinRec(ModelConfig(num_items=3, num_actions=2, num_tasks=1, use_category=True))
    with pytest.raises(RuntimeError, match="use_category"):
        make_model().set_item_categories(torch.zeros(N_ITEMS))


@pytest.mark.parametrize("kind", ["unified", "interleaved"])
@pytest.mark.parametrize("time_gap", ["previous", "request"])
def test_rank_over_cache_equals_full_recompute_with_categories(kind, time_gap):
    m = make_category_model(kind, time_gap)
    h = make_history([7, 12, 1, 4])
    cand = candidates(4, 6)
    with torch.no_grad():
        _, cache = m.encode_history(h)
        scores = m.rank(cand, cache)
        assert_scores_equal_training_forward_and_recompute(m, h, cand, scores)
        # and an extended cache equals a full encode
        old = hist(h.items[:, :3] * (torch.arange(3)[None] < h.lengths.clamp(max=3)[:, None]),
                           h.actions[:, :3], h.ts[:, :3], h.surfaces[:, :3], h.lengths.clamp(max=3), h.request_ts)
        n = h.lengths - old.lengths
        W = h.items.shape[1]
        idx = (old.lengths[:, None] + torch.arange(W)[None]).clamp(max=W - 1)
        pick = lambda t: torch.gather(t, 1, idx) * (torch.arange(W)[None] < n[:, None])  # noqa: E731
        new = hist(pick(h.items), pick(h.actions), pick(h.ts), pick(h.surfaces), n, h.request_ts)
        u_ext, ext = m.extend_history(m.encode_history(old)[1], new)
        assert (u_ext - m.encode_history(h)[0]).abs().max() < TOL
        assert (m.rank(cand, ext) - scores).abs().max() < TOL


def test_category_training_losses_use_the_category_and_train_it():
    m = make_category_model().float().train()
    h = make_history([8, 5, 12])
    B, W = h.items.shape
    targets = next_item_targets(h)
    # the full-softmax loss scores every item by item + category, as item_vectors() does
    hidden = torch.randn(B, W, m.config.d_model)
    sel = targets > 0
    u = torch.nn.functional.normalize(m.retrieval_proj(hidden[sel]), dim=-1)
    logits = u @ m.item_vectors()[1:].T / m.config.temperature
    expected = -torch.log_softmax(logits, dim=1).gather(1, (targets[sel] - 1)[:, None]).mean()
    assert torch.allclose(full_softmax_loss(m, hidden, targets), expected, atol=1e-5)
    for full in (False, True):
        m.zero_grad()
        batch = train_batch(h, targets)
        loss, _ = train_loss(m, batch, full_softmax=full, num_uniform_negatives=16, num_inbatch_negatives=8)
        loss.backward()
        assert m.category_emb.weight.grad[1:].abs().sum() > 0
        assert m.category_emb.weight.grad[0].abs().max() == 0  # padding row stays zero
    assert "item_category" in m.state_dict() and m.state_dict()["item_category"].dtype == torch.long


# --- the retrieval match in the ranking head (rank_similarity) ------------------------------------

def make_similarity_model(kind="unified", dropout=0.1) -> UniPinRec:
    m = make_model(kind, rank_similarity=True, dropout=dropout)
    with torch.no_grad():
        m.rank_sim_weight.copy_(torch.tensor([0.3, -0.2, 0.1], dtype=m.rank_sim_weight.dtype))
    return m


@pytest.mark.parametrize("kind", ["unified", "ranking_only", "interleaved"])
def test_rank_similarity_cached_rank_equals_full_recompute(kind):
    m = make_similarity_model(kind)
    h = make_history([7, 12, 1, 4])
    cand = candidates(4, 6)
    with torch.no_grad():
        _, cache = m.encode_history(h)
        scores = m.rank(cand, cache)
        assert_scores_equal_training_forward_and_recompute(m, h, cand, scores)
        plain = m.rank_head(m.blended_forward(h, slate_items=cand).slate_hidden)
    assert (scores - plain).abs().max() > 1e-3  # the match term is there
    assert "rank_sim_weight" in m.state_dict()
    assert "rank_sim_weight" not in make_model(kind).state_dict()  # off by default: old weights load


def test_rank_similarity_training_loss_scores_slate_and_masked_history_like_rank():
    """The training ranking loss (MAM tokens + slate) equals BCE over scores from the serving
    path: a masked history token i is a candidate ranked over the (masked) history before it."""
    m = make_similarity_model("ranking_only", dropout=0.0)
    h = make_history([8, 5, 12])
    h.surfaces.zero_()  # candidate tokens carry surface 0
    batch = train_batch(h, next_item_targets(h))
    m.train()
    torch.manual_seed(123)
    out = m(batch, mam_rate=0.15)
    _, stats = UniPinRecLoss.from_config(TrainConfig())(m, out, batch)
    mam = out.mam_mask
    assert mam.any() and torch.equal(out.rank_mask, mam)
    m.eval()
    masked_actions = torch.where(mam, torch.full_like(h.actions, m.config.mask_action), h.actions)
    hm = hist(h.items, masked_actions, h.ts, h.surfaces, h.lengths, h.request_ts)
    logits, labels = [], []
    with torch.no_grad():
        for b, i in mam.nonzero().tolist():
            _, cache = m.encode_history(row(hm, b, i))
            gap = h.ts[b, i] - h.ts[b, i - 1] if i > 0 else torch.zeros((), dtype=torch.long)
            logits.append(m.rank(h.items[b:b + 1, i:i + 1], cache, candidate_gaps=gap.reshape(1))[0, 0])
            labels.append(batch.history_labels[b, i])
        _, cache = m.encode_history(hm)  # in training the slate, too, sees the masked history
        slate = m.rank(batch.slate_items, cache)
        logits.append(slate[batch.slate_valid])
        labels.append(batch.slate_labels[batch.slate_valid])
    x = torch.cat([t.reshape(-1, N_TASKS) for t in logits])
    y = torch.cat([t.reshape(-1, N_TASKS) for t in labels]).to(x.dtype)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(x, y)
    assert abs(float(stats["ranking_loss"]) - float(expected)) < 1e-6


def test_rank_similarity_weight_learns_from_the_ranking_loss():
    m = make_similarity_model().float().train()
    h = make_history([8, 5, 12])
    loss, _ = train_loss(m, train_batch(h, next_item_targets(h)), num_uniform_negatives=16, num_inbatch_negatives=8)
    loss.backward()
    assert m.rank_sim_weight.grad is not None and m.rank_sim_weight.grad.abs().sum() > 0


def test_bf16_cached_rank_is_within_3e2_of_float64():
    """Serving on a GPU runs the model in bf16: its cached rank (fused candidate attention) stays
    within a relative 3e-2 (||bf16 - fp64|| / ||fp64||) of the float64 scores; NaN never passes."""
    import copy

    m = make_model(dropout=0.0)
    h = make_history([12, 5, 9, 1])
    cand = candidates(4, 16)
    with torch.no_grad():
        ref = m.rank(cand, m.encode_history(h)[1])
        b16 = copy.deepcopy(m).to(torch.bfloat16)
        got = b16.rank(cand, b16.encode_history(h)[1]).double()
    assert got.dtype == ref.dtype and torch.isfinite(got).all()
    rel = float((got - ref).norm() / ref.norm())
    assert rel < 3e-2, rel


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_candidate_attention_kernels_match_fp64(device):
    """rank's history attention comes from the device's fused kernel (CPU flash, CUDA
    memory-efficient in fp32, cuDNN in bf16) with the candidate's own key merged by log-sum-exp:
    against fp64, ragged histories, one of a single action and an empty one (whose candidates
    attend to themselves only), fp32 within 1e-5 and bf16 within 3e-2, all finite."""
    m = make_model(dropout=0.0)
    h, cand = make_history([L, 7, 1, 0], width=L), candidates(4, 9)

    def run(dev, dt):
        mm = m.to(dev, dt)
        hh = h.to(dev)
        with torch.inference_mode():
            return mm.rank(cand.to(dev), mm.encode_history(hh)[1]).double().cpu()

    ref = run("cpu", torch.float64)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        out = run(device, dt)
        assert torch.isfinite(out).all()
        assert (out - ref).abs().max() < tol, (dt, float((out - ref).abs().max()))


@pytest.mark.parametrize("splits", [2, 3, 4])
def test_candidate_attention_in_key_chunks_equals_one_chunk(splits):
    """History attention in chunks of keys side by side (`attention_splits`; what a GPU runs at
    small batches), merged by their log-sum-exps with the candidate's own key, gives the scores of
    one chunk: ragged histories, one row whose last chunks are all padding, an empty one; fp64
    1e-12, fp32 1e-5, bf16 3e-2 (against fp64), all finite."""
    m = make_model(dropout=0.0)
    h, cand = make_history([L, 7, 1, 0], width=L), candidates(4, 9)
    with torch.inference_mode():
        ref = m.to(torch.float64).rank(cand, m.encode_history(h)[1])
        for dt, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
            mm = m.to(dt)
            mm.attention_splits = splits
            got = mm.rank(cand, mm.encode_history(h)[1]).double()
            assert torch.isfinite(got).all() and (got - ref).abs().max() < tol, (dt, float((got - ref).abs().max()))
    m.attention_splits = None


def test_history_splits_fill_the_gpu_at_small_batches_only():
    """The chunk count: 1 on a CPU; on a GPU of 132 multiprocessors, chunks until the (64-query,
    head) tiles would pass it, each at least 128 keys and an even share of the width."""
    import unipinrec.attention as attention

    gpu = torch.device("cuda", 0)
    attention._SMS[0] = 132  # as an H200 reports it (the rule alone is tested: no GPU needed)
    try:
        assert attention.history_splits(1, 4, 256, 2048, torch.device("cpu")) == 1
        assert attention.history_splits(1, 4, 256, 2048, gpu) == 8  # 16 tiles -> 128
        assert attention.history_splits(8, 4, 256, 2048, gpu) == 1  # 128 tiles already
        assert attention.history_splits(64, 4, 256, 2048, gpu) == 1
        assert attention.history_splits(1, 4, 256, 256, gpu) == 2  # chunks of 128 keys at least
        assert attention.history_splits(1, 4, 256, 96, gpu) == 1
        assert attention.history_splits(1, 4, 256, 384, gpu) == 2  # 3 * 128: halves only once
    finally:
        attention._SMS.pop(0, None)


def test_candidate_attention_falls_back_to_the_next_kernel(monkeypatch):
    """A history-attention kernel this build or GPU lacks (cuDNN's on an older GPU, say) gives a
    warning and the next kernel, here the reference formula, with the same scores (fp64 1e-10)."""
    import unipinrec.attention as attention

    m = make_model(dropout=0.0)
    h, cand = make_history([L, 5, 0], width=L), candidates(3, 7)
    with torch.inference_mode():
        ref = m.rank(cand, m.encode_history(h)[1])

    def missing(*args):
        raise NotImplementedError("no such kernel in this build")

    monkeypatch.setitem(attention._HISTORY_KERNELS, "flash_cpu", missing)
    monkeypatch.setattr(attention, "_CHOSEN_KERNEL", {})
    with pytest.warns(UserWarning, match="flash_cpu kernel is not available"), torch.inference_mode():
        got = m.rank(cand, m.encode_history(h)[1])
    assert attention._CHOSEN_KERNEL[(torch.device("cpu"), torch.float64)] == "reference"
    assert (got - ref).abs().max() < 1e-10


def test_kv_row_with_a_known_length_equals_the_row_read_from_the_device():
    """KVCache.row(b, length) (the serving path, which knows each row's length on the host and so
    does not wait for the device) stores exactly what row(b) does, for ragged rows and an empty one."""
    m = make_model(dropout=0.0)
    lengths = [L, 5, 1, 0]
    kv = m.encode_history(make_history(lengths, width=L))[1]
    for b, n in enumerate(lengths):
        a, c = kv.row(b), kv.row(b, n)
        assert all(torch.equal(x, y) for x, y in zip(a.keys + a.values, c.keys + c.values))
        assert torch.equal(a.user_vectors, c.user_vectors)
        for name in (*a.history.per_action_fields(), "lengths", "request_ts"):
            assert torch.equal(getattr(a.history, name), getattr(c.history, name)), (b, name)
        assert a.keys[0].is_contiguous() and c.keys[0].shape[2] == max(1, n) * kv.tokens_per_action


def test_kv_row_is_one_copy_of_the_row_in_one_buffer():
    """A stored row holds every layer's keys and values in one allocation (one copy per stored
    request, not one per layer, key and value), trimmed to the row's length, equal to the batch's
    slices, and independent of the batch (the batch may be a CUDA graph's reused buffers)."""
    m = make_model(dropout=0.0)
    lengths = [L, 3]
    with torch.inference_mode():  # as serving runs it
        kv = m.encode_history(make_history(lengths, width=L))[1]
        kv = kv._with(lambda t: t.contiguous(), kv.history, kv.user_vectors)  # stand-alone buffers, as a graph's
        r = kv.row(1, 3)
    wt = 3 * kv.tokens_per_action
    for got, full in zip(r.keys + r.values, kv.keys + kv.values):
        assert got.shape == (1, full.shape[1], wt, full.shape[3]) and got.is_contiguous()
        assert torch.equal(got, full[1:2, :, :wt])
    assert len({t.untyped_storage().data_ptr() for t in r.keys + r.values}) == 1
    flat = r.keys[0].untyped_storage().nbytes()
    assert flat == sum(t.numel() * t.element_size() for t in r.keys + r.values)  # no padding bytes held
    before = r.keys[-1].clone()
    with torch.inference_mode():
        for t in kv.keys + kv.values:
            t.zero_()  # the batch's buffers reused: the stored row keeps its values
    assert torch.equal(r.keys[-1], before) and r.keys[-1].abs().sum() > 0


def test_kv_rows_of_a_batch_equal_each_row_and_own_their_bytes():
    """`rows` (how a batch of misses is stored) gives each row exactly what `row` gives it: trimmed,
    copied in one call, a buffer per row for its keys and values and one for its history."""
    m = make_model(dropout=0.0)
    lengths = [L, 3, 5]
    with torch.inference_mode():
        kv = m.encode_history(make_history(lengths, width=L))[1]
        kv = kv._with(lambda t: t.contiguous(), kv.history, kv.user_vectors)
        got = kv.rows([2, 0], [5, L])
        want = [kv.row(2, 5), kv.row(0)]
    for g, w in zip(got, want):
        for a, b in zip(g.keys + g.values, w.keys + w.values):
            assert torch.equal(a, b) and a.is_contiguous()
        for name in (*g.history.per_action_fields(), "lengths", "request_ts"):
            assert torch.equal(getattr(g.history, name), getattr(w.history, name))
        assert torch.equal(g.user_vectors, w.user_vectors) and g.nbytes == w.nbytes
        assert g.stacked() is not None and len({t.untyped_storage().data_ptr() for t in g.keys + g.values}) == 1
        names = g.history.per_action_fields()
        assert len({getattr(g.history, n).untyped_storage().data_ptr() for n in names}) == 1
    assert got[0].keys[0].untyped_storage().data_ptr() != got[1].keys[0].untyped_storage().data_ptr()
    assert got[0].history.lengths.tolist() == [5] and got[1].keys[0].shape[2] == L * kv.tokens_per_action
