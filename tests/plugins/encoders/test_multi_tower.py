"""multi_tower: each view is encoded by the tower its input is marked for (sdk.multimodal), so
gradients of a view reach its own tower only, and a Trainer fit with TowerView transforms and a
paired second modality trains both towers end to end."""

import pytest
import torch
from torch.utils.data import DataLoader

import sdk
from sdk.multimodal import PairedDataset, TowerView, cross_modal_recall, for_tower


def _towers():
    torch.manual_seed(0)
    return sdk.create("encoder", "multi_tower", in_dims=(6, 3), hidden_dim=8, out_dim=4)


def test_each_view_reaches_only_its_own_tower():
    enc = _towers()
    x, p = torch.randn(5, 6), torch.randn(5, 3)
    a, b = (list(t.parameters()) for t in enc.towers)
    torch.testing.assert_close(enc(for_tower(x, 0)), enc.towers[0](x))
    torch.testing.assert_close(enc(for_tower(p, 1)), enc.towers[1](p))
    enc(for_tower(p, 1)).square().sum().backward()
    assert all(q.grad is None for q in a) and all(q.grad.abs().sum() > 0 for q in b)
    enc.zero_grad(set_to_none=True)
    enc(x).square().sum().backward()  # unmarked: tower 0 (embedding, probes, export)
    assert all(q.grad.abs().sum() > 0 for q in a) and all(q.grad is None for q in b)


def test_trainer_fit_trains_both_towers_on_paired_views(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    p = x[:, :3] * 2 + 0.05 * torch.randn(64, 3, generator=g)  # the paired modality
    enc = _towers()
    before = [torch.cat([q.detach().flatten().clone() for q in t.parameters()]) for t in enc.towers]
    seen = []

    class Spy(sdk.interfaces.Objective):
        requires = {"views": 2}
        batch_coupled = True

        def __init__(self):
            super().__init__()
            self.clip = sdk.create("objective", "clip_improved_baseline", label_smoothing=0.0)

        def forward(self, views, batch):
            seen.append([z.shape for z in views.embeddings])
            return self.clip(views, batch)

    loader = DataLoader(PairedDataset(x, p, torch.zeros(64, dtype=torch.long)), batch_size=32,
                        shuffle=True, drop_last=True)
    trainer = sdk.Trainer(enc, Spy(), lambda ps: torch.optim.AdamW(ps, lr=3e-2),
                          transforms=[TowerView(0), TowerView(1, paired=True)],
                          max_epochs=15, run_dir=tmp_path, progress=False, device="cpu")
    enc.eval()
    r0 = cross_modal_recall(enc(for_tower(x, 0)), enc(for_tower(p, 1)))
    enc.train()
    trainer.fit(loader)
    enc.eval()
    with torch.no_grad():
        r1 = cross_modal_recall(enc(for_tower(x, 0)), enc(for_tower(p, 1)))
    after = [torch.cat([q.detach().flatten() for q in t.parameters()]) for t in enc.towers]
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    assert seen[0] == [torch.Size([32, 4])] * 2
    assert r0 < 0.1 < 0.25 < r1  # chance 1/64; 0.34-0.45 over 3 seeds


def test_bad_input_names_the_plugin_and_field():
    enc = _towers()
    with pytest.raises(sdk.ShapeError, match="multi_tower.*tower 2"):
        enc(for_tower(torch.randn(2, 6), 2))
    with pytest.raises(sdk.ConfigError, match="multi_tower.*out_dim"):
        sdk.create("encoder", "multi_tower", towers=[enc.towers[0], sdk.create(
            "encoder", "mlp", in_dim=3, out_dim=5)])
    with pytest.raises(sdk.ConfigError, match="multi_tower.*in_dims"):
        sdk.create("encoder", "multi_tower", towers=list(enc.towers), in_dims=(6, 3))


def test_a_momentum_teacher_copy_reads_the_same_marks():
    enc = _towers().eval()
    teacher = sdk.create("teacher", "ema")
    teacher.attach(enc)
    teacher.eval()
    p = torch.randn(5, 3)
    torch.testing.assert_close(teacher(for_tower(p, 1)), enc.towers[1](p))
