"""The design notes' example program in distributed mode.

Steps s11 and s3 are assigned to host s1, s12 and s2 to host s2; the agents serving those
hosts run them. Each step returns what it did and where, so `aeventor show RUN_ID` tells.

    aeventor submit examples/distributed_notes.py:build --store STORE --wait
"""

import logging
import os

import aeventor as evr

logger = logging.getLogger(os.getenv("EVENTOR_LOGGER_NAME", __name__))


def prog(progname):
    logger.info("doing what %s is doing", progname)
    logger.info("EVENTOR_STEP_SEQUENCE: %s", os.getenv("EVENTOR_STEP_SEQUENCE"))
    return {"did": progname, "host": os.getenv("EVENTOR_HOST")}


def build(store=None):
    ev = evr.Eventor(name="distributed_notes", store=store, mode="distributed")

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
    return ev
