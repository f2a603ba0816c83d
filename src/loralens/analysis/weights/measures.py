"""Weight-space measures of one fine-tuned matrix against its base: pure arrays in, numbers out.

Intruder dimensions (Shuttleworth et al., 2024, "LoRA vs Full Fine-tuning: An Illusion
of Equivalence", arXiv:2410.21228): take the SVD of the base matrix ``W0`` and of the
tuned matrix ``W``; a left singular vector among the top ``k`` of ``W`` is an *intruder*
at threshold ``epsilon`` when its largest absolute cosine with every left singular vector
of ``W0`` is below ``epsilon``. ``k = 10``, ``epsilon = 0.5`` in the paper's code and in
PEFT's ``reduce_intruder_dimension`` (peft/tuners/lora/intruders.py), whose detection this
reproduces: ``(U_W[:, :k].T @ U_W0).abs().max(dim=1) < epsilon`` with ``U`` from the thin
SVD (``full_matrices=False``).

The change's spectrum (Biderman et al., 2024, "LoRA Learns Less and Forgets Less",
arXiv:2405.09673, who measure the rank needed to hold 90% of the change's energy): from
the singular values ``s`` of ``dW = W - W0``,

- effective rank: Roy & Vetterli (2007), ``exp(H(p))`` with ``p = s / sum(s)``;
- rank at 90% energy: the smallest ``r`` with ``sum(s[:r]^2) >= 0.9 * sum(s^2)``;
- relative size: ``||dW||_F / ||W0||_F``.

Everything is computed in float64. The base's thin SVD is computed once per matrix
(:func:`base_svd`); a tuned matrix needs only its top ``k`` left singular vectors and the
change only its singular values, so both come from the symmetric eigenproblem of the
smaller Gram matrix: the same vectors and values as the SVD (tests compare them),
several times faster.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TOP_K = 10
ENERGY = 0.9


@dataclass
class BaseSVD:
    """A base matrix's thin SVD pieces the measures need (float64): left singular vectors
    ``u`` [out, min(out, in)] and the Frobenius norm."""

    u: torch.Tensor
    norm: float


def base_svd(w0: torch.Tensor) -> BaseSVD:
    """The base matrix's left singular vectors and norm, in float64 (computed once per
    matrix and cached by the caller: every model of a run shares the base)."""
    w0 = w0.detach().to(torch.float64)
    u, _, _ = torch.linalg.svd(w0, full_matrices=False)
    return BaseSVD(u, float(torch.linalg.matrix_norm(w0)))


def top_left_vectors(w: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """The top ``k`` left singular vectors of ``w`` [out, in], as columns [out, k], from
    the eigenvectors of the smaller Gram matrix (float64; signs are arbitrary, as in an SVD)."""
    a = w.detach().to(torch.float64)
    out, inp = a.shape
    k = min(k, out, inp)
    if out <= inp:  # eigenvectors of W W^T are the left singular vectors
        _, vecs = torch.linalg.eigh(a @ a.T)
        return vecs[:, -k:].flip(1).contiguous()
    vals, v = torch.linalg.eigh(a.T @ a)  # the right ones: u = W v / s
    vals, v = vals[-k:].flip(0), v[:, -k:].flip(1)
    return ((a @ v) / vals.clamp_min(torch.finfo(torch.float64).tiny).sqrt()).contiguous()


def singular_values(w: torch.Tensor) -> np.ndarray:
    """All singular values of ``w``, descending (float64), from the smaller Gram matrix's
    eigenvalues (values below ~1e-8 of the largest are noise there, and weigh nothing in
    the energy; the effective rank moves by ~1e-5)."""
    a = w.detach().to(torch.float64)
    gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0).numpy().copy()


@contextlib.contextmanager
def one_thread():
    """LAPACK's eigensolvers on these sizes gain nothing from threads, and on a busy
    machine a threaded one can take 100x longer (measured: 0.07 s vs 8 s on 2 cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def max_cosines(u_tuned: torch.Tensor, u_base: torch.Tensor, k: int = TOP_K) -> np.ndarray:
    """Largest |cosine| of each of the top ``k`` tuned left singular vectors with any base
    left singular vector: [k] float64 (the columns of both are unit vectors)."""
    k = min(k, u_tuned.shape[1])
    return (u_tuned[:, :k].T @ u_base).abs().max(dim=1).values.numpy()


def intruder_counts(cosines: np.ndarray, epsilons: Sequence[float] = EPSILONS) -> dict[float, int]:
    """Intruders among the top-k vectors at each ``epsilon``: |cos| max below it."""
    return {float(e): int((np.asarray(cosines) < e).sum()) for e in epsilons}


def effective_rank(s: np.ndarray) -> float:
    """Roy & Vetterli's effective rank ``exp(entropy(s / sum s))``; 0 for a zero matrix."""
    s = np.asarray(s, dtype=np.float64)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def energy_rank(s: np.ndarray, energy: float = ENERGY) -> int:
    """Smallest ``r`` with ``sum(s[:r]^2) >= energy * sum(s^2)`` (``s`` sorted descending);
    0 for a zero matrix."""
    e = np.asarray(s, dtype=np.float64) ** 2
    total = e.sum()
    if total <= 0:
        return 0
    # a relative tolerance keeps an exact 90% (e.g. 9 equal values of 10) at its rank
    return int(np.searchsorted(np.cumsum(e), energy * total * (1 - 1e-12)) + 1)


def matrix_measures(w_tuned: torch.Tensor, w0: torch.Tensor, base: BaseSVD | None = None,
                    k: int = TOP_K, epsilons: Sequence[float] = EPSILONS) -> dict:
    """Every measure of one tuned matrix against its base ``w0`` (same shape).

    Returns a dict: ``shape``, ``rel_change`` (||dW||_F / ||W0||_F), ``effective_rank``,
    ``rank90`` (rank holding 90% of dW's energy), ``max_cos`` ([k] largest |cos| of the
    tuned top-k left singular vectors with the base's) and ``intruders``
    ({str(epsilon): count}, string keys as in the stored JSON).
    """
    if tuple(w_tuned.shape) != tuple(w0.shape):
        raise ValueError(f"tuned matrix {tuple(w_tuned.shape)} and base {tuple(w0.shape)} "
                         "differ in shape")
    base = base or base_svd(w0)
    w = w_tuned.detach().to(torch.float64)
    dw = w - w0.detach().to(torch.float64)
    s_dw = singular_values(dw)
    cos = max_cosines(top_left_vectors(w, k), base.u, k)
    return {
        "shape": list(w.shape),
        "rel_change": float(np.sqrt((s_dw ** 2).sum()) / base.norm) if base.norm else None,
        "effective_rank": effective_rank(s_dw),
        "rank90": energy_rank(s_dw),
        "max_cos": [float(c) for c in cos],
        "intruders": {str(e): c for e, c in intruder_counts(cos, epsilons).items()},
    }
