"""Loopback servers for the rollout tests (a plain module, importable from test files)."""

import asyncio
import socket
import threading
import time

import httpx
import uvicorn

from orchestra_jax.rollout.sampler import EmbeddedEngine
from orchestra_jax.rollout.server import ServedModel, create_app


class ServerThread:
    """uvicorn in a daemon thread on a free 127.0.0.1 port; `stop()` shuts it down.

    log_config=None: uvicorn's logging dictConfig closes existing handlers, and absl's (imported with orbax)
    then closes the stream it holds, a pytest capture file of an earlier test phase.
    """

    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="error", log_config=None, timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def start_server(
    config, params, tokenizer, *, version="v0", slots=4, context=128, load_weights=None, engine=None
):
    engine = engine or EmbeddedEngine(
        config,
        params,
        max_slots=slots,
        max_context=context,
        weight_version=version,
        detokenize=tokenizer.decode,
    )
    served = ServedModel(engine, tokenizer, "tiny", "tiny", load_weights=load_weights)
    return ServerThread(create_app(served))


def post(url, route, body=None, **kw):
    return httpx.post(url + route, json=body, timeout=120, **kw)


def run(coro):
    return asyncio.run(coro)
