"""`kubetune` command line: validate, render, generate, local, operator."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import socket
import sys
import time
import uuid
from pathlib import Path

import yaml

from kubetune.api import crd, documents, reference, storage_location
from kubetune.api.v1alpha1 import GROUP, KINDS
from kubetune.api.validation import validate
from kubetune_operator.reconcile import finetunejob as ftj
from kubetune_operator.reconcile import schedule
from kubetune_operator.render import rbac_table
from kubetune_operator.render import serving as serving_render
from kubetune_operator.render import training as render

REPO_ROOT = Path(__file__).resolve().parents[2]
RBAC_RULES, SECURITY_DOC = "charts/kubetune/rbac-rules.yaml", "docs/security.md"
GENERATED_CRD_DIRS = ("crds", "charts/kubetune/crds")
# bad input, whatever the layer that sees it (bytes, YAML, the object, a flag): a GitOps pipeline tells it
# from a failure of kubetune itself (1) by this code alone
INVALID = 2


class InputError(Exception):
    """A flag or setting that cannot be used as given: reported in one line, exit code 2."""


def _read(path: str) -> bytes:
    """The file's bytes (or stdin's), at most what the loader accepts plus one byte to see it is more,
    read a MiB at a time so a small file costs little."""
    if path == "-":
        stream = getattr(sys.stdin, "buffer", None)
        return _read_bounded(stream) if stream else sys.stdin.read().encode("utf-8")
    with open(path, "rb") as handle:
        return _read_bounded(handle)


def _read_bounded(stream) -> bytes:
    chunks, total = [], 0
    while total <= documents.MAX_FILE_BYTES:
        chunk = stream.read(2**20)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def load_objects(path: str) -> list[documents.Document]:
    """Every object in the file as kubectl would send it (documents.load); InputError or OSError when
    the file cannot be read as Kubernetes objects."""
    return documents.load(_read(path), source_name(path))


def source_name(path: str) -> str:
    return "stdin" if path == "-" else path


def where(path: str, doc: documents.Document) -> str:
    """FILE:LINE: document N: Kind/name, the start of every line about one object (LINE: where it starts)."""
    return f"{source_name(path)}:{doc.line}: {doc.where}: {doc.name}"


def _shape_refused(path: str, doc: documents.Document) -> bool:
    """Print the top-level problems that stop every command (validate reports them itself)."""
    problems = documents.shape_errors(doc.value)
    for field_path, message in problems:
        print(f"{where(path, doc)}: error: {field_path}: {message}", file=sys.stderr)
    return bool(problems)


def dump_yaml(documents: list[dict]) -> str:
    return yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False, width=110)


def _other_group(document: dict) -> bool:
    """An object of another API group (apiVersion v1, apps/v1...) and kind: a typo in kubetune's
    apiVersion (its kind is kubetune's) or kind (its group is kubetune.io) is still refused."""
    api_version = document.get("apiVersion")
    return isinstance(api_version, str) and not api_version.startswith(GROUP) and document.get("kind") not in KINDS


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for doc in load_objects(args.file):
        document, notes = documents.as_created(doc.value)
        if _other_group(document):  # a Secret or a Namespace next to the jobs: the API server's to judge
            print(f"{doc.name}: skipped: not a kubetune.io object")
            continue
        result = validate(document)
        for field_path, message in notes:
            print(f"{where(args.file, doc)}: warning: {field_path}: {message}", file=sys.stderr)
        for warning in result.warnings:
            print(f"{where(args.file, doc)}: warning: {warning}", file=sys.stderr)
        if result.ok:
            print(f"{doc.name}: valid")
        else:
            failed = True
            for error in result.errors:
                if notes and error.path == "metadata.name":  # the user wrote a generateName: say so
                    error = f"metadata.generateName: {error.message} (generated names are the prefix plus " \
                            f"{documents.GENERATED_SUFFIX} characters, e.g. {document['metadata']['name']})"
                print(f"{where(args.file, doc)}: error: {error}", file=sys.stderr)
    return INVALID if failed else 0


def preview_job(doc: dict, namespace: str) -> dict:
    """The object as the API server would hand it to the operator (namespace, uid, generation)."""
    meta = dict(doc.get("metadata") or {})
    meta.setdefault("namespace", namespace)
    meta.setdefault("uid", str(uuid.uuid5(uuid.NAMESPACE_URL, f"kubetune:{meta['namespace']}/{meta.get('name')}")))
    meta.setdefault("generation", 1)
    return {**doc, "metadata": meta}


def storage_setting(args: argparse.Namespace) -> storage_location.StorageLocation:
    """The operator's storage setting from `--storage-endpoint` / `--storage-region` (exit 2 if malformed)."""
    try:
        return storage_location.operator_location(args.storage_endpoint, args.storage_region)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def cmd_render(args: argparse.Namespace) -> int:
    storage = storage_setting(args)
    settings = ftj.Settings(render=render.RenderSettings(trainer_image=args.trainer_image, storage=storage))
    out = []
    for loaded in load_objects(args.file):
        if _shape_refused(args.file, loaded):
            return INVALID
        doc = documents.as_created(loaded.value)[0]
        if doc.get("kind") == "AdapterDeployment":
            children = _render_adapterdeployment(doc, where(args.file, loaded), args,
                                                 serving_render.ServingSettings(storage=storage))
            if children is None:
                return INVALID
            out.extend(children)
            continue
        if doc.get("kind") != "FineTuneJob":
            print(f"skipping {doc.get('kind')}: it has no children to render", file=sys.stderr)
            continue
        job = preview_job(doc, args.namespace)
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        plan = ftj.decide(ftj.Observed(job=job, now=now), settings)
        if not plan.create:
            for condition in plan.status.get("conditions", []):
                if condition["status"] == "False":
                    print(f"{where(args.file, loaded)}: error: {condition['message']}", file=sys.stderr)
            return INVALID
        out.extend(plan.create)
        if (plan.status.get("data") or {}).get("state") == "Pending":  # the GPU stage after a successful data stage
            data = {**plan.status["data"], "state": "Succeeded"}
            plan = ftj.decide(ftj.Observed(job={**job, "status": {**plan.status, "data": data}}, now=now), settings)
            out.extend(plan.create)
        phase = plan.status.get("phase")
        print(f"FineTuneJob/{job['metadata']['name']}: the CPU-only data stage first, then "
              f"{'the training job' if plan.status.get('trainingJob') else f'phase {phase}'}'s children; "
              "later stages' children are created as the earlier stages finish", file=sys.stderr)
    if args.output == "json":
        print(json.dumps(out, indent=2))
    else:
        print(dump_yaml(out), end="")
    return 0


def _render_adapterdeployment(doc: dict, located: str, args: argparse.Namespace,
                              settings: serving_render.ServingSettings) -> list[dict] | None:
    """The AdapterDeployment's children before any adapter is resolved: an empty desired state, and a
    --max-lora-rank from the spec (or the smallest vLLM value until the adapters' manifests are read)."""
    from kubetune.api import serving
    from kubetune_operator.reconcile import adapterdeployment as adp
    from kubetune_operator.render import serving as serving_render

    adep = preview_job(doc, args.namespace)
    result = validate(adep)
    if not result.ok:
        for error in result.errors:
            print(f"{located}: error: {error}", file=sys.stderr)
        return None
    adep = {**adep, "spec": result.defaulted["spec"]}
    max_rank = adp.runtime_max_rank(adep["spec"], [])
    if not (adep["spec"]["runtime"].get("managed") or {}).get("maxLoraRank"):
        print(f"AdapterDeployment/{adep['metadata']['name']}: --max-lora-rank {max_rank} shown; the operator derives "
              "it from the adapters' manifests", file=sys.stderr)
    return serving_render.render_children(adep, settings, serving.DesiredState(generation=1), max_rank)


def generated_files(root: Path = REPO_ROOT) -> dict[str, str]:
    """Relative path -> content of every file generated from the API definition (and, for the RBAC
    table of docs/security.md, from the chart's rbac-rules.yaml under `root`)."""
    files = {}
    for filename, document in crd.all_crds().items():
        text = "# Generated from operator/kubetune/api/v1alpha1/ by `kubetune generate`. Do not edit.\n"
        text += dump_yaml([document])
        for directory in GENERATED_CRD_DIRS:
            files[f"{directory}/{filename}"] = text
    files["docs/reference.md"] = reference.reference_markdown()
    rules = yaml.safe_load((root / RBAC_RULES).read_text())
    files[SECURITY_DOC] = rbac_table.replace_table((root / SECURITY_DOC).read_text(), rules)
    return files


def cmd_generate(args: argparse.Namespace) -> int:
    root = Path(args.root)
    stale = []
    for relative, content in generated_files(root).items():
        target = root / relative
        current = target.read_text() if target.exists() else None
        if current == content:
            continue
        stale.append(relative)
        if not args.check:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
    if args.check and stale:
        print("generated files are out of date (run `kubetune generate`): " + ", ".join(stale), file=sys.stderr)
        return 1
    for relative in stale:
        print(f"wrote {relative}")
    return 0


def _progress_line(job: dict) -> str:
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    phase = status.get("phase", "")
    stage = progress.get("stage", "")
    if phase == "Sweeping" and (status.get("sweep") or {}).get("summary"):
        return f"Sweeping: {status['sweep']['summary']}"
    if phase == "Baseline":
        return f"Baseline: {(status.get('baseline') or {}).get('state', 'Pending')}"
    if phase == "Validating":
        return f"Validating: data stage {(status.get('data') or {}).get('state', 'Pending')}"
    if progress.get("totalSteps"):
        done = progress.get("percent", 0)
        bar = "#" * (done // 4) + "." * (25 - done // 4)
        parts = [f"[{bar}] {done:3d}% step {progress.get('step', 0)}/{progress['totalSteps']}"]
        for key, label in (("trainLoss", "loss"), ("evalLoss", "eval"), ("accuracy", "acc")):
            if key in progress:
                parts.append(f"{label} {progress[key]:.4f}")
        if "tokensPerSecond" in progress:
            parts.append(f"{progress['tokensPerSecond']:.0f} tok/s")
        if "etaSeconds" in progress:
            parts.append(f"eta {progress['etaSeconds']}s")
        return f"{phase}/{stage}: " + "  ".join(parts)
    return f"{phase}/{stage}" if stage else phase


FINETUNEJOB_FILE = "finetunejob.json"  # RUN_DIR/<job>/: the last `kubetune local` run of that job, with status


def _read_manifest(job: dict) -> dict | None:
    """The published adapter's manifest (training history, best step), None when there is none."""
    from kubetune.clients.storage import output_store_from_env

    uri = ((job.get("status") or {}).get("adapter") or {}).get("manifestUri")
    if not uri:
        return None
    try:
        raw = output_store_from_env(job["spec"]).read(uri)
        return json.loads(raw) if raw else None
    except Exception as exc:  # the report is best effort: the run's outcome stands
        print(f"warning: could not read {uri} for the report: {exc}", file=sys.stderr)
        return None


def _finish_report(result, job_dir: Path, name_dir: Path, duration_seconds: float):
    """The summary printed at the end, written with the charts under RUN_DIR/<job>/report/."""
    from kubetune_operator import report

    status = result.job.get("status") or {}
    extra = []
    if report.sweep_table(status):
        try:
            chart = report.sweep_chart(status, job_dir / "sweep.png",
                                       title=f"{result.job['metadata']['name']}: LoRA rank sweep")
            extra.append(f"  sweep chart {chart}")
        except ImportError:
            extra.append("  (install matplotlib, or kubetune[local], for the sweep chart)")
    return report.finetunejob_report(result.job, _read_manifest(result.job), name_dir / report.REPORT_DIR,
                                     run_dir=job_dir, duration_seconds=duration_seconds, extra_lines=extra)


def cmd_local(args: argparse.Namespace) -> int:
    from kubetune_operator.local import finetunejob as local  # subprocesses and storage only where they are needed

    objects = load_objects(args.file)  # once: the file may be stdin
    if any([_shape_refused(args.file, doc) for doc in objects]):
        return 2
    loaded = [documents.as_created(doc.value)[0] for doc in objects]
    kinds = [d.get("kind") for d in loaded]
    if kinds == ["AdapterDeployment"]:
        return _local_adapterdeployment(loaded[0], args)
    jobs = [d for d in loaded if d.get("kind") == "FineTuneJob"]
    if len(jobs) != 1:
        print(f"{args.file}: expected exactly one FineTuneJob or one AdapterDeployment, found "
              f"{', '.join(str(k) for k in kinds) or 'nothing'}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir).resolve()
    output = args.output
    if output is None:
        output = f"file://{run_dir / 'storage'}"
    elif output == "spec":
        output = None
    try:
        overrides = [local.parse_override(item) for item in args.set]
        job = local.prepare_job(jobs[0], namespace=args.namespace, output=output, overrides=overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = validate(job, local=True)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if not result.ok:
        for error in result.errors:
            print(f"error: {error}", file=sys.stderr)
        return 2
    job_dir = run_dir / job["metadata"]["name"] / job["metadata"]["uid"]
    interactive = sys.stderr.isatty()
    last = {"line": ""}

    def on_change(current: dict, events: list) -> None:
        for event in events:
            end = "\n" if not interactive else "\x1b[K\n"
            print(f"\r{event.type:<7} {event.reason}: {event.message}", end=end, file=sys.stderr)
        line = _progress_line(current)
        if line != last["line"]:
            last["line"] = line
            print(("\r" + line + "\x1b[K") if interactive else line, end="" if interactive else "\n",
                  file=sys.stderr, flush=True)

    started = time.monotonic()
    outcome = local.run(job, run_dir=job_dir, on_change=on_change, poll_seconds=args.poll)
    name_dir = job_dir.parent
    # what `kubetune local -f adapterdeployment.yaml --run-dir RUN_DIR` resolves a fineTuneJobRef from
    (name_dir / FINETUNEJOB_FILE).write_text(json.dumps(outcome.job, indent=2))
    print(_finish_report(outcome, job_dir, name_dir, time.monotonic() - started).summary)
    if args.status_file:
        Path(args.status_file).write_text(json.dumps(outcome.job, indent=2))
    return local_exit_code(outcome.job.get("status") or {})


def local_exit_code(status: dict) -> int:
    """0 when the job succeeded (or had nothing to train), 2 when it failed on bad input (the trainer's
    own exit 2: the spec or the data must change), else 1."""
    if status.get("phase") in ("Succeeded", "Skipped"):
        return 0
    return 2 if (status.get("failure") or {}).get("reason") == "BadInput" else 1


def _local_adapterdeployment(document: dict, args: argparse.Namespace) -> int:
    # the engine and agents run as subprocesses, started there
    from kubetune_operator.local import adapterdeployment, finetunejob, inputs

    if args.output:
        print("--output applies to a FineTuneJob; edit the AdapterDeployment instead", file=sys.stderr)
        return 2
    try:  # e.g. --set baseModel.uri=file:///path/to/model: the same PATH=VALUE overrides as a FineTuneJob's
        document = finetunejob.apply_overrides(json.loads(json.dumps(document)),
                                               [finetunejob.parse_override(item) for item in args.set])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = inputs.Options(
        run_dir=Path(args.run_dir).resolve(), namespace=args.namespace, poll=args.poll,
        status_file=Path(args.status_file).resolve() if args.status_file else None,
        traffic=Path(args.traffic) if args.traffic else None, traffic_rate=args.traffic_rate, until=args.until,
        max_seconds=args.max_seconds, drift_seconds=args.drift_seconds, embedding_url=args.embedding_url,
        embedding_model=args.embedding_model)
    return adapterdeployment.run(document, options)


def cmd_operator(args: argparse.Namespace) -> int:
    from kubetune_operator.controllers import main as operator_main  # kopf only where it is needed

    return operator_main.run(args, storage_setting(args))


def positive_number(text: str) -> float:
    """A flag's seconds or rate: a finite number above zero (nan, inf and 0 would hang or spin)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def non_negative_number(text: str) -> float:
    return 0.0 if text.strip() in ("0", "0.0") else positive_number(text)


def port_number(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)")
    return int(text)


def positive_integer(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


def _add_storage_flags(p) -> None:
    """The operator's storage setting: what a spec that names no endpoint or region gets (docs/operations.md)."""
    setting = storage_location.operator_setting(os.environ)
    p.add_argument("--storage-endpoint", default=setting.endpoint, metavar="URL",
                   help="S3 endpoint for every spec that names none: the operator's own reads and every pod it "
                        "renders (default: $KUBETUNE_S3_ENDPOINT, $AWS_ENDPOINT_URL; none: AWS S3)")
    p.add_argument("--storage-region", default=setting.region, metavar="REGION",
                   help="S3 region for every spec that names none (default: $AWS_REGION, $AWS_DEFAULT_REGION; "
                        "none: the S3 client's default)")


def _add_offline_commands(sub) -> None:
    p = sub.add_parser("validate", help="schema + CEL + semantic checks, errors with field paths")
    p.add_argument("-f", "--file", required=True, help="YAML file (or - for stdin)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="print the exact objects the operator would create")
    p.add_argument("-f", "--file", required=True)
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("-o", "--output", choices=["yaml", "json"], default="yaml")
    p.add_argument("--trainer-image", default=render.RenderSettings().trainer_image)
    _add_storage_flags(p)
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("generate", help="write the CRDs generated from the API definition")
    p.add_argument("--root", default=str(REPO_ROOT))
    p.add_argument("--check", action="store_true", help="fail if a generated file differs, write nothing")
    p.set_defaults(func=cmd_generate)


def _add_local_command(sub) -> None:
    p = sub.add_parser("local", help="run a FineTuneJob, or serve an AdapterDeployment with its drift loop, on "
                                     "this machine through the operator's own decisions")
    p.add_argument("-f", "--file", required=True, help="YAML file with one FineTuneJob or one AdapterDeployment")
    p.add_argument("-n", "--namespace", default="default")
    p.add_argument("--run-dir", default="kubetune-runs", help="where configs, logs and file:// outputs go")
    p.add_argument("--output", help="output URI (default: file://RUN_DIR/storage; 'spec' keeps spec.output.uri)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a spec field, e.g. --set baseModel.uri=file:///models/x (YAML value; repeat)")
    p.add_argument("--poll", type=positive_number, default=1.0, help="seconds between state-machine rounds")
    p.add_argument("--status-file", help="write the final FineTuneJob (with status) here as JSON; an "
                                         "AdapterDeployment's after every pass (default: "
                                         "RUN_DIR/NAME/adapterdeployment.json)")
    serving_flags = p.add_argument_group("AdapterDeployment (one CPU engine, an agent per replica, the drift loop)")
    serving_flags.add_argument("--traffic", metavar="FILE.jsonl",
                               help='requests sent once to the agents, round robin: one JSON line each, '
                                    '{"path": "/classify", "body": {"input": "..."}} (model: the first adapter)')
    serving_flags.add_argument("--traffic-rate", type=positive_number, metavar="N",
                               help="requests per second (default: as fast as the agents answer)")
    serving_flags.add_argument("--until", choices=["promoted", "rejected", "drifted", "traffic-done", "never"],
                               default="promoted",
                               help="stop (exit 0) when a retrain is promoted and served everywhere, a retrain is "
                                    "rejected, drift is detected, the traffic is sent and analysed, or never "
                                    "(Ctrl-C)")
    serving_flags.add_argument("--max-seconds", type=positive_number,
                               help="give up (exit 1) when --until is not reached this long after the start")
    serving_flags.add_argument("--drift-seconds", type=positive_number, default=2.0,
                               help="how often new samples are read and drift windows analysed")
    serving_flags.add_argument("--embedding-url", default=os.environ.get("KUBETUNE_EMBEDDING_URL"),
                               help="OpenAI-compatible embeddings service for the drift diagnostics (e.g. "
                                    "kubetune_engine --embedding-model DIR); without it they are skipped")
    serving_flags.add_argument("--embedding-model", default="all-MiniLM-L6-v2",
                               help="model name sent to --embedding-url")
    p.set_defaults(func=cmd_local)


def _add_sharding_flags(p) -> None:
    """Several replicas splitting the work by namespace (docs/sharding.md)."""
    p.add_argument("--shards", type=positive_integer, default=1,
                   help="split the namespaces into this many shards, each held by one replica through a Lease; "
                        "1 (the default): this process reconciles everything and takes no Lease")
    p.add_argument("--lease-namespace", default=os.environ.get("POD_NAMESPACE"),
                   help="where the shard Leases live (default: $POD_NAMESPACE, the operator's own namespace)")
    p.add_argument("--identity", default=(os.environ.get("POD_NAME") or socket.gethostname()).lower(),
                   help="this replica's name in the Leases (default: $POD_NAME, else the host name)")
    p.add_argument("--lease-duration", type=positive_number, default=15.0, metavar="SECONDS",
                   help="a shard whose Lease was not renewed for this long is taken by another replica")
    p.add_argument("--renew-deadline", type=positive_number, default=10.0, metavar="SECONDS",
                   help="a replica that could not renew a shard's Lease for this long stops reconciling it")
    p.add_argument("--retry-period", type=positive_number, default=2.0, metavar="SECONDS",
                   help="how often each replica renews, takes and hands over shard Leases")


def _add_operator_command(sub) -> None:
    p = sub.add_parser("operator", help="run the operator (kopf)")
    p.add_argument("-n", "--namespace", action="append", default=[], help="watch only these namespaces (repeat)")
    p.add_argument("-A", "--all-namespaces", action="store_true", help="watch the whole cluster")
    p.add_argument("--trainer-image", default=render.RenderSettings().trainer_image)
    p.add_argument("--health-port", type=port_number, default=8080)
    p.add_argument("--metrics-port", type=port_number, default=9090)
    p.add_argument("--publish-timeout", type=positive_integer, default=600, help="seconds to wait for a manifest")
    p.add_argument("--vllm-image", default=serving_render.ServingSettings().engine_images["vllm"],
                   help="engine image of managed serving runtimes")
    p.add_argument("--agent-image", default=serving_render.ServingSettings().agent_image,
                   help="image of the agent sidecar (the operator's own image)")
    p.add_argument("--allowed-storage", "--allowed-source", dest="allowed_storage", action="append",
                   metavar="NAMESPACE=PREFIX",
                   help="storage prefix a namespace's FineTuneJobs and AdapterDeployments may name (data, outputs, "
                        "adapter sources, samples; repeatable; *=PREFIX for every namespace; none given: no limit; "
                        "--allowed-source is its former name)")
    p.add_argument("--embedding-url", default=os.environ.get("KUBETUNE_EMBEDDING_URL"),
                   help="OpenAI-compatible embeddings service for the drift diagnostics (e.g. the CPU engine with "
                        "--embedding-model, or a vLLM/TEI serving all-MiniLM-L6-v2); without it they are skipped")
    p.add_argument("--embedding-model", default="all-MiniLM-L6-v2", help="model name sent to --embedding-url")
    p.add_argument("--max-concurrent-retrains", type=positive_integer, default=2,
                   help="drift retrains in flight at once across the watched namespaces")
    p.add_argument("--drift-seconds", type=positive_number, default=30.0,
                   help="how often each drift-watched adapter's new samples are read and analysed")
    _add_storage_flags(p)
    _add_sharding_flags(p)
    p.add_argument("--status-min-interval", type=non_negative_number, default=10.0, metavar="SECONDS",
                   help="write fields that change on every poll (FineTuneJob progress, AdapterDeployment drift "
                        "window counts) at most this often per object (status.lastUpdateTime); phase, conditions "
                        "and results are written at once; 0: every change at once")
    p.add_argument("--poll-budget", type=positive_number, default=schedule.Budgets().total, metavar="PASSES",
                   help="periodic passes per second at most, all objects together (progress reads, safety "
                        "resyncs, rollouts); with more objects each is polled less often (docs/scale.md)")
    p.add_argument("--verbose", action="store_true")
    p.set_defaults(func=cmd_operator)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_offline_commands(sub)
    _add_local_command(sub)
    _add_operator_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, documents.InputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except OSError as exc:  # a file named on the command line: missing, a directory, unreadable, a full disk
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130  # the shell's code for SIGINT
    except Exception as exc:
        print(f"error: kubetune stopped on an unexpected problem (please report it): {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
