"""A job's caches: folders kept between runs as pinnace volumes, keyed by a key the
workflow declares, with ``actions/cache``'s rules.

A saved entry is a volume named ``ci-cache-<name>-<digest of name and key>``, labelled
with the cache's name and key, and it never changes once saved:

- the key's entry exists (an exact hit): the job gets a copy of it, dropped after the
  job; nothing is saved;
- otherwise the job gets a new volume under the key's own name, owned by this process
  (:class:`pinnace.store.Owned`): a copy of the newest entry whose key starts with one of
  ``restore-keys`` (a partial hit), or an empty one. It is saved (its owner dropped) after
  the job succeeds and removed if it does not; a run killed on the way leaves it owned
  by a process that is gone, which ``pinnace gc`` (or the next run with that key)
  removes. While another run still owns it, a job with the same key gets a volume of its
  own that is not saved.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any

from ..errors import AlreadyExistsError, NotFoundError, PinnaceError, VolumeError
from ..store import owner_alive, owner_of

PREFIX = "ci-cache-"
LABEL_NAME = "pinnace.ci.cache"
LABEL_KEY = "pinnace.ci.key"
DEFAULT_SIZE = "8G"  # sparse: a volume takes what its files take


def entry_name(cache: str, key: str) -> str:
    """The volume that holds ``cache``'s entry for ``key`` (at most 63 characters)."""
    digest = hashlib.sha256(f"{cache}\0{key}".encode()).hexdigest()[:20]
    return f"{PREFIX}{cache[:32]}-{digest}"


@dataclass
class Attached:
    """One cache of one job: the volume attached at ``path``, the ``key``, what was
    restored (``hit``: "exact", "partial" or "" for none; ``restored_key``) and whether
    the volume is saved as the key's entry after the job succeeds."""

    name: str
    key: str
    path: str
    volume: str
    hit: str
    restored_key: str
    save: bool

    def describe(self) -> str:
        if self.hit == "exact":
            return f"cache {self.name}: restored from key {self.key}"
        if self.hit == "partial":
            return f"cache {self.name}: restored from key {self.restored_key} (no entry for " \
                   f"{self.key} yet)"
        return f"cache {self.name}: no entry for key {self.key}; starting empty"


class Caches:
    """Cache entries in a store's volumes (an AsyncVolumes)."""

    def __init__(self, volumes: Any) -> None:
        self.volumes = volumes

    def _state(self, name: str) -> tuple[str, str | None]:
        """"saved", "busy" (another live process is filling it), "stale" (its filler is
        gone, or it is damaged) or "absent"; and its owner file's text."""
        try:
            self.volumes.get(name)
        except NotFoundError:
            return "absent", None
        except VolumeError:
            return "stale", owner_of(self.volumes.files(name))
        owner = owner_of(self.volumes.files(name))
        if owner is None:
            return "saved", None
        return ("busy" if owner_alive(owner) else "stale"), owner

    def _newest(self, cache: str, prefixes: tuple[str, ...]) -> tuple[str, str] | None:
        """The saved entry (volume, key) of ``cache`` restore-keys pick: for the first
        prefix that any saved key starts with, the newest such entry."""
        entries = []
        for vol in self.volumes.list():
            if (vol.name.startswith(PREFIX) and vol.labels.get(LABEL_NAME) == cache
                    and owner_of(self.volumes.files(vol.name)) is None):
                entries.append((vol.created, vol.name, vol.labels.get(LABEL_KEY, "")))
        for prefix in prefixes:
            found = [e for e in entries if e[2].startswith(prefix)]
            if found:
                _, name, key = max(found)
                return name, key
        return None

    async def attach(self, cache: str, key: str, path: str, *, restore_keys: tuple[str, ...] = (),
                     size: str | int | None = None) -> Attached:
        """The volume a job mounts at ``path`` for ``cache`` under ``key``."""
        exact = entry_name(cache, key)
        labels = {LABEL_NAME: cache, LABEL_KEY: key}
        throwaway = f"ci-work-{secrets.token_hex(6)}"
        for _ in range(3):  # (again when another run changes the entry meanwhile)
            state, owner = self._state(exact)
            if state == "stale":  # left by a run that was killed: never saved
                with contextlib.suppress(PinnaceError):  # (only if still that run's)
                    await self.volumes.remove(exact, owner=owner or "")
                state, owner = self._state(exact)
            if state == "saved":
                try:
                    await self.volumes.create(throwaway, 0, source=exact, ephemeral=True)
                    return Attached(cache, key, path, throwaway, "exact", key, save=False)
                except NotFoundError:  # (removed meanwhile: a miss after all)
                    continue
            partial = self._newest(cache, restore_keys)
            target, save = (exact, True) if state == "absent" else (throwaway, False)
            try:
                if partial is not None:
                    await self.volumes.create(target, 0, source=partial[0], ephemeral=True,
                                              labels=labels)
                    return Attached(cache, key, path, target, "partial", partial[1], save)
                await self.volumes.create(target, size or DEFAULT_SIZE, ephemeral=True,
                                          labels=labels)
                return Attached(cache, key, path, target, "", "", save)
            except (NotFoundError, AlreadyExistsError):  # (another run, meanwhile)
                continue
        raise VolumeError(exact, "other runs kept changing this cache entry while it was "
                          "being restored; run the job again")

    async def detach(self, att: Attached, *, success: bool) -> str:
        """After the job (its machine gone): save the entry or drop the volume; what
        happened, in a line."""
        if att.save and success:
            self.volumes.keep(att.volume)
            return f"cache {att.name}: saved under key {att.key}"
        with contextlib.suppress(PinnaceError):
            await self.volumes.remove(att.volume)
        if att.save:
            return f"cache {att.name}: not saved (the job did not succeed)"
        if att.hit == "exact":
            return f"cache {att.name}: not saved (key {att.key} was restored)"
        return f"cache {att.name}: not saved (another run is saving key {att.key})"

    def saved(self) -> list[Any]:
        """Every saved entry (its Volume; the cache's name and key are in its labels), by
        cache name, then oldest first."""
        return sorted((v for v in self.volumes.list()
                       if v.name.startswith(PREFIX) and v.labels.get(LABEL_NAME)
                       and owner_of(self.volumes.files(v.name)) is None),
                      key=lambda v: (v.labels[LABEL_NAME], v.created))

    async def remove(self, name: str | None = None, key: str | None = None) -> list[Any]:
        """Remove the saved entries of cache ``name`` (every cache's if None), only the
        one of ``key`` if given; the entries removed."""
        gone = []
        for v in self.saved():
            if (name is None or v.labels[LABEL_NAME] == name) and (
                    key is None or v.labels.get(LABEL_KEY) == key):
                await self.volumes.remove(v.name)
                gone.append(v)
        return gone


__all__ = ["Attached", "Caches", "entry_name"]
