"""Third-party plugin packages: pip-installed, discovered, composed, isolated when broken.

The template package (examples/plugin_template), a deliberately broken package and a package
that re-registers the template's name are pip-installed (``--target``, offline, no build
isolation) into temporary directories; fresh interpreters with those directories on
``PYTHONPATH`` then show what a user who installed them would see.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sdk

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "plugin_template"
TEMPLATE_DIST = "paperplug-plugin-template"
BROKEN_DIST = "paperplug-broken-example"
CLONE_DIST = "paperplug-vicreg-clone"

PYPROJECT = """\
[build-system]
requires = ["setuptools>=70.1"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "0.1.0"

[project.entry-points.paperplug]
{entry_point} = "{module}"

[tool.setuptools]
py-modules = ["{module}"]
"""

BROKEN_MODULE = """\
raise ImportError("paperplug_broken_example needs the package 'not_installed_anywhere'")
"""

CLONE_MODULE = '''\
"""Registers an objective under the template's name "template_vicreg", to provoke a conflict."""
import torch

import sdk
from sdk.interfaces import Objective


class Zero(Objective):
    requires = {"views": 2}

    def forward(self, views, batch):
        return sdk.Loss(value=torch.zeros(()))


@sdk.hookimpl
def paperplug_register(registry):
    card = sdk.Card(name="template_vicreg", kind="objective", title="A clone", summary="Zero loss.")
    registry.add(Zero, card=card)
'''


def _write_package(root: Path, dist: str, module: str, entry_point: str, source: str) -> Path:
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        PYPROJECT.format(dist=dist, module=module, entry_point=entry_point))
    (root / f"{module}.py").write_text(source)
    return root


def _pip_install(target: Path, *projects: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
           "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
           *map(str, projects)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (
        f"pip install failed (the test extra provides setuptools>=70.1):\n{done.stderr}")


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> dict[str, Path]:
    """``main``: template + broken package; ``clone``: the package re-registering vicreg."""
    tmp = tmp_path_factory.mktemp("external")
    template = tmp / "src" / "template"  # a copy: in-tree builds leave build/ and egg-info
    shutil.copytree(TEMPLATE, template,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    broken = _write_package(tmp / "src" / "broken", BROKEN_DIST, "paperplug_broken_example",
                            "broken_example", BROKEN_MODULE)
    clone = _write_package(tmp / "src" / "clone", CLONE_DIST, "paperplug_vicreg_clone",
                           "vicreg_clone", CLONE_MODULE)
    _pip_install(tmp / "main", template, broken)
    _pip_install(tmp / "clone", clone)
    return {"main": tmp / "main", "clone": tmp / "clone", "template": template}


def _run(args: list[str], *paths: Path, cwd: Path | None = None, cache: Path | None = None) -> str:
    env = dict(os.environ)
    if cache is not None:
        env["PAPERPLUG_CACHE_DIR"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    env["COLUMNS"] = "300"  # rich tables: no folding of long package names
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=120)
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


PROBE = textwrap.dedent("""\
    import json, torch, sdk
    g = torch.Generator().manual_seed(0)
    views = sdk.Views(embeddings=(torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)))
    theirs, ours = sdk.create("objective", "template_vicreg"), sdk.create("objective", "nt_xent")
    combined = 0.3 * theirs + ours
    loss = combined(views)
    a, b = theirs(views).value, ours(views).value
    print(json.dumps({
        "plugins": [[c.kind, c.name, c.package] for c in sdk.plugins()],
        "module_file": __import__(type(theirs).__module__, fromlist=["_"]).__file__,
        "logs": {k: float(v) for k, v in loss.logs.items()},
        "a": float(a), "b": float(b), "total": float(loss.value),
        "expected": float(0.3 * a + b),
        "broken": [[p.name, p.package, p.error] for p in sdk.broken_plugins()],
    }))
""")


def test_template_is_discovered_composed_and_broken_package_isolated(sites):
    out = json.loads(_run(["-c", PROBE], sites["main"]))

    # (a) discovered, from the installed copy, with its distribution named on the card
    plugins = {(kind, name): package for kind, name, package in out["plugins"]}
    assert plugins[("objective", "template_vicreg")] == TEMPLATE_DIST
    assert Path(out["module_file"]).is_relative_to(sites["main"])

    # (b) composes with a built-in: value is the weighted sum, logs hold every term
    assert out["total"] == pytest.approx(out["expected"], rel=1e-6)
    assert out["total"] == pytest.approx(0.3 * out["a"] + out["b"], rel=1e-6)
    assert out["logs"]["template_vicreg"] == pytest.approx(out["a"], rel=1e-6)
    assert out["logs"]["nt_xent"] == pytest.approx(out["b"], rel=1e-6)
    assert {"template_vicreg/invariance", "template_vicreg/variance",
            "template_vicreg/covariance"} <= set(out["logs"])

    # (c) the broken package is reported with its name and error; every built-in survives
    broken = {name: (package, error) for name, package, error in out["broken"]}
    assert broken["broken_example"] == (
        BROKEN_DIST,
        "ImportError: paperplug_broken_example needs the package 'not_installed_anywhere'")
    builtins = {(c.kind, c.name) for c in sdk.plugins()}  # this process: no extra packages
    assert builtins and set(plugins) == builtins | {("objective", "template_vicreg")}


def test_cli_lists_the_external_and_the_broken_package(sites):
    out = _run(["-m", "sdk.cli", "plugins", "list"], sites["main"])
    assert "vicreg" in out and TEMPLATE_DIST in out
    assert "broken plugins" in out
    assert "broken_example" in out and BROKEN_DIST in out and "not_installed_anywhere" in out
    assert "nt_xent" in out


def test_two_packages_registering_one_name_conflict(sites, tmp_path):
    probe = textwrap.dedent("""\
        import json, sdk
        try:
            sdk.create("objective", "template_vicreg")
        except sdk.PluginConflictError as exc:
            print(json.dumps({"error": str(exc)}))
        else:
            print(json.dumps({"error": None}))
        sdk.create("objective", "nt_xent")  # other plugins are unaffected
    """)
    listing = ("import json, sdk; sdk.plugins(); "
               "print(json.dumps([b.error for b in sdk.broken_plugins()]))")
    for _ in ("importing every module", "with the card index that run wrote"):
        out = json.loads(_run(["-c", probe], sites["main"], sites["clone"], cache=tmp_path))
        assert out["error"] is not None, "no PluginConflictError for a name registered twice"
        assert TEMPLATE_DIST in out["error"] and CLONE_DIST in out["error"]
        assert "vicreg" in out["error"]
        errors = json.loads(_run(["-c", listing], sites["main"], sites["clone"], cache=tmp_path))
        assert [e for e in errors if e.startswith("PluginConflictError") and "'template_vicreg'" in e
                and TEMPLATE_DIST in e and CLONE_DIST in e]
    assert list(tmp_path.glob("cards-*.json"))


def test_template_passes_its_own_tests(sites):
    """The template's suite (sdk.testing.check_plugin + formula tests) against the install."""
    out = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], sites["main"],
               cwd=sites["template"])
    assert " passed" in out and "failed" not in out
