"""symmetry_enhanced_contrastive (SECLA) against a bag-by-bag loop of its formula."""

import math

import pytest
import torch
import torch.nn.functional as F

import sdk
from plugins.contrastive.symmetry_enhanced_contrastive import symmetry_enhanced_contrastive_loss


def slow_secla(faces, names, n_faces, n_names, alpha, agreement="diagonal", hinge_weight=0.0, margin=0.2):
    """Loops over bags with the real (unpadded) counts n_faces[b], n_names[b]; with a hinge every
    term uses cosines (the reference's agree-hinge mode normalises faces and names first)."""
    b = len(faces)
    cos = hinge_weight > 0

    def score(xs, nx, ys, ny, cos=False):
        def sim(u, v):
            return float(F.cosine_similarity(u, v, dim=0)) if cos else float(u @ v)
        return [[sum(max(sim(xs[a][i], ys[c][j]) for j in range(ny[c])) for i in range(nx[a])) / nx[a]
                 for c in range(b)] for a in range(b)]

    s_nf = score(names, n_names, faces, n_faces, cos)
    s_fn = score(faces, n_faces, names, n_names, cos)

    def ce(s):
        return sum(math.log(sum(math.exp(x) for x in s[a])) - s[a][a] for a in range(b)) / b

    if agreement == "diagonal":
        agree = sum((s_nf[a][a] - s_fn[a][a]) ** 2 for a in range(b)) / b
    else:
        agree = sum((s_nf[a][c] - s_fn[c][a]) ** 2 for a in range(b) for c in range(b)) / b ** 2
    total = ce(s_nf) + ce(s_fn) + alpha * agree
    if hinge_weight:
        c = [[s_nf[a][j] + s_fn[a][j] for j in range(b)] for a in range(b)]
        hinge = sum(max(max(0.0, margin + c[a][j] - c[j][j]) for a in range(b) if a != j) for j in range(b))
        hinge += sum(max(max(0.0, margin + c[a][j] - c[a][a]) for j in range(b) if j != a) for a in range(b))
        total += hinge_weight * hinge
    return total


def bags(seed, b=4, f=3, n=3, d=5):
    g = torch.Generator().manual_seed(seed)
    faces = torch.randn(b, f, d, generator=g, dtype=torch.float64)
    names = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    n_faces = torch.randint(1, f + 1, (b,), generator=g)
    n_names = torch.randint(1, n + 1, (b,), generator=g)
    face_mask = torch.arange(f)[None] < n_faces[:, None]
    name_mask = torch.arange(n)[None] < n_names[:, None]
    return faces, names, face_mask, name_mask, n_faces.tolist(), n_names.tolist()


@pytest.mark.parametrize("hinge_weight", [0.0, 1.0])
@pytest.mark.parametrize("agreement", ["diagonal", "full"])
def test_matches_loop_with_padded_bags(hinge_weight, agreement):
    faces, names, fm, nm, nf, nn_ = bags(0)
    got, _ = symmetry_enhanced_contrastive_loss(faces, names, fm, nm, alpha=0.5, agreement=agreement,
                                                hinge_weight=hinge_weight)
    expected = slow_secla(faces, names, nf, nn_, 0.5, agreement, hinge_weight)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_defaults_are_the_authors_scripts_alpha_015_and_diagonal_agreement():
    """run_face_align.sh: --alpha 0.15 --agree_type diag; the objective's and the function's
    defaults give that loss, which neither alpha=0.5 nor the full agreement does."""
    faces, names, fm, nm, nf, nn_ = bags(6)
    views = sdk.Views(embeddings=(faces[:, 0],), extras={"faces": faces, "names": names,
                                                        "faces_mask": fm, "names_mask": nm})
    got = sdk.create("objective", "symmetry_enhanced_contrastive")(views).value
    expected = slow_secla(faces, names, nf, nn_, 0.15, "diagonal")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert symmetry_enhanced_contrastive_loss(faces, names, fm, nm)[0].item() == pytest.approx(expected, rel=1e-5)
    for other in (slow_secla(faces, names, nf, nn_, 0.5, "diagonal"),
                  slow_secla(faces, names, nf, nn_, 0.15, "full")):
        assert abs(other - expected) > 1e-3


def test_agree_hinge_mode_normalises_faces_and_names_before_every_term():
    """With the hinge on, rescaling any face or name vector leaves the whole loss unchanged
    (every term sees cosines); without it the contrastive terms see dot products."""
    faces, names, fm, nm, _, _ = bags(7)
    g = torch.Generator().manual_seed(8)
    scaled_faces = faces * (0.2 + 3 * torch.rand(faces.shape[:2] + (1,), generator=g, dtype=torch.float64))
    scaled_names = names * (0.2 + 3 * torch.rand(names.shape[:2] + (1,), generator=g, dtype=torch.float64))
    for agreement in ("diagonal", "full"):
        a, pa = symmetry_enhanced_contrastive_loss(faces, names, fm, nm, agreement=agreement, hinge_weight=1.0)
        b, pb = symmetry_enhanced_contrastive_loss(scaled_faces, scaled_names, fm, nm, agreement=agreement,
                                                   hinge_weight=1.0)
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(pa["names_to_faces"], pb["names_to_faces"])
        torch.testing.assert_close(pa["agreement"], pb["agreement"])
    a, _ = symmetry_enhanced_contrastive_loss(faces, names, fm, nm)
    b, _ = symmetry_enhanced_contrastive_loss(scaled_faces, scaled_names, fm, nm)
    assert abs(a.item() - b.item()) > 1e-3


def test_padding_content_is_ignored():
    faces, names, fm, nm, _, _ = bags(1)
    a, _ = symmetry_enhanced_contrastive_loss(faces, names, fm, nm)
    faces2 = torch.where(fm[..., None], faces, 100.0)
    names2 = torch.where(nm[..., None], names, -100.0)
    b, _ = symmetry_enhanced_contrastive_loss(faces2, names2, fm, nm)
    assert torch.allclose(a, b)


def test_singleton_bags_are_symmetric_info_nce_and_agree():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    loss = sdk.create("objective", "symmetry_enhanced_contrastive")(sdk.Views(embeddings=(z1, z2)))
    s = z2 @ z1.T  # names (view 2) against faces (view 1)
    t = torch.arange(6)
    expected = F.cross_entropy(s, t) + F.cross_entropy(s.T, t)
    assert torch.allclose(loss.value, expected, rtol=1e-5)
    assert loss.logs["agreement"].item() == pytest.approx(0.0, abs=1e-10)


def test_swapping_the_two_modalities_leaves_the_loss_unchanged():
    faces, names, fm, nm, _, _ = bags(3)
    a, _ = symmetry_enhanced_contrastive_loss(faces, names, fm, nm, hinge_weight=1.0)
    b, _ = symmetry_enhanced_contrastive_loss(names, faces, nm, fm, hinge_weight=1.0)
    assert torch.allclose(a, b)
    one_way = [F.cross_entropy(torch.einsum("and,bfd->abnf", x, y).amax(3).mean(2), torch.arange(4))
               for x, y in ((names, faces), (faces, names))]
    assert not torch.allclose(one_way[0], one_way[1])  # a one-direction loss is not symmetric


def test_invariant_to_order_within_bags():
    faces, names, _, _, _, _ = bags(4)
    a, _ = symmetry_enhanced_contrastive_loss(faces, names)
    b, _ = symmetry_enhanced_contrastive_loss(faces[:, [2, 0, 1]], names[:, [1, 2, 0]])
    assert torch.allclose(a, b)


def test_gradient_matches_finite_differences():
    faces, names, fm, nm, _, _ = bags(5, b=3, f=2, n=2, d=3)
    faces.requires_grad_()
    torch.autograd.gradcheck(
        lambda x: symmetry_enhanced_contrastive_loss(x, names, fm, nm, hinge_weight=1.0)[0].double(),
        (faces,), eps=1e-3, atol=2e-3, rtol=1e-2)


def test_training_learns_face_naming_on_synthetic_bags():
    """Faces of class c are noisy prototypes; names are learnable class embeddings; each caption
    names the classes of its 1-3 faces (in random order). Per-face naming accuracy (argmax over
    the caption's names) must be high and beat the one-direction (names->faces) loss."""

    def run(symmetric, seed):
        g = torch.Generator().manual_seed(seed)
        classes, d, b = 12, 16, 32
        protos = torch.randn(classes, d, generator=g)
        torch.manual_seed(seed)
        name_emb = torch.nn.Parameter(0.01 * torch.randn(classes, d))
        proj = torch.nn.Linear(d, d)
        opt = torch.optim.Adam([name_emb, *proj.parameters()], lr=0.05)

        def sample():
            labels = torch.stack([torch.randperm(classes, generator=g)[:3] for _ in range(b)])
            n = torch.randint(1, 4, (b,), generator=g)
            mask = torch.arange(3)[None] < n[:, None]
            faces = protos[labels] + 1.0 * torch.randn(b, 3, d, generator=g)
            perm = torch.argsort(torch.rand(b, 3, generator=g) + (~mask) * 10, dim=1)  # shuffle names
            return faces, labels, mask, torch.gather(labels, 1, perm)

        for _ in range(60):
            faces, labels, mask, name_ids = sample()
            f, nm = proj(faces), name_emb[name_ids]
            if symmetric:
                loss, _ = symmetry_enhanced_contrastive_loss(f, nm, mask, mask)
            else:
                from plugins.contrastive.symmetry_enhanced_contrastive import bag_scores
                s_nf, _ = bag_scores(nm, f, mask, mask)
                loss = F.cross_entropy(s_nf, torch.arange(b))
            opt.zero_grad()
            loss.backward()
            opt.step()
        faces, labels, mask, name_ids = sample()
        with torch.no_grad():
            sim = torch.einsum("bfd,bnd->bfn", proj(faces), name_emb[name_ids])
            sim = sim.masked_fill(~mask[:, None, :], -1e9)
            pred = torch.gather(name_ids, 1, sim.argmax(-1))
        return float((pred == labels)[mask].float().mean())

    sym = run(True, 0)
    one = run(False, 0)
    print(f"naming accuracy: SECLA {sym:.3f}, one-direction {one:.3f}")
    assert sym >= 0.8
    assert sym >= one - 0.02


def test_bad_inputs_and_parameters():
    obj = sdk.create("objective", "symmetry_enhanced_contrastive")
    with pytest.raises(sdk.RequirementError, match="names"):
        obj(sdk.Views(embeddings=(torch.randn(2, 3),), extras={"faces": torch.randn(2, 2, 3)}))
    with pytest.raises(sdk.ShapeError, match="faces"):
        obj(sdk.Views(embeddings=(torch.randn(2, 3),),
                      extras={"faces": torch.randn(2, 3), "names": torch.randn(2, 2, 3)}))
    with pytest.raises(sdk.ShapeError, match="faces_mask"):
        obj(sdk.Views(embeddings=(torch.randn(2, 3),),
                      extras={"faces": torch.randn(2, 2, 3), "names": torch.randn(2, 2, 3),
                              "faces_mask": torch.ones(2, 3, dtype=torch.bool)}))
    with pytest.raises(sdk.RequirementError, match="views"):
        obj(sdk.Views(embeddings=(torch.randn(2, 3),)))
    for param in ("alpha", "hinge_weight", "margin"):
        with pytest.raises(sdk.ConfigError, match=param):
            sdk.create("objective", "symmetry_enhanced_contrastive", **{param: -1.0})
    with pytest.raises(sdk.ConfigError, match="agreement"):
        sdk.create("objective", "symmetry_enhanced_contrastive", agreement="diag")
    with pytest.raises(sdk.ConfigError, match="agreement"):
        symmetry_enhanced_contrastive_loss(torch.randn(2, 1, 3), torch.randn(2, 1, 3), agreement="all")
