"""composite_backbone: CBNet's dense higher-level composition and assistant supervision."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdk


def _plain(in_dim=5, widths=(6, 4, 3), out=2):
    dims = [in_dim, *widths]
    return nn.Sequential(*(nn.Sequential(nn.Linear(a, b), nn.Tanh()) for a, b in zip(dims, dims[1:])),
                         nn.Linear(dims[-1], out))


def test_zero_initialised_links_make_the_lead_the_standalone_backbone():
    torch.manual_seed(0)
    net = _plain()
    alone = copy.deepcopy(net)
    cb = sdk.create("encoder", "composite_backbone", backbone=sdk.encoder(net, out_dim=2), in_dim=5)
    x = torch.randn(8, 5)
    assert torch.equal(cb(x), alone(x)) and cb.out_dim == 2
    assert cb.assist_weight == 0.5 and len(cb.backbones) == 2
    assert [len(ls) for ls in cb.links] == [3, 2, 1]
    cb(x).pow(2).sum().backward()
    assert all(ls.norm.weight.grad.abs().sum() > 0 for row in cb.links for ls in row)
    cb.train()
    assert all(not m.training for m in cb.links.modules() if isinstance(m, nn.BatchNorm1d))
    conv = nn.Sequential(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU()),
                         nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()),
                         nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)))
    image = torch.randn(2, 1, 6, 6)
    want = copy.deepcopy(conv)(image)
    cbc = sdk.create("encoder", "composite_backbone", backbone=conv, input_shape=(1, 6, 6))
    torch.testing.assert_close(cbc(image), want)


def test_dhlc_equals_a_slow_composition_for_three_backbones():
    torch.manual_seed(1)
    cb = sdk.create("encoder", "composite_backbone", backbone=_plain(), in_dim=5, copies=3).eval()
    for row in cb.links:
        for link in row:
            nn.init.normal_(link.norm.weight)
            nn.init.normal_(link.norm.bias)
    x = torch.randn(4, 5)

    def g(l, i, h):
        link = cb.links[l][i - l]
        return link.norm(link.proj(h))

    prev = None
    for stages in cb.backbones:
        h, outs = x, []
        for l, stage in enumerate(stages):
            inp = h if prev is None else h + sum(g(l, i, prev[i]) for i in range(l, 3))
            h = stage(inp)
            outs.append(h)
        prev = outs
    torch.testing.assert_close(cb.features(x), prev[-1])
    torch.testing.assert_close(cb(x), cb.head(prev[-1]))


def test_assistant_supervision_adds_half_the_objective_on_the_assisting_outputs():
    torch.manual_seed(2)
    cb = sdk.create("encoder", "composite_backbone", backbone=_plain(), in_dim=5).train()
    for row in cb.links:
        for link in row:
            nn.init.normal_(link.norm.weight)
    ce = sdk.create("objective", "cross_entropy")
    x, y = torch.randn(6, 5), torch.arange(6) % 2
    z = cb(x)
    batch = sdk.Batch(targets=y, index=torch.arange(6))
    views = sdk.Views(embeddings=(z,), logits=z)
    state = SimpleNamespace(trainer=SimpleNamespace(view_inputs=[x], objective=ce), views=views,
                            batch=batch, loss=ce(views, batch))
    lead = float(state.loss.value)
    assist = cb.head(cb.all_features(x)[0])
    cb.after_loss(state)
    assert float(state.loss.value) == pytest.approx(lead + 0.5 * float(F.cross_entropy(assist, y)),
                                                    rel=1e-5)
    state.loss.value.backward()
    assert cb.backbones[0][0][0].weight.grad.abs().sum() > 0
    assert cb._records.items == []                # the step's records are released
    none = sdk.create("encoder", "composite_backbone", backbone=_plain(), in_dim=5, assist_weight=0.0)
    state.loss = ce(views, batch)
    none.after_loss(state)
    assert float(state.loss.value) == pytest.approx(lead, rel=1e-6)


def test_defaults_deepcopy_state_round_trip_and_compile():
    cb = sdk.create("encoder", "composite_backbone")
    assert cb.out_dim == 128 and len(cb.backbones) == 2 and len(cb.backbones[0]) == 3
    assert cb.assist_weight == 0.5 and cb.head.in_features == 128
    small = sdk.create("encoder", "composite_backbone", in_dim=4, hidden_dims=(5, 3), out_dim=2)
    small(torch.randn(3, 4))                       # records with a graph: a copy must still work
    twin = copy.deepcopy(small)
    assert twin._records.items == []
    other = sdk.create("encoder", "composite_backbone", in_dim=4, hidden_dims=(5, 3), out_dim=2)
    other.load_state_dict(small.state_dict())
    small.eval(), other.eval()
    x = torch.randn(3, 4)
    torch.testing.assert_close(other(x), small(x))
    compiled = torch.compile(small, backend="eager")
    torch.testing.assert_close(compiled(x), small(x))


def test_errors():
    with pytest.raises(sdk.ConfigError, match="copies"):
        sdk.create("encoder", "composite_backbone", copies=1)
    with pytest.raises(sdk.ConfigError, match="must be an nn.Sequential of stages and a head"):
        sdk.create("encoder", "composite_backbone", backbone=nn.Linear(3, 2))
    with pytest.raises(sdk.ConfigError, match="hidden_dims must give at least one stage"):
        sdk.create("encoder", "composite_backbone", hidden_dims=())
    cb = sdk.create("encoder", "composite_backbone", in_dim=8)
    with pytest.raises(sdk.ShapeError, match=r"encoder 'composite_backbone': x must be a floating batch \[B, 8\]"):
        cb(torch.zeros(2, 9))
