"""Held-out ECE and NLL of every post-hoc calibrator on real classifiers: the README's
calibration table.

Three badly calibrated models of scikit-learn (Gaussian naive Bayes on digits and on breast
cancer, a barely regularised logistic regression on digits), each trained on 40% of the data
(stratified, seed 0); every calibrator is fitted on a disjoint 30% and scored on the last 30%.
Run: ``python examples/calibration_table.py`` (needs scikit-learn); prints a Markdown table.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.naive_bayes import GaussianNB
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import sdk  # noqa: E402
from sdk import metrics  # noqa: E402

CASES = {"digits, naive Bayes": (load_digits, "nb"), "digits, logistic": (load_digits, "logistic"),
         "breast cancer, naive Bayes": (load_breast_cancer, "nb")}
CALIBRATORS = {
    "temperature scaling": ("temperature_scaling", {}),
    "vector scaling": ("vector_scaling", {}),
    "matrix scaling (no regularisation)": ("matrix_scaling", {}),
    "matrix scaling, ODIR λ = μ = 1": ("matrix_scaling", {"reg_lambda": 1.0, "reg_mu": 1.0}),
    "Dirichlet, ODIR λ = μ = 1": ("dirichlet_calibration", {"reg_lambda": 1.0, "reg_mu": 1.0}),
    "histogram binning": ("histogram_binning", {}),
    "isotonic regression": ("isotonic_regression", {}),
    "BBQ": ("bbq", {}),
    "beta calibration": ("beta_calibration", {}),
    "h-calibration": ("h_calibration", {}),
}


def log_probabilities(load, model: str):
    """``(z_cal, y_cal, z_test, y_test)``: the model's log-probabilities on the two splits."""
    x, y = load(return_X_y=True)
    x = StandardScaler().fit_transform(x)
    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.6, random_state=0, stratify=y)
    x_cal, x_te, y_cal, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0,
                                                stratify=y_rest)
    if model == "nb":
        clf = GaussianNB().fit(x_tr, y_tr)
        logp = lambda a: np.clip(clf.predict_log_proba(a), -50, 0)  # noqa: E731
    else:
        clf = LogisticRegression(C=1e4, max_iter=5000).fit(x_tr, y_tr)
        logp = lambda a: np.log(np.clip(clf.predict_proba(a), 1e-12, 1))  # noqa: E731
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    return t(logp(x_cal)), torch.tensor(y_cal), t(logp(x_te)), torch.tensor(y_te)


def calibrated_probabilities(name: str, params: dict, z_cal, y_cal, z_te) -> torch.Tensor:
    cal = sdk.create("calibrator", name, **params)
    if cal.inputs == "probabilities":
        return cal.fit(z_cal.exp(), y_cal)(z_te.exp())
    return torch.softmax(cal.fit(z_cal, y_cal)(z_te), dim=1)


def main() -> None:
    results = {}
    for case, (load, model) in CASES.items():
        z_cal, y_cal, z_te, y_te = log_probabilities(load, model)
        rows = {"uncalibrated": z_te.exp()}
        for label, (name, params) in CALIBRATORS.items():
            rows[label] = calibrated_probabilities(name, params, z_cal, y_cal, z_te)
        results[case] = {k: (metrics.ece(p, y_te), metrics.nll(p, y_te)) for k, p in rows.items()}
    print("| calibrator | " + " | ".join(f"{c}: ECE / NLL" for c in CASES) + " |")
    print("|---|" + "---|" * len(CASES))
    for label in results[next(iter(CASES))]:
        cells = [f"{results[c][label][0]:.3f} / {results[c][label][1]:.3f}" for c in CASES]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
