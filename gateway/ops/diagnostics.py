"""What every task of the running gateway is waiting on, logged on SIGUSR2.

A gateway that looks healthy (consumers live, /readyz ready, the loop idle) yet settles nothing
is waiting somewhere for something that will not come (a publish and an ack blocked for good on a
dead connection's write queue look exactly like that); each task's await chain shows where. This
is that dump, for operators: `kill -USR2 <pid>` (in a pod,
`kubectl exec <pod> -- kill -USR2 1`) logs one `task_dump` summary line, then one `task_waits`
line per distinct await chain with how many tasks share it, most shared first.

Only code locations are logged (function and line), never a frame's locals: no message text,
number or credential can reach the log this way.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from types import CoroutineType, FrameType, GeneratorType
from typing import Any

from gateway.obs.logs import get_logger

log = get_logger("gateway.ops.diagnostics")

MAX_DEPTH = 40  # links followed per task: enough for aio-pika under the gateway's own frames


def await_chain(task: asyncio.Task[Any]) -> list[str]:
    """The task's coroutine, what it awaits, what that awaits, ... down to the innermost frame or
    the future at the bottom: `qualname:line` per coroutine, the future's kind at the end."""
    links: list[str] = []
    node: Any = task.get_coro()
    while node is not None and len(links) < MAX_DEPTH:
        frame: FrameType | None
        if isinstance(node, CoroutineType):
            frame, nxt = node.cr_frame, node.cr_await
        elif isinstance(node, GeneratorType):
            frame, nxt = node.gi_frame, node.gi_yieldfrom
        elif hasattr(node, "ag_frame"):  # an async generator's asend/athrow
            frame, nxt = node.ag_frame, node.ag_await
        else:  # a future, a task, or an awaitable object of a library
            links.append(_leaf(node))
            break
        if frame is None:  # finished or not started
            links.append(f"{getattr(node, '__qualname__', type(node).__qualname__)}:done")
            break
        links.append(f"{frame.f_code.co_qualname}:{frame.f_lineno}")
        node = nxt
    return links


def _leaf(node: Any) -> str:
    if isinstance(node, asyncio.Task):
        return f"Task[{node.get_name()}]"
    kind = type(node).__qualname__
    if isinstance(node, asyncio.Future) or kind == "FutureIter":  # `await future` shows its iterator
        return "Future"
    return kind


def dump_tasks(loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Log the await chains of every pending task of `loop` (the running one by default), grouped;
    return how many tasks there were."""
    tasks = asyncio.all_tasks(loop)
    chains: Counter[tuple[str, ...]] = Counter()
    names: dict[tuple[str, ...], str] = {}
    for task in tasks:
        chain = tuple(await_chain(task))
        chains[chain] += 1
        names.setdefault(chain, task.get_name())
    log.warning("task_dump", tasks=len(tasks), distinct_chains=len(chains))
    for chain, count in chains.most_common():
        log.warning("task_waits", count=count, example_task=names[chain], chain=" > ".join(chain))
    return len(tasks)
