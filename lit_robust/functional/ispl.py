"""Inverse Self-Paced Learning and boosting over homogeneous sets (seed 003: §4.2 Algorithm 1, §5 Algorithm 2, App. B).

A dirty-label backdoor adds a small set of samples (source images + trigger, labelled as the target class) that is
consistent with itself but contradicts the rest of the data. ISPL repeatedly trains a weak learner on a random
α-fraction of a shrinking subset and keeps the β-fraction with the lowest (momentum-smoothed) loss: this finds a
*homogeneous* component — a set whose members explain each other — and peeling off such components partitions the
training set (Algorithm 2, run once per component). A weak learner fitted to each component then votes on every
sample; samples whose label disagrees with the modal vote are the poisons (Algorithm 1, applied per sample as in
App. B). Everything here is a pure function of tensors; members of one call (independent ISPL runs, or the weak
learners of the boosting step) are trained together as one batched ``EnsembleMLP``.

Schedule (App. B): R rounds, round i targets p = 1/(R − i) of the remaining samples with N = 2 + min(3, 1/p)
iterations, β annealed 3p → p over the first three iterations, the lowest-loss p/8 of every class always kept,
α = 1/4, η = 0.9, warm-up 8 epochs then 4 per iteration; 3 ISPL runs → 24 weak learners, each trained 40 epochs; a
final self-training pass re-admits samples a model trained on the kept set agrees with (every 5 epochs, prediction
momentum 0.8). The defaults keep these numbers except the weak learners' architecture and epochs (see
``lit_robust.functional.weak_learners`` for why): an MLP fits a 12 % component of the digits in far fewer than 40 epochs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lit_robust.functional.backdoor_filters import keep_every_class
from lit_robust.functional.weak_learners import EnsembleMLP, fit_members, index_sets, member_logits, member_losses


@dataclass(frozen=True)
class ISPLSchedule:
    """Hyper-parameters of ISPL and boosting (defaults: App. B of seed 003, weak learners adapted to CPU)."""

    rounds: int = 8                  # components per ISPL run (App. B: 8, ≈ 12 % each)
    alpha: float = 0.25              # expansion factor: train on α|S_t| samples (Algorithm 2, line 4)
    eta: float = 0.9                 # loss momentum (Algorithm 2, line 6)
    warmup_epochs: int = 8           # epochs of the first ISPL iteration of a round
    epochs: int = 4                  # epochs of every later ISPL iteration
    class_floor: float = 1.0 / 8     # keep the lowest-loss (class_floor · p) of each class (App. B: p/8)
    learner_epochs: int = 20         # epochs of each boosting weak learner (App. B: 40 on a ResNet; see module doc)
    self_train_epochs: int = 20      # final self-training epochs (App. B: 100); 0 disables it
    resample_every: int = 5          # self-training: re-select agreeing samples every so many epochs
    self_train_momentum: float = 0.8  # self-training: momentum on the predicted probabilities
    hidden: int = 256                # weak learners' hidden width
    lr: float = 1e-3
    batch_size: int = 64

    def __post_init__(self):
        checks = {"rounds ≥ 2": self.rounds >= 2, "0 < alpha ≤ 1": 0 < self.alpha <= 1,
                  "0 ≤ eta < 1": 0 <= self.eta < 1, "epochs ≥ 1": min(self.warmup_epochs, self.epochs) >= 1,
                  "0 ≤ class_floor ≤ 1": 0 <= self.class_floor <= 1, "learner_epochs ≥ 1": self.learner_epochs >= 1,
                  "resample_every ≥ 1": self.resample_every >= 1}
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"ISPLSchedule({self}) violates: {', '.join(failed)}")


def expansion_sample(subset: torch.Tensor, alpha: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample(S, α) of Algorithm 2, line 4: a uniform random ⌈α|S|⌉ of each member's subset.

    ``subset`` is a (members, n) boolean mask; every member's subset must have the same size.
    """
    sizes = subset.sum(1)
    if bool((sizes != sizes[0]).any()):
        raise ValueError(f"expansion_sample needs equal subset sizes per member, got {sizes.tolist()}")
    take = max(1, math.ceil(alpha * int(sizes[0])))
    keys = torch.rand(subset.shape, generator=generator, device=subset.device).masked_fill_(~subset, 2.0)
    chosen = torch.topk(keys, take, dim=1, largest=False).indices
    return torch.zeros_like(subset).scatter_(1, chosen, True)


def loss_momentum(previous: torch.Tensor, losses: torch.Tensor, eta: float) -> torch.Tensor:
    """L ← ηL + (1 − η) R_emp(θ_t; S) (Algorithm 2, line 6): smoothed per-sample losses."""
    return eta * previous + (1.0 - eta) * losses


def annealed_trim_fractions(p: float, iterations: int) -> list[float]:
    """β_1 ≥ … ≥ β_N of Algorithm 2 as set in App. B: 3p, then linearly down to p over two iterations, then p."""
    return [min(1.0, p * max(1.0, 3.0 - t)) for t in range(iterations)]


def trim(losses: torch.Tensor, candidates: torch.Tensor, labels: torch.Tensor, keep: int,
         class_floor: float = 0.0, num_classes: int | None = None) -> torch.Tensor:
    """Trim(L, β) of Algorithm 2, line 7: each member keeps the ``keep`` candidates with the lowest loss.

    App. B adds a floor: the lowest-loss ⌈class_floor·|candidates of class c|⌉ of every class c are kept first, so a
    component never collapses onto one easy class. Returns a (members, n) boolean mask with exactly ``keep`` per member.
    """
    members, n = losses.shape
    available = int(candidates.sum(1).min())
    if not 0 < keep <= available:
        raise ValueError(f"trim keep={keep} but a member has {available} candidates; need 0 < keep ≤ candidates")
    num_classes = num_classes or int(labels.max()) + 1
    masked = losses.masked_fill(~candidates, math.inf)
    if class_floor > 0:
        order = torch.argsort(masked, dim=1)
        sorted_labels = labels[order]
        onehot = F.one_hot(sorted_labels, num_classes) * candidates.gather(1, order)[..., None]
        rank_in_class = (onehot.cumsum(1) * onehot).sum(-1) - 1  # (members, n); −1 for non-candidates
        floor = torch.ceil(class_floor * onehot.sum(1).float()).long()  # (members, classes)
        floored_sorted = (rank_in_class >= 0) & (rank_in_class < floor.gather(1, sorted_labels))
        floored = torch.zeros_like(candidates).scatter_(1, order, floored_sorted)
        masked = torch.where(floored, masked - (masked[candidates].max() + 1.0), masked)
    chosen = torch.topk(masked, keep, dim=1, largest=False).indices
    return torch.zeros_like(candidates).scatter_(1, chosen, True)


def inverse_self_paced_learning(inputs: torch.Tensor, labels: torch.Tensor, remaining: torch.Tensor, p: float,
                                schedule: ISPLSchedule, num_classes: int,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """Algorithm 2: one homogeneous component of ⌊p·|remaining|⌉ samples per member (one member = one ISPL run).

    ``remaining`` (members, n) marks each run's still-unassigned samples (equal counts across runs). A fresh weak
    learner per member is trained for N = 2 + min(3, ⌊1/p⌋) iterations on α-samples of the current subset; the
    subset is then re-trimmed to the β_t-fraction of the remaining samples with the lowest smoothed loss.
    """
    members = remaining.shape[0]
    size = int(remaining[0].sum())
    iterations = 2 + min(3, int(round(1.0 / p)))
    model = EnsembleMLP(members, inputs.shape[1], num_classes, schedule.hidden).to(inputs.device)
    subset, smoothed = remaining.clone(), torch.zeros(remaining.shape, device=inputs.device)
    for t, beta in enumerate(annealed_trim_fractions(p, iterations)):
        sample = expansion_sample(subset, schedule.alpha, generator)
        sets, _ = index_sets(sample)
        fit_members(model, inputs, labels, sets, epochs=schedule.warmup_epochs if t == 0 else schedule.epochs,
                    batch_size=schedule.batch_size, lr=schedule.lr, generator=generator)
        smoothed = loss_momentum(smoothed, member_losses(model, inputs, labels), schedule.eta)
        subset = trim(smoothed, remaining, labels, max(1, round(beta * size)), schedule.class_floor * p, num_classes)
    return subset


def ispl_partition(inputs: torch.Tensor, labels: torch.Tensor, runs: int, schedule: ISPLSchedule, num_classes: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Partition the training set ``runs`` times into ``schedule.rounds`` components by repeated ISPL (§5, App. B).

    Round i extracts a component of p = 1/(R − i) of what remains; the last component is the remainder. Returns
    (runs, n) component ids in [0, R). The runs are independent and trained together.
    """
    n = len(labels)
    if n < schedule.rounds:
        raise ValueError(f"{n} samples cannot form {schedule.rounds} components; lower rounds")
    components = torch.full((runs, n), schedule.rounds - 1, dtype=torch.long, device=inputs.device)
    remaining = torch.ones(runs, n, dtype=torch.bool, device=inputs.device)
    for i in range(schedule.rounds - 1):
        component = inverse_self_paced_learning(inputs, labels, remaining, 1.0 / (schedule.rounds - i), schedule,
                                                num_classes, generator)
        components[component] = i
        remaining &= ~component
    return components


def fit_component_learners(inputs: torch.Tensor, labels: torch.Tensor, components: torch.Tensor, schedule: ISPLSchedule,
                           num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A(S_i) for every component of every run (Algorithm 1, line 5): one weak learner per component, all trained
    together. ``components`` (runs, n) ids → predictions of every learner on every sample, (runs · rounds, n)."""
    ids = torch.arange(schedule.rounds, device=components.device)
    masks = (components[:, None, :] == ids[None, :, None]).flatten(0, 1)
    masks = masks[masks.any(1)]  # a run whose remainder came out empty has no last learner
    sets, sizes = index_sets(masks)
    model = EnsembleMLP(len(masks), inputs.shape[1], num_classes, schedule.hidden).to(inputs.device)
    fit_members(model, inputs, labels, sets, sizes, epochs=schedule.learner_epochs, batch_size=schedule.batch_size,
                lr=schedule.lr, generator=generator)
    return member_logits(model, inputs).argmax(-1)


def modal_vote_agrees(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample boosting vote (App. B): keep a sample iff the modal prediction of the weak learners equals its
    label, ties broken at random. ``predictions`` (learners, n) → (n,) boolean keep mask."""
    counts = F.one_hot(predictions, num_classes).sum(0).float()  # (n, classes)
    jitter = torch.rand(counts.shape, generator=generator, device=counts.device) * 0.5
    return (counts + jitter).argmax(1) == labels


def boost_homogeneous_sets(zero_one_losses: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Algorithm 1 (component level): which homogeneous sets S_1..S_N belong to the primary distribution.

    ``zero_one_losses[i, k]`` is V_ik, the number of samples of S_k that the learners fitted to S_i misclassify,
    averaged over the B estimates; ``sizes[k]`` = |S_k|. Learner i votes for S_k, with weight |S_i|, when it gets
    most of S_k right (V_ik < |S_k|/2); S_k is primary when its votes exceed n/2. (The extracted text of the
    paper's line 11 reads "V_ik > |S_k|/2", which would count votes *against* S_k and contradict Theorem 4.8's
    output "1 for primary components"; we follow the theorem.)
    """
    if zero_one_losses.shape != (len(sizes), len(sizes)):
        raise ValueError(f"zero_one_losses has shape {tuple(zero_one_losses.shape)}; need ({len(sizes)}, {len(sizes)})")
    sizes = sizes.to(zero_one_losses.dtype)
    votes = (zero_one_losses < sizes[None, :] / 2).to(sizes.dtype) * sizes[:, None]
    return votes.sum(0) > sizes.sum() / 2


def self_training(inputs: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, schedule: ISPLSchedule,
                  num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Final self-training step (App. B): a fresh learner trained on the kept samples re-selects, every
    ``resample_every`` epochs, the samples whose label agrees with its momentum-smoothed prediction; the samples of
    the last training stretch are returned. Re-admits clean samples the weak learners, each fitted to a small
    component, got wrong (fewer false positives); poisons stay out as long as the kept set holds too few of them to
    teach the trigger.

    No class is ever emptied (:func:`~lit_robust.functional.backdoor_filters.keep_every_class`): a class the vote removed
    entirely keeps its first sample, and each re-selection keeps the class's sample the learner finds most likely."""
    current = keep_every_class(keep, torch.arange(len(labels), device=keep.device), labels)
    if schedule.self_train_epochs <= 0:
        return current
    model = EnsembleMLP(1, inputs.shape[1], num_classes, schedule.hidden).to(inputs.device)
    smoothed = None
    for start in range(0, schedule.self_train_epochs, schedule.resample_every):
        used = current
        sets, _ = index_sets(used[None])
        fit_members(model, inputs, labels, sets, epochs=min(schedule.resample_every, schedule.self_train_epochs - start),
                    batch_size=schedule.batch_size, lr=schedule.lr, generator=generator)
        probs = member_logits(model, inputs)[0].softmax(-1)
        smoothed = probs if smoothed is None else schedule.self_train_momentum * smoothed + (
            1 - schedule.self_train_momentum) * probs
        current = keep_every_class(smoothed.argmax(1) == labels, -smoothed.gather(1, labels[:, None]).squeeze(1),
                                   labels)
    return used
