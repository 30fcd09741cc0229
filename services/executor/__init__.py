"""The executor service: resolves enforcements through the api, exactly once."""

from services.executor._executor import Decision, Executor, default_executor_id

__all__ = ["Decision", "Executor", "default_executor_id"]
