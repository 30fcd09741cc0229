"""``python -m tools.chaos``: a fault-injection harness for the whole pipeline.

It runs PostgreSQL (its own, durable, unless ``DATABASE_URL`` is set), two api processes and
three executors on loopback, drives a bounded stream of events while it kills, restarts and
stalls them on a schedule, waits for the backlog to drain and then checks in SQL that nothing
was lost or done twice. Modules, one concept each:

- ``settings``: the knobs of one run;
- ``processes``: PostgreSQL and the child processes, their logs and their end;
- ``load``: the event stream (idempotent retries) and the rule changes made during it;
- ``faults``: the fault schedule, and the redelivery delay measured after each ``kill -9``;
- ``checks``: the invariants, as SQL over the stored rows and what the load driver was told;
- ``report``: the closing table;
- ``harness``: one run, start to end.
"""
