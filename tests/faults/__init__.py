"""Fault injection: lost acknowledgements, outages, frozen and racing agents.

GitHub issue #8, "Faults lose nothing and run nothing twice". Every test here injects a real
fault into real processes and real databases and asserts the run's final outcome, that each
step ran exactly once (steps append a line to a journal per execution: :mod:`.steps`), and
that no step run is left ``active``.

Infrastructure:

- :mod:`.proxy`: a loopback TCP proxy in front of Postgres or MariaDB that lets a chosen
  ``COMMIT`` through and then cuts the connection before its acknowledgement returns; it can
  also refuse or stall new connections.
- :mod:`.cuts`: the rules that choose that ``COMMIT`` (:mod:`.sql`: the store's statements).
- :mod:`.lostack`: the same fault for sqlite, where a chosen transaction commits and then
  raises ``ConnectionLost``.
- :mod:`.pgcluster`: a private Postgres cluster the tests stop and start (outages), so the
  shared server is never touched.
- :mod:`.conftest`: the fixtures; :mod:`.checks`: the assertions every test makes.
"""
