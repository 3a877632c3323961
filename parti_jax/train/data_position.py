"""A checkpointable data position for counter-driven numpy iterators (no TensorFlow).

The synthetic and shapes-world iterators draw every batch from (settings, step),
so their whole position is one counter. `StepPositionIterator` saves it as
`<path>.json` next to the settings that make batches reproducible, and a
restore with other settings fails naming the one that differs, instead of
silently resuming on other data.
"""

from __future__ import annotations

import json
import os
from typing import Any


class StepPositionIterator:
    """Base for iterators whose position is `self.step`; subclasses define `_description`."""

    step: int = 0

    def __iter__(self) -> StepPositionIterator:
        return self

    def _description(self) -> dict[str, Any]:
        """The settings a saved position is valid for (JSON values)."""
        raise NotImplementedError

    def save(self, path: str) -> None:
        """Writes the step and the settings to `<path>.json` (the Checkpointer's data hook)."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path + ".json", "w") as f:
            json.dump({"step": self.step, **self._description()}, f)

    def restore(self, path: str) -> None:
        """Reads `<path>.json`; fails if it was saved with other data settings."""
        with open(path + ".json") as f:
            saved = json.load(f)
        for k, v in self._description().items():
            if saved.get(k) != v:
                raise ValueError(
                    f"{path}.json: data position saved with {k}={saved.get(k)!r}, this run "
                    f"has {k}={v!r}; resume with the same data settings"
                )
        self.step = int(saved["step"])
