"""Fixtures of the recipe tests."""

import importlib.util
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "recipes"


@pytest.fixture(scope="session")
def recipe_script():
    """``recipe_script(name)``: ``examples/recipes/<name>.py`` imported afresh as a module."""
    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
