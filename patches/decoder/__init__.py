"""Pruning inside a transformers decoder-only language model, split by job.

Shared by every family whose language model is a Llama-style decoder (``layers``, rotary
``position_embeddings``, a 2-D padding mask); the family module says where the images are. How one
``generate`` flows through these modules: ``docs/architecture.md``.

* :mod:`.hooks`: the hooks that attach to the language model and hand each call on.
* :mod:`.layout`: one call's state, and where its images, prompts and instructions are.
* :mod:`.stages`: the stage loop: kept counts, selection, compaction of the batch.
* :mod:`.needs`: what a method needs from a layer, one provider per need name.
* :mod:`.renumbering`: positions that close up over the kept tokens (``positions="renumbered"``).
* :mod:`.session`: the pruned cache's record, decode-step masks and positions, ``generate``'s masks.
* :mod:`.labels`: the generation head's loss over the rows that come back.
"""

from .hooks import DecoderPruningHooks, LanguageModelHooks
from .stages import check_layer, size_following_stages

__all__ = ["DecoderPruningHooks", "LanguageModelHooks", "check_layer", "size_following_stages"]
