"""The registries a researcher extends: algorithms, aggregation rules, client-side defences, model families.

A registry maps a name to an object. Built-in entries are named here as ``"module:attribute"`` (the
form of an entry point) and imported on first use, so the config can check a name without importing
the engine. A third-party package adds its own in one of two ways:

* in code: ``register_algorithm(MyAlgorithm)`` (also a class decorator), ``register_aggregator("name", fn)``,
  ``register_architecture("model_type", Architecture(...))``;
* by declaring an entry point in its ``pyproject.toml``, found without importing it first::

      [project.entry-points."splitlora.algorithms"]
      my-algo = "my_package.algo:MyAlgorithm"

The groups are ``splitlora.algorithms``, ``splitlora.aggregators``, ``splitlora.defences`` and
``splitlora.architectures``.
"""

from __future__ import annotations

import importlib
from collections.abc import MutableMapping
from importlib.metadata import entry_points
from typing import Any, Iterator

from .errors import UserError


class Registry(MutableMapping):
    """``name -> object``; built-ins and entry points are imported when first looked up.

    Names keep their order (built-ins, then entry points and registrations as they come);
    ``registry[name] = obj`` replaces an entry (``monkeypatch.setitem`` in tests), ``del`` removes one.
    """

    def __init__(self, kind: str, group: str, builtins: dict[str, str]):
        self.kind, self.group = kind, group
        self._entries: dict[str, tuple[bool, Any]] = {n: (False, spec) for n, spec in builtins.items()}
        self._scanned = False  # (loaded?, the object or its "module:attribute")

    def register(self, name: str, obj: Any, *, replace: bool = False) -> Any:
        if not replace and name in self:
            raise ValueError(f"{self.kind} {name!r} is already registered (pass replace=True to override it)")
        self._entries[name] = (True, obj)
        return obj

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def check(self, name: str, where: str) -> None:
        """A one-line :class:`UserError` when ``name`` is unknown."""
        if name not in self:
            raise UserError(f"{where} must be one of {', '.join(self)} (got {name!r})")

    def _scan(self) -> None:
        if self._scanned:
            return
        self._scanned = True
        for ep in entry_points(group=self.group):
            self._entries.setdefault(ep.name, (False, ep.value))

    def __getitem__(self, name: str) -> Any:
        self._scan()
        loaded, value = self._entries[name]
        if loaded:
            return value
        module, _, attribute = value.partition(":")
        try:
            obj = importlib.import_module(module)
            for part in attribute.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise UserError(f"{self.kind} {name!r}: cannot load {value} ({exc})") from None
        self._entries[name] = (True, obj)
        return obj

    def __setitem__(self, name: str, obj: Any) -> None:
        self.register(name, obj, replace=True)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._scan()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._scan()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._scan()
        return len(self._entries)


ALGORITHMS = Registry("algorithm", "splitlora.algorithms", {
    "splitlora": "splitlora.algorithms.splitlora:SplitLoRA",
    "sl": "splitlora.algorithms.sl:SplitLearning",
    "fed": "splitlora.algorithms.fed:FedLoRA",
    "cen": "splitlora.algorithms.cen:CentralisedLoRA",
})

# An ``Aggregator`` subclass (built with the run's ``Aggregation``; keeps state across rounds) or a plain
# ``fn(uploads, current, rules, min_clients) -> Averaged`` (see splitlora.runtime.aggregator)
AGGREGATORS = Registry("aggregation rule", "splitlora.aggregators", {
    name: f"splitlora.runtime.aggregator:{cls}" for name, cls in (
        ("fedavg", "Aggregator"), ("median", "Median"), ("trimmed-mean", "TrimmedMean"), ("krum", "Krum"),
        ("multi-krum", "MultiKrum"), ("bulyan", "Bulyan"))
})

# Client-side defences on what leaves a client: ``cls(privacy, seed, device)`` with ``clip(t)`` (in the
# autograd graph) and ``noise(t)`` (on what is sent); see splitlora.privacy.defences.Protector
DEFENCES = Registry("defence", "splitlora.defences", {
    "clip-noise": "splitlora.privacy.defences:Protector",
})

# Model families beyond the table in splitlora.models.split: ``model_type -> Architecture``
ARCHITECTURES = Registry("architecture", "splitlora.architectures", {})


def register_algorithm(cls=None, *, name: str | None = None, replace: bool = False):
    """Register an :class:`~splitlora.algorithms.base.Algorithm` subclass under ``name`` (default: ``cls.name``).

    Usable as ``@register_algorithm``. The name is then valid for ``RunConfig.algorithm`` in ``train``,
    ``serve`` and ``client`` (a client process must register it too, or get it from an entry point).
    """
    if cls is None:
        return lambda c: register_algorithm(c, name=name, replace=replace)
    return ALGORITHMS.register(name or cls.name, cls, replace=replace)


def register_aggregator(name: str, fn=None, *, replace: bool = False):
    """Register an aggregation rule (``RunConfig.aggregation.rule``); usable as ``@register_aggregator("name")``.

    ``fn(uploads, current, rules, min_clients) -> Averaged``: ``uploads`` is a list of ``(client name,
    index, declared samples, state)``, ``current`` the average the round started from, ``rules`` the
    run's :class:`~splitlora.config.Aggregation`.
    """
    if fn is None:
        return lambda f: register_aggregator(name, f, replace=replace)
    return AGGREGATORS.register(name, fn, replace=replace)


def register_defence(name: str, cls=None, *, replace: bool = False):
    """Register a client-side defence (``RunConfig.privacy.defence``); usable as ``@register_defence("name")``.

    ``cls(privacy, seed, device)`` builds one per client; the client calls ``clip(t)`` on every tensor it
    sends (inside the autograd graph: its gradient flows back through it) and ``noise(t)`` on the
    detached result, which is what leaves the client.
    """
    if cls is None:
        return lambda c: register_defence(name, c, replace=replace)
    return DEFENCES.register(name, cls, replace=replace)


def register_architecture(model_type: str, architecture, *, replace: bool = False):
    """Support a model family: ``model_type`` (``config.model_type``) -> its :class:`~splitlora.models.split.Architecture`."""
    return ARCHITECTURES.register(model_type, architecture, replace=replace)
