"""Choosing a deployment for a model name.

`simple-shuffle` is LiteLLM's default: a random pick, weighted by `weight`, else `rpm`, else
`tpm` when the deployments of a group set them. The tables are built once per config.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from itertools import accumulate

from llmux_extproc.config import Config, Deployment


class Router:
    def __init__(self, config: Config) -> None:
        groups: dict[str, list[Deployment]] = {}
        for dep in config.deployments:
            groups.setdefault(dep.model_name, []).append(dep)
        self._groups = {
            name: (tuple(deps), tuple(accumulate(_weights(deps)))) for name, deps in groups.items()
        }

    def __contains__(self, model: str) -> bool:
        return model in self._groups

    def pick(self, model: str) -> Deployment:
        deps, cumulative = self._groups[model]
        if len(deps) == 1:
            return deps[0]
        return random.choices(deps, cum_weights=cumulative)[0]

    def deployments(self, model: str) -> Sequence[Deployment]:
        return self._groups[model][0]


def _weights(deps: list[Deployment]) -> list[float]:
    if any(d.weight != 1 for d in deps):
        return [d.weight for d in deps]
    for attr in ("rpm", "tpm"):
        values = [getattr(d, attr) for d in deps]
        if all(v for v in values):
            return [float(v) for v in values]
    return [1.0] * len(deps)
