"""knn_ood against a slow sort of the distances from each normalised query to every
normalised training row."""

import torch
import torch.nn.functional as F

import sdk


def slow_kth(bank, q, k):
    b, q = F.normalize(bank.double(), dim=1), F.normalize(q.double(), dim=1)
    return torch.tensor([sorted(float((r - row).norm()) for row in b)[min(k, len(b)) - 1] for r in q],
                        dtype=torch.float64)


def test_knn_score_is_the_kth_neighbour_distance_of_normalised_features():
    g = torch.Generator().manual_seed(0)
    bank, q = torch.randn(120, 8, generator=g), torch.randn(15, 8, generator=g)
    det = sdk.create("detector", "knn_ood")
    assert det.k == 50  # the paper's CIFAR-10 setting
    det.update(bank[:33])
    det.update(bank[33:])
    det.finalize()
    assert torch.allclose(det.score(q).double(), slow_kth(bank, q, 50), atol=1e-5)
    det3 = sdk.create("detector", "knn_ood", k=3).fit(bank)
    assert torch.allclose(det3.score(q).double(), slow_kth(bank, q, 3), atol=1e-5)


def test_the_score_ignores_the_feature_norm_and_caps_k_at_the_bank_size():
    g = torch.Generator().manual_seed(1)
    bank, q = torch.randn(10, 4, generator=g), torch.randn(6, 4, generator=g)
    det = sdk.create("detector", "knn_ood").fit(bank)
    assert torch.allclose(det.score(7 * q), det.score(q), atol=1e-6)
    assert torch.allclose(det.score(q).double(), slow_kth(bank, q, 10), atol=1e-5)
