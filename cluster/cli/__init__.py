"""``python -m cluster <verb>``: one small module per verb (cli/cmd_<verb>.py)."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import UserError

VERBS = ("submit", "plan", "status", "logs", "stop", "doctor", "report", "exec", "gpus", "shell", "jupyter",
         "image")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster",
                                 description="Run PyTorch DDP jobs on this machine, SSH hosts or SLURM.")
    sub = ap.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    mods = {}
    for verb in VERBS:
        mod = importlib.import_module(f"{__name__}.cmd_{verb}")
        p = sub.add_parser(verb, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        mods[verb] = mod
    argv = list(sys.argv[1:] if argv is None else argv)
    tail = None
    if "--" in argv:       # exec/jupyter: everything after '--' is the command, even after a RUN
        i = argv.index("--")
        argv, tail = argv[:i], argv[i + 1:]
    args, extra = ap.parse_known_args(argv)
    if tail is not None:
        if not hasattr(args, "command"):
            ap.error(f"'{args.verb}' takes no command after '--'")
        args.command = list(args.command) + tail
    # key=value overrides may come after options too (submit resnet50 --follow train.lr=0.1)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            ap.error("unrecognized arguments: " + " ".join(extra))
        args.overrides = list(args.overrides) + extra
    try:
        return mods[args.verb].run(args) or 0
    except UserError as e:
        print(e.render(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_target(p: argparse.ArgumentParser) -> None:
    """The options that pick what to run and where (shared by submit, plan, doctor)."""
    p.add_argument("job", help="job name (jobs/<name>.yaml) or a path to a job file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override job settings, e.g. train.batch_size=32 nodes=2 (train keys may omit 'train.')")
    p.add_argument("-i", "--inventory", help="inventory file (default: inventory.yaml)")
    p.add_argument("-b", "--backend", help="local, ssh or slurm (default: from the inventory)")
