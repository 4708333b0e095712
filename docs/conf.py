"""Sphinx configuration: furo theme, MyST Markdown, autodoc of the sdk package, and one page
per registered plugin generated from its card (docs/_ext/plugin_pages.py)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
sys.path.insert(0, str(HERE.parent))  # the sdk and plugins packages of this checkout

import sdk  # noqa: E402

project = "paperplug"
author = "paperplug contributors"
copyright = "paperplug contributors"
version = release = sdk.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
    "api_pages",
    "plugin_pages",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_ext", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_mock_imports = ["matplotlib", "sklearn", "lightning"]  # optional extras, not in the docs env

html_theme = "furo"
html_title = f"paperplug {release}"
html_static_path: list[str] = []
