"""Numerics every method shares: models, local training, seeding, parameter arithmetic, Flower
record I/O with validation, class subspaces and agglomerative clustering.

Nothing here knows about strategies, rounds or methods; it imports only third-party libraries.
"""
