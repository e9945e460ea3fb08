"""``python -m tokenprune.cli``: the ``tokenprune`` command."""

from . import app

app(prog_name="tokenprune")
