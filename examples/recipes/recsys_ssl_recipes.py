"""BPR alone against BPR + InfoNCE between two edge-dropout views of a LightGCN (SGL-ED), on
sparse synthetic implicit feedback from a low-rank preference model.

Reproduces the general collaborative-filtering case of SSLRec (Ren, Xia, Zhao, Luo & Huang,
"SSLRec: A Self-Supervised Learning Framework for Recommendation", WSDM 2024, arXiv:2308.05697),
whose graph models pair the BPR loss with a contrastive auxiliary task; SGL (Wu et al., SIGIR
2021, arXiv:2010.10783) contrasts each user's and item's embeddings from two graphs with a
fraction rho of the interactions dropped, and finds the gain largest where interactions are
sparse. Model: LightGCN (id embeddings, symmetric-normalised propagation, the mean of the
layers). Objectives: ``bpr_loss`` on (user, observed item, sampled unobserved item) scores and
``nt_xent`` on the two views' embeddings of the batch's users and of its items (rho = 0.1;
weight 0.1 and temperature 0.2 as in SGL, or SSLRec's much lighter weight; ``nt_xent`` also
counts the other nodes of the same view as negatives, SGL only those of the other view). Data:
users' tastes and items' traits of rank 4; a user interacts with a few items drawn by
preference; a fixed number per user is held out. Scored by Recall@20 and NDCG@20 on the
held-out items, the training items excluded.

Run: ``python examples/recipes/recsys_ssl_recipes.py`` (full: 3 seeds, 3 and 8 training
interactions per user, 25 epochs, three arms); ``main(fast=True)`` is the test's version (2
seeds, 3 per user, 10 epochs, BPR and SGL's weight).
"""

from __future__ import annotations

import torch

import sdk
from sdk import metrics
from sdk.types import Batch, Views


def interactions(users: int = 300, items: int = 200, per_user: int = 6, held_out: int = 2,
                 rank: int = 4, sharpness: float = 4.0, tail: float = 0.0,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean train and test matrices ``[users, items]``: each user draws ``per_user + held_out``
    distinct items with probability softmax(sharpness * u . v / sqrt(rank) - tail * log(r_v)),
    ``r_v`` an item's random popularity rank (``tail > 0``: a long tail); ``held_out`` of them
    (at random) are the test set."""
    g = torch.Generator().manual_seed(seed)
    pref = torch.randn(users, rank, generator=g) @ torch.randn(rank, items, generator=g) / rank ** 0.5
    popularity = -tail * torch.log1p(torch.randperm(items, generator=g).float())
    drawn = torch.multinomial(torch.softmax(sharpness * pref + popularity, dim=1), per_user + held_out,
                              generator=g)
    order = torch.rand(users, per_user + held_out, generator=g).argsort(dim=1)
    drawn = drawn.gather(1, order)
    rows = torch.arange(users)[:, None]
    train = torch.zeros(users, items, dtype=torch.bool)
    test = torch.zeros(users, items, dtype=torch.bool)
    train[rows, drawn[:, held_out:]] = True
    test[rows, drawn[:, :held_out]] = True
    return train, test


class LightGCN(torch.nn.Module):
    """He et al., SIGIR 2020: id embeddings propagated ``layers`` times over the symmetric-
    normalised user-item graph ``D^-1/2 A D^-1/2``; the output is the mean of the layers."""

    def __init__(self, users: int, items: int, dim: int = 32, layers: int = 2, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.users, self.layers = users, layers
        self.embedding = torch.nn.Parameter(0.1 * torch.randn(users + items, dim, generator=g))

    def forward(self, edges: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """User and item embeddings propagated over the interaction ``edges`` ``[users, items]``
        (the graph's two off-diagonal blocks, ``D_u^-1/2 E D_i^-1/2`` and its transpose)."""
        e = edges.float()
        norm = e * e.sum(1, keepdim=True).clamp_min(1).rsqrt() * e.sum(0, keepdim=True).clamp_min(1).rsqrt()
        hu, hi = self.embedding[:self.users], self.embedding[self.users:]
        out_u, out_i = [hu], [hi]
        for _ in range(self.layers):
            hu, hi = norm @ hi, norm.T @ hu
            out_u.append(hu)
            out_i.append(hi)
        return torch.stack(out_u).mean(0), torch.stack(out_i).mean(0)


def ranking_metrics(scores: torch.Tensor, train: torch.Tensor, test: torch.Tensor,
                    k: int = 20) -> dict[str, float]:
    """Recall@k and NDCG@k of ``scores`` ``[users, items]`` on ``test``, ``train`` items excluded."""
    top = scores.masked_fill(train, float("-inf")).topk(k, dim=1).indices
    hit = test.gather(1, top).float()
    discount = 1 / torch.log2(torch.arange(2, k + 2).float())
    ideal = (discount[None] * (torch.arange(k)[None] < test.sum(1, keepdim=True))).sum(1)
    return {"recall": float((hit.sum(1) / test.sum(1)).mean()),
            "ndcg": float(((hit * discount).sum(1) / ideal).mean())}


def fit(train: torch.Tensor, *, ssl_weight: float, epochs: int, seed: int, rho: float = 0.1,
        temperature: float = 0.2, batch_size: int = 256, lr: float = 0.01,
        l2: float = 1e-4) -> LightGCN:
    """LightGCN trained with ``bpr_loss`` (+ ``ssl_weight`` x ``nt_xent`` between two views whose
    graphs each keep an interaction with probability ``1 - rho``)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = LightGCN(*train.shape, seed=seed)
    bpr = sdk.create("objective", "bpr_loss")
    infonce = sdk.create("objective", "nt_xent", temperature=temperature)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    users, items = train.nonzero(as_tuple=True)
    for _ in range(epochs):
        for rows in torch.randperm(users.numel(), generator=g).split(batch_size):
            u, i = users[rows], items[rows]
            j = torch.randint(0, train.shape[1], (rows.numel(),), generator=g)
            zu, zi = model(train)
            scores = torch.stack([(zu[u] * zi[i]).sum(1), (zu[u] * zi[j]).sum(1)], dim=1)
            loss = bpr(Views(logits=scores), Batch()).value
            picked = (zu[u].square().sum() + zi[i].square().sum() + zi[j].square().sum())
            loss = loss + l2 * picked / rows.numel()
            if ssl_weight > 0:
                (zu1, zi1), (zu2, zi2) = (model(train & (torch.rand(train.shape, generator=g) >= rho))
                                          for _ in range(2))
                bu, bi = u.unique(), torch.cat([i, j]).unique()
                loss = loss + ssl_weight * (
                    infonce(Views(embeddings=(zu1[bu], zu2[bu])), Batch(index=bu)).value
                    + infonce(Views(embeddings=(zi1[bi], zi2[bi])), Batch(index=bi)).value)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


ARMS = {"bpr": (0.0, 0.2), "bpr_infonce": (0.1, 0.2), "bpr_infonce_light": (0.003, 0.1)}
"""(InfoNCE weight, temperature) per arm: BPR alone; SGL's lambda = 0.1, tau = 0.2; the scale of
SSLRec's sgl.yml (cl_weight 1e-3 on each of its three summed terms, tau = 0.1)."""


def main(fast: bool = False, seed: int = 0) -> dict:
    """Recall@20, NDCG@20 and the item embeddings' uniformity (``sdk.metrics.uniformity``, lower
    = more uniform) of each arm of :data:`ARMS` (the fast version: the first two) and of item
    popularity, averaged over seeds, per number of training interactions per user."""
    levels = (3,) if fast else (3, 8)
    seeds = range(seed, seed + (2 if fast else 3))
    epochs = 10 if fast else 25
    arms = dict(list(ARMS.items())[:2]) if fast else ARMS
    out: dict = {"seeds": len(seeds), "epochs": epochs}
    for per_user in levels:
        runs: dict[str, list[dict[str, float]]] = {arm: [] for arm in (*arms, "popularity")}
        for s in seeds:
            train, test = interactions(per_user=per_user, seed=s)
            for arm, (weight, temperature) in arms.items():
                model = fit(train, ssl_weight=weight, temperature=temperature, epochs=epochs, seed=s)
                with torch.no_grad():
                    zu, zi = model(train)
                runs[arm].append({**ranking_metrics(zu @ zi.T, train, test),
                                  "uniformity": metrics.uniformity(zi)})
            popularity = train.sum(0).float().expand(train.shape[0], -1)
            runs["popularity"].append(ranking_metrics(popularity, train, test))
        for arm, results in runs.items():
            for key in results[0]:
                out[f"{arm}/{key}/per_user={per_user}"] = sum(r[key] for r in results) / len(results)
        for arm in list(arms)[1:]:
            gains = [b["recall"] - a["recall"] for a, b in zip(runs["bpr"], runs[arm])]
            out[f"{arm}/recall_gain_min/per_user={per_user}"] = min(gains)
            out[f"{arm}/recall_gain_max/per_user={per_user}"] = max(gains)
    return out


if __name__ == "__main__":
    result = main()
    print(f"{result['seeds']} seeds, {result['epochs']} epochs; Recall@20 / NDCG@20 / uniformity")
    for key, value in result.items():
        if "/" in key:
            print(f"{key}: {value:.3f}")
