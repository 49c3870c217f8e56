"""User-facing errors: every message starts with ``gradpruner:`` and names rule, value and fix."""

from __future__ import annotations

from typing import Any


class GradPrunerError(ValueError):
    """A user mistake (bad config, unsupported model, corrupt plan...). Subclass of ValueError."""


def user_error(rule: str, value: Any, fix: str) -> GradPrunerError:
    """Build the standard error: ``gradpruner: <rule> (got <value>). Fix: <fix>``."""
    return GradPrunerError(f"gradpruner: {rule} (got {value!r}). Fix: {fix}")
