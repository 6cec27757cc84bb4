"""The example program of the design notes, on embedded sqlite.

Adapted only as far as asyncio requires: ``ev.run()`` is awaited inside ``main()``. The
steps run as subprocesses that import ``prog`` from this script (the run itself is under
``if __name__ == "__main__":``, so the subprocesses do not start it again).

Run it with ``python examples/distribution_notes.py``.
"""

import asyncio
import logging
import os

import aeventor as evr

logger = logging.getLogger(os.getenv("EVENTOR_LOGGER_NAME", __name__))


def prog(progname):
    logger.info("doing what %s is doing", progname)
    logger.info("EVENTOR_STEP_SEQUENCE: %s", os.getenv("EVENTOR_STEP_SEQUENCE"))
    return progname


async def main():
    # The default store: the sqlite file distribution_notes.run.db in the working directory.
    async with evr.Eventor(logging_level=logging.DEBUG) as ev:
        ev1s = ev.add_event("run_step1")
        ev2s = ev.add_event("run_step2")
        ev3s = ev.add_event("run_step3")

        s11 = ev.add_step("s11", host="s1", func=prog, kwargs={"progname": "prog11"},
                          triggers={evr.StepStatus.success: (ev2s,)})
        s12 = ev.add_step("s12", host="s2", func=prog, kwargs={"progname": "prog12"},
                          triggers={evr.StepStatus.success: (ev2s,)})
        s2 = ev.add_step("s2", host="s2", func=prog, kwargs={"progname": "prog2"},
                         triggers={evr.StepStatus.success: (ev3s,)})
        s3 = ev.add_step("s3", host="s1", func=prog, kwargs={"progname": "prog3"})

        ev.add_assoc(ev1s, s11)
        ev.add_assoc(ev1s, s12)
        ev.add_assoc(ev2s, s2)
        ev.add_assoc(ev3s, s3)

        ev.trigger_event(ev1s, 1)
        result = await ev.run()

    return result


def report(result):
    """Print what each step did: its return value and its log."""
    print(f"run {result.run_id}: {result.status.value}")
    for step_run in sorted(result.steps, key=lambda s: (s.started, s.step)):
        print(f"  {step_run.step:<4} sequence={step_run.sequence} host={step_run.host} "
              f"{step_run.status.value:<8} returned {step_run.result!r}")
        with open(result.log_path(step_run)) as log:
            for line in log:
                print(f"      | {line.rstrip()}")
    return 0 if result else 1


if __name__ == "__main__":
    raise SystemExit(report(asyncio.run(main())))
