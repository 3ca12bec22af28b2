"""Running the application under uvicorn, with a graceful stop: the first SIGTERM or SIGINT
stops admitting (new requests and /health answer 503), lets the engine finish the requests
it holds (`engine.drain`), then closes the server; a second signal stops at once."""

from __future__ import annotations

import threading

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn's server with `drain` run (in a thread) before it starts to shut down.

    uvicorn's own handler would close the listening socket at once (new clients get a
    refused connection, not a 503) and, after shutting down, re-raise the signal, so the
    process would die of SIGTERM instead of exiting 0."""

    def __init__(self, config: uvicorn.Config, drain):
        super().__init__(config)
        self.drain = drain
        self.draining = False

    def handle_exit(self, sig, frame) -> None:
        if self.draining:  # a second signal: stop now
            self.should_exit = self.force_exit = True
            return
        self.draining = True
        threading.Thread(target=self._drain_then_exit, name="drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        try:
            self.drain()
        finally:
            self.should_exit = True


def serve(app, host: str, port: int, *, drain_timeout: float | None = None,
          log_level: str = "info") -> None:
    """Serve `app` (from `create_app`) on host:port until a signal; returns after the engine
    has drained and the last response has been sent."""
    front = app.state.front

    def drain() -> None:
        front.begin_drain()
        front.engine.drain(drain_timeout)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=30)
    DrainingServer(config, drain).run()
