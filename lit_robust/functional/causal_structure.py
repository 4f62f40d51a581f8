"""Causal structure as tensors (thesis 000 §2.3 and ch. 4): DAGs as adjacency matrices, the structural prior that
selects each variable's parents, the local/global loss mix of SCNNs, structural Hamming distances between hypotheses,
deliberate out-of-distribution splits and the pair-win probability of hypothesis testing.

Convention: ``adjacency[i, j] = 1`` is the edge i → j (NOTEARS' layout); ``prior[i, j] = 1`` means variable i is
computed from variable j, i.e. the prior is the transposed adjacency plus the exogenous diagonal.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def adjacency_from(nodes: Sequence[str], structure) -> torch.Tensor:
    """(D, D) adjacency of ``nodes`` from an edge list ``[[parent, child], ...]`` or from a D×D 0/1 matrix."""
    size = len(nodes)
    if len(structure) and not isinstance(structure[0][0], str):
        matrix = torch.as_tensor(structure, dtype=torch.float32)
        if matrix.shape != (size, size) or not bool(((matrix == 0) | (matrix == 1)).all()):
            raise ValueError(f"adjacency {matrix.tolist()} is not a {size}×{size} 0/1 matrix for nodes {list(nodes)}: "
                             "give one row per node, 1 at [parent][child]")
        return matrix
    adjacency = torch.zeros(size, size)
    for edge in structure:
        unknown = [name for name in edge if name not in nodes]
        if len(edge) != 2 or unknown:
            raise ValueError(f"edge {list(edge)} is not a [parent, child] pair of nodes {list(nodes)}"
                             + (f" ({unknown} unknown)" if unknown else ""))
        adjacency[nodes.index(edge[0]), nodes.index(edge[1])] = 1.0
    return adjacency


def topological_levels(adjacency: torch.Tensor) -> list[list[int]]:
    """Nodes grouped by depth (roots first); a cycle is refused, naming the nodes on or after it."""
    remaining, levels, placed = set(range(len(adjacency))), [], set()
    while remaining:
        level = sorted(j for j in remaining if all(i in placed for i in adjacency[:, j].nonzero().flatten().tolist()))
        if not level:
            raise ValueError(f"the graph has a cycle through nodes {sorted(remaining)}: an SCNN needs a DAG")
        levels.append(level)
        placed |= set(level)
        remaining -= set(level)
    return levels


def structural_prior(adjacency: torch.Tensor, exogenous: torch.Tensor) -> torch.Tensor:
    """S = G + B (Eq. 4.1): row i selects the inputs of variable i's η network — its parents, or itself when it is
    exogenous (B's diagonal); ``exogenous`` is a (D,) 0/1 vector."""
    return adjacency.transpose(-1, -2) + torch.diag_embed(exogenous.to(adjacency.dtype))


def hamming_distances(hypothesis: torch.Tensor, truth: torch.Tensor) -> dict[str, int]:
    """Structural Hamming distances of a hypothesis to the truth (Eqs. 4.4–4.5): H = |A¹ − A⁰|₁, leaky H⁺ = #(A¹ >
    A⁰) (edges added), lossy H⁻ = #(A¹ < A⁰) (edges removed), ΔH = H⁺ − H⁻."""
    leaky, lossy = int((hypothesis > truth).sum()), int((hypothesis < truth).sum())
    return {"H": leaky + lossy, "H+": leaky, "H-": lossy, "dH": leaky - lossy}


def mixed_loss(global_loss: torch.Tensor, local_loss: torch.Tensor, eta: torch.Tensor | float) -> torch.Tensor:
    """(1 − η)·L_global + η·L_local, whose gradient is Eq. 2.10's mix for every sub-network; η = 1 drops the global
    term's gradient exactly (also when the chained prediction overflows)."""
    eta = torch.as_tensor(eta, dtype=local_loss.dtype, device=local_loss.device)
    return torch.where(eta < 1, (1 - eta) * global_loss, 0.0) + eta * local_loss


def deliberate_split(values: torch.Tensor, quantile: float) -> torch.Tensor:
    """Training mask of a deliberate out-of-distribution split (thesis 000 §4.3): cut ``values`` (one column) at its
    ``quantile`` and train on the larger side — below the cut for quantile > 0.5, above it for quantile < 0.5."""
    if not 0 < quantile < 1 or quantile == 0.5:
        raise ValueError(f"split quantile={quantile}: use a value in (0, 1) other than 0.5, e.g. 0.75 (train below "
                         "the 75 % quantile) or 0.25 (train above the 25 % quantile)")
    cut = torch.quantile(values, quantile)
    return values <= cut if quantile > 0.5 else values >= cut


def pair_win_probability(losses: torch.Tensor, closer: torch.Tensor, farther: torch.Tensor) -> torch.Tensor:
    """Pr(ℓ(S_closer) < ℓ(S_farther)) (Eq. 4.6) over pairs of hypotheses: ``losses`` (K,) per hypothesis, ``closer`` and
    ``farther`` (P,) index the pairs; ties count half."""
    first, second = losses[closer], losses[farther]
    return ((first < second).float() + 0.5 * (first == second).float()).mean()
