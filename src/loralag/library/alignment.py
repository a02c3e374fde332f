"""Offline alignment: the exact rank-r SVD of s·B·A from the factors alone.

s·B·A = s·(Qb Rb)(Qa Ra)ᵀ = Qb (s·Rb Raᵀ) Qaᵀ, so the SVD of the r×r core s·Rb·Raᵀ = Uc S Vcᵀ gives
U = Qb Uc and V = Qa Vc without ever forming the d_out×d_in product. We store A* = Vᵀ (orthonormal
rows, the first one is the Arrow vector) and B* = U S (the scaling folded in), so B* A* = s·B·A.
"""

from __future__ import annotations

import torch


def align(A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (A*, B*) with A* (r, d_in) orthonormal rows sorted by singular value and B* (d_out, r)."""
    r = A.shape[0]
    if r > min(A.shape[1], B.shape[0]):
        raise ValueError(f"rank {r} exceeds the layer's dimensions {tuple(B.shape[:1]) + tuple(A.shape[1:])}")
    # float64 keeps the result exact to fp32 precision even for ill-conditioned factors.
    A64, B64 = A.double(), B.double()
    Qb, Rb = torch.linalg.qr(B64)  # (d_out, r), (r, r)
    Qa, Ra = torch.linalg.qr(A64.T)  # (d_in, r), (r, r)
    Uc, S, Vch = torch.linalg.svd(scale * Rb @ Ra.T)
    A_star = Vch @ Qa.T  # Vᵀ = Vcᵀ Qaᵀ
    B_star = (Qb @ Uc) * S  # U S
    return A_star.float(), B_star.float()


def align_batch(As: torch.Tensor, Bs: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched `align` for n adapters of one rank: As (n, r, d_in), Bs (n, d_out, r), scales (n,)."""
    A64, B64 = As.double(), Bs.double()
    Qb, Rb = torch.linalg.qr(B64)
    Qa, Ra = torch.linalg.qr(A64.transpose(1, 2))
    core = scales.double().view(-1, 1, 1) * Rb @ Ra.transpose(1, 2)
    Uc, S, Vch = torch.linalg.svd(core)
    A_star = Vch @ Qa.transpose(1, 2)
    B_star = (Qb @ Uc) * S.unsqueeze(1)
    return A_star.float(), B_star.float()
