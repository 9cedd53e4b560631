"""Backends, imported lazily: the local backend needs neither Fabric nor submitit."""
from __future__ import annotations

import importlib

from cluster.errors import UserError

NAMES = ("local", "ssh", "slurm")


def get(name: str, inventory):
    if name not in NAMES:
        raise UserError(f"unknown backend '{name}'", where="BACKEND", hint="use one of: " + ", ".join(NAMES))
    try:
        mod = importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:
        raise UserError(f"the {name} backend needs a package that is not installed: {e.name}",
                        hint="run 'make setup' to install the project's dependencies") from None
    return mod.BACKEND(inventory)


def backend_for(run):
    """The backend a recorded run was launched with, with the inventory recorded in run.json."""
    from cluster.spec.config import inventory_from_plain
    return get(run.data["backend"], inventory_from_plain(run.data["inventory"]))
