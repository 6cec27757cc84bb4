"""A program whose step takes the one slot of a cluster pool; run as ``python -m
tests.acceptance.poolprog STORE LOG_DIR JOURNAL NAME [RELEASE]``.

Its step ``hold`` records its start and end in JOURNAL (``stepfuncs.occupy``) and, with
RELEASE, waits for that file. The lease is short (2 s), so a killed controller's slot comes
free quickly. Prints the run id when the run ends.
"""

from __future__ import annotations

import sys

import aeventor as evr
from tests.integration import stepfuncs


def main(store: str, log_dir: str, journal: str, name: str, release: str | None) -> None:
    ev = evr.Eventor(name=f"pool_{name}", store=store, log_dir=log_dir, lease=2)
    ev.add_pool("licence", 1, scope="cluster")
    ev.add_event("go")
    ev.add_step(
        "hold", stepfuncs.occupy, kwargs={"journal": journal, "release": release},
        acquires=[("licence", 1)],
    )  # fmt: skip
    ev.add_assoc("go", "hold")
    ev.trigger_event("go", name)
    print(ev.run_sync().run_id)  # noqa: T201 - the test reads it


if __name__ == "__main__":
    main(*sys.argv[1:5], sys.argv[5] if len(sys.argv) > 5 else None)
