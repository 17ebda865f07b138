"""Cryptographic building blocks for private federated aggregation."""
