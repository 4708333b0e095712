"""recipe_ts_forecast_contrastive (arXiv:2306.12086): on a synthetic multi-periodic series, the
Transformer forecaster trained end to end, on MSE alone or on (1 - 0.1) MSE + 0.1 NT-Xent of two
scaling+jitter views, forecasts better than contrastive pretraining with a linear head on the
frozen encoder (the two-step protocol the paper argues against). Measured over seeds 0-3 at this
size: frozen / the worse end-to-end arm's test MSE 1.06-1.56 (1.18 on seed 0; 1.06 on seed 1,
where no arm learns much in 100 steps); 3.1-4.9 in the full version.

Not asserted, as it does not hold at every size: the paper's main finding, end to end with the
contrastive term below MSE alone. At this size (100 steps) it holds on seeds 0-3 by 1-5%; the
full version (200 steps, deeper) reverses it on every seed (see the README's results table)."""





def test_windows_are_consecutive_look_backs_and_horizons(recipe_script):
    import torch

    recipe = recipe_script("recipe_ts_forecast_contrastive")
    s = torch.arange(20.0).reshape(2, 10)
    x, y = recipe.windows(s, 3, 2, 1, 10, 2)
    assert x.shape == (6, 3, 1) and y.shape == (6, 2)  # starts 1, 3, 5 per channel
    assert x[1, :, 0].tolist() == [3.0, 4.0, 5.0] and y[1].tolist() == [6.0, 7.0]
    assert x[3, :, 0].tolist() == [11.0, 12.0, 13.0] and y[5].tolist() == [18.0, 19.0]


def test_end_to_end_training_beats_the_frozen_two_step(recipe_script):
    recipe = recipe_script("recipe_ts_forecast_contrastive")
    r = {k: v[0] for k, v in recipe.main(fast=True, seed=0).items()}
    assert r["pretrain_frozen"] > 1.05 * max(r["mse"], r["mse_contrastive"])
