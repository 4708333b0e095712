"""Run reports (``paperplug report``, ``paperplug compare RUN...``): self-contained pages whose
numbers are the run's, checked against independent computations, and the page as a real
headless Chromium renders it."""

from __future__ import annotations

import base64
import html
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import sdk
from sdk.cli import main
from sdk.cli_run import load_splits
from sdk.errors import ConfigError
from sdk.report import compare_report, curve_keys, pca_2d, run_report

pytest.importorskip("matplotlib", reason="reports draw with matplotlib (the plots extra)")

RECIPES = Path(__file__).resolve().parents[1] / "examples" / "recipes"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _plain_output(monkeypatch):
    monkeypatch.setenv("CI", "1")


def _train(tmp_path_factory, recipe: str, *overrides: str) -> Path:
    run_dir = tmp_path_factory.mktemp(recipe)
    assert main(["run", str(RECIPES / f"{recipe}.toml"), "--run-dir", str(run_dir),
                 "--set", "trainer.max_steps=6", "--set", "trainer.log_every=1",
                 *[a for o in overrides for a in ("--set", o)]]) == 0
    return run_dir


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory):
    return _train(tmp_path_factory, "supervised_digits")


@pytest.fixture(scope="module")
def other_run(tmp_path_factory):
    return _train(tmp_path_factory, "supervised_digits", "optimizer.lr=0.01")


class Page(HTMLParser):
    """What a page holds: tags, attributes, ids, table rows, text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def attrs(self, tag: str, name: str) -> list[str]:
        return [a[name] for t, a in self.tags if t == tag and name in a]

    def row(self, first: str) -> list[str]:
        return next(r for r in self.rows if r and r[0] == first)


def test_the_report_is_self_contained(supervised_run):
    """No script, no stylesheet or image from anywhere: every image is a PNG inside the page."""
    text = run_report(supervised_run).read_text()
    page = Page(text)
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe", "object")]
    images = page.attrs("img", "src")
    assert len(images) == 4  # curves, reliability, per-class accuracy, PCA
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG


def test_the_reports_numbers_are_the_runs(supervised_run):
    """The summary rows are summary.json's; the per-class accuracy is recomputed here from the
    loaded run's calibrated predictions, class by class."""
    page = Page(run_report(supervised_run).read_text())
    summary = json.loads((supervised_run / "summary.json").read_text())
    assert float(page.row("accuracy")[1]) == pytest.approx(summary["accuracy"], rel=1e-3)
    assert float(page.row("ece_after")[1]) == pytest.approx(summary["ece_after"], rel=1e-3)
    run = sdk.load_run(supervised_run)
    test = load_splits(run.recipe.data).test
    pred = run.predict_proba(test.x).argmax(-1)
    for c in range(10):
        mine = [i for i in range(len(test.y)) if int(test.y[i]) == c]
        expected = sum(int(pred[i]) == c for i in mine) / len(mine)
        row = page.row(str(c))
        assert int(row[1]) == len(mine)
        assert float(row[2]) == pytest.approx(expected, abs=1e-4)


def test_plugins_link_to_their_cards_and_the_recipe_is_shown(supervised_run):
    text = run_report(supervised_run).read_text()
    page = Page(text)
    links = [h for h in page.attrs("a", "href") if h.startswith("#")]
    ids = set(page.attrs("div", "id"))
    assert set(links) == {"#card-encoder-mlp", "#card-objective-cross_entropy",
                          "#card-calibrator-temperature_scaling"}
    assert {link[1:] for link in links} <= ids
    assert 'name = "supervised_digits"' in html.unescape(text)
    assert "Guo" in text or "arXiv" in text  # the cards' paper references


def test_pca_projects_on_the_leading_components():
    """The two columns are the projections on the covariance's top eigenvectors: their
    variances are its two largest eigenvalues and they are uncorrelated."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g) @ torch.diag(torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1]))
    x = x @ torch.linalg.qr(torch.randn(5, 5, generator=g))[0] + 7.0
    p = pca_2d(x)
    cov = torch.cov(x.double().T)
    top = torch.linalg.eigvalsh(cov).flip(0)[:2]
    torch.testing.assert_close(p.var(0), top)
    assert abs(float(torch.corrcoef(p.T)[0, 1])) < 1e-8
    sklearn = pytest.importorskip("sklearn.decomposition")
    ref = sklearn.PCA(2).fit_transform(x.double().numpy())
    torch.testing.assert_close(p.abs(), torch.from_numpy(ref).abs())


def test_curves_cover_every_logged_term():
    history = [{"kind": "train", "step": 1, "epoch": 0, "loss": 1.0, "lr": 0.1,
                "samples_per_s": 9.0, "nt_xent": 0.7, "barlow_twins": 0.3},
               {"kind": "epoch", "step": 1, "epoch": 0, "loss": 1.0, "val/loss": 2.0}]
    assert curve_keys(history) == ["loss", "barlow_twins", "nt_xent"]
    assert curve_keys(history[1:]) == []


def test_compare_puts_runs_side_by_side(supervised_run, other_run, tmp_path):
    page_path = compare_report([supervised_run, other_run], tmp_path / "cmp")
    assert page_path == tmp_path / "cmp" / "compare.html"
    page = Page(page_path.read_text())
    first = json.loads((supervised_run / "summary.json").read_text())
    second = json.loads((other_run / "summary.json").read_text())
    row = page.row("accuracy")
    assert len(row) == 3
    assert float(row[1]) == pytest.approx(first["accuracy"], rel=1e-3)
    assert float(row[2]) == pytest.approx(second["accuracy"], rel=1e-3)
    assert len(page.attrs("img", "src")) == 1
    with pytest.raises(ConfigError, match="at least two"):
        compare_report([supervised_run], tmp_path)
    with pytest.raises(ConfigError, match="not a finished run directory"):
        compare_report([supervised_run, tmp_path], tmp_path)


def test_the_commands(supervised_run, other_run, tmp_path, capsys):
    out = tmp_path / "r.html"
    assert main(["report", str(supervised_run), "-o", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert main(["compare", str(supervised_run), str(other_run), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "compare.html").is_file()
    recipe = str(RECIPES / "simclr_digits.toml")
    assert main(["compare", recipe, str(supervised_run), "--out", str(tmp_path)]) == 2
    assert "recipes or run directories" in capsys.readouterr().err
    assert main(["compare", recipe, "--out", str(tmp_path)]) == 2
    assert "--epochs is required when comparing recipes" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "not a finished run directory" in capsys.readouterr().err


# a real browser ------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium)")


def _chromium(url: str, *args: str) -> str:
    """Chromium's log of loading ``url`` headless (console messages appear as ``:CONSOLE``)."""
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           "--enable-logging=stderr", "--v=0", *args, url],
                          capture_output=True, text=True, timeout=120)
    return done.stdout + done.stderr


@needs_chromium
def test_chromium_loads_the_report_without_console_errors_and_shows_the_plots(
        supervised_run, tmp_path):
    from PIL import Image

    page = run_report(supervised_run)
    control = tmp_path / "control.html"  # the harness sees a page's console errors
    control.write_text('<!DOCTYPE html><script>console.error("broken page")</script>')
    assert ":CONSOLE" in _chromium(control.as_uri(), "--dump-dom")

    log = _chromium(page.as_uri(), "--dump-dom")
    assert ":CONSOLE" not in log
    assert "Per-class accuracy" in log  # the DOM Chromium built
    shot = tmp_path / "report.png"
    _chromium(page.as_uri(), f"--screenshot={shot}", "--window-size=1200,3000",
              "--hide-scrollbars")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 3000)
    # the plots' blue bars and lines (tab:blue, 31 119 180) fill a visible part of the page
    r, g, b = torch.from_numpy(np.asarray(image)).int().unbind(-1)
    blue = int(((b > 150) & (r < 80) & (g > 90) & (g < 150)).sum())
    assert blue > 20_000
