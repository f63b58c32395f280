"""Which transport a backend gets: `choose_transport`, the one place that decides.

`[llm_client] transport = "auto"` (the default) takes the lean HTTP/1.1 pool
(`http1.py`) unless a proxy applies to the backend's URL: then aiohttp
(`aiohttp.py`), which can speak through it. A proxy applies when
`HTTP_PROXY` (for http:// URLs), `HTTPS_PROXY` (for https://) or `ALL_PROXY`
is set, in either case with the lower-case name winning as in curl and Python's
`urllib`, and `NO_PROXY` does not exclude the host (the same matching as
`urllib.request.proxy_bypass_environment`, which aiohttp uses too). Under CGI
(`REQUEST_METHOD` set) the upper-case `HTTP_PROXY` is ignored, as `urllib` does
("httpoxy"). `"http1"` and `"aiohttp"` force one transport.

The environment is a parameter so the choice is a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit
from urllib.request import proxy_bypass_environment

import aiohttp

from executor.backends.transport.aiohttp import AiohttpTransport
from executor.backends.transport.base import Transport
from executor.backends.transport.http1 import Http1Transport
from executor.config import ConfigError

TransportMode = Literal["auto", "http1", "aiohttp"]


def choose_transport(
    base_url: str,
    *,
    mode: TransportMode,
    env: Mapping[str, str],
    session: aiohttp.ClientSession | None,
    max_connections: int,
) -> Transport:
    """The transport for a backend at `base_url`; see the module docstring."""
    proxy = proxy_for(base_url, env) if mode != "http1" else None
    if mode == "http1" or (mode == "auto" and proxy is None):
        return Http1Transport(base_url, max_connections=max_connections)
    if session is None:
        raise ConfigError(f"the aiohttp transport for {base_url} needs the process's HTTP session")
    return AiohttpTransport(session, base_url, proxy=proxy, max_connections=max_connections)


def proxy_for(url: str, env: Mapping[str, str]) -> str | None:
    """The proxy URL that `env` says to use for `url`, or None."""
    proxies = _proxies(env)
    parts = urlsplit(url)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or proxy_bypass_environment(parts.netloc.rpartition("@")[2], proxies):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy  # curl's reading of a bare host:port
    scheme = urlsplit(proxy).scheme.lower()
    if scheme not in ("http", "https"):
        raise ConfigError(
            f"the proxy {scheme}://... set in the environment for {parts.scheme} URLs is not supported"
            f" (only http:// and https:// proxies are); add {parts.hostname} to NO_PROXY or use an HTTP proxy"
        )
    return proxy


def _proxies(env: Mapping[str, str]) -> dict[str, str]:
    """`{scheme: proxy}` plus `no` (the NO_PROXY list) from `*_proxy` variables, lower case winning."""
    found = {k.lower()[:-6]: v for k, v in env.items() if k.lower().endswith("_proxy") and v}
    if "REQUEST_METHOD" in env:
        found.pop("http", None)  # under CGI, HTTP_PROXY can come from the client's `Proxy:` header
    for k, v in env.items():  # then the lower-case names, which win (an empty one unsets)
        if k.endswith("_proxy") and k == k.lower():
            if v:
                found[k[:-6]] = v
            else:
                found.pop(k[:-6], None)
    return found
