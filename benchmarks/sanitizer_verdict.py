"""The verdict on one compute-sanitizer log of benchmarks/cuda_smoke.py, for gpu_validate.sh.

Usage: python benchmarks/sanitizer_verdict.py memcheck|racecheck LOG RC
(RC: the exit status of the sanitizer run, started without --error-exitcode, so the smoke's own).
Prints one line; exit status 0 for a clean run, 1 otherwise.

memcheck's ERROR SUMMARY counts every CUDA API call that returned an error, and PyTorch makes some
on purpose (probes whose error it clears).  Our own CUDA calls are all checked (C10_CUDA_CHECK,
C10_CUDA_KERNEL_LAUNCH_CHECK), so one of them failing raises and the smoke exits non-zero.  A run is
clean when the smoke exited 0 and printed its last line ("<backend> smoke: all ok": it ran), the
tool reported no error of its own ("========= Error: ...", such as no process to attach to), the
log holds the tool's summary (the tool ran to its end), and every error of the summary is an API
error the log names (memcheck: none left for memory accesses; more errors than lines printed count
as memory errors) or there is no hazard error (racecheck).  The API errors and racecheck's warnings
are named in the verdict, which says they are not counted.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from typing import Tuple

API_ERROR = re.compile(r"Program hit (\w+) \(error \d+\).*? on CUDA API call to (\w+)")
MEMCHECK_SUMMARY = re.compile(r"ERROR SUMMARY: (\d+) errors?")
RACECHECK_SUMMARY = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
SMOKE_DONE = re.compile(r"^\w+ smoke: all ok$", re.M)
TOOL_ERROR = re.compile(r"^=+ (?:Internal )?Error: (?!Race reported)(.*)$", re.M)  # a racecheck hazard is counted


def _api_note(api: Counter) -> str:
    calls = ", ".join(f"{n} x {call} -> {err}" for (err, call), n in api.most_common())
    return f"; {sum(api.values())} CUDA API error(s) not counted ({calls})" if api else ""


def verdict(tool: str, text: str, rc: int) -> Tuple[bool, str]:
    """(clean, one line saying why) for the log text of one run of tool with exit status rc."""
    api = Counter(API_ERROR.findall(text))
    if tool == "memcheck":
        m = MEMCHECK_SUMMARY.search(text)
        if m is None:
            return False, "no ERROR SUMMARY in the log: memcheck did not run to its end"
        memory = int(m.group(1)) - sum(api.values())
        found = f"{max(memory, 0)} memory error(s){_api_note(api)}"
        clean = memory <= 0
    elif tool == "racecheck":
        m = RACECHECK_SUMMARY.search(text)
        if m is None:
            return False, "no RACECHECK SUMMARY in the log: racecheck did not run to its end"
        errors, warnings = int(m.group(2)), int(m.group(3))
        found = f"{errors} hazard error(s), {warnings} hazard warning(s) (not counted){_api_note(api)}"
        clean = errors == 0
    else:
        raise ValueError(f"tool: expected memcheck or racecheck, got {tool!r}")
    if rc != 0:
        return False, f"cuda_smoke.py exited {rc} (a check failed or raised: see the log); {found}"
    tool_error = TOOL_ERROR.search(text)
    if tool_error:
        return False, f"{tool} reported an error of its own: {tool_error.group(1).strip()}; {found}"
    if not SMOKE_DONE.search(text):
        return False, f"no 'smoke: all ok' line: cuda_smoke.py did not run to its end under {tool}; {found}"
    return clean, found


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or not argv[2].lstrip("-").isdigit():
        print("usage: sanitizer_verdict.py memcheck|racecheck LOG RC", file=sys.stderr)
        return 2
    tool, log, rc = argv[0], argv[1], int(argv[2])
    try:
        with open(log, errors="replace") as f:
            text = f.read()
    except OSError as e:
        print(f"cannot read {log}: {e}")
        return 1
    try:
        clean, why = verdict(tool, text, rc)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    print(why)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
