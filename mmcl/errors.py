"""The errors mmcl raises for bad input, each with a one-line message naming what is wrong.

They share a base, :class:`MmclError`, so the command line maps every one of them to one line
``mmcl CMD: error: ...`` and a non-zero exit; each kind is its own class, so a network failure does not read
as a configuration mistake. They are importable from here and from the modules that raise them
(``mmcl.config.ConfigError``, ``mmcl.data.shards.DataError``, ``mmcl.eval.suite.EvalError``, ``mmcl.hub.HubError``).
"""

from __future__ import annotations


class MmclError(Exception):
    """Base of mmcl's errors: the input cannot be used (one-line message)."""


class ConfigError(MmclError, ValueError):
    """A configuration value is missing, unknown or outside its allowed values (one-line message)."""


class DataError(MmclError):
    """The data cannot be used: a shard spec, a shard, a manifest (one-line message naming the path)."""


class EvalError(MmclError):
    """A suite cannot run on this model or data (one-line message naming the task)."""


class HubError(MmclError):
    """A model directory or Hub repo cannot be loaded or published (one-line message)."""
