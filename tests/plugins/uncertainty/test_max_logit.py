"""max_logit against the negated largest logit, read row by row."""

import torch

import sdk


def test_max_logit_is_the_negated_largest_logit():
    z = torch.randn(7, 4, generator=torch.Generator().manual_seed(1))
    slow = torch.tensor([-max(row) for row in z.tolist()])
    assert torch.equal(sdk.create("detector", "max_logit").score(z), slow)


def test_max_logit_sees_a_shift_that_msp_cannot():
    z = torch.tensor([[2.0, 0.0], [12.0, 10.0]])  # the same softmax, larger logits
    assert torch.allclose(sdk.create("detector", "msp").score(z)[0], sdk.create("detector", "msp").score(z)[1])
    s = sdk.create("detector", "max_logit").score(z)
    assert s[1] < s[0]
