"""The local adapters: a FineTuneJob or an AdapterDeployment on this machine, through the operator's own passes."""
