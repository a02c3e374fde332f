"""Alignment is the exact SVD of s·B·A, checked against the dense product and a dense SVD."""

import pytest
import torch

from loralag.library.alignment import align, align_batch


@pytest.mark.parametrize(
    "r,d_in,d_out,scale", [(1, 40, 24, 2.0), (4, 64, 48, 0.5), (8, 33, 70, 16 / 8), (16, 96, 96, 1.0)]
)
def test_factored_svd_is_exact(r, d_in, d_out, scale):
    torch.manual_seed(r)
    A, B = torch.randn(r, d_in), torch.randn(d_out, r)
    A_star, B_star = align(A, B, scale)
    dense = scale * (B.double() @ A.double())
    assert A_star.shape == (r, d_in) and B_star.shape == (d_out, r)
    torch.testing.assert_close((B_star.double() @ A_star.double()), dense, atol=1e-5 * dense.abs().max().item(), rtol=0)
    torch.testing.assert_close(A_star @ A_star.T, torch.eye(r), atol=1e-6, rtol=0)
    # B* columns carry the singular values of the dense product, in decreasing order
    s_ref = torch.linalg.svdvals(dense)[:r].float()
    torch.testing.assert_close(B_star.norm(dim=0), s_ref, rtol=1e-5, atol=1e-6)
    # the arrow vector is the top right singular vector (up to sign)
    v1 = torch.linalg.svd(dense).Vh[0].float()
    assert abs(float(A_star[0] @ v1)) == pytest.approx(1.0, abs=1e-6)


def test_rank_deficient_and_zero_b():
    torch.manual_seed(0)
    A = torch.randn(4, 30)
    A[3] = A[0]  # rank 3
    B = torch.randn(20, 4)
    A_star, B_star = align(A, B, 2.0)
    torch.testing.assert_close(B_star @ A_star, 2.0 * B @ A, atol=1e-5, rtol=0)
    torch.testing.assert_close(A_star @ A_star.T, torch.eye(4), atol=1e-6, rtol=0)
    A_star, B_star = align(A, torch.zeros(20, 4), 1.0)  # an untrained PEFT adapter (B = 0)
    assert torch.count_nonzero(B_star) == 0 and torch.isfinite(A_star).all()


def test_batched_alignment_matches_single():
    torch.manual_seed(1)
    As, Bs, s = torch.randn(5, 6, 50), torch.randn(5, 40, 6), torch.rand(5) + 0.5
    A_b, B_b = align_batch(As, Bs, s)
    for i in range(5):
        A_1, B_1 = align(As[i], Bs[i], float(s[i]))
        torch.testing.assert_close(B_b[i] @ A_b[i], B_1 @ A_1, atol=1e-5, rtol=0)


def test_rank_above_dimension_is_refused():
    with pytest.raises(ValueError, match="rank"):
        align(torch.randn(10, 8), torch.randn(20, 10), 1.0)
