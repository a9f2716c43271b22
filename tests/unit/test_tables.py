"""The analysts' tables are documented where they look: docs/analytics.md is made from their definitions."""

from __future__ import annotations

from pathlib import Path

from projections.tables import ANALYST_TABLES, analytics_markdown

DOCS = Path(__file__).resolve().parents[2] / "docs" / "analytics.md"


def test_docs_analytics_describes_every_table_and_column_as_defined() -> None:
    assert analytics_markdown() in DOCS.read_text(), (
        "docs/analytics.md is stale: paste projections.tables.analytics_markdown() under '## Tables'")


def test_every_column_says_what_it_is_and_every_table_has_a_version() -> None:
    for table in ANALYST_TABLES:
        assert table.column_names[-1] == "_version", table.name
        assert len(set(table.column_names)) == len(table.column_names), table.name
        for column in table.columns:
            assert column.doc.strip(), f"{table.name}.{column.name}"
