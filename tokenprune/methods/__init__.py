"""Built-in methods: pure tensor functions, registered by name on import."""

from . import baselines, dart, divprune, fastv, idpruner, transprune  # noqa: F401
