"""Built-in methods: pure tensor functions, registered by name on import."""

from . import baselines, dart, divprune, fastv, feather, idpruner, transprune  # noqa: F401
