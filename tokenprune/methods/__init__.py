"""Built-in methods: pure tensor functions, registered by name on import."""

from . import baselines, dart, divprune, fastv, feather, hiprune, idpruner, tome, transprune, visionzip  # noqa: F401
