"""CI gate: the junit reports (parallel run, serial run) must show e2e and fault tests that ran, none skipped, none failed."""

import sys
import xml.etree.ElementTree as ET

SUITES = ("e2e", "faults", "fuzz")  # real guests (e2e, faults) and the input fuzzing

ran = dict.fromkeys(SUITES, 0)
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
print("CI: " + ", ".join(f"{n} {s} tests ran" for s, n in ran.items()) + f", {skipped} skipped")
if skipped or not all(ran.values()):
    sys.exit("CI: e2e, fault and fuzz tests must all run and none may be skipped")
