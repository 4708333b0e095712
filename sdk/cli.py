"""The ``paperplug`` command: ``plugins list|show``, ``run RECIPE``, ``demo``,
``compare RECIPE...``.

Exit status: 0 on success, 2 for bad usage or a bad recipe (one ``paperplug: error: ...``
line on stderr), 1 for a run that fails (one line naming the exception; ``--debug`` or
``PAPERPLUG_DEBUG=1`` shows the traceback instead).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table

from sdk.errors import CheckpointError, ConfigError, PluginError, PluginNotFoundError

# Subcommands added by other modules: name -> (configure parser, handler).
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None],
                          Callable[[argparse.Namespace, Console], int]]] = {}


def short_paper(paper: str, width: int = 16) -> str:
    """A card's paper as the list shows it, at most ``width`` characters: an arXiv id without its
    ``arXiv:`` prefix, a link as its host and the tail of its path (``doi.org/…533a0``)."""
    from urllib.parse import urlsplit

    paper = paper.strip()
    if "://" not in paper:
        paper = paper.removeprefix("arXiv:")
        return paper if len(paper) <= width else paper[:width - 1] + "…"
    parts = urlsplit(paper)
    host = parts.netloc.removeprefix("www.")
    tail = parts.fragment or parts.path.rstrip("/").rsplit("/", 1)[-1]
    if parts.path.strip("/") == tail and len(host) + 1 + len(tail) <= width:
        return f"{host}/{tail}" if tail else host
    room = width - len(host) - 2
    if not tail or room < 4:  # no tail worth showing: the host alone
        return host if len(host) <= width else host[:width - 1] + "…"
    return f"{host}/…{tail[-room:]}"


def _matches(card, text: str) -> bool:
    text = text.lower()
    return any(text in field.lower() for field in
               (card.name, card.title, card.summary, card.paper, card.package, card.family))


def _card_json(card) -> dict:
    data = {f: getattr(card, f) for f in ("name", "kind", "family", "package", "title", "summary",
                                          "paper", "formula", "left_out")}
    data["params"] = [{"name": p.name, "type": p.type, "required": p.required,
                       "default": None if p.required else p.default_repr(),
                       "constraint": p.constraint, "from_data": p.from_data, "doc": p.doc}
                      for p in card.params]
    return data


def _plugins_list(args: argparse.Namespace, console: Console) -> int:
    """One row per plugin, fitted to the terminal: kind, name and the short paper whole, the
    family where there is room, the title in what is left (``plugins show`` has it all)."""
    import json

    from sdk import registry

    reg = registry.get_registry()
    cards = reg.cards(args.kind)
    if args.family is not None:
        families = sorted({c.family for c in cards})
        if args.family not in families:
            raise ConfigError(f"--family: no plugin of family {args.family!r}."
                              + registry._suggest(args.family, families)
                              + f" Families: {', '.join(families)}")
        cards = [c for c in cards if c.family == args.family]
    if args.text:
        cards = [c for c in cards if _matches(c, args.text)]
    if args.json:
        print(json.dumps([_card_json(c) for c in cards], indent=2))
        return 0
    paper = 16 if console.width < 120 else 22 if console.width < 160 else 28
    rows = [(c.kind, c.name, c.family, short_paper(c.paper, paper), c.title) for c in cards]
    header = ("kind", "name", "family", "paper", "title")
    widths = [max([len(header[i]), *(len(r[i]) for r in rows)]) for i in range(4)]
    gap = 2  # between columns (box.SIMPLE: a padding of one either side, no edges)
    fixed = widths[0] + widths[1] + widths[3] + 3 * gap
    shown = [0, 1, 3]
    if console.width - fixed - widths[2] - gap >= 40:  # the family only where the title keeps 40
        shown, fixed = [0, 1, 2, 3], fixed + widths[2] + gap
    title = console.width - fixed - gap
    table = Table(title=f"paperplug plugins ({len(rows)})", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True, show_edge=False)
    for i in shown:
        table.add_column(header[i], no_wrap=True, min_width=widths[i], max_width=widths[i])
    if title >= 8:
        table.add_column("title", no_wrap=True, overflow="ellipsis", max_width=title)
    for r in rows:
        table.add_row(*(escape(r[i]) for i in shown), *([escape(r[4])] if title >= 8 else []))
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
    if not matches and args.kind is not None:
        reg.get(args.kind, args.name)  # raises with suggestions among that kind
    if not matches:
        names = sorted({c.name for c in reg.cards()})
        raise PluginNotFoundError(f"no plugin named {args.name!r}."
                                  + registry._suggest(args.name, names)
                                  + " 'paperplug plugins list' shows them all")
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


DEBUG_HELP = "show the traceback of a failure (also PAPERPLUG_DEBUG=1)"


class UsageError(Exception):
    """The command line is malformed (argparse's complaint, without the usage text)."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are exceptions, reported on one line by :func:`main`."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paperplug", description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    common = _Parser(add_help=False)  # --debug after the subcommand too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    plugins = sub.add_parser("plugins", help="list or show registered plugins", parents=[common])
    psub = plugins.add_subparsers(dest="action", required=True)
    p_list = psub.add_parser("list", help="table of plugins (and broken ones)", parents=[common])
    p_list.add_argument("text", nargs="?", default=None,
                        help="only plugins whose name, title, summary, paper or package holds it")
    p_list.add_argument("--kind", default=None, help="only plugins of this kind")
    p_list.add_argument("--family", default=None,
                        help="only plugins of this family (plugins/<family>/, or a package's name)")
    p_list.add_argument("--json", action="store_true", help="print the cards as JSON")
    p_list.set_defaults(handler=_plugins_list)
    p_show = psub.add_parser("show", help="a plugin's card", parents=[common])
    p_show.add_argument("name")
    p_show.add_argument("--kind", default=None)
    p_show.set_defaults(handler=_plugins_show)
    _load_commands()
    for name, (configure, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=(handler.__doc__ or "").strip().splitlines()[0],
                           parents=[common])
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def _load_commands() -> None:
    """Import the modules that add subcommands (kept out of ``import sdk``)."""
    import importlib

    for module in ("sdk.cli_run", "sdk.cli_compare"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def _report(exc: BaseException, *, name_type: bool, debug: bool) -> None:
    if debug:
        traceback.print_exception(exc)
        return
    text = " ".join(str(exc).split())  # one line, whatever the message holds
    if name_type:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    print(f"paperplug: error: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv``; returns the exit status (see the module docstring)."""
    debug = os.environ.get("PAPERPLUG_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
    except UsageError as exc:
        _report(exc, name_type=False, debug=False)
        return 2
    debug = debug or args.debug
    console = Console()
    try:
        return args.handler(args, console)
    except (UsageError, ConfigError, PluginError, CheckpointError) as exc:
        _report(exc, name_type=False, debug=debug)
        return 2
    except KeyboardInterrupt:
        print("paperplug: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a failed run: one line, the traceback on request
        _report(exc, name_type=True, debug=debug)
        return 1


if __name__ == "__main__":  # ``python -m sdk.cli``: run the imported module, where subcommands register
    from sdk.cli import main as _main

    sys.exit(_main())
