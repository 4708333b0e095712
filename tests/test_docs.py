"""The documentation's generators and code: a page per plugin card, the API module list, and
the Python examples of the prose pages (run, so they cannot drift from the code)."""

from __future__ import annotations

import importlib.util
import re
import textwrap
from pathlib import Path

import attrs
import pytest

import sdk

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_ext_{name}", DOCS / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plugin_pages = _load("plugin_pages")
api_pages = _load("api_pages")


def test_a_page_per_registered_plugin_with_its_card(tmp_path):
    cards = sdk.plugins()
    assert cards
    written = plugin_pages.write_pages(tmp_path)
    names = plugin_pages.page_names(cards)
    assert {p.relative_to(tmp_path).as_posix() for p in written} == (
        {"index.md"} | {f"{n}.md" for n in names.values()})
    assert {n.split("/")[0] for n in names.values()} >= {"contrastive", "teachers", "metrics"}
    index = (tmp_path / "index.md").read_text()
    for card in cards:
        stem = names[(card.kind, card.name)]
        page = (tmp_path / f"{stem}.md").read_text()
        assert page.startswith(f"# {card.name}\n")
        assert card.formula.strip() and card.formula.strip() in page, card.name
        assert f"| kind | {card.kind} |" in page and f"| family | {card.family} |" in page
        for param in card.params:
            row = next(line for line in page.splitlines() if line.startswith(f"| `{param.name}` |"))
            expected = "required" if param.required else param.default_repr().replace("|", "\\|")
            assert expected in row and param.type.replace("|", "\\|") in row, (card.name, row)
        assert f"]({stem}.md)" in index and f"\n{stem}\n" in index


def _card(**changes):
    base = dict(name="demo", kind="objective", title="A *starred* title", summary="S_1 | S_2",
                paper="arXiv:2105.04906", formula="L = |a - b|^2 with `code`")
    return sdk.Card(**{**base, **changes})


def test_pages_escape_markdown_and_link_papers(tmp_path):
    page = plugin_pages.card_page(_card(left_out="no <html> here"))
    assert "**A \\*starred\\* title**" in page and "S\\_1 \\| S\\_2" in page
    assert "[arXiv:2105.04906](https://arxiv.org/abs/2105.04906)" in page
    assert "```text\nL = |a - b|^2 with `code`\n```" in page
    assert "## Left out\n\nno \\<html\\> here" in page
    assert plugin_pages.paper_link("doi:10.1038/323533a0") == (
        "[doi:10.1038/323533a0](https://doi.org/10.1038/323533a0)")
    assert plugin_pages.paper_link("https://example.org/p.pdf") == "<https://example.org/p.pdf>"


def test_names_shared_by_two_kinds_get_two_pages_and_stale_pages_go(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "removed_plugin.md").write_text("# old")
    cards = [_card(), _card(kind="sampler", title="Other")]
    params = (sdk.Param(name="scale", type="float | None", default=None),)
    cards.append(attrs.evolve(_card(name="solo"), params=params))
    written = plugin_pages.write_pages(tmp_path, cards)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "index.md", "other/demo-objective.md", "other/demo-sampler.md", "other/solo.md"]
    assert not (tmp_path / "other" / "removed_plugin.md").exists()
    solo = (tmp_path / "other" / "solo.md").read_text()
    assert "| `scale` | `float \\| None` | `None` |" in solo
    assert 'sdk.create("objective", "solo", scale=None)' in solo


def test_page_marks_parameters_filled_from_the_data():
    page = plugin_pages.card_page(sdk.registry.get_registry().get("transform", "mixup").card)
    assert "| `num_classes` | `int \\| None` | `None` (filled from the data: `num_classes`) |" in page
    assert "| `alpha` | `float` | `0.2` |" in page


def test_api_reference_covers_every_public_module():
    modules = api_pages.public_modules()
    on_disk = {f"sdk.{p.stem}" for p in (DOCS.parent / "sdk").glob("*.py")
               if not p.stem.startswith("_")}
    assert set(modules) == on_disk
    assert modules[:3] == ["sdk.types", "sdk.interfaces", "sdk.registry"]
    shortcuts = {name: module for name, module, _ in api_pages.shortcuts()}
    assert shortcuts["Views"] == "sdk.types" and shortcuts["create"] == "sdk.registry"
    rst = api_pages.api_rst()
    for module in modules:
        assert f".. automodule:: {module}\n" in rst


def _python_blocks(page: str) -> list[str]:
    found = re.findall(r"^([ \t]*)```python\n(.*?)^\1```", (DOCS / page).read_text(),
                       flags=re.S | re.M)
    return [textwrap.dedent(code) for _, code in found]


@pytest.mark.parametrize("page", ["getting-started.md", "concepts.md"])
def test_examples_in_the_prose_pages_run(page, capsys):
    blocks = _python_blocks(page)
    assert blocks
    for block in blocks:
        exec(compile(block, f"{page}", "exec"), {"__name__": "docs_example"})
    out = capsys.readouterr().out
    if page == "concepts.md":
        assert "['barlow_twins', 'nt_xent']" in out and "[0.5, 1.0]" in out
    else:
        assert "Did you mean 'nt_xent'" in out and "Did you mean 'temperature'" in out
