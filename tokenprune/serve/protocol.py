"""The OpenAI chat-completions request, checked and turned into a prompt and the URLs of its images.

Only what the server supports is accepted; everything else is a :class:`RequestError`, which the app
answers with a 4xx in the OpenAI error shape, before any model work.
"""

from __future__ import annotations

import pathlib
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from ..config import PrunerConfig

#: A default object repr (``<_io.BytesIO object at 0x7ff7...>``): the server's internals, never in an answer.
PYTHON_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


def without_reprs(message: str) -> str:
    """``message`` fit for an API error: each default object repr in it (a library's exception may hold
    one) replaced by the object's type name."""
    return PYTHON_REPR.sub(lambda match: match.group(1).rpartition(".")[2], message)


class RequestError(ValueError):
    """A bad request: ``status`` (4xx), OpenAI error ``type``, the offending ``param`` and a ``code``; the
    message is the client's to read, so it holds no Python object repr (:func:`without_reprs`)."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(without_reprs(message))
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; configurable with ``tokenprune serve`` options."""

    max_images: int = 4
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_prompt_tokens: int = 4096
    max_new_tokens: int = 256
    allow_remote_images: bool = False  # http(s) URLs of public addresses
    allow_private_image_urls: bool = False  # ... and of loopback, private and link-local ones
    allowed_local_media_path: pathlib.Path | None = None  # file:// URLs and paths of files under it

    def __post_init__(self) -> None:
        if self.allow_private_image_urls and not self.allow_remote_images:
            raise ValueError("allow_private_image_urls needs allow_remote_images")
        if self.allowed_local_media_path is not None:
            root = pathlib.Path(self.allowed_local_media_path).expanduser().resolve()
            if not root.is_dir():
                raise ValueError(f"allowed_local_media_path {root} is not a directory")
            object.__setattr__(self, "allowed_local_media_path", root)  # frozen: set once, resolved


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class PruneOverride(BaseModel):
    """The ``tokenprune`` extra body field: this request's method and amount instead of the server's."""

    model_config = ConfigDict(extra="forbid")
    method: str | None = None
    keep_ratio: float | None = None
    budget: int | None = None
    layer: int | None = None


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``; unknown OpenAI fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: StrictInt = 1
    stream: StrictBool = False
    seed: StrictInt | None = None
    tokenprune: PruneOverride | None = None


def pruner_config(default: PrunerConfig | None, override: PruneOverride | None) -> PrunerConfig | None:
    """The config of a request: the server's, or the override (``method: "none"`` for no pruning)."""
    if override is None:
        return default
    method = override.method or (default.method if default is not None else None)
    if method == "none":
        return None
    if method is None:
        raise RequestError(
            "tokenprune.method is required: the server prunes nothing by default", param="tokenprune"
        )
    amount = {"keep_ratio": override.keep_ratio, "budget": override.budget}
    if override.keep_ratio is None and override.budget is None:
        amount = (
            {"keep_ratio": default.keep_ratio, "budget": default.budget} if default else {"keep_ratio": 0.25}
        )
    try:
        return PrunerConfig(method, layer=override.layer, **amount)
    except (ValueError, TypeError) as error:
        raise RequestError(str(error), param="tokenprune") from error


def conversation(request: ChatRequest, limits: Limits) -> tuple[list[dict], list[tuple[str, str]]]:
    """The messages in the processor's chat-template form, and the ``(url, param)`` of each image in order
    of appearance (``param`` names its request field), checked against the image count limit; the images
    themselves are loaded by :func:`tokenprune.serve.media.load_image`."""
    if request.n != 1:
        raise RequestError("only n=1 is supported", param="n")
    messages, images = [], []
    for i, message in enumerate(request.messages):
        if isinstance(message.content, str):
            parts = [{"type": "text", "text": message.content}]
        else:
            parts = []
            for j, part in enumerate(message.content):
                param = f"messages[{i}].content[{j}]"
                if part.type == "text":
                    if part.text is None:
                        raise RequestError("a text part needs 'text'", param=param)
                    parts.append({"type": "text", "text": part.text})
                else:
                    if part.image_url is None:
                        raise RequestError("an image_url part needs 'image_url.url'", param=param)
                    if message.role != "user":
                        raise RequestError("images are accepted in user messages only", param=param)
                    images.append((part.image_url.url, param))
                    parts.append({"type": "image"})
        messages.append({"role": message.role, "content": parts})
    if len(images) > limits.max_images:
        raise RequestError(
            f"{len(images)} images in one request; this server takes at most {limits.max_images}",
            param="messages",
            code="too_many_images",
        )
    return messages, images
