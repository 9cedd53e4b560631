"""``cluster tensorboard RUN [RUN ...]``: TensorBoard on this machine over the runs' event files
(runs/<id>/metrics/tb/rank<R>/, written by train/ and synced from the hosts by the watcher)."""
import signal
import socket
import subprocess
import sys
import time

from cluster.errors import UserError

HELP = "serve the TensorBoard event files of one or more runs on this machine and print the URL"


def add_arguments(p):
    p.add_argument("runs", nargs="*", metavar="RUN", help="run ids, prefixes or job names (default: the latest run)")
    p.add_argument("--port", type=int, default=6006, help="local port (default 6006; 0: any free one)")


def run(args):
    from cluster.run.records import resolve
    from cluster.backends import backend_for
    runs = [resolve(a) for a in (args.runs or [None])]
    spec = []
    for r in runs:
        be = backend_for(r)
        be.collect_metrics(r)       # ssh: the hosts' newest event files first
        tb = r.dir / "metrics" / "tb"
        if not any(tb.glob("rank*/events.out.tfevents.*")):
            raise UserError(f"run {r.id} has no TensorBoard event files ({tb})",
                            hint="train/ writes them when the tensorboard package is installed on the hosts "
                                 "(train.tensorboard=true makes that a requirement)")
        spec.append(f"{r.id}:{tb}")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("the tensorboard package is not installed here", hint="pip install tensorboard") from None
    port = args.port or _free_port()
    argv = [sys.executable, "-m", "tensorboard.main", "--logdir_spec", ",".join(spec),
            "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "5"]
    # TERM stops this process as Ctrl-C does (the server with it); were it killed outright, the
    # kernel TERMs the server (parent-death signal)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log = runs[0].dir / "state" / "tensorboard.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:      # a file, not a pipe: nobody reads it while the server runs
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
    try:
        deadline = time.time() + 60
        while not _listening(port):
            if proc.poll() is not None or time.time() > deadline:
                err = log.read_text(errors="replace").strip()[-500:] if proc.poll() is not None else "timed out"
                raise UserError(f"TensorBoard did not start on port {port}: {err}",
                                hint=f"another port: --port P (0: any free one); its log: {log}")
            time.sleep(0.2)
        print(f"TensorBoard for {', '.join(r.id for r in runs)}: http://127.0.0.1:{port}/  (Ctrl-C stops it)",
              flush=True)
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass        # not Linux: Ctrl-C and TERM still stop it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False
