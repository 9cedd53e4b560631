"""The merger: whole lines only, resumes from byte offsets, filters by the line's [host rank]."""
from cluster.backends.base import LogSource
from cluster.run.logs import Merger


class Grow(LogSource):
    def __init__(self, name):
        self.name, self.data, self.down = name, b"", False

    def read(self, offset):
        if self.down:
            raise OSError("connection reset")
        return self.data[offset:]


def test_partial_lines_wait_and_a_dropped_source_catches_up():
    a = Grow("node1")
    m = Merger([a])
    a.data = b"[node1 0] one\n[node1 0] tw"
    assert m.poll() == ["[node1 0] one"]
    a.down = True
    a.data += b"o\n[node1 1] three\n"
    assert m.poll() == []
    a.down = False
    assert m.poll() == ["[node1 0] two", "[node1 1] three"]


def test_filters_by_host_rank_and_pattern_from_the_prefix():
    # SLURM's sources are per task, not per host: the prefix decides
    t0, t1 = Grow("rank0"), Grow("rank1")
    t0.data = b"[node1 0] loss 1\n[node1 agent] started\n"
    t1.data = b"[node2 1] loss 2\n"
    assert Merger([t0, t1], host="node2").poll() == ["[node2 1] loss 2"]
    assert Merger([t0, t1], rank=0).poll() == ["[node1 0] loss 1"]
    assert Merger([t0, t1], pattern="loss").poll() == ["[node1 0] loss 1", "[node2 1] loss 2"]
