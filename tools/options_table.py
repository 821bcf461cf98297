"""Rewrite docs/USAGE.md's options table from onnxsnp/option_schema.py, the one place options are
declared (tests/test_option_schema.py fails while the table is out of date)."""
from __future__ import annotations


from harness import DOCS

from onnxsnp.option_schema import markdown_table

USAGE = DOCS / "USAGE.md"
BEGIN = "<!-- options table: written by tools/options_table.py from onnxsnp/option_schema.py -->\n"
END = "<!-- end of options table -->\n"


def with_table(text: str) -> str:
    """`text` with the part between the markers replaced by the schema's table."""
    if text.count(BEGIN) != 1 or text.count(END) != 1:
        raise SystemExit(f"{USAGE}: expected the markers once each:\n{BEGIN}{END}")
    head, rest = text.split(BEGIN)
    return head + BEGIN + markdown_table() + END + rest.split(END)[1]


if __name__ == "__main__":
    USAGE.write_text(with_table(USAGE.read_text()))
    print(f"wrote {USAGE}")
