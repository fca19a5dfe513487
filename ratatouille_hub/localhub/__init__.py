"""A local Hub-compatible server and its store: test, demo and benchmark infrastructure, not the product."""
