"""The ``paperplug-api`` directive: API reference of every public module of the sdk package.

The module list is read from the package itself (``pkgutil``), so a new module appears in the
reference without editing the docs. The top-level ``sdk`` namespace re-exports names defined
in submodules; it is shown as a list of links rather than documented twice, and a
cross-reference to ``sdk.Views`` resolves to ``sdk.types.Views``.
"""

from __future__ import annotations

import importlib
import pkgutil

# Modules shown first, in this order; every other public module follows alphabetically.
FIRST = ("types", "interfaces", "registry", "card", "compose", "contrastive", "errors",
         "testing", "config", "engine", "metrics")


def public_modules(package: str = "sdk") -> list[str]:
    """Dotted names of the package's public submodules (no leading underscore)."""
    pkg = importlib.import_module(package)
    names = {m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_")}
    ordered = [n for n in FIRST if n in names] + sorted(names.difference(FIRST))
    return [f"{package}.{n}" for n in ordered]


def shortcuts(package: str = "sdk") -> list[tuple[str, str, str]]:
    """``(name, defining module, role)`` for each name in the package's ``__all__``."""
    pkg = importlib.import_module(package)
    out = []
    for name in getattr(pkg, "__all__", ()):
        try:
            obj = getattr(pkg, name)
        except (AttributeError, ImportError):  # a lazily imported module not written yet
            continue
        module = getattr(obj, "__module__", None)
        if not module or not module.startswith(f"{package}."):
            continue
        role = "class" if isinstance(obj, type) else "func" if callable(obj) else "data"
        if role == "func" and not hasattr(obj, "__code__"):  # callable instances (hookimpl)
            role = "data"
        out.append((name, module, role))
    return out


def api_rst(package: str = "sdk") -> str:
    """reStructuredText of the whole reference."""
    lines = [f"``{package}``", "-" * (len(package) + 4), "",
             f".. automodule:: {package}", "   :no-members:", "",
             "Names available directly from the package:", ""]
    for name, module, role in shortcuts(package):
        target = f"{module}.{name}"
        link = f":py:{role}:`{target}`" if role != "data" else f"``{target}``"
        lines.append(f"- ``{package}.{name}``: {link}")
    lines.append("")
    for module in public_modules(package):
        lines += [f"``{module}``", "-" * (len(module) + 4), "",
                  f".. automodule:: {module}", ""]
    return "\n".join(lines)


def setup(app):
    from docutils import nodes
    from docutils.statemachine import StringList
    from sphinx.util.docutils import SphinxDirective
    from sphinx.util.nodes import nested_parse_with_titles

    class ApiDirective(SphinxDirective):
        """Expands to the automodule sections of every public sdk module."""

        has_content = False

        def run(self):
            node = nodes.section()
            node.document = self.state.document
            content = StringList(api_rst().splitlines(), source="<paperplug-api>")
            nested_parse_with_titles(self.state, content, node)
            return node.children

    def resolve_shortcut(app, env, node, contnode):
        """Let ``sdk.Views`` in a cross-reference point at ``sdk.types.Views``."""
        if node.get("refdomain") != "py":
            return None
        full = {f"sdk.{name}": f"{module}.{name}" for name, module, _ in shortcuts()}
        target = full.get(node.get("reftarget", ""))
        if target is None:
            return None
        return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder,
                                                 node["reftype"], target, node, contnode)

    app.add_directive("paperplug-api", ApiDirective)
    app.connect("missing-reference", resolve_shortcut)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
