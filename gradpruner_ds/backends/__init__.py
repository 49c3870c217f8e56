"""Adapters to one training engine each: the only modules that know an engine's internals."""
