"""Discovery, lookup, parameter validation and isolation of broken plugins."""

import subprocess
import sys

import pytest

import sdk
from sdk.card import Card
from sdk.interfaces import Objective
from sdk.registry import Registry


def test_import_sdk_imports_neither_torch_nor_plugins():
    code = ("import sys, sdk; bad = [m for m in sys.modules if m == 'torch' or m.startswith('plugins')]; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _plugin_modules() -> set[str]:
    """Every plugin module under plugins/<family>/ (family packages themselves excluded)."""
    from pathlib import Path

    import plugins

    root = Path(plugins.__file__).parent
    return {".".join(("plugins", *p.relative_to(root).with_suffix("").parts))
            for p in root.rglob("*.py") if not p.name.startswith("_")}


def test_every_plugin_module_is_an_entry_point():
    from importlib import metadata

    listed = {ep.value for ep in metadata.entry_points(group="paperplug")}
    modules = _plugin_modules()
    assert modules and modules - listed == set()


def test_plugins_are_grouped_by_family():
    from importlib import metadata

    for ep in metadata.entry_points(group="paperplug"):
        if ep.value.startswith("plugins."):
            parts = ep.value.split(".")
            assert len(parts) == 3, f"{ep.value}: built-in plugins live in plugins/<family>/<name>.py"
    for card in sdk.plugins():
        if card.package == "paperplug":
            module = sdk.get_registry().get(card.kind, card.name).factory.__module__
            assert card.family and (module.startswith(f"plugins.{card.family}.")
                                    or module.startswith("sdk.")), (card.name, module)


def test_no_plugin_imports_another_plugin():
    """Shared machinery lives in sdk/, never in a plugin that others import."""
    import ast
    from pathlib import Path

    import plugins

    root = Path(plugins.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(root)} imports {n}" for n in names
                          if n == "plugins" or n.startswith("plugins.")]
    assert offenders == []


def test_unknown_name_lists_closest():
    with pytest.raises(sdk.PluginNotFoundError, match=r"Did you mean 'nt_xent'\?") as info:
        sdk.create("objective", "nt-xent")
    assert isinstance(info.value, LookupError)
    assert "barlow_twins" in str(info.value)


def test_unknown_kind():
    with pytest.raises(sdk.PluginNotFoundError, match=r"unknown plugin kind 'objectiv'.*'objective'"):
        sdk.create("objectiv", "nt_xent")


def test_name_of_another_kind_is_pointed_out():
    with pytest.raises(sdk.PluginNotFoundError, match="there is a objective plugin of that name"):
        sdk.create("sampler", "nt_xent")


def test_unknown_parameter_names_accepted_ones():
    with pytest.raises(sdk.ConfigError, match=r"no parameter 'lamda'\. Did you mean 'lambd'\?.*Accepted: lambd, eps, gather") as info:
        sdk.create("objective", "barlow_twins", lamda=1.0)
    assert isinstance(info.value, ValueError) and info.value.param == "lamda"


def test_ill_typed_parameter():
    with pytest.raises(sdk.ConfigError, match=r"parameter 'lambd' expected float, got 'x' \(str\)") as info:
        sdk.create("objective", "barlow_twins", lambd="x")
    assert info.value.param == "lambd"


def test_int_is_accepted_for_float_and_value_validation():
    assert sdk.create("objective", "barlow_twins", lambd=1).lambd == 1
    with pytest.raises(sdk.ConfigError, match="temperature must be > 0"):
        sdk.create("objective", "nt_xent", temperature=0.0)


def test_cards_have_params_from_signature():
    card = next(c for c in sdk.plugins("objective") if c.name == "barlow_twins")
    params = {p.name: p for p in card.params}
    assert params["lambd"].type == "float" and params["lambd"].default == 5e-3
    assert card.package == "paperplug"
    assert {c.kind for c in sdk.plugins("sampler")} == {"sampler"}


def _objective_module(name: str, package_marker: str):
    class Dummy(Objective):
        def forward(self, views, batch):
            return sdk.Loss(value=views.embeddings[0].sum())

    class Module:
        @staticmethod
        @sdk.hookimpl
        def paperplug_register(registry):
            registry.add(Dummy, card=Card(name=name, kind="objective", title=package_marker, summary="s"))

    return Module


def test_conflicting_packages_are_both_named():
    reg = Registry()
    reg.register_module(_objective_module("twin", "first"), name="twin", package="pkg-a")
    reg.register_module(_objective_module("twin", "second"), name="twin", package="pkg-b")
    assert [b.package for b in reg.broken] == ["pkg-b"]
    assert "pkg-a" in reg.broken[0].error and "pkg-b" in reg.broken[0].error
    with pytest.raises(sdk.PluginConflictError, match="'pkg-a' and 'pkg-b'"):
        reg.create("objective", "twin")


def test_broken_register_hook_is_isolated():
    class Broken:
        @staticmethod
        def paperplug_register(registry):
            raise RuntimeError("boom")

    reg = Registry()
    reg.register_module(Broken, name="broken", package="pkg-broken")
    reg.register_module(_objective_module("ok", "ok"), name="ok", package="pkg-ok")
    assert reg.broken[0].name == "broken" and "RuntimeError: boom" in reg.broken[0].error
    assert reg.create("objective", "ok").name == "ok"


def test_card_validation():
    with pytest.raises(ValueError, match="Card.kind: 'loss' is not one of"):
        Card(name="x", kind="loss", title="t", summary="s")
    with pytest.raises(ValueError, match="Card.summary must be a non-empty string"):
        Card(name="x", kind="objective", title="t", summary=" ")
    reg = Registry()
    with pytest.raises(TypeError, match="card must be sdk.Card, got dict"):
        reg.add(lambda: None, card={"name": "y"})


def test_kind_and_name_come_from_the_card():
    reg = Registry()
    reg.add(lambda: 3, card=Card(name="three", kind="metric", title="t", summary="s"))
    assert reg.create("metric", "three") == 3
    assert [(c.kind, c.name) for c in reg.cards()] == [("metric", "three")]


def test_missing_required_parameter():
    reg = Registry()

    def factory(size: int):
        return size

    reg.add(factory, card=Card(name="needs_size", kind="metric", title="t", summary="s"))
    with pytest.raises(sdk.ConfigError, match="missing required parameter 'size'"):
        reg.create("metric", "needs_size")


def _fresh(code: str, cache: object = "") -> str:
    """Run ``code`` in a fresh interpreter with the card index in ``cache`` ("" turns it off)."""
    import os

    env = {**os.environ, "PAPERPLUG_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


IMPORTED = "print(sorted(m for m in sys.modules if m.startswith('plugins')))"


@pytest.fixture(name="source_tree")
def source_tree_fixture(tmp_path_factory):
    """Exclusive use of the plugins' source files across test processes: one test here changes a
    module's modification time, which makes every card index look stale for that moment."""
    import fcntl

    with open(tmp_path_factory.getbasetemp().parent / "paperplug-source-tree.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
        fcntl.flock(lock, fcntl.LOCK_UN)
CARDS = ("import sys, sdk; cards = sdk.plugins(); "
         "print(repr([(c, [p.default for p in c.params]) for c in cards]), sdk.broken_plugins())")


def _n_entry_points() -> int:
    from importlib import metadata

    return len(metadata.entry_points(group="paperplug"))


def test_create_imports_only_the_module_it_needs(tmp_path, source_tree):
    _fresh("import sdk; sdk.plugins()", tmp_path)  # writes the card index
    out = _fresh(f"import sys, sdk; sdk.create('objective', 'nt_xent', temperature=0.2); {IMPORTED}",
                 tmp_path)
    assert out == "['plugins', 'plugins.contrastive', 'plugins.contrastive.nt_xent']"
    out = _fresh(f"import sys, sdk; sdk.create('metric', 'mce'); {IMPORTED}", tmp_path)
    assert out == "['plugins', 'plugins.metrics', 'plugins.metrics.ece']"  # mce: no entry point


def test_without_an_index_create_imports_every_module():
    out = _fresh("import sys, sdk; sdk.create('objective', 'nt_xent'); "
                 "print(sum(m.startswith('plugins.') and m.count('.') == 2 for m in sys.modules))")
    assert int(out) == _n_entry_points()


def test_cards_from_the_index_equal_imported_cards(tmp_path, source_tree):
    imported = _fresh(CARDS)
    assert _fresh(CARDS, tmp_path) == imported  # first run: imports and writes the index
    indexed = _fresh(f"{CARDS}; {IMPORTED}", tmp_path)
    assert indexed == f"{imported}\n[]"  # same cards, no plugin module imported


def test_a_changed_module_is_imported_again(tmp_path, source_tree):
    import os

    import plugins.ssl.barlow_twins as changed

    _fresh("import sdk; sdk.plugins()", tmp_path)
    before = os.stat(changed.__file__)
    try:
        os.utime(changed.__file__, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        code = f"import sys, sdk; sdk.create('objective', 'nt_xent'); {IMPORTED}"
        assert "plugins.ssl.barlow_twins" in _fresh(code, tmp_path)  # its record is stale
        assert "plugins.ssl.barlow_twins" not in _fresh(code, tmp_path)  # and recorded again
    finally:
        os.utime(changed.__file__, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_index_written_by_another_core_is_ignored(tmp_path):
    import json

    _fresh("import sdk; sdk.plugins()", tmp_path)
    (index,) = tmp_path.glob("cards-*.json")
    data = json.loads(index.read_text())
    data["own"] = {path: [0, 0] for path in data["own"]}
    index.write_text(json.dumps(data))
    out = _fresh("import sys, sdk; sdk.create('objective', 'nt_xent'); "
                 "print(sum(m.startswith('plugins.') and m.count('.') == 2 for m in sys.modules))",
                 tmp_path)
    assert int(out) == _n_entry_points()


def test_lazy_lookup_then_full_listing_loads_each_module_once():
    reg = Registry("paperplug")
    assert reg.create("objective", "nt_xent").name == "nt_xent"
    assert [c.name for c in reg.cards("objective")].count("nt_xent") == 1
    assert reg.broken == [] and ("objective", "barlow_twins") in {(c.kind, c.name) for c in reg.cards()}
    assert reg.get("objective", "barlow_twins").factory.__name__ == "BarlowTwins"


def test_a_trainer_built_from_objects_does_not_discover_plugins():
    code = """
import sys, torch, sdk
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from sdk.data import IndexedDataset
from sdk.interfaces import Objective
from sdk.registry import get_registry

class CE(Objective):
    requires = {"logits": True, "targets": True}

    def forward(self, views, batch):
        return sdk.Loss(value=F.cross_entropy(views.logits, batch.targets))

data = IndexedDataset(torch.randn(16, 4), torch.arange(16) % 3)
trainer = sdk.Trainer(nn.Linear(4, 3), CE(), torch.optim.SGD, max_epochs=1, progress=False)
trainer.fit(DataLoader(data, batch_size=8))
print(sorted(m for m in sys.modules if m.startswith('plugins')), len(get_registry()._loaded))
"""
    assert _fresh(code) == "[] 0"
