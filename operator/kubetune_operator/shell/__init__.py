"""One reconcile pass per kind (`run_pass`), over ports that the cluster and local adapters implement."""
