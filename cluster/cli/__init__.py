"""``python -m cluster <verb>``: one small module per verb (cli/cmd_<verb>.py)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from cluster.errors import UserError

VERBS = ("submit", "plan", "status", "logs", "stop", "doctor", "report", "exec", "gpus", "shell", "jupyter",
         "top", "tensorboard", "image", "completion")


class _Parser(argparse.ArgumentParser):
    """argparse, with what it echoes of the command line escaped (no control characters reach the terminal)."""

    def error(self, message):
        from cluster.spec.yamlsrc import escape
        super().error(escape(message))


def parser(verbs=VERBS) -> tuple[argparse.ArgumentParser, dict]:
    """The command line of ``verbs`` (default: every verb), and verb -> its module."""
    # the same parser as `python -m cluster` or as the `ddp-cluster` console script (pip install)
    prog = "ddp-cluster" if os.path.basename(sys.argv[0]) == "ddp-cluster" else "python -m cluster"
    ap = _Parser(prog=prog, description="Run PyTorch DDP jobs on this machine, SSH hosts or SLURM.")
    sub = ap.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    mods = {}
    for verb in verbs:
        mod = importlib.import_module(f"{__name__}.cmd_{verb}")
        p = sub.add_parser(verb, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        mods[verb] = mod
    return ap, mods


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # a known verb first: only its module is imported (every verb's imports took about a tenth of
    # a second of each command, `submit` included); anything else (--help, a typo): all of them
    ap, mods = parser(argv[:1] if argv[:1] and argv[0] in VERBS else VERBS)
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
        from cluster.spec.config import check_run_id
        for attr, where in (("run", "RUN"), ("resume", "--resume"), ("run_id", "--run-id")):
            if isinstance(getattr(args, attr, None), str) and getattr(args, attr) != "latest":
                check_run_id(getattr(args, attr), where)
        if getattr(args, "job", "") is None:
            from cluster.spec.config import JOBS_DIR
            known = sorted(p.stem for p in JOBS_DIR.glob("*.yaml"))
            raise UserError("a job is required", where=args.verb, key="JOB",
                            hint=f"{ap.prog} {args.verb} JOB [KEY=VALUE ...]; jobs: " + ", ".join(known))
        return mods[args.verb].run(args) or 0
    except UserError as e:
        print(e.render(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def add_target(p: argparse.ArgumentParser) -> None:
    """The options that pick what to run and where (shared by submit, plan, doctor)."""
    # optional for argparse, required by the verb: without a job, argparse would name the
    # overrides as missing too ("required: job, KEY=VALUE"); main() says what is missing
    p.add_argument("job", nargs="?", help="job name (jobs/<name>.yaml) or a path to a job file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override job settings, e.g. train.batch_size=32 nodes=2 (train keys may omit 'train.')")
    p.add_argument("-i", "--inventory", help="inventory file (default: inventory.yaml)")
    p.add_argument("-b", "--backend", help="local, ssh or slurm (default: from the inventory)")


def seconds(text: str, zero_ok: bool = False) -> float:
    """argparse type of a ``--...-s`` option: finite, more than 0 (or 0 if ``zero_ok``), at most a week."""
    import math
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not (0 <= value if zero_ok else 0 < value) or value > 7 * 24 * 3600:
        least = "0 or more" if zero_ok else "more than 0"
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds, {least} and at most a week")
    return value
