"""Every code block of the README and the docs is run or checked by the tests.

Python blocks run (here, or in tests/test_readme.py and tests/test_docs.py, which also check
what they compute). TOML blocks parse, and recipe blocks (whole recipes or single tables) are
structured and checked as ``paperplug run`` checks a recipe, against the registered plugins.
Shell blocks: every ``paperplug`` command line parses with the real command-line parser, the
README's walk-through runs end to end on a generated CSV, every ``nox -s`` session exists, every
``pip install`` extra is declared, and any other program is one of a short, named list.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

import sdk
from sdk.cli import build_parser, main
from sdk.cli_run import source_options
from sdk.config import load_recipe, tomllib

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^([ \t]*)```([^\n`]*)\n(.*?)^\1```", flags=re.S | re.M)
# python blocks that other tests run and check: README sections, docs pages
RUN_ELSEWHERE = {"README.md": "tests/test_readme.py", "getting-started.md": "tests/test_docs.py",
                 "concepts.md": "tests/test_docs.py"}
# programs other than paperplug, nox and pip that the pages show (not run here)
OTHER_PROGRAMS = {"torchrun": "PyTorch's launcher (tests/engine/test_distributed.py runs it)",
                  "tensorboard": "TensorBoard's viewer (the trackers' tests read its files)",
                  "cp": "copying the plugin template", "cd": "changing directory",
                  "pytest": "the template's own tests (tests/test_external_plugin.py)",
                  "python3": "the interpreter"}
BASE_RECIPE = {"name": "docs_block", "encoder": {"name": "mlp", "out_dim": 10},
               "objectives": [{"name": "cross_entropy"}]}


def blocks(language: str) -> list[tuple[str, int, str]]:
    """``(page, line, code)`` of every block of ``language`` in the README and the docs."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            if match.group(2).strip() == language:
                line = text[:match.start()].count("\n") + 1
                code = "\n".join(s[len(match.group(1)):] for s in match.group(3).splitlines())
                found.append((page.name, line, code))
    return found


def _id(block: tuple[str, int, str]) -> str:
    return f"{block[0]}:{block[1]}"


def test_every_fenced_block_has_a_known_language():
    known = {"python", "toml", "bash", "text"}
    for page in PAGES:
        for match in FENCE.finditer(page.read_text()):
            language = match.group(2).strip()
            assert language in known or language.startswith("{"), (page.name, language)


@pytest.mark.parametrize("block", [b for b in blocks("python") if b[0] not in RUN_ELSEWHERE],
                         ids=_id)
def test_python_blocks_run(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block[2], _id(block), "exec"), {"__name__": "docs_example"})


def test_python_blocks_run_elsewhere_are_all_run_there():
    """The README's Python blocks are the four sections tests/test_readme.py runs; a new block
    elsewhere in the README would be unrun."""
    readme = ROOT / "README.md"
    heads = [line for line in readme.read_text().splitlines() if line.startswith("#")]
    sections = []
    for page, line, _ in blocks("python"):
        if page == "README.md":
            before = readme.read_text().splitlines()[:line]
            sections.append([h for h in heads if h in before][-1])
    assert sections == ["## Quickstart", "## Training", "### Inside PyTorch Lightning",
                        "## Writing a plugin"]
    test_docs = (ROOT / "tests" / "test_docs.py").read_text()
    assert '["getting-started.md", "concepts.md"]' in test_docs


def _recipe_check(table: dict) -> None:
    """Structure a recipe (or a single table of one on a minimal recipe) and check its data
    source's keys and every plugin it names, as ``paperplug run`` does before training."""
    recipe = load_recipe({**BASE_RECIPE, **table})
    source_options(recipe.data)
    specs = [("encoder", recipe.encoder), *[("objective", s) for s in recipe.objectives],
             *[("callback", s) for s in recipe.callbacks],
             *[(k, getattr(recipe, k)) for k in ("sampler", "teacher", "calibrator",
                                                   "reweighter", "schedule")
               if getattr(recipe, k) is not None]]
    for kind, spec in specs:
        sdk.registry.get_registry().get(kind, spec.name)


@pytest.mark.parametrize("block", blocks("toml"), ids=_id)
def test_toml_blocks_parse_and_recipes_check(block):
    table = tomllib.loads(block[2])
    if "project" in table:  # a plugin package's entry points
        assert set(table["project"]["entry-points"]) == {"paperplug"}
        return
    _recipe_check(table)


def _commands(code: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, comments dropped, ``&&``
    chains split."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return commands


def _sessions() -> set[str]:
    return set(re.findall(r"@nox\.session\s*\ndef (\w+)", (ROOT / "noxfile.py").read_text()))


def _extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
               ["optional-dependencies"])


@pytest.mark.parametrize("block", blocks("bash"), ids=_id)
def test_shell_blocks_name_real_commands(block):
    parser = build_parser()
    for words in _commands(block[2]):
        words = [w for w in words if "=" not in w or w.startswith("-")] if "=" in words[0] \
            else words  # leading VAR=value assignments
        program, args = words[0], words[1:]
        if program == "paperplug":
            parser.parse_args(args)  # a UsageError names what is wrong
        elif program == "nox":
            assert args[args.index("-s") + 1] in _sessions(), words
        elif program == "pip" or words[:3] == ["python3", "-m", "pip"]:
            for spec in args:
                if "[" in spec:
                    assert set(spec.split("[", 1)[1].rstrip("]").split(",")) <= _extras(), spec
        else:
            assert program in OTHER_PROGRAMS, f"{block[0]}:{block[1]}: {' '.join(words)}"


def _walkthrough() -> tuple[str, list[list[str]]]:
    """The README walk-through's recipe and its shell commands."""
    section = (ROOT / "README.md").read_text().split("## From install to your own data", 1)[1]
    section = section.split("\n## ", 1)[0]
    recipe = re.search(r"```toml\n(.*?)```", section, flags=re.S).group(1)
    shell = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[-1]
    return recipe, _commands(shell)


def _penguins(path: Path) -> None:
    """A small table like the walk-through's: three species, four numeric columns, an island."""
    pd = pytest.importorskip("pandas", reason="tables need pandas (the tables extra)")
    import numpy as np

    rng = np.random.default_rng(0)
    species = np.repeat(["adelie", "chinstrap", "gentoo"], 200)
    centre = {"adelie": (38.8, 18.3, 190.0, 3700.0), "chinstrap": (48.8, 18.4, 196.0, 3730.0),
              "gentoo": (47.5, 15.0, 217.0, 5080.0)}
    rows = np.array([centre[s] for s in species]) * rng.normal(1.0, 0.04, (len(species), 4))
    pd.DataFrame({"bill_length": rows[:, 0], "bill_depth": rows[:, 1],
                  "flipper_length": rows[:, 2], "body_mass": rows[:, 3],
                  "island": rng.choice(["biscoe", "dream", "torgersen"], len(species)),
                  "species": species}).to_csv(path, index=False)


def test_the_readme_walkthrough_runs(tmp_path, monkeypatch):
    """The recipe block and the commands, as written, on a generated CSV (fewer epochs): the run
    learns the classes, its report is written and TensorBoard has the run's event file."""
    pytest.importorskip("tensorboard", reason="the walk-through logs to TensorBoard")
    pytest.importorskip("matplotlib", reason="the report draws with matplotlib")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "1")
    recipe, commands = _walkthrough()
    (tmp_path / "my_table.toml").write_text(recipe)
    _penguins(tmp_path / "penguins.csv")
    programs = [c[0] for c in commands]
    assert programs == ["paperplug", "paperplug", "tensorboard"]
    run, report, viewer = commands
    assert main([*run[1:], "--set", "trainer.max_epochs=10"]) == 0
    assert main(report[1:]) == 0
    import json

    summary = json.loads((tmp_path / "runs/penguins/summary.json").read_text())
    assert summary["accuracy"] > 0.8 and summary["ece_after"] < summary["ece_before"]
    assert (tmp_path / "runs/penguins/report.html").stat().st_size > 10_000
    logdir = tmp_path / viewer[viewer.index("--logdir") + 1]
    assert list(logdir.glob("events.out.tfevents.*"))
