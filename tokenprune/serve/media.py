"""Where a request's images come from: base64 ``data:`` URLs always; where the server enables them, files
under its allowed media directory and http(s) URLs of public addresses.

Nothing here blocks the event loop: files are read and images decoded in a worker thread, and URLs are
fetched with an async client. Every refusal is a :class:`~tokenprune.serve.protocol.RequestError` (400).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import os
import pathlib
import socket
import stat
import urllib.parse
import urllib.request

import httpx
from PIL import Image, UnidentifiedImageError

from .protocol import Limits, RequestError

#: Seconds one image fetch may take in all (redirects, connects and reads together).
FETCH_TIMEOUT_S = 10.0
#: Redirects followed per image URL; each target's address is checked like the first.
MAX_REDIRECTS = 3

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


async def load_image(url: str, limits: Limits, param: str) -> Image.Image:
    """The RGB image at ``url`` (``param`` names the request field in errors), within ``limits``."""
    scheme = url.partition(":")[0].lower()
    if scheme in ("http", "https"):
        data = await fetch_image(url, limits, param)
    else:
        data = await asyncio.to_thread(_image_bytes, url, scheme, limits, param)
    return await asyncio.to_thread(decode_image, data, limits, param)


def _image_bytes(url: str, scheme: str, limits: Limits, param: str) -> bytes:
    """The encoded image of a ``data:`` URL or a local file (``file://`` URL or absolute path)."""
    if scheme == "data":
        return _data_url_bytes(url, limits, param)
    if scheme == "file" or url.startswith("/"):
        return read_local_image(url, limits, param)
    raise RequestError("image URLs must be data: URLs on this server", param=param)


def _data_url_bytes(url: str, limits: Limits, param: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not header.startswith("data:image/"):
        raise RequestError("image data URLs must be 'data:image/<type>;base64,...'", param=param)
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise RequestError(
            f"image larger than {limits.max_image_bytes} bytes", param=param, code="image_too_large"
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError("image data is not valid base64", param=param) from error


def read_local_image(url: str, limits: Limits, param: str) -> bytes:
    """The bytes of the file that a ``file://`` URL or absolute path names, when it lies under the server's
    allowed media directory once ``..`` and symlinks are resolved, and is a regular file."""
    root = limits.allowed_local_media_path
    if root is None:
        raise RequestError("local image files are disabled on this server; send a data: URL", param=param)
    if url.lower().startswith("file:"):
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise RequestError("file URLs must name a file of this machine: file:///path", param=param)
        path = pathlib.Path(urllib.request.url2pathname(parts.path))
    else:
        path = pathlib.Path(url)
    if not path.is_absolute():
        raise RequestError(f"local image paths must be absolute, got {str(path)!r}", param=param)
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError, ValueError) as error:  # RuntimeError: a symlink loop
        raise RequestError(f"cannot read the image file {str(path)!r}", param=param) from error
    if not resolved.is_relative_to(root):
        raise RequestError(
            f"{str(path)!r} is outside the directory this server reads images from",
            param=param,
            code="image_path_not_allowed",
        )
    # no symlink may replace the checked file before it is opened; a FIFO must not block the open
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        with open(os.open(resolved, flags), "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise RequestError(f"{str(path)!r} is not a regular file", param=param)
            return file.read(limits.max_image_bytes + 1)
    except OSError as error:
        raise RequestError(
            f"cannot read the image file {str(path)!r}: {error.strerror}", param=param
        ) from None


def is_public(address: IPAddress) -> bool:
    """Whether ``address`` is a globally reachable unicast address: not loopback, private, link-local
    (cloud metadata services live there), shared, reserved, unspecified or multicast. An IPv4-mapped IPv6
    address is judged by its IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def fetch_image(url: str, limits: Limits, param: str) -> bytes:
    """The body of an http(s) image URL, at most ``limits.max_image_bytes`` (one byte more reads as too
    large), following up to :data:`MAX_REDIRECTS` redirects within :data:`FETCH_TIMEOUT_S` seconds."""
    if not limits.allow_remote_images:
        raise RequestError("http(s) image URLs are disabled on this server; send a data: URL", param=param)
    try:
        return await asyncio.wait_for(_fetch(url, limits, param), FETCH_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise RequestError(f"fetching the image took over {FETCH_TIMEOUT_S:g} s", param=param) from None


async def _fetch(url: str, limits: Limits, param: str) -> bytes:
    # trust_env=False: no proxy from the environment, which would connect to addresses unchecked here
    async with httpx.AsyncClient(trust_env=False, timeout=FETCH_TIMEOUT_S) as client:
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = httpx.URL(url)
                request = await _pinned_request(client, target, limits, param)
                response = await client.send(request, stream=True)
            except (httpx.HTTPError, httpx.InvalidURL) as error:
                raise RequestError(f"could not fetch the image: {error}", param=param) from None
            try:
                if response.is_redirect:
                    url = str(target.join(response.headers["location"]))
                    continue
                if response.status_code != 200:
                    raise RequestError(f"could not fetch the image: HTTP {response.status_code}", param=param)
                data = bytearray()
                async for chunk in response.aiter_raw():  # as sent: no decompression to bound
                    data += chunk
                    if len(data) > limits.max_image_bytes:
                        break
                return bytes(data)
            except httpx.HTTPError as error:
                raise RequestError(f"could not fetch the image: {error}", param=param) from None
            finally:
                await response.aclose()
    raise RequestError(f"the image URL redirects more than {MAX_REDIRECTS} times", param=param)


async def _pinned_request(
    client: httpx.AsyncClient, target: httpx.URL, limits: Limits, param: str
) -> httpx.Request:
    """A GET of ``target`` sent to the address its host was checked at, not to a second lookup that could
    answer differently; the ``Host`` header and, over TLS, the certificate check keep the host name."""
    if target.scheme not in ("http", "https") or not target.host:
        raise RequestError("image URLs must be http(s) URLs with a host", param=param)
    host = target.raw_host.decode("ascii")
    address = await _checked_address(
        host, target.port or (443 if target.scheme == "https" else 80), limits, param
    )
    extensions = {"sni_hostname": host} if target.scheme == "https" else {}
    return client.build_request(
        "GET",
        target.copy_with(host=str(address)),
        headers={"Host": target.netloc.decode("ascii"), "Accept-Encoding": "identity"},
        extensions=extensions,
    )


async def _checked_address(host: str, port: int, limits: Limits, param: str) -> IPAddress:
    """The first address ``host`` resolves to, after every one it resolves to is checked with
    :func:`is_public` (unless the server allows private image URLs)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise RequestError(f"could not resolve the image URL's host {host!r}", param=param) from None
    addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
    if not addresses:
        raise RequestError(f"could not resolve the image URL's host {host!r}", param=param)
    if not limits.allow_private_image_urls:
        for address in addresses:
            if not is_public(address):
                raise RequestError(
                    f"the image URL's host {host!r} resolves to {address}, a loopback, private or link-local "
                    "address; this server fetches images from public addresses only",
                    param=param,
                    code="image_url_not_allowed",
                )
    return addresses[0]


def decode_image(data: bytes, limits: Limits, param: str) -> Image.Image:
    """Decode and check an image's bytes: a known format, within the byte and pixel limits."""
    if len(data) > limits.max_image_bytes:
        raise RequestError(
            f"image larger than {limits.max_image_bytes} bytes", param=param, code="image_too_large"
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > limits.max_image_pixels:
                raise RequestError(
                    f"image of {image.width}x{image.height} pixels; at most {limits.max_image_pixels} pixels",
                    param=param,
                    code="image_too_large",
                )
            return image.convert("RGB")
    except RequestError:
        raise
    except UnidentifiedImageError as error:  # its message holds the repr of the buffer
        raise RequestError(
            "not a readable image: its format is not one this server decodes (PNG, JPEG, WebP, GIF...)",
            param=param,
            code="invalid_image",
        ) from error
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise RequestError(f"not a readable image: {error}", param=param, code="invalid_image") from error
