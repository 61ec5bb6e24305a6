"""The serving agent: a sidecar next to the inference engine (vLLM or the CPU engine) in every serving pod.

It pulls the desired state the operator writes (`kubetune.api.serving.DesiredState`), downloads and
verifies adapters, loads and unloads them in the engine, routes clients' alias requests to concrete
versions by weight, measures every version, samples traffic to storage, and reports what it did
(`kubetune.api.serving.AgentReport`). `plan` holds the decisions (pure); `sync`, `proxy` and
`__main__` are the I/O shell. See README.md in this directory.
"""
