"""The README's Python example runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        # An example that needs files a clone does not have (e.g. SD weights) says so on its first line.
        if block.startswith("# needs:"):
            continue
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})


def test_readme_opens_with_make_run_and_make_test():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make run", "make test"]
