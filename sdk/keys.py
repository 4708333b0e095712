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

LAYERS = "layers"
"""``Views.extras``: the model's intermediate representations of the batch, a tuple of ``L``
tensors ``[B, D_l]`` (widths may differ), for objectives that act on several levels."""

TEACHER_LAYERS = "teacher_layers"
"""``Views.extras``: a teacher's intermediate representations of the batch, a tuple of ``L``
tensors ``[B, D_l]`` (detached), one per entry of :data:`LAYERS` (the student's representation
at the matching layer), for objectives that distil several levels."""

UNLABELED = "unlabeled"
"""``Views.extras``: the encoder's output on each view of the step's unlabelled batch (the
Trainer's ``unlabeled`` loader, ``fit(..., unlabeled=...)``), a tuple of ``V_u`` tensors
``[U, D]`` in the order of ``Trainer(unlabeled_transforms=...)`` (weak first, then strong, for
FixMatch and its descendants); ``U = mu * B`` is the unlabelled loader's batch size. Only
training steps carry it (:meth:`sdk.Trainer.evaluate` calls objectives without it)."""

UNLABELED_INDEX = "unlabeled_index"
"""``Views.extras``: the dataset index of each row of :data:`UNLABELED`, long ``[U]`` (the
unlabelled loader's third item), the key of per-sample pseudo-label state."""

TIME = "time"
"""``Batch.extras``: the observed time ``T = min(Y, C)`` of each sample under right censoring,
float ``[B]`` (``ipcw_erm``)."""

EVENT = "event"
"""``Batch.extras``: the censoring indicator ``delta = 1[Y <= C]`` of each sample, ``[B]`` (1: the
event was observed, 0: censored) (``ipcw_erm``)."""

PROPENSITY = "propensity"
"""``Batch.extras``: the probability ``theta`` that each (user, item) pair was exposed, float
``[B]`` in ``(0, 1]`` (``unbiased_implicit_feedback``)."""

MASK = "mask"
"""``Batch.extras``: which tokens a masking transform hid, ``[B, L]`` (1.0 = masked, in the
tokens' original order; :class:`sdk.masking.Mask`)."""

IDS_RESTORE = "ids_restore"
"""``Batch.extras``: long ``[B, L]``; gathering ``[visible..., masked...]`` tokens by it restores
the original order (:class:`sdk.masking.Mask`)."""

RECONSTRUCTION_TARGET = "reconstruction_target"
"""``Batch.extras``: what a masked model reconstructs, one row per token, ``[B, L, P]`` (raw
patches from a masking transform; objectives normalise them as they need)."""

VIEW_TOKENS = "view_tokens"
"""``Batch.extras``: a frozen or momentum encoder's patch tokens of each view, a tuple of ``V``
tensors ``[B, P, D]`` (detached), for reweighters that judge a pair of views by their tokens
(``genview_quality_weight``) and dense objectives whose targets are a teacher's tokens
(``dense_ap_loss``, ``semantic_alignment_views``)."""

GENERATED = "generated"
"""``Batch.extras``: which samples are generated (synthetic) rather than real, bool or 0/1 ``[B]``
(``generated_data_reweighting``)."""

REFERENCE_LOGITS = "reference_logits"
"""``Batch.extras``: a frozen reference model's class scores of each sample, ``[B, C]`` (detached;
e.g. a model that does not see part of the input, ``prior_reference_token_weighting``)."""

INPUT = "input"
"""``Batch.extras``: the clean input ``x`` of the batch, ``[B, ...]`` as the loader gave it, passed
on by a transform for objectives that compare the model with its input or differentiate it with
respect to the input (``contractive_reconstruction``); a leaf that requires grad when it is the
very tensor the encoder sees."""

EDIT_DISTANCE = "edit_distance"
"""``Batch.extras``: how many edits (perturbed nodes, edges, values) turned each sample into each
of its perturbed views, ``[B, V - 1]`` for views ``1..V-1`` (positive; view 0 is the original;
``discrepancy_distance_matching``)."""

TOKEN_IDS = "token_ids"
"""``Batch.extras``: a batch of token sequences, long ``[B, T]`` (ids into a vocabulary of ``V``
tokens), for objectives over sequence models (language-model fine-tuning, replaced-token
detection)."""

TOKEN_MASK = "token_mask"
"""``Batch.extras``: which positions of :data:`TOKEN_IDS` count, ``[B, T]`` (bool or 0/1; padding
and prompt positions are 0); a mask of another shape than the tokens is an error."""

AUGMENTATION_PARAMS = "augmentation_params"
"""``Batch.extras``: the parameters of the augmentation that made view 1 from view 0, float
``[B, P]`` (each normalised, e.g. to [0, 1]), for objectives that predict them
(``augmentation_aware_discriminator``)."""

CLASS_TEXT_FEATURES = "class_text_features"
"""``Views.extras``: a text tower's features of every class's prompt, conditioned on each view of
each sample (image-conditioned prompts), a tuple of tensors ``[B, C, D]``, one per view, the
original first (``prompt_consistency``)."""

MIXING_SOURCE = "mixing_source"
"""``Batch.extras``: long ``[B, L]``, the batch row whose patch a mixing transform put at each
position of each mixed sample (patches of one value are homologous: from one image;
``homologous_mixing_recognition``)."""

OTHER_COMPONENT = "other_component"
"""``Batch.extras``: the component of a complex observation that the network did not see,
``[B, 1, ...]`` (the imaginary part of a SAR pixel when the real part is fed, or the reverse),
the target of a cross-component likelihood (``merlin_cross_component_nll``)."""

GATE_LOGITS = "gate_logits"
"""``Views.extras``: the mask predictors' logits of a dynamically pruned encoder's last forward,
a tuple of ``L`` tensors ``[B, C_l]``, one per gated layer (``C_l`` its units or channels)."""

GATE_TARGETS = "gate_targets"
"""``Views.extras``: the self-supervised target masks of the same forward, a tuple of ``L``
0/1 tensors ``[B, C_l]`` (detached), one per entry of :data:`GATE_LOGITS`."""

REFERENCE_LOGPROBS = "reference_logprobs"
"""``Batch.extras``: a frozen reference policy's log-probability of every token of
:data:`TOKEN_IDS`, float ``[B, T]`` (detached; entry ``t`` is ``log pi_ref(x_t | x_<t)``, entry 0 is
never read), as :func:`sdk.sequence.token_logprobs` computes it from the reference's logits."""

REWARD = "reward"
"""``Batch.extras``: a scalar reward of each sequence of :data:`TOKEN_IDS`, float ``[B]``
(a reward model's score or a verifier's 0/1)."""

RETRIEVAL_SCORES = "retrieval_scores"
"""``Batch.extras``: a frozen retriever's scores (logits) of each sample's generated sequence
against ``M`` candidate items, float ``[B, M]`` (detached; e.g. CLIP's scaled cosine of a caption
with every image of the batch); ``Batch.targets`` is the column of the item it was generated from
(``discriminative_finetune``)."""

ATTRIBUTE = "attribute"
"""``Batch.extras``: the class id ``[B]`` (long) of a nuisance attribute of each sample (its
speaker, its domain, its source corpus) that an adversary predicts from the features and the
encoder learns to hide (``gradient_reversal_disentangle``)."""

ORIGINAL_TOKEN_IDS = "original_token_ids"
"""``Batch.extras``: the token sequences before a corruption transform changed them, long
``[B, T]`` (the same layout as :data:`TOKEN_IDS`; ``multi_course_electra``)."""

CORRUPTION_LABELS = "corruption_labels"
"""``Batch.extras``: what a corruption transform did to each position of :data:`TOKEN_IDS`, long
``[B, T]``: 0 the original token, 1 replaced, 2 swapped with another position, 3 inserted
(``multi_course_electra``)."""

DETECTION_LOGITS = "detection_logits"
"""``Views.extras``: a discriminator's score per token that the token was corrupted, float
``[B, T]`` (a logit, one per position of :data:`TOKEN_IDS`; ``multi_course_electra``)."""

PAIRED_INPUT = "paired_input"
"""``Batch.extras``: the second modality of each sample, ``[B, ...]``, row ``i`` paired with row
``i`` of ``x`` (the text of an image, a sensor reading of a scene), which a
:class:`sdk.multimodal.TowerView` with ``paired=True`` gives its tower (``multi_tower``)."""

SHARED = (NEGATIVES, NEGATIVES_MASK, NEGATIVES_INDEX, TEACHER, FEATURES, PATCHES, ADJACENCY,
          TARGET_FEATURES, LAYERS, TEACHER_LAYERS, UNLABELED, UNLABELED_INDEX, TIME, EVENT,
          PROPENSITY, MASK, IDS_RESTORE, RECONSTRUCTION_TARGET, VIEW_TOKENS,
          GENERATED, REFERENCE_LOGITS, INPUT, EDIT_DISTANCE, TOKEN_IDS, TOKEN_MASK,
          AUGMENTATION_PARAMS, CLASS_TEXT_FEATURES, MIXING_SOURCE, OTHER_COMPONENT,
          GATE_LOGITS, GATE_TARGETS, REFERENCE_LOGPROBS, REWARD, RETRIEVAL_SCORES,
          ATTRIBUTE, ORIGINAL_TOKEN_IDS, CORRUPTION_LABELS, DETECTION_LOGITS, PAIRED_INPUT)
