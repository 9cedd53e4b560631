"""Backends, imported lazily: the local backend needs neither Fabric nor submitit."""
from __future__ import annotations

import importlib

from cluster.errors import UserError

NAMES = ("local", "ssh", "slurm")


def get(name: str, inventory):
    if name not in NAMES:
        raise UserError(f"unknown backend '{name}'", where="BACKEND", hint="use one of: " + ", ".join(NAMES))
    module = name
    if name == "slurm" and getattr(inventory, "login", None) is not None:
        module = "login"        # SLURM through the login node (its SLURM backend runs there)
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ImportError as e:
        raise UserError(f"the {name} backend needs a package that is not installed: {e.name}",
                        hint="run 'make setup' to install the project's dependencies") from None
    return mod.BACKEND(inventory)


def backend_for(run):
    """The backend a recorded run was launched with, with the inventory recorded in run.json."""
    from cluster.spec.config import inventory_from_plain
    inv = inventory_from_plain(run.data["inventory"])
    if run.data["backend"] == "slurm" and inv.login is not None:
        from cluster.backends.login import LoginBackend
        return LoginBackend.for_run(run, inv)       # with the run's code and python there
    return get(run.data["backend"], inv)
