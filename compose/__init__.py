"""Real multi-node deployments of Lloom; `cluster.py` runs one on this machine (see README.md here)."""
