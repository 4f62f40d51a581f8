"""PatchCleanser (``lit_robust.functional.double_masking``, ``PatchCleanserCertification``): the mask set covers every patch, the
two rules do what Algorithm 1 and Theorem 1 say, the batched table equals a per-mask loop, certified images survive an
exhaustive patch attack, and two DDP ranks give one process's records."""
import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_smoothed_vit import digits, patch_masks, tiny_vit, train_briefly

from lit_robust import ImageClassifier, SmoothedClassifier
from lit_robust.callbacks import PatchCleanserCertification
from lit_robust.datamodules import DigitsDataModule
from lit_robust.functional.augment import random_masking
from lit_robust.functional.double_masking import (certified, double_masking, mask_pairs, mask_positions, mask_set,
                                                  masked_prediction_table, patchcleanser_outcomes)


@pytest.mark.parametrize("size", [(32, 32), (16, 21)])
@pytest.mark.parametrize("k", [2, 3, 6])
def test_mask_set_covers_every_patch_position(size, k):
    """R-covering by brute force: every m×m placement lies wholly inside some mask. Fails for a mask set with a
    narrower mask (p + s − 2), a larger stride or a missing last position n − w."""
    for m in range(1, 6):
        masks = mask_set(size, m, k)
        assert len(masks) <= k * k
        patches = patch_masks(size, m)
        covered = ((patches[:, None] * masks[None]).flatten(2).sum(2) == 0).any(1)  # patch ∩ kept pixels = ∅
        assert covered.all(), f"size {size}, m={m}, k={k}: {int((~covered).sum())} placements uncovered"


def test_mask_geometry_follows_the_paper():
    """§4.3 at n = 32, k = 6: m = 2 → stride 6, width 7, starts 0…24 and the last position 25; m = 3 → aligned."""
    assert mask_positions(32, 2, 6) == (7, [0, 6, 12, 18, 24, 25])
    assert mask_positions(32, 3, 6) == (7, [0, 5, 10, 15, 20, 25])
    assert mask_positions(32, 32, 6) == (32, [0])
    with pytest.raises(ValueError, match="1 ≤ m ≤ 32"):
        mask_positions(32, 33, 6)
    assert mask_positions(10, 3, 1) == (10, [0])          # k = 1: one mask over the whole side
    with pytest.raises(ValueError, match="k=0"):
        mask_positions(10, 3, 0)


def test_each_mask_hides_exactly_its_band_product():
    """Mask (a, b) of the k×k grid hides rows [s_a, s_a + w) × columns [s_b, s_b + w) and keeps the rest (a mask one
    pixel wider still covers every patch, so the covering test alone does not pin the width)."""
    width, starts = mask_positions(16, 3, 3)
    masks = mask_set((16, 16), 3, 3)
    for index, (top, left) in enumerate((t, l) for t in starts for l in starts):
        hidden = torch.zeros(16, 16)
        hidden[top:top + width, left:left + width] = 1
        assert torch.equal(masks[index], 1 - hidden), (top, left)


def table_of(first: list[int], rows: dict[int, list[int]] | None = None) -> torch.Tensor:
    """A one-image prediction table: one-mask predictions ``first`` on the diagonal, every pair's prediction the
    first mask's unless ``rows`` overrides row (and column) i."""
    n = len(first)
    table = torch.tensor(first)[:, None].expand(n, n).clone()
    table = torch.minimum(table, table.T)  # some symmetric fill; the tests set what matters
    for i, row in (rows or {}).items():
        table[i], table[:, i] = torch.tensor(row), torch.tensor(row)
    table.diagonal().copy_(torch.tensor(first))
    return table[None]


def test_algorithm_1_and_theorem_1_on_hand_built_tables():
    """Each case of Algorithm 1 (agreed / first confirmed disagreer / majority) and Theorem 1's all-pairs rule.
    Fails for a stub returning the majority (case II), the last disagreer, or a certificate on the diagonal only."""
    agreed = torch.full((1, 4, 4), 3)
    assert double_masking(agreed, 10)[0].item() == 3 and double_masking(agreed, 10)[1].item() == 0
    assert certified(agreed, torch.tensor([3])).item() and not certified(agreed, torch.tensor([2])).item()
    # masks 1 and 3 disagree with the majority 7; mask 1's second round agrees on 5, mask 3's is refuted at r1 = 1
    confirmed = table_of([7, 5, 7, 2, 7], {3: [2] * 5, 1: [5] * 5})
    prediction, case = double_masking(confirmed, 10)
    assert (prediction.item(), case.item()) == (5, 1)
    refuted = table_of([7, 5, 7, 7], {1: [5, 5, 7, 5]})
    assert double_masking(refuted, 10)[0].item() == 7 and double_masking(refuted, 10)[1].item() == 2
    tie = table_of([4, 1, 4, 1])  # a tie in the majority goes to the lowest class; the disagreers (4) are refuted
    assert double_masking(tie, 10)[0].item() == 1
    off_diagonal = torch.full((1, 3, 3), 6)
    off_diagonal[0, 0, 2] = off_diagonal[0, 2, 0] = 1
    assert not certified(off_diagonal, torch.tensor([6])).item()
    assert double_masking(off_diagonal, 10)[0].item() == 6


def small_cnn(seed: int = 0) -> ImageClassifier:
    torch.manual_seed(seed)
    return ImageClassifier(backbone="small_cnn", backbone_kwargs={"widths": [4, 8, 16]}).eval()


def test_batched_table_equals_a_loop_over_mask_pairs():
    """The stacked, chunked table equals F(x ⊙ r_i ⊙ r_j) run one pair at a time (a wrong pair index, a missing
    symmetric half or a chunk boundary bug changes it)."""
    model = SmoothedClassifier(small_cnn(), max_batch=7)
    images, masks = torch.rand(3, 1, 16, 16), mask_set((16, 16), 3, 3)
    with torch.no_grad():
        table = masked_prediction_table(model.ablated_logits, images, masks, max_images=10)
        for i in range(len(masks)):
            for j in range(len(masks)):
                expected = model(images * (masks[i] * masks[j])).argmax(-1)
                assert torch.equal(table[:, i, j], expected), (i, j)


def test_the_table_is_built_in_chunks_of_at_most_max_images_masked_images():
    """``max_images`` bounds each forward pass (masked images = images × maskings per call), at least one masking per
    call when the batch alone exceeds it; the chunking does not change the table."""
    images, masks = torch.rand(4, 1, 8, 8), mask_set((8, 8), 2, 2)
    sizes = []

    def masked_logits(x, part):
        sizes.append(len(x) * len(part))
        return (x[:, None] * part[None, :, None]).flatten(2)[..., :10]

    whole = masked_prediction_table(masked_logits, images, masks, max_images=4096)
    for max_images, per_call in ((8, 8), (4, 4), (3, 4)):
        sizes.clear()
        assert torch.equal(masked_prediction_table(masked_logits, images, masks, max_images), whole)
        assert max(sizes) == per_call and sum(sizes) == 4 * 10, max_images   # 10 distinct maskings of 4 masks
    sizes.clear()
    masked_prediction_table(masked_logits, images[:1], masks, max_images=3)
    assert max(sizes) == 3


def test_cases_are_decided_per_image_in_a_batch():
    """An agreed image beside a disagreeing one keeps case I while its neighbour gets case II."""
    agreed, confirmed = torch.full((1, 5, 5), 7), table_of([7, 5, 7, 2, 7], {3: [2] * 5, 1: [5] * 5})
    predictions, cases = double_masking(torch.cat([agreed, confirmed]), 10)
    assert predictions.tolist() == [7, 5] and cases.tolist() == [0, 1]


def attacked_contents(model, image, label, masks, where, steps: int = 2) -> list[torch.Tensor]:
    """The image with random, all-0, all-1 and signed-gradient patch content at every placement ``where`` (P, H, W);
    the attack raises the loss on the label summed over every two-mask input (the vote has no gradient)."""
    pairs = masks[mask_pairs(len(masks))].prod(1)
    contents = [torch.rand(len(where), *image.shape), torch.zeros(len(where), *image.shape),
                torch.ones(len(where), *image.shape)]
    content = torch.rand(len(where), *image.shape)
    for _ in range(steps):
        content.requires_grad_(True)
        attacked = image * (1 - where[:, None]) + content * where[:, None]
        with torch.enable_grad():
            logits = model((attacked[:, None] * pairs[None, :, None]).flatten(0, 1))
            loss = F.cross_entropy(logits, label.expand(len(logits)))
            grad, = torch.autograd.grad(loss, content)
        content = (content.detach() + 0.5 * grad.sign()).clamp(0, 1)
    contents.append(content)
    return [image * (1 - where[:, None]) + c * where[:, None] for c in contents]


def test_certified_images_survive_every_patch():
    """Soundness in CI: a small CNN trained for seconds with mask Cutout on 10×10 digits; each of 12 test images gets
    an m×m patch of random, 0, 1 and gradient-attacked content at every placement. No certified image ever changes
    Algorithm 1's prediction, and the attack does break uncertified ones — so a certifier claiming more than Theorem 1
    (every image, or the one-mask diagonal only) or a mask set missing placements fails here."""
    side, m, k = 10, 2, 3
    masks = mask_set((side, side), m, k)
    classifier = small_cnn()
    train_briefly(classifier, lambda x, generator: classifier(random_masking(x, masks, generator=generator)),
                  steps=150, side=side, lr=1e-2)
    model = SmoothedClassifier(classifier)
    images, labels = digits(12, side=side)
    with torch.no_grad():
        is_certified = patchcleanser_outcomes(model.ablated_logits, images, labels, masks, 10)[:, 1].bool()
    where = patch_masks((side, side), m)
    broken = torch.zeros(len(images), dtype=torch.bool)
    for i in range(len(images)):
        for batch in attacked_contents(model, images[i], labels[i], masks, where):
            with torch.no_grad():
                predictions, _ = double_masking(masked_prediction_table(model.ablated_logits, batch, masks), 10)
            broken[i] |= predictions.ne(labels[i]).any()
    assert is_certified.sum() >= 2, f"only {int(is_certified.sum())} certified images: train the model longer"
    assert not (broken & is_certified).any(), f"certified {torch.nonzero(broken & is_certified).flatten()} broken"
    assert broken.any(), "the attack broke no image: it is too weak to test the certificate"


def certify_records(tmp_path, model, **trainer_kwargs) -> dict:
    data = DigitsDataModule(source="sklearn8x8", img_size=16, test_fraction=0.029, batch_size=8, seed=0)
    callback = PatchCleanserCertification(str(tmp_path / "run"), patch_sizes=[2, 3], k=2, batch_size=8)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback], **trainer_kwargs)
    trainer.test(model, datamodule=data, verbose=False)
    return json.loads((tmp_path / "run" / "test_records.json").read_text())


def test_callback_logs_and_writes_records(tmp_path, monkeypatch):
    """The callback's metrics are its records' counts (clean = Algorithm 1 correct, certified ⊆ correct); the records
    name the certifier, k, the cases and each image's fields, and the seconds per image are the time of every batch
    (a clock advancing 1 s a reading: 1 s a batch and patch size) over the images."""
    from lit_robust.callbacks import patchcleanser as module
    from lit_robust.functional.double_masking import CASES

    clock = iter(range(10**6))
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    records = certify_records(tmp_path, small_cnn())
    rows = records["modes"]["model"]["images"]
    assert records["masks"] == {"2": 4, "3": 4} and [r["index"] for r in rows] == list(range(len(rows)))
    assert (records["certifier"], records["k"], records["cases"]) == ("patchcleanser", 2, list(CASES))
    assert all(set(r["m2"]) == set(r["m3"]) == {"prediction", "certified", "case"} for r in rows)
    batches = math.ceil(len(rows) / 8)
    assert records["modes"]["model"]["seconds_per_image"] == {"2": pytest.approx(batches / len(rows)),
                                                              "3": pytest.approx(batches / len(rows))}
    for m in (2, 3):
        clean = sum(r[f"m{m}"]["prediction"] == r["target"] for r in rows) / len(rows)
        cert = sum(r[f"m{m}"]["certified"] for r in rows) / len(rows)
        assert records["metrics"][f"cert/test/clean_m{m}"] == pytest.approx(clean)
        assert records["metrics"][f"cert/test/acc_m{m}"] == pytest.approx(cert) and cert <= clean


@pytest.mark.slow
def test_ddp_records_equal_a_single_process(tmp_path):
    """Two gloo ranks (ddp_spawn) share the split unevenly and gather: the records and metrics equal one process's.
    Marked slow like test_smoothed_vit's DDP test: spawning two ranks takes 30–90 s on the shared CPU. In CI,
    tests/test_example_project.py checks 2 DDP processes against one on the example project's model."""
    model = small_cnn()
    single = certify_records(tmp_path / "single", model)
    ddp = certify_records(tmp_path / "ddp", model, devices=2, strategy="ddp_spawn")
    for records in (single, ddp):
        for mode in records["modes"].values():
            mode.pop("seconds_per_image")
    assert len(single["modes"]["model"]["images"]) % 2 == 1  # uneven shares
    assert ddp["modes"] == single["modes"] and ddp["metrics"] == single["metrics"]


def test_mask_cutout_draws_up_to_two_masks_of_the_set():
    """``ImageClassifier(mask_patch_sizes=…)`` trains on x ⊙ r0 ⊙ r1 with r0, r1 ∈ R ∪ {1}: every augmented image is
    one of those products, and the batch mixes masked and whole images (fails if the option is ignored)."""
    model = ImageClassifier(backbone="small_cnn", mask_patch_sizes=[2], mask_k=3)
    torch.manual_seed(0)
    augmented = model.augment(torch.ones(64, 1, 12, 12))[:, 0]
    options = torch.cat([torch.ones(1, 12, 12), mask_set((12, 12), 2, 3)])
    products = (options[:, None] * options[None]).flatten(0, 1)
    assert (augmented[:, None] == products[None]).flatten(2).all(2).any(1).all()
    assert 0 < augmented.flatten(1).min(1).values.eq(0).sum() < 64


def test_smoothed_vit_is_certified_with_and_without_token_dropping(tmp_path):
    """A ``SmoothedViT`` goes through its own ``ablated_logits``: ``token_dropping=[true, false]`` logs both modes, and
    the table with dropping equals the model's dropped forward on each doubly masked image (fully masked tokens
    dropped), so the callback did not fall back to black pixels on all tokens."""
    model = tiny_vit()
    images, masks = torch.rand(2, 1, 16, 16), mask_set((16, 16), 4, 2)
    with torch.no_grad():
        table = masked_prediction_table(lambda x, r: model.ablated_logits(x, r, token_dropping=True), images, masks)
        for i, j in mask_pairs(len(masks)).tolist():
            expected = model.ablated_logits(images, masks[i:i + 1] * masks[j:j + 1], token_dropping=True)[:, 0]
            assert torch.equal(table[:, i, j], expected.argmax(-1))
    data = DigitsDataModule(source="sklearn8x8", img_size=16, test_fraction=0.029, batch_size=8, seed=0)
    callback = PatchCleanserCertification(str(tmp_path), patch_sizes=[2], k=2, token_dropping=[True, False])
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[callback])
    trainer.test(model, datamodule=data, verbose=False)
    assert {"cert/test/drop/acc_m2", "cert/test/full/clean_m2"} <= set(trainer.callback_metrics)
    assert set(json.loads((tmp_path / "test_records.json").read_text())["modes"]) == {"token_dropping", "all_tokens"}


def test_callback_settings_reach_the_contract_and_the_certifier(monkeypatch):
    """The constructor hands every setting to ``Certification``'s contract (and keeps the paper's k = 6), refuses
    k < 1 naming it; each evaluation call adds its images to the shared count and its time per patch size (the
    records' seconds per image), and returns ``patchcleanser_outcomes`` with the class count and ``max_images`` given
    (no masked batch larger). Catches a setting dropped for its default, an overwritten count or time, and
    outcomes computed with other arguments."""
    from lit_robust.callbacks import patchcleanser as module

    normalization = ((0.5,), (0.25,))
    callback = PatchCleanserCertification("out", patch_sizes=[2], k=3, token_dropping=[True], splits=("val",),
                                          batch_size=5, split="holdout", item_keys=("pixels", "digit"),
                                          normalization=normalization, max_images=7)
    assert (callback.output_dir, callback.patch_sizes, callback.k, callback.token_dropping, callback.splits,
            callback.batch_size, callback.split, callback.item_format.item_keys, callback.normalization,
            callback.max_images) == ("out", [2], 3, [True], ["val"], 5, "holdout", ("pixels", "digit"),
                                     normalization, 7)
    default = PatchCleanserCertification()
    assert (default.k, default.max_images, default.batch_size, default.patch_sizes) == (6, 4096, 64, [1, 2, 3, 4])
    assert PatchCleanserCertification(k=1).k == 1
    with pytest.raises(ValueError, match="k=0: use k ≥ 1"):
        PatchCleanserCertification(k=0)

    clock = iter([0.0, 2.0, 10.0, 13.0])
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    model, masks = small_cnn(), mask_set((8, 8), 2, 3)
    batches = []

    def classify(images, mask_batch):
        batches.append(len(images) * len(mask_batch))
        with torch.no_grad():
            masked = (images[:, None] * mask_batch[None, :, None]).flatten(0, 1)
            return model(masked).view(len(images), len(mask_batch), -1)

    images, targets = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    seconds, shared = {2: 0.0}, [0]
    evaluate = callback._outcomes({2: masks}, seconds, shared)
    first = evaluate(classify, images, targets, 10)
    evaluate(classify, images[:2], targets[:2], 10)
    assert shared == [6] and seconds == {2: 5.0}
    assert max(batches) <= 7
    expected = patchcleanser_outcomes(classify, images, targets, masks, 10, 7)
    assert first.shape == (4, 1, 3) and torch.equal(first[:, 0], expected)
