"""Streaming summaries: fused and eager reductions agree; top-k merges exactly; ties are stable."""

import numpy as np
import pytest
import torch

from atlas.dataset.topk import HIST_EDGES, KINDS, LayerSummary, TopK, histogram, reduce_positions


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_and_eager_reductions_agree_with_the_definition(channels_last, kind):
    act = torch.randn(3, 5, 7, 6, generator=torch.Generator().manual_seed(0))
    act[1, 2] = 0.0  # a silent map: its zero count is every position
    if channels_last:
        act = act.contiguous(memory_format=torch.channels_last)
    flat = act.flatten(2)
    expected = {"max": flat.amax(2), "pos": flat.argmax(2), "min": flat.amin(2), "min_pos": flat.argmin(2),
                "sum": flat.sum(2), "sumsq": (flat ** 2).sum(2), "zeros": (flat <= 0).sum(2)}
    for fuse in (False, True):
        r = reduce_positions(act, fuse, kind)
        assert set(r) == set(KINDS[kind][1])
        for name, value in r.items():
            if name in ("pos", "min_pos"):  # the silent map ties everywhere: any position of its extreme
                extreme = expected["max" if name == "pos" else "min"]
                assert torch.equal(flat.gather(2, value[..., None])[..., 0], extreme)
            else:
                torch.testing.assert_close(value.to(expected[name].dtype), expected[name], rtol=1e-5, atol=1e-5)
        if "zeros" in r:
            assert r["zeros"][1, 2] == 42


@pytest.mark.parametrize("fuse", [False, True])
def test_extreme_positions_are_the_first_of_ties_and_valid_where_a_map_is_nan(fuse):
    act = torch.zeros(2, 1, 3, 4)
    act[0, 0, 1, 2] = act[0, 0, 2, 0] = 5.0  # two maxima: the first in reading order (6) counts
    act[0, 0, 0, 3] = act[0, 0, 2, 3] = -1.0  # two minima: position 3 before 11
    act[1, 0, 1, 1] = float("nan")
    r = reduce_positions(act.contiguous(memory_format=torch.channels_last), fuse, "extremes")
    assert r["pos"][0, 0] == 6 and r["min_pos"][0, 0] == 3
    assert 0 <= r["pos"][1, 0] < 12 and 0 <= r["min_pos"][1, 0] < 12  # a box can still be cut


def test_a_summary_read_between_batches_equals_one_read_at_the_end():
    act = torch.randn(40, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    once, often = LayerSummary(3, 5, fuse=False), LayerSummary(3, 5, fuse=False)
    for a in range(0, 40, 8):
        for s in (once, often):
            s.add(act[a:a + 8], torch.arange(a, a + 8), (a, a + 7))
        often.arrays()  # folds what it holds
    for key, value in once.arrays().items():
        np.testing.assert_array_equal(value, often.arrays()[key], err_msg=key)


def test_topk_keeps_the_best_and_breaks_ties_by_lower_index():
    t = TopK(2, 3, largest=True)
    values = torch.tensor([[1.0, 5.0, 5.0, 2.0], [0.0, -1.0, 3.0, 3.0]])
    t.update(values[:, :2], torch.tensor([0, 1]), torch.zeros(2, 2, dtype=torch.long))
    t.update(values[:, 2:], torch.tensor([2, 3]), torch.ones(2, 2, dtype=torch.long))
    assert t.index.tolist() == [[1, 2, 3], [2, 3, 0]]
    assert t.pos.tolist() == [[0, 1, 1], [1, 1, 0]]
    low = TopK(2, 2, largest=False)
    low.update(values, torch.arange(4), torch.zeros(2, 4, dtype=torch.long))
    assert low.index.tolist() == [[0, 3], [1, 0]]


def test_shards_merge_to_the_single_stream():
    gen = torch.Generator().manual_seed(3)
    acts = (torch.randn(24, 4, 3, 3, generator=gen) * 2).round()  # rounded: many ties
    whole = LayerSummary(4, 5, fuse=False)
    for a in range(0, 24, 8):
        whole.add(acts[a:a + 8], torch.arange(a, a + 8))
    shards = []
    for a in range(0, 24, 6):
        s = LayerSummary(4, 5, fuse=False)
        s.add(acts[a:a + 6], torch.arange(a, a + 6))
        shards.append(s)
    merged = TopK(4, 5, largest=True)
    for s in shards:
        merged.update(s.top.value, s.top.index, s.top.pos)
    assert torch.equal(merged.index, whole.top.index) and torch.equal(merged.pos, whole.top.pos)
    total = {k: sum(s.stats[k] for s in shards) for k in ("sum", "sumsq", "zeros", "count", "hist")}
    for k, v in total.items():
        torch.testing.assert_close(v, whole.stats[k])


def test_histogram_bins_are_fixed_and_count_every_image():
    peak = torch.tensor([[0.0, -3.0], [0.5, 1e6], [-1e-3, 2.0]])
    counts = histogram(peak)
    assert counts.sum(1).tolist() == [3, 3]
    for c in range(2):
        expected = np.histogram(np.clip(peak[:, c].numpy(), HIST_EDGES[0], HIST_EDGES[-1]), HIST_EDGES)[0]
        assert counts[c].tolist() == expected.tolist()


def _post_relu_batch():
    """Six images of one channel, 2 x 3 maps: a ReLU unit whose pre-activation is known."""
    pre = torch.full((6, 1, 2, 3), -0.5)
    pre[1, 0, 0, 0] = 2.0  # fires: the top image
    pre[3, 0, 1, 1] = 0.5  # fires a little
    pre[4, 0, 1, 2] = -9.0  # most suppressed, at (1, 2)
    pre[2, 0, 0, 1] = -4.0  # next
    pre[5, 0, 0, 0] = -0.1  # silent after the ReLU, but closest to firing of the silent ones
    return pre, pre.clamp(min=0)


def test_bottom_examples_of_a_post_relu_unit_rank_by_what_suppresses_it():
    pre, act = _post_relu_batch()
    s = LayerSummary(1, 3, fuse=False)
    s.add_pre(pre)
    s.add(act, torch.arange(6), (0, 5))
    assert s.bottom.index.tolist() == [[4, 2, 0]] and s.bottom.pos.tolist() == [[5, 1, 0]]
    assert s.bottom.value.tolist() == [[-9.0, -4.0, -0.5]]  # the pre-activation: how hard it was pushed down
    # the top: the ReLU's zeros are told apart by the pre-activation, not by dataset order
    assert s.top.index.tolist() == [[1, 3, 5]] and s.top.value.tolist() == [[2.0, 0.5, 0.0]]
    assert s.top.key.tolist() == [[2.0, 0.5, pytest.approx(-0.1)]] and s.top.pos.tolist() == [[0, 4, 0]]
    plain = LayerSummary(1, 3, fuse=False)  # without the pre-activation: every silent image ties at 0
    plain.add(act, torch.arange(6), (0, 5))
    assert plain.bottom.index.tolist() == [[0, 1, 2]] and plain.top.index.tolist() == [[1, 3, 0]]  # dataset order


def test_summaries_with_pre_activations_merge_to_the_single_stream():
    pre = (torch.randn(24, 3, 4, 4, generator=torch.Generator().manual_seed(5)) * 2).round()
    whole = LayerSummary(3, 4, fuse=False)
    for a in range(0, 24, 8):
        whole.add_pre(pre[a:a + 8])
        whole.add(pre[a:a + 8].clamp(0, 6), torch.arange(a, a + 8))
    merged = LayerSummary(3, 4, fuse=False)
    for a in (12, 0):  # in any order
        s = LayerSummary(3, 4, fuse=False)
        s.add_pre(pre[a:a + 12])
        s.add(pre[a:a + 12].clamp(0, 6), torch.arange(a, a + 12))
        merged.merge(s.arrays())
    for t, u in ((merged.top, whole.top), (merged.bottom, whole.bottom)):
        assert torch.equal(t.index, u.index) and torch.equal(t.pos, u.pos) and torch.equal(t.value, u.value)
