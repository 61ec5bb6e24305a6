"""The control plane: the kopf operator, `kubetune local`, and the `kubetune` command."""
