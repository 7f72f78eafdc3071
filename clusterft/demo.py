"""`clusterft demo` (what `make demo` runs): the whole story on a local Ray cluster and a tiny model.

    make the model ─► validate + preview ─► baseline eval ─► submit to the controller
        ─► train on 2 workers (ZeRO-2) ─► SIGKILL one worker ─► Ray Train resumes from the last
        valid checkpoint ─► evaluate ─► register ─► gate ─► promote ─► serve ─► ask via OpenAI API

Every step prints what it did and how long it took; the run ends with a summary table. The demo
uses the same code paths as a real cluster (the controller actor, the job store, the registry, the
Serve app); only the sizes are small.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clusterft.ports import free_port
from clusterft.runtime import PROJECT_ROOT

QUICKSTART_JOB = PROJECT_ROOT / "jobs" / "quickstart.yaml"
NUM_QUESTIONS = 6
DEMO_JOB = "quickstart"  # the job and registry model name
SERVING_TIMEOUT_S = 60.0
"""How long the demo waits for the controller to see the replica serve the job's version (it takes
a poll of the replica and one of the controller: about a second)."""


@dataclass
class DemoRun:
    """The summary table rows, filled in as the steps run."""

    rows: list[tuple[str, str, float]] = field(default_factory=list)

    def step(self, title: str, action: Callable[[], str]) -> None:
        print(f"\n==> {title}", flush=True)
        start = time.perf_counter()
        result = action()
        elapsed = time.perf_counter() - start
        self.rows.append((title, result, elapsed))
        print(f"    {result} ({elapsed:.1f}s)", flush=True)

    def summary(self) -> str:
        width = max(len(title) for title, _, _ in self.rows)
        lines = [f"{'step'.ljust(width)}  {'seconds':>7}  result", "-" * (width + 60)]
        lines += [f"{t.ljust(width)}  {s:7.1f}  {r}" for t, r, s in self.rows]
        return "\n".join(lines)


def write_demo_job(work: Path, quick: bool) -> Path:
    """The quickstart job with every path made absolute under `work` (datasets stay bundled).

    `quick` (the CI test) trains fewer steps on the same code path.
    """
    import yaml

    raw = yaml.safe_load(QUICKSTART_JOB.read_text())
    raw["model_name_or_path"] = str(work / raw["model_name_or_path"])
    raw["dataset_dir"] = str(PROJECT_ROOT / raw["dataset_dir"])
    raw["output_dir"] = str(work / raw["output_dir"])
    raw["checkpoint"]["storage_path"] = str(work / raw["checkpoint"]["storage_path"])
    if quick:
        raw["max_steps"], raw["save_steps"] = 200, 40
    work.mkdir(parents=True, exist_ok=True)
    job_path = work / "demo-job.yaml"
    job_path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return job_path


class WorkerKiller(threading.Thread):
    """SIGKILLs training worker rank 1 once a checkpoint exists and training passed `at_step`:
    a real process death, which Ray Train answers by restarting the worker group from the newest
    valid checkpoint."""

    def __init__(self, spec: Any, at_step: int):
        super().__init__(daemon=True)
        from clusterft.storage import BundleStore
        from clusterft.train.launcher import locate

        where = locate(spec)
        self.bundles = BundleStore(where.bundle_root)
        self.pid_file = where.run_dir / "workers" / "rank-1.pid"
        self.metrics = Path(spec.train.output_dir) / "metrics.jsonl"
        self.at_step = at_step
        self.killed: tuple[int, int] | None = None  # (pid, step)
        self.stop = threading.Event()

    def run(self) -> None:
        from clusterft.train.export import read_metrics

        while not self.stop.wait(0.2):
            steps = read_metrics(self.metrics) if self.metrics.is_file() else {}
            step = max(steps, default=0)
            if step >= self.at_step and self.pid_file.is_file() and self.bundles.list(verify=False):
                pid = int(self.pid_file.read_text())
                os.kill(pid, signal.SIGKILL)
                self.killed = (pid, step)
                print(f"\n    !! SIGKILL training worker rank 1 (pid {pid}) at step {step}", flush=True)
                return


def run_demo(workdir: str | Path = ".", quick: bool = False) -> int:
    """Run the demo in `workdir` (models/, saves/, the job store and the registry go there)."""
    import ray

    from clusterft.config import load_job_spec

    work = Path(workdir).resolve()
    job_path = write_demo_job(work, quick)
    spec = load_job_spec(job_path)
    run = DemoRun()
    facts: dict[str, Any] = {}
    started = time.perf_counter()

    run.step("make the tiny model", lambda: _make_model(Path(spec.model.model_name_or_path)))
    run.step("validate the job and preview its data", lambda: _validate_and_preview(spec, job_path, quick))
    run.step("exact match before fine-tuning", lambda: _baseline(spec, facts))
    ray.init(
        address="local",
        num_cpus=4,  # 2 training workers + the engine replica and ingress later; the controller takes 0
        include_dashboard=False,
        log_to_driver=False,
        namespace="clusterft",
    )
    try:
        run.step("submit the job to the controller", lambda: _submit(spec, work, facts))
        run.step("train: 2 workers, ZeRO-2, one worker killed", lambda: _train(spec, facts))
        run.step("evaluate, register, gate, promote", lambda: _promotion(facts))
        run.step("serve production and ask via the OpenAI API", lambda: _serve_and_ask(spec, work, facts))
        run.step("the job's state follows its model into service", lambda: _await_serving(facts))
    finally:
        _shutdown(facts)
    print("\n" + run.summary())
    print(f"\nloss plot: {Path(spec.train.output_dir) / 'loss.png'}")
    print(f"total: {time.perf_counter() - started:.0f}s")
    return 0 if facts.get("job_serving") else 1


def _make_model(model_dir: Path) -> str:
    from clusterft.hf.tiny import count_parameters, make_tiny_model

    if not (model_dir / "config.json").is_file():
        make_tiny_model(model_dir, arch="llama", size="tiny")
    return f"{model_dir} ({count_parameters(model_dir):,} parameters, random weights)"


def _validate_and_preview(spec: Any, job_path: Path, quick: bool) -> str:
    from clusterft.data.preview import preview
    from clusterft.hf.loading import load_tokenizer
    from clusterft.preflight import check_job_paths

    for warning in check_job_paths(spec):
        print(f"    warning: {warning}")
    tokenizer = load_tokenizer(spec.model.model_name_or_path)
    print(preview(spec.data, tokenizer, 2, seed=spec.train.seed, color=sys.stdout.isatty()))
    return f"{job_path} valid (spec hash {spec.spec_hash()[:12]}); trained-on tokens marked [[...]]"


def _eval_examples(spec: Any) -> list[Any]:
    from clusterft.data import load_examples

    return load_examples(spec.eval.dataset, spec.data.dataset_dir, max_samples=spec.eval.max_samples)


def _baseline(spec: Any, facts: dict[str, Any]) -> str:
    from clusterft.controller.evaluate import ModelRef, evaluate

    result = evaluate(
        ModelRef.resolve(spec.model.model_name_or_path),
        _eval_examples(spec),
        template=spec.data.template,
        cutoff_len=spec.data.cutoff_len,
        max_new_tokens=spec.eval.max_new_tokens,
        metrics=("exact_match",),
        save=False,
    )
    facts["baseline"] = result["exact_match"]
    return f"exact match {result['exact_match']:.2f} on {result['num_examples']} held-out examples"


def _submit(spec: Any, work: Path, facts: dict[str, Any]) -> str:
    from clusterft.controller.actor import get_or_start_controller
    from clusterft.controller.jobs import Jobs

    root, registry = work / "saves" / "controller", work / "saves" / "registry"
    jobs = Jobs(root, registry, controller=get_or_start_controller(root, registry))
    job, note = submit_demo_job(jobs, spec, work)
    facts.update(jobs=jobs, job_id=job.id, registry=registry)
    return f"job {job.id} submitted{note}; controller state in {root / 'jobs.db'}"


def submit_demo_job(jobs: Any, spec: Any, work: Path) -> tuple[Any, str]:
    """Submit the demo's job; a demo job that an interrupted earlier demo left unsettled in this work
    dir (the demo owns it) is cancelled first, and the note says so. Another job's folders are not
    the demo's to take: that refusal stands."""
    from clusterft.controller.store import FolderInUse

    try:
        return jobs.submit(spec, base_dir=work, name=DEMO_JOB), ""
    except FolderInUse as busy:
        if jobs.get(busy.job_id).name != DEMO_JOB:
            raise
        jobs.cancel(busy.job_id)
        note = f" (cancelled {busy.job_id}, left unfinished by an interrupted earlier demo)"
        return jobs.submit(spec, base_dir=work, name=DEMO_JOB), note


def _train(spec: Any, facts: dict[str, Any]) -> str:
    from clusterft.controller.state import JobState

    jobs, job_id = facts["jobs"], facts["job_id"]
    planned = spec.train.max_steps
    killer = WorkerKiller(spec, at_step=int(planned * 0.45))
    killer.start()
    try:
        job = _follow_training(jobs, job_id, planned)
    finally:
        killer.stop.set()
    if job.status not in (JobState.PROMOTED, JobState.REGISTERED, JobState.EVALUATING):
        raise RuntimeError(
            f"job {job_id} ended {job.status}: {job.reason} (see `clusterft jobs logs {job_id}`)"
        )
    train = json.loads((Path(spec.train.output_dir) / "run_summary.json").read_text())
    resumed = ", ".join(Path(p).name for p in train.get("resumed_from") or []) or "nothing"
    killed = f"killed pid {killer.killed[0]} at step {killer.killed[1]}" if killer.killed else "no kill"
    return (
        f"{train.get('completed_steps')}/{train.get('planned_steps')} steps, final loss "
        f"{train.get('final_loss', float('nan')):.4f}; {killed}; Ray Train restarted the workers "
        f"{train.get('restarts', 0)}x, resumed from {resumed}"
    )


def _follow_training(jobs: Any, job_id: str, planned: int) -> Any:
    """A progress bar of training steps until the job leaves training (resumes included)."""
    from tqdm import tqdm

    from clusterft.controller.jobs import progress
    from clusterft.controller.state import JobState

    training = {JobState.SUBMITTED, JobState.TRAINING, JobState.FAILED, JobState.RESUMING}
    tty = sys.stdout.isatty()  # in a log, a line every ~15 s rather than a redraw every poll
    with tqdm(
        total=planned, desc="    training", unit="step", dynamic_ncols=True, mininterval=0.1 if tty else 15
    ) as bar:
        while True:
            job = jobs.get(job_id)
            done = progress(job)
            bar.update(done["step"] - bar.n)
            bar.set_postfix(
                loss=f"{done['loss']:.3f}" if done["loss"] is not None else "-", state=str(job.status)
            )
            if job.status not in training:
                return job
            time.sleep(0.5)


def _promotion(facts: dict[str, Any]) -> str:
    from clusterft.controller.state import JobState

    job = facts["jobs"].wait(facts["job_id"], poll_s=0.5, bar=False)
    metrics = job.result.get("eval") or {}
    facts["promoted"] = job.status is JobState.PROMOTED
    if facts["promoted"]:
        facts["model_name"] = job.result["model_name"]
    verdict = "promoted to production" if facts["promoted"] else f"held: {job.reason}"
    return (
        f"exact match {facts['baseline']:.2f} -> {metrics.get('exact_match', float('nan')):.2f}, "
        f"loss {metrics.get('loss', float('nan')):.3f}; {job.result.get('model_name')} "
        f"{job.result.get('version')} {verdict}"
    )


def _serve_and_ask(spec: Any, work: Path, facts: dict[str, Any]) -> str:
    if not facts.get("promoted"):
        return "skipped: nothing was promoted"
    from openai import OpenAI

    from clusterft.serve.launch import start_app
    from clusterft.serve.spec import ServeSpec

    # Serve the registry's `production` alias, not a directory: the app follows later promotions.
    serve_spec = ServeSpec(
        registry={"root": str(facts["registry"]), "model_name": facts["model_name"], "alias": "production"},
        port=free_port(),
        chat_template=spec.data.template,
        engine={"max_model_len": 256, "kv_cache_space": 0.05},
    )
    url = start_app(serve_spec)
    facts["serving"] = True
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    examples = _eval_examples(spec)[:NUM_QUESTIONS]
    correct = 0
    print(f"    {'question':<24} {'expected':>10} {'answer':>10}")
    for example in examples:
        reply = client.chat.completions.create(
            model=facts["model_name"], messages=example.prompt_messages, max_tokens=16, temperature=0
        )
        answer = (reply.choices[0].message.content or "").strip()
        correct += answer == example.reference.strip()
        question = " ".join(example.prompt_messages[-1]["content"].split())
        mark = "ok" if answer == example.reference.strip() else "x"
        print(f"    {question:<24} {example.reference:>10} {answer:>10}  {mark}")
    return f"{correct}/{len(examples)} answers right, served at {url}/v1/chat/completions"


def _await_serving(facts: dict[str, Any]) -> str:
    """Wait (bounded) for the job to reach `serving`; say where it is either way."""
    if not facts.get("serving"):
        return "skipped: nothing is served"
    from clusterft.controller.state import JobState

    jobs, job_id = facts["jobs"], facts["job_id"]
    deadline = time.monotonic() + SERVING_TIMEOUT_S
    job = jobs.get(job_id)
    while job.status is not JobState.SERVING and time.monotonic() < deadline:
        time.sleep(0.2)
        job = jobs.get(job_id)
    facts["job_serving"] = job.status is JobState.SERVING
    events = jobs.store.events(job_id)
    states = " -> ".join(str(e.to_state) for e in events)
    if not facts["job_serving"]:
        return f"job {job_id} still {job.status} after {SERVING_TIMEOUT_S:.0f}s; its states: {states}"
    at = {e.to_state: e.at for e in events}
    waited = at[JobState.SERVING] - at[JobState.PROMOTED]
    return f"{states}; serving {waited:.1f}s after its promotion (the app started in between)"


def _shutdown(facts: dict[str, Any]) -> None:
    import ray

    if facts.get("serving"):
        from ray import serve

        serve.shutdown()
    if "jobs" in facts:
        from clusterft.controller.actor import CONTROLLER_NAME, NAMESPACE

        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE), no_restart=True)
        facts["jobs"].close()
    ray.shutdown()
