"""The service's waiting jobs: first in, first out per client, clients served in turn.

One client's batch of twenty jobs cannot starve another client's single job: each time a worker is
free, the next job comes from the client whose turn it is, and that client then goes to the back of
the rotation. With one client (a service without keys, where every job is ``local``'s) this is plain
FIFO. Example::

    q = FairQueue()
    for job in ("a1", "a2", "a3"):
        q.append("alice", job)
    q.append("bob", "b1")
    q.order()        # ['a1', 'b1', 'a2', 'a3']
    q.position("a3") # 4 (1 = next to run)
"""

from __future__ import annotations

from collections import OrderedDict, deque


class FairQueue:
    """Waiting job ids, FIFO per owner, owners served round-robin."""

    def __init__(self) -> None:
        self._by_owner: OrderedDict[str, deque[str]] = OrderedDict()  # rotation order: next owner first
        self._owner: dict[str, str] = {}  # job -> owner

    def __len__(self) -> int:
        return len(self._owner)

    def __contains__(self, job: object) -> bool:
        return job in self._owner

    def append(self, owner: str, job: str) -> None:
        """Queue ``job`` behind ``owner``'s other waiting jobs; a new owner joins the back of the rotation."""
        self._by_owner.setdefault(owner, deque()).append(job)
        self._owner[job] = owner

    def count(self, owner: str) -> int:
        """How many jobs ``owner`` has waiting."""
        return len(self._by_owner.get(owner, ()))

    def remove(self, job: str) -> None:
        """Take a waiting job out (cancelled); ValueError if it is not waiting."""
        owner = self._owner.pop(job, None)
        if owner is None:
            raise ValueError(f"job {job} is not waiting")
        jobs = self._by_owner[owner]
        jobs.remove(job)
        if not jobs:
            del self._by_owner[owner]

    def pop(self) -> str | None:
        """The next job to run (None when none waits); its owner moves to the back of the rotation."""
        if not self._by_owner:
            return None
        owner, jobs = next(iter(self._by_owner.items()))
        job = jobs.popleft()
        del self._owner[job]
        if jobs:
            self._by_owner.move_to_end(owner)
        else:
            del self._by_owner[owner]
        return job

    def push_front(self, owner: str, job: str) -> None:
        """Put back a popped job that could not be handed to a worker: it is the next to run again."""
        self._by_owner.setdefault(owner, deque()).appendleft(job)
        self._by_owner.move_to_end(owner, last=False)
        self._owner[job] = owner

    def order(self) -> list[str]:
        """Every waiting job in the order they would start if nothing else arrived."""
        queues = [list(jobs) for jobs in self._by_owner.values()]
        out: list[str] = []
        for turn in range(max((len(q) for q in queues), default=0)):
            out.extend(q[turn] for q in queues if turn < len(q))
        return out

    def positions(self) -> dict[str, int]:
        """job -> its place in ``order()``, counting from 1 (1 = the next job to start)."""
        return {job: i + 1 for i, job in enumerate(self.order())}
