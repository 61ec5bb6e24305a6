"""A dict that forgets its oldest entries beyond a size: the operator's caches stay bounded however many
objects, digests and versions a long-running process sees (docs/scale.md)."""

from __future__ import annotations

from collections import OrderedDict


class BoundedDict(OrderedDict):
    """Insertion-ordered; setting a key makes it the newest and drops the oldest beyond `maxsize`."""

    def __init__(self, maxsize: int = 4096):
        super().__init__()
        self.maxsize = maxsize

    def __setitem__(self, key, value) -> None:
        if key in self:
            self.move_to_end(key)
        super().__setitem__(key, value)
        while len(self) > self.maxsize:
            self.popitem(last=False)
