"""An LLMEngine in a process of its own (vLLM V1's EngineCore shape), driven over a socket pair.

    replica process (event loop: HTTP, streams)        engine core process (python -m this module)
    EngineLoop --step()--> EngineCoreClient ==pickle==> LLMEngine.step(): schedule, model, detokenize
               <--outputs--                  <=========

In one process, the engine's Python (scheduler, sampler, detokenizer, the glue between torch ops) and
the replica's HTTP and stream work take turns on one GIL, so every chunk a step hands its streams is
paid for between steps. Here the step runs in the child while the replica serves the last step's
chunks: the client blocks in `recv` (no GIL held) for the step's reply. The child is started with
`python -m`, not forked: the replica process holds Ray's threads and a fork would copy their locks.

The child dies with its replica: it exits when its end of the socket reads EOF, which the kernel
delivers when the replica's process is gone, however it ended. A child that dies under a call (killed,
out of memory) raises EngineCoreDied in the replica, which EngineLoop treats as any failed step: the
requests in flight get a 503 and the engine is rebuilt, in a new child.
"""

from __future__ import annotations

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
from pathlib import Path
from typing import Any

import torch

from clusterft.engine.config import EngineConfig
from clusterft.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from clusterft.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# What the client may call: the LLMEngine methods EngineLoop and the serve replica use.
_METHODS = frozenset(
    {
        "add_request",
        "abort_request",
        "step",
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

    def forget(self, request_ids: Any) -> None:
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
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

    A step sent ahead (see EngineCoreClient.step) may carry outputs of a request aborted meanwhile:
    `forget` notes the last step sent before the abort, and that step's outputs of it are dropped."""

    def __init__(self) -> None:
        self._requests: dict[str, _Received] = {}
        self._aborted: dict[str, int] = {}  # request -> the last step that may still carry it

    def decode(self, wire: _Wire, step: int) -> RequestOutput | None:
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

    def forget(self, request_ids: Any, last_step: int) -> None:
        """Drop aborted requests; steps up to `last_step` (sent before the abort) may still name them."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self._requests.pop(request_id, None)
            self._aborted[request_id] = last_step

    def step_done(self, step: int) -> None:
        """Step `step` is decoded: aborts that only earlier steps could carry are done with."""
        self._aborted = {r: last for r, last in self._aborted.items() if last > step}


class EngineCoreDied(RuntimeError):
    """The engine core process exited under a call (killed, out of memory, crashed)."""


class EngineCoreClient:
    """The part of LLMEngine's interface that EngineLoop uses, answered by an LLMEngine in a child
    process. Calls are serialized; `step` blocks without holding the GIL.

    A step's reply says whether the engine has work left; if so the next step is requested before
    this one's outputs are handed back, so the child computes step N+1 while the replica streams
    step N (vLLM V1's engine core steps on its own the same way). What arrives meanwhile (a new
    request, an abort) reaches the engine one step later than in process."""

    def __init__(self, model_dir: str | Path, config: EngineConfig, weight_version: int = 0) -> None:
        ours, theirs = multiprocessing.Pipe(duplex=True)  # a Unix socket pair
        command = [sys.executable, "-m", "clusterft.engine.core_process", str(theirs.fileno())]
        self._proc = subprocess.Popen(command, pass_fds=[theirs.fileno()])
        theirs.close()  # the child's copy is the only one left: its EOF is ours, ours is its
        self._conn = ours
        self._lock = threading.Lock()
        self._num_waiting = 0
        self._resident: tuple[str, ...] = ()
        self._outputs = _OutputDecoder()
        self._steps_sent = 0
        self._step_in_flight = False  # a step requested ahead whose reply is not read yet
        self._step_reply: tuple[bool, Any] | None = None  # its reply, read before another call's
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

    def _send(self, method: str, *args: Any, **kwargs: Any) -> None:
        try:
            self._conn.send((method, args, kwargs))
        except OSError as exc:
            raise self._died(method) from exc
        if method == "step":
            self._steps_sent += 1
            self._step_in_flight = True

    def _recv(self, method: str) -> tuple[bool, Any]:
        """The next reply; replies come in the order of the calls, so a step sent ahead is first."""
        try:
            if self._step_in_flight:
                self._step_reply = self._conn.recv()
                self._step_in_flight = False
            return self._conn.recv() if method != "step" else self._step_reply  # type: ignore[return-value]
        except (EOFError, OSError) as exc:
            raise self._died(method) from exc

    def _died(self, method: str) -> EngineCoreDied:
        try:
            code: int | None = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            code = None
        return EngineCoreDied(
            f"the engine core process (pid {self._proc.pid}) exited with code {code} during "
            f"{method}; its requests were lost (see the replica's log for why)"
        )

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._send(method, *args, **kwargs)
            ok, value = self._recv(method)
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
        return self._call("add_request", request_id, prompt, params, priority=priority, lora_name=lora_name)

    def abort_request(self, request_ids: Any) -> None:
        self._call("abort_request", request_ids)
        self._outputs.forget(request_ids, last_step=self._steps_sent)

    def step(self) -> list[RequestOutput]:
        with self._lock:
            if self._step_reply is None and not self._step_in_flight:
                self._send("step")
            ok, value = self._recv("step")
            self._step_reply = None
            step = self._steps_sent  # one step at most is out at a time: this one is the last sent
            if ok and value[3]:  # work left: the child starts the next step now
                self._send("step")
        if not ok:
            raise value
        wires, self._num_waiting, self._resident, _ = value
        outputs = [out for wire in wires if (out := self._outputs.decode(wire, step)) is not None]
        self._outputs.step_done(step)
        return outputs

    def num_waiting(self) -> int:
        """Requests waiting for admission as of the last step (EngineLoop asks right after it)."""
        return self._num_waiting

    def resident_adapters(self) -> list[str]:
        """The LoRA adapters resident in the engine as of the last step (no call: routing asks
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
                    self._conn.send(("shutdown", (), {}))
            except OSError:
                pass
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


def _serve(conn: Connection) -> None:
    from clusterft.engine.llm_engine import LLMEngine

    engine: LLMEngine | None = None
    outputs = _OutputEncoder()
    while True:
        try:
            method, args, kwargs = conn.recv()
        except (EOFError, OSError):
            break  # the replica is gone
        if method == "shutdown":
            break
        try:
            if method == "start":
                model_dir, config, weight_version, num_threads = args
                torch.set_num_threads(num_threads)
                engine = LLMEngine(model_dir, config)
                engine.weight_version = weight_version
                value: Any = {
                    "max_model_len": engine.max_model_len,
                    "num_gpu_blocks": engine.num_gpu_blocks,
                }
            elif engine is None or method not in _METHODS:
                raise RuntimeError(f"engine core: no call {method!r} before start")
            elif method == "step":
                wires = [outputs.encode(out) for out in engine.step()]
                resident = tuple(engine.resident_adapters())
                value = (wires, engine.num_waiting(), resident, engine.has_unfinished_requests())
            elif method == "abort_request":
                engine.abort_request(*args)
                outputs.forget(*args)
                value = None
            elif method == "set_weight_version":
                engine.weight_version = args[0]
                value = None
            else:
                value = getattr(engine, method)(*args, **kwargs)
            reply: tuple[bool, Any] = (True, value)
        except Exception as exc:
            if method in ("start", "step"):  # the replica logs a one-line reason; this is the why
                logger.error("engine core: %s failed:\n%s", method, traceback.format_exc())
            reply = (False, _portable(exc))
        try:
            conn.send(reply)
        except (BrokenPipeError, ConnectionResetError):
            break
        except Exception as exc:  # the value did not pickle (pickling precedes any write)
            conn.send((False, RuntimeError(f"engine core: {method}'s result could not be sent: {exc}")))
    if engine is not None:
        engine.shutdown()


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
