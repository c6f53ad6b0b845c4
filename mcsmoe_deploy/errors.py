"""The one exception type for expected user mistakes.

The CLI prints a UserError as a single line on stderr and exits non-zero;
anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An expected mistake in the input: a missing file, an unsupported model, a bad option."""


class ParameterError(UserError):
    """A parameter outside its range, said in the parameter's own name ("rank_ratio must be in (0, 1], ...").

    A front end that knows the parameter by another name (a CLI flag) can say it with `renamed`.
    """

    def __init__(self, parameter: str, problem: str):
        super().__init__(f"{parameter} {problem}")
        self.parameter = parameter
        self.problem = problem

    def renamed(self, name: str) -> str:
        """The message with the parameter called `name` (e.g. "--rank-ratio must be in (0, 1], not 0")."""
        return f"{name} {self.problem}"


class Terminated(BaseException):
    """SIGTERM arrived while an output was being written (see files.staged_output); like KeyboardInterrupt,
    it is not an Exception, so no `except Exception` swallows it."""
