"""The optional LLM "brain" of an agent: any langchain-core chat model.

Nothing requires one. When ``Settings.agent_llm`` names a chat model
(``package.module:attribute``, an instance or a zero-argument factory), agents
add prose on top of their deterministic results. A brain that fails or times
out is logged and skipped: the deterministic result always stands.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import Protocol, runtime_checkable

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage

from shared.lib.errors import StartupError

__all__ = ["Brain", "ChatModelBrain", "load_brain"]

_log = logging.getLogger(__name__)


@runtime_checkable
class Brain(Protocol):
    """What an agent asks of a language model: one completion, or None when it could not get one."""

    async def complete(self, instructions: str, prompt: str, *, timeout_s: float = 60.0) -> str | None: ...


class ChatModelBrain:
    """A :class:`Brain` over a langchain-core chat model."""

    def __init__(self, model: BaseChatModel) -> None:
        self.model = model

    async def complete(self, instructions: str, prompt: str, *, timeout_s: float = 60.0) -> str | None:
        try:
            async with asyncio.timeout(timeout_s):
                message = await self.model.ainvoke([SystemMessage(instructions), HumanMessage(prompt)])
        except Exception:  # noqa: BLE001 - a failing LLM must never fail the deterministic work
            _log.warning("the LLM brain failed; answering without it", exc_info=True)
            return None
        text = message.text if hasattr(message, "text") else str(message.content)
        return str(text).strip() or None


def load_brain(spec: str) -> Brain | None:
    """The brain named by ``spec`` (``module:attribute``), or None when ``spec`` is empty."""
    if not spec.strip():
        return None
    module_name, _, attribute = spec.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attribute or "model")
    except (ImportError, AttributeError) as e:
        raise StartupError(f"AO_AGENT_LLM={spec!r} cannot be imported ({e}); give module:attribute") from e
    model = target() if callable(target) and not isinstance(target, BaseChatModel) else target
    if not isinstance(model, BaseChatModel):
        raise StartupError(f"AO_AGENT_LLM={spec!r} is not a langchain-core chat model")
    return ChatModelBrain(model)
