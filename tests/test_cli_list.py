"""``paperplug plugins list`` fitted to the terminal: kind and name whole, the paper short, the
title in what is left; the filters and ``--json``."""

import json

import pytest

import sdk
from sdk.cli import main, short_paper


def _list(monkeypatch, capsys, width, *argv):
    monkeypatch.setenv("COLUMNS", str(width))
    status = main(["plugins", "list", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def _rows(out):
    """The table's body rows, split on runs of two spaces (no cell holds two spaces)."""
    lines = out.splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line.strip()) == {"─"})
    return lines[rule - 1], [[c.strip() for c in line.split("  ") if c.strip()]
                             for line in lines[rule + 1:] if line.strip()]


@pytest.mark.parametrize("width", [80, 120, 200])
def test_every_row_fits_and_keeps_kind_name_and_paper_whole(monkeypatch, capsys, width):
    status, out, _ = _list(monkeypatch, capsys, width)
    assert status == 0
    assert max(len(line) for line in out.splitlines()) <= width
    header, rows = _rows(out)
    cards = sdk.plugins()
    assert len(rows) == len(cards)
    with_family = width >= 160
    assert ("family" in header.split()) is with_family
    paper_width = 16 if width < 120 else 22 if width < 160 else 28
    for card, row in zip(cards, rows, strict=True):
        title = row[-1]
        expected = [card.kind, card.name, *([card.family] if with_family else []),
                    short_paper(card.paper, paper_width)]
        assert row[:-1] == expected, row
        # the title: whole, or cut with an ellipsis and as long as the line allows
        assert title == card.title or (title.endswith("…") and card.title.startswith(title[:-1]))
    cut = [row[-1] for row in rows if row[-1].endswith("…")]
    assert all(len(t) == len(cut[0]) for t in cut)  # one title width: what is left of the line
    if width == 80:
        assert cut and len(cut[0]) >= 8
    if width == 200:  # room for most titles whole
        assert len(cut) < len(rows) / 4


def test_short_paper():
    assert short_paper("arXiv:2002.05709") == "2002.05709"
    assert short_paper("https://doi.org/10.1038/323533a0") == "doi.org/…23533a0"
    assert short_paper("https://doi.org/10.1038/323533a0", 28) == "doi.org/…323533a0"
    assert short_paper("https://www.example.com/paper.pdf", 22) == "example.com/paper.pdf"
    url = "https://scikit-learn.org/stable/modules/model_evaluation.html#accuracy-score"
    assert short_paper(url) == "scikit-learn.org"  # no room for a tail at 16
    assert short_paper(url, 28) == "scikit-learn.org/…racy-score"
    assert short_paper("https://a-very-long-host-name.example.org/x", 16) == "a-very-long-hos…"
    for paper in (url, "https://doi.org/10.1175/1520-0493(1950)078<0001:VOFEIT>2.0.CO;2"):
        for width in (16, 22, 28):
            assert len(short_paper(paper, width)) <= width


def test_kind_family_and_text_narrow_the_list(monkeypatch, capsys):
    _, out, _ = _list(monkeypatch, capsys, 120, "--kind", "metric")
    _, rows = _rows(out)
    assert {r[0] for r in rows} == {"metric"}
    assert len(rows) == len(sdk.plugins("metric"))

    _, out, _ = _list(monkeypatch, capsys, 200, "--family", "ssl")
    _, rows = _rows(out)
    assert {r[2] for r in rows} == {"ssl"}
    assert {r[1] for r in rows} == {c.name for c in sdk.plugins() if c.family == "ssl"}

    _, out, _ = _list(monkeypatch, capsys, 120, "out-of-distribution", "--kind", "detector")
    _, rows = _rows(out)
    expected = {c.name for c in sdk.plugins("detector")
                if "out-of-distribution" in (c.title + c.summary).lower()}
    assert expected and {r[1] for r in rows} == expected

    status, out, _ = _list(monkeypatch, capsys, 80, "no plugin says this")
    assert status == 0 and _rows(out)[1] == []


def test_an_unknown_family_or_kind_is_named(monkeypatch, capsys):
    status, _, err = _list(monkeypatch, capsys, 80, "--family", "sssl")
    assert status == 2 and "--family" in err and "'sssl'" in err and "'ssl'" in err
    status, _, err = _list(monkeypatch, capsys, 80, "--kind", "metrc")
    assert status == 2 and "'metrc'" in err and "'metric'" in err


def test_json_prints_the_cards(monkeypatch, capsys):
    status, out, _ = _list(monkeypatch, capsys, 40, "--json", "--kind", "objective")
    assert status == 0
    data = json.loads(out)
    cards = sdk.plugins("objective")
    assert [d["name"] for d in data] == [c.name for c in cards]
    nt = next(d for d in data if d["name"] == "nt_xent")
    card = next(c for c in cards if c.name == "nt_xent")
    assert nt["paper"] == card.paper and nt["formula"] == card.formula  # whole, at any width
    assert nt["family"] == "contrastive" and nt["kind"] == "objective"
    temperature = next(p for p in nt["params"] if p["name"] == "temperature")
    param = next(p for p in card.params if p.name == "temperature")
    assert temperature == {"name": "temperature", "type": param.type, "required": False,
                           "default": param.default_repr(), "constraint": param.constraint,
                           "from_data": param.from_data, "doc": param.doc}
