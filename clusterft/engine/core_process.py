"""An LLMEngine in a process of its own (vLLM V1's EngineCore shape), driven over a socket pair.

    replica process (event loop: HTTP, streams)          engine core process (python -m this module)
    EngineLoop --add/abort (no reply)--> EngineCoreClient ==pickle==> busy loop: take input, step,
               <--step(): reports so far--                <========= report (outputs, counts)

In one process, the engine's Python (scheduler, sampler, detokenizer, the glue between torch ops) and
the replica's HTTP and stream work take turns on one GIL, so every chunk a step hands its streams is
paid for between steps. Here the child steps on its own for as long as it has requests: between
steps it takes whatever input has come (new requests, aborts) without waiting, and it sends each
step's outputs as a report the replica reads when it is ready (`step()` returns every report that
has come). Neither side waits on the other while there is work, and new requests and aborts cost no
round trip. A request the engine refuses (too long, unknown adapter) comes back in the next report
(`take_rejected`). The child is started with `python -m`, not forked: the replica process holds
Ray's threads and a fork would copy their locks.

The child dies with its replica: it exits when its end of the socket reads EOF, which the kernel
delivers when the replica's process is gone, however it ended. A child that dies under a call (killed,
out of memory) raises EngineCoreDied in the replica, which EngineLoop treats as any failed step: the
requests in flight get a 503 and the engine is rebuilt, in a new child.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import torch

from clusterft.engine.config import EngineConfig
from clusterft.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from clusterft.engine.request import request_id_list
from clusterft.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# The wire, replica -> child:
#   ("ops", [("add", args, kwargs) | ("abort", [ids], {}), ...])   applied in order; no reply
#   ("call", method, args, kwargs)                                  answered by one ("reply", ok, value)
#   ("shutdown",)
# child -> replica:
#   ("report", wires, num_waiting, resident_adapters, work_left, ops_seen, [(request_id, error), ...])
#       after each step, and after input that made no step (so the replica learns it was seen)
#   ("failed", error)    a step raised; the child steps no more (the replica rebuilds it)
#   ("reply", ok, value)
# What the replica may call (requests and aborts go as ops, steps happen on their own).
_METHODS = frozenset(
    {
        "get_stats",
        "add_lora",
        "remove_lora",
        "list_loras",
        "reset_prefix_cache",
        "check_health",
        "set_weight_version",
    }
)


# One RequestOutput on the wire: what the replica does not have yet. Engine outputs are cumulative
# (every step repeats the prompt's ids and each sequence's tokens so far), so pickling them whole
# costs O(prompt + output) per request per step; a step sends each sequence's new tokens and
# logprobs, and the prompt's ids and logprobs once. Text is sent whole: a stop string's hold-back
# can shorten it, and one string is one copy to pickle.
#   (request_id, prompt, prompt_token_ids, prompt_logprobs   <- None after the request's first output
#    finished, num_cached_tokens, finish_message,
#    [(index, text, token_start, new_token_ids, logprob_start, new_logprobs | None,
#      cumulative_logprob, finish_reason, stop_reason), ...])
_Wire = tuple[Any, ...]


class _OutputEncoder:
    """The child's side: how much of each request the replica has been sent."""

    def __init__(self) -> None:
        self._sent: dict[str, dict[int, tuple[int, int]]] = {}  # request -> index -> (tokens, logprobs)

    def encode(self, out: RequestOutput) -> _Wire:
        sent = self._sent.get(out.request_id)
        first = sent is None
        if sent is None:
            sent = self._sent[out.request_id] = {}
        sequences = []
        for o in out.outputs:
            num_tokens, num_logprobs = sent.get(o.index, (0, 0))
            # A sequence that got shorter (never seen: outputs only grow) is resent from where it ends.
            token_start = min(num_tokens, len(o.token_ids))
            logprobs = o.logprobs
            logprob_start = min(num_logprobs, len(logprobs)) if logprobs is not None else 0
            sent[o.index] = (len(o.token_ids), len(logprobs) if logprobs is not None else 0)
            sequences.append(
                (
                    o.index,
                    o.text,
                    token_start,
                    o.token_ids[token_start:],
                    logprob_start,
                    logprobs[logprob_start:] if logprobs is not None else None,
                    o.cumulative_logprob,
                    o.finish_reason,
                    o.stop_reason,
                )
            )
        if out.finished:
            del self._sent[out.request_id]
        head = (out.prompt, out.prompt_token_ids, out.prompt_logprobs) if first else (None, None, None)
        return (out.request_id, *head, out.finished, out.num_cached_tokens, out.finish_message, sequences)

    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._sent.pop(request_id, None)


@dataclass
class _Received:
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: Any
    token_ids: dict[int, list[int]] = field(default_factory=dict)
    logprobs: dict[int, list] = field(default_factory=dict)


class _OutputDecoder:
    """The replica's side: each request's prompt and tokens so far, rebuilt into RequestOutputs.

    The child steps on while an abort is on its way: reports made before it applied the abort may
    still carry the request. `forget` notes the abort's ops number; a report stamped with fewer ops
    seen is from before it, and its outputs of that request are dropped."""

    def __init__(self) -> None:
        self._requests: dict[str, _Received] = {}
        self._aborted: dict[str, int] = {}  # request -> the ops number of its abort

    def decode(self, wire: _Wire) -> RequestOutput | None:
        request_id, prompt, prompt_ids, prompt_logprobs, finished, cached, message, sequences = wire
        if request_id in self._aborted:
            return None
        got = self._requests.get(request_id)
        if got is None:
            got = self._requests[request_id] = _Received(prompt, prompt_ids, prompt_logprobs)
        outputs = []
        for index, text, start, new_ids, logprob_start, new_logprobs, cumulative, reason, stop in sequences:
            token_ids = got.token_ids.setdefault(index, [])
            del token_ids[start:]
            token_ids += new_ids
            logprobs = None
            if new_logprobs is not None:
                received = got.logprobs.setdefault(index, [])
                del received[logprob_start:]
                received += new_logprobs
                logprobs = list(received)
            # Copies: an output handed out must not change when a later step appends (as in process).
            outputs.append(CompletionOutput(index, text, list(token_ids), cumulative, logprobs, reason, stop))
        if finished:
            del self._requests[request_id]
        prompt_logprobs = got.prompt_logprobs
        return RequestOutput(
            request_id, got.prompt, got.prompt_token_ids, outputs, finished, cached, message, prompt_logprobs
        )

    def forget(self, request_ids: list[str], ops_number: int) -> None:
        """Drop aborted requests; reports that saw fewer than `ops_number` ops may still name them."""
        for request_id in request_ids:
            self._requests.pop(request_id, None)
            self._aborted[request_id] = ops_number

    def ops_seen(self, ops_seen: int) -> None:
        """A report that saw `ops_seen` ops is decoded: aborts among them are done with."""
        if self._aborted:
            self._aborted = {r: n for r, n in self._aborted.items() if n > ops_seen}


class EngineCoreDied(RuntimeError):
    """The engine core process exited under a call (killed, out of memory, crashed)."""


class EngineCoreClient:
    """The part of LLMEngine's interface that EngineLoop uses, answered by an LLMEngine in a child
    process that steps on its own (see the module docstring). Thread-safe; `step` blocks without
    holding the GIL.

    Unlike LLMEngine, `add_request` does not raise for a request the engine refuses: the refusal
    comes with a later `step()`, and `take_rejected()` hands it out. Requests added between two
    `step()` calls reach the child together, as one message, when the next one begins."""

    def __init__(self, model_dir: str | Path, config: EngineConfig, weight_version: int = 0) -> None:
        ours, theirs = multiprocessing.Pipe(duplex=True)  # a Unix socket pair
        command = [sys.executable, "-m", "clusterft.engine.core_process", str(theirs.fileno())]
        self._proc = subprocess.Popen(command, pass_fds=[theirs.fileno()])
        theirs.close()  # the child's copy is the only one left: its EOF is ours, ours is its
        self._conn = ours
        self._lock = threading.Lock()
        self._request_ids = itertools.count()
        self._pending: list[tuple[str, tuple, dict]] = []  # ops not sent yet
        self._ops_sent = 0  # ops messages sent
        self._ops_seen = 0  # of them, seen by the child as of the last report
        self._work_left = False  # as of the last report: requests unfinished, so reports will come
        self._backlog: collections.deque[tuple] = collections.deque()  # reports read by a call
        self._rejected: list[tuple[str, Exception]] = []
        self._num_waiting = 0
        self._resident: tuple[str, ...] = ()
        self._outputs = _OutputDecoder()
        try:
            # The child computes with the threads this process would have used (Ray sets them from
            # the replica's CPUs; a test may have set them itself).
            info = self._call("start", str(model_dir), config, weight_version, torch.get_num_threads())
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len: int = info["max_model_len"]
        self.num_gpu_blocks: int = info["num_gpu_blocks"]
        self._weight_version = weight_version

    @property
    def pid(self) -> int:
        return self._proc.pid

    # ---- the wire (the caller holds the lock) ----------------------------------------------------
    def _send(self, message: tuple, what: str) -> None:
        try:
            self._conn.send(message)
        except OSError as exc:
            raise self._died(what) from exc

    def _recv(self, what: str) -> tuple:
        try:
            return self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._died(what) from exc

    def _flush(self) -> None:
        """Send the ops queued since the last flush, as one message."""
        if self._pending:
            ops, self._pending = self._pending, []
            self._send(("ops", ops), ops[0][0])
            self._ops_sent += 1

    def _died(self, what: str) -> EngineCoreDied:
        try:
            code: int | None = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        return EngineCoreDied(
            f"the engine core process (pid {self._proc.pid}) exited with code {code} during "
            f"{what}; its requests were lost (see the replica's log for why)"
        )

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._flush()  # a call sees the requests and aborts made before it
            self._send(("call", method, args, kwargs), method)
            while (message := self._recv(method))[0] != "reply":
                self._backlog.append(message)  # a report: the next step() decodes it, in order
        _, ok, value = message
        if not ok:
            raise value
        return value

    # ---- LLMEngine's interface -------------------------------------------------------------------
    def add_request(
        self,
        request_id: str | None,
        prompt: Any,
        params: SamplingParams | None = None,
        *,
        priority: int = 0,
        lora_name: str | None = None,
    ) -> str:
        """Queue a request for the child; it is sent when the next step() (or call) begins."""
        request_id = request_id if request_id is not None else f"core-{next(self._request_ids)}"
        with self._lock:
            self._pending.append(
                ("add", (request_id, prompt, params), {"priority": priority, "lora_name": lora_name})
            )
        return request_id

    def abort_request(self, request_ids: Any) -> None:
        """Abort now (sent at once, so the blocks are freed even if no step follows)."""
        ids = request_id_list(request_ids)
        with self._lock:
            self._pending.append(("abort", (ids,), {}))
            self._flush()
            self._outputs.forget(ids, ops_number=self._ops_sent)

    def step(self) -> list[RequestOutput]:
        """Every step's outputs that have come since the last call, in order; waits for the next
        report only when one is owed (requests running, or input not yet seen by the child)."""
        with self._lock:
            self._flush()
            reports = list(self._backlog)
            self._backlog.clear()
            if not reports and (self._work_left or self._ops_seen < self._ops_sent):
                reports.append(self._recv("step"))
            while self._conn.poll():  # and what else has come: a replica that fell behind catches up
                reports.append(self._recv("step"))
            outputs = []
            for report in reports:
                if report[0] == "failed":
                    raise report[1]
                _, wires, self._num_waiting, self._resident, self._work_left, ops_seen, rejected = report
                outputs += [out for wire in wires if (out := self._outputs.decode(wire)) is not None]
                self._outputs.ops_seen(ops_seen)
                self._ops_seen = ops_seen
                self._rejected += rejected
            return outputs

    def take_rejected(self) -> list[tuple[str, Exception]]:
        """(request_id, error) for the requests the engine refused, reported since the last call:
        a ValueError where LLMEngine.add_request would have raised one."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def num_waiting(self) -> int:
        """Requests waiting for admission as of the last report (EngineLoop asks after each step)."""
        return self._num_waiting

    def resident_adapters(self) -> list[str]:
        """The LoRA adapters resident in the engine as of the last report (no call: routing asks
        for them while a step may be running)."""
        return list(self._resident)

    def get_stats(self) -> EngineStats:
        return self._call("get_stats")

    def add_lora(self, name: str, path: str | Path) -> None:
        self._call("add_lora", name, str(path))

    def remove_lora(self, name: str) -> None:
        self._call("remove_lora", name)

    def list_loras(self) -> list[str]:
        return self._call("list_loras")

    def reset_prefix_cache(self) -> None:
        self._call("reset_prefix_cache")

    def check_health(self) -> None:
        self._call("check_health")

    @property
    def weight_version(self) -> int:
        return self._weight_version

    @weight_version.setter
    def weight_version(self, version: int) -> None:
        self._call("set_weight_version", version)
        self._weight_version = version

    def shutdown(self) -> None:
        """Stop the child (its engine first); idempotent. A child that does not stop is killed."""
        if self._proc.poll() is None:
            try:
                with self._lock:
                    self._conn.send(("shutdown",))
            except OSError:
                pass
            # Closed at once: a child blocked sending a report gets EPIPE instead of waiting on us.
            self._conn.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._conn.close()


# ---- the child ---------------------------------------------------------------------------------------
def _portable(exc: BaseException) -> BaseException:
    """`exc` if it crosses a pickle round trip as itself, else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


class _EngineCore:
    """The child's state: the engine, what the replica has been sent, the ops seen and reported."""

    def __init__(self) -> None:
        from clusterft.engine.llm_engine import LLMEngine

        self._engine_class = LLMEngine
        self.engine: LLMEngine | None = None
        self.outputs = _OutputEncoder()
        self.ops_seen = 0
        self.ops_reported = 0
        self.rejected: list[tuple[str, BaseException]] = []
        self.failed = False  # a step raised: the engine's state is unknown, so it steps no more

    def has_work(self) -> bool:
        return self.engine is not None and not self.failed and self.engine.has_unfinished_requests()

    def apply(self, ops: list[tuple[str, tuple, dict]]) -> None:
        assert self.engine is not None
        self.ops_seen += 1
        if self.failed:  # the replica is rebuilding the engine: nothing more goes into this one
            return
        for kind, args, kwargs in ops:
            if kind == "abort":
                self.engine.abort_request(args[0])
                self.outputs.forget(args[0])
                continue
            try:
                self.engine.add_request(*args, **kwargs)
            except Exception as exc:  # the replica fails this request (400 for a ValueError)
                if not isinstance(exc, ValueError):
                    logger.error("engine core: add_request failed:\n%s", traceback.format_exc())
                self.rejected.append((args[0], _portable(exc)))

    def call(self, method: str, args: tuple, kwargs: dict) -> tuple:
        try:
            if method == "start":
                model_dir, config, weight_version, num_threads = args
                torch.set_num_threads(num_threads)
                self.engine = self._engine_class(model_dir, config)
                self.engine.weight_version = weight_version
                value: Any = {
                    "max_model_len": self.engine.max_model_len,
                    "num_gpu_blocks": self.engine.num_gpu_blocks,
                }
            elif method not in _METHODS:
                raise RuntimeError(f"engine core: unknown call {method!r}")
            elif self.engine is None:
                raise RuntimeError(f"engine core: {method!r} before start")
            elif method == "set_weight_version":
                self.engine.weight_version = args[0]
                value = None
            else:
                value = getattr(self.engine, method)(*args, **kwargs)
            return ("reply", True, value)
        except Exception as exc:
            if method == "start":  # the replica logs a one-line reason; this is the why
                logger.error("engine core: start failed:\n%s", traceback.format_exc())
            return ("reply", False, _portable(exc))

    def report(self) -> tuple | None:
        """Step if there is work; the report of it, or of input seen without a step, or None."""
        engine = self.engine
        if engine is None:
            return None
        wires: list[_Wire] = []
        if self.has_work():
            try:
                wires = [self.outputs.encode(out) for out in engine.step()]
            except Exception as exc:
                logger.error("engine core: step failed:\n%s", traceback.format_exc())
                self.failed = True
                return ("failed", _portable(exc))
        elif self.ops_seen == self.ops_reported and not self.rejected:
            return None
        self.ops_reported = self.ops_seen
        rejected, self.rejected = self.rejected, []
        resident = tuple(engine.resident_adapters())
        work_left = engine.has_unfinished_requests() and not self.failed
        return ("report", wires, engine.num_waiting(), resident, work_left, self.ops_seen, rejected)


def _pickled_reply(method: str, reply: tuple) -> bytes:
    try:
        return bytes(ForkingPickler.dumps(reply))
    except Exception as exc:  # the value does not pickle: the caller gets why
        error = RuntimeError(f"engine core: {method}'s result could not be sent: {exc}")
        return bytes(ForkingPickler.dumps(("reply", False, error)))


def _serve(conn: Connection) -> None:
    """Take input (waiting for it only when there is nothing to step), answer calls, step, report."""
    core = _EngineCore()
    try:
        while True:
            messages = [] if core.has_work() else [conn.recv()]
            while conn.poll():
                messages.append(conn.recv())
            for message in messages:
                if message[0] == "shutdown":
                    return
                if message[0] == "ops":
                    core.apply(message[1])
                    continue
                conn.send_bytes(_pickled_reply(message[1], core.call(*message[1:])))
            if (report := core.report()) is not None:
                conn.send(report)
    except (EOFError, OSError):
        return  # the replica is gone
    finally:
        if core.engine is not None:
            core.engine.shutdown()


def main() -> None:
    from clusterft.runtime import apply_runtime_defaults

    apply_runtime_defaults()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    conn = Connection(int(sys.argv[1]))
    try:
        _serve(conn)
    finally:
        conn.close()
    os._exit(0)  # no interpreter teardown: torch's thread pools can stall it


if __name__ == "__main__":
    main()
