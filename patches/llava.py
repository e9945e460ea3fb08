"""LLaVA-1.5 (``LlavaForConditionalGeneration``): prune image tokens before or inside the language model.

Each image becomes a run of ``image_token_id`` placeholders in the prompt, one per patch of the vision
tower (the CLS token is dropped by the default feature strategy). The language model is a Llama-style
decoder, pruned by :class:`~tokenprune.patches.decoder.DecoderPruningHooks`; this module only says where
the images are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .decoder import DecoderPruningHooks


class LlavaAdapter:
    """Adapter for ``model_type == "llava"``."""

    model_types = ("llava",)
    stages = ("pre_llm", "llm")

    def __init__(self, model: nn.Module):
        config = model.config
        self.model = model
        self.base = model if hasattr(model, "language_model") else model.model  # LlavaModel or the LM head
        self.image_token_id = config.image_token_id
        vision = config.vision_config
        patches_per_side = vision.image_size // vision.patch_size
        self.tokens_per_image = patches_per_side**2
        grid: tuple[int, int] | None = (patches_per_side, patches_per_side)
        if config.vision_feature_select_strategy == "full":  # the CLS token is kept among the patches
            self.tokens_per_image += 1
            grid = None
        self.hooks = DecoderPruningHooks(self.base.language_model, self.tokens_per_image, grid)

    @property
    def num_layers(self) -> int:
        return self.hooks.num_layers

    def image_grid(self) -> tuple[int, int] | None:
        """Rows and columns of an image's tokens, for overlays; ``None`` when they are not a grid."""
        return self.hooks.grid

    def attach(self, pruner) -> list[RemovableHandle]:
        handle = self.base.register_forward_pre_hook(self._find_images, with_kwargs=True)
        return [handle, *self.hooks.attach(pruner)]

    def _find_images(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Mark the image placeholders of this call's prompt, for the language-model hooks."""
        input_ids = args[0] if args else kwargs.get("input_ids")
        if input_ids is not None:
            self.hooks.pending_visual = input_ids == self.image_token_id
            return
        embeds = kwargs["inputs_embeds"]
        token = torch.tensor(self.image_token_id, device=embeds.device)
        self.hooks.pending_visual = (embeds == self.base.get_input_embeddings()(token)).all(dim=-1)
