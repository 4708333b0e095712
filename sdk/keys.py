"""Names of the ``Views.extras`` / ``Batch.extras`` entries that more than one component shares.

Use these constants instead of string literals; each documents the shape of its value
(``B``: batch size, ``V``: number of views, ``M``: memory entries).
"""

from __future__ import annotations

NEGATIVES = "negatives"
"""``Views.extras``: a shared memory of extra negatives ``[M, D]`` (detached), published by a
teacher's ``memory()`` (queue, memory bank); contrastive objectives add them to every anchor's
denominator."""

NEGATIVES_MASK = "negatives_mask"
"""``Views.extras``: which entries of :data:`NEGATIVES` are valid, bool ``[M]`` (all when absent)."""

NEGATIVES_INDEX = "negatives_index"
"""``Views.extras``: the dataset index of each entry of :data:`NEGATIVES`, long ``[M]`` (``-1``:
unknown); an anchor never counts its own sample's entries."""

TEACHER = "teacher"
"""``Views.extras``: the teacher network's output on each view, a tuple of ``V`` tensors ``[B, D]``."""

FEATURES = "features"
"""``Views.extras``: the encoder's backbone features (before the projection head) of each view,
a tuple of ``V`` tensors ``[B, F]``."""

PATCHES = "patches"
"""``Views.extras``: patch features as a pair ``(output, target)`` of ``[B, P, D]`` tensors."""

ADJACENCY = "adjacency"
"""``Batch.extras``: the graph among the batch's samples, ``[B, B]`` (dense or sparse COO; a
nonzero entry links two samples)."""

TARGET_FEATURES = "target_features"
"""``Batch.extras``: features of the batch's samples from a frozen pretrained encoder, ``[B, Dz]``
(precomputed, e.g. by the dataset), which an alignment objective (REPA) projects the model's
representation onto."""

MASK = "mask"
"""``Batch.extras``: which tokens a masking transform hid, ``[B, L]`` (1.0 = masked, in the
tokens' original order; :class:`sdk.masking.Mask`)."""

IDS_RESTORE = "ids_restore"
"""``Batch.extras``: long ``[B, L]``; gathering ``[visible..., masked...]`` tokens by it restores
the original order (:class:`sdk.masking.Mask`)."""

RECONSTRUCTION_TARGET = "reconstruction_target"
"""``Batch.extras``: what a masked model reconstructs, one row per token, ``[B, L, P]`` (raw
patches from a masking transform; objectives normalise them as they need)."""

SHARED = (NEGATIVES, NEGATIVES_MASK, NEGATIVES_INDEX, TEACHER, FEATURES, PATCHES, ADJACENCY,
          TARGET_FEATURES, MASK, IDS_RESTORE, RECONSTRUCTION_TARGET)
