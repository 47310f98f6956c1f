"""``pipeline store backup`` under load and ``pipeline store check``.

Real parts: the router (RouterService) routing messages into lightdb-stream while the CLI, in
its own process, takes the backup; SQLite opens the copy afterwards.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

from pipeline_texts import KEEP_READINGS

from pipelines.cli import main
from pipelines.message import Message
from pipelines.router import RouterSettings
from pipelines.service import RouterService, ServiceSettings

PIPELINE = KEEP_READINGS


def numbers_in(path: Path) -> set[int]:
    """Every reading the file holds, wherever it is: waiting in the inbox, queued for
    delivery, or delivered into the stream."""
    conn = sqlite3.connect(path)
    try:
        found: set[int] = set()
        for (data,) in conn.execute("SELECT p.data FROM inbox i JOIN payloads p ON p.id = i.payload_id"):
            found.add(json.loads(data)["n"])
        for (data,) in conn.execute("SELECT p.data FROM deliveries d JOIN payloads p ON p.id = d.payload_id"):
            found.add(json.loads(data)["n"])
        for (data,) in conn.execute("SELECT data FROM stream"):
            found.add(json.loads(data)["n"])
        return found
    finally:
        conn.close()


async def test_a_backup_taken_under_load_opens_checks_and_holds_every_committed_message(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(PIPELINE)
    store = tmp_path / "store.db"
    backup = tmp_path / "backups" / "store-copy.db"
    backup.parent.mkdir()
    settings = ServiceSettings(router=RouterSettings(pipelines=[tmp_path / "p.yaml"], store_path=store),
                               http_port=None)
    committed = 0
    async with RouterService(settings) as service:
        router = service.router
        stop = asyncio.Event()

        async def load() -> None:
            nonlocal committed
            while not stop.is_set():
                batch = [Message.new(device_id="meter", project_id="p", path="/readings",
                                     content_type="application/json",
                                     payload=json.dumps({"n": committed + i}).encode()) for i in range(20)]
                await router.accept_many(batch)
                committed += len(batch)  # accept_many returned: these are committed
                await asyncio.sleep(0)

        loader = asyncio.create_task(load())
        while committed < 2000:
            if loader.done():
                loader.result()
            await asyncio.sleep(0.01)
        before = committed
        # the CLI in its own process, as an operator runs it (a thread waits for it here)
        proc = await asyncio.to_thread(subprocess.run, [
            sys.executable, "-m", "pipelines.cli", "store", "backup", str(backup), "--store", str(store)],
            capture_output=True, text=True, timeout=120)
        after = committed  # the backup was taken at some moment between before and after
        stop.set()
        await loader
        assert proc.returncode == 0, proc.stderr
        assert "backed up" in proc.stdout
        assert after > before, "the router kept taking messages while the backup ran"
    print(f"\n{before} messages committed when the backup started, {after} when it ended")

    assert oct(backup.stat().st_mode & 0o777) == "0o600"
    assert not Path(str(backup) + "-wal").exists()
    assert main(["store", "check", str(backup)]) == 0
    assert "ok (integrity check passed, books balance)" in capsys.readouterr().out
    held = numbers_in(backup)
    assert set(range(before)) <= held, f"missing from the backup: {sorted(set(range(before)) - held)[:10]}"
    assert held <= set(range(after))
    conn = sqlite3.connect(backup)
    ingested = dict(conn.execute("SELECT name, value FROM counters"))["ingested"]
    conn.close()
    assert ingested == len(held)  # the counters are those of the same moment as the rows


def test_check_finds_a_damaged_file_and_unbalanced_books(tmp_path, capsys):
    assert main(["store", "check", str(tmp_path / "nope.db")]) == 1
    assert "no such file" in capsys.readouterr().out
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"SQLite format 3\x00" + b"\x00" * 84 + b"garbage" * 200)
    assert main(["store", "check", str(junk)]) == 1
    assert capsys.readouterr().out.strip()

    async def make() -> None:
        (tmp_path / "p.yaml").write_text(PIPELINE)
        settings = ServiceSettings(router=RouterSettings(pipelines=[tmp_path / "p.yaml"],
                                                         store_path=tmp_path / "s.db"), http_port=None)
        async with RouterService(settings) as service:
            await service.router.accept(Message.new(device_id="m", project_id="p", path="/readings",
                                                    content_type="application/json", payload=b'{"n": 0}'))
    asyncio.run(make())
    assert main(["store", "backup", str(tmp_path / "b.db"), "--store", str(tmp_path / "s.db")]) == 0
    conn = sqlite3.connect(tmp_path / "b.db")
    conn.execute("UPDATE counters SET value = value + 3 WHERE name = 'ingested'")
    conn.commit()
    conn.close()
    capsys.readouterr()
    assert main(["store", "check", str(tmp_path / "b.db")]) == 1
    assert "the ingest books do not balance (left minus right = 3)" in capsys.readouterr().out
    assert main(["store", "backup", str(tmp_path / "s.db"), "--store", str(tmp_path / "s.db")]) == 2
