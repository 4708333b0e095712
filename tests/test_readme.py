"""The README's code runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(heading: str) -> str:
    """The first Python code block of the README section under ``heading``."""
    section = README.read_text().split(f"\n{heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_quickstart_runs():
    namespace: dict = {}
    exec(compile(_python_block("## Quickstart"), "README quickstart", "exec"), namespace)
    assert namespace["loss"].value.requires_grad
    assert set(namespace["loss"].logs) == {"barlow_twins", "nt_xent"}


def test_setup_section_has_two_commands_demo_first():
    text = README.read_text().split("## Set-up", 1)[1]
    block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    assert len(lines) == 2
    assert "nox -s demo" in lines[0] and "nox -s tests" in lines[1]


def test_ci_runs_the_readme_test_command():
    ci = (README.parent / ".ci" / "run").read_text()
    block = re.search(r"```bash\n(.*?)```", README.read_text().split("## Set-up", 1)[1], flags=re.S)
    assert block.group(1).strip().splitlines()[1] in ci


def test_plugin_example_registers_and_conforms():
    import types

    from sdk.registry import Registry
    from sdk.testing import check_plugin

    module = types.ModuleType("my_loss")
    exec(compile(_python_block("## Writing a plugin"), "README plugin example", "exec"),
         module.__dict__)
    reg = Registry()
    reg.register_module(module, name="my_loss", package="my-package")
    assert reg.broken == []
    check_plugin("objective", "my_loss", registry=reg, scale=2.0)


def test_training_example_runs():
    namespace: dict = {}
    exec(compile(_python_block("## Training"), "README training example", "exec"), namespace)
    assert namespace["trainer"].step == 4  # 2 epochs of 4 batches, 2 per optimizer step
    assert namespace["embeddings"].shape == (512, 32)
    assert int(namespace["trainer"].teacher.state_dict()["filled"]) > 0
    semi = namespace["semi"]
    assert semi.step == 4 and semi._unlabeled.position == (0, 4)  # 4 of the 8 unlabelled batches


def test_lightning_example_runs():
    import pytest

    pytest.importorskip("lightning", reason="the lightning extra is not installed")
    namespace: dict = {}
    exec(compile(_python_block("### Inside PyTorch Lightning"), "README Lightning example",
                 "exec"), namespace)
    assert namespace["pl"].global_step == 4
    assert namespace["embeddings"].shape == (64, 8)
    assert int(namespace["engine"].teacher.state_dict()["filled"]) == 32


def test_every_builtin_plugin_is_listed():
    import sdk

    table = README.read_text().split("## Built-in methods", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"[a-z][a-z0-9_]+", table))
    missing = sorted(c.name for c in sdk.plugins() if c.package == "paperplug" and c.name not in listed)
    assert not missing, f"README's built-in table lacks {missing}"
