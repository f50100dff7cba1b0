"""Measuring one configuration: MACs, throughput in an execution mode, data and top-1, across processes."""
