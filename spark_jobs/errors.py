"""The one error type of the prepare job: bad input, named precisely."""


class PrepareError(ValueError):
    """Input that cannot become a dataset; the message names the file, line or key and what was expected."""
