"""``python -m metaoptimizer.cli``: the ``metaopt`` tool (e.g. under ``torchrun``)."""

from metaoptimizer.cli.main import app

app(prog_name="metaopt")
