"""The benchmark suite: ``python -m tools.bench`` (``--quick`` for a smoke run).

Every figure is measured against a raw baseline in the same run and on the same PostgreSQL
(raw asyncpg doing the same SQL work without the api), so that a noisy machine still gives an
honest ratio. The api and executors run as real subprocesses; the load generator is this
process (asyncio, grpc.aio). On a 2-core machine the generator competes with the server for
CPU, which lowers our side more than the raw side: the notes say so where it matters.

One module per scenario (``ingest``, ``pipeline``, ``read``, ``latency``; memory is measured
inside ``pipeline``), ``report`` for statistics and the table, ``fixture`` for PostgreSQL and
the processes, ``load`` for the load generators, ``capture`` for the SQL the store issues.
"""

import os

# The benchmark starts subprocesses while gRPC threads run; gRPC's fork handlers would only
# log a warning about it (nothing here forks a process that uses gRPC).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
