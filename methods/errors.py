"""The one exception type that carries a message meant for the user."""


class TokenBenchError(ValueError):
    """Bad input to tokenbench: the message names the problem and the allowed values.

    The CLI prints it as one line (exit code 2); library callers can catch it like any ValueError.
    """


class UntrainedWeightsWarning(UserWarning):
    """A method's own parameters are still random: what it keeps (and so its accuracy) means nothing
    until its checkpoint is loaded. Timing does not depend on it, so a throughput-only run hides it."""
