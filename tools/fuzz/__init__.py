"""``python -m tools.fuzz``: property-based fuzzing of every RPC against a real api and executor.

Hypothesis draws requests for every method of every ``automation.v1`` service (found by
walking the service descriptors, so a new RPC is fuzzed without changes here), leaning on
edges: deep and big JSON, odd unicode, NUL, non-finite numbers, int64 extremes, unknown enum
numbers, near-miss references, page tokens of other lists, and raw corrupt bytes. Ordinary
traffic runs beside it; at the end the run checks the processes, their logs, their memory
and the database against what was acknowledged. Modules, one concept each:

- ``catalog``: every RPC, from the descriptors;
- ``strategies``: the request strategies (descriptor walkers, edges, scenarios, the pool of
  values seen in answers);
- ``invariants``: what each answer must satisfy, what must not be touched, regression files;
- ``runner``: the engine (a hypothesis generator thread feeding asyncio workers);
- ``known``: known-nasty requests replayed first, and the recorded regressions;
- ``traffic``: the ordinary traffic;
- ``processes``: PostgreSQL, the api and the executor, and their memory;
- ``harness``: one run, start to end, and its checks; ``report``: the summary.
"""

import os

# The run starts subprocesses while gRPC threads run; gRPC's fork handlers would only log
# that they are skipped (the children exec at once).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
