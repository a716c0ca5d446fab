"""Model families, by the ``model_type`` of their ``config.json``."""

from __future__ import annotations

from jaxgen.models import gemma, gpt2, llama
from jaxgen.models.config import CheckpointError

FAMILIES = {model_type: family for family in (gpt2, llama, gemma) for model_type in family.MODEL_TYPES}


def family_of(model_type: str):
    """The module implementing ``model_type`` (see `jaxgen.models.model` for what it provides)."""
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type={model_type!r} is not supported; jaxgen runs "
                              f"{', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
