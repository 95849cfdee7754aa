"""The driver's watch over the GPU actors: a run left without any GPU ends with a clear error, not a hang.

When a node dies, Ray restarts its actors wherever a GPU is free. On a cluster whose GPUs are all in use
that is once the other actors finish the execution's work and Ray Data releases them (measured on Ray
2.60: a lost node's batches then complete in the same run; tests/pipelines/test_multinode.py). But when no
GPU actor is left alive at all (every GPU quarantined after device errors, every GPU node lost on a fixed
cluster) nothing would ever run again, and the run would wait for Ray Data's no-progress abort, hours
later. The watchdog ends it once no GPU actor has been alive for `timeout_s` (the actor start timeout,
which covers an autoscaler bringing a GPU node up).

Actor states come from the handle's local view (`_get_local_state`, what Ray Data's actor pool itself uses
in Ray 2.60); handles come from the crash journal, where each GPU actor registers once started.
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import signal
import threading
import time

log = logging.getLogger(__name__)


class NoGpuLeft(RuntimeError):
    """Every GPU actor of the run stopped (quarantined GPUs, lost nodes) and none came back."""


class ActorWatchdog:
    """A driver thread (see the module doc). It interrupts the driver only while the driver waits inside Ray
    Data's iterator (`waiting`), and never once stopped, so the interrupt cannot land in a manifest write or
    in the run's summary."""

    def __init__(self, journal, timeout_s: float, interval_s: float = 10.0):
        self.journal, self.timeout_s, self.interval_s = journal, timeout_s, interval_s
        self.error: NoGpuLeft | None = None
        self._seen: set[str] = set()
        self._none_alive_since: float | None = None
        self._lock = threading.Lock()
        self._waiting = False
        self._logged = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ugcsr-watchdog", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def waiting(self):
        """Around the driver's wait for the next batch: the only place it may be interrupted. Only when that
        is the main thread with Python's own SIGINT handler (interrupt_main runs whatever handler is set: Ray
        Train installs one); otherwise the run ends at Ray Data's no-progress abort, and the error is logged."""
        interruptible = (threading.current_thread() is threading.main_thread()
                         and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        with self._lock:
            self._waiting = interruptible
        try:
            yield
        finally:
            with self._lock:
                self._waiting = False

    def new_execution(self) -> None:
        """A new execution starts its own pools: the last one's actors (released, dead) no longer count."""
        import ray

        ray.get(self.journal.forget_actors.remote(), timeout=30)
        self._none_alive_since = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tick()
            except Exception as err:  # noqa: BLE001 - a watch that fails once tries again; it never ends a run
                log.debug("watchdog tick failed: %r", err)
            if self.error is not None:
                with self._lock:
                    if self._waiting and not self._stop.is_set():
                        _thread.interrupt_main()  # _execute raises self.error
                        return
                if not self._logged:
                    log.error("ugcsr: %s", self.error)
                    self._logged = True

    def tick(self, now: float | None = None) -> None:
        import ray
        from ray.core.generated.gcs_pb2 import ActorTableData

        now = time.monotonic() if now is None else now
        actors = ray.get(self.journal.gpu_actors.remote(), timeout=5)
        alive = 0
        for aid, (handle, _) in actors.items():
            if self._stop.is_set():
                return
            if aid not in self._seen:  # a handle reports its state only after one call through it
                handle.__ray_ready__.remote()
                self._seen.add(aid)
            alive += handle._get_local_state() == ActorTableData.ActorState.ALIVE
        if not actors or alive:
            self._none_alive_since = None
            return
        self._none_alive_since = self._none_alive_since or now
        if now - self._none_alive_since >= self.timeout_s:
            bad = ray.get(self.journal.quarantined.remote(), timeout=5)
            names = ", ".join(f"node {b['node'][:12]} GPU {b['gpu']}" for b in bad) or "none"
            self.error = NoGpuLeft(
                f"no GPU actor has been alive for {self.timeout_s:.0f} s: {len(bad)} GPU(s) quarantined after device "
                f"errors ({names}); the others were lost with their nodes or cannot restart. What was written is in "
                "the manifest: fix or replace the GPUs/nodes and run again to resume")

    def stop(self) -> None:
        with self._lock:  # after this, no interrupt: the thread checks under the same lock
            self._stop.set()
        self._thread.join(timeout=15)  # a tick's calls time out in 5 s: it ends before Ray shuts down
