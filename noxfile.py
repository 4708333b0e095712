"""Sessions: tests, lint, docs, bench, demo.

``PAPERPLUG_TORCH`` selects the torch requirement installed into each session (default
``torch``); e.g. ``PAPERPLUG_TORCH="torch==2.13.0"`` picks a specific (CPU) build.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "venv"
nox.options.sessions = ["tests"]
TORCH = os.environ.get("PAPERPLUG_TORCH", "torch")


def install(session: nox.Session, *extras: str) -> None:
    session.install(TORCH)
    spec = f".[{','.join(extras)}]" if extras else "."
    session.install("-e", spec)


def install_peers(session: nox.Session) -> None:
    """lightly and pytorch-metric-learning, the oracles and baselines of the contrastive losses."""
    # --no-deps: the peers' requirements (torchvision, ...) would replace the chosen torch build
    session.install("--no-deps", "pytorch-metric-learning>=2.3", "lightly>=1.5", "tqdm")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, including the conformance kit over every registered plugin."""
    install(session, "test")
    install_peers(session)  # so the peer-equality tests run rather than skip
    args = session.posargs or ["-n", "auto"]  # one worker per core; pass arguments to override
    session.run("pytest", "-q", "-p", "no:cacheprovider", *args)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over the whole repository."""
    session.install("ruff>=0.4")
    session.run("ruff", "check", ".")


@nox.session
def docs(session: nox.Session) -> None:
    """Sphinx HTML docs with warnings as errors."""
    install(session, "docs")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks: import/discovery time, engine overhead, losses against peer libraries."""
    install(session, "test")
    install_peers(session)
    session.run("python", "-m", "bench", *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """Install paperplug and run its demo: SSL training on digits, printed results."""
    install(session, "plots")
    session.install("scikit-learn>=1.3")  # the digits dataset
    session.run("paperplug", "demo", *session.posargs)
