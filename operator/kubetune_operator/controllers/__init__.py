"""The cluster adapters: kopf handlers, the operator's login and process (docs/architecture.md)."""

import sys

# kopf recognises kubernetes_asyncio's model objects when that library can be imported, and so imports
# all of it (~40 MiB of memory) at start-up; kubetune never hands kopf such objects. It is hidden while kopf
# loads; a kubeconfig login that needs it (controllers.login) imports it later as usual.
if "kopf" not in sys.modules and "kubernetes_asyncio" not in sys.modules:
    sys.modules["kubernetes_asyncio"] = None  # type: ignore[assignment]
    try:
        import kopf  # noqa: F401
    finally:
        del sys.modules["kubernetes_asyncio"]
