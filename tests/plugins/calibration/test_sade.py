"""sade: the inverse prior and the three adjusted cross-entropies by hand (value and gradient);
trained on long-tailed synthetic data, the uniform expert has the best balanced accuracy and
the backward expert the best accuracy on an inversely long-tailed test set, and the test-time
aggregation weights of two views of that set favour the backward expert."""

import math

import pytest
import torch

import sdk
from plugins.calibration.sade import aggregation_weights, inverse_prior


def test_the_inverse_prior_reverses_the_ranks():
    prior = torch.tensor([0.1, 0.5, 0.05, 0.35])
    # ranks (ascending) 1, 3, 0, 2 -> values of ranks 2, 0, 3, 1 of the sorted [0.05, 0.1, 0.35, 0.5]
    assert torch.equal(inverse_prior(prior), torch.tensor([0.35, 0.05, 0.5, 0.1]))


def test_the_loss_is_three_adjusted_cross_entropies():
    counts = (60.0, 25.0, 10.0, 5.0)
    pi = torch.tensor(counts, dtype=torch.float64) / 100
    pi_bar = torch.tensor([5.0, 10.0, 25.0, 60.0], dtype=torch.float64) / 100
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, 12, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 0, 1])
    loss = sdk.create("objective", "sade", class_counts=counts)(sdk.Views(logits=z), sdk.Batch(targets=y, index=torch.arange(7)))
    v1, v2, v3 = z[:, :4], z[:, 4:8], z[:, 8:]
    tau = 2.0
    want = [-(v1[i].log_softmax(0)[y[i]] + (v2[i] + pi.log()).log_softmax(0)[y[i]]
              + (v3[i] + pi.log() - tau * pi_bar.log()).log_softmax(0)[y[i]]) for i in range(7)]
    want = torch.stack(want)
    assert torch.allclose(loss.per_sample, want, atol=1e-6) and torch.allclose(loss.value, want.mean(), atol=1e-6)
    (g1,) = torch.autograd.grad(loss.value, z)
    (g2,) = torch.autograd.grad(want.mean(), z)
    assert torch.allclose(g1, g2, atol=1e-7)


def _long_tailed(counts, g, means):
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return means[y] + torch.randn(len(y), means.shape[1], generator=g), y


def test_experts_specialise_and_aggregation_favours_the_backward_expert():
    g = torch.Generator().manual_seed(0)
    c, d = 5, 8
    means = 1.2 * torch.randn(c, d, generator=g)
    train_counts = [int(600 * 0.25 ** (k / 1.0)) + 4 for k in range(c)]  # 604 ... 6: ratio ~ 100
    x, y = _long_tailed(train_counts, g, means)
    objective = sdk.create("objective", "sade", labels=y)
    torch.manual_seed(0)
    head = torch.nn.Linear(d, 3 * c)
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        objective(sdk.Views(logits=head(x)), sdk.Batch(targets=y, index=torch.arange(len(y)))).value.backward()
        opt.step()
    x_te, y_te = _long_tailed(train_counts[::-1], g, means)  # the inverted prior
    with torch.no_grad():
        experts = head(x_te).view(-1, 3, c)
        acc = (experts.argmax(2) == y_te[:, None]).double().mean(0)
        per_class = torch.stack([(experts[y_te == k].argmax(2) == k).double().mean(0) for k in range(c)])
        balanced = per_class.mean(0)
    assert balanced[1] > balanced[0]  # the uniform expert: best on a balanced test set
    assert acc[2] > acc[1] > acc[0]  # the backward expert: best on the inverted one
    noise = lambda: x_te + 0.3 * torch.randn(x_te.shape, generator=g)  # noqa: E731
    with torch.no_grad():
        w = aggregation_weights(head(noise()).view(-1, 3, c), head(noise()).view(-1, 3, c))
    assert w[2] > max(w[0], w[1]) + 0.05 and math.isclose(float(w.sum()), 1.0)


def test_bad_inputs_name_the_objective():
    with pytest.raises(sdk.ShapeError, match="sade: Views.logits must hold the three experts"):
        sdk.create("objective", "sade", class_counts=(3.0, 1.0))(sdk.Views(logits=torch.randn(4, 5)),
                                                              sdk.Batch(targets=torch.zeros(4, dtype=torch.long)))
    with pytest.raises(sdk.ConfigError, match="sade: the training class counts must be positive"):
        sdk.create("objective", "sade", class_counts=(3.0, 0.0))
    with pytest.raises(sdk.ConfigError, match="sade: give class_counts or labels, not both"):
        sdk.create("objective", "sade", class_counts=(3.0, 1.0), labels=[0, 1])
