"""CI gate: the junit reports (parallel run, serial run) must show that every e2e, fault and fuzz
test module ran tests, none skipped, none failed (a module whose cases were collected but never
run, as schemathesis' under pytest-xdist, fails here)."""

import sys
import xml.etree.ElementTree as ET
from pathlib import Path

SUITES = ("e2e", "faults", "fuzz")  # real guests (e2e, faults) and the input fuzzing
TESTS = Path(__file__).resolve().parent.parent / "tests"

ran = dict.fromkeys(SUITES, 0)
modules: set[str] = set()
skipped = 0
cases = [c for report in sys.argv[1:] for c in ET.parse(report).getroot().iter("testcase")]
for case in cases:
    classname = case.get("classname", "")
    suite = next((s for s in SUITES if f".{s}." in classname or classname.startswith(s)), None)
    if suite is None:
        continue
    if case.find("skipped") is not None:
        skipped += 1
        print(f"CI: {suite} test skipped: {classname}.{case.get('name')}")
    else:
        ran[suite] += 1
        parts = classname.split(".")
        modules.add(".".join(parts[: parts.index(suite) + 2]))
expected = {
    f"tests.{suite}.{f.stem}" for suite in SUITES for f in (TESTS / suite).glob("test_*.py")
}
missing = sorted(expected - modules)
print("CI: " + ", ".join(f"{n} {s} tests ran" for s, n in ran.items()) + f", {skipped} skipped")
if missing:
    sys.exit(f"CI: no test of these modules ran: {', '.join(missing)}")
if skipped or not all(ran.values()):
    sys.exit("CI: e2e, fault and fuzz tests must all run and none may be skipped")
