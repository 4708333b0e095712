"""The ``paperplug`` command: ``plugins list|show``, ``run RECIPE``, ``demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from sdk.errors import CheckpointError, PluginError

# Subcommands added by other modules: name -> (configure parser, handler).
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace, Console], int]]] = {}


def _plugins_list(args: argparse.Namespace, console: Console) -> int:
    from sdk import registry

    reg = registry.get_registry()
    table = Table(title="paperplug plugins", show_lines=False)
    cards = reg.cards(args.kind)
    used = 1  # one row per plugin: identifiers whole, the title cut to fit (`plugins show` has it all)
    for col in ("kind", "name", "package", "paper"):
        width = max([len(col), *(len(getattr(card, col)) for card in cards)])
        table.add_column(col, no_wrap=True, min_width=width)
        used += width + 3
    table.add_column("title", overflow="ellipsis", no_wrap=True, max_width=max(12, console.width - used - 3))
    for card in cards:
        table.add_row(card.kind, card.name, card.package, card.paper, card.title)
    console.print(table)
    if reg.broken:
        broken = Table(title="broken plugins (skipped)", style="red")
        for col in ("name", "package", "error"):
            broken.add_column(col, overflow="fold")
        for b in reg.broken:
            broken.add_row(b.name, b.package, b.error)
        console.print(broken)
    return 0


def _plugins_show(args: argparse.Namespace, console: Console) -> int:
    from sdk import registry

    reg = registry.get_registry()
    matches = [c for c in reg.cards() if c.name == args.name and args.kind in (None, c.kind)]
    if not matches:
        reg.get(args.kind or "objective", args.name)  # raises with suggestions
    for card in matches:
        params = Table(show_header=True, box=None)
        for col in ("parameter", "type", "default", "constraint"):
            params.add_column(col)
        for p in card.params:
            params.add_row(p.name, escape(p.type), escape(p.default_text()), escape(p.constraint))
        body = Table.grid(padding=(0, 2))
        body.add_column(style="bold")
        body.add_column()
        for label, value in (("kind", card.kind), ("paper", card.paper), ("package", card.package),
                             ("summary", card.summary), ("formula", card.formula),
                             ("left out", card.left_out or "-")):
            body.add_row(label, value)
        body.add_row("parameters", params)
        console.print(Panel(body, title=f"{card.name}: {card.title}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paperplug", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list or show registered plugins")
    psub = plugins.add_subparsers(dest="action", required=True)
    p_list = psub.add_parser("list", help="table of plugins (and broken ones)")
    p_list.add_argument("--kind", default=None, help="only plugins of this kind")
    p_list.set_defaults(handler=_plugins_list)
    p_show = psub.add_parser("show", help="a plugin's card")
    p_show.add_argument("name")
    p_show.add_argument("--kind", default=None)
    p_show.set_defaults(handler=_plugins_show)
    _load_commands()
    for name, (configure, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=(handler.__doc__ or "").strip().splitlines()[0])
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def _load_commands() -> None:
    """Import the modules that add subcommands (kept out of ``import sdk``)."""
    import importlib

    for module in ("sdk.cli_run",):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        return args.handler(args, console)
    except (PluginError, ValueError, CheckpointError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", soft_wrap=True)
        return 2


if __name__ == "__main__":  # ``python -m sdk.cli``: run the imported module, where subcommands register
    from sdk.cli import main as _main

    sys.exit(_main())
