"""Farm drills: kill, restart, corrupt and flood a farm of our own, and measure what holds.

``python -m fragjobs.drills --trials 2 --json-out drills.json`` starts a Redis, a PostgreSQL
and moto's S3 server of its own on spare ports of 127.0.0.1, two worker nodes, runs every
drill ``--trials`` times and prints, per drill, jobs submitted / completed / lost /
duplicated and the recovery time; it exits 1 when a target of issue 11 is missed.

* :mod:`~fragjobs.drills.services` — the drill's own Redis, PostgreSQL and S3 server;
* :mod:`~fragjobs.drills.cluster` — the farm's processes (also the integration test's) and
  :class:`~fragjobs.drills.cluster.DrillFarm`;
* :mod:`~fragjobs.drills.tracking` — following jobs, deciding completed / lost / duplicated;
* :mod:`~fragjobs.drills.faults` — the drills, one function each;
* :mod:`~fragjobs.drills.report` — the targets, the table and the JSON;
* :mod:`~fragjobs.drills.command` — the command line.

A top layer: it may use the chain and the farm; nothing in the project imports it.
"""
