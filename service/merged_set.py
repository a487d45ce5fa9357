"""The merged set: the adapter set written into the base weights right now, and the switches that change it.

The worker and the mixed-batch scheduler both switch the weights; both go through this one object, so the
active key, the cache pin and the switch metrics stay in step. It sits below both and calls neither.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable
from typing import Any

from shira_core.switcher import ScatterPlan, Switcher

from . import metrics
from .types import BASE_KEY


class MergedSet:
    """Which set is in the weights, and switching to another.

    Args:
        switcher: the Switcher bound to the model.
        cache: the AdapterCache; the plan in the weights is pinned in it (never evicted).
    """

    def __init__(self, switcher: Switcher, cache: Any) -> None:
        self.switcher, self.cache = switcher, cache
        self.key: Hashable = BASE_KEY if switcher.active is None else ("unknown",)
        self.label = "base"
        self.switches: Counter[str] = Counter()
        self.clock = 0.0  # seconds spent switching, ever; a request reports the part it lived through

    def switch(self, key: Hashable, plan: ScatterPlan | None) -> float:
        """Writes the set of `key` into the weights (`plan` None: the base); returns the seconds it took."""
        if key == BASE_KEY or plan is None:
            result = self.switcher.revert()
            self.cache.pin(None)
            key, label = BASE_KEY, "base"
        else:
            result = self.switcher.apply(plan)
            self.cache.pin(("plan", key))
            label = plan.label
        self.key, self.label = key, label
        self.clock += result.seconds
        if result.kind != "noop":
            self.switches[result.kind] += 1
            metrics.SWITCH_SECONDS.labels(result.kind).observe(result.seconds)
            active = self.switcher.active
            metrics.ACTIVE_ADAPTER.info({"label": label, "nnz": str(active.nnz if active else 0)})
            for part, nbytes in self.switcher.memory().items():
                metrics.SWITCHER_BYTES.labels(part).set(nbytes)
        return result.seconds
