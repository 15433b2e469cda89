"""``lorapipe report``: one page for a whole run (a section per stage, in DAG order, and the
demo's claims when there are any), and each stage's own page, which is its section alone.

The KFP pipeline's last step writes the run page as its HTML artifact, and every step its own
page; ``make run`` writes ``runs/pipeline/report.html``. Pictures are embedded, so the page
opens alone; full-size files are linked when they lie beside it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorapipe import store
from lorapipe.errors import ConfigError
from lorapipe.report import sections
from lorapipe.report.page import STAGE_TITLES, Page, PageLinks, Section, render

if TYPE_CHECKING:
    from lorapipe.demo.claims import Claim

SectionBuilder = Callable[[str, PageLinks], Section]
BUILDERS: dict[str, SectionBuilder] = {
    "fingerprint": sections.fingerprint_section,
    "ingest": sections.ingest_section,
    "tag": sections.tag_section,
    "augment": sections.augment_section,
    "train": sections.train_section,
    "select": sections.select_section,
    "generate": sections.generate_section,
}


@dataclass(frozen=True)
class StageOutputs:
    """The output folder (local or s3://) of each stage of one run; None: it did not run."""

    ingest: str | None = None
    tag: str | None = None
    augment: str | None = None
    train: str | None = None
    select: str | None = None
    generate: str | None = None
    fingerprint: str | None = None  # the first step's; last, so positional use stays as it was

    def present(self) -> list[tuple[str, str]]:
        """(stage, output) of the stages that ran, in DAG order."""
        return [(stage, uri) for stage in BUILDERS if (uri := getattr(self, stage))]


def stage_page(stage: str, output_uri: str, links: PageLinks | None = None) -> str:
    """The HTML page of one stage's output: its section alone."""
    section = BUILDERS[stage](output_uri, links or PageLinks())
    return render(Page(f"lorapipe {stage}", [section], subtitle=output_uri))


def run_page(
    outputs: StageOutputs, claims: Sequence[Claim] = (), links: PageLinks | None = None
) -> str:
    """The HTML page of a whole run: a section per stage that ran, then the claims."""
    links = links or PageLinks()
    present = outputs.present()
    if not present:
        raise ConfigError("lorapipe report: give at least one stage output (--ingest, ...)")
    page_sections = [BUILDERS[stage](uri, links) for stage, uri in present]
    subtitle = " → ".join(STAGE_TITLES[stage] for stage, _ in present)
    if claims:
        page_sections.append(sections.claims_section(claims))
        passed = sum(claim.passed for claim in claims)
        subtitle += f"; {passed} of {len(claims)} demo claims pass (last section)"
    return render(Page("lorapipe run report", page_sections, subtitle=subtitle))


def write_run_report(outputs: StageOutputs, path: Path, claims: Sequence[Claim] = ()) -> Path:
    """Write the run page to ``path``, linking the full-size files relative to it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    html = run_page(outputs, claims, PageLinks(path.parent))
    store.write_text(str(path), html)
    return path


def configure_parser(parser: argparse.ArgumentParser) -> None:
    for stage in BUILDERS:
        parser.add_argument(
            f"--{stage}", metavar="URI", help=f"the output folder of the pipeline's {stage} step"
        )
    parser.add_argument(
        "--out", required=True, help="the HTML file to write (e.g. runs/mine/report.html)"
    )


def main(args: argparse.Namespace) -> int:
    outputs = StageOutputs(**{stage: getattr(args, stage) for stage in BUILDERS})
    path = write_run_report(outputs, Path(args.out))
    print(f"wrote {path}: {', '.join(stage for stage, _ in outputs.present())}")
    return 0
