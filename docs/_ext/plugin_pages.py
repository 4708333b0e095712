"""One documentation page per registered plugin, written from its card.

On ``builder-inited`` this writes ``docs/plugins/<family>/<name>.md`` for every card returned
by ``sdk.plugins()`` (built-in and third-party alike; a third party's family is its package)
and ``docs/plugins/index.md`` listing them by family, and warns about any plugin module that
failed to load (its page would be missing).
The generator functions need no Sphinx, so the test suite calls them directly.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

_ESCAPE = re.compile(r"([\\`*_\[\]<>|#$])")


def _text(value: str) -> str:
    """Markdown-escaped plain text."""
    return _ESCAPE.sub(r"\\\1", value.strip())


def _code(value: str) -> str:
    """An inline code span (safe inside a table cell)."""
    value = value.replace("|", "\\|")
    fence = "`" * (max((len(r) for r in re.findall(r"`+", value)), default=0) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def paper_link(paper: str) -> str:
    """Markdown link for an arXiv id (``arXiv:2002.05709``), a DOI or a URL; text otherwise."""
    paper = paper.strip()
    arxiv = re.fullmatch(r"(?i)arxiv:\s*(\S+)", paper)
    if arxiv:
        return f"[{_text(paper)}](https://arxiv.org/abs/{arxiv.group(1)})"
    doi = re.fullmatch(r"(?i)doi:\s*(\S+)", paper)
    if doi:
        return f"[{_text(paper)}](https://doi.org/{doi.group(1)})"
    if re.match(r"https?://\S+$", paper):
        return f"<{paper}>"
    return _text(paper)


def family(card: Any) -> str:
    """The folder of a card's page: its family, ``other`` when it has none."""
    return card.family or "other"


def page_names(cards: Iterable[Any]) -> dict[tuple[str, str], str]:
    """Page path per ``(kind, name)``: ``family/name``, or ``family/name-kind`` when kinds share
    a name."""
    cards = list(cards)
    count: dict[str, int] = {}
    for card in cards:
        count[card.name] = count.get(card.name, 0) + 1
    return {(c.kind, c.name): f"{family(c)}/" + (c.name if count[c.name] == 1
                                                  else f"{c.name}-{c.kind}")
            for c in cards}


def card_page(card: Any) -> str:
    """MyST Markdown page of one card."""
    out = [f"# {card.name}", "", f"**{_text(card.title)}**", "", _text(card.summary), ""]
    facts = [("kind", card.kind), ("family", family(card))]
    if card.paper:
        facts.append(("paper", paper_link(card.paper)))
    if card.package:
        facts.append(("package", _code(card.package)))
    out += ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts], ""]
    if card.formula:
        fence = "`" * max(3, max((len(r) for r in re.findall(r"`+", card.formula)), default=0) + 1)
        out += ["## Formula", "", f"{fence}text", card.formula.strip(), fence, ""]
    out += ["## Parameters", ""]
    if card.params:
        out += ["| parameter | type | default | constraint |", "|---|---|---|---|"]
        out += [f"| {_code(p.name)} | {_code(p.type)} | "
                f"{'required' if p.required else _code(p.default_repr())}"
                f"{f' (filled from the data: {_code(p.from_data)})' if p.from_data else ''} | "
                f"{_code(p.constraint) if p.constraint else ''} |" for p in card.params]
    else:
        out.append("None.")
    out.append("")
    if card.left_out:
        out += ["## Left out", "", _text(card.left_out), ""]
    example = ", ".join(f"{p.name}={p.default_repr()}" for p in card.params if not p.required)
    args = f'"{card.kind}", "{card.name}"' + (f", {example}" if example else "")
    out += ["## Usage", "", "```python", "import sdk", "",
            f"plugin = sdk.create({args})", "```", ""]
    return "\n".join(out)


def index_page(cards: Iterable[Any]) -> str:
    """The plugin catalogue: one table per family and a toctree of every page."""
    cards = sorted(cards, key=lambda c: (family(c), c.kind, c.name))
    names = page_names(cards)
    out = ["# Plugins", "",
           "Every plugin registered in this installation, generated from its card and grouped "
           "by family (`plugins/<family>/` for the built-in ones; a third party's package is its "
           "family). `paperplug plugins list` shows the same catalogue.", ""]
    for fam in sorted({family(c) for c in cards}):
        out += [f"## {fam}", "", "| name | kind | method | paper |", "|---|---|---|---|"]
        for c in (c for c in cards if family(c) == fam):
            paper = paper_link(c.paper) if c.paper else ""
            out.append(f"| [{_text(c.name)}]({names[(c.kind, c.name)]}.md) | {c.kind} "
                       f"| {_text(c.title)} | {paper} |")
        out.append("")
    out += ["```{toctree}", ":hidden:", "", *[names[(c.kind, c.name)] for c in cards], "```", ""]
    return "\n".join(out)


def _write(path: Path, text: str) -> None:
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        path.write_text(text, encoding="utf-8")


def write_pages(outdir: Path, cards: Iterable[Any] | None = None) -> list[Path]:
    """Write ``index.md`` and one page per card into ``outdir``; remove stale pages."""
    if cards is None:
        import sdk

        cards = sdk.plugins()
    cards = list(cards)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    names = page_names(cards)
    written = [outdir / "index.md"]
    _write(written[0], index_page(cards))
    for card in cards:
        path = outdir / f"{names[(card.kind, card.name)]}.md"
        path.parent.mkdir(exist_ok=True)
        _write(path, card_page(card))
        written.append(path)
    for stale in set(outdir.rglob("*.md")) - set(written):
        stale.unlink()
    return written


def setup(app):
    from sphinx.util import logging

    logger = logging.getLogger(__name__)

    def generate(app) -> None:
        import sdk

        write_pages(Path(app.srcdir) / "plugins", sdk.plugins())
        for broken in sdk.broken_plugins():  # its page would be missing: say so
            logger.warning("plugin module %r of package %r failed to load: %s",
                           broken.name, broken.package, broken.error)

    app.connect("builder-inited", generate)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
