"""Runs predictions: queue, deadlines, cancellation, the model off the event loop, webhooks.

    runner = PredictionRunner(settings)
    await runner.start()                    # loads (and if needed builds) the model
    pred = runner.submit(Prediction(...))   # returns at once; the run happens in a task
    await runner.wait(pred, timeout=60)     # for Prefer: wait
    runner.cancel(pred)
    await runner.close()

Lifecycle: ``starting`` (queued for a model slot) → ``processing`` → ``succeeded`` | ``failed``;
``canceled`` by the API or when the Cancel-After deadline passes while processing; ``aborted``
when the deadline passes before a slot was free. Model inference runs in a thread pool of
``settings.workers`` threads so the event loop stays free.

One exception, for latency, where the service has its event loop to itself (``settings.inline_runs``,
set by ``pipeline predictions serve``; never in ``pipeline run``, where the loop is the router's):
a prediction marked ``inline`` by the HTTP face (its creator holds the
request open with ``Prefer: wait``, no stream, no webhook, no deadline, and no other create in
progress) whose input is a data URL of a small image (at most ``INLINE_MAX_PIXELS``) runs on the
event loop's own thread when it is the only prediction in the service. The loop has nothing else to
do then, and the two thread wake-ups it saves (loop -> pool thread -> loop, each a sleeping thread
woken on another core) were ~0.35 ms of a ~6.5 ms prediction on a 2-core VM (``bench/predictions.py``).
The cost: a request arriving meanwhile waits for that one small image's run (a few ms, ~10 ms at
the pixel cap) before it is read. Bigger images, and any prediction while another is queued or
running, go to the pool as before, so concurrent predictions still use every worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from . import blip
from .files import FileStore
from .image_input import decode_data_url, fetch_input_file
from .model import Classifier, image_pixels, load_classifier
from .records import Prediction, PredictionStore
from .settings import Settings
from .webhooks import WebhookSender

log = logging.getLogger("predictions_service.runner")
ABORTED_ERROR = "The prediction's deadline (Cancel-After) passed before it started."
INLINE_MAX_PIXELS = 640 * 480  # an inline run blocks the event loop: only images this small (~10 ms)


class PredictionRunner:
    def __init__(self, settings: Settings, classifier: Classifier | None = None) -> None:
        self.settings = settings
        self.store = PredictionStore(
            settings.max_predictions, settings.data_retention_seconds, settings.max_held_input_bytes
        )
        self.files = FileStore(
            settings.files_dir, settings.max_file_bytes, settings.max_files_total_bytes, settings.file_ttl_seconds
        )
        self.classifier = classifier
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="predict")
        self.slots = asyncio.Semaphore(settings.workers)
        self.fetch_client: httpx.AsyncClient | None = None
        self.webhooks: WebhookSender | None = None
        self.startup_error: Exception | None = None
        self.active = 0  # predictions submitted and not finished (queued, fetching or running)

    async def start(self) -> None:
        if self.classifier is None:
            loop = asyncio.get_running_loop()
            try:
                self.classifier = await loop.run_in_executor(
                    self.executor, load_classifier, self.settings.resolved_model_dir()
                )
            except Exception as exc:  # kept so running() can say why startup failed
                self.startup_error = exc
                raise
        self.fetch_client = httpx.AsyncClient(
            timeout=self.settings.image_fetch_timeout, follow_redirects=True, max_redirects=3
        )
        self.webhooks = WebhookSender(
            self.settings.webhook_secret,
            httpx.AsyncClient(timeout=self.settings.webhook_timeout, follow_redirects=False),
            retry_delays=self.settings.webhook_retry_delays,
            throttle_seconds=self.settings.webhook_throttle_seconds,
        )

    async def close(self) -> None:
        for pred in self.store.items.values():
            if pred.task and not pred.task.done():
                pred.task.cancel()
        tasks = [p.task for p in self.store.items.values() if p.task]
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.webhooks:
            await self.webhooks.close()
            await self.webhooks.client.aclose()
        if self.fetch_client:
            await self.fetch_client.aclose()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.files.close()

    def submit(self, pred: Prediction) -> Prediction:
        self.store.add(pred)
        # counted now, not when its task starts, so a run scheduled just before sees it; the task's
        # end (run or canceled before it started) uncounts it
        self.active += 1
        pred.task = asyncio.create_task(self._run(pred), name=f"prediction-{pred.id}")
        pred.task.add_done_callback(self._ended)
        return pred

    def _ended(self, task: asyncio.Task) -> None:
        self.active -= 1

    async def wait(self, pred: Prediction, timeout: float) -> bool:
        # asyncio.timeout, not wait_for: on 3.11 wait_for wraps the awaitable in a new task.
        try:
            async with asyncio.timeout(timeout):
                await pred.done.wait()
        except TimeoutError:
            return False
        return True

    def cancel(self, pred: Prediction) -> None:
        if pred.terminal:
            return
        self._finish(pred, "canceled")
        if pred.task and not pred.task.done():
            pred.task.cancel()

    def _finish(self, pred: Prediction, status: str, error: str | None = None) -> None:
        if pred.terminal:
            return
        pred.status, pred.error = status, error
        pred.completed_at = time.time()
        pred.done.set()
        if pred.sse is not None:
            if status == "failed":
                pred.push_event("error", json.dumps({"detail": error}))
            pred.push_event("done", "{}" if status == "succeeded" else json.dumps({"reason": status}))
        assert self.webhooks is not None
        self.webhooks.notify(pred, "completed")
        log.info("prediction %s %s%s", pred.id, status, f": {error}" if error else "")

    async def _run(self, pred: Prediction) -> None:
        try:
            await self._run_inner(pred)
        except asyncio.CancelledError:
            self._finish(pred, "canceled")  # no-op when cancel() already finished it
            raise
        except Exception as exc:  # a bug of ours: the prediction fails, the service lives on
            log.exception("prediction %s crashed", pred.id)
            self._finish(pred, "failed", f"internal error: {type(exc).__name__}: {exc}")

    async def _run_inner(self, pred: Prediction) -> None:
        until_deadline = None if pred.deadline is None else pred.deadline - time.time()
        try:
            async with asyncio.timeout(until_deadline):
                await self.slots.acquire()
        except TimeoutError:
            self._finish(pred, "aborted", ABORTED_ERROR)
            return
        try:
            if pred.terminal:
                return
            if pred.deadline is not None and time.time() >= pred.deadline:  # got the slot too late
                self._finish(pred, "aborted", ABORTED_ERROR)
                return
            pred.status, pred.started_at = "processing", time.time()
            assert self.webhooks is not None
            self.webhooks.notify(pred, "start")
            budget = self.settings.prediction_timeout
            hit_deadline = False
            if pred.deadline is not None and pred.deadline - time.time() < budget:
                budget, hit_deadline = max(0.0, pred.deadline - time.time()), True
            try:
                async with asyncio.timeout(budget):
                    await self._predict(pred)
            except TimeoutError:
                if hit_deadline:
                    self._finish(
                        pred, "canceled", "The prediction's deadline (Cancel-After) passed while it ran."
                    )
                else:
                    self._finish(pred, "failed", f"Prediction timed out after {budget:.0f} seconds.")
            except blip.PredictionFailed as exc:
                self._finish(pred, "failed", str(exc))
        finally:
            self.slots.release()

    def file_url_id(self, pred: Prediction, value: str) -> str | None:
        """The file id when ``value`` is a file URL of this service (``urls.get`` or its download)."""
        prefix = f"{pred.base_url}/v1/files/"
        if not value.startswith(prefix):
            return None
        return value[len(prefix):].split("?", 1)[0].split("/", 1)[0]

    async def _read_file(self, pred: Prediction, file_id: str) -> bytes:
        rec = self.files.get(pred.owner, file_id)
        missing = blip.PredictionFailed(
            f"image: file {file_id[:40]} does not exist, has expired, or belongs to another API token"
        )
        if rec is None:
            raise missing
        try:
            return await asyncio.get_running_loop().run_in_executor(None, rec.path.read_bytes)
        except FileNotFoundError as exc:  # deleted while this prediction waited
            raise missing from exc

    async def _predict(self, pred: Prediction) -> None:
        inp = pred.input
        ignored = sorted(set(inp) - set(blip.INPUT_KEYS))
        task = inp.get("task") or "image_captioning"
        assert self.fetch_client is not None and self.classifier is not None
        value = inp["image"]
        loop = asyncio.get_running_loop()
        emit = None
        if pred.sse is not None:
            def emit(kind: str, text: str) -> None:
                loop.call_soon_threadsafe(pred.push_event, kind, text)
            if ignored:
                emit("logs", f"ignored unknown input keys: {', '.join(ignored)}")
        if value[:5].lower() == "data:" and pred.inline and self.active == 1:
            # the only prediction, and its creator waits for it: no thread hops (module docstring)
            image = decode_data_url(value)
            if (image_pixels(image) or INLINE_MAX_PIXELS + 1) <= INLINE_MAX_PIXELS:
                answer = blip.answer(self.classifier, image, task, inp.get("question"), inp.get("caption"), emit)
            else:  # too big to hold the loop for (or not an image: the pool thread says why)
                answer = await loop.run_in_executor(
                    self.executor, blip.answer, self.classifier, image, task, inp.get("question"),
                    inp.get("caption"), emit)
        elif value[:5].lower() == "data:":
            # decoded in the model's thread: the event loop meanwhile answers the create call
            running = loop.run_in_executor(
                self.executor, _answer_data_url, self.classifier, value, task, inp.get("question"),
                inp.get("caption"), emit)
            assert self.webhooks is not None
            self.webhooks.prepare(pred)  # meanwhile, on this otherwise idle thread
            answer = await running
        else:
            file_id = self.file_url_id(pred, value)
            if file_id is not None:  # one of our files: read from disk, no HTTP round trip
                image = await self._read_file(pred, file_id)
            else:
                image = await fetch_input_file(
                    value, self.fetch_client, self.settings.max_image_bytes, self.settings.allow_private_urls
                )
            answer = await loop.run_in_executor(
                self.executor, blip.answer, self.classifier, image, task, inp.get("question"), inp.get("caption"),
                emit,
            )
        if pred.terminal:  # canceled while the thread ran: drop the result
            return
        note = f"ignored unknown input keys: {', '.join(ignored)}\n" if ignored else ""
        pred.logs = note + answer.logs
        pred.output = answer.output
        assert self.webhooks is not None
        self.webhooks.notify(pred, "output", "logs")
        self._finish(pred, "succeeded")


def _answer_data_url(classifier: Classifier, url: str, task: str, question: str | None,
                     caption: str | None, emit: blip.Emit | None = None) -> blip.Answer:
    return blip.answer(classifier, decode_data_url(url), task, question, caption, emit)
