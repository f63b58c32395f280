"""Which image URLs an executor passes on to its backend: `[llm_client] image_urls`, enforced once.

The executor never fetches an image URL, but backends do (vLLM; llama-server with a vision
model), from their own host: a caller could make that host fetch cloud metadata
(`169.254.169.254`) or a service on its loopback (SSRF). `check_image_urls` refuses, with a
typed `InvalidRequest` naming the option, before any backend call (and before the cache):

- `data_only` (the default): inline `data:` images only; every http(s) URL is refused. The
  only policy that closes the hole: nothing the backend could fetch reaches it.
- `public_only`: http(s) URLs whose host is a public IP literal or a DNS name that is not
  obviously internal (localhost, single-label names, .local, .internal, ...). IP literals are
  read the way backends' URL parsers read them (`127.1`, `0x7f000001`, `[::ffff:127.0.0.1]`).
  The executor does NOT resolve names: resolving would tell the name's DNS server that a
  job is here, and the answer could change before the backend resolves it (rebinding). So a
  public name that resolves to a private address, or a public URL that redirects to one,
  still gets through: it stops mistakes and the obvious attacks, not a determined caller.
- `any`: everything the chat rules accept (for a backend that fetches from outside the
  operator's network, e.g. OpenAI's API).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from executor.config import ImageUrlPolicy
from protocol.chat_types import ImagePart
from protocol.errors import InvalidRequest
from protocol.messages import ChatRequest

# Names that resolve inside the operator's network by convention (RFC 6761/6762/8375, cloud metadata).
_INTERNAL_SUFFIXES = (".localhost", ".local", ".localdomain", ".internal", ".intranet", ".lan", ".home.arpa",
                      ".arpa", ".corp", ".home")  # fmt: skip
# A host whose last label is a number is an IPv4 literal to WHATWG and inet_aton (`127.1`, `2130706433`).
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)\Z")
_HOST_CHARS = re.compile(r"[a-z0-9.\-_]+\Z")


def check_image_urls(request: ChatRequest, policy: ImageUrlPolicy) -> None:
    """Raise `InvalidRequest` for the first image URL `policy` refuses (see the module docstring)."""
    if policy == "any":
        return
    for i, m in enumerate(request.messages):
        if type(m.content) is not list:  # the common text-only turn: nothing to look at
            continue
        for k, part in enumerate(m.content):
            if not isinstance(part, ImagePart):
                continue
            url = part.image_url.url
            if url[:5].lower() == "data:":
                continue
            where = f"messages[{i}].content[{k}].image_url.url"
            shown = url if len(url) <= 60 else url[:60] + "..."
            if policy == "data_only":
                raise InvalidRequest(
                    f"{where}: {shown!r}: this executor takes images inline only ([llm_client] image_urls ="
                    ' "data_only"), because its backend would fetch the URL from inside its network;'
                    " send the image as a data: URL (data:image/png;base64,...)"
                )
            reason = _internal_reason(url)
            if reason is not None:
                raise InvalidRequest(
                    f"{where}: {shown!r} {reason}; this executor passes on only URLs of public hosts"
                    ' ([llm_client] image_urls = "public_only"): send the image as a data: URL instead'
                )


def _internal_reason(url: str) -> str | None:
    """Why the backend must not be asked to fetch `url`, or None when its host looks public."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a port that is not a number: refused below
    except ValueError:
        return "is not a URL this executor can read"
    netloc = parts.netloc
    # Parsers disagree on these (`http://a.com\@127.0.0.1/`, `%2e`): refused rather than guessed.
    if "@" in netloc or "\\" in url or "%" in netloc or not host:
        return "has credentials, a backslash or an escaped host"
    if netloc.startswith("["):
        return _address_reason(host)
    host = host.rstrip(".")
    if not _HOST_CHARS.match(host):
        return "names a host this executor cannot read"
    last = host.rsplit(".", 1)[-1]
    if _NUMERIC_LABEL.match(last):
        try:
            packed = socket.inet_aton(host)  # parses the literal the way backends do; no lookup
        except OSError:
            return "names a malformed IP address"
        return _address_reason(str(ipaddress.IPv4Address(packed)))
    if host == "localhost" or host.endswith(_INTERNAL_SUFFIXES) or "." not in host:
        return "names a local or internal host"
    return None


def _address_reason(literal: str) -> str | None:
    try:
        addr = ipaddress.ip_address(literal)
    except ValueError:
        return "names a malformed IP address"
    if isinstance(addr, ipaddress.IPv6Address):
        # An IPv4 address inside IPv6 (mapped, 6to4, NAT64): judged as the IPv4 address it carries.
        inner = addr.ipv4_mapped or addr.sixtofour
        if inner is None and addr in _NAT64:
            inner = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if inner is not None:
            return _address_reason(str(inner))
    if addr.is_loopback:
        return "names a loopback address"
    if addr.is_link_local:
        return "names a link-local address (cloud metadata lives there)"
    if addr.is_private or addr.is_reserved or addr.is_unspecified or addr.is_multicast or not addr.is_global:
        return "names a private or reserved address"
    return None


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
