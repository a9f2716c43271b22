"""A what-if asked through the API runs in a child process of its own, killed past its deadline.

The agent file comes from the tenant, and with it regular expressions (guardrails, consent words) that
the core runs against the call's transcripts. Python's `re` holds the interpreter while it matches, so a
pattern that backtracks without end ("(a+)+$") would stall every call this gateway serves; in a child
it costs the asker a refused request, nothing else. The child gets the call's decoded events, both agent
definitions and the provider settings on its standard input, and writes the comparison back: what runs
there is voxlog's own code, so both ends are trusted and pickle is the format."""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.base import Event, EventPayload
from streams.call.whatif import WhatIfResult, whatif_call
from streams.config.agents import AgentSpec
from streams.providers.registry import ProviderRegistry
from streams.providers.settings import ProviderSettings

DEADLINE_S = 30.0
"""For one call's what-if, the child's start included (about a second): far more than any call takes
with the offline policy, room for a live model's answers."""


CHILDREN_AT_ONCE = 2
"""What-ifs one gateway runs at once: each child is an interpreter with voxlog loaded (about 100 MB, a
second of CPU to start), and the calls this gateway serves come first. A key's request rate alone would
let one tenant start sixty."""


class WhatIfFailed(RuntimeError):
    """The child did not answer: past the deadline (a pattern that backtracks, a model that stalls), or it
    failed; the reason is for the asker."""


class WhatIfBusy(RuntimeError):
    """As many what-ifs as a gateway runs at once are running: the asker may try again shortly."""


@dataclass
class WhatIfChildren:
    """The what-ifs a gateway runs, each in its child (`whatif_isolated`), at most `limit` at once: one more
    is refused at once (`WhatIfBusy`) rather than queued behind work that may run to its deadline."""

    limit: int = CHILDREN_AT_ONCE
    running: int = 0

    async def run(self, events: Sequence[Event[EventPayload]], agent: AgentSpec, recorded_agent: AgentSpec | None,
                  providers: ProviderSettings, *, deadline_s: float = DEADLINE_S) -> WhatIfResult:
        if self.running >= self.limit:
            raise WhatIfBusy(f"{self.running} what-ifs are running on this gateway, as many as it runs at once; "
                             "try again shortly")
        self.running += 1
        try:
            return await whatif_isolated(events, agent, recorded_agent, providers, deadline_s=deadline_s)
        finally:
            self.running -= 1


@dataclass(frozen=True)
class _Job:
    events: Sequence[Event[EventPayload]]
    agent: AgentSpec
    recorded_agent: AgentSpec | None
    providers: ProviderSettings


async def whatif_isolated(events: Sequence[Event[EventPayload]], agent: AgentSpec, recorded_agent: AgentSpec | None,
                          providers: ProviderSettings, *, deadline_s: float = DEADLINE_S) -> WhatIfResult:
    job = pickle.dumps(_Job(tuple(events), agent, recorded_agent, providers))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.whatif_isolation", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(child.communicate(job), deadline_s)
    except TimeoutError as exc:
        raise WhatIfFailed(f"the what-if took longer than {deadline_s:g} s and was stopped (a guardrail or consent "
                           "pattern that backtracks on the call's words, or a model that does not answer)") from exc
    finally:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
            await child.wait()
    if child.returncode != 0:
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no reason given"]
        raise WhatIfFailed(f"the what-if failed: {last[0]}")
    result = pickle.loads(out)
    if not isinstance(result, WhatIfResult):
        raise WhatIfFailed("the what-if answered something else than a comparison")
    return result


async def _run(job: _Job) -> WhatIfResult:
    registry = ProviderRegistry(job.providers)
    try:
        llm, label = registry.whatif_llm(job.agent)
        return await whatif_call(job.events, job.agent, llm, label, recorded_agent=job.recorded_agent)
    finally:
        await registry.aclose()


def main() -> None:
    job = pickle.loads(sys.stdin.buffer.read())
    result = asyncio.run(_run(job))
    sys.stdout.buffer.write(pickle.dumps(result))


if __name__ == "__main__":
    main()
