"""imbalance_ssl_then_pseudo (seed paper 6, Yang & Xu, arXiv:2006.07529): SimCLR pre-training on
the long-tailed digits (imbalance 50, 302 training images, the labels unused), then a linear
classifier on the frozen backbone trained with the long-tailed labels, beats the same classifier
on the random-init backbone on the balanced test split (whose plain accuracy is the balanced
accuracy). Fast version measured over seeds 0-3 (pretrain 30, classifier 20 epochs): 0.44-0.50
against 0.20-0.28; the pretrain stage's L-BFGS linear probe 0.81-0.84 against 0.71-0.77."""

from pathlib import Path

from sdk import sweep
from sdk.cli_run import run

RECIPE = Path(__file__).parents[2] / "examples" / "recipes" / "imbalance_ssl_then_pseudo.toml"
FAST = ["stages[0].trainer.max_epochs=30", "stages[1].trainer.max_epochs=20",
        "stages[2].train=false"]


def test_the_recipe_sweeps_pretraining_and_freezing_over_long_tailed_digits():
    grid = sweep.points(RECIPE)
    assert [(p.recipe.stages[0].options.train, p.recipe.stages[1].options.freeze,
             p.recipe.stages[2].recipe.callbacks[0].params["weight"]) for p in grid] == [
        (pre, freeze, weight) for pre in (True, False) for freeze in (["backbone"], [])
        for weight in (1.0, 0.0)]
    pretrain, classifier, pseudo = grid[0].recipe.stages
    assert pseudo.options.init == "classifier" and pseudo.recipe.data.unlabeled
    assert pseudo.recipe.callbacks[0].name == "self_training"
    assert pretrain.recipe.objectives[0].name == "nt_xent"
    assert classifier.recipe.objectives[0].name == "cross_entropy"
    assert classifier.options.init_keys == ["backbone"]
    assert pretrain.recipe.data.imbalance_ratio == classifier.recipe.data.imbalance_ratio == 50


def test_self_supervised_pretraining_beats_the_random_init_under_imbalance(tmp_path):
    accuracy, probe = {}, {}
    for point in sweep.points(RECIPE, FAST, ['stages[1].freeze=[["backbone"]]',
                                             "stages[2].callbacks[0].weight=1.0"]):
        summary = run(point.recipe, run_dir=tmp_path / point.name, progress=False)
        pretrained = point.recipe.stages[0].options.train
        assert summary["classifier/n_train"] == 302  # long-tailed: 108 ... 2 per class
        assert summary["pseudo/n_train"] == 302 and summary["pseudo/accuracy"] == summary[
            "classifier/accuracy"]  # the fast version only evaluates the pseudo-label stage
        accuracy[pretrained] = summary["classifier/accuracy"]
        probe[pretrained] = summary["pretrain/linear_probe_accuracy"]
    assert accuracy[True] > accuracy[False] + 0.1
    assert probe[True] > probe[False]
