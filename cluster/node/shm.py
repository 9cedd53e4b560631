"""Named semaphores a killed run leaves in /dev/shm (standard library only; the probe ships it as
source to the hosts, so it imports what it needs itself).

Python's multiprocessing, with the "spawn" or "forkserver" start method (the warm start's fork
server, cluster/node/warmworker.py; torchrun's Event and result queues there), keeps each Lock,
Semaphore, Event or Queue as a named POSIX semaphore, a file /dev/shm/sem.mp-*. It is unlinked
when its object is freed, or at the latest by the resource tracker when the processes that hold
it are gone. A stop or a gang that KILLs the whole group kills the tracker too, and every file
is left behind for good (9 per run of 2 ranks).
"""
from __future__ import annotations


def remove_left_semaphores(state_dir: str) -> list:
    """Remove the named semaphores that a run on this host made and left: files /dev/shm/sem.mp-*
    of this user, made since the run's agent started here (the ``started`` of its pid file in
    ``state_dir``) and mapped by no live process (/proc/PID/maps). A semaphore that a process
    still uses is mapped by it (making or opening one maps it, before its name appears), so
    another run's, or anyone's in use, stays; so does everything older than the run. Returns the
    names removed."""
    import glob
    import json
    import os
    starts = []
    for f in glob.glob(os.path.join(glob.escape(state_dir), "*.pid")):
        try:
            with open(f) as fh:
                starts.append(float(json.load(fh)["started"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not starts:
        return []       # the run never started here: nothing of it to remove
    new = {}
    for path in glob.glob("/dev/shm/sem.mp-*"):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        # ctime: set when the file is made (linked into /dev/shm; os.stat has no birth time on
        # Linux), from the kernel's coarse clock, a few ms behind time.time(): hence the second
        if st.st_uid == os.geteuid() and st.st_ctime >= min(starts) - 1.0:
            new[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = path
    if not new:
        return []
    # by device and inode, not by name: the maker maps the file under the temporary name it had
    # before sem_open linked it as sem.mp-* (maps shows "/dev/shm/sem.XXXXXX (deleted)"). Read
    # after listing: whatever was listed was already mapped by its maker.
    mapped = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", "rb") as fh:
                lines = [line for line in fh if b" /dev/shm/" in line]
        except OSError:         # gone, or another user's (it cannot open our 0600 files)
            continue
        for line in lines:      # start-end perms offset major:minor inode path
            f = line.split(None, 5)
            major, minor = f[3].split(b":")
            mapped.add((int(major, 16), int(minor, 16), int(f[4])))
    removed = []
    for key, path in new.items():
        if key not in mapped:
            try:
                os.unlink(path)
                removed.append(os.path.basename(path))
            except OSError:
                pass
    return removed
