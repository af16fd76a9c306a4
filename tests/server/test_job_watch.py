"""A job's event stream (``JobQueue.watch``) always ends with the job's finished state, however close
the finish comes to the state before it: clients (the CLI sent to a server, the studio, SSE readers) show
the last state they were sent."""

import asyncio
from types import SimpleNamespace

from lienzo.server.jobs import JobQueue


def test_a_job_that_finishes_while_a_state_is_sent_is_sent_finished():
    async def scenario() -> list[bool]:
        queue = JobQueue.__new__(JobQueue)  # watch and _notify need only the loop: no workers, no store
        queue._loop = asyncio.get_running_loop()
        job = SimpleNamespace(_changed=None, is_finished=False, version=0)
        seen = []
        async for state in queue.watch(job):
            seen.append(state.is_finished)
            if not state.is_finished:
                # The worker finishes the job while the caller is still sending the running state.
                job.is_finished = True
                queue._notify(job)
        return seen

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == [False, True]
