"""retrieval_in_context_tabular: the retrieved context against a brute-force neighbour loop, the
reader's dependence on the context alone, leave-one-out in training, and on wine a trained model
that predicts from the labels it retrieves."""

import pytest
import torch
from torch.utils.data import TensorDataset

import sdk
from plugins.encoders.retrieval_in_context_tabular import retrieve


def _slow_knn(queries, bank, k, exclude_exact=False):
    out = []
    for q in queries:
        d = [(float(((q - r) ** 2).sum()) ** 0.5, j) for j, r in enumerate(bank)]
        d = [(dist, j) for dist, j in d if not (exclude_exact and dist == 0)]
        out.append([j for _, j in sorted(d)[:k]])
    return torch.tensor(out)


def _table(n=40, f=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, f, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_retrieval_equals_brute_force_neighbours_and_excludes_the_row_itself():
    bank, _ = _table()
    g = torch.Generator().manual_seed(1)
    queries = torch.cat([torch.randn(6, 5, generator=g), bank[:3]])
    assert torch.equal(retrieve(queries, bank, 7), _slow_knn(queries, bank, 7))
    assert retrieve(queries, bank, 7)[6:, 0].tolist() == [0, 1, 2]  # a bank row finds itself
    loo = retrieve(queries, bank, 7, exclude_exact=True)
    assert torch.equal(loo, _slow_knn(queries, bank, 7, exclude_exact=True))
    rand = retrieve(queries, bank, 7, exclude_exact=True, random=True, generator=g)
    assert all(len(set(r.tolist())) == 7 for r in rand)  # without replacement
    assert all(i not in rand[6 + i].tolist() for i in range(3))


def test_encoder_standardises_retrieves_and_caps_the_context():
    x, y = _table()
    enc = sdk.create("encoder", "retrieval_in_context_tabular", dataset=TensorDataset(x, y),
                     context_size=6, embed_dim=8, heads=2).eval()
    assert (enc.out_dim, enc.in_dim, enc.num_classes) == (8, 5, 3)
    torch.testing.assert_close(enc.bank, (x - x.mean(0)) / x.std(0))
    q = torch.randn(4, 5)
    xs, ctx, ctx_y = enc.context(q)
    idx = _slow_knn((q - x.mean(0)) / x.std(0), enc.bank, 6)
    assert torch.equal(ctx, enc.bank[idx]) and torch.equal(ctx_y, y[idx])
    # a training row retrieves every other row but never itself; in evaluation it finds itself
    big = sdk.create("encoder", "retrieval_in_context_tabular", dataset=x, labels=y, embed_dim=8,
                     heads=2)
    assert big.context_size == 2048  # TabDPT's context size; the 40-row bank is all of it
    assert big.context(x[:2])[1].shape[1] == 39
    assert not any((big.context(x[:2])[1][i] == big.bank[i]).all(1).any() for i in range(2))
    big.eval()
    assert big.context(x[:2])[1].shape[1] == 40
    # without out_dim the output is the query token; with it, TabDPT's head on that token
    assert big.head is None and torch.equal(big(x[:3]), big.features(x[:3]))
    logits = sdk.create("encoder", "retrieval_in_context_tabular", dataset=x, labels=y, embed_dim=8,
                        heads=2, out_dim=3).eval()
    assert logits.out_dim == 3 and [m.out_features for m in logits.head if hasattr(m, "out_features")] == [32, 3]
    torch.testing.assert_close(logits(x[:3]), logits.head(logits.features(x[:3])))


def test_output_depends_on_the_retrieved_rows_only():
    x, y = _table(seed=2)
    torch.manual_seed(0)
    enc = sdk.create("encoder", "retrieval_in_context_tabular", dataset=x, labels=y,
                     context_size=5, embed_dim=8, heads=2, depth=2).eval()
    q = x[:3] + 0.3
    z = enc(q)
    far = [j for j in range(40) if j not in set(retrieve((q - enc.mean) / enc.std, enc.bank, 5)
                                                .flatten().tolist())]
    other = enc.bank_labels.clone()
    other[far] = (other[far] + 1) % 3  # relabel rows no query retrieves
    near = retrieve((q - enc.mean) / enc.std, enc.bank, 5)[:, 0]
    with torch.no_grad():
        enc.bank_labels.copy_(other)
        torch.testing.assert_close(enc(q), z, rtol=0, atol=0)
        enc.bank_labels[near] = (enc.bank_labels[near] + 1) % 3  # relabel each nearest row
        assert (enc(q) - z).abs().amax(1).min() > 1e-3
    assert torch.equal(y, _table(seed=2)[1])  # the bank is a copy, not the caller's labels


def _wine():
    from sklearn.datasets import load_wine

    d = load_wine()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm[:110]], y[perm[:110]], x[perm[110:]], y[perm[110:]]


def test_on_wine_a_trained_model_predicts_from_the_labels_it_retrieves():
    xtr, ytr, xte, yte = _wine()
    torch.manual_seed(0)
    enc = sdk.create("encoder", "retrieval_in_context_tabular", dataset=xtr, labels=ytr,
                     context_size=8, embed_dim=16, heads=2, depth=1)
    head = torch.nn.Linear(16, 3)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-2)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(head(enc(xtr)), ytr)
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    with torch.no_grad():
        acc = (head(enc(xte)).argmax(1) == yte).float().mean()
        enc.bank_labels.copy_((ytr + 1) % 3)  # every retrieved label moved to the next class
        moved = head(enc(xte)).argmax(1)
    assert acc >= 0.9
    # the predictions follow the retrieved labels: most test rows now get the next class
    assert (moved == (yte + 1) % 3).float().mean() > 0.75 and (moved == yte).float().mean() < 0.25


def test_bad_input_is_named():
    x, y = _table()
    enc = sdk.create("encoder", "retrieval_in_context_tabular", dataset=x, labels=y)
    with pytest.raises(sdk.ShapeError, match=r"retrieval_in_context_tabular': x must be floating rows \[B, 5\]"):
        enc(torch.randn(3, 6))
    with pytest.raises(sdk.ShapeError, match="x must be floating"):
        enc(torch.ones(3, 5, dtype=torch.long))
    with pytest.raises(sdk.ConfigError, match=r"labels must be integer class ids \[40\]"):
        sdk.create("encoder", "retrieval_in_context_tabular", dataset=x)
    with pytest.raises(sdk.ConfigError, match="labels must be class ids in"):
        sdk.create("encoder", "retrieval_in_context_tabular", dataset=x, labels=y, num_classes=2)
    with pytest.raises(sdk.ConfigError, match="in_dim=4 but the dataset has 5"):
        sdk.create("encoder", "retrieval_in_context_tabular", dataset=x, labels=y, in_dim=4)
    with pytest.raises(sdk.ConfigError, match="N >= 3"):
        sdk.create("encoder", "retrieval_in_context_tabular", dataset=x[:2], labels=y[:2])
    with pytest.raises(sdk.ConfigError, match="context_size"):
        sdk.create("encoder", "retrieval_in_context_tabular", context_size=1)
    with pytest.raises(sdk.ConfigError, match="retrieval must be one of"):
        sdk.create("encoder", "retrieval_in_context_tabular", retrieval="faiss")
    with pytest.raises(sdk.ConfigError, match="not divisible by heads=3"):
        sdk.create("encoder", "retrieval_in_context_tabular", heads=3)
