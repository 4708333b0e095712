"""mixup: inputs and one-hot labels mixed with the same lambda and partner."""

import pytest
import torch
import torch.nn.functional as F

import sdk


def test_mixes_inputs_and_labels_consistently():
    torch.manual_seed(0)
    mix = sdk.create("transform", "mixup", alpha=0.4, num_classes=3)
    x = torch.randn(6, 5)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    out, batch = mix(x, sdk.Batch(targets=y, index=torch.arange(6)))
    lam, perm = batch.extras["mixup_lambda"], batch.extras["mixup_perm"]
    for i in range(6):
        j = int(perm[i])
        assert torch.allclose(out[i], lam * x[i] + (1 - lam) * x[j])
        expected = lam * F.one_hot(y[i], 3) + (1 - lam) * F.one_hot(y[j], 3)
        assert torch.allclose(batch.targets[i], expected.float())
    assert torch.equal(batch.index, torch.arange(6))


def test_lambda_distribution_follows_alpha():
    torch.manual_seed(1)
    small = sdk.create("transform", "mixup", alpha=0.1, num_classes=2)
    lams = torch.stack([small(torch.zeros(2, 1), sdk.Batch(targets=torch.tensor([0, 1])))[1]
                        .extras["mixup_lambda"] for _ in range(400)])
    # Beta(0.1, 0.1) puts most mass near 0 and 1
    assert ((lams < 0.1) | (lams > 0.9)).float().mean() > 0.7


def test_eval_mode_is_identity_and_errors():
    mix = sdk.create("transform", "mixup", num_classes=2).eval()
    x = torch.randn(3, 2)
    assert mix(x, sdk.Batch())[0] is x
    with pytest.raises(sdk.RequirementError, match="need num_classes"):
        sdk.create("transform", "mixup")(x, sdk.Batch(targets=torch.tensor([0, 1, 0])))
