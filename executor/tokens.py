"""Token counting: which tokenizer a model uses, counting with it, and where its files come from.

A model's tokens are counted with, in order: a tokenizer the operator configured
for it (`[tokens] tokenizers`: a Hugging Face `tokenizer.json`, a SentencePiece
`.model`, or `tiktoken:<encoding>`), tiktoken's own encoding for OpenAI model
names (`tiktoken.model.encoding_name_for_model`, prefix matching included), and
last the design document's estimate (`protocol.estimate`). Every `Count` says
which of these produced it (`method`), so an estimate is never mistaken for a count.

tiktoken never touches the network here: its encoding files are read from a local
directory (`[tokens] encodings_dir`, filled once by `lloom-executor setup-tokenizers`,
which takes them from the `litellm` wheel and checks tiktoken's sha256 for each), and
the encodings are built from tiktoken's own definitions (`tiktoken_ext.openai_public`)
with that local loader. A missing file means the estimate, with one warning naming the
file and the command. Encodings and tokenizers are built once per process (an
`Encoding` takes ~1 s to build) and shared by every `TokenCounter`.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import hashlib
import os
import subprocess
import sys
import tempfile
import threading
import types
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import msgspec
import structlog

from executor.config import TokensConfig
from protocol.estimate import estimate_tokens, image_tokens, message_text
from protocol.messages import Message, Role, Usage

log = structlog.get_logger(logger_name=__name__)

ESTIMATE = "estimate"
# OpenAI's documented chat format cost (openai-cookbook, "How to count tokens with
# tiktoken"): every message is wrapped in 3 tokens, and the reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3
# Below this many tokens of difference, counts never "mismatch" (a chat template's
# few extra tokens on a short prompt are not an accounting problem).
MISMATCH_FLOOR = 8
# Encodings `setup-tokenizers` installs: the ones the litellm wheel carries.
SHIPPED_ENCODINGS = ("cl100k_base", "o200k_base", "p50k_base")
# Encodings whose ranks are another's file (their definitions differ only in special tokens).
_RANKS_OF = {"p50k_edit": "p50k_base", "o200k_harmony": "o200k_base"}
LITELLM_WHEEL = "litellm==1.110.2"  # any version with litellm_core_utils/tokenizers/ works
SETUP_COMMAND = "lloom-executor setup-tokenizers"


class Count(msgspec.Struct, frozen=True):
    tokens: int
    # "tiktoken:<encoding>", "hf:<file name>", "sentencepiece:<file name>" or "estimate".
    method: str
    # Part of `tokens` is an estimate whatever the method: images and tool definitions,
    # whose cost only the backend knows (its chat template, the image's size).
    estimated: bool = False


def mismatch(reported: int, counted: int, tolerance: float) -> bool:
    """True when a backend's `reported` count and our `counted` one differ by more than
    `tolerance` (relative to the larger) and by more than `MISMATCH_FLOOR` tokens."""
    diff = abs(reported - counted)
    return diff > MISMATCH_FLOOR and diff > tolerance * max(reported, counted)


def estimate_usage(prompt_texts: Iterable[str], completion: str, *, completion_tokens: int | None = None) -> Usage:
    """Estimate usage; `completion_tokens` overrides the guess when it is known (e.g. a count of stream chunks)."""
    prompt = sum(estimate_tokens(t) for t in prompt_texts)
    completion_n = estimate_tokens(completion) if completion_tokens is None else completion_tokens
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion_n, total_tokens=prompt + completion_n, estimated=True
    )


# -- tokenizers -------------------------------------------------------------------------------


class _Tokenizer(Protocol):
    method: str
    # Tokens of each role's name when OpenAI's chat format cost applies, else None.
    role_tokens: Mapping[Role, int] | None

    def count(self, text: str) -> int: ...


class _Tiktoken:
    def __init__(self, encoding: Any) -> None:
        self.method = f"tiktoken:{encoding.name}"
        self._encoding = encoding
        self.role_tokens = {role: self.count(role.value) for role in Role}

    def count(self, text: str) -> int:
        # encode_ordinary: text that looks like a special token is counted as text, never refused.
        return len(self._encoding.encode_ordinary(text))


class _HuggingFace:
    role_tokens = None  # the model's chat template is not known here

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.method = f"hf:{path.name}"
        self._tokenizer = Tokenizer.from_file(str(path))

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


class _SentencePiece:
    role_tokens = None

    def __init__(self, path: Path) -> None:
        import sentencepiece

        self.method = f"sentencepiece:{path.name}"
        self._processor = sentencepiece.SentencePieceProcessor(model_file=str(path))

    def count(self, text: str) -> int:
        return len(self._processor.encode(text))


def default_encodings_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`${LLOOM_CACHE_DIR:-~/.cache/lloom}/tiktoken`, where `setup-tokenizers` writes."""
    from executor.backends.llama_build import cache_dir

    return cache_dir(dict(os.environ if environ is None else environ)) / "tiktoken"


def encoding_file(directory: Path, encoding: str) -> Path:
    return directory / f"{_RANKS_OF.get(encoding, encoding)}.tiktoken"


def _definition(encoding: str, load_ranks: Callable[[str, str | None], dict[bytes, int]]) -> dict[str, Any]:
    """tiktoken's own definition of `encoding` (pattern, special tokens, ranks), with its
    `load_tiktoken_bpe(url, expected_hash)` calls answered by `load_ranks` instead of the
    network. The constructor runs as a copy bound to its own globals: tiktoken is untouched."""
    from tiktoken_ext import openai_public

    constructors = openai_public.ENCODING_CONSTRUCTORS
    if encoding not in constructors or encoding == "gpt2":  # gpt2 reads two other files
        raise KeyError(encoding)
    scope = dict(vars(openai_public), load_tiktoken_bpe=lambda url, expected_hash=None: load_ranks(url, expected_hash))
    for name, fn in constructors.items():  # o200k_harmony calls o200k_base: rebind them all
        scope[name] = types.FunctionType(fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__)
    return scope[encoding]()


def expected_files(encoding: str) -> tuple[str, str]:
    """(source URL, sha256) of `encoding`'s rank file, as tiktoken defines them."""
    seen: list[tuple[str, str]] = []

    def record(url: str, expected_hash: str | None) -> dict[bytes, int]:
        seen.append((url, expected_hash or ""))
        return {}

    _definition(encoding, record)
    return seen[0]


def _read_ranks(path: Path, expected_hash: str | None) -> dict[bytes, int]:
    data = path.read_bytes()
    if expected_hash and hashlib.sha256(data).hexdigest() != expected_hash:
        raise ValueError(f"{path} is not the file tiktoken expects (sha256 differs); run `{SETUP_COMMAND}`")
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


# Serializes first loads, so two threads counting at once build an encoding once.
_load_lock = threading.Lock()


def _load_tiktoken(directory: Path, encoding: str) -> _Tiktoken | None:
    with _load_lock:
        return _build_tiktoken(directory, encoding)


@functools.cache
def _build_tiktoken(directory: Path, encoding: str) -> _Tiktoken | None:
    """The encoding from `directory`, built once per process; None (and one warning) if its file is missing."""
    import tiktoken

    path = encoding_file(directory, encoding)
    try:
        definition = _definition(encoding, lambda _url, expected_hash: _read_ranks(path, expected_hash))
    except FileNotFoundError:
        log.warning(
            "token counting falls back to the estimate: tiktoken encoding file missing",
            encoding=encoding, file=str(path), fix=f"run `{SETUP_COMMAND}`",
        )  # fmt: skip
        return None
    except KeyError:
        log.warning("token counting falls back to the estimate: unknown tiktoken encoding", encoding=encoding)
        return None
    except (OSError, ValueError) as e:
        log.warning("token counting falls back to the estimate", encoding=encoding, error=str(e))
        return None
    return _Tiktoken(tiktoken.Encoding(**definition))


def _load_file(path: Path) -> _Tokenizer | None:
    with _load_lock:
        return _build_file(path)


@functools.cache
def _build_file(path: Path) -> _Tokenizer | None:
    """A Hugging Face tokenizer.json or SentencePiece .model, built once per process."""
    kind = "sentencepiece" if path.suffix == ".model" else "tokenizers"
    try:
        return _SentencePiece(path) if kind == "sentencepiece" else _HuggingFace(path)
    except ImportError:
        fix = "pip install sentencepiece" if kind == "sentencepiece" else "pip install 'lloom[tokenizers]'"
        log.warning("token counting falls back to the estimate: tokenizer library missing", file=str(path), fix=fix)
    except Exception as e:  # a foreign library's parse errors have no common type
        log.warning("token counting falls back to the estimate: tokenizer unreadable", file=str(path), error=str(e))
    return None


def openai_encoding(model: str) -> str | None:
    """tiktoken's encoding for an OpenAI model name (`gpt-4o-2024-08-06` -> o200k_base), else None.

    Tries the name, then without a provider prefix (`openai/gpt-4o`) and a tag (`gpt-4o:latest`)."""
    from tiktoken.model import encoding_name_for_model

    name = model.lower()
    for candidate in (name, name.rsplit("/", 1)[-1], name.rsplit("/", 1)[-1].split(":", 1)[0]):
        try:
            return encoding_name_for_model(candidate)
        except KeyError:
            continue
    return None


# -- counting -----------------------------------------------------------------------------------


class TokenCounter:
    """Counts a model's tokens with the best tokenizer available here; see the module docstring.

    Cheap to build; the tokenizers it uses are loaded on a model's first count.
    Counting is CPU work (about a microsecond per token, see docs/tokens.md): a
    caller on the event loop with a large prompt should run it in a thread.
    """

    def __init__(self, config: TokensConfig) -> None:
        self.config = config
        self.encodings_dir = (
            Path(config.encodings_dir).expanduser() if config.encodings_dir else default_encodings_dir()
        )
        self._resolved: dict[str, _Tokenizer | None] = {}

    def _tokenizer(self, model: str) -> _Tokenizer | None:
        if model not in self._resolved:
            self._resolved[model] = self._resolve(model)
        return self._resolved[model]

    def _resolve(self, model: str) -> _Tokenizer | None:
        for pattern, target in self.config.tokenizers.items():  # the first matching pattern wins
            if fnmatch.fnmatchcase(model.lower(), pattern.lower()):
                if target.startswith("tiktoken:"):
                    return _load_tiktoken(self.encodings_dir, target.removeprefix("tiktoken:"))
                return _load_file(Path(target).expanduser())
        encoding = openai_encoding(model)
        return _load_tiktoken(self.encodings_dir, encoding) if encoding else None

    def method_for(self, model: str) -> str:
        """How `model`'s tokens are counted here: "tiktoken:o200k_base", "hf:tokenizer.json", ..., or "estimate"."""
        tokenizer = self._tokenizer(model)
        return tokenizer.method if tokenizer else ESTIMATE

    def count_text(self, model: str, text: str) -> Count:
        """Tokens of `text` alone (e.g. a completion), special-token look-alikes counted as text."""
        tokenizer = self._tokenizer(model)
        if tokenizer is None:
            return Count(estimate_tokens(text), ESTIMATE)
        return Count(tokenizer.count(text), tokenizer.method)

    def count_messages(self, model: str, messages: Sequence[Message], *, tools: str = "") -> Count:
        """Prompt tokens of a chat request; `tools` is its tool definitions as text
        (`protocol.estimate.tools_text`).

        With a tiktoken encoding: each message's role and text (text parts, tool calls'
        names and arguments), plus OpenAI's documented format cost of 3 tokens per
        message and 3 priming the reply; this matches OpenAI's reported `prompt_tokens`
        for plain text messages. Images (OpenAI's per-image figures) and tool
        definitions (their JSON; each backend renders them its own way) are estimates
        whatever the tokenizer: the count says so (`estimated`).
        With a configured Hugging Face or SentencePiece tokenizer: the texts only;
        the model's chat template (its role markers, BOS) is not known here, so the
        count is below the backend's by a few tokens per message. With the estimate:
        the design document's heuristic over the texts, as `estimate_usage` does.
        """
        tokenizer = self._tokenizer(model)
        images = sum(image_tokens(m) for m in messages)
        estimated = bool(images or tools)
        if tokenizer is None:
            tokens = sum(estimate_tokens(message_text(m)) for m in messages) + images
            return Count(tokens + (estimate_tokens(tools) if tools else 0), ESTIMATE, estimated)
        tokens = sum(tokenizer.count(message_text(m)) for m in messages) + images
        if tools:
            tokens += tokenizer.count(tools)
        if (roles := tokenizer.role_tokens) is not None:
            tokens += sum(TOKENS_PER_MESSAGE + roles[m.role] for m in messages) + TOKENS_PER_REPLY
        return Count(tokens, tokenizer.method, estimated)

    def should_verify(self, key: str) -> bool:
        """Whether the job `key` (its id) gets its reported usage checked by a local count:
        `verify` "always", "never", or a sample rate, decided by a hash of the key so every
        run and every reader decides the same."""
        rate = self.config.verify
        if rate == "always" or rate == "never":
            return rate == "always"
        bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest()) / 2**64
        return bucket < rate


# -- setup: the encoding files, from the litellm wheel -------------------------------------------


class SetupError(RuntimeError):
    """The encoding files could not be installed; the message says why."""


def installed(directory: Path, encoding: str) -> bool:
    path = encoding_file(directory, encoding)
    _, sha256 = expected_files(encoding)
    return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256


def setup_encodings(
    directory: Path, *, wheel: Path | None = None, say: Callable[[str], None] = print
) -> list[Path]:
    """Install `SHIPPED_ENCODINGS` into `directory`, taken from a litellm wheel (downloaded with
    pip, no dependencies, unless `wheel` is given) and checked against tiktoken's sha256.
    Files already installed and intact are kept; nothing is downloaded if all are."""
    missing = [e for e in SHIPPED_ENCODINGS if not installed(directory, e)]
    for encoding in SHIPPED_ENCODINGS:
        if encoding not in missing:
            say(f"{encoding}: already installed ({encoding_file(directory, encoding)})")
    if not missing:
        return [encoding_file(directory, e) for e in SHIPPED_ENCODINGS]
    with tempfile.TemporaryDirectory(prefix="lloom-tiktoken-") as tmp:
        if wheel is None:
            say(f"downloading the {LITELLM_WHEEL} wheel (no dependencies) for its tiktoken files")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp]
            if subprocess.run([*cmd, LITELLM_WHEEL]).returncode != 0:
                raise SetupError(f"pip could not download {LITELLM_WHEEL}; pass --wheel FILE if you have it")
            wheel = next(Path(tmp).glob("litellm-*.whl"))
        try:
            archive = zipfile.ZipFile(wheel)
        except (OSError, zipfile.BadZipFile) as e:
            raise SetupError(f"{wheel}: not a readable wheel: {e}") from e
        with archive:
            names = set(archive.namelist())
            for encoding in missing:
                url, sha256 = expected_files(encoding)
                member = f"litellm/litellm_core_utils/tokenizers/{hashlib.sha1(url.encode()).hexdigest()}"
                if member not in names:
                    raise SetupError(f"{wheel.name} has no {encoding} file ({member})")
                data = archive.read(member)
                if hashlib.sha256(data).hexdigest() != sha256:
                    raise SetupError(f"{wheel.name}: {encoding} does not match tiktoken's sha256 {sha256}")
                target = encoding_file(directory, encoding)
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_suffix(".partial")
                partial.write_bytes(data)
                partial.replace(target)  # atomic: a reader never sees half a file
                say(f"{encoding}: installed {target} (sha256 verified)")
    return [encoding_file(directory, e) for e in SHIPPED_ENCODINGS]


__all__ = [
    "Count",
    "SetupError",
    "TokenCounter",
    "default_encodings_dir",
    "estimate_usage",
    "mismatch",
    "openai_encoding",
    "setup_encodings",
]
