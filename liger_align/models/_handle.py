"""Reversible, reference-counted attribute patches and the handle that undoes them.

Every patch this package makes is ``setattr(owner, name, new)`` on a class, a module object or an
``nn.Module`` instance. The first patch of ``(owner, name)`` remembers what ``owner`` itself held (or
that it held nothing, so the attribute was inherited); later patches of the same attribute only
count up, so patching twice changes nothing and the original comes back when the last handle reverts.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

_MISSING = object()
_LOCK = threading.Lock()


@dataclass
class _Entry:
    owner: Any
    name: str
    original: Any
    count: int


_REGISTRY: dict[tuple[int, str], _Entry] = {}


def _restore(entry: _Entry) -> None:
    if entry.original is _MISSING:
        if entry.name in vars(entry.owner):
            delattr(entry.owner, entry.name)
    else:
        setattr(entry.owner, entry.name, entry.original)


def patch_attr(owner: Any, name: str, new: Any) -> Callable[[], None]:
    """Set ``owner.name = new`` (once per ``(owner, name)``) and return the matching undo."""
    key = (id(owner), name)
    with _LOCK:
        entry = _REGISTRY.get(key)
        if entry is None:
            entry = _Entry(owner, name, vars(owner).get(name, _MISSING), 0)
            setattr(owner, name, new)
            _REGISTRY[key] = entry
        entry.count += 1
    done = False

    def undo() -> None:
        nonlocal done
        if done:
            return
        done = True
        with _LOCK:
            entry.count -= 1
            if entry.count == 0:
                _restore(entry)
                del _REGISTRY[key]

    return undo


def is_patched(owner: Any, name: str) -> bool:
    """True while some live handle holds a patch of ``owner.name``."""
    return (id(owner), name) in _REGISTRY


@dataclass
class PatchHandle:
    """What :func:`apply_liger_kernel_to_llama` and friends return.

    ``revert()`` restores what was there before (idempotent); usable as a context manager.
    ``patched`` lists the patched attributes as ``"Owner.name"`` strings, for logs and tests;
    ``family`` is the model type whose patches were applied (``"generic"`` for a model type without
    its own, see :func:`~liger_align.models.apply_liger_kernel`); ``skipped`` says what was left
    unpatched and why; ``summary()`` is one line for a log.
    """

    patched: list[str] = field(default_factory=list)
    _undos: list[Callable[[], None]] = field(default_factory=list, repr=False)
    family: str | None = None
    skipped: list[str] = field(default_factory=list)

    def add(self, owner: Any, name: str, new: Any, label: str) -> None:
        self._undos.append(patch_attr(owner, name, new))
        self.patched.append(label)

    def on_revert(self, undo: Callable[[], None]) -> None:
        """Run ``undo`` when the handle reverts (before the attribute patches added earlier are undone)."""
        self._undos.append(undo)

    def extend(self, other: PatchHandle) -> None:
        """Take over ``other``'s patches (reverted with this handle, after the ones added before)."""
        self.patched.extend(other.patched)
        self._undos.extend(other._undos)
        other.patched, other._undos = [], []

    def summary(self) -> str:
        """E.g. ``"gemma2: 12 patched (model.layers.*.mlp.forward x2, ...); not patched: ..."``."""
        groups = Counter(re.sub(r"\.\d+\.", ".*.", label) for label in self.patched)
        parts = [f"{label} x{n}" if n > 1 else label for label, n in groups.items()]
        text = f"{self.family or 'liger_align'}: {len(self.patched)} patched ({', '.join(parts) or 'nothing'})"
        return text + (f"; not patched: {'; '.join(self.skipped)}" if self.skipped else "")

    def revert(self) -> None:
        while self._undos:
            self._undos.pop()()
        self.patched.clear()

    def __enter__(self) -> "PatchHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.revert()
