"""Submitting ``moe-train`` runs to a Ray cluster as Ray Jobs (``moe-submit``).

Kept apart from ``moe_trainer`` and ``actors``: nothing here runs on the cluster.
The job itself is plain ``moe-train``; inside it Ray Jobs sets ``RAY_ADDRESS`` to the
cluster's GCS address, which ``actors.cluster.connect`` uses for the Ray strategies.
"""
