"""The bench's worker protocol: a worker runs in a child process (`python -m sdedge.benchmarks.worker_process`:
JSON requests on stdin, one prefixed JSON reply line each on stdout) or inline in the bench's process; `handle`
serves both. `WORKERS` is the registry of worker kinds (workers.py, peers.py), so neither imports the other's user.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from sdedge.runtime.errors import SdedgeError

from .peers import PeerWorker
from .workers import _DiffusersWorker, _SdedgeWorker

REPLY_PREFIX = "@@sdedge-bench "


# role in the suite -> the worker class that plays it (anything else: the sdedge runtime on a bundle)
WORKERS = {"reference": _DiffusersWorker, "peer": PeerWorker}


def _make_worker(role: str, spec: dict, settings: dict):
    return WORKERS.get(role, _SdedgeWorker)(spec, settings)


def handle(worker_box: list, msg: dict) -> dict:
    """One protocol message → its reply (shared by the child process and inline mode)."""
    op = msg.get("op")
    try:
        if op == "init":
            worker_box[:] = [_make_worker(msg["role"], msg["spec"], msg["settings"])]
            return {"ok": True, **worker_box[0].load()}
        if op == "run":
            return {"ok": True, **worker_box[0].run(msg)}
        if op == "final":
            return {"ok": True, **worker_box[0].final()}
        if op == "close":
            if worker_box:
                worker_box[0].close()
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}", "user_error": False}
    except SdedgeError as exc:
        return {"ok": False, "error": str(exc), "user_error": True}
    except Exception as exc:  # noqa: BLE001 - reported to the parent with its traceback
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "user_error": False}


def worker_main() -> int:
    """The child process: JSON requests on stdin, one prefixed JSON reply line each on the original stdout.
    Everything else anything prints goes to stderr (the parent's log file for this engine)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    box: list = []
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg.get("op") == "exit":
            break
        reply = handle(box, msg)
        proto.write(REPLY_PREFIX + json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(worker_main())
