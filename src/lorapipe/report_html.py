"""The demo's addition to the ``lorapipe generate`` report (``lorapipe.generation.report``): a
table of its measured claims right under the title (the page's STYLE has its pass/fail
classes)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorapipe.demo_checks import Claim


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def add_claims_section(report_html: str, claims: Sequence[Claim]) -> str:
    """``report_html`` with a "What this run shows" table (claim, measured, threshold,
    PASS/FAIL) right under its title: the demo's measured claims, first thing a reader sees."""
    rows = "".join(
        f"<tr><td>{_e(claim.claim)}</td><td>{_e(claim.measured)}</td>"
        f"<td>{_e(claim.threshold)}</td>"
        f'<td class="{"pass" if claim.passed else "fail"}">'
        f"{'PASS' if claim.passed else 'FAIL'}</td></tr>"
        for claim in claims
    )
    section = (
        "<h2>What this run shows</h2>"
        "<p class=\"muted\">Measured on this run's outputs against the world's ground truth "
        "(lorapipe.demo_checks).</p>"
        "<table><tr><th>claim</th><th>measured</th><th>needs</th><th></th></tr>"
        f"{rows}</table>"
    )
    return report_html.replace("</h1>", "</h1>\n" + section, 1)
