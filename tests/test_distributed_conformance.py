"""Every batch-coupled objective, with its default ``gather``, gives on 2 gloo ranks the loss
and gradients of one process on the concatenated batch (``sdk.testing.distributed_failures``,
one pair of processes for all of them). The graph objectives are checked on the in-batch kNN
graph: a batch with its own ``Batch.extras["adjacency"]`` is a subgraph that stays on its rank,
since no rank knows its edges to the others' nodes."""

from __future__ import annotations

import inspect

import pytest
import torch

import sdk
from sdk.distributed import resolve_gather
from sdk.testing import Plugin, distributed_failures

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

CASES = [
    Plugin("objective", "nt_xent", {"sampler": Plugin("sampler", "label_positives")}),
    Plugin("objective", "nt_xent", {"sampler": Plugin("sampler", "hard_negative_mixing", {
        "pool": "both", "seed": 0, "n_hard": 6, "s": 4, "s_prime": 2})}),
    Plugin("objective", "decoupled_contrastive", {"sigma": 0.5}),
    Plugin("objective", "isogclr", {"sampler": Plugin("sampler", "meow_weighted_negatives")}),
    Plugin("objective", "cacr", {"sampler": Plugin("sampler", "label_positives")}),
    Plugin("objective", "groco", {"stop_gradient": False, "topk_negatives": 3,
                                  "sampler": Plugin("sampler", "label_positives")}),
    Plugin("objective", "groco", {"stop_gradient": False, "topk_negatives": 15,
                                  "same_view_negatives": False,
                                  "sampler": Plugin("sampler", "label_positives")}),
    Plugin("objective", "symmetry_enhanced_contrastive", {"hinge_weight": 1.0}),
    Plugin("objective", "core_tuning", {"eta": 1.0}),
    Plugin("objective", "learned_positive_pairs", {"num_classes": 5, "pairing": "distinct",
                                                   "alpha": 0.5}),
    Plugin("objective", "swav", {"queue_length": 4}),
]
"""Compositions (samplers over the gathered batch, memory negatives) and variants; the second
groco leaves the anchors of frequent classes short of negatives, so the ranks hold different
numbers of valid anchors; swav's queue is filled from the global batch."""

TRAINING = {"isogclr", "isogclr(sampler=meow_weighted_negatives)", "dec_relative_entropy", "dino",
            "swav(queue_length=4)", "dino(gather=False)", "compositional_nll"}
"""Cases run in training mode, whose state updated in the forward (iSogCLR's per-sample
temperatures, averages and momenta; DEPICT's recorded predictions; DINO's centre; SwAV's
queue) must come out the same on every rank as in one process.
The others run in eval mode: adaptive_multihead_contrastive's heads hold BatchNorm layers,
which normalise with each rank's own batch in training."""
TRAINING |= {"mixed_barlow_twins"}
TRAINING |= {"online_bag_of_words"}

CONTROL = Plugin("objective", "nt_xent", {"gather": False})
"""Gathering switched off: the check must see the difference."""

CENTER_CONTROL = Plugin("objective", "dino", {"gather": False})
"""DINO without the centre's all-reduce: the ranks' centres must be seen to differ."""


def coupled() -> list[str]:
    reg = sdk.get_registry()
    return sorted(c.name for c in reg.cards("objective")
                  if reg.get("objective", c.name).factory.batch_coupled)


CHECKED = coupled()


@pytest.fixture(scope="module")
def failures():
    cases = [Plugin("objective", n) for n in CHECKED] + CASES + [CONTROL, CENTER_CONTROL]
    return distributed_failures(cases, training=TRAINING)


@pytest.mark.parametrize("name", CHECKED)
def test_batch_coupled_objective_on_two_ranks_equals_one_process(failures, name):
    assert name not in failures, failures[name]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label)
def test_compositions_on_two_ranks_equal_one_process(failures, case):
    assert case.label not in failures, failures[case.label]


def test_training_cases_exist():
    labels = {Plugin("objective", n).label for n in CHECKED} | {c.label for c in CASES}
    assert labels | {CENTER_CONTROL.label} >= TRAINING


def test_the_check_sees_a_missing_gather(failures):
    assert failures.get(CONTROL.label, "").startswith("loss: max |difference|")
    assert failures.get(CENTER_CONTROL.label, "").startswith("buffer 'center.center'")
    assert set(failures) == {CONTROL.label, CENTER_CONTROL.label}


@pytest.mark.parametrize("name", CHECKED)
def test_batch_coupled_objectives_gather_by_default(name):
    factory = sdk.get_registry().get("objective", name).factory
    assert inspect.signature(factory).parameters["gather"].default == "auto"


def test_per_sample_objectives_are_declared_so():
    per_sample = {c.name for c in sdk.plugins("objective")} - set(coupled())
    assert per_sample == {"cross_entropy", "supervised_patch_nce", "representation_alignment",
                          "byol", "simsiam", "focal_loss", "poly_loss", "knowledge_distillation",
                          "z_loss", "ldr_kl_loss", "comp_sum_losses", "directpred",
                          "sla_joint_label", "stablemax_perpgrad", "hl_gauss_regression",
                          "decoupled_softmax_xmc", "dual_head_kd", "feature_distillation",
                          "decoupled_mixup", "margin_preserving_nfr", "discrete_hazard_survival",
                          "rppg_comprehensive_loss", "apre_mean_shift_outlier", "fixmatch",
                          "shrinkmatch", "sade", "unbiased_implicit_feedback", "hard_patch_mining",
                          "intra_cluster_mixup_cll", "pulaski_set_distance", "mae",
                          "contractive_reconstruction", "selfie_patch_cpc",
                          "masked_feature_reconstruction", "cross_view_completion",
                          "masked_spectrogram_patch_modeling", "vq_masked_reconstruction",
                          "t_jepa", "dynamic_multilabel_memory", "ms_ssim_loss",
                          "deep_unfolded_ista_iht", "intra_inter_correlation",
                          "temporal_distinctiveness", "augmentation_aware_discriminator",
                          "homologous_mixing_recognition", "part_whole_composability",
                          "dense_ap_loss", "merlin_cross_component_nll",
                          "uncertainty_weighted_fusion", "filter2noise_single_image",
                          "ftwt_mask_predictor", "asft_absolute_likelihood",
                          "one_token_rollout", "rso_rejection_sampling",
                          "score_two_turn_rl",
                          "gradient_reversal_disentangle",
                          "high_frequency_perceptual", "directional_subspace_loss",
                          "rogue_clean_guidance_consistency", "multi_course_electra",
                          "bpr_loss"}


def test_gather_resolves_auto_by_world_size_and_rejects_other_values():
    assert resolve_gather("auto") is False and resolve_gather(True) is False  # alone: nothing to gather
    assert resolve_gather(False) is False
    with pytest.raises(sdk.ConfigError, match="gather must be True, False or 'auto', got 'yes'"):
        resolve_gather("yes")
    with pytest.raises(sdk.ConfigError, match="parameter 'gather'"):
        sdk.create("objective", "nt_xent", gather="yes")
