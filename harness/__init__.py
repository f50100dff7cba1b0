"""The harness, in two layers: `measure` takes one configuration's MACs, throughput and top-1;
`run` sweeps many, keeps their records, and reports, plots and checks them."""
