"""``sdk.encoder``: a plain torch module as an sdk Encoder (out_dim by a dry forward, features
by a forward hook, output selectors), trained by the Trainer, copied, saved and compiled."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import sdk
from sdk.data import IndexedDataset
from sdk.interfaces import Encoder, Objective
from sdk.keys import FEATURES
from sdk.types import Loss


class SmallCNN(nn.Module):
    """A backbone as torchvision writes them: named stages, a pooling layer, a classifier."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(6, 8, 3, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer1(self.stem(x))), 1))


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        z = self.lin(x)
        return z, z.sum(1)


class DictOut(TupleOut):
    def forward(self, x):
        z = self.lin(x)
        return {"pooled": z, "tokens": z[:, None].expand(-1, 5, -1)}


def _images(n=48, classes=3, seed=0):
    """Class c: a bright c-th third of an 8x8 image, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for c in range(classes):
        x[y == c, :, :, 3 * c:3 * c + 2] += 2.0
    return IndexedDataset(x, y)


def test_out_dim_is_inferred_by_a_dry_forward_that_moves_nothing():
    torch.manual_seed(0)
    cnn = SmallCNN()
    cnn.layer1.eval()  # a mixed mode is restored as it was, module by module
    bn = cnn.stem[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    enc = sdk.encoder(cnn, input_shape=(1, 8, 8), features="avgpool")
    assert isinstance(enc, Encoder) and enc.out_dim == 3 and enc.features_dim == 8
    assert [m.training for m in cnn.modules()] == [True, True, True, True, True, False, False,
                                                   False, True, True]
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert all(p.grad is None for p in cnn.parameters())
    enc.eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = cnn.avgpool(cnn.layer1(cnn.stem(x))).flatten(1)
        assert torch.equal(enc(x), cnn(x))
        # features: the flattened output of the named submodule, of the forward just run ...
        assert torch.equal(enc.features(x), expected)
        # ... or, on another tensor, of a new forward
        torch.testing.assert_close(enc.features(x[:3].clone()), expected[:3])


def test_out_dim_given_is_checked_and_errors_are_named():
    cnn = SmallCNN()
    assert sdk.encoder(cnn, out_dim=3).out_dim == 3  # no dry forward needed
    with pytest.raises(sdk.ConfigError, match=r"out_dim=4 but the module gives \[2, 3\]"):
        sdk.encoder(cnn, out_dim=4, input_shape=(1, 8, 8))
    with pytest.raises(sdk.ConfigError, match="give out_dim, or input_shape"):
        sdk.encoder(cnn)
    with pytest.raises(sdk.ConfigError, match=r"no submodule named 'avgpol'.*'avgpool'"):
        sdk.encoder(cnn, out_dim=3, features="avgpol")
    with pytest.raises(sdk.ConfigError, match=r"no submodule named 'layer1.7'.*'layer1.0'"):
        sdk.encoder(cnn, out_dim=3, features="layer1.7")
    with pytest.raises(sdk.ConfigError, match=r"dry forward on an input of shape \[2, 3, 8, 8\]"):
        sdk.encoder(cnn, input_shape=(3, 8, 8))  # the stem takes one channel
    with pytest.raises(sdk.ConfigError, match="module must be a torch.nn.Module"):
        sdk.encoder(lambda x: x, out_dim=2)
    with pytest.raises(sdk.ConfigError, match="input_shape must be positive ints"):
        sdk.encoder(cnn, input_shape=(1, 0, 8))
    # an output that is not [B, D]: a feature map
    with pytest.raises(sdk.ShapeError, match=r"must be \[B, out_dim\] = \[2, D\], got \[2, 6, 8, 8\]"):
        sdk.encoder(cnn.stem, input_shape=(1, 8, 8))
    enc = sdk.encoder(cnn, out_dim=3)
    with pytest.raises(sdk.ShapeError, match=r"\[B, out_dim\] = \[4, 3\], got \[4, 3, 1\]"):
        sdk.encoder(nn.Sequential(cnn, nn.Unflatten(1, (3, 1))), out_dim=3)(torch.randn(4, 1, 8, 8))
    with pytest.raises(sdk.ShapeError, match="x must be a batch tensor"):
        enc(torch.tensor(1.0))
    plain = sdk.create("encoder", "mlp", in_dim=4, out_dim=2)
    assert sdk.encoder(plain) is plain


def test_tuple_and_dict_outputs_need_a_selector():
    x = torch.randn(6, 4)
    with pytest.raises(sdk.ShapeError, match=r"returned a tuple of 2, not a tensor.*output=INDEX"):
        sdk.encoder(TupleOut(), input_shape=(4,))
    with pytest.raises(sdk.ShapeError, match=r"a dict with keys \['pooled', 'tokens'\].*output=KEY"):
        sdk.encoder(DictOut(), input_shape=(4,))
    with pytest.raises(sdk.ShapeError, match=r"output='pool' does not select.*keys \['pooled'"):
        sdk.encoder(DictOut(), input_shape=(4,), output="pool")
    with pytest.raises(sdk.ShapeError, match=r"\[2, D\], got \[2, 5, 3\]"):
        sdk.encoder(DictOut(), input_shape=(4,), output="tokens")
    for module, output in ((TupleOut(), 0), (DictOut(), "pooled"),
                           (DictOut(), lambda out: out["tokens"].mean(1))):
        enc = sdk.encoder(module, input_shape=(4,), output=output)
        assert enc.out_dim == 3
        torch.testing.assert_close(enc(x), module.lin(x))


class _ProbeOnFeatures(Objective):
    """Cross-entropy of a linear probe on ``extras["features"]`` (the embeddings unused): only
    what lies before the hooked submodule can learn."""

    requires = {"views": 1, "targets": True, "extras": (FEATURES,)}
    batch_coupled = False

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.probe = nn.Linear(dim, classes)

    def forward(self, views, batch):
        h = views.extras[FEATURES][0]
        per_sample = F.cross_entropy(self.probe(h), batch.targets, reduction="none")
        return Loss(value=per_sample.mean() + 0 * views.embeddings[0].sum(), per_sample=per_sample)


def test_the_trainer_trains_a_wrapped_module_and_its_features():
    data = _images()
    torch.manual_seed(0)
    cnn = SmallCNN()
    calls = []
    cnn.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[0]))
    enc = sdk.encoder(cnn, input_shape=(1, 8, 8), features="avgpool")
    calls.clear()
    start = {k: v.clone() for k, v in cnn.state_dict().items()}
    sgd = functools.partial(torch.optim.SGD, lr=0.1)  # no weight decay: a zero gradient moves nothing
    trainer = sdk.Trainer(enc, _ProbeOnFeatures(8, 3), sgd, max_steps=6, progress=False)
    trainer.fit(DataLoader(data, batch_size=16, shuffle=True))
    assert calls == [16] * 6  # one forward per step: the features come from it, not a second run
    assert torch.equal(cnn.fc.weight, start["fc.weight"])  # after the features: untouched
    assert not torch.equal(cnn.layer1[0].weight, start["layer1.0.weight"])
    assert not torch.equal(cnn.stem[0].weight, start["stem.0.weight"])
    feats = trainer.embed(DataLoader(data, batch_size=16), features=True)
    assert feats.shape == (48, 8)

    # the embeddings themselves, with a built-in objective: the loss falls
    torch.manual_seed(0)
    enc = sdk.encoder(SmallCNN(), input_shape=(1, 8, 8))
    trainer = sdk.Trainer(enc, sdk.create("objective", "cross_entropy"),
                          functools.partial(torch.optim.Adam, lr=0.02), max_steps=30, progress=False)
    loader = DataLoader(data, batch_size=16)
    before = F.cross_entropy(trainer.predict(loader), data.tensors[1])
    trainer.fit(DataLoader(data, batch_size=16, shuffle=True))
    after = F.cross_entropy(trainer.predict(loader), data.tensors[1])
    assert after < 0.5 * before, (before, after)


def test_state_dict_round_trip_copies_and_compile():
    torch.manual_seed(0)
    a = sdk.encoder(SmallCNN(), input_shape=(1, 8, 8), features="layer1")
    torch.manual_seed(1)
    b = sdk.encoder(SmallCNN(), input_shape=(1, 8, 8), features="layer1")
    x = torch.randn(4, 1, 8, 8)
    a.eval(), b.eval()
    assert not torch.allclose(a(x), b(x))
    assert all(k.startswith("module.") for k in a.state_dict())
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x)) and torch.equal(a.features(x), b.features(x))
    # a deep copy after a forward with gradients (as a momentum teacher takes it) is independent
    a.train()
    a(x).sum().backward()
    twin = copy.deepcopy(a)
    twin.eval(), a.eval()
    ref = a.features(x)  # eval mode now: not the training forward's features
    with torch.no_grad():
        torch.testing.assert_close(ref, a.module.layer1(a.module.stem(x)).flatten(1))
    with torch.no_grad():
        twin.module.layer1[0].weight.add_(1.0)
    assert torch.equal(twin(x), twin(x))
    assert torch.equal(a.features(x), ref)  # the copy's hook writes to the copy
    assert not torch.allclose(twin.features(x), a.features(x))
    # torch.compile traces it (the eager backend: the graph capture, without a compiler)
    compiled = torch.compile(a, backend="eager", fullgraph=False)
    torch.testing.assert_close(compiled(x), a(x))


def test_torchvision_resnet_when_installed():
    models = pytest.importorskip("torchvision.models")
    net = models.resnet18(num_classes=10)
    enc = sdk.encoder(net, input_shape=(3, 32, 32), features="avgpool")
    assert enc.out_dim == 10 and enc.features_dim == 512


def test_transformers_model_when_installed():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    model = transformers.BertModel(config)
    enc = sdk.encoder(model, out_dim=16, output=lambda out: out.last_hidden_state[:, 0])
    ids = torch.randint(0, 50, (3, 7))
    assert enc(ids).shape == (3, 16)


def test_a_killed_run_of_a_wrapped_module_resumes_bit_for_bit(tmp_path):
    def make():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        return sdk.encoder(net, input_shape=(6,), features="1")

    sdk.testing.check_resume(objective=lambda: _ProbeOnFeatures(8, 4), encoder=make,
                             tmp_dir=tmp_path)
