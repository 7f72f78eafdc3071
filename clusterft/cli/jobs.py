"""`clusterft jobs submit|list|status|logs|cancel|resume|api` and `clusterft eval`: argparse wiring.

The CLI adds them in two calls (clusterft/cli/main.py):

    from clusterft.cli.jobs import add_eval_command, add_jobs_commands
    add_jobs_commands(commands)
    add_eval_command(commands)

`submit` needs a running Ray cluster (`RAY_ADDRESS`, or `ray start --head` on this host) for the
detached controller; the other commands read the job store (SQLite in --root, or the PostgreSQL
database --store-url names) and work without one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from clusterft.cli.helpers import Subcommands, add_command, add_dir_option, add_group
from clusterft.cli.registry import add_registry_option, format_table
from clusterft.controller.jobs import DEFAULT_ROOT, ROOT_ENV, Jobs, job_record, progress
from clusterft.controller.store_backend import STORE_URL_ENV
from clusterft.http import ADMIN_API_KEY_ENV, API_KEY_ENV


def _connect(args: argparse.Namespace) -> object:
    from clusterft.controller.actor import connect_controller  # imports Ray: only when needed

    return connect_controller(args.root, args.registry, args.store_url)


def _jobs(args: argparse.Namespace, controller: object = None) -> Jobs:
    return Jobs(args.root, args.registry, controller=controller, store_url=args.store_url)


def jobs_submit(args: argparse.Namespace) -> int:
    from clusterft.config import load_job_spec

    spec = load_job_spec(args.job)
    jobs = _jobs(args, _connect(args))
    job = jobs.submit(spec, base_dir=os.getcwd(), name=args.name, idempotency_key=args.idempotency_key)
    print(job.id)
    if not args.wait:
        return 0
    job = jobs.wait(job.id, bar=not args.no_progress)
    print(f"{job.id}: {job.status}" + (f" ({job.reason})" if job.reason else ""), file=sys.stderr)
    return 0 if job.status.value in ("registered", "promoted", "serving") else 1


def jobs_list(args: argparse.Namespace) -> int:
    jobs = _jobs(args).list(limit=args.limit)
    if args.json:
        print(json.dumps([job_record(job) for job in jobs], indent=2))
        return 0
    rows = []
    for job in jobs:
        done = progress(job)
        steps = f"{done['step']}/{done['planned_steps'] or '?'}"
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job.created_at))
        rows.append([job.id, job.name, job.status, steps, job.attempt, created, job.reason])
    print(format_table(["ID", "NAME", "STATUS", "STEPS", "ATTEMPT", "CREATED", "REASON"], rows))
    return 0


def jobs_status(args: argparse.Namespace) -> int:
    jobs = _jobs(args)
    record = job_record(jobs.get(args.id), jobs.store)
    if args.json:
        print(json.dumps(record, indent=2))
        return 0
    done = record["progress"]
    print(
        f"{record['id']}  {record['name']}  {record['status']}"
        + (f": {record['reason']}" if record["reason"] else "")
    )
    print(
        f"attempt {record['attempt']}, restarts {record['restarts']}, "
        f"step {done['step']}/{done['planned_steps']}"
    )
    for key in ("model_name", "version", "eval"):
        if key in record["result"]:
            print(f"{key}: {record['result'][key]}")
    for event in record["events"]:
        at = time.strftime("%H:%M:%S", time.localtime(event["at"]))
        print(
            f"  {at}  {event['from_state'] or '-'} -> {event['to_state']}  {event['reason'] or ''}".rstrip()
        )
    return 0


def jobs_logs(args: argparse.Namespace) -> int:
    """Every attempt's logs in order; --follow keeps printing the newest until the job settles."""
    jobs = _jobs(args)
    printed: dict[str, int] = {}
    while True:
        for where, text in jobs.log_texts(args.id):  # a file, or a Ray job's log on its job server
            if text is None:
                continue
            if where not in printed:
                print(f"==> {where} <==", flush=True)
            sys.stdout.write(text[printed.get(where, 0) :])
            sys.stdout.flush()
            printed[where] = len(text)
        job = jobs.get(args.id)
        if not args.follow or job.settled:
            return 0
        time.sleep(1.0)


def jobs_cancel(args: argparse.Namespace) -> int:
    job = _jobs(args).cancel(args.id)
    print(f"{job.id}: {job.status}")
    return 0


def jobs_resume(args: argparse.Namespace) -> int:
    jobs = _jobs(args, _connect(args))
    job = jobs.resume(args.id)
    print(f"{job.id}: {job.status}")
    return 0


def jobs_api(args: argparse.Namespace) -> int:
    from clusterft.controller.api import serve_api

    serve_api(
        args.root,
        args.registry,
        host=args.host,
        port=args.port,
        api_key=args.api_key or None,
        admin_api_key=args.admin_api_key or None,
        insecure=args.insecure,
        start_controller=True,
        store_url=args.store_url,
    )
    return 0


def add_root_option(parser: argparse.ArgumentParser) -> None:
    """`--root DIR`: the controller's state, `$CLUSTERFT_HOME` or ./saves/controller."""
    add_dir_option(
        parser, "--root", ROOT_ENV, DEFAULT_ROOT, "controller state on shared storage: job store, run logs"
    )


def add_store_url_option(parser: argparse.ArgumentParser) -> None:
    """`--store-url URL`: a PostgreSQL job store for a cluster, `$CLUSTERFT_STORE_URL`; unset, SQLite
    in --root."""
    parser.add_argument(
        "--store-url",
        default=os.environ.get(STORE_URL_ENV) or None,
        metavar="URL",
        help=f"the job store on a PostgreSQL server, postgresql://user@host:5432/db, for controllers and "
        f"commands on several hosts (default: ${STORE_URL_ENV}; unset: SQLite, ROOT/jobs.db); the "
        "password from ~/.pgpass or $PGPASSWORD keeps it off command lines",
    )


def add_jobs_commands(commands: Subcommands) -> None:
    """Add the `jobs` group to the CLI's top-level subparsers."""
    action = add_group(
        commands,
        "jobs",
        help="submit and follow fine-tuning jobs",
        description=__doc__,
        options=[add_root_option, add_store_url_option, add_registry_option],
    )

    sub = action("submit", jobs_submit, "submit a job spec; prints the job id at once")
    sub.add_argument("job", help="job spec YAML, e.g. jobs/quickstart.yaml")
    sub.add_argument(
        "--name", help="job (and registry model) name; default: promote.model_name or output_dir"
    )
    sub.add_argument(
        "--wait",
        action="store_true",
        help="follow the job until it settles (registered, promoted, serving, or error)",
    )
    sub.add_argument("--no-progress", action="store_true", help="with --wait: no progress bar")
    sub.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="a retried submit with the same key returns the first job instead of starting another",
    )

    sub = action("list", jobs_list, "list jobs, newest first")
    sub.add_argument("--limit", type=int, default=None, help="at most this many")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = action("status", jobs_status, "a job's state, progress, results and history")
    sub.add_argument("id", help="job id")
    sub.add_argument("--json", action="store_true", help="print JSON")

    sub = action("logs", jobs_logs, "print a job's driver and evaluation logs, every attempt")
    sub.add_argument("id", help="job id")
    sub.add_argument("-f", "--follow", action="store_true", help="keep printing until the job settles")

    sub = action("cancel", jobs_cancel, "cancel a job and kill its run")
    sub.add_argument("id", help="job id")

    sub = action("resume", jobs_resume, "relaunch a cancelled or failed job from its newest checkpoint")
    sub.add_argument("id", help="job id")

    sub = action("api", jobs_api, "serve the jobs REST API (OpenAPI at /docs, /openapi.json)")
    sub.add_argument(
        "--host",
        default="127.0.0.1",
        help="bind address (default 127.0.0.1: this host only; any other needs --api-key or --insecure)",
    )
    sub.add_argument("--port", type=int, default=8266, help="port (default 8266)")
    sub.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the Bearer KEY of reads (default: ${API_KEY_ENV}; unset: reads are open)",
    )
    sub.add_argument(
        "--admin-api-key",
        default=os.environ.get(ADMIN_API_KEY_ENV),
        help=f"the Bearer KEY of submit/cancel/resume (default: ${ADMIN_API_KEY_ENV}; unset: those are "
        "refused when --api-key is set, open when no key is)",
    )
    sub.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host without an API key (anyone who reaches it can submit jobs)",
    )


def eval_handler(args: argparse.Namespace) -> int:
    from clusterft.controller.evaluate import eval_command

    return eval_command(
        args.model,
        args.dataset,
        dataset_dir=args.dataset_dir,
        template=args.template,
        max_samples=args.max_samples,
        max_new_tokens=args.max_new_tokens,
        benchmark=args.benchmark,
        base=args.base,
        as_json=args.json,
    )


def add_eval_command(commands: Subcommands) -> None:
    """Add `clusterft eval MODEL_OR_ADAPTER --dataset NAME ...`."""
    help = "loss, perplexity and exact match of a model or adapter on a dataset (engine generation)"
    sub = add_command(commands, "eval", eval_handler, help)
    sub.add_argument("model", help="HF model dir or peft adapter dir")
    sub.add_argument(
        "--dataset", required=True, type=lambda s: [x for x in s.split(",") if x], help="dataset names"
    )
    sub.add_argument("--dataset-dir", default="data", help="dir with dataset_info.json (default ./data)")
    sub.add_argument("--template", default="default", help="chat template the model was trained with")
    sub.add_argument("--max-samples", type=int, default=None, help="evaluate at most N examples")
    sub.add_argument("--max-new-tokens", type=int, default=32, help="generation length")
    sub.add_argument(
        "--benchmark",
        action="store_true",
        help="GSM8K style: score number_match (the final number of the answer) instead of exact_match",
    )
    sub.add_argument("--base", help="base model dir of an adapter (default: from adapter_config.json)")
    sub.add_argument("--json", action="store_true", help="print JSON")
