"""Run reports: one self-contained HTML page per run, and runs side by side.

:func:`run_report` (``paperplug report RUN_DIR``) reads a run directory written by ``paperplug
run`` and writes ``RUN_DIR/report.html``: the summary metrics, the training curves of every
logged term, the reliability diagram of the test split before and after calibration, the
per-class accuracy, a 2-D PCA projection of the test embeddings coloured by class, the recipe
and the cards of the plugins it names. :func:`compare_report` (``paperplug compare RUN_A RUN_B
...``) puts several runs in one page: their summaries in one table and their curves overlaid.

The pages load nothing: figures are PNGs inside the page (``data:`` URIs, drawn by
matplotlib), styles are inline and there is no script, so a report can be mailed or archived
and opens offline. The run is loaded with :func:`sdk.runs.load_run` (no code from the run
directory is executed); matplotlib is needed (``pip install "paperplug[plots]"``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdk import plots
from sdk.errors import ConfigError

REPORT = "report.html"
COMPARE = "compare.html"
# record fields that are not a curve of the objective
_META = frozenset({"kind", "epoch", "step", "partial", "lr", "samples_per_s"})

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; } pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
.card { border: 1px solid #ddd; border-radius: 4px; padding: 0.5em 1em; margin: 0.8em 0; }
.muted { color: #666; }
"""


# the page ------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _page(title: str, body: Iterable[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def _figure(fig: Any, alt: str) -> str:
    """A matplotlib figure as an ``<img>`` holding its PNG."""
    buffer = io.BytesIO()
    plots.save(fig, buffer)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<p><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></p>'


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value)
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_number(v)}</td>' if isinstance(v, (int, float))
                         and not isinstance(v, bool) else f"<td>{v}</td>" for v in row) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


# reading a run -------------------------------------------------------------------------------
def _run_dir(path: str | Path) -> Path:
    run_dir = Path(path)
    for name in ("config.toml", "summary.json"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir} is not a finished run directory: it has no {name} "
                              "(written by 'paperplug run')", param="run_dir")
    return run_dir


def _history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def curve_keys(history: Sequence[Mapping[str, Any]]) -> list[str]:
    """The logged training quantities: the loss, then every objective term's log."""
    keys = {k for r in history if r.get("kind") == "train" for k, v in r.items()
            if k not in _META and isinstance(v, (int, float))}
    return ["loss", *sorted(keys - {"loss"})] if keys else []


def _points(history: Sequence[Mapping[str, Any]], kind: str, key: str,
            x: str = "step") -> tuple[list[float], list[float]]:
    pts = [(r[x], r[key]) for r in history if r.get("kind") == kind and key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


# figures -------------------------------------------------------------------------------------
def _curves_figure(history: Sequence[Mapping[str, Any]]) -> Any | None:
    """One panel per logged term (training records) and one of the validation metrics."""
    plt = plots._pyplot()
    keys = curve_keys(history)
    epoch_loss = _points(history, "epoch", "loss")
    val = sorted({k for r in history if r.get("kind") == "epoch" for k in r
                  if k.startswith("val/")})
    panels = (keys or (["loss"] if epoch_loss[0] else [])) + (["validation"] if val else [])
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, panels):
        if key == "validation":
            for name in val:
                ax.plot(*_points(history, "epoch", name, x="epoch"), "o-", markersize=3,
                        label=name)
            ax.set(xlabel="epoch", title="validation")
        else:
            ax.plot(*_points(history, "train", key), label="logged", alpha=0.7)
            if key == "loss" and epoch_loss[0]:
                ax.plot(*epoch_loss, "o-", markersize=3, label="epoch mean")
            ax.set(xlabel="step", title=key)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _class_accuracy_figure(names: Sequence[str], accuracy: Sequence[float]) -> Any:
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(names) + 1.5), 3.2))
    ax.bar(range(len(names)), accuracy, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 12 else 0)
    ax.set(ylim=(0, 1), ylabel="accuracy", title="per-class accuracy (test)")
    fig.tight_layout()
    return fig


def pca_2d(x: Tensor) -> Tensor:
    """The rows of ``x`` [N, D] projected on their two leading principal components [N, 2]
    (centred; the sign of each component is fixed so that its largest loading is positive)."""
    x = x.double()
    centred = x - x.mean(0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    components = v[:2]
    flip = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()
    return centred @ (components * flip).T


def _pca_figure(points: Tensor, labels: Tensor, names: Sequence[str]) -> Any:
    plt = plots._pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for c, name in enumerate(names):
        mine = labels == c
        ax.scatter(points[mine, 0], points[mine, 1], s=8, color=cmap(c % cmap.N), label=name)
    ax.set(xlabel="PC 1", ylabel="PC 2", title="test embeddings (PCA)")
    if len(names) <= 20:
        ax.legend(fontsize=7, markerscale=2, ncol=2 if len(names) > 10 else 1)
    fig.tight_layout()
    return fig


# the plugins ---------------------------------------------------------------------------------
def _specs(recipe: Any) -> list[tuple[str, Any]]:
    """``(kind, spec)`` of every plugin the recipe names (nested ones such as a backbone too)."""
    found: list[tuple[str, Any]] = [("encoder", recipe.encoder)]
    found += [("objective", s) for s in recipe.objectives]
    for kind in ("sampler", "reweighter", "teacher", "schedule", "calibrator"):
        if getattr(recipe, kind) is not None:
            found.append((kind, getattr(recipe, kind)))
    found += [("transform", s) for s in recipe.transforms]
    found += [("callback", s) for s in recipe.callbacks]
    nested = []
    for _, spec in found:
        for value in spec.params.values():
            if hasattr(value, "name") and hasattr(value, "params"):
                nested.append((value.kind or "encoder", value))
    return found + nested


def _cards(recipe: Any) -> list[Any]:
    from sdk.registry import get_registry

    reg = get_registry()
    cards, seen = [], set()
    for kind, spec in _specs(recipe):
        if spec.module is not None or (kind, spec.name) in seen:
            continue
        seen.add((kind, spec.name))
        matches = [c for c in reg.cards(kind) if c.name == spec.name]
        cards.extend(matches)
    return cards


def _anchor(card: Any) -> str:
    return f"card-{card.kind}-{card.name}"


def _card_html(card: Any) -> str:
    paper = card.paper
    link = (f'<a href="{_e(paper)}">{_e(paper)}</a>' if paper.startswith(("http://", "https://"))
            else f'<a href="https://arxiv.org/abs/{_e(paper[6:])}">{_e(paper)}</a>'
            if paper.startswith("arXiv:") else _e(paper))
    params = _table(("parameter", "type", "default", "constraint"),
                    [(_e(p.name), _e(p.type), _e(p.default_text()), _e(p.constraint))
                     for p in card.params]) if card.params else ""
    rows = [("kind", _e(card.kind)), ("paper", link), ("summary", _e(card.summary)),
            ("formula", _e(card.formula)), ("left out", _e(card.left_out or "-"))]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (f'<div class="card" id="{_anchor(card)}"><h3>{_e(card.name)}: {_e(card.title)}</h3>'
            f"<table>{body}</table>{params}</div>")


# the reports ---------------------------------------------------------------------------------
def _evaluation(run: Any, splits: Any) -> dict[str, Any]:
    """What the report computes on the test split: embeddings, labels, uncalibrated and
    calibrated probabilities (``None`` where the run has no class scores)."""
    x, y = splits.test.x, splits.test.y
    out: dict[str, Any] = {"embeddings": run.embed(x), "labels": y, "before": None, "after": None}
    if run.supervised or run.probe is not None:
        logits = run.logits(x)
        out["before"] = logits.softmax(-1)
        if run.calibrator is not None:
            out["after"] = run.predict_proba(x)
    return out


def run_report(run_dir: str | Path, out: str | Path | None = None, *,
               allow_imports: bool = False) -> Path:
    """Write the HTML report of ``run_dir`` (default ``RUN_DIR/report.html``); returns its
    path."""
    from sdk.cli_run import load_splits
    from sdk.runs import load_run

    run_dir = _run_dir(run_dir)
    summary, history = _summary(run_dir), _history(run_dir)
    run = load_run(run_dir, allow_imports=allow_imports)
    splits = load_splits(run.recipe.data)
    names = list(splits.classes or [str(c) for c in range(splits.num_classes)])
    result = _evaluation(run, splits)
    labels = result["labels"]
    cards = _cards(run.recipe)
    title = f"{summary.get('recipe', run_dir.name)}: run report"

    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="muted">{_e(run_dir.resolve())} · {_e(summary.get("dataset", ""))} · '
            f'{_e(summary.get("kind", ""))} · checkpoint step {run.step}</p>',
            "<h2>Summary</h2>",
            _table(("metric", "value"), [(_e(k), v) for k, v in summary.items()
                                         if isinstance(v, (int, float))])]
    body.append("<h2>Training curves</h2>")
    fig = _curves_figure(history)
    body.append(_figure(fig, "training curves") if fig is not None
                else '<p class="muted">no training records in metrics.jsonl</p>')

    body.append("<h2>Calibration (test split)</h2>")
    if result["before"] is None:
        body.append('<p class="muted">this run has no class scores (a self-supervised run '
                    "without a linear probe)</p>")
    else:
        panels = {"before calibration": (result["before"], labels)}
        if result["after"] is not None:
            panels["after calibration"] = (result["after"], labels)
        else:
            body.append('<p class="muted">no calibrator in the recipe</p>')
        buffer = io.BytesIO()
        plots.reliability_diagram(panels, buffer)
        data = base64.b64encode(buffer.getvalue()).decode("ascii")
        body.append(f'<p><img alt="reliability diagram" src="data:image/png;base64,{data}"></p>')

        body.append("<h2>Per-class accuracy (test split)</h2>")
        probs = result["after"] if result["after"] is not None else result["before"]
        pred = probs.argmax(-1)
        counts = torch.bincount(labels, minlength=len(names))
        hits = torch.bincount(labels[pred == labels], minlength=len(names))
        accuracy = (hits.double() / counts.clamp_min(1)).tolist()
        body.append(_figure(_class_accuracy_figure(names, accuracy), "per-class accuracy"))
        body.append(_table(("class", "test samples", "accuracy"),
                           [(_e(n), int(c), a) for n, c, a in zip(names, counts, accuracy)]))

    body.append("<h2>Test embeddings</h2>")
    body.append(_figure(_pca_figure(pca_2d(result["embeddings"]), labels, names),
                        "PCA projection of the test embeddings"))

    body.append("<h2>Recipe</h2>")
    links = ", ".join(f'<a href="#{_anchor(c)}">{_e(c.kind)} {_e(c.name)}</a>' for c in cards)
    body.append(f"<p>Plugins: {links}</p>")
    body.append(f"<pre>{_e((run_dir / 'config.toml').read_text())}</pre>")
    body.append("<h2>Plugins</h2>")
    body.extend(_card_html(c) for c in cards)

    path = Path(out) if out is not None else run_dir / REPORT
    path.write_text(_page(title, body), encoding="utf-8")
    return path


def _run_item(label: str, run_dir: Path) -> str:
    """A run of the comparison, linked to its report where ``paperplug report`` wrote one."""
    report = run_dir / REPORT
    if report.is_file():
        return f'<li><a href="{_e(report.resolve().as_uri())}">{_e(label)}</a> ({_e(run_dir)})</li>'
    return f"<li>{_e(label)} ({_e(run_dir)})</li>"


def compare_report(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Write one HTML page comparing ``run_dirs``: the summaries in one table (a row per
    metric, a column per run) and the runs' curves overlaid; returns its path."""
    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two run directories", param="runs")
    dirs = [_run_dir(d) for d in run_dirs]
    summaries = [_summary(d) for d in dirs]
    histories = [_history(d) for d in dirs]
    labels = [str(s.get("recipe", d.name)) for s, d in zip(summaries, dirs)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} ({d.name})" for label, d in zip(labels, dirs)]
    metrics: list[str] = []
    for s in summaries:
        metrics += [k for k, v in s.items() if isinstance(v, (int, float)) and k not in metrics]
    rows = [(_e(m), *[s.get(m, "-") for s in summaries]) for m in metrics]

    plt = plots._pyplot()
    keys = ["loss"] + sorted({k for h in histories for k in curve_keys(h)} - {"loss"})
    val = sorted({k for h in histories for r in h if r.get("kind") == "epoch" for k in r
                  if k.startswith("val/")})
    panels = keys + val
    cols = min(3, len(panels))
    fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols,
                             figsize=(4.6 * cols, 3.4 * math.ceil(len(panels) / cols)),
                             squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, panels):
        for label, history in zip(labels, histories):
            if key.startswith("val/"):
                ax.plot(*_points(history, "epoch", key, x="epoch"), "o-", markersize=3,
                        label=label)
            else:
                kind = "train" if any(r.get("kind") == "train" and key in r
                                      for r in history) else "epoch"
                ax.plot(*_points(history, kind, key), label=label)
        ax.set(xlabel="epoch" if key.startswith("val/") else "step", title=key)
        ax.legend(fontsize=7)
    fig.tight_layout()

    title = "runs compared: " + ", ".join(labels)
    body = [f"<h1>{_e(title)}</h1>",
            "<h2>Summary</h2>", _table(("metric", *labels), rows),
            "<h2>Curves</h2>", _figure(fig, "overlaid training curves"),
            "<h2>Runs</h2>", "<ul>" + "".join(_run_item(label, d)
                                              for label, d in zip(labels, dirs)) + "</ul>"]
    path = Path(out)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / COMPARE
    path.write_text(_page(title, body), encoding="utf-8")
    return path
