"""Built-in methods: pure tensor functions, registered by name on import."""

from . import (  # noqa: F401
    adaptinfer,
    baselines,
    cdpruner,
    dart,
    divprune,
    fastv,
    feather,
    hiprune,
    idpruner,
    pdrop,
    saint,
    sparsevila,
    tome,
    transprune,
    turbo,
    visionzip,
    vispruner,
)
