"""The method registry: every pruning method is a pure function registered by name.

A method receives a :class:`~tokenprune.context.SelectionContext` for a batch of images and the number of
tokens to keep per image, and returns sorted keep indices ``[I, k]`` or, if it merges tokens, a
:class:`~tokenprune.context.Merged`. It declares what it needs from the adapter (``needs``) and where it
acts: ``stage="vision"`` inside the image encoder, otherwise at a decoder layer (``default_layer``: 0 means
before the language model, the ``pre_llm`` stage; K > 0 means at decoder layer K, the ``llm`` stage).
"""

from __future__ import annotations

import importlib
import inspect
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .context import Merged, SelectionContext
from .positions import POSITIONS

MethodFn = Callable[..., torch.Tensor | Merged]
EncoderLayersFn = Callable[[dict[str, object], int], tuple[int, ...]]
#: ``(N, the last stage's count) -> each stage's count`` of a pyramid method whose reference sets its own.
StageCountsFn = Callable[[int, int], tuple[int, ...]]

#: What an adapter can collect for a method, besides the visual token features themselves.
KNOWN_NEEDS = (
    "keys",
    "attention",
    "pruning_layer_attention",
    "unrotated_logits",
    "instruction_attention",
    "instruction",
    "instruction_rows",
    "final_norm",
    "transition",
    "prompt_positions",
    "embeddings",
    "encoder_attention",
    "class_token",
)

#: Which queries' attention ``encoder_attention`` averages: ``"cls"`` the CLS query's where the encoder has
#: one (else every query's), ``"all"`` every query's, the CLS query included.
ENCODER_QUERIES = ("cls", "all")


#: The annotations a method option may have (each may add ``| None``), and how messages word each.
OPTION_TYPES: dict[type, str] = {bool: "a bool", int: "an int", float: "a finite number", str: "a string"}

#: A bound of an option's range: a number, the name of another option of the method (its value), or none.
Bound = float | str | None


def _output_layer_only(options: dict[str, object], output_layer: int) -> tuple[int, ...]:
    return (output_layer,)


@dataclass(frozen=True)
class MethodOption:
    """One keyword-only option of a method: its default, its type and whether it takes ``None`` (both read
    from the function's annotation), and the closed range ``[low, high]`` declared for it at registration
    (a bound naming another option is that option's value; ``None`` is no bound)."""

    name: str
    default: object
    type: type
    optional: bool = False
    low: Bound = None
    high: Bound = None

    def accepts(self) -> str:
        """What the option accepts, in the words of error messages and docs: ``"an int >= 1"``, ``"a number
        in [0, 1]"``, ``"an int >= 0, or None"``..."""
        kind = OPTION_TYPES[self.type]
        if self.low is not None and self.high is not None:
            kind += f" in [{self.low}, {self.high}]"
        elif self.low is not None:
            kind += f" >= {self.low}"
        elif self.high is not None:
            kind += f" <= {self.high}"
        return f"{kind}, or None" if self.optional else kind

    def check(self, value: object, values: Mapping[str, object], method: str) -> None:
        """``TypeError`` unless ``value`` is of the option's type, ``ValueError`` unless it lies in its range
        (``values``: every option's value, for a bound that names another option); the message names the
        option and what it accepts."""
        if value is None and self.optional:
            return
        if self.type is float:
            right_type = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            right_type = isinstance(value, self.type) and (self.type is bool or not isinstance(value, bool))
        if not right_type:
            kind = type(value).__name__
            raise TypeError(f"{method} option {self.name} must be {self.accepts()}, got {value!r} ({kind})")
        if self.type not in (int, float):
            return
        low, high = (values.get(b) if isinstance(b, str) else b for b in (self.low, self.high))
        infinite = self.type is float and not math.isfinite(value)
        if infinite or (low is not None and value < low) or (high is not None and value > high):
            named = [f"{b}={values.get(b)!r}" for b in (self.low, self.high) if isinstance(b, str)]
            where = f" with {', '.join(named)}" if named else ""
            raise ValueError(f"{method} option {self.name} must be {self.accepts()}, got {value!r}{where}")


def _declared_options(
    name: str, fn: MethodFn, ranges: Mapping[str, tuple[Bound, Bound]]
) -> tuple[MethodOption, ...]:
    """The options of method ``fn``: its keyword-only parameters, typed by their annotations (``int``,
    ``float``, ``bool``, ``str``, each optionally ``| None``) and ranged by ``ranges``; ``TypeError`` or
    ``ValueError`` at registration for an option without such an annotation, a range for no numeric option,
    or a default the declaration refuses, so that every option can be checked when a config is built."""
    params = [
        p for p in inspect.signature(fn).parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    hints = typing.get_type_hints(fn)
    unknown = set(ranges) - {p.name for p in params}
    if unknown:
        raise ValueError(f"method {name!r}: ranges given for {sorted(unknown)}, which are not its options")
    options = []
    for param in params:
        hint = hints.get(param.name)
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
        kind = next((a for a in args if a is not type(None)), None) if optional and len(args) == 2 else hint
        if kind not in OPTION_TYPES:
            raise TypeError(
                f"method {name!r}: option {param.name} must be annotated int, float, bool or str (or one "
                f"of them | None), got {hint!r}"
            )
        low, high = ranges.get(param.name, (None, None))
        if (low is not None or high is not None) and kind not in (int, float):
            raise TypeError(f"method {name!r}: option {param.name} is not a number, it takes no range")
        options.append(MethodOption(param.name, param.default, kind, optional, low, high))
    defaults = {option.name: option.default for option in options}
    for option in options:
        option.check(option.default, defaults, name)
    return tuple(options)


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
    call the method elsewhere. A ``kv`` method's ``default_layer`` K >= 1 selects once per decode step, in
    layer K - 1 by its attention, for layers K onward (0: each layer selects by its own).
    A ``variable_count`` method may keep a different number of tokens per image (a prefill method only):
    its rows may be of any width and repeat an index, a repeat keeping nothing more. ``declared`` are its
    options (:class:`MethodOption`), which :meth:`check_options` checks. ``positions`` is the position rule
    its reference follows after dropping tokens in front of or inside the language model (one of
    :data:`tokenprune.positions.POSITIONS`; a vision method's, in a VLM), a config's default. A ``pyramid``
    method prunes, without a schedule, at that many layers, or at the layers its tuple names on a 32-layer
    language model, scaled to the model's (see :meth:`PrunerConfig.stage_layers
    <tokenprune.config.PrunerConfig.stage_layers>`); ``stage_counts``, where given, are its stages' counts.
    A ``projected`` vision method chooses among the tokens the model's projector outputs, as its reference
    prunes after the projector: a VLM whose vision stage otherwise chooses before its projector (LLaVA)
    projects every patch first. A vision method with a ``decoder_stage`` (the name of a prefill decoder
    method) is, in a model with a language model, the first of two stages, as its reference prunes again
    inside the language model: the vision stage keeps ``encoder_factor`` times the config's
    ``keep_ratio``/``budget`` (every token at most), and the decoder method the config's count, at its
    default layer (see :func:`tokenprune.config.with_decoder_stage`).
    """

    name: str
    fn: MethodFn
    default_layer: int
    needs: tuple[str, ...]
    description: str
    declared: tuple[MethodOption, ...]
    vision: bool = False
    decode: bool = False
    per_layer: bool = False
    encoder_layers: EncoderLayersFn = _output_layer_only
    encoder_queries: str = "cls"
    attention_top_k: bool = False
    variable_count: bool = False
    positions: str = "original"
    pyramid: int | tuple[int, ...] = 0
    stage_counts: StageCountsFn | None = None
    projected: bool = False
    decoder_stage: str | None = None
    encoder_factor: int = 1

    @property
    def options(self) -> dict[str, object]:
        """Each option's default, by name."""
        return {option.name: option.default for option in self.declared}

    def check_options(self, options: Mapping[str, object]) -> None:
        """``ValueError`` for an option the method does not have, and ``TypeError``/``ValueError`` for a value
        of the wrong type or outside its declared range, each naming the option and what it accepts: run when
        a config is built, so that a bad option fails before the model is touched, not inside a forward."""
        unknown = set(options) - set(self.options)
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for method {self.name!r}; its options: {known}"
            )
        values = {**self.options, **options}
        for option in self.declared:
            if option.name in options:
                option.check(options[option.name], values, self.name)

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


_built_ins_imported = False


def _registry() -> dict[str, MethodSpec]:
    """The registered methods, the built-in ones imported (registering themselves) on the first call, so
    that a lookup finds them whichever module of tokenprune was imported first, and a user's method that
    takes a built-in name is refused when it is registered. Later calls import nothing: a compiled decode
    step looks methods up too, and ``torch.compile`` cannot trace an import."""
    global _built_ins_imported
    if not _built_ins_imported:
        _built_ins_imported = True  # set first: the methods call back here while they register
        try:
            importlib.import_module("tokenprune.methods")
        except BaseException:
            _built_ins_imported = False
            raise
    return _REGISTRY


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
    ranges: Mapping[str, tuple[Bound, Bound]] | None = None,
    positions: str = "original",
    pyramid: int | tuple[int, ...] = 0,
    stage_counts: StageCountsFn | None = None,
    projected: bool = False,
    decoder_stage: str | None = None,
    encoder_factor: int = 1,
) -> Callable[[MethodFn], MethodFn]:
    """Register ``fn(ctx, keep, **options) -> LongTensor[I, keep] | Merged`` under ``name``.

    ``stage="vision"`` registers an image-encoder method (see :class:`MethodSpec` for ``per_layer``,
    ``encoder_layers`` and ``encoder_queries``), ``stage="kv"`` a decode-time method (called at every
    decode step and decoder layer with the cached visual keys and the step's attention to them; with
    ``default_layer`` K >= 1, once per step, in layer K - 1, whose choice layers K onward attend to, layers
    before K attending to every entry: a config's ``layer`` moves K); otherwise
    the method acts at prefill, at decoder layer ``default_layer``. ``positions`` is its reference's position
    rule in a language model (``"renumbered"`` where the reference counts the kept tokens' positions
    again; ``"original"`` for a ``kv`` method). A prefill method with ``pyramid=S`` prunes, where a config
    gives no schedule, at ``S`` layers evenly spaced from ``default_layer`` (or the config's ``layer``), each
    stage keeping the same share of the tokens the one before kept, down to ``keep_ratio``/``budget``
    (PyramidDrop's rule; :class:`~tokenprune.config.PrunerConfig` spaces them over the model's depth);
    with ``pyramid=(l1, l2, ...)``, at its reference's layers of a 32-layer language model (``l1`` the
    ``default_layer``), scaled to the model's depth, and ``stage_counts(N, kept)`` gives each stage's count
    of an image's ``N`` tokens, the last keeping ``kept`` (its reference's table of counts).
    ``projected=True`` marks a vision method (not ``per_layer``) that chooses among projected tokens (see
    :class:`MethodSpec`). ``decoder_stage`` names the prefill decoder method that a vision method's reference
    runs after it, in a model with a language model; the vision stage then keeps ``encoder_factor`` times
    the tokens that method keeps (see :class:`MethodSpec`).
    The options are the function's keyword-only parameters; their defaults are the method's defaults, and
    their annotations (``int``, ``float``, ``bool``, ``str``, each optionally ``| None``) the types they take.
    ``ranges`` maps a numeric option to the closed range ``(low, high)`` it takes, ``None`` for no bound or
    another option's name for that option's value, e.g. ``{"pivots": (1, None), "text_pivots": (0,
    "pivots")}``. :meth:`MethodSpec.check_options` checks given options against both when a config is built.
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

    if attention_top_k and (stage != "kv" or "attention" not in needs or default_layer != 0):
        raise ValueError('attention_top_k is for stage="kv" methods that need "attention", in every layer')
    if default_layer < 0:
        raise ValueError(f"default_layer must be >= 0, got {default_layer}")
    if positions not in POSITIONS or (positions != "original" and stage == "kv"):
        raise ValueError(f"positions must be one of {POSITIONS}, and 'original' for a kv method")
    if isinstance(pyramid, tuple):
        if list(pyramid) != sorted(set(pyramid)) or pyramid[:1] != (default_layer,):
            raise ValueError("pyramid layers must increase strictly, from default_layer")
    elif pyramid < 0:
        raise ValueError("pyramid (a number of stages, or the stages' layers) must not be negative")
    if pyramid and (stage is not None or default_layer < 1):
        raise ValueError("pyramid is for prefill methods acting at a layer >= 1")
    if stage_counts is not None and not pyramid:
        raise ValueError("stage_counts are the counts of a pyramid method's stages")
    if projected and (stage != "vision" or per_layer):
        raise ValueError("projected is for vision methods that choose once, after the encoder, not per_layer")
    if encoder_factor < 1 or (stage != "vision" and (decoder_stage is not None or encoder_factor != 1)):
        raise ValueError("decoder_stage and encoder_factor (>= 1) are for vision methods")

    def decorator(fn: MethodFn) -> MethodFn:
        if name in _registry():
            raise ValueError(f"method {name!r} is already registered")
        options = _declared_options(name, fn, ranges or {})
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
            pyramid=pyramid,
            stage_counts=stage_counts,
            projected=projected,
            decoder_stage=decoder_stage,
            encoder_factor=encoder_factor,
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
        return _registry()[name]
    except KeyError:
        raise ValueError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_registry()))}"
        ) from None


def vision_methods() -> list[str]:
    """Names of the registered ``vision`` methods, sorted: what error messages offer where only they apply."""
    return sorted(name for name, spec in _registry().items() if spec.vision)


def list_methods() -> dict[str, tuple[str, str]]:
    """Mapping of method name to ``(stage, one-line description)``, sorted by name."""
    return {name: (spec.stage, spec.description) for name, spec in sorted(_registry().items())}
