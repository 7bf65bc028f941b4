"""A store with a made-up image and the fake backend: the layers above the seam, without QEMU."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

from pinnace import AsyncPinnace
from pinnace.backends.fake import FakeBackend
from pinnace.store import Store

DIGEST = "f" * 64


def fake_store(tmp_path, backend: FakeBackend | None = None) -> AsyncPinnace:
    """An AsyncPinnace over ``tmp_path`` with image "default" (empty files) and a fake VMM.
    The store is reached through a short link in /tmp: pytest's paths are too long for
    the unix sockets inside a store."""
    (tmp_path / "home").mkdir()
    link = Path(tempfile.mkdtemp(prefix="pn-", dir="/tmp")) / "h"
    link.symlink_to(tmp_path / "home")
    atexit.register(shutil.rmtree, link.parent, True)
    store = Store(link)
    store.ensure()
    files = store.image_files(DIGEST)
    files.dir.mkdir(parents=True)
    for p in (files.kernel, files.initrd, files.rootfs):
        p.write_bytes(b"")
    files.manifest.write_text(json.dumps({"digest": DIGEST, "created": 0}))
    store.image_ref("default").write_text(DIGEST + "\n")
    return AsyncPinnace(store.home, backend=backend or FakeBackend())


def arun(pn: AsyncPinnace, coro) -> object:
    """Run ``coro`` in a fresh loop, then end the fake backend's machines in that loop."""
    import asyncio

    async def main():
        try:
            return await coro
        finally:
            await pn.backend.close()

    return asyncio.run(main())
