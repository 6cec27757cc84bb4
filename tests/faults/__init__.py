"""Fault injection: lost acknowledgements, outages, frozen and racing agents.

GitHub issue #8, "Faults lose nothing and run nothing twice". Every test here injects a real
fault into real processes and real databases and asserts the run's final outcome, that each
step ran exactly once (steps append a line to a journal per execution: :mod:`.steps`), and
that no step run is left ``active``. Every wait has a deadline: a hang fails, never blocks.

Infrastructure:

- :mod:`.proxy`: a loopback TCP proxy in front of Postgres or MariaDB that lets a chosen
  ``COMMIT`` through and then cuts the connection before its acknowledgement returns (or holds
  the acknowledgement); it can also refuse or stall new connections.
- :mod:`.cuts`: the rules that choose that ``COMMIT``; :mod:`.sql`: the store's statements
  they match.
- :mod:`.lostack`: the same fault for sqlite: a chosen transaction commits, then raises
  ``ConnectionLost``.
- :mod:`.pgcluster`: a private Postgres cluster the tests stop, start and restart (outages),
  so the shared server is never touched.
- :mod:`.conftest`: the fixtures; :mod:`.checks`: the programs and the final assertions.

Tests:

- :mod:`.test_lost_ack`: lost acknowledgements of a run's first transaction, a claim, a
  step's start and its completion: standalone on Postgres, MariaDB and sqlite, and with
  agents on Postgres and MariaDB.
- :mod:`.test_outage`: the private cluster down for longer than the lease under two agents.
- :mod:`.test_frozen_agent`: an agent SIGSTOPped past its lease while its step runs.
- :mod:`.test_claimed_never_started`: an agent SIGSTOPped between its claim and the step's
  start.
- :mod:`.test_poisoned_program`: a program row whose definition is ``'{}'``.
- :mod:`.test_race`: four agents over a 1,000-step fan-out.
- :mod:`.test_infrastructure`: the injectors themselves.
"""
