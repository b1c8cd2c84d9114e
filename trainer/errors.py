"""Errors a user can act on. The CLI prints their message without a traceback and exits 2."""


class UserError(Exception):
    """Base class: the message names the file, key or worker and what to do."""


class DataError(UserError):
    pass


class CheckpointError(UserError):
    pass


class HandoffError(UserError):
    pass


class PredictionError(UserError):
    pass
