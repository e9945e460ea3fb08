"""Built-in methods: pure tensor functions, registered by name on import."""

from . import baselines, fastv  # noqa: F401
