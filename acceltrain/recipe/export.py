"""The export step of a recipe: the model card that goes with ``output_dir/final``."""

from __future__ import annotations

from typing import Any

__all__ = ["model_card"]


def model_card(*, title: str, summary: str, facts: dict[str, Any], usage: str,
               library_name: str = "transformers", base_model: str | None = None) -> str:
    """A README.md for an exported model: what it is, a table of facts, how to load it.

    ``library_name="peft"`` and ``base_model`` mark a LoRA adapter folder the way the Hub expects."""
    rows = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    base = f"base_model: {base_model}\n" if base_model else ""
    return (f"---\nlibrary_name: {library_name}\n{base}tags: [acceltrain]\n---\n\n# {title}\n\n{summary}\n\n"
            f"| | |\n|---|---|\n{rows}\n\n## Usage\n\n```python\n{usage.strip()}\n```\n")
