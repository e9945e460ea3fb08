"""``PrunerConfig``: what to prune, how much, and where; validated before any model work."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .positions import POSITIONS
from .registry import MethodSpec, get_method, stage_for_layer, vision_methods

#: Values of :attr:`PrunerConfig.media`.
MEDIA = ("images", "videos", "both")
#: Values of :attr:`PrunerConfig.checks`.
CHECKS = ("first", "every")
#: Layers of the language model whose layers a method's reference names (LLaVA-1.5-7B's): a pyramid given
#: as layers is scaled from it to a model's depth.
REFERENCE_DEPTH = 32


@dataclass(frozen=True)
class PrunerConfig:
    """A pruning request.

    Attributes:
        method: a registered method name (see :func:`tokenprune.list_methods`).
        keep_ratio: fraction of each image's visual tokens kept, in (0, 1]; kept count per image is
            ``max(1, round(keep_ratio * N))``. Exactly one of ``keep_ratio`` and ``budget`` is given.
        budget: visual tokens kept per image, >= 1.
        layer: decoder layer at which the method acts; 0 is before the language model. ``None`` takes the
            method's default (2 for ``fastv`` and ``dart``, 0 for the others). A pyramid method (``pdrop``)
            prunes at ``layer``, ``2 * layer``... (see :attr:`stage_layers`), by default spaced evenly over
            the depth; ``sparsevlm`` at its reference's layers, scaled to the first being ``layer``.
        options: method-specific options (keyword-only parameters of the method function), checked here
            against the method's declaration (type and range; see ``docs/methods.md``).
        schedule: prune at several layers instead of one, as ``((layer, keep_ratio), ...)`` with layers
            increasing and ratios (of each image's original tokens) not increasing, e.g.
            ``((2, 0.5), (8, 0.25), (16, 0.125))``; each stage selects among the tokens still kept.
            Replaces ``keep_ratio``/``budget``/``layer``.
        drop_early_kv: for a method acting at layer K > 0, also drop the pruned tokens' KV entries from
            layers 0..K-1 once prefill is done, so every layer's cache holds only the kept tokens and
            decode memory and time fall with the kept fraction. Decode steps then attend to the kept
            tokens in every layer; the prompt itself is computed as without the option.
        positions: the position ids of the tokens after a stage that drops tokens in front of the language
            model or inside it: ``"original"`` keeps each token's position in the unpruned prompt;
            ``"renumbered"`` closes the gaps the dropped tokens leave, so that the kept tokens follow one
            another, in those layers and at later decode steps (see :mod:`tokenprune.positions` for the
            rule, Qwen-VL's multimodal positions included). ``None`` (the default) takes the method's
            reference's rule (:attr:`position_rule`): ``"renumbered"`` for ``transprune``, ``adaptinfer``,
            ``pdrop``, ``sparsevlm``, ``vscan_llm``, ``divprune``, ``cdpruner`` and the vision methods (in a
            VLM), whose references count the kept tokens' positions again or hand the language model fewer
            features, ``"original"`` for the others; composed with ``vision=``, this config's method's, for
            both stages. Original positions keep an object's place for the questions that ask for it (GAP's
            finding; docs/performance.md measures it).
        vision: a ``vision``-stage config run first, inside the image encoder, e.g.
            ``PrunerConfig("fastv", keep_ratio=0.125, vision=PrunerConfig("tome", keep_ratio=0.5))``;
            this config's method then chooses among the tokens the encoder kept, its ratio or budget
            still counting the image's original tokens. A vision method whose reference prunes again in the
            language model (``vscan``) brings that stage itself in a VLM (:func:`with_decoder_stage`).
        checks: when the checks that read the device run, each a host sync on a GPU: ``"first"`` (the
            default) at the pruner's first forward only (the method's answer: sorted, unique, in range; the
            prompts: whole images in each row, where the batch's shapes cannot tell; a vision stage's
            features), so that later forwards read nothing the model does not; ``"every"`` at every
            forward, to debug a new method or new inputs.
        depth: the language model's layers, which :meth:`for_depth` sets where the stages follow it
            (``sparsevlm``'s, at its reference's layers scaled to the depth; ``None``: 32, the reference's).
        per_frame: ``budget`` counts the tokens kept per frame of a video (a video of ``F`` frames keeps
            ``F * budget``; an image is one frame; a Qwen-VL video's frame is one temporal patch), not per
            video.
        images_as_frames: each prompt's images are the frames of one video, in order (a video handed to an
            image model as frames): the stages choose among all of them at once, as one item whose
            ``frames`` are the images (``keep_ratio`` or ``budget`` per prompt, ``budget`` per image with
            ``per_frame``). For decoder and ``kv`` methods and vision methods that choose among projected
            tokens (LLaVA-1.5's); a prompt's images must be of one size.

    A ``vision`` method (``tome``, ``hiprune``, ``visionzip``) counts patches, without the CLS token;
    ``tome`` also takes ``r`` (tokens merged per layer) instead of ``keep_ratio``/``budget``.
    ``media`` says what is pruned in a family that takes videos (Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
    LLaVA-OneVision): ``"images"``, ``"videos"`` or ``"both"`` (the default); each video counts as one visual
    item, like an image (its ``keep_ratio`` or ``budget``, or ``budget`` per frame with ``per_frame``). A
    ``kv`` method (``sparsevila``) keeps every token at prefill; its ratio or budget is the visual tokens of
    each image that every decode step attends to, in each layer (``dycoke_kv``: in each layer from
    ``layer`` on, its default 3, the layers before attending to all).
    """

    method: str
    keep_ratio: float | None = None
    budget: int | None = None
    layer: int | None = None
    options: dict[str, object] = field(default_factory=dict)
    schedule: tuple[tuple[int, float], ...] | None = None
    drop_early_kv: bool = False
    vision: PrunerConfig | None = None
    media: str = "both"
    positions: str | None = None
    checks: str = "first"
    depth: int | None = None
    per_frame: bool = False
    images_as_frames: bool = False
    #: set by :func:`with_decoder_stage`: a ``budget`` larger than an image keeps it whole, not an error
    budget_capped: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        spec = get_method(self.method)
        if self.checks not in CHECKS:
            raise ValueError(f"checks must be one of {CHECKS} (when to check contracts), got {self.checks!r}")
        if self.media not in MEDIA:
            raise ValueError(f"media must be one of {MEDIA} (what is pruned), got {self.media!r}")
        if self.positions is not None and self.positions not in POSITIONS:
            raise ValueError(
                f"positions must be one of {POSITIONS} (of the tokens after pruning), got {self.positions!r}"
            )
        spec.check_options(self.options)  # a bad option fails here, not inside a forward
        merges_by_r = spec.per_layer and self.options.get("r") is not None
        if spec.vision and (self.schedule is not None or self.layer is not None or self.drop_early_kv):
            raise ValueError(
                f"{self.method!r} acts inside the image encoder: layer, schedule and drop_early_kv do not "
                "apply (compose it with a decoder method through vision=)"
            )
        if spec.decode:
            _check_kv(self)
        if self.schedule is not None:
            if self.keep_ratio is not None or self.budget is not None or self.layer is not None:
                raise ValueError("a schedule replaces keep_ratio, budget and layer: give only the schedule")
            _check_schedule(self.schedule)
        elif merges_by_r:
            if self.keep_ratio is not None or self.budget is not None:
                raise ValueError("give r (tokens merged per layer) or keep_ratio/budget, not both")
        elif (self.keep_ratio is None) == (self.budget is None):
            raise ValueError(
                "give exactly one of keep_ratio (fraction of visual tokens kept) or budget "
                "(visual tokens kept per image)"
            )
        _check_numbers(self)
        if self.vision is not None:
            self._check_vision()

    def _check_vision(self) -> None:
        if not isinstance(self.vision, PrunerConfig):
            raise TypeError(
                f"vision must be a PrunerConfig of a vision method, got {type(self.vision).__name__}"
            )
        if not self.vision.spec.vision:
            raise ValueError(
                f"vision= takes a vision method ({', '.join(vision_methods())}), not {self.vision.method!r}"
            )
        if self.spec.vision:
            raise ValueError("compose a vision method with a decoder method, not with another vision method")
        first = self.schedule[0][0] if self.schedule is not None else self.acting_layer
        if first == 0:
            raise ValueError(
                f"after a vision method, {self.method!r} must act at decoder layer >= 1 (the encoder already "
                "chose the tokens entering the language model)"
            )

    def describe(self) -> str:
        """This config in words, for a banner or a log line (a repr is for debugging): e.g. ``"dart: 25% of
        each image's visual tokens kept from decoder layer 2 (pivots=4)"``."""
        if self.schedule is not None:
            stages = ", then ".join(f"{_percent(ratio)} from layer {layer}" for layer, ratio in self.schedule)
            text = f"{self.method}: {stages} of each image's visual tokens kept"
        elif self.pyramid and len(self.stage_layers) > 1:
            amount = f"{self.budget} visual tokens" if self.budget is not None else _percent(self.keep_ratio)
            layers = ", ".join(str(layer) for layer in self.stage_layers)
            text = (
                f"{self.method}: a pyramid down to {amount} of each image's visual tokens at layers {layers}"
            )
        elif self.spec.per_layer and self.options.get("r") is not None:
            text = f"{self.method}: {self.options['r']} tokens merged before each encoder layer"
        else:
            where = {
                "vision": "kept inside the image encoder",
                "kv": "attended to at each decode step"
                + (f" from decoder layer {self.acting_layer}" if self.spec.default_layer else ""),
                "pre_llm": "kept before the language model",
                "llm": f"kept from decoder layer {self.acting_layer}",
            }[self.stage]
            if self.budget is not None:
                per = "frame of a video or image" if self.per_frame else "image"
                text = f"{self.method}: {self.budget} visual tokens per {per} {where}"
            else:
                text = f"{self.method}: {_percent(self.keep_ratio)} of each image's visual tokens {where}"
        extras = [f"{name}={value!r}" for name, value in self.options.items() if name != "r"]
        extras += ["KV of early layers dropped"] if self.drop_early_kv else []
        extras += ["positions renumbered"] if self.position_rule == "renumbered" else []
        extras += [f"{self.media} only"] if self.media != "both" else []
        extras += ["each prompt's images the frames of one video"] if self.images_as_frames else []
        text += f" ({', '.join(extras)})" if extras else ""
        if self.vision is None:
            return text
        # a composition runs under this config's position rule, not its vision stage's own
        return f"{replace(self.vision, positions='original').describe()}; then {text}"

    def stages(self, num_tokens: int, frames: int = 1) -> list[tuple[int, int]]:
        """``(layer, visual tokens kept per image)`` of each pruning stage, for images (or videos of
        ``frames`` frames) of ``num_tokens``.

        A pyramid's stage ``s`` of ``S`` keeps ``max(1, round(N * share ** (s / S)))`` of an image's ``N``
        tokens, ``share`` being ``keep_ratio`` (or ``budget / N``), so that each stage keeps the same share
        of the tokens the one before kept and the last keeps ``keep_ratio``/``budget``; a method that
        registered ``stage_counts`` keeps its counts (the last: ``keep_ratio``/``budget``)."""
        if self.schedule is not None:
            return [(layer, max(1, round(ratio * num_tokens))) for layer, ratio in self.schedule]
        kept = self.kept_per_image(num_tokens, frames)
        if not self.pyramid:
            return [(self.acting_layer, kept)]
        if self.spec.stage_counts is not None:
            return list(zip(self.stage_layers, self.spec.stage_counts(num_tokens, kept), strict=True))
        share = kept / num_tokens if self.keep_ratio is None else self.keep_ratio
        steps = len(self.stage_layers)
        counts = [max(1, round(num_tokens * share ** (s / steps))) for s in range(1, steps)]
        return list(zip(self.stage_layers, [*counts, kept], strict=True))

    def stage_ratio(self, stage: int) -> float | None:
        """The keep ratio (of each image's original tokens) of pruning stage ``stage``; ``None`` for a
        ``budget``."""
        if self.schedule is not None:
            return self.schedule[stage][1]
        if self.keep_ratio is None or not self.pyramid:
            return self.keep_ratio
        stages = len(self.stage_layers)
        if self.spec.stage_counts is not None:  # counts that are no one share of every image's tokens
            return self.keep_ratio if stage == stages - 1 else None
        return self.keep_ratio ** ((stage + 1) / stages)

    @property
    def pyramid(self) -> bool:
        """Whether the method's pyramid sets the stages: a pyramid method without a schedule."""
        return bool(self.spec.pyramid) and self.schedule is None

    @property
    def stage_layers(self) -> list[int]:
        """The decoder layer of each pruning stage: the schedule's; for a pyramid of ``S`` stages
        (PyramidDrop's 3), ``layer``, ``2 * layer`` ... ``S * layer``; for a pyramid of layers (SparseVLM's
        3, 7 and 16 of 32), those scaled by ``layer / l1`` or, without a ``layer``, by ``depth / 32``,
        rounded, each at least one after the one before (1, 2 and 3 of 4); else the acting layer alone."""
        if self.schedule is not None:
            return [layer for layer, _ in self.schedule]
        pyramid = self.spec.pyramid
        if isinstance(pyramid, tuple):
            depth = self.depth or REFERENCE_DEPTH
            return _scaled_layers(
                pyramid, depth / REFERENCE_DEPTH if self.layer is None else self.layer / pyramid[0]
            )
        return [self.acting_layer * s for s in range(1, pyramid + 1)] or [self.acting_layer]

    @property
    def last_layer(self) -> int:
        """The deepest layer at which tokens are dropped."""
        return self.stage_layers[-1]

    def for_depth(self, num_layers: int) -> PrunerConfig:
        """This config on a language model of ``num_layers`` layers: for a pyramid without a ``layer``, its
        ``S`` stages spaced evenly over the depth, ``layer = max(1, num_layers // (S + 1))`` (PyramidDrop's
        8, 16 and 24 of LLaVA-1.5-7B's 32 layers; 1, 2 and 3 of 4; one stage: the middle layer), or its
        reference's layers scaled to the depth (see :attr:`stage_layers`); for a vision method with a
        ``decoder_stage``, both stages (:func:`with_decoder_stage`); itself otherwise."""
        if self.spec.decoder_stage is not None and num_layers > 0:
            return with_decoder_stage(self).for_depth(num_layers)
        if not self.pyramid or self.layer is not None:
            return self
        if isinstance(self.spec.pyramid, tuple):
            return replace(self, depth=num_layers)
        return replace(self, layer=max(1, num_layers // (self.spec.pyramid + 1)))

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    @property
    def position_rule(self) -> str:
        """The position rule the language model's layers get: ``positions``, or where it is ``None`` the
        method's reference's (:attr:`MethodSpec.positions`)."""
        return self.spec.positions if self.positions is None else self.positions

    @property
    def acting_layer(self) -> int:
        """The decoder layer the method acts at: ``layer`` or the method's default."""
        if self.schedule is not None or isinstance(self.spec.pyramid, tuple):
            return self.stage_layers[0]
        return self.spec.default_layer if self.layer is None else self.layer

    @property
    def stage(self) -> str:
        """``vision``, ``pre_llm``, ``llm`` or ``kv``: where this config's own method acts."""
        spec = self.spec
        return spec.stage if spec.vision or spec.decode else stage_for_layer(self.acting_layer)

    @property
    def vision_stage(self) -> PrunerConfig | None:
        """The config of the image-encoder stage, if any: this one or the composed ``vision``."""
        return self if self.spec.vision else self.vision

    def kept_per_image(self, num_tokens: int, frames: int = 1) -> int:
        """Visual tokens kept for an image (or a video of ``frames`` frames) of ``num_tokens``; ``ValueError``
        if the budget exceeds it."""
        if self.budget is not None:
            budget = self.budget * frames if self.per_frame else self.budget
            if budget > num_tokens and not self.budget_capped:
                per, tokens = ("frame", num_tokens // frames) if self.per_frame else ("image", num_tokens)
                raise ValueError(f"budget={self.budget} is larger than the {tokens} visual tokens per {per}")
            return min(budget, num_tokens)
        return max(1, round(self.keep_ratio * num_tokens))


def _check_numbers(config: PrunerConfig) -> None:
    """``TypeError``/``ValueError`` for a ``config`` whose amounts, layers or flags are out of their range."""
    if config.keep_ratio is not None:
        if isinstance(config.keep_ratio, bool) or not isinstance(config.keep_ratio, (int, float)):
            raise TypeError(f"keep_ratio must be a number in (0, 1], got {config.keep_ratio!r}")
        if not 0.0 < config.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {config.keep_ratio}")
    if config.budget is not None:
        if isinstance(config.budget, bool) or not isinstance(config.budget, int):
            raise TypeError(f"budget must be an int >= 1, got {config.budget!r}")
        if config.budget < 1:
            raise ValueError(f"budget must be >= 1 visual token per image, got {config.budget}")
    if config.layer is not None and (isinstance(config.layer, bool) or not isinstance(config.layer, int)):
        raise TypeError(f"layer must be an int, got {config.layer!r}")
    if config.layer is not None and config.layer < 0:
        raise ValueError(f"layer must be >= 0 (0 prunes before the language model), got {config.layer}")
    if config.spec.pyramid and config.layer == 0:
        raise ValueError(
            f"{config.method!r} prunes at layer, 2 * layer...: layer must be >= 1 (or give a schedule)"
        )
    if "transition" in config.spec.needs and config.acting_layer == 0:
        raise ValueError(
            f"method {config.method!r} scores how decoder layers change tokens: it needs layer >= 1, not 0"
        )
    if config.depth is not None and (type(config.depth) is not int or config.depth < 1):
        raise ValueError(f"depth must be an int >= 1 (the language model's layers), got {config.depth!r}")
    if not isinstance(config.drop_early_kv, bool):
        raise TypeError(f"drop_early_kv must be a bool, got {config.drop_early_kv!r}")
    if not isinstance(config.per_frame, bool):
        raise TypeError(f"per_frame must be a bool, got {config.per_frame!r}")
    if not isinstance(config.images_as_frames, bool):
        raise TypeError(f"images_as_frames must be a bool, got {config.images_as_frames!r}")
    vision = config.vision_stage
    if config.images_as_frames and vision is not None and not vision.spec.projected:
        raise ValueError(
            f"{vision.method!r} chooses inside the image encoder, image by image: images_as_frames needs a "
            "method that chooses among projected tokens (evs, dycoke, vidcom2...) or in the language model"
        )
    if config.per_frame and config.budget is None:
        raise ValueError("per_frame counts a budget per frame of a video: give budget, not keep_ratio")


def _check_kv(config: PrunerConfig) -> None:
    """``ValueError`` for what a ``kv`` method's config cannot take: a schedule, ``drop_early_kv``, a vision
    stage, renumbered positions, and a layer, unless the method hides entries from a layer on (a
    ``default_layer`` >= 1), where it must be >= 1."""
    layered = config.spec.default_layer > 0
    if (
        config.schedule is not None
        or (config.layer is not None and not layered)
        or config.drop_early_kv
        or config.vision is not None
        or config.positions not in (None, "original")
    ):
        where = "from a decoder layer" if layered else "in every layer"
        raise ValueError(
            f"{config.method!r} acts at decode steps, {where}, on the unpruned cache: "
            f"{'' if layered else 'layer, '}schedule, drop_early_kv, vision and positions do not apply"
        )
    if layered and config.layer == 0:
        raise ValueError(
            f"{config.method!r} hides visual entries from layer on, chosen in the layer before: layer "
            "must be >= 1"
        )


def _check_schedule(schedule: tuple[tuple[int, float], ...]) -> None:
    """``TypeError``/``ValueError`` unless ``schedule`` is a nonempty sequence of ``(layer, keep_ratio)``
    stages, layers increasing and ratios not."""
    stages = list(schedule)
    if not stages:
        raise ValueError("schedule must list at least one (layer, keep_ratio) stage")
    for stage in stages:
        if not (isinstance(stage, (tuple, list)) and len(stage) == 2):
            raise TypeError(f"each schedule stage must be a (layer, keep_ratio) pair, got {stage!r}")
        layer, ratio = stage
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise ValueError(f"schedule layers must be ints >= 0, got {layer!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
            raise ValueError(f"schedule keep ratios must be in (0, 1], got {ratio!r}")
    layers = [layer for layer, _ in stages]
    ratios = [ratio for _, ratio in stages]
    if layers != sorted(set(layers)):
        raise ValueError(f"schedule layers must be strictly increasing, got {layers}")
    if ratios != sorted(ratios, reverse=True):
        raise ValueError(f"schedule keep ratios must not increase from one stage to the next, got {ratios}")


def _scaled_layers(reference: tuple[int, ...], scale: float) -> list[int]:
    """The layers ``reference`` times ``scale``, rounded, each at least 1 and one after the one before."""
    layers: list[int] = []
    for layer in reference:
        layers.append(max(round(layer * scale), layers[-1] + 1 if layers else 1))
    return layers


def with_decoder_stage(config: PrunerConfig) -> PrunerConfig:
    """A vision method's ``config`` composed with the decoder stage its reference runs after it (its
    ``decoder_stage``, e.g. VScan's middle-layer pruning), as a model with a language model runs it: that
    method keeps the config's ``keep_ratio``/``budget`` at its default layer, after this vision stage keeping
    ``encoder_factor`` times as many (every token at most: ``keep_ratio=1.0`` keeps all in both, and a budget
    whose multiple exceeds an image keeps all of it in the encoder), under the config's ``media``,
    ``positions`` and ``checks``. ``ValueError`` for a method without one."""
    spec = config.spec
    if spec.decoder_stage is None:
        raise ValueError(f"{config.method!r} names no decoder stage to run after it")
    factor = spec.encoder_factor
    if config.budget is not None:
        vision = replace(config, budget=config.budget * factor)
        object.__setattr__(vision, "budget_capped", True)  # not an argument (init=False): set here
    else:
        vision = replace(config, keep_ratio=min(1.0, config.keep_ratio * factor))
    return PrunerConfig(
        spec.decoder_stage,
        keep_ratio=config.keep_ratio,
        budget=config.budget,
        vision=vision,
        media=config.media,
        positions=config.positions,
        checks=config.checks,
        per_frame=config.per_frame,
        images_as_frames=config.images_as_frames,
    )


def _percent(ratio: float) -> str:
    """``ratio`` as a percentage of three significant digits at most: ``0.111`` is ``"11.1%"``."""
    return f"{ratio * 100:.3g}%"
