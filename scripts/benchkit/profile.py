"""Turn py-spy's collapsed stacks into the tables of the report: where the executor's CPU goes."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent.parent) + "/"

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")

# Order matters: the first match names the layer of a frame's file.
_LAYERS = [
    ("nats-py", "/nats/"),
    ("aiohttp/yarl/multidict", ("/aiohttp/", "/yarl/", "/multidict/")),
    ("msgspec", "/msgspec/"),
    ("structlog/logging", ("/structlog/", "/logging/")),
    ("executor (this project)", "/executor/"),
    ("protocol (this project)", "/protocol/"),
    ("asyncio/uvloop", ("/asyncio/", "/uvloop/")),
]


def _parse(frame: str) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m["func"], m["file"]


def _short(func: str, file: str) -> str:
    f = file.replace("\\", "/")
    if "site-packages/" in f:
        tail = f.split("site-packages/", 1)[1]
    elif _ROOT in f:
        tail = f.split(_ROOT, 1)[1]
    else:
        tail = "/".join(f.split("/")[-2:])
    return f"{func} ({tail})" if file else func


def layer(file: str) -> str:
    f = "/" + file.replace("\\", "/")
    for name, keys in _LAYERS:
        if any(k in f for k in ((keys,) if isinstance(keys, str) else keys)):
            return name
    return "other (stdlib, interpreter)"


def summarize(collapsed: str, top: int = 15) -> dict:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_parse(f) for f in stack.split(";")[1:]]  # the first entry names the thread
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        self_t[_short(*leaf)] += count
        # Self time by the library of the innermost Python frame; time in C extensions
        # (uvloop, msgspec) lands on the Python frame that called them.
        layers[layer(leaf[1])] += count
        for name in {_short(*f) for f in frames}:
            incl[name] += count

    def rows(c: Counter[str]) -> list[list]:
        return [[name, n, 100.0 * n / total] for name, n in c.most_common(top)]

    return {
        "samples": total,
        "self": rows(self_t),
        "inclusive": rows(incl),
        "layers": [[name, n, 100.0 * n / total] for name, n in layers.most_common()] if total else [],
    }
