"""ftwt_mask_predictor: heat-map-mass target masks, detached mask predictors, their BCE."""

import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import sdk
from plugins.encoders.ftwt_mask_predictor import heat_mass_targets, mask_prediction_loss
from sdk import keys


def slow_targets(a, r):
    a = a.detach()
    out = torch.zeros(a.shape[0], a.shape[1])
    for b in range(a.shape[0]):
        heat = [float(a[b, j].abs().max()) for j in range(a.shape[1])]
        total = sum(heat)
        p = [h / total if total > 0 else 0.0 for h in heat]
        order = sorted(range(len(p)), key=lambda j: (-p[j], j))   # descending, ties by index
        cum = 0.0
        for j in order:
            cum += p[j]
            out[b, j] = float(cum - r <= 1e-5 and p[j] > 1e-5)
    return out


def test_targets_equal_a_slow_loop_ties_and_zeros_included():
    g = torch.Generator().manual_seed(0)
    conv = torch.relu(torch.randn(4, 7, 2, 2, generator=g))
    conv[0, 2] = conv[0, 4]                      # a tie
    conv[1] = 0.0                                 # a dead sample keeps nothing
    flat = torch.relu(torch.randn(4, 9, generator=g)).round(decimals=1)  # many ties
    for a in (conv, flat):
        for r in (0.5, 1.0):
            torch.testing.assert_close(heat_mass_targets(a, r), slow_targets(a, r))
    assert heat_mass_targets(conv, 1.0)[1].sum() == 0
    # r = 1 keeps exactly the units with mass; the unit crossing r is dropped
    torch.testing.assert_close(heat_mass_targets(flat, 1.0), (flat > 0).float())
    one = torch.tensor([[0.6, 0.3, 0.1]])
    torch.testing.assert_close(heat_mass_targets(one, 0.8), torch.tensor([[1.0, 0.0, 0.0]]))


def test_forward_is_the_gated_chain_and_the_losses_are_decoupled():
    torch.manual_seed(0)
    backbone = sdk.create("encoder", "mlp", in_dim=5, hidden_dims=(6, 4), out_dim=3,
                          batch_norm=False)
    enc = sdk.create("encoder", "ftwt_mask_predictor", backbone=backbone, threshold=0.7)
    lin = [m for m in backbone.modules() if isinstance(m, nn.Linear)]
    preds = [gate.predictor for gate in enc.gates]
    x = torch.randn(8, 5)
    z = enc(x)
    h, logits, targets = x, [], []
    for layer, pred in zip(lin[:2], preds):
        a = torch.relu(layer(h))
        s = pred(h.softmax(-1))
        logits.append(s)
        targets.append(slow_targets(a, 0.7))
        h = a * (s > 0).float()
    torch.testing.assert_close(z, lin[2](h))
    for got, want in zip(enc.targets(), targets):
        torch.testing.assert_close(got, want)
    for got, want in zip(enc.masks(), logits):
        torch.testing.assert_close(got, (want > 0).float())
    z.pow(2).sum().backward(retain_graph=True)
    assert all(p.grad is None for p in enc.gates.parameters())
    assert all(p.grad is not None for p in backbone.parameters())
    backbone.zero_grad(set_to_none=True)
    mask_prediction_loss(enc._trace.logits, enc._trace.targets).mean().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert all(p.grad.abs().sum() > 0 for p in enc.gates.parameters())


def test_objective_equals_a_slow_bce_and_reads_what_the_encoder_publishes():
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 2, generator=g, dtype=torch.float64))
    t = ((torch.rand(4, 3, generator=g) > 0.5).double(), (torch.rand(4, 2, generator=g) > 0.5).double())
    obj = sdk.create("objective", "ftwt_mask_predictor")
    views = sdk.Views(embeddings=(torch.randn(4, 2),),
                      extras={keys.GATE_LOGITS: s, keys.GATE_TARGETS: t})
    loss = obj(views, sdk.Batch(index=torch.arange(4)))

    def bce(v, y):
        p = 1 / (1 + math.exp(-v))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))
    per = [sum(bce(float(s[l][b, j]), float(t[l][b, j])) for l in range(2) for j in range(s[l].shape[1])) / 2
           for b in range(4)]
    torch.testing.assert_close(loss.per_sample, torch.tensor(per, dtype=torch.float32), rtol=1e-5, atol=1e-6)
    assert float(loss.value) == pytest.approx(sum(per) / 4, rel=1e-5)
    enc = sdk.create("encoder", "ftwt_mask_predictor", in_dim=5, hidden_dims=(6,), out_dim=2)
    enc.eval()
    state = SimpleNamespace(views=sdk.Views(embeddings=(enc(torch.randn(4, 5)),)))
    enc.after_forward(state)
    assert state.views.extras[keys.GATE_LOGITS][0] is enc._trace.logits[0]
    assert float(obj(state.views, sdk.Batch(index=torch.arange(4))).value.detach()) > 0


def test_digits_flop_reduction_at_near_equal_accuracy():
    """Paper: the kept fraction is known before training (the dense model's targets), and the
    dynamic model keeps the accuracy. Measured: r=0.9 keeps ~30%/27% of the units, ~20% of the
    dense FLOPs, accuracy within 1 pt of the dense 97.7%."""
    torch.manual_seed(0)
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x, y = (x - x.mean(0)) / (x.std(0) + 1), torch.tensor(d.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    mlp = sdk.create("encoder", "mlp", in_dim=64, hidden_dims=(64, 64), out_dim=10)
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2)
    for _ in range(40):
        loss = F.cross_entropy(mlp(x[tr]), y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
    mlp.eval()
    with torch.no_grad():
        dense_acc = float((mlp(x[te]).argmax(-1) == y[te]).float().mean())
        acts = []
        hooks = [m.register_forward_hook(lambda m, i, o: acts.append(o))
                 for m in mlp.modules() if isinstance(m, nn.ReLU)]
        mlp(x[tr])
        for hk in hooks:
            hk.remove()
    estimate = [float(heat_mass_targets(a, 0.9).mean()) for a in acts]
    enc = sdk.create("encoder", "ftwt_mask_predictor", backbone=copy.deepcopy(mlp), threshold=0.9,
                     softmax=False).eval()
    obj = sdk.create("objective", "ftwt_mask_predictor")
    opt = torch.optim.Adam(enc.gates.parameters(), lr=0.05)
    state = SimpleNamespace()
    for _ in range(60):
        state.views = sdk.Views(embeddings=(enc(x[tr]),))
        enc.after_forward(state)
        loss = obj(state.views, sdk.Batch(index=torch.arange(len(tr))))
        opt.zero_grad()
        loss.value.backward()
        opt.step()
    with torch.no_grad():
        acc = float((enc(x[te]).argmax(-1) == y[te]).float().mean())
    m1, m2 = enc.masks()
    kept = [float(m1.mean()), float(m2.mean())]
    flops = (64 * m1.sum(1) + m1.sum(1) * m2.sum(1) + m2.sum(1) * 10).mean() / (64 * 64 + 64 * 64 + 640)
    print(f"dense acc {dense_acc:.4f}, ftwt acc {acc:.4f}, kept {kept}, estimate {estimate}, "
          f"FLOPs {float(flops):.3f} of dense")
    assert all(abs(k - e) <= 0.05 for k, e in zip(kept, estimate)), (kept, estimate)
    assert acc >= dense_acc - 0.02, (acc, dense_acc)
    assert float(flops) < 0.3, float(flops)


def test_defaults_state_round_trip_and_compile():
    enc = sdk.create("encoder", "ftwt_mask_predictor")
    assert enc.threshold == 1.0 and enc.gates[0].softmax and len(enc.gates) == 2
    assert [g.predictor.in_features for g in enc.gates] == [64, 256] and enc.out_dim == 128
    torch.manual_seed(3)
    other = sdk.create("encoder", "ftwt_mask_predictor", in_dim=6, hidden_dims=(5, 4), out_dim=3)
    twin = sdk.create("encoder", "ftwt_mask_predictor", in_dim=6, hidden_dims=(5, 4), out_dim=3)
    twin.load_state_dict(other.state_dict())
    other.eval(), twin.eval()
    x = torch.randn(7, 6)
    torch.testing.assert_close(twin(x), other(x))
    copied = copy.deepcopy(other)            # the copy's hooks drive the copy's predictors
    with torch.no_grad():
        copied.gates[0].predictor.bias.fill_(-100.0)
    copied(x)
    other(x)
    assert copied.masks()[0].sum() == 0 and other.masks()[0].sum() > 0
    compiled = torch.compile(other, backend="eager")
    torch.testing.assert_close(compiled(x), other(x))


def test_errors():
    with pytest.raises(sdk.ConfigError, match="threshold"):
        sdk.create("encoder", "ftwt_mask_predictor", threshold=0.0)
    with pytest.raises(sdk.ConfigError, match="hidden_dims must name at least one"):
        sdk.create("encoder", "ftwt_mask_predictor", hidden_dims=())
    backbone = sdk.create("encoder", "mlp", in_dim=4, hidden_dims=(3,), out_dim=2)
    with pytest.raises(sdk.ConfigError, match=r"no submodule named \['nope'\]"):
        sdk.create("encoder", "ftwt_mask_predictor", backbone=backbone, gates=("nope",))
    relu = nn.ReLU()
    shared = sdk.encoder(nn.Sequential(nn.Linear(4, 4), relu, nn.Linear(4, 4), relu), out_dim=4)
    with pytest.raises(sdk.ConfigError, match="exactly once per forward"):
        sdk.create("encoder", "ftwt_mask_predictor", backbone=shared, input_shape=(4,))
    with pytest.raises(sdk.ConfigError, match="give input_shape"):
        sdk.create("encoder", "ftwt_mask_predictor", backbone=shared)
    enc = sdk.create("encoder", "ftwt_mask_predictor", in_dim=8)
    with pytest.raises(sdk.ShapeError, match=r"encoder 'ftwt_mask_predictor': x \(flattened\)"):
        enc(torch.zeros(2, 9))
    obj = sdk.create("objective", "ftwt_mask_predictor")
    bad = sdk.Views(embeddings=(torch.randn(4, 2),),
                    extras={keys.GATE_LOGITS: (torch.randn(4, 3),), keys.GATE_TARGETS: (torch.ones(4, 2),)})
    with pytest.raises(sdk.ShapeError, match=r"objective 'ftwt_mask_predictor': extras\['gate_targets'\]\[0\] must be \[4, 3\]"):
        obj(bad, sdk.Batch(index=torch.arange(4)))
    with pytest.raises(sdk.RequirementError, match="gate_logits"):
        obj(sdk.Views(embeddings=(torch.randn(4, 2),)), sdk.Batch(index=torch.arange(4)))
