"""The method registry: every pruning method is a pure function registered by name.

A method receives a :class:`~tokenprune.context.SelectionContext` for a batch of images and the number of
tokens to keep per image, and returns sorted keep indices ``[I, k]`` or, if it merges tokens, a
:class:`~tokenprune.context.Merged`. It declares what it needs from the adapter (``needs``) and where it
acts: ``stage="vision"`` inside the image encoder, otherwise at a decoder layer (``default_layer``: 0 means
before the language model, the ``pre_llm`` stage; K > 0 means at decoder layer K, the ``llm`` stage).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .context import Merged, SelectionContext
from .positions import POSITIONS

MethodFn = Callable[..., torch.Tensor | Merged]
EncoderLayersFn = Callable[[dict[str, object], int], tuple[int, ...]]

#: What an adapter can collect for a method, besides the visual token features themselves.
KNOWN_NEEDS = (
    "keys",
    "attention",
    "unrotated_logits",
    "instruction_attention",
    "instruction",
    "instruction_rows",
    "final_norm",
    "transition",
    "prompt_positions",
    "encoder_attention",
    "class_token",
)

#: Which queries' attention ``encoder_attention`` averages: ``"cls"`` the CLS query's where the encoder has
#: one (else every query's), ``"all"`` every query's, the CLS query included.
ENCODER_QUERIES = ("cls", "all")


def _output_layer_only(options: dict[str, object], output_layer: int) -> tuple[int, ...]:
    return (output_layer,)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its function, stage, default layer, declared needs and tunable options.

    ``per_layer`` methods (token merging) are called at every encoder layer they merge at, with the
    tokens present there; the others once. ``encoder_layers(options, output_layer)`` names the encoder
    layers whose attention a ``vision`` method needs (``ctx.encoder_attention``; a ``per_layer`` method's
    merge step in layer ``i``, between its attention and its MLP, reads layer ``i``'s), and
    ``encoder_queries`` (one of :data:`ENCODER_QUERIES`) whose attention it is. A ``kv`` method that
    keeps the top-k of each image's ``attention`` declares ``attention_top_k``: its decode hooks then
    select in one kernel where Triton runs (:func:`tokenprune.kernels.retrieval.attention_top_k`), and
    call the method elsewhere.
    A ``variable_count`` method may keep a different number of tokens per image (a prefill method only):
    its rows may be of any width and repeat an index, a repeat keeping nothing more. ``positions`` is the
    position rule its reference follows after dropping tokens in front of or inside the language model
    (one of :data:`tokenprune.positions.POSITIONS`; a vision method's, in a VLM), a config's default.
    """

    name: str
    fn: MethodFn
    default_layer: int
    needs: tuple[str, ...]
    description: str
    options: dict[str, object]
    vision: bool = False
    decode: bool = False
    per_layer: bool = False
    encoder_layers: EncoderLayersFn = _output_layer_only
    encoder_queries: str = "cls"
    attention_top_k: bool = False
    variable_count: bool = False
    positions: str = "original"

    @property
    def stage(self) -> str:
        """``vision`` inside the image encoder, ``kv`` at decode steps; else ``pre_llm`` at layer 0 and
        ``llm`` deeper."""
        if self.vision:
            return "vision"
        return "kv" if self.decode else stage_for_layer(self.default_layer)

    def select(
        self, ctx: SelectionContext, keep: int, options: dict[str, object], check_values: bool = True
    ) -> torch.Tensor | Merged:
        """Run the method and check its contract: indices ``[I, keep]``, alone or in a :class:`Merged` whose
        features and sizes match them; and, if ``check_values``, unique, in range and sorted (a merge's in
        the layout of its choice) (a read of the device: a host sync on a GPU)."""
        result = self.fn(ctx, keep, **options)
        index = result.index if isinstance(result, Merged) else result
        num_images, num_tokens = ctx.features.shape[:2]
        width = index.shape[1] if self.variable_count else keep  # its rows may repeat an index: see below
        if index.shape != (num_images, width):
            raise RuntimeError(
                f"method {self.name!r} returned shape {tuple(index.shape)}, expected {(num_images, keep)}"
            )
        if isinstance(result, Merged) and (
            result.features.shape[:2] != index.shape or result.sizes.shape != index.shape
        ):
            raise RuntimeError(f"method {self.name!r} returned merged features or sizes of the wrong shape")
        if not check_values or torch.compiler.is_compiling():  # no reading the device in a compiled graph
            return result
        # one read of the device for the whole contract (a host sync on a GPU); which part broke, after
        if isinstance(result, Merged):
            index = index.sort(dim=1).values
        later = index[:, 1:]
        in_order = (later >= index[:, :-1] if self.variable_count else later > index[:, :-1]).all()
        in_range = (index[:, 0] >= 0).all() & (index[:, -1] < num_tokens).all()
        if not bool(in_order & in_range):
            if not bool(in_order):
                sorted_ = "" if isinstance(result, Merged) else "sorted, "
                raise RuntimeError(f"method {self.name!r} must return {sorted_}unique indices")
            raise RuntimeError(f"method {self.name!r} returned indices outside [0, {num_tokens})")
        return result


_REGISTRY: dict[str, MethodSpec] = {}


def stage_for_layer(layer: int) -> str:
    """``pre_llm`` when a method acts on the language model's input embeddings, else ``llm``."""
    return "pre_llm" if layer == 0 else "llm"


def register_method(
    name: str,
    *,
    stage: str | None = None,
    default_layer: int = 0,
    needs: tuple[str, ...] = (),
    per_layer: bool = False,
    encoder_layers: EncoderLayersFn = _output_layer_only,
    encoder_queries: str = "cls",
    attention_top_k: bool = False,
    variable_count: bool = False,
    positions: str = "original",
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn(ctx, keep, **options) -> LongTensor[I, keep] | Merged`` under ``name``.

    ``stage="vision"`` registers an image-encoder method (see :class:`MethodSpec` for ``per_layer``,
    ``encoder_layers`` and ``encoder_queries``), ``stage="kv"`` a decode-time method (called at every
    decode step and decoder layer with the cached visual keys and the step's attention to them); otherwise
    the method acts at prefill, at decoder layer ``default_layer``. ``positions`` is its reference's position
    rule in a language model (``"renumbered"`` where the reference counts the kept tokens' positions
    again; ``"original"`` for a ``kv`` method).
    The options are the function's keyword-only parameters; their defaults are the method's defaults.
    The first line of the docstring is the description shown by :func:`tokenprune.list_methods`.
    """
    unknown = set(needs) - set(KNOWN_NEEDS)
    if unknown:
        raise ValueError(f"unknown needs {sorted(unknown)}; known: {KNOWN_NEEDS}")
    if encoder_queries not in ENCODER_QUERIES:
        raise ValueError(f"encoder_queries must be one of {ENCODER_QUERIES}, got {encoder_queries!r}")
    if stage not in (None, "vision", "kv"):
        raise ValueError(
            f"stage must be 'vision', 'kv' or omitted (prefill methods give default_layer), got {stage!r}"
        )

    if attention_top_k and (stage != "kv" or "attention" not in needs):
        raise ValueError('attention_top_k is for stage="kv" methods that need "attention"')
    if positions not in POSITIONS or (positions != "original" and stage == "kv"):
        raise ValueError(f"positions must be one of {POSITIONS}, and 'original' for a kv method")

    def decorator(fn: MethodFn) -> MethodFn:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        params = inspect.signature(fn).parameters.values()
        options = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        description = (inspect.getdoc(fn) or name).splitlines()[0]
        _REGISTRY[name] = MethodSpec(
            name,
            fn,
            default_layer,
            tuple(needs),
            description,
            options,
            vision=stage == "vision",
            decode=stage == "kv",
            per_layer=per_layer,
            encoder_layers=encoder_layers,
            encoder_queries=encoder_queries,
            attention_top_k=attention_top_k,
            variable_count=variable_count,
            positions=positions,
        )
        return fn

    return decorator


def get_method(name: str) -> MethodSpec:
    """The spec registered under ``name``; a ``ValueError`` listing the registered names otherwise."""
    if not isinstance(name, str):
        raise TypeError(
            f"method must be a registered name (str) or a PrunerConfig, got {type(name).__name__}"
        )
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def vision_methods() -> list[str]:
    """Names of the registered ``vision`` methods, sorted: what error messages offer where only they apply."""
    return sorted(name for name, spec in _REGISTRY.items() if spec.vision)


def list_methods() -> dict[str, tuple[str, str]]:
    """Mapping of method name to ``(stage, one-line description)``, sorted by name."""
    return {name: (spec.stage, spec.description) for name, spec in sorted(_REGISTRY.items())}
