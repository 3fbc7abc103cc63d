from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from unipinrec import format as fmt
from unipinrec.actions import SYNTHETIC
from unipinrec.batches import ItemVocab, TaskSpec, batch_histories, collate_examples
from unipinrec.config import TaskConfig


def test_item_vocab_roundtrip(tmp_path):
    v = ItemVocab([50, 10, 30])
    assert v.lookup([10, 50, 30]).tolist() == [2, 1, 3]
    assert v.ids([0, 1, 3]).tolist() == [-1, 50, 30]
    assert v.lookup([10, 99], unknown=0).tolist() == [2, 0]
    with pytest.raises(KeyError, match="99"):
        v.lookup([10, 99])
    v.save(tmp_path / "items.parquet")
    w = ItemVocab.load(tmp_path / "items.parquet")
    assert w.item_ids.tolist() == [50, 10, 30] and w.num_rows == 4
    with pytest.raises(ValueError, match="duplicates"):
        ItemVocab([1, 1])


def test_history_batch_from_histories_truncates_and_names_bad_input():
    v = ItemVocab([7, 8, 9])
    h = batch_histories([[(7, 1, 10), (8, 2, 20, 1), (9, 1, 30)], []], [40, 50], v, max_history=2)
    assert h.items.tolist() == [[2, 3], [0, 0]]
    assert h.actions.tolist() == [[2, 1], [0, 0]]
    assert h.surfaces.tolist() == [[1, 0], [0, 0]]
    assert h.lengths.tolist() == [2, 0] and h.request_ts.tolist() == [40, 50]
    with pytest.raises(ValueError, match=r"history\[1\]\[1\]\.item_id.*42"):
        batch_histories([[(7, 1, 1)], [(7, 1, 1), (42, 1, 2)]], [5, 5], v, 10)
    with pytest.raises(ValueError, match=r"history\[0\]\[1\]\.action"):
        batch_histories([[(7, 1, 1), (8, 9, 2)]], [5], v, 10, num_actions=5)
    with pytest.raises(ValueError, match=r"history\[0\]\[1\]\.ts"):
        batch_histories([[(7, 1, 5), (8, 1, 2)]], [9], v, 10)


def test_from_histories_into_a_static_buffer_is_views_of_it_with_the_same_batch():
    """A GPU graph's static input: the batch copied into `out` once, its fields views of it."""
    from unipinrec.sequences import Actions, History

    hs = [History(items=[3, 4, 5], actions=[1, 2, 1], ts=[1, 2, 3]), History(items=[6], actions=[0], ts=[9])]
    want = Actions.from_histories(hs, [10, 20], rows=4, width=8)
    out = torch.full((Actions.flat_size(4, 8),), -1, dtype=torch.long)
    got = Actions.from_histories(hs, [10, 20], rows=4, width=8, out=out)
    for name in (*Actions.per_action_fields(), "lengths", "request_ts"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert getattr(got, name).untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    assert (out >= 0).all()  # every element written: padding rows and columns too
    assert torch.equal(Actions.of_flat(out, 4, 8).items, want.items)
    with pytest.raises(ValueError, match="out: 10 elements, the batch needs"):
        Actions.from_histories(hs, [10, 20], rows=4, width=8, out=torch.zeros(10, dtype=torch.long))


def test_stack_rows_builds_from_histories_batch_from_rows_already_on_the_device():
    """The cross-request cache's hits: each cached row's fields (one buffer, as `KVCache.rows`
    stores a row) into one padded batch by device copies, with the lengths and the request times
    of now (they may differ from the cached ones): the batch from_histories builds, every padding
    element zero, in `out` when given."""
    from unipinrec.model import KVCache
    from unipinrec.sequences import Actions, History

    hs = [History(items=[3, 4, 5], actions=[1, 2, 1], ts=[1, 2, 3], surfaces=[0, 1, 1]),
          History(items=[6], actions=[0], ts=[9])]
    want = Actions.from_histories(hs, [10, 20], rows=4, width=8)
    batch = Actions.from_histories(hs, [99, 99])  # as first served: other request times
    kv = KVCache(keys=[torch.zeros(2, 1, 3, 1)], values=[torch.zeros(2, 1, 3, 1)], history=batch,
                 user_vectors=torch.zeros(2, 2))
    fields = [r.history_stacked() for r in kv.rows([0, 1], [3, 1])]
    assert all(f is not None for f in fields) and [f.shape for f in fields] == [(4, 1, 3), (4, 1, 1)]
    assert kv.history_stacked() is None  # a batch's own fields are not one cached buffer
    tail = torch.tensor([3, 1, 0, 0, 10, 20, 0, 0])
    out = torch.full((Actions.flat_size(4, 8),), -1, dtype=torch.long)
    for got in (Actions.stack_rows(fields, tail, rows=4, width=8, out=out),
                Actions.stack_rows(fields, tail, rows=4, width=8)):
        for name in (*Actions.per_action_fields(), "lengths", "request_ts"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert (out >= 0).all() and torch.equal(Actions.of_flat(out, 4, 8).items, want.items)


def _examples() -> pa.Table:
    rows = [
        {"user_id": 1, "request_ts": 100,
         "history": [{"item_id": 10, "action": 1, "ts": 1, "surface": 0},
                     {"item_id": 11, "action": 4, "ts": 2, "surface": 1},
                     {"item_id": 12, "action": 2, "ts": 3, "surface": 0}],
         "slate": [{"item_id": 13, "position": 1, "action": 2}, {"item_id": 14, "position": 0, "action": 0},
                   {"item_id": 15, "position": 2, "action": 1}]},
        {"user_id": 2, "request_ts": 200,
         "history": [{"item_id": 14, "action": 3, "ts": 5, "surface": 0}],
         "slate": []},
    ]
    return pa.Table.from_pylist(rows, schema=fmt.UNIFIED_EXAMPLE_SCHEMA)


def test_collate_examples_labels_targets_and_slate_order():
    vocab = ItemVocab([10, 11, 12, 13, 14, 15])
    spec = TaskSpec.resolve(TaskConfig(), SYNTHETIC)  # engaged=click/save/share, saved=save, hidden=hide
    assert spec.names == ("engaged", "saved", "hidden")
    b = collate_examples(_examples(), vocab, spec, max_history=2)
    h = b.history
    assert h.items.tolist() == [[2, 3], [5, 0]]  # last 2 kept
    assert h.lengths.tolist() == [2, 1] and h.actions.tolist() == [[4, 2], [3, 0]]
    assert b.slate_items.tolist() == [[5, 4, 6], [0, 0, 0]]  # position order
    assert b.slate_valid.tolist() == [[True, True, True], [False, False, False]]
    # history labels: hide -> hidden; save -> engaged + saved; share -> engaged
    assert b.history_labels[0].tolist() == [[0, 0, 1], [1, 1, 0]]
    assert b.history_labels[1, 0].tolist() == [1, 0, 0]
    assert b.slate_labels[0].tolist() == [[0, 0, 0], [1, 1, 0], [1, 0, 0]]
    # targets: position 0 -> item at 1 (save, positive); last -> first positive slate item (13 at position 1)
    assert b.targets.tolist() == [[3, 4], [0, 0]]
    assert b.num_tokens == 2 + 1 + 3
    # max_slate keeps the first positions
    b2 = collate_examples(_examples(), vocab, spec, max_history=5, max_slate=1)
    assert b2.slate_items.tolist() == [[5], [0]]
    assert b2.targets[0].tolist() == [0, 3, 0]  # no positive in the kept slate


def test_task_spec_names_bad_actions():
    with pytest.raises(ValueError, match="tasks.bad"):
        TaskSpec.resolve(TaskConfig(tasks={"bad": ["nope"]}, score_weights={}), SYNTHETIC)


def test_collate_reads_sliced_record_batches():
    table = _examples()
    vocab = ItemVocab([10, 11, 12, 13, 14, 15])
    spec = TaskSpec.resolve(TaskConfig(), SYNTHETIC)
    b = collate_examples(table.slice(1, 1), vocab, spec, max_history=5)
    assert b.history.items.tolist() == [[5]] and b.history.request_ts.tolist() == [200]
    assert isinstance(b.history.items, torch.Tensor) and b.history.items.dtype == torch.long
    assert np.isclose(float(b.history_labels.sum()), 1.0)


def test_check_histories_equals_check_history_one_by_one():
    """The batched validation (one pass over all histories) gives each history the rows or the
    error, naming the same action, that checking it alone gives."""
    import numpy as np

    from unipinrec.batches import ItemVocab
    from unipinrec.sequences import ActionError, History, check_histories, check_history

    vocab = ItemVocab(np.arange(10, 60))
    h = lambda items, actions, ts: History(items=items, actions=actions, ts=ts)  # noqa: E731
    hs = [h([10, 11, 12], [0, 1, 2], [1, 2, 3]), h([], [], []), h([13, 99, 14], [0, 0, 0], [5, 6, 7]),
          h([15, 16], [0, 7], [1, 2]), h([17, 18, 19], [0, 0, 0], [9, 3, 10]), h([20], [1], [0]),
          h([21, 22], [0, 0], [100, 100]), h([23, -5], [0, 0], [1, 2]), h([24, 25], [-1, 0], [1, 2]), h([], [], [])]
    offsets = [0, 0, 5, 0, 2, 0, 0, 0, 0, 0]
    got = check_histories(hs, vocab, 5, offsets=offsets)
    alone = [check_histories([hist], vocab, 5, offsets=[off])[0] for hist, off in zip(hs, offsets)]  # batch of one
    for g, one, hist, off in zip(got, alone, hs, offsets):
        try:
            want = check_history(hist, vocab, 5, offset=off)
        except ActionError as e:
            for got_ in (g, one):
                assert isinstance(got_, ActionError) and (got_.field, got_.message) == (e.field, e.message)
        else:
            assert not isinstance(g, ActionError) and g.tolist() == want.tolist() == one.tolist()
    assert [type(g).__name__ for g in got].count("ActionError") == 5
    assert (got[7].field, got[8].field) == ("history[1].item_id", "history[0].action")
    assert vocab.lookup([-1, -5, 10, 59, 60, 2**40], unknown=0).tolist() == [0, 0, 1, 50, 0, 0]
    with pytest.raises(KeyError, match="item_id -5 "):
        vocab.lookup([10, -5, 2**40])
    assert check_histories(hs[:2] + hs[5:], vocab, 5)[3].tolist() == [12, 13]
