"""Weighted k-nearest-neighbour accuracy of frozen embeddings.

Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
CVPR 2018 (arXiv:1805.01978), Section 3.4. Implementation in :mod:`sdk.metrics`; this module
registers its streaming form (``fit`` on training embeddings, ``update`` on test batches).
"""

from __future__ import annotations

from sdk.card import Card
from sdk.hookspecs import hookimpl
from sdk.metrics import KNNAccuracy, knn_accuracy, knn_predict

__all__ = ["CARD", "KNNAccuracy", "knn_accuracy", "knn_predict"]

CARD = Card(
    name="knn_accuracy", kind="metric",
    title="Unsupervised Feature Learning via Non-Parametric Instance Discrimination",
    paper="arXiv:1805.01978",
    summary="Classifies each test embedding by a vote of its k most cosine-similar training "
            "embeddings weighted by exp(s / T); chunked over test rows to bound memory.",
    formula="s_ij = <x_i, x_j> / (||x_i|| ||x_j||); N_k(i) = top-k j by s_ij; "
            "y_hat_i = argmax_c sum_{j in N_k(i)} exp(s_ij / T) [y_j = c]; T = 0.07",
    left_out="The paper's k = 200; the default k = 20 follows the common DINO-style protocol. "
             "Ties between classes go to the smaller class id.",
)


@hookimpl
def paperplug_register(registry) -> None:
    registry.add(KNNAccuracy, card=CARD)
