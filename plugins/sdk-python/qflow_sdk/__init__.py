"""Write Qflow steps in Python as plain functions or classes over plain values.

A step is a function of its input (and, if it takes one, its config)::

    from qflow_sdk import step

    @step(description="Counts the words of its input")
    def run(text: str) -> dict:
        return {"words": len(text.split())}

or a class, built once per instance from the step's config::

    @step(description="Keeps the records whose field is at least a minimum")
    class AtLeast:
        def __init__(self, config):
            self.field, self.minimum = config["field"], config.get("minimum", 0)

        def run(self, records):
            return [r for r in records if r[self.field] >= self.minimum]

The SDK does the contract's plumbing: the config (``{}`` when the flow gives
none) and the input arrive as Python values parsed from JSON, the output is
written back as JSON, and any exception becomes a step error carrying its
message (``StepError`` sets the code and whether a retry may help). ``log``
writes to the run's log through ``host.log``; ``asset`` reads a loader's
asset; ``sql.query`` and ``sql.execute`` reach the databases granted to the
step.

``qflow build`` builds such a project with componentize-py against the
contract's WIT (``wit/0.2.0``): the bindings are generated at build time.
"""

import json
import traceback

from componentize_py_types import Err
from wit_world.imports import host, sql as _sql, types

__all__ = ["step", "StepError", "log", "asset", "sql"]


class StepError(Exception):
    """A failure with a code (such as ``bad-input``) and a message; set
    ``retryable`` when running the same call again may succeed."""

    def __init__(self, message, code="error", retryable=False):
        super().__init__(message)
        self.code = code
        self.message = str(message)
        self.retryable = retryable


_LEVELS = {
    "trace": types.LogLevel.TRACE,
    "debug": types.LogLevel.DEBUG,
    "info": types.LogLevel.INFO,
    "warn": types.LogLevel.WARN,
    "error": types.LogLevel.ERROR,
}


def log(message, level="info"):
    """Writes a line to the run's log, attributed to the calling step."""
    host.log(_LEVELS.get(level, types.LogLevel.INFO), str(message))


def asset(name):
    """The bytes of the asset ``loader-id/name``."""
    try:
        return host.asset(name)
    except Err as e:
        raise StepError(e.value.message, e.value.code, e.value.retryable) from None


class _Sql:
    """The databases granted to the step (``databases = [...]`` in the flow).
    Parameters ($1, $2, …) are bound by the database, never spliced in."""

    @staticmethod
    def _value(v):
        if v is None:
            return _sql.Value_Null()
        if isinstance(v, bool):
            return _sql.Value_Boolean(v)
        if isinstance(v, int):
            if not -(2**63) <= v < 2**63:
                raise StepError(f"the integer {v} does not fit a SQL parameter (64 bits); pass it as text", "bad-input")
            return _sql.Value_Integer(v)
        if isinstance(v, float):
            return _sql.Value_Real(v)
        if isinstance(v, (bytes, bytearray)):
            return _sql.Value_Blob(bytes(v))
        if isinstance(v, str):
            return _sql.Value_Text(v)
        return _sql.Value_Text(json.dumps(v))

    @staticmethod
    def _error(e):
        kind = e.value.kind.name.lower().replace("_", "-")
        retryable = kind in ("timeout", "unavailable")
        return StepError(e.value.message, "sql-" + kind, retryable)

    def query(self, db, statement, *params):
        """The rows, as a list of dicts keyed by column name."""
        try:
            rows = _sql.query(db, statement, [self._value(p) for p in params])
        except Err as e:
            raise self._error(e) from None
        return json.loads(rows)

    def execute(self, db, statement, *params):
        """How many rows the statement changed."""
        try:
            return _sql.execute(db, statement, [self._value(p) for p in params])
        except Err as e:
            raise self._error(e) from None


sql = _Sql()

# What `@step` registered: the step's factory and what it says about itself.
_registered = {}
_instance = None
# The project's name, set by the entry module `qflow build` writes: the
# name a step reports unless it gives one.
_project = None


def step(name=None, version="0.1.0", description="", assets=(), needs=()):
    """Marks a function ``run(input[, config])`` or a class with
    ``__init__(self, config)`` and ``run(self, input)`` as the step. ``name``
    defaults to the project's (the component's file name is what flows use)."""

    def register(target):
        if isinstance(target, type):
            factory = target
        else:
            takes_config = target.__code__.co_argcount >= 2

            class FunctionStep:
                def __init__(self, config):
                    self.config = config

                def run(self, input):
                    return target(input, self.config) if takes_config else target(input)

            factory = FunctionStep
        _registered.update(
            factory=factory,
            info=types.PluginInfo(
                name=name,
                version=version,
                description=description,
                kind=types.PluginKind.STEP,
                assets=list(assets),
                needs=list(needs),
            ),
        )
        return target

    return register


def _failure(e, code="error"):
    if isinstance(e, StepError):
        return Err(types.StepError(e.code, e.message, e.retryable))
    message = "".join(traceback.format_exception_only(type(e), e)).strip()
    log(traceback.format_exc(), "debug")
    return Err(types.StepError(code, message, False))


def _settled(value, what):
    """What a step returned, refused if it is awaitable (a coroutine): the
    call must finish before it returns, so a step cannot be `async def`."""
    if hasattr(value, "__await__"):
        if hasattr(value, "close"):
            value.close()  # no "never awaited" warning
        raise StepError(
            f"{what} returned a coroutine: a step's {what} must finish before it returns (no async def)",
            "async-unsupported",
        )
    return value


def _required():
    if not _registered:
        raise StepError("no step: decorate a function or class with @qflow_sdk.step", "no-step")
    return _registered


class WitWorld:
    """The `step` world's exports, over what `@step` registered."""

    def describe(self):
        info = _required()["info"]
        if info.name is None:
            info.name = _project or "step"
        return info

    def init(self, config):
        global _instance
        try:
            _instance = _settled(_required()["factory"](json.loads(config) if config else {}), "init")
        except Exception as e:
            raise _failure(e, "bad-config")

    def run(self, input):
        try:
            if _instance is None:
                raise StepError("run before init: the host always calls init first", "no-init")
            return json.dumps(_settled(_instance.run(json.loads(input)), "run"), allow_nan=False)
        except Exception as e:
            raise _failure(e)
