"""CI gate: the junit report must show e2e tests that ran, none skipped, none failed."""

import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
cases = root.iter("testcase")
e2e = ran = skipped = 0
for case in cases:
    if ".e2e." not in case.get("classname", "") and not case.get("classname", "").startswith("e2e"):
        continue
    e2e += 1
    if case.find("skipped") is not None:
        skipped += 1
        print(f"CI: e2e test skipped: {case.get('classname')}.{case.get('name')}")
    else:
        ran += 1
print(f"CI: {ran} e2e tests ran, {skipped} skipped")
if e2e == 0 or skipped:
    sys.exit("CI: e2e tests must run and must not be skipped")
