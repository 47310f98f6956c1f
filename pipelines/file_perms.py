"""Private files: the store and what it holds are readable by their owner only.

Usage::

    make_private(Path("data"), directory=True, create=True)   # a new folder is made 0700
    make_private(Path("data/store.db"))                        # created empty or chmod-ed to 0600
    warn_if_shared(Path("devices.yaml"), "device registry")    # logs the chmod to run, once

SQLite creates ``store.db-wal`` and ``store.db-shm`` with the permissions of ``store.db``,
so creating the database file 0600 before SQLite opens it keeps all three private without a
process-wide umask. A folder that already exists is not changed (it may be the user's
project folder, or shared on purpose): when it lets group or others in, a warning says so
and gives the ``chmod`` to run.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("pipelines.file_perms")

_warned: set[tuple[str, int]] = set()


def make_private(path: Path, *, directory: bool = False, create: bool = True) -> None:
    path = Path(path)
    if directory:
        if not path.exists():
            if create:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(path, 0o700)  # mkdir's mode is masked by the umask
            return
        _warn_dir(path)
        return
    if not path.exists():
        if not create:
            return
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        try:
            os.chmod(path, mode & 0o700)
        except PermissionError:
            warn_if_shared(path, "file")
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists() and stat.S_IMODE(side.stat().st_mode) & 0o077:
            try:
                os.chmod(side, 0o600)
            except PermissionError:
                warn_if_shared(side, "file")


def _warn_dir(path: Path) -> None:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    key = (str(path.resolve()), mode)
    if mode & 0o077 and key not in _warned:
        _warned.add(key)
        log.warning("folder %s is open to group/others (mode %o): the store in it is private, but "
                    "to keep file names private too run: chmod 700 %s", path, mode, path)


def is_shared(path: Path) -> bool:
    """True when group or others may read ``path``."""
    try:
        return bool(stat.S_IMODE(Path(path).stat().st_mode) & 0o044)
    except OSError:
        return False


def warn_if_shared(path: Path, what: str) -> bool:
    """Log once (per file and mode) when ``path`` is readable by group or others; True if so."""
    try:
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError:
        return False
    if not mode & 0o044:
        return False
    key = (str(Path(path).resolve()), mode)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s %s is readable by group/others (mode %o): it holds secrets; run: chmod 600 %s",
                    what, path, mode, path)
    return True
