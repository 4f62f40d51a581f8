import pytest
import torch

from lit_robust.functional.ablations import ablation_masks, ablation_positions
from lit_robust.functional.derandomized_smoothing import (CertifiedAccuracy, ablation_votes, block_delta, certified,
                                                          certified_correct, certified_margin, column_delta,
                                                          patch_delta, smoothed_prediction, vote_counts)


def test_vote_counts_from_predictions():
    predictions = torch.tensor([[0, 2, 2, 1], [3, 3, 3, 3]])
    assert vote_counts(predictions, 4).tolist() == [[1, 1, 2, 0], [0, 0, 0, 4]]
    with pytest.raises(ValueError, match="num_classes"):
        vote_counts(torch.tensor([[5]]), 4)


def test_ties_go_to_the_lowest_class():
    counts = torch.tensor([[3, 5, 5, 0], [2, 2, 2, 2], [0, 0, 1, 7]])
    assert smoothed_prediction(counts).tolist() == [1, 0, 3]


def test_deltas_match_the_paper():
    assert column_delta(2, 4) == 5  # m + b − 1
    assert column_delta(5, 19, stride=10) == 3  # ⌈23/10⌉
    assert block_delta(2, 4, 1) == 25
    assert block_delta(32, 75, 10) == 121  # ⌈106/10⌉²
    with pytest.raises(ValueError):
        column_delta(0, 4)


@pytest.mark.parametrize("kind,width,stride,m", [("column", 4, 1, 1), ("column", 4, 1, 4), ("column", 4, 2, 3),
                                                   ("column", 3, 4, 2), ("block", 4, 1, 2), ("block", 5, 4, 3)])
def test_exact_delta_equals_the_closed_form_when_the_stride_divides_the_side(kind, width, stride, m):
    size = (16, 16)
    masks = ablation_masks(kind, ablation_positions(kind, size, width, stride), size, width)
    closed = column_delta(m, width, stride) if kind == "column" else block_delta(m, width, stride)
    assert patch_delta(masks, m) == closed


def test_exact_delta_exceeds_the_closed_form_when_the_stride_does_not_divide():
    # 10 columns, bands of width 3 at stride 4: {0,1,2}, {4,5,6}, {8,9,0}. Across the wrap two bands share column 0,
    # so the patch over columns 0–1 meets two ablations while the closed form ⌈(2 + 3 − 1)/4⌉ says one.
    masks = ablation_masks("column", ablation_positions("column", (10, 10), 3, 4), (10, 10), 3)
    assert column_delta(2, 3, 4) == 1
    assert patch_delta(masks, 2) == 2


def test_certificate_is_strict():
    # margin 10: certified iff 10 > 2Δ
    counts = torch.tensor([[12, 2, 0]])
    assert certified_margin(counts).tolist() == [10]
    assert certified(counts, 4).tolist() == [True]
    assert certified(counts, 5).tolist() == [False]  # 12 > 2 + 10 is false: a tie never certifies
    tie = torch.tensor([[6, 6, 0]])
    assert certified(tie, 0).tolist() == [False]


def test_certified_correct_needs_the_right_class():
    counts = torch.tensor([[20, 1, 1], [1, 20, 1], [9, 8, 0]])
    targets = torch.tensor([0, 0, 0])
    assert certified_correct(counts, targets, 2).tolist() == [True, False, False]


def test_certified_accuracy_metric_accumulates_over_batches():
    metric = CertifiedAccuracy({1: 2, 2: 5})
    metric.update(torch.tensor([[20, 1], [1, 20]]), torch.tensor([0, 0]))
    metric.update(torch.tensor([[9, 0], [6, 5]]), torch.tensor([0, 0]))
    result = metric.compute()
    assert result["acc"].item() == pytest.approx(0.75)  # 3 of 4 predicted correctly
    assert result["acc_m1"].item() == pytest.approx(0.5)  # margins 19 and 9 > 4; 1 is not
    assert result["acc_m2"].item() == pytest.approx(0.25)  # only 19 > 10


def _flippable(counts: tuple[int, ...], delta: int) -> bool:
    """Brute force on the votes: can changing the predictions of at most ``delta`` ablations (any votes taken from
    any classes, given to any classes) change the smoothed prediction (ties to the lowest index)?"""
    classes = len(counts)

    def g(votes):
        return max(range(classes), key=lambda c: (votes[c], -c))

    start = g(counts)
    frontier = {counts}
    for _ in range(delta):  # one changed ablation at a time: a vote moves from one class to another
        frontier = {tuple(v - (c == src) + (c == dst) for c, v in enumerate(votes))
                    for votes in frontier for src in range(classes) if votes[src] for dst in range(classes)}
        if any(g(votes) != start for votes in frontier):
            return True
    return False


def _vote_vectors(total: int, classes: int):
    if classes == 1:
        yield (total,)
        return
    for first in range(total + 1):
        for rest in _vote_vectors(total - first, classes - 1):
            yield (first, *rest)


def test_tight_rule_certifies_exactly_the_vote_vectors_no_small_change_flips():
    """Every vote vector of 1–7 ablations over 3 classes and Δ = 0–3: ``tight`` certifies iff no change of ≤ Δ votes
    flips the prediction (brute force); ``strict`` is sound but misses exactly the ties the prediction wins. Includes
    (2, 4, 2) at Δ = 1, where the runner-ups tie on both sides of g: class 0 wins the tie after one vote moves, so it
    must not certify (ART 1.20.1's levine2020 mode takes the runner-up from ``kthvalue`` and certifies it). Fails
    if the tie rule is dropped, reversed (g above the runner-ups) or applied to one runner-up only."""
    tight_only = 0
    for total in range(1, 8):
        vectors = torch.tensor(list(_vote_vectors(total, 3)))
        for delta in range(4):
            truth = torch.tensor([not _flippable(tuple(v.tolist()), delta) for v in vectors])
            assert torch.equal(certified(vectors, delta, "tight"), truth), (total, delta)
            strict = certified(vectors, delta)
            assert not (strict & ~truth).any()
            tight_only += int((truth & ~strict).sum())
    assert tight_only > 0
    assert certified(torch.tensor([[2, 4, 2]]), 1, "tight").tolist() == [False]
    assert certified(torch.tensor([[0, 4, 2]]), 1, "tight").tolist() == [True]


def test_tight_rule_in_the_metric_and_per_patch_size():
    counts = torch.tensor([[5, 3, 0], [3, 5, 0], [1, 6, 0]])   # margins 2, 2 (g = 1 loses the tie to class 0), 5
    targets = torch.tensor([0, 1, 1])
    for rule, expected in (("strict", [0, 0, 1]), ("tight", [1, 0, 1])):
        assert certified_correct(counts, targets, 1, rule).tolist() == [bool(e) for e in expected]
        metric = CertifiedAccuracy({2: 1, 4: 3}, rule)
        metric.update(counts, targets)
        assert metric.compute()["acc_m2"].item() == pytest.approx(sum(expected) / 3)
        assert metric.compute()["acc_m4"].item() == pytest.approx(0.0)   # margin 5 < 2·3
    with pytest.raises(ValueError, match="rule='loose'"):
        CertifiedAccuracy({2: 1}, "loose")


def test_vote_counts_reject_the_class_index_num_classes_and_accept_int32_predictions():
    for bad in (4, -1):
        with pytest.raises(ValueError, match=r"^predictions outside \[0, 4\)"):
            vote_counts(torch.tensor([[0, bad]]), 4)
    predictions = torch.tensor([[3, 3, 0], [1, 2, 1]], dtype=torch.int32)  # argmax of another backend, not int64
    assert vote_counts(predictions, 4).tolist() == [[1, 0, 0, 2], [0, 2, 1, 0]]


def test_ablation_votes_count_the_argmax_over_every_image_and_ablation():
    """The base classifier here votes for (kept pixel sum mod 3); the counts are checked by looping in Python."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 4, (3, 1, 4, 4), generator=generator).float()
    masks = ablation_masks("column", ablation_positions("column", (4, 4), 2), (4, 4), 2)

    def ablated_logits(x, m):
        kept_sum = (x[:, None] * m[None, :, None]).sum((2, 3, 4)).long()
        return torch.nn.functional.one_hot(kept_sum % 3, 3).float() * 5.0

    counts = [[0] * 3 for _ in images]
    for n in range(len(images)):
        for a in range(len(masks)):
            counts[n][int((images[n, 0] * masks[a]).sum().item()) % 3] += 1
    assert ablation_votes(ablated_logits, images, masks, 3).tolist() == counts


def test_delta_arguments_at_their_bounds():
    assert column_delta(3, 1) == 3  # a band of one column: m positions
    assert block_delta(2, 4) == 25  # the default stride is 1
    for bad in [(0, 4, 1), (2, 0, 1), (2, 4, 0)]:
        with pytest.raises(ValueError, match=r"^patch size .*: all must be positive integers"):
            column_delta(*bad)


def test_exact_delta_equals_brute_force_over_every_patch_placement():
    """Arbitrary masks (not bands): Δ is the largest number of masks with a kept pixel inside one m×m window."""
    generator = torch.Generator().manual_seed(1)
    masks = (torch.rand(6, 7, 9, generator=generator) < 0.08).float()
    for m in (1, 2, 3, 7):
        brute = max(int((masks[:, r:r + m, c:c + m].flatten(1).amax(1) > 0).sum())
                    for r in range(7 - m + 1) for c in range(9 - m + 1))
        assert patch_delta(masks, m) == brute, m
    assert patch_delta(ablation_masks("block", torch.tensor([[0, 0], [5, 5]]), (8, 8), 2), 8) == 2  # m = side
    with pytest.raises(ValueError, match=r"^patch size 9 does not fit a 8×8 image"):
        patch_delta(torch.ones(1, 8, 8), 9)


@pytest.mark.filterwarnings("ignore:.*called before the ``update`` method")
def test_certified_accuracy_at_the_strict_bound_and_for_one_image():
    metric = CertifiedAccuracy({1: 2, 3: 3})
    assert metric.compute()["acc"].item() == 0.0  # nothing seen: 0, not NaN
    metric.update(torch.tensor([[5, 0]]), torch.tensor([0]))  # margin 5: > 2·2, not > 2·3
    assert {k: v.item() for k, v in metric.compute().items()} == {"acc": 1.0, "acc_m1": 1.0, "acc_m3": 0.0}
    metric.update(torch.tensor([[4, 0]]), torch.tensor([0]))  # margin 4 = 2·2: a tie does not certify
    assert metric.compute()["acc_m1"].item() == 0.5
    with pytest.raises(ValueError, match=r"^CertifiedAccuracy needs at least one patch size"):
        CertifiedAccuracy({})


def test_certified_accuracy_merges_ranks_exactly_and_keeps_deltas_out_of_checkpoints():
    """Two "ranks" merged as torchmetrics syncs them equal one metric that saw both batches; Δ comes from the
    config, so a checkpoint of a run with other patch sizes still loads."""
    batches = [(torch.tensor([[9, 0], [3, 4]]), torch.tensor([0, 1])),
               (torch.tensor([[0, 7], [6, 5]]), torch.tensor([1, 1]))]
    ranks = [CertifiedAccuracy({1: 1, 2: 4}) for _ in batches]
    for metric, batch in zip(ranks, batches):
        metric.update(*batch)
    ranks[0].merge_state(ranks[1])
    merged = {k: v.item() for k, v in ranks[0].compute().items()}
    assert merged == pytest.approx({"acc": 0.75, "acc_m1": 0.5, "acc_m2": 0.25})  # margins 9, 1, 7; one wrong
    assert "deltas" not in CertifiedAccuracy({1: 1}).state_dict()
