"""Write the settings tables from yolo_backend/settings.py into README.md (between the settings-table markers).

    python scripts/settings_table.py          # rewrite README.md
    python scripts/settings_table.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yolo_backend.settings import Settings  # noqa: E402

START, END = "<!-- settings-table:start -->", "<!-- settings-table:end -->"


def render(readme: str) -> str:
    block = f"{START}\n{Settings.table()}\n{END}"
    return re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: block, readme, flags=re.S)


def main() -> int:
    path = ROOT / "README.md"
    current = path.read_text()
    if current.count(START) != 1 or current.count(END) != 1:
        print(f"README.md must hold the settings table between one {START} and one {END} line")
        return 1
    wanted = render(current)
    if "--check" in sys.argv:
        if current != wanted:
            print("README.md's settings table is out of date: run python scripts/settings_table.py")
            return 1
        return 0
    path.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
