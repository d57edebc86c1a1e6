"""Ray actor classes and the actor-group manager (the distributed strategies)."""
