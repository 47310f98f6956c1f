"""Backups of the router's store: a consistent copy while the router runs, and a check of one.

Usage::

    info = backup_store("pipeline-data/store.db", "backups/store-2026-12-04.db")
    report = check_store("backups/store-2026-12-04.db")
    report.ok, report.problems, report.books

``backup_store`` uses SQLite's online backup API (``sqlite3.Connection.backup``) in one step:
the copy is one read transaction, so it is the store exactly as some committed moment left it,
while the router keeps writing (WAL readers do not block the writer, nor it them). The copy
is written beside the target and renamed over it, so a half-written backup never has the
target's name; it is a single file (no ``-wal``), readable only by its owner.

``check_store`` opens a file read-only and runs ``PRAGMA integrity_check`` and the books
(``pipelines.store.BOOKS``): every accepted message unmatched, routed or waiting; every
delivery delivered, dead or queued; every dead letter open, replayed or purged.

Restoring is copying a checked backup over the store while the router is stopped (see the
README's "Backups" section).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.store import books_gaps, read_books


@dataclass
class BackupInfo:
    path: Path
    bytes: int
    seconds: float


@dataclass
class CheckReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    books: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def backup_store(store: str | os.PathLike[str], target: str | os.PathLike[str]) -> BackupInfo:
    src_path, dst_path = Path(store), Path(target)
    if not src_path.is_file():
        raise FileNotFoundError(f"no store at {src_path}")
    if dst_path.resolve() == src_path.resolve():
        raise ValueError("the backup must go to another file than the store itself")
    started = time.monotonic()
    tmp = dst_path.with_name(f".{dst_path.name}.partial")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))  # owner-only from the start
    src = sqlite3.connect(f"file:{src_path}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(tmp)
        try:
            src.backup(dst)  # pages=-1: all in one step, one snapshot
            dst.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
        finally:
            dst.close()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    finally:
        src.close()
    os.replace(tmp, dst_path)
    return BackupInfo(dst_path, dst_path.stat().st_size, time.monotonic() - started)


def check_store(path: str | os.PathLike[str]) -> CheckReport:
    report = CheckReport(Path(path))
    if not report.path.is_file():
        report.problems.append(f"{path}: no such file")
        return report
    try:
        conn = sqlite3.connect(f"file:{report.path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        report.problems.append(f"{path}: cannot open: {exc}")
        return report
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        if rows != ["ok"]:
            report.problems.extend(f"integrity: {r}" for r in rows[:20])
            return report
        report.books = read_books(conn)
    except sqlite3.DatabaseError as exc:
        report.problems.append(f"{path}: not a router store: {exc}")
        return report
    finally:
        conn.close()
    for book, gap in books_gaps(report.books).items():
        if gap:
            report.problems.append(f"the {book} books do not balance (left minus right = {gap})")
    return report
