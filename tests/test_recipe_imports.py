"""A recipe imports no Python object unless the user opts in (``allow_imports``)."""

from __future__ import annotations

import pytest

from sdk import data
from sdk.cli import main
from sdk.cli_run import build
from sdk.config import dump_toml, load_recipe, unstructure
from sdk.errors import CheckpointWarning, ConfigError

OPT_IN = "opt in with paperplug run --allow-imports or load_recipe(..., allow_imports=True)"


def _recipe(**changes):
    base = {"name": "r", "data": {"name": "digits", "batch_size": 32, "augment": {"noise": 0.1}},
            "encoder": {"name": "mlp", "hidden_dims": [16], "out_dim": 8},
            "objectives": [{"name": "nt_xent"}], "trainer": {"max_steps": 1}}
    return {**base, **changes}


MLP = "plugins.encoders.mlp:MLP"


@pytest.mark.parametrize(("changes", "where"), [
    ({"encoder": {"module": "os:system", "command": "touch pwned"}}, "encoder.module"),
    ({"encoder": {"name": "projection_head", "out_dim": 8,
                  "backbone": {"module": MLP, "out_dim": 16}}}, "encoder.backbone.module"),
    ({"objectives": [{"name": "nt_xent"}, {"module": "builtins:exec"}]}, "objectives[1].module"),
])
def test_a_module_entry_is_refused_without_the_opt_in(changes, where):
    with pytest.raises(ConfigError) as err:
        load_recipe(_recipe(**changes))
    assert err.value.path == where
    assert str(err.value).startswith(f"{where}: importing ")
    assert "needs the user's opt-in" in str(err.value) and OPT_IN in str(err.value)


@pytest.mark.parametrize(("changes", "where"), [
    ({"encoder": {"name": "os:system"}}, "encoder.name"),
    ({"objectives": [{"name": "builtins:exec"}]}, "objectives[0].name"),
    ({"optimizer": {"name": "torch.optim:SGD"}}, "optimizer.name"),
    ({"data": {"name": "sklearn.datasets:load_digits"}}, "data.name"),
])
@pytest.mark.parametrize("allow", [False, True])
def test_a_name_spelled_as_an_import_is_always_refused(changes, where, allow):
    with pytest.raises(ConfigError) as err:
        load_recipe(_recipe(**changes), allow_imports=allow)
    assert err.value.path == where
    assert "is an import reference, not a registered name" in str(err.value)
    assert OPT_IN in str(err.value)


def test_the_cli_refuses_an_import_and_names_the_flag(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    marker = tmp_path / "x"
    recipe.write_text(dump_toml(_recipe(encoder={"module": "os:system",
                                                 "command": f"touch {marker}"})))
    code = main(["run", str(recipe), "--run-dir", str(tmp_path / "run")])
    out = capsys.readouterr().err
    assert code == 2 and "encoder.module: importing" in out and "--allow-imports" in out
    assert not (tmp_path / "run").exists() and not marker.exists()


def test_with_the_opt_in_a_module_entry_builds_the_imported_factory(tmp_path):
    recipe = load_recipe(_recipe(encoder={"name": "projection_head", "out_dim": 8, "backbone": {
        "module": MLP, "hidden_dims": [32], "out_dim": 16}}), allow_imports=True)
    backbone = recipe.encoder.params["backbone"]
    assert (backbone.module, backbone.name) == (MLP, MLP)
    parts = build(recipe, data.load("digits"))
    encoder = parts["encoder"]
    assert type(encoder.backbone).__name__ == "MLP" and encoder.backbone.out_dim == 16
    assert encoder.backbone.in_dim == 64  # filled from the data, as for a registered plugin
    # the resolved recipe keeps the import and reads back only with the opt-in
    resolved = tmp_path / "config.toml"
    resolved.write_text(dump_toml(unstructure(recipe)))
    assert f'module = "{MLP}"' in resolved.read_text()
    with pytest.raises(ConfigError, match="encoder.backbone.module: importing"):
        load_recipe(resolved)
    assert load_recipe(resolved, allow_imports=True).encoder.params["backbone"].module == MLP


@pytest.mark.parametrize(("encoder", "message"), [
    ({"module": "no_such_package_here:factory"},
     "encoder.module: cannot import 'no_such_package_here'"),
    ({"module": "plugins.encoders.mlp:Missing"},
     "encoder.module: 'plugins.encoders.mlp' has no attribute 'Missing'"),
    ({"module": "plugins.encoders.mlp:CARD"}, "encoder.module: 'plugins.encoders.mlp:CARD' is a "
                                              "Card, not a factory"),
    ({"module": "collections:OrderedDict"},
     "encoder.module: collections:OrderedDict returned an object of type OrderedDict; the "
     "encoder slot needs an instance of Module"),
    ({"module": MLP, "depth": 3}, "encoder: plugins.encoders.mlp:MLP: "),
    ({"module": MLP, "name": "mlp"}, "encoder.module: give name (a registered plugin) or module"),
    ({"module": "not a reference"}, "encoder.module: expected \"package.module:factory\""),
])
def test_an_import_that_cannot_build_a_plugin_is_a_clear_error(encoder, message):
    with pytest.raises(ConfigError) as err:
        build(load_recipe(_recipe(encoder=encoder), allow_imports=True), data.load("digits"))
    assert str(err.value).startswith(message)


def test_an_imported_plugin_must_be_of_its_slots_kind():
    recipe = load_recipe(_recipe(objectives=[{"module": "torch.nn:Identity"}]),
                         allow_imports=True)
    with pytest.raises(ConfigError, match=r"objectives\[0\].module: torch.nn:Identity returned an "
                                          r"object of type Identity; the objective slot needs an "
                                          r"instance of Objective"):
        build(recipe, data.load("digits"))


def test_the_cli_resumes_past_a_damaged_checkpoint_and_reports_when_none_is_valid(tmp_path,
                                                                                   capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(dump_toml(_recipe(trainer={"max_steps": 2, "checkpoint_every": 1},
                                        evaluation={"random_init": False,
                                                    "linear_probe": False})))
    run_dir = tmp_path / "run"
    assert main(["run", str(recipe), "--run-dir", str(run_dir)]) == 0
    newest = run_dir / "checkpoints" / "step-000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(CheckpointWarning, match="step-000002.pt is truncated"):
        assert main(["run", "--resume", str(run_dir)]) == 0
    for path in (run_dir / "checkpoints").iterdir():
        path.write_bytes(b"")
    capsys.readouterr()
    with pytest.warns(CheckpointWarning):
        code = main(["run", "--resume", str(run_dir)])
    out = capsys.readouterr().err
    assert code == 2 and "error: no valid checkpoint in" in out and "is empty" in out
