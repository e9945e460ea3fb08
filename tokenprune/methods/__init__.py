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
    holov,
    idpruner,
    pdrop,
    saint,
    scope,
    sparsevila,
    tome,
    transprune,
    turbo,
    visionzip,
    vispruner,
    vscan,
)
