"""UniPinRec: one causal transformer for retrieval and ranking (arXiv 2606.00422).

One token per history action: item + action (with a MASK action) + log time-gap bucket +
absolute position (+ surface) (+ item category, `use_category`) embeddings, through a pre-norm causal transformer. Its outputs
feed a retrieval head (L2-normalised user vector vs item vectors) and, through the same
layers' keys/values, a ranking head in which each candidate token (MASK action, next position)
attends to the cached history and to itself only. With `rank_similarity` the ranking logits also
get the retrieval tower's user-item cosine (learnt weight per task): the match of interest and
item that an MLP over the candidate token cannot form as a product.

Histories are RIGHT-padded: real tokens at positions 0..len-1; the user vector is the output
at position len-1; candidates (and training slate tokens) sit at position len.

Time gaps (`time_gap`):
- "previous" (default): a history token's gap is ts - ts of the action before it (0 for the
  first kept action); a candidate's gap is request_ts - ts of the last action. A token's
  embedding then never depends on when the request comes, so appending actions leaves the
  already-encoded tokens (and their keys/values) unchanged: serving can extend a cached KV
  incrementally across requests (`extend_history`).
- "request": request_ts - ts, the gap to the request; every token changes with the
  request time, so `extend_history` re-encodes.

Baselines of the same size live in the same class (`kind`): "retrieval_only" (SASRec-style:
no ranking loss, no MAM; `rank` raises), "ranking_only" (no retrieval loss) and "interleaved"
(item and action as separate tokens, 2L long; the MAM ablation: item tokens predict their
action, action tokens feed retrieval). The config is `model_config.py` (torch-free); `forward`
returns outputs, the training losses over them are `losses.py`. Imports torch only.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

if TYPE_CHECKING:
    from .batches import TrainBatch
    from .sequences import Actions

from .attention import history_attention, history_splits
from .model_config import KINDS, ModelConfig  # noqa: F401  (re-exported: `from unipinrec.model import ModelConfig`)


def time_bucket(gaps: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """Log buckets of a gap in seconds: floor(2 * log2(1 + gap)), clipped to [0, num_buckets)."""
    g = gaps.clamp(min=0).to(torch.float64)
    return torch.floor(2.0 * torch.log2(g + 1.0)).long().clamp(max=num_buckets - 1)


def _one_buffer(like: list[torch.Tensor]) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """Empty tensors shaped like `like`: views of one new buffer when they are alike (one
    allocation), else one each; -> (the buffer or None, the tensors)."""
    if len({(t.shape, t.dtype) for t in like}) == 1:
        buffer = like[0].new_empty((len(like), *like[0].shape))
        return buffer, list(buffer.unbind(0))
    return None, [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in like]


def _if_viewed(buffer: torch.Tensor | None, first: torch.Tensor) -> torch.Tensor | None:
    """buffer, when `first` (the first of the tensors made as its views) still starts it."""
    return buffer if buffer is not None and buffer.data_ptr() == first.data_ptr() else None


@dataclass(kw_only=True)
class KVCache:
    """Per-layer keys/values of encoded histories, the histories they encode (to extend them)
    and the user vectors.

    keys[i], values[i]: (B, H, Wt, Dh) with Wt = tokens (L, or 2L interleaved); positions at
    and after lengths * tokens_per_action are padding (their contents are undefined).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    history: "Actions"  # (B, W) what was encoded: item rows, action ids, ts, ... and request_ts
    user_vectors: torch.Tensor  # (B, D)
    tokens_per_action: int = 1
    buffer: torch.Tensor | None = None  # (2 x layers, B, H, Wt, Dh) when keys, then values, are its views
    history_buffer: torch.Tensor | None = None  # (fields, B, W) when the history's per-action fields are its views

    @property
    def lengths(self) -> torch.Tensor:
        return self.history.lengths  # (B,) actions per row

    @property
    def request_ts(self) -> torch.Tensor:
        return self.history.request_ts

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def padding_mask(self) -> torch.Tensor:
        """(B, Wt) True at real tokens."""
        Wt = self.keys[0].shape[2]
        return torch.arange(Wt, device=self.lengths.device)[None] < (self.lengths * self.tokens_per_action)[:, None]

    def last_ts(self) -> torch.Tensor:
        """(B,) ts of each row's last action (0 where the history is empty)."""
        return self.history.last("ts")

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (keys, values, history, user vectors)."""
        kv = sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
        return kv + self.history.nbytes + self.user_vectors.numel() * self.user_vectors.element_size()

    def stacked(self) -> torch.Tensor | None:
        """(2 x layers, B, H, Wt, Dh): the one buffer keys then values are views of (as `row`
        makes them), so copying a cached row is one copy; None when they are separate tensors."""
        return _if_viewed(self.buffer, self.keys[0])

    def history_stacked(self) -> torch.Tensor | None:
        """(fields, B, W): the one buffer the history's per-action fields are views of (as `rows`
        makes them), so a cached row's history goes into a batch in one copy; else None."""
        return _if_viewed(self.history_buffer, self.history.items)

    def _with(self, kv_fn, history: "Actions", user_vectors: torch.Tensor) -> "KVCache":
        return KVCache(keys=[kv_fn(k) for k in self.keys], values=[kv_fn(v) for v in self.values], history=history,
                       user_vectors=user_vectors, tokens_per_action=self.tokens_per_action)

    def index_select(self, rows) -> "KVCache":
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        return self._with(lambda t: t.index_select(0, rows), self.history.index_select(rows), self.user_vectors[rows])

    def __getitem__(self, rows) -> "KVCache":
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        if isinstance(rows, slice):
            rows = torch.arange(self.batch_size, device=self.lengths.device)[rows]
        return self.index_select(rows)

    def to(self, device) -> "KVCache":
        return self._with(lambda t: t.to(device), self.history.to(device), self.user_vectors.to(device))

    def row(self, b: int, length: int | None = None) -> "KVCache":
        """Row b as a cache of one (`rows`). length: row b's number of actions when the caller
        knows it; else it is read from the device, which waits for the work in flight (on a GPU,
        the whole batch's graph)."""
        return self.rows([b], [int(self.lengths[b]) if length is None else int(length)])[0]

    def rows(self, index: Sequence[int], lengths: Sequence[int]) -> list["KVCache"]:
        """Rows `index` as caches of one, each trimmed to its `lengths` actions (no padding bytes)
        and copied, never a view of the batch (it may be a CUDA graph's reused buffers): what the
        cross-request cache stores. A row's keys and values share one buffer (`buffer`), its
        history another, and all the batch's copies go in one call: a GPU batch of 64 misses
        spent 13 ms storing its rows one copy at a time, as long as the batch itself took. The rows
        are detached: a stored cache is never differentiated."""
        with torch.no_grad():
            return self._rows(index, lengths)

    def _rows(self, index: Sequence[int], lengths: Sequence[int]) -> list["KVCache"]:
        kv, h = (*self.keys, *self.values), self.history
        names, n_layers = h.per_action_fields(), len(self.keys)
        dst, src, out = [], [], []
        for b, n in zip(index, lengths):
            wt, w = max(1, n * self.tokens_per_action), max(1, n)
            parts = ([t[b:b + 1, :, :wt] for t in kv], [getattr(h, name)[b:b + 1, :w] for name in names],
                     [h.lengths[b:b + 1], h.request_ts[b:b + 1]], [self.user_vectors[b:b + 1]])
            made = [_one_buffer(part) for part in parts]
            dst += [t for _, ts in made for t in ts]
            src += [t for part in parts for t in part]
            (buffer, kv_row), (fields, acts), (_, (lengths_, request_ts)), (_, (user,)) = made
            out.append(KVCache(keys=kv_row[:n_layers], values=kv_row[n_layers:], user_vectors=user, buffer=buffer,
                               history=replace(h, **dict(zip(names, acts)), lengths=lengths_, request_ts=request_ts),
                               tokens_per_action=self.tokens_per_action, history_buffer=fields))
        if dst:
            torch._foreach_copy_(dst, src)
        return out

    @staticmethod
    def cat(caches: list["KVCache"]) -> "KVCache":
        """Stack caches of different widths into one batch (padding to the widest)."""
        Wt = max(c.keys[0].shape[2] for c in caches)
        pad = lambda t: F.pad(t, (0, 0, 0, Wt - t.shape[2]))  # noqa: E731
        n_layers = len(caches[0].keys)
        return KVCache(
            keys=[torch.cat([pad(c.keys[i]) for c in caches]) for i in range(n_layers)],
            values=[torch.cat([pad(c.values[i]) for c in caches]) for i in range(n_layers)],
            history=type(caches[0].history).cat([c.history for c in caches]),
            user_vectors=torch.cat([c.user_vectors for c in caches]), tokens_per_action=caches[0].tokens_per_action,
        )


@dataclass
class ForwardOutput:
    retrieval_hidden: torch.Tensor  # (B, W, D) output that predicts the next item, per action
    ranking_hidden: torch.Tensor  # (B, W, D) output that predicts each action's own tasks
    slate_hidden: torch.Tensor | None  # (B, S, D)
    token_valid: torch.Tensor  # (B, W) real actions
    # set by forward() for the losses (unipinrec.losses):
    mam_mask: torch.Tensor | None = None  # (B, W) history tokens given the MASK action
    rank_mask: torch.Tensor | None = None  # (B, W) history tokens the ranking loss reads


# ---------------------------------------------------------------------------------------------
# Layers


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def _heads(self, x: torch.Tensor):
        B, N, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)
        return [t.view(B, N, self.n_heads, self.d_head).transpose(1, 2) for t in (q, k, v)]  # (B, H, N, Dh)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        B, H, N, Dh = y.shape
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, N, H * Dh)))

    def forward(self, x, mask, past_k=None, past_v=None):
        """x (B, N, D); mask (B, 1, N, Np + N) bool, True = may attend, or None: plain causal
        (right-padded histories: a real token's causal keys are all real, and padded tokens'
        outputs are never read, so the flash kernel serves them unmasked). Returns (y, k, v)."""
        q, k, v = self._heads(x)  # (B, H, N, Dh)
        keys = k if past_k is None else torch.cat([past_k, k], dim=2)
        values = v if past_v is None else torch.cat([past_v, v], dim=2)
        y = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None,
        )
        return self._merge(y), k, v

    def attend_candidates(self, x, past_k, past_v, history_bias, splits: int = 1):
        """Each candidate attends to the cached history and to itself only, without copying the
        cache: fused attention over the history keys (with its log-sum-exp), in `splits` chunks
        of keys side by side (`history_splits`: only so does a small batch fill a GPU), then
        the candidate's own key folded into the same softmax. No (B, H, C, Wt) scores in memory
        and no [history; candidate] concatenation (which cost more than the attention on a GPU).

        x (B, C, D); past_k/v (B, H, Wt, Dh); history_bias (B, 1, 1, Wt) from `history_bias`.
        """
        q, k, v = self._heads(x)  # (B, H, C, Dh)
        if past_k.shape[2] == 0:
            return self._merge(v)
        B, H, C, Dh = q.shape
        y, lse = history_attention(q, past_k, past_v, history_bias, splits)  # (B, S, H, C, Dh), (B, S, H, C)
        f = torch.promote_types(q.dtype, torch.float32)  # the softmax in fp32 (fp64 stays fp64)
        own = (q * k).sum(-1, dtype=f) * self.d_head ** -0.5  # (B, H, C) each candidate's own score
        w = torch.softmax(torch.cat([lse.to(f), own[:, None]], dim=1), dim=1).to(v.dtype)  # (B, S + 1, H, C)
        if splits == 1:  # one kernel: (1 - w_own) * y + w_own * v
            return self._merge(torch.lerp(y[:, 0], v, w[:, 1, ..., None]))
        return self._merge((w[..., None] * torch.cat([y, v[:, None]], dim=1)).sum(1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model), nn.GELU(),
            nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout),
        )

    def forward(self, x, mask, past_k=None, past_v=None):
        a, k, v = self.attn(self.ln1(x), mask, past_k, past_v)
        x = x + a
        return x + self.mlp(self.ln2(x)), k, v

    def forward_candidates(self, x, past_k, past_v, history_bias, splits: int = 1):
        x = x + self.attn.attend_candidates(self.ln1(x), past_k, past_v, history_bias, splits)
        return x + self.mlp(self.ln2(x))


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, N) real-token flags -> (B, 1, N, N): causal, real keys only, every query sees itself
    (so padded queries never have an all-False row)."""
    N = valid.shape[1]
    tril = torch.ones(N, N, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(N, dtype=torch.bool, device=valid.device)
    return ((tril[None] & valid[:, None, :]) | eye[None])[:, None]


def history_bias(past_valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, Wt) real history tokens -> (B, 1, 1, Wt) additive bias: 0 at real tokens, a large
    finite negative at padding (finite: a row with no real token, a padded batch row, gets
    weight exactly 0 after the merge with the candidate's own key instead of NaN)."""
    neg = torch.finfo(dtype).min / 2
    return torch.zeros(past_valid.shape, dtype=dtype, device=past_valid.device).masked_fill(~past_valid, neg)[:, None, None]


def blended_mask(valid: torch.Tensor, num_slate: int) -> torch.Tensor:
    """History (B, N) + S slate tokens -> (B, 1, N+S, N+S): history causal and blind to the
    slate; each slate token sees every real history token and itself, no other slate token."""
    B, N = valid.shape
    S = num_slate
    top = torch.cat([causal_mask(valid)[:, 0], valid.new_zeros(B, N, S)], dim=2)  # (B, N, N+S)
    eye = torch.eye(S, dtype=torch.bool, device=valid.device)
    bottom = torch.cat([valid[:, None, :].expand(B, S, N), eye[None].expand(B, S, S)], dim=2)  # (B, S, N+S)
    return torch.cat([top, bottom], dim=1)[:, None]


# ---------------------------------------------------------------------------------------------
# The model


class UniPinRec(nn.Module):
    # the per-action fields it reads; a subclass over an `Actions` subclass embeds the added
    # fields in `_action_features` (docs/extending.md)
    actions_type: type = None  # set below: sequences.Actions

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.num_items <= 0 or cfg.num_actions <= 0 or cfg.num_tasks <= 0:
            raise ValueError("ModelConfig needs num_items, num_actions and num_tasks resolved (> 0)")
        self.config = cfg
        D = cfg.d_model
        self.item_emb = nn.Embedding(cfg.num_items + 1, D, padding_idx=0)
        self.action_emb = nn.Embedding(cfg.num_actions + 1, D)  # + MASK
        self.time_emb = nn.Embedding(cfg.time_buckets, D)
        self.pos_emb = nn.Embedding(cfg.max_history + 1, D)  # candidates sit at position len <= L
        self.surface_emb = nn.Embedding(cfg.num_surfaces, D) if cfg.use_surface else None
        self.category_emb = None
        if cfg.use_category:
            if cfg.num_categories <= 0:
                raise ValueError("use_category needs num_categories resolved (> 0)")
            self.category_emb = nn.Embedding(cfg.num_categories + 1, D, padding_idx=0)  # row 0: padding/unknown
            # item row -> category row (category id + 1; 0 for padding and unknown): a buffer, so it
            # travels in the state_dict (safetensors weights, content hash); set_item_categories fills it
            self.register_buffer("item_category", torch.zeros(cfg.num_items + 1, dtype=torch.long))
        self.slate_pos_emb = nn.Embedding(cfg.slate_positions, D) if cfg.slate_positions else None
        self.action_token_emb = nn.Parameter(torch.zeros(D))  # marks action tokens (interleaved)
        self.drop = nn.Dropout(cfg.dropout)
        self.attention_splits: int | None = None  # candidate attention's key chunks; None: `history_splits`
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(D)
        self.retrieval_proj = nn.Linear(D, D)
        self.rank_head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, cfg.num_tasks))
        self.apply(self._init)
        self.rank_sim_weight = nn.Parameter(torch.zeros(cfg.num_tasks)) if cfg.rank_similarity else None

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()

    def set_item_categories(self, categories) -> None:
        """categories: N category ids (>= 0, or < 0 = unknown), in item-row order 1..N."""
        if self.category_emb is None:
            raise RuntimeError("this model was built without use_category")
        c = torch.as_tensor(categories, dtype=torch.long).reshape(-1)
        if c.numel() != self.config.num_items:
            raise ValueError(f"{c.numel()} item categories given, the model embeds {self.config.num_items} items")
        if c.numel() and int(c.max()) >= self.config.num_categories:
            raise ValueError(f"category {int(c.max())} is out of range: num_categories is {self.config.num_categories}")
        rows = torch.where(c >= 0, c + 1, torch.zeros_like(c))
        with torch.no_grad():
            self.item_category[0] = 0
            self.item_category[1:] = rows.to(self.item_category.device)

    def _item_embed(self, items: torch.Tensor) -> torch.Tensor:
        """Item rows (any shape) -> item embeddings (+ category embedding when enabled)."""
        x = self.item_emb(items)
        if self.category_emb is not None:
            x = x + self.category_emb(self.item_category[items])
        return x

    def _item_table(self) -> torch.Tensor:
        """(N+1, D) un-normalised item vectors of every row (row 0 = padding)."""
        w = self.item_emb.weight
        if self.category_emb is not None:
            w = w + self.category_emb(self.item_category)
        return w

    def _rank_logits(self, h, user_vectors=None, items=None):
        """Ranking head: h (..., D) -> (..., T); with rank_similarity, plus the scaled cosine of
        user_vectors (..., D, L2-normalised or zero) and the items' retrieval vectors (...)."""
        logits = self.rank_head(h)
        if self.rank_sim_weight is None:
            return logits
        with torch.autocast(h.device.type, enabled=False):
            v = F.normalize(self._item_embed(items).float(), dim=-1)
            sim = (user_vectors.float() * v).sum(-1, keepdim=True) / self.config.temperature  # (..., 1)
            return logits.float() + sim * self.rank_sim_weight

    # --- tokens -------------------------------------------------------------------------------

    def _gaps(self, ts, prev_ts, request_ts):
        if self.config.time_gap == "request":
            return request_ts[:, None] - ts
        prev = torch.cat([prev_ts[:, None], ts[:, :-1]], dim=1)
        return ts - prev

    def _surface(self, surfaces):
        if self.surface_emb is None:
            return 0.0
        return self.surface_emb(surfaces.clamp(0, self.config.num_surfaces - 1))

    def _action_features(self, history: "Actions", pos: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        """Embeddings of a token's per-action inputs other than its action: item, time gap,
        position, surface. A model over an `Actions` subclass with more fields adds theirs here."""
        cfg = self.config
        return (self._item_embed(history.items) + self.time_emb(time_bucket(gaps, cfg.time_buckets))
                + self.pos_emb(pos) + self._surface(history.surfaces))  # (B, W, D)

    def _history_tokens(self, history: "Actions", start=None, prev_ts=None):
        """(B, W) actions -> tokens (B, W * tokens_per_action, D) and their real flags.

        start (B,): position of the first token (0 for a fresh encode); prev_ts (B,): ts of the
        action before the first one (None: none, gap 0)."""
        cfg = self.config
        B, W = history.items.shape
        ar = torch.arange(W, device=history.items.device)
        valid = ar[None] < history.lengths[:, None]  # (B, W)
        start = torch.zeros_like(history.lengths) if start is None else start
        prev_ts = history.ts[:, 0] if prev_ts is None else prev_ts
        pos = (start[:, None] + ar[None]).clamp(max=cfg.max_history)  # padding clamps harmlessly
        base = self._action_features(history, pos, self._gaps(history.ts, prev_ts, history.request_ts))
        if cfg.kind == "interleaved":
            item_tok = base + self.action_emb.weight[cfg.mask_action]
            act_tok = self.action_emb(history.actions) + self.pos_emb(pos) + self.action_token_emb
            x = torch.stack([item_tok, act_tok], dim=2).reshape(B, 2 * W, -1)  # (B, 2W, D)
            return x, valid.repeat_interleave(2, dim=1)
        return base + self.action_emb(history.actions), valid

    def default_candidate_gaps(self, lengths, last_ts, request_ts):
        """(B,) gap of a candidate: request_ts - last action ts ("previous"), 0 ("request")."""
        if self.config.time_gap == "request":
            return torch.zeros_like(request_ts)
        return torch.where(lengths > 0, request_ts - last_ts, torch.zeros_like(request_ts))

    def _candidate_tokens(self, candidates, lengths, gaps, slate_positions=None):
        """candidates (B, C) item rows at position len with the MASK action -> (B, C, D).
        slate_positions (B, C): where each was shown (used only when config.slate_positions > 0)."""
        cfg = self.config
        if gaps.dim() == 1:
            gaps = gaps[:, None]
        pos = lengths.clamp(max=cfg.max_history)[:, None]  # (B, 1)
        x = self._item_embed(candidates) + self.action_emb.weight[cfg.mask_action] + self.pos_emb(pos)
        x = x + self.time_emb(time_bucket(gaps, cfg.time_buckets)).expand_as(x)
        if self.slate_pos_emb is not None:
            sp = torch.zeros_like(candidates) if slate_positions is None else slate_positions
            x = x + self.slate_pos_emb(sp.clamp(0, cfg.slate_positions - 1))
        return x + self._surface(torch.zeros_like(candidates))

    # --- training forward -------------------------------------------------------------------

    def blended_forward(self, history, slate_items=None, mam_mask=None, slate_positions=None) -> ForwardOutput:
        """History (+ slate tokens appended with MASK) through the encoder, as in training.

        mam_mask (B, W) bool: history tokens whose action is replaced by MASK."""
        cfg = self.config
        if mam_mask is not None:
            masked = torch.where(mam_mask, torch.full_like(history.actions, cfg.mask_action), history.actions)
            history = replace(history, actions=masked)
        x, valid = self._history_tokens(history)  # (B, N, D)
        N = x.shape[1]
        if slate_items is not None and slate_items.shape[1] > 0:
            gaps = self.default_candidate_gaps(history.lengths, history.last("ts"), history.request_ts)
            s = self._candidate_tokens(slate_items, history.lengths, gaps, slate_positions)
            x = torch.cat([x, s], dim=1)  # (B, N+S, D)
            mask = blended_mask(valid, slate_items.shape[1])
        else:
            mask = causal_mask(valid)
        x = self.drop(x)
        for block in self.blocks:
            x, _, _ = block(x, mask)
        x = self.ln_f(x)
        h, slate = x[:, :N], (x[:, N:] if x.shape[1] > N else None)
        if cfg.kind == "interleaved":  # item tokens predict their action, action tokens the next item
            return ForwardOutput(h[:, 1::2], h[:, 0::2], slate, valid[:, 0::2])
        return ForwardOutput(h, h, slate, valid)

    def forward(self, batch: "TrainBatch", *, mam_rate: float = 0.0) -> ForwardOutput:
        """Training forward: MAM (in train mode, for kinds that use it; a share `mam_rate` of the
        real history tokens get the MASK action), then the blended forward with the slate.
        Returns the outputs with the masks the losses need; the losses are `unipinrec.losses`."""
        cfg = self.config
        hist = batch.history
        valid = torch.arange(hist.items.shape[1], device=hist.items.device)[None] < hist.lengths[:, None]
        use_mam = cfg.uses_mam and self.training and mam_rate > 0
        mam = (torch.rand(valid.shape, device=valid.device) < mam_rate) & valid if use_mam else None
        out = self.blended_forward(hist, batch.slate_items if cfg.has_ranking_head else None, mam,
                                   getattr(batch, "slate_positions", None))
        # interleaved: every item token predicts its action (it never sees it); otherwise the MAM tokens
        rank_mask = out.token_valid if cfg.kind == "interleaved" else mam
        return replace(out, mam_mask=mam, rank_mask=rank_mask)

    # --- serving API ----------------------------------------------------------------------------

    def _position_user_vectors(self, retrieval_hidden):
        """(B, W, D) retrieval outputs -> L2-normalised user vectors at every history position."""
        return F.normalize(self.retrieval_proj(retrieval_hidden).float(), dim=-1)

    def _user_vectors(self, h_tokens, lengths):
        """Output at the last real token -> L2-normalised user vectors (B, D); zero if empty."""
        tpa = self.config.tokens_per_action
        idx = (lengths * tpa - 1).clamp(min=0)
        last = h_tokens[torch.arange(h_tokens.shape[0], device=h_tokens.device), idx]  # (B, D)
        u = F.normalize(self.retrieval_proj(last), dim=-1)
        return torch.where((lengths > 0)[:, None], u, torch.zeros_like(u))

    def encode_history(self, history: "Actions") -> tuple[torch.Tensor, KVCache]:
        """-> (user_vectors (B, D) L2-normalised, kv_cache). Histories right-padded, len <= L."""
        if history.items.shape[1] > self.config.max_history:
            raise ValueError(f"history width {history.items.shape[1]} exceeds max_history {self.config.max_history}")
        x, _ = self._history_tokens(history)  # (B, Wt, D)
        x = self.drop(x)
        keys, values = [], []
        for block in self.blocks:
            x, k, v = block(x, None)  # causal: right padding needs no mask (CausalSelfAttention.forward)
            keys.append(k)
            values.append(v)
        user = self._user_vectors(self.ln_f(x), history.lengths)
        cache = KVCache(keys=keys, values=values, history=history, user_vectors=user,
                        tokens_per_action=self.config.tokens_per_action)
        return user, cache

    def extend_history(self, kv_cache: KVCache, new_actions: "Actions") -> tuple[torch.Tensor, KVCache]:
        """Append each row's new actions (right-padded, chronological) to the cached history.

        Equals a full `encode_history` of the concatenated history (the new request_ts taken
        from `new_actions`). Incremental when time_gap == "previous" and no row overflows L;
        otherwise the whole history is re-encoded (positions or gaps of old tokens change)."""
        cfg = self.config
        c, n = kv_cache, new_actions
        total = c.lengths + n.lengths
        if cfg.time_gap == "request" or int(total.max()) > cfg.max_history:
            joined = c.history.append(n)
            return self.encode_history(joined.keep_last(min(int(total.max()), cfg.max_history)))
        prev_ts = torch.where(c.lengths > 0, c.last_ts(), n.ts[:, 0])
        x, valid_new = self._history_tokens(n, start=c.lengths, prev_ts=prev_ts)  # (B, Nn, D)
        B, Nn = valid_new.shape
        past_valid = c.padding_mask  # (B, Wc)
        Wc = past_valid.shape[1]
        mask = torch.cat([past_valid[:, None, :].expand(B, Nn, Wc), causal_mask(valid_new)[:, 0]], dim=2)[:, None]
        tpa = cfg.tokens_per_action
        dest = (c.lengths * tpa)[:, None] + torch.arange(Nn, device=x.device)[None]  # (B, Nn)
        width = int(total.max()) * tpa
        x = self.drop(x)
        keys, values = [], []
        for block, pk, pv in zip(self.blocks, c.keys, c.values):
            x, k, v = block(x, mask, pk, pv)
            idx = dest[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            keys.append(F.pad(pk, (0, 0, 0, Nn)).scatter(2, idx, k)[:, :, :width])
            values.append(F.pad(pv, (0, 0, 0, Nn)).scatter(2, idx, v)[:, :, :width])
        user_new = self._user_vectors(self.ln_f(x), n.lengths)
        user = torch.where((n.lengths > 0)[:, None], user_new, c.user_vectors)
        return user, KVCache(keys=keys, values=values, history=c.history.append(n), user_vectors=user,
                             tokens_per_action=tpa)

    def rank(self, candidates: torch.Tensor, kv_cache: KVCache, candidate_gaps: torch.Tensor | None = None,
             slate_positions: torch.Tensor | None = None) -> torch.Tensor:
        """candidates (B, C) item rows -> task logits (B, C, T). Each candidate token (MASK action,
        position len) attends to the cached history keys/values and to itself only.
        slate_positions (B, C): only for models with config.slate_positions > 0; default 0."""
        if self.config.kind == "retrieval_only":
            raise RuntimeError("a retrieval_only model has no ranking head; use a unified or ranking_only model")
        c = kv_cache
        if candidate_gaps is None:
            candidate_gaps = self.default_candidate_gaps(c.lengths, c.last_ts(), c.request_ts)
        x = self._candidate_tokens(candidates, c.lengths, candidate_gaps, slate_positions)  # (B, C, D)
        bias = history_bias(c.padding_mask, c.keys[0].dtype if c.keys else x.dtype)  # built once for every layer
        B, C, _ = x.shape
        splits = history_splits(B, self.config.n_heads, C, c.keys[0].shape[2] if c.keys else 0, x.device) \
            if self.attention_splits is None else self.attention_splits
        for block, pk, pv in zip(self.blocks, c.keys, c.values):
            x = block.forward_candidates(x, pk, pv, bias, splits)
        return self._rank_logits(self.ln_f(x), c.user_vectors[:, None, :], candidates)  # (B, C, T)

    def item_vectors(self) -> torch.Tensor:
        """(N+1, D) L2-normalised retrieval item vectors; row 0 (padding) is zero."""
        v = F.normalize(self._item_table(), dim=-1)
        return torch.cat([torch.zeros_like(v[:1]), v[1:]])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _last_row(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x (B, W, D) -> (B, D) the row at lengths - 1; zero where the history is empty."""
    idx = (lengths - 1).clamp(min=0)
    last = x[torch.arange(x.shape[0], device=x.device), idx]
    return torch.where((lengths > 0)[:, None], last, torch.zeros_like(last))


def _default_actions_type() -> type:
    from .sequences import Actions

    return Actions


UniPinRec.actions_type = _default_actions_type()


def resolve(cfg: ModelConfig, *, num_items: int, num_actions: int, num_tasks: int, kind: str | None = None,
            num_categories: int | None = None) -> ModelConfig:
    """Fill the data-dependent sizes (and optionally the kind) of a config. num_categories (the
    data's) is used only when the config leaves it at 0."""
    out = replace(cfg, num_items=num_items, num_actions=num_actions, num_tasks=num_tasks, kind=kind or cfg.kind)
    if cfg.num_categories == 0 and num_categories:
        out = replace(out, num_categories=num_categories)
    return out
