"""The base of every error this project raises on purpose: bad params, data, checkpoints or files.
A stage prints these as one line; anything else is a bug and keeps its traceback."""


class HanpruneError(Exception):
    pass


class DataError(HanpruneError):
    """A dataset that cannot be fetched, or whose files are not what they must be."""
