"""Avatar preparations as jobs: queued, followed, cancelled, resumed after a restart.

A job lives in the avatar store, so every replica sharing the store sees it:

    .jobs/<id>/job.json   status ("queued", "preparing", "failed"), stage, frames done/total,
                          the owner (host, pid, a token per process) and its heartbeat
    .jobs/<id>/upload     the uploaded file, until the job ends
    .jobs/<id>/staging/   the avatar being written; renamed into the store when complete
    .jobs/<id>/cancel     asks whoever runs the job to stop

Creating `.jobs/<id>` is exclusive (mkdir), so two replicas asked for the same id
end with one job and one 409. One job runs at a time per process (preparation is
CPU-heavy); the rest wait queued. A job whose owner died (a crash, a restart, a
replica gone) is taken over by the next front end that looks: its own pid is
gone on this host, or its heartbeat is older than STALE_S. Nothing half-made
is ever published: the staging folder is renamed into the store only when done.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from frontend import memory, metrics
from frontend.admission import Overloaded
from frontend.avatars.preparation import Cancelled
from frontend.avatars.store import AvatarExists, AvatarStore, owner_of, present

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
STALE_S = 30.0
FAILED_KEPT_S = 3600.0  # a failed job's reason stays readable (GET /avatars/{id}) this long
ME = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"  # this process, as a job owner


@dataclass
class Job:
    avatar_id: str
    folder: Path

    @property
    def upload(self) -> Path:
        return self.folder / "upload"

    @property
    def staging(self) -> Path:
        return self.folder / "staging"

    @property
    def cancel_requested(self) -> bool:
        return (self.folder / "cancel").exists()

    def read(self) -> dict | None:
        try:
            return json.loads((self.folder / "job.json").read_text())
        except (OSError, ValueError):
            return None

    def write(self, expect: str | None = None, **changes) -> dict:
        """Change job.json; with `expect` (a job's token), only if it is still that job (not a new
        one of the same id, posted after this one was cancelled): JobReplaced otherwise."""
        current = self.read() or {}
        if expect is not None and current.get("token") != expect:
            raise JobReplaced(f"the job of {self.avatar_id!r} was cancelled and replaced")
        state = {**current, **changes, "heartbeat": time.time()}
        partial = self.folder / f"job.json.{uuid.uuid4().hex[:8]}"
        partial.write_text(json.dumps(state))
        partial.replace(self.folder / "job.json")  # atomic: readers never see half a file
        return state


class JobReplaced(Exception):
    """A job's folder now belongs to another job of the same id."""


def owner_alive(owner: str | None, heartbeat: float | None) -> bool:
    if not owner:
        return False
    if owner == ME:
        return True
    host, pid, _ = owner.split(":")
    if host == socket.gethostname() and not _pid_alive(int(pid)):
        return False  # a process of this host that is gone (or this pid, reborn after a restart)
    return heartbeat is not None and time.time() - heartbeat < STALE_S


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our pid, but not our token: an earlier process with the same pid
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Jobs:
    """The job queue of one front end. `run(job, progress, cancelled)` prepares an avatar
    into job.staging and returns its meta; failures are kept with their HTTP status."""

    def __init__(self, store: AvatarStore, run: Callable, status_of: Callable[[BaseException], tuple[int, str]],
                 limit: int = 4):
        self.store, self.run, self.status_of, self.limit = store, run, status_of, limit
        self.durations: deque[float] = deque([30.0], maxlen=8)  # recent preparations' seconds
        self.root = store.root / ".jobs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.finished = threading.Condition()
        self.worker = threading.Thread(target=self._work, name="avatar-jobs", daemon=True)
        self.beat = threading.Thread(target=self._heartbeat, name="avatar-jobs-heartbeat", daemon=True)
        self._stop = threading.Event()
        # The jobs this process has queued or runs: the heartbeat keeps them ours, queued
        # ones too (else another replica would take them over while they wait). job.json
        # is read, changed and written back: `writing` makes this process's writers take turns.
        self.owned: set[str] = set()
        self.writing = threading.Lock()

    def start(self) -> None:
        self.worker.start()
        self.beat.start()

    def job(self, avatar_id: str) -> Job:
        return Job(avatar_id, self.root / avatar_id)

    # -- asked by the routes --------------------------------------------------------------
    def submit(self, avatar_id: str, upload: bytes, params: dict, tenant_limit: int | None = None) -> Job:
        """Queue a preparation; Overloaded when `limit` of this front end's are queued or running
        (each keeps its upload on the shared volume until it ends), or `tenant_limit` of the
        avatar's tenant's."""
        self.store.ensure_absent(avatar_id)
        tenant = owner_of(avatar_id)
        with self.writing:
            waiting = len(self.owned)
            theirs = sum(owner_of(key) == tenant for key in self.owned)
        if waiting >= self.limit:
            metrics.ADMISSIONS.labels("preparation", "refused").inc()
            retry = sum(self.durations) / len(self.durations) * (waiting - self.limit + 1)
            raise Overloaded(f"at capacity for avatar preparations ({waiting} queued or running here); "
                             f"retry in about {retry:.0f} s", retry)
        if tenant is not None and tenant_limit is not None and theirs >= tenant_limit:
            metrics.ADMISSIONS.labels("preparation", "refused").inc()
            retry = sum(self.durations) / len(self.durations)
            raise Overloaded(f"tenant {tenant!r} has {theirs} avatar preparations queued or running, its limit "
                             f"(MUSETALK_TENANT_PREPARATIONS); retry in about {retry:.0f} s", retry)
        metrics.ADMISSIONS.labels("preparation", "admitted").inc()
        job = self.job(avatar_id)
        if (job.read() or {}).get("status") == "failed":
            shutil.rmtree(job.folder, ignore_errors=True)  # a new try replaces a failed one
        try:
            job.folder.mkdir()  # exclusive, across replicas
        except FileExistsError:
            raise AvatarExists(f"avatar {avatar_id!r} is already being prepared") from None
        job.upload.write_bytes(upload)
        with self.writing:
            job.write(id=avatar_id, status="queued", stage="queued", frames_done=0, frames_total=None,
                      params=params, owner=ME, created=time.time(), token=uuid.uuid4().hex)
            self.owned.add(avatar_id)
        self.queue.put(avatar_id)
        return job

    def status(self, avatar_id: str) -> dict | None:
        """The job's state for GET /avatars/{id}; None if there is no job."""
        state = self.job(avatar_id).read()
        if state is None:
            return None
        out = {k: state.get(k) for k in ("id", "status", "stage", "frames_done", "frames_total", "error")}
        out["progress"] = round(state["frames_done"] / state["frames_total"], 3) if state.get("frames_total") else 0.0
        if state.get("status") == "failed":
            out["http_status"] = state.get("http_status", 422)
        elif not owner_alive(state.get("owner"), state.get("heartbeat")):
            out["status"] = "queued"  # its owner is gone: the next front end to look resumes it
        return {k: v for k, v in out.items() if v is not None}

    def list(self, tenant: str | None = None) -> list[dict]:
        """The jobs `tenant` sees (its own and the shared avatars'), as it knows them (present)."""
        return [present(s) for p in sorted(self.root.iterdir())
                if owner_of(p.name) in (None, tenant) and (s := self.status(p.name))]

    def cancel(self, avatar_id: str) -> bool:
        """Stop a queued or running job (any replica's) and forget it; False if none."""
        job = self.job(avatar_id)
        state = job.read()
        if state is None:
            return False
        if state.get("status") in ("failed", "queued") or not owner_alive(state.get("owner"), state.get("heartbeat")):
            with self.writing:  # no heartbeat of ours writes into the folder being removed
                self.owned.discard(avatar_id)
                shutil.rmtree(job.folder, ignore_errors=True)  # nothing runs it: its worker will find it gone
            return True
        try:
            (job.folder / "cancel").touch()
        except FileNotFoundError:
            return False  # it has just ended: published (the caller deletes it) or gone
        if state.get("owner") == ME:  # ours: wait until it has stopped, so a new POST may follow
            self.wait(avatar_id, 30, lambda s: s is None)
        return True

    def wait(self, avatar_id: str, timeout: float, until: Callable[[dict | None], bool] | None = None) -> dict | None:
        """The job's status once it has ended (None: it is gone, published or cancelled),
        or as it is after `timeout` seconds."""
        until = until or (lambda s: s is None or s.get("status") == "failed")
        deadline = time.monotonic() + timeout
        with self.finished:
            while not until(state := self.status(avatar_id)) and time.monotonic() < deadline:
                self.finished.wait(min(0.5, max(0.0, deadline - time.monotonic())))
        return state

    # -- the worker -----------------------------------------------------------------------
    def resume_interrupted(self) -> list[str]:
        """Queue the jobs whose owner is gone (a crash, a restart): they start over."""
        resumed = []
        for folder in sorted(self.root.iterdir()):
            state = Job(folder.name, folder).read()
            if state and state.get("status") in ("queued", "preparing") \
                    and not owner_alive(state.get("owner"), state.get("heartbeat")) and self._claim(folder.name):
                self.queue.put(folder.name)
                resumed.append(folder.name)
        if resumed:
            log.info("resuming the preparation of %s", ", ".join(resumed))
        return resumed

    def forget_failed(self) -> list[str]:
        """Remove failed jobs older than FAILED_KEPT_S: their reason was there to be read, and
        their folders (only job.json: the upload and staging went when they failed) add up."""
        forgotten = []
        for folder in sorted(self.root.iterdir()):
            state = Job(folder.name, folder).read() or {}
            if state.get("status") == "failed" and time.time() - state.get("failed", state.get("heartbeat", 0)) \
                    > FAILED_KEPT_S:
                shutil.rmtree(folder, ignore_errors=True)
                forgotten.append(folder.name)
        return forgotten

    def _claim(self, avatar_id: str) -> bool:
        """Take over a job whose owner is gone; exclusive across replicas."""
        job = self.job(avatar_id)
        claims = len(list(job.folder.glob("claim.*")))
        try:
            (job.folder / f"claim.{claims + 1}").mkdir()
        except FileExistsError:
            return False  # another front end was faster
        with self.writing:
            job.write(owner=ME, status="queued", stage="queued")
            self.owned.add(avatar_id)
        return True

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                avatar_id = self.queue.get(timeout=STALE_S)
            except queue.Empty:
                self.resume_interrupted()  # jobs of a replica that died
                self.forget_failed()
                continue
            if avatar_id is None:
                return
            try:
                self._run(self.job(avatar_id))
            finally:
                with self.finished:
                    self.finished.notify_all()

    def _run(self, job: Job) -> None:
        state = job.read()
        if state is None or state.get("owner") != ME:
            self._disown(job)
            return  # cancelled meanwhile, or taken over
        token, last = state.get("token"), [0.0]

        def progress(stage: str, done: int, total: int) -> None:
            if time.monotonic() - last[0] > 0.5 or done == total:
                last[0] = time.monotonic()
                with self.writing:
                    job.write(token, status="preparing", stage=stage, frames_done=done, frames_total=total)

        def stopped() -> bool:  # asked to stop, or the job was removed (a queued job's cancel)
            return job.cancel_requested or not job.folder.exists()

        started = time.monotonic()
        try:
            shutil.rmtree(job.staging, ignore_errors=True)  # what an interrupted run left
            job.staging.mkdir()
            with self.writing:
                job.write(token, status="preparing", stage="starting")
            meta = self.run(job, progress, stopped)
            (job.staging / "meta.json").write_text(json.dumps(meta, indent=1))
            self._disown(job)
            if stopped():
                raise Cancelled()  # cancelled while the last frames were encoded or saved
            if (job.read() or {}).get("token") != token:
                raise JobReplaced(f"the job of {job.avatar_id!r} was cancelled and replaced")
            self.store.publish(job.avatar_id, job.staging)
            if job.cancel_requested:  # cancelled as it was published: the cancel wins
                self.store.delete(job.avatar_id)
                raise Cancelled()
            shutil.rmtree(job.folder, ignore_errors=True)
            metrics.PREPARATIONS.labels("ready").inc()
            metrics.PREPARATION_SECONDS.observe(time.monotonic() - started)
            self.durations.append(time.monotonic() - started)
            log.info("avatar %r prepared (%d frames, %d without a face)", job.avatar_id, meta["frames"],
                     meta["faceless_frames"])
        except JobReplaced:  # cancelled, and the id posted again: the folder is the new job's now
            metrics.PREPARATIONS.labels("cancelled").inc()
            log.info("preparation of avatar %r cancelled (and posted again)", job.avatar_id)
        except Cancelled:
            self._disown(job)
            if job.cancel_requested:
                shutil.rmtree(job.folder, ignore_errors=True)
            metrics.PREPARATIONS.labels("cancelled").inc()
            log.info("preparation of avatar %r cancelled", job.avatar_id)
        except Exception as error:  # noqa: BLE001 - the job records why; the service runs on
            self._disown(job)
            if stopped():
                shutil.rmtree(job.folder, ignore_errors=True)
                metrics.PREPARATIONS.labels("cancelled").inc()
                log.info("preparation of avatar %r cancelled", job.avatar_id)
            else:
                self._fail(job, error, token)
        finally:
            memory.release()  # every frame of the upload passed through this process

    def _fail(self, job: Job, error: Exception, token: str | None) -> None:
        metrics.PREPARATIONS.labels("failed").inc()
        metrics.triton_error(error)
        status, message = self.status_of(error)
        # A 500 is a bug: its traceback, not only the exception's name, goes to the log.
        log.warning("preparation of avatar %r failed: %s", job.avatar_id, message,
                    exc_info=error if status >= 500 else None)
        try:
            job.write(token, status="failed", stage="failed", error=message, http_status=status,
                      failed=time.time())
            job.upload.unlink(missing_ok=True)
            shutil.rmtree(job.staging, ignore_errors=True)
        except (OSError, JobReplaced):
            pass  # removed (cancelled) or replaced meanwhile: nothing to record

    def _disown(self, job: Job) -> None:
        """The job ends here: after this, no heartbeat of ours writes into its folder."""
        with self.writing:
            self.owned.discard(job.avatar_id)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self.writing:
                for avatar_id in list(self.owned):
                    try:
                        self.job(avatar_id).write()
                    except OSError:
                        self.owned.discard(avatar_id)  # removed meanwhile (cancelled by another replica)

    def close(self) -> None:
        self._stop.set()
        self.queue.put(None)
