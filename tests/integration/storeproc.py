"""``python -m tests.integration.storeproc URL``: open a store once, when told to.

A subprocess of the schema race test: it imports everything and reads the migrations first,
prints ``ready``, waits for a line on stdin, then opens (and closes) the store, so that the
test can start several of them at the same moment. Exits 0 on success; a failure's
traceback goes to stderr.
"""

from __future__ import annotations

import asyncio
import sys

from aeventor.backends.stores import open_store
from aeventor.backends.stores.migrations import load_scripts


async def main(url: str) -> None:
    await load_scripts()
    db = open_store(url, program="race")
    # The stdin line: read in a thread, so that this process's loop is as it is in use.
    print("ready", flush=True)  # noqa: T201 - the test reads it
    await asyncio.to_thread(sys.stdin.readline)
    async with db:
        pass


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
