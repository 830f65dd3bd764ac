"""splitlora: split federated fine-tuning of Hugging Face causal LMs with LoRA.

The public API (see docs/api.md). Names are imported on first use (PEP 562), so ``import splitlora``
loads neither torch nor transformers::

    import splitlora
    cfg = splitlora.RunConfig(algorithm="splitlora", model="tiny-gpt2", clients=4, steps=20)
    result = splitlora.train(cfg, "runs/demo")      # every party in this process
    splitlora.serve(cfg, splitlora.ServeOptions(...), "runs/served")   # the server of a gRPC deployment
    splitlora.run_client(splitlora.ClientOptions(...))                 # one data owner

A new algorithm is an :class:`Algorithm` subclass registered with :func:`register_algorithm`; a new
aggregation rule a function registered with :func:`register_aggregator`; a client-side defence a class
registered with :func:`register_defence`; a model family an :class:`Architecture` registered with
:func:`register_architecture`. Packages register theirs through the entry-point groups
``splitlora.algorithms``, ``splitlora.aggregators``, ``splitlora.defences`` and ``splitlora.architectures``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    # configuration
    "RunConfig": "config", "LoraSide": "config", "Privacy": "config", "Aggregation": "config",
    "ServeOptions": "config", "ClientOptions": "config", "RayOptions": "config", "UserError": "errors",
    # running
    "train": "simulation.run", "RunResult": "runtime.loop", "serve": "transport.serve", "run_client": "transport.remote_client",
    # writing an algorithm
    "Algorithm": "algorithms.base", "StepResult": "algorithms.base", "weighted_loss": "algorithms.base",
    "SplitLoRA": "algorithms.splitlora", "SplitLearning": "algorithms.sl", "FedLoRA": "algorithms.fed",
    "CentralisedLoRA": "algorithms.cen",
    "Grid": "runtime.grid", "ClientInfo": "runtime.grid", "ask_all": "runtime.grid", "gather": "runtime.grid",
    "ClientApp": "runtime.client", "Averaged": "runtime.aggregator", "fedavg": "runtime.aggregator",
    "Aggregator": "runtime.aggregator", "Protector": "privacy.defences", "Architecture": "models.split",
    # the messages that cross between parties
    **{name: "messages" for name in ("Forward", "Backward", "Tail", "LocalStep", "Upload", "Load", "HandOut",
                                     "Handover", "HandIn", "Sync", "Finish", "Activations", "TailGrad", "StepDone",
                                     "AdapterUpdate")},
    # the registries
    **{name: "registry" for name in ("register_algorithm", "register_aggregator", "register_defence",
                                     "register_architecture", "ALGORITHMS", "AGGREGATORS", "DEFENCES",
                                     "ARCHITECTURES")},
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'splitlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
