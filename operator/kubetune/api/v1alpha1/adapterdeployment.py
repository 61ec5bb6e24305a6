"""AdapterDeployment: which adapters to serve on which base model, how they roll out, and its status."""

from __future__ import annotations

from ..k8s_values import LABEL_VALUE_PATTERN
from ..schema import (
    DNS_LABEL_PATTERN,
    array,
    boolean,
    integer,
    number,
    obj,
    opaque_object,
    rule,
    string,
    string_map,
)
from .common import (
    LAST_UPDATE_TIME,
    STORAGE_PREFIX,
    base_model,
    conditions,
    s3_credentials,
    s3_endpoint,
    s3_region,
)

ADAPTER_SOURCE = obj(
    "Where an adapter version comes from: a FineTuneJob's published adapter, or a uri with its digest.",
    {
        "fineTuneJobRef": obj(
            "A FineTuneJob in this namespace; resolves to its status.adapter (uri and digest).",
            {"name": string("Name of the FineTuneJob.", pattern=DNS_LABEL_PATTERN, max_length=253)},
            required=["name"],
        ),
        "uri": string("Location of the adapter's manifest.json or its directory.", pattern=STORAGE_PREFIX,
                      max_length=2048),
        "digest": string("Expected sha256:HEX digest of the adapter.", pattern=r"^sha256:[a-f0-9]{64}$"),
    },
    rules=[
        rule(
            "has(self.fineTuneJobRef) != has(self.uri)",
            "source: set exactly one of source.fineTuneJobRef or source.uri",
        ),
        rule(
            "!has(self.uri) || has(self.digest)",
            "source.digest is required with source.uri, so the weights served are the weights meant",
            field_path=".digest",
        ),
    ],
)

ANALYSIS = obj(
    "Canary-versus-stable comparison over a window; failing any threshold rolls back.",
    {
        "windowSeconds": integer("Length of the comparison window.", default=300, minimum=10),
        "minRequests": integer("Requests the canary must serve before a verdict.", default=100, minimum=1),
        "maxErrorRateIncrease": number("Allowed canary error rate minus stable error rate.", default=0.01,
                                       minimum=0, maximum=1),
        "maxLatencyRatio": number("Allowed canary/stable p95 latency ratio.", default=1.5, minimum=1),
        "maxConfidenceDrop": number("Allowed drop of mean confidence against stable.", default=0.05, minimum=0,
                                    maximum=1),
    },
)

CANARY_STEP = obj(
    "One step of a canary: exactly one of setWeight, pause or analysis.",
    {
        "setWeight": integer("Percent of the alias's traffic sent to the canary.", minimum=0, maximum=100),
        "pause": obj("Wait before the next step.",
                     {"seconds": integer("Seconds to wait.", minimum=1, maximum=86_400)},
                     required=["seconds"]),
        "analysis": ANALYSIS,
    },
    rules=[
        rule(
            "[has(self.setWeight), has(self.pause), has(self.analysis)].filter(x, x).size() == 1",
            "strategy.canary.steps[]: set exactly one of setWeight, pause or analysis",
        )
    ],
)

DRIFT = obj(
    "Watch this adapter's sampled traffic (spec.trafficSampling) for drift that hurts the model; retrain "
    "through a new FineTuneJob and promote it only if it is better.",
    {
        "window": obj(
            "Windows of sampled requests, accumulated in storage (not in memory) and analysed when full.",
            {
                "requests": integer("A window closes after this many scored requests.", default=1000, minimum=10,
                                    maximum=100_000),
                "maxSeconds": integer("...or after this long, if it has at least minRequests.", default=3600,
                                      minimum=10),
                "minRequests": integer("A window with fewer scored requests is never analysed (it keeps filling).",
                                       default=200, minimum=10),
            },
            default={},
            rules=[rule("self.minRequests <= self.requests", "window.minRequests must not exceed window.requests",
                        field_path=".minRequests")],
        ),
        "thresholds": obj(
            "Thresholds are calibrated per adapter by bootstrapping windows of the window's size from the "
            "holdout in its drift profile; these set how far out a window must be.",
            {
                "sigmas": number("Mean-based tests fire beyond this many standard deviations of the bootstrapped "
                                 "window means.", default=3.0, minimum=1, maximum=10),
                "pValue": number("Two-sample tests fire above the (1 - pValue) quantile of bootstrapped null "
                                 "windows.", default=0.01, minimum=0.0001, maximum=0.2),
                "bootstraps": integer("Bootstrapped windows per calibration.", default=500, minimum=100,
                                      maximum=10_000),
                "triggerOnDiagnostics": array(
                    "Diagnostics that also count as evidence of harm (by default they are reported only).",
                    string("A diagnostic.", enum=["inputLength", "oov", "embedding"]),
                    default=[], max_items=3, list_type="set"),
            },
            default={},
        ),
        "embeddings": boolean("Compute the embedding diagnostics (centroid cosine distance, MMD) with the "
                              "operator's embedding service (--embedding-url).", default=True),
        "guard": obj(
            "What it takes to start a retrain, and to stop calling the adapter drifted.",
            {
                "triggerWindows": integer("Drifted windows needed among the last ofWindows.", default=3, minimum=1,
                                          maximum=100),
                "ofWindows": integer("Consecutive windows considered.", default=4, minimum=1, maximum=100),
                "clearWindows": integer("Consecutive clean windows before the drifted state clears "
                                        "(hysteresis).", default=2, minimum=1, maximum=100),
                "cooldownSeconds": integer("No new retrain this long after a retrain ends.", default=3600,
                                           minimum=0),
                "maxRetrainsPerPeriod": integer("Retrain budget per period.", default=3, minimum=0, maximum=1000),
                "periodSeconds": integer("The budget's period.", default=86_400, minimum=60),
            },
            default={},
            rules=[rule("self.triggerWindows <= self.ofWindows", "guard.triggerWindows must not exceed "
                        "guard.ofWindows", field_path=".triggerWindows")],
        ),
        "retrain": obj(
            "How a retrain is built. Without it, drift is detected and reported only.",
            {
                "labelledData": obj(
                    "New labelled examples (JSON Lines in the template's dataset format) collected after "
                    "deployment: every object under the prefix that no earlier retrain used.",
                    {
                        "uri": string("S3 (or file://) prefix.", pattern=STORAGE_PREFIX, max_length=2048),
                        "minExamples": integer("No retrain with fewer new labelled examples.", default=100,
                                               minimum=1),
                        "holdoutFraction": number("Share of the new examples held out to judge the candidate.",
                                                  default=0.2, minimum=0.05, maximum=0.5),
                    },
                    required=["uri"],
                ),
                "includeOriginalData": boolean("Train on the serving adapter's training data plus the new "
                                               "examples (else the new examples only).", default=True),
                "template": obj(
                    "The FineTuneJob to create. Its spec is a FineTuneJob spec without dataset and evaluation, "
                    "which the operator fills in; the result is validated like any FineTuneJob.",
                    {
                        "metadata": obj("Labels and annotations for the FineTuneJob.", {
                            "labels": string_map("Labels."),
                            "annotations": string_map("Annotations."),
                        }),
                        "spec": opaque_object("A FineTuneJob spec (baseModel, task, method, training, "
                                              "distributed, output...)."),
                    },
                    required=["spec"],
                ),
            },
            required=["labelledData", "template"],
        ),
        "promotion": obj(
            "The gate a retrained candidate must pass before its canary starts.",
            {
                "metric": string("Metric compared (default: accuracy for classification, eval_loss otherwise).",
                                 enum=["accuracy", "macro_f1", "eval_loss", "perplexity"]),
                "minImprovement": number("The candidate must beat the serving adapter on the new holdout by more "
                                         "than this.", default=0.0, minimum=0),
                "maxRegression": number("Allowed loss of the metric on the original holdout.", default=0.02,
                                        minimum=0),
            },
            default={},
        ),
    },
)

LABEL_REQUIREMENT = obj(
    "A label requirement: key, operator and values, as in a Kubernetes LabelSelector.",
    {
        "key": string("The label key.", max_length=317),
        "operator": string("How the key's value is compared.", enum=["In", "NotIn", "Exists", "DoesNotExist"]),
        "values": array("Values for In and NotIn; empty for Exists and DoesNotExist.",
                        string("A value (a label value).", pattern=LABEL_VALUE_PATTERN, max_length=63),
                        max_items=64, list_type="set"),
    },
    required=["key", "operator"],
    rules=[rule("(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                "matchExpressions[]: In and NotIn need values, Exists and DoesNotExist take none",
                field_path=".values")],
)

NAMESPACE_SELECTOR = obj(
    "Serve the selected pods in every namespace whose labels match, besides this one (cluster-wide "
    "rollout, docs/concepts.md). A namespace other than this one must also accept this namespace's "
    "adapters (annotation kubetune.io/accept-adapters-from) and allow the sources (tenancy).",
    {
        "matchLabels": string_map("Labels the namespaces carry."),
        "matchExpressions": array("Label requirements, all of which must hold.", LABEL_REQUIREMENT, max_items=16),
    },
    rules=[rule("has(self.matchLabels) || has(self.matchExpressions)",
                "runtime.selector.namespaceSelector: set matchLabels or matchExpressions (an empty selector "
                "would select every namespace)")],
)

ADAPTER = obj(
    "An adapter served under a stable alias.",
    {
        "name": string("Stable alias clients request as the model name (served namespace-qualified).",
                       pattern=DNS_LABEL_PATTERN, max_length=63),
        "source": ADAPTER_SOURCE,
        "drift": DRIFT,
    },
    required=["name", "source"],
)

ADAPTERDEPLOYMENT_SPEC = obj(
    "Which adapters to serve on which base model, and how new versions roll out.",
    {
        "baseModel": base_model(
            "The base model the serving pods run (the same fields as a FineTuneJob's spec.baseModel: copy it); "
            "adapters trained on another base are refused. Its credentials and s3 access reach the engine "
            "container as the engine reads them (docs/serving-runtimes.md)."),
        "runtime": obj(
            "Serving pods: a managed vLLM Deployment, or existing pods selected by labels.",
            {
                "engine": string("The inference engine (kubetune.runtimes): its accepted LoRA ranks, its adapter "
                                 "API and, when managed, the engine container. vllm: vllm/vllm-openai on GPUs; "
                                 "kubetune-cpu: the CPU engine of the trainer image (transformers + peft), "
                                 "which fetches the base model itself (s3://, file://, hf://).",
                                 default="vllm", enum=["vllm", "kubetune-cpu"]),
                "managed": obj(
                    "A Deployment (the engine container and the agent) and a Service rendered by the operator.",
                    {
                        "replicas": integer("Serving pods.", default=1, minimum=0, maximum=1000),
                        "image": string("vLLM image override.", max_length=1024),
                        "gpusPerReplica": integer("GPUs per pod (vLLM's tensor parallel size; the kubetune-cpu "
                                                  "engine requests none).", default=1, minimum=0, maximum=16),
                        "maxLoras": integer("vLLM's --max-loras: the most distinct adapters in one batch (the "
                                            "GPU's LoRA slots); requests for more wait for the next batch. It does "
                                            "not bound the adapters a pod serves.", default=4, minimum=1,
                                            maximum=256),
                        "maxCpuLoras": integer("vLLM's --max-cpu-loras: adapters cached in host memory per pod (LRU); "
                                               "an evicted adapter stays served and is read again from its files "
                                               "when asked for. At least maxLoras; default: maxLoras.", minimum=1,
                                               maximum=1024),
                        "maxLoraRank": integer("Largest rank served (vLLM allows 8, 16, 32, 64, 128, 256, "
                                               "320, 512); default derived from the adapters.",
                                               enum=[1, 8, 16, 32, 64, 128, 256, 320, 512]),
                    },
                    rules=[rule("!has(self.maxCpuLoras) || self.maxCpuLoras >= self.maxLoras",
                                "runtime.managed.maxCpuLoras must be at least maxLoras (vLLM refuses fewer)",
                                field_path=".maxCpuLoras")],
                ),
                "selector": obj(
                    "Existing serving pods (every matching pod of every replica), each running the kubetune agent "
                    "next to its engine.",
                    {
                        "matchLabels": string_map("Labels the serving pods carry (at least one: an empty selector "
                                                  "selects every pod in the namespace).", min_properties=1),
                        "maxLoraRank": integer("The --max-lora-rank the existing engines run with (adapters above "
                                               "it are refused).", minimum=1, maximum=512),
                        "namespaceSelector": NAMESPACE_SELECTOR,
                    },
                    required=["matchLabels"],
                ),
            },
            rules=[rule("has(self.managed) != has(self.selector)",
                        "runtime: set exactly one of runtime.managed or runtime.selector")],
        ),
        "adapters": array("Adapters to serve, keyed by name.", ADAPTER, min_items=1, max_items=256, list_type="map",
                          map_keys=["name"]),
        "strategy": obj(
            "How a new adapter version replaces the serving one.",
            {
                "type": string("Immediate switches every pod; Canary follows the steps.", default="Canary",
                               enum=["Immediate", "Canary"]),
                "canary": obj(
                    "Canary steps.",
                    {"steps": array("Steps in order.", CANARY_STEP, min_items=1, max_items=64)},
                    required=["steps"],
                ),
                "unloadGraceSeconds": integer("Keep the old version loaded this long after promotion.",
                                              default=60, minimum=0),
            },
            default={},
            rules=[rule("self.type != 'Canary' || has(self.canary)",
                        "strategy.canary is required when strategy.type is Canary",
                        field_path=".canary")],
        ),
        "storage": obj(
            "How the serving pods' agents reach the adapters and the sample prefix (S3-compatible).",
            {
                "endpoint": s3_endpoint(),
                "region": s3_region(),
                "credentials": s3_credentials("the adapter and sample buckets"),
            },
        ),
        "trafficSampling": obj(
            "Requests and responses sampled to storage for drift analysis.",
            {
                "rate": number("Share of requests sampled.", default=0.0, minimum=0, maximum=1),
                "uri": string("S3 prefix for samples (file:// only with `kubetune local`).", pattern=STORAGE_PREFIX,
                              max_length=2048),
            },
            default={},
        ),
    },
    required=["baseModel", "runtime", "adapters"],
    rules=[rule("!self.adapters.exists(a, has(a.drift)) || (has(self.trafficSampling.uri) "
                "&& self.trafficSampling.rate > 0.0)",
                "adapters[].drift needs trafficSampling.uri and trafficSampling.rate > 0 (drift is measured on "
                "sampled traffic)", field_path=".trafficSampling")],
)

ADAPTER_VERSION = obj(
    "One version of an adapter.",
    {
        "version": string("Served name: <namespace>/<adapter>@<first 12 hex of the digest>.", max_length=320),
        "digest": string("sha256:HEX of the adapter's manifest file list.", max_length=80),
        "manifestUri": string("Location of its manifest.json.", max_length=2048),
        "rank": integer("LoRA rank.", minimum=0),
        "podsLoaded": integer("Serving pods whose agent has this version loaded.", minimum=0),
    },
)

NAMESPACE_STATUS = obj(
    "Where one target namespace stands (cluster-wide rollout).",
    {
        "name": string("The namespace.", max_length=63),
        "phase": string("Serving: every pod serves the desired versions; Progressing: some do not yet; NoPods; "
                        "Refused: the namespace does not accept or allow the adapters, none are served there; "
                        "Released: no longer selected, its agents unload the adapters.",
                        enum=["Serving", "Progressing", "NoPods", "Refused", "Released"]),
        "reason": string("Why Refused (NotAccepted, SourceNotAllowed, StorageNotAllowed).", max_length=256),
        "message": string("Detail.", max_length=4096),
        "podsReady": integer("Pods here serving every desired version.", minimum=0),
        "podsTotal": integer("Pods selected here.", minimum=0),
        "versions": string("What is served here: each alias's stable version and canary (as status.summary).",
                           max_length=1024),
    },
)

ADAPTERDEPLOYMENT_STATUS = obj(
    "Observed state, written only by the operator.",
    {
        "phase": string("Informational summary.", enum=["Pending", "Progressing", "Ready", "Degraded"]),
        "summary": string("One line for kubectl get: each alias's stable version (first 12 hex of its digest), "
                          "and the canary with its weight, e.g. 'support-bot 1a2b3c4d5e6f -> 9f8e7d6c5b4a 10%'.",
                          max_length=1024),
        "observedGeneration": integer("The generation the operator last acted on.", minimum=0),
        "lastUpdateTime": LAST_UPDATE_TIME,
        "conditions": conditions(),
        "namespaces": array("Per namespace (runtime.selector.namespaceSelector): what is served there.",
                            NAMESPACE_STATUS, max_items=1000),
        "reach": string("One line for kubectl get: namespaces serving of those selected, and pods ready of all, "
                        "e.g. '2/3 namespaces, 4/4 pods (1 refused)'.", max_length=256),
        "adapters": array(
            "Per-alias rollout state.",
            obj(
                "Versions behind one alias.",
                {
                    "name": string("Adapter name (spec.adapters[].name).", max_length=63),
                    "alias": string("What clients request: <namespace>/<name>.", max_length=320),
                    "stable": ADAPTER_VERSION,
                    "canary": ADAPTER_VERSION,
                    "canaryWeight": integer("Percent of traffic on the canary.", minimum=0, maximum=100),
                    "stepIndex": integer("Current canary step.", minimum=0),
                    "stepStartTime": string("When the current step started.", fmt="date-time"),
                    "analysis": opaque_object("The running analysis step: per-pod counter snapshots taken at its "
                                              "start and the last verdict."),
                    "retiring": array("Former stable versions kept loaded (weight 0) until their grace period ends.",
                                      obj("A retiring version.", {
                                          **ADAPTER_VERSION["properties"],
                                          "unloadAfter": string("When it is unloaded.", fmt="date-time"),
                                      })),
                    "rolledBack": obj("The last canary rolled back; its digest is not tried again.", {
                        "digest": string("Digest.", max_length=80),
                        "version": string("Served name.", max_length=320),
                        "reason": string("Reason.", max_length=256),
                        "metric": string("The metric that failed.", max_length=64),
                        "message": string("Detail.", max_length=32_768),
                        "time": string("When.", fmt="date-time"),
                    }),
                    "refused": obj("Why the source's version is refused (preflight).", {
                        "digest": string("Digest.", max_length=80),
                        "reason": string("Reason.", max_length=256),
                        "message": string("Detail.", max_length=32_768),
                    }),
                    "podsReady": integer("Pods serving the desired version.", minimum=0),
                    "podsTotal": integer("Pods selected.", minimum=0),
                    "drift": opaque_object("Drift watch: state (Calibrating, Watching, Suspect, Drifted, "
                                           "Retraining, Cooldown), the open window, the last windows' verdicts, "
                                           "the retrain in flight, the retrain history with the gate's numbers, "
                                           "and the promoted retrain (served instead of the spec's source while "
                                           "that source is unchanged)."),
                    "podErrors": array("Errors the agents report for this alias's versions.", obj("An error.", {
                        "pod": string("Pod.", max_length=253),
                        "version": string("Served name.", max_length=320),
                        "reason": string("Reason.", max_length=256),
                        "message": string("Detail.", max_length=4096),
                    }), max_items=20),
                },
            ),
        ),
    },
)

ADAPTERDEPLOYMENT_PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Versions", "type": "string", "jsonPath": ".status.summary",
     "description": "Each alias's stable version, and the canary with its weight"},
    {"name": "Base Model", "type": "string", "jsonPath": ".spec.baseModel.uri", "priority": 1},
    {"name": "Reach", "type": "string", "jsonPath": ".status.reach",
     "description": "Namespaces serving of those selected, pods ready of all"},
    {"name": "Strategy", "type": "string", "jsonPath": ".spec.strategy.type"},
    {"name": "Drift", "type": "string", "jsonPath": ".status.adapters[0].drift.state"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

