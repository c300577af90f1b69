"""Serving the edited model over HTTP (`memoir serve`): the app and its OpenAI-style routes, the
batching engine, the follower that installs new memory snapshots, and `load()` for Python users:

    from serving import load

Depends on `memoir`, `store` and `pipeline`, never on `workers`. Importing the package imports
nothing heavy (`memoir --help` stays fast); `load` and `ServedModel` come from `serving.model`.
"""

from typing import Any

__all__ = ["ServedModel", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from serving import model

        return getattr(model, name)
    raise AttributeError(name)
