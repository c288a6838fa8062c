"""``metaopt``, the command-line tool: the only package that imports typer and rich.

One module per command (``demo``, ``pretrain``, ``eval``, ``meta-train``, ``fewshot``,
``lr-example``); each turns options into a library call, renders the library's progress reports
and turns bad input into a usage error. :data:`app` is the typer application.
"""

from metaoptimizer.cli.main import app

__all__ = ["app"]
