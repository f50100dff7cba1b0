"""Running many configurations: the sweep, its records, and the reports, figures and checks that read them."""
