""":class:`EmulatorThread`: the emulator served over real HTTP from a background thread with its
own event loop, for synchronous tests (Kopf's ``KopfRunner``, kubectl subprocesses).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kmock
import yaml

from tests.harness.k8s.emulator import KubernetesApiEmulator

T = TypeVar("T")


class EmulatorThread:
    """Serve a :class:`KubernetesApiEmulator` over real HTTP on 127.0.0.1 from a background thread.

    The thread owns its own event loop; :meth:`call` runs a function on that loop (where all
    emulator state lives), so tests, Kopf threads and kubectl subprocesses can share it.
    """

    def __init__(self, host: str = "127.0.0.1", **emulator_options: Any) -> None:
        self.host = host
        self.emulator_options = emulator_options
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._emulator: KubernetesApiEmulator | None = None
        self.url = ""
        self.kubeconfig_path: Path | None = None

    @property
    def emulator(self) -> KubernetesApiEmulator:
        if self._emulator is None:
            raise RuntimeError("the emulator is not running")
        return self._emulator

    def start(self, timeout: float = 30.0) -> None:
        self._thread = threading.Thread(target=self._run, name="k8s-api-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the API emulator did not start in time")
        if self._failure is not None:
            raise RuntimeError("the API emulator failed to start") from self._failure

    def stop(self, timeout: float = 30.0) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None

    def __enter__(self) -> EmulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def call(self, fn: Callable[..., T], *args: Any, timeout: float = 30.0, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the emulator's loop and return its result (or raise).

        Call it from other threads only (from the loop itself, e.g. in a kmock reaction, it would deadlock).
        """
        if self._loop is None:
            raise RuntimeError("the emulator is not running")

        async def run() -> T:
            return fn(*args, **kwargs)

        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(timeout)

    def server_errors(self) -> list[str]:
        """Unexpected exceptions inside the emulator since the last reset, as formatted tracebacks."""
        errors = self.call(lambda: list(self.emulator._errors[-1]) if self.emulator._errors else [])
        return ["".join(traceback.format_exception(e)) for e in errors]

    def reset(self) -> None:
        self.call(self.emulator.reset)

    def write_kubeconfig(self, path: Path, *, namespace: str = "default") -> Path:
        """Write a kubeconfig for this server (plain HTTP, a dummy token, context ``emulator``)."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url}}],
            "users": [{"name": "tester", "user": {"token": "emulator-token"}}],
            "contexts": [
                {"name": "emulator", "context": {"cluster": "emulator", "user": "tester", "namespace": namespace}}
            ],
            "current-context": "emulator",
        }
        path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.kubeconfig_path = path
        return path

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # pragma: no cover - reported to start()
            self._failure = exc
            self._ready.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        emulator = KubernetesApiEmulator(**self.emulator_options)
        async with emulator, kmock.Server(emulator, host=self.host) as server:
            emulator.reset()
            self._emulator = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()
            emulator.close_watches()
            for _ in range(50):  # let open watch streams finish before the server shuts down
                if not emulator._watchers:
                    break
                await asyncio.sleep(0.05)
