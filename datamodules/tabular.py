"""Tables of causal variables (thesis 000 §2.3, ch. 3 and ch. 4; seed 002 §4.2): the SCNN exam SEMs, the tabular
pendulum, random linear DAGs, the Learning Mindsets stand-in and deep CAMA's labelled measurement rows, split at random or deliberately out of distribution (a column cut at a quantile, the larger side
trains). Items are ``(row,)``: one float vector of all variables, in ``columns`` order."""
from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lit_robust.datamodules.base import ImageDataModule
from lit_robust.datamodules.pendulum import FACTORS, add_shadow_noise, factors_from, sample_exogenous
from lit_robust.functional.causal_structure import deliberate_split
from lit_robust.functional.structural_equations import (MINDSET_CORRELATIONS, MINDSET_NODES, SCNN_NODES,
                                                         measurement_children, measurement_labels,
                                                         measurement_mechanism, random_dag, sample_linear_sem,
                                                         sample_mindset_scm, sample_scnn_sem)


class TabularDataModule(ImageDataModule):
    """Rows from :meth:`sample`, split ``random``ly (``test_fraction``, ``val_fraction``) or ``deliberate``ly:
    ``split_column`` cut at its ``split_quantile`` (:func:`deliberate_split`), the other side is the test set and
    ``val_fraction`` of the training side validates. ``standardise`` scales every column by the training rows' mean
    and std (``mean`` / ``std`` keep them)."""

    columns: tuple[str, ...] = ()
    num_classes = in_chans = None   # rows of variables: no classes or channels to check a model against

    def __init__(self, n_samples: int = 2000, split: str = "random", split_column: str | None = None,
                 split_quantile: float = 0.75, test_fraction: float = 0.2, val_fraction: float = 0.1,
                 standardise: bool = False, **loader_kwargs):
        super().__init__(**loader_kwargs)
        if split not in ("random", "deliberate"):
            raise ValueError(f"data.split={split!r}: use 'random' or 'deliberate'")
        if split == "deliberate" and split_column not in self.columns:
            raise ValueError(f"data.split_column={split_column!r}: a deliberate split cuts one of {self.columns}")
        self.n_samples, self.split = n_samples, split
        self.split_column, self.split_quantile = split_column, split_quantile
        self.test_fraction, self.val_fraction, self.standardise = test_fraction, val_fraction, standardise
        self.mean = self.std = None

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        """(n_samples, len(columns)) rows."""
        raise NotImplementedError

    def split_indices(self, rows: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(train, val, test) row indices."""
        order = torch.randperm(len(rows), generator=generator)
        if self.split == "deliberate":
            inside = deliberate_split(rows[:, self.columns.index(self.split_column)], self.split_quantile)
            test, order = inside.logical_not().nonzero().flatten(), order[inside[order]]
        else:
            n_test = int(round(self.test_fraction * len(rows)))
            test, order = order[:n_test], order[n_test:]
        n_val = int(round(self.val_fraction * len(rows)))
        return order[n_val:], order[:n_val], test

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        rows = self.sample(generator)
        train, val, test = self.split_indices(rows, generator)
        if self.standardise:
            self.mean, self.std = rows[train].mean(0), rows[train].std(0).clamp_min(1e-8)
            rows = (rows - self.mean) / self.std
        self.train_dataset, self.val_dataset, self.test_dataset = (TensorDataset(rows[part]) for part in
                                                                   (train, val, test))


class ExamSEMDataModule(TabularDataModule):
    """The SCNN exam model (thesis 000 §2.3.3.1): 14,000 rows of [C, T, E, TQ, P, Y] from Eq. 2.8 (``sem='linear'``)
    or 2.9 (``'nonlinear'``), split 10,000 / 2,000 / 2,000 at random."""

    columns = SCNN_NODES

    def __init__(self, sem: str = "linear", n_samples: int = 14000, test_fraction: float = 1 / 7,
                 val_fraction: float = 1 / 7, **kwargs):
        super().__init__(n_samples=n_samples, test_fraction=test_fraction, val_fraction=val_fraction, **kwargs)
        self.sem = sem

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        return sample_scnn_sem(self.sem, self.n_samples, generator)


class PendulumTableDataModule(TabularDataModule):
    """The tabular pendulum (thesis 000 App. B.2.1): θ and the light angle independent and uniform within ±45° of
    vertical, the shadow's length and position from the renderer's equations with Gaussian noise at ``snr_db``."""

    columns = FACTORS

    def __init__(self, snr_db: float | None = 10.0, angle_range: float = 45.0, **kwargs):
        super().__init__(**kwargs)
        self.snr_db, self.angle_range = snr_db, angle_range

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        factors = factors_from(*sample_exogenous("uniform", self.n_samples, self.angle_range, generator))
        return factors if self.snr_db is None else add_shadow_noise(factors, self.snr_db, generator)


class RandomDAGDataModule(TabularDataModule):
    """A random linear DAG after NOTEARS (thesis 000 §4.2.3): ``num_nodes`` variables, ``num_edges`` N(0, 1)
    weights drawn with ``dag_seed``, children noisy at ``snr_db`` (None: SNR ∞). ``weights`` holds the truth."""

    def __init__(self, num_nodes: int = 4, num_edges: int = 4, snr_db: float | None = None, dag_seed: int = 0,
                 n_samples: int = 100, **kwargs):
        self.columns = tuple(f"x{i}" for i in range(num_nodes))
        super().__init__(n_samples=n_samples, **kwargs)
        self.snr_db = snr_db
        self.weights = random_dag(num_nodes, num_edges, torch.Generator().manual_seed(dag_seed))

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        return sample_linear_sem(self.weights, self.n_samples, self.snr_db, generator)


class MindsetDataModule(TabularDataModule):
    """A stand-in for the Learning Mindsets sample (thesis 000 §3.4.2; the ACIC-2018 CSV is in no installable
    package): rows [SM, SE, D, Y] of a linear SCM (:func:`mindset_coefficients`) whose population correlations are
    Table 3.1's (``correlations``, "A-B" pairs), with a known treatment effect ``tau`` of D on Y and a
    ``treated_fraction`` of treated units; n = 10,391 as the sample's."""

    columns = MINDSET_NODES

    def __init__(self, tau: float = 0.4, treated_fraction: float = 0.3, correlations: dict[str, float] | None = None,
                 n_samples: int = 10391, **kwargs):
        super().__init__(n_samples=n_samples, **kwargs)
        self.tau, self.treated_fraction = tau, treated_fraction
        self.correlations = dict(correlations or MINDSET_CORRELATIONS)

    def sample(self, generator: torch.Generator) -> torch.Tensor:
        return sample_mindset_scm(self.n_samples, generator, self.tau, self.treated_fraction, self.correlations)


class MeasurementDataModule(ImageDataModule):
    """Deep CAMA's generic measurement data (seed 002 §4.2 and App.): parents A (one column per class) and co-parents
    C ~ N(0, I); Y = argmax(0.2A² − 0.8A + σ_Y ε) (:func:`measurement_labels`); children X = f(Y, C), quadratic
    with Gaussian parameters drawn from ``mechanism_seed``, normalised by the unshifted units' mean and std, plus
    N(0, σ_X²). Items are (row [a, c, x], y); the units split ``test_size`` / ``val_size`` / rest for training
    (the paper: 1,000 units, 500 / 50 / 450). ``coparent_offset`` is §4.2's shift (up or down): it is added to
    every C of the test units and X is recomputed through the same f and noise (Y, its cause A, and the mechanism
    unchanged); :meth:`shifted_test` gives the test units at any shift."""

    in_chans = None   # rows, not images

    def __init__(self, n_samples: int = 1000, num_classes: int = 5, coparent_dim: int = 5, child_dim: int = 10,
                 label_noise_std: float = 1.0, child_noise_std: float = 0.1, coparent_offset: float = 0.0,
                 mechanism_seed: int = 0, val_size: int = 50, test_size: int = 500, **loader_kwargs):
        super().__init__(**loader_kwargs)
        if val_size + test_size >= n_samples:
            raise ValueError(f"data.val_size={val_size} + test_size={test_size} leave no training units of "
                             f"n_samples={n_samples}: raise n_samples or shrink the held-out splits")
        self.n_samples, self.num_classes = n_samples, num_classes
        self.coparent_dim, self.child_dim = coparent_dim, child_dim
        self.label_noise_std, self.child_noise_std = label_noise_std, child_noise_std
        self.coparent_offset = coparent_offset
        self.mechanism_seed, self.val_size, self.test_size = mechanism_seed, val_size, test_size
        self.units: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        generator = torch.Generator().manual_seed(self.seed)
        n = self.n_samples
        self.mechanism = measurement_mechanism(self.num_classes, self.coparent_dim, self.child_dim,
                                               torch.Generator().manual_seed(self.mechanism_seed))
        parents = torch.randn(n, self.num_classes, generator=generator)
        coparents = torch.randn(n, self.coparent_dim, generator=generator)
        labels = measurement_labels(parents, self.label_noise_std * torch.randn(n, self.num_classes,
                                                                                 generator=generator))
        child_noise = self.child_noise_std * torch.randn(n, self.child_dim, generator=generator)
        clean = measurement_children(self.mechanism, labels, coparents)
        self.child_mean, self.child_std = clean.mean(0), clean.std(0).clamp_min(1e-8)
        self.units = {"parents": parents, "coparents": coparents, "labels": labels, "child_noise": child_noise}
        order = torch.randperm(n, generator=generator)
        self.test_units, val, train = order[:self.test_size], order[self.test_size:self.test_size + self.val_size], \
            order[self.test_size + self.val_size:]
        self.train_dataset, self.val_dataset = self.dataset(train, 0.0), self.dataset(val, 0.0)
        self.test_dataset = self.shifted_test(self.coparent_offset)

    def dataset(self, units: torch.Tensor, coparent_offset: float) -> TensorDataset:
        """(rows [a, c, x], labels) of ``units`` with ``coparent_offset`` added to every co-parent."""
        u = {name: values[units] for name, values in self.units.items()}
        coparents = u["coparents"] + coparent_offset
        children = (measurement_children(self.mechanism, u["labels"], coparents) - self.child_mean) / self.child_std
        return TensorDataset(torch.cat([u["parents"], coparents, children + u["child_noise"]], dim=1), u["labels"])

    def shifted_test(self, coparent_offset: float) -> TensorDataset:
        """The test units with their co-parents shifted by ``coparent_offset`` (0: the unshifted test set)."""
        if not self.units:
            self.setup("test")
        return self.dataset(self.test_units, coparent_offset)
