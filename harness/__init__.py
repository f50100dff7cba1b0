"""Measurements of one configuration: MACs, throughput, accuracy; and the sweeps built on them."""
