#!/usr/bin/env python3
"""Judge Autobahn TestSuite reports (the suite's index.json, one per agent).

    autobahn_judge.py [--summary FILE] AGENT=PATH/index.json ...

Every case must be OK or INFORMATIONAL, or NON-STRICT where NON_STRICT below says why
(for that agent); its closing behaviour OK or INFORMATIONAL. Anything else (FAILED,
WRONG CODE, UNCLEAN, UNIMPLEMENTED, an undocumented NON-STRICT) is a failure: exit 1.
Prints, and writes to --summary as Markdown, a table per agent and section.
"""

import json
import re
import sys
from collections import OrderedDict

# NON-STRICT results that are accepted, and why: (agent regex, case regex, reason).
NON_STRICT = [
    (
        "router|router-deflate|loadgen",
        r"6\.4\.[34]",
        "invalid UTF-8 inside one frame that arrives in several TCP segments: the frame is "
        "checked once it is whole (a frame is at most --max-frame, or 16 MiB for loadgen), "
        "not segment by segment; a message in several frames is checked frame by frame "
        "(6.4.1, 6.4.2 pass)",
    ),
]

PASSING = {"OK", "INFORMATIONAL"}
SECTION_NAMES = {
    "1": "framing",
    "2": "pings/pongs",
    "3": "reserved bits",
    "4": "opcodes",
    "5": "fragmentation",
    "6": "UTF-8",
    "7": "close handling",
    "9": "limits/performance",
    "10": "misc",
    "12": "permessage-deflate (messages)",
    "13": "permessage-deflate (parameters)",
}


def case_key(case):
    return [int(p) for p in case.split(".")]


def non_strict_reason(agent, case):
    for agent_re, case_re, reason in NON_STRICT:
        if re.fullmatch(agent_re, agent) and re.fullmatch(case_re, case):
            return reason
    return None


def main(argv):
    summary = None
    if len(argv) >= 2 and argv[0] == "--summary":
        summary, argv = argv[1], argv[2:]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    problems = []
    lines = []
    # An agent's cases, from one report or several (sections run side by side).
    by_agent = OrderedDict()
    for arg in argv:
        agent, path = arg.split("=", 1)
        try:
            with open(path) as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            problems.append("%s: no report (%s)" % (path, e))
            continue
        cases = index.get(agent)
        if not cases:
            problems.append("%s: the report has no cases for agent %s" % (path, agent))
            continue
        by_agent.setdefault(agent, {}).update(cases)
    for agent, cases in by_agent.items():
        per_section = OrderedDict()
        for case in sorted(cases, key=case_key):
            r = cases[case]
            behavior, close = r.get("behavior"), r.get("behaviorClose")
            section = case.split(".")[0]
            counts = per_section.setdefault(
                section, OrderedDict((k, 0) for k in ("OK", "NON-STRICT", "INFORMATIONAL", "FAILED"))
            )
            ok = True
            if behavior == "NON-STRICT":
                reason = non_strict_reason(agent, case)
                if reason is None:
                    problems.append("%s %s: NON-STRICT without a documented reason" % (agent, case))
                    ok = False
            elif behavior not in PASSING:
                problems.append("%s %s: %s" % (agent, case, behavior))
                ok = False
            if close not in PASSING:
                problems.append("%s %s: close %s (code %s)" % (agent, case, close, r.get("remoteCloseCode")))
                ok = False
            counts[behavior if ok and behavior in counts else ("FAILED" if not ok else behavior)] += 1
        lines.append("")
        lines.append("%s: %d cases" % (agent, len(cases)))
        lines.append("")
        lines.append("| section | cases | OK | NON-STRICT | INFORMATIONAL | FAILED |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for section, c in per_section.items():
            lines.append(
                "| %s %s | %d | %d | %d | %d | %d |"
                % (section, SECTION_NAMES.get(section, ""), sum(c.values()), c["OK"], c["NON-STRICT"], c["INFORMATIONAL"], c["FAILED"])
            )
    text = "\n".join(lines) + "\n"
    print(text)
    if summary:
        with open(summary, "w") as f:
            f.write(text)
    if problems:
        print("Autobahn TestSuite: %d problem(s):" % len(problems), file=sys.stderr)
        for p in problems:
            print("  " + p, file=sys.stderr)
        return 1
    print("Autobahn TestSuite: every case passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
