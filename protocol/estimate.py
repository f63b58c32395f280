"""The design document's token estimate, for when no tokenizer is at hand.

The average of a word-based guess (1.3 tokens a word) and a character-based one
(4 characters a token). Clients use it to estimate a job's cost before routing;
executors to fill in usage a backend did not report (marked `estimated`). What is
not text (images, tool definitions as a chat template renders them) can only be
estimated, whoever counts: the helpers below say what each message adds.
"""

from __future__ import annotations

import msgspec

from protocol.chat_types import ImagePart, TextPart
from protocol.messages import ChatRequest, Message


def estimate_tokens(text: str) -> int:
    words = len(text.split())
    chars = len(text)
    return (int(words * 1.3) + int(chars / 4.0)) // 2


# What an image costs a model, which only the backend knows exactly (it depends on the
# image's size): OpenAI's figures for a low-detail image and a 1024x1024 high-detail one.
IMAGE_TOKENS_LOW = 85
IMAGE_TOKENS = 765


def message_text(message: Message) -> str:
    """The text of one message that a tokenizer can count: its text parts, its tool calls'
    names and arguments. Images are not text: `image_count` says how many there are."""
    content = message.content
    if type(content) is str:
        if not message.tool_calls:
            return content
        texts = [content]
    else:
        texts = [p.text for p in content or () if type(p) is TextPart]
    for call in message.tool_calls or ():
        texts.append(call.function.name)
        texts.append(call.function.arguments)
    return "\n".join(texts)


def image_tokens(message: Message) -> int:
    """The estimated tokens of a message's images (0 for text)."""
    if type(message.content) is str or not message.content:
        return 0
    return sum(
        IMAGE_TOKENS_LOW if p.image_url.detail == "low" else IMAGE_TOKENS
        for p in message.content
        if type(p) is ImagePart
    )


def tools_text(request: ChatRequest) -> str:
    """The tool definitions as the model sees them, roughly: their JSON (an estimate: each
    backend renders them into its own chat template)."""
    if not request.tools:
        return ""
    return msgspec.json.encode(request.tools).decode()


def estimate_prompt_tokens(request: ChatRequest) -> int:
    """The estimated prompt tokens of a chat request: text, tool calls, tool definitions, images."""
    total = sum(estimate_tokens(message_text(m)) + image_tokens(m) for m in request.messages)
    return total + (estimate_tokens(tools_text(request)) if request.tools else 0)
