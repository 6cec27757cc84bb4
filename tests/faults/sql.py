"""Regular expressions that pick the store's transactions by the SQL they run.

They match what SQLAlchemy renders for the statements of
:mod:`aeventor.backends.stores.base` on each backend (Postgres: bound ``$n::TYPE``
placeholders; MySQL: values inlined; sqlite: ``?``):

- :data:`CLAIM`: ``Database.claim``, the only update that sets a step run's worker
  (``UPDATE aeventor_step_run SET status=..., worker=...``; on MySQL after a locking
  ``SELECT``). Step runs claimed as they are made (a completion that claims the next step)
  are inserted so, and belong to the completion's transaction.
- :data:`CREATE_RUN`: ``transactions.create_run``, the run's first transaction (it inserts
  the run row, fires the initial triggers and may claim the first step runs).
- :data:`STARTED`: ``transactions.started``, which records the step's pid
  (``UPDATE aeventor_step_run SET pid=...``).
- :data:`COMPLETE`: ``transactions.complete`` (and the reaper's and ``fail_untrusted``'s
  end of a step run): ``UPDATE aeventor_step_run SET status=..., ..., result=...``. Only
  ending a step run sets ``result``.
"""

from __future__ import annotations

CLAIM = r"UPDATE aeventor_step_run SET status=[^,]+, worker="
CREATE_RUN = r"INSERT INTO aeventor_run \("
STARTED = r"UPDATE aeventor_step_run SET pid="
COMPLETE = r"UPDATE aeventor_step_run SET status=.*\bresult="
