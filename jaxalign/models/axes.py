"""Logical sharding axes of every parameter a jaxalign model holds (see ``jaxalign.sharding.RULES``): the decoder's,
the reward head's and PPO's value head's. Train states, checkpoints and the planner place parameters through this one
table."""
from __future__ import annotations

from typing import Any

from jaxalign.models.decoder import LOGICAL_AXES
from jaxalign.models.reward import SCORE_AXES
from jaxalign.models.value import VALUE_AXES, VALUE_HEAD

PARAM_AXES: dict[str, tuple[str | None, ...]] = {**LOGICAL_AXES, "score": SCORE_AXES, VALUE_HEAD: VALUE_AXES}


def param_axes(params: dict[str, Any]) -> dict[str, tuple[str | None, ...]]:
    """The logical axes of each entry of a parameter dict (KeyError for a name no model defines)."""
    return {k: PARAM_AXES[k] for k in params}
