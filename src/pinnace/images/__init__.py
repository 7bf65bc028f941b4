"""Images: building, naming and removing bootable guests."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, HostError, ImageInUse, NotFoundError, StoreError
from ..store import (
    NAME_RE,
    ImageFiles,
    SnapshotFiles,
    Store,
    read_record,
    validate_name,
    write_atomic,
)

if TYPE_CHECKING:
    from .steps import Reporter

DEFAULT_IMAGE = "default"
_DIGEST_RE = re.compile(r"^[0-9a-f]{6,64}$")


@dataclass(frozen=True)
class ImageBoot:
    """What a backend boots for an image (the LaunchSpec fields of the same names)."""

    kernel: Path
    initrd: Path | None
    kernel_args: str

    def launch_fields(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "initrd": self.initrd, "kernel_args": self.kernel_args}


@dataclass(frozen=True)
class Image:
    """A built image: its digest, the names that point at it, and its manifest."""

    digest: str
    names: tuple[str, ...]
    path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> ImageFiles:
        return ImageFiles(self.path)

    @property
    def short(self) -> str:
        return self.digest[:12]

    @property
    def size(self) -> int:
        """Bytes the image really takes on disk (its root filesystem is sparse)."""
        return sum(p.stat().st_blocks * 512 for p in self.path.iterdir() if p.is_file())

    def to_dict(self) -> dict[str, Any]:
        return {"digest": self.digest, "names": list(self.names), "path": str(self.path),
                "size": self.size, **{k: v for k, v in self.manifest.items() if k != "digest"}}


class Images:
    """The images in a store (synchronous: building is subprocess work)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _ref(self, name: str) -> Path:
        return self.store.image_ref(name)

    def build(self, name: str = DEFAULT_IMAGE, packages: Sequence[str] = (), *,
              suite: str | None = None, mirror: str | None = None, refresh: bool = False,
              kernel: str | None = None, init: str = "agent", apt_ready: bool = False,
              reporter: Reporter | None = None) -> Image:
        """Build (or find in the cache) the image for these inputs and point ``name`` at it.
        ``kernel``: 'pinnace' (the own kernel, built once per host; the default, or
        $PINNACE_KERNEL) or 'debian' (Debian's packaged kernel and an initramfs).
        ``init``: 'agent' (the agent is PID 1) or 'systemd' (systemd is, and runs the agent
        as a service). ``apt_ready``: apt assumes yes and its package lists are in the
        image, as on GitHub's runners."""
        from .build import ImageBuilder, ImageSpec

        validate_name("image", name)
        spec = ImageSpec.create(packages, suite=suite, mirror=mirror, kernel=kernel,
                                init=init, apt_ready=apt_ready)
        builder = ImageBuilder(self.store, spec, reporter)
        if refresh:
            with self.store.locked(("image", spec.digest), timeout=60):
                self.store.remove_tree(builder.base_dir())
                target = self.store.image_files(spec.digest).dir
                if target.exists() and not self._users(spec.digest):
                    self.store.remove_tree(target)
        builder.build()
        self.store.image_refs_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self._ref(name), spec.digest + "\n")
        return self.get(name)

    def ensure_preset(self, name: str = "ubuntu", *, refresh: bool = False,
                      reporter: Reporter | None = None) -> Image:
        """The image of preset ``name`` (images/presets.py; "ubuntu": what CI jobs with
        runs-on: ubuntu-* run on), built first if the name is missing or points at an
        earlier build of the preset (a new pinnace or kernel); an image of the user's own
        under that name is left as it is. ``refresh``: built again from newer packages."""
        from .presets import PRESETS

        preset = PRESETS.get(name)
        if preset is None:
            raise ConfigError("preset", name, f"give one of {', '.join(sorted(PRESETS))}")

        def is_preset(image: Image) -> bool:
            inputs = image.manifest.get("inputs") or {}
            init = (inputs.get("init_system") or {}).get("name", "agent")
            return (set(preset.packages) <= set(inputs.get("packages") or ())
                    and init == preset.init and bool(inputs.get("apt_lists")) == preset.apt_ready)

        return self.ensure(name, preset.packages, init=preset.init, apt_ready=preset.apt_ready,
                           refresh=refresh, reporter=reporter, replaces=is_preset)

    def ensure(self, name: str, packages: Sequence[str] = (), *, init: str = "agent",
               apt_ready: bool = False, refresh: bool = False,
               replaces: Callable[[Image], bool] = lambda image: True,
               reporter: Reporter | None = None) -> Image:
        """Image ``name`` as these inputs make it now: the one it names if that is it (no
        build, no root needed), else built (see :meth:`build`). An image the name points
        at for which ``replaces`` is false is someone's own, and returned as it is; so is
        the one there when this host cannot work out the inputs' digest (no kernel
        source or compiler: it could not build either)."""
        from .build import ImageSpec

        try:
            current: Image | None = self.get(name)
        except NotFoundError:
            current = None
        if current is not None and not refresh:
            if not replaces(current):
                return current
            try:
                spec = ImageSpec.create(packages, init=init, apt_ready=apt_ready)
            except HostError:
                return current
            if current.digest == spec.digest:
                return current
        return self.build(name, packages, init=init, apt_ready=apt_ready, refresh=refresh,
                          reporter=reporter)

    def resolve(self, ref: str) -> str:
        """The digest a name (or digest prefix) points at."""
        if not isinstance(ref, str) or not ref:
            raise ConfigError("image", ref, "give an image name or digest")
        try:
            return self._ref(validate_name("image", ref)).read_text().strip()
        except (FileNotFoundError, ConfigError):
            pass
        if _DIGEST_RE.match(ref) and self.store.images_dir.is_dir():
            matches = [p.name for p in self.store.images_dir.iterdir() if p.name.startswith(ref)]
            if len(matches) == 1:
                return matches[0]
        if ref == DEFAULT_IMAGE:
            hint = "build it with 'pinnace image build'"
        elif NAME_RE.match(ref):
            hint = f"build it with 'pinnace image build {ref}', or see 'pinnace image ls'"
        else:
            hint = "see 'pinnace image ls'"
        raise NotFoundError("image", ref, hint)

    def get(self, ref: str) -> Image:
        digest = self.resolve(ref)
        return self._load(digest)

    def _load(self, digest: str) -> Image:
        files = self.store.image_files(digest)
        try:
            manifest = read_record(files.manifest, "")
        except (FileNotFoundError, StoreError):
            raise NotFoundError("image", digest,
                                "its files are gone or damaged; rebuild it with "
                                "'pinnace image build'") from None
        names = tuple(sorted(n for n, d in self._refs().items() if d == digest))
        return Image(digest, names, files.dir, manifest)

    def _refs(self) -> dict[str, str]:
        refs: dict[str, str] = {}
        if self.store.image_refs_dir.is_dir():
            for p in self.store.image_refs_dir.iterdir():
                if not p.name.startswith("."):
                    refs[p.name] = p.read_text().strip()
        return refs

    def list(self) -> builtins.list[Image]:
        if not self.store.images_dir.is_dir():
            return []
        out = []
        for p in sorted(self.store.images_dir.iterdir()):
            if ImageFiles(p).manifest.exists():
                out.append(self._load(p.name))
        return out

    def files_for(self, digest: str, name: str) -> ImageFiles:
        files = self.store.image_files(digest)
        if not files.manifest.exists():
            raise NotFoundError("image", f"{name} ({digest[:12]})",
                                "it was removed; rebuild it with 'pinnace image build'")
        return files

    def boot(self, digest: str, name: str) -> ImageBoot:
        """How to boot the image: its kernel, initramfs (if it has one) and the kernel
        arguments it needs (the own kernel mounts its root and runs the agent itself)."""
        files = self.files_for(digest, name)
        try:
            manifest = read_record(files.manifest, "")
        except (OSError, StoreError):
            raise NotFoundError("image", f"{name} ({digest[:12]})", "its manifest is damaged; "
                                "rebuild it with 'pinnace image build'") from None
        args = manifest.get("boot_args", "")
        initrd = None
        if manifest.get("kernel", "debian") == "debian":  # (images from before: Debian's)
            initrd = files.initrd
            if not initrd.exists():
                raise NotFoundError("image", f"{name} ({digest[:12]})", "its initramfs is "
                                    "gone; rebuild it with 'pinnace image build --refresh'")
        return ImageBoot(kernel=files.kernel, initrd=initrd,
                         kernel_args=args if isinstance(args, str) else "")

    def _users(self, digest: str) -> builtins.list[str]:
        """Machines and named snapshots made from the image (a snapshot's disk is an
        overlay on it). Ready snapshots go with the image: nothing can be run from them."""
        # (warm-pool members are not users: they are removed with what they were made
        # from, and any left running on removed files is stale, never handed out)
        users = [name for name, cfg in self.store.machine_configs()
                 if cfg.get("image_digest") == digest and not cfg.get("pool")]
        if self.store.snapshots_dir.is_dir():
            for entry in sorted(self.store.snapshots_dir.iterdir()):
                try:
                    key = read_record(SnapshotFiles(entry).meta, "").get("key")
                except (OSError, StoreError):
                    continue
                if isinstance(key, dict) and key.get("image_digest") == digest:
                    users.append(f"snapshot {entry.name}")
        return users

    def remove(self, ref: str) -> Image:
        """Remove an image name; the image's files go when no name and no machine uses them."""
        image = self.get(ref)
        with self.store.locked(("image", image.digest), timeout=60):
            image = self.get(ref)  # as it is now that nothing can be made from it
            users = self._users(image.digest)
            is_name = ref in image.names
            remaining = [n for n in image.names if n != ref] if is_name else []
            if not remaining and users:
                raise ImageInUse(ref, users)
            for n in [ref] if is_name else image.names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._ref(n))
            if not remaining:
                self.store.remove_tree(image.path)
        return image


class AsyncImages:
    """Asyncio face of Images: slow work runs in a thread."""

    def __init__(self, images: Images) -> None:
        self.sync = images
        # Awaited with an image's digest before its last name goes (the warm pool drains
        # its clones of it; set by the client's wiring).
        self.before_remove: Callable[[str], Awaitable[Any]] | None = None

    async def build(self, name: str = DEFAULT_IMAGE, packages: Sequence[str] = (),
                    **kwargs: Any) -> Image:
        return await asyncio.to_thread(self.sync.build, name, packages, **kwargs)

    async def ensure_preset(self, name: str = "ubuntu", *, refresh: bool = False,
                            reporter: Reporter | None = None) -> Image:
        return await asyncio.to_thread(self.sync.ensure_preset, name, refresh=refresh,
                                       reporter=reporter)

    async def get(self, ref: str) -> Image:
        return self.sync.get(ref)

    async def list(self) -> list[Image]:
        return self.sync.list()

    async def remove(self, ref: str) -> Image:
        image = self.sync.get(ref)
        if self.before_remove is not None and len(image.names) <= 1:
            await self.before_remove(image.digest)
        return await asyncio.to_thread(self.sync.remove, ref)

    def files_for(self, digest: str, name: str) -> ImageFiles:
        return self.sync.files_for(digest, name)

    def boot(self, digest: str, name: str) -> ImageBoot:
        return self.sync.boot(digest, name)
