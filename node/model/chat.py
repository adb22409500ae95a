"""A checkpoint's tokenizer and its chat template: text and messages to token ids.

A chat model is prompted through the template it was trained with (SmolLM2's wraps each turn
in ``<|im_start|>role ... <|im_end|>``); applying it here, once, keeps the client, the demo
and the reference tests on the same token ids.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from corolla.errors import CheckpointError, InvalidInput

__all__ = ["CHAT_ROLES", "chat_input_ids", "chat_messages", "has_chat_template", "load_tokenizer"]

CHAT_ROLES = ("system", "user", "assistant")


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a checkpoint directory (``Checkpoint.directory``)."""
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot load the tokenizer of {directory}: {error}") from error


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_messages(message: str, system: str | None = None) -> list[dict[str, str]]:
    """One user message, after an optional system message, as chat templates take them."""
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": message}]


def chat_input_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Mapping[str, str]]
) -> list[int]:
    """Token ids of `messages` through the tokenizer's chat template, ending with the prompt
    for the assistant's reply. Raises InvalidInput for malformed messages or a tokenizer that
    has no chat template."""
    if not has_chat_template(tokenizer):
        raise InvalidInput(
            "this model has no chat template (a base model, or a checkpoint saved without "
            "one): give a plain prompt instead"
        )
    if not messages:
        raise InvalidInput("a chat needs at least one message")
    checked = []
    for number, message in enumerate(messages, 1):
        role, content = message.get("role"), message.get("content")
        if role not in CHAT_ROLES:
            raise InvalidInput(
                f"message {number}: role must be one of {', '.join(CHAT_ROLES)}, got {role!r}"
            )
        if not isinstance(content, str):
            raise InvalidInput(f"message {number}: content must be text")
        checked.append({"role": role, "content": content})
    try:
        encoded = tokenizer.apply_chat_template(
            checked, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except (TemplateError, ValueError, TypeError, KeyError) as error:
        # The template is Jinja code from the checkpoint; some refuse messages on purpose.
        raise InvalidInput(f"the model's chat template refused these messages: {error}") from error
    return [int(token) for token in encoded["input_ids"]]
