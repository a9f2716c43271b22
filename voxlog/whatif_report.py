"""`voxlog replay whatif --out report.html`: the comparisons as one page that needs nothing else (no
script, no network), every text escaped: what a caller said cannot become markup."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from streams.call.whatif import Act, TurnComparison, WhatIfResult

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h2 { margin-top: 2em; font-size: 16px; }
table { border-collapse: collapse; width: 100%; }
td, th { border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; text-align: left; }
tr.first td { background: #fff3cd; }
tr.after td { color: #777; }
tr.same td.acts { color: #555; }
.note { font-size: 12px; color: #8a5a00; }
"""


def _acts(acts: Sequence[Act]) -> str:
    return "<br>".join(escape(act.describe()) for act in acts) or "<em>(nothing)</em>"


def _row(turn: TurnComparison, first: int | None) -> str:
    kind = "first" if turn.index == first else "after" if turn.after_difference else "same" if turn.same else ""
    notes = "".join(f'<div class="note">{escape(note)}</div>' for note in turn.notes)
    mark = "first difference" if turn.index == first else "counterfactual" if turn.after_difference else ""
    return (f'<tr class="{kind}"><td>{turn.index}<br><small>{mark}</small></td><td>{escape(turn.caller)}</td>'
            f'<td class="acts">{_acts(turn.then)}</td><td class="acts">{_acts(turn.now)}{notes}</td>'
            f"<td>{escape(turn.answered_by)}</td></tr>")


def report_html(results: Sequence[WhatIfResult]) -> str:
    changed = sum(1 for r in results if r.changed)
    compared = sum(1 for r in results if r.problem is None)
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>voxlog what-if</title><style>{_STYLE}</style>"
             f"</head><body><h1>What-if: compared {compared} calls, {changed} changed</h1>"]
    for result in results:
        parts.append(f"<h2>{escape(result.call_id)}: {escape(result.summary)}</h2>"
                     f"<p>agent {escape(result.agent_then.id)} {escape(result.agent_then.version[:12])} &rarr; "
                     f"{escape(result.agent_now.id)} {escape(result.agent_now.version[:12])}; new LLM requests: "
                     f"{escape(result.llm)}</p>")
        if result.turns:
            parts.append("<table><tr><th>turn</th><th>caller</th><th>then</th><th>now</th><th>LLM</th></tr>")
            parts += [_row(turn, result.first_difference) for turn in result.turns]
            parts.append("</table>")
    parts.append("</body></html>")
    return "".join(parts)
