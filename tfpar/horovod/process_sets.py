"""Horovod's process sets: only the global one (all processes) exists in tfpar.horovod."""

from __future__ import annotations

from typing import Any

__all__ = ["ProcessSet", "add_process_set", "check_process_set", "global_process_set", "remove_process_set"]

_ALTERNATIVE = (
    "tfpar.horovod's collectives run over all processes of the cluster (hvd.global_process_set). "
    "Launch a separate job (tfpar launch) for each group of processes instead."
)


class ProcessSet:
    """A set of ranks. Only :data:`global_process_set` (every rank) is supported.

    Raises:
        NotImplementedError: When constructed (a subset of ranks).

    Example:
    >>> hvd.allreduce(x, process_set=hvd.global_process_set)    # the default
    """

    def __init__(self, ranks_or_comm: Any) -> None:
        raise NotImplementedError(f"Process sets are not supported. {_ALTERNATIVE} Received: {ranks_or_comm!r}")

    @staticmethod
    def _make_global() -> ProcessSet:
        instance = object.__new__(ProcessSet)
        return instance

    @property
    def process_set_id(self) -> int:
        """0, Horovod's id of the global process set."""
        return 0

    def size(self) -> int:
        """The number of processes (:func:`hvd.size`)."""
        from tfpar.horovod import _state

        return _state.size()

    def rank(self) -> int:
        """This process's rank (:func:`hvd.rank`)."""
        from tfpar.horovod import _state

        return _state.rank()

    def included(self) -> bool:
        """True: every process is in the global set."""
        return True

    def __repr__(self) -> str:
        return "hvd.global_process_set"


global_process_set = ProcessSet._make_global()


def add_process_set(process_set: Any) -> ProcessSet:
    """Not supported: raises NotImplementedError naming the alternative.

    Example:
    >>> hvd.add_process_set([0, 1])
    Traceback (most recent call last):
    NotImplementedError: ...
    """
    raise NotImplementedError(f"hvd.add_process_set is not supported. {_ALTERNATIVE} Received: {process_set!r}")


def remove_process_set(process_set: Any) -> bool:
    """Not supported: raises NotImplementedError naming the alternative.

    Example:
    >>> hvd.remove_process_set(ps)
    Traceback (most recent call last):
    NotImplementedError: ...
    """
    raise NotImplementedError(f"hvd.remove_process_set is not supported. {_ALTERNATIVE} Received: {process_set!r}")


def check_process_set(process_set: Any) -> None:
    """Raises NotImplementedError unless `process_set` is the global process set."""
    if process_set is not global_process_set:
        raise NotImplementedError(
            f"Only hvd.global_process_set is supported. {_ALTERNATIVE} Received: process_set={process_set!r}"
        )
