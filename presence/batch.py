"""Lua script calls of one event loop, sent together on redis-py pipelines.

Scripts are redis-py ``Script`` objects (``register_script``): they run by
``EVALSHA`` and load themselves when Redis does not know them (after a
restart or ``SCRIPT FLUSH``). Calls made while a pipeline is in flight go
out together on the next one, so a burst of tracks costs a few round trips
instead of one each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

Arg = str | int | float
_Call = tuple[AsyncScript, Sequence[str], Sequence[Arg], "asyncio.Future[Any]"]

# Keeps the sending tasks referenced while they run.
_background: set[asyncio.Task[None]] = set()


class ScriptBatch:
    """Script calls on ``client`` (one event loop's), one pipeline per round trip.

    A call made while no pipeline is in flight goes out on the next loop
    iteration, with whatever else was called in this one; calls made while a
    pipeline is in flight go out together when it returns. Each call gets its
    own result or error.
    """

    def __init__(self, client: Redis) -> None:
        self.client = client
        self._scripts: dict[str, AsyncScript] = {}
        self._pending: list[_Call] = []
        self._sending = False

    async def call(self, source: str, keys: Sequence[str], args: Sequence[Arg]) -> Any:
        """Run the Lua script ``source`` with ``keys`` and ``args``; its reply.

        Raises:
            RedisError, OSError: the call failed; ``RedisError`` also when the
                sending task was cancelled (shutdown) before the reply came.
        """
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((self._script(source), keys, args, done))
        if not self._sending:
            self._sending = True
            task = asyncio.ensure_future(self._send())
            _background.add(task)
            task.add_done_callback(_background.discard)
        return await done

    def _script(self, source: str) -> AsyncScript:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self.client.register_script(source)
        return script

    async def _send(self) -> None:
        try:
            while self._pending:
                calls, self._pending = self._pending, []
                try:
                    results = await self._run(calls)
                except Exception as error:
                    results = [error] * len(calls)
                except BaseException:
                    # Cancelled (shutdown): every waiting call fails instead of waiting forever.
                    waiting, self._pending = calls + self._pending, []
                    _settle(waiting, [RedisError("presence store call cancelled")] * len(waiting))
                    raise
                _settle(calls, results)
        finally:
            self._sending = False

    async def _run(self, calls: list[_Call]) -> list[Any]:
        if len(calls) == 1:
            script, keys, args, _ = calls[0]
            try:
                return [await script(keys, args)]
            except Exception as error:
                return [error]
        results = await self._pipeline(calls, load=False)
        unknown = [index for index, result in enumerate(results) if isinstance(result, NoScriptError)]
        if unknown:
            # Redis lost its scripts; those calls did not run. A pipeline that
            # carries Script calls loads the missing scripts before it executes.
            try:
                retried = await self._pipeline([calls[i] for i in unknown], load=True)
            except Exception as error:
                retried = [error] * len(unknown)  # the other calls keep their replies
            for index, result in zip(unknown, retried):
                results[index] = result
        return results

    async def _pipeline(self, calls: list[_Call], *, load: bool) -> list[Any]:
        """One pipeline of ``calls``; each reply, or the error Redis answered to it.

        With ``load``, redis-py first asks Redis which scripts it knows
        (``SCRIPT EXISTS``) and loads the others: one more round trip, so
        only after a NOSCRIPT reply.
        """
        async with self.client.pipeline(transaction=False) as pipe:
            for script, keys, args, _ in calls:
                if load:
                    await script(keys, args, client=pipe)
                else:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))


def _settle(calls: list[_Call], results: list[Any]) -> None:
    for (*_, done), result in zip(calls, results):
        if done.done():
            continue
        if isinstance(result, BaseException):
            done.set_exception(result)
        else:
            done.set_result(result)
